"""The Keras 3 DO-Conv layers: ``DOConv2D``, ``DODepthwiseConv2D`` and ``DOSeparableConv2D``.

Each layer stores W, the depthwise offset D and its other weights, folds W and D into an
ordinary kernel with ``keras.ops`` on every call and runs the op its native counterpart runs
(``ops.conv``, ``ops.depthwise_conv``, ``ops.separable_conv``), so it works on the tensorflow,
jax and torch backends and ``fuse()`` gives a native layer with the same outputs. Shape maths,
argument checks and layout conversions live in :mod:`doconv.core`.
"""

from __future__ import annotations

import numpy as np

from .. import core
from .._optional import require
from . import composition
from .fold import fold_kernel

keras = require("keras", "doconv.keras", "keras", "Keras 3")
ops = keras.ops
# Keras exports no public name for "a model built from inputs and outputs", the kind clone_model rebuilds;
# doconv.keras.convert needs it, and it is imported here, after the check that Keras is installed.
from keras.src.models.functional import Functional as _Functional  # noqa: E402, F401

# Native constructor arguments in Keras 3's order; from_conv and fuse translate configs through them.
_BIAS_ARGS = ("use_bias", "bias_initializer", "bias_regularizer", "activity_regularizer", "bias_constraint")
_CONV_ARGS = (
    "filters",
    "kernel_size",
    "strides",
    "padding",
    "data_format",
    "dilation_rate",
    "groups",
    "activation",
    "kernel_initializer",
    "kernel_regularizer",
    "kernel_constraint",
) + _BIAS_ARGS
_DEPTHWISE_ARGS = (
    "kernel_size",
    "strides",
    "padding",
    "depth_multiplier",
    "data_format",
    "dilation_rate",
    "activation",
    "depthwise_initializer",
    "depthwise_regularizer",
    "depthwise_constraint",
) + _BIAS_ARGS
_SEPARABLE_ARGS = (
    ("filters",) + _DEPTHWISE_ARGS + ("pointwise_initializer", "pointwise_regularizer", "pointwise_constraint")
)


def _numpy(x) -> np.ndarray:
    # Through a tensor: np.array() of a TF variable warns about the `copy` keyword under NumPy 2.
    return np.array(ops.convert_to_numpy(ops.convert_to_tensor(x)))


def _check_native(conv, cls, name: str) -> dict:
    """The config of a built layer of exactly class ``cls``, refusing what from_conv cannot keep."""
    if type(conv) is not cls:
        # Exactly: a subclass may compute something else (its own call), which the DO-Conv layer would drop.
        raise TypeError(
            f"{name} must be a keras.layers.{cls.__name__} (that class exactly, not a subclass). "
            f"Received: {name}={conv!r} of class {type(conv).__module__}.{type(conv).__qualname__}"
        )
    if not conv.built:
        raise ValueError(f"{name} must be built (called on an input) first. Received: {name}={conv.name!r}")
    config = conv.get_config()
    if config.get("lora_rank"):
        rank = config["lora_rank"]
        raise ValueError(f"A LoRA-enabled {cls.__name__} cannot be converted. Received: lora_rank={rank}")
    mode = getattr(conv, "quantization_mode", None)
    if mode:
        raise ValueError(f"A quantized {cls.__name__} cannot be converted. Received: quantization_mode={mode!r}")
    return config


def _transfer_trainable(pairs) -> None:
    """Each (source, target) variable pair: the target is trainable as the source (None: no such weight)."""
    for source, target in pairs:
        if source is not None and target is not None:
            target.trainable = source.trainable


