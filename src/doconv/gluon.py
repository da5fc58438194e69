"""DO-Conv for MXNet Gluon (1.x): ``DOConv2D``, folding and whole-network conversion.

The adapter only creates parameters and runs MXNet ops; argument handling, the
maths of folding and every layout conversion live in :mod:`doconv.core`.

``DOConv2D`` stores ``W`` (C_out, C_in/g, D_mul), ``D`` (C_in, K, D_mul) and
``bias`` in the canonical layout (DESIGN.md, section 2). Its forward pass folds
W and D into one ordinary kernel and runs ``Convolution``. On CPU the fold is
doconv's compiled kernel in the custom operator ``doconv_fold`` (an exported
unfused network loads after ``import doconv.gluon``); elsewhere, or after
``use_fold_kernel(False)``, it is made of MXNet operators. A training batch with few
output positions composes features instead, where ``doconv.core.training_composition``
says that is cheaper: per batch imperatively, per layer in a hybridized graph after
:func:`plan_compositions` (see :func:`use_feature_composition`).

Example:
    >>> from mxnet import nd
    >>> from doconv.gluon import DOConv2D
    >>> layer = DOConv2D(8, 3, padding=1)
    >>> layer.initialize()
    >>> layer(nd.ones((2, 4, 16, 16))).shape
    (2, 8, 16, 16)
"""

from __future__ import annotations

import copy
import ctypes
import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import numpy as np

from . import _fold_cpu, core
from ._optional import require

mx = require("mxnet", "doconv.gluon", "gluon", "MXNet")

from mxnet import autograd, gluon, nd, symbol  # noqa: E402
from mxnet.gluon import nn  # noqa: E402
from mxnet.gluon.contrib.cnn import DeformableConvolution, ModulatedDeformableConvolution  # noqa: E402

__all__ = [
    "DOConv2D",
    "convert_model",
    "feature_composition_in_use",
    "fold_kernel_in_use",
    "fuse_model",
    "get_params",
    "plan_compositions",
    "set_params",
    "use_feature_composition",
    "use_fold_kernel",
]

_RANK = 2


# -- the fold as one operator on CPU --------------------------------------------------------------
#
# MXNet's batched products (linalg.gemm2, batch_dot) are slow for the fold's tiny per-channel
# matrices: a resnet18_v1b training step at batch 16 is 1.13x the native one with them and ~1.00x
# with doconv._foldkernel, which doconv.torch uses too (`bench_gluon.py` with and without
# `--mxnet-ops`). The kernel runs here inside a custom operator ("doconv_fold"), which MXNet calls
# with the inputs ready and the outputs allocated, and which reads and writes their memory in place.
# A network exported unfused then names that operator: loading it needs `import doconv.gluon` first
# (as for any custom operator); `fuse_model` before `export` gives a plain network, and
# `use_fold_kernel(False)` folds with MXNet ops instead.

_USE_KERNEL = _fold_cpu.kernel is not None
# Layers below this many multiply-adds in their fold (C_out * C_in/g * K * D_mul) fold with MXNet's
# ops even where the kernel is in use: a custom operator costs a fixed time per call (MXNet hands it
# to the operator's own thread and back, then its Python runs), about 0.3 ms per pass on one core,
# more than MXNet's batched product takes for a small layer: depthwise layers, and dense ones up to
# 64 -> 64 channels at 3x3. `python -m doconv.benchmarks.bench_gluon --fold-sizes` measures both
# ways per layer size.
KERNEL_MIN_MACS = 1 << 19
_MIN_MACS = KERNEL_MIN_MACS
_ITEM = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


def use_fold_kernel(enabled: bool = True, *, min_macs: int = KERNEL_MIN_MACS) -> bool:
    """Choose how DOConv2D layers fold on CPU from their next trace or call on.

    Args:
        enabled: True (the default where the extension was built): doconv's compiled kernel, in the
            custom operator "doconv_fold", for every layer of at least ``min_macs``. False: MXNet's
            own ops everywhere, slower in training, and an exported unfused network holds only MXNet
            operators.
        min_macs: the smallest fold (C_out * C_in/g * K * D_mul multiply-adds) that takes the kernel;
            smaller layers fold with MXNet's ops, which cost less there. 0: every layer takes the
            kernel. Default :data:`KERNEL_MIN_MACS` (2**19).

    Returns:
        Whether the compiled kernel is now in use (False where it was not built).

    Raises:
        TypeError: ``min_macs`` is not an int.
        ValueError: ``min_macs`` is negative.

    Layers that were already hybridized keep the graph they traced: call ``hybridize()`` again.

    Example:
        >>> was = fold_kernel_in_use()
        >>> use_fold_kernel(False)
        False
        >>> _ = use_fold_kernel(was)
    """
    global _USE_KERNEL, _MIN_MACS
    if isinstance(min_macs, bool) or not isinstance(min_macs, int):
        raise TypeError(f"min_macs must be an int. Received: min_macs={min_macs!r} of type {type(min_macs).__name__}")
    if min_macs < 0:
        raise ValueError(f"min_macs must be >= 0. Received: min_macs={min_macs}")
    _USE_KERNEL = bool(enabled) and _fold_cpu.kernel is not None
    _MIN_MACS = min_macs
    return _USE_KERNEL


