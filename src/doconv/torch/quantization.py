"""Int8 quantization of DO-Conv networks through PyTorch 2 export (PT2E), quantization-aware training included.

A fused DO-Conv network (:func:`~doconv.torch.fuse_model`) is a plain network: post-training quantization
needs nothing from this module. Quantization-aware training (QAT) of the DO-Conv network itself does, for two
reasons measured with torch 2.13 and torchao 0.18:

* PT2E quantizers (torchao's ``X86InductorQuantizer``) find convolutions by the module type recorded in the
  exported graph's metadata (``source_fn_stack``, else the innermost ``nn_module_stack`` entry). A DO-Conv
  layer is not an ``nn.Conv2d``, so its ``aten.conv2d`` would stay in float, silently.
  :func:`export_for_qat` records each DO-Conv convolution as the native convolution it replaces. The weight
  that convolution receives is the composed kernel, a differentiable function of W and D in the graph, so the
  quantizer's weight fake-quantizer sits on the composed kernel (after the batch-norm scaling that QAT applies
  to any conv weight) and W and D train through it.
* ``convert_pt2e`` folds batch norm into a convolution's weight only where that weight is a stored tensor
  (``Expected get_attr node, got call_function`` otherwise). :func:`fuse_exported` does for the exported graph
  what :func:`~doconv.torch.fuse_model` does for a module: it replaces each composed kernel by a parameter
  holding its current value, and drops W and D.

The chain: ``export_for_qat`` -> ``prepare_qat_pt2e`` -> train -> ``fuse_exported`` -> ``convert_pt2e``.
:func:`unquantized_convolutions` lists the convolutions of a converted graph whose input or weight does not
come through a dequantize node, so that a convolution left in float never goes unnoticed.

This module needs only torch; the quantizer and ``prepare_qat_pt2e``/``convert_pt2e`` come from torchao.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .layers import _NATIVE, _DOConvNd

nn = torch.nn

# The graph metadata key marking the parameters a DO-Conv kernel is composed from; its value is the tuple of
# the names of the layers composed from it (more than one where layers share W).
_FOLD_KEY = "doconv_fold"

_CONVOLUTIONS = {
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
    torch.ops.aten.conv1d.padding,
    torch.ops.aten.conv2d.padding,
    torch.ops.aten.conv3d.padding,
    torch.ops.aten.convolution.default,
    # No DO-Conv layer is transposed, but unquantized_convolutions must not miss a float one.
    torch.ops.aten.conv_transpose1d.default,
    torch.ops.aten.conv_transpose2d.input,
    torch.ops.aten.conv_transpose3d.input,
}


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve(cls: Any, known: dict[str, type]) -> Optional[type]:
    """The class an nn_module_stack entry names: a type, or its qualified name as a string (non-strict export).

    ``known`` maps the names of the model's own DO-Conv classes (local classes included) to them; other names
    are looked up among the imported modules, where the model's classes are, since they ran during export.
    """
    if isinstance(cls, type):
        return cls
    name = str(cls)
    if name in known:
        return known[name]
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        found = sys.modules.get(".".join(parts[:split]))
        for part in parts[split:]:
            found = getattr(found, part, None)
        if isinstance(found, type):
            return found
    return None


def _doconv_layer(node: Node, known: dict[str, type]) -> Optional[tuple[str, type]]:
    """(name, native conv class) of the DO-Conv layer (or subclass) whose own code produced ``node``, or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls = _resolve(cls, known)
    if cls is None or not issubclass(cls, _DOConvNd):
        return None
    return path, _NATIVE[cls._rank]


def _ancestors(node: Node) -> list[Node]:
    """``node`` and every node it is computed from, inputs first."""
    order: list[Node] = []
    seen: set[Node] = set()
    stack = [(node, False)]
    while stack:
        current, expanded = stack.pop()
        if expanded:
            order.append(current)
            continue
        if current in seen:
            continue
        seen.add(current)
        stack.append((current, True))
        stack.extend((parent, False) for parent in current.all_input_nodes if parent not in seen)
    return order


