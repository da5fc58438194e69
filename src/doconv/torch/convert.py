"""Whole models and parameters: convert_model, fuse_model, get_params, set_params."""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Optional, Union

import numpy as np
import torch

from .. import core
from .layers import _DOCONV, _NATIVE, _DOConvNd, _numpy

nn = torch.nn


def _replace_children(model: nn.Module, make: Callable[[str, nn.Module], Optional[nn.Module]], inplace: bool):
    """Replace every child for which ``make(qualified_name, child)`` returns a module.

    All replacements are built before any is assigned, and the work is done on a
    deep copy unless ``inplace``: a failure leaves the user's model untouched.
    A module shared by several parents is replaced by one shared new module.
    """
    target = model if inplace else copy.deepcopy(model)
    made: dict[int, Optional[nn.Module]] = {}
    plan = []
    for parent_name, parent in target.named_modules(remove_duplicate=False):
        # _modules, not named_children(): a module under two names of one parent appears under both.
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            if id(child) not in made:
                qualified = f"{parent_name}.{child_name}" if parent_name else child_name
                made[id(child)] = make(qualified, child)
            if made[id(child)] is not None:
                plan.append((parent, child_name, made[id(child)]))
    for parent, child_name, new in plan:
        setattr(parent, child_name, new)
    return target, len(plan)


def convert_model(
    model: nn.Module,
    D_mul: Union[None, int, Callable[[str, nn.Module], Optional[int]]] = None,
    inplace: bool = False,
) -> nn.Module:
    """Replace every ``nn.Conv1d/2d/3d`` of a model by a DO-Conv layer with the same outputs.

    Args:
        model: any module tree (Sequential, ModuleList, ModuleDict, attributes).
        D_mul: None -> each layer's K; an int -> max(D_mul, K) per layer, with one
            warning naming the layers whose K was larger; a callable
            ``(name, conv) -> int | None`` decides per layer (None keeps that conv).
            Default None.
        inplace: modify ``model`` itself instead of a copy. Default False.

    Returns:
        The converted model (a copy unless ``inplace``), same device, dtype and mode.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
        >>> convert_model(net)[0]
        DOConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), D_mul=9)
    """
    if not (D_mul is None or callable(D_mul)):
        D_mul = core.check_int(D_mul, "D_mul")
    raised: list[str] = []

    def make(name: str, child: nn.Module) -> Optional[nn.Module]:
        rank = next((r for r, native in _NATIVE.items() if type(child) is native), None)
        if rank is None:
            return None
        K = core.kernel_volume(child.kernel_size)
        if callable(D_mul):
            layer_D_mul = D_mul(name, child)
            if layer_D_mul is None:
                return None
        elif D_mul is None:
            layer_D_mul = None
        else:
            layer_D_mul = max(D_mul, K)
            if K > D_mul:
                raised.append(name)
        return _DOCONV[rank].from_conv(child, D_mul=layer_D_mul)

    converted, count = _replace_children(model, make, inplace)
    if raised:
        warnings.warn(
            f"D_mul={D_mul} is smaller than the kernel's K for these layers, which use D_mul = K: {', '.join(raised)}",
            stacklevel=2,
        )
    if count == 0:
        warnings.warn(
            "convert_model found no nn.Conv1d/2d/3d to convert; the model is returned unchanged.", stacklevel=2
        )
    return converted


def fuse_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every DO-Conv layer of a model by its folded native convolution.

    Args:
        model: any module tree.
        inplace: modify ``model`` itself instead of a copy. Default False.

    Returns:
        The fused model: exactly the native network's parameters and cost.

    Example:
        >>> from doconv.torch import DOConv2d
        >>> net = nn.Sequential(DOConv2d(3, 8, 3), nn.ReLU())
        >>> type(fuse_model(net)[0]).__name__
        'Conv2d'
    """

    def make(name: str, child: nn.Module) -> Optional[nn.Module]:
        return child.fuse() if isinstance(child, _DOConvNd) else None

    fused, count = _replace_children(model, make, inplace)
    if count == 0:
        warnings.warn("fuse_model found no DO-Conv layer to fuse; the model is returned unchanged.", stacklevel=2)
    return fused


# -- parameters in the canonical layout ---------------------------------------------------------


def get_params(layer: nn.Module) -> dict:
    """A DO-Conv layer's parameters as NumPy arrays in the canonical layout.

    Returns:
        ``{"W": (C_out, C_in/g, D_mul), "D": (C_in, K, D_mul) or None, "bias": (C_out,) or None}``.

    Example:
        >>> from doconv.torch import DOConv2d
        >>> p = get_params(DOConv2d(3, 8, 3))
        >>> p["W"].shape, p["D"].shape, p["bias"].shape
        ((8, 3, 9), (3, 9, 9), (8,))
    """
    if not isinstance(layer, _DOConvNd):
        raise TypeError(f"get_params needs a DO-Conv layer. Received: layer of type {type(layer).__name__}")
    return {
        "W": _numpy(layer.W),
        "D": None if layer.D is None else _numpy(layer.D),
        "bias": None if layer.bias is None else _numpy(layer.bias),
    }


def set_params(layer: nn.Module, params: dict) -> nn.Module:
    """Load canonical-layout NumPy arrays (as :func:`get_params` returns them) into a layer.

    Args:
        layer: a DO-Conv layer.
        params: ``{"W": ..., "D": ... or None, "bias": ... or None}``.

    Returns:
        ``layer``, for chaining.

    Raises:
        ValueError: a missing entry or a shape that disagrees with the layer.

    Example:
        >>> from doconv.torch import DOConv2d
        >>> layer = set_params(DOConv2d(3, 8, 3), get_params(DOConv2d(3, 8, 3)))
    """
    if not isinstance(layer, _DOConvNd):
        raise TypeError(f"set_params needs a DO-Conv layer. Received: layer of type {type(layer).__name__}")
    for name in ("W", "D", "bias"):
        param, value = getattr(layer, name), params.get(name)
        if param is None and value is None:
            continue
        if param is None or value is None or tuple(np.shape(value)) != tuple(param.shape):
            expected = None if param is None else tuple(param.shape)
            received = None if value is None else tuple(np.shape(value))
            raise ValueError(f"params[{name!r}] must have shape {expected} for this layer. Received: {received}")
    with torch.no_grad():
        for name in ("W", "D", "bias"):
            if getattr(layer, name) is not None:
                getattr(layer, name).copy_(torch.as_tensor(np.asarray(params[name])))
    return layer
