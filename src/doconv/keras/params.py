"""Canonical parameters of the Keras DO-Conv layers: ``get_params`` and an atomic, strict ``set_params``.

The canonical layout (DESIGN.md, also PyTorch's) is how weights move between frameworks. A
``DODepthwiseConv2D`` is, canonically, the grouped DO-Conv with groups = C_in and
C_out = C_in * depth_multiplier; a ``DOSeparableConv2D`` is that plus a 1x1 ``pointwise`` kernel.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .. import core
from .._optional import require
from .layers import DO_LAYERS, DOConv2D, DOSeparableConv2D, _numpy, ops

keras = require("keras", "doconv.keras", "keras", "Keras 3")


def _check_layer(layer) -> None:
    if not isinstance(layer, DO_LAYERS):
        names = ", ".join(f"doconv.keras.{cls.__name__}" for cls in DO_LAYERS)
        raise TypeError(f"layer must be one of {names}. Received: layer={layer!r}")
    if not layer.built:
        raise ValueError(f"Layer {layer.name!r} is not built yet: call it on an input first.")


def _slots(layer) -> dict:
    """name -> (variable or None, canonical shape or None, canonical -> Keras, Keras -> canonical)."""
    C_in = layer.in_channels
    if isinstance(layer, DOConv2D):
        W_shape = (layer.filters, C_in // layer.groups, layer.D_mul)
        W_to, W_from = core.W_to_keras, core.W_from_keras
        C_out = layer.filters
    else:
        C_out = C_in * layer.depth_multiplier
        W_shape = (C_out, 1, layer.D_mul)
        W_to, W_from = layer._W_from_canonical, layer._W_to_canonical
    same = np.asarray
    slots = {
        "W": (layer.W, W_shape, W_to, W_from),
        "D": (layer.D, None if layer.D is None else (C_in, layer.K, layer.D_mul), core.D_to_keras, core.D_from_keras),
    }
    if isinstance(layer, DOSeparableConv2D):
        slots["pointwise"] = (
            layer.pointwise_kernel,
            (layer.filters, C_out, 1, 1),
            core.kernel_to_keras,
            core.kernel_from_keras,
        )
        C_out = layer.filters
    slots["bias"] = (layer.bias, (C_out,) if layer.use_bias else None, same, same)
    return slots


def get_params(layer) -> dict:
    """A built layer's parameters as NumPy arrays in the canonical (PyTorch) layout.

    Args:
        layer: a built ``DOConv2D``, ``DODepthwiseConv2D`` or ``DOSeparableConv2D``.

    Returns:
        ``{"W": (C_out, C_in/g, D_mul), "D": (C_in, K, D_mul) or None, "bias": (C_out,) or None}``;
        for a ``DODepthwiseConv2D`` g = C_in and C_out = C_in * depth_multiplier; a
        ``DOSeparableConv2D`` has these for its depthwise part plus ``"pointwise"``
        ``(filters, C_in * depth_multiplier, 1, 1)``, and its bias is ``(filters,)``.

    Raises:
        TypeError: ``layer`` is not a DO-Conv layer.
        ValueError: ``layer`` is not built.

    Example:
        >>> import numpy as np
        >>> from doconv.keras import DOConv2D, DODepthwiseConv2D
        >>> layer = DOConv2D(8, 3, groups=2)
        >>> _ = layer(np.zeros((1, 5, 5, 4), "float32"))
        >>> {k: None if v is None else v.shape for k, v in get_params(layer).items()}
        {'W': (8, 2, 9), 'D': (4, 9, 9), 'bias': (8,)}
        >>> dw = DODepthwiseConv2D(3, depth_multiplier=2)
        >>> _ = dw(np.zeros((1, 5, 5, 4), "float32"))
        >>> {k: None if v is None else v.shape for k, v in get_params(dw).items()}
        {'W': (8, 1, 9), 'D': (4, 9, 9), 'bias': (8,)}
    """
    _check_layer(layer)
    return {
        name: None if variable is None else from_keras(_numpy(variable))
        for name, (variable, _, _, from_keras) in _slots(layer).items()
    }


def _extended_float(dtype: np.dtype) -> bool:
    try:
        return keras.backend.is_float_dtype(keras.backend.standardize_dtype(dtype))
    except ValueError:  # a dtype Keras does not know
        return False


def _checked(layer, name: str, value, shape):
    """``value`` as an array of ``shape`` holding real numbers, or the error that says what is wrong."""
    if value is None:
        got = None
    else:
        try:
            array = np.asarray(value)
        except Exception as err:  # ragged lists, tensors that refuse conversion: say which entry
            raise TypeError(f"params[{name!r}] cannot be read as an array: {err}. Received: {value!r}"[:500]) from None
        # bfloat16 and the float8 types (ml_dtypes, as get_params returns them for such layers) are
        # NumPy kind 'V': Keras' own dtype names say which of those are floats.
        if array.dtype.kind not in "iuf" and not _extended_float(array.dtype):
            raise TypeError(
                f"params[{name!r}] must hold real numbers (an integer or floating dtype). Received: dtype {array.dtype}"
            )
        got = array.shape
    if got != shape:
        raise ValueError(f"params[{name!r}] must have shape {shape} for layer {layer.name!r}. Received: shape {got}")
    return None if value is None else array


def set_params(layer, params: Mapping) -> object:
    """Load canonical-layout parameters (as :func:`get_params` returns them) into a built layer.

    Atomic: every entry is checked and converted to the weight's dtype before any weight is
    written, so a call that raises leaves the layer exactly as it was.

    Args:
        layer: a built ``DOConv2D``, ``DODepthwiseConv2D`` or ``DOSeparableConv2D``.
        params: ``{"W": ..., "D": ..., "bias": ...}`` (and ``"pointwise"`` for a
            ``DOSeparableConv2D``); arrays of real numbers in the shapes :func:`get_params`
            returns. D and bias are None where the layer has none (1x1 kernel,
            ``use_bias=False``) and may then be left out.

    Returns:
        ``layer``, for chaining.

    Raises:
        TypeError: ``params`` is not a mapping, or an entry is not an array of real numbers
            (strings, objects, complex numbers).
        ValueError: an unknown entry, a missing one (or None) where the layer has that weight,
            or a shape that does not match the layer (the message names the entry and both shapes).

    Example:
        >>> import numpy as np, keras
        >>> from doconv.keras import DOConv2D
        >>> layer = DOConv2D(2, 1, use_bias=False)
        >>> _ = layer(np.zeros((1, 3, 3, 2), "float32"))
        >>> _ = set_params(layer, {"W": np.ones((2, 2, 1), "float32")})
        >>> float(keras.ops.convert_to_numpy(layer(np.ones((1, 3, 3, 2), "float32")))[0, 0, 0, 0])
        2.0
    """
    _check_layer(layer)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays. Received: {type(params).__name__}")
    slots = _slots(layer)
    unknown = set(params) - set(slots)
    if unknown:
        expected = ", ".join(repr(name) for name in slots)
        raise ValueError(f"params has unknown entries {sorted(map(str, unknown))}; expected {expected}.")
    staged = []
    for name, (variable, shape, to_keras, _) in slots.items():
        array = _checked(layer, name, params.get(name), shape)
        if array is None:  # the layer has no such weight, and None was given or nothing
            continue
        staged.append((variable, ops.convert_to_tensor(np.asarray(to_keras(array)), dtype=variable.dtype)))
    for variable, value in staged:
        variable.assign(value)
    return layer
