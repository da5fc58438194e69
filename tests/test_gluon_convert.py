"""doconv.gluon's convert_model and fuse_model keep what the user set up, on structures the model zoos use.

Each network here reproduces one structure found in GluonCV or in users' code: frozen stems, a
Conv2D registered twice, parameters tied with ``params=``, a Conv2D subclass with its own
forward, a SymbolBlock trunk, depthwise-separable blocks in nested HybridSequentials, blocks
kept in list attributes, hooks.
"""

import pytest

mx = pytest.importorskip("mxnet")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
from mxnet import autograd, gluon, nd  # noqa: E402
from mxnet.gluon import nn  # noqa: E402
from zoo_gluon import blocks  # noqa: E402  (every block once: the zoo script's walk)

from doconv import _fold_cpu  # noqa: E402
from doconv.gluon import DOConv2D, convert_model, fold_kernel_in_use, fuse_model, get_params  # noqa: E402


def assert_close(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(float(np.abs(expected).max()), 1e-30))


def one_warning(call, *args, **kwargs):
    """call(*args, **kwargs) and the messages of the UserWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call(*args, **kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def perturb_D(net, rng, scale=0.1):
    """Move every D away from zero, as training does, so that a fused network has a real fold to keep."""
    for block in blocks(net):
        if isinstance(block, DOConv2D) and block.D is not None:
            block.D.set_data(nd.array(scale * rng.standard_normal(block.D.shape), dtype=block.D.dtype))


def round_trip(net, x, hybridize=True):
    """convert, check the output, perturb D, fuse, check again; the converted and fused networks."""
    expected = net(x).asnumpy()
    do = convert_model(net)
    if hybridize:
        do.hybridize()
    assert_close(do(x).asnumpy(), expected)
    perturb_D(do, np.random.default_rng(0))
    trained = do(x).asnumpy()
    fused = fuse_model(do)
    if hybridize:
        fused.hybridize()
    assert_close(fused(x).asnumpy(), trained)
    return do, fused


def trainer_step(net, x):
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    with autograd.record():
        loss = (net(x) ** 2).mean()
    loss.backward()
    trainer.step(1)


# ------------------------------------------------------------------------------ what the user set up
class FrozenStem(gluon.HybridBlock):
    """A stem frozen for fine-tuning (GluonCV detection backbones freeze theirs), then a trainable body."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.stem = nn.Conv2D(8, 3, padding=1, in_channels=3)
            self.bn = nn.BatchNorm(in_channels=8)
            self.body = nn.Conv2D(8, 3, padding=1, in_channels=8, use_bias=False)
            self.head = nn.Conv2D(4, 1, in_channels=8)

    def hybrid_forward(self, F, x):
        return self.head(self.body(F.relu(self.bn(self.stem(x)))))


def trainable(net):
    return sorted(name for name, p in net.collect_params().items() if p.grad_req != "null")


def test_frozen_stem_stays_frozen_both_ways():
    net = FrozenStem()
    net.initialize(mx.init.Xavier())
    net.stem.collect_params().setattr("grad_req", "null")
    net.head.bias.grad_req = "null"  # the bias follows the bias, not the kernel
    net.body.weight.lr_mult, net.body.weight.wd_mult = 0.5, 0.0
    net.head.weight.grad_req = "add"
    x = nd.array(np.random.default_rng(1).standard_normal((2, 3, 8, 8)))
    net(x)
    do, fused = round_trip(net, x)
    assert trainable(do) == sorted(
        [do.bn.gamma.name, do.bn.beta.name, do.body.W.name, do.body.D.name, do.head.W.name]
    ), "W and D follow the kernel, the bias follows the bias"
    assert (do.stem.W.grad_req, do.stem.D.grad_req, do.stem.bias.grad_req) == ("null", "null", "null")
    assert (do.body.W.lr_mult, do.body.D.lr_mult, do.body.W.wd_mult, do.body.D.wd_mult) == (0.5, 0.5, 0.0, 0.0)
    assert do.head.W.grad_req == "add" and do.head.bias.grad_req == "null"
    frozen = {name: p.data().asnumpy().copy() for name, p in do.stem.collect_params().items()}
    trainer_step(do, x)
    for name, p in do.stem.collect_params().items():
        np.testing.assert_array_equal(p.data().asnumpy(), frozen[name])
    assert trainable(fused) == trainable(net)
    assert (fused.body.weight.lr_mult, fused.body.weight.wd_mult, fused.head.weight.grad_req) == (0.5, 0.0, "add")