def fold_kernel_in_use() -> bool:
    """Whether DOConv2D layers fold on CPU with doconv's compiled kernel (see :func:`use_fold_kernel`)."""
    return _USE_KERNEL


def _on_cpu(array) -> bool:
    return array.context.device_type == "cpu"


def _host(array) -> np.ndarray:
    """A NumPy array on the memory of a CPU NDArray (no copy: the kernels write into it in place),
    or a copy of an NDArray elsewhere."""
    if not _on_cpu(array):
        return array.asnumpy()
    pointer = ctypes.c_void_p()
    mx.base.check_call(mx.base._LIB.MXNDArrayGetData(array.handle, ctypes.byref(pointer)))
    flat = np.ctypeslib.as_array((_ITEM[np.dtype(array.dtype)] * array.size).from_address(pointer.value))
    return flat.reshape(array.shape)


class _FoldOp(mx.operator.CustomOp):
    """folded = W·(D + I) and its gradients with doconv._foldkernel (see the note above)."""

    def __init__(self, groups: int, identity: np.ndarray) -> None:
        super().__init__()
        self._groups = groups
        self._identity = identity  # (K, D_mul), never a parameter
        self._threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def _run(self, name: str, a: np.ndarray, b: np.ndarray, req: str, target) -> None:
        """One kernel into ``target`` (an NDArray) as ``req`` asks: written in place, or added.

        The kernel checks the arrays (shapes against each other and groups, dtype, layout) and
        raises ValueError before it reads anything; an output that MXNet placed on an input's
        memory is computed into a fresh array instead, as the kernel refuses to write over its input.
        """
        if req == "null":
            return
        out = _host(target) if _on_cpu(target) and req in ("write", "inplace") else None
        in_place = out is not None and not (np.may_share_memory(out, a) or np.may_share_memory(out, b))
        if not in_place:
            out = np.empty(target.shape, a.dtype)
        _fold_cpu.run(name, a, b, out, self._groups, self._threads, False)
        if not in_place:
            self.assign(target, req, nd.array(out, ctx=target.context, dtype=out.dtype))

    def _inputs(self, in_data) -> tuple:
        W, D = (_host(x) for x in in_data)
        if D.shape[1:] != self._identity.shape:  # D + I would broadcast a D of the wrong shape silently
            raise ValueError(
                f"doconv_fold: D must have shape (C_in, K, D_mul) with (K, D_mul) = {self._identity.shape}. "
                f"Received: D.shape={D.shape}"
            )
        return W, D + self._identity.astype(D.dtype, copy=False)  # D_hat, (C_in, K, D_mul)

    def forward(self, is_train, req, in_data, out_data, aux):
        W, D_hat = self._inputs(in_data)
        D_hat_t = np.ascontiguousarray(D_hat.transpose(0, 2, 1))  # (C_in, D_mul, K): taps innermost
        self._run("fold_rows", W, D_hat_t, req[0], out_data[0])

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        W, D_hat = self._inputs(in_data)
        G = _host(out_grad[0])
        self._run("grad_D_channels", G, W, req[1], in_grad[1])
        self._run("grad_W_rows", G, D_hat, req[0], in_grad[0])


@mx.operator.register("doconv_fold")
class _FoldProp(mx.operator.CustomOpProp):
    """Shapes and types of "doconv_fold": (W, D) -> folded (C_out, C_in/g, K), all one dtype."""

    def __init__(self, groups="1", K="1", D_mul="1") -> None:
        super().__init__(need_top_grad=True)
        self._groups, self._K, self._D_mul = int(groups), int(K), int(D_mul)

    def list_arguments(self):
        return ["W", "D"]

    def list_outputs(self):
        return ["folded"]

    def infer_shape(self, in_shape):
        W, D = in_shape
        return [W, D], [(W[0], W[1], self._K)], []

    def infer_type(self, in_type):
        if np.dtype(in_type[0]) not in _ITEM:
            raise ValueError(f"doconv_fold: dtype must be float32 or float64, got {np.dtype(in_type[0])}")
        return [in_type[0], in_type[0]], [in_type[0]], []

    def create_operator(self, ctx, in_shapes, in_dtypes):
        return _FoldOp(self._groups, core.identity(self._K, self._D_mul))


