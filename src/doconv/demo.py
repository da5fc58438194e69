"""The ``doconv demo``: plain convolutions against DO-Conv on scikit-learn's 8x8 digits.

For every seed, one small CNN is built with plain convolutions and copied into a
DO-Conv network with :func:`convert_model` (same folded kernels at the start); both
are trained on the same batches in the same order with the same optimiser. The
DO-Conv network is then folded into a plain one (:func:`fuse_model`), and the
report says how far the folded network's predictions are from the DO-Conv
network's, next to accuracy, parameter counts and time per epoch.

Everything here is framework-neutral except the small ``_TorchBackend``,
``_KerasBackend`` and ``_GluonBackend`` classes: each builds the network, runs
one training epoch, predicts, folds and saves the deploy artefacts with its own
framework's ops and the matching ``doconv`` adapter.

Artefacts are written into a temporary folder inside the output folder and
moved into place only when the run has finished, so an interrupted or failed
run leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Optional

import numpy as np

from . import __version__

FRAMEWORKS = ("torch", "keras", "gluon")
VARIANTS = ("plain", "DO-Conv")

# What each --framework needs, and the pip extra that installs it.
_FRAMEWORK_NEEDS = {
    "torch": ("torch", "PyTorch", "doconv[torch]"),
    "keras": ("keras", "Keras", "doconv[keras]"),
    "gluon": ("mxnet", "MXNet", "doconv[gluon]"),
}
_DISPLAY = {"torch": "PyTorch", "keras": "Keras", "gluon": "MXNet Gluon"}


class DemoError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 2."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """The demo's settings. The defaults finish in under 3 minutes on 2 CPU cores with PyTorch.

    Args:
        framework: 'torch', 'keras' or 'gluon'. Default 'torch'.
        seeds: number of seeds (0 .. seeds-1). Default 5.
        epochs: training epochs per run. Default 10.
        D_mul: depth multiplier for every DO-Conv layer, None for K. Default None.
        out: output folder. Default './doconv-demo'.
        batch_size: training batch size. Default 32.
        lr: peak learning rate of SGD (momentum 0.9), cosine-decayed to 0. Default 0.05.
        weight_decay: L2 on conv and dense kernels (and on DO-Conv's W and D), not on BN or biases.
            Default 5e-4.
        progress: show progress bars (tqdm; hidden anyway when stderr is not a terminal). Default True.
    """

    framework: str = "torch"
    seeds: int = 5
    epochs: int = 10
    D_mul: Optional[int] = None
    out: str = "doconv-demo"
    batch_size: int = 32
    lr: float = 0.05
    weight_decay: float = 5e-4
    progress: bool = True


# -- data ---------------------------------------------------------------------------------------


def load_data(test_size: float = 0.25, split_seed: int = 0) -> dict:
    """scikit-learn's 8x8 digits, split once (stratified, fixed seed) into train and test.

    Pixels (0..16) are standardised with the training set's mean and standard deviation.

    Returns:
        ``{"x_train": (N, 8, 8) float32, "y_train": (N,) int64, "x_test": ..., "y_test": ...}``.

    Example:
        >>> data = load_data()
        >>> data["x_train"].shape, data["x_test"].shape
        ((1347, 8, 8), (450, 8, 8))
    """
    datasets = _import("sklearn.datasets", "scikit-learn", "the demo's data set")
    model_selection = _import("sklearn.model_selection", "scikit-learn", "the demo's data set")
    digits = datasets.load_digits()
    x = digits.images.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=split_seed
    )
    mean, std = float(x_train.mean()), float(x_train.std())
    return {
        "x_train": (x_train - mean) / std,
        "y_train": y_train,
        "x_test": (x_test - mean) / std,
        "y_test": y_test,
    }


def _import(module: str, package: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DemoError(f"{purpose} needs {package}: pip install 'doconv[demo]' (or pip install {package})") from err


def _lr(settings: Settings, step: int, total: int, warmup: int) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine decay to 0 (Keras' CosineDecay with warm-up).

    The warm-up keeps the first steps from lr 0.05 on untrained BatchNorm statistics from overshooting.
    """
    if step < warmup:
        return settings.lr * step / warmup
    return 0.5 * settings.lr * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (normal beyond): the demo
# runs a handful of seeds, where the normal 1.96 would overstate the confidence a lot.
_T95 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def _t95(dof: int) -> float:
    return _T95[dof - 1] if dof <= len(_T95) else 1.96


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


# -- frameworks ----------------------------------------------------------------------------------
# The network, in every framework (channels first for PyTorch and Gluon, last for Keras):
#   3x3 conv 1->32, BN, ReLU
#   3x3 conv 32->64, groups=4, BN, ReLU, 2x2 max pool     (8x8 -> 4x4)
#   3x3 depthwise conv 64->64 (groups=64), BN, ReLU
#   1x1 conv 64->128, BN, ReLU, 2x2 max pool              (4x4 -> 2x2; a 1x1 DO-Conv has no D)
#   flatten, dense 512->10
# Convolutions have no bias (BN follows), as in most CNNs DO-Conv is used in.


class _TorchBackend:
    name = "torch"

    def __init__(self, settings: Settings):
        self.torch = importlib.import_module("torch")
        self.dt = importlib.import_module("doconv.torch")
        self.settings = settings

    def versions(self) -> dict:
        return {"torch": self.torch.__version__}

    def layout(self, x: np.ndarray) -> np.ndarray:
        return x[:, None, :, :]

    def build(self, seed: int):
        nn = self.torch.nn
        self.torch.manual_seed(seed)

        def block(c_in, c_out, k, groups=1):
            return [
                nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]

        return nn.Sequential(
            *block(1, 32, 3),
            *block(32, 64, 3, groups=4),
            nn.MaxPool2d(2),
            *block(64, 64, 3, groups=64),
            *block(64, 128, 1),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(128 * 2 * 2, 10),
        )

    @contextlib.contextmanager
    def session(self):
        """One intra-op thread: this network's ops are too small to gain from more, and with more
        threads than free cores every step waits on the busiest core (epochs 5-10x slower)."""
        threads = self.torch.get_num_threads()
        self.torch.set_num_threads(1)
        try:
            yield
        finally:
            self.torch.set_num_threads(threads)

    def convert(self, model, D_mul):
        return self.dt.convert_model(model, D_mul=D_mul)

    def fuse(self, model):
        return self.dt.fuse_model(model).eval()

    def count(self, model) -> int:
        return sum(p.numel() for p in model.parameters())

    def trainer(self, model, total_steps: int, warmup_steps: int) -> Callable:
        torch, s = self.torch, self.settings
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        opt = torch.optim.SGD(
            [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=s.lr,
            momentum=0.9,
        )
        step = [0]

        def epoch(x: np.ndarray, y: np.ndarray, order: np.ndarray) -> tuple[float, float]:
            model.train()
            total_loss, correct = 0.0, 0
            for start in range(0, len(order), s.batch_size):
                idx = order[start : start + s.batch_size]
                xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
                for group in opt.param_groups:
                    group["lr"] = _lr(s, step[0], total_steps, warmup_steps)
                logits = model(xb)
                loss = torch.nn.functional.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step[0] += 1
                total_loss += loss.item() * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
            return total_loss / len(order), correct / len(order)

        return epoch

    def predict(self, model, x: np.ndarray) -> np.ndarray:
        model.eval()
        with self.torch.no_grad():
            return model(self.torch.from_numpy(x)).numpy().astype(np.float64)

    def save(self, fused, folder: str, x_example: np.ndarray) -> dict:
        """state_dict of the plain network (loads into ``build()``'s model) and ONNX."""
        torch = self.torch
        torch.save(fused.state_dict(), os.path.join(folder, "model_folded.pt"))
        files = {"state_dict": "model_folded.pt"}
        report: dict = {}
        onnx_path = os.path.join(folder, "model_folded.onnx")
        try:
            example = (torch.from_numpy(x_example[:2]),)
            with warnings.catch_warnings(), _quiet_stdout(), _quiet_logger("torch.onnx"):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    fused,
                    example,
                    onnx_path,
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
            files["onnx"] = "model_folded.onnx"
        except Exception as err:  # noqa: BLE001 - ONNX export is a bonus; the run's results stand without it
            report["onnx_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if os.path.exists(onnx_path):
                os.remove(onnx_path)
        if "onnx" in files:
            try:
                ort = importlib.import_module("onnxruntime")
            except ImportError:
                report["onnx_check"] = "onnxruntime not installed"
            else:
                session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
                got = session.run(None, {"input": x_example})[0]
                report["onnx_max_abs_diff"] = float(np.abs(got - self.predict(fused, x_example)).max())
        return {"files": files, **report}


class _KerasBackend:
    name = "keras"

    def __init__(self, settings: Settings):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up log lines, before it loads
        self.keras = importlib.import_module("keras")
        self.dk = importlib.import_module("doconv.keras")
        self.settings = settings

    def versions(self) -> dict:
        return {"keras": self.keras.__version__, "keras_backend": self.keras.backend.backend()}

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

    def save(self, fused, folder: str, x_example: np.ndarray) -> dict:
        """The folded network as a .keras file: only Keras' own layers, loadable without doconv."""
        fused.save(os.path.join(folder, "model_folded.keras"))
        return {"files": {"keras": "model_folded.keras"}}


class _GluonBackend:
    name = "gluon"

    def __init__(self, settings: Settings):
        self.mx = importlib.import_module("mxnet")
        self.dg = importlib.import_module("doconv.gluon")
        self.settings = settings

    def versions(self) -> dict:
        return {"mxnet": self.mx.__version__}

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
                trainer.set_learning_rate(_lr(s, step[0], total_steps, warmup_steps))
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

    def save(self, fused, folder: str, x_example: np.ndarray) -> dict:
        """``HybridBlock.export``: symbol JSON + params, loadable with ``SymbolBlock.imports``."""
        fused.hybridize()
        fused(self.mx.nd.array(x_example[:1]))
        fused.export(os.path.join(folder, "model_folded"), epoch=0)
        return {"files": {"symbol": "model_folded-symbol.json", "params": "model_folded-0000.params"}}


_BACKENDS = {"torch": _TorchBackend, "keras": _KerasBackend, "gluon": _GluonBackend}


def _backend(settings: Settings):
    """The framework's backend, or a DemoError naming the pip extra that installs it."""
    if settings.framework not in FRAMEWORKS:
        raise DemoError(f"unknown framework {settings.framework!r}: choose one of {', '.join(FRAMEWORKS)}")
    module, what, extra = _FRAMEWORK_NEEDS[settings.framework]
    try:
        importlib.import_module(module)
    except ImportError as err:
        if err.name == module:
            raise DemoError(
                f"--framework {settings.framework} needs {what}, which is not installed: pip install '{extra}'"
            ) from err
        # Installed but broken (a missing shared library, a NumPy it was not built for): say why.
        raise DemoError(f"--framework {settings.framework}: {module} fails to import: {err}") from err
    return _BACKENDS[settings.framework](settings)


class _quiet_logger:
    """Raise a logger's level to ERROR for a block (the ONNX exporter warns about missing torchvision)."""

    def __init__(self, name: str):
        self._logger = logging.getLogger(name)

    def __enter__(self):
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


class _quiet_stdout:
    """Silence a library's prints to stdout (the ONNX exporter's progress lines) for a block."""

    def __enter__(self):
        self._saved = sys.stdout
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - closed in __exit__

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self._saved


# -- output folder ---------------------------------------------------------------------------------


def prepare_output(out: str) -> tuple[str, str, bool]:
    """Create the output folder if needed and a private temporary folder inside it.

    Checking writability here, before any training, turns an unwritable ``--out``
    into an immediate error instead of one after minutes of work.

    Returns:
        ``(out, staging_folder, created)`` where ``created`` says whether ``out`` was made here.

    Raises:
        DemoError: the folder cannot be created or written.
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise DemoError(f"output folder {out} is a file, not a folder")
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".doconv-demo-", dir=out)
    except OSError as err:
        if created and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        raise DemoError(f"cannot write to output folder {out}: {err.strerror or err}") from err
    return out, staging, created


def _publish(staging: str, out: str) -> list[str]:
    """Move every finished artefact from the staging folder into ``out`` (same file system: renames)."""
    names = sorted(os.listdir(staging))
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)
    return names


# -- the run ------------------------------------------------------------------------------------


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


def _train_pair(backend, models: dict, data: dict, orders: list, settings: Settings, desc: str) -> dict:
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
                curve["test_loss"].append(_cross_entropy(logits, data["y_test"]))
                curve["test_acc"].append(float((logits.argmax(1) == data["y_test"]).mean()))
            bar.update()
            bar.set_postfix({f"{v} test acc": f"{curves[v]['test_acc'][-1]:.4f}" for v in VARIANTS})
    finally:
        bar.close()
    return curves


def _mean_std(values: list) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def run(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Train, compare, fold and save; return the results (also written as ``results.json``).

    Args:
        settings: the run's :class:`Settings`.
        log: where the table and notes go. Default ``print``.

    Returns:
        The results dictionary (see ``results.json``).

    Raises:
        DemoError: bad settings, a missing framework or dependency, an unwritable folder.
    """
    for name in ("seeds", "epochs"):
        if not (isinstance(getattr(settings, name), int) and getattr(settings, name) > 0):
            raise DemoError(f"{name} must be a positive integer. Received: {name}={getattr(settings, name)!r}")
    if settings.D_mul is not None and not (isinstance(settings.D_mul, int) and settings.D_mul > 0):
        raise DemoError(f"D_mul must be a positive integer. Received: D_mul={settings.D_mul!r}")
    backend = _backend(settings)
    data = load_data()
    # matplotlib is checked before training, so a missing plot library fails in the first second.
    _import("matplotlib", "matplotlib", "the demo's plot")
    out, staging, created = prepare_output(settings.out)
    try:
        with getattr(backend, "session", contextlib.nullcontext)():
            results = _run(backend, settings, data, staging, log)
        results["out"] = out
        results["artefacts"] = _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not os.listdir(out):
            os.rmdir(out)
        raise
    log(f"Saved to {out}: {', '.join(results['artefacts'])}")
    return results


def _run(backend, settings: Settings, data: dict, staging: str, log: Callable[[str], None]) -> dict:
    data = {k: (backend.layout(v) if k.startswith("x") else v) for k, v in data.items()}
    n_train = len(data["y_train"])
    runs: dict = {v: [] for v in VARIANTS}
    params: dict = {}
    fold_diffs, saved = [], None
    notes: list[str] = []
    for seed in range(settings.seeds):
        plain = backend.build(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            doconv_model = backend.convert(plain, settings.D_mul)  # a copy: same initial (folded) kernels
        # convert_model's one warning names the layers whose K exceeds --D-mul: the table repeats it.
        for w in caught:
            if issubclass(w.category, UserWarning) and "D_mul" in str(w.message) and str(w.message) not in notes:
                notes.append(str(w.message))
        # One permutation per epoch, shared by both variants: identical batches in identical order.
        rng = np.random.default_rng(seed)
        orders = [rng.permutation(n_train) for _ in range(settings.epochs)]
        models = {"plain": plain, "DO-Conv": doconv_model}
        if not params:
            params = {"plain": {"train": backend.count(plain)}, "DO-Conv": {"train": backend.count(doconv_model)}}
        curves = _train_pair(backend, models, data, orders, settings, f"seed {seed}")
        for variant in VARIANTS:
            runs[variant].append({"seed": seed, **curves[variant]})
        fused = backend.fuse(doconv_model)
        predicted = backend.predict(doconv_model, data["x_test"])
        folded = backend.predict(fused, data["x_test"])
        fold_diffs.append(
            {
                "seed": seed,
                "max_abs_diff": float(np.abs(predicted - folded).max()),
                "max_abs_logit": float(np.abs(predicted).max()),
                "same_predictions": bool((predicted.argmax(1) == folded.argmax(1)).all()),
            }
        )
        params["plain"]["deploy"] = backend.count(plain)
        params["DO-Conv"]["deploy"] = backend.count(fused)
        if seed == 0:
            # The deploy artefacts are seed 0's folded network: a reproducible choice, not the best one.
            saved = backend.save(fused, staging, data["x_test"])
    results = _summarise(backend, settings, data, runs, params, fold_diffs, saved, notes)
    _plot(runs, settings, os.path.join(staging, "curves.png"))
    with open(os.path.join(staging, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    for line in format_table(results):
        log(line)
    return results


def _summarise(backend, settings, data, runs, params, fold_diffs, saved, notes) -> dict:
    summary = {}
    for variant in VARIANTS:
        accs = [r["test_acc"][-1] for r in runs[variant]]
        # The first epoch pays one-off costs (allocation, graph tracing); the median ignores it.
        epoch_s = statistics.median(t for r in runs[variant] for t in r["epoch_seconds"])
        mean, std = _mean_std(accs)
        summary[variant] = {
            "test_acc_mean": mean,
            "test_acc_std": std,
            "test_acc_per_seed": accs,
            "params_train": params[variant]["train"],
            "params_deploy": params[variant]["deploy"],
            "seconds_per_epoch_median": epoch_s,
        }
    diffs = [d - p for d, p in zip(summary["DO-Conv"]["test_acc_per_seed"], summary["plain"]["test_acc_per_seed"])]
    diff_mean, diff_std = _mean_std(diffs)
    half = _t95(len(diffs) - 1) * diff_std / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    ci = None if half is None else [diff_mean - half, diff_mean + half]
    return {
        "doconv_version": __version__,
        "framework": settings.framework,
        "versions": {"python": platform.python_version(), "numpy": np.__version__, **backend.versions()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "settings": dataclasses.asdict(settings),
        "data": {
            "name": "scikit-learn digits (8x8, 10 classes)",
            "train": int(len(data["y_train"])),
            "test": int(len(data["y_test"])),
            "split": "stratified, random_state=0",
        },
        "summary": summary,
        "difference": {
            "per_seed": diffs,
            "mean": diff_mean,
            "std": diff_std,
            # 95% confidence interval of the mean paired difference (Student's t): when it holds 0,
            # the seeds give no evidence that either variant is better.
            "ci95": ci,
            "within_noise": None if ci is None else ci[0] <= 0.0 <= ci[1],
        },
        "fold_check": {
            "per_seed": fold_diffs,
            "max_abs_diff": max(d["max_abs_diff"] for d in fold_diffs),
            "max_abs_logit": max(d["max_abs_logit"] for d in fold_diffs),
            "same_predictions": all(d["same_predictions"] for d in fold_diffs),
        },
        "deploy": saved,
        "notes": notes,
        "runs": runs,
    }


def format_table(results: dict) -> list[str]:
    """The report printed at the end of a run, as lines of text.

    Args:
        results: the dictionary :func:`run` returns (or ``results.json``, loaded).
    """
    s, summary = results["settings"], results["summary"]
    seeds = s["seeds"]
    fw = results["framework"]
    version = results["versions"].get({"torch": "torch", "keras": "keras", "gluon": "mxnet"}[fw], "")
    if "keras_backend" in results["versions"]:
        version += f" ({results['versions']['keras_backend']} backend)"
    lines = [
        "",
        f"DO-Conv demo: {results['data']['name']}, {results['data']['train']} train / "
        f"{results['data']['test']} test images; {_DISPLAY[fw]} {version} on CPU",
        f"{seeds} seed(s) x {s['epochs']} epochs; SGD momentum 0.9, lr {s['lr']} (1 warm-up epoch, cosine), "
        f"batch {s['batch_size']}, weight decay {s['weight_decay']}; D_mul {s['D_mul'] or 'K (default)'}",
        "",
    ]
    seed_cols = [f"seed {i}" for i in range(seeds)] if seeds <= 5 else []
    header = ["variant", "test acc (mean ± std)", *seed_cols, "params (train)", "params (deploy)", "s/epoch"]
    rows = []
    for variant in VARIANTS:
        v = summary[variant]
        rows.append(
            [
                variant,
                f"{100 * v['test_acc_mean']:.2f} ± {100 * v['test_acc_std']:.2f} %",
                *([f"{100 * a:.2f}" for a in v["test_acc_per_seed"]] if seed_cols else []),
                f"{v['params_train']:,}",
                f"{v['params_deploy']:,}",
                f"{v['seconds_per_epoch_median']:.3f}",
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        lines.append(
            "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        )
    d = results["difference"]
    if d["within_noise"] is None:
        verdict = "one seed: run more (--seeds) to see the seed-to-seed spread"
    else:
        lo, hi = (100 * v for v in d["ci95"])
        verdict = f"95% interval [{lo:+.2f}, {hi:+.2f}]: " + (
            "within seed-to-seed noise, no evidence either way"
            if d["within_noise"]
            else ("DO-Conv" if d["mean"] > 0 else "plain") + " better beyond seed-to-seed noise"
        )
    lines += [
        "",
        f"DO-Conv - plain test accuracy: {100 * d['mean']:+.2f} ± {100 * d['std']:.2f} points, paired by seed "
        f"({verdict})",
        f"Time per epoch (median), DO-Conv / plain: "
        f"{summary['DO-Conv']['seconds_per_epoch_median'] / summary['plain']['seconds_per_epoch_median']:.2f}x",
    ]
    f = results["fold_check"]
    lines.append(
        f"Folded network vs DO-Conv network on the test set: max |logit difference| {f['max_abs_diff']:.2e} "
        f"(largest |logit| {f['max_abs_logit']:.1f}); same predicted classes: "
        + ("yes" if f["same_predictions"] else "NO")
    )
    deploy = results.get("deploy") or {}
    if "onnx_max_abs_diff" in deploy:
        lines.append(f"ONNX (onnxruntime) vs folded network: max |logit difference| {deploy['onnx_max_abs_diff']:.2e}")
    if "onnx_error" in deploy:
        lines.append(f"ONNX export failed, skipped: {deploy['onnx_error']}")
    for note in results.get("notes", []):
        lines.append(f"Note: {note}")
    return lines


def _plot(runs: dict, settings: Settings, path: str) -> None:
    """Loss and accuracy per epoch, both variants: mean over seeds, shaded min..max."""
    matplotlib = _import("matplotlib", "matplotlib", "the demo's plot")
    matplotlib.use("Agg")  # no display needed; safe to call before pyplot is imported
    import matplotlib.pyplot as plt

    epochs = np.arange(1, settings.epochs + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    colours = {"plain": "tab:blue", "DO-Conv": "tab:orange"}
    panels = [
        ("loss", ("train_loss", "test_loss"), "cross-entropy"),
        ("accuracy", ("train_acc", "test_acc"), "accuracy"),
    ]
    for ax, (title, keys, ylabel) in zip(axes, panels):
        for variant in VARIANTS:
            for key, style in zip(keys, ("--", "-")):
                curves = np.array([r[key] for r in runs[variant]])
                label = f"{variant}, {key.split('_')[0]}"
                ax.plot(epochs, curves.mean(0), style, color=colours[variant], label=label)
                if len(curves) > 1:
                    ax.fill_between(epochs, curves.min(0), curves.max(0), color=colours[variant], alpha=0.15)
        if title == "loss":
            ax.set_yscale("log")  # late epochs differ by small amounts that a linear axis flattens
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} (mean over {settings.seeds} seed(s), band: min..max)")
        ax.grid(alpha=0.3)
        ax.legend()
    if settings.epochs >= 4:
        # Zoom on where the variants differ; the first two epochs climb from chance and are clipped.
        late = [v for variant in VARIANTS for r in runs[variant] for v in r["test_acc"][2:] + r["train_acc"][2:]]
        axes[1].set_ylim(max(0.0, min(late) - 0.01), 1.0 + 0.002)
    fig.suptitle(f"DO-Conv vs plain convolutions on digits ({_DISPLAY[settings.framework]})")
    fig.savefig(path, dpi=110)
    plt.close(fig)
