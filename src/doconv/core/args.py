"""Normalisation and validation of convolution arguments.

Every adapter calls these helpers so that PyTorch, Keras and Gluon layers
accept the same values and reject bad ones with the same messages. A message
always says what is wrong and quotes the value received, Keras style:
``"... Received: groups=4"``.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PADDING_STRINGS = ("same", "valid")

# Layout names of each framework mapped to "where are the channels".
CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"
_GLUON_LAYOUTS = {
    1: {"NCW": CHANNELS_FIRST, "NWC": CHANNELS_LAST},
    2: {"NCHW": CHANNELS_FIRST, "NHWC": CHANNELS_LAST},
    3: {"NCDHW": CHANNELS_FIRST, "NDHWC": CHANNELS_LAST},
}


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True as a kernel size is a bug, never intended.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """Return ``value`` as an ``int`` after checking it is an integer >= ``minimum``.

    Args:
        value: the value to check. ``bool`` is refused.
        name: the argument's name, quoted in the error.
        minimum: the smallest accepted value. Default 1.

    Raises:
        TypeError: ``value`` is not an integer (or is a bool).
        ValueError: ``value`` is smaller than ``minimum``.

    Example:
        >>> check_int(3, "groups")
        3
    """
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer. Received: {name}={value!r}")
    if value < minimum:
        relation = "positive" if minimum == 1 else f">= {minimum}"
        raise ValueError(f"{name} must be {relation}. Received: {name}={value!r}")
    return int(value)


def normalize_tuple(value: Any, rank: int, name: str, minimum: int = 1) -> tuple[int, ...]:
    """Turn an int or a sequence of ``rank`` ints into a tuple of ``rank`` ints.

    Args:
        value: an int (repeated ``rank`` times) or a sequence of ``rank`` ints.
        rank: the number of spatial dimensions (1, 2 or 3).
        name: the argument's name, quoted in the error.
        minimum: the smallest accepted entry. Default 1.

    Raises:
        TypeError: an entry is not an integer, or ``value`` is neither int nor sequence.
        ValueError: wrong length, or an entry below ``minimum``.

    Example:
        >>> normalize_tuple(3, 2, "kernel_size")
        (3, 3)
        >>> normalize_tuple((1, 2), 2, "stride")
        (1, 2)
    """
    if _is_int(value):
        return (check_int(value, name, minimum),) * rank
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()  # a 1-d NumPy array, as the native layers take it: Python numbers
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be an integer or a sequence of {rank} integers. Received: {name}={value!r}")
    if len(value) != rank:
        raise ValueError(
            f"{name} must have {rank} entries, one per spatial dimension. Received: {name}={tuple(value)!r}"
        )
    for entry in value:
        if not _is_int(entry):
            raise TypeError(f"{name} entries must be integers. Received: {name}={tuple(value)!r}")
        if entry < minimum:
            relation = "positive" if minimum == 1 else f">= {minimum}"
            raise ValueError(f"{name} entries must be {relation}. Received: {name}={tuple(value)!r}")
    return tuple(int(v) for v in value)


def normalize_padding(padding: Any, rank: int, name: str = "padding"):
    """Normalise a padding argument.

    Accepted forms: ``'same'`` / ``'valid'`` (any case); an int (all sides);
    ``rank`` ints (symmetric per dimension); ``rank`` pairs ``(before, after)``.

    Returns:
        ``'same'``, ``'valid'``, or a tuple of ``rank`` ``(before, after)`` pairs.

    Raises:
        TypeError / ValueError naming ``padding`` and the value received.

    Example:
        >>> normalize_padding(1, 2)
        ((1, 1), (1, 1))
        >>> normalize_padding(((0, 1), (2, 2)), 2)
        ((0, 1), (2, 2))
        >>> normalize_padding("SAME", 2)
        'same'
    """
    if isinstance(padding, str):
        lowered = padding.lower()
        if lowered not in PADDING_STRINGS:
            raise ValueError(f"{name} must be 'same', 'valid', an integer or a sequence. Received: {name}={padding!r}")
        return lowered
    if _is_int(padding):
        p = check_int(padding, name, minimum=0)
        return ((p, p),) * rank
    if not isinstance(padding, Sequence) or len(padding) != rank:
        raise ValueError(
            f"{name} must be 'same', 'valid', an integer, {rank} integers or {rank} "
            f"(before, after) pairs. Received: {name}={padding!r}"
        )
    if all(_is_int(p) for p in padding):
        return tuple((p, p) for p in normalize_tuple(padding, rank, name, minimum=0))
    pairs = []
    for entry in padding:
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise ValueError(
                f"{name} must be 'same', 'valid', an integer, {rank} integers or {rank} "
                f"(before, after) pairs. Received: {name}={padding!r}"
            )
        pairs.append(normalize_tuple(tuple(entry), 2, name, minimum=0))
    return tuple(pairs)


def check_padding_mode(padding_mode: Any) -> str:
    """Check a PyTorch-style padding mode.

    Example:
        >>> check_padding_mode("reflect")
        'reflect'
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}. Received: padding_mode={padding_mode!r}")
    return padding_mode