# -- feature composition, where a batch has few output positions ----------------------------------
#
# The fold costs the same whatever the batch; composing features costs in proportion to the output
# positions (docs/maths.rst). `core.training_composition` picks the cheaper order, as in doconv.torch.
# Composing features here is two native Convolutions: D_hat as a depthwise convolution with D_mul
# filters per input channel (the layer's stride, dilation and padding), then W as a 1x1 grouped
# convolution, so it differentiates like any MXNet graph and exports without the custom operator.
# The choice is made per batch imperatively (a Gluon block that is not hybridized). A hybridized graph
# is traced once from shapeless symbols and then serves every input shape, so no batch size is known
# when it is built (and MXNet 1.x's one in-graph branch, contrib.cond, runs its branches as nested
# graphs): hybridized layers fold, unless `plan_compositions(net, example)` has fixed each layer's
# order from the shapes that example gives it. `use_feature_composition(False)` folds everywhere.

_FEATURES = core.Switch()  # use_feature_composition's setting


def use_feature_composition(enabled: bool) -> bool:
    """Let DOConv2D train by feature composition where it is the cheaper order (the default).

    Both orders give the same outputs and gradients up to rounding (docs/maths.rst). The choice is
    made per training batch of a layer that is not hybridized (see the module's note); turn it off
    to fold in every step, e.g. to compare the two.

    Args:
        enabled: True (the default setting) or False.

    Returns:
        The new setting.

    Raises:
        TypeError: ``enabled`` is not a bool.

    Example:
        >>> use_feature_composition(False)
        False
        >>> use_feature_composition(True)
        True
    """
    return _FEATURES.set(enabled)


def feature_composition_in_use() -> bool:
    """The current setting of :func:`use_feature_composition`."""
    return bool(_FEATURES)


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
        net(*[symbol.var(name) for name in names])
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


def _symmetric_pad(padding: Any, kernel_size, strides, dilation) -> tuple[int, int]:
    """MXNet's Convolution pads both sides of a dimension alike; refuse anything else."""
    pairs = core.padding_pairs(padding, kernel_size, strides, dilation)
    if any(before != after for before, after in pairs):
        raise ValueError(
            "padding must be the same on both sides of each dimension (MXNet's Convolution pads symmetrically). "
            f"Received: padding={padding!r}"
        )
    return tuple(before for before, _ in pairs)


def _require_data(param, what: str):
    """The parameter's value on its first context, or a RuntimeError that says what to do."""
    if param._data is None:
        raise RuntimeError(
            f"{what} needs initialized parameters, but {param.name} is not initialized yet "
            f"(shape {param.shape}). Call initialize() and, if in_channels was not given, run one forward pass first."
        )
    return param._data[0]


