"""DO-Conv for Keras 3: ``DOConv2D``, a drop-in for ``keras.layers.Conv2D``.

The layer stores W ``(D_mul, C_in/groups, filters)``, the depthwise offset D
``(K, D_mul, C_in)`` and the bias, folds W and D into an ordinary kernel with
``keras.ops`` on every call and runs ``keras.ops.conv``, so it works on the
tensorflow, jax and torch backends. The maths, argument checks and layout
conversions live in :mod:`doconv.core`; this module only creates weights and
calls Keras ops.

Example:
    >>> import numpy as np
    >>> from doconv.keras import DOConv2D
    >>> layer = DOConv2D(8, 3, padding="same")
    >>> tuple(layer(np.zeros((2, 16, 16, 4), "float32")).shape)
    (2, 16, 16, 8)
    >>> tuple(layer.W.shape), tuple(layer.D.shape)
    ((9, 4, 8), (9, 9, 4))
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from . import core
from ._optional import require

keras = require("keras", "doconv.keras", "keras", "Keras 3")
ops = keras.ops
# Keras exports no public name for "a model built from inputs and outputs", which clone_model needs.
from keras.src.models.functional import Functional as _Functional  # noqa: E402

__all__ = ["DOConv2D", "convert_model", "fuse_model", "get_params", "set_params"]

# Conv2D arguments in Keras 3's order; from_conv and fuse translate configs through them.
_CONV_ARGS = (
    "filters",
    "kernel_size",
    "strides",
    "padding",
    "data_format",
    "dilation_rate",
    "groups",
    "activation",
    "use_bias",
    "kernel_initializer",
    "bias_initializer",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
)
_LAYER_ARGS = ("name", "trainable", "dtype")


def _numpy(x) -> np.ndarray:
    # Through a tensor: np.array() of a TF variable warns about the `copy` keyword under NumPy 2.
    return np.array(ops.convert_to_numpy(ops.convert_to_tensor(x)))


@keras.saving.register_keras_serializable(package="doconv")
class DOConv2D(keras.layers.Layer):
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
            divisible by groups.

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
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        self.rank = 2
        self.filters = core.check_int(filters, "filters")
        self.kernel_size = core.normalize_tuple(kernel_size, 2, "kernel_size")
        self.strides = core.normalize_tuple(strides, 2, "strides")
        self.dilation_rate = core.normalize_tuple(dilation_rate, 2, "dilation_rate")
        # Keras convolutions take only the two strings; core accepts explicit pads too.
        if not isinstance(padding, str) or padding.lower() not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', as for Conv2D. Received: padding={padding!r}")
        self.padding = core.normalize_padding(padding, 2)
        if data_format is None:
            data_format = keras.config.image_data_format()
        self.data_format = core.normalize_data_format(data_format)
        self.groups = core.check_int(groups, "groups")
        # The input channels are only known at build; groups stands in for them here.
        core.check_groups(self.groups, self.filters, self.groups)
        core.check_stride_dilation(self.strides, self.dilation_rate)
        self.D_mul = core.resolve_D_mul(D_mul, self.kernel_size)
        self.K = core.kernel_volume(self.kernel_size)
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)
        self.input_spec = keras.layers.InputSpec(ndim=4)
        self.W = self.D = self.bias = None
        self._identity = None

    @property
    def _channel_axis(self) -> int:
        return -1 if self.data_format == core.CHANNELS_LAST else 1

    def build(self, input_shape):
        """Create W, D and the bias for an input of ``input_shape`` (batch axis included)."""
        input_shape = tuple(input_shape)
        in_channels = input_shape[self._channel_axis]
        if in_channels is None:
            raise ValueError(
                f"The channel dimension of the input must be known. Received: input_shape={input_shape}, "
                f"data_format={self.data_format!r}"
            )
        try:
            core.check_groups(in_channels, self.filters, self.groups)
        except ValueError as err:
            raise ValueError(f"{err}, input_shape={input_shape}") from None
        self.in_channels = int(in_channels)
        # autocast=False: under a mixed precision policy the fold runs in the variable dtype
        # and only the folded kernel is cast to the compute dtype.
        self.W = self.add_weight(
            name="W",
            shape=(self.D_mul, self.in_channels // self.groups, self.filters),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
            autocast=False,
        )
        if self.K > 1:
            self.D = self.add_weight(
                name="D",
                shape=(self.K, self.D_mul, self.in_channels),
                initializer="zeros",
                regularizer=self.kernel_regularizer,
                constraint=self.kernel_constraint,
                autocast=False,
            )
            self._identity = core.identity(self.K, self.D_mul)
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.filters,),
                initializer=self.bias_initializer,
                regularizer=self.bias_regularizer,
                constraint=self.bias_constraint,
            )
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={self._channel_axis: self.in_channels})
        self.built = True

    def _fold(self):
        """The folded kernel, Keras layout ``(M, N, C_in/groups, filters)``, in the variable dtype."""
        W = ops.convert_to_tensor(self.W)
        C_in_g = self.in_channels // self.groups
        if self.D is None:
            return ops.reshape(W, self.kernel_size + (C_in_g, self.filters))
        D_hat = ops.convert_to_tensor(self.D) + ops.cast(self._identity[:, :, None], W.dtype)
        if self.groups == 1:
            folded = ops.einsum("ksc,sco->kco", D_hat, W)
        else:
            # Group-major views: group gi pairs its W columns only with its own C_in/g channels of D.
            g = self.groups
            D_hat = ops.reshape(D_hat, (self.K, self.D_mul, g, C_in_g))
            Wg = ops.reshape(W, (self.D_mul, C_in_g, g, self.filters // g))
            folded = ops.einsum("ksgc,scgo->kcgo", D_hat, Wg)
        return ops.reshape(folded, self.kernel_size + (C_in_g, self.filters))

    @property
    def kernel(self):
        """The folded kernel ``(M, N, C_in/groups, filters)``, as ``Conv2D.kernel`` holds it."""
        if not self.built:
            raise ValueError(f"Layer {self.name!r} is not built yet: call it on an input first.")
        return self._fold()

    def call(self, inputs):
        """Fold W and D, convolve, add the bias and apply the activation."""
        kernel = ops.cast(self._fold(), self.compute_dtype)
        outputs = ops.conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            data_format=self.data_format,
            dilation_rate=self.dilation_rate,
        )
        if self.use_bias:
            shape = (1, 1, 1, self.filters) if self.data_format == core.CHANNELS_LAST else (1, self.filters, 1, 1)
            outputs = ops.add(outputs, ops.reshape(ops.cast(self.bias, outputs.dtype), shape))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        """The output shape for ``input_shape``, as ``Conv2D`` computes it."""
        input_shape = tuple(input_shape)
        spatial = input_shape[1:3] if self.data_format == core.CHANNELS_LAST else input_shape[2:4]
        out = tuple(
            None if n is None else core.output_shape((n,), (k,), (s,), (d,), self.padding)[0]
            for n, k, s, d in zip(spatial, self.kernel_size, self.strides, self.dilation_rate)
        )
        if self.data_format == core.CHANNELS_LAST:
            return (input_shape[0],) + out + (self.filters,)
        return (input_shape[0], self.filters) + out

    def get_config(self) -> dict:
        """Layer config: ``Layer``'s (name, dtype, trainable) plus every constructor argument."""
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "data_format": self.data_format,
                "dilation_rate": self.dilation_rate,
                "groups": self.groups,
                "activation": keras.activations.serialize(self.activation),
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
                "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
                "activity_regularizer": keras.regularizers.serialize(self.activity_regularizer),
                "kernel_constraint": keras.constraints.serialize(self.kernel_constraint),
                "bias_constraint": keras.constraints.serialize(self.bias_constraint),
                "D_mul": self.D_mul,
            }
        )
        return config

    def _input_shape_for_build(self, in_channels: int) -> tuple:
        if self.data_format == core.CHANNELS_LAST:
            return (None, None, None, in_channels)
        return (None, in_channels, None, None)

    def fuse(self):
        """A ``keras.layers.Conv2D`` with this layer's config and the folded kernel: the same outputs.

        Returns:
            A built ``keras.layers.Conv2D`` (same name, dtype policy and arguments).

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
        if not self.built:
            raise ValueError(f"Layer {self.name!r} is not built yet: call it on an input before fusing.")
        config = self.get_config()
        conv = keras.layers.Conv2D.from_config({k: config[k] for k in _LAYER_ARGS + _CONV_ARGS})
        conv.build(self._input_shape_for_build(self.in_channels))
        weights = [_numpy(self._fold())]
        if self.use_bias:
            weights.append(_numpy(self.bias))
        conv.set_weights(weights)
        return conv

    @classmethod
    def from_conv(cls, conv, D_mul: int | None = None) -> DOConv2D:
        """A DO-Conv layer computing exactly the outputs of a built ``keras.layers.Conv2D``.

        D = 0, the conv's kernel in W's first identity tile, zeros in the other
        tiles; W's columns past the last tile keep their random init (they meet a
        zero identity, so the output does not change, and they can still learn).

        Args:
            conv: a built ``keras.layers.Conv2D``.
            D_mul: depth multiplier; default None, i.e. K. At least K.

        Returns:
            A built ``DOConv2D`` with the conv's name, dtype policy and arguments.

        Raises:
            TypeError: ``conv`` is not a ``Conv2D``.
            ValueError: ``conv`` is not built, or D_mul < K.

        Example:
            >>> import numpy as np, keras
            >>> conv = keras.layers.Conv2D(4, 3)
            >>> x = np.random.rand(1, 6, 6, 2).astype("float32")
            >>> y = keras.ops.convert_to_numpy(conv(x))
            >>> layer = DOConv2D.from_conv(conv, D_mul=12)
            >>> bool(np.allclose(keras.ops.convert_to_numpy(layer(x)), y, atol=1e-5))
            True
        """
        if not isinstance(conv, keras.layers.Conv2D):
            raise TypeError(f"conv must be a keras.layers.Conv2D. Received: conv={conv!r}")
        if not conv.built:
            raise ValueError(f"conv must be built (called on an input) first. Received: conv={conv.name!r}")
        config = conv.get_config()
        if config.get("lora_rank"):
            raise ValueError(f"A LoRA-enabled Conv2D cannot be converted. Received: lora_rank={config['lora_rank']}")
        # Called directly, not through from_config, which would turn a ValueError (D_mul < K) into a TypeError.
        layer = cls(
            **{k: config[k] for k in _CONV_ARGS},
            D_mul=D_mul,
            name=conv.name,
            trainable=conv.trainable,
            dtype=conv.dtype_policy,
        )
        kernel = core.kernel_from_keras(_numpy(conv.kernel))
        layer.build(layer._input_shape_for_build(kernel.shape[1] * layer.groups))
        W = core.embed_kernel(kernel, core.W_from_keras(_numpy(layer.W)))
        layer.W.assign(core.W_to_keras(W).astype(layer.W.dtype))
        if layer.use_bias:
            layer.bias.assign(_numpy(conv.bias))
        return layer


def _check_built(layer) -> None:
    if not isinstance(layer, DOConv2D):
        raise TypeError(f"layer must be a doconv.keras.DOConv2D. Received: layer={layer!r}")
    if not layer.built:
        raise ValueError(f"Layer {layer.name!r} is not built yet: call it on an input first.")


def _canonical_shapes(layer: DOConv2D) -> dict:
    C_in_g = layer.in_channels // layer.groups
    return {
        "W": (layer.filters, C_in_g, layer.D_mul),
        "D": None if layer.D is None else (layer.in_channels, layer.K, layer.D_mul),
        "bias": (layer.filters,) if layer.use_bias else None,
    }


def get_params(layer: DOConv2D) -> dict:
    """A built layer's parameters as NumPy arrays in the canonical (PyTorch) layout.

    Args:
        layer: a built ``DOConv2D``.

    Returns:
        ``{"W": (C_out, C_in/g, D_mul), "D": (C_in, K, D_mul) or None, "bias": (C_out,) or None}``.

    Example:
        >>> import numpy as np
        >>> layer = DOConv2D(8, 3, groups=2)
        >>> _ = layer(np.zeros((1, 5, 5, 4), "float32"))
        >>> {k: None if v is None else v.shape for k, v in get_params(layer).items()}
        {'W': (8, 2, 9), 'D': (4, 9, 9), 'bias': (8,)}
    """
    _check_built(layer)
    return {
        "W": core.W_from_keras(_numpy(layer.W)),
        "D": None if layer.D is None else core.D_from_keras(_numpy(layer.D)),
        "bias": None if layer.bias is None else _numpy(layer.bias),
    }


def set_params(layer: DOConv2D, params: dict) -> DOConv2D:
    """Load canonical-layout parameters (as :func:`get_params` returns them) into a built layer.

    Args:
        layer: a built ``DOConv2D``.
        params: ``{"W": ..., "D": ..., "bias": ...}``; D and bias are None where the
            layer has none (1x1 kernel, ``use_bias=False``) and may then be left out.

    Returns:
        ``layer``, for chaining.

    Raises:
        ValueError: an unknown entry, a missing one, or a shape that does not match
            the layer (the message names the entry and both shapes).

    Example:
        >>> import numpy as np, keras
        >>> layer = DOConv2D(2, 1, use_bias=False)
        >>> _ = layer(np.zeros((1, 3, 3, 2), "float32"))
        >>> _ = set_params(layer, {"W": np.ones((2, 2, 1), "float32")})
        >>> float(keras.ops.convert_to_numpy(layer(np.ones((1, 3, 3, 2), "float32")))[0, 0, 0, 0])
        2.0
    """
    _check_built(layer)
    unknown = set(params) - {"W", "D", "bias"}
    if unknown:
        raise ValueError(f"params has unknown entries {sorted(unknown)}; expected 'W', 'D' and 'bias'.")
    expected = _canonical_shapes(layer)
    arrays = {}
    for name, shape in expected.items():
        value = params.get(name)
        got = None if value is None else np.shape(value)
        if got != shape:
            raise ValueError(
                f"params[{name!r}] must have shape {shape} for layer {layer.name!r}. Received: shape {got}"
            )
        arrays[name] = None if value is None else np.asarray(value)
    layer.W.assign(core.W_to_keras(arrays["W"]).astype(layer.W.dtype))
    if arrays["D"] is not None:
        layer.D.assign(core.D_to_keras(arrays["D"]).astype(layer.D.dtype))
    if arrays["bias"] is not None:
        layer.bias.assign(arrays["bias"].astype(layer.bias.dtype))
    return layer


def _copy_layer(layer):
    """A new layer with ``layer``'s config and weights (clone_model alone would re-initialise them)."""
    new = layer.__class__.from_config(layer.get_config())
    if layer.built:
        build_config = layer.get_build_config()
        if build_config:
            new.build_from_config(build_config)
        if new.built and layer.weights:
            new.set_weights([_numpy(w) for w in layer.weights])
    return new


