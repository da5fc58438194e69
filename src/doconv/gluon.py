"""DO-Conv for MXNet Gluon (1.x): ``DOConv2D``, folding and whole-network conversion.

The adapter only creates parameters and runs MXNet ops; argument handling, the
maths of folding and every layout conversion live in :mod:`doconv.core`.

``DOConv2D`` stores ``W`` (C_out, C_in/g, D_mul), ``D`` (C_in, K, D_mul) and
``bias`` in the canonical layout (DESIGN.md, section 2). Its forward pass folds
W and D into one ordinary kernel and runs ``Convolution``. On CPU the fold is
doconv's compiled kernel in the custom operator ``doconv_fold`` (an exported
unfused network loads after ``import doconv.gluon``); elsewhere, or after
``use_fold_kernel(False)``, it is made of MXNet operators.

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
import os
import warnings
from typing import Any, Callable, Optional, Union

import numpy as np

from . import _fold_cpu, core
from ._optional import require

mx = require("mxnet", "doconv.gluon", "gluon", "MXNet")

from mxnet import gluon, nd, symbol  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

__all__ = [
    "DOConv2D",
    "convert_model",
    "fold_kernel_in_use",
    "fuse_model",
    "get_params",
    "set_params",
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
_ITEM = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


def use_fold_kernel(enabled: bool = True) -> bool:
    """Choose how DOConv2D layers fold on CPU from their next trace or call on.

    Args:
        enabled: True (the default where the extension was built): doconv's compiled kernel, in the
            custom operator "doconv_fold". False: MXNet's own ops, slower in training, and an
            exported unfused network holds only MXNet operators.

    Returns:
        Whether the compiled kernel is now in use (False where it was not built).

    Layers that were already hybridized keep the graph they traced: call ``hybridize()`` again.
    """
    global _USE_KERNEL
    _USE_KERNEL = bool(enabled) and _fold_cpu.kernel is not None
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
        """True when the fold runs in doconv's compiled kernel: enabled, and every context a CPU."""
        if not _USE_KERNEL:
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
        if np.dtype(self.W.dtype) == np.float16:
            # Fold in float32 (MXNet's CPU products have no float16, and it is more accurate), convolve in float16.
            kernel = F.cast(
                self._kernel(F, F.cast(W, "float32"), None if D is None else F.cast(D, "float32")), "float16"
            )
        else:
            kernel = self._kernel(F, W, D)
        channels_last = self._data_format == core.CHANNELS_LAST
        if channels_last:
            x = F.transpose(x, axes=(0, 3, 1, 2))
        inputs = (x, kernel) if bias is None else (x, kernel, bias)
        y = F.Convolution(*inputs, name="fwd", **self._conv_kwargs)
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
        parameters are named like the convolution this layer replaced.

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
        W = _require_data(self.W, "fuse()")
        params = get_params(self)
        kernel = core.fold(params["W"].astype(np.float64), _as64(params["D"]), self._groups, self._kernel_size)
        kernel = core.kernel_to_gluon(kernel, self._data_format)
        conv = nn.Conv2D(in_channels=self.in_channels, prefix=self.prefix, **self._conv_arguments())
        conv.initialize(ctx=self.W.list_ctx())
        conv.cast(W.dtype)
        conv.weight.set_data(nd.array(kernel, dtype=W.dtype))
        if self._use_bias:
            conv.bias.set_data(nd.array(params["bias"], dtype=W.dtype))
        _copy_param_settings(self.W, conv.weight)
        if self._use_bias:
            _copy_param_settings(self.bias, conv.bias)
        conv._active, conv._flags = self._active, list(self._flags)
        return conv

    @classmethod
    def from_conv(cls, conv: nn.Conv2D, D_mul: Optional[int] = None) -> DOConv2D:
        """A DO-Conv layer with exactly the output of ``conv``, to fine-tune a trained network.

        D = 0, the kernel in W's first identity tile, zeros in the other tiles; W's columns
        past the last tile keep their random init (they meet a zero identity, so they do
        not change the output, see :func:`doconv.core.embed_kernel`). The new layer keeps
        ``conv``'s prefix, contexts, dtype, initializers and ``grad_req``/``lr_mult``/``wd_mult``.
        If ``conv`` is not initialized, neither is the new layer; if it waits for its first
        input (deferred initialisation), so does the new layer, with the same initializer.

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
        )
        pairs = [(conv.weight, layer.W), (conv.weight, layer.D), (conv.bias, layer.bias)]
        for source, target in pairs:
            if target is not None:
                _copy_param_settings(source, target)
        layer._active, layer._flags = conv._active, list(conv._flags)
        weight = conv.weight
        if weight._data is None:
            if weight._deferred_init:
                init, ctx, default_init, data = weight._deferred_init
                if data is not None:
                    raise ValueError(f"{conv.name} holds a value set before its first call; run one forward pass first")
                # Waiting for its first input: wait the same way, with the same initializer.
                layer.initialize(init=default_init, ctx=ctx)
            layer.cast(weight.dtype)
            return layer
        layer.initialize(ctx=weight.list_ctx())
        layer.cast(weight.dtype)
        kernel = core.kernel_from_gluon(weight._data[0].asnumpy(), data_format)
        params = get_params(layer)
        params["W"] = core.embed_kernel(kernel, params["W"]).astype(params["W"].dtype)
        if conv.bias is not None:
            params["bias"] = conv.bias.data(weight.list_ctx()[0]).asnumpy()
        set_params(layer, params)
        return layer


def _as64(array):
    return None if array is None else array.astype(np.float64)


def _copy_param_settings(source, target) -> None:
    target.grad_req = source.grad_req
    target.lr_mult = source.lr_mult
    target.wd_mult = source.wd_mult


# ------------------------------------------------------------------------------------ parameters
def _expected_shapes(block: DOConv2D) -> dict:
    C_in = block.in_channels
    C_in_g = C_in // block._groups
    return {
        "W": (block._channels, C_in_g, block.D_mul),
        "D": (C_in, block._K, block.D_mul) if block.D is not None else None,
        "bias": (block._channels,) if block.bias is not None else None,
    }


def _check_block(block) -> None:
    if not isinstance(block, DOConv2D):
        raise TypeError(f"Expected a doconv.gluon.DOConv2D. Received: {type(block).__name__}")


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
    for key, param in (("W", block.W), ("D", block.D), ("bias", block.bias)):
        out[key] = None if param is None else _require_data(param, "get_params()").asnumpy()
    return out


def set_params(block: DOConv2D, params: dict) -> DOConv2D:
    """Load canonical NumPy parameters into a layer: the inverse of :func:`get_params`.

    A layer still waiting for its input channels takes them from ``params["W"]``; a layer
    not initialized at all is initialized on the current context. Values are cast to the
    layer's dtype.

    Args:
        block: a :class:`DOConv2D`.
        params: ``{"W": ..., "D": ... or None, "bias": ... or None}`` (a missing key means None).

    Returns:
        ``block``, for chaining.

    Raises:
        TypeError: ``block`` is not a DOConv2D.
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
    unknown = set(params) - {"W", "D", "bias"}
    if unknown:
        raise ValueError(f"params has unknown entries {sorted(unknown)}; expected 'W', 'D' and 'bias'")
    values = {key: params.get(key) for key in ("W", "D", "bias")}
    if not block.in_channels:
        W = values["W"]
        if W is None or np.ndim(W) != 3:
            raise ValueError(
                "params['W'] must have shape (C_out, C_in/groups, D_mul). "
                f"Received: W.shape={None if W is None else np.shape(W)}"
            )
        block._set_in_channels(
            (1, np.shape(W)[1] * block._groups, 1, 1)
            if block._data_format == core.CHANNELS_FIRST
            else (1, 1, 1, np.shape(W)[1] * block._groups)
        )
    expected = _expected_shapes(block)
    for key, shape in expected.items():
        value = values[key]
        got = None if value is None else np.shape(value)
        if got != shape:
            raise ValueError(
                f"params[{key!r}] does not fit {block.name}: expected shape {shape}, received {got}"
                + (" (None means the layer has no such parameter)" if shape is None or got is None else "")
            )
    for key, param in (("W", block.W), ("D", block.D), ("bias", block.bias)):
        if param is None:
            continue
        if param._data is None and not param._deferred_init:
            param.initialize()
        param.set_data(nd.array(values[key], dtype=param.dtype))
        param._finish_deferred_init()
    return block


