"""The compiled fold kernels (doconv._foldkernel) and how their work is split between threads.

Framework-neutral: the adapters pass NumPy arrays (views of their own tensors' memory),
C-contiguous float32 or float64, all of one dtype, laid out as in docs/maths.rst (W and the
folded kernel (C_out, C_in/g, ·), D_hat = D + I (C_in, K, D_mul)). Every size comes from the
arrays' shapes: the C entry points check, through the buffer protocol and before any loop runs,
that the three arrays are 3-D, contiguous, of one float dtype, that their shapes agree with each
other and with ``groups``, and that the output is writable and overlaps neither input; a
mismatch raises ``ValueError`` naming the array and both shapes (expected, received). So no call,
from here or straight into doconv._foldkernel, can make the kernels read or write out of bounds.
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


# The three products: what a, b and out hold, and the size whose items are cut between threads.
KERNELS = {
    "fold_rows": "a = W (C_out, C_in/g, D_mul), b = D_hat transposed (C_in, D_mul, K), out = folded (C_out, C_in/g, K)",
    "grad_W_rows": "a = G (C_out, C_in/g, K), b = D_hat (C_in, K, D_mul), out = grad_W (C_out, C_in/g, D_mul)",
    "grad_D_channels": "a = G (C_out, C_in/g, K), b = W (C_out, C_in/g, D_mul), out = grad_D (C_in, K, D_mul)",
}


def _macs(name: str, a, b, out) -> int:
    """The product's multiply-adds: a's size times D_mul (grad_D) or out's last size (K or D_mul)."""
    try:
        return int(a.size) * int((b if name == "grad_D_channels" else out).shape[-1])
    except (AttributeError, IndexError, TypeError):  # not arrays: the kernel itself says what is wrong
        return 0


def run(name: str, a, b, out, groups: int, threads: int, openmp: bool) -> None:
    """Compute ``out`` from ``a`` and ``b`` with ``kernel.<name>``, split between threads.

    Args:
        name: one of :data:`KERNELS` ('fold_rows', 'grad_W_rows', 'grad_D_channels').
        a, b: the inputs, out: the output, NumPy arrays as :data:`KERNELS` lays them out:
            C-contiguous, float32 or float64, one dtype; out is overwritten.
        groups: the convolution's groups (C_out and C_in are multiples of it).
        threads: how many parts to cut the work in (see :func:`parts_for`).
        openmp: split on the OpenMP runtime given to :func:`use_openmp` (else a Python pool,
            one kernel call per part).

    Raises:
        ValueError: a shape, dtype, layout or ``groups`` that does not fit (from the kernel,
            which checks every call before it reads anything).
    """
    if name not in KERNELS:
        raise ValueError(f"name must be one of {', '.join(KERNELS)}. Received: name={name!r}")
    function = getattr(kernel, name)
    parts = parts_for(threads, _macs(name, a, b, out))
    if openmp or parts < 2:
        function(a, b, out, groups, parts)
    else:
        run_parts(lambda part, parts: function(a, b, out, groups, parts, part), parts)


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