def _clone(model, replace: Callable[[Any], Any]):
    """Clone a Sequential or Functional ``model``, replacing layers by ``replace(layer)`` (None: copy)."""
    if not isinstance(model, (keras.Sequential, _Functional)):
        raise TypeError(
            f"model must be a keras.Sequential or a Functional keras.Model. Received: {type(model).__name__}"
        )

    def clone_function(layer):
        new = replace(layer)
        return _copy_layer(layer) if new is None else new

    return keras.models.clone_model(model, clone_function=clone_function, recursive=True)


def fuse_model(model):
    """A copy of ``model`` with every ``DOConv2D`` fused into a ``keras.layers.Conv2D``.

    The given model is not modified. The copy computes the same outputs and has
    the parameter count and per-call cost of the plain network.

    Args:
        model: a ``keras.Sequential`` or Functional ``keras.Model`` (nested models are fused too).

    Returns:
        The fused copy. If the model has no ``DOConv2D``, a plain copy and a warning.

    Raises:
        TypeError: a subclassed model (it cannot be cloned).

    Example:
        >>> import numpy as np, keras
        >>> model = keras.Sequential([keras.Input((8, 8, 3)), DOConv2D(4, 3)])
        >>> fused = fuse_model(model)
        >>> [type(layer).__name__ for layer in fused.layers]
        ['Conv2D']
    """
    found = []

    def replace(layer):
        if isinstance(layer, DOConv2D):
            found.append(layer.name)
            return layer.fuse()
        return None

    clone = _clone(model, replace)
    if not found:
        warnings.warn(f"Model {model.name!r} has no DOConv2D layer to fuse; returning a copy.", stacklevel=2)
    return clone


