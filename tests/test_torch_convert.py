"""convert_model / fuse_model keep what the user set up; set_params is strict and atomic.

torchvision does not import beside the CPU torch wheel of the test env, so the networks here are
small ones reproducing the model zoo's structures: a resnet stem and blocks, depthwise-separable
blocks, timm-style conv subclasses, ties, shared modules, pruning and weight norm.
"""

import copy
import math
import threading
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.nn.utils import parametrize, prune  # noqa: E402
from torch.nn.utils.parametrizations import weight_norm as weight_norm_new  # noqa: E402

from doconv.torch import DOConv1d, DOConv2d, DOConv3d, convert_model, fuse_model, get_params, set_params  # noqa: E402

nn = torch.nn
F = torch.nn.functional


def quiet(function, *args, **kwargs):
    """Call a conversion whose warnings this test does not check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def only_warning(record):
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    return messages[0]


# --- networks of the zoo's shapes ---------------------------------------------------------------


class Block(nn.Module):
    """A resnet basic block, with a strided 1x1 downsample when the shape changes."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + identity)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8, 8), Block(8, 8))
        self.layer2 = nn.Sequential(Block(8, 16, 2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def separable(c_in, c_out, stride=1):
    """A MobileNet block: depthwise (groups = C_in) then pointwise."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU6(),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
    )


class SameConv(nn.Conv2d):
    """'same' padding computed in forward from the input size, as timm's Conv2dSame."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """Standardises its weight in every forward, as timm's StdConv2d."""

    def forward(self, x):
        flat = self.weight.reshape(self.out_channels, -1)
        w = ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def trainable(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


# --- 1. flags, mode, dtype, memory format -------------------------------------------------------


def test_frozen_stem_stays_frozen_through_convert_sgd_and_fuse():
    torch.manual_seed(0)
    model = TinyResNet()
    for module in (model.conv1, model.bn1, model.layer1):
        module.requires_grad_(False)
    converted = convert_model(model)
    frozen = [
        n for n, p in converted.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1.")) and p.requires_grad
    ]
    assert frozen == []
    assert all(p.requires_grad for n, p in converted.named_parameters() if n.startswith(("layer2.", "fc.")))
    stem_before = converted.conv1.weight.detach().clone()
    block_before = converted.layer2[0].conv1.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in converted.parameters() if p.requires_grad], lr=0.5)
    converted(torch.randn(2, 3, 16, 16)).square().sum().backward()
    optimizer.step()
    assert torch.equal(converted.conv1.weight, stem_before)  # the frozen kernel did not move
    assert not torch.equal(converted.layer2[0].conv1.weight, block_before)  # a trainable one did
    fused = fuse_model(converted)
    assert trainable(fused) == trainable(model)


def test_bias_flag_follows_the_bias_and_mode_and_dtype_are_kept():
    conv = nn.Conv2d(2, 4, 3, dtype=torch.float64).eval()
    conv.bias.requires_grad_(False)
    layer = convert_model(conv)
    assert type(layer) is DOConv2d and not layer.training and layer.W.dtype == torch.float64
    assert layer.W.requires_grad and layer.D.requires_grad and not layer.bias.requires_grad
    back = fuse_model(layer)
    assert type(back) is nn.Conv2d and not back.training and back.weight.dtype == torch.float64
    assert back.weight.requires_grad and not back.bias.requires_grad
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(back(x), conv(x), rtol=1e-12, atol=1e-12)


def test_channels_last_survives_convert_and_fuse():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    model = model.to(memory_format=torch.channels_last)
    fused = fuse_model(convert_model(model))
    # (a depthwise or 1x1 kernel is both channels_last and contiguous: only the first one tells)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in fused)
    assert not fused[0].weight.is_contiguous()
    plain = fuse_model(convert_model(nn.Sequential(nn.Conv2d(3, 8, 3))))
    assert plain[0].weight.is_contiguous()
    volume = fuse_model(convert_model(nn.Conv3d(2, 4, 3).to(memory_format=torch.channels_last_3d)))
    assert volume.weight.is_contiguous(memory_format=torch.channels_last_3d) and not volume.weight.is_contiguous()


# --- 2. hooks -----------------------------------------------------------------------------------


def hooked(layer, fired):
    """Register one hook of every kind on ``layer``; each records its kind in ``fired``."""
    layer.register_forward_pre_hook(lambda m, args: fired.append("forward_pre"))
    layer.register_forward_pre_hook(lambda m, args, kwargs: fired.append("forward_pre_kwargs"), with_kwargs=True)
    layer.register_forward_hook(lambda m, args, out: fired.append("forward"))
    layer.register_forward_hook(lambda m, args, out: fired.append("forward_always"), always_call=True)
    layer.register_full_backward_pre_hook(lambda m, grad_out: fired.append("backward_pre"))
    layer.register_full_backward_hook(lambda m, grad_in, grad_out: fired.append("backward"))
    layer.register_state_dict_pre_hook(lambda m, prefix, keep_vars: fired.append("state_dict_pre"))
    layer.register_state_dict_post_hook(lambda m, state, prefix, meta: fired.append("state_dict_post"))
    layer.register_load_state_dict_pre_hook(lambda m, *args: fired.append(("load_pre", type(m).__name__)))
    layer.register_load_state_dict_post_hook(lambda m, keys: fired.append("load_post"))
    return layer


def exercise(model, x):
    model(x.requires_grad_()).sum().backward()
    model.load_state_dict(model.state_dict())


KINDS = [
    "forward_pre",
    "forward_pre_kwargs",
    "forward",
    "forward_always",
    "backward_pre",
    "backward",
    "state_dict_pre",
    "state_dict_post",
    "load_post",
]


@pytest.mark.parametrize("inplace", [False, True])
def test_every_kind_of_hook_fires_after_convert_and_after_fuse(inplace):
    fired = []
    model = nn.Sequential(hooked(nn.Conv2d(2, 3, 3), fired), nn.ReLU())
    x = torch.randn(1, 2, 5, 5)
    converted = convert_model(model, inplace=inplace)
    assert type(converted[0]) is DOConv2d
    exercise(converted, x)
    assert sorted(k for k in fired if isinstance(k, str)) == sorted(KINDS)
    assert ("load_pre", "DOConv2d") in fired  # the hook registered with its module gets the new one
    fired.clear()
    fused = fuse_model(converted, inplace=inplace)
    exercise(fused, x)
    assert sorted(k for k in fired if isinstance(k, str)) == sorted(KINDS)
    assert ("load_pre", "Conv2d") in fired
    if not inplace:  # the given model keeps its own hooks
        fired.clear()
        exercise(model, x)
        assert ("load_pre", "Conv2d") in fired and "forward" in fired


def test_old_style_backward_hook_and_handles_after_inplace_conversion():
    fired = []
    conv = nn.Conv2d(2, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates non-full backward hooks
        conv.register_backward_hook(lambda m, grad_in, grad_out: fired.append([tuple(g.shape) for g in grad_in]))
    handle = conv.register_forward_hook(lambda m, args, out: fired.append("forward"))
    model = nn.Sequential(conv)
    convert_model(model, inplace=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(torch.randn(1, 2, 5, 5, requires_grad=True)).sum().backward()
    assert "forward" in fired and [(1, 2, 5, 5), (3, 2, 3, 3), (3,)] in fired
    fired.clear()
    handle.remove()  # a handle taken before an in-place conversion still removes the hook
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(torch.randn(1, 2, 5, 5))
    assert "forward" not in fired


# --- 3. sharing and ties ------------------------------------------------------------------------


class Tied(nn.Module):
    """Two convs sharing one kernel (one strided), and a module under two parents."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.b.weight = self.a.weight
        self.b.bias = self.a.bias
        self.head = nn.Conv2d(4, 2, 1)
        self.branches = nn.ModuleDict({"x": nn.Sequential(self.head), "y": nn.Sequential(self.head)})

    def forward(self, x):
        y = self.b(F.relu(self.a(x)))
        return self.branches["x"](y) + self.branches["y"](y)


def test_tied_kernels_become_one_W_and_D_and_stay_tied_through_sgd_and_fuse():
    torch.manual_seed(0)
    model = Tied().double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    converted = convert_model(model, D_mul=12)
    assert converted.a.W is converted.b.W and converted.a.D is converted.b.D and converted.a.bias is converted.b.bias
    assert converted.branches["x"][0] is converted.branches["y"][0] is converted.head
    torch.testing.assert_close(converted(x), model(x), rtol=1e-10, atol=1e-12)
    n_params = len(list(converted.parameters()))
    assert n_params == 3 + 2  # W, D, bias of the tie; W, bias of the head
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.1)
    converted(x).square().sum().backward()
    optimizer.step()
    torch.testing.assert_close(converted.a.weight, converted.b.weight, rtol=0, atol=0)
    fused = fuse_model(converted)
    assert fused.a.weight is fused.b.weight and fused.a.bias is fused.b.bias and fused.head is fused.branches["x"][0]
    torch.testing.assert_close(fused(x), converted(x), rtol=1e-10, atol=1e-12)


def test_ties_that_cannot_be_kept_raise_naming_the_layers():
    model = nn.Module()
    model.enc = nn.Conv2d(2, 4, 3)
    model.dec = nn.ConvTranspose2d(4, 2, 3)
    model.dec.weight = model.enc.weight  # an autoencoder's tie with a layer that is not converted
    with pytest.raises(ValueError, match=r"cannot replace 'enc': its weight is also dec.weight"):
        quiet(convert_model, model)
    assert type(model.enc) is nn.Conv2d
    tied = Tied()
    with pytest.raises(ValueError, match=r"cannot replace 'a': its weight is also b.weight"):
        convert_model(tied, D_mul=lambda name, conv: None if name == "b" else 9)
    with pytest.raises(ValueError, match=r"'b' tied to 'a': their new layers would need different shapes"):
        convert_model(tied, D_mul=lambda name, conv: 9 if name == "a" else (10 if name == "b" else 1))
    partly = nn.Sequential(DOConv2d(2, 2, 3), DOConv2d(2, 2, 3))
    partly[1].W = partly[0].W  # W shared, D not: two different kernels
    with pytest.raises(ValueError, match=r"share W but not the whole kernel"):
        fuse_model(partly)


# --- 4. pruning, weight norm, parametrizations --------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True])
def test_pruned_conv_is_converted_with_its_mask_baked_and_a_warning(inplace):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 2))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.l1_unstructured(model[3], "weight", amount=0.5)  # a pruned module that stays: the copy must work
    x = torch.randn(2, 3, 6, 6)
    want = model(x)
    with pytest.warns(UserWarning, match=r"baked these into the new layers: '0' \(pruning mask of weight\)"):
        converted = convert_model(model, inplace=inplace)
    assert type(converted[0]) is DOConv2d and not prune.is_pruned(converted[0])
    assert sorted(n for n, _ in converted[0].named_parameters()) == ["D", "W", "bias"]
    torch.testing.assert_close(converted(x), want, rtol=1e-5, atol=1e-5)
    assert prune.is_pruned(converted[3])
    if not inplace:
        assert type(model[0]) is nn.Conv2d and prune.is_pruned(model[0])
        with torch.no_grad():  # the copy's pruned Linear recomputes from its own parameters
            converted[3].weight_orig.add_(1.0)
        torch.testing.assert_close(model(x), want)
        assert not torch.allclose(converted(x), want)


