"""The kernel composition in torch ops, and its CPU fast path with a custom autograd Function.

:func:`fold` is the plain, differentiable reference (``doconv.core.fold``'s maths); ``_fold_fast`` takes
the compiled kernel (or NumPy) for float32/float64 CPU tensors in eager mode.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .. import _fold_cpu

Tensor = torch.Tensor


def fold(W: Tensor, D: Optional[Tensor], identity: Optional[Tensor], groups: int, kernel_shape: list[int]) -> Tensor:
    """Differentiable kernel composition in torch ops (the maths of :func:`doconv.core.fold`).

    Args:
        W: ``(C_out, C_in/g, D_mul)``.
        D: the offset ``(C_in, K, D_mul)``, or None when K = 1.
        identity: ``(K, D_mul)`` from :func:`doconv.core.identity`, or None when K = 1.
        groups: number of groups.
        kernel_shape: the folded kernel's full shape ``[C_out, C_in/g, *kernel_size]``.

    Returns:
        The folded kernel of shape ``kernel_shape``.

    Example:
        >>> W = torch.ones(1, 1, 4)
        >>> fold(W, torch.zeros(1, 4, 4), torch.eye(4), 1, [1, 1, 2, 2]).tolist()
        [[[[1.0, 1.0], [1.0, 1.0]]]]
    """
    if D is None or identity is None:
        return W.reshape(kernel_shape)
    C_out, C_in_g, D_mul = W.shape
    D_hat = D + identity
    if groups == 1:
        folded = torch.einsum("ocs,cks->ock", W, D_hat)
    else:
        # Group gi pairs its rows of W only with its own C_in/g channels of D (DESIGN.md, i(o, c)).
        Wg = W.reshape(groups, C_out // groups, C_in_g, D_mul)
        Dg = D_hat.reshape(groups, C_in_g, D_hat.shape[1], D_mul)
        folded = torch.einsum("gocs,gcks->gock", Wg, Dg)
    return folded.reshape(kernel_shape)


# -- the CPU fast path ---------------------------------------------------------------------------
#
# The fold is a batch of tiny matrix products, one per input channel c: (C_out/g x D_mul) @ (D_mul x K).
# Each of those matrices is strided across the whole of W, so batched-matmul routines (torch's bmm,
# NumPy's matmul) pay transposed passes over memory, which is most of DO-Conv's overhead on CPU
# (PERF-NOTES). doconv._foldkernel, a small C extension that setup.py builds where a compiler is
# available, walks W, the kernel and their gradients in memory order instead, one pass each. Where it
# is missing, NumPy's matmul on strided views does the same products. Either way the work is split
# across torch's intra-op thread count: the C kernel on torch's own OpenMP threads where it can find
# them (`_torch_openmp`), else both on a Python thread pool (they release the GIL). Used for
# float32/float64 CPU tensors in eager mode; scripting, tracing, torch.compile, CUDA and half types
# take `fold` above.

_foldkernel = _fold_cpu.kernel  # None where the C extension was not built


def _torch_openmp() -> int:
    """``GOMP_parallel`` of the OpenMP runtime behind torch's intra-op threads, or 0 (see _fold_cpu)."""
    try:
        if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
            return 0
    except Exception:  # noqa: BLE001 - any surprise here only costs speed
        return 0
    return _fold_cpu.openmp_parallel_address(os.path.dirname(torch.__file__))


# True when the C kernel splits its work on torch's own OpenMP threads (else: on a Python pool).
_GOMP = _fold_cpu.use_openmp(_torch_openmp())


def _run_parts(work: Callable[[int, int], None], macs: int) -> None:
    """Call ``work(part, parts)`` for every part, in threads when the work is large enough."""
    _fold_cpu.run_parts(work, _fold_cpu.parts_for(torch.get_num_threads(), macs))


def _kernel(name: str, a: Tensor, b: Tensor, out: Tensor, sizes: tuple, n: int) -> None:
    """``_fold_cpu.run`` on contiguous tensors; ``sizes`` is (groups, C_in/g, K, D_mul, C_out/g)."""
    threads = torch.get_num_threads()
    _fold_cpu.run(name, a.data_ptr(), b.data_ptr(), out.data_ptr(), a.element_size(), sizes, n, threads, _GOMP)