class _DOConvBase(keras.layers.Layer):
    """What the three layers share: arguments, the output shape, W and D, D + I, the bias and activation."""

    def __init__(
        self,
        kernel_size,
        strides,
        padding,
        data_format,
        dilation_rate,
        activation,
        use_bias,
        bias_initializer,
        bias_regularizer,
        activity_regularizer,
        bias_constraint,
        D_mul,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.rank = 2
        self.kernel_size = core.normalize_tuple(kernel_size, 2, "kernel_size")
        self.strides = core.normalize_tuple(strides, 2, "strides")
        self.dilation_rate = core.normalize_tuple(dilation_rate, 2, "dilation_rate")
        # Keras convolutions take only the two strings; core accepts explicit pads too.
        if not isinstance(padding, str) or padding.lower() not in ("same", "valid"):
            raise ValueError(
                f"padding must be 'same' or 'valid', as for {self._native_name}. Received: padding={padding!r}"
            )
        self.padding = core.normalize_padding(padding, 2)
        if data_format is None:
            data_format = keras.config.image_data_format()
        self.data_format = core.normalize_data_format(data_format)
        core.check_stride_dilation(self.strides, self.dilation_rate)
        self.D_mul = core.resolve_D_mul(D_mul, self.kernel_size)
        self.K = core.kernel_volume(self.kernel_size)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.input_spec = keras.layers.InputSpec(ndim=4)
        self.W = self.D = self.bias = None
        self._identity = None

    _native_name = "Conv2D"

    @property
    def _channel_axis(self) -> int:
        return -1 if self.data_format == core.CHANNELS_LAST else 1

    def _out_channels(self, in_channels: int) -> int:
        raise NotImplementedError

    def _in_channels_of(self, input_shape) -> int:
        in_channels = input_shape[self._channel_axis]
        if in_channels is None:
            raise ValueError(
                f"The channel dimension of the input must be known. Received: input_shape={input_shape}, "
                f"data_format={self.data_format!r}"
            )
        return int(in_channels)

    def _input_shape_for_build(self, in_channels: int) -> tuple:
        if self.data_format == core.CHANNELS_LAST:
            return (None, None, None, in_channels)
        return (None, in_channels, None, None)

    def compute_output_shape(self, input_shape):
        """The output shape for ``input_shape``, as the native layer computes it."""
        input_shape = tuple(input_shape)
        spatial = input_shape[1:3] if self.data_format == core.CHANNELS_LAST else input_shape[2:4]
        try:
            out = tuple(
                None if n is None else core.output_shape((n,), (k,), (s,), (d,), self.padding)[0]
                for n, k, s, d in zip(spatial, self.kernel_size, self.strides, self.dilation_rate)
            )
        except ValueError as err:
            # Keras's own wording first, then the sizes involved.
            raise ValueError(f"Computed output size would be zero or negative. {err}") from None
        channels = self._out_channels(self._in_channels_of(input_shape))
        if self.data_format == core.CHANNELS_LAST:
            return (input_shape[0],) + out + (channels,)
        return (input_shape[0], channels) + out

    def _add_W_D(self, W_shape, in_channels: int, initializer, regularizer, constraint) -> None:
        # autocast=False: under a mixed precision policy the fold runs in the variable dtype
        # and only the folded kernel is cast to the compute dtype.
        self.W = self.add_weight(
            name="W",
            shape=W_shape,
            initializer=initializer,
            regularizer=regularizer,
            constraint=constraint,
            autocast=False,
        )
        if self.K > 1:
            self.D = self.add_weight(
                name="D",
                shape=(self.K, self.D_mul, in_channels),
                initializer="zeros",
                regularizer=regularizer,
                constraint=constraint,
                autocast=False,
            )
            self._identity = core.identity(self.K, self.D_mul)

    def _add_bias(self, channels: int) -> None:
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(channels,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )

    def _D_hat(self, dtype):
        """D + I, ``(K, D_mul, C_in)``."""
        return ops.convert_to_tensor(self.D) + ops.cast(self._identity[:, :, None], dtype)

    def _finish(self, outputs):
        """Add the bias and apply the activation, as the native layers do."""
        if self.use_bias:
            channels = self.bias.shape[0]
            shape = (1, 1, 1, channels) if self.data_format == core.CHANNELS_LAST else (1, channels, 1, 1)
            outputs = ops.add(outputs, ops.reshape(ops.cast(self.bias, outputs.dtype), shape))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _check_built(self, doing: str = "") -> None:
        if not self.built:
            raise ValueError(f"Layer {self.name!r} is not built yet: call it on an input first{doing}.")

    def _base_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "data_format": self.data_format,
                "dilation_rate": self.dilation_rate,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "activity_regularizer": keras.regularizers.serialize(self.activity_regularizer),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
                "D_mul": self.D_mul,
            }
        )
        return config

    def _native_from_config(self, native_cls, args, in_channels: int):
        """A built native layer with this layer's name, dtype policy, trainable flag and arguments."""
        config = self.get_config()
        native = native_cls.from_config({k: config[k] for k in ("name", "trainable", "dtype") + args})
        native.build(self._input_shape_for_build(in_channels))
        return native

    @classmethod
    def _from_native(cls, conv, config, args, D_mul, in_channels):
        # Called directly, not through from_config, which would turn a ValueError (D_mul < K) into a TypeError.
        layer = cls(
            **{k: config[k] for k in args},
            D_mul=D_mul,
            name=conv.name,
            trainable=conv.trainable,
            dtype=conv.dtype_policy,
        )
        layer.build(layer._input_shape_for_build(in_channels))
        return layer


