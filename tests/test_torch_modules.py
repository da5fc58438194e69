"""DOConv1d/2d/3d through PyTorch's own conv module tests.

The inputs are the maintainers' ModuleInfo entries for nn.Conv1d/2d/3d
(``torch.testing._internal.common_modules.module_db``); the checks follow the ones PyTorch's
``test/test_modules.py`` runs on every module (forward, factory kwargs, repr, pickle,
non-contiguous inputs, gradcheck, gradgradcheck, memory format, train/eval, state_dict, ``.to()``
with and without swapping), written here for DO-Conv, with the native conv beside it. Every
forward is also compared with ``fuse()`` after D has moved off zero. The checks that differ on
purpose are listed in docs/torch.rst ("Drop-in parity").
"""

import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

# PyTorch's test helpers (they need the `expecttest` package, a test dependency of doconv.torch).
from torch.testing._internal.common_modules import module_db  # noqa: E402

from doconv.torch import ConvError, DOConv1d, DOConv2d, DOConv3d, fold  # noqa: E402

torch.set_num_threads(2)

DOCONV = {nn.Conv1d: DOConv1d, nn.Conv2d: DOConv2d, nn.Conv3d: DOConv3d}
CONV_INFOS = [info for info in module_db if info.module_cls in DOCONV]
DTYPES = [torch.float32, torch.float64]


def test_module_db_has_the_conv_entries():
    assert sorted(info.module_cls.__name__ for info in CONV_INFOS) == ["Conv1d", "Conv2d", "Conv3d"]


def module_inputs(info, dtype, requires_grad=False, training=True):
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training)


def cases(dtypes=DTYPES):
    """(ModuleInfo, dtype, index of the module input) for every conv entry, its dtypes and inputs."""
    out = []
    for info in CONV_INFOS:
        for dtype in dtypes:
            if dtype not in info.dtypes:
                continue
            for i, module_input in enumerate(module_inputs(info, dtype)):
                desc = module_input.desc or "batched"
                kwargs = module_input.constructor_input.kwargs
                name = f"{info.name}-{str(dtype)[6:]}-{desc}{'-' + kwargs['padding'] if kwargs else ''}"
                out.append(pytest.param(info, dtype, i, id=name))
    return out


def build(info, dtype, index, requires_grad=False, training=True, seed=0):
    """(DO-Conv layer with D and W moved off their init, the module input) for one case."""
    module_input = module_inputs(info, dtype, requires_grad, training)[index]
    ctor = module_input.constructor_input
    layer = DOCONV[info.module_cls](*ctor.args, **ctor.kwargs).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=dtype))
    layer.train(training)
    return layer, module_input


def native_twin(layer):
    """The nn.ConvNd with the same constructor arguments and, as its weight, the folded kernel."""
    return layer.fuse()


def assert_close(a, b, dtype):
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("info,dtype,index", cases())
def test_forward_reference_fuse_and_train_eval(info, dtype, index):
    layer, module_input = build(info, dtype, index)
    args, kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
    y = layer(*args, **kwargs)
    assert y.dtype == dtype
    if module_input.reference_fn is not None:  # unbatched: the batched forward, squeezed
        assert_close(y, module_input.reference_fn(layer, *args, **kwargs), dtype)
    with torch.no_grad():
        assert_close(y, native_twin(layer)(*args), dtype)
        y_eval = layer.eval()(*args)  # train_and_eval_differ is False for convs
    assert_close(y_eval, y, dtype)
    # ...and against the functional fold in plain torch ops, through the native conv's own forward
    conv = info.module_cls(*module_input.constructor_input.args, **module_input.constructor_input.kwargs).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(fold(layer.W, layer.D, layer.identity, layer.groups, layer._kernel_shape))
        conv.bias.copy_(layer.bias)
        assert_close(y, conv(*args), dtype)


