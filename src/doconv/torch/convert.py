"""Whole models and parameters: convert_model, fuse_model, get_params, set_params.

A conversion changes the convolution and nothing else. Trainable flags, train/eval mode,
device, dtype and a channels_last kernel go through ``from_conv``/``fuse()``; this module keeps
what lives around a layer: its hooks and public attributes, modules shared by several
parents, parameters tied between layers, and pruning or parametrizations (baked into the
new layer, with a warning). Only the exact native classes are replaced; every conv-like
module left as it is is named in one warning.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .. import core
from .layers import _DOCONV, _NATIVE, ConvError, _constructor_arguments, _DOConvNd, _numpy

nn = torch.nn

_DOCONV_OF = {native: _DOCONV[rank] for rank, native in _NATIVE.items()}
_CONV_LIKE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# nn.Module keeps each kind of hook in one of these dictionaries. There is no public API to
# list or move hooks, so conversion reads them; a kind a later torch adds is refused (see _carry_hooks).
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


@dataclass
class _Direction:
    """What differs between convert_model and fuse_model."""

    what: str  # the function's name, for messages
    classes: tuple  # the exact classes replaced
    roles: tuple  # their parameters
    kernel_roles: tuple  # the parameters that make the kernel: tied together or not at all
    new_kernel_roles: tuple  # the new layer's
    own_buffers: tuple  # buffers the class itself registers
    found: str  # "nn.Conv1d/2d/3d", for messages
    conv_like: Callable[[nn.Module], bool]  # a module worth naming when it is left as it is


@dataclass
class _Site:
    """One module to replace."""

    name: str  # its first qualified name; "" for the model itself
    module: nn.Module
    baked: dict = field(default_factory=dict)  # role -> (what is baked, value now, requires_grad)
    D_mul: Optional[int] = None
    new: Optional[nn.Module] = None


def _shown(name: str) -> str:
    return repr(name) if name else "(the model itself)"


def _exact_class(module: nn.Module, classes: tuple) -> Optional[type]:
    """The class among ``classes`` that ``module`` is exactly, seeing through torch.nn.utils.parametrize
    (which moves a parametrized module into a subclass of its own class)."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        cls = cls.__mro__[1]
    return cls if cls in classes else None


def _looks_like_conv(module: nn.Module) -> bool:
    if isinstance(module, _DOConvNd):
        return False
    if isinstance(module, _CONV_LIKE):
        return True
    # Convolutions of other libraries that do not derive from nn.ConvNd (timm's CondConv2d, ...).
    own = module.parameters(recurse=False)
    return "conv" in type(module).__name__.lower() and any(p.dim() in (3, 4, 5) for p in own)


_CONVERT = _Direction(
    what="convert_model",
    classes=tuple(_NATIVE.values()),
    roles=("weight", "bias"),
    kernel_roles=("weight",),
    new_kernel_roles=("W", "D"),
    own_buffers=(),
    found="nn.Conv1d/2d/3d",
    conv_like=_looks_like_conv,
)
_FUSE = _Direction(
    what="fuse_model",
    classes=tuple(_DOCONV.values()),
    roles=("W", "D", "bias"),
    kernel_roles=("W", "D"),
    new_kernel_roles=("weight",),
    own_buffers=("identity",),
    found="DO-Conv layer",
    conv_like=lambda module: isinstance(module, _DOConvNd),
)


# -- what a module holds ------------------------------------------------------------------------


def _weight_norm_hook(module: nn.Module, name: str) -> Optional[WeightNorm]:
    return next((h for h in module._forward_pre_hooks.values() if isinstance(h, WeightNorm) and h.name == name), None)


