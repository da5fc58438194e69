"""The DOConv2D fold on CPU as one custom MXNet operator, ``doconv_fold``, and the switch that picks it.

MXNet's batched products (linalg.gemm2, batch_dot) are slow for the fold's tiny per-channel
matrices: a resnet18_v1b training step at batch 16 is 1.13x the native one with them and ~1.00x
with doconv._foldkernel, which doconv.torch uses too (`bench_gluon.py` with and without
`--mxnet-ops`). The kernel runs here inside a custom operator ("doconv_fold"), which MXNet calls
with the inputs ready and the outputs allocated, and which reads and writes their memory in place.
A network exported unfused then names that operator: loading it needs `import doconv.gluon` first
(as for any custom operator); `fuse_model` before `export` gives a plain network, and
`use_fold_kernel(False)` folds with MXNet ops instead (:func:`fold_with_ops`).
"""

from __future__ import annotations

import ctypes
import math
import os

import numpy as np

from .. import _fold_cpu, core
from .._optional import require

mx = require("mxnet", "doconv.gluon", "gluon", "MXNet")

from mxnet import nd  # noqa: E402

_USE_KERNEL = _fold_cpu.kernel is not None
# Layers below this many multiply-adds in their fold (C_out * C_in/g * K * D_mul) fold with MXNet's
# ops even where the kernel is in use: a custom operator costs a fixed time per call (MXNet hands it
# to the operator's own thread and back, then its Python runs), about 0.3 ms per pass on one core,
# more than MXNet's batched product takes for a small layer: depthwise layers, and dense ones up to
# 64 -> 64 channels at 3x3. `python -m doconv.benchmarks.bench_gluon --fold-sizes` measures both
# ways per layer size.
KERNEL_MIN_MACS = 1 << 19
_MIN_MACS = KERNEL_MIN_MACS
# The dtypes the kernel computes in, and the C types that read NDArray memory as them.
C_TYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


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
    flat = np.ctypeslib.as_array((C_TYPES[np.dtype(array.dtype)] * array.size).from_address(pointer.value))
    return flat.reshape(array.shape)


class _FoldOp(mx.operator.CustomOp):
    """folded = W·(D + I) and its gradients with doconv._foldkernel (see the module docstring)."""

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


def _attributes(attributes: dict) -> tuple:
    """(groups, K, D_mul) from the operator's attributes (strings, as MXNet passes them), checked."""
    unknown = sorted(set(attributes) - {"groups", "K", "D_mul"})
    if unknown:
        raise ValueError(f"doconv_fold takes the attributes groups, K and D_mul. Received: {', '.join(unknown)}")
    values = []
    for name in ("groups", "K", "D_mul"):
        text = attributes.get(name, "1")
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = 0
        if value < 1 or str(value) != str(text).strip():
            raise ValueError(f"doconv_fold: {name} must be a positive integer. Received: {name}={text!r}")
        values.append(value)
    groups, K, D_mul = values
    if D_mul < K:
        raise ValueError(f"doconv_fold: D_mul must be >= K. Received: K={K}, D_mul={D_mul}")
    return groups, K, D_mul


@mx.operator.register("doconv_fold")
class _FoldProp(mx.operator.CustomOpProp):
    """Shapes and types of "doconv_fold": (W, D) -> folded (C_out, C_in/g, K), all one dtype."""

    def __init__(self, **attributes) -> None:
        super().__init__(need_top_grad=True)
        # MXNet constructs this class from C and does not catch what it raises: an exception here
        # ends the process. A bad attribute (a hand-edited exported graph, a direct nd.Custom call)
        # is kept and raised from infer_shape and infer_type, which MXNet turns into an MXNetError.
        self._groups = self._K = self._D_mul = 1
        self._error = None
        try:
            self._groups, self._K, self._D_mul = _attributes(attributes)
        except (TypeError, ValueError) as error:
            self._error = error

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def list_arguments(self):
        return ["W", "D"]

    def list_outputs(self):
        return ["folded"]

    def infer_shape(self, in_shape):
        self._check()
        W, D = in_shape
        return [W, D], [(W[0], W[1], self._K)], []

    def infer_type(self, in_type):
        self._check()
        if np.dtype(in_type[0]) not in C_TYPES:
            raise ValueError(f"doconv_fold: dtype must be float32 or float64, got {np.dtype(in_type[0])}")
        return [in_type[0], in_type[0]], [in_type[0]], []

    def create_operator(self, ctx, in_shapes, in_dtypes):
        self._check()
        return _FoldOp(self._groups, core.identity(self._K, self._D_mul))


def takes_kernel(W, K: int) -> bool:
    """True when a layer with parameter W and K taps folds in doconv's compiled kernel: enabled, a
    fold of at least the ``min_macs`` of :func:`use_fold_kernel`, and every context a CPU."""
    if not _USE_KERNEL:
        return False
    macs = math.prod(W.shape) * K  # 0 while C_in is deferred: size unknown, the kernel
    if 0 < macs < _MIN_MACS:
        return False
    try:
        contexts = W.list_ctx()
    except RuntimeError:  # not initialized yet: MXNet's own ops, which run anywhere
        return False
    return all(ctx.device_type == "cpu" for ctx in contexts)


def fold_with_kernel(F, W, D, groups: int, K: int, D_mul: int):
    """W·(D + I) ``(C_out, C_in/g, K)`` by the custom operator (``F`` is ``mxnet.ndarray`` or ``symbol``)."""
    return F.Custom(W, D, op_type="doconv_fold", groups=groups, K=K, D_mul=D_mul)


def fold_with_ops(F, W, D, groups: int, K: int, D_mul: int):
    """W·(D + I) ``(C_out, C_in/g, K)`` from MXNet operators, without storing I: runs on every context."""
    g = groups
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
    return w_d + w_id
