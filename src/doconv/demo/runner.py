"""One demo run: for every seed, train both variants, fold DO-Conv, check the fold; then report and save."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import warnings
from typing import Callable

import numpy as np

from .._optional import install_hint
from . import data as datasets
from .output import prepare_output, publish
from .report import format_table, plot, summarise
from .settings import VARIANTS, DemoError, Settings
from .training import train_pair

# What each --framework needs, and the pip extra that installs it.
_FRAMEWORK_NEEDS = {
    "torch": ("torch", "PyTorch", "torch"),
    "keras": ("keras", "Keras", "tensorflow"),
    "gluon": ("mxnet", "MXNet", "gluon"),
}
_DISPLAY = {"torch": "PyTorch", "keras": "Keras", "gluon": "MXNet Gluon"}
_TITLES = {"digits": "8x8 digits", "mnist1d": "MNIST-1D"}


def backend_for(settings: Settings):
    """The framework's backend, or a DemoError naming the pip extra that installs it."""
    module, what, extra = _FRAMEWORK_NEEDS[settings.framework]
    try:
        importlib.import_module(module)
    except ImportError as err:
        if err.name == module:
            raise DemoError(
                f"--framework {settings.framework} needs {what}, which is not installed: {install_hint(extra)}"
            ) from err
        # Installed but broken (a missing shared library, a NumPy it was not built for): say why.
        raise DemoError(f"--framework {settings.framework}: {module} fails to import: {err}") from err
    backend = importlib.import_module(f"doconv.demo.backend_{settings.framework}")
    return getattr(backend, f"{settings.framework.capitalize()}Backend")(settings)


def run(settings: Settings, log: Callable[[str], None] = print) -> dict:
    """Train, compare, fold and save; return the results (also written as ``results.json``).

    Args:
        settings: the run's :class:`Settings` (None fields take the data set's recipe).
        log: where the report goes, line by line. Default ``print``.

    Returns:
        The results dictionary (see ``results.json``).

    Raises:
        DemoError: bad settings, a missing framework or dependency, an unwritable folder.
    """
    settings = settings.resolved()
    backend = backend_for(settings)
    data = datasets.load_data(settings.dataset, settings.samples)
    # matplotlib is checked before training, so a missing plot library fails in the first second.
    datasets.optional_import("matplotlib", "matplotlib", "the demo's plot")
    out, staging, created = prepare_output(settings.out)
    try:
        with getattr(backend, "session", contextlib.nullcontext)():
            results = _run(backend, settings, data, staging, log)
        results["out"] = out
        results["artefacts"] = publish(staging, out)
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
        # convert_model's one warning names the layers whose K exceeds --D-mul: the report repeats it.
        for w in caught:
            if issubclass(w.category, UserWarning) and "D_mul" in str(w.message) and str(w.message) not in notes:
                notes.append(str(w.message))
        # One permutation per epoch, shared by both variants: identical batches in identical order.
        rng = np.random.default_rng(seed)
        orders = [rng.permutation(n_train) for _ in range(settings.epochs)]
        models = {"plain": plain, "DO-Conv": doconv_model}
        if not params:
            params = {"plain": {"train": backend.count(plain)}, "DO-Conv": {"train": backend.count(doconv_model)}}
        curves = train_pair(backend, models, data, orders, settings, f"seed {seed}")
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
            # The deploy artefacts are seed 0's networks: a reproducible choice, not the best one.
            saved = backend.save(fused, doconv_model, staging, data["x_test"])
    results = summarise(backend, settings, data, runs, params, fold_diffs, saved, notes)
    title = f"DO-Conv vs plain convolutions on {_TITLES[settings.dataset]} ({_DISPLAY[settings.framework]})"
    plot(results, os.path.join(staging, "curves.png"), title)
    with open(os.path.join(staging, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    for line in format_table(results):
        log(line)
    return results