def test_a_kernel_is_frozen_after_fuse_only_if_W_and_D_both_are():
    layer = DOConv2D(4, 3, in_channels=2)
    layer.initialize()
    layer.D.grad_req = "null"  # D frozen, W trained: the kernel still moves
    assert layer.fuse().weight.grad_req == "write"
    layer.W.grad_req, layer.D.grad_req = "null", "write"
    assert layer.fuse().weight.grad_req == "write"
    layer.D.grad_req = "null"
    assert layer.fuse().weight.grad_req == "null"


def test_contexts_dtypes_and_names_are_kept_both_ways():
    contexts = [mx.cpu(0), mx.cpu(1)]
    net = nn.HybridSequential(prefix="tower_")
    with net.name_scope():
        net.add(nn.Conv2D(6, 3, padding=1, in_channels=2), nn.Conv2D(6, 3, groups=3, in_channels=6))
    net.initialize(mx.init.Xavier(), ctx=contexts)
    net.cast("float64")
    do = convert_model(net)
    for layer in do:
        for param in layer.collect_params().values():
            assert param.list_ctx() == contexts and param.data(contexts[1]).dtype == np.float64
    assert sorted(do.collect_params()) == sorted(f"tower_conv{i}_{p}" for i in (0, 1) for p in ("W", "D", "bias")), (
        "the converted parameters keep the conv's prefix"
    )
    x = nd.array(np.random.default_rng(2).standard_normal((1, 2, 6, 6)), dtype="float64", ctx=contexts[1])
    assert_close(do(x).asnumpy(), net(x).asnumpy(), rtol=1e-10)
    fused = fuse_model(do)
    assert sorted(fused.collect_params()) == sorted(net.collect_params())
    for param in fused.collect_params().values():
        assert param.list_ctx() == contexts and param.data(contexts[0]).dtype == np.float64
    assert_close(fused(x).asnumpy(), do(x).asnumpy(), rtol=1e-10)


def test_hooks_and_hybridize_flags_are_carried():
    calls = []
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, in_channels=2), nn.Activation("relu"))
    net.initialize()
    net[0].register_forward_pre_hook(lambda block, args: calls.append(("pre", type(block).__name__)))
    handle = net[0].register_forward_hook(lambda block, args, out: calls.append(("post", type(block).__name__)))
    net[0].hybridize(static_alloc=True)
    x = nd.ones((1, 2, 5, 5))
    do = convert_model(net, inplace=True)
    assert do[0]._active and ("static_alloc", True) in do[0]._flags
    do(x)
    assert calls == [("pre", "DOConv2D"), ("post", "DOConv2D")]
    handle.detach()  # a handle taken on the Conv2D detaches the hook from its replacement
    calls.clear()
    fuse_model(do, inplace=True)(x)
    assert calls == [("pre", "Conv2D")]


