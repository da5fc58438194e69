"""DO-Conv for MXNet Gluon (1.x): ``DOConv2D``, folding and whole-network conversion.

The adapter only creates parameters and runs MXNet ops; argument handling, the
maths of folding and every layout conversion live in :mod:`doconv.core`.

``DOConv2D`` (``layers``) stores ``W`` (C_out, C_in/g, D_mul), ``D`` (C_in, K, D_mul)
and ``bias`` in the canonical layout (DESIGN.md, section 2). Its forward pass folds
W and D into one ordinary kernel and runs ``Convolution``. On CPU the fold is
doconv's compiled kernel in the custom operator ``doconv_fold`` (``fold``; an exported
unfused network loads after ``import doconv.gluon``); elsewhere, or after
``use_fold_kernel(False)``, it is made of MXNet operators. A training batch with few
output positions composes features instead (``composition``), where
``doconv.core.training_composition`` says that is cheaper: per batch imperatively, per
layer in a hybridized graph after :func:`plan_compositions` (``plan``). ``params`` moves
parameters in the canonical layout; ``convert`` converts and fuses whole networks.

Example:
    >>> from mxnet import nd
    >>> from doconv.gluon import DOConv2D
    >>> layer = DOConv2D(8, 3, padding=1)
    >>> layer.initialize()
    >>> layer(nd.ones((2, 4, 16, 16))).shape
    (2, 8, 16, 16)
"""

from .._optional import require

require("mxnet", "doconv.gluon", "gluon", "MXNet")  # before any submodule: the error names the extra to install

from .composition import feature_composition_in_use, use_feature_composition  # noqa: E402
from .convert import convert_model, fuse_model  # noqa: E402
from .fold import KERNEL_MIN_MACS, fold_kernel_in_use, use_fold_kernel  # noqa: E402
from .layers import DOConv2D  # noqa: E402
from .params import get_params, set_params  # noqa: E402
from .plan import plan_compositions  # noqa: E402

__all__ = [
    "DOConv2D",
    "KERNEL_MIN_MACS",
    "convert_model",
    "feature_composition_in_use",
    "fold_kernel_in_use",
    "fuse_model",
    "get_params",
    "plan_compositions",
    "set_params",
    "use_feature_composition",
    "use_fold_kernel",
]