@keras.saving.register_keras_serializable(package="doconv")
class DOConv2D(_DOConvBase):
    """Depthwise over-parameterized 2-D convolution, a drop-in for ``keras.layers.Conv2D``.

    Trains the kernel as the composition of W and D + I (the identity) and
    computes exactly ``conv(x, fold(W, D))``; :meth:`fuse` turns it into a plain
    ``Conv2D`` for inference.

    Weights (Keras layout): ``W`` ``(D_mul, C_in/groups, filters)``, initialised
    with ``kernel_initializer`` on W's own shape; ``D`` ``(K, D_mul, C_in)``,
    zeros, the learnable offset from the identity (absent when K = 1);
    ``bias`` ``(filters,)`` when ``use_bias``. The kernel regulariser and
    constraint apply to W and D, so weight decay pulls D + I towards the identity.

    Args:
        filters: number of output channels.
        kernel_size: int or 2 ints. K = product of the kernel sizes.
        strides: int or 2 ints. Default ``(1, 1)``.
        padding: ``'valid'`` (default) or ``'same'``, as ``Conv2D``.
        data_format: ``'channels_last'``, ``'channels_first'`` or None
            (default: ``keras.config.image_data_format()``).
        dilation_rate: int or 2 ints. Default ``(1, 1)``. Not together with strides > 1.
        groups: number of groups; must divide ``filters`` and the input channels. Default 1.
        activation: activation applied after the bias. Default None.
        use_bias: whether to add a bias. Default True.
        kernel_initializer: initialiser of W. Default ``'glorot_uniform'``.
        bias_initializer: initialiser of the bias. Default ``'zeros'``.
        kernel_regularizer: regulariser of W and D. Default None.
        bias_regularizer: regulariser of the bias. Default None.
        activity_regularizer: regulariser of the output. Default None.
        kernel_constraint: constraint on W and D. Default None.
        bias_constraint: constraint on the bias. Default None.
        D_mul: depth multiplier, keyword-only. Default None, i.e. K; at least K;
            always 1 for 1x1 kernels.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``, ``trainable``).

    Raises:
        ValueError: a bad argument (the message names it and the value), D_mul < K,
            strides > 1 with dilation_rate > 1; at build, input channels not
            divisible by groups, or an input smaller than the dilated kernel.

    Example:
        >>> import numpy as np
        >>> layer = DOConv2D(4, 3, D_mul=12)
        >>> y = layer(np.ones((1, 5, 5, 2), "float32"))
        >>> tuple(y.shape), tuple(layer.kernel.shape)
        ((1, 3, 3, 4), (3, 3, 2, 4))
    """

    def __init__(
        self,
        filters: int,
        kernel_size,
        strides=(1, 1),
        padding: str = "valid",
        data_format: str | None = None,
        dilation_rate=(1, 1),
        groups: int = 1,
        activation=None,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        *,
        D_mul: int | None = None,
        **kwargs,
    ):
        super().__init__(
            kernel_size,
            strides,
            padding,
            data_format,
            dilation_rate,
            activation,
            use_bias,
            bias_initializer,
            bias_regularizer,
            activity_regularizer,
            bias_constraint,
            D_mul,
            **kwargs,
        )
        self.filters = core.check_int(filters, "filters")
        self.groups = core.check_int(groups, "groups")
        # The input channels are only known at build; groups stands in for them here.
        core.check_groups(self.groups, self.filters, self.groups)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)

    def _out_channels(self, in_channels: int) -> int:
        return self.filters

    def build(self, input_shape):
        """Create W, D and the bias for an input of ``input_shape`` (batch axis included)."""
        input_shape = tuple(input_shape)
        in_channels = self._in_channels_of(input_shape)
        try:
            core.check_groups(in_channels, self.filters, self.groups)
        except ValueError as err:
            raise ValueError(f"{err}, input_shape={input_shape}") from None
        self.compute_output_shape(input_shape)  # an input too small for the kernel fails here, eager or not
        self.in_channels = in_channels
        self._add_W_D(
            (self.D_mul, in_channels // self.groups, self.filters),
            in_channels,
            self.kernel_initializer,
            self.kernel_regularizer,
            self.kernel_constraint,
        )
        self._add_bias(self.filters)
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={self._channel_axis: in_channels})
        self.built = True

    def _fold(self):
        """The folded kernel, Keras layout ``(M, N, C_in/groups, filters)``, in the variable dtype."""
        W = ops.convert_to_tensor(self.W)
        C_in_g = self.in_channels // self.groups
        if self.D is None:
            return ops.reshape(W, self.kernel_size + (C_in_g, self.filters))
        folded = fold_kernel(self._D_hat(W.dtype), W, self.groups)  # a batched matmul (doconv.keras.fold)
        return ops.reshape(folded, self.kernel_size + (C_in_g, self.filters))

    @property
    def kernel(self):
        """The folded kernel ``(M, N, C_in/groups, filters)``, as ``Conv2D.kernel`` holds it."""
        self._check_built()
        return self._fold()

    def _composes_features(self, inputs, training) -> bool:
        """True where this training call is cheaper by feature composition (doconv.keras.composition).

        Only with ``training=True`` (what ``fit`` and ``train_on_batch`` pass), trainable W or D, the
        variable dtype as compute dtype, and a static input shape whose batch and spatial sizes are
        known: the choice is made once per trace, from ``core.training_composition``; an unknown
        size folds.
        """
        if not training or self.D is None or not composition.feature_composition_in_use():
            return False
        if not (self.W.trainable or self.D.trainable) or self.compute_dtype != self.W.dtype:
            return False
        positions = composition.static_positions(
            tuple(inputs.shape), self.kernel_size, self.strides, self.dilation_rate, self.padding, self.data_format
        )
        if positions is None:
            return False
        choice = core.training_composition(positions, self.in_channels, self.filters, self.groups, self.K, self.D_mul)
        return choice == "feature"

    def call(self, inputs, training=None):
        """Fold W and D and convolve (or compose features, see above); add the bias, apply the activation."""
        if self._composes_features(inputs, training):
            outputs = composition.compose_features(
                inputs,
                ops.convert_to_tensor(self.W),
                self._D_hat(self.W.dtype),
                self.groups,
                self.kernel_size,
                self.strides,
                self.padding,
                self.dilation_rate,
                self.data_format,
            )
            return self._finish(outputs)
        kernel = ops.cast(self._fold(), self.compute_dtype)
        outputs = ops.conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
        )
        return self._finish(outputs)

    def get_config(self) -> dict:
        """Layer config: ``Layer``'s (name, dtype, trainable) plus every constructor argument."""
        config = self._base_config()
        config.update(
            {
                "filters": self.filters,
                "groups": self.groups,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
            }
        )
        return config

    def fuse(self):
        """A ``keras.layers.Conv2D`` with this layer's config and the folded kernel: the same outputs.

        The kernel is trainable if W or D is, the bias as the bias.

        Returns:
            A built ``keras.layers.Conv2D`` (same name, dtype policy, trainable flag and arguments).

        Raises:
            ValueError: the layer is not built.

        Example:
            >>> import numpy as np, keras
            >>> layer = DOConv2D(4, 3)
            >>> x = np.random.rand(1, 6, 6, 2).astype("float32")
            >>> y = keras.ops.convert_to_numpy(layer(x))
            >>> conv = layer.fuse()
            >>> type(conv).__name__, bool(np.allclose(keras.ops.convert_to_numpy(conv(x)), y, atol=1e-5))
            ('Conv2D', True)
        """
        self._check_built(" before fusing")
        conv = self._native_from_config(keras.layers.Conv2D, _CONV_ARGS, self.in_channels)
        conv.kernel.assign(_numpy(self._fold()))
        conv.kernel.trainable = self.W.trainable or (self.D is not None and self.D.trainable)
        if self.use_bias:
            conv.bias.assign(_numpy(self.bias))
        _transfer_trainable([(self.bias, conv.bias)])
        return conv

    @classmethod
    def from_conv(cls, conv, D_mul: int | None = None) -> DOConv2D:
        """A DO-Conv layer computing exactly the outputs of a built ``keras.layers.Conv2D``.

        D = 0, the conv's kernel in W's first identity tile, zeros in the other
        tiles; W's columns past the last tile keep their random init (they meet a
        zero identity, so the output does not change, and they can still learn).
        W and D are trainable as the conv's kernel, the bias as its bias.

        Args:
            conv: a built ``keras.layers.Conv2D``.
            D_mul: depth multiplier; default None, i.e. K. At least K.

        Returns:
            A built ``DOConv2D`` with the conv's name, dtype policy, trainable flag and arguments.

        Raises:
            TypeError: ``conv`` is not exactly a ``Conv2D`` (a subclass may compute something else).
            ValueError: ``conv`` is not built, LoRA-enabled or quantized, or D_mul < K.

        Example:
            >>> import numpy as np, keras
            >>> conv = keras.layers.Conv2D(4, 3)
            >>> x = np.random.rand(1, 6, 6, 2).astype("float32")
            >>> y = keras.ops.convert_to_numpy(conv(x))
            >>> layer = DOConv2D.from_conv(conv, D_mul=12)
            >>> bool(np.allclose(keras.ops.convert_to_numpy(layer(x)), y, atol=1e-5))
            True
        """
        config = _check_native(conv, keras.layers.Conv2D, "conv")
        kernel = core.kernel_from_keras(_numpy(conv.kernel))
        layer = cls._from_native(conv, config, _CONV_ARGS, D_mul, kernel.shape[1] * config["groups"])
        W = core.embed_kernel(kernel, core.W_from_keras(_numpy(layer.W)))
        layer.W.assign(core.W_to_keras(W).astype(layer.W.dtype))
        if layer.use_bias:
            layer.bias.assign(_numpy(conv.bias))
        _transfer_trainable([(conv.kernel, layer.W), (conv.kernel, layer.D), (conv.bias, layer.bias)])
        return layer


