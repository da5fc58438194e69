"""The DO-Conv maths in NumPy: identity, kernel composition (folding) and its inverse.

Notation (shared with ``docs/maths.rst``): C_in / C_out channels, g groups, a
kernel of K taps, depth multiplier D_mul. Canonical layouts:
W ``(C_out, C_in/g, D_mul)``, D ``(C_in, K, D_mul)``, folded kernel ``(C_out, C_in/g, *kernel_size)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .args import check_int, kernel_volume, normalize_tuple


def identity(K: int, D_mul: int, dtype=np.float64) -> np.ndarray:
    """The identity part of the depthwise kernel, shape ``(K, D_mul)``.

    ``I[k, s] = 1`` if ``s mod K == k`` and ``s < K·floor(D_mul/K)``: the K x K
    identity tiled ``floor(D_mul/K)`` times, zero columns after. Every input
    channel uses the same matrix, so it is returned once and broadcast.

    Args:
        K: number of kernel taps.
        D_mul: depth multiplier (>= K, or K = 1).
        dtype: NumPy dtype of the result. Default float64.

    Example:
        >>> identity(2, 5).astype(int)
        array([[1, 0, 1, 0, 0],
               [0, 1, 0, 1, 0]])
    """
    K = check_int(K, "K")
    D_mul = check_int(D_mul, "D_mul")
    s = np.arange(D_mul)
    on = (s[None, :] % K == np.arange(K)[:, None]) & (s[None, :] < K * (D_mul // K))
    return on.astype(dtype)


def in_channel_index(out_channels: int, in_channels: int, groups: int) -> np.ndarray:
    """i(o, c): the input channel a grouped convolution applies kernel[o, c] to.

    ``i(o, c) = floor(o / (C_out/g)) · (C_in/g) + c``, shape ``(C_out, C_in/g)``.

    Example:
        >>> in_channel_index(4, 4, 2)
        array([[0, 1],
               [0, 1],
               [2, 3],
               [2, 3]])
    """
    group = np.arange(out_channels) // (out_channels // groups)
    return group[:, None] * (in_channels // groups) + np.arange(in_channels // groups)[None, :]


def _check_W_D(W: np.ndarray, D, groups: int, kernel_size) -> tuple[int, tuple[int, ...]]:
    """Validate fold's inputs against each other; return (C_in, kernel_size)."""
    groups = check_int(groups, "groups")
    if not isinstance(W, np.ndarray) or W.ndim != 3:
        raise ValueError(
            "W must be an array of shape (C_out, C_in/groups, D_mul). "
            f"Received: W.shape={getattr(W, 'shape', type(W).__name__)}"
        )
    kernel_size = tuple(kernel_size) if not isinstance(kernel_size, int) else (kernel_size,)
    kernel_size = normalize_tuple(kernel_size, len(kernel_size), "kernel_size")
    K = kernel_volume(kernel_size)
    C_out, C_in_g, D_mul = W.shape
    if C_out % groups:
        raise ValueError(
            f"The number of output channels must be divisible by groups. Received: W.shape={W.shape}, groups={groups}"
        )
    C_in = C_in_g * groups
    if K == 1:
        if D is not None:
            raise ValueError(
                f"A 1-tap kernel has no depthwise kernel D. Received: D.shape={np.shape(D)}, kernel_size={kernel_size}"
            )
        if D_mul != 1:
            raise ValueError(f"A 1-tap kernel has D_mul = 1. Received: W.shape={W.shape}")
        return C_in, kernel_size
    if D is None:
        raise ValueError(f"D is required when K = prod(kernel_size) > 1. Received: kernel_size={kernel_size}")
    if not isinstance(D, np.ndarray) or D.shape != (C_in, K, D_mul):
        raise ValueError(
            f"D must have shape (C_in, K, D_mul) = {(C_in, K, D_mul)} to match W.shape={W.shape}, "
            f"groups={groups} and kernel_size={kernel_size}. Received: D.shape={np.shape(D)}"
        )
    if D_mul < K:
        raise ValueError(f"D_mul must be at least K = {K}. Received: D_mul={D_mul} (W.shape={W.shape})")
    return C_in, kernel_size