@pytest.mark.parametrize("api", ["parametrizations", "old"])
def test_weight_normed_conv_is_converted_with_its_weight_baked(api):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    if api == "old":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch deprecates the old API
            conv = torch.nn.utils.weight_norm(conv)
    else:
        conv = weight_norm_new(conv)
    conv.bias.requires_grad_(False)
    model = nn.Sequential(conv)
    x = torch.randn(1, 3, 5, 5)
    with pytest.warns(UserWarning, match=r"'0' \(weight_norm of weight\)|'0' \(parametrization of weight\)"):
        converted = convert_model(model)
    layer = converted[0]
    assert type(layer) is DOConv2d and not parametrize.is_parametrized(layer)
    assert not hasattr(layer, "weight_g") and layer.W.requires_grad and not layer.bias.requires_grad
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)
    assert type(model[0]) is not DOConv2d  # the given model is untouched


def test_parametrized_DO_conv_is_fused_with_its_parametrization_baked():
    layer = DOConv2d(2, 3, 3)

    class Double(nn.Module):
        def forward(self, W):
            return 2 * W

    parametrize.register_parametrization(layer, "W", Double())
    x = torch.randn(1, 2, 5, 5)
    with pytest.warns(UserWarning, match=r"parametrization of W"):
        fused = fuse_model(nn.Sequential(layer))
    assert type(fused[0]) is nn.Conv2d
    torch.testing.assert_close(fused(x), layer(x), rtol=1e-5, atol=1e-5)


