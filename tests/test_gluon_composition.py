"""doconv.gluon's feature composition: the same outputs and gradients as folding, chosen only where
core.training_composition says so (per batch imperatively, per layer by plan_compositions in a
hybridized graph), switched off by use_feature_composition(False), exported with MXNet's own ops."""

import pytest

mx = pytest.importorskip("mxnet")

import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402

from doconv import core  # noqa: E402
from doconv.gluon import (  # noqa: E402
    DOConv2D,
    feature_composition_in_use,
    plan_compositions,
    use_feature_composition,
)


@pytest.fixture
def composed(monkeypatch):
    """Count the layers' feature-composed forward passes; restore the switch afterwards."""
    calls = []
    original = DOConv2D._compose_features

    def spy(self, *args):
        calls.append(self.name)
        return original(self, *args)

    monkeypatch.setattr(DOConv2D, "_compose_features", spy)
    was = feature_composition_in_use()
    yield calls
    use_feature_composition(was)


def _layer(dtype, x_shape, **kwargs):
    """An initialized layer with D, W and bias away from their init, so every term shows."""
    layer = DOConv2D(**kwargs)
    layer.initialize(mx.init.Normal(0.5))
    layer.cast(dtype)
    layer(nd.zeros(x_shape, dtype=dtype))
    rng = np.random.default_rng(7)
    for param in layer.collect_params().values():
        param.set_data(nd.array(rng.normal(size=param.shape), dtype=dtype))
    return layer


def _train_step(layer, x):
    """Output and the gradients of x and of the parameters (a layer's W, D, bias) of sum(y * r), r fixed."""
    x = x.copy()
    x.attach_grad()
    with autograd.record():
        y = layer(x)
        r = nd.array(np.random.default_rng(3).normal(size=y.shape), dtype=y.dtype)
        loss = (y * r).sum()
    loss.backward()
    return [y.asnumpy(), x.grad.asnumpy()] + [p.grad().asnumpy() for p in layer.collect_params().values()]


def _close(actual, expected, dtype):
    rtol = 1e-10 if dtype == "float64" else 2e-5
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * float(np.abs(e).max()))


