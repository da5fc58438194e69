"""The compiled fold kernel (doconv._foldkernel) on its own, with NumPy arrays, and its callers.

Every product is compared with doconv.core's maths on random shapes, groups, both dtypes and
both ways of splitting the work; every malformed call must raise, never read or write out of
bounds (the `sanitize` tox env runs this file under AddressSanitizer and UBSan, where an
out-of-bounds access aborts). Set DOCONV_REQUIRE_KERNEL=1 to fail, instead of skip, where the
extension was not built.
"""

import ctypes
import os
import sys

import numpy as np
import pytest

from doconv import _fold_cpu, core

kernel = _fold_cpu.kernel
if kernel is None:
    if os.environ.get("DOCONV_REQUIRE_KERNEL") == "1":
        raise RuntimeError("doconv._foldkernel was not built, but DOCONV_REQUIRE_KERNEL=1")
    pytest.skip("doconv._foldkernel was not built here", allow_module_level=True)

NAMES = tuple(_fold_cpu.KERNELS)


def test_kernel_is_sanitized_where_required():
    """tests/run_sanitized.py sets DOCONV_REQUIRE_SANITIZED: then the loaded kernel must be its build."""
    if os.environ.get("DOCONV_REQUIRE_SANITIZED") != "1":
        pytest.skip("not the sanitize env")
    compiled = open(kernel.__file__, "rb").read()
    assert b"__asan_init" in compiled and b"__ubsan_handle" in compiled, kernel.__file__


# What the kernels call a, b and out in their messages.
ARGS = {
    "fold_rows": ("W", "D", "out"),
    "grad_W_rows": ("grad", "D", "grad_W"),
    "grad_D_channels": ("grad", "W", "grad_D"),
}


