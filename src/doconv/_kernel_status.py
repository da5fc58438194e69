"""Whether this copy of doconv has its compiled fold kernel, and if not, why.

setup.py builds ``doconv._foldkernel`` where it can and writes what happened next to it, in
``_foldkernel-build.txt`` ("built", or "not built: <the build's error>"). A doconv that was
never built (a source tree put on ``sys.path``) has no such record: that is said too, rather
than guessing at a missing compiler.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

BUILD_RECORD = "_foldkernel-build.txt"  # written by setup.py's OptionalBuildExt


def fold_kernel_status(package_dir: Optional[str] = None, kernel: str = "doconv._foldkernel") -> tuple[bool, str]:
    """``(imports, what to tell the user)`` about the compiled fold kernel.

    Args:
        package_dir: the folder of the doconv package to look at. Default None: this one.
        kernel: the extension's module name. Default ``"doconv._foldkernel"``.

    Returns:
        ``(True, "built (<file>)")`` when the kernel imports; otherwise ``False`` and the reason:
        the build's own message when it failed, the import error when it was built but does not
        load, or that this doconv was never built.

    Example:
        >>> ok, text = fold_kernel_status()
        >>> text.startswith("built (") == ok
        True
    """
    package_dir = package_dir or os.path.dirname(os.path.abspath(__file__))
    try:
        module = importlib.import_module(kernel)
        return True, f"built ({os.path.basename(module.__file__)})"
    except ImportError as err:
        import_error = " ".join(str(err).split())
    try:
        with open(os.path.join(package_dir, BUILD_RECORD), encoding="utf-8") as fh:
            record = " ".join(fh.read().split())
    except OSError:
        return False, (
            f"not in this copy of doconv ({package_dir}), which was not built by pip install "
            "(a source tree on sys.path?); install the package to build it"
        )
    if record.startswith("not built"):
        return False, f"{record} (the build's message; doconv folds with NumPy, slower on CPU)"
    return False, f"built at install but does not import: {import_error}"