def test_spectral_norm_conv_is_left_and_named_and_the_copy_works():
    conv = torch.nn.utils.spectral_norm(nn.Conv2d(2, 3, 3))
    model = nn.Sequential(conv, nn.Conv2d(3, 3, 1))
    with pytest.warns(UserWarning) as record:
        converted = convert_model(model)
    message = only_warning(record)
    assert "replaced 1 of 2" in message and "'0' (Conv2d: " in message
    assert type(converted[0]) is nn.Conv2d and type(converted[1]) is DOConv2d
    converted.eval()
    model.eval()
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(converted(x), model(x))


def test_a_model_that_cannot_be_copied_gets_a_clear_error():
    model = nn.Sequential(nn.Conv2d(2, 2, 1))
    model.cache = nn.Module()
    model.cache.last = torch.ones(2, requires_grad=True) * 2  # a non-leaf tensor kept on a module
    with pytest.raises(ValueError, match=r"'cache' \(Module\) holds 'last', a tensor computed in the autograd graph"):
        convert_model(model)
    assert type(model[0]) is nn.Conv2d
    assert type(convert_model(model, inplace=True)[0]) is DOConv2d

    class Recorder:  # a hook whose object cannot be copied (it holds a lock)
        def __init__(self):
            self.lock = threading.Lock()

        def __call__(self, module, args, out):
            pass

    conv = nn.Conv2d(2, 2, 1)
    conv.register_forward_hook(Recorder())
    with pytest.raises(RuntimeError, match=r"copying the hooks of \(the model itself\) failed.*Pass inplace=True"):
        convert_model(conv)
    assert type(convert_model(conv, inplace=True)) is DOConv2d


