"""NumPy reference forward passes: the test oracle for every adapter.

Written for clarity, not speed: patches are gathered explicitly and every sum
is an einsum, so that each formula can be read against ``docs/maths.rst``.
All passes are rank-generic (1-D, 2-D and 3-D inputs).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .args import (
    CHANNELS_FIRST,
    check_groups,
    check_padding_mode,
    effective_kernel_size,
    kernel_volume,
    normalize_data_format,
    normalize_tuple,
    padding_pairs,
)
from .maths import fold, identity

_NUMPY_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _to_channels_first(x: np.ndarray, data_format: str) -> np.ndarray:
    return x if data_format == CHANNELS_FIRST else np.moveaxis(x, -1, 1)


def _from_channels_first(y: np.ndarray, data_format: str) -> np.ndarray:
    return y if data_format == CHANNELS_FIRST else np.moveaxis(y, 1, -1)


def extract_patches(
    x: np.ndarray,
    kernel_size,
    stride=1,
    padding: Any = 0,
    dilation=1,
    padding_mode: str = "zeros",
) -> np.ndarray:
    """Input patches of a convolution, shape ``(N, C, K, *out_spatial)``.

    ``x`` is channels-first ``(N, C, *spatial)``; tap k of the patch is the
    kernel position in row-major order, as in the folded kernel.

    Example:
        >>> x = np.arange(9.0).reshape(1, 1, 3, 3)
        >>> extract_patches(x, (2, 2))[0, 0, :, 0, 0]
        array([0., 1., 3., 4.])
    """
    rank = x.ndim - 2
    kernel_size = normalize_tuple(kernel_size, rank, "kernel_size")
    stride = normalize_tuple(stride, rank, "stride")
    dilation = normalize_tuple(dilation, rank, "dilation")
    pairs = padding_pairs(padding, kernel_size, stride, dilation, x.shape[2:])
    mode = _NUMPY_PAD_MODE[check_padding_mode(padding_mode)]
    xp = np.pad(x, ((0, 0), (0, 0)) + pairs, mode=mode)
    span = effective_kernel_size(kernel_size, dilation)
    spatial_axes = tuple(range(2, 2 + rank))
    windows = sliding_window_view(xp, span, axis=spatial_axes)  # (N, C, *positions, *span)
    pick = (slice(None), slice(None))
    pick += tuple(slice(None, None, s) for s in stride)
    pick += tuple(slice(None, None, d) for d in dilation)
    windows = windows[pick]  # (N, C, *out, *kernel_size)
    windows = np.moveaxis(windows, tuple(range(2 + rank, 2 + 2 * rank)), spatial_axes)
    out_spatial = windows.shape[2 + rank :]
    if min(out_spatial, default=1) < 1:
        raise ValueError(
            "The input is smaller than the dilated kernel. "
            f"Received: input spatial shape={x.shape[2:]}, padding={pairs}, kernel_size={kernel_size}, "
            f"dilation={dilation}"
        )
    return windows.reshape(x.shape[:2] + (kernel_volume(kernel_size),) + out_spatial)


def _check_input(x: np.ndarray, in_channels: int, rank: int) -> None:
    if x.ndim != rank + 2 or x.shape[1] != in_channels:
        raise ValueError(
            f"Expected an input of rank {rank + 2} with {in_channels} channels. Received: x.shape={x.shape} "
            "(channels-first view)"
        )


def conv_reference(
    x: np.ndarray,
    kernel: np.ndarray,
    bias: np.ndarray | None = None,
    stride=1,
    padding: Any = 0,
    dilation=1,
    groups: int = 1,
    padding_mode: str = "zeros",
    data_format: str = "channels_first",
) -> np.ndarray:
    """A plain grouped convolution (cross-correlation, as every framework computes it).

    Args:
        x: input ``(N, C_in, *spatial)`` or, with ``data_format='channels_last'``,
            ``(N, *spatial, C_in)``.
        kernel: ``(C_out, C_in/g, *kernel_size)``.
        bias: ``(C_out,)`` or None.
        stride, dilation: int or one per spatial dimension. Default 1.
        padding: any form of :func:`doconv.core.padding_pairs`. Default 0.
        groups: number of groups. Default 1.
        padding_mode: 'zeros', 'reflect', 'replicate' or 'circular'. Default 'zeros'.
        data_format: 'channels_first' (default) or 'channels_last'.

    Example:
        >>> conv_reference(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)))[0, 0]
        array([[4., 4.],
               [4., 4.]])
    """
    data_format = normalize_data_format(data_format)
    rank = kernel.ndim - 2
    C_out, C_in_g = kernel.shape[:2]
    check_groups(C_in_g * groups, C_out, groups)
    x = _to_channels_first(np.asarray(x), data_format)
    _check_input(x, C_in_g * groups, rank)
    patches = extract_patches(x, kernel.shape[2:], stride, padding, dilation, padding_mode)
    N, _, K = patches.shape[:3]
    out_spatial = patches.shape[3:]
    patches = patches.reshape((N, groups, C_in_g, K) + out_spatial)
    kernel = kernel.reshape(groups, C_out // groups, C_in_g, K)
    y = np.einsum("ngck...,gock->ngo...", patches, kernel).reshape((N, C_out) + out_spatial)
    if bias is not None:
        y = y + np.asarray(bias).reshape((1, C_out) + (1,) * rank)
    return _from_channels_first(y, data_format)


def doconv_reference(
    x: np.ndarray,
    W: np.ndarray,
    D: np.ndarray | None,
    bias: np.ndarray | None = None,
    kernel_size=3,
    stride=1,
    padding: Any = 0,
    dilation=1,
    groups: int = 1,
    padding_mode: str = "zeros",
    data_format: str = "channels_first",
    composition: str = "kernel",
) -> np.ndarray:
    """A DO-Conv layer's forward pass, by kernel or by feature composition.

    ``composition='kernel'`` folds W and D first and runs one convolution.
    ``composition='feature'`` is the paper's definition: the depthwise kernel
    ``D + I`` turns each input channel's patch of K taps into D_mul features,
    then W combines those features. Both give the same output.

    Args:
        x: input, as for :func:`conv_reference`.
        W: ``(C_out, C_in/g, D_mul)``; D: ``(C_in, K, D_mul)`` offset or None (K = 1).
        bias: ``(C_out,)`` or None.
        kernel_size: int or tuple; its rank is the input's spatial rank. Default 3.
        stride, padding, dilation, groups, padding_mode, data_format: as for
            :func:`conv_reference`.
        composition: 'kernel' (default) or 'feature'.

    Example:
        >>> W, D = np.ones((1, 1, 4)), np.zeros((1, 4, 4))
        >>> doconv_reference(np.ones((1, 1, 2, 2)), W, D, kernel_size=2)[0, 0]
        array([[4.]])
    """
    if composition not in ("kernel", "feature"):
        raise ValueError(f"composition must be 'kernel' or 'feature'. Received: composition={composition!r}")
    x = np.asarray(x)
    data_format = normalize_data_format(data_format)
    rank = x.ndim - 2
    kernel_size = normalize_tuple(kernel_size, rank, "kernel_size")
    kernel = fold(W, D, groups, kernel_size)  # also validates W and D against each other
    if composition == "kernel":
        return conv_reference(x, kernel, bias, stride, padding, dilation, groups, padding_mode, data_format)

    C_out, C_in_g, D_mul = W.shape
    C_in = C_in_g * groups
    K = kernel_volume(kernel_size)
    x = _to_channels_first(x, data_format)
    _check_input(x, C_in, rank)
    patches = extract_patches(x, kernel_size, stride, padding, dilation, padding_mode)
    D_hat = np.ones((C_in, 1, 1), W.dtype) if D is None else D + identity(K, D_mul, dtype=W.dtype)
    # Depthwise step: D_mul features per input channel from its K taps.
    features = np.einsum("nck...,cks->ncs...", patches, D_hat)
    N, out_spatial = features.shape[0], features.shape[3:]
    features = features.reshape((N, groups, C_in_g, D_mul) + out_spatial)
    Wg = W.reshape(groups, C_out // groups, C_in_g, D_mul)
    y = np.einsum("ngcs...,gocs->ngo...", features, Wg).reshape((N, C_out) + out_spatial)
    if bias is not None:
        y = y + np.asarray(bias).reshape((1, C_out) + (1,) * rank)
    return _from_channels_first(y, data_format)
