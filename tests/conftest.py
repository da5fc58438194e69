"""Shared test setup: the import order of MXNet and TensorFlow, and what the machine has.

MXNet 1.9.1 and TensorFlow share one interpreter only if mxnet is imported first (the other
order segfaults), so where both are installed (the `cross` tox env) mxnet goes first, before
any test module can import TensorFlow through Keras.
"""

import importlib.util
import os
import shlex
import shutil
import sysconfig

import pytest

if importlib.util.find_spec("mxnet") is not None and importlib.util.find_spec("tensorflow") is not None:
    import mxnet  # noqa: F401


@pytest.fixture(scope="session")
def has_c_compiler() -> bool:
    """Whether the C compiler the build would use is here (then the fold kernel must have been built)."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    return bool(cc) and shutil.which(cc[0]) is not None
