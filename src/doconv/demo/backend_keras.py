"""The demo's Keras 3 side (digits only: doconv.keras has no 1-D layer): network, training, artefacts.

The network is the PyTorch one (see backend_torch), channels last; BatchNorm momentum 0.9, PyTorch's
and Gluon's running-average rate.
"""

from __future__ import annotations

import importlib
import os
from typing import Callable

import numpy as np

from .settings import Settings


class KerasBackend:
    name = "keras"

    def __init__(self, settings: Settings):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up log lines, before it loads
        self.keras = importlib.import_module("keras")
        self.dk = importlib.import_module("doconv.keras")
        self.settings = settings

    def versions(self) -> dict:
        return {"keras": self.keras.__version__, "keras_backend": self.keras.backend.backend()}

    def describe(self) -> str:
        return f"Keras {self.keras.__version__} ({self.keras.backend.backend()} backend) on CPU"

    def layout(self, x: np.ndarray) -> np.ndarray:
        return x[:, :, :, None]

    def build(self, seed: int):
        keras = self.keras
        keras.utils.set_random_seed(seed)
        L = keras.layers

        def block(filters, k, groups=1):
            return [
                L.Conv2D(filters, k, padding="same", groups=groups, use_bias=False),
                L.BatchNormalization(momentum=0.9),  # PyTorch's and Gluon's running-average rate
                L.ReLU(),
            ]

        return keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                *block(32, 3),
                *block(64, 3, groups=4),
                L.MaxPooling2D(2),
                *block(64, 3, groups=64),
                *block(128, 1),
                L.MaxPooling2D(2),
                L.Flatten(),
                L.Dense(10),
            ]
        )

    def convert(self, model, D_mul):
        return self.dk.convert_model(model, D_mul=D_mul)

    def fuse(self, model):
        return self.dk.fuse_model(model)

    def count(self, model) -> int:
        return int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))

    def trainer(self, model, total_steps: int, warmup_steps: int) -> Callable:
        keras, s = self.keras, self.settings
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=max(1, total_steps - warmup_steps), warmup_target=s.lr, warmup_steps=warmup_steps
        )
        opt = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9, weight_decay=s.weight_decay)
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        model.compile(
            optimizer=opt,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )

        def epoch(x: np.ndarray, y: np.ndarray, order: np.ndarray) -> tuple[float, float]:
            # shuffle=False: the shared permutation `order` is the data order.
            hist = model.fit(x[order], y[order], batch_size=s.batch_size, epochs=1, shuffle=False, verbose=0)
            return float(hist.history["loss"][-1]), float(hist.history["accuracy"][-1])

        return epoch

    def predict(self, model, x: np.ndarray) -> np.ndarray:
        # A direct call, not model.predict: predict traces a new function for every model it meets.
        return np.asarray(self.keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)

    def save(self, fused, doconv_model, folder: str, x_example: np.ndarray) -> dict:
        """The folded network as a .keras file: only Keras' own layers, loadable without doconv."""
        fused.save(os.path.join(folder, "model_folded.keras"))
        return {"files": {"keras": "model_folded.keras"}}
