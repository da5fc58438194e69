"""doconv.torch: DO-Conv layers for PyTorch, drop-in replacements of ``nn.Conv1d/2d/3d``.

The layer stores ``W`` (C_out, C_in/g, D_mul) and ``D`` (C_in, K, D_mul), the
learnable offset from the identity; the identity itself is a non-persistent
buffer, so it is neither a parameter nor in the state_dict. Every forward in
training composes the kernel (``doconv.core.fold``'s maths, in torch ops) and
runs the native convolution, except where a batch has so few output positions
that composing features is cheaper (``doconv.core.training_composition``);
without gradients the composed kernel is cached and reused until a parameter
changes.

Public names: :class:`DOConv1d`, :class:`DOConv2d`, :class:`DOConv3d`,
:func:`fuse_model`, :func:`convert_model`, :func:`get_params`, :func:`set_params`; and
:func:`use_feature_composition` to switch feature composition off.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any, Callable, Optional, Union

import numpy as np

from . import _fold_cpu, core
from ._optional import require

torch = require("torch", "doconv.torch", "torch", "PyTorch")
from torch.autograd.function import once_differentiable  # noqa: E402

nn = torch.nn
F = torch.nn.functional
Tensor = torch.Tensor

__all__ = [
    "DOConv1d",
    "DOConv2d",
    "DOConv3d",
    "compose_features",
    "convert_model",
    "feature_composition_in_use",
    "fuse_model",
    "get_params",
    "set_params",
    "use_feature_composition",
]

_NATIVE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


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


def _kernel(name: str, a: Tensor, b: Tensor, out: Tensor, groups: int) -> None:
    """``_fold_cpu.run`` on contiguous CPU tensors, as NumPy views of their memory (the kernel checks
    their shapes, dtypes and layout, and raises ValueError on a mismatch, before it reads anything)."""
    arrays = (t.detach().numpy() for t in (a, b, out))
    _fold_cpu.run(name, *arrays, groups, torch.get_num_threads(), _GOMP)


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
            _kernel("fold_rows", W, D_hat_t, folded, groups)
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
            if need_D:
                _kernel("grad_D_channels", grad, W, grad_D, groups)
            if need_W:
                _kernel("grad_W_rows", grad, D_hat, grad_W, groups)
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


# -- feature composition, where a batch has few output positions ----------------------------------
#
# Folding costs the same whatever the batch and image size; feature composition costs in proportion
# to the output positions (docs/maths.rst). In the last stages of a network on small images (a
# ResNet's 512-channel layers at 2x2) a batch has far fewer positions than the kernel has entries,
# and applying D_hat to the input patches and then W as one matrix product skips the fold's passes
# over W, the folded kernel and their gradients. `core.training_composition` picks the order per
# batch; autograd differentiates the torch ops below. Eager CPU float32/float64 training only: CUDA,
# autocast, scripting, tracing and torch.compile fold (`fold` above). `use_feature_composition(False)`
# folds everywhere.

_FEATURES = True


def use_feature_composition(enabled: bool) -> bool:
    """Let DOConv2d train by feature composition where it is the cheaper order (the default).

    Both orders give the same outputs and gradients up to rounding (docs/maths.rst). Turn it off
    to fold in every training step, e.g. to compare the two.

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
    global _FEATURES
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False. Received: enabled={enabled!r}")
    _FEATURES = enabled
    return _FEATURES


def feature_composition_in_use() -> bool:
    """The current setting of :func:`use_feature_composition`."""
    return _FEATURES