# ----------------------------------------------------------------------------------- sharing and ties
class TwiceUsed(gluon.HybridBlock):
    """One Conv2D applied twice, registered as an attribute and inside a HybridSequential."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.conv = nn.Conv2D(4, 3, padding=1, in_channels=4)
            self.seq = nn.HybridSequential()
            self.seq.add(self.conv, nn.Activation("relu"), self.conv)

    def hybrid_forward(self, F, x):
        return self.conv(self.seq(x))


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_a_conv_used_twice_becomes_one_shared_doconv(hybridize):
    net = TwiceUsed()
    net.initialize(mx.init.Xavier())
    x = nd.array(np.random.default_rng(3).standard_normal((2, 4, 6, 6)))
    if hybridize:
        net.hybridize()
    do, fused = round_trip(net, x, hybridize)
    assert isinstance(do.conv, DOConv2D) and do.conv is do.seq[0] is do.seq[2]
    assert sorted(do.collect_params()) == sorted(p.name for p in (do.conv.W, do.conv.D, do.conv.bias))
    trainer_step(do, x)
    assert type(fused.conv) is nn.Conv2D and fused.conv is fused.seq[0] is fused.seq[2]
    assert sorted(fused.collect_params()) == sorted(net.collect_params())
    trainer_step(fused, x)


def tied_pair(**second):
    """Two Conv2Ds sharing their parameters through ``params=``, as Siamese towers do."""
    net = nn.HybridSequential()
    first = nn.Conv2D(4, 3, padding=1, in_channels=4)
    net.add(first, nn.Activation("tanh"), nn.Conv2D(4, 3, padding=1, in_channels=4, params=first.params, **second))
    net.initialize(mx.init.Xavier())
    return net


def test_tied_convs_become_doconvs_sharing_W_D_and_bias():
    net = tied_pair(strides=2)
    x = nd.array(np.random.default_rng(4).standard_normal((2, 4, 8, 8)))
    do, fused = round_trip(net, x)
    assert do[0].W is do[2].W and do[0].D is do[2].D and do[0].bias is do[2].bias
    assert do[2]._strides == (2, 2), "each layer keeps its own strides"
    assert len(list(do.collect_params().keys())) == 3
    before = get_params(do[2])["D"].copy()
    trainer_step(do, x)
    assert not np.array_equal(get_params(do[2])["D"], before)
    assert fused[0].weight is fused[2].weight and fused[0].bias is fused[2].bias
    assert sorted(fused.collect_params()) == sorted(net.collect_params())


def test_ties_that_cannot_stay_tied_raise_and_change_nothing():
    net = tied_pair()
    with pytest.raises(ValueError, match=r"0, 2 share their kernel, so they need one D_mul. Received: D_mul=\[9, 12\]"):
        convert_model(net, D_mul=lambda name, conv: 9 if name == "0" else 12, inplace=True)
    with pytest.raises(ValueError, match=r"Received: D_mul=\[None, 9\]"):
        convert_model(net, D_mul=lambda name, conv: None if name == "0" else 9, inplace=True)
    assert [type(b).__name__ for b in net] == ["Conv2D", "Activation", "Conv2D"]
    # the same kernel, but only the second layer has a bias
    untied_bias = nn.HybridSequential()
    first = nn.Conv2D(4, 3, in_channels=4, use_bias=False)
    untied_bias.add(first, nn.Conv2D(4, 3, in_channels=4, params=first.params))
    untied_bias.initialize()
    with pytest.raises(ValueError, match=r"0 and 1 share their kernel but not all their parameters"):
        convert_model(untied_bias)
    # a kernel shared with a layer that is not converted (a subclass)
    mixed = nn.HybridSequential()
    first = nn.Conv2D(4, 3, in_channels=4)
    mixed.add(first, PadThenConv(4, 3, in_channels=4, params=first.params))
    mixed.initialize()
    with pytest.raises(ValueError, match=r"1 \(.*PadThenConv\) shares the parameter conv\d+_weight with 0"):
        convert_model(mixed, inplace=True)
    assert type(mixed[0]) is nn.Conv2D


# ------------------------------------------------------------------------------- what is left, named
class PadThenConv(nn.Conv2D):
    """A Conv2D subclass with its own forward ('same' padding by hand, as ports of TF models do)."""

    def hybrid_forward(self, F, x, weight, bias=None):
        x = F.pad(x, mode="constant", pad_width=(0, 0, 0, 0, 1, 1, 1, 1))
        return super().hybrid_forward(F, x, weight, bias)


class Trunk(gluon.HybridBlock):
    def __init__(self, trunk, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.trunk = trunk
            self.same = PadThenConv(4, 3, in_channels=4)
            self.head = nn.Conv2D(3, 3, padding=1, in_channels=4)

    def hybrid_forward(self, F, x):
        return self.head(self.same(self.trunk(x)))


def symbol_trunk(tmp_path, blocks_in_trunk):
    """A SymbolBlock loaded from an export, as GluonCV's SSD trunks are built from a network's graph."""
    inner = nn.HybridSequential()
    inner.add(*blocks_in_trunk)
    inner.initialize(mx.init.Xavier())
    inner.hybridize()
    inner(nd.ones((1, 4, 6, 6)))
    inner.export(str(tmp_path / "trunk"))
    return gluon.SymbolBlock.imports(str(tmp_path / "trunk-symbol.json"), ["data"], str(tmp_path / "trunk-0000.params"))


def test_subclasses_and_symbolblock_contents_are_left_and_named_in_one_warning(tmp_path):
    trunk = symbol_trunk(tmp_path, [nn.Conv2D(4, 3, padding=1), nn.Activation("relu"), nn.Conv2D(4, 1)])
    net = Trunk(trunk)
    net.initialize(mx.init.Xavier())
    x = nd.array(np.random.default_rng(5).standard_normal((2, 4, 6, 6)))
    expected = net(x).asnumpy()
    do, messages = one_warning(convert_model, net)
    assert messages == [
        "convert_model replaced 1 layer(s) and left 3 conv layer(s) as they are: "
        "trunk (mxnet.gluon.block.SymbolBlock, a SymbolBlock with 2 Convolution/Deconvolution ops); "
        "same (test_gluon_convert.PadThenConv)"
    ]
    assert type(do.same) is PadThenConv and isinstance(do.head, DOConv2D) and do.trunk is not net.trunk
    assert_close(do(x).asnumpy(), expected)
    do.hybridize()
    assert_close(do(x).asnumpy(), expected)
    _, messages = one_warning(fuse_model, do)
    assert messages == [], "fuse_model leaves native convolutions without a word"
    bare, messages = one_warning(convert_model, net.same)
    assert type(bare) is PadThenConv and bare is not net.same
    assert messages == [
        "convert_model replaced 0 layer(s) and left 1 conv layer(s) as they are: "
        "(the given block) (test_gluon_convert.PadThenConv)"
    ]


def test_fuse_names_doconv_subclasses_and_unfused_exports(tmp_path):
    if _fold_cpu.kernel is None or not fold_kernel_in_use():
        pytest.skip("an unfused export names doconv_fold only with the compiled fold kernel")

    class Scaled(DOConv2D):
        def hybrid_forward(self, F, x, *args, **kwargs):
            return 2 * super().hybrid_forward(F, x, *args, **kwargs)

    from doconv.gluon import use_fold_kernel

    use_fold_kernel(True, min_macs=0)  # the trunk's small layer, too, folds in the custom operator
    try:
        trunk = symbol_trunk(tmp_path, [DOConv2D(4, 3, padding=1), DOConv2D(4, 1)])
    finally:
        use_fold_kernel(True)
    net = nn.HybridSequential()
    net.add(trunk, Scaled(4, 3, padding=1, in_channels=4), DOConv2D(4, 3, in_channels=4))
    net.initialize()
    x = nd.ones((1, 4, 6, 6))
    expected = net(x).asnumpy()
    fused, messages = one_warning(fuse_model, net)
    assert messages == [
        "fuse_model replaced 1 layer(s) and left 2 conv layer(s) as they are: "
        "0 (mxnet.gluon.block.SymbolBlock, a SymbolBlock with 1 doconv_fold ops); "
        "1 (test_gluon_convert.test_fuse_names_doconv_subclasses_and_unfused_exports.<locals>.Scaled)"
    ]
    assert [type(b).__name__ for b in fused] == ["SymbolBlock", "Scaled", "Conv2D"]
    assert_close(fused(x).asnumpy(), expected)


class ListHolder(gluon.HybridBlock):
    """Blocks kept in a list attribute and registered with register_child (Gluon does not see into lists)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stages = [nn.Conv2D(4, 3, padding=1, in_channels=4), nn.Conv2D(4, 1, in_channels=4)]
        for i, stage in enumerate(self.stages):
            self.register_child(stage, f"stage{i}")

    def hybrid_forward(self, F, x):
        for stage in self.stages:
            x = F.relu(stage(x))
        return x