class DOConv2D(gluon.HybridBlock):
    """A 2-D Depthwise Over-parameterized Convolution, a drop-in for ``gluon.nn.Conv2D``.

    The layer learns ``W`` (C_out, C_in/groups, D_mul) and the depthwise offset ``D``
    (C_in, K, D_mul), K = kernel height x width, and computes
    ``Convolution(x, fold(W, D))`` (see :func:`doconv.core.fold`). At initialisation
    D = 0, so the layer starts as the plain convolution whose kernel is W summed over
    its identity tiles. For K = 1 (1x1 kernels) there is no D and W is the kernel.

    Args:
        channels: number of output channels C_out.
        kernel_size: int or 2 ints (height, width).
        strides: int or 2 ints. Default (1, 1).
        padding: int, 2 ints, or ``'valid'`` / ``'same'`` (stride 1); both sides of a
            dimension alike. Default (0, 0).
        dilation: int or 2 ints. Default (1, 1).
        groups: number of groups; divides ``channels`` and the input channels. Default 1.
        layout: ``'NCHW'`` (default) or ``'NHWC'``. MXNet 1.x has no NHWC convolution on
            CPU, so an NHWC layer transposes to NCHW and back around its convolution.
        activation: name of an activation applied to the output (see
            ``mxnet.ndarray.Activation``), or None (default).
        use_bias: whether the layer has a bias. Default True.
        weight_initializer: initializer of W, computed on W's own shape; None (default)
            uses the one given to ``initialize()``, as ``Conv2D`` does.
        bias_initializer: initializer of the bias. Default ``'zeros'``.
        in_channels: number of input channels, or 0 (default) to infer it from the first
            input (deferred initialisation).
        D_mul: depth multiplier, keyword-only; None (default) means K. Must be >= K.
        **kwargs: ``prefix`` and ``params``, as for every Gluon block.

    Raises:
        ValueError: ``channels`` not divisible by ``groups``, ``D_mul < K``, an unknown
            ``layout`` or another bad argument (the message names it and its value).

    Example:
        >>> from mxnet import nd
        >>> layer = DOConv2D(4, (3, 3), padding=1, in_channels=2, D_mul=12)
        >>> layer.initialize()
        >>> layer.W.shape, layer.D.shape
        ((4, 2, 12), (2, 9, 12))
        >>> layer(nd.ones((1, 2, 5, 5))).shape
        (1, 4, 5, 5)
    """

    def __init__(
        self,
        channels: int,
        kernel_size,
        strides=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        groups: int = 1,
        layout: str = "NCHW",
        activation: Optional[str] = None,
        use_bias: bool = True,
        weight_initializer=None,
        bias_initializer="zeros",
        in_channels: int = 0,
        *,
        D_mul: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._channels = core.check_int(channels, "channels")
        self._kernel_size = core.normalize_tuple(kernel_size, _RANK, "kernel_size")
        self._strides = core.normalize_tuple(strides, _RANK, "strides")
        self._dilation = core.normalize_tuple(dilation, _RANK, "dilation")
        self._padding = _symmetric_pad(padding, self._kernel_size, self._strides, self._dilation)
        self._groups = core.check_int(groups, "groups")
        self._data_format = core.gluon_layout(layout, _RANK)
        self._layout = layout
        in_channels = core.check_int(in_channels, "in_channels", minimum=0)
        # in_channels = 0 (deferred) passes the input check here; it is repeated at the first call.
        core.check_groups(in_channels, self._channels, self._groups)
        self._K = core.kernel_volume(self._kernel_size)
        self._D_mul = core.resolve_D_mul(D_mul, self._kernel_size)
        self._activation = activation
        self._use_bias = bool(use_bias)
        self._conv_kwargs = {
            "kernel": self._kernel_size,
            "stride": self._strides,
            "dilate": self._dilation,
            "pad": self._padding,
            "num_filter": self._channels,
            "num_group": self._groups,
            "no_bias": not self._use_bias,
            "layout": "NCHW",
        }
        C_in_g = in_channels // self._groups
        with self.name_scope():
            self.W = self.params.get(
                "W",
                shape=(self._channels, C_in_g, self._D_mul),
                init=weight_initializer,
                allow_deferred_init=True,
            )
            if self._K > 1:
                self.D = self.params.get(
                    "D", shape=(in_channels, self._K, self._D_mul), init="zeros", allow_deferred_init=True
                )
            else:
                self.D = None
            if self._use_bias:
                self.bias = self.params.get(
                    "bias", shape=(self._channels,), init=bias_initializer, allow_deferred_init=True
                )
            else:
                self.bias = None
            self.act = nn.Activation(activation, prefix=activation + "_") if activation is not None else None
        self._planned = None  # the order of the hybridized graph: plan_compositions sets it

    # ----------------------------------------------------------------------------------- properties
    @property
    def D_mul(self) -> int:
        """The depth multiplier D_mul (1 for 1x1 kernels)."""
        return self._D_mul

    @property
    def kernel_size(self) -> tuple[int, int]:
        """The kernel's (height, width)."""
        return self._kernel_size

    @property
    def in_channels(self) -> int:
        """The number of input channels, 0 while it is still to be inferred."""
        # W's shape is the one record: a hybridized parent's shape inference sets it directly.
        return self.W.shape[1] * self._groups

    # ------------------------------------------------------------------------------------- forward
    def _channel_axis(self, ndim: int) -> int:
        return 1 if self._data_format == core.CHANNELS_FIRST else ndim - 1

    def _set_in_channels(self, shape) -> None:
        """Fix in_channels from an input shape: the deferred half of the constructor's checks."""
        C_in = int(shape[self._channel_axis(len(shape))])
        try:
            core.check_groups(C_in, self._channels, self._groups)
        except ValueError as err:
            raise ValueError(f"{err}. Input shape {tuple(shape)} with layout {self._layout}") from None
        self.W.shape = (self._channels, C_in // self._groups, self._D_mul)
        if self.D is not None:
            self.D.shape = (C_in, self._K, self._D_mul)

    def _check_input(self, x) -> None:
        if x.ndim != _RANK + 2:
            raise ValueError(
                f"{type(self).__name__} expects a 4-D input in layout {self._layout}. Received: input shape {x.shape}"
            )
        expected = self.in_channels
        if not expected:
            self._set_in_channels(x.shape)
            return
        C = x.shape[self._channel_axis(x.ndim)]
        if C != expected:
            raise ValueError(
                f"{type(self).__name__} {self.name} expects {expected} input channels, but the input has "
                f"{C}. Received: input shape {x.shape} with layout {self._layout}"
            )

    def forward(self, x, *args):
        """Run the layer; an NDArray input is checked against the layer's channels first.

        Args:
            x: input NDArray or Symbol, layout as given to the constructor.

        Returns:
            The output, same layout.
        """
        if isinstance(x, nd.NDArray):
            self._check_input(x)
        return super().forward(x, *args)

    def infer_shape(self, x, *args):
        """Set the parameters' shapes from an input (deferred initialisation).

        Args:
            x: the first input (anything with a ``shape``).
        """
        self._set_in_channels(x.shape)

    def _fold_with_kernel(self) -> bool:
        """True when the fold runs in doconv's compiled kernel: enabled, a fold of at least the
        ``min_macs`` of :func:`use_fold_kernel`, and every context a CPU."""
        if not _USE_KERNEL:
            return False
        macs = math.prod(self.W.shape) * self._K  # 0 while C_in is deferred: size unknown, the kernel
        if 0 < macs < _MIN_MACS:
            return False
        try:
            contexts = self.W.list_ctx()
        except RuntimeError:  # not initialized yet: MXNet's own ops, which run anywhere
            return False
        return all(ctx.device_type == "cpu" for ctx in contexts)

    def _kernel(self, F, W, D):
        """The folded kernel (C_out, C_in/g, M, N) from MXNet ops: W·(D + I), without storing I."""
        M, N = self._kernel_size
        K, D_mul, g = self._K, self._D_mul, self._groups
        if D is None:
            return F.reshape(W, shape=(0, 0, M, N))
        if self._fold_with_kernel():
            folded = F.Custom(W, D, op_type="doconv_fold", groups=g, K=K, D_mul=D_mul)  # (C_out, C_in/g, K)
            return F.reshape(folded, shape=(0, 0, M, N))
        # W·I: the identity picks tap k = s mod K from each of the floor(D_mul/K) tiles.
        tiles = D_mul // K
        if D_mul == K:
            w_id = W
        elif tiles == 1:
            w_id = F.slice_axis(W, axis=2, begin=0, end=K)
        else:
            w_id = F.slice_axis(W, axis=2, begin=0, end=K * tiles)
            w_id = F.sum(F.reshape(w_id, shape=(0, 0, -4, tiles, K)), axis=2)
        # W·D as one batched matmul: rows o' of group gi's W[o, c] meet D of channel
        # i(o, c) = gi·(C_in/g) + c (DESIGN.md, section 1); (gi, c) are the batch axes.
        # gemm2's axis=-3 reads the matrices across axes 1 and 3, so W needs no transpose.
        Wg = F.reshape(W, shape=(-4, g, -1, -2))  # (g, C_out/g, C_in/g, D_mul)
        Dg = F.transpose(F.reshape(D, shape=(-4, g, -1, -2)), axes=(0, 2, 1, 3))  # (g, K, C_in/g, D_mul)
        w_d = F.linalg.gemm2(Wg, Dg, transpose_b=True, axis=-3)  # (g, C_out/g, C_in/g, K)
        w_d = F.reshape(w_d, shape=(-3, -2))  # (C_out, C_in/g, K)
        return F.reshape(w_d + w_id, shape=(0, 0, M, N))

    def _composes_features(self, F, x) -> bool:
        """True where this imperative training batch is cheaper by feature composition, or where
        ``plan_compositions`` chose it for this layer's graph (see the note above
        ``use_feature_composition``)."""
        if not _FEATURES or self.D is None or (self.W.grad_req == "null" and self.D.grad_req == "null"):
            return False  # nothing to train: the fold's backward is not run either
        try:
            contexts = self.W.list_ctx()
        except RuntimeError:  # not initialized: the fold's MXNet ops, which also infer W's and D's shapes
            return False
        if np.dtype(self.W.dtype) not in _ITEM or not all(ctx.device_type == "cpu" for ctx in contexts):
            return False
        if F is symbol:
            return self._planned == "feature" and self.in_channels > 0
        if not autograd.is_recording() or np.dtype(x.dtype) != np.dtype(self.W.dtype):
            return False
        return self._planned_order(x.shape) == "feature"

    def _planned_order(self, shape) -> str:
        """``core.training_composition``'s order for an input of this shape, in the layer's layout."""
        if self.D is None or len(shape) != _RANK + 2 or not all(shape) or np.dtype(self.W.dtype) not in _ITEM:
            return "kernel"  # no D, or a shape that shape inference left unknown
        axes = (1, 2) if self._data_format == core.CHANNELS_LAST else (2, 3)
        spatial = tuple(shape[a] for a in axes)
        try:
            out = core.output_shape(spatial, self._kernel_size, self._strides, self._dilation, self._padding)
        except ValueError:
            return False  # smaller than the kernel: the native convolution says so
        positions = shape[0] * out[0] * out[1]
        C_in = int(shape[self._channel_axis(len(shape))])
        return core.training_composition(positions, C_in, self._channels, self._groups, self._K, self._D_mul)

    def _compose_features(self, F, x, W, D, bias):
        """The convolution by feature composition: D_hat as a depthwise convolution, then W as 1x1."""
        C_in, K, D_mul = self.in_channels, self._K, self._D_mul
        dtype = np.dtype(self.W.dtype).name
        # I (K, D_mul): the K x K identity in each of the floor(D_mul/K) tiles, zero columns after.
        on = {"ctx": D.context} if F is nd else {}  # a graph's constants go where the graph runs
        identity = F.add_n(*[F.eye(K, D_mul, k=t * K, dtype=dtype, **on) for t in range(D_mul // K)])
        D_hat = F.broadcast_add(D, F.reshape(identity, shape=(1, K, D_mul)))
        # Filter c·D_mul + s of the depthwise step reads channel c: D_hat[c, :, s] as an M x N kernel.
        taps = F.reshape(F.transpose(D_hat, axes=(0, 2, 1)), shape=(-1, 1) + self._kernel_size)
        depthwise = dict(self._conv_kwargs, num_filter=C_in * D_mul, num_group=C_in, no_bias=True)
        features = F.Convolution(x, taps, name="fwd_features", **depthwise)  # (N, C_in·D_mul, H_out, W_out)
        # Group gi's rows of W meet the features of its own C_in/g channels (DESIGN.md, i(o, c)).
        pointwise = dict(self._conv_kwargs, kernel=(1, 1), stride=(1, 1), dilate=(1, 1), pad=(0, 0))
        kernel = F.reshape(W, shape=(0, -1, 1, 1))  # (C_out, C_in/g·D_mul, 1, 1)
        inputs = (features, kernel) if bias is None else (features, kernel, bias)
        return F.Convolution(*inputs, name="fwd", **pointwise)

    def _bind_shapes_to_input(self, F, x, W, D):
        """Let symbolic shape inference derive W's and D's in-channel sizes from x.

        Only needed when a hybridized parent infers this layer's deferred shapes: the fold's
        ops (batch_dot, sum) do not infer their inputs' shapes from their outputs. The added
        ops are identities on W and D whose shape is tied to a constant-size slice of x.
        """
        axis = 1 if self._data_format == core.CHANNELS_FIRST else 3
        begin, end = [0, 0, 0, 0], [1, 1, 1, 1]
        begin[axis], end[axis] = None, None
        channels = F.BlockGrad(F.reshape(F.slice(x, begin=tuple(begin), end=tuple(end)), shape=(-1,)))  # (C_in,)
        g = self._groups
        per_group = F.reshape(
            F.slice_axis(F.reshape(channels, shape=(-4, g, -1)), axis=0, begin=0, end=1), shape=(1, -1, 1)
        )
        W = F._internal._identity_with_attr_like_rhs(
            W, F.broadcast_to(per_group, shape=(self._channels, 0, self._D_mul))
        )
        if D is not None:
            like_D = F.broadcast_to(F.reshape(channels, shape=(-1, 1, 1)), shape=(0, self._K, self._D_mul))
            D = F._internal._identity_with_attr_like_rhs(D, like_D)
        return W, D

    def hybrid_forward(self, F, x, W, D=None, bias=None):
        """The forward pass for NDArray and Symbol inputs alike.

        Args:
            F: ``mxnet.ndarray`` or ``mxnet.symbol``.
            x: input, layout as given to the constructor.
            W, D, bias: the parameters (D None for 1x1 kernels, bias None without bias).

        Returns:
            ``Convolution(x, fold(W, D), bias)``, then the activation if any.
        """
        if F is symbol and 0 in self.W.shape:
            W, D = self._bind_shapes_to_input(F, x, W, D)
        channels_last = self._data_format == core.CHANNELS_LAST
        if self._composes_features(F, x):
            y = self._compose_features(F, F.transpose(x, axes=(0, 3, 1, 2)) if channels_last else x, W, D, bias)
            return self._finish(F, y, channels_last)
        if np.dtype(self.W.dtype) == np.float16:
            # Fold in float32 (MXNet's CPU products have no float16, and it is more accurate), convolve in float16.
            kernel = F.cast(
                self._kernel(F, F.cast(W, "float32"), None if D is None else F.cast(D, "float32")), "float16"
            )
        else:
            kernel = self._kernel(F, W, D)
        if channels_last:
            x = F.transpose(x, axes=(0, 3, 1, 2))
        inputs = (x, kernel) if bias is None else (x, kernel, bias)
        return self._finish(F, F.Convolution(*inputs, name="fwd", **self._conv_kwargs), channels_last)

    def _finish(self, F, y, channels_last: bool):
        """The NCHW convolution's output in the layer's layout, then the activation if any."""
        if channels_last:
            y = F.transpose(y, axes=(0, 2, 3, 1))
        if self.act is not None:
            y = self.act(y)
        return y

    def __repr__(self) -> str:
        mapping = f"{self.in_channels or None} -> {self._channels}"
        s = f"{type(self).__name__}({mapping}, kernel_size={self._kernel_size}, stride={self._strides}"
        if self._padding != (0, 0):
            s += f", padding={self._padding}"
        if self._dilation != (1, 1):
            s += f", dilation={self._dilation}"
        if self._groups != 1:
            s += f", groups={self._groups}"
        if self._layout != "NCHW":
            s += f", layout={self._layout}"
        if not self._use_bias:
            s += ", bias=False"
        if self._activation is not None:
            s += f", activation={self._activation}"
        return s + f", D_mul={self._D_mul})"

    # ------------------------------------------------------------------------------ fold / convert
    def _conv_arguments(self) -> dict:
        return {
            "channels": self._channels,
            "kernel_size": self._kernel_size,
            "strides": self._strides,
            "padding": self._padding,
            "dilation": self._dilation,
            "groups": self._groups,
            "layout": self._layout,
            "activation": self._activation,
            "use_bias": self._use_bias,
        }

    def fuse(self) -> nn.Conv2D:
        """A ``gluon.nn.Conv2D`` with the folded kernel: the same output, none of DO-Conv left.

        The kernel is OIHW for layout NCHW and OHWI for NHWC (MXNet 1.x runs NHWC
        convolutions on GPU only). The new layer keeps this layer's prefix, so its
        parameters are named like the convolution this layer replaced, and what the user
        set up: contexts, dtypes, ``lr_mult``/``wd_mult``, ``grad_req`` (the kernel's is W's,
        or D's where W's is ``'null'``: the kernel is frozen only if W and D both are), the
        hybridize flags and the forward (pre-)hooks (the same hook tables, so a handle
        from ``register_forward_hook`` detaches the hook from both layers).

        Returns:
            An initialized ``gluon.nn.Conv2D`` on the same contexts, in the same dtype.

        Raises:
            RuntimeError: the layer's parameters are not initialized yet.

        Example:
            >>> from mxnet import nd
            >>> layer = DOConv2D(4, 3, in_channels=2)
            >>> layer.initialize()
            >>> conv = layer.fuse()
            >>> x = nd.random.uniform(shape=(1, 2, 6, 6))
            >>> bool(abs(conv(x) - layer(x)).max() < 1e-5)
            True
        """
        return self._fused()

    def _fused(self, tied_to: Optional[nn.Conv2D] = None) -> nn.Conv2D:
        """:meth:`fuse`; with ``tied_to`` (the fused layer of a DOConv2D sharing this layer's W, D
        and bias), a Conv2D sharing the parameters of ``tied_to``, which already hold the kernel."""
        _require_data(self.W, "fuse()")
        params = get_params(self)
        conv = nn.Conv2D(
            in_channels=self.in_channels,
            prefix=self.prefix,
            params=None if tied_to is None else tied_to.params,
            **self._conv_arguments(),
        )
        if tied_to is None:
            kernel = core.fold(params["W"].astype(np.float64), _as64(params["D"]), self._groups, self._kernel_size)
            kernel = core.kernel_to_gluon(kernel, self._data_format)
            trainable = self.W if self.W.grad_req != "null" or self.D is None else self.D
            _copy_param_settings(self.W, conv.weight, grad_req=trainable.grad_req)
            if self._use_bias:
                _copy_param_settings(self.bias, conv.bias)
            conv.initialize(ctx=self.W.list_ctx())
            conv.weight.set_data(nd.array(kernel, dtype=conv.weight.dtype))
            if self._use_bias:
                conv.bias.set_data(nd.array(params["bias"], dtype=conv.bias.dtype))
        _carry_block_state(self, conv)
        return conv

    @classmethod
    def from_conv(cls, conv: nn.Conv2D, D_mul: Optional[int] = None) -> DOConv2D:
        """A DO-Conv layer with exactly the output of ``conv``, to fine-tune a trained network.

        D = 0, the kernel in W's first identity tile, zeros in the other tiles; W's columns
        past the last tile keep their random init (they meet a zero identity, so they do
        not change the output, see :func:`doconv.core.embed_kernel`). The new layer keeps
        what the user set up on ``conv``: its prefix, contexts, dtypes, initializers,
        ``grad_req``/``lr_mult``/``wd_mult`` (W and D take the kernel's, the bias the bias's),
        hybridize flags and forward (pre-)hooks (the same hook tables, so a handle from
        ``register_forward_hook`` detaches the hook from both layers). If ``conv`` is not
        initialized, neither is the new layer; if it waits for its first input (deferred
        initialisation), so does the new layer, with the same initializer.

        Args:
            conv: a ``gluon.nn.Conv2D``.
            D_mul: depth multiplier; None (default) means K. Must be >= K.

        Returns:
            A new :class:`DOConv2D`; ``conv`` is left as it was.

        Raises:
            TypeError: ``conv`` is not a ``gluon.nn.Conv2D``.
            ValueError: ``D_mul < K``.

        Example:
            >>> from mxnet import nd, gluon
            >>> conv = gluon.nn.Conv2D(4, 3, in_channels=2)
            >>> conv.initialize()
            >>> layer = DOConv2D.from_conv(conv, D_mul=10)
            >>> x = nd.random.uniform(shape=(1, 2, 6, 6))
            >>> bool(abs(conv(x) - layer(x)).max() < 1e-5)
            True
        """
        return cls._from_conv(conv, D_mul)

    @classmethod
    def _from_conv(cls, conv: nn.Conv2D, D_mul: Optional[int], tied_to: Optional[DOConv2D] = None) -> DOConv2D:
        """:meth:`from_conv`; with ``tied_to`` (the layer made from a Conv2D sharing ``conv``'s
        weight and bias), a layer sharing the W, D and bias of ``tied_to``, which hold the values."""
        if not isinstance(conv, nn.Conv2D):
            raise TypeError(f"from_conv needs a gluon.nn.Conv2D. Received: {type(conv).__name__}")
        kw = conv._kwargs
        layout = kw["layout"]
        data_format = core.gluon_layout(layout, _RANK)
        groups = kw["num_group"]
        kernel_shape = conv.weight.shape
        C_in_g = kernel_shape[1] if data_format == core.CHANNELS_FIRST else kernel_shape[-1]
        layer = cls(
            conv._channels,
            kw["kernel"],
            strides=kw["stride"],
            padding=kw["pad"],
            dilation=kw["dilate"],
            groups=groups,
            layout=layout,
            activation=conv.act._act_type if conv.act is not None else None,
            use_bias=not kw["no_bias"],
            weight_initializer=conv.weight.init,
            bias_initializer=conv.bias.init if conv.bias is not None else "zeros",
            in_channels=C_in_g * groups,
            D_mul=D_mul,
            prefix=conv.prefix,
            params=None if tied_to is None else tied_to.params,
        )
        _carry_block_state(conv, layer)
        if tied_to is not None:
            return layer
        for source, target in ((conv.weight, layer.W), (conv.weight, layer.D), (conv.bias, layer.bias)):
            if target is not None:
                _copy_param_settings(source, target)
        weight = conv.weight
        if weight._data is None:
            if weight._deferred_init:
                init, ctx, default_init, data = weight._deferred_init
                if data is not None:
                    raise ValueError(f"{conv.name} holds a value set before its first call; run one forward pass first")
                # Waiting for its first input: wait the same way, with the same initializer.
                layer.initialize(init=default_init, ctx=ctx)
            return layer
        layer.initialize(ctx=weight.list_ctx())
        kernel = core.kernel_from_gluon(weight._data[0].asnumpy(), data_format)
        params = get_params(layer)
        params["W"] = core.embed_kernel(kernel, params["W"])
        if conv.bias is not None:
            params["bias"] = conv.bias.data(weight.list_ctx()[0]).asnumpy()
        set_params(layer, params)
        return layer


def _as64(array):
    return None if array is None else array.astype(np.float64)


def _copy_param_settings(source, target, grad_req: Optional[str] = None) -> None:
    """What a user sets on a parameter, onto the one replacing it (before it holds a value)."""
    target.grad_req = source.grad_req if grad_req is None else grad_req
    target.lr_mult = source.lr_mult
    target.wd_mult = source.wd_mult
    target.cast(np.dtype(source.dtype).type)  # 'float64' or np.float64 alike: a NumPy type, as data has


def _carry_block_state(source, target) -> None:
    """What a user sets on a block, onto the block replacing it: hybridize flags, hooks, op hook."""
    target._active, target._flags = source._active, list(source._flags)
    # The same tables, not copies: a HookHandle detaches by looking its hook up in its table.
    target._forward_pre_hooks = source._forward_pre_hooks
    target._forward_hooks = source._forward_hooks
    target._callback, target._monitor_all = source._callback, source._monitor_all


# ------------------------------------------------------------------------------------ parameters
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


# ------------------------------------------------------------------------------- whole networks
#
# convert_model and fuse_model find their targets (blocks of exactly one class) and every other
# conv-like block in one walk of the tree, each block once however often it is registered; build
# every replacement first (so a failure changes nothing); then put them in place wherever the tree
# refers to the old block, and name what they left in one warning.

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