def _inspect(module: nn.Module, direction: _Direction) -> tuple[dict, Optional[str]]:
    """(what to bake, why the module cannot be replaced) for a module of an exact class.

    Baked: a parametrization (torch.nn.utils.parametrize), a pruning mask (torch.nn.utils.prune:
    ``name_orig`` times ``name_mask``, as prune computes it) or the old torch.nn.utils.weight_norm.
    Anything else the module holds beyond its own parameters is unknown state: the module is left.
    """
    params = dict(module.named_parameters(recurse=False))
    buffers = dict(module.named_buffers(recurse=False))
    known_params, known_buffers, known_children = set(), set(direction.own_buffers), set()
    baked = {}
    with torch.no_grad():
        for role in direction.roles:
            if parametrize.is_parametrized(module, role):
                sources = list(module.parametrizations[role].parameters())
                baked[role] = ("parametrization", getattr(module, role), any(p.requires_grad for p in sources))
                known_children.add("parametrizations")
            elif role + "_orig" in params and role + "_mask" in buffers:
                orig = params[role + "_orig"]
                baked[role] = ("pruning mask", orig * buffers[role + "_mask"], orig.requires_grad)
                known_params.add(role + "_orig")
                known_buffers.add(role + "_mask")
            elif _weight_norm_hook(module, role) is not None and {role + "_g", role + "_v"} <= set(params):
                flag = params[role + "_g"].requires_grad or params[role + "_v"].requires_grad
                baked[role] = ("weight_norm", _weight_norm_hook(module, role).compute_weight(module), flag)
                known_params |= {role + "_g", role + "_v"}
            elif role in params:
                known_params.add(role)
            elif getattr(module, role, None) is not None:
                return {}, f"its {role} is computed by a hook this conversion does not know (spectral_norm?)"
    unknown = [f"parameter {n}" for n in params if n not in known_params]
    unknown += [f"buffer {n}" for n in buffers if n not in known_buffers]
    unknown += [f"submodule {n}" for n, _ in module.named_children() if n not in known_children]
    if parametrize.is_parametrized(module):
        unknown += [f"parametrized {n}" for n in module.parametrizations if n not in baked]
    kinds = {kind for kind, _, _ in baked.values()}
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and "pruning mask" not in kinds:
            unknown.append("a pruning hook without its mask")
        if isinstance(hook, WeightNorm) and "weight_norm" not in kinds:
            unknown.append(f"a weight_norm hook on {hook.name}")
    if unknown:
        return {}, "it also holds " + ", ".join(unknown)
    return baked, None


def _holders(model: nn.Module) -> dict:
    """id(parameter) -> every (module name, parameter name) that holds it."""
    holders = defaultdict(list)
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            holders[id(param)].append((module_name, param_name))
    return holders


def _inside(name: str, site: str) -> bool:
    return site == "" or name == site or name.startswith(site + ".")


# -- building the new modules -------------------------------------------------------------------


def _plain_twin(site: _Site, direction: _Direction) -> nn.Module:
    """A module of the exact class with the baked values as its own parameters: what from_conv / fuse() read."""
    module = site.module
    cls = _exact_class(module, direction.classes)
    values = {}
    for role in direction.roles:
        if role in site.baked:
            _, value, flag = site.baked[role]
        else:
            param = getattr(module, role)
            value, flag = (None, False) if param is None else (param.detach(), param.requires_grad)
        values[role] = (value, flag)
    reference = values[direction.roles[0]][0]
    extra = {"D_mul": module.D_mul} if direction is _FUSE else {}
    twin = cls(*_constructor_arguments(module), device=reference.device, dtype=reference.dtype, **extra)
    for role, (value, flag) in values.items():
        if value is not None:
            setattr(twin, role, nn.Parameter(value.detach().clone(), requires_grad=flag))
    if direction is _FUSE:
        twin._channels_last_kernel = getattr(module, "_channels_last_kernel", False)
    return twin.train(module.training)