# ------------------------------------------------------------------------------- whole networks
def _walk(block, path: str = ""):
    """Yield (path, block) for block and all its descendants, depth first."""
    yield path, block
    for key, child in block._children.items():
        yield from _walk(child, f"{path}.{key}" if path else str(key))


def _targets(block, is_target, path: str = ""):
    """Yield (parent, key, child, path) for the blocks ``is_target`` accepts, in depth-first order."""
    for key, child in block._children.items():
        child_path = f"{path}.{key}" if path else str(key)
        if is_target(child):
            yield block, key, child, child_path
        else:
            yield from _targets(child, is_target, child_path)


def _copy_block(net):
    """A deep copy of a Block tree, also of a hybridized one that has run.

    ``copy.deepcopy`` fails on the cached ops (ctypes handles) and would copy an attached
    Trainer; both are left out, the copy's caches are rebuilt at its first call, and its
    parameters get fresh gradient buffers (autograd marks do not survive a copy).
    """
    memo = {}
    for _, block in _walk(net):
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


def _replace(net, is_target, make, what: str, inplace: bool):
    """Replace every block that ``is_target`` accepts by ``make(path, block)`` (None: leave it).

    All replacements are built before the first one is put in place, so a failure leaves
    the network as it was, also with ``inplace=True``.
    """
    target = net if inplace else _copy_block(net)
    if is_target(target):
        new = make("", target)
        return target if new is None else new
    plan = []
    for parent, key, child, path in _targets(target, is_target):
        new = make(path, child)
        if new is not None:
            plan.append((parent, key, child, new))
    if not plan:
        warnings.warn(f"{what} found nothing to replace in {type(net).__name__}", UserWarning, stacklevel=3)
        return target
    for parent, key, old, new in plan:
        parent._children[key] = new
        if parent.__dict__.get(key) is old:
            object.__setattr__(parent, key, new)  # Block.__setattr__ refuses a change of type
    for _, block in _walk(target):
        if isinstance(block, gluon.HybridBlock):
            block._clear_cached_op()
    return target


