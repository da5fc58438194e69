"""doconv: Depthwise Over-parameterized Convolution (DO-Conv) for PyTorch, Keras and Gluon.

``import doconv`` imports NumPy and nothing else: the adapters
``doconv.torch``, ``doconv.keras`` and ``doconv.gluon`` import their framework
only when they are imported themselves.
"""

from . import core
from .core import fold

__version__ = "0.1.0"

__all__ = ["__version__", "core", "fold"]