def _build(site: _Site, direction: _Direction) -> nn.Module:
    source = _plain_twin(site, direction) if site.baked else site.module
    if direction is _FUSE:
        return source.fuse()
    try:
        return _DOCONV_OF[type(source)].from_conv(source, D_mul=site.D_mul)
    except ConvError as err:  # a D_mul (say, from the user's callable) this layer refuses: say which layer
        raise ConvError(f"{_shown(site.name)}: {err}") from None


def _carry_hooks(site: _Site, memo: Optional[dict]) -> None:
    """Give the new module the old one's hooks, in order, under the same ids.

    In place, the new module takes the old one's very dictionaries, so the handles the user
    holds still remove the hooks; on a copy they are copied with the model (``memo``).
    """
    old, new = site.module, site.new
    unknown = [k for k, v in vars(old).items() if "hook" in k and isinstance(v, dict) and v and k not in _HOOK_DICTS]
    if unknown:
        raise ValueError(
            f"Cannot carry the hooks of {_shown(site.name)} ({type(old).__name__}) to its new layer: this torch "
            f"keeps hooks in {', '.join(unknown)}, which doconv does not know."
        )
    # Pruning and weight_norm hooks recompute what is now baked: they do not come along.
    dropped = {k for k, h in old._forward_pre_hooks.items() if isinstance(h, (prune.BasePruningMethod, WeightNorm))}
    for attr in _HOOK_DICTS:
        hooks = getattr(old, attr, None)
        if not hooks:
            continue
        entries = OrderedDict((k, h) for k, h in hooks.items() if k not in dropped or attr != "_forward_pre_hooks")
        if memo is not None:
            entries = _copied(entries, memo, f"the hooks of {_shown(site.name)}")
        elif attr == "_load_state_dict_pre_hooks":
            entries = OrderedDict((k, _rebound(h, site)) for k, h in entries.items())
        elif len(entries) == len(hooks) and not getattr(new, attr):
            entries = hooks
        mine = getattr(new, attr)
        setattr(new, attr, OrderedDict([*mine.items(), *entries.items()]) if mine else entries)
    if old._backward_hooks or old._backward_pre_hooks:
        new._is_full_backward_hook = old._is_full_backward_hook


def _copied(value, memo: dict, what: str):
    """copy.deepcopy with the model's memo, failing with a message that says what and how to avoid the copy."""
    try:
        return copy.deepcopy(value, memo)
    except Exception as err:
        raise RuntimeError(
            f"The conversion works on a copy of the model, and copying {what} failed: {err} Pass inplace=True "
            "to replace the layers of the model itself."
        ) from err


def _rebound(hook, site: _Site):
    """A load_state_dict pre hook registered with its module holds a weak reference to it: point it at the new one."""
    if not getattr(hook, "with_module", False):
        return hook
    try:
        return type(hook)(hook.hook, site.new)
    except (AttributeError, TypeError) as err:
        raise ValueError(
            f"Cannot carry a load_state_dict pre hook of {_shown(site.name)} to its new layer in place; "
            "convert a copy (inplace=False) instead."
        ) from err


@functools.cache
def _standard_attributes(cls: type) -> frozenset:
    """The instance attributes every module of ``cls`` has."""
    return frozenset(vars(cls(1, 1, 1, device="meta")))


def _carry_attributes(site: _Site, direction: _Direction, memo: Optional[dict]) -> None:
    """Public attributes the user set on the old module (``conv.frozen_stem = True``) move to the new one."""
    old, new = site.module, site.new
    standard = _standard_attributes(_exact_class(old, direction.classes)) | set(direction.roles)
    for key, value in vars(old).items():
        if key.startswith("_") or key in standard:
            continue
        if key in vars(new) or hasattr(type(new), key):
            raise ValueError(
                f"Cannot carry the attribute {key!r} of {_shown(site.name)} to its new {type(new).__name__}, "
                f"which defines {key!r} itself."
            )
        setattr(new, key, value if memo is None else _copied(value, memo, f"{_shown(site.name)}.{key}"))


