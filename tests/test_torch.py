"""doconv.torch: DOConv1d/2d/3d against the NumPy oracle, folding, conversion, export, DDP, errors."""

import copy
import os
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from doconv import core  # noqa: E402
from doconv.torch import (  # noqa: E402
    DOConv1d,
    DOConv2d,
    DOConv3d,
    cached_kernels,
    convert_model,
    feature_composition_in_use,
    fuse_model,
    get_params,
    layers,  # noqa: E402
    set_params,
    use_feature_composition,
)
from doconv.torch.folding import _fold_fast  # noqa: E402

torch.set_num_threads(2)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def random_params(layer, seed=0, scale=0.5):
    """Canonical parameters with D far from zero, as the cross-backend suite uses them."""
    rng = np.random.default_rng(seed)
    p = get_params(layer)
    dtype = p["W"].dtype
    return {k: None if v is None else (rng.normal(size=v.shape) * scale).astype(dtype) for k, v in p.items()}


CASES = [
    # in, out, kernel, stride, padding, dilation, groups, bias, padding_mode, D_mul extra
    (3, 4, (3, 3), 1, 1, 1, 1, True, "zeros", 0),
    (4, 6, (3, 3), 2, 0, 1, 2, False, "zeros", 2),
    (4, 4, (3, 3), 1, "same", 2, 4, True, "zeros", 9),  # depthwise, D_mul = 2K
    (4, 8, (1, 3), 1, (0, 1), 1, 4, True, "zeros", 0),  # depthwise, channel multiplier 2
    (2, 3, (5, 3), 1, "same", 1, 1, True, "zeros", 2),
    (3, 5, (1, 1), 2, 0, 1, 1, True, "zeros", 0),
    (4, 4, (3, 3), 1, (1, 2), 1, 2, True, "reflect", 1),
    (2, 4, (3, 3), 1, (2, 1), 1, 1, False, "replicate", 0),
    (2, 2, (3, 1), 2, (1, 1), 1, 2, True, "circular", 0),
    (3, 4, (4, 2), 1, "same", (2, 1), 1, True, "zeros", 0),  # even kernel: the odd pixel goes after
    (6, 6, (3, 3), 1, "valid", 1, 3, True, "zeros", 3),
]


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_numpy_oracle_float64(case):
    C_in, C_out, ks, stride, padding, dilation, groups, bias, mode, extra = case
    K = int(np.prod(ks))
    D_mul = None if K == 1 else K + extra
    layer = DOConv2d(C_in, C_out, ks, stride, padding, dilation, groups, bias, mode, dtype=torch.float64, D_mul=D_mul)
    params = random_params(layer)
    set_params(layer, params)
    x = np.random.default_rng(1).normal(size=(2, C_in, 9, 8))
    got = layer(torch.from_numpy(x)).detach().numpy()
    want = core.doconv_reference(
        x, params["W"], params["D"], params["bias"], ks, stride, padding, dilation, groups, mode
    )
    assert rel_err(got, want) < 1e-10
    # and the fused layer gives the same output
    assert rel_err(layer.fuse()(torch.from_numpy(x)).detach().numpy(), want) < 1e-10


@pytest.mark.parametrize("cls,rank,ks", [(DOConv1d, 1, 3), (DOConv3d, 3, (3, 1, 2))])
def test_other_ranks_match_oracle(cls, rank, ks):
    layer = cls(4, 6, ks, stride=1, padding=1, groups=2, dtype=torch.float64)
    params = random_params(layer)
    set_params(layer, params)
    x = np.random.default_rng(2).normal(size=(2, 4) + (6,) * rank)
    want = core.doconv_reference(x, params["W"], params["D"], params["bias"], ks, 1, 1, 1, 2)
    assert rel_err(layer(torch.from_numpy(x)).detach().numpy(), want) < 1e-10
    assert type(layer.fuse()) is {1: nn.Conv1d, 3: nn.Conv3d}[rank]


