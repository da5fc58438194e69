"""MXNet's own Gluon convolution tests, run against DOConv2D.

The cases come from MXNet 1.9.1's ``tests/python/unittest/test_gluon.py``: ``test_conv`` (its
Conv2D list), the deferred-shape and sliced/reshaped-input convolutions (``test_deferred_init``,
``test_conv2d_16c``, ``test_group_conv2d_16c``, ``test_reshape_conv``, ``test_slice_conv`` and
their chains), ``test_fill_shape_deferred``/``test_fill_shape_load``, ``test_req``,
``test_dtype``, ``test_hybrid_static_memory``, ``test_parameter_sharing`` and
``test_save_load_deduplicate_with_shared_params``. MXNet checks that a layer runs and that
imperative and hybridized runs agree; here each DO-Conv network is also compared with the
native network holding the folded kernels, output and input gradient, imperative and
hybridized. Sizes are MXNet's where they are cheap, smaller where noted. These MXNet tests pin
no error message of the convolution layers, so there is no wording to follow here.
"""

import pytest

mx = pytest.importorskip("mxnet")

import numpy as np  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

from doconv import core  # noqa: E402
from doconv.gluon import DOConv2D, get_params, set_params  # noqa: E402


def assert_close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(float(np.abs(expected).max()), 1e-30))


def randomize(net, seed=0):
    """Random W, D and bias in every DOConv2D of an initialized network, so that every fold term counts."""
    rng = np.random.default_rng(seed)
    for layer in layers(net, DOConv2D):
        params = get_params(layer)
        set_params(layer, {k: None if v is None else 0.3 * rng.standard_normal(v.shape) for k, v in params.items()})


def layers(net, cls):
    found, stack = [], [net]
    while stack:
        block = stack.pop(0)
        if isinstance(block, cls) and block not in found:
            found.append(block)
        stack.extend(block._children.values())
    return found


def copy_folded(do_net, native_net):
    """Give each native Conv2D the folded kernel and bias of the DOConv2D at the same place."""
    pairs = list(zip(layers(do_net, DOConv2D), layers(native_net, nn.Conv2D)))
    assert len(pairs) == len(layers(do_net, DOConv2D)) == len(layers(native_net, nn.Conv2D))
    for layer, conv in pairs:
        params = get_params(layer)
        kernel = core.fold(params["W"].astype(np.float64), params["D"], layer._groups, layer.kernel_size)
        conv.weight.set_data(nd.array(kernel, dtype=conv.weight.dtype))
        if params["bias"] is not None:
            conv.bias.set_data(nd.array(params["bias"], dtype=conv.bias.dtype))


def forward_backward(net, x):
    """Output and input gradient of sum(net(x)), as MXNet's check_layer_forward takes them."""
    x = x.copy()
    x.attach_grad()
    with autograd.record():
        out = net(x)
    out.backward()
    return out.asnumpy(), x.grad.asnumpy()


def check_against_native(do_net, native_net, x, native_x=None, to_native=None, modes=(False, True)):
    """DO-Conv vs the native network with the folded kernels, imperative then hybridized.

    ``native_x``/``to_native`` translate the input and output layout where the native network
    runs another one (NHWC: MXNet 1.x has no NHWC convolution on CPU); ``modes`` says which
    of imperative (False) and hybridized (True) to run.
    """
    native_x = x if native_x is None else native_x
    to_native = to_native or (lambda array: array)
    do_net(x)  # deferred shapes are known from here on
    native_net(native_x)
    randomize(do_net)
    copy_folded(do_net, native_net)
    expected, expected_grad = forward_backward(native_net, native_x)
    for hybridize in modes:
        do_net.hybridize(hybridize)
        out, grad = forward_backward(do_net, x)
        assert to_native(out).shape == expected.shape
        assert_close(to_native(out), expected)
        assert_close(to_native(grad), expected_grad)


# --------------------------------------------------------------------------------------- test_conv
# test_conv's Conv2D layers, on input (1, 4, 20, 20); the NHWC layer is in test_conv too, with its
# check commented out there (no NHWC convolution on CPU): here it is checked through NCHW.
TEST_CONV = [
    dict(channels=16, kernel_size=(3, 4)),
    dict(channels=16, kernel_size=(5, 4)),
    dict(channels=16, kernel_size=(3, 4), groups=2),
    dict(channels=16, kernel_size=(3, 4), strides=4),
    dict(channels=16, kernel_size=(3, 4), dilation=4),
    dict(channels=16, kernel_size=(3, 4), padding=4),
    dict(channels=16, kernel_size=(3, 3), layout="NHWC"),
]