def _tie(sites: list[_Site], model: nn.Module, direction: _Direction) -> None:
    """Parameters shared between replaced modules are shared between the new ones; any other tie is an error."""
    holders = _holders(model)
    by_name = {site.name: site for site in sites}
    groups: dict[tuple, list[_Site]] = defaultdict(list)
    bias_groups: dict[int, list[_Site]] = defaultdict(list)
    for site in sites:
        module = site.module
        if site.baked:
            for param in module.parameters():
                outside = [f"{m}.{p}" for m, p in holders[id(param)] if not _inside(m, site.name)]
                if outside:
                    raise ValueError(
                        f"{direction.what} cannot bake {_shown(site.name)}: a parameter of its reparametrization "
                        f"is also {', '.join(outside)}, and baking would untie them."
                    )
            continue
        for role in direction.roles:
            param = module._parameters.get(role)
            if param is None:
                continue
            for module_name, param_name in holders[id(param)]:
                other = by_name.get(module_name)
                if other is None or other.baked or param_name != role:
                    what = f"{module_name}.{param_name}" if module_name else param_name
                    raise ValueError(
                        f"{direction.what} cannot replace {_shown(site.name)}: its {role} is also {what}, "
                        "which is not replaced the same way, and replacing would untie them. Tie only layers "
                        "that are all replaced, or keep this one (D_mul callable returning None)."
                    )
        key = tuple(_id_or_none(module._parameters.get(role)) for role in direction.kernel_roles)
        groups[key].append(site)
        if module._parameters.get("bias") is not None:
            bias_groups[id(module.bias)].append(site)
    owners = defaultdict(set)  # W tied in one pair of layers and D in another pair: no kernel to share
    for key in groups:
        for role, param_id in zip(direction.kernel_roles, key):
            if param_id is not None:
                owners[role, param_id].add(key)
    for (role, _), keys in owners.items():
        if len(keys) > 1:
            names = ", ".join(_shown(site.name) for key in keys for site in groups[key])
            raise ValueError(
                f"{direction.what} cannot keep the ties of {names}: they share {role} but not the whole "
                f"kernel ({', '.join(direction.kernel_roles)})."
            )
    for members in groups.values():
        first = members[0]
        for site in members[1:]:
            if _tie_signature(site) != _tie_signature(first):
                raise ValueError(
                    f"{direction.what} cannot keep {_shown(site.name)} tied to {_shown(first.name)}: their new "
                    f"layers would need different shapes ({_tie_signature(site)} vs {_tie_signature(first)})."
                )
            for role in direction.new_kernel_roles:
                if getattr(first.new, role) is not None:
                    setattr(site.new, role, getattr(first.new, role))
    for members in bias_groups.values():
        for site in members[1:]:
            site.new.bias = members[0].new.bias


def _id_or_none(param) -> Optional[int]:
    return None if param is None else id(param)


def _tie_signature(site: _Site) -> tuple:
    new = site.new
    shapes = [tuple(p.shape) for p in (getattr(new, n, None) for n in ("W", "D", "weight")) if p is not None]
    return (new.in_channels, new.groups, *shapes)


# -- copying a model ----------------------------------------------------------------------------


def _reparametrized_value(module: nn.Module, name: str) -> Optional[Callable[[nn.Module], torch.Tensor]]:
    """How to recompute, on a copy of ``module``, the tensor attribute ``name`` that pruning, weight_norm or
    spectral_norm keep (deepcopy refuses it: it is not a graph leaf)."""
    params, buffers = dict(module.named_parameters(recurse=False)), dict(module.named_buffers(recurse=False))
    if name + "_orig" in params and name + "_mask" in buffers:
        return lambda m: getattr(m, name + "_orig") * getattr(m, name + "_mask")
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return lambda m: _weight_norm_hook(m, name).compute_weight(m)
        if isinstance(hook, SpectralNorm) and hook.name == name:
            return lambda m: next(
                h for h in m._forward_pre_hooks.values() if isinstance(h, SpectralNorm) and h.name == name
            ).compute_weight(m, do_power_iteration=False)
    return None


