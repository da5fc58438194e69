"""doconv.torch follows its parameters: no stale kernel, no shared buffers, higher-order gradients,
clear errors for mismatched parameters, and large kernels that train (or refuse) without a crash."""

import copy
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from doconv import core  # noqa: E402
from doconv.torch import (  # noqa: E402
    ConvError,
    DOConv2d,
    cached_kernels,
    fold,
    folding,  # noqa: E402
    get_params,
    use_feature_composition,
)

torch.set_num_threads(2)


def fused_output(layer, x):
    with torch.no_grad():
        return layer.fuse()(x)


def moved(layer, seed=0):
    """``layer`` with D and W at random values (D off zero), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


@pytest.fixture(params=["C kernel", "NumPy"])
def cpu_path(request, monkeypatch):
    if request.param == "NumPy":
        monkeypatch.setattr(folding, "_foldkernel", None)
    elif folding._foldkernel is None:
        pytest.skip("doconv._foldkernel was not built here")
    return request.param


@pytest.fixture
def composition():
    yield
    use_feature_composition(True)


# --- 1. the output follows the parameters, however they change ------------------------------------


def _updates():
    """Ways users change parameters; each returns nothing and changes the layer's values."""
    return {
        "W.data": lambda layer: layer.W.data.mul_(2),
        "D.data": lambda layer: layer.D.data.add_(0.3),
        "sgd through .data": lambda layer: [p.data.sub_(0.1 * torch.ones_like(p)) for p in layer.parameters()],
        "no_grad in place": lambda layer: _no_grad(lambda: layer.D.mul_(-1)),
        "new Parameter": lambda layer: setattr(layer, "W", nn.Parameter(layer.W.detach() * 3)),
        "load_state_dict": lambda layer: layer.load_state_dict({k: v + 0.2 for k, v in layer.state_dict().items()}),
    }


def _no_grad(change):
    with torch.no_grad():
        change()


@pytest.mark.parametrize("how", list(_updates()))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_output_weight_fuse_and_params_follow_every_kind_of_update(cpu_path, how, mode):
    layer = moved(DOConv2d(4, 6, 3, padding=1, groups=2, dtype=torch.float64))
    layer.train(mode == "train")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
    layer(x).sum().backward()  # a training forward and backward first, as in a real loop
    _updates()[how](layer)
    want = fused_output(layer, x)  # fuse() from the values now
    p = get_params(layer)
    folded = core.fold(p["W"], p["D"], 2, (3, 3))
    np.testing.assert_allclose(layer.weight.detach().numpy(), folded, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(want, before)  # the update really changed the output
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)  # with gradients too
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.testing.assert_close(state["W"], torch.from_numpy(p["W"]))


def test_optimizer_steps_and_functional_call_are_seen():
    layer = moved(DOConv2d(3, 4, 3, dtype=torch.float64)).eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(2):
        layer(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), fused_output(layer, x))
    other = {"W": layer.W.detach() * 2, "D": layer.D.detach() - 0.1}
    with torch.no_grad():
        got = torch.func.functional_call(layer, other, (x,))
        swapped = copy.deepcopy(layer)
        swapped.W.copy_(other["W"])
        swapped.D.copy_(other["D"])
        torch.testing.assert_close(got, fused_output(swapped, x))


def test_gradcheck_through_functional_call_sees_W():
    """gradcheck perturbs W in place; the old version-keyed cache answered with a zero Jacobian."""
    layer = moved(DOConv2d(2, 3, 3, dtype=torch.float64)).eval()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    W = layer.W.detach().clone().requires_grad_(True)

    def f(W):
        return torch.func.functional_call(layer, {"W": W}, (x,))

    jacobian = torch.autograd.functional.jacobian(f, W)
    assert float(jacobian.abs().sum()) > 0
    assert torch.autograd.gradcheck(f, (W,))


# --- 2. `weight` is the caller's own tensor ------------------------------------------------------


@pytest.mark.parametrize("kernel_size", [3, 1])
def test_writing_into_weight_never_changes_the_layer(cpu_path, kernel_size):
    layer = moved(DOConv2d(3, 4, kernel_size))
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        y = layer(x)
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.weight.mul_(0)  # under no_grad, into the returned tensor
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k])
    first, second = layer.weight, layer.weight
    assert first.data_ptr() != second.data_ptr()  # a new tensor on every read
    assert first.data_ptr() != layer.W.data_ptr()
    first.sum().backward()
    assert layer.W.grad is not None and float(layer.W.grad.abs().sum()) > 0  # differentiable