# --- 5. nothing skipped silently ----------------------------------------------------------------


def test_conv_subclasses_are_left_and_named_in_one_warning():
    torch.manual_seed(0)
    model = nn.Sequential(
        SameConv(3, 4, 3, stride=2),
        StdConv(4, 4, 3, padding=1),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ConvTranspose2d(4, 2, 2)),
        nn.Conv1d(2, 2, 1) if False else nn.Identity(),
    )
    x = torch.randn(1, 3, 9, 9)
    want = model(x)
    with pytest.warns(UserWarning) as record:
        converted = convert_model(model)
    message = only_warning(record)
    assert "replaced 1 of 4 conv-like layers and left 3" in message
    for part in ("'0' (SameConv)", "'1' (StdConv)", "'2.1' (ConvTranspose2d)"):
        assert part in message
    assert type(converted[0]) is SameConv and type(converted[1]) is StdConv and type(converted[2][0]) is DOConv2d
    torch.testing.assert_close(converted(x), want, rtol=1e-5, atol=1e-5)
    # a DO-Conv subclass is not fused either, and said so
    Sub = type("MyDOConv", (DOConv2d,), {})
    with pytest.warns(UserWarning, match=r"replaced 1 of 2 conv-like layers and left 1.*'1' \(MyDOConv\)"):
        fused = fuse_model(nn.Sequential(DOConv2d(2, 2, 3), Sub(2, 2, 1)))
    assert type(fused[0]) is nn.Conv2d and type(fused[1]) is Sub