def mark_doconv_convolutions(graph_module: GraphModule, model: Optional[nn.Module] = None) -> int:
    """Record each DO-Conv convolution of an exported graph as the native convolution it replaces; in place.

    :func:`export_for_qat` calls it; call it yourself on a graph you exported otherwise. It sets the
    convolution node's ``source_fn_stack`` to the native class (what PT2E quantizers match) and marks the
    parameters its kernel is composed from, for :func:`fuse_exported`.

    Args:
        graph_module: the result of ``torch.export.export(model, args).module()``.
        model: the exported model. Default None; give it where DO-Conv subclasses are defined inside functions,
            so that their names (which the graph records as strings) can be told apart.

    Returns:
        The number of DO-Conv convolutions marked.

    Raises:
        TypeError: ``graph_module`` is not a ``torch.fx.GraphModule``.
        ValueError: a DO-Conv kernel is computed from something other than stored tensors.
    """
    if not isinstance(graph_module, GraphModule):
        raise TypeError(
            "mark_doconv_convolutions needs the torch.fx.GraphModule of torch.export.export(model, args).module(). "
            f"Received: graph_module of type {type(graph_module).__name__}"
        )
    known = (
        {} if model is None else {_class_name(type(m)): type(m) for m in model.modules() if isinstance(m, _DOConvNd)}
    )
    marked = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target not in _CONVOLUTIONS:
            continue
        layer = _doconv_layer(node, known)
        if layer is None:
            continue
        name, native = layer
        weight = node.args[1]
        sources = [n for n in _ancestors(weight) if not n.all_input_nodes]
        if any(n.op != "get_attr" for n in sources):
            raise ValueError(
                f"The kernel of DO-Conv layer {name!r} must be composed from its stored parameters in the exported "
                f"graph. Received: a kernel computed from {[n.op + ' ' + n.name for n in sources]}"
            )
        for source in sources:
            # A W shared by two layers is one node: it belongs to both compositions.
            names = source.meta.get(_FOLD_KEY, ())
            source.meta[_FOLD_KEY] = names if name in names else (*names, name)
        # Quantizers read the last entry; what the exporter recorded before stays underneath.
        node.meta["source_fn_stack"] = [*node.meta.get("source_fn_stack", []), (node.name, native)]
        marked += 1
    return marked


