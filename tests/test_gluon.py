"""doconv.gluon against the NumPy oracle in doconv.core, and on GluonCV model-zoo networks."""

import pytest

mx = pytest.importorskip("mxnet")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

from doconv import _fold_cpu, core  # noqa: E402
from doconv.gluon import (  # noqa: E402
    DOConv2D,
    convert_model,
    fold_kernel_in_use,
    fuse_model,
    get_params,
    set_params,
    use_fold_kernel,
)


@pytest.fixture(params=["kernel", "mxnet ops"])
def fold_impl(request):
    """Fold with doconv's compiled kernel (custom operator "doconv_fold") and with MXNet's own ops."""
    if request.param == "kernel" and _fold_cpu.kernel is None:
        pytest.skip("doconv._foldkernel was not built here")
    was = fold_kernel_in_use()
    use_fold_kernel(request.param == "kernel", min_macs=0)  # every layer, however small, on the kernel
    yield request.param
    use_fold_kernel(was)


def assert_close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(float(np.abs(expected).max()), 1e-30))


def random_params(layer, rng, scale=1.0):
    """Give every parameter (D included) random values, so that no term of the fold is zero."""
    params = get_params(layer)
    params = {
        k: None if v is None else (scale * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in params.items()
    }
    set_params(layer, params)
    return params


def reference(layer, x, params):
    as64 = {k: None if v is None else v.astype(np.float64) for k, v in params.items()}
    return core.doconv_reference(
        x.astype(np.float64),
        as64["W"],
        as64["D"],
        as64["bias"],
        kernel_size=layer.kernel_size,
        stride=layer._strides,
        padding=layer._padding,
        dilation=layer._dilation,
        groups=layer._groups,
        data_format=core.gluon_layout(layer._layout, 2),
    )


def make_input(rng, C, layout, N=2, H=9, W=8):
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    return x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))


# (C_in, C_out, groups, kernel_size, D_mul rule, stride, dilation, padding, layout, bias)
CASES = [
    (3, 5, 1, (3, 3), "K", 1, 1, 1, "NCHW", True),
    (4, 6, 2, (3, 3), "K+2", 1, 1, 0, "NCHW", False),
    (4, 4, 4, (3, 3), "2K", 2, 1, 1, "NHWC", True),  # depthwise
    (4, 8, 4, (5, 3), "K", 1, 2, 1, "NCHW", True),  # depthwise, multiplier 2
    (6, 4, 2, (1, 3), "2K", 2, 1, 0, "NHWC", False),
    (4, 6, 2, (1, 1), "K", 1, 1, 0, "NCHW", True),
    (3, 4, 1, (1, 1), "K", 2, 1, 1, "NHWC", False),
    (2, 3, 1, (5, 3), "K+2", 1, 2, 0, "NHWC", True),
    (6, 6, 3, (3, 3), "K", 2, 1, 1, "NCHW", True),
]


def D_mul_of(rule, kernel_size):
    K = core.kernel_volume(kernel_size)
    return {"K": K, "K+2": K + 2, "2K": 2 * K}[rule] if K > 1 else None


def make_layer(case, deferred=False, initialize=True):
    C_in, C_out, groups, ks, rule, stride, dilation, padding, layout, bias = case
    layer = DOConv2D(
        C_out,
        ks,
        strides=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        layout=layout,
        use_bias=bias,
        in_channels=0 if deferred else C_in,
        D_mul=D_mul_of(rule, ks),
    )
    if initialize:
        layer.initialize()
    return layer


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_output_matches_the_numpy_reference(case, hybridize, fold_impl):
    rng = np.random.default_rng(0)
    layer = make_layer(case)
    if hybridize:
        layer.hybridize()
    params = random_params(layer, rng)
    x = make_input(rng, case[0], case[8])
    assert_close(layer(nd.array(x)).asnumpy(), reference(layer, x, params))


def test_parameters_are_canonical_and_the_identity_is_not_stored(tmp_path):
    layer = DOConv2D(8, (3, 3), groups=2, in_channels=4, D_mul=11)
    layer.initialize()
    shapes = {name.rsplit("_", 1)[-1]: p.shape for name, p in layer.collect_params().items()}
    assert shapes == {"W": (8, 2, 11), "D": (4, 9, 11), "bias": (8,)}
    assert not get_params(layer)["D"].any(), "D is the offset from the identity and starts at zero"
    layer.save_parameters(str(tmp_path / "p.params"))
    assert len(nd.load(str(tmp_path / "p.params"))) == 3
    one = DOConv2D(8, 1, in_channels=4)
    one.initialize()
    assert one.D is None and one.D_mul == 1 and one.W.shape == (8, 4, 1)


def test_default_init_is_fresh_at_D_zero_and_follows_initialize():
    layer = DOConv2D(4, 3, in_channels=2, D_mul=12)
    layer.initialize(mx.init.Constant(0.5))
    assert (get_params(layer)["W"] == 0.5).all()
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 5)).astype(np.float32)
    assert_close(layer(nd.array(x)).asnumpy(), reference(layer, x, get_params(layer)))


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4]], ids=["grouped", "depthwise-nhwc", "1x3-nhwc"])
def test_deferred_in_channels(case):
    rng = np.random.default_rng(2)
    x = make_input(rng, case[0], case[8])
    # imperative
    layer = make_layer(case, deferred=True)
    assert layer.in_channels == 0
    layer(nd.array(x))
    assert layer.in_channels == case[0]
    params = random_params(layer, rng)
    assert_close(layer(nd.array(x)).asnumpy(), reference(layer, x, params))
    # inside a hybridized parent: the parent's symbolic shape inference finds the channels
    net = nn.HybridSequential()
    net.add(make_layer(case, deferred=True, initialize=False))
    net.initialize()
    net.hybridize()
    first = net(nd.array(x)).asnumpy()
    assert net[0].in_channels == case[0]
    assert_close(first, reference(net[0], x, get_params(net[0])))
    params = random_params(net[0], rng)
    net.hybridize()  # rebuild the graph now that the shapes are known
    assert_close(net(nd.array(x)).asnumpy(), reference(net[0], x, params))


