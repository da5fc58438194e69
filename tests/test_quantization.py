"""Int8 through PT2E: fused DO-Conv networks quantize like plain ones; DO-Conv trains quantization-aware with the
fake-quantizer on its composed kernel, and converts to the int8 model of its fused kernel."""

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao", reason="PT2E quantization lives in torchao: pip install torchao")
pytest.importorskip("sklearn", reason="the digits data come from scikit-learn")

from torch import nn  # noqa: E402
from torchao.quantization.pt2e import move_exported_model_to_eval  # noqa: E402
from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e  # noqa: E402

from doconv.benchmarks import qat_digits as qd  # noqa: E402
from doconv.benchmarks.bench_torch import resnet18_style  # noqa: E402
from doconv.torch import DOConv2d, convert_model, fold, fuse_model  # noqa: E402
from doconv.torch.quantization import (  # noqa: E402
    export_for_qat,
    fuse_exported,
    mark_doconv_convolutions,
    unquantized_convolutions,
)

torch.set_num_threads(2)
aten = torch.ops.aten
qd_ops = torch.ops.quantized_decomposed


def attr(graph, target):
    owner, _, name = target.rpartition(".")
    return getattr(graph.get_submodule(owner), name)


def conv_nodes(graph):
    return [n for n in graph.graph.nodes if n.op == "call_function" and n.target == aten.conv2d.default]


def assert_every_conv_int8(graph, expected):
    """Each convolution's input is dequantize(quantize(activation)) and its weight dequantize(stored int8)."""
    convs = conv_nodes(graph)
    assert len(convs) == expected
    for conv in convs:
        x, w = conv.args[0], conv.args[1]
        assert x.target == qd_ops.dequantize_per_tensor.default, conv.name
        assert x.args[0].target == qd_ops.quantize_per_tensor.default, conv.name
        assert w.target == qd_ops.dequantize_per_channel.default, conv.name
        stored = w.args[0]
        assert stored.op == "get_attr", conv.name
        assert attr(graph, stored.target).dtype == torch.int8, conv.name
    assert unquantized_convolutions(graph) == []


@pytest.fixture(scope="module")
def digits():
    return qd.digits()


def trained_pair(make, data, epochs, seed=0):
    """The plain network and its DO-Conv twin (convert_model of the same init), trained the same way."""
    x, y = data[0], data[1]
    torch.manual_seed(seed)
    plain = make()
    doconv = convert_model(plain)
    for model in (plain, doconv):
        qd.train(model, x, y, epochs, seed)
        model.eval()
    return plain, doconv


def ptq_agreements(plain, doconv, x_calibration, x_test, n_convs):
    agreements = {}
    for name, model in (("plain", plain), ("doconv", doconv)):
        int8 = qd.post_training_int8(model, x_calibration)
        assert_every_conv_int8(int8, n_convs)
        agreements[name] = qd.agreement(model, int8, x_test)
    return agreements


def test_ptq_of_fused_small_network_agrees_like_plain(digits):
    x_train, _, x_test, _ = digits
    plain, doconv = trained_pair(lambda: qd.small_cnn(nn.Conv2d, 8), (x_train[:768], digits[1][:768]), epochs=2)
    agreements = ptq_agreements(plain, doconv, x_train[:256], x_test, n_convs=3)
    assert agreements["doconv"] >= agreements["plain"] - 2.0, agreements
    assert agreements["plain"] >= 90.0, agreements  # the chain works at all


def test_ptq_of_fused_resnet18_style_agrees_like_plain(digits):
    # The ResNet-18 layout needs 3 channels; the digits upsampled to 16x16 reach 1x1 at its last stage.
    resized = qd.digits(size=16)
    data = [t.expand(-1, 3, -1, -1).contiguous() if t.dim() == 4 else t for t in resized]
    subset = (data[0][:640], data[1][:640])
    plain, doconv = trained_pair(lambda: resnet18_style(width=8), subset, epochs=2)
    agreements = ptq_agreements(plain, doconv, data[0][:256], data[2], n_convs=20)
    assert agreements["doconv"] >= agreements["plain"] - 2.0, agreements