def export_for_qat(model: nn.Module, args: tuple, kwargs: Optional[dict] = None, **export_kwargs: Any) -> GraphModule:
    """``torch.export.export(model, args).module()`` with every DO-Conv convolution visible to PT2E quantizers.

    The model keeps training as DO-Conv: the exported graph composes each kernel from W and D in plain,
    differentiable torch ops, and the quantizer's weight fake-quantizer sits on that composed kernel. Export
    the model in the mode it trains in (``model.train()``).

    Args:
        model: a network with DO-Conv layers (plain layers pass through unchanged).
        args: example positional inputs, a tuple.
        kwargs: example keyword inputs. Default None.
        **export_kwargs: passed to ``torch.export.export`` (``dynamic_shapes``, ``strict``).

    Returns:
        The exported ``torch.fx.GraphModule``, ready for torchao's ``prepare_qat_pt2e``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``args`` not a tuple.

    Example:
        >>> from doconv.torch import DOConv2d
        >>> net = nn.Sequential(DOConv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> graph = export_for_qat(net, (torch.randn(2, 3, 8, 8),))
        >>> [n.meta["source_fn_stack"][-1][1].__name__ for n in graph.graph.nodes if "conv" in n.name]
        ['Conv2d']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_for_qat needs an nn.Module. Received: model of type {type(model).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of example inputs. Received: args of type {type(args).__name__}")
    graph_module = torch.export.export(model, args, kwargs, **export_kwargs).module()
    mark_doconv_convolutions(graph_module, model)
    return graph_module


def _fetch(graph_module: GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(graph_module.get_submodule(owner), name)


def _free_name(graph_module: GraphModule, layer: str) -> str:
    base = "doconv_kernel_" + layer.replace(".", "_")
    name, count = base, 0
    while hasattr(graph_module, name):
        count += 1
        name = f"{base}_{count}"
    return name


def fuse_exported(graph_module: GraphModule) -> GraphModule:
    """Replace each DO-Conv kernel composition of an exported graph by a parameter holding the kernel; in place.

    The graph's counterpart of :func:`~doconv.torch.fuse_model`: call it after quantization-aware training,
    before torchao's ``convert_pt2e``, which folds batch norm only into stored conv weights. The kernel is
    composed from W and D as they are now; W, D and the identity leave the graph module.

    Args:
        graph_module: a graph from :func:`export_for_qat` (or :func:`mark_doconv_convolutions`), prepared or not.

    Returns:
        ``graph_module`` itself.

    Raises:
        TypeError: ``graph_module`` is not a ``torch.fx.GraphModule``.
        ValueError: the graph has no marked DO-Conv kernel, or a kernel cannot be told apart from its users.

    Example:
        >>> from doconv.torch import DOConv2d
        >>> net = nn.Sequential(DOConv2d(3, 4, 3), nn.ReLU()).eval()
        >>> x = torch.randn(2, 3, 8, 8)
        >>> graph = fuse_exported(export_for_qat(net, (x,)))
        >>> sorted(name for name, _ in graph.named_parameters())
        ['0.bias', 'doconv_kernel_0']
        >>> bool(torch.allclose(graph(x), net(x), atol=1e-6))
        True
    """
    if not isinstance(graph_module, GraphModule):
        raise TypeError(
            f"fuse_exported needs a torch.fx.GraphModule. Received: graph_module of type {type(graph_module).__name__}"
        )
    graph = graph_module.graph
    layers: dict[str, set[Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr" and _FOLD_KEY in node.meta:
            marked = node.meta[_FOLD_KEY]
            for layer in (marked,) if isinstance(marked, str) else marked:  # a str: marked by an earlier doconv
                layers.setdefault(layer, set()).add(node)
    if not layers:
        raise ValueError(
            "fuse_exported found no DO-Conv kernel in the graph: export the model with export_for_qat "
            "(or call mark_doconv_convolutions on the exported graph) first."
        )
    for layer, sources in layers.items():
        # The composition: every node computed from this layer's W, D and identity alone.
        composed = set(sources)
        order = []
        for node in graph.nodes:
            if node.op == "call_function" and node.all_input_nodes and all(n in composed for n in node.all_input_nodes):
                composed.add(node)
                order.append(node)
        kernels = [n for n in order if any(user not in composed for user in n.users)]
        if not kernels:
            raise ValueError(f"fuse_exported cannot find the composed kernel of DO-Conv layer {layer!r} in the graph.")
        values: dict[Node, Any] = {n: _fetch(graph_module, n.target) for n in sources}
        with torch.no_grad():
            for node in order:
                values[node] = node.target(
                    *map_arg(node.args, values.__getitem__), **map_arg(node.kwargs, values.__getitem__)
                )
        for kernel in kernels:
            name = _free_name(graph_module, layer)
            graph_module.register_parameter(name, nn.Parameter(values[kernel].detach().clone()))
            with graph.inserting_before(kernel):
                stored = graph.get_attr(name)
            stored.meta.update({key: value for key, value in kernel.meta.items() if key != _FOLD_KEY})
            kernel.replace_all_uses_with(stored)
        for node in [*reversed(order), *sources]:
            if not node.users:
                graph.erase_node(node)
        for source in sources:
            if not any(n.op == "get_attr" and n.target == source.target for n in graph.nodes):
                owner, _, attribute = source.target.rpartition(".")
                delattr(graph_module.get_submodule(owner), attribute)
    graph.lint()
    graph_module.recompile()
    return graph_module


def _dequantized(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and "dequantize" in str(node.target)


def unquantized_convolutions(graph_module: GraphModule) -> list[str]:
    """The convolutions of a converted (``convert_pt2e``) graph whose input or weight is not dequantized int8.

    An empty list means every convolution runs on quantize/dequantize pairs, i.e. in int8 once lowered.

    Args:
        graph_module: a ``torch.fx.GraphModule``.

    Returns:
        The names of the convolution nodes left in float, in graph order.

    Raises:
        TypeError: ``graph_module`` is not a ``torch.fx.GraphModule``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3))
        >>> unquantized_convolutions(torch.export.export(net, (torch.randn(1, 3, 8, 8),)).module())
        ['conv2d']
    """
    if not isinstance(graph_module, GraphModule):
        raise TypeError(
            "unquantized_convolutions needs a torch.fx.GraphModule. "
            f"Received: graph_module of type {type(graph_module).__name__}"
        )
    return [
        node.name
        for node in graph_module.graph.nodes
        if node.op == "call_function"
        and node.target in _CONVOLUTIONS
        and not (_dequantized(node.args[0]) and _dequantized(node.args[1]))
    ]
