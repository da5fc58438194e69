"""convert_model and fuse_model: every ``nn.Conv2D`` of a Gluon network to DOConv2D, and back.

convert_model and fuse_model find their targets (blocks of exactly one class) and every other
conv-like block in one walk of the tree, each block once however often it is registered; build
every replacement first (so a failure changes nothing); then put them in place wherever the tree
refers to the old block, and name what they left in one warning.
"""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any, Callable, Optional, Union

from .. import core
from .._optional import require

mx = require("mxnet", "doconv.gluon", "gluon", "MXNet")

from mxnet import gluon  # noqa: E402
from mxnet.gluon import nn  # noqa: E402
from mxnet.gluon.contrib.cnn import DeformableConvolution, ModulatedDeformableConvolution  # noqa: E402

from .layers import DOConv2D  # noqa: E402

_OTHER_CONVS = (
    nn.Conv1D,
    nn.Conv2D,  # its subclasses: a Conv2D itself is a target
    nn.Conv3D,
    nn.Conv1DTranspose,
    nn.Conv2DTranspose,
    nn.Conv3DTranspose,
    DeformableConvolution,
    ModulatedDeformableConvolution,
)


def _child_path(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _survey(root, is_target) -> list:
    """(path, block) for each block of the tree once, depth first, at the first path it is found
    at; the children of a target are not entered (the target is replaced whole)."""
    found, seen = [], set()

    def visit(path, block):
        if id(block) in seen:
            return
        seen.add(id(block))
        found.append((path, block))
        if not is_target(block):
            for key, child in block._children.items():
                visit(_child_path(path, key), child)

    visit("", root)
    return found


def _walk(block, path: str = ""):
    """Yield (path, block) for block and all its descendants, depth first."""
    yield path, block
    for key, child in block._children.items():
        yield from _walk(child, _child_path(path, key))


def _graph_nodes(block, accept) -> Optional[int]:
    """How many nodes of a SymbolBlock's graph ``accept`` takes; None if the graph cannot be read."""
    try:
        nodes = json.loads(block._cached_graph[1].tojson())["nodes"]
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    return sum(1 for node in nodes if accept(node))


def _left_by_convert(block) -> Optional[tuple[int, str]]:
    """(count, description) of the conv layers convert_model leaves in ``block``, None if none."""
    if type(block) is nn.Conv2D or isinstance(block, DOConv2D):
        return None
    if isinstance(block, _OTHER_CONVS):
        return 1, _class_name(block)
    if isinstance(block, gluon.SymbolBlock):
        count = _graph_nodes(block, lambda node: node["op"] in ("Convolution", "Deconvolution"))
        if count is None:
            return 1, f"{_class_name(block)}, a SymbolBlock whose graph could not be read"
        if count:
            return count, f"{_class_name(block)}, a SymbolBlock with {count} Convolution/Deconvolution ops"
    return None


def _left_by_fuse(block) -> Optional[tuple[int, str]]:
    """(count, description) of the DO-Conv layers fuse_model leaves in ``block``, None if none."""
    if type(block) is not DOConv2D and isinstance(block, DOConv2D):
        return 1, _class_name(block)
    if isinstance(block, gluon.SymbolBlock):
        count = _graph_nodes(block, lambda node: node.get("attrs", {}).get("op_type") == "doconv_fold")
        if count:
            return count, f"{_class_name(block)}, a SymbolBlock with {count} doconv_fold ops"
    return None


def _class_name(block) -> str:
    cls = type(block)
    return f"{cls.__module__}.{cls.__qualname__}"


def _tie_groups(targets, kernel_of) -> list:
    """The targets grouped by their kernel parameter: a group of several shares one kernel."""
    groups = {}
    for path, block in targets:
        groups.setdefault(id(kernel_of(block)), []).append((path, block))
    return list(groups.values())


def _check_ties(what: str, group, shared_of, settings_of) -> None:
    """Layers sharing a kernel become layers sharing all their parameters: refuse what cannot."""
    first_path, first = group[0]
    for path, block in group[1:]:
        if any(a is not b for a, b in zip(shared_of(first), shared_of(block))) or settings_of(block) != settings_of(
            first
        ):
            raise ValueError(
                f"{what}: {first_path} and {path} share their kernel but not all their parameters, groups and "
                "layout; the replacing layers can share their kernel only together with the rest "
                f"(Received: {first_path}: {settings_of(first)}, {path}: {settings_of(block)})"
            )


def _params_of(block) -> list:
    params = list(block._reg_params.values()) + list(block.params.values())
    return list({id(p): p for p in params}.values())


def _check_no_outside_sharing(what: str, found, plan) -> None:
    """A parameter of a replaced block used by a block left in place would silently stop being shared."""
    replaced = {id(p): path for path, block in found if id(block) in plan for p in _params_of(block)}
    for path, block in found:
        if id(block) in plan:
            continue
        for param in _params_of(block):
            if id(param) in replaced:
                raise ValueError(
                    f"{what}: {path or type(block).__name__} ({_class_name(block)}) shares the parameter "
                    f"{param.name} with {replaced[id(param)]}, which would be replaced while it is not"
                )


def _swap(value, plan):
    """``value`` with the replaced blocks in it (itself, or one level of list, tuple or dict) replaced."""
    if isinstance(value, gluon.Block):
        return plan.get(id(value), value)
    if isinstance(value, (list, tuple, dict)):
        items = value.values() if isinstance(value, dict) else value
        if not any(isinstance(item, gluon.Block) and id(item) in plan for item in items):
            return value
    if isinstance(value, list):
        value[:] = [_swap(item, plan) if isinstance(item, gluon.Block) else item for item in value]
    elif type(value) is tuple:
        return tuple(_swap(item, plan) if isinstance(item, gluon.Block) else item for item in value)
    elif isinstance(value, dict):
        for key, item in list(value.items()):
            if isinstance(item, gluon.Block):
                value[key] = _swap(item, plan)
    return value


def _put_in_place(found, plan) -> None:
    """Every reference the tree's blocks hold to a replaced block, as child or attribute (also in a
    list, tuple or dict attribute), now refers to its replacement."""
    for _, block in found:
        if id(block) in plan:
            continue
        for key, child in list(block._children.items()):
            if id(child) in plan:
                block._children[key] = plan[id(child)]
        for name, value in list(vars(block).items()):
            if name in ("_children", "_reg_params", "_cached_graph", "_cached_op", "_cached_op_args"):
                continue
            new = _swap(value, plan)
            if new is not value:
                object.__setattr__(block, name, new)  # Block.__setattr__ refuses a change of type


def _copy_block(net):
    """A deep copy of a Block tree, also of a hybridized one that has run.

    ``copy.deepcopy`` fails on the cached ops (ctypes handles) and would copy an attached
    Trainer; both are left out, the copy's caches are rebuilt at its first call, and its
    parameters get fresh gradient buffers (autograd marks do not survive a copy).
    """
    memo = {}
    inside = {id(block._scope) for _, block in _walk(net)}
    for _, block in _walk(net):
        # A block keeps the scope it was created in (stale state of name_scope()): that of its
        # parent, which is outside the copy when ``net`` is not a root; the copy gets none.
        outer = getattr(block._scope, "_old_scope", None)
        if outer is not None and id(outer) not in inside:
            memo[id(outer)] = None
        if isinstance(block, gluon.HybridBlock):
            memo[id(block._cached_op)] = None
            if not isinstance(block, gluon.SymbolBlock):  # a SymbolBlock's graph is its definition
                memo[id(block._cached_graph)] = ()
                memo[id(block._cached_op_args)] = []
        for param in block._reg_params.values():
            memo[id(param._trainer)] = None
    new = copy.deepcopy(net, memo)
    seen = set()
    for _, block in _walk(new):
        if isinstance(block, gluon.HybridBlock):
            block._clear_cached_op()
            block._cached_op_args = []
        for param in block._reg_params.values():
            if id(param) not in seen and param._data is not None:
                param._init_grad()
            seen.add(id(param))
    return new


def _replace(net, what: str, is_target, left_in, kernel_of, build, inplace: bool):
    """Replace every block that ``is_target`` accepts; ``build(group)`` makes the replacements of
    one group of targets sharing a kernel (``kernel_of``), None for a target to leave as it is.

    All replacements are built before the first one is put in place, so a failure leaves the
    network as it was, also with ``inplace=True``. One warning names every conv-like block left
    (``left_in``) with the counts, or says that there was nothing to replace.
    """
    if not isinstance(net, gluon.Block):
        raise TypeError(f"{what} needs a gluon Block as net. Received: net of type {type(net).__name__}")
    target = net if inplace else _copy_block(net)
    found = _survey(target, is_target)
    plan = {}
    for group in _tie_groups([(p, b) for p, b in found if is_target(b)], kernel_of):
        for (_, old), new in zip(group, build(group)):
            if new is not None:
                plan[id(old)] = new
    _check_no_outside_sharing(what, found, plan)
    if id(target) in plan:
        result = plan[id(target)]
    else:
        result = target
        _put_in_place(found, plan)
        for _, block in _walk(target):
            if isinstance(block, gluon.HybridBlock):
                block._clear_cached_op()
    left = [(path, *info) for path, block in found if (info := left_in(block)) is not None]
    if left:
        warnings.warn(
            f"{what} replaced {len(plan)} layer(s) and left {sum(count for _, count, _ in left)} conv layer(s) as "
            "they are: " + "; ".join(f"{path or '(the given block)'} ({description})" for path, _, description in left),
            UserWarning,
            stacklevel=3,
        )
    elif not plan:
        warnings.warn(f"{what} found nothing to replace in {type(net).__name__}", UserWarning, stacklevel=3)
    return result


def convert_model(
    net,
    D_mul: Union[None, int, Callable[[str, Any], Optional[int]]] = None,
    inplace: bool = False,
):
    """Replace every ``gluon.nn.Conv2D`` of a network by a :class:`DOConv2D` with the same output.

    Works on any Block tree (children set as attributes, ``HybridSequential``, ...), e.g.
    a GluonCV model-zoo network; each layer is made by :meth:`DOConv2D.from_conv`, so it
    keeps what the user set up (``grad_req``: W and D follow the kernel's, the bias the
    bias's; contexts, dtypes, names, hooks). Only blocks of exactly the class
    ``gluon.nn.Conv2D`` are converted: a subclass keeps its own forward pass, so it is left
    as it is, as are other convolutions (Conv1D, Conv2DTranspose, ...) and the graphs inside
    SymbolBlocks; one warning names each of them with its class, and gives the counts. A
    Conv2D registered at several places becomes one DOConv2D registered at the same places;
    Conv2Ds sharing their parameters (``params=``) become DOConv2Ds sharing W, D and bias.

    Args:
        net: the network (a ``Conv2D`` itself is converted too: the result is the new layer).
        D_mul: None (default): each layer's K. An int: ``max(D_mul, K)`` per layer, with one
            warning naming the layers whose K was larger. A callable ``(name, conv) -> int | None``
            deciding per layer (``name`` is the dotted path of child names, e.g.
            ``"features.4.0.body.0"``, the first one for a layer registered at several places);
            None leaves that conv as it is. Convs sharing parameters need one value.
        inplace: change ``net`` itself instead of a copy. Default False.

    Returns:
        The converted network: a copy unless ``inplace``. ``net`` is untouched unless
        ``inplace``, also when the call fails. Warns when there was nothing to convert.

    Raises:
        TypeError: ``net`` is not a gluon Block.
        ValueError: a bad ``D_mul``; convs sharing parameters that cannot stay shared (different
            ``D_mul``, groups or layout, or a kernel shared without the bias, or with a block that
            is not converted); the message names the layers.

    Example:
        >>> from mxnet import gluon
        >>> net = gluon.nn.HybridSequential()
        >>> net.add(gluon.nn.Conv2D(4, 3, in_channels=2), gluon.nn.Conv2D(4, 1, in_channels=4))
        >>> net.initialize()
        >>> [type(b).__name__ for b in convert_model(net)._children.values()]
        ['DOConv2D', 'DOConv2D']
    """
    larger = []

    def D_mul_for(name, conv):
        K = core.kernel_volume(conv._kwargs["kernel"])
        if D_mul is None:
            return K
        if callable(D_mul):
            return D_mul(name, conv)
        value = core.check_int(D_mul, "D_mul")
        if K > value:
            larger.append(f"{name or type(conv).__name__} (K={K})")
        return max(value, K)

    def build(group):
        values = [D_mul_for(name, conv) for name, conv in group]
        if all(value is None for value in values):
            return [None] * len(group)
        if len(set(values)) > 1:
            raise ValueError(
                f"convert_model: {', '.join(name for name, _ in group)} share their kernel, so they need one D_mul. "
                f"Received: D_mul={values}"
            )
        _check_ties(
            "convert_model",
            group,
            lambda conv: (conv.bias,),
            lambda conv: {"groups": conv._kwargs["num_group"], "layout": conv._kwargs["layout"]},
        )
        head = DOConv2D._from_conv(group[0][1], values[0])
        return [head] + [DOConv2D._from_conv(conv, values[0], tied_to=head) for _, conv in group[1:]]

    out = _replace(
        net, "convert_model", lambda b: type(b) is nn.Conv2D, _left_by_convert, lambda b: b.weight, build, inplace
    )
    if larger:
        warnings.warn(
            f"D_mul={D_mul} is smaller than K for {len(larger)} layer(s), which use D_mul = K instead: "
            + ", ".join(larger),
            UserWarning,
            stacklevel=2,
        )
    return out


def fuse_model(net, inplace: bool = False):
    """Replace every :class:`DOConv2D` of a network by its folded ``gluon.nn.Conv2D``.

    The result has the native network's parameters (names included) and cost, and the
    DO-Conv network's outputs; each layer is made by :meth:`DOConv2D.fuse`, so it keeps what
    the user set up. Only blocks of exactly the class DOConv2D are fused; one warning names
    each subclass left as it is, and each SymbolBlock holding ``doconv_fold`` ops (a DO-Conv
    network exported unfused). A DOConv2D registered at several places becomes one Conv2D
    registered at the same places; DOConv2Ds sharing their parameters become Conv2Ds sharing
    theirs.

    Args:
        net: the network (a DOConv2D itself is fused too: the result is the new layer).
        inplace: change ``net`` itself instead of a copy. Default False.

    Returns:
        The fused network: a copy unless ``inplace``; ``net`` is untouched unless
        ``inplace``, also when the call fails. Warns when there was nothing to fuse.

    Raises:
        TypeError: ``net`` is not a gluon Block.
        RuntimeError: a DOConv2D is not initialized yet.
        ValueError: DOConv2Ds share W but not D or the bias, or share a parameter with a block
            that is not fused; the message names the layers.

    Example:
        >>> from mxnet import gluon
        >>> net = gluon.nn.HybridSequential()
        >>> net.add(DOConv2D(4, 3, in_channels=2))
        >>> net.initialize()
        >>> type(fuse_model(net)[0]).__name__
        'Conv2D'
    """

    def build(group):
        _check_ties(
            "fuse_model",
            group,
            lambda layer: (layer.D, layer.bias),
            lambda layer: {"groups": layer._groups, "layout": layer._layout},
        )
        head = group[0][1]._fused()
        return [head] + [layer._fused(tied_to=head) for _, layer in group[1:]]

    return _replace(net, "fuse_model", lambda b: type(b) is DOConv2D, _left_by_fuse, lambda b: b.W, build, inplace)
