"""The compiled fold kernels (doconv._foldkernel) and how their work is split between threads.

Framework-neutral: the adapters pass addresses of C-contiguous float32/float64 buffers, laid out
as in docs/maths.rst (W and the folded kernel (C_out, C_in/g, ·), D_hat (C_in, K, D_mul)).
``kernel`` is None where the extension was not built (no compiler at install time); each adapter
then folds with its framework's own ops.
"""

from __future__ import annotations

import ctypes
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

try:
    from . import _foldkernel as kernel
except ImportError:  # built by setup.py where a compiler is available
    kernel = None

PARALLEL_MIN_MACS = 1 << 20  # below this, handing work to other threads costs more than it saves

_POOL: Optional[ThreadPoolExecutor] = None
_POOL_PID = 0  # a forked child inherits the pool object but not its threads: it makes its own


def share(n: int, part: int, parts: int) -> tuple[int, int]:
    """The [start, stop) of ``part`` when n items are split in ``parts``."""
    return part * n // parts, (part + 1) * n // parts


def parts_for(threads: int, macs: int) -> int:
    """How many parts to cut ``macs`` multiply-adds in: ``threads``, or 1 for small work."""
    return threads if macs >= PARALLEL_MIN_MACS else 1


def run_parts(work: Callable[[int, int], None], parts: int) -> None:
    """Call ``work(part, parts)`` for every part, on a Python thread pool when parts > 1."""
    global _POOL, _POOL_PID
    if parts < 2:
        work(0, 1)
        return
    if _POOL is None or _POOL._max_workers < parts or _POOL_PID != os.getpid():
        _POOL, _POOL_PID = ThreadPoolExecutor(max_workers=parts, thread_name_prefix="doconv-fold"), os.getpid()
    futures = [_POOL.submit(work, part, parts) for part in range(parts)]
    for future in futures:
        future.result()


def run(name: str, a: int, b: int, out: int, itemsize: int, sizes: tuple, n: int, threads: int, openmp: bool) -> None:
    """Run ``kernel.<name>`` over items [0, n) of ``out`` from ``a`` and ``b`` (addresses).

    Args:
        name: 'fold_rows', 'grad_W_rows' (n = C_out) or 'grad_D_channels' (n = C_in/g).
        itemsize: 4 (float32) or 8 (float64).
        sizes: (groups, C_in/g, K, D_mul, C_out/g).
        threads: how many parts to cut the work in (see :func:`parts_for`).
        openmp: split on the OpenMP runtime given to :func:`use_openmp` (else a Python pool).
    """
    function = getattr(kernel, name)
    groups, C_in_g, K, D_mul, C_out_g = sizes
    parts = parts_for(threads, groups * C_out_g * C_in_g * K * D_mul)
    head = (a, b, out, itemsize, *sizes)
    if openmp:
        function(*head, 0, n, parts)
    else:
        run_parts(lambda part, parts: function(*head, *share(n, part, parts), 1), parts)


def openmp_parallel_address(package_dir: str) -> int:
    """The address of ``GOMP_parallel`` in the OpenMP runtime that a framework's threads run on, or 0.

    Splitting the fold with it runs it on the threads that just ran the framework's convolution
    (still spinning, waiting for work) instead of on threads of our own that would compete with
    them for the cores. Found among the libraries this process has loaded: the one inside the
    framework's folders (``package_dir`` or ``package_dir.libs``), else the only OpenMP runtime
    loaded. Anything unexpected gives 0 (then the Python pool is used).
    """
    if kernel is None or not sys.platform.startswith("linux") or not hasattr(os, "RTLD_NOLOAD"):
        return 0
    try:
        with open("/proc/self/maps") as maps:
            loaded = {fields[5].strip() for fields in (line.split(None, 5) for line in maps) if len(fields) == 6}
    except OSError:
        return 0
    runtimes = sorted(path for path in loaded if os.path.basename(path).startswith(("libgomp", "libiomp5")))
    own = [path for path in runtimes if path.startswith((package_dir + os.sep, package_dir + ".libs" + os.sep))]
    candidates = own or (runtimes if len(runtimes) == 1 else [])
    if len(candidates) != 1:
        return 0
    try:
        runtime = ctypes.CDLL(candidates[0], mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # the loaded copy, never a new one
        return ctypes.cast(runtime.GOMP_parallel, ctypes.c_void_p).value or 0
    except (OSError, AttributeError):
        return 0


def use_openmp(address: int) -> bool:
    """Let the kernels split work with the ``GOMP_parallel`` at ``address`` (0: none). True if set."""
    return kernel is not None and bool(kernel.use_gomp_parallel(address))
