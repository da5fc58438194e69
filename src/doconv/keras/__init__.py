"""DO-Conv for Keras 3: ``DOConv2D``, ``DODepthwiseConv2D`` and ``DOSeparableConv2D``.

Drop-ins for ``keras.layers.Conv2D``, ``DepthwiseConv2D`` and ``SeparableConv2D``. Each layer
stores W, the depthwise offset D and its other weights, folds W and D into an ordinary kernel
with ``keras.ops`` on every call and runs the native layer's op, so it works on the tensorflow,
jax and torch backends. The maths, argument checks and layout conversions live in
:mod:`doconv.core`; this package creates weights and calls Keras ops (``layers``), folds W and
D into the kernel (``fold``), moves parameters in the canonical layout (``params``) and converts
whole models (``convert``).
In training, ``DOConv2D`` composes features instead of folding where a batch has few output
positions (``composition``; :func:`use_feature_composition` turns that off).

Example:
    >>> import numpy as np
    >>> from doconv.keras import DOConv2D
    >>> layer = DOConv2D(8, 3, padding="same")
    >>> tuple(layer(np.zeros((2, 16, 16, 4), "float32")).shape)
    (2, 16, 16, 8)
    >>> tuple(layer.W.shape), tuple(layer.D.shape)
    ((9, 4, 8), (9, 9, 4))
"""

from .composition import feature_composition_in_use, use_feature_composition
from .convert import convert_model, fuse_model
from .layers import DOConv2D, DODepthwiseConv2D, DOSeparableConv2D
from .params import get_params, set_params

__all__ = [
    "DOConv2D",
    "DODepthwiseConv2D",
    "DOSeparableConv2D",
    "convert_model",
    "feature_composition_in_use",
    "fuse_model",
    "get_params",
    "set_params",
    "use_feature_composition",
]
