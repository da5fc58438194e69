"""The ``doconv demo``: plain convolutions against DO-Conv, trained side by side, then folded.

For every seed, one small CNN is built with plain convolutions and copied into a DO-Conv
network with ``convert_model`` (the same folded kernels at the start); both are trained on
the same batches in the same order with the same optimiser and a recipe fixed per data set
(:data:`RECIPES`). The DO-Conv network is then folded into a plain one (``fuse_model``), and
the report says how far the folded network's predictions are from the DO-Conv network's,
next to the accuracies, their paired difference and parameter counts.

Data sets: scikit-learn's 8x8 digits (a 2-D CNN; PyTorch, Keras or Gluon) and MNIST-1D
(a 1-D CNN; PyTorch only, since doconv.keras and doconv.gluon have no 1-D layer).

One file per concern: ``settings`` (settings, recipes), ``data`` (the data sets),
``backend_torch`` / ``backend_keras`` / ``backend_gluon`` (networks, training, artefacts in
each framework), ``training`` (the schedule and the side-by-side epochs), ``report`` (summary,
printed report, curves), ``output`` (the output folder), ``runner`` (one run).
"""

from .backend_torch import TorchBackend
from .data import load_data, load_digits, load_mnist1d
from .report import MACHINE_DEPENDENT, format_table
from .runner import run
from .settings import DATASETS, FRAMEWORKS, RECIPES, VARIANTS, DemoError, Settings

# The name the digits demo's tests and docs used for the PyTorch backend.
_TorchBackend = TorchBackend

__all__ = [
    "DATASETS",
    "FRAMEWORKS",
    "MACHINE_DEPENDENT",
    "RECIPES",
    "VARIANTS",
    "DemoError",
    "Settings",
    "TorchBackend",
    "format_table",
    "load_data",
    "load_digits",
    "load_mnist1d",
    "run",
]