def convert_model(model, D_mul: int | Callable[[str, Any], int | None] | None = None):
    """A copy of ``model`` with its ``keras.layers.Conv2D`` layers replaced by ``DOConv2D``.

    Every converted layer computes exactly the conv's outputs (see
    :meth:`DOConv2D.from_conv`), so a trained network can be fine-tuned as
    DO-Conv. The given model is not modified.

    Args:
        model: a ``keras.Sequential`` or Functional ``keras.Model`` (nested models are converted too).
        D_mul: None (default): each layer's K. An int: ``max(D_mul, K)`` per layer, with one
            warning naming the layers whose K was larger. A callable
            ``(name, conv) -> int | None`` decides per layer; None leaves that conv as it is.

    Returns:
        The converted copy. If nothing was converted, a plain copy and a warning.

    Raises:
        TypeError: a subclassed model (it cannot be cloned).
        ValueError: a callable returned D_mul < K.

    Example:
        >>> import numpy as np, keras
        >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)])
        >>> converted = convert_model(model, D_mul=12)
        >>> [(type(layer).__name__, layer.D_mul) for layer in converted.layers]
        [('DOConv2D', 12)]
    """
    converted, raised = [], []
    if D_mul is not None and not callable(D_mul):
        D_mul = core.check_int(D_mul, "D_mul")

    def replace(layer):
        if not isinstance(layer, keras.layers.Conv2D):
            return None
        K = core.kernel_volume(layer.kernel_size)
        if D_mul is None:
            wanted = None
        elif callable(D_mul):
            wanted = D_mul(layer.name, layer)
            if wanted is None:
                return None
        else:
            wanted = max(D_mul, K)
            if K > D_mul:
                raised.append(layer.name)
        converted.append(layer.name)
        return DOConv2D.from_conv(layer, D_mul=wanted)

    clone = _clone(model, replace)
    if raised:
        warnings.warn(
            f"D_mul={D_mul} is smaller than K = prod(kernel_size) of {len(raised)} layer(s), which use D_mul = K: "
            f"{', '.join(raised)}",
            stacklevel=2,
        )
    if not converted:
        warnings.warn(f"Model {model.name!r} has no Conv2D layer to convert; returning a copy.", stacklevel=2)
    return clone
