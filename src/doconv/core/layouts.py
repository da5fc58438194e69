"""Conversions between the canonical (PyTorch) layout and every other one.

============  ==========================  ======================  ===============================
framework     W                           D                       folded kernel
============  ==========================  ======================  ===============================
canonical     ``(C_out, C_in/g, D_mul)``  ``(C_in, K, D_mul)``    ``(C_out, C_in/g, *kernel)``
Keras         ``(D_mul, C_in/g, C_out)``  ``(K, D_mul, C_in)``    ``(*kernel, C_in/g, C_out)``
Gluon         canonical                   canonical               OIHW (NCHW) / OHWI (NHWC)
============  ==========================  ======================  ===============================

Also here: reading checkpoints of the original DO-Conv PyTorch code, whose
channel map for grouped layers differs from the definition (DESIGN, maths page).
"""

from __future__ import annotations

import numpy as np

from .args import CHANNELS_FIRST, kernel_volume, normalize_data_format
from .maths import fold, identity, in_channel_index, reference_pytorch_in_channel_index


def _check_ndim(array: np.ndarray, ndim: int, name: str, layout: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}. Received: {name}.shape={array.shape}")
    return array


def W_to_keras(W: np.ndarray) -> np.ndarray:
    """Canonical W (C_out, C_in/g, D_mul) -> Keras (D_mul, C_in/g, C_out).

    Example:
        >>> W_to_keras(np.zeros((8, 2, 9))).shape
        (9, 2, 8)
    """
    return np.ascontiguousarray(_check_ndim(W, 3, "W", "(C_out, C_in/groups, D_mul)").transpose(2, 1, 0))


def W_from_keras(W: np.ndarray) -> np.ndarray:
    """Keras W (D_mul, C_in/g, C_out) -> canonical (C_out, C_in/g, D_mul).

    Example:
        >>> W_from_keras(np.zeros((9, 2, 8))).shape
        (8, 2, 9)
    """
    return np.ascontiguousarray(_check_ndim(W, 3, "W", "(D_mul, C_in/groups, C_out)").transpose(2, 1, 0))


def D_to_keras(D: np.ndarray) -> np.ndarray:
    """Canonical D (C_in, K, D_mul) -> Keras (K, D_mul, C_in).

    Example:
        >>> D_to_keras(np.zeros((4, 9, 10))).shape
        (9, 10, 4)
    """
    return np.ascontiguousarray(_check_ndim(D, 3, "D", "(C_in, K, D_mul)").transpose(1, 2, 0))


def D_from_keras(D: np.ndarray) -> np.ndarray:
    """Keras D (K, D_mul, C_in) -> canonical (C_in, K, D_mul).

    Example:
        >>> D_from_keras(np.zeros((9, 10, 4))).shape
        (4, 9, 10)
    """
    return np.ascontiguousarray(_check_ndim(D, 3, "D", "(K, D_mul, C_in)").transpose(2, 0, 1))


def kernel_to_keras(kernel: np.ndarray) -> np.ndarray:
    """Canonical kernel ``(C_out, C_in/g, *kernel_size)`` -> Keras ``(*kernel_size, C_in/g, C_out)``.

    Example:
        >>> kernel_to_keras(np.zeros((8, 2, 5, 3))).shape
        (5, 3, 2, 8)
    """
    kernel = np.asarray(kernel)
    if kernel.ndim < 3:
        raise ValueError(f"kernel must have shape (C_out, C_in/groups, *kernel_size). Received: {kernel.shape}")
    rank = kernel.ndim - 2
    return np.ascontiguousarray(kernel.transpose(tuple(range(2, 2 + rank)) + (1, 0)))


def kernel_from_keras(kernel: np.ndarray) -> np.ndarray:
    """Keras kernel ``(*kernel_size, C_in/g, C_out)`` -> canonical ``(C_out, C_in/g, *kernel_size)``.

    Example:
        >>> kernel_from_keras(np.zeros((5, 3, 2, 8))).shape
        (8, 2, 5, 3)
    """
    kernel = np.asarray(kernel)
    if kernel.ndim < 3:
        raise ValueError(f"kernel must have shape (*kernel_size, C_in/groups, C_out). Received: {kernel.shape}")
    rank = kernel.ndim - 2
    return np.ascontiguousarray(kernel.transpose((rank + 1, rank) + tuple(range(rank))))


def kernel_to_gluon(kernel: np.ndarray, data_format: str = CHANNELS_FIRST) -> np.ndarray:
    """Canonical kernel -> Gluon's: OIHW for NCHW (unchanged), OHWI for NHWC.

    Example:
        >>> kernel_to_gluon(np.zeros((8, 2, 5, 3)), "channels_last").shape
        (8, 5, 3, 2)
    """
    kernel = np.asarray(kernel)
    if normalize_data_format(data_format) == CHANNELS_FIRST:
        return kernel
    return np.ascontiguousarray(np.moveaxis(kernel, 1, -1))