def test_torchs_conv_bn_fusion_reads_weight():
    layer = moved(DOConv2d(3, 4, 3, padding=1)).eval()
    bn = nn.BatchNorm2d(4).eval()
    bn.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 6, 6)
    conv = layer.fuse()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(layer(x)), rtol=1e-5, atol=1e-5)
        w, b = torch.nn.utils.fusion.fuse_conv_bn_weights(
            layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
    torch.testing.assert_close(w, fused.weight)


@pytest.mark.parametrize("groups", [1, 2])
def test_fx_symbolic_trace_follows_the_parameters(groups):
    """torch.fx traced into the layer and stopped at its Python checks (control flow on proxies)."""
    model = nn.Sequential(moved(DOConv2d(4, 6, 3, padding=1, groups=groups)), nn.ReLU(), moved(DOConv2d(6, 2, 1)))
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
        model[0].W.mul_(-2)  # the graph reads the parameters: it follows them
        torch.testing.assert_close(traced(x), model(x))


def test_code_that_replaces_a_conv_weight_is_told_to_fuse_first():
    layer = moved(DOConv2d(3, 4, 3)).eval()
    bn = nn.BatchNorm2d(4).eval()
    with pytest.raises(KeyError, match=r"has no weight Parameter to set.*fuse_conv_bn_eval\(layer.fuse\(\), bn\)"):
        torch.nn.utils.fusion.fuse_conv_bn_eval(layer, bn)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.utils.fusion.fuse_conv_bn_eval(layer.fuse(), bn)(x), bn(layer(x)))


def test_a_quantized_input_is_refused_naming_the_layer():
    """Eager-mode torch.ao.quantization leaves DOConv2d in float; its input arrives quantized."""
    layer = DOConv2d(3, 4, 3)
    x = torch.quantize_per_tensor(torch.randn(1, 3, 6, 6), 0.1, 0, torch.quint8)
    with pytest.raises(ConvError, match=r"DOConv2d does not run on quantized tensors.*torch.quint8"):
        layer(x)


# --- the explicit cache ------------------------------------------------------------------------


def test_cached_kernels_reuses_inside_nests_and_drops_on_exit():
    net = nn.Sequential(moved(DOConv2d(3, 4, 3)), nn.ReLU(), moved(DOConv2d(4, 4, 3), seed=1)).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        y = net(x)
        with cached_kernels(net):
            torch.testing.assert_close(net(x), y)
            kernel = net[0]._kernel()
            net[0].W.mul_(2)  # not seen inside the block (as parametrize.cached)
            assert net[0]._kernel() is kernel
            with cached_kernels(net[0]):
                assert net[0]._kernel() is kernel
            assert net[0]._kernel() is kernel  # the inner block left, the outer still open
            net.double()
            assert net[0]._kernel().dtype == torch.float64  # another dtype: folded again
            net.float()
        assert net[0]._kernel() is not kernel
        torch.testing.assert_close(net(x), fused_output(net[2], net[1](fused_output(net[0], x))))
    with pytest.raises(TypeError, match="cached_kernels needs an nn.Module. Received: model of type int"):
        with cached_kernels(3):
            pass


def test_cached_kernels_does_not_serve_forwards_that_need_gradients():
    layer = moved(DOConv2d(3, 4, 3))
    x = torch.randn(1, 3, 6, 6)
    with cached_kernels(layer):
        with torch.no_grad():
            layer(x)
        layer.W.data.mul_(2)
        y = layer(x)  # needs gradients: folded now, from W as it is
        y.sum().backward()
    torch.testing.assert_close(y.detach(), fused_output(layer, x))
    assert layer.W.grad is not None