def test_hybridize_export_and_imports_give_the_same_output(tmp_path, fold_impl):
    rng = np.random.default_rng(3)
    net = nn.HybridSequential()
    net.add(
        DOConv2D(6, 3, padding=1, activation="relu", D_mul=11),
        nn.BatchNorm(),
        DOConv2D(6, (1, 3), groups=3, use_bias=False),
        DOConv2D(4, 1),
    )
    net.initialize()
    x = nd.array(rng.standard_normal((2, 3, 8, 8)))
    net(x)
    for layer in (net[0], net[2]):
        random_params(layer, rng, 0.1)
    expected = net(x).asnumpy()
    net.hybridize()
    assert_close(net(x).asnumpy(), expected)
    net.export(str(tmp_path / "net"))
    graph = (tmp_path / "net-symbol.json").read_text()
    assert ("doconv_fold" in graph) == (fold_impl == "kernel")  # with MXNet ops: MXNet operators only
    imported = gluon.SymbolBlock.imports(str(tmp_path / "net-symbol.json"), ["data"], str(tmp_path / "net-0000.params"))
    assert_close(imported(x).asnumpy(), expected)


def test_cast_float16_follows_the_block():
    rng = np.random.default_rng(4)
    layer = DOConv2D(4, 3, padding=1, groups=2, in_channels=4, D_mul=10)
    layer.initialize()
    params = random_params(layer, rng, 0.3)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    layer.cast("float16")
    assert {p.dtype for p in layer.collect_params().values()} == {"float16"}
    assert get_params(layer)["W"].dtype == np.float16
    arg_types, out_types, _ = layer(mx.sym.var("data")).infer_type(data="float16")
    assert set(arg_types) == {np.float16} and out_types == [np.float16]
    native = nn.Conv2D(4, 3, in_channels=4)
    native.initialize()
    native.cast("float16")
    try:  # MXNet 1.x convolves float16 on GPU only; on CPU DO-Conv must fail exactly where Conv2D does
        native(nd.ones((1, 4, 6, 6), dtype="float16")).wait_to_read()
    except mx.MXNetError as err:
        with pytest.raises(mx.MXNetError, match=str(err).strip().splitlines()[-1][-40:]):
            layer(nd.array(x, dtype="float16")).wait_to_read()
        return
    for hybridize in (False, True):
        layer.hybridize(hybridize)
        y = layer(nd.array(x, dtype="float16"))
        assert y.dtype == np.float16
        assert_close(y.asnumpy().astype(np.float64), reference(layer, x, params), rtol=1e-2)


def test_gradients_reach_W_D_and_bias():
    rng = np.random.default_rng(5)
    for hybridize in (False, True):
        layer = DOConv2D(4, 3, groups=2, in_channels=4, D_mul=12)
        layer.initialize()
        layer.hybridize(hybridize)
        random_params(layer, rng)
        x = nd.array(rng.standard_normal((2, 4, 6, 6)))
        with autograd.record():
            loss = (layer(x) ** 2).sum()
        loss.backward()
        for param in (layer.W, layer.D, layer.bias):
            assert float(nd.abs(param.grad()).sum().asscalar()) > 0, param.name


