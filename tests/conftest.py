"""Shared test setup.

MXNet 1.9.1 and TensorFlow share one interpreter only if mxnet is imported first (the other
order segfaults), so where both are installed (the `cross` tox env) mxnet goes first, before
any test module can import TensorFlow through Keras.
"""

import importlib.util

if importlib.util.find_spec("mxnet") is not None and importlib.util.find_spec("tensorflow") is not None:
    import mxnet  # noqa: F401
