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

keras = require("keras", "doconv.keras", "keras", "Keras 3")
ops = keras.ops

_FEATURES = True


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
    global _FEATURES
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False. Received: enabled={enabled!r}")
    _FEATURES = enabled
    return _FEATURES


def feature_composition_in_use() -> bool:
    """The current setting of :func:`use_feature_composition`."""
    return _FEATURES


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


def compose_features(inputs, W, D_hat, groups: int, kernel_size, strides, padding, dilation_rate, data_format):
    """A DOConv2D output (bias and activation aside) by feature composition, in differentiable ``keras.ops``.

    The depthwise step is ``ops.depthwise_conv`` with D_hat's taps as a depth-multiplier-D_mul kernel
    and the layer's strides, padding and dilation, so it pads exactly as the folded convolution does;
    W then contracts each group's ``C_in/g · D_mul`` features.

    Args:
        inputs: ``(N, H, W, C_in)`` or ``(N, C_in, H, W)`` per ``data_format``.
        W: Keras layout ``(D_mul, C_in/g, filters)``; D_hat: D + I ``(K, D_mul, C_in)``; both in the
            input's dtype.
        groups: number of groups; kernel_size, strides, dilation_rate: pairs; padding: 'same' or 'valid'.
        data_format: ``'channels_last'`` or ``'channels_first'``.

    Returns:
        ``(N, H_out, W_out, filters)`` or ``(N, filters, H_out, W_out)``.
    """
    K, D_mul, C_in = D_hat.shape
    filters = W.shape[2]
    C_in_g = C_in // groups
    # depthwise_conv's kernel is (M, N, C_in, multiplier); its output channel c·D_mul + s is tap s of channel c.
    taps = ops.reshape(ops.transpose(D_hat, (0, 2, 1)), tuple(kernel_size) + (C_in, D_mul))
    features = ops.depthwise_conv(
        inputs, taps, strides=strides, padding=padding, data_format=data_format, dilation_rate=dilation_rate
    )
    # Group gi's columns of W meet the features of its own C_in/g channels (DESIGN.md, i(o, c)).
    Wg = ops.reshape(W, (D_mul, C_in_g, groups, filters // groups))
    if data_format == core.CHANNELS_LAST:
        n, h, w = features.shape[:3]
        y = ops.einsum("nhwgcs,scgo->nhwgo", ops.reshape(features, (n, h, w, groups, C_in_g, D_mul)), Wg)
        return ops.reshape(y, (n, h, w, filters))
    n, h, w = features.shape[0], features.shape[2], features.shape[3]
    y = ops.einsum("ngcshw,scgo->ngohw", ops.reshape(features, (n, groups, C_in_g, D_mul, h, w)), Wg)
    return ops.reshape(y, (n, filters, h, w))
