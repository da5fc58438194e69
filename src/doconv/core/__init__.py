"""doconv.core: the framework-neutral half of DO-Conv, in NumPy only.

DO-Conv (Cao, Li et al., "DO-Conv: Depthwise Over-parameterized Convolutional
Layer", IEEE Transactions on Image Processing 31, 2022) trains a convolution
as the composition of a depthwise kernel D and a convolution kernel W, and
folds them into one ordinary kernel for inference.

Design rule: this package never imports a deep-learning framework. It holds
the maths once (argument handling, shape arithmetic, the identity, folding,
the reference forward passes and layout conversions); each adapter
(``doconv.torch``, ``doconv.keras``, ``doconv.gluon``) only creates parameters
and calls its framework's own ops, and is tested against this package.
"""

from .args import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    PADDING_MODES,
    check_groups,
    check_int,
    check_padding_mode,
    check_stride_dilation,
    effective_kernel_size,
    gluon_layout,
    kernel_volume,
    normalize_data_format,
    normalize_padding,
    normalize_tuple,
    output_shape,
    padding_pairs,
    resolve_D_mul,
    same_padding,
)
from .layouts import (
    D_from_keras,
    D_to_keras,
    W_from_keras,
    W_to_keras,
    fold_reference_pytorch,
    from_reference_pytorch,
    kernel_from_gluon,
    kernel_from_keras,
    kernel_to_gluon,
    kernel_to_keras,
)
from .maths import (
    FEATURE_COMPOSITION_MARGIN,
    Switch,
    composition_macs,
    embed_kernel,
    fold,
    identity,
    in_channel_index,
    reference_pytorch_in_channel_index,
    training_composition,
)
from .reference import conv_reference, doconv_reference, extract_patches

__all__ = [
    "CHANNELS_FIRST",
    "CHANNELS_LAST",
    "FEATURE_COMPOSITION_MARGIN",
    "PADDING_MODES",
    "Switch",
    "D_from_keras",
    "D_to_keras",
    "W_from_keras",
    "W_to_keras",
    "check_groups",
    "check_int",
    "check_padding_mode",
    "check_stride_dilation",
    "composition_macs",
    "conv_reference",
    "doconv_reference",
    "effective_kernel_size",
    "embed_kernel",
    "extract_patches",
    "fold",
    "fold_reference_pytorch",
    "from_reference_pytorch",
    "gluon_layout",
    "identity",
    "in_channel_index",
    "kernel_from_gluon",
    "kernel_from_keras",
    "kernel_to_gluon",
    "kernel_to_keras",
    "kernel_volume",
    "normalize_data_format",
    "normalize_padding",
    "normalize_tuple",
    "output_shape",
    "padding_pairs",
    "reference_pytorch_in_channel_index",
    "resolve_D_mul",
    "same_padding",
    "training_composition",
]