def test_gradients_of_W_and_D_match_finite_differences(fold_impl):
    rng = np.random.default_rng(6)
    layer = DOConv2D(2, (2, 2), in_channels=2, D_mul=5, use_bias=False)
    layer.initialize()
    layer.cast("float64")
    params = random_params(layer, rng)
    x = rng.standard_normal((1, 2, 4, 4))
    with autograd.record():
        loss = layer(nd.array(x, dtype="float64")).sum()
    loss.backward()
    for key, param in (("W", layer.W), ("D", layer.D)):
        grad = param.grad().asnumpy()
        idx = tuple(rng.integers(0, s) for s in params[key].shape)
        plus, minus = ({k: None if v is None else v.copy() for k, v in params.items()} for _ in range(2))
        plus[key][idx] += 1e-6
        minus[key][idx] -= 1e-6
        numeric = (reference(layer, x, plus).sum() - reference(layer, x, minus).sum()) / 2e-6
        assert abs(grad[idx] - numeric) < 1e-6 * max(1.0, abs(numeric))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize(
    "C_in,C_out,kernel_size,groups,D_mul",
    [(5, 7, 3, 1, None), (8, 12, 3, 4, None), (6, 6, 3, 6, None), (4, 6, 3, 2, 11), (6, 4, (1, 3), 2, None)],
)
def test_fold_kernel_equals_mxnet_ops_values_and_gradients(dtype, hybridize, C_in, C_out, kernel_size, groups, D_mul):
    """The custom operator against MXNet's ops: outputs, gradients, gradient accumulation (grad_req
    'add') and a frozen D (grad_req 'null'). 3x3 with D_mul = 9 in float32 takes the AVX2 kernels."""
    if _fold_cpu.kernel is None:
        pytest.skip("doconv._foldkernel was not built here")
    rng = np.random.default_rng(13)
    x = rng.standard_normal((2, C_in, 7, 6))
    upstream = rng.standard_normal((2, C_out, 7, 6))  # cut to the output size below
    results = {}
    was = fold_kernel_in_use()
    try:
        for impl in ("kernel", "mxnet ops"):
            use_fold_kernel(impl == "kernel", min_macs=0)
            layer = DOConv2D(C_out, kernel_size, groups=groups, in_channels=C_in, D_mul=D_mul)
            layer.initialize()
            layer.cast(dtype)
            random_params(layer, np.random.default_rng(14))
            layer.hybridize(hybridize)
            xs = nd.array(x, dtype=dtype)
            out = []
            for grad_req in ("write", "add"):
                layer.W.grad_req, layer.D.grad_req = grad_req, grad_req
                for _ in range(2 if grad_req == "add" else 1):  # 'add' sums two backward passes
                    with autograd.record():
                        y = layer(xs)
                    y.backward(nd.array(upstream[:, :, : y.shape[2], : y.shape[3]], dtype=dtype))
                out += [y.asnumpy(), layer.W.grad().asnumpy(), layer.D.grad().asnumpy()]
                layer.W.zero_grad()
                layer.D.zero_grad()
            layer.D.grad_req = "null"
            with autograd.record():
                y = layer(xs)
            y.backward(nd.ones_like(y))
            out.append(layer.W.grad().asnumpy())
            results[impl] = out
    finally:
        use_fold_kernel(was)
    rtol = 1e-10 if dtype == "float64" else 2e-5
    for got, want in zip(results["kernel"], results["mxnet ops"]):
        assert_close(got, want, rtol=rtol)
    assert_close(results["kernel"][4], 2 * results["kernel"][1], rtol=rtol)  # 'add' accumulated twice


@pytest.mark.parametrize("kernel_size,D_mul", [(51, None), (3, 300_000)])
def test_fold_kernel_trains_large_kernels_and_depth_multipliers(kernel_size, D_mul):
    """51x51 with D_mul = K (2601) and 3x3 with D_mul = 300000: the compiled kernel once sized its
    backward's accumulators on the stack and crashed here. Gradients equal MXNet's ops'."""
    if _fold_cpu.kernel is None:
        pytest.skip("doconv._foldkernel was not built here")
    x = nd.array(np.random.default_rng(5).standard_normal((1, 1, kernel_size + 1, kernel_size + 1)))
    grads = {}
    was = fold_kernel_in_use()
    try:
        for impl in ("kernel", "mxnet ops"):
            use_fold_kernel(impl == "kernel", min_macs=0)
            layer = DOConv2D(2, kernel_size, in_channels=1, D_mul=D_mul)
            layer.initialize()
            random_params(layer, np.random.default_rng(6), scale=0.1)
            with autograd.record():
                y = layer(x)
            y.backward()
            grads[impl] = [layer.W.grad().asnumpy(), layer.D.grad().asnumpy()]
    finally:
        use_fold_kernel(was)
    for got, want in zip(grads["kernel"], grads["mxnet ops"]):
        assert_close(got, want, rtol=1e-4)


@pytest.mark.parametrize("D_shape", [(1, 9, 9), (3, 1, 9)])
def test_fold_operator_refuses_a_D_of_the_wrong_shape(D_shape, capfd):
    """A D that fits neither W (C_in) nor the operator's K and D_mul (where D + I would broadcast)
    fails the call, with the reason printed (MXNet prints a custom operator's exception, then raises)."""
    if _fold_cpu.kernel is None:
        pytest.skip("doconv._foldkernel was not built here")
    with pytest.raises(mx.base.MXNetError):
        nd.Custom(nd.ones((8, 3, 9)), nd.zeros(D_shape), op_type="doconv_fold", groups=1, K=9, D_mul=9).wait_to_read()
    printed = "".join(capfd.readouterr())
    assert "ValueError" in printed and (f"received shape {D_shape}" in printed or f"D.shape={D_shape}" in printed)


_BAD_ATTRIBUTES = """
import mxnet as mx
from mxnet import nd
import doconv.gluon
W, D = nd.ones((4, 2, 9)), nd.zeros((4, 9, 9))
for attributes in {cases!r}:
    try:
        nd.Custom(W, D, op_type="doconv_fold", **attributes).wait_to_read()
    except mx.base.MXNetError:
        print("MXNetError")
try:
    mx.sym.Custom(mx.sym.var("w"), mx.sym.var("d"), op_type="doconv_fold", groups="2.5", K=9, D_mul=9).infer_shape(
        w=(4, 2, 9), d=(4, 9, 9)
    )
except mx.base.MXNetError:
    print("MXNetError")
"""


