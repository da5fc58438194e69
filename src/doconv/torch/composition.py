"""Feature composition: a DO-Conv layer's output as the depthwise step then W, in torch ops."""

from __future__ import annotations

from typing import Optional

import torch

from .. import core

F = torch.nn.functional
Tensor = torch.Tensor


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

_FEATURES = core.Switch()  # use_feature_composition's setting


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
    return _FEATURES.set(enabled)


def feature_composition_in_use() -> bool:
    """The current setting of :func:`use_feature_composition`."""
    return bool(_FEATURES)


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