def test_cached_kernels_folds_the_tensors_in_W_and_D_s_place():
    """functional_call's substitutes and a new Parameter are other factors: folded, not the cached kernel."""
    layer = moved(DOConv2d(3, 4, 3, padding=1)).eval()
    x = torch.randn(1, 3, 5, 5)
    other = {name: torch.randn_like(p) for name, p in layer.named_parameters()}
    with torch.no_grad():
        want = torch.func.functional_call(layer, other, (x,))
        own = layer(x)
        with cached_kernels(layer):
            layer(x)  # caches the kernel of the layer's own W and D
            torch.testing.assert_close(torch.func.functional_call(layer, other, (x,)), want)
            torch.testing.assert_close(layer(x), own)  # its own factors again
            layer.W = nn.Parameter(other["W"].clone())
            layer.D = nn.Parameter(other["D"].clone())
            layer.bias = nn.Parameter(other["bias"].clone())
            torch.testing.assert_close(layer(x), want)


def test_a_kernel_cached_under_inference_mode_serves_a_later_input_gradient():
    """A frozen net: a validation pass under inference_mode, then an input-gradient pass, in one block."""
    layer = moved(DOConv2d(3, 4, 3, padding=1)).requires_grad_(False)
    x = torch.randn(1, 3, 5, 5)
    x_grad = x.clone().requires_grad_()
    layer(x_grad).sum().backward()
    want = x_grad.grad
    with cached_kernels(layer):
        with torch.inference_mode():
            layer(x)
        x_grad = x.clone().requires_grad_()
        layer(x_grad).sum().backward()
    torch.testing.assert_close(x_grad.grad, want)


def test_cached_kernels_from_two_threads_entering_and_leaving():
    from doconv.torch import cache

    net = nn.Sequential(moved(DOConv2d(8, 16, 3, padding=1)), nn.ReLU(), moved(DOConv2d(16, 16, 3), seed=1)).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        want = net(x)
    errors = []

    def worker():
        for _ in range(20):
            with torch.no_grad(), cached_kernels(net):
                for _ in range(3):
                    if not torch.equal(net(x), want):
                        errors.append("cached")
            with torch.no_grad():
                if not torch.allclose(net(x), want, rtol=1e-6, atol=1e-6):
                    errors.append("uncached")

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert not any(layer in cache._OPEN for layer in net.modules())  # every block left: nothing kept


# --- 3. threads --------------------------------------------------------------------------------