def problem(C_out, C_in, groups, K, D_mul, dtype, seed=0):
    """Random W, D_hat = D + I and an upstream gradient G, as the adapters lay them out."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((C_out, C_in // groups, D_mul)).astype(dtype)
    D = rng.standard_normal((C_in, K, D_mul)).astype(dtype)
    G = rng.standard_normal((C_out, C_in // groups, K)).astype(dtype)
    return W, D, D + core.identity(K, D_mul, dtype=dtype), G


def inputs(name, W, D_hat, G):
    """(a, b, out) for kernel ``name``; out filled with NaN, so that an unwritten entry shows."""
    C_out, C_in_g, D_mul = W.shape
    C_in, K, _ = D_hat.shape
    a, b, shape = {
        "fold_rows": (W, np.ascontiguousarray(D_hat.transpose(0, 2, 1)), (C_out, C_in_g, K)),
        "grad_W_rows": (G, D_hat, (C_out, C_in_g, D_mul)),
        "grad_D_channels": (G, W, (C_in, K, D_mul)),
    }[name]
    return a, b, np.full(shape, np.nan, W.dtype)


def expected(name, W, D_hat, G, groups):
    """The product in float64, from core.in_channel_index: kernel[o, c] applies to channel i(o, c)."""
    W, D_hat, G = (x.astype(np.float64) for x in (W, D_hat, G))
    index = core.in_channel_index(W.shape[0], D_hat.shape[0], groups)
    if name == "fold_rows":
        return np.einsum("ocs,ocks->ock", W, D_hat[index])
    if name == "grad_W_rows":
        return np.einsum("ock,ocks->ocs", G, D_hat[index])
    G, W = (x.reshape((groups, -1) + x.shape[1:]) for x in (G, W))  # (g, C_out/g, C_in/g, .)
    return np.einsum("gock,gocs->gcks", G, W).reshape(D_hat.shape)


def call(name, a, b, out, groups, split):
    """The kernel once (all parts in one call), or one call per part as the Python pool does."""
    function = getattr(kernel, name)
    if split == "one call":
        function(a, b, out, groups, 3)
    elif split == "more parts than items":
        function(a, b, out, groups, 64)
    elif split == "per part":
        for part in range(3):
            function(a, b, out, groups, 3, part)
    else:
        _fold_cpu.run(name, a, b, out, groups, 2, openmp=False)


def tolerance(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)


# (C_out, C_in, groups, K, D_mul): 3x3 with D_mul = 9 (the AVX2 kernels for float32), the other
# literal tap counts (1x3, 1x7, 5x3, 5x5, 7x7) with D_mul = K and larger, K = 9 with a larger D_mul,
# D_mul < K, sizes nothing specialises, grouped and depthwise layers, and row counts that do not
# divide into parts.
CASES = [
    (7, 5, 1, 9, 9),
    (13, 6, 1, 9, 9),
    (8, 4, 4, 9, 9),
    (6, 4, 2, 9, 11),
    (5, 3, 1, 3, 3),
    (5, 3, 1, 3, 4),
    (6, 4, 2, 7, 7),
    (5, 3, 1, 7, 8),
    (3, 4, 1, 25, 27),
    (4, 4, 2, 15, 15),
    (6, 3, 3, 25, 25),
    (4, 2, 1, 49, 49),
    (3, 6, 3, 4, 6),
    (5, 2, 1, 7, 5),
    (2, 2, 1, 1, 1),
]


@pytest.mark.parametrize("split", ["one call", "per part", "more parts than items", "_fold_cpu.run"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C_out,C_in,groups,K,D_mul", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_kernel_equals_core_maths(name, C_out, C_in, groups, K, D_mul, dtype, split):
    W, D, D_hat, G = problem(C_out, C_in, groups, K, D_mul, dtype)
    a, b, out = inputs(name, W, D_hat, G)
    call(name, a, b, out, groups, split)
    np.testing.assert_allclose(out, expected(name, W, D_hat, G, groups), **tolerance(dtype))
    if name == "fold_rows" and D_mul >= K > 1:  # the forward is doconv.core.fold itself
        np.testing.assert_allclose(out, core.fold(W, D, groups, (K,)).reshape(out.shape), **tolerance(dtype))


@pytest.mark.parametrize("name", NAMES)
def test_kernel_splits_large_work_between_threads(name):
    """Above the split threshold, _fold_cpu.run cuts the work in parts (a Python pool here)."""
    C_out, C_in, K = 130, 256, 9
    assert C_out * C_in * K * K >= _fold_cpu.PARALLEL_MIN_MACS
    for dtype in (np.float32, np.float64):
        W, _, D_hat, G = problem(C_out, C_in, 2, K, K, dtype, seed=1)
        a, b, out = inputs(name, W, D_hat, G)
        _fold_cpu.run(name, a, b, out, 2, threads=2, openmp=False)
        np.testing.assert_allclose(out, expected(name, W, D_hat, G, 2), **tolerance(dtype))


@pytest.mark.parametrize("name", NAMES)
def test_kernel_handles_empty_arrays(name):
    """No output channels: grad_D is all zeros, the other outputs are empty (and nothing is read)."""
    W, _, D_hat, G = problem(0, 4, 2, 9, 9, np.float64)
    a, b, out = inputs(name, W, D_hat, G)
    getattr(kernel, name)(a, b, out, 2)
    assert out.size == 0 or not out.any()


@pytest.mark.parametrize(
    "name,K,D_mul",
    [
        ("fold_rows", 2601, 2601),
        ("grad_W_rows", 2601, 2601),
        ("grad_D_channels", 2601, 2601),
        ("fold_rows", 9, 300_000),
        ("grad_W_rows", 9, 300_000),
        ("grad_D_channels", 9, 300_000),
    ],
)
def test_kernel_takes_large_kernels_and_depth_multipliers(name, K, D_mul):
    """51x51 with D_mul = K and 3x3 with D_mul = 300000: once sized on the stack (SIGSEGV)."""
    W, _, D_hat, G = problem(2, 1, 1, K, D_mul, np.float32)
    a, b, out = inputs(name, W, D_hat, G)
    getattr(kernel, name)(a, b, out, 1)
    np.testing.assert_allclose(out, expected(name, W, D_hat, G, 1), rtol=1e-4, atol=1e-4 * np.sqrt(max(K, D_mul)))


# -- malformed calls ---------------------------------------------------------------------------
#
# Each variant spoils one of (a, b, out, groups) of a valid call and names what the message must say.


def valid(name, dtype=np.float32):
    """(a, b, out, groups) for a grouped layer with K = 9, D_mul = 12: every size distinct."""
    W, _, D_hat, G = problem(6, 8, 2, 9, 12, dtype)
    return (*inputs(name, W, D_hat, G), 2)


def spoil(args, which, change):
    args = list(args)
    args[which] = change(args[which])
    return args


def read_only(x):
    x = x.copy()
    x.flags.writeable = False
    return x


def non_contiguous(x):
    return np.ascontiguousarray(np.repeat(x, 2, axis=1))[:, ::2]


VARIANTS = {
    # variant: (which argument, how it is spoilt, exception, a pattern the message must match)
    "a 2-D": (0, lambda x: x[0], ValueError, r"must be 3-D; received shape \(4, \d+\)"),
    "b 4-D": (1, lambda x: x[None], ValueError, r"must be 3-D; received shape \(1, "),
    "out 2-D": (2, lambda x: x.reshape(x.shape[0], -1), ValueError, r"must be 3-D"),
    "b one channel": (
        1,
        lambda x: np.ascontiguousarray(x[:1]),
        ValueError,
        r"must have shape \(\d+, \d+, \d+\).*; received shape \(1, ",
    ),
    "b middle size": (1, lambda x: np.ascontiguousarray(x[:, 1:]), ValueError, r"must have shape .*received shape"),
    "out first size": (2, lambda x: np.ascontiguousarray(x[1:]), ValueError, r"must have shape .*received shape"),
    "out middle size": (2, lambda x: np.ascontiguousarray(x[:, 1:]), ValueError, r"must have shape .*received shape"),
    "out last size": (2, lambda x: np.ascontiguousarray(x[:, :, 1:]), ValueError, r"must have shape .*received shape"),
    "a float16": (0, lambda x: x.astype(np.float16), ValueError, r"must be float32 or float64"),
    "b int32": (1, lambda x: x.astype(np.int32), ValueError, r"has dtype|must be float32 or float64"),
    "b float64": (1, lambda x: x.astype(np.float64), ValueError, r"has dtype float64; expected float32"),
    "out float64": (2, lambda x: x.astype(np.float64), ValueError, r"has dtype float64; expected float32"),
    "a big-endian": (0, lambda x: x.astype(">f4"), ValueError, r"must be float32 or float64"),
    "a non-contiguous": (0, non_contiguous, ValueError, r"must be C-contiguous"),
    "b transposed": (1, lambda x: x.transpose(0, 2, 1), ValueError, r"must be C-contiguous|must have shape"),
    "out non-contiguous": (2, non_contiguous, ValueError, r"must be C-contiguous"),
    "out read-only": (2, read_only, ValueError, r"must be writable"),
    "a a list": (0, lambda x: x.tolist(), TypeError, r"must be a NumPy array; received list"),
    "out bytes": (2, lambda x: bytes(x.nbytes), ValueError, r"must be writable|must be 3-D"),
    "groups 0": (3, lambda g: 0, ValueError, r"must be >= 1 and divide C_out = 6 .*received groups=0"),
    "groups -2": (3, lambda g: -2, ValueError, r"received groups=-2"),
    "groups 4": (3, lambda g: 4, ValueError, r"divide C_out = 6 .*received groups=4"),
    "groups 3": (3, lambda g: 3, ValueError, r"must have shape"),  # divides C_out, but C_in != 3 * C_in/g
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", NAMES)
def test_malformed_call_raises(name, variant):
    which, change, error, pattern = VARIANTS[variant]
    args = spoil(valid(name), which, change)
    # the message names what it holds (W, D, grad, ...); groups 3 fits C_out but not C_in, which b or out shows
    named = (
        ARGS[name][which]
        if which < 3
        else "groups"
        if variant != "groups 3"
        else ARGS[name][2 - (name != "grad_D_channels")]
    )
    with pytest.raises(error, match=f"^{name}: {named}[ ,].*{pattern}"):
        getattr(kernel, name)(*args)
    with pytest.raises(error):
        _fold_cpu.run(name, *args, threads=2, openmp=False)


@pytest.mark.parametrize("input_index", [0, 1])
@pytest.mark.parametrize("name", NAMES)
def test_output_overlapping_an_input_raises(name, input_index):
    """out laid over part of a (or b) in one buffer: refused before anything is written."""
    a, b, out, groups = valid(name)
    source = (a, b)[input_index]
    memory = np.zeros(source.size + out.size, source.dtype)
    placed = memory[: source.size].reshape(source.shape)
    placed[...] = source
    overlapping = memory[source.size // 2 : source.size // 2 + out.size].reshape(out.shape)
    args = [a, b, overlapping, groups]
    args[input_index] = placed
    before = memory.copy()
    with pytest.raises(ValueError, match=r"must not share memory with"):
        getattr(kernel, name)(*args)
    np.testing.assert_array_equal(memory, before)


@pytest.mark.parametrize("parts,part", [(0, -1), (-1, -1), (2, 2), (2, -2)])
def test_bad_parts_raise(parts, part):
    with pytest.raises(ValueError, match=r"parts must be >= 1"):
        kernel.fold_rows(*valid("fold_rows"), parts, part)


# Run in a child process with a time limit: the kernels release the GIL, so a hang would be
# uninterruptible in-process. The child checks the results itself.
_MANY_PARTS = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np
from test_foldkernel import expected, inputs, kernel, problem
name = {name!r}
W, _, D_hat, G = problem(6, 4, 2, 9, 9, np.float64)
a, b, out = inputs(name, W, D_hat, G)
getattr(kernel, name)(a, b, out, 2, 2**62)
np.testing.assert_allclose(out, expected(name, W, D_hat, G, 2), rtol=1e-12, atol=1e-12)
a, b, out = inputs(name, W, D_hat, G)
getattr(kernel, name)(a, b, out, 2, 2**62, 2**61)
assert np.isnan(out).all(), "an empty part wrote"
getattr(kernel, name)(a, b, out, 2, 2**62, 1)
# Item 1: row 1, or grad_D's channel 1 of each of the 2 groups of 2 channels.
item = [1, 3] if name == "grad_D_channels" else [1]
np.testing.assert_allclose(out[item], expected(name, W, D_hat, G, 2)[item], rtol=1e-12, atol=1e-12)
assert np.isnan(np.delete(out, item, axis=0)).all(), "part 1 wrote outside item 1"
print("ok")
"""


