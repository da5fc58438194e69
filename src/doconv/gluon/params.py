"""get_params and set_params: a DOConv2D's W, D and bias as NumPy arrays in the canonical layout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import numpy as np

from .. import core
from .._optional import require

mx = require("mxnet", "doconv.gluon", "gluon", "MXNet")

from mxnet import nd  # noqa: E402

from .layers import DOConv2D, _require_data  # noqa: E402

_KEYS = ("W", "D", "bias")


def _expected_shapes(block: DOConv2D, C_in: int) -> dict:
    return {
        "W": (block._channels, C_in // block._groups, block.D_mul),
        "D": (C_in, block._K, block.D_mul) if block.D is not None else None,
        "bias": (block._channels,) if block.bias is not None else None,
    }


def _check_block(block) -> None:
    if not isinstance(block, DOConv2D):
        raise TypeError(f"Expected a doconv.gluon.DOConv2D. Received: {type(block).__name__}")


def _numeric(key: str, value) -> Optional[np.ndarray]:
    """``params[key]`` as a NumPy array of real numbers (None stays None), or a TypeError naming it."""
    if value is None:
        return None
    if isinstance(value, nd.NDArray):  # np.asarray would make an object array of it
        value = value.asnumpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"params[{key!r}] must be an array of real numbers. Received: {value!r:.80} ({err})") from None
    if array.dtype.kind not in "iuf":
        raise TypeError(f"params[{key!r}] must be an array of real numbers. Received: an array of dtype {array.dtype}")
    return array


def get_params(block: DOConv2D) -> dict:
    """The parameters of a layer as NumPy arrays in the canonical layout.

    Args:
        block: an initialized :class:`DOConv2D`.

    Returns:
        ``{"W": (C_out, C_in/g, D_mul), "D": (C_in, K, D_mul) or None, "bias": (C_out,) or None}``,
        copies of the values on the first context.

    Raises:
        TypeError: ``block`` is not a DOConv2D.
        RuntimeError: the parameters are not initialized yet.

    Example:
        >>> layer = DOConv2D(4, 3, in_channels=2, use_bias=False)
        >>> layer.initialize()
        >>> p = get_params(layer)
        >>> p["W"].shape, p["D"].shape, p["bias"]
        ((4, 2, 9), (2, 9, 9), None)
    """
    _check_block(block)
    out = {}
    for key, param in zip(_KEYS, (block.W, block.D, block.bias)):
        out[key] = None if param is None else _require_data(param, "get_params()").asnumpy()
    return out


def set_params(block: DOConv2D, params: dict) -> DOConv2D:
    """Load canonical NumPy parameters into a layer: the inverse of :func:`get_params`.

    Every entry is checked and converted before anything is written, so a refused call
    leaves the layer exactly as it was (a layer still waiting for its input channels
    keeps waiting). A layer waiting for its input channels takes them from ``params["W"]``;
    a layer not initialized at all is initialized on the current context. Values are cast
    to the parameters' dtypes.

    Args:
        block: a :class:`DOConv2D`.
        params: ``{"W": ..., "D": ... or None, "bias": ... or None}`` (a missing key means
            None): NumPy arrays, NDArrays or nested sequences of real numbers.

    Returns:
        ``block``, for chaining.

    Raises:
        TypeError: ``block`` is not a DOConv2D, ``params`` is not a mapping, or an entry does
            not hold real numbers (strings, objects, complex numbers, booleans).
        ValueError: an unknown key, or an entry whose shape (or presence) does not match the
            layer; the message names the entry and both shapes.

    Example:
        >>> import numpy as np
        >>> layer = DOConv2D(1, 1, in_channels=1)
        >>> layer.initialize()
        >>> _ = set_params(layer, {"W": np.full((1, 1, 1), 2.0), "D": None, "bias": np.zeros(1)})
        >>> float(get_params(layer)["W"][0, 0, 0])
        2.0
    """
    _check_block(block)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of 'W', 'D' and 'bias'. Received: {type(params).__name__}")
    unknown = set(params) - set(_KEYS)
    if unknown:
        raise ValueError(
            f"params has unknown entries {sorted(map(str, unknown))}; expected 'W', 'D' and 'bias'. "
            f"Received: keys {sorted(map(str, params))}"
        )
    values = {key: _numeric(key, params.get(key)) for key in _KEYS}
    C_in = block.in_channels
    if not C_in:  # the layer waits for its input channels: W says how many, once it is checked
        W = values["W"]
        if W is None or W.ndim != 3 or W.shape[1] < 1:
            raise ValueError(
                "params['W'] must have shape (C_out, C_in/groups, D_mul). "
                f"Received: W.shape={None if W is None else W.shape}"
            )
        C_in = W.shape[1] * block._groups
    arrays = {}
    for key, shape in _expected_shapes(block, C_in).items():
        value = values[key]
        got = None if value is None else value.shape
        if got != shape:
            raise ValueError(
                f"params[{key!r}] does not fit {block.name}: expected shape {shape}, received {got}"
                + (" (None means the layer has no such parameter)" if shape is None or got is None else "")
            )
        if value is not None:
            param = getattr(block, key)
            arrays[key] = nd.array(value.astype(np.dtype(param.dtype), copy=False), dtype=param.dtype)
    # Everything is checked and converted: only now is the layer changed.
    if not block.in_channels:
        block._set_in_channels((1, C_in, 1, 1) if block._data_format == core.CHANNELS_FIRST else (1, 1, 1, C_in))
    for key, array in arrays.items():
        param = getattr(block, key)
        if param._data is None and not param._deferred_init:
            param.initialize()
        param.set_data(array)
        param._finish_deferred_init()
    return block