def _placeholders(model: nn.Module, memo: dict, direction: _Direction) -> list:
    """Prepare ``memo`` so that copy.deepcopy(model, memo) does not trip on pruning or weight_norm.

    Their modules hold the pruned or normalised weight as a plain tensor attribute, which deepcopy
    refuses (it is not a graph leaf): the copy gets a placeholder, and the returned fixes recompute it.
    """
    fixes = []
    for name, module in model.named_modules():
        if id(module) in memo:
            continue
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                recompute = _reparametrized_value(module, key)
                if recompute is None:
                    raise ValueError(
                        f"{direction.what} works on a copy of the model, and {_shown(name)} "
                        f"({type(module).__name__}) holds {key!r}, a tensor computed in the autograd graph, "
                        "which cannot be copied. Pass inplace=True, or remove what computes it."
                    )
                memo[id(value)] = value.detach()
                fixes.append((module, key, recompute))
    return fixes


def _copy(model: nn.Module, memo: dict, fixes: list) -> nn.Module:
    """copy.deepcopy(model) with the replaced modules already in ``memo``, so they are never copied."""
    copied = _copied(model, memo, "the model")
    for module, key, recompute in fixes:
        twin = memo[id(module)]
        setattr(twin, key, recompute(twin))
    return copied


# -- the walk -----------------------------------------------------------------------------------


