"""The Gluon DO-Conv layer: ``DOConv2D``, a drop-in for ``gluon.nn.Conv2D``."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .. import core
from .._optional import require

mx = require("mxnet", "doconv.gluon", "gluon", "MXNet")

from mxnet import autograd, gluon, nd, symbol  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

from . import composition, fold  # noqa: E402

_RANK = 2


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


def _needs_a_kernel_shape(initializer) -> bool:
    """MXNet's Bilinear initializer reads a 4-d (deconvolution) kernel shape: W's 3-d shape breaks it."""
    if isinstance(initializer, str):
        return initializer.lower() == "bilinear"
    return isinstance(initializer, mx.init.Bilinear)


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
        weight_initializer: initializer of W, computed on W's own shape ``(channels,
            C_in/groups, D_mul)``; None (default) uses the one given to ``initialize()``, as
            ``Conv2D`` does. ``mx.init.Bilinear`` needs a 4-d kernel shape and is refused
            (ValueError): initialize a ``Conv2D`` with it and take :meth:`from_conv`.
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
        if _needs_a_kernel_shape(weight_initializer):
            raise ValueError(
                f"weight_initializer={weight_initializer!r} initializes 4-d (deconvolution) kernels, and DOConv2D "
                "initializes W, of shape (channels, C_in/groups, D_mul): initialize a Conv2D with it and take "
                "DOConv2D.from_conv of that"
            )
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

    def _kernel(self, F, W, D):
        """The folded kernel (C_out, C_in/g, M, N): the custom operator on CPU, else MXNet ops (doconv.gluon.fold)."""
        if D is None:
            return F.reshape(W, shape=(0, 0) + self._kernel_size)
        how = fold.fold_with_kernel if fold.takes_kernel(self.W, self._K) else fold.fold_with_ops
        folded = how(F, W, D, self._groups, self._K, self._D_mul)  # (C_out, C_in/g, K)
        return F.reshape(folded, shape=(0, 0) + self._kernel_size)

    def _composes_features(self, F, x) -> bool:
        """True where this imperative training batch is cheaper by feature composition, or where
        ``plan_compositions`` chose it for this layer's graph (doconv.gluon.composition)."""
        if not composition.feature_composition_in_use() or self.D is None:
            return False
        if self.W.grad_req == "null" and self.D.grad_req == "null":
            return False  # nothing to train: the fold's backward is not run either
        try:
            contexts = self.W.list_ctx()
        except RuntimeError:  # not initialized: the fold's MXNet ops, which also infer W's and D's shapes
            return False
        if np.dtype(self.W.dtype) not in fold.C_TYPES or not all(ctx.device_type == "cpu" for ctx in contexts):
            return False
        if F is symbol:
            return self._planned == "feature" and self.in_channels > 0
        if not autograd.is_recording() or np.dtype(x.dtype) != np.dtype(self.W.dtype):
            return False
        return self._planned_order(x.shape) == "feature"

    def _planned_order(self, shape) -> str:
        """``core.training_composition``'s order for an input of this shape, in the layer's layout."""
        if self.D is None or len(shape) != _RANK + 2 or not all(shape) or np.dtype(self.W.dtype) not in fold.C_TYPES:
            return "kernel"  # no D, or a shape that shape inference left unknown
        axes = (1, 2) if self._data_format == core.CHANNELS_LAST else (2, 3)
        spatial = tuple(shape[a] for a in axes)
        try:
            out = core.output_shape(spatial, self._kernel_size, self._strides, self._dilation, self._padding)
        except ValueError:
            return "kernel"  # smaller than the kernel: the native convolution says so
        positions = shape[0] * out[0] * out[1]
        C_in = int(shape[self._channel_axis(len(shape))])
        return core.training_composition(positions, C_in, self._channels, self._groups, self._K, self._D_mul)

    def _compose_features(self, F, x, W, D, bias):
        """The convolution by feature composition (doconv.gluon.composition), from an NCHW ``x``."""
        dtype = np.dtype(self.W.dtype).name
        return composition.compose_features(
            F, x, W, D, bias, self.in_channels, self._kernel_size, self._D_mul, dtype, self._conv_kwargs
        )

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
        from .params import get_params  # params imports this module

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
            ValueError: ``D_mul < K``; ``conv`` is not initialized and has a weight initializer
                that needs a 4-d kernel shape (``mx.init.Bilinear``).

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
        from .params import get_params, set_params  # params imports this module

        if not isinstance(conv, nn.Conv2D):
            raise TypeError(f"from_conv needs a gluon.nn.Conv2D. Received: {type(conv).__name__}")
        kw = conv._kwargs
        layout = kw["layout"]
        data_format = core.gluon_layout(layout, _RANK)
        groups = kw["num_group"]
        kernel_shape = conv.weight.shape
        C_in_g = kernel_shape[1] if data_format == core.CHANNELS_FIRST else kernel_shape[-1]
        weight_init = conv.weight.init
        if _needs_a_kernel_shape(weight_init):
            if conv.weight._data is None:
                raise ValueError(
                    f"{conv.name} is not initialized yet and its weight_initializer {weight_init!r} needs a 4-d kernel "
                    "shape, which W does not have: initialize the network before converting it"
                )
            # The kernel is copied into W: the initializer only fills W's columns past the last identity tile,
            # which the default initializer does as well.
            weight_init = None
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
            weight_initializer=weight_init,
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