def check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    """Check that ``groups`` divides both channel counts.

    Example:
        >>> check_groups(4, 8, 2)
    """
    if in_channels % groups:
        raise ValueError(
            "The number of input channels must be divisible by groups. "
            f"Received: in_channels={in_channels}, groups={groups}"
        )
    if out_channels % groups:
        raise ValueError(
            "The number of output channels must be divisible by groups. "
            f"Received: out_channels={out_channels}, groups={groups}"
        )


def resolve_D_mul(D_mul: Any, kernel_size: Sequence[int]) -> int:
    """Return the depth multiplier to use for a kernel of ``kernel_size``.

    ``None`` means K = prod(kernel_size). D_mul < K is refused: the composed
    kernel could not express every convolution (the paper's Proposition 3).
    For K = 1 there is no depthwise kernel and D_mul is 1 whatever is asked.

    Example:
        >>> resolve_D_mul(None, (3, 3))
        9
        >>> resolve_D_mul(12, (3, 3))
        12
        >>> resolve_D_mul(None, (1, 1))
        1
    """
    K = kernel_volume(kernel_size)
    if D_mul is None:
        return K
    D_mul = check_int(D_mul, "D_mul")
    if K == 1:
        return 1
    if D_mul < K:
        raise ValueError(
            "D_mul must be at least the number of kernel taps K = prod(kernel_size) = "
            f"{K}, or the composed kernel cannot express every convolution. "
            f"Received: D_mul={D_mul}, kernel_size={tuple(kernel_size)}"
        )
    return D_mul


def kernel_volume(kernel_size: Sequence[int]) -> int:
    """K, the number of taps of a kernel: the product of ``kernel_size``.

    Example:
        >>> kernel_volume((5, 3))
        15
    """
    K = 1
    for k in kernel_size:
        K *= int(k)
    return K


def check_stride_dilation(strides: Sequence[int], dilation: Sequence[int]) -> None:
    """Refuse stride > 1 together with dilation > 1 (Keras and TensorFlow do).

    Example:
        >>> check_stride_dilation((2, 2), (1, 1))
    """
    if any(s > 1 for s in strides) and any(d > 1 for d in dilation):
        raise ValueError(
            "strides > 1 together with dilation_rate > 1 is not supported. "
            f"Received: strides={tuple(strides)}, dilation_rate={tuple(dilation)}"
        )


def normalize_data_format(data_format: Any, name: str = "data_format") -> str:
    """Check a Keras-style data format ('channels_first' or 'channels_last', any case, as Keras takes it).

    Example:
        >>> normalize_data_format("Channels_Last")
        'channels_last'
    """
    if not isinstance(data_format, str) or data_format.lower() not in (CHANNELS_FIRST, CHANNELS_LAST):
        raise ValueError(f"{name} must be 'channels_first' or 'channels_last'. Received: {name}={data_format!r}")
    return data_format.lower()


