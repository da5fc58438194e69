"""DOConv1d/2d/3d: the modules, drop-in replacements of ``nn.Conv1d/2d/3d``."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from .. import core
from . import composition
from .cache import cached_kernel
from .composition import compose_features
from .folding import _fold_fast, fold

nn = torch.nn
F = torch.nn.functional
Tensor = torch.Tensor

_NATIVE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _numpy(tensor: Tensor) -> np.ndarray:
    """A CPU NumPy copy; half and bfloat16 go through float32 (exactly), other dtypes (complex
    included) as they are."""
    tensor = tensor.detach().cpu()
    if tensor.dtype in (torch.float16, torch.bfloat16):
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


class ConvError(ValueError, RuntimeError):
    """A bad argument or input of a DO-Conv layer.

    Both a ValueError (how doconv reports a bad value) and a RuntimeError (what ``nn.ConvNd`` raises
    for most of these, several only at its first forward): code written for either catches it.
    """


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
        try:
            arguments = (in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
            self._set_arguments(*arguments, D_mul)
        except ValueError as err:  # nn.ConvNd rejects many of these at forward, with a RuntimeError
            raise ConvError(str(err)) from None
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False. Received: bias={bias!r}")
        # W has no spatial dimensions to carry a memory format: from_conv records the conv's, fuse() restores it.
        self._channels_last_kernel = False

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
        self.reset_parameters()

    def _set_arguments(
        self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, D_mul
    ) -> None:
        """Validate and store the convolution's arguments (each error names the argument and its value)."""
        rank = self._rank
        self.in_channels = core.check_int(in_channels, "in_channels")
        self.out_channels = core.check_int(out_channels, "out_channels")
        self.kernel_size = core.normalize_tuple(kernel_size, rank, "kernel_size")
        self.stride = core.normalize_tuple(stride, rank, "stride")
        self.dilation = core.normalize_tuple(dilation, rank, "dilation")
        self.groups = core.check_int(groups, "groups")
        core.check_groups(self.in_channels, self.out_channels, self.groups)
        self.padding_mode = core.check_padding_mode(padding_mode)
        self.padding = self._native_padding(padding)
        pairs = core.padding_pairs(self.padding, self.kernel_size, self.stride, self.dilation)
        # F.pad wants the last dimension first: (left, right, top, bottom, ...).
        self._reversed_padding = [side for pair in reversed(pairs) for side in pair]
        self._no_padding = (0,) * rank
        self.D_mul = core.resolve_D_mul(D_mul, self.kernel_size)
        self._kernel_shape = [self.out_channels, self.in_channels // self.groups, *self.kernel_size]

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

    def _reset_identity(self) -> None:
        """Write the identity into its buffer: after ``to_empty()`` (a model built on the meta device)
        it holds whatever the new memory held, and it is in no state_dict to be loaded from. After
        ``load_state_dict(assign=True)`` W may be on another device or dtype than the buffer (a model
        built on the meta device again): the buffer follows W."""
        if self.identity is not None:
            K, D_mul = self.identity.shape
            identity = torch.as_tensor(core.identity(K, D_mul))
            if self.W.device != self.identity.device or self.W.dtype != self.identity.dtype:
                self.identity = identity.to(device=self.W.device, dtype=self.W.dtype)
                return
            with torch.no_grad():
                self.identity.copy_(identity)

    def reset_parameters(self) -> None:
        """W: nn.Conv's default init computed on W's own shape; D: zeros; bias: nn.Conv's default
        (and the identity buffer rewritten)."""
        self._reset_identity()
        nn.init.kaiming_uniform_(self.W, a=math.sqrt(5))
        if self.D is not None:
            nn.init.zeros_(self.D)
        if self.bias is not None:
            # nn.Conv's bias bound uses the native kernel's fan-in, C_in/g · K.
            fan_in = self.in_channels // self.groups * core.kernel_volume(self.kernel_size)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    # -- the kernel ----------------------------------------------------------------------------

    def _fold(self) -> Tensor:
        return fold(self.W, self.D, self.identity, self.groups, self._kernel_shape)

    @torch.jit.unused
    def _check_parameters(self) -> None:
        """Raise ValueError unless W, D and bias have this layer's shapes (say, after one was replaced)."""
        # Every forward runs this: plain tuples and one pass, the message built only on a mismatch.
        C_out, C_in, D_mul = self.out_channels, self.in_channels, self.D_mul
        K = core.kernel_volume(self.kernel_size)
        bias = self.bias
        checks = (
            ("W", self.W, (C_out, C_in // self.groups, D_mul)),
            ("D", self.D, (C_in, K, D_mul) if K > 1 else None),
            ("bias", bias, None if bias is None else (C_out,)),  # None: no bias, allowed
        )
        for name, param, shape in checks:
            received = None if param is None else tuple(param.shape)
            if received != shape:
                raise ValueError(
                    f"{self._name()}({C_in}, {C_out}, kernel_size={self.kernel_size}, "
                    f"groups={self.groups}, D_mul={D_mul}) needs {name} of shape {shape}. "
                    f"Received: {name}.shape={received}"
                )

    @torch.jit.unused
    def _fold_eager(self) -> Tensor:
        """The fold in eager mode from W and D as they are now: the CPU fast path where it applies."""
        self._check_parameters()
        return self._fold_checked()

    @torch.jit.unused
    def _fold_checked(self) -> Tensor:
        """:meth:`_fold_eager` for a caller that has just run :meth:`_check_parameters` (the forward)."""
        if self.D is None or self.identity is None:
            return self._fold()
        return _fold_fast(self.W, self.D, self.identity, self.groups, self._kernel_shape)

    @torch.jit.unused
    def _kernel_eager(self) -> Tensor:
        """The kernel for an eager forward: from an open :func:`~doconv.torch.cached_kernels` block
        when no gradient is needed, else folded now. Only :meth:`_forward_eager` calls it, after
        checking the parameters' shapes, so the fold does not check them again."""
        if self.D is None:  # 1x1: W is the kernel, nothing to fold or cache
            return self._fold_checked()
        if not (torch.is_grad_enabled() and (self.W.requires_grad or self.D.requires_grad)):
            kernel = cached_kernel(self, self._fold_checked)
            if kernel is not None:
                return kernel
        return self._fold_checked()

    def _kernel(self) -> Tensor:
        if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._fold()
        return self._kernel_eager()

    def register_parameter(self, name: str, param: Optional[nn.Parameter]) -> None:
        if name == "weight":  # e.g. torch.nn.utils.fusion.fuse_conv_bn_eval on the layer itself
            raise KeyError(
                f"{self._name()} has no weight Parameter to set: its kernel is folded from W and D on each read of "
                "layer.weight. Fuse first for code that replaces a conv's weight, e.g. "
                "torch.nn.utils.fusion.fuse_conv_bn_eval(layer.fuse(), bn)."
            )
        super().register_parameter(name, param)

    @property
    def weight(self) -> Tensor:
        """The folded kernel ``(C_out, C_in/g, *kernel_size)``, differentiable, folded on each read.

        A new tensor every time, held by nothing else: writing into it never changes the layer.
        """
        if torch.jit.is_tracing() or torch.compiler.is_compiling():  # torch.export, compile: as forward does
            self._check_parameters()
            kernel = self._fold()
        else:
            kernel = self._fold_eager()
        # With K = 1 the fold is a view of W: the caller gets a copy (still differentiable).
        return kernel.clone() if self.D is None else kernel

    # -- forward -------------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if x.is_quantized:  # eager-mode torch.ao.quantization leaves the layer in float: say so, not a dtype clash
            raise ConvError(
                self._name()
                + " does not run on quantized tensors (eager-mode torch.ao.quantization does not convert it): "
                + "fuse the model first (doconv.torch.fuse_model), or train quantization-aware with "
                + "doconv.torch.quantization. Received: input of dtype "
                + str(x.dtype)
            )
        rank = self._rank
        batched = x.dim() == rank + 2
        if not (batched or x.dim() == rank + 1) or x.shape[1 if batched else 0] != self.in_channels:
            raise ConvError(
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
        if not composition.feature_composition_in_use() or self._rank != 2 or D is None:
            return False
        if torch.compiler.is_compiling():
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
        self._check_parameters()
        if self._composes_features(x):
            return self._compose_features(x)
        return self._conv(x, self._kernel(), self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            if isinstance(x, torch.fx.Proxy):  # torch.fx.symbolic_trace: the fold and the conv as graph nodes
                return self._conv(x, self._fold(), self.bias)
        self._check_input(x)
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return self._conv(x, self._kernel(), self.bias)
        return self._forward_eager(x)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self._rank:
            s += f", padding={self.padding}"  # as nn.ConvNd prints it: padding=same
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
            An ``nn.Conv{1,2,3}d`` on the same device and dtype, in the same train/eval mode; its
            weight trains if W or D does, its bias as the bias; channels_last if the layer came
            from a channels_last conv (:meth:`from_conv`).

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
        # The kernel trains if any of its factors does; a frozen layer stays frozen.
        conv.weight.requires_grad_(self.W.requires_grad or (self.D is not None and self.D.requires_grad))
        if self.bias is not None:
            conv.bias.requires_grad_(self.bias.requires_grad)
        if getattr(self, "_channels_last_kernel", False):  # layers pickled before the flag existed lack it
            conv.to(memory_format=torch.channels_last if self._rank == 2 else torch.channels_last_3d)
        conv.train(self.training)
        return conv

    @classmethod
    def from_conv(cls, conv: nn.Module, D_mul: Optional[int] = None):
        """A DO-Conv layer with exactly the outputs of ``conv``, to fine-tune it as DO-Conv.

        D is zero, the kernel goes into W's first identity tile, the other tiles are
        zero, and W's columns past the last tile keep their random init. W and D follow the
        kernel's ``requires_grad``, the bias the bias's; device, dtype, train/eval mode and a
        channels_last kernel layout (restored by :meth:`fuse`) are kept.

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
        # W and D are the kernel: they follow its trainable flag, as the bias follows the bias's.
        layer.W.requires_grad_(conv.weight.requires_grad)
        if layer.D is not None:
            layer.D.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            layer.bias.requires_grad_(conv.bias.requires_grad)
        weight = conv.weight
        # Only a layout that is channels_last and not also contiguous (1x1 kernels are both) says anything.
        if weight.dim() in (4, 5) and not weight.is_contiguous():
            layout = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
            layer._channels_last_kernel = weight.is_contiguous(memory_format=layout)
        layer.train(conv.training)
        return layer

    # -- state_dict compatibility --------------------------------------------------------------

    def _W_to_embed_in(self) -> Tensor:
        """W's values, for the columns of W that a plain kernel does not set (core.embed_kernel): W
        itself, or a fresh initialisation where it holds none (the meta device) or non-finite ones
        (to_empty()'s memory), which the zero identity there would turn into NaN (NaN · 0)."""
        W = self.W.detach()
        if W.is_meta or not bool(torch.isfinite(W).all()):
            W = torch.empty(tuple(W.shape), dtype=W.dtype, device="cpu" if W.is_meta else W.device)
            nn.init.kaiming_uniform_(W, a=math.sqrt(5))
        return W

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        """Also accept a plain conv's ``weight`` and the original DO-Conv code's ``D_diag``."""
        weight_key, W_key, D_key = prefix + "weight", prefix + "W", prefix + "D"
        if weight_key in state_dict and W_key not in state_dict:
            kernel = state_dict.pop(weight_key)
            if tuple(kernel.shape) != tuple(self._kernel_shape):
                # As nn.Module reports a size mismatch: collected, raised as one RuntimeError at the end.
                errs.append(
                    f"size mismatch for {weight_key}: a {self._name()} needs a kernel of shape "
                    f"{tuple(self._kernel_shape)}. Received: weight.shape={tuple(kernel.shape)}"
                )
            else:
                # The tensors are made as the checkpoint's (dtype, device): what assign=True keeps;
                # without it, copying into W and D converts them as for any parameter.
                like = {"dtype": kernel.dtype, "device": kernel.device}
                W = torch.from_numpy(core.embed_kernel(_numpy(kernel), _numpy(self._W_to_embed_in())))
                state_dict[W_key] = W.to(**like)
                if self.D is not None:
                    state_dict[D_key] = torch.zeros(tuple(self.D.shape), **like)
        for diag_key in (prefix + "D_diag", prefix + "d_diag"):
            if diag_key in state_dict:
                diag = state_dict.pop(diag_key)
                if W_key in state_dict and D_key in state_dict:
                    D = state_dict[D_key]
                    params = core.from_reference_pytorch(
                        _numpy(state_dict[W_key]), _numpy(D), _numpy(diag), self.groups
                    )
                    state_dict[D_key] = torch.from_numpy(params["D"]).to(dtype=D.dtype, device=D.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs)
        self._reset_identity()  # loading is how a model made with to_empty() gets its values


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
        weight: the folded kernel, a new differentiable tensor on every read.

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
