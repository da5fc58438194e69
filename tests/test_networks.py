"""Whole networks across frameworks: train in PyTorch, move the weights, predict in Keras and Gluon.

One small CNN (DO-Conv, batch norm, ReLU, a grouped and a depthwise DO-Conv layer, pooling,
dense) is defined in all three frameworks. It is trained a few steps in PyTorch, its weights
move layer by layer with get_params / set_params (the canonical layout), and the three give the
same predictions, unfused and fused. docs/crossframework.rst walks through the same steps.
Runs in the `cross` tox env, where all three frameworks share one interpreter.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
mx = pytest.importorskip("mxnet")

import doconv.gluon as dg  # noqa: E402
import doconv.keras as dk  # noqa: E402
import doconv.torch as dt  # noqa: E402

# (in, out, groups, D_mul) of the three DO-Conv layers: plain, grouped, depthwise with multiplier 2
CONVS = [(3, 8, 1, None), (8, 8, 2, 12), (8, 16, 8, 18)]
CLASSES = 10
EPS = 1e-5


def torch_net():
    torch.manual_seed(0)
    layers = []
    for C_in, C_out, groups, D_mul in CONVS:
        layers += [
            dt.DOConv2d(C_in, C_out, 3, padding=1, groups=groups, bias=False, D_mul=D_mul),
            torch.nn.BatchNorm2d(C_out, eps=EPS),
            torch.nn.ReLU(),
        ]
    layers.insert(6, torch.nn.MaxPool2d(2))
    return torch.nn.Sequential(
        *layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(CONVS[-1][1], CLASSES)
    )


def keras_net():
    layers = [keras.Input((8, 8, 3))]
    for index, (_, C_out, groups, D_mul) in enumerate(CONVS):
        layers += [
            dk.DOConv2D(C_out, 3, padding="same", groups=groups, use_bias=False, D_mul=D_mul),
            keras.layers.BatchNormalization(epsilon=EPS),
            keras.layers.ReLU(),
        ]
        if index == 1:
            layers.append(keras.layers.MaxPooling2D(2))
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(CLASSES)]
    return keras.Sequential(layers)


def gluon_net():
    net = mx.gluon.nn.HybridSequential()
    with net.name_scope():
        for index, (C_in, C_out, groups, D_mul) in enumerate(CONVS):
            net.add(
                dg.DOConv2D(C_out, 3, padding=1, groups=groups, use_bias=False, in_channels=C_in, D_mul=D_mul),
                mx.gluon.nn.BatchNorm(epsilon=EPS, in_channels=C_out),
                mx.gluon.nn.Activation("relu"),
            )
            if index == 1:
                net.add(mx.gluon.nn.MaxPool2D(2))
        net.add(mx.gluon.nn.GlobalAvgPool2D(), mx.gluon.nn.Flatten(), mx.gluon.nn.Dense(CLASSES, in_units=CONVS[-1][1]))
    net.initialize()
    return net


def of_type(modules, cls):
    return [m for m in modules if isinstance(m, cls)]


def move_weights(source, target_keras, target_gluon):
    """Layer by layer: DO-Conv through get_params/set_params, batch norm and dense by hand."""
    doconvs = of_type(source.modules(), dt.DOConv2d)
    norms = of_type(source.modules(), torch.nn.BatchNorm2d)
    (linear,) = of_type(source.modules(), torch.nn.Linear)
    for layer, k, g in zip(
        doconvs,
        of_type(target_keras.layers, dk.DOConv2D),
        of_type(target_gluon._children.values(), dg.DOConv2D),
    ):
        params = dt.get_params(layer)
        dk.set_params(k, params)
        dg.set_params(g, params)
    for bn, k, g in zip(
        norms,
        of_type(target_keras.layers, keras.layers.BatchNormalization),
        of_type(target_gluon._children.values(), mx.gluon.nn.BatchNorm),
    ):
        values = [t.detach().numpy() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
        k.set_weights(values)
        for param, value in zip((g.gamma, g.beta, g.running_mean, g.running_var), values):
            param.set_data(mx.nd.array(value))
    (dense,) = of_type(target_keras.layers, keras.layers.Dense)
    dense.set_weights([linear.weight.detach().numpy().T, linear.bias.detach().numpy()])
    (gluon_dense,) = of_type(target_gluon._children.values(), mx.gluon.nn.Dense)
    gluon_dense.weight.set_data(mx.nd.array(linear.weight.detach().numpy()))
    gluon_dense.bias.set_data(mx.nd.array(linear.bias.detach().numpy()))


def assert_same(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


@pytest.mark.slow
def test_train_in_pytorch_predict_in_keras_and_gluon_unfused_and_fused():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3, 8, 8)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=16)
    net = torch_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(labels)).backward()
        optimizer.step()
    net.eval()
    assert max(float(m.D.detach().abs().max()) for m in of_type(net.modules(), dt.DOConv2d)) > 0  # D trained

    k_net, g_net = keras_net(), gluon_net()
    move_weights(net, k_net, g_net)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got_keras = keras.ops.convert_to_numpy(k_net(x.transpose(0, 2, 3, 1), training=False))
    got_gluon = g_net(mx.nd.array(x)).asnumpy()
    assert_same(got_keras, want, "keras, unfused")
    assert_same(got_gluon, want, "gluon, unfused")

    with torch.no_grad():
        fused_torch = dt.fuse_model(net)(torch.from_numpy(x)).numpy()
    fused_keras = keras.ops.convert_to_numpy(dk.fuse_model(k_net)(x.transpose(0, 2, 3, 1), training=False))
    fused_gluon = dg.fuse_model(g_net)(mx.nd.array(x)).asnumpy()
    for got, what in ((fused_torch, "torch"), (fused_keras, "keras"), (fused_gluon, "gluon")):
        assert_same(got, want, f"{what}, fused")