def test_bare_layers_convert_and_fuse():
    for conv, cls in ((nn.Conv1d(2, 4, 3), DOConv1d), (nn.Conv2d(2, 4, 3), DOConv2d), (nn.Conv3d(2, 4, 3), DOConv3d)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no false "found no layer" warning
            layer = convert_model(conv)
            assert type(layer) is cls
            assert type(fuse_model(layer)) is type(conv)
            assert type(convert_model(conv, inplace=True)) is cls and type(conv) is not cls
    with pytest.warns(UserWarning, match=r"left 1 as they are.*\(the model itself\) \(StdConv\)"):
        left = convert_model(StdConv(2, 2, 3))
    assert type(left) is StdConv
    with pytest.warns(UserWarning, match="found no nn.Conv1d/2d/3d"):
        convert_model(nn.Linear(2, 2))
    with pytest.warns(UserWarning, match=r"'0' \(LazyConv2d: not initialized, run one forward first\)"):
        convert_model(nn.Sequential(nn.LazyConv2d(4, 3)))


def test_depthwise_separable_blocks_convert_exactly_and_fuse_back():
    torch.manual_seed(0)
    model = nn.Sequential(separable(4, 8), nn.ReLU(), separable(8, 8, 2)).double().eval()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    converted = convert_model(model)
    depthwise = converted[0][0]
    assert type(depthwise) is DOConv2d and depthwise.groups == 4 and depthwise.D.shape == (4, 9, 9)
    assert type(converted[2][3]) is DOConv2d and converted[2][3].D is None
    torch.testing.assert_close(converted(x), model(x), rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        depthwise.D.normal_()  # a trained D: the fused network still matches
    fused = fuse_model(converted)
    assert [type(m) for m in fused.modules()].count(nn.Conv2d) == 4
    torch.testing.assert_close(fused(x), converted(x), rtol=1e-10, atol=1e-12)


def test_user_attributes_come_along_and_clashes_raise():
    conv = nn.Conv2d(2, 2, 3)
    conv.stage = "stem"
    assert convert_model(conv).stage == "stem"
    assert fuse_model(convert_model(conv)).stage == "stem"
    conv.D_mul = 3
    with pytest.raises(ValueError, match=r"Cannot carry the attribute 'D_mul'"):
        convert_model(conv)


# --- 6. set_params ------------------------------------------------------------------------------


def test_set_params_is_strict_and_leaves_the_layer_as_it_was_on_failure():
    layer = DOConv2d(3, 4, 3, D_mul=10)
    before = {k: v.copy() for k, v in get_params(layer).items()}
    rng = np.random.default_rng(0)
    good = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in before.items()}
    bad = [
        (dict(good, D=np.full((3, 9, 10), "x")), TypeError, r"params\['D'\] must hold real numbers"),
        (dict(good, D="zeros"), TypeError, r"params\['D'\] must be an array of numbers. Received: str"),
        (dict(good, D=np.empty((3, 9, 10), dtype=object)), TypeError, r"dtype object"),
        (dict(good, D=good["D"] + 0j), TypeError, r"dtype complex"),
        (dict(good, bias=None), ValueError, r"params\['bias'\] must have shape \(4,\) for this layer. Received: None"),
        (dict(good, Bias=good["bias"]), ValueError, r"unknown entries \['Bias'\]"),
        ({"D": good["D"], "bias": good["bias"]}, ValueError, r"params\['W'\] must have shape \(4, 3, 10\)"),
        (dict(good, D=[[1, 2], [3]]), TypeError, r"params\['D'\] must be an array of numbers"),
        (dict(good, W=good["W"].astype(np.longdouble)), TypeError, r"params\['W'\] has a dtype torch cannot hold"),
        (dict(good, W=torch.from_numpy(good["W"]).to_sparse()), TypeError, r"params\['W'\] must be a dense tensor"),
        (dict(good, W=torch.empty(4, 3, 10, device="meta")), TypeError, r"params\['W'\] must be a dense tensor"),
        ([("W", good["W"])], TypeError, r"params must be a dict"),
    ]
    for params, error, match in bad:
        with pytest.raises(error, match=match):
            set_params(layer, params)
        after = get_params(layer)
        assert all(np.array_equal(after[k], before[k]) for k in before), match
    # tensors and integers are numbers too; K = 1 layers take D absent or None
    set_params(layer, dict(good, W=torch.from_numpy(good["W"]), bias=np.arange(4)))
    assert np.array_equal(get_params(layer)["bias"], np.arange(4, dtype=np.float32))
    pointwise = DOConv2d(3, 4, 1)
    set_params(pointwise, {"W": np.ones((4, 3, 1)), "bias": np.zeros(4)})
    with pytest.raises(ValueError, match=r"params\['D'\] must have shape None"):
        set_params(pointwise, {"W": np.ones((4, 3, 1)), "D": np.ones((3, 1, 1)), "bias": np.zeros(4)})
    parametrized = DOConv2d(3, 4, 3)
    parametrize.register_parametrization(parametrized, "W", nn.Identity())
    with pytest.raises(TypeError, match=r"set_params cannot write W"):
        set_params(parametrized, good | {"D": np.zeros((3, 9, 9)), "W": np.zeros((4, 3, 9))})


def test_inplace_argument_and_model_type_are_checked():
    with pytest.raises(TypeError, match=r"inplace must be True or False. Received: inplace='yes'"):
        convert_model(nn.Conv2d(1, 1, 1), inplace="yes")
    with pytest.raises(TypeError, match=r"fuse_model needs an nn.Module. Received: model of type list"):
        fuse_model([DOConv2d(1, 1, 1)])


def test_deepcopy_of_the_converted_model_still_works():
    model = copy.deepcopy(convert_model(Tied()))
    assert model.a.W is model.b.W