def test_references_in_list_attributes_follow_the_replacement():
    net = ListHolder()
    net.initialize(mx.init.Xavier())
    x = nd.array(np.random.default_rng(6).standard_normal((1, 4, 5, 5)))
    do, fused = round_trip(net, x)
    assert [type(s).__name__ for s in do.stages] == ["DOConv2D", "DOConv2D"]
    assert do.stages[0] is do._children["stage0"]
    assert [type(s).__name__ for s in fused.stages] == ["Conv2D", "Conv2D"]


# ---------------------------------------------------------------------------- zoo-like architectures
def separable(channels, stride):
    """MobileNet's depthwise-separable unit: a depthwise 3x3 (groups = C_in), BatchNorm, a pointwise 1x1."""
    unit = nn.HybridSequential()
    unit.add(
        nn.Conv2D(channels, 3, strides=stride, padding=1, groups=channels, use_bias=False),
        nn.BatchNorm(),
        nn.Activation("relu"),
        nn.Conv2D(2 * channels, 1, use_bias=False),
        nn.BatchNorm(),
    )
    return unit


def test_depthwise_separable_units_in_nested_hybridsequentials():
    net = nn.HybridSequential()
    stages = nn.HybridSequential()
    stages.add(separable(8, 1), separable(16, 2))
    net.add(nn.Conv2D(8, 3, padding=1), stages, nn.GlobalAvgPool2D(), nn.Dense(5))
    net.initialize(mx.init.Xavier())
    x = nd.array(np.random.default_rng(7).standard_normal((2, 3, 12, 12)))
    net(x)
    with autograd.predict_mode():
        do, fused = round_trip(net, x)
    depthwise = do[1][1][0]
    assert isinstance(depthwise, DOConv2D) and depthwise._groups == 16
    assert depthwise.D.shape == (16, 9, 9) and depthwise.W.shape == (16, 1, 9)
    assert sum(isinstance(b, DOConv2D) for b in blocks(do)) == 5
    assert sum(type(b) is nn.Conv2D for b in blocks(fused)) == 5
    assert sorted(fused.collect_params()) == sorted(net.collect_params())


