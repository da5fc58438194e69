"""DO-Conv against ``keras.layers.Conv2D`` on a small ResNet-style network, tensorflow backend.

Both networks are built, compiled (XLA, Keras' default) and timed in one process,
alternating the variants in every repeat; the printed figures are medians of the
per-repeat ratios (DO-Conv time / Conv2D time). A native-vs-native control beside
them shows the noise of the machine.

Run: ``python benchmarks/bench_keras.py`` (about a minute on 2 CPU cores) or
``python -m doconv.benchmarks.bench_keras --quick`` for a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from .report import busy_note, goal

DEFAULTS = {"batch": 16, "size": 32}  # the configuration the goals below were set for
GOALS = {"train step": "<= 1.05", "predict, unfused": "<= 1.05", "predict, fused": "1.00"}


def _keras():
    """Import Keras on the tensorflow backend (or say why not)."""
    if "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from .._optional import require

    keras = require("keras", "doconv.benchmarks.bench_keras", "tensorflow", "Keras 3 with TensorFlow")
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"bench_keras needs KERAS_BACKEND=tensorflow. Received: {keras.backend.backend()!r}")
    return keras


def resnet_style(keras, input_size: int, widths=(32, 64, 128), classes: int = 10, seed: int = 0):
    """A small ResNet-style classifier built from ``keras.layers.Conv2D``.

    Args:
        keras: the keras module.
        input_size: height and width of the RGB input.
        widths: channels of the three stages (two basic blocks each; stride 2 between stages).
        classes: number of outputs.
        seed: seed of the weight initialisation.

    Returns:
        A Functional ``keras.Model``.
    """
    keras.utils.set_random_seed(seed)
    layers = keras.layers

    def conv_bn(x, filters, kernel_size, strides=1, relu=True):
        x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU()(x) if relu else x

    inputs = keras.Input((input_size, input_size, 3))
    x = conv_bn(inputs, widths[0], 3)
    for stage, filters in enumerate(widths):
        for block in range(2):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = conv_bn(x, filters, 3, strides)
            y = conv_bn(y, filters, 3, relu=False)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = conv_bn(x, filters, 1, strides, relu=False)
            x = layers.ReLU()(layers.Add()([y, shortcut]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes)(x))


def _timer(fn, steps: int):
    def run():
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        return time.perf_counter() - start

    return run


def _median_ratios(pairs: dict, repeats: int) -> dict:
    """Time every (candidate, baseline) pair alternately; median of per-repeat ratios."""
    ratios = {name: [] for name in pairs}
    for r in range(repeats):
        for name, (candidate, baseline) in pairs.items():
            if r % 2:
                t_c, t_b = candidate(), baseline()
            else:
                t_b, t_c = baseline(), candidate()
            ratios[name].append(t_c / t_b)
    return {name: statistics.median(values) for name, values in ratios.items()}


def main(argv=None) -> int:
    """Print DO-Conv / Conv2D time ratios for training and inference.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``): ``--batch``, ``--size``,
            ``--steps`` (calls per timing), ``--repeats``, ``--quick``.

    Returns:
        0.

    Example:
        ``python -m doconv.benchmarks.bench_keras --quick`` prints a table such as::

            DO-Conv vs keras Conv2D, ResNet-style net, batch 8, 16x16, ...
            train step          DO-Conv / Conv2D             1.0...    -
    """
    parser = argparse.ArgumentParser(prog="bench_keras", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--size", type=int, default=DEFAULTS["size"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.steps, args.repeats = 4, 16, 1, 3

    keras = _keras()
    from ..keras import convert_model, fuse_model

    native = resnet_style(keras, args.size)
    control = keras.models.clone_model(native)
    doconv = convert_model(native)
    fused = fuse_model(doconv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch)
    train, predict = {}, {}
    for name, model in (("native", native), ("control", control), ("doconv", doconv), ("fused", fused)):
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(True))
        for _ in range(2):  # compile and warm up
            model.predict_on_batch(x)
            if name != "fused":
                model.train_on_batch(x, y)
        train[name] = _timer(lambda m=model: m.train_on_batch(x, y), args.steps)
        predict[name] = _timer(lambda m=model: m.predict_on_batch(x), args.steps)

    results = _median_ratios(
        {
            "train step          DO-Conv / Conv2D": (train["doconv"], train["native"]),
            "train step          Conv2D / Conv2D (control)": (train["control"], train["native"]),
            "predict, unfused    DO-Conv / Conv2D": (predict["doconv"], predict["native"]),
            "predict, fused      fused / Conv2D": (predict["fused"], predict["native"]),
            "predict             Conv2D / Conv2D (control)": (predict["control"], predict["native"]),
        },
        args.repeats,
    )
    params = {name: model.count_params() for name, model in (("native", native), ("doconv", doconv), ("fused", fused))}
    print(
        f"DO-Conv vs keras Conv2D, ResNet-style net, batch {args.batch}, {args.size}x{args.size}, "
        f"{args.steps} calls x {args.repeats} repeats, keras {keras.__version__}, backend tensorflow"
    )
    print(f"parameters: Conv2D {params['native']}, DO-Conv {params['doconv']}, fused {params['fused']}")
    configured = not args.quick and all(getattr(args, key) == value for key, value in DEFAULTS.items())
    print(f"{'measure':<48} median ratio  goal")
    for name, ratio in results.items():
        target = "-" if "control" in name else GOALS[name.split("  ")[0].strip()]
        print(f"{name:<48} {ratio:<12.3f}  {goal(target, configured)}")
    note = busy_note(ratio for name, ratio in results.items() if "control" in name)
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
