"""Training both variants side by side: the learning-rate schedule and the epoch loop."""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from .settings import VARIANTS, Settings


def learning_rate(peak: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine decay to 0 (Keras' CosineDecay with warm-up).

    The warm-up keeps the first steps at the peak rate on untrained BatchNorm statistics from overshooting.

    Example:
        >>> [round(learning_rate(0.1, s, 10, 2), 4) for s in (0, 1, 2, 6, 10)]
        [0.0, 0.05, 0.1, 0.05, 0.0]
    """
    if step < warmup:
        return peak * step / warmup
    return 0.5 * peak * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def _progress(settings: Settings, total: int, desc: str):
    """A tqdm bar over epochs, or a do-nothing stand-in without tqdm or with --no-progress."""
    if settings.progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            # disable=None: hidden when stderr is not a terminal (CI logs, pipes).
            return tqdm(total=total, desc=desc, unit="epoch", disable=None, leave=False, file=sys.stderr)

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix(self, *args, **kw):
            pass

        def close(self):
            pass

    return _Null()


def train_pair(backend, models: dict, data: dict, orders: list, settings: Settings, desc: str) -> dict:
    """Train both variants epoch by epoch, alternating which goes first.

    Interleaving puts the two variants' epochs side by side in time, so a change in the
    machine's load (other jobs, thermal throttling) affects both alike instead of only the
    one that happened to run later. The models are independent, so the results are the
    same as training one after the other.
    """
    steps_per_epoch = math.ceil(len(data["y_train"]) / settings.batch_size)
    # One epoch of warm-up when there is more than one epoch.
    warmup_steps = steps_per_epoch if settings.epochs > 1 else 0
    epoch_fns = {v: backend.trainer(models[v], steps_per_epoch * settings.epochs, warmup_steps) for v in VARIANTS}
    curves = {
        v: {"train_loss": [], "train_acc": [], "test_loss": [], "test_acc": [], "epoch_seconds": []} for v in VARIANTS
    }
    bar = _progress(settings, settings.epochs, desc)
    try:
        for epoch, order in enumerate(orders):
            for variant in VARIANTS if epoch % 2 == 0 else VARIANTS[::-1]:
                curve = curves[variant]
                start = time.perf_counter()
                loss, acc = epoch_fns[variant](data["x_train"], data["y_train"], order)
                curve["epoch_seconds"].append(time.perf_counter() - start)
                logits = backend.predict(models[variant], data["x_test"])
                curve["train_loss"].append(loss)
                curve["train_acc"].append(acc)
                curve["test_loss"].append(cross_entropy(logits, data["y_test"]))
                curve["test_acc"].append(float((logits.argmax(1) == data["y_test"]).mean()))
            bar.update()
            bar.set_postfix({f"{v} test acc": f"{100 * curves[v]['test_acc'][-1]:.2f} %" for v in VARIANTS})
    finally:
        bar.close()
    return curves