@pytest.mark.parametrize("info", CONV_INFOS, ids=lambda info: info.name)
@pytest.mark.parametrize("dtype", DTYPES)
def test_factory_kwargs_reach_every_parameter_and_buffer(info, dtype):
    for module_input in module_inputs(info, dtype):
        ctor = module_input.constructor_input
        layer = DOCONV[info.module_cls](*ctor.args, **ctor.kwargs, device="cpu", dtype=dtype)
        tensors = list(layer.named_parameters()) + list(layer.named_buffers())
        assert {name for name, _ in tensors} == {"W", "D", "bias", "identity"}
        for name, tensor in tensors:
            assert tensor.device.type == "cpu" and tensor.dtype == dtype, name


@pytest.mark.parametrize("info", CONV_INFOS, ids=lambda info: info.name)
def test_repr_is_the_native_repr_plus_D_mul(info):
    for module_input in module_inputs(info, torch.float32):
        ctor = module_input.constructor_input
        native = info.module_cls(*ctor.args, **ctor.kwargs)
        layer = DOCONV[info.module_cls](*ctor.args, **ctor.kwargs)
        name = info.module_cls.__name__
        assert repr(layer) == "DO" + repr(native)[:-1] + f", D_mul={layer.D_mul})"
        assert str(layer) == repr(layer) and name in repr(layer)


@pytest.mark.parametrize("info,dtype,index", cases([torch.float32]))
def test_pickle_and_state_dict_round_trips(info, dtype, index):
    layer, module_input = build(info, dtype, index)
    (x,) = module_input.forward_input.args
    with torch.no_grad():
        want = layer(x)
        for restored in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
            assert torch.equal(restored(x), want)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(x), want)
        buffer = io.BytesIO()
        torch.save(layer.state_dict(), buffer)
        buffer.seek(0)
        fresh, _ = build(info, dtype, index, seed=1)
        assert not torch.equal(fresh(x), want)
        result = fresh.load_state_dict(torch.load(buffer, weights_only=True))
        assert not result.missing_keys and not result.unexpected_keys
        assert torch.equal(fresh(x), want)
        assert sorted(layer.state_dict()) == ["D", "W", "bias"]  # the identity buffer is not persistent


def _non_contiguous(t):
    """The same values, in memory with gaps between them (as test_modules makes its inputs)."""
    wide = torch.repeat_interleave(t.detach(), 2, dim=-1)
    out = wide[..., ::2]
    assert not out.is_contiguous() and torch.equal(out, t.detach())
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("info,dtype,index", cases([torch.float64]))
def test_non_contiguous_inputs_parameters_and_gradients(info, dtype, index):
    layer, module_input = build(info, dtype, index)
    (x,) = module_input.forward_input.args

    def run(model, x, upstream):
        x = x.detach().clone().requires_grad_(True) if x.is_contiguous() else x.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.backward(upstream)
        return [y.detach(), x.grad] + [p.grad for p in model.parameters()]

    y = layer(x)
    upstream = torch.randn(y.shape, dtype=dtype)
    want = run(layer, x, upstream)
    strided = copy.deepcopy(layer)
    for p in strided.parameters():
        p.data = _non_contiguous(p.data)  # parameters in strided memory too
    got = run(strided, _non_contiguous(x), _non_contiguous(upstream))
    for a, b in zip(got, want):
        assert_close(a, b, dtype)


