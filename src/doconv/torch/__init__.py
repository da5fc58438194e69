"""doconv.torch: DO-Conv layers for PyTorch, drop-in replacements of ``nn.Conv1d/2d/3d``.

The layer stores ``W`` (C_out, C_in/g, D_mul) and ``D`` (C_in, K, D_mul), the
learnable offset from the identity; the identity itself is a non-persistent
buffer, so it is neither a parameter nor in the state_dict. Every forward in
training composes the kernel (``doconv.core.fold``'s maths, in torch ops) and
runs the native convolution, except where a batch has so few output positions
that composing features is cheaper (``doconv.core.training_composition``).
Nothing is kept between calls: every forward uses W and D as they are then.
:func:`cached_kernels` is the explicit, scoped cache for unfused inference;
:func:`fuse_model` is the way to deploy.

The package: ``layers`` (the modules), ``folding`` (the kernel composition and its CPU fast
path), ``composition`` (feature composition), ``cache`` (:func:`cached_kernels`), ``convert``
(whole models and parameters).

Public names: :class:`DOConv1d`, :class:`DOConv2d`, :class:`DOConv3d`,
:func:`fuse_model`, :func:`convert_model`, :func:`get_params`, :func:`set_params`,
:func:`cached_kernels`, :func:`fold` (the kernel composition in torch ops), :class:`ConvError`; and
:func:`use_feature_composition` to switch feature composition off.
"""

from .._optional import require

require("torch", "doconv.torch", "torch", "PyTorch")

from .cache import cached_kernels  # noqa: E402
from .composition import compose_features, feature_composition_in_use, use_feature_composition  # noqa: E402
from .convert import convert_model, fuse_model, get_params, set_params  # noqa: E402
from .folding import fold  # noqa: E402
from .layers import ConvError, DOConv1d, DOConv2d, DOConv3d  # noqa: E402

__all__ = [
    "ConvError",
    "DOConv1d",
    "DOConv2d",
    "DOConv3d",
    "cached_kernels",
    "compose_features",
    "convert_model",
    "feature_composition_in_use",
    "fold",
    "fuse_model",
    "get_params",
    "set_params",
    "use_feature_composition",
]