class _DepthwiseBase(_DOConvBase):
    """The depthwise half that DODepthwiseConv2D and DOSeparableConv2D share: W ``(D_mul, C_in, M)``, D."""

    _native_name = "DepthwiseConv2D"

    def _depthwise_args(self, depth_multiplier, initializer, regularizer, constraint) -> None:
        if isinstance(depth_multiplier, int) and not isinstance(depth_multiplier, bool) and depth_multiplier < 1:
            # Keras's own wording.
            raise ValueError(
                "Invalid value for argument `depth_multiplier`. Expected a strictly positive value. "
                f"Received depth_multiplier={depth_multiplier}."
            )
        self.depth_multiplier = core.check_int(depth_multiplier, "depth_multiplier")
        self.depthwise_initializer = keras.initializers.get(initializer)
        self.depthwise_regularizer = keras.regularizers.get(regularizer)
        self.depthwise_constraint = keras.constraints.get(constraint)

    def _build_depthwise(self, input_shape) -> int:
        input_shape = tuple(input_shape)
        in_channels = self._in_channels_of(input_shape)
        self.compute_output_shape(input_shape)  # an input too small for the kernel fails here, eager or not
        self.in_channels = in_channels
        self._add_W_D(
            (self.D_mul, in_channels, self.depth_multiplier),
            in_channels,
            self.depthwise_initializer,
            self.depthwise_regularizer,
            self.depthwise_constraint,
        )
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={self._channel_axis: in_channels})
        return in_channels

    def _fold_depthwise(self):
        """The folded depthwise kernel ``(M, N, C_in, depth_multiplier)``, in the variable dtype.

        Output channel c·depth_multiplier + m of the depthwise conv is the grouped conv's output
        channel of the same index with groups = C_in, so this is :func:`doconv.core.fold` exactly.
        """
        W = ops.convert_to_tensor(self.W)
        shape = self.kernel_size + (self.in_channels, self.depth_multiplier)
        if self.D is None:
            return ops.reshape(W, shape)
        # Not fold_kernel's batched matmul: here W is D-sized (K·D_mul·C_in·M is small), per-op overhead
        # dominates, and measured on one core neither form was faster on every backend (docs/keras.rst, Speed).
        return ops.reshape(ops.einsum("ksc,scm->kcm", self._D_hat(W.dtype), W), shape)

    def _depthwise_config(self) -> dict:
        config = self._base_config()
        config.update(
            {
                "depth_multiplier": self.depth_multiplier,
                "depthwise_initializer": keras.initializers.serialize(self.depthwise_initializer),
                "depthwise_regularizer": keras.regularizers.serialize(self.depthwise_regularizer),
                "depthwise_constraint": keras.constraints.serialize(self.depthwise_constraint),
            }
        )
        return config

    def _W_to_canonical(self, W: np.ndarray) -> np.ndarray:
        """Keras W ``(D_mul, C_in, M)`` -> canonical ``(C_in·M, 1, D_mul)`` (groups = C_in)."""
        return core.W_from_keras(W.reshape(self.D_mul, 1, -1))

    def _W_from_canonical(self, W: np.ndarray) -> np.ndarray:
        return core.W_to_keras(W).reshape(self.D_mul, self.in_channels, self.depth_multiplier)

    def _embed_depthwise(self, kernel) -> None:
        """Put a native depthwise kernel ``(M, N, C_in, depth_multiplier)`` in W's first identity tile."""
        kernel = np.asarray(kernel)
        canonical = core.kernel_from_keras(kernel.reshape(kernel.shape[:2] + (1, -1)))
        W = core.embed_kernel(canonical, self._W_to_canonical(_numpy(self.W)))
        self.W.assign(self._W_from_canonical(W).astype(self.W.dtype))


