"""Feature composition for the Keras layers: D + I applied to the input patches, then W, in ``keras.ops``.

Folding costs the same whatever the batch and image size; feature composition costs in proportion to
the output positions (docs/maths.rst). Where a training batch has far fewer positions than the kernel
has entries (a ResNet's last stages on small images), applying D_hat as a depthwise convolution and W
as a 1x1 product skips the fold and its gradient. ``core.training_composition`` picks the order; both
give the same outputs and gradients up to rounding.
"""

from __future__ import annotations

from .. import core
from .._optional import require
from .fold import einsum_backend

keras = require("keras", "doconv.keras", "keras", "Keras 3")
ops = keras.ops

_FEATURES = core.Switch()  # use_feature_composition's setting


def use_feature_composition(enabled: bool) -> bool:
    """Let DOConv2D train by feature composition where it is the cheaper order (the default).

    Turn it off to fold in every training step, e.g. to compare the two orders. A model traced
    (``tf.function``, ``jax.jit``) before the switch keeps the order it was traced with until it is
    traced again (``model.compile`` again, or a new input shape).

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


def static_positions(input_shape, kernel_size, strides, dilation_rate, padding, data_format) -> int | None:
    """Output positions of the whole batch (batch x output pixels), or None where the static shape lacks one.

    A symbolic input with an unknown batch or spatial size (a Functional model's ``Input``, a
    ``tf.function`` traced with a relaxed shape) gives None: the layer then folds, whose cost does
    not depend on the input.
    """
    spatial = input_shape[1:3] if data_format == core.CHANNELS_LAST else input_shape[2:4]
    if input_shape[0] is None or any(n is None for n in spatial):
        return None
    try:
        out = core.output_shape(tuple(int(n) for n in spatial), kernel_size, strides, dilation_rate, padding)
    except ValueError:
        return None  # smaller than the kernel: the native convolution says so
    return int(input_shape[0]) * out[0] * out[1]


def _patches(x, kernel_size, strides, dilation_rate, padding):
    """The input's K taps at every output position, ``(N, H_out, W_out, K, C_in)``, from a channels_last ``x``.

    Zero-padded exactly as the convolution pads ('same': TensorFlow's split, core.same_padding), then
    one slice per tap: plain slicing, whose gradient is a pad, on every backend and under XLA (XLA's
    CPU depthwise convolution with a depth multiplier, the other way to apply D_hat, trains an order
    of magnitude slower than the fold). With stride 1 each tap is a contiguous window, ``ops.slice``:
    TensorFlow differentiates a strided slice by a StridedSliceGrad, about 0.4 ms a tap dearer on a
    512-channel 2x2 batch of 16 (``python -m doconv.benchmarks.bench_keras_layer``; docs/keras.rst).
    """
    spatial = tuple(int(n) for n in x.shape[1:3])
    pads = core.padding_pairs(padding, kernel_size, strides, dilation_rate, spatial)
    H_out, W_out = core.output_shape(spatial, kernel_size, strides, dilation_rate, padding)
    if any(p for pair in pads for p in pair):
        x = ops.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation_rate
    n, C_in = int(x.shape[0]), int(x.shape[3])
    if (sh, sw) == (1, 1):
        taps = [ops.slice(x, (0, i * dh, j * dw, 0), (n, H_out, W_out, C_in)) for i in range(kh) for j in range(kw)]
    else:
        taps = [
            x[:, i * dh : i * dh + (H_out - 1) * sh + 1 : sh, j * dw : j * dw + (W_out - 1) * sw + 1 : sw, :]
            for i in range(kh)
            for j in range(kw)
        ]
    return ops.stack(taps, axis=3)


def compose_features(inputs, W, D_hat, groups: int, kernel_size, strides, padding, dilation_rate, data_format):
    """A DOConv2D output (bias and activation aside) by feature composition, in differentiable ``keras.ops``.

    ``y[p, o] = sum_{c, s} W[s, c, o] · sum_k D_hat[k, s, i(o, c)] · x_patch[p, k, i(o, c)]``: D_hat
    applied to the input patches (the depthwise step), then each group's ``C_in/g · D_mul`` features
    contracted with its columns of W. Exactly the folded convolution, summed in another order.

    Args:
        inputs: ``(N, H, W, C_in)`` or ``(N, C_in, H, W)`` per ``data_format``, with a static shape.
        W: Keras layout ``(D_mul, C_in/g, filters)``; D_hat: D + I ``(K, D_mul, C_in)``; both in the
            input's dtype.
        groups: number of groups; kernel_size, strides, dilation_rate: pairs; padding: 'same' or 'valid'.
        data_format: ``'channels_last'`` or ``'channels_first'``.

    Returns:
        ``(N, H_out, W_out, filters)`` or ``(N, filters, H_out, W_out)``.
    """
    filters = W.shape[2]
    channels_first = data_format != core.CHANNELS_LAST
    # Few positions by construction (that is when this runs): moving the input's axes is cheap.
    x = ops.transpose(inputs, (0, 2, 3, 1)) if channels_first else inputs
    patches = _patches(x, kernel_size, strides, dilation_rate, padding)
    n, h, w = patches.shape[:3]
    if einsum_backend():
        y = _compose_einsum(patches, W, D_hat, groups)
    else:
        y = _compose_matmul(patches, W, D_hat, groups)
    y = ops.reshape(y, (n, h, w, filters))
    return ops.transpose(y, (0, 3, 1, 2)) if channels_first else y


def _compose_matmul(patches, W, D_hat, groups: int):
    """Both products as matrix products, ``(positions, filters)``: tensorflow's and jax's path.

    The features are laid out in W's own row order (s, c), so for groups = 1 W enters its product
    as a reshape and no transpose moves a W-sized tensor; the others move patch-, feature- or
    D-sized ones. As two einsums (the torch backend's form) a 3x3 512->512 layer at 2x2, batch 16,
    took 17.0 ms for its forward and gradients on TensorFlow's graph against 8.8 ms this way
    (``python -m doconv.benchmarks.bench_keras_layer``; docs/keras.rst).
    """
    K, D_mul, C_in = D_hat.shape
    filters = W.shape[2]
    C_in_g = C_in // groups
    positions = patches.shape[0] * patches.shape[1] * patches.shape[2]
    # The depthwise step, one small product per input channel: (c, P, k) @ (c, k, s) -> (c, P, s).
    taps = ops.transpose(ops.reshape(patches, (positions, K, C_in)), (2, 0, 1))
    features = ops.matmul(taps, ops.transpose(D_hat, (2, 0, 1)))
    if groups == 1:
        features = ops.reshape(ops.transpose(features, (1, 2, 0)), (positions, D_mul * C_in))
        return ops.matmul(features, ops.reshape(W, (D_mul * C_in, filters)))
    # Group gi's columns of W meet the features of its own C_in/g channels (DESIGN.md, i(o, c)); W's
    # rows (s, c) of one group are not adjacent in its layout, so this one W-sized transpose stays.
    features = ops.transpose(ops.reshape(features, (groups, C_in_g, positions, D_mul)), (0, 2, 3, 1))
    features = ops.reshape(features, (groups, positions, D_mul * C_in_g))
    W_g = ops.transpose(ops.reshape(W, (D_mul, C_in_g, groups, filters // groups)), (2, 0, 1, 3))
    y = ops.matmul(features, ops.reshape(W_g, (groups, D_mul * C_in_g, filters // groups)))
    return ops.reshape(ops.transpose(y, (1, 0, 2)), (positions, filters))


def _compose_einsum(patches, W, D_hat, groups: int):
    """The same products as two einsums, ``(positions, filters)``: the torch backend's path (why:
    ``doconv.keras.fold.einsum_backend``)."""
    _, D_mul, C_in = D_hat.shape
    filters = W.shape[2]
    C_in_g = C_in // groups
    n, h, w = patches.shape[:3]
    features = ops.einsum("nhwkc,ksc->nhwcs", patches, D_hat)
    # Group gi's columns of W meet the features of its own C_in/g channels (DESIGN.md, i(o, c)).
    features = ops.reshape(features, (n, h, w, groups, C_in_g, D_mul))
    y = ops.einsum("nhwgcs,scgo->nhwgo", features, ops.reshape(W, (D_mul, C_in_g, groups, filters // groups)))
    return ops.reshape(y, (n * h * w, filters))