def test_two_threads_training_and_evaluating_one_model_get_single_thread_results(composition):
    torch.manual_seed(0)
    # The second layer's fold (128 -> 128, 3x3) is above the threshold that splits it between
    # threads; the third layer, on a 2x2 output, composes features in training.
    net = nn.Sequential(
        DOConv2d(16, 128, 3, padding=1),
        nn.ReLU(),
        DOConv2d(128, 128, 3, padding=1),
        nn.ReLU(),
        DOConv2d(128, 128, 3, stride=4, padding=1),
    )
    for seed, index in enumerate((0, 2, 4)):
        moved(net[index], seed=seed)
    inputs = [torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    params = list(net.parameters())

    def train(x):
        y = net(x)
        return [y.detach()] + [g for g in torch.autograd.grad(y.square().sum(), params)]

    def evaluate(x):
        with torch.no_grad():
            return [net(x)]

    assert not net[2]._composes_features(net[1](net[0](inputs[0])))
    assert net[4]._composes_features(net[3](net[2](net[1](net[0](inputs[0])))))
    jobs = [(train, inputs[0]), (evaluate, inputs[1]), (train, inputs[1])]
    want = [[t.clone() for t in job(x)] for job, x in jobs]
    errors = []

    def worker(offset):
        for i in range(12):
            k = (i + offset) % len(jobs)
            job, x = jobs[k]
            for got, expected in zip(job(x), want[k]):
                if not torch.allclose(got, expected, rtol=1e-5, atol=1e-5):
                    errors.append((offset, i, k, float((got - expected).abs().max())))

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


# --- 4. higher-order gradients ----------------------------------------------------------------


def _fold_inputs(groups=2, C_in=4, C_out=4, K=4, D_mul=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C_out, C_in // groups, D_mul, generator=g, dtype=torch.float64, requires_grad=True)
    D = torch.randn(C_in, K, D_mul, generator=g, dtype=torch.float64, requires_grad=True)
    identity = torch.as_tensor(core.identity(K, D_mul), dtype=torch.float64)
    return W, D, identity, [C_out, C_in // groups, 2, 2]


@pytest.mark.parametrize("path", ["C kernel", "NumPy", "einsum"])
def test_fold_gradgradcheck_on_every_path(monkeypatch, path):
    if path == "NumPy":
        monkeypatch.setattr(folding, "_foldkernel", None)
    elif path == "C kernel" and folding._foldkernel is None:
        pytest.skip("doconv._foldkernel was not built here")
    W, D, identity, shape = _fold_inputs()
    fn = folding._fold_fast if path != "einsum" else fold
    f = lambda W, D: fn(W, D, identity, 2, shape)  # noqa: E731
    assert torch.autograd.gradcheck(f, (W, D))
    assert torch.autograd.gradgradcheck(f, (W, D))


@pytest.mark.parametrize("path", ["C kernel", "NumPy", "feature composition"])
def test_layer_gradgradcheck_through_functional_call(monkeypatch, composition, path):
    if path == "NumPy":
        monkeypatch.setattr(folding, "_foldkernel", None)
    elif path == "C kernel" and folding._foldkernel is None:
        pytest.skip("doconv._foldkernel was not built here")
    features = path == "feature composition"
    use_feature_composition(features)
    # One output position: the layer composes features there; nine: it folds.
    layer = moved(DOConv2d(2, 4, 3, padding=1, groups=2, dtype=torch.float64))
    size = 1 if features else 3
    x = torch.randn(1, 2, size, size, dtype=torch.float64)
    assert layer._composes_features(x) == features
    W, D = (p.detach().clone().requires_grad_(True) for p in (layer.W, layer.D))
    xr = x.clone().requires_grad_(True)
    f = lambda W, D, x: torch.func.functional_call(layer, {"W": W, "D": D}, (x,))  # noqa: E731
    # fast mode (random projections of the Jacobians): the exact check's cost grows with the square of the inputs
    assert torch.autograd.gradcheck(f, (W, D, xr), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (W, D, xr), fast_mode=True)


def test_hessian_vector_product_equals_the_einsum_folds(cpu_path):
    W, D, identity, shape = _fold_inputs(groups=2, C_in=6, C_out=4, K=4, D_mul=5)
    upstream = torch.randn(shape, dtype=torch.float64)
    vectors = (torch.randn_like(W), torch.randn_like(D))

    def hvp(fn):
        loss = (fn(W, D, identity, 2, shape).square() * upstream).sum()
        grads = torch.autograd.grad(loss, (W, D), create_graph=True)
        return torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vectors)), (W, D))

    for got, want in zip(hvp(folding._fold_fast), hvp(fold)):
        assert float(want.abs().max()) > 0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_forward_mode_derivatives_equal_the_einsum_folds(cpu_path):
    """torch.func.jvp / jacfwd / hessian and torch.autograd.forward_ad through the fast fold, as through fold."""
    W, D, identity, shape = _fold_inputs(groups=2, C_in=6, C_out=4, K=4, D_mul=5)
    W, D = W.detach(), D.detach()
    tangents = (torch.randn_like(W), torch.randn_like(D))
    for W_t, D_t in (tangents, (tangents[0], torch.zeros_like(D)), (torch.zeros_like(W), tangents[1])):
        got = torch.func.jvp(lambda W, D: folding._fold_fast(W, D, identity, 2, shape), (W, D), (W_t, D_t))
        want = torch.func.jvp(lambda W, D: fold(W, D, identity, 2, shape), (W, D), (W_t, D_t))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level():  # a tangent on W only: D's is None inside the Function
        dual = folding._fold_fast(forward_ad.make_dual(W, tangents[0]), D, identity, 2, shape)
        torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, fold(tangents[0], D, identity, 2, shape))

    def loss(fn):
        return lambda W, D: fn(W, D, identity, 2, shape).pow(3).sum()

    for got, want in zip(
        torch.func.hessian(loss(folding._fold_fast), argnums=(0, 1))(W, D),
        torch.func.hessian(loss(fold), argnums=(0, 1))(W, D),
    ):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_torch_func_grad_and_per_sample_gradients_with_vmap(cpu_path):
    layer = moved(DOConv2d(4, 4, 3, groups=2, dtype=torch.float64))
    params = {k: v.detach() for k, v in layer.named_parameters()}
    xs = torch.randn(3, 1, 4, 5, 5, dtype=torch.float64)

    def loss(params, x):
        return torch.func.functional_call(layer, params, (x,)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for i, x in enumerate(xs):
        layer.zero_grad()
        loss(dict(layer.named_parameters()), x).backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-10, atol=1e-12)
    # batched parameters (an ensemble through vmap) take the einsum fold
    ensemble = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    ys = torch.func.vmap(lambda p: torch.func.functional_call(layer, p, (xs[0],)))(ensemble)
    for i in range(2):
        with torch.no_grad():
            twin = copy.deepcopy(layer)
            for name, p in twin.named_parameters():
                p.copy_(ensemble[name][i])
        torch.testing.assert_close(ys[i], fused_output(twin, xs[0]), rtol=1e-10, atol=1e-10)