def convert_model(
    net,
    D_mul: Union[None, int, Callable[[str, Any], Optional[int]]] = None,
    inplace: bool = False,
):
    """Replace every ``gluon.nn.Conv2D`` of a network by a :class:`DOConv2D` with the same output.

    Works on any Block tree (children set as attributes, ``HybridSequential``, ...), e.g.
    a GluonCV model-zoo network; each layer is made by :meth:`DOConv2D.from_conv`.

    Args:
        net: the network (a ``Conv2D`` itself is converted too).
        D_mul: None (default): each layer's K. An int: ``max(D_mul, K)`` per layer, with one
            warning naming the layers whose K was larger. A callable ``(name, conv) -> int | None``
            deciding per layer (``name`` is the dotted path of child names, e.g.
            ``"features.4.0.body.0"``); None leaves that conv as it is.
        inplace: change ``net`` itself instead of a copy. Default False.

    Returns:
        The converted network: a copy unless ``inplace``. ``net`` is untouched unless
        ``inplace``, also when the call fails. Warns when there was nothing to convert.

    Example:
        >>> from mxnet import gluon
        >>> net = gluon.nn.HybridSequential()
        >>> net.add(gluon.nn.Conv2D(4, 3, in_channels=2), gluon.nn.Conv2D(4, 1, in_channels=4))
        >>> net.initialize()
        >>> [type(b).__name__ for b in convert_model(net)._children.values()]
        ['DOConv2D', 'DOConv2D']
    """
    larger = []

    def make(name, conv):
        K = core.kernel_volume(conv._kwargs["kernel"])
        if D_mul is None:
            value = None
        elif callable(D_mul):
            value = D_mul(name, conv)
            if value is None:
                return None
        else:
            value = core.check_int(D_mul, "D_mul")
            if K > value:
                larger.append(f"{name or type(conv).__name__} (K={K})")
                value = K
        return DOConv2D.from_conv(conv, D_mul=value)

    out = _replace(net, lambda b: isinstance(b, nn.Conv2D), make, "convert_model", inplace)
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
    DO-Conv network's outputs.

    Args:
        net: the network (a DOConv2D itself is fused too).
        inplace: change ``net`` itself instead of a copy. Default False.

    Returns:
        The fused network: a copy unless ``inplace``; ``net`` is untouched unless
        ``inplace``, also when the call fails. Warns when there was nothing to fuse.

    Example:
        >>> from mxnet import gluon
        >>> net = gluon.nn.HybridSequential()
        >>> net.add(DOConv2D(4, 3, in_channels=2))
        >>> net.initialize()
        >>> type(fuse_model(net)[0]).__name__
        'Conv2D'
    """
    return _replace(net, lambda b: isinstance(b, DOConv2D), lambda name, layer: layer.fuse(), "fuse_model", inplace)
