"""What the Keras test modules share: the backend, the float32 tolerance, running a layer, random parameters."""

import keras
import numpy as np
import pytest

from doconv.keras import get_params, set_params

BACKEND = keras.backend.backend()
tensorflow_only = pytest.mark.tensorflow_only
needs_tensorflow = pytest.mark.skipif(BACKEND != "tensorflow", reason="needs the tensorflow backend")


def assert_close32(actual, expected):
    """float32 tolerance of DESIGN.md: rtol 1e-5, atol 1e-5 * max|expected|."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(expected))))


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def run(layer, x):
    """layer(x) as NumPy; channels_first convolutions run under XLA on TF's CPU (TF has no NCHW CPU kernel)."""
    if BACKEND == "tensorflow" and getattr(layer, "data_format", None) == "channels_first":
        import tensorflow as tf

        return to_numpy(tf.function(layer, jit_compile=True)(x))
    return to_numpy(layer(x))


def randomize(layer, rng):
    """Give a built DO-Conv layer random canonical parameters (D far from zero); returns them."""
    params = {
        k: None if v is None else rng.standard_normal(v.shape).astype("float32") for k, v in get_params(layer).items()
    }
    set_params(layer, params)
    return params