_share = _fold_cpu.share


def _grouped(array: np.ndarray, groups: int) -> np.ndarray:
    """(C_out or C_in, ...) -> (g, C/g, ...): a view, no copy."""
    return array.reshape((groups, array.shape[0] // groups) + array.shape[1:])


class _Workspace:
    """A layer's fold buffers (the folded kernel, D + I and its transpose, both gradients), reused
    from step to step.

    A fresh buffer per step costs page faults on its pages and, for the smaller ones, the
    allocator's round trips (milliseconds per step over a network, PERF-NOTES). A buffer is
    overwritten only while nothing else refers to its memory (no graph that saved it, no ``.grad``
    or user reference to it); otherwise a new one is allocated, so reuse never changes what
    anybody holds. ``D_hat`` always holds D + I for ``key``, as ``folded`` holds their fold.
    """

    __slots__ = ("key", "folded", "D_hat", "D_hat_t", "grad_W", "grad_D")

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.folded: Optional[Tensor] = None
        self.D_hat: Optional[Tensor] = None
        self.D_hat_t: Optional[Tensor] = None
        self.grad_W: Optional[Tensor] = None
        self.grad_D: Optional[Tensor] = None

    def buffer(self, name: str, shape: tuple, dtype) -> Tensor:
        """The named buffer if it fits and nothing else refers to it, else a new one (kept)."""
        held = getattr(self, name)
        if _reusable(held, shape, dtype):
            return held
        fresh = torch.empty(shape, dtype=dtype)
        setattr(self, name, fresh)
        return fresh


def _buffer(workspace: Optional[_Workspace], name: str, shape: tuple, dtype) -> Tensor:
    """``workspace.buffer(...)``, or a new tensor without a workspace."""
    return torch.empty(shape, dtype=dtype) if workspace is None else workspace.buffer(name, shape, dtype)


def _version_key(W: Tensor, D: Tensor) -> tuple:
    """Changes whenever W or D is replaced or modified in place."""
    return (id(W), W.data_ptr(), W._version, id(D), D.data_ptr(), D._version)


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _lone_count() -> int:
    """What the count reads for memory that one tensor alone refers to (the query holds some too).

    The count comes from a private torch function; if it does not rise for a second reference
    here, reuse is switched off rather than trusted.
    """
    global _storage_use_count
    if _storage_use_count is None:
        return 0
    probe = torch.empty(1)
    lone = _storage_use_count(probe.untyped_storage()._cdata)
    view = probe.view(1)
    shared = _storage_use_count(probe.untyped_storage()._cdata)
    del view
    if not (isinstance(lone, int) and isinstance(shared, int) and shared > lone):
        _storage_use_count = None
        return 0
    return lone


_LONE = _lone_count()


def _reusable(buffer: Optional[Tensor], shape: tuple, dtype) -> bool:
    """True when ``buffer`` fits and nothing but the workspace refers to its memory."""
    if buffer is None or _storage_use_count is None or buffer.shape != shape or buffer.dtype != dtype:
        return False
    return _storage_use_count(buffer.untyped_storage()._cdata) <= _LONE


class _FoldCPU(torch.autograd.Function):
    """Kernel composition and its gradients on CPU (see the note above)."""

    @staticmethod
    def forward(ctx, W: Tensor, D: Tensor, identity: Tensor, groups: int, workspace: Optional[_Workspace], key):
        C_out, C_in_g, D_mul = W.shape
        K = D.shape[1]
        shape = (C_out, C_in_g, K)
        ctx.groups, ctx.workspace = groups, workspace
        cached = workspace is not None and workspace.key == key and workspace.folded is not None
        if cached:  # W and D unchanged: the buffers hold D + I and their fold
            D_hat = workspace.D_hat
        else:
            if workspace is not None:
                workspace.key = None  # until the buffers below hold this key's values
            D_hat = torch.add(D.detach(), identity, out=_buffer(workspace, "D_hat", tuple(D.shape), D.dtype))
        ctx.save_for_backward(W)
        ctx.D_hat = D_hat  # held by the graph: the workspace will not overwrite it while the graph lives
        if cached:
            return workspace.folded.view(shape)
        folded = _buffer(workspace, "folded", shape, W.dtype)
        if _foldkernel is not None:
            D_hat_t = _buffer(workspace, "D_hat_t", (D.shape[0], D_mul, K), D.dtype)
            D_hat_t.copy_(D_hat.transpose(1, 2))  # (C_in, D_mul, K): taps innermost
            _kernel("fold_rows", W, D_hat_t, folded, (groups, C_in_g, K, D_mul, C_out // groups), C_out)
        else:
            # (g, c, o, s) @ (g, c, s, k) -> (g, c, o, k), written into folded's (o, c, k) layout
            Wb = _grouped(W.detach().numpy(), groups).transpose(0, 2, 1, 3)
            Db = _grouped(D_hat.numpy(), groups).transpose(0, 1, 3, 2)
            out = _grouped(folded.numpy(), groups).transpose(0, 2, 1, 3)

            def work(part: int, parts: int) -> None:
                c = slice(*_share(C_in_g, part, parts))
                np.matmul(Wb[:, c], Db[:, c], out=out[:, c])

            _run_parts(work, C_out * C_in_g * K * D_mul)
        if workspace is None:
            return folded
        workspace.key = key
        return folded.view(shape)  # a view: the workspace's own tensor never joins a graph

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (W,) = ctx.saved_tensors
        D_hat, groups, workspace = ctx.D_hat, ctx.groups, ctx.workspace
        C_out, C_in_g, D_mul = W.shape
        K = D_hat.shape[1]
        need_W, need_D = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad.contiguous()
        # W.grad and D.grad may take these views; the workspace keeps its own tensors
        grad_W = _buffer(workspace, "grad_W", tuple(W.shape), W.dtype) if need_W else None
        grad_D = _buffer(workspace, "grad_D", tuple(D_hat.shape), D_hat.dtype) if need_D else None
        if _foldkernel is not None:
            sizes = (groups, C_in_g, K, D_mul, C_out // groups)
            if need_D:
                _kernel("grad_D_channels", grad, W, grad_D, sizes, C_in_g)
            if need_W:
                _kernel("grad_W_rows", grad, D_hat, grad_W, sizes, C_out)
        else:
            Gb = _grouped(grad.numpy(), groups).transpose(0, 2, 1, 3)  # (g, c, o, k)
            Wb = _grouped(W.detach().numpy(), groups).transpose(0, 2, 1, 3)  # (g, c, o, s)
            Db = _grouped(D_hat.numpy(), groups)  # (g, c, k, s)

            def work(part: int, parts: int) -> None:
                c = slice(*_share(C_in_g, part, parts))
                if need_W:
                    gW = _grouped(grad_W.numpy(), groups).transpose(0, 2, 1, 3)  # (g, c, o, s)
                    np.matmul(Gb[:, c], Db[:, c], out=gW[:, c])
                if need_D:
                    np.matmul(Gb[:, c].transpose(0, 1, 3, 2), Wb[:, c], out=_grouped(grad_D.numpy(), groups)[:, c])

            _run_parts(work, 2 * C_out * C_in_g * K * D_mul)
        grad_W = None if grad_W is None else grad_W.view(W.shape)
        grad_D = None if grad_D is None else grad_D.view(D_hat.shape)
        return grad_W, grad_D, None, None, None, None


def _fold_fast(
    W: Tensor,
    D: Tensor,
    identity: Tensor,
    groups: int,
    kernel_shape: list[int],
    workspace: Optional[_Workspace] = None,
) -> Tensor:
    """:func:`fold` through :class:`_FoldCPU` where it applies, else :func:`fold` itself."""
    if W.device.type != "cpu" or W.dtype not in (torch.float32, torch.float64) or D.dtype != W.dtype:
        return fold(W, D, identity, groups, kernel_shape)
    key = _version_key(W, D)
    # contiguous() is a no-op for parameters; the kernels below rely on it.
    folded = _FoldCPU.apply(W.contiguous(), D.contiguous(), identity.to(D.dtype), groups, workspace, key)
    return folded.reshape(kernel_shape)