@keras.saving.register_keras_serializable(package="doconv")
class DODepthwiseConv2D(_DepthwiseBase):
    """Depthwise over-parameterized depthwise convolution, a drop-in for ``keras.layers.DepthwiseConv2D``.

    The depthwise convolution (groups = C_in, ``depth_multiplier`` outputs per input
    channel, output channel ``c * depth_multiplier + m`` as in Keras) trained as a DO-Conv:
    the kernel is the composition of W and D + I, and the layer computes exactly
    ``depthwise_conv(x, fold(W, D))``. :meth:`fuse` gives a plain ``DepthwiseConv2D``.
    Its canonical parameters (:func:`~doconv.keras.get_params`) are those of a grouped
    ``doconv.torch.DOConv2d`` with groups = C_in and C_out = C_in * depth_multiplier.

    Weights (Keras layout): ``W`` ``(D_mul, C_in, depth_multiplier)``, initialised with
    ``depthwise_initializer`` on W's own shape; ``D`` ``(K, D_mul, C_in)``, zeros (absent
    when K = 1); ``bias`` ``(C_in * depth_multiplier,)`` when ``use_bias``. The depthwise
    regulariser and constraint apply to W and D.

    Args:
        kernel_size: int or 2 ints. K = product of the kernel sizes.
        strides: int or 2 ints. Default ``(1, 1)``.
        padding: ``'valid'`` (default) or ``'same'``.
        depth_multiplier: outputs per input channel. Default 1.
        data_format: ``'channels_last'``, ``'channels_first'`` or None
            (default: ``keras.config.image_data_format()``).
        dilation_rate: int or 2 ints. Default ``(1, 1)``. Not together with strides > 1.
        activation: activation applied after the bias. Default None.
        use_bias: whether to add a bias. Default True.
        depthwise_initializer: initialiser of W. Default ``'glorot_uniform'``.
        bias_initializer: initialiser of the bias. Default ``'zeros'``.
        depthwise_regularizer: regulariser of W and D. Default None.
        bias_regularizer: regulariser of the bias. Default None.
        activity_regularizer: regulariser of the output. Default None.
        depthwise_constraint: constraint on W and D. Default None.
        bias_constraint: constraint on the bias. Default None.
        D_mul: DO-Conv depth multiplier (the columns of W and D), keyword-only. Default
            None, i.e. K; at least K; always 1 for 1x1 kernels.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``, ``trainable``).

    Raises:
        ValueError: a bad argument (the message names it and the value), D_mul < K,
            strides > 1 with dilation_rate > 1; at build, an input smaller than the dilated kernel.

    Example:
        >>> import numpy as np
        >>> layer = DODepthwiseConv2D(3, depth_multiplier=2, padding="same")
        >>> y = layer(np.ones((1, 5, 5, 4), "float32"))
        >>> tuple(y.shape), tuple(layer.W.shape), tuple(layer.kernel.shape)
        ((1, 5, 5, 8), (9, 4, 2), (3, 3, 4, 2))
    """

    def __init__(
        self,
        kernel_size,
        strides=(1, 1),
        padding: str = "valid",
        depth_multiplier: int = 1,
        data_format: str | None = None,
        dilation_rate=(1, 1),
        activation=None,
        use_bias: bool = True,
        depthwise_initializer="glorot_uniform",
        bias_initializer="zeros",
        depthwise_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        depthwise_constraint=None,
        bias_constraint=None,
        *,
        D_mul: int | None = None,
        **kwargs,
    ):
        super().__init__(
            kernel_size,
            strides,
            padding,
            data_format,
            dilation_rate,
            activation,
            use_bias,
            bias_initializer,
            bias_regularizer,
            activity_regularizer,
            bias_constraint,
            D_mul,
            **kwargs,
        )
        self._depthwise_args(depth_multiplier, depthwise_initializer, depthwise_regularizer, depthwise_constraint)

    def _out_channels(self, in_channels: int) -> int:
        return in_channels * self.depth_multiplier

    def build(self, input_shape):
        """Create W, D and the bias for an input of ``input_shape`` (batch axis included)."""
        in_channels = self._build_depthwise(input_shape)
        self._add_bias(in_channels * self.depth_multiplier)
        self.built = True

    @property
    def kernel(self):
        """The folded kernel ``(M, N, C_in, depth_multiplier)``, as ``DepthwiseConv2D.kernel`` holds it."""
        self._check_built()
        return self._fold_depthwise()

    def call(self, inputs):
        """Fold W and D, run the depthwise convolution, add the bias and apply the activation."""
        outputs = ops.depthwise_conv(
            inputs,
            ops.cast(self._fold_depthwise(), self.compute_dtype),
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
        )
        return self._finish(outputs)

    def get_config(self) -> dict:
        """Layer config: ``Layer``'s (name, dtype, trainable) plus every constructor argument."""
        return self._depthwise_config()

    def fuse(self):
        """A ``keras.layers.DepthwiseConv2D`` with this layer's config and the folded kernel: the same outputs.

        Returns:
            A built ``keras.layers.DepthwiseConv2D`` (same name, dtype policy, trainable flag and arguments);
            its kernel is trainable if W or D is.

        Raises:
            ValueError: the layer is not built.

        Example:
            >>> import numpy as np, keras
            >>> layer = DODepthwiseConv2D(3, depth_multiplier=2)
            >>> x = np.random.rand(1, 6, 6, 2).astype("float32")
            >>> y = keras.ops.convert_to_numpy(layer(x))
            >>> conv = layer.fuse()
            >>> type(conv).__name__, bool(np.allclose(keras.ops.convert_to_numpy(conv(x)), y, atol=1e-5))
            ('DepthwiseConv2D', True)
        """
        self._check_built(" before fusing")
        conv = self._native_from_config(keras.layers.DepthwiseConv2D, _DEPTHWISE_ARGS, self.in_channels)
        conv.kernel.assign(_numpy(self._fold_depthwise()))
        conv.kernel.trainable = self.W.trainable or (self.D is not None and self.D.trainable)
        if self.use_bias:
            conv.bias.assign(_numpy(self.bias))
        _transfer_trainable([(self.bias, conv.bias)])
        return conv

    @classmethod
    def from_conv(cls, conv, D_mul: int | None = None) -> DODepthwiseConv2D:
        """A DO-Conv layer computing exactly the outputs of a built ``keras.layers.DepthwiseConv2D``.

        As :meth:`DOConv2D.from_conv`: D = 0, the kernel in W's first identity tile; W and D
        are trainable as the kernel, the bias as the bias.

        Args:
            conv: a built ``keras.layers.DepthwiseConv2D``.
            D_mul: DO-Conv depth multiplier; default None, i.e. K. At least K.

        Returns:
            A built ``DODepthwiseConv2D`` with the conv's name, dtype policy, trainable flag and arguments.

        Raises:
            TypeError: ``conv`` is not exactly a ``DepthwiseConv2D``.
            ValueError: ``conv`` is not built, or D_mul < K.

        Example:
            >>> import numpy as np, keras
            >>> conv = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)
            >>> x = np.random.rand(1, 6, 6, 3).astype("float32")
            >>> y = keras.ops.convert_to_numpy(conv(x))
            >>> layer = DODepthwiseConv2D.from_conv(conv)
            >>> bool(np.allclose(keras.ops.convert_to_numpy(layer(x)), y, atol=1e-5))
            True
        """
        config = _check_native(conv, keras.layers.DepthwiseConv2D, "conv")
        kernel = _numpy(conv.kernel)
        layer = cls._from_native(conv, config, _DEPTHWISE_ARGS, D_mul, kernel.shape[2])
        layer._embed_depthwise(kernel)
        if layer.use_bias:
            layer.bias.assign(_numpy(conv.bias))
        _transfer_trainable([(conv.kernel, layer.W), (conv.kernel, layer.D), (conv.bias, layer.bias)])
        return layer


