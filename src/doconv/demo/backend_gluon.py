"""The demo's MXNet Gluon side (digits only: doconv.gluon has no 1-D layer): network, training, artefacts.

The network is the PyTorch one (see backend_torch), channels first, hybridized for training.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import numpy as np

from .settings import Settings
from .training import learning_rate


class GluonBackend:
    name = "gluon"

    def __init__(self, settings: Settings):
        self.mx = importlib.import_module("mxnet")
        self.dg = importlib.import_module("doconv.gluon")
        self.settings = settings

    def versions(self) -> dict:
        return {"mxnet": self.mx.__version__}

    def describe(self) -> str:
        return f"MXNet Gluon {self.mx.__version__} on CPU"

    def layout(self, x: np.ndarray) -> np.ndarray:
        return x[:, None, :, :]

    def build(self, seed: int):
        mx = self.mx
        nn = mx.gluon.nn
        mx.random.seed(seed)
        np.random.seed(seed)  # some initialisers draw from NumPy's global generator
        net = nn.HybridSequential()

        def block(c_in, c_out, k, groups=1):
            net.add(
                nn.Conv2D(c_out, k, padding=k // 2, groups=groups, use_bias=False, in_channels=c_in),
                nn.BatchNorm(in_channels=c_out, momentum=0.9),
                nn.Activation("relu"),
            )

        block(1, 32, 3)
        block(32, 64, 3, groups=4)
        net.add(nn.MaxPool2D(2))
        block(64, 64, 3, groups=64)
        block(64, 128, 1)
        net.add(nn.MaxPool2D(2), nn.Flatten(), nn.Dense(10, in_units=128 * 2 * 2))
        net.initialize(mx.init.Xavier())
        return net

    def convert(self, model, D_mul):
        return self.dg.convert_model(model, D_mul=D_mul)

    def fuse(self, model):
        return self.dg.fuse_model(model)

    def count(self, model) -> int:
        return int(sum(int(np.prod(p.shape)) for p in model.collect_params().values() if p.grad_req != "null"))

    def trainer(self, model, total_steps: int, warmup_steps: int) -> Callable:
        mx, s = self.mx, self.settings
        for name, param in model.collect_params().items():
            if name.endswith(("gamma", "beta", "bias")):
                param.wd_mult = 0.0
        model.hybridize()
        trainer = mx.gluon.Trainer(
            model.collect_params(), "sgd", {"learning_rate": s.lr, "momentum": 0.9, "wd": s.weight_decay}
        )
        loss_fn = mx.gluon.loss.SoftmaxCrossEntropyLoss()
        step = [0]

        def epoch(x: np.ndarray, y: np.ndarray, order: np.ndarray) -> tuple[float, float]:
            total_loss, correct = 0.0, 0
            for start in range(0, len(order), s.batch_size):
                idx = order[start : start + s.batch_size]
                xb, yb = mx.nd.array(x[idx]), mx.nd.array(y[idx])
                trainer.set_learning_rate(learning_rate(s.lr, step[0], total_steps, warmup_steps))
                with mx.autograd.record():
                    logits = model(xb)
                    loss = loss_fn(logits, yb)
                loss.backward()
                trainer.step(len(idx))
                step[0] += 1
                total_loss += float(loss.sum().asscalar())
                correct += int((logits.argmax(axis=1).astype("int64").asnumpy() == y[idx]).sum())
            return total_loss / len(order), correct / len(order)

        return epoch

    def predict(self, model, x: np.ndarray) -> np.ndarray:
        return model(self.mx.nd.array(x)).asnumpy().astype(np.float64)

    def save(self, fused, doconv_model, folder: str, x_example: np.ndarray) -> dict:
        """``HybridBlock.export``: symbol JSON + params, loadable with ``SymbolBlock.imports``."""
        fused.hybridize()
        fused(self.mx.nd.array(x_example[:1]))
        fused.export(os.path.join(folder, "model_folded"), epoch=0)
        return {"files": {"symbol": "model_folded-symbol.json", "params": "model_folded-0000.params"}}
