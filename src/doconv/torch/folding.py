"""The kernel composition in torch ops, and its CPU fast path with a custom autograd Function.

:func:`fold` is the plain, differentiable reference (``doconv.core.fold``'s maths); ``_fold_fast`` takes
the compiled kernel (or NumPy) for float32/float64 CPU tensors in eager mode.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import numpy as np
import torch

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
    D_hat = D + identity
    if groups == 1:
        folded = torch.einsum("ocs,cks->ock", W, D_hat)
    else:
        # Group gi pairs its rows of W only with its own C_in/g channels of D (DESIGN.md, i(o, c)).
        # The sizes come from kernel_shape, not from the tensors: torch.fx traces this with proxies.
        C_out, C_in_g = kernel_shape[0], kernel_shape[1]
        Wg = W.reshape(groups, C_out // groups, C_in_g, -1)
        Dg = D_hat.reshape(groups, C_in_g, -1, D_hat.shape[-1])
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


def _kernel(name: str, a: Tensor, b: Tensor, out: Tensor, groups: int) -> None:
    """The one call into the compiled kernel: ``_fold_cpu.run`` on NumPy views of contiguous CPU tensors.

    ``name`` and the layouts as in ``_fold_cpu.KERNELS``: 'fold_rows' a = W, b = D_hat transposed
    (C_in, D_mul, K), out = the folded kernel; 'grad_W_rows' a = G, b = D_hat, out = grad_W;
    'grad_D_channels' a = G, b = W, out = grad_D. The kernel checks shapes, dtypes and layout and
    raises ValueError on a mismatch before it reads anything.
    """
    arrays = (t.detach().numpy() for t in (a, b, out))
    _fold_cpu.run(name, *arrays, groups, torch.get_num_threads(), _GOMP)


_share = _fold_cpu.share


def _grouped(array: np.ndarray, groups: int) -> np.ndarray:
    """(C_out or C_in, ...) -> (g, C/g, ...): a view, no copy."""
    return array.reshape((groups, array.shape[0] // groups) + array.shape[1:])


def _fold_vjp(grad: Tensor, W: Tensor, D_hat: Tensor, groups: int, need_W: bool, need_D: bool) -> tuple:
    """The fold's gradients in differentiable torch ops: what backward computes under ``create_graph``."""
    C_out, C_in_g, D_mul = W.shape
    K = D_hat.shape[1]
    G = grad.reshape(groups, C_out // groups, C_in_g, K)
    Wg = W.reshape(groups, C_out // groups, C_in_g, D_mul)
    Dg = D_hat.reshape(groups, C_in_g, K, D_mul)
    grad_W = torch.einsum("gock,gcks->gocs", G, Dg).reshape(W.shape) if need_W else None
    grad_D = torch.einsum("gock,gocs->gcks", G, Wg).reshape(D_hat.shape) if need_D else None
    return grad_W, grad_D


def _fold_jvp(W: Tensor, D_hat: Tensor, W_t: Optional[Tensor], D_t: Optional[Tensor], groups: int) -> Tensor:
    """The fold's forward-mode derivative, W_t·(D + I) + W·D_t, in differentiable torch ops."""
    C_out, C_in_g, D_mul = W.shape
    K = D_hat.shape[1]

    def product(W: Tensor, D: Tensor) -> Tensor:
        Wg = W.reshape(groups, C_out // groups, C_in_g, D_mul)
        return torch.einsum("gocs,gcks->gock", Wg, D.reshape(groups, C_in_g, K, D_mul)).reshape(C_out, C_in_g, K)

    tangent = torch.zeros((C_out, C_in_g, K), dtype=W.dtype, device=W.device)
    if W_t is not None:
        tangent = tangent + product(W_t, D_hat)
    if D_t is not None:
        tangent = tangent + product(W, D_t)
    return tangent


class _FoldCPU(torch.autograd.Function):
    """Kernel composition and its gradients on CPU (see the note above).

    Every call allocates its outputs: nothing is kept between calls, so two threads, a graph kept
    alive, or a gradient held by the user never share memory with a later step. Under
    ``create_graph`` the backward runs in differentiable torch ops, so higher-order gradients
    flow as through :func:`fold`.
    """

    @staticmethod
    def forward(W: Tensor, D: Tensor, identity: Tensor, groups: int) -> Tensor:
        C_out, C_in_g, D_mul = W.shape
        K = D.shape[1]
        D_hat = D.detach() + identity
        folded = torch.empty((C_out, C_in_g, K), dtype=W.dtype)
        if _foldkernel is not None:
            D_hat_t = D_hat.transpose(1, 2).contiguous()  # (C_in, D_mul, K): taps innermost
            _kernel("fold_rows", W.detach(), D_hat_t, folded, groups)
            return folded
        # (g, c, o, s) @ (g, c, s, k) -> (g, c, o, k), written into folded's (o, c, k) layout
        Wb = _grouped(W.detach().numpy(), groups).transpose(0, 2, 1, 3)
        Db = _grouped(D_hat.numpy(), groups).transpose(0, 1, 3, 2)
        out = _grouped(folded.numpy(), groups).transpose(0, 2, 1, 3)

        def work(part: int, parts: int) -> None:
            c = slice(*_share(C_in_g, part, parts))
            np.matmul(Wb[:, c], Db[:, c], out=out[:, c])

        _run_parts(work, C_out * C_in_g * K * D_mul)
        return folded

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        W, D, identity, groups = inputs
        ctx.save_for_backward(W, D, identity)
        ctx.save_for_forward(W, D, identity)
        ctx.groups = groups

    @staticmethod
    def jvp(ctx, W_t: Optional[Tensor], D_t: Optional[Tensor], identity_t, groups_t) -> Tensor:
        """Forward-mode AD (``torch.func.jvp``, ``jacfwd``, ``hessian``), as through :func:`fold`."""
        W, D, identity = ctx.saved_tensors
        return _fold_jvp(W, D + identity, W_t, D_t, ctx.groups)

    @staticmethod
    def vmap(info, in_dims: tuple, W: Tensor, D: Tensor, identity: Tensor, groups: int) -> tuple:
        """``torch.func.vmap``: unbatched parameters (per-sample gradients batch the input) keep this
        Function; batched ones take the einsum fold, which vmap batches itself."""
        if all(dim is None for dim in in_dims[:3]):
            return _FoldCPU.apply(W, D, identity, groups), None

        def one(W: Tensor, D: Tensor, identity: Tensor) -> Tensor:
            return fold(W, D, identity, groups, [W.shape[0], W.shape[1], D.shape[1]])

        return torch.vmap(one, in_dims=tuple(in_dims[:3]))(W, D, identity), 0

    @staticmethod
    def backward(ctx, grad: Tensor):
        W, D, identity = ctx.saved_tensors
        groups = ctx.groups
        need_W, need_D = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable too
            return (*_fold_vjp(grad, W, D + identity, groups, need_W, need_D), None, None)
        C_out, C_in_g, D_mul = W.shape
        K = D.shape[1]
        D_hat = D + identity  # small (C_in, K, D_mul): recomputed rather than kept between the passes
        grad = grad.contiguous()
        grad_W = torch.empty(W.shape, dtype=W.dtype) if need_W else None
        grad_D = torch.empty(D.shape, dtype=D.dtype) if need_D else None
        if _foldkernel is not None:
            if need_D:
                _kernel("grad_D_channels", grad, W, grad_D, groups)
            if need_W:
                _kernel("grad_W_rows", grad, D_hat, grad_W, groups)
            return grad_W, grad_D, None, None
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
        return grad_W, grad_D, None, None


def check_fold_arguments(W: Tensor, D: Tensor, identity: Tensor, groups: int, kernel_shape: list[int]) -> None:
    """Raise ValueError unless W, D, the identity and the kernel shape fit together (before any native call)."""
    if W.dim() != 3:
        raise ValueError(f"W must have 3 dimensions (C_out, C_in/g, D_mul). Received: W.shape={tuple(W.shape)}")
    C_out, C_in_g, D_mul = W.shape
    if not isinstance(groups, int) or groups < 1 or C_out % groups:
        raise ValueError(f"groups must be a positive divisor of C_out={C_out}. Received: groups={groups!r}")
    if D.dim() != 3 or D.shape[0] != groups * C_in_g or D.shape[2] != D_mul:
        raise ValueError(
            f"D must have shape (C_in, K, D_mul) = ({groups * C_in_g}, K, {D_mul}) for W of shape {tuple(W.shape)} "
            f"and groups={groups}. Received: D.shape={tuple(D.shape)}"
        )
    K = D.shape[1]
    if tuple(identity.shape) != (K, D_mul):
        raise ValueError(
            f"identity must have shape (K, D_mul) = {(K, D_mul)} for D of shape {tuple(D.shape)}. "
            f"Received: identity.shape={tuple(identity.shape)}"
        )
    if list(kernel_shape[:2]) != [C_out, C_in_g] or math.prod(kernel_shape[2:]) != K:
        raise ValueError(
            f"kernel_shape must be [{C_out}, {C_in_g}, *kernel_size] with K={K} taps for W of shape "
            f"{tuple(W.shape)} and D of shape {tuple(D.shape)}. Received: kernel_shape={list(kernel_shape)}"
        )


def _fold_fast(W: Tensor, D: Tensor, identity: Tensor, groups: int, kernel_shape: list[int]) -> Tensor:
    """:func:`fold` through :class:`_FoldCPU` where it applies, else :func:`fold` itself."""
    if W.device.type != "cpu" or W.dtype not in (torch.float32, torch.float64) or D.dtype != W.dtype:
        return fold(W, D, identity, groups, kernel_shape)
    check_fold_arguments(W, D, identity, groups, kernel_shape)
    # contiguous() is a no-op for parameters; the kernels below rely on it.
    folded = _FoldCPU.apply(W.contiguous(), D.contiguous(), identity.to(D.dtype).contiguous(), groups)
    return folded.reshape(kernel_shape)
