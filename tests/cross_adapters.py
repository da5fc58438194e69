"""One small interface over the three adapters, for the cross-backend suite.

Each adapter builds a layer for a case of tests/cross_cases.py, takes canonical parameters
through its own ``set_params``, and answers in the canonical layout: the fused kernel
(C_out, C_in/g, kH, kW) and the output (N, C_out, H, W). Frameworks are imported lazily,
so this module loads in every environment.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from doconv import core


class _Adapter:
    """What every adapter shares: parameters go in and out through the doconv adapter module."""

    adapter = None  # the doconv.<framework> module, set by each subclass

    def set_params(self, layer, params):
        return self.adapter.set_params(layer, params)

    def get_params(self, layer):
        return self.adapter.get_params(layer)


class TorchAdapter(_Adapter):
    name = "torch"
    layouts = ("contiguous", "channels_last")  # PyTorch's two memory formats of NCHW

    def __init__(self):
        import torch

        import doconv.torch as adapter

        self.torch, self.adapter = torch, adapter
        self.version = torch.__version__

    def build(self, case, layout):
        return self.adapter.DOConv2d(
            case["in_channels"],
            case["out_channels"],
            case["kernel_size"],
            case["stride"],
            case["padding"],
            case["dilation"],
            case["groups"],
            case["bias"],
            D_mul=case["D_mul"],
        ).eval()

    def fused_kernel(self, layer, layout):
        return layer.fuse().weight.detach().numpy()

    def forward(self, layer, x, layout):
        x = self.torch.from_numpy(x)
        if layout == "channels_last":
            x = x.to(memory_format=self.torch.channels_last)
            layer = layer.to(memory_format=self.torch.channels_last)
        with self.torch.no_grad():
            return layer(x).numpy()


class KerasAdapter(_Adapter):
    name = "keras"
    layouts = ("channels_last", "channels_first")

    def __init__(self):
        import keras

        import doconv.keras as adapter

        self.keras, self.adapter = keras, adapter
        self.version = f"keras {keras.__version__} ({keras.backend.backend()})"
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            # TensorFlow's CPU convolution has no NCHW kernel: keras.layers.Conv2D itself fails there.
            if not tf.config.list_physical_devices("GPU"):
                self.layouts = ("channels_last",)

    def build(self, case, layout):
        C = case["in_channels"]
        common = dict(
            strides=case["stride"],
            padding="valid" if case["padding"] == 0 else case["padding"],
            data_format=layout,
            dilation_rate=case["dilation"],
            use_bias=case["bias"],
            D_mul=case["D_mul"],
        )
        if case.get("depthwise_layer"):
            layer = self.adapter.DODepthwiseConv2D(
                case["kernel_size"], depth_multiplier=case["out_channels"] // C, **common
            )
        else:
            layer = self.adapter.DOConv2D(case["out_channels"], case["kernel_size"], groups=case["groups"], **common)
        layer.build((None, None, None, C) if layout == "channels_last" else (None, C, None, None))
        return layer

    def fused_kernel(self, layer, layout):
        kernel = self.keras.ops.convert_to_numpy(layer.fuse().kernel)
        if isinstance(layer, self.adapter.DODepthwiseConv2D):
            # DepthwiseConv2D's (kH, kW, C_in, multiplier) is the grouped (kH, kW, 1, C_out), o = c * multiplier + m.
            kernel = kernel.reshape(kernel.shape[:2] + (1, -1))
        return core.kernel_from_keras(kernel)

    def forward(self, layer, x, layout):
        if layout == "channels_last":
            x = x.transpose(0, 2, 3, 1)
        y = self.keras.ops.convert_to_numpy(layer(x))
        return y.transpose(0, 3, 1, 2) if layout == "channels_last" else y


class GluonAdapter(_Adapter):
    name = "gluon"
    layouts = ("NCHW", "NHWC")

    def __init__(self):
        import mxnet

        import doconv.gluon as adapter

        self.mx, self.adapter = mxnet, adapter
        self.version = f"mxnet {mxnet.__version__}"

    def build(self, case, layout):
        layer = self.adapter.DOConv2D(
            case["out_channels"],
            case["kernel_size"],
            strides=case["stride"],
            padding=case["padding"],
            dilation=case["dilation"],
            groups=case["groups"],
            layout=layout,
            use_bias=case["bias"],
            in_channels=case["in_channels"],
            D_mul=case["D_mul"],
        )
        layer.initialize()
        return layer

    def fused_kernel(self, layer, layout):
        return core.kernel_from_gluon(layer.fuse().weight.data().asnumpy(), core.gluon_layout(layout, 2))

    def forward(self, layer, x, layout):
        if layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        y = layer(self.mx.nd.array(x)).asnumpy()
        return y.transpose(0, 3, 1, 2) if layout == "NHWC" else y


_ALL = {"torch": (TorchAdapter, "torch"), "keras": (KerasAdapter, "keras"), "gluon": (GluonAdapter, "mxnet")}


def available() -> list:
    """Adapters whose framework is installed here (mxnet first: it must precede TensorFlow)."""
    found = []
    for name in ("gluon", "torch", "keras"):
        cls, module = _ALL[name]
        if importlib.util.find_spec(module) is not None:
            found.append(cls())
    return found


def as_array(value):
    return None if value is None else np.asarray(value)