# --- mismatched parameters -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("D", torch.zeros(1, 9, 9), r"needs D of shape \(3, 9, 9\)\. Received: D\.shape=\(1, 9, 9\)"),
        ("D", torch.zeros(3, 9, 4), r"needs D of shape \(3, 9, 9\)\. Received: D\.shape=\(3, 9, 4\)"),
        ("W", torch.zeros(8, 3, 20), r"needs W of shape \(8, 3, 9\)\. Received: W\.shape=\(8, 3, 20\)"),
        ("bias", torch.zeros(5), r"needs bias of shape \(8,\)\. Received: bias\.shape=\(5,\)"),
    ],
)
def test_a_replaced_parameter_of_the_wrong_shape_raises_before_any_fold(cpu_path, name, value, message):
    layer = DOConv2d(3, 8, 3)
    setattr(layer, name, nn.Parameter(value))
    x = torch.randn(1, 3, 5, 5)
    for call in (lambda: layer(x), lambda: layer.weight, layer.fuse, lambda: layer.eval()(x)):
        with pytest.raises(ValueError, match=message):
            call()
        layer.train()
    with torch.no_grad(), cached_kernels(layer), pytest.raises(ValueError, match=message):
        layer(x)


def test_the_functional_fast_fold_checks_its_arguments(cpu_path):
    W, D, identity, shape = _fold_inputs()
    cases = [
        ((W, D[:3], identity, 2, shape), r"D must have shape \(C_in, K, D_mul\) = \(4, K, 6\) .* D\.shape=\(3, 4, 6\)"),
        ((W, D, identity[:2], 2, shape), r"identity must have shape \(K, D_mul\) = \(4, 6\)"),
        ((W, D, identity, 3, shape), r"groups must be a positive divisor of C_out=4\. Received: groups=3"),
        ((W, D, identity, 2, [4, 2, 3, 3]), r"kernel_shape must be \[4, 2, \*kernel_size\] with K=4"),
        ((W[0], D, identity, 2, shape), r"W must have 3 dimensions"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            folding._fold_fast(*args)


# --- large kernels -------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size,D_mul", [(51, None), (3, 300000)])
def test_large_kernels_train_a_step_or_refuse_cleanly(kernel_size, D_mul):
    """Run in a child process: a crash of native code must show as a failure, not end the test run."""
    code = textwrap.dedent(
        f"""
        import torch
        from doconv.torch import DOConv2d, fold
        torch.manual_seed(0)
        layer = DOConv2d(1, 2, {kernel_size}, padding={kernel_size} // 2, D_mul={D_mul})
        with torch.no_grad():
            layer.D.normal_(0, 0.01)
        x = torch.randn(1, 1, 5, 5)
        try:
            y = layer(x)
            y.square().sum().backward()
        except MemoryError as err:
            print("refused:", err)
            raise SystemExit(0)
        W, D = (p.detach().clone().requires_grad_(True) for p in (layer.W, layer.D))
        ref = fold(W, D, layer.identity, 1, layer._kernel_shape)
        torch.nn.functional.conv2d(x, ref, layer.bias.detach(), padding=layer.padding).square().sum().backward()
        for got, want in ((layer.W.grad, W.grad), (layer.D.grad, D.grad)):
            assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max())), "gradients differ"
        torch.optim.SGD(layer.parameters(), lr=0.1).step()
        print("trained")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.strip().splitlines()[-1].startswith(("trained", "refused:"))