def gluon_layout(layout: Any, rank: int) -> str:
    """Map a Gluon layout string ('NCHW', 'NHWC', ...) to a data format.

    Example:
        >>> gluon_layout("NHWC", 2)
        'channels_last'
    """
    formats = _GLUON_LAYOUTS[rank]
    if layout not in formats:
        raise ValueError(f"layout must be one of {tuple(formats)}. Received: layout={layout!r}")
    return formats[layout]


def effective_kernel_size(kernel_size: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """The span of a dilated kernel: d·(k - 1) + 1 per dimension.

    Example:
        >>> effective_kernel_size((3, 3), (2, 1))
        (5, 3)
    """
    return tuple(d * (k - 1) + 1 for k, d in zip(kernel_size, dilation))


def same_padding(
    spatial_shape: Sequence[int] | None,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """Per-side padding of ``'same'``: output size ceil(input / stride).

    TensorFlow's rule, which PyTorch and Keras share at stride 1: the total
    padding is split with the odd pixel after (bottom / right). At stride 1 the
    total is d·(k-1) whatever the input size, so ``spatial_shape`` may be None.

    Example:
        >>> same_padding(None, (4, 3), (1, 1), (1, 1))
        ((1, 2), (1, 1))
        >>> same_padding((7, 7), (3, 3), (2, 2), (1, 1))
        ((1, 1), (1, 1))
    """
    span = effective_kernel_size(kernel_size, dilation)
    pairs = []
    for i, (e, s) in enumerate(zip(span, stride)):
        if s == 1:
            total = e - 1
        else:
            if spatial_shape is None:
                raise ValueError(
                    "padding='same' with stride > 1 depends on the input size, which is not known yet. "
                    f"Received: stride={tuple(stride)}"
                )
            n = int(spatial_shape[i])
            out = -(-n // s)
            total = max((out - 1) * s + e - n, 0)
        pairs.append((total // 2, total - total // 2))
    return tuple(pairs)


def padding_pairs(
    padding: Any,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    spatial_shape: Sequence[int] | None = None,
) -> tuple[tuple[int, int], ...]:
    """Resolve any padding form into explicit ``(before, after)`` pairs.

    Example:
        >>> padding_pairs("valid", (3, 3), (1, 1), (1, 1))
        ((0, 0), (0, 0))
        >>> padding_pairs(2, (3, 3), (1, 1), (1, 1))
        ((2, 2), (2, 2))
    """
    rank = len(kernel_size)
    padding = normalize_padding(padding, rank)
    if padding == "valid":
        return ((0, 0),) * rank
    if padding == "same":
        return same_padding(spatial_shape, kernel_size, stride, dilation)
    return padding


def output_shape(
    spatial_shape: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    padding: Any,
) -> tuple[int, ...]:
    """Spatial output shape of a convolution.

    Args:
        spatial_shape: input spatial sizes.
        kernel_size, stride, dilation: tuples of the same rank.
        padding: any form accepted by :func:`padding_pairs`.

    Raises:
        ValueError: the (padded) input is smaller than the dilated kernel.

    Example:
        >>> output_shape((8, 8), (3, 3), (2, 2), (1, 1), 1)
        (4, 4)
    """
    pairs = padding_pairs(padding, kernel_size, stride, dilation, spatial_shape)
    span = effective_kernel_size(kernel_size, dilation)
    out = []
    for n, (b, a), e, s in zip(spatial_shape, pairs, span, stride):
        padded = int(n) + b + a
        if padded < e:
            raise ValueError(
                "The input is smaller than the dilated kernel. "
                f"Received: input spatial shape={tuple(spatial_shape)}, padding={pairs}, "
                f"kernel_size={tuple(kernel_size)}, dilation={tuple(dilation)}"
            )
        out.append((padded - e) // s + 1)
    return tuple(out)