def _replace(model: nn.Module, direction: _Direction, inplace: bool, decide: Callable[[_Site], bool]) -> nn.Module:
    """Replace the modules of the exact classes; warn about the conv-like ones left.

    Everything is built and checked before anything is assigned: a failure leaves ``model`` untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{direction.what} needs an nn.Module. Received: model of type {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False. Received: inplace={inplace!r}")
    sites, left, kept = [], [], 0
    for name, module in model.named_modules():
        if _exact_class(module, direction.classes) is None:
            if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
                left.append(f"{_shown(name)} ({type(module).__name__}: not initialized, run one forward first)")
            elif direction.conv_like(module):
                left.append(f"{_shown(name)} ({type(module).__name__})")
            continue
        baked, reason = _inspect(module, direction)
        if reason is not None:
            left.append(f"{_shown(name)} ({type(module).__name__}: {reason})")
            continue
        site = _Site(name, module, baked)
        if decide(site):
            sites.append(site)
        else:
            kept += 1
    for site in sites:
        site.new = _build(site, direction)
    _tie(sites, model, direction)
    memo, fixes = None, []
    if not inplace:
        memo = {id(site.module): site.new for site in sites}
        fixes = _placeholders(model, memo, direction)
    for site in sites:
        _carry_hooks(site, memo)
        _carry_attributes(site, direction, memo)
    root = next((site.new for site in sites if site.module is model), None)
    if root is not None:
        result = root  # a bare layer: a module cannot change its class in place, so the new one is returned
    elif not inplace:
        result = _copy(model, memo, fixes)
    else:
        new_by_id = {id(site.module): site.new for site in sites}
        for parent in list(model.modules()):
            # _modules, not named_children(): a module under two names of one parent appears under both.
            for child_name, child in list(parent._modules.items()):
                if child is not None and id(child) in new_by_id:
                    setattr(parent, child_name, new_by_id[id(child)])
        result = model
    _warn(direction, sites, left, kept)
    return result


def _warn(direction: _Direction, sites: list[_Site], left: list[str], kept: int) -> None:
    total = len(sites) + len(left) + kept
    if total == 0:
        warnings.warn(
            f"{direction.what} found no {direction.found} to replace; the model is returned unchanged.", stacklevel=4
        )
        return
    if left:
        kept_note = f" ({kept} kept by D_mul)" if kept else ""
        warnings.warn(
            f"{direction.what} replaced {len(sites)} of {total} conv-like layers{kept_note} and left {len(left)} "
            f"as they are (it replaces only the exact {direction.found} classes): {'; '.join(left)}",
            stacklevel=4,
        )
    baked = [f"{_shown(site.name)} ({kind} of {role})" for site in sites for role, (kind, _, _) in site.baked.items()]
    if baked:
        warnings.warn(
            f"{direction.what} baked these into the new layers: {', '.join(baked)}. The new layers hold the "
            "effective values at conversion time as plain parameters; the masks and parametrizations no longer "
            "apply (register them again on the new layers if training needs them).",
            stacklevel=4,
        )


def convert_model(
    model: nn.Module,
    D_mul: Union[None, int, Callable[[str, nn.Module], Optional[int]]] = None,
    inplace: bool = False,
) -> nn.Module:
    """Replace every ``nn.Conv1d/2d/3d`` of a model by a DO-Conv layer with the same outputs.

    Only the exact classes are replaced; one warning names every conv-like module left as it
    is (subclasses such as timm's ``Conv2dSame``, transposed convs, convs holding unknown
    state), with the count replaced. The new layers keep ``requires_grad`` (W and D follow
    the kernel's, the bias the bias's), train/eval mode, device, dtype, hooks, public
    attributes and ties (convs sharing a weight become layers sharing W and D); a module
    shared by several parents becomes one shared layer. A pruned, weight-normed or
    parametrized conv is converted with its effective weight at conversion time, and a
    warning says so.

    Args:
        model: any module tree (Sequential, ModuleList, ModuleDict, attributes), or a single conv.
        D_mul: None -> each layer's K; an int -> max(D_mul, K) per layer, with one
            warning naming the layers whose K was larger; a callable
            ``(name, conv) -> int | None`` decides per layer (None keeps that conv).
            Default None.
        inplace: modify ``model`` itself instead of a copy. Default False. A single conv
            is never modified: the new layer is returned.

    Returns:
        The converted model (a copy unless ``inplace``).

    Raises:
        ValueError: a tie the new layers cannot keep (a conv's weight also used by a module
            that is not converted), or a hook that cannot be carried.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
        >>> convert_model(net)[0]
        DOConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), D_mul=9)
        >>> type(convert_model(nn.Conv1d(2, 4, 3))).__name__
        'DOConv1d'
    """
    if not (D_mul is None or callable(D_mul)):
        D_mul = core.check_int(D_mul, "D_mul")
    raised: list[str] = []

    def decide(site: _Site) -> bool:
        conv = site.module
        K = core.kernel_volume(conv.kernel_size)
        if callable(D_mul):
            site.D_mul = D_mul(site.name, conv)
            return site.D_mul is not None
        if D_mul is not None:
            site.D_mul = max(D_mul, K)
            if K > D_mul:
                raised.append(site.name)
        return True

    converted = _replace(model, _CONVERT, inplace, decide)
    if raised:
        warnings.warn(
            f"D_mul={D_mul} is smaller than the kernel's K for these layers, which use D_mul = K: {', '.join(raised)}",
            stacklevel=2,
        )
    return converted


def fuse_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every DO-Conv layer of a model by its folded native convolution.

    As :func:`convert_model` the other way: the exact DOConv1d/2d/3d classes are fused (a
    subclass is left, and named in one warning), and flags, mode, device, dtype, a
    channels_last kernel, hooks, attributes, sharing and ties (layers sharing W and D
    become convs sharing one weight) are kept. The fused weight trains if W or D does.

    Args:
        model: any module tree, or a single DO-Conv layer.
        inplace: modify ``model`` itself instead of a copy. Default False. A single layer
            is never modified: the fused conv is returned.

    Returns:
        The fused model: exactly the native network's parameters and cost.

    Example:
        >>> from doconv.torch import DOConv2d
        >>> net = nn.Sequential(DOConv2d(3, 8, 3), nn.ReLU())
        >>> type(fuse_model(net)[0]).__name__
        'Conv2d'
        >>> type(fuse_model(DOConv2d(3, 8, 3))).__name__
        'Conv2d'
    """
    return _replace(model, _FUSE, inplace, lambda site: True)