def test_a_bare_layer_converts_and_fuses_keeping_its_settings():
    conv = nn.Conv2D(4, 3, in_channels=2)
    conv.initialize()
    conv.weight.grad_req = "null"
    x = nd.array(np.random.default_rng(8).standard_normal((1, 2, 5, 5)))
    layer, messages = one_warning(convert_model, conv)
    assert type(layer) is DOConv2D and messages == []
    assert (layer.W.grad_req, layer.D.grad_req, layer.bias.grad_req) == ("null", "null", "write")
    np.testing.assert_array_equal(layer(x).asnumpy(), conv(x).asnumpy())
    back, messages = one_warning(fuse_model, layer)
    assert type(back) is nn.Conv2D and messages == [] and back.weight.grad_req == "null"
    assert_close(back(x).asnumpy(), conv(x).asnumpy())


@pytest.mark.slow
def test_gluoncv_mobilenetv2_converts_and_fuses_exactly():
    from gluoncv.model_zoo import get_model

    mx.random.seed(0)
    net = get_model("mobilenetv2_0.25", pretrained=False, classes=10)
    net.initialize(mx.init.Xavier())
    x = nd.array(np.random.default_rng(9).uniform(size=(1, 3, 64, 64)))
    net.hybridize()
    with autograd.predict_mode():
        do, fused = round_trip(net, x)
    native = [b for b in blocks(net) if type(b) is nn.Conv2D]
    assert sum(isinstance(b, DOConv2D) for b in blocks(do)) == len(native) > 50
    assert sum(type(b) is nn.Conv2D for b in blocks(fused)) == len(native)
    assert sorted(fused.collect_params()) == sorted(net.collect_params())


@pytest.mark.parametrize("net", [3, "resnet", None, nd.ones((2, 2))])
@pytest.mark.parametrize("function", [convert_model, fuse_model])
def test_a_net_that_is_not_a_block_raises_typeerror_naming_it(function, net):
    with pytest.raises(TypeError, match=rf"{function.__name__} needs a gluon Block as net. Received: net of type"):
        function(net)


def test_a_bilinear_weight_initializer_is_refused_clearly_and_converts_once_initialized():
    """mx.init.Bilinear reads a 4-d kernel shape: on W's 3-d shape it failed with a bare IndexError,
    also in from_conv of an initialized Conv2D, whose kernel is copied anyway."""
    import mxnet as mx

    for init in (mx.init.Bilinear(), "bilinear"):
        with pytest.raises(ValueError, match=r"initializes 4-d \(deconvolution\) kernels"):
            DOConv2D(4, 3, in_channels=4, weight_initializer=init)
    conv = nn.Conv2D(4, 3, in_channels=4, weight_initializer=mx.init.Bilinear())
    conv.initialize()
    x = nd.random.normal(shape=(1, 4, 6, 6))
    np.testing.assert_allclose(DOConv2D.from_conv(conv)(x).asnumpy(), conv(x).asnumpy(), rtol=1e-5, atol=1e-6)
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, weight_initializer=mx.init.Bilinear()))
    with pytest.raises(ValueError, match=r"is not initialized yet and its weight_initializer"):
        convert_model(net)
    assert type(net[0]) is nn.Conv2D
