"""Gluon: a fused DO-Conv network quantizes to int8 with mxnet.contrib.quantization on CPU (oneDNN, MXNet 1.9.1)
and agrees with its float network as the plain network's int8 model does."""

import json
import os

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")
datasets = pytest.importorskip("sklearn.datasets", reason="the digits data come from scikit-learn")

from mxnet import autograd, gluon  # noqa: E402
from mxnet.runtime import Features  # noqa: E402

from doconv.gluon import DOConv2D, convert_model, fuse_model  # noqa: E402

if not Features().is_enabled("MKLDNN"):
    pytest.skip("MXNet's int8 CPU quantization needs a build with oneDNN (MKLDNN)", allow_module_level=True)

from mxnet.contrib.quantization import quantize_net  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    data = datasets.load_digits()
    x = (data.images[:, None] / 16.0).astype("float32")  # NCHW, in [0, 1]
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], data.target[order].astype("float32")
    return x[:1300], y[:1300], x[1300:], y[1300:]


def small_cnn():
    net = gluon.nn.HybridSequential()
    net.add(
        gluon.nn.Conv2D(8, 3, padding=1, use_bias=False, in_channels=1),
        gluon.nn.BatchNorm(momentum=0.9, in_channels=8),
        gluon.nn.Activation("relu"),
        gluon.nn.Conv2D(16, 3, strides=2, padding=1, in_channels=8),
        gluon.nn.Activation("relu"),
        gluon.nn.GlobalAvgPool2D(),
        gluon.nn.Flatten(),
        gluon.nn.Dense(10, in_units=16),
    )
    return net


def trained(net, x, y):
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.01})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    rng = np.random.default_rng(1)  # the same batches for both networks
    for _ in range(6):
        order = rng.permutation(len(x))
        for start in range(0, len(x) - 63, 64):
            index = order[start : start + 64]
            with autograd.record():
                loss = loss_fn(net(mx.nd.array(x[index])), mx.nd.array(y[index]))
            loss.backward()
            trainer.step(64)
    return net


def int8_net(net, calibration):
    net.hybridize()
    batches = [[mx.nd.array(calibration[i : i + 64])] for i in range(0, len(calibration), 64)]
    return quantize_net(
        net,
        quantized_dtype="auto",
        calib_mode="naive",
        calib_data=batches,
        num_calib_examples=len(calibration),
        ctx=mx.cpu(),
    )


def graph_ops(block, tmp_path):
    tmp_path.mkdir()
    prefix = os.path.join(str(tmp_path), "int8")
    block.export(prefix)
    with open(prefix + "-symbol.json") as f:
        return [node for node in json.load(f)["nodes"] if node["op"] != "null"]


def test_fused_doconv_network_quantizes_to_int8_like_the_plain_network(digits, tmp_path):
    x_train, y_train, x_test, y_test = digits
    mx.random.seed(0)
    plain = small_cnn()
    plain.initialize(mx.init.Xavier())
    doconv = convert_model(plain)  # the same function at the start
    assert sum(isinstance(doconv[i], DOConv2D) for i in range(len(doconv))) == 2
    trained(plain, x_train, y_train)
    trained(doconv, x_train, y_train)
    fused = fuse_model(doconv)
    x = mx.nd.array(x_test)
    np.testing.assert_allclose(fused(x).asnumpy(), doconv(x).asnumpy(), rtol=1e-4, atol=1e-4)
    agreements = {}
    for name, net in (("plain", plain), ("doconv", fused)):
        net.hybridize()
        float_top1 = net(x).asnumpy().argmax(1)
        assert (float_top1 == y_test).mean() >= 0.7, name  # trained enough for agreement to mean something
        int8 = int8_net(net, x_train[:256])
        int8_top1 = int8(x).asnumpy().argmax(1)
        ops = graph_ops(int8, tmp_path / name)
        convs = [node for node in ops if "conv" in node["op"].lower()]
        assert len(convs) == 2, [node["op"] for node in ops]
        assert all(node.get("attrs", {}).get("quantized") == "true" for node in convs), convs
        agreements[name] = 100.0 * (int8_top1 == float_top1).mean()
    assert agreements["doconv"] >= agreements["plain"] - 2.0, agreements