@keras.saving.register_keras_serializable(package="doconv")
class DOSeparableConv2D(_DepthwiseBase):
    """A drop-in for ``keras.layers.SeparableConv2D`` whose depthwise part is a DO-Conv.

    The depthwise part is :class:`DODepthwiseConv2D`'s (W, D, groups = C_in); the pointwise
    part is an ordinary 1x1 kernel (K = 1: DO-Conv would add nothing there). The layer computes
    exactly ``separable_conv(x, fold(W, D), pointwise_kernel)`` and :meth:`fuse` gives a plain
    ``SeparableConv2D``.

    Weights (Keras layout): ``W`` ``(D_mul, C_in, depth_multiplier)``, ``D`` ``(K, D_mul, C_in)``
    (as in ``DODepthwiseConv2D``), ``pointwise_kernel`` ``(1, 1, C_in * depth_multiplier, filters)``
    and ``bias`` ``(filters,)`` when ``use_bias``.

    Args:
        filters: number of output channels.
        kernel_size: int or 2 ints, the depthwise kernel. K = product of the kernel sizes.
        strides: int or 2 ints. Default ``(1, 1)``.
        padding: ``'valid'`` (default) or ``'same'``.
        data_format: ``'channels_last'``, ``'channels_first'`` or None
            (default: ``keras.config.image_data_format()``).
        dilation_rate: int or 2 ints. Default ``(1, 1)``. Not together with strides > 1.
        depth_multiplier: depthwise outputs per input channel. Default 1.
        activation: activation applied after the bias. Default None.
        use_bias: whether to add a bias. Default True.
        depthwise_initializer: initialiser of W. Default ``'glorot_uniform'``.
        pointwise_initializer: initialiser of the pointwise kernel. Default ``'glorot_uniform'``.
        bias_initializer: initialiser of the bias. Default ``'zeros'``.
        depthwise_regularizer: regulariser of W and D. Default None.
        pointwise_regularizer: regulariser of the pointwise kernel. Default None.
        bias_regularizer: regulariser of the bias. Default None.
        activity_regularizer: regulariser of the output. Default None.
        depthwise_constraint: constraint on W and D. Default None.
        pointwise_constraint: constraint on the pointwise kernel. Default None.
        bias_constraint: constraint on the bias. Default None.
        D_mul: DO-Conv depth multiplier of the depthwise part, keyword-only. Default None, i.e. K.
        **kwargs: ``keras.layers.Layer`` arguments (``name``, ``dtype``, ``trainable``).

    Raises:
        ValueError: as :class:`DODepthwiseConv2D`, and ``filters`` not positive.

    Example:
        >>> import numpy as np
        >>> layer = DOSeparableConv2D(6, 3, padding="same")
        >>> y = layer(np.ones((1, 5, 5, 4), "float32"))
        >>> tuple(y.shape), tuple(layer.W.shape), tuple(layer.pointwise_kernel.shape)
        ((1, 5, 5, 6), (9, 4, 1), (1, 1, 4, 6))
    """

    _native_name = "SeparableConv2D"

    def __init__(
        self,
        filters: int,
        kernel_size,
        strides=(1, 1),
        padding: str = "valid",
        data_format: str | None = None,
        dilation_rate=(1, 1),
        depth_multiplier: int = 1,
        activation=None,
        use_bias: bool = True,
        depthwise_initializer="glorot_uniform",
        pointwise_initializer="glorot_uniform",
        bias_initializer="zeros",
        depthwise_regularizer=None,
        pointwise_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        depthwise_constraint=None,
        pointwise_constraint=None,
        bias_constraint=None,
        *,
        D_mul: int | None = None,
        **kwargs,
    ):
        super().__init__(
            kernel_size,
            strides,
            padding,
            data_format,
            dilation_rate,
            activation,
            use_bias,
            bias_initializer,
            bias_regularizer,
            activity_regularizer,
            bias_constraint,
            D_mul,
            **kwargs,
        )
        self.filters = core.check_int(filters, "filters")
        self._depthwise_args(depth_multiplier, depthwise_initializer, depthwise_regularizer, depthwise_constraint)
        self.pointwise_initializer = keras.initializers.get(pointwise_initializer)
        self.pointwise_regularizer = keras.regularizers.get(pointwise_regularizer)
        self.pointwise_constraint = keras.constraints.get(pointwise_constraint)
        self.pointwise_kernel = None

    def _out_channels(self, in_channels: int) -> int:
        return self.filters

    def build(self, input_shape):
        """Create W, D, the pointwise kernel and the bias for an input of ``input_shape``."""
        in_channels = self._build_depthwise(input_shape)
        self.pointwise_kernel = self.add_weight(
            name="pointwise_kernel",
            shape=(1, 1, in_channels * self.depth_multiplier, self.filters),
            initializer=self.pointwise_initializer,
            regularizer=self.pointwise_regularizer,
            constraint=self.pointwise_constraint,
        )
        self._add_bias(self.filters)
        self.built = True

    @property
    def depthwise_kernel(self):
        """The folded depthwise kernel ``(M, N, C_in, depth_multiplier)``, as ``SeparableConv2D`` holds it."""
        self._check_built()
        return self._fold_depthwise()

    def call(self, inputs):
        """Fold W and D, run the separable convolution, add the bias and apply the activation."""
        outputs = ops.separable_conv(
            inputs,
            ops.cast(self._fold_depthwise(), self.compute_dtype),
            ops.cast(self.pointwise_kernel, self.compute_dtype),
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
        )
        return self._finish(outputs)

    def get_config(self) -> dict:
        """Layer config: ``Layer``'s (name, dtype, trainable) plus every constructor argument."""
        config = self._depthwise_config()
        config.update(
            {
                "filters": self.filters,
                "pointwise_initializer": keras.initializers.serialize(self.pointwise_initializer),
                "pointwise_regularizer": keras.regularizers.serialize(self.pointwise_regularizer),
                "pointwise_constraint": keras.constraints.serialize(self.pointwise_constraint),
            }
        )
        return config

    def fuse(self):
        """A ``keras.layers.SeparableConv2D`` with the folded depthwise kernel: the same outputs.

        Returns:
            A built ``keras.layers.SeparableConv2D`` (same name, dtype policy, trainable flag and
            arguments); its depthwise kernel is trainable if W or D is.

        Raises:
            ValueError: the layer is not built.

        Example:
            >>> import numpy as np, keras
            >>> layer = DOSeparableConv2D(4, 3)
            >>> x = np.random.rand(1, 6, 6, 2).astype("float32")
            >>> y = keras.ops.convert_to_numpy(layer(x))
            >>> conv = layer.fuse()
            >>> type(conv).__name__, bool(np.allclose(keras.ops.convert_to_numpy(conv(x)), y, atol=1e-5))
            ('SeparableConv2D', True)
        """
        self._check_built(" before fusing")
        conv = self._native_from_config(keras.layers.SeparableConv2D, _SEPARABLE_ARGS, self.in_channels)
        conv.depthwise_kernel.assign(_numpy(self._fold_depthwise()))
        conv.depthwise_kernel.trainable = self.W.trainable or (self.D is not None and self.D.trainable)
        conv.pointwise_kernel.assign(_numpy(self.pointwise_kernel))
        if self.use_bias:
            conv.bias.assign(_numpy(self.bias))
        _transfer_trainable([(self.pointwise_kernel, conv.pointwise_kernel), (self.bias, conv.bias)])
        return conv

    @classmethod
    def from_conv(cls, conv, D_mul: int | None = None) -> DOSeparableConv2D:
        """A layer computing exactly the outputs of a built ``keras.layers.SeparableConv2D``.

        The depthwise kernel goes into W as in :meth:`DODepthwiseConv2D.from_conv`; the pointwise
        kernel and the bias are copied. Each weight keeps its trainable flag (W and D the depthwise kernel's).

        Args:
            conv: a built ``keras.layers.SeparableConv2D``.
            D_mul: DO-Conv depth multiplier of the depthwise part; default None, i.e. K. At least K.

        Returns:
            A built ``DOSeparableConv2D`` with the conv's name, dtype policy, trainable flag and arguments.

        Raises:
            TypeError: ``conv`` is not exactly a ``SeparableConv2D``.
            ValueError: ``conv`` is not built, or D_mul < K.

        Example:
            >>> import numpy as np, keras
            >>> conv = keras.layers.SeparableConv2D(4, 3)
            >>> x = np.random.rand(1, 6, 6, 3).astype("float32")
            >>> y = keras.ops.convert_to_numpy(conv(x))
            >>> layer = DOSeparableConv2D.from_conv(conv)
            >>> bool(np.allclose(keras.ops.convert_to_numpy(layer(x)), y, atol=1e-5))
            True
        """
        config = _check_native(conv, keras.layers.SeparableConv2D, "conv")
        kernel = _numpy(conv.depthwise_kernel)
        layer = cls._from_native(conv, config, _SEPARABLE_ARGS, D_mul, kernel.shape[2])
        layer._embed_depthwise(kernel)
        layer.pointwise_kernel.assign(_numpy(conv.pointwise_kernel))
        if layer.use_bias:
            layer.bias.assign(_numpy(conv.bias))
        _transfer_trainable(
            [
                (conv.depthwise_kernel, layer.W),
                (conv.depthwise_kernel, layer.D),
                (conv.pointwise_kernel, layer.pointwise_kernel),
                (conv.bias, layer.bias),
            ]
        )
        return layer


DO_LAYERS = (DOConv2D, DODepthwiseConv2D, DOSeparableConv2D)