def test_conv_bn_folding_works_on_the_fused_model():
    torch.manual_seed(0)
    net = nn.Sequential(DOConv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        net[0].D.normal_(0, 0.3)
        net[1].running_mean.normal_(0, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.normal_(1, 0.3)
    net.eval()
    fused = fuse_model(net)
    x = torch.randn(4, 3, 10, 10)
    expected = net(x)
    folded = torch.ao.quantization.fuse_modules(fused, [["0", "1", "2"]])
    assert type(folded[0]).__name__ == "ConvReLU2d"
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    conv = torch.nn.utils.fusion.fuse_conv_bn_eval(fused[0], fused[1])
    torch.testing.assert_close(torch.relu(conv(x)), expected, rtol=1e-5, atol=1e-5)


def qat_net():
    """Conv-BN-ReLU, a grouped conv with bias, a 1x1 conv (K = 1: no D), all DO-Conv."""
    torch.manual_seed(0)
    return nn.Sequential(
        DOConv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        DOConv2d(8, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        DOConv2d(8, 16, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def quantizer():
    return qd._quantizer(is_qat=True)


def test_plain_export_leaves_doconv_in_float_and_export_for_qat_does_not():
    """The quantizer matches convolutions by module type: exported as is, DO-Conv would stay float, silently."""
    net = nn.Sequential(DOConv2d(1, 4, 3), nn.ReLU()).train()
    x = torch.rand(4, 1, 8, 8)
    plain_export = torch.export.export(net, (x,)).module()
    prepared = prepare_qat_pt2e(plain_export, quantizer())
    prepared(x)
    assert unquantized_convolutions(convert_pt2e(prepared)) == ["conv2d"]
    prepared = prepare_qat_pt2e(export_for_qat(net, (x,)), quantizer())
    prepared(x)
    assert_every_conv_int8(convert_pt2e(prepared), 1)


@pytest.fixture(scope="module")
def qat_trained(digits):
    """The QAT graph of qat_net, its losses over 3 epochs on 256 digits, and the data."""
    x, y = digits[0][:256], digits[1][:256]
    prepared = prepare_qat_pt2e(export_for_qat(qat_net().train(), (x[:64],)), quantizer())
    untrained = copy.deepcopy(prepared)
    losses = [qd.train(prepared, x, y, epochs=1, seed=epoch) for epoch in range(3)]
    return untrained, prepared, losses, x, y


def _ancestors(node):
    seen, stack = [], [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.append(n)
            stack.extend(n.all_input_nodes)
    return seen


def test_qat_fake_quantizes_the_composed_kernel_and_trains_W_and_D(qat_trained):
    untrained, prepared, losses, x, y = qat_trained
    for conv in conv_nodes(prepared):
        # The weight input is a fake-quantizer whose input is computed from the layer's W (and D).
        fq = conv.args[1]
        assert fq.op == "call_module" and isinstance(getattr(prepared, fq.target), FakeQuantizeBase), conv.name
        sources = {n.target for n in _ancestors(fq.args[0]) if n.op == "get_attr"}
        assert any(t.endswith(".W") for t in sources), (conv.name, sources)
    assert losses[-1] < losses[0], losses
    loss = nn.functional.cross_entropy(untrained(x[:64]), y[:64])
    loss.backward()
    for layer in ("0", "3", "5"):
        module = untrained.get_submodule(layer)
        assert module.W.grad is not None and module.W.grad.abs().sum() > 0, layer
        if layer == "5":
            assert not hasattr(module, "D")  # a 1x1 kernel is W itself
        else:
            assert module.D.grad is not None and module.D.grad.abs().sum() > 0, layer


def test_qat_converts_to_the_int8_model_of_the_fused_kernel(qat_trained, digits):
    prepared = copy.deepcopy(qat_trained[1])
    # What fuse_model + BN folding would give, from the trained W, D and batch-norm statistics.
    expected = {}
    for layer, bn in (("0", "1"), ("3", None), ("5", "6")):
        module = prepared.get_submodule(layer)
        D = getattr(module, "D", None)
        identity = getattr(module, "identity", None)
        shape = [module.W.shape[0], module.W.shape[1], *((3, 3) if D is not None else (1, 1))]
        groups = 2 if layer == "3" else 1
        kernel = fold(module.W, D, identity, groups, shape).detach()
        bias = module.bias.detach() if hasattr(module, "bias") else torch.zeros(shape[0])
        if bn is not None:
            norm = prepared.get_submodule(bn)
            scale = norm.weight.detach() / torch.sqrt(norm.running_var + 1e-5)
            kernel = kernel * scale.reshape(-1, 1, 1, 1)
            bias = norm.bias.detach() + (bias - norm.running_mean) * scale
        expected[layer] = (kernel, bias)
    graph = copy.deepcopy(prepared)
    fuse_exported(graph)
    int8 = convert_pt2e(graph)
    move_exported_model_to_eval(int8)
    assert_every_conv_int8(int8, 3)
    assert not any(n.target == aten.batch_norm.default for n in int8.graph.nodes)  # BN folded into the convs
    assert not [name for name, _ in int8.named_parameters() if name.endswith((".W", ".D"))]
    for conv, (kernel, bias) in zip(conv_nodes(int8), expected.values()):
        dq = conv.args[1]
        q_weight, scale, zero_point = (attr(int8, n.target) for n in dq.args[:3])
        axis, qmin, qmax = dq.args[3:6]
        assert axis == 0
        reference = torch.clamp(
            torch.round(kernel / scale.reshape(-1, 1, 1, 1)) + zero_point.reshape(-1, 1, 1, 1), qmin, qmax
        )
        # Rounding may land on the other integer where kernel/scale sits within float error of a half.
        assert (q_weight.float() - reference).abs().max() <= 1
        assert (q_weight.float() != reference).float().mean() < 0.01
        torch.testing.assert_close(attr(int8, conv.args[2].target), bias, rtol=1e-5, atol=1e-5)
    # The int8 graph classifies as the fake-quantized graph it came from.
    move_exported_model_to_eval(prepared)
    assert qd.agreement(prepared, int8, digits[2]) >= 97.0


def test_fuse_exported_keeps_outputs_and_drops_W_and_D():
    net = qat_net().eval()
    x = torch.rand(2, 1, 8, 8)
    graph = fuse_exported(export_for_qat(net, (x,)))
    names = {name for name, _ in graph.named_parameters()}
    assert {"doconv_kernel_0", "doconv_kernel_3", "doconv_kernel_5"} <= names
    assert not [n for n in names if n.endswith((".W", ".D"))]
    torch.testing.assert_close(graph(x), net(x), rtol=1e-5, atol=1e-5)


def test_fuse_exported_stores_both_kernels_of_layers_sharing_W():
    """A W shared by two layers is one graph node: it was marked for the second layer only, and the first
    layer's kernel stayed composed in the graph (convert_pt2e needs stored conv weights)."""
    net = nn.Sequential(DOConv2d(4, 4, 3, padding=1), nn.ReLU(), DOConv2d(4, 4, 3, padding=1)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    net[2].W = net[0].W
    x = torch.randn(2, 4, 6, 6)
    graph = fuse_exported(export_for_qat(net, (x,)))
    weights = [n.args[1] for n in graph.graph.nodes if n.op == "call_function" and n.target == aten.conv2d.default]
    assert [w.op for w in weights] == ["get_attr", "get_attr"] and weights[0].target != weights[1].target
    torch.testing.assert_close(graph(x), net(x), rtol=1e-5, atol=1e-5)


def test_a_forward_that_reads_weight_exports():
    """The weight property folded through the eager fast path (NumPy) inside torch.export too."""

    class Standardized(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = DOConv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + self.conv.weight.mean()

    net, x = Standardized().eval(), torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(export_for_qat(net, (x,))(x), net(x), rtol=1e-5, atol=1e-5)


def test_unquantized_convolutions_lists_transposed_ones_too():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 2, 3))
    graph = torch.export.export(net, (torch.randn(1, 3, 8, 8),)).module()
    assert unquantized_convolutions(graph) == ["conv2d", "conv_transpose2d"]


def test_bad_arguments_raise_clearly():
    with pytest.raises(TypeError, match="export_for_qat needs an nn.Module. Received: model of type list"):
        export_for_qat([], (torch.zeros(1),))
    with pytest.raises(TypeError, match="args must be a tuple of example inputs. Received: args of type Tensor"):
        export_for_qat(nn.ReLU(), torch.zeros(1))
    plain = torch.export.export(nn.Sequential(nn.Conv2d(1, 2, 3)), (torch.zeros(1, 1, 4, 4),)).module()
    assert mark_doconv_convolutions(plain) == 0
    with pytest.raises(ValueError, match="fuse_exported found no DO-Conv kernel in the graph"):
        fuse_exported(plain)
    with pytest.raises(TypeError, match="Received: graph_module of type Sequential"):
        fuse_exported(nn.Sequential())
    with pytest.raises(TypeError, match="Received: graph_module of type ReLU"):
        unquantized_convolutions(nn.ReLU())


def test_exported_training_graph_differentiates_like_the_layer():
    """Under export the fold is plain torch ops (no custom autograd Function): W and D get the eager gradients."""
    net = qat_net().train()
    with torch.no_grad():
        for layer in (net[0], net[3]):
            layer.D.normal_(0, 0.2)
    x = torch.rand(4, 1, 8, 8)
    graph = export_for_qat(copy.deepcopy(net), (x,))
    assert not [n for n in graph.graph.nodes if "autograd" in str(n.target).lower()]
    net(x).square().sum().backward()
    graph(x).square().sum().backward()
    for layer in ("0", "3", "5"):
        for name in ("W", "D"):
            eager = getattr(net.get_submodule(layer), name)
            if eager is None:
                continue
            exported = getattr(graph.get_submodule(layer), name)
            torch.testing.assert_close(exported.grad, eager.grad, rtol=1e-4, atol=1e-6)


def test_subclasses_of_doconv_are_marked_too():
    class Tagged(DOConv2d):  # a local class: the graph records only its name
        pass

    net = nn.Sequential(Tagged(1, 4, 3), nn.ReLU(), DOConv2d(4, 4, 1))
    x = torch.rand(2, 1, 8, 8)
    graph = export_for_qat(net, (x,))
    marked = [n.meta["source_fn_stack"][-1][1] for n in conv_nodes(graph)]
    assert marked == [nn.Conv2d, nn.Conv2d]
    # Without the model, the classes are looked up among the imported modules: DOConv2d is found.
    unmarked = torch.export.export(net, (x,)).module()
    assert mark_doconv_convolutions(unmarked) == 1
    assert mark_doconv_convolutions(torch.export.export(net, (x,)).module(), net) == 2