@pytest.mark.parametrize("case", TEST_CONV, ids=lambda case: ",".join(f"{k}={v}" for k, v in case.items()))
@pytest.mark.parametrize("in_channels", [4, 0], ids=["in_channels=4", "deferred"])
@pytest.mark.parametrize("D_mul", [None, 20], ids=["D_mul=K", "D_mul=20"])
def test_conv_cases(case, in_channels, D_mul):
    layer = DOConv2D(**case, in_channels=in_channels, D_mul=D_mul)
    native = nn.Conv2D(**dict(case, layout="NCHW"), in_channels=in_channels)
    layer.initialize()
    native.initialize()
    x = nd.array(np.random.default_rng(1).uniform(-1, 1, (1, 4, 20, 20)))
    if case.get("layout") == "NHWC":
        check_against_native(layer, native, x.transpose((0, 2, 3, 1)), x, lambda a: a.transpose(0, 3, 1, 2))
    else:
        check_against_native(layer, native, x)


def test_deferred_init_and_reshape_slice_at_after_the_conv():
    """test_deferred_init, test_reshape, test_slice, test_at: (5, 4, 10, 10) into DOConv2D(10, 2)."""
    x = nd.array(np.random.default_rng(2).uniform(-1, 1, (5, 4, 10, 10)))
    # a Symbol's [] picks outputs: indexing runs imperatively only, as in MXNet's test_slice and test_at
    for then, modes in (
        (lambda y: y.reshape((-1,)), (False, True)),
        (lambda y: y[1:3], (False,)),
        (lambda y: y[1], (False,)),
    ):
        nets = []
        for conv in (DOConv2D, nn.Conv2D):
            net = Wrap(conv(10, 2), then)
            net.initialize()
            nets.append(net)
        check_against_native(*nets, x, modes=modes)


class Wrap(gluon.HybridBlock):
    """A conv, then an operation on its output (MXNet's tests add 10 after it)."""

    def __init__(self, conv, then=None, before=None, **kwargs):
        super().__init__(**kwargs)
        self._then, self._before = then, before
        with self.name_scope():
            self.conv = conv

    def hybrid_forward(self, F, x):
        x = x if self._before is None else self._before(x)
        y = self.conv(x)
        return (y if self._then is None else self._then(y)) + 10


# ------------------------------------------------------------- deferred shapes behind reshape and slice
class Chain(gluon.HybridBlock):
    """test_conv2d_16c, test_group_conv2d_16c and the reshape/slice tests: ops and convs in turn."""

    def __init__(self, conv, steps, **kwargs):
        super().__init__(**kwargs)
        self._ops = [step for step in steps if not isinstance(step, dict)]
        self._order = ["conv" if isinstance(step, dict) else "op" for step in steps]
        with self.name_scope():
            self.convs = nn.HybridSequential()
            for step in steps:
                if isinstance(step, dict):
                    self.convs.add(conv(**step))

    def hybrid_forward(self, F, x):
        convs, ops = iter(self.convs), iter(self._ops)
        for kind in self._order:
            x = next(convs)(x) if kind == "conv" else next(ops)(x)
        return x


def reshape(shape):
    return lambda x: x.reshape(shape)


def cut(begin, end):
    return lambda x: x.slice(begin=begin, end=end)