def fold(W: np.ndarray, D: np.ndarray | None, groups: int, kernel_size: Sequence[int]) -> np.ndarray:
    """Compose W and D into one ordinary convolution kernel.

    ``Kf[o, c, k] = sum_s (D + I)[i(o, c), k, s] · W[o, c, s]`` with
    ``i(o, c)`` from :func:`in_channel_index`; reshaped to
    ``(C_out, C_in/g, *kernel_size)`` with taps in row-major order.

    Args:
        W: array ``(C_out, C_in/g, D_mul)``.
        D: the stored offset ``(C_in, K, D_mul)``; None when K = 1.
        groups: number of groups g.
        kernel_size: tuple of the kernel's spatial sizes (an int for 1-D).

    Returns:
        The folded kernel, canonical layout, in W's dtype.

    Example:
        >>> W = np.ones((1, 1, 4))
        >>> fold(W, np.zeros((1, 4, 4)), 1, (2, 2))
        array([[[[1., 1.],
                 [1., 1.]]]])
    """
    C_in, kernel_size = _check_W_D(W, D, groups, kernel_size)
    C_out, C_in_g, D_mul = W.shape
    if D is None:
        return W.reshape((C_out, C_in_g) + kernel_size).copy()
    K = kernel_volume(kernel_size)
    D_hat = D + identity(K, D_mul, dtype=W.dtype)
    # Group-major views: group gi pairs its W rows only with its own C_in/g channels of D.
    Wg = W.reshape(groups, C_out // groups, C_in_g, D_mul)
    Dg = D_hat.reshape(groups, C_in_g, K, D_mul)
    folded = np.einsum("gocs,gcks->gock", Wg, Dg)
    return folded.reshape((C_out, C_in_g) + kernel_size).astype(W.dtype, copy=False)


def embed_kernel(kernel: np.ndarray, W: np.ndarray) -> np.ndarray:
    """The inverse of :func:`fold` at D = 0, as ``from_conv`` needs it.

    Returns a copy of ``W`` whose first identity tile holds ``kernel`` and
    whose other tiles are zero, so that ``fold(result, 0, ...) == kernel``.
    Columns past the last tile (``s >= K·floor(D_mul/K)``) keep W's values:
    they meet a zero identity, so they do not change the output, and keeping
    their random init lets them learn (were W and D both zero there, their
    gradients would be zero forever).

    Args:
        kernel: native kernel ``(C_out, C_in/g, *kernel_size)``.
        W: the layer's current W ``(C_out, C_in/g, D_mul)``.

    Example:
        >>> embed_kernel(np.full((1, 1, 1, 2), 5.0), np.ones((1, 1, 3)))
        array([[[5., 5., 1.]]])
    """
    kernel = np.asarray(kernel)
    if kernel.ndim < 3 or W.ndim != 3 or kernel.shape[:2] != W.shape[:2]:
        raise ValueError(
            "kernel must have shape (C_out, C_in/groups, *kernel_size) matching W's "
            f"(C_out, C_in/groups, D_mul). Received: kernel.shape={kernel.shape}, W.shape={W.shape}"
        )
    K = kernel_volume(kernel.shape[2:])
    D_mul = W.shape[2]
    if D_mul < K:
        raise ValueError(f"D_mul must be at least K = {K}. Received: W.shape={W.shape}")
    out = W.astype(np.result_type(W, kernel), copy=True)
    out[:, :, : K * (D_mul // K)] = 0
    out[:, :, :K] = kernel.reshape(kernel.shape[0], kernel.shape[1], K)
    return out


def reference_pytorch_in_channel_index(out_channels: int, in_channels: int, groups: int) -> np.ndarray:
    """The channel map of the original DO-Conv PyTorch code: ``(o·(C_in/g) + c) mod C_in``.

    It equals :func:`in_channel_index` for groups = 1 and for depthwise layers
    with C_out = C_in, and differs for other grouped layers.

    Example:
        >>> reference_pytorch_in_channel_index(4, 4, 2)
        array([[0, 1],
               [2, 3],
               [0, 1],
               [2, 3]])
    """
    C_in_g = in_channels // groups
    flat = np.arange(out_channels)[:, None] * C_in_g + np.arange(C_in_g)[None, :]
    return flat % in_channels


def composition_macs(
    positions: int, in_channels: int, out_channels: int, groups: int, K: int, D_mul: int
) -> tuple[int, int]:
    """Multiply-adds each composition adds to the plain convolution's, per forward pass.

    Kernel composition folds once: ``C_out·(C_in/g)·K·D_mul``, whatever the input size.
    Feature composition pays at every output position: the depthwise step
    ``C_in·K·D_mul``, and ``C_out·(C_in/g)·(D_mul - K)`` for W's columns beyond the K taps
    (docs/maths.rst, "What each order costs"). The backward pass costs each twice its forward.

    Args:
        positions: output positions of the whole batch (batch size times output pixels).
        in_channels, out_channels, groups: the layer's.
        K: taps of the kernel; D_mul: depth multiplier (>= K).

    Returns:
        ``(kernel composition, feature composition)``.

    Example:
        >>> composition_macs(64, 512, 512, 1, 9, 9)
        (21233664, 2654208)
    """
    C_in_g = in_channels // groups
    kernel = out_channels * C_in_g * K * D_mul
    feature = positions * (in_channels * K * D_mul + out_channels * C_in_g * (D_mul - K))
    return kernel, feature


# Feature composition trains faster only well below the break-even point: its depthwise step is
# many small products (one per input channel) where the fold is one pass. Per training step of a
# 3x3 512->512 layer with D_mul = 9 (`python benchmarks/bench_torch.py --composition-sweep`, torch,
# CPU, 2 threads, two runs), composing features took 0.41-0.45 of folding's time at an eighth of the
# fold's multiply-adds, 0.93-1.03 at a half, and 1.08-1.20 at three quarters and at parity.
FEATURE_COMPOSITION_MARGIN = 2


def training_composition(positions: int, in_channels: int, out_channels: int, groups: int, K: int, D_mul: int) -> str:
    """``'feature'`` where composing the features costs at most half of folding, else ``'kernel'``.

    Both give the same output (docs/maths.rst); this only picks the cheaper order for a batch.
    Feature composition wins where few output positions share a large kernel: the last stages
    of a network on small images.

    Example:
        >>> training_composition(16 * 2 * 2, 512, 512, 1, 9, 9)
        'feature'
        >>> training_composition(16 * 16 * 16, 64, 64, 1, 9, 9)
        'kernel'
    """
    if K <= 1 or positions <= 0:
        return "kernel"
    kernel, feature = composition_macs(positions, in_channels, out_channels, groups, K, D_mul)
    return "feature" if FEATURE_COMPOSITION_MARGIN * feature <= kernel else "kernel"


class Switch:
    """A process-wide on/off setting, such as each adapter's ``use_feature_composition``.

    One type check and one value, so that every adapter's switch refuses the same inputs with the
    same message. Truthy while on.

    Args:
        value: the initial setting. Default True.

    Example:
        >>> features = Switch()
        >>> features.set(False), bool(features)
        (False, False)
        >>> features.set(1)
        Traceback (most recent call last):
        ...
        TypeError: enabled must be True or False. Received: enabled=1
    """

    __slots__ = ("value",)

    def __init__(self, value: bool = True) -> None:
        self.value = value

    def set(self, enabled: bool) -> bool:
        """Set the switch to ``enabled`` (a bool) and return the new setting."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be True or False. Received: enabled={enabled!r}")
        self.value = enabled
        return enabled

    def __bool__(self) -> bool:
        return self.value