CASES = {
    "plain": dict(channels=6, kernel_size=3, padding=1),
    "groups, stride": dict(channels=6, kernel_size=3, strides=2, padding=1, groups=2),
    "dilation, uneven kernel": dict(channels=4, kernel_size=(3, 2), dilation=(2, 1), padding=(2, 1)),
    "D_mul > K, no bias": dict(channels=4, kernel_size=2, D_mul=9, use_bias=False, groups=4),
    "NHWC": dict(channels=6, kernel_size=3, strides=(1, 2), padding=1, groups=2, layout="NHWC"),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_composing_features_equals_folding(case, dtype, composed, monkeypatch):
    kwargs = CASES[case]
    x_shape = (2, 7, 6, 4) if kwargs.get("layout") == "NHWC" else (2, 4, 7, 6)
    layer = _layer(dtype, x_shape, **kwargs)
    x = nd.array(np.random.default_rng(1).normal(size=x_shape), dtype=dtype)
    use_feature_composition(False)
    folded = _train_step(layer, x)
    assert composed == []
    use_feature_composition(True)
    monkeypatch.setattr(core, "training_composition", lambda *args: "feature")
    features = _train_step(layer, x)
    assert composed == [layer.name]
    _close(features, folded, dtype)
    layer.hybridize()  # a hybridized layer folds (its graph serves every batch shape) ...
    _close(_train_step(layer, x), features, dtype)
    assert composed == [layer.name]
    assert plan_compositions(layer, x) == {layer.name: "feature"}  # ... unless planned
    _close(_train_step(layer, x), features, dtype)
    _close(_train_step(layer, x), features, dtype)
    assert composed == [layer.name] * 2  # traced once


def test_the_rule_decides_per_batch_and_only_in_imperative_training(composed):
    # 64 -> 64 channels, 3x3, D_mul 9: composing features costs at most half of folding up to 32 positions.
    assert core.training_composition(32, 64, 64, 1, 9, 9) == "feature"
    assert core.training_composition(128, 64, 64, 1, 9, 9) == "kernel"
    layer = _layer("float32", (1, 64, 4, 4), channels=64, kernel_size=3, padding=1)
    few, many = nd.ones((2, 64, 4, 4)), nd.ones((2, 64, 8, 8))
    use_feature_composition(True)
    _train_step(layer, many)
    assert composed == []
    _train_step(layer, few)
    assert composed == [layer.name]
    layer(few)  # inference folds
    with autograd.record(train_mode=False):
        layer(few)  # recording for gradients still composes: the fold's backward is what it saves
    assert composed == [layer.name] * 2
    layer.W.grad_req = layer.D.grad_req = "null"
    with autograd.record():
        layer(few)  # frozen W and D: no fold backward to save
    assert composed == [layer.name] * 2
    layer.W.grad_req = layer.D.grad_req = "write"
    use_feature_composition(False)
    _train_step(layer, few)
    assert composed == [layer.name] * 2
    with pytest.raises(TypeError, match="enabled=1"):
        use_feature_composition(1)


def test_plan_compositions_follows_the_rule_per_layer_and_can_be_removed(composed):
    net = gluon.nn.HybridSequential()
    net.add(
        DOConv2D(64, 3, padding=1, in_channels=64),
        DOConv2D(64, 3, strides=2, padding=1, in_channels=64),
        DOConv2D(64, 1, in_channels=64),
    )
    net.initialize()
    net.hybridize()
    first, second, pointwise = (layer.name for layer in net)
    # 2 x 64 channels at 8x8: 128 positions in the first layer, 32 after the stride; a 1x1 kernel has no D.
    assert plan_compositions(net, nd.ones((2, 64, 8, 8))) == {first: "kernel", second: "feature", pointwise: "kernel"}
    x = nd.random.normal(shape=(2, 64, 8, 8))
    planned = _train_step(net, x)
    assert composed == [second]
    assert plan_compositions(net) == {}
    folded = _train_step(net, x)
    assert composed == [second]
    _close(planned, folded, "float32")
    use_feature_composition(False)
    plan_compositions(net, x)
    _train_step(net, x)
    assert composed == [second]  # switched off: planned or not, every layer folds
    with pytest.raises(TypeError, match=r"inputs\[0\] of type list"):
        plan_compositions(net, [2, 64, 8, 8])
    with pytest.raises(ValueError, match=r"Received: input shapes \[\(2, 3, 8, 8\)\]"):
        plan_compositions(net, nd.ones((2, 3, 8, 8)))  # 3 channels where the first layer has 64
    assert [layer._planned for layer in net] == ["kernel", "feature", "kernel"]  # the plan before
    # The last layer's (here the only layer's) own convolution refuses a wrong channel count too.
    single = DOConv2D(64, 3, padding=1, in_channels=64)
    single.initialize()
    assert plan_compositions(single, nd.ones((2, 64, 16, 16))) == {single.name: "kernel"}
    with pytest.raises(ValueError, match=r"Received: input shapes \[\(2, 3, 4, 4\)\]"):
        plan_compositions(single, nd.ones((2, 3, 4, 4)))
    assert single._planned == "kernel"


def test_a_network_trained_by_composing_features_exports_and_loads_without_doconv(tmp_path, composed):
    net = gluon.nn.HybridSequential()
    net.add(DOConv2D(32, 3, padding=1, in_channels=32), gluon.nn.Activation("relu"))
    net.initialize(mx.init.Xavier())
    x = nd.random.normal(shape=(1, 32, 3, 3))
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    use_feature_composition(True)
    with autograd.record():
        loss = (net(x) ** 2).sum()
    loss.backward()
    trainer.step(1)
    assert len(composed) == 1
    expected = net(x).asnumpy()
    net.hybridize()
    plan_compositions(net, x)
    net(x)
    net.export(str(tmp_path / "net"))
    assert "doconv_fold" not in (tmp_path / "net-symbol.json").read_text()
    nd.save(str(tmp_path / "x.nd"), [x])
    # A plain MXNet process: a planned graph composing features holds only MXNet's own operators.
    script = (
        "import sys, mxnet as mx\n"
        "d = sys.argv[1]\n"
        "net = mx.gluon.SymbolBlock.imports(d + '/net-symbol.json', ['data'], d + '/net-0000.params')\n"
        "mx.nd.save(d + '/y.nd', [net(mx.nd.load(d + '/x.nd')[0])])\n"
        "assert 'doconv' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120)
    loaded = nd.load(str(tmp_path / "y.nd"))[0].asnumpy()
    np.testing.assert_allclose(loaded, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
