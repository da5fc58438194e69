"""Importing an optional framework with an error that says which extra installs it.

doconv is installed as ``doconv-layers`` (the PyPI name ``doconv`` is an unrelated project),
so every install hint is built here, from one name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

DISTRIBUTION = "doconv-layers"


def install_hint(extra: str) -> str:
    """The pip command that installs doconv with ``extra``.

    Example:
        >>> install_hint("torch")
        "pip install 'doconv-layers[torch]'"
    """
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def require(module: str, adapter: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise an ImportError naming the pip extra to install.

    Example:
        >>> require("math", "doconv.torch", "torch", "PyTorch").__name__
        'math'
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{adapter} needs {what}: {install_hint(extra)}") from err
