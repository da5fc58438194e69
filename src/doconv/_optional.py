"""Importing an optional framework with an error that says which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, adapter: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise an ImportError naming the pip extra to install.

    Example:
        >>> require("math", "doconv.torch", "torch", "PyTorch").__name__
        'math'
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{adapter} needs {what}: pip install 'doconv[{extra}]'") from err