def kernel_from_gluon(kernel: np.ndarray, data_format: str = CHANNELS_FIRST) -> np.ndarray:
    """Gluon kernel (OIHW or OHWI) -> canonical.

    Example:
        >>> kernel_from_gluon(np.zeros((8, 5, 3, 2)), "channels_last").shape
        (8, 2, 5, 3)
    """
    kernel = np.asarray(kernel)
    if normalize_data_format(data_format) == CHANNELS_FIRST:
        return kernel
    return np.ascontiguousarray(np.moveaxis(kernel, -1, 1))


def _reference_D_hat(D: np.ndarray, D_diag: np.ndarray | None) -> np.ndarray:
    """The effective depthwise kernel of a reference checkpoint: D + D_diag."""
    if D_diag is None:
        raise ValueError("A checkpoint of the original DO-Conv code needs its D_diag (or d_diag) entry.")
    D_diag = np.asarray(D_diag)
    if D_diag.shape != D.shape:
        raise ValueError(f"D_diag must have D's shape {D.shape}. Received: D_diag.shape={D_diag.shape}")
    return D + D_diag


def from_reference_pytorch(W: np.ndarray, D: np.ndarray | None, D_diag: np.ndarray | None, groups: int) -> dict:
    """Read a layer saved by the original DO-Conv PyTorch code into doconv's parameters.

    The original stores the identity (``D_diag``) and keeps D as an offset from
    it, as doconv does, so W is taken as it is and D becomes
    ``D + D_diag - I``. This is exact where the original's channel map
    coincides with the definition: groups = 1, and depthwise layers with
    C_out = C_in. For other grouped layers the original paired W with other
    channels of D, so no (W, D) of doconv gives that layer: a ValueError says
    so, and :func:`fold_reference_pytorch` gives the kernel that layer computed.

    Args:
        W: ``(C_out, C_in/g, D_mul)``.
        D: ``(C_in, K, D_mul)`` or None for 1x1 layers.
        D_diag: the saved identity, D's shape, or None for 1x1 layers.
        groups: the layer's groups.

    Returns:
        ``{"W": ..., "D": ...}`` in the canonical layout.

    Example:
        >>> W, D = np.ones((2, 2, 4)), np.zeros((2, 4, 4))
        >>> p = from_reference_pytorch(W, D, identity(4, 4)[None].repeat(2, 0), 1)
        >>> float(abs(p["D"]).max())
        0.0
    """
    W = _check_ndim(W, 3, "W", "(C_out, C_in/groups, D_mul)")
    if D is None:
        return {"W": W.copy(), "D": None}
    D = _check_ndim(D, 3, "D", "(C_in, K, D_mul)")
    D_hat = _reference_D_hat(D, D_diag)
    C_out, C_in_g, D_mul = W.shape
    C_in = C_in_g * groups
    if not np.array_equal(
        reference_pytorch_in_channel_index(C_out, C_in, groups), in_channel_index(C_out, C_in, groups)
    ):
        raise ValueError(
            "This grouped layer cannot be loaded exactly: the original DO-Conv PyTorch code pairs W[o, c] "
            "with D of channel (o*C_in/groups + c) mod C_in, not with the channel the convolution applies "
            "it to. It is exact only for groups = 1 and depthwise layers with out_channels = in_channels. "
            f"Received: groups={groups}, in_channels={C_in}, out_channels={C_out}. Use "
            "doconv.core.fold_reference_pytorch(W, D, D_diag, groups, kernel_size) to get the kernel that "
            "layer computed and load it with DOConv.from_conv or into a plain convolution."
        )
    return {"W": W.copy(), "D": D_hat - identity(D.shape[1], D_mul, dtype=D_hat.dtype)}


def fold_reference_pytorch(W: np.ndarray, D: np.ndarray | None, D_diag: np.ndarray | None, groups: int, kernel_size):
    """The kernel a layer of the original DO-Conv PyTorch code computed, canonical layout.

    Its own channel map included (see :func:`from_reference_pytorch`), so this
    is exact for every groups value.

    Example:
        >>> W, D = np.ones((1, 1, 4)), np.zeros((1, 4, 4))
        >>> fold_reference_pytorch(W, D, identity(4, 4)[None], 1, (2, 2)).shape
        (1, 1, 2, 2)
    """
    W = _check_ndim(W, 3, "W", "(C_out, C_in/groups, D_mul)")
    kernel_size = tuple(kernel_size)
    if D is None:
        return fold(W, None, groups, kernel_size)
    D = _check_ndim(D, 3, "D", "(C_in, K, D_mul)")
    D_hat = _reference_D_hat(D, D_diag)
    C_out, C_in_g, D_mul = W.shape
    if D.shape != (C_in_g * groups, kernel_volume(kernel_size), D_mul):
        raise ValueError(
            f"D must have shape {(C_in_g * groups, kernel_volume(kernel_size), D_mul)} for W.shape={W.shape}, "
            f"groups={groups}, kernel_size={kernel_size}. Received: D.shape={D.shape}"
        )
    channel = reference_pytorch_in_channel_index(C_out, C_in_g * groups, groups)
    folded = np.einsum("ocks,ocs->ock", D_hat[channel], W)
    return folded.reshape((C_out, C_in_g) + kernel_size)