@pytest.mark.parametrize("name", NAMES)
def test_more_parts_than_items_return_at_once(name):
    """parts = 2**62 for a few items: the same result as one part, at once; the empty parts are not
    walked one by one (they were, for hours, with the GIL released: a hang)."""
    import subprocess

    code = _MANY_PARTS.format(tests=os.path.dirname(__file__), name=name)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_run_names_an_unknown_kernel():
    with pytest.raises(ValueError, match=r"name must be one of fold_rows, grad_W_rows, grad_D_channels"):
        _fold_cpu.run("use_gomp_parallel", *valid("fold_rows"), threads=1, openmp=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP split is looked up on Linux only")
@pytest.mark.parametrize("address", [1, 12345, "malloc"])
def test_use_gomp_parallel_refuses_anything_but_GOMP_parallel(address):
    """The one address the kernel is given is checked too (else the next split would jump there)."""
    if address == "malloc":  # a real function, but not GOMP_parallel
        address = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
    with pytest.raises(ValueError, match=r"must be 0 or GOMP_parallel's in a loaded OpenMP runtime; received 0x"):
        kernel.use_gomp_parallel(address)
    assert _fold_cpu.use_openmp(address) is False
    a, b, out, groups = valid("fold_rows", np.float64)
    kernel.fold_rows(a, b, out, groups, 2)  # split as before the refusals
    W, _, D_hat, G = problem(6, 8, 2, 9, 12, np.float64)  # what valid() holds
    np.testing.assert_allclose(out, expected("fold_rows", W, D_hat, G, groups))


# -- through doconv.torch ----------------------------------------------------------------------


@pytest.fixture
def torch_kernels(monkeypatch):
    """doconv.torch, with the names of the kernels it runs recorded (so a test knows the C path ran)."""
    torch = pytest.importorskip("torch")
    import doconv.torch  # noqa: F401

    names, run = [], _fold_cpu.run

    def recorded(name, *args, **kwargs):
        names.append(name)
        return run(name, *args, **kwargs)

    monkeypatch.setattr(_fold_cpu, "run", recorded)
    return torch, names


def test_torch_replaced_D_of_the_wrong_shape_raises_naming_D(torch_kernels):
    """Once the kernel read past D and corrupted the heap (free(): invalid size)."""
    torch, _ = torch_kernels
    from doconv.torch import DOConv2d

    layer = DOConv2d(3, 8, 3)
    layer.D = torch.nn.Parameter(torch.zeros(1, 9, 9))
    # the expected shape, then the received one (as a tuple or a torch.Size)
    with pytest.raises(ValueError, match=r"\bD\b.*\b3, 9, 9\b.*\b1, 9, 9\b"):
        layer(torch.randn(2, 3, 6, 6)).sum().backward()


def _train_step(torch, names, layer, x):
    """A forward and backward through the C kernels; the gradients equal those of the same maths
    in plain torch ops (core's fold: the kernel applied to channel i(o, c) is W[o, c] @ (D + I)[i]^T)."""
    layer(x).square().sum().backward()
    assert {"fold_rows", "grad_W_rows", "grad_D_channels"} <= set(names)
    C_out, C_in_g, D_mul = layer.W.shape
    K = layer.D.shape[1]
    index = torch.as_tensor(core.in_channel_index(C_out, layer.D.shape[0], layer.groups))
    D_hat = layer.D + torch.as_tensor(core.identity(K, D_mul), dtype=layer.D.dtype)
    folded = torch.einsum("ocs,ocks->ock", layer.W, D_hat[index]).reshape(C_out, C_in_g, *layer.kernel_size)
    loss = torch.nn.functional.conv2d(x, folded, layer.bias, groups=layer.groups).square().sum()
    for got, want in zip((layer.W.grad, layer.D.grad), torch.autograd.grad(loss, (layer.W, layer.D))):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_torch_51x51_kernel_with_D_mul_K_trains(torch_kernels):
    """D_mul = K = 2601: the backward's accumulators once overflowed the stack (SIGSEGV)."""
    torch, names = torch_kernels
    from doconv.torch import DOConv2d

    torch.manual_seed(0)
    _train_step(torch, names, DOConv2d(1, 2, 51), torch.randn(1, 1, 52, 52))


def test_torch_D_mul_300000_on_3x3_trains(torch_kernels):
    torch, names = torch_kernels
    from doconv.torch import DOConv2d

    torch.manual_seed(0)
    _train_step(torch, names, DOConv2d(1, 2, 3, D_mul=300_000), torch.randn(1, 1, 5, 5))