def test_fold_operator_refuses_bad_attributes_without_crashing():
    """Attributes that are not positive integers, or unknown ones (a hand-edited exported graph, a
    direct nd.Custom call), raise MXNetError naming them; they ended the process (MXNet does not catch
    exceptions from a custom operator's constructor). In a child process, so that a crash shows as one."""
    import subprocess
    import sys

    if _fold_cpu.kernel is None:
        pytest.skip("doconv._foldkernel was not built here")
    cases = [
        dict(groups="a", K=9, D_mul=9),
        dict(groups=2, K=9, D_mul=9, foo=1),
        dict(groups=2, K=0, D_mul=9),
        dict(groups=2, K=9, D_mul=3),
    ]
    done = subprocess.run(
        [sys.executable, "-c", _BAD_ATTRIBUTES.format(cases=cases)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout + done.stderr  # MXNet prints the operator's exception, then raises
    assert done.stdout.splitlines().count("MXNetError") == 5, printed[-4000:]
    for message in (
        "groups must be a positive integer. Received: groups='a'",
        "takes the attributes groups, K and D_mul. Received: foo",
        "K must be a positive integer. Received: K='0'",
        "D_mul must be >= K. Received: K=9, D_mul=3",
        "groups must be a positive integer. Received: groups='2.5'",
    ):
        assert message in printed, message


def test_training_with_trainer_reduces_the_loss(fold_impl):
    rng = np.random.default_rng(7)
    net = nn.HybridSequential()
    net.add(DOConv2D(8, 3, padding=1, activation="relu"), DOConv2D(3, 3, padding=1, D_mul=12))
    net.initialize(mx.init.Xavier())
    net.hybridize()
    x = nd.array(rng.standard_normal((4, 3, 8, 8)))
    target = nd.array(rng.standard_normal((4, 3, 8, 8)))
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.01})
    losses = []
    for _ in range(8):
        with autograd.record():
            loss = ((net(x) - target) ** 2).mean()
        loss.backward()
        trainer.step(1)
        losses.append(float(loss.asscalar()))
    assert losses[-1] < 0.9 * losses[0]
    assert float(nd.abs(net[0].D.data()).sum().asscalar()) > 0, "D learns"


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_fuse_gives_a_native_conv_with_the_same_output(case):
    rng = np.random.default_rng(8)
    layer = make_layer(case)
    params = random_params(layer, rng)
    conv = layer.fuse()
    assert type(conv) is nn.Conv2D
    assert conv.prefix == layer.prefix
    data_format = core.gluon_layout(case[8], 2)
    kernel = core.fold(
        params["W"].astype(np.float64),
        None if params["D"] is None else params["D"].astype(np.float64),
        case[2],
        case[3],
    )
    assert_close(conv.weight.data().asnumpy(), core.kernel_to_gluon(kernel, data_format))
    assert (conv.bias is None) == (params["bias"] is None)
    x = make_input(rng, case[0], case[8])
    if case[8] == "NCHW":
        assert_close(conv(nd.array(x)).asnumpy(), layer(nd.array(x)).asnumpy())
    else:  # MXNet 1.x runs NHWC convolutions only on GPU: check the OHWI kernel with the oracle instead
        expected = core.conv_reference(
            x, kernel, params["bias"], case[5], case[7], case[6], case[2], data_format=data_format
        )
        assert_close(layer(nd.array(x)).asnumpy(), expected)


