"""plan_compositions: fix, per DOConv2D layer of a network, the order its hybridized graph trains in."""

from __future__ import annotations

import numpy as np

from .._optional import require

mx = require("mxnet", "doconv.gluon", "gluon", "MXNet")

from mxnet import gluon, symbol  # noqa: E402

from .convert import _walk  # noqa: E402
from .layers import DOConv2D  # noqa: E402


def plan_compositions(net, *inputs) -> dict:
    """Fix, per DOConv2D layer of a network, the order its hybridized graph trains in.

    A hybridized graph cannot choose per batch (see :func:`use_feature_composition`), so by default
    it folds. This traces ``net`` once symbolically, infers the shape each DOConv2D receives from the
    given example inputs (only their shapes are read) and sets the order that
    ``doconv.core.training_composition`` picks for that shape; every graph of the network is traced
    again at its next call. The plan holds for every later input shape: both orders give the same
    outputs and gradients, so a plan made for another batch size costs speed, never accuracy. It
    applies to the training and the inference of the hybridized graph (which are one graph); a
    layer that is not hybridized still chooses per batch. ``plan_compositions(net)`` with no inputs
    removes the plan (hybridized layers fold again).

    Args:
        net: a Block tree holding DOConv2D layers, hybridized or not, parameters initialized or not.
        *inputs: example inputs (NDArrays, or anything with a ``shape``), as ``net`` is called.
            Only their shapes are read; no parameter changes, and nothing runs but shape inference.

    Returns:
        ``{layer name: 'feature' or 'kernel'}`` for every DOConv2D planned (a layer called at
        several places composes features only where every call would).

    Raises:
        TypeError: ``net`` is not a Block, or an input has no shape of positive ints.
        ValueError: the shapes cannot be inferred from the inputs (e.g. a wrong number of channels);
            no plan changes.

    Example:
        >>> from mxnet import nd
        >>> net = DOConv2D(64, 3, padding=1, in_channels=64)
        >>> net.initialize()
        >>> list(plan_compositions(net, nd.zeros((2, 64, 4, 4))).values())
        ['feature']
        >>> list(plan_compositions(net, nd.zeros((2, 64, 16, 16))).values())
        ['kernel']
    """
    if not isinstance(net, gluon.Block):
        raise TypeError(f"plan_compositions needs a gluon Block as net. Received: {type(net).__name__}")
    for i, x in enumerate(inputs):
        shape = getattr(x, "shape", None)
        if not isinstance(shape, tuple) or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
            raise TypeError(
                f"plan_compositions needs example inputs with a shape of positive ints. Received: inputs[{i}] "
                f"of type {type(x).__name__} with shape {shape!r}"
            )
    layers = {id(block): block for _, block in _walk(net) if isinstance(block, DOConv2D)}
    if not inputs:
        for layer in layers.values():
            layer._planned = None
        _retrace(net)
        return {}
    names = ["data"] if len(inputs) == 1 else [f"data{i}" for i in range(len(inputs))]
    seen = []
    handles = [
        layer.register_forward_pre_hook(lambda block, args: seen.append((block, args[0]))) for layer in layers.values()
    ]
    shapes = {name: tuple(int(n) for n in x.shape) for name, x in zip(names, inputs)}
    try:
        outputs = net(*[symbol.var(name) for name in names])
        # The whole graph first: a layer's own input shape says nothing of whether its convolution
        # takes it (a wrong number of channels is found only past the layer).
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        symbol.Group([out for out in outputs if isinstance(out, symbol.Symbol)]).infer_shape_partial(**shapes)
        inferred = [(layer, x.infer_shape_partial(**shapes)[1]) for layer, x in seen]
    except mx.base.MXNetError as err:
        raise ValueError(
            f"plan_compositions could not infer the shapes in {type(net).__name__} from the example inputs "
            f"(MXNet: {str(err).splitlines()[0]}). Received: input shapes {list(shapes.values())}"
        ) from None
    finally:
        for handle in handles:
            handle.detach()
    plan = {}
    for layer, out_shapes in inferred:
        choice = layer._planned_order(out_shapes[0]) if out_shapes and out_shapes[0] else "kernel"
        plan[id(layer)] = "kernel" if plan.get(id(layer)) == "kernel" else choice
    for key, layer in layers.items():
        layer._planned = plan.get(key, "kernel")
    _retrace(net)
    return {layers[key].name: choice for key, choice in plan.items()}


def _retrace(net) -> None:
    """Drop the traced graphs of a Block tree, so that its next call traces them again."""
    for _, block in _walk(net):
        if isinstance(block, gluon.HybridBlock) and not isinstance(block, gluon.SymbolBlock):
            block._clear_cached_op()