def compose_features(
    x: Tensor,
    W: Tensor,
    D: Tensor,
    identity: Tensor,
    bias: Optional[Tensor],
    kernel_size: tuple,
    stride: tuple,
    dilation: tuple,
    padding: tuple,
    groups: int,
) -> Tensor:
    """A 2-d DO-Conv layer's output by feature composition (docs/maths.rst), in differentiable torch ops.

    Args:
        x: ``(N, C_in, H, W)``, zero-padded by ``padding`` (ints per dimension) inside.
        W, D, identity, bias: the layer's (``identity`` in D's dtype).
        kernel_size, stride, dilation: pairs of ints.
        padding: a pair of ints (symmetric zero padding).
        groups: number of groups.

    Returns:
        ``(N, C_out, H_out, W_out)``, in x's memory format (contiguous or channels_last).
    """
    N, C_in = x.shape[0], x.shape[1]
    C_out, C_in_g, D_mul = W.shape
    K = D.shape[1]
    patches = F.unfold(x, kernel_size, dilation, padding, stride)  # (N, C_in·K, L)
    H_out, W_out = core.output_shape(x.shape[2:], kernel_size, stride, dilation, padding)
    positions = N * H_out * W_out
    # Every input channel's taps as the rows of one matrix: (C_in, K, N·L).
    taps = patches.view(N, C_in, K, H_out * W_out).permute(1, 2, 0, 3).reshape(C_in, K, positions)
    features = torch.bmm((D + identity).transpose(1, 2), taps)  # the depthwise step: (C_in, D_mul, N·L)
    # Group gi's rows of W meet the features of its own C_in/g channels (DESIGN.md, i(o, c)).
    y = torch.bmm(W.reshape(groups, C_out // groups, C_in_g * D_mul), features.view(groups, C_in_g * D_mul, positions))
    y = y.view(C_out, N, H_out, W_out)
    if bias is not None:
        y = y + bias.view(C_out, 1, 1, 1)
    # nn.Conv2d answers a channels_last input in channels_last.
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return y.permute(1, 0, 2, 3).contiguous(memory_format=layout)


def _numpy(tensor: Tensor) -> np.ndarray:
    """A CPU NumPy copy; half and bfloat16 go through float32 (exactly)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    return tensor.numpy().copy()


def _constructor_arguments(layer: nn.Module) -> tuple:
    """nn.ConvNd's positional constructor arguments, read from a native or a DO-Conv layer (same names)."""
    return (
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        layer.bias is not None,
        layer.padding_mode,
    )


class _DOConvNd(nn.Module):
    """Shared implementation of DOConv1d/2d/3d; see :class:`DOConv2d`."""

    _rank = 2
    __constants__ = [
        "_rank",
        "_no_padding",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
        "D_mul",
        "in_channels",
    ]
    # `weight` composes the kernel in Python; TorchScript compiles `forward` only.
    __jit_unused_properties__ = ["weight"]
    # Python-side caches, used only by the eager fast path: TorchScript need not type them.
    __jit_ignored_attributes__ = ["_workspace", "_cache"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        D_mul: Optional[int] = None,
    ) -> None:
        super().__init__()
        rank = self._rank
        self.in_channels = core.check_int(in_channels, "in_channels")
        self.out_channels = core.check_int(out_channels, "out_channels")
        self.kernel_size = core.normalize_tuple(kernel_size, rank, "kernel_size")
        self.stride = core.normalize_tuple(stride, rank, "stride")
        self.dilation = core.normalize_tuple(dilation, rank, "dilation")
        self.groups = core.check_int(groups, "groups")
        core.check_groups(self.in_channels, self.out_channels, self.groups)
        self.padding_mode = core.check_padding_mode(padding_mode)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False. Received: bias={bias!r}")
        self.padding = self._native_padding(padding)
        pairs = core.padding_pairs(self.padding, self.kernel_size, self.stride, self.dilation)
        # F.pad wants the last dimension first: (left, right, top, bottom, ...).
        self._reversed_padding = [side for pair in reversed(pairs) for side in pair]
        self._no_padding = (0,) * rank
        self.D_mul = core.resolve_D_mul(D_mul, self.kernel_size)
        self._kernel_shape = [self.out_channels, self.in_channels // self.groups, *self.kernel_size]

        factory = {"device": device, "dtype": dtype}
        K = core.kernel_volume(self.kernel_size)
        self.W = nn.Parameter(torch.empty(self.out_channels, self.in_channels // self.groups, self.D_mul, **factory))
        if K > 1:
            self.D = nn.Parameter(torch.zeros(self.in_channels, K, self.D_mul, **factory))
            identity = torch.as_tensor(core.identity(K, self.D_mul), dtype=self.W.dtype, device=self.W.device)
            self.register_buffer("identity", identity, persistent=False)
        else:
            self.register_parameter("D", None)
            self.register_buffer("identity", None, persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self._cache: Optional[tuple] = None
        self._workspace = _Workspace()
        self.reset_parameters()

    def _native_padding(self, padding: Any):
        """Accept what nn.ConvNd accepts: 'same', 'valid', an int or one int per dimension."""
        normalized = core.normalize_padding(padding, self._rank)
        if isinstance(normalized, str):
            if normalized == "same" and any(s != 1 for s in self.stride):
                raise ValueError(
                    "padding='same' is not supported for strided convolutions (as in nn.Conv2d). "
                    f"Received: padding={padding!r}, stride={self.stride}"
                )
            return normalized
        if any(before != after for before, after in normalized):
            raise ValueError(
                "padding must be symmetric per dimension, as in nn.Conv2d: an int or one int per dimension. "
                f"Received: padding={padding!r}"
            )
        return tuple(before for before, _ in normalized)

    def reset_parameters(self) -> None:
        """W: nn.Conv's default init computed on W's own shape; D: zeros; bias: nn.Conv's default."""
        nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))
        if self.D is not None:
            nn.init.zeros_(self.D)
        if self.bias is not None:
            # nn.Conv's bias bound uses the native kernel's fan-in, C_in/g · K.
            fan_in = self.in_channels // self.groups * core.kernel_volume(self.kernel_size)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        self._cache = None

    # -- the kernel ----------------------------------------------------------------------------

    def _fold(self) -> Tensor:
        return fold(self.W, self.D, self.identity, self.groups, self._kernel_shape)

    @torch.jit.unused
    def _fold_eager(self) -> Tensor:
        """The fold in eager mode: the CPU fast path where it applies."""
        if self.D is None or self.identity is None:
            return self._fold()
        return _fold_fast(self.W, self.D, self.identity, self.groups, self._kernel_shape, self._workspace)

    @torch.jit.unused
    def _cached_fold(self) -> Tensor:
        """The composed kernel, reused while W and D are unchanged (no gradient needed)."""
        D = self.D
        key = (
            self.W._version,
            self.W.data_ptr(),
            None if D is None else D._version,
            None if D is None else D.data_ptr(),
            self.W.dtype,
            self.W.device,
        )
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._fold_eager())
        return self._cache[1]

    def _kernel(self) -> Tensor:
        if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._fold()
        if torch.is_grad_enabled() and (self.W.requires_grad or (self.D is not None and self.D.requires_grad)):
            return self._fold_eager()
        return self._cached_fold()

    @property
    def weight(self) -> Tensor:
        """The folded kernel ``(C_out, C_in/g, *kernel_size)``, differentiable (read-only)."""
        return self._fold_eager()

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    # -- forward -------------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        rank = self._rank
        batched = x.dim() == rank + 2
        if not (batched or x.dim() == rank + 1) or x.shape[1 if batched else 0] != self.in_channels:
            raise ValueError(
                self._name()
                + " expects input of shape (N, "
                + str(self.in_channels)
                + ", *spatial) or ("
                + str(self.in_channels)
                + ", *spatial) with "
                + str(rank)
                + " spatial dimensions. Received: input.shape="
                + str(list(x.shape))
            )

    def _name(self) -> str:
        return "DOConv" + str(self._rank) + "d"

    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        # Two calls per rank, as in nn.ConvNd: TorchScript needs `padding` to have one type per call.
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            if self._rank == 1:
                return F.conv1d(x, weight, bias, self.stride, self._no_padding, self.dilation, self.groups)
            if self._rank == 2:
                return F.conv2d(x, weight, bias, self.stride, self._no_padding, self.dilation, self.groups)
            return F.conv3d(x, weight, bias, self.stride, self._no_padding, self.dilation, self.groups)
        if self._rank == 1:
            return F.conv1d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self._rank == 2:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return F.conv3d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _composes_features(self, x: Tensor) -> bool:
        """True where this training batch is cheaper by feature composition (see the note above it)."""
        D = self.D
        if not _FEATURES or self._rank != 2 or D is None or torch.compiler.is_compiling():
            return False
        if not torch.is_grad_enabled() or not (self.W.requires_grad or D.requires_grad):
            return False  # without gradients the folded kernel is cached: nothing left to save
        dtype = self.W.dtype
        if x.device.type != "cpu" or dtype not in (torch.float32, torch.float64) or x.dtype != dtype:
            return False
        if D.dtype != dtype or torch.is_autocast_enabled("cpu"):
            return False
        left, right, top, bottom = self._reversed_padding  # F.pad's order: last dimension first
        try:
            out = core.output_shape(
                x.shape[-2:], self.kernel_size, self.stride, self.dilation, ((top, bottom), (left, right))
            )
        except ValueError:
            return False  # smaller than the kernel: the native convolution says so
        positions = (x.shape[0] if x.dim() == 4 else 1) * out[0] * out[1]
        K = D.shape[1]
        choice = core.training_composition(positions, self.in_channels, self.out_channels, self.groups, K, self.D_mul)
        return choice == "feature"

    def _compose_features(self, x: Tensor) -> Tensor:
        """The forward pass by :func:`compose_features`, padding as the layer pads."""
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding, mode=mode)
            padding = self._no_padding
        else:
            padding = self.padding
        identity = self.identity.to(self.D.dtype)
        args = (self.kernel_size, self.stride, self.dilation, padding, self.groups)
        y = compose_features(x, self.W, self.D, identity, self.bias, *args)
        return y.squeeze(0) if unbatched else y

    @torch.jit.unused
    def _forward_eager(self, x):  # unannotated: TorchScript reads an unused method's signature unresolved
        if self._composes_features(x):
            return self._compose_features(x)
        return self._conv(x, self._kernel(), self.bias)

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return self._conv(x, self._kernel(), self.bias)
        return self._forward_eager(x)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self._rank:
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else f", padding={self.padding}"
        if self.dilation != (1,) * self._rank:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", D_mul={self.D_mul}"

    # -- folding and conversion ----------------------------------------------------------------

    def fuse(self) -> nn.Module:
        """The native convolution with the folded kernel: the same outputs at the native cost.

        Returns:
            An ``nn.Conv{1,2,3}d`` on the same device and dtype, in the same train/eval mode.

        Raises:
            ValueError: a parameter holds NaN or infinity.

        Example:
            >>> layer = DOConv2d(3, 8, 3, padding=1)
            >>> type(layer.fuse()).__name__
            'Conv2d'
        """
        for name, param in (("W", self.W), ("D", self.D), ("bias", self.bias)):
            if param is not None and not bool(torch.isfinite(param).all()):
                raise ValueError(f"Cannot fuse {self._name()}: its parameter {name} holds NaN or infinity.")
        conv = _NATIVE[self._rank](
            *_constructor_arguments(self),
            device=self.W.device,
            dtype=self.W.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self._fold_eager())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    @classmethod
    def from_conv(cls, conv: nn.Module, D_mul: Optional[int] = None):
        """A DO-Conv layer with exactly the outputs of ``conv``, to fine-tune it as DO-Conv.

        D is zero, the kernel goes into W's first identity tile, the other tiles are
        zero, and W's columns past the last tile keep their random init.

        Args:
            conv: an ``nn.Conv{1,2,3}d`` of this class's rank.
            D_mul: the depth multiplier; None means K. Default None.

        Example:
            >>> conv = nn.Conv2d(3, 8, 3, padding=1)
            >>> layer = DOConv2d.from_conv(conv)
            >>> x = torch.randn(1, 3, 5, 5)
            >>> bool(torch.allclose(layer(x), conv(x), atol=1e-6))
            True
        """
        native = _NATIVE[cls._rank]
        if type(conv) is not native:
            raise TypeError(
                f"{cls.__name__}.from_conv needs an nn.{native.__name__}. Received: conv of type {type(conv).__name__}"
            )
        layer = cls(
            *_constructor_arguments(conv),
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            D_mul=D_mul,
        )
        with torch.no_grad():
            layer.W.copy_(torch.from_numpy(core.embed_kernel(_numpy(conv.weight), _numpy(layer.W))))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.train(conv.training)
        return layer

    # -- state_dict compatibility --------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        """Also accept a plain conv's ``weight`` and the original DO-Conv code's ``D_diag``."""
        weight_key, W_key, D_key = prefix + "weight", prefix + "W", prefix + "D"
        if weight_key in state_dict and W_key not in state_dict:
            kernel = state_dict.pop(weight_key)
            if tuple(kernel.shape) != tuple(self._kernel_shape):
                raise ValueError(
                    f"{prefix}weight must have shape {tuple(self._kernel_shape)} to load into this {self._name()}. "
                    f"Received: weight.shape={tuple(kernel.shape)}"
                )
            state_dict[W_key] = torch.from_numpy(core.embed_kernel(_numpy(kernel), _numpy(self.W)))
            if self.D is not None:
                state_dict[D_key] = torch.zeros_like(self.D)
        for diag_key in (prefix + "D_diag", prefix + "d_diag"):
            if diag_key in state_dict:
                diag = state_dict.pop(diag_key)
                if W_key in state_dict and D_key in state_dict:
                    params = core.from_reference_pytorch(
                        _numpy(state_dict[W_key]), _numpy(state_dict[D_key]), _numpy(diag), self.groups
                    )
                    state_dict[D_key] = torch.from_numpy(params["D"])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs)
        self._cache = None


class DOConv2d(_DOConvNd):
    """A DO-Conv layer that replaces ``torch.nn.Conv2d``.

    Same constructor as ``nn.Conv2d``, positional arguments in the same order;
    ``D_mul`` is keyword-only (the original code had it fourth, so
    ``DOConv2d(64, 64, 3, 1, 1)`` silently meant D_mul = 1).

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: int or pair.
        stride: int or pair. Default 1.
        padding: int, pair, 'same' or 'valid'. Default 0.
        dilation: int or pair. Default 1.
        groups: divides both channel counts. Default 1.
        bias: learn an additive bias. Default True.
        padding_mode: 'zeros', 'reflect', 'replicate' or 'circular'. Default 'zeros'.
        device: device of the parameters. Default None (the default device).
        dtype: dtype of the parameters. Default None (the default dtype).
        D_mul: depth multiplier, >= K = kernel height x width. Default None (= K).

    Attributes:
        W: ``(C_out, C_in/groups, D_mul)``.
        D: ``(C_in, K, D_mul)``, the learnable offset from the identity; None for 1x1 kernels.
        bias: ``(C_out,)`` or None.
        weight: the folded kernel (read-only, differentiable).

    Example:
        >>> layer = DOConv2d(3, 8, 3, padding=1)
        >>> layer(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
        >>> layer
        DOConv2d(3, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), D_mul=9)
    """

    _rank = 2


class DOConv1d(_DOConvNd):
    """A DO-Conv layer that replaces ``torch.nn.Conv1d``; arguments as :class:`DOConv2d`, ints per dimension.

    Example:
        >>> DOConv1d(2, 4, 3)(torch.randn(1, 2, 10)).shape
        torch.Size([1, 4, 8])
    """

    _rank = 1


class DOConv3d(_DOConvNd):
    """A DO-Conv layer that replaces ``torch.nn.Conv3d``; arguments as :class:`DOConv2d`, triples per dimension.

    Example:
        >>> DOConv3d(2, 4, 3)(torch.randn(1, 2, 5, 5, 5)).shape
        torch.Size([1, 4, 3, 3, 3])
    """

    _rank = 3


_DOCONV = {1: DOConv1d, 2: DOConv2d, 3: DOConv3d}


# -- whole models ------------------------------------------------------------------------------


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
    layer._cache = None
    return layer