# -- parameters in the canonical layout ---------------------------------------------------------

_PARAM_NAMES = ("W", "D", "bias")


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


def _real_array(value, name: str) -> np.ndarray:
    """``value`` as a NumPy array of real numbers, or TypeError naming the entry."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"params[{name!r}] must hold real numbers. Received: a tensor of dtype {value.dtype}")
        if value.is_meta or value.layout != torch.strided:
            raise TypeError(
                f"params[{name!r}] must be a dense tensor holding values. Received: a tensor on device "
                f"{value.device} with layout {value.layout}"
            )
        return _numpy(value)
    if isinstance(value, (str, bytes)):
        raise TypeError(f"params[{name!r}] must be an array of numbers. Received: {type(value).__name__} {value!r}")
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"params[{name!r}] must be an array of numbers. Received: {type(value).__name__}") from err
    if array.dtype.kind not in "fiu":
        raise TypeError(f"params[{name!r}] must hold real numbers. Received: an array of dtype {array.dtype}")
    if array.dtype.itemsize > 8:  # float128: no torch dtype holds it
        raise TypeError(f"params[{name!r}] has a dtype torch cannot hold. Received: an array of dtype {array.dtype}")
    return array


def set_params(layer: nn.Module, params: dict) -> nn.Module:
    """Load canonical-layout NumPy arrays (as :func:`get_params` returns them) into a layer.

    Every entry is checked and converted before anything is written: on any error the layer is
    exactly as it was.

    Args:
        layer: a DO-Conv layer.
        params: ``{"W": ..., "D": ... or None, "bias": ... or None}``: arrays (or tensors) of
            real numbers; ``D``/``bias`` None or absent where the layer has none.

    Returns:
        ``layer``, for chaining.

    Raises:
        ValueError: an unknown key, a missing entry or a shape that disagrees with the layer.
        TypeError: an entry that is not an array of real numbers (strings, objects, None
            where the layer has the parameter is a ValueError), or a parameter of the layer
            that is computed by a parametrization or pruning.

    Example:
        >>> from doconv.torch import DOConv2d
        >>> layer = set_params(DOConv2d(3, 8, 3), get_params(DOConv2d(3, 8, 3)))
    """
    if not isinstance(layer, _DOConvNd):
        raise TypeError(f"set_params needs a DO-Conv layer. Received: layer of type {type(layer).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a dict of 'W', 'D' and 'bias'. Received: params of type {type(params).__name__}"
        )
    unknown = [key for key in params if key not in _PARAM_NAMES]
    if unknown:
        raise ValueError(
            f"params has unknown entries {unknown}: set_params takes 'W', 'D' and 'bias'. Received: keys {list(params)}"
        )
    registered = dict(layer.named_parameters(recurse=False))
    staged = {}
    for name in _PARAM_NAMES:
        current, value = getattr(layer, name), params.get(name)
        if current is None and value is None:
            continue
        if current is not None and name not in registered:
            raise TypeError(f"set_params cannot write {name}: this layer computes it (parametrization or pruning).")
        array = None if value is None else _real_array(value, name)
        expected = None if current is None else tuple(current.shape)
        received = None if array is None else tuple(array.shape)
        if expected != received:
            raise ValueError(f"params[{name!r}] must have shape {expected} for this layer. Received: {received}")
        staged[name] = torch.as_tensor(array).to(device=current.device, dtype=current.dtype)
    with torch.no_grad():
        for name, tensor in staged.items():
            getattr(layer, name).copy_(tensor)
    return layer