CHAINS = {
    # test_conv2d_16c: channels 16, kernels 1 and 3; MXNet's 256 channels and 224x224 input (with a
    # kernel as large as the input) shrink to 16x16 here
    "conv2d_16c_k1": ((4, 3, 16, 16), [dict(channels=16, kernel_size=1)]),
    "conv2d_16c_k3": ((4, 3, 16, 16), [dict(channels=16, kernel_size=3)]),
    "conv2d_16c_kernel_as_input": ((4, 3, 16, 16), [dict(channels=16, kernel_size=16)]),
    # test_group_conv2d_16c: a 1x1 conv to 16 channels, then a depthwise conv (groups = 16); MXNet
    # draws ten input sizes in [3, 65), here three fixed ones
    **{
        f"group_conv2d_16c_k{k}_size{size}": (
            (4, 3, size, size),
            [dict(channels=16, kernel_size=1), dict(channels=16, kernel_size=k, groups=16)],
        )
        for k in (1, 3)
        for size in (3, 11, 20)
    },
    "reshape_conv": ((4, 3, 64, 64), [reshape((0, 0, 128, 32)), dict(channels=64, kernel_size=3)]),
    "slice_conv": ((8, 6, 32, 32), [cut((0, 2, 0, 0), (4, 5, 32, 32)), dict(channels=16, kernel_size=3)]),
    "slice_conv_slice_conv": (
        (4, 32, 32, 32),
        [
            cut((0, 0, 0, 0), (4, 16, 16, 16)),
            dict(channels=32, kernel_size=3),
            cut((0, 0, 0, 0), (4, 16, 3, 3)),
            dict(channels=16, kernel_size=1),
        ],
    ),
    "slice_conv_reshape_conv": (
        (4, 32, 64, 64),
        [
            cut((0, 0, 1, 1), (4, 16, 33, 33)),
            dict(channels=64, kernel_size=3),
            reshape((0, 0, 60, 15)),
            dict(channels=128, kernel_size=3),
        ],
    ),
    "reshape_conv_slice_conv": (
        (4, 3, 32, 32),
        [
            reshape((0, 0, 64, 16)),
            dict(channels=16, kernel_size=3),
            cut((0, 0, 0, 0), (2, 16, 14, 14)),
            dict(channels=32, kernel_size=3),
        ],
    ),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_deferred_shapes_behind_reshape_and_slice(name):
    shape, steps = CHAINS[name]
    x = nd.array(np.random.default_rng(3).uniform(-1, 1, shape))
    nets = []
    for conv in (DOConv2D, nn.Conv2D):
        net = Chain(conv, steps)
        net.initialize()
        nets.append(net)
    check_against_native(*nets, x)


def test_fill_shape_deferred_and_load(tmp_path):
    """test_fill_shape_deferred and test_fill_shape_load, with a DOConv2D first."""

    def make():
        net = nn.HybridSequential()
        with net.name_scope():
            net.add(DOConv2D(64, kernel_size=2, padding=1), nn.BatchNorm(), nn.Dense(10))
        net.hybridize()
        net.initialize()
        return net

    net = make()
    x = nd.ones((2, 3, 5, 7))
    expected = net(x).asnumpy()
    assert net[0].W.shape == (64, 3, 4) and net[0].D.shape == (3, 4, 4) and net[0].in_channels == 3
    assert net[1].gamma.shape[0] == 64 and net[2].weight.shape[1] == 3072
    net.save_parameters(str(tmp_path / "net_fill.params"))
    loaded = make()
    loaded.load_parameters(str(tmp_path / "net_fill.params"))
    assert loaded[0].W.shape == (64, 3, 4) and loaded[0].in_channels == 3
    assert loaded[1].gamma.shape[0] == 64 and loaded[2].weight.shape[1] == 3072
    assert_close(loaded(x).asnumpy(), expected)


def test_req_add_accumulates():
    """test_req: with grad_req 'add' on every parameter, two backward passes give twice the gradient."""
    net = nn.HybridSequential()
    net.add(DOConv2D(4, 3, padding=1), nn.Activation("relu"), DOConv2D(2, 3, groups=2))
    net.initialize()
    net.hybridize()
    x = nd.array(np.random.default_rng(4).uniform(size=(1, 3, 8, 8)))
    net(x)
    randomize(net)
    for param in net.collect_params().values():
        param.grad_req = "add"
    net.collect_params().zero_grad()
    grads = []
    for _ in range(2):
        with autograd.record():
            loss = net(x).sum()
        loss.backward()
        grads.append({name: p.grad().asnumpy().copy() for name, p in net.collect_params().items()})
    for name, once in grads[0].items():
        assert np.abs(once).sum() > 0, name
        assert_close(grads[1][name], 2 * once)


def test_dtype_float64_imperative_and_hybridized():
    """test_dtype: a network cast to float64 records and differentiates; hybridized in float32,
    then cast and called in float64."""
    rng = np.random.default_rng(5)

    def make():
        net = nn.HybridSequential()
        net.add(DOConv2D(8, 3, padding=1, in_channels=3), nn.BatchNorm(), nn.Activation("relu"), DOConv2D(4, 3))
        net.initialize()
        return net

    net = make()
    net.cast("float64")
    x64 = nd.array(rng.standard_normal((4, 3, 8, 8)), dtype="float64")
    with autograd.record():
        y = net(x64)
    y.backward()
    assert y.dtype == np.float64 and net[0].W.grad().dtype == np.float64
    net = make()
    net.hybridize()
    net(nd.array(rng.standard_normal((4, 3, 8, 8))))
    net.cast("float64")
    assert net(x64).dtype == np.float64


@pytest.mark.parametrize(
    "flags", [{}, {"static_alloc": True}, {"static_alloc": True, "static_shape": True}], ids=["plain", "alloc", "shape"]
)
def test_hybrid_static_memory(flags):
    """test_hybrid_static_memory: hybridized with static memory, the output and the gradients of
    every parameter are the imperative ones."""

    def run(net, x):
        with autograd.record():
            y = net(x)
        y.backward()
        trained = [(name, p) for name, p in net.collect_params().items() if p.grad_req != "null"]
        return y.asnumpy(), {name: p.grad().asnumpy().copy() for name, p in trained}

    net = nn.HybridSequential()
    net.add(DOConv2D(8, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"), DOConv2D(8, 3, groups=8), nn.Dense(3))
    net.initialize()
    x = nd.array(np.random.default_rng(6).uniform(-1, 1, (2, 3, 8, 8)))
    net(x)
    randomize(net)
    expected, expected_grads = run(net, x)
    net.hybridize(**flags)
    for _ in range(2):  # the second call reuses the static memory
        out, grads = run(net, x)
        assert_close(out, expected)
        for name, grad in grads.items():
            assert_close(grad, expected_grads[name])


class TwoConvs(gluon.Block):
    """test_parameter_sharing's Net, with DOConv2D layers instead of Dense ones."""

    def __init__(self, in_channels=0, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv0 = DOConv2D(5, 3, padding=1, in_channels=in_channels)
            self.conv1 = DOConv2D(5, 3, padding=1, in_channels=in_channels)

    def forward(self, x):
        return self.conv1(self.conv0(x))


def test_parameter_sharing_and_loading(tmp_path):
    """test_parameter_sharing: a network built on another's parameters runs on them, and saved
    parameters load into fresh networks, deferred or not."""
    x = nd.array(np.random.default_rng(7).uniform(size=(3, 5, 4, 4)))
    for first_in, second_in in ((5, 0), (0, 5)):
        net1 = TwoConvs(prefix="net1_", in_channels=first_in)
        net2 = TwoConvs(prefix="net2_", in_channels=second_in, params=net1.collect_params())
        net1.collect_params().initialize()
        out = net2(x)
        assert net2.conv0.W is net1.conv0.W
        randomize(net1)
        assert_close(net2(x).asnumpy(), net1(x).asnumpy())
        assert out.shape == (3, 5, 4, 4)
        net1.save_parameters(str(tmp_path / "net1.params"))
        net3 = TwoConvs(prefix="net3_")
        net3.load_parameters(str(tmp_path / "net1.params"), mx.cpu())
        assert_close(net3(x).asnumpy(), net1(x).asnumpy())


def test_save_load_deduplicate_with_shared_params(tmp_path):
    """test_save_load_deduplicate_with_shared_params: one DOConv2D registered twice is saved once."""

    class C(gluon.Block):
        def __init__(self, b1, b2):
            super().__init__()
            self.b1, self.b2 = b1, b2

    def make():
        b1 = DOConv2D(4, 3, in_channels=4)
        return C(b1, DOConv2D(4, 3, in_channels=4, params=b1.collect_params()))

    c = make()
    c.initialize()
    c.save_parameters(str(tmp_path / "tmp.params"), deduplicate=True)
    assert len(nd.load(str(tmp_path / "tmp.params"))) == 3  # W, D and bias, once
    make().load_parameters(str(tmp_path / "tmp.params"))
    c.save_parameters(str(tmp_path / "tmp2.params"), deduplicate=False)
    assert len(nd.load(str(tmp_path / "tmp2.params"))) == 6
    make().load_parameters(str(tmp_path / "tmp2.params"))