@pytest.mark.parametrize("info,dtype,index", cases([torch.float64]))
def test_gradcheck_and_gradgradcheck_over_input_and_parameters(info, dtype, index):
    layer, module_input = build(info, dtype, index)
    (x,) = module_input.forward_input.args
    names = [name for name, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = x.detach().clone().requires_grad_(True)

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    # info.gradcheck_nondet_tol as test_modules passes it; fast mode (random projections) keeps the
    # 3-d layers' D (4 x 27 x 27 entries) affordable.
    options = dict(nondet_tol=info.gradcheck_nondet_tol, fast_mode=True)
    assert torch.autograd.gradcheck(f, (x, *params), **options)
    assert info.supports_gradgrad
    assert torch.autograd.gradgradcheck(f, (x, *params), **options)


@pytest.mark.parametrize("info,dtype,index", cases([torch.float32]))
def test_memory_formats(info, dtype, index):
    rank = len(info.module_cls(1, 1, 1).kernel_size)
    if rank == 1:
        pytest.skip("no channels-last format for 3-d tensors")
    layer, module_input = build(info, dtype, index)
    (x,) = module_input.forward_input.args
    if x.dim() != rank + 2:
        pytest.skip("channels_last needs the batch dimension")
    layout = torch.channels_last if rank == 2 else torch.channels_last_3d
    native = native_twin(layer)
    with torch.no_grad():
        want = layer(x)
        for module_layout in (torch.contiguous_format, layout):
            for model in (layer, native):
                model.to(memory_format=module_layout)
            y, y_native = layer(x.to(memory_format=layout)), native(x.to(memory_format=layout))
            assert_close(y, want, dtype)
            # a channels-last input gives the native conv's output layout
            assert y.is_contiguous(memory_format=layout) == y_native.is_contiguous(memory_format=layout)
            assert_close(layer(x), want, dtype)  # the module's conversion changes no value


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("info", CONV_INFOS, ids=lambda info: info.name)
def test_to_another_dtype_with_and_without_swapping_tensors(info, swap):
    layer, module_input = build(info, torch.float32, 0)
    (x,) = module_input.forward_input.args
    layer(x).sum().backward()
    before = {name: p for name, p in layer.named_parameters()}
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        layer.to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    for name, p in layer.named_parameters():
        assert p is before[name]  # the same Parameter objects, either way
        assert p.dtype == torch.float64 and p.grad.dtype == torch.float64
        torch.testing.assert_close(p.grad, grads[name].double())
    assert layer.identity.dtype == torch.float64
    x = x.double()
    with torch.no_grad():
        assert_close(layer(x), native_twin(layer)(x), torch.float64)
    layer(x).sum().backward()  # trains in the new dtype


# --- errors: where nn.ConvNd raises, DO-Conv raises the same type (or a subclass) ----------------


def _error_cases(rank):
    spatial = (5,) * rank
    return [
        ("input of one dimension more", {}, (1, 4, *spatial, 2)),
        ("input of two dimensions fewer", {}, (4,) + spatial[1:]),
        ("wrong channel count", {}, (2, 3, *spatial)),
        ("wrong channel count, unbatched", {}, (3, *spatial)),
        ("input smaller than the kernel", {}, (1, 4) + (2,) * rank),
        ("zero stride", {"stride": 0}, (1, 4, *spatial)),
        ("negative stride", {"stride": -1}, (1, 4, *spatial)),
        ("zero dilation", {"dilation": 0}, (1, 4, *spatial)),
        ("negative padding", {"padding": -1}, (1, 4, *spatial)),
        ("stride of the wrong length", {"stride": (1,) * (rank + 1)}, (1, 4, *spatial)),
        ("groups not dividing the channels", {"groups": 3}, (1, 4, *spatial)),
        ("padding 'same' with a stride", {"padding": "same", "stride": 2}, (1, 4, *spatial)),
        ("unknown padding mode", {"padding_mode": "mirror"}, (1, 4, *spatial)),
        ("input of another dtype", {}, (1, 4, *spatial), torch.float64),
    ]


def _raised(make, shape, dtype):
    try:
        make()(torch.randn(shape, dtype=dtype))
    except Exception as err:  # noqa: BLE001 - the type is what is compared
        return err
    return None


@pytest.mark.parametrize("info", CONV_INFOS, ids=lambda info: info.name)
def test_errors_have_the_native_type_and_say_what_is_wrong(info):
    rank = len(info.module_cls(1, 1, 1).kernel_size)
    for what, kwargs, shape, *dtype in _error_cases(rank):
        dtype = dtype[0] if dtype else torch.float32
        native = _raised(lambda kwargs=kwargs: info.module_cls(4, 6, 3, **kwargs), shape, dtype)
        ours = _raised(lambda kwargs=kwargs: DOCONV[info.module_cls](4, 6, 3, **kwargs), shape, dtype)
        assert native is not None, what
        assert isinstance(ours, type(native)), f"{what}: {type(ours).__name__} is not a {type(native).__name__}"
        message = str(ours)
        if isinstance(ours, ConvError):  # ours: the argument or the input, and the value received
            assert "Received:" in message, (what, message)
            named = next(iter(kwargs), "input")
            assert named in message, (what, message)
        assert len(message) >= min(len(str(native)), 40), (what, message)