def test_float32_tolerance_and_unbatched_input():
    layer = DOConv2d(3, 4, 3, padding=1)
    params = random_params(layer)
    set_params(layer, params)
    x = np.random.default_rng(3).normal(size=(3, 7, 7)).astype(np.float32)
    want = core.doconv_reference(x[None].astype(np.float64), params["W"], params["D"], params["bias"], 3, 1, 1)[0]
    got = layer(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_parameters_state_dict_and_repr():
    layer = DOConv2d(4, 8, 3, padding=1, groups=2)
    assert [n for n, _ in layer.named_parameters()] == ["W", "D", "bias"]
    assert list(layer.state_dict()) == ["W", "D", "bias"]  # the identity is not saved
    assert layer.W.shape == (8, 2, 9) and layer.D.shape == (4, 9, 9)
    assert float(layer.D.detach().abs().max()) == 0.0
    assert repr(layer) == "DOConv2d(4, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=2, D_mul=9)"
    one = DOConv2d(4, 8, 1, bias=False, D_mul=5)
    assert one.D is None and one.D_mul == 1 and list(one.state_dict()) == ["W"]


def test_positional_arguments_follow_nn_conv2d():
    layer = DOConv2d(8, 8, 3, 1, 1)  # the original code read the 4th argument as D_mul
    assert layer.stride == (1, 1) and layer.padding == (1, 1) and layer.D_mul == 9
    assert layer(torch.randn(1, 8, 5, 5)).shape == (1, 8, 5, 5)


def test_weight_reads_the_folded_kernel_and_is_differentiable():
    layer = DOConv2d(3, 4, 3)
    set_params(layer, random_params(layer))
    p = get_params(layer)
    np.testing.assert_allclose(layer.weight.detach().numpy(), core.fold(p["W"], p["D"], 1, (3, 3)), rtol=1e-5)
    layer.weight.sum().backward()
    assert layer.W.grad is not None and float(layer.D.grad.abs().sum()) > 0


@pytest.fixture(params=["C kernel", "C kernel, Python threads", "NumPy"])
def cpu_path(request, monkeypatch):
    """Run a test through the compiled fold kernel (where it was built), split on torch's OpenMP
    threads where found and on the Python pool, and through the NumPy path."""
    from doconv.torch import folding as adapter

    if request.param == "NumPy":
        monkeypatch.setattr(adapter, "_foldkernel", None)
    elif adapter._foldkernel is None:
        pytest.skip("doconv._foldkernel was not built here")
    elif request.param == "C kernel, Python threads":
        monkeypatch.setattr(adapter, "_GOMP", False)
    return request.param


def test_fold_kernel_runs_on_torchs_openmp_threads_here():
    """On Linux with torch's OpenMP backend, the C kernel finds the runtime torch's threads run on."""
    from doconv.torch import folding as adapter

    if adapter._foldkernel is None or not sys.platform.startswith("linux"):
        pytest.skip("no C kernel, or not Linux")
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch does not use OpenMP here")
    assert adapter._torch_openmp() != 0 and adapter._GOMP


@pytest.mark.parametrize("groups,C_in,C_out,D_mul", [(1, 5, 7, 9), (2, 4, 6, 11), (4, 4, 4, 18), (4, 4, 8, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_fast_path_equals_the_einsum_fold_values_and_gradients(cpu_path, groups, C_in, C_out, D_mul, dtype):
    from doconv.torch.folding import _fold_fast, fold

    g = torch.Generator().manual_seed(0)
    W = torch.randn(C_out, C_in // groups, D_mul, generator=g, dtype=dtype, requires_grad=True)
    D = torch.randn(C_in, 9, D_mul, generator=g, dtype=dtype, requires_grad=True)
    identity = torch.as_tensor(core.identity(9, D_mul), dtype=dtype)
    shape = [C_out, C_in // groups, 3, 3]
    upstream = torch.randn(shape, generator=g, dtype=dtype)
    fast = _fold_fast(W, D, identity, groups, shape)
    slow = fold(W, D, identity, groups, shape)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, slow, **tol)
    p = {"W": W.detach().double().numpy(), "D": D.detach().double().numpy()}
    np.testing.assert_allclose(fast.detach().double().numpy(), core.fold(p["W"], p["D"], groups, (3, 3)), **tol)
    for a, b in zip(torch.autograd.grad(fast, (W, D), upstream), torch.autograd.grad(slow, (W, D), upstream)):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups,C_out", [(2, 128), (1, 130)])
def test_cpu_fast_path_splits_large_folds_across_threads(cpu_path, dtype, groups, C_out):
    """Large folds are cut between threads (and, for 3x3/D_mul=9 float32, take the AVX2 kernels:
    rows in blocks of 4 with a remainder, grad_D in row chunks)."""
    from doconv import _fold_cpu

    layer = DOConv2d(256, C_out, 3, groups=groups, dtype=dtype)  # > 1 M MACs: above the split threshold
    assert C_out * (256 // groups) * 81 >= _fold_cpu.PARALLEL_MIN_MACS
    set_params(layer, random_params(layer))
    p = get_params(layer)
    fast = layer.weight
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel_err(fast.detach().double().numpy(), core.fold(p["W"], p["D"], groups, (3, 3))) < tol
    upstream = torch.randn(fast.shape, dtype=dtype)
    got = torch.autograd.grad(fast, (layer.W, layer.D), upstream)
    want = torch.autograd.grad(layer._fold(), (layer.W, layer.D), upstream)
    for a, b in zip(got, want):
        assert rel_err(a.double().numpy(), b.double().numpy()) < tol


def test_fold_thread_pool_is_remade_in_another_process(monkeypatch):
    """A forked child inherits the pool object but not its threads: it must not reuse it."""
    from doconv import _fold_cpu

    calls = []
    _fold_cpu.run_parts(lambda part, parts: calls.append(part), 2)
    first = _fold_cpu._POOL
    monkeypatch.setattr(_fold_cpu, "_POOL_PID", -1)  # as seen from a child process
    _fold_cpu.run_parts(lambda part, parts: calls.append(part), 2)
    assert _fold_cpu._POOL is not first and sorted(calls) == [0, 0, 1, 1]


def test_cpu_fast_path_passes_gradcheck(cpu_path):
    from doconv.torch.folding import _fold_fast

    identity = torch.as_tensor(core.identity(4, 6), dtype=torch.float64)
    W = torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True)
    D = torch.randn(4, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda W, D: _fold_fast(W, D, identity, 2, [4, 2, 2, 2]), (W, D))


@pytest.mark.parametrize("kernel_size,D_mul", [(3, None), (3, 13), (5, None), ((1, 3), 5)])
def test_later_steps_never_change_what_others_hold(cpu_path, kernel_size, D_mul):
    """Gradients a user keeps stay as they were, and gradients accumulate (the fold allocates its
    outputs on every call; this test guarded the workspace reuse that it had before)."""
    layer = DOConv2d(16, 16, kernel_size, padding="same", dtype=torch.float64, D_mul=D_mul)
    reference = copy.deepcopy(layer)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64, requires_grad=True)

    def grads(model, x):
        model.zero_grad(set_to_none=True)
        model(model(x)).square().sum().backward()  # the layer twice in one graph: shared weights
        return model.W.grad.clone(), model.D.grad.clone()

    def reference_grads():
        reference.load_state_dict(layer.state_dict())
        with torch.no_grad():
            W, D = reference.W.clone().requires_grad_(), reference.D.clone().requires_grad_()
        fold = lambda: adapter_fold(W, D, reference)  # noqa: E731
        reference._conv(reference._conv(x, fold(), reference.bias), fold(), reference.bias).square().sum().backward()
        return W.grad, D.grad

    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-3)
    stashed = []
    for _ in range(3):
        W_grad, D_grad = grads(layer, x)
        want_W, want_D = reference_grads()
        torch.testing.assert_close(W_grad, want_W, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(D_grad, want_D, rtol=1e-10, atol=1e-12)
        for grad in (layer.W.grad, layer.D.grad):
            stashed.append((grad, grad.clone()))  # a user keeping last step's gradients
        optimizer.step()
    for held, copy_taken in stashed:
        assert torch.equal(held, copy_taken)  # later steps did not write into them
    # gradients accumulate across backward passes without zero_grad
    layer.zero_grad(set_to_none=True)
    layer(x).sum().backward()
    once = layer.W.grad.clone(), layer.D.grad.clone()
    layer(x).sum().backward()
    torch.testing.assert_close(layer.W.grad, 2 * once[0])
    torch.testing.assert_close(layer.D.grad, 2 * once[1])


def adapter_fold(W, D, layer):
    from doconv.torch import fold

    return fold(W, D, layer.identity, layer.groups, layer._kernel_shape)


def test_user_gradients_passed_to_autograd_are_not_modified(cpu_path):
    layer = DOConv2d(8, 8, 3)
    kernel = layer.weight
    upstream = torch.randn(kernel.shape)
    before = upstream.clone()
    torch.autograd.grad(kernel, (layer.W, layer.D), upstream)
    assert torch.equal(upstream, before)


def test_gradients_reach_W_and_D():
    layer = DOConv2d(3, 4, 3, groups=1)
    layer(torch.randn(2, 3, 6, 6)).square().sum().backward()
    assert float(layer.W.grad.abs().sum()) > 0 and float(layer.D.grad.abs().sum()) > 0


def test_eval_folds_every_forward_and_reuses_a_kernel_only_inside_cached_kernels():
    """Formerly: the eval kernel was cached until the parameters' version counters changed. Now
    nothing is kept between forwards; only an open cached_kernels block reuses a kernel."""
    layer = DOConv2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        first = layer._kernel()
        assert layer._kernel() is not first  # folded again, from the parameters as they are
        with cached_kernels(layer):
            cached = layer._kernel()
            assert layer._kernel() is cached  # composed once inside the block, reused
        assert layer._kernel() is not cached
        y0 = layer(x)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.train()
    layer(x).sum().backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        assert layer._kernel() is not first  # the optimizer changed W: recomposed
        assert not torch.allclose(layer(x), y0)
        torch.testing.assert_close(layer(x), layer.fuse()(x))
        layer.load_state_dict({k: v * 2 for k, v in layer.state_dict().items()})
        torch.testing.assert_close(layer(x), layer.fuse()(x))


def test_training_step_never_uses_a_stale_kernel():
    layer = DOConv2d(3, 4, 3)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(2, 3, 6, 6)
    for _ in range(3):
        optimizer.zero_grad()
        y = layer(x)
        torch.testing.assert_close(y, layer.fuse()(x))
        y.square().mean().backward()
        optimizer.step()


# --- feature composition, for batches with few output positions -----------------------------------


@pytest.fixture
def composition():
    """Restores use_feature_composition's setting after the test."""
    before = feature_composition_in_use()
    yield
    use_feature_composition(before)


FEATURE_CASES = [
    # in, out, kernel, stride, padding, dilation, groups, bias, padding_mode, D_mul, input (N or None, H, W)
    (16, 64, 3, 1, 1, 1, 1, True, "zeros", None, (4, 2, 2)),
    (16, 64, 3, 2, 1, 1, 2, False, "zeros", None, (1, 3, 3)),
    (8, 128, (3, 2), 1, "same", (1, 2), 4, True, "zeros", None, (1, 2, 3)),
    (8, 64, 3, 1, 1, 1, 1, True, "reflect", None, (1, 2, 2)),
    (8, 64, 3, 1, (1, 0), 1, 1, True, "circular", 12, (1, 2, 3)),
    (8, 64, 3, 1, "valid", 1, 1, True, "zeros", None, (2, 3, 4)),
    (8, 64, 3, 1, 1, 1, 1, False, "zeros", None, (None, 2, 2)),  # unbatched
]


@pytest.mark.parametrize(
    "case,channels_last",
    [(case, False) for case in FEATURE_CASES] + [(case, True) for case in FEATURE_CASES if case[-1][0] is not None],
)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_feature_composition_equals_folding_values_and_gradients(
    composition, monkeypatch, case, channels_last, dtype, tol
):
    C_in, C_out, ks, stride, padding, dilation, groups, bias, mode, D_mul, (N, H, W) = case
    layer = DOConv2d(C_in, C_out, ks, stride, padding, dilation, groups, bias, mode, dtype=dtype, D_mul=D_mul)
    set_params(layer, random_params(layer))
    x0 = torch.randn(((N,) if N else ()) + (C_in, H, W), dtype=dtype, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x0 = x0.to(memory_format=torch.channels_last)
    assert layer._composes_features(x0)

    def run(features):
        use_feature_composition(features)
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        y = layer(x)
        # a weighting that differs per element, so that every gradient entry is checked
        (y * torch.linspace(-1, 2, y.numel(), dtype=dtype).reshape(y.shape)).sum().backward()
        grads = [x.grad] + [p.grad for p in (layer.W, layer.D, layer.bias) if p is not None]
        return y.detach(), grads

    folds = []
    monkeypatch.setattr(layers, "_fold_fast", lambda *args: folds.append(1) or _fold_fast(*args))
    y_feature, grads_feature = run(True)
    assert not folds  # the fold never ran
    y_kernel, grads_kernel = run(False)
    assert folds
    assert y_feature.dtype == dtype and y_feature.shape == y_kernel.shape
    for layout in (torch.contiguous_format, torch.channels_last):  # nn.Conv2d's output layout
        assert y_feature.is_contiguous(memory_format=layout) == y_kernel.is_contiguous(memory_format=layout)
    for got, want in zip([y_feature] + grads_feature, [y_kernel] + grads_kernel):
        assert rel_err(got, want) < tol
    if dtype == torch.float64:  # and both against the NumPy oracle
        p = get_params(layer)
        x = x0.numpy() if N else x0.numpy()[None]
        want = core.doconv_reference(x, p["W"], p["D"], p["bias"], ks, stride, padding, dilation, groups, mode)
        assert rel_err(y_feature.numpy() if N else y_feature.numpy()[None], want) < 1e-10


def test_feature_composition_only_in_eager_cpu_training_where_cheaper(composition):
    layer = DOConv2d(64, 256, 3, padding=1)
    few, many = torch.randn(2, 64, 2, 2), torch.randn(2, 64, 16, 16)
    assert layer._composes_features(few)
    assert not layer._composes_features(many)  # 512 positions: folding is cheaper
    with torch.no_grad():
        assert not layer._composes_features(few)  # no gradients: the cached fold costs nothing
    layer.requires_grad_(False)
    assert not layer._composes_features(few)
    layer.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._composes_features(few)
    assert not copy.deepcopy(layer).to(torch.bfloat16)._composes_features(few.bfloat16())
    assert not layer._composes_features(few.double())  # the layer is float32
    assert not DOConv2d(64, 256, 1)._composes_features(few)  # 1x1: no D, nothing to compose
    assert not DOConv1d(64, 256, 3, padding=1)._composes_features(torch.randn(2, 64, 2))
    unpadded = DOConv2d(64, 256, 3)
    assert not unpadded._composes_features(few)  # smaller than the kernel: the native conv's error
    with pytest.raises(RuntimeError):
        unpadded(few)
    assert use_feature_composition(False) is False and feature_composition_in_use() is False
    assert not layer._composes_features(few)
    with pytest.raises(TypeError, match="enabled must be True or False. Received: enabled='yes'"):
        use_feature_composition("yes")
    assert feature_composition_in_use() is False


def test_feature_composition_trains_like_folding(composition):
    """Three SGD steps of a small network whose last layer composes features: the same parameters."""
    torch.manual_seed(0)
    net = nn.Sequential(DOConv2d(3, 16, 3, 2, 1), nn.ReLU(), DOConv2d(16, 128, 3, 2, 1), nn.Flatten(), nn.LazyLinear(3))
    net = net.double()
    x, target = torch.randn(4, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    net(x)
    assert not net[0]._composes_features(x) and net[2]._composes_features(net[1](net[0](x)))
    results = []
    for features in (True, False):
        use_feature_composition(features)
        trained = copy.deepcopy(net)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(trained(x), target).backward()
            optimizer.step()
        results.append(trained.state_dict())
    for key, value in results[0].items():
        torch.testing.assert_close(value, results[1][key], rtol=1e-10, atol=1e-12)
    assert not torch.equal(results[0]["2.D"], net.state_dict()["2.D"])  # D really trained


# --- from_conv, state_dict loading, fuse ------------------------------------------------------


@pytest.mark.parametrize("D_mul", [None, 11, 18, 21])
def test_from_conv_gives_the_conv_outputs(D_mul):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    layer = DOConv2d.from_conv(conv, D_mul=D_mul)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)
    assert layer.W.dtype == torch.float64 and float(layer.D.abs().max()) == 0
    tail = 9 * (layer.D_mul // 9)
    if tail < layer.D_mul:  # columns past the last tile keep a random init, so they can learn
        assert float(layer.W[:, :, tail:].abs().max()) > 0
    assert float(layer.W[:, :, 9:tail].detach().abs().sum()) == 0


def test_from_conv_refuses_other_layers():
    with pytest.raises(TypeError, match=r"DOConv2d.from_conv needs an nn.Conv2d. Received: conv of type Conv1d"):
        DOConv2d.from_conv(nn.Conv1d(2, 2, 3))


def test_load_a_plain_conv_state_dict():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    layer = DOConv2d(4, 6, 3, padding=1, groups=2, D_mul=12)
    layer.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)
    # A size mismatch as nn.Module reports one: a RuntimeError after the whole walk, naming the key.
    with pytest.raises(
        RuntimeError,
        match=r"size mismatch for weight: .* shape \(6, 2, 3, 3\)\. Received: weight.shape=\(6, 2, 5, 5\)",
    ):
        layer.load_state_dict(nn.Conv2d(4, 6, 5, groups=2).state_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_assign_a_plain_conv_checkpoint_into_a_meta_built_layer(dtype):
    """The large-model pattern: build on the meta device, load_state_dict(assign=True) a plain conv's
    checkpoint; W, D and the identity take the checkpoint's dtype and device, as nn.Conv2d's weight does."""
    conv = nn.Conv2d(4, 6, 3, padding=1).to(dtype)
    with torch.device("meta"):
        layer = DOConv2d(4, 6, 3, padding=1, D_mul=11)
    layer.load_state_dict(conv.state_dict(), assign=True)
    assert {t.dtype for t in (layer.W, layer.D, layer.bias, layer.identity)} == {dtype}
    assert not any(t.is_meta for t in (layer.W, layer.D, layer.identity))
    x = torch.randn(2, 4, 7, 7, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=2e-2, atol=2e-2)
        assert bool(torch.isfinite(layer.W).all())  # the columns past the tile: a fresh init, not meta's nothing


def test_loading_a_plain_conv_over_non_finite_W_gives_a_finite_layer():
    """to_empty() leaves whatever memory held in W: the columns a plain kernel does not set meet a zero
    identity, and NaN there made every output NaN (NaN * 0)."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = DOConv2d(4, 6, 3, padding=1, D_mul=11)
    with torch.no_grad():
        layer.W.fill_(float("nan"))
    layer.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)


def test_a_complex_conv_converts_with_its_imaginary_part():
    conv = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.complex64)
    layer = DOConv2d.from_conv(conv)
    x = torch.randn(1, 3, 6, 6, dtype=torch.complex64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(convert_model(nn.Sequential(conv))(x), conv(x), rtol=1e-5, atol=1e-5)


def original_checkpoint(layer, seed=0):
    """A state_dict laid out as the original DO-Conv PyTorch code saves it (W, D, D_diag)."""
    rng = np.random.default_rng(seed)
    K, D_mul = layer.D.shape[1], layer.D_mul
    diag = np.tile(core.identity(K, D_mul, np.float32)[None], (layer.in_channels, 1, 1))
    return {
        "W": torch.from_numpy(rng.normal(size=tuple(layer.W.shape)).astype(np.float32)),
        "D": torch.from_numpy(rng.normal(size=tuple(layer.D.shape)).astype(np.float32) * 0.3),
        "D_diag": torch.from_numpy(diag),
        "bias": torch.zeros(layer.out_channels),
    }


@pytest.mark.parametrize(
    "groups,C_in,C_out,exact", [(1, 3, 4, True), (4, 4, 4, True), (2, 4, 4, False), (4, 4, 8, False)]
)
def test_load_a_checkpoint_of_the_original_code(groups, C_in, C_out, exact):
    layer = DOConv2d(C_in, C_out, 3, padding=1, groups=groups)
    state = original_checkpoint(layer)
    if not exact:
        with pytest.raises(
            ValueError, match=rf"cannot be loaded exactly.*Received: groups={groups}.*fold_reference_pytorch"
        ):
            layer.load_state_dict(state)
        return
    layer.load_state_dict(state)
    kernel = core.fold_reference_pytorch(
        state["W"].numpy(), state["D"].numpy(), state["D_diag"].numpy(), groups, (3, 3)
    )
    np.testing.assert_allclose(layer.weight.detach().numpy(), kernel, rtol=1e-5, atol=1e-6)


def test_fuse_keeps_device_dtype_mode_and_refuses_non_finite():
    layer = DOConv2d(3, 4, 3, padding="same", padding_mode="reflect", dtype=torch.float64).eval()
    fused = layer.fuse()
    assert type(fused) is nn.Conv2d and fused.weight.dtype == torch.float64 and not fused.training
    assert fused.padding == "same" and fused.padding_mode == "reflect"
    with torch.no_grad():
        layer.D[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Cannot fuse DOConv2d: its parameter D holds NaN or infinity"):
        layer.fuse()


# --- whole models -------------------------------------------------------------------------


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU())])
        self.heads = nn.ModuleDict({"a": nn.Conv2d(8, 4, 1), "b": nn.Conv2d(8, 4, (1, 3), padding=(0, 1))})
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.again = self.shared  # one module under two names

    def forward(self, x):
        x = self.blocks[0](self.stem(x))
        return self.again(self.shared(self.heads["a"](x) + self.heads["b"](x)))


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_convert_and_fuse_a_nested_model():
    model = Nested().double().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = model(x)
    converted = convert_model(model)
    assert {k: v.equal(before[k]) for k, v in model.state_dict().items()} == dict.fromkeys(before, True)
    assert type(converted.stem) is DOConv2d and type(converted.heads["b"]) is DOConv2d
    assert converted.shared is converted.again and not converted.training
    assert next(converted.parameters()).dtype == torch.float64
    torch.testing.assert_close(converted(x), y, rtol=1e-10, atol=1e-12)
    fused = fuse_model(converted)
    assert type(fused.stem) is nn.Conv2d and count(fused) == count(model)
    torch.testing.assert_close(fused(x), y, rtol=1e-10, atol=1e-12)


def test_convert_model_D_mul_forms():
    model = Nested()
    with pytest.warns(UserWarning, match=r"D_mul=4 is smaller than the kernel's K for these layers.*stem.*blocks.0.0"):
        converted = convert_model(model, D_mul=4)
    assert converted.stem.D_mul == 9 and converted.heads["b"].D_mul == 4 and converted.heads["a"].D_mul == 1
    chosen = convert_model(model, D_mul=lambda name, conv: None if name.startswith("heads") else 2 * 9)
    assert type(chosen.heads["a"]) is nn.Conv2d and chosen.stem.D_mul == 18
    with pytest.raises(ValueError, match=r"D_mul must be positive. Received: D_mul=0"):
        convert_model(model, D_mul=0)
    with pytest.raises(ValueError, match=r"^'stem': D_mul must be at least .* Received: D_mul=2"):
        convert_model(model, D_mul=lambda name, conv: 2)  # a callable's refused value: the message names the layer


def test_convert_model_failure_leaves_the_model_untouched():
    model = Nested()
    calls = []

    def fail_on_second(name, conv):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return None if conv.kernel_size == (1, 1) else 9

    with pytest.raises(RuntimeError, match="boom"):
        convert_model(model, D_mul=fail_on_second, inplace=True)
    assert not any(isinstance(m, DOConv2d) for m in model.modules())
    converted = convert_model(model, inplace=True)
    assert converted is model and type(model.stem) is DOConv2d


def test_nothing_to_convert_or_fuse_warns():
    with pytest.warns(UserWarning, match="found no nn.Conv1d/2d/3d"):
        convert_model(nn.Linear(2, 2))
    with pytest.warns(UserWarning, match="found no DO-Conv layer"):
        fuse_model(nn.Linear(2, 2))


def test_params_round_trip_and_errors():
    layer = DOConv2d(4, 6, 3, groups=2, D_mul=11)
    p = random_params(layer)
    q = get_params(set_params(layer, p))
    assert all(np.array_equal(p[k], q[k]) for k in p)
    with pytest.raises(
        ValueError, match=r"params\['D'\] must have shape \(4, 9, 11\) for this layer. Received: \(4, 9, 9\)"
    ):
        set_params(layer, dict(p, D=np.zeros((4, 9, 9), np.float32)))
    with pytest.raises(ValueError, match=r"params\['bias'\] must have shape \(6,\) for this layer. Received: None"):
        set_params(layer, dict(p, bias=None))
    with pytest.raises(TypeError, match=r"get_params needs a DO-Conv layer. Received: layer of type Conv2d"):
        get_params(nn.Conv2d(1, 1, 1))


# --- export, compile, precision, memory format -------------------------------------------------


def small_net():
    return nn.Sequential(
        DOConv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        DOConv2d(8, 8, 3, padding=1, groups=4, padding_mode="reflect"),
        DOConv2d(8, 8, 3, stride=2, groups=8, D_mul=12),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()


def test_torchscript_and_trace_unfused_and_fused():
    net = small_net()
    x = torch.randn(2, 3, 8, 8)
    y = net(x)
    for model in (net, fuse_model(net)):
        torch.testing.assert_close(torch.jit.script(model)(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.jit.trace(model, x)(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_forward_and_backward():
    net = small_net().train()
    x = torch.randn(2, 3, 8, 8)
    ref = copy.deepcopy(net)
    compiled = torch.compile(net)
    y = compiled(x)
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(net[0].D.grad, ref[0].D.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net[3].W.grad, ref[3].W.grad, rtol=1e-4, atol=1e-5)


def test_onnx_export_of_the_fused_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    net = small_net()
    fused = fuse_model(net)
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "fused.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fused, (x,), str(path))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and not ops & {"Einsum", "MatMul", "Mul"}
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, net(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_mixed_precision(dtype):
    net = small_net().train()
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=dtype):
        y = net(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert float(net[0].D.grad.abs().sum()) > 0 and net[0].D.grad.dtype == torch.float32


def test_half_precision_parameters_take_the_torch_fold():
    layer = DOConv2d(3, 4, 3, padding=1).to(torch.bfloat16)
    y = layer(torch.randn(2, 3, 6, 6, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and layer.fuse().weight.dtype == torch.bfloat16


def test_channels_last():
    net = small_net()
    x = torch.randn(2, 3, 8, 8)
    x_last = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(net.to(memory_format=torch.channels_last)(x_last), net(x), rtol=1e-5, atol=1e-5)


# --- CUDA (skipped without a GPU; CI has none) -----------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_gradients_match_cpu_and_the_model_fuses_on_the_gpu():
    torch.manual_seed(0)
    cpu = small_net().train().double()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for net, inputs in ((cpu, x), (gpu, x.cuda())):
        net.zero_grad()
        net(inputs).square().sum().backward()
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert q.device.type == "cuda" and q.grad.device.type == "cuda", name
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-9, atol=1e-12)
    gpu.eval()
    fused = fuse_model(gpu)
    assert all(p.device.type == "cuda" for p in fused.parameters())
    with torch.no_grad():
        torch.testing.assert_close(fused(x.cuda()), gpu(x.cuda()), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu.eval()(x), rtol=1e-9, atol=1e-12)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    net = small_net().train().cuda()
    with torch.autocast("cuda", dtype=dtype):
        y = net(torch.randn(2, 3, 8, 8, device="cuda"))
    assert y.dtype == dtype
    y.float().sum().backward()
    assert float(net[0].D.grad.abs().sum()) > 0 and net[0].D.grad.dtype == torch.float32


def test_benchmark_composition_sweep_prints_its_table(capsys):
    from doconv.benchmarks import bench_torch

    threads = torch.get_num_threads()
    try:
        assert bench_torch.main(["--composition-sweep", "--quick", "--repeats", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()[1:]  # after the header naming the doconv measured
    assert lines[0].startswith("3x3 64->64, D_mul 9, train step: composing features / folding")
    rows = [line.split(" | ") for line in lines[3:]]
    # batch x positions against 64 output channels: an eighth, a half, 49/64 and twice the fold
    assert [float(row[1]) for row in rows] == [0.125, 0.5, 0.766, 2.0]
    assert all(float(row[2]) > 0 for row in rows)


def test_benchmark_part_by_part_converts_each_part_alone(monkeypatch):
    from doconv.benchmarks import bench_torch

    timed = {}

    def side_by_side(steps, repeats, warmup, device):
        timed.update(steps)
        return {name: [1.0] for name in steps}

    monkeypatch.setattr(bench_torch, "side_by_side", side_by_side)
    ratios = bench_torch.part_by_part(quick=True, repeats=1)
    assert list(ratios) == ["control", "all", *bench_torch.RESNET_PARTS]
    assert all(ratio == 1.0 for ratio in ratios.values())
    # Each step's closure holds its net: find the DO-Conv layers of every variant, by part.
    nets = {
        name: next(c.cell_contents for c in step.__closure__ if isinstance(c.cell_contents, nn.Sequential))
        for name, step in timed.items()
    }
    for name, net in nets.items():
        converted = {i for i, module in enumerate(net) if any(isinstance(m, DOConv2d) for m in module.modules())}
        if name in ("native", "control"):
            assert converted == set()
        elif name == "all":
            assert converted == {0, 4, 5, 6, 7, 8, 9, 10, 11}
        else:
            assert converted == set(bench_torch.RESNET_PARTS[name])
            assert not any(isinstance(m, nn.Conv2d) for i in converted for m in net[i].modules())


def test_benchmark_fold_split_prints_both_ways_side_by_side(capsys):
    from doconv.benchmarks import bench_torch
    from doconv.torch import folding

    if folding._foldkernel is None or not folding._GOMP:
        assert bench_torch.main(["--fold-split", "--quick", "--repeats", "1"]) == 2
        return
    assert bench_torch.main(["--fold-split", "--quick", "--repeats", "1", "--threads", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("fold forward + backward, D_mul 9: Python pool / torch's OpenMP threads")
    rows = [line.split(" | ") for line in lines[4:]]
    assert [row[0] for row in rows] == ["| 3x3 64->64", "| 3x3 256->256"]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)
    assert folding._GOMP  # restored


def test_benchmark_header_warns_about_a_build_without_the_kernel(monkeypatch):
    from doconv.benchmarks import bench_torch

    monkeypatch.setattr(bench_torch._fold_cpu, "kernel", None)
    where, warning = bench_torch.which_doconv()
    assert where.endswith("C fold kernel NOT built")
    assert warning.startswith("WARNING: doconv's C fold kernel is not built here") and "NumPy fallback" in warning


@needs_cuda
def test_benchmark_program_runs_on_cuda(capsys):
    from doconv.benchmarks import bench_torch

    assert bench_torch.main(["--quick", "--no-memory", "--repeats", "1", "--device", "cuda"]) == 0
    assert "train step" in capsys.readouterr().out


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(D_mul=4), ValueError, r"D_mul must be at least.*= 9.*Received: D_mul=4, kernel_size=\(3, 3\)"),
        (dict(groups=3), ValueError, r"input channels must be divisible by groups. Received: in_channels=4, groups=3"),
        (
            dict(out_channels=6, groups=4),
            ValueError,
            r"output channels must be divisible by groups. Received: out_channels=6, groups=4",
        ),
        (
            dict(stride=2, padding="same"),
            ValueError,
            r"padding='same' is not supported for strided.*Received: padding='same', stride=\(2, 2\)",
        ),
        (
            dict(padding=((0, 1), (1, 1))),
            ValueError,
            r"padding must be symmetric.*Received: padding=\(\(0, 1\), \(1, 1\)\)",
        ),
        (dict(padding=-1), ValueError, r"padding must be >= 0. Received: padding=-1"),
        (dict(padding="full"), ValueError, r"Received: padding='full'"),
        (dict(padding_mode="mirror"), ValueError, r"Received: padding_mode='mirror'"),
        (dict(kernel_size=0), ValueError, r"kernel_size must be positive. Received: kernel_size=0"),
        (
            dict(kernel_size=True),
            TypeError,
            r"kernel_size must be an integer or a sequence of 2 integers. Received: kernel_size=True",
        ),
        (dict(in_channels=2.5), TypeError, r"in_channels must be an integer. Received: in_channels=2.5"),
        (dict(bias=1), TypeError, r"bias must be True or False. Received: bias=1"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    args = dict(in_channels=4, out_channels=8, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        DOConv2d(**args)


def test_bad_input_at_forward_names_expected_and_received_shapes():
    layer = DOConv2d(3, 4, 3)
    with pytest.raises(
        ValueError, match=r"expects input of shape \(N, 3, \*spatial\).*Received: input.shape=\[2, 4, 8, 8\]"
    ):
        layer(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"with 2 spatial dimensions. Received: input.shape=\[2, 3, 8\]"):
        layer(torch.randn(2, 3, 8))


# --- DistributedDataParallel ------------------------------------------------------------------


def _ddp_net():
    torch.manual_seed(0)
    return nn.Sequential(
        DOConv2d(3, 6, 3, padding=1), nn.ReLU(), DOConv2d(6, 6, 3, groups=3, D_mul=12), nn.Flatten(), nn.LazyLinear(2)
    ).double()


def _ddp_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64), torch.randn(
        8, 2, generator=g, dtype=torch.float64
    )


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    net = _ddp_net()
    x, t = _ddp_data()
    net(x[:1])  # materialise the lazy layer before wrapping
    model = nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shard = slice(rank * 4, rank * 4 + 4)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[shard]), t[shard]).backward()
        optimizer.step()
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_replicas_stay_identical_and_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    net = _ddp_net()
    x, t = _ddp_data()
    net(x[:1])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), t).backward()
        optimizer.step()
    for key, value in net.state_dict().items():
        assert torch.equal(states[0][key], states[1][key]), key
        torch.testing.assert_close(states[0][key], value, rtol=1e-10, atol=1e-12)
    assert float(net[0].D.abs().max()) > 0  # D really trained


def test_benchmark_program_prints_its_ratio_table(capsys):
    from doconv.benchmarks import bench_torch

    threads = torch.get_num_threads()
    try:
        assert bench_torch.main(["--quick", "--no-memory", "--repeats", "1", "--threads", "1", "--profile"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    import doconv
    from doconv import _fold_cpu

    kernel = "built" if _fold_cpu.kernel is not None else "NOT built"
    assert (
        out.splitlines()[0]
        == f"doconv {doconv.__version__} from {os.path.dirname(doconv.__file__)}, C fold kernel {kernel}"
    )
    for row in (
        "train step",
        "train step, every layer folding",
        "eval forward, unfused, inside cached_kernels",
        "eval forward, unfused, folding every forward",
        "eval forward, fused",
        "MobileNetV2-style, batch 2, 32x32: train step",
        "EfficientNet-B0-style, batch 2, 32x32: train step",
        "share of a DO-Conv MobileNetV2-style training step",
        "share of a DO-Conv EfficientNet-B0-style training step",
        "ResNet-18-style, DO-Conv step minus native, by op: ",
        "MobileNetV2-style, DO-Conv step minus native, by op: ",
        "at 2x2, batch 2: train step",
        "at 2x2, batch 2: train step, folding",
        "at 7x7, batch 2: eval forward, unfused, inside cached_kernels",
        "at 7x7, batch 2: eval forward, unfused, folding every forward",
        "state_dict tensor bytes",
    ):
        assert row in out
    # the state_dict holds exactly the native tensors plus D
    assert "(DO-Conv - native - D = 0 B;" in out
    share = float(out.split("training step: ")[1].split(" %")[0])
    assert 0 < share < 100
    # the quick net's last two stages (2x2 and 1x1 feature maps, batch 2) compose features, the rest folds
    features, folding = bench_torch.composing_layers(quick=True)
    assert len(features) == 8 and all(name.split(".")[0] in ("8", "9", "10", "11") for name in features)
    assert f"layers composing features in a training step: {len(features)} of {len(features) + len(folding)}" in out
    # five passes over the folding layers' W, in bytes
    quick = convert_model(bench_torch.resnet18_style(width=bench_torch._sizes(True)["width"]))
    kernel_mb = sum(4 * quick.get_submodule(name).W.numel() for name in folding) / 1e6
    assert f"fold memory-traffic floor: {5 * kernel_mb:.1f} MB per step at " in out