def test_fuse_keeps_activation_and_dtype():
    layer = DOConv2D(4, 3, in_channels=2, activation="relu")
    layer.initialize()
    layer.cast("float64")
    conv = layer.fuse()
    x = nd.array(np.random.default_rng(9).standard_normal((1, 2, 5, 5)), dtype="float64")
    assert conv.weight.dtype == np.float64 and conv.act is not None
    assert_close(conv(x).asnumpy(), layer(x).asnumpy(), rtol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_from_conv_is_exact(case):
    C_in, C_out, groups, ks, rule, stride, dilation, padding, layout, bias = case
    rng = np.random.default_rng(10)
    conv = nn.Conv2D(C_out, ks, stride, padding, dilation, groups, layout, in_channels=C_in, use_bias=bias)
    conv.initialize(mx.init.Normal(1.0))
    conv.bias is None or conv.bias.set_data(nd.array(rng.standard_normal(C_out)))
    layer = DOConv2D.from_conv(conv, D_mul=D_mul_of(rule, ks))
    assert layer.prefix == conv.prefix and layer.D_mul == (D_mul_of(rule, ks) or 1)
    params = get_params(layer)
    K, D_mul = core.kernel_volume(ks), layer.D_mul
    kernel = core.kernel_from_gluon(conv.weight.data().asnumpy(), core.gluon_layout(layout, 2))
    np.testing.assert_array_equal(core.fold(params["W"], params["D"], groups, ks), kernel)
    if K > 1:
        assert not params["D"].any()
        np.testing.assert_array_equal(params["W"][:, :, :K], kernel.reshape(C_out, C_in // groups, K))
        assert not params["W"][:, :, K : K * (D_mul // K)].any()
        if D_mul % K:
            assert params["W"][:, :, K * (D_mul // K) :].any(), "the columns past the last tile keep their init"
    x = make_input(rng, C_in, layout)
    expected = core.conv_reference(
        x,
        kernel,
        None if conv.bias is None else conv.bias.data().asnumpy(),
        stride,
        padding,
        dilation,
        groups,
        data_format=core.gluon_layout(layout, 2),
    )
    assert_close(layer(nd.array(x)).asnumpy(), expected)
    if layout == "NCHW":
        np.testing.assert_array_equal(layer(nd.array(x)).asnumpy(), conv(nd.array(x)).asnumpy())


def test_from_conv_of_uninitialized_and_deferred_convs():
    fresh = DOConv2D.from_conv(nn.Conv2D(4, 3, in_channels=2, weight_initializer="ones"))
    assert fresh.W._data is None and not fresh.W._deferred_init
    fresh.initialize()
    assert fresh.W.init == "ones"
    conv = nn.Conv2D(4, 3)
    conv.initialize()
    layer = DOConv2D.from_conv(conv)
    assert layer.in_channels == 0
    assert layer(nd.ones((1, 3, 5, 5))).shape == (1, 4, 3, 3)
    with pytest.raises(TypeError, match="from_conv needs a gluon.nn.Conv2D. Received: Dense"):
        DOConv2D.from_conv(nn.Dense(3))


def test_get_params_set_params_round_trip_and_errors():
    rng = np.random.default_rng(11)
    layer = DOConv2D(6, (3, 1), groups=3, in_channels=3, D_mul=4)
    layer.initialize()
    params = {
        "W": rng.standard_normal((6, 1, 4)).astype(np.float32),
        "D": rng.standard_normal((3, 3, 4)).astype(np.float32),
        "bias": rng.standard_normal(6).astype(np.float32),
    }
    back = get_params(set_params(layer, params))
    for key in params:
        np.testing.assert_array_equal(back[key], params[key])
    with pytest.raises(
        ValueError, match=r"params\['D'\] does not fit .*expected shape \(3, 3, 4\), received \(3, 3, 5\)"
    ):
        set_params(layer, dict(params, D=np.zeros((3, 3, 5))))
    with pytest.raises(ValueError, match=r"params\['bias'\] does not fit .*expected shape \(6,\), received None"):
        set_params(layer, dict(params, bias=None))
    with pytest.raises(ValueError, match=r"unknown entries \['D_diag'\]"):
        set_params(layer, dict(params, D_diag=params["D"]))
    np.testing.assert_array_equal(get_params(layer)["D"], params["D"])  # refused calls change nothing
    deferred = DOConv2D(6, (3, 1), groups=3, D_mul=4)
    deferred.initialize()
    set_params(deferred, params)
    assert deferred.in_channels == 3
    np.testing.assert_array_equal(get_params(deferred)["W"], params["W"])
    with pytest.raises(RuntimeError, match="not initialized yet"):
        get_params(DOConv2D(6, 3))


def snapshot_layer(layer):
    """Everything set_params could change: shapes (deferred or not), values where there are any."""
    return {
        name: (p.shape, None if p._data is None else p.data().asnumpy().copy(), bool(p._deferred_init))
        for name, p in layer.collect_params().items()
    }


def assert_same_state(layer, before):
    after = snapshot_layer(layer)
    assert sorted(after) == sorted(before)
    for name, (shape, value, deferred) in before.items():
        assert after[name][0] == shape and after[name][2] == deferred, name
        if value is not None:
            np.testing.assert_array_equal(after[name][1], value)


BAD_ENTRIES = [
    (
        dict(D=np.full((3, 3, 4), "a")),
        TypeError,
        r"params\['D'\] must be an array of real numbers. Received: an array of dtype <U1",
    ),
    (dict(D=np.empty((3, 3, 4), dtype=object)), TypeError, r"params\['D'\] .*dtype object"),
    (dict(bias=np.ones(6, dtype=complex)), TypeError, r"params\['bias'\] .*dtype complex128"),
    (dict(bias=np.ones(6, dtype=bool)), TypeError, r"params\['bias'\] .*dtype bool"),
    (dict(D=None), ValueError, r"params\['D'\] does not fit .*expected shape \(3, 3, 4\), received None"),
    (dict(Bias=np.zeros(6)), ValueError, r"unknown entries \['Bias'\]; expected 'W', 'D' and 'bias'. Received: keys"),
    (
        dict(W=np.zeros((6, 2, 4))),
        ValueError,
        r"params\['W'\] does not fit .*expected shape \(6, 1, 4\), received \(6, 2, 4\)",
    ),
]


@pytest.mark.parametrize("change, error, message", BAD_ENTRIES, ids=[str(sorted(c)) for c, _, _ in BAD_ENTRIES])
def test_set_params_checks_every_entry_before_writing_anything(change, error, message):
    rng = np.random.default_rng(15)
    good = {
        "W": rng.standard_normal((6, 1, 4)),  # W comes first: a lenient set_params would write it before failing
        "D": rng.standard_normal((3, 3, 4)),
        "bias": rng.standard_normal(6),
    }
    layer = DOConv2D(6, (3, 1), groups=3, in_channels=3, D_mul=4)
    layer.initialize()
    before = snapshot_layer(layer)
    with pytest.raises(error, match=message):
        set_params(layer, dict(good, **change))
    assert_same_state(layer, before)
    deferred = DOConv2D(6, (3, 1), groups=3, D_mul=4)
    deferred.initialize()
    before = snapshot_layer(deferred)
    if "W" not in change:  # with in_channels still open, a W of 2 channels per group would fit
        with pytest.raises(error, match=message):
            set_params(deferred, dict(good, **change))
    assert_same_state(deferred, before)
    assert deferred.in_channels == 0, "a refused call leaves the input channels open"
    assert deferred(nd.ones((1, 9, 4, 4))).shape == (1, 6, 2, 4), "and the first input still decides them"


def test_set_params_takes_ndarrays_lists_and_integers_and_casts_them():
    layer = DOConv2D(2, 1, in_channels=1)
    layer.initialize()
    layer.cast("float64")
    set_params(layer, {"W": nd.array([[[3.0]], [[4.0]]]), "D": None, "bias": [1, 2]})
    back = get_params(layer)
    assert back["W"].dtype == np.float64 and back["W"].ravel().tolist() == [3.0, 4.0]
    assert back["bias"].tolist() == [1.0, 2.0]
    with pytest.raises(TypeError, match=r"params must be a dict of 'W', 'D' and 'bias'. Received: list"):
        set_params(layer, [back["W"], None, back["bias"]])


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: DOConv2D(6, 3, groups=4),
            ValueError,
            r"output channels must be divisible by groups. Received: out_channels=6, groups=4",
        ),
        (
            lambda: DOConv2D(8, 3, groups=4, in_channels=6),
            ValueError,
            r"input channels must be divisible by groups. Received: in_channels=6, groups=4",
        ),
        (
            lambda: DOConv2D(8, 3, D_mul=5),
            ValueError,
            r"D_mul must be at least .* K = prod\(kernel_size\) = 9.*Received: D_mul=5",
        ),
        (
            lambda: DOConv2D(8, 3, layout="NCWH"),
            ValueError,
            r"layout must be one of \('NCHW', 'NHWC'\). Received: layout='NCWH'",
        ),
        (
            lambda: DOConv2D(8, (3, 3, 3)),
            ValueError,
            r"kernel_size must have 2 entries.*Received: kernel_size=\(3, 3, 3\)",
        ),
        (lambda: DOConv2D(0, 3), ValueError, r"channels must be positive. Received: channels=0"),
        (lambda: DOConv2D(8, 3, strides=0), ValueError, r"strides must be positive. Received: strides=0"),
        (
            lambda: DOConv2D(8, 3, padding=((0, 1), (1, 1))),
            ValueError,
            r"padding must be the same on both sides.*Received: padding=\(\(0, 1\), \(1, 1\)\)",
        ),
        (lambda: DOConv2D(8, 3, groups=1.5), TypeError, r"groups must be an integer. Received: groups=1.5"),
        (lambda: DOConv2D(8, 3, 1, 1, 1, 1, "NCHW", None, True, None, "zeros", 0, 9), TypeError, r"positional"),
    ],
)
def test_bad_arguments_raise_naming_argument_and_value(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_bad_input_at_the_first_call_and_later():
    layer = DOConv2D(8, 3, groups=4)
    layer.initialize()
    with pytest.raises(
        ValueError,
        match=r"input channels must be divisible by groups. Received: in_channels=6, groups=4. Input shape \(1, 6, 5, 5\) with layout NCHW",
    ):
        layer(nd.ones((1, 6, 5, 5)))
    layer(nd.ones((1, 8, 5, 5)))
    for hybridize in (False, True):
        layer.hybridize(hybridize)
        with pytest.raises(
            ValueError, match=r"expects 8 input channels, but the input has 4. Received: input shape \(1, 4, 5, 5\)"
        ):
            layer(nd.ones((1, 4, 5, 5)))
    nhwc = DOConv2D(8, 3, layout="NHWC", in_channels=2)
    nhwc.initialize()
    with pytest.raises(ValueError, match=r"expects 2 input channels, but the input has 5.*layout NHWC"):
        nhwc(nd.ones((1, 5, 5, 5)))
    with pytest.raises(ValueError, match=r"expects a 4-D input in layout NHWC. Received: input shape \(5, 5, 2\)"):
        nhwc(nd.ones((5, 5, 2)))


# --------------------------------------------------------------------------------- whole networks
class Tower(gluon.HybridBlock):
    """A block tree with attribute children, a HybridSequential and a non-conv layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.stem = nn.Conv2D(8, 3, padding=1, in_channels=3, activation="relu")
            self.body = nn.HybridSequential()
            self.body.add(nn.Conv2D(8, (1, 3), padding=(0, 1), groups=2, use_bias=False), nn.BatchNorm())
            self.body.add(nn.Conv2D(8, 3, padding=1, groups=8))
            self.head = nn.Conv2D(4, 1)
            self.up = nn.Conv2DTranspose(4, 2, strides=2)

    def hybrid_forward(self, F, x):
        return self.up(self.head(F.broadcast_add(self.body(self.stem(x)), x.mean(axis=1, keepdims=True))))


def make_tower(seed=12):
    mx.random.seed(seed)
    net = Tower()
    net.initialize(mx.init.Xavier())
    x = nd.array(np.random.default_rng(seed).standard_normal((2, 3, 8, 8)))
    net(x)
    return net, x


def snapshot(net):
    return {name: p.data().asnumpy().copy() for name, p in net.collect_params().items()}


def types(net):
    return [type(b).__name__ for b in (net.stem, net.body[0], net.body[2], net.head, net.up)]


@pytest.mark.parametrize("hybridize", [False, True])
def test_convert_then_fuse_a_block_tree(hybridize, tmp_path):
    net, x = make_tower()
    if hybridize:
        net.hybridize()
    expected = net(x).asnumpy()
    before = snapshot(net)
    do = convert_model(net)
    assert types(net) == ["Conv2D", "Conv2D", "Conv2D", "Conv2D", "Conv2DTranspose"], "a copy by default"
    assert types(do) == ["DOConv2D", "DOConv2D", "DOConv2D", "DOConv2D", "Conv2DTranspose"]
    assert do.body[2].D_mul == 9 and do.head.D_mul == 1
    assert_close(do(x).asnumpy(), expected)
    do.hybridize()
    assert_close(do(x).asnumpy(), expected)
    # train a little, so that D moves away from zero, then fuse
    trainer = gluon.Trainer(do.collect_params(), "sgd", {"learning_rate": 0.05})
    for _ in range(2):
        with autograd.record():
            loss = (do(x) ** 2).mean()
        loss.backward()
        trainer.step(1)
    assert float(nd.abs(do.stem.D.data()).sum().asscalar()) > 0
    trained = do(x).asnumpy()
    fused = fuse_model(do)
    assert types(fused) == ["Conv2D", "Conv2D", "Conv2D", "Conv2D", "Conv2DTranspose"]
    assert types(do)[0] == "DOConv2D"
    assert_close(fused(x).asnumpy(), trained)
    assert sorted(snapshot(fused)) == sorted(before), "the fused network has the native parameters, names included"
    for name, value in snapshot(fused).items():
        assert value.shape == before[name].shape
    fused.hybridize()
    assert_close(fused(x).asnumpy(), trained)
    fused.export(str(tmp_path / "fused"))
    imported = gluon.SymbolBlock.imports(
        str(tmp_path / "fused-symbol.json"), ["data"], str(tmp_path / "fused-0000.params")
    )
    assert_close(imported(x).asnumpy(), trained)
    after = snapshot(net)
    assert all(np.array_equal(before[k], after[k]) for k in before), "the given network is untouched"
    assert_close(net(x).asnumpy(), expected)


def test_copy_trains_independently_of_the_original():
    net, x = make_tower()
    before = snapshot(net)
    do = convert_model(net)
    trainer = gluon.Trainer(do.collect_params(), "sgd", {"learning_rate": 0.1})
    with autograd.record():
        loss = (do(x) ** 2).mean()
    loss.backward()
    trainer.step(1)
    assert float(nd.abs(do.head.W.grad()).sum().asscalar()) > 0
    after = snapshot(net)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_convert_model_D_mul_forms_and_warnings():
    net, x = make_tower()
    with pytest.warns(UserWarning, match=r"D_mul=4 is smaller than K for 2 layer\(s\).*stem \(K=9\), body.2 \(K=9\)"):
        do = convert_model(net, D_mul=4)
    assert (do.stem.D_mul, do.body[0].D_mul, do.body[2].D_mul, do.head.D_mul) == (9, 4, 9, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        do = convert_model(net, D_mul=12)
    # the one warning names the transposed convolution, which has no DO-Conv counterpart
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == [
        "convert_model replaced 4 layer(s) and left 1 conv layer(s) as they are: "
        "up (mxnet.gluon.nn.conv_layers.Conv2DTranspose)"
    ]
    assert (do.stem.D_mul, do.body[0].D_mul, do.body[2].D_mul) == (12, 12, 12)
    seen = []

    def rule(name, conv):
        seen.append(name)
        return None if name == "head" else 2 * core.kernel_volume(conv._kwargs["kernel"])

    do = convert_model(net, D_mul=rule)
    assert seen == ["stem", "body.0", "body.2", "head"]
    assert types(do) == ["DOConv2D", "DOConv2D", "DOConv2D", "Conv2D", "Conv2DTranspose"]
    assert (do.stem.D_mul, do.body[0].D_mul) == (18, 6)
    assert_close(do(x).asnumpy(), net(x).asnumpy())


def test_failures_leave_the_network_untouched_also_inplace():
    net, x = make_tower()
    net.hybridize()
    expected = net(x).asnumpy()

    def bad(name, conv):
        return 2 if name == "body.2" else None

    for inplace in (False, True):
        with pytest.raises(ValueError, match="D_mul must be at least"):
            convert_model(net, D_mul=bad, inplace=inplace)
        assert types(net)[:4] == ["Conv2D"] * 4
    assert_close(net(x).asnumpy(), expected)
    same = convert_model(net, inplace=True)
    assert same is net and types(net)[0] == "DOConv2D"
    assert_close(net(x).asnumpy(), expected)
    assert fuse_model(net, inplace=True) is net and types(net)[0] == "Conv2D"
    assert_close(net(x).asnumpy(), expected)


def test_nothing_to_convert_or_fuse_warns():
    net = nn.HybridSequential()
    net.add(nn.Dense(3))
    with pytest.warns(UserWarning, match="convert_model found nothing to replace in HybridSequential"):
        convert_model(net)
    with pytest.warns(UserWarning, match="fuse_model found nothing to replace in HybridSequential"):
        fuse_model(net)
    conv = nn.Conv2D(4, 3, in_channels=2)
    conv.initialize()
    assert isinstance(convert_model(conv), DOConv2D) and isinstance(fuse_model(convert_model(conv)), nn.Conv2D)


def test_convert_an_initialized_network_before_its_first_call_then_hybridize():
    from gluoncv.model_zoo import get_model

    net = get_model("resnet18_v1", pretrained=False, classes=10)
    net.initialize()
    do = convert_model(net)
    assert do.features[0].in_channels == 0, "the stem waits for its input, as the Conv2D did"
    do.hybridize()
    assert do(nd.ones((1, 3, 32, 32))).shape == (1, 10)
    assert do.features[0].in_channels == 3


GLUONCV = ["resnet18_v1", "resnet50_v1b", "resnet18_v2", "mobilenetv2_1.0", "resnext50_32x4d"]


@pytest.mark.slow
@pytest.mark.parametrize("name", GLUONCV)
def test_gluoncv_networks(name, tmp_path):
    from gluoncv.model_zoo import get_model

    mx.random.seed(0)
    net = get_model(name, pretrained=False, classes=10)
    net.initialize(mx.init.Xavier())
    net.hybridize()
    size = 64 if name.startswith("mobilenet") else 32  # at 32x32 its last BatchNorm sees 1x1 maps: NaN, natively too
    x = nd.array(np.random.default_rng(13).uniform(size=(2, 3, size, size)))
    with autograd.predict_mode():
        expected = net(x).asnumpy()
    native_count = sum(int(np.prod(p.shape)) for p in net.collect_params().values())
    do = convert_model(net, D_mul=lambda _, conv: None if conv._kwargs["kernel"] == (7, 7) else 12)
    do.hybridize()
    with autograd.predict_mode():
        assert_close(do(x).asnumpy(), expected)
    trainer = gluon.Trainer(do.collect_params(), "sgd", {"learning_rate": 0.01})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    for _ in range(2):
        with autograd.record():
            loss = loss_fn(do(x), nd.array([1, 2]))
        loss.backward()
        trainer.step(2)
    with autograd.predict_mode():
        trained = do(x).asnumpy()
    assert np.isfinite(trained).all()
    fused = fuse_model(do)
    fused.hybridize()
    with autograd.predict_mode():
        assert_close(fused(x).asnumpy(), trained, rtol=1e-4)
    assert sum(int(np.prod(p.shape)) for p in fused.collect_params().values()) == native_count
    assert not any(isinstance(b, DOConv2D) for b in _blocks(fused))
    fused.export(str(tmp_path / name))
    imported = gluon.SymbolBlock.imports(
        str(tmp_path / f"{name}-symbol.json"), ["data"], str(tmp_path / f"{name}-0000.params")
    )
    assert_close(imported(x).asnumpy(), fused(x).asnumpy())


def _blocks(block):
    yield block
    for child in block._children.values():
        yield from _blocks(child)


@pytest.mark.slow
def test_benchmark_quick_prints_a_table(capsys):
    from doconv.benchmarks import bench_gluon

    assert bench_gluon.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| train     | DO-Conv / Conv2D" in out and "| inference | fused / Conv2D" in out
    was = fold_kernel_in_use()
    assert bench_gluon.main(["--quick", "--mxnet-ops"]) == 0
    assert "fold: MXNet ops" in capsys.readouterr().out
    assert fold_kernel_in_use() == was  # the setting is restored
    if _fold_cpu.kernel is not None:
        assert bench_gluon.main(["--fold-sizes", "--quick", "--repeats", "1"]) == 0
        rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 32 -> 32, 32 |")]
        assert len(rows) == 1 and rows[0].count("|") == 6
        assert fold_kernel_in_use() == was


def exported_graph(layer, C_in, tmp_path) -> str:
    layer.initialize()
    layer.hybridize()
    layer(nd.ones((1, C_in, 5, 5)))
    layer.export(str(tmp_path / "layer"))
    return (tmp_path / "layer-symbol.json").read_text()


def test_small_layers_fold_with_mxnet_ops_large_ones_with_the_kernel(tmp_path):
    """By default only a fold of at least KERNEL_MIN_MACS multiply-adds goes through the custom
    operator (its fixed cost per call exceeds a small layer's fold); min_macs=0 sends every layer."""
    if _fold_cpu.kernel is None:
        pytest.skip("doconv._foldkernel was not built here")
    from doconv.gluon import KERNEL_MIN_MACS

    small, large = (8, 8, 1), (128, 128, 1)  # (C_in, channels, groups): 8*8*81 and 128*128*81 MACs
    assert small[1] * small[0] * 81 < KERNEL_MIN_MACS <= large[1] * large[0] * 81
    was = fold_kernel_in_use()
    try:
        use_fold_kernel(True)
        for (C_in, C_out, groups), expected in ((small, False), (large, True), ((192, 192, 192), False)):
            graph = exported_graph(DOConv2D(C_out, 3, in_channels=C_in, groups=groups), C_in, tmp_path)
            assert ("doconv_fold" in graph) is expected, (C_in, C_out, groups)
        use_fold_kernel(True, min_macs=0)
        assert "doconv_fold" in exported_graph(DOConv2D(8, 3, in_channels=8), 8, tmp_path)
    finally:
        use_fold_kernel(was)


@pytest.mark.parametrize(
    "min_macs,error,message",
    [
        (-1, ValueError, "min_macs must be >= 0. Received: min_macs=-1"),
        (2.5, TypeError, "min_macs=2.5 of type float"),
        (True, TypeError, "min_macs=True of type bool"),
    ],
)
def test_use_fold_kernel_refuses_a_bad_min_macs_and_keeps_the_setting(min_macs, error, message):
    was = fold_kernel_in_use()
    with pytest.raises(error, match=message):
        use_fold_kernel(not was, min_macs=min_macs)
    assert fold_kernel_in_use() is was


def test_use_fold_kernel_switches_and_reports():
    was = fold_kernel_in_use()
    try:
        assert use_fold_kernel(False) is False and fold_kernel_in_use() is False
        assert use_fold_kernel(True) is (_fold_cpu.kernel is not None) is fold_kernel_in_use()
    finally:
        use_fold_kernel(was)
