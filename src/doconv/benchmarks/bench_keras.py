"""DO-Conv against the native Keras convolutions, tensorflow backend: a small ResNet-style network or a zoo network.

``--model small`` (the default) is a small ResNet-style network of ``Conv2D`` layers, 32x32;
``--model resnet50|inceptionv3|mobilenetv2`` is the ``keras.applications`` network (weights=None,
10 classes) converted by ``doconv.keras.convert_model`` (every Conv2D, DepthwiseConv2D and
SeparableConv2D). Every variant is built and timed in one process, alternating in every repeat;
the figures are medians of the per-repeat ratios (DO-Conv time / native time), beside a
native-vs-native control that shows the noise of the machine. Each table is given twice: Keras'
default compile (on a CPU-only machine: no XLA) and ``jit_compile=True`` (XLA).

Below each table, where the time goes: the fold alone (every DO-Conv layer's kernel and its
gradient, nothing else) per training step, as a share of the native step, and how many DO-Conv
layers compose features instead of folding at this batch and size (``doconv.keras.composition``);
above them, the fold's TensorFlow graph op count (``doconv.keras.fold``).

Run: ``python benchmarks/bench_keras.py [--model resnet50]`` or
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

SMALL = "small"
# (batch, size) each goal was set for, and the goals (issue 16 for the zoo networks).
SHAPES = {SMALL: (16, 32), "resnet50": (16, 64), "inceptionv3": (8, 96), "mobilenetv2": (16, 64)}
GOALS = {
    SMALL: {"train step": "<= 1.05", "predict, unfused": "<= 1.05", "predict, fused": "1.00"},
    "resnet50": {"train step": "<= 1.10", "predict, fused": "1.00"},
    "inceptionv3": {"train step": "<= 1.15", "predict, fused": "1.00"},
    "mobilenetv2": {"train step": "<= 1.10", "predict, fused": "1.00"},
}
APPLICATIONS = {"resnet50": "ResNet50", "inceptionv3": "InceptionV3", "mobilenetv2": "MobileNetV2"}


def _keras():
    """Import Keras on the tensorflow backend (or say why not)."""
    if "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from .._optional import require

    keras = require("keras", "doconv.benchmarks.bench_keras", "tensorflow", "Keras 3 with TensorFlow")
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"bench_keras needs KERAS_BACKEND=tensorflow. Received: {keras.backend.backend()!r}")
    return keras


def zoo_network(keras, model: str, input_size: int, classes: int = 10, seed: int = 0):
    """The ``keras.applications`` network ``model`` (a key of :data:`APPLICATIONS`), untrained, logits out."""
    keras.utils.set_random_seed(seed)
    build = getattr(keras.applications, APPLICATIONS[model])
    return build(weights=None, input_shape=(input_size, input_size, 3), classes=classes, classifier_activation=None)


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


def _do_layers(model):
    from ..keras.layers import DO_LAYERS

    return [layer for layer in model._flatten_layers() if isinstance(layer, DO_LAYERS)]


def _composes(keras, layer, batch: int) -> bool:
    """Whether a DO-Conv layer of a built Functional model composes features in a training step of ``batch``."""
    from ..keras import DOConv2D

    if not isinstance(layer, DOConv2D):
        return False  # the depthwise layers always fold
    return layer._composes_features(keras.KerasTensor((batch,) + tuple(layer.input.shape[1:])), True)


def _fold_step(keras, model, batch: int, jit: bool):
    """The fold's part of a training step: each folding layer's kernel and its gradient w.r.t. W and D.

    Returns:
        (the step as a tf.function, the number of folding layers, the number composing features).
    """
    import tensorflow as tf

    from ..keras import DOConv2D

    with_D = [layer for layer in _do_layers(model) if layer.D is not None]
    folding = [layer for layer in with_D if not _composes(keras, layer, batch)]
    weights = [v.value for layer in folding for v in (layer.W, layer.D)]

    def kernel(layer):
        return layer._fold() if isinstance(layer, DOConv2D) else layer._fold_depthwise()

    @tf.function(jit_compile=jit)
    def fold():
        with tf.GradientTape() as tape:
            # A sum of the kernels: the gradient reaching each kernel is ones, as cheap as any.
            total = tf.add_n([tf.reduce_sum(kernel(layer)) for layer in folding])
        return tape.gradient(total, weights)

    return fold, len(folding), len(with_D) - len(folding)


WITHOUT_FOLD = "train step          DO-Conv, no fold / Conv2D"


def _without_fold(keras, model):
    """``model`` with each folding DOConv2D convolving with W's first identity tile instead of the fold.

    Not DO-Conv's maths, a measurement: what the layers cost besides their fold (two weights, D + I,
    the optimizer's update of D, feature composition where a layer composes). D stays in the graph,
    added at zero weight, so its gradient and update still run. The depthwise layers keep folding.
    """
    from ..keras import DOConv2D

    ops = keras.ops

    def first_tile(layer):
        W = ops.convert_to_tensor(layer.W)
        kernel = ops.reshape(W[: layer.K], layer.kernel_size + (layer.in_channels // layer.groups, layer.filters))
        return kernel + 0.0 * ops.sum(ops.convert_to_tensor(layer.D))

    for layer in _do_layers(model):
        if isinstance(layer, DOConv2D) and layer.D is not None:
            layer._fold = lambda layer=layer: first_tile(layer)
    return model


FOLD_COLD = "fold alone, caches flushed before it"
CACHE_FLUSH_FLOATS = 1 << 24  # 64 MiB, twice the largest last-level cache of the machines we measure on


def _cache_flush():
    """A tf.function that reads and rewrites 64 MiB, pushing other tensors out of the CPU caches."""
    import tensorflow as tf

    big = tf.Variable(tf.ones([CACHE_FLUSH_FLOATS]))

    @tf.function
    def flush():
        big.assign(big * 1.0)

    flush()
    return flush


def _graph_ops(fn) -> str:
    """What a tf.function's graph holds: its op count and the ops that move or multiply W-sized tensors.

    Counted in the TensorFlow graph, before XLA (which fuses and relayouts on its own); an ``Einsum``
    op transposes inside its kernel, so the count names it rather than hiding it among the rest.
    """
    types = [op.type for op in fn.get_concrete_function().graph.get_operations()]
    named = ", ".join(f"{types.count(t)} {t}" for t in ("Transpose", "BatchMatMulV2", "Einsum") if t in types)
    return f"{len(types)} graph ops ({named})" if named else f"{len(types)} graph ops"


def main(argv=None) -> int:
    """Print DO-Conv / native time ratios for training and inference, default compile and XLA.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``): ``--model``, ``--batch``, ``--size``,
            ``--steps`` (calls per timing), ``--repeats``, ``--quick``, ``--no-features``,
            ``--without-fold``.

    Returns:
        0.

    Example:
        ``python -m doconv.benchmarks.bench_keras --quick`` prints tables such as::

            DO-Conv vs keras Conv2D, ResNet-style net (small), batch 4, 16x16, ...
            compile: default (no XLA on this CPU)
            train step          DO-Conv / Conv2D             1.0...    -
    """
    parser = argparse.ArgumentParser(prog="bench_keras", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default=SMALL)
    parser.add_argument("--batch", type=int, default=None, help="default: the goals' batch for --model")
    parser.add_argument("--size", type=int, default=None, help="default: the goals' image size for --model")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (small sizes, no goals)")
    parser.add_argument(
        "--no-features", action="store_true", help="fold in every layer (doconv.keras.use_feature_composition(False))"
    )
    parser.add_argument("--modes", default="default,xla", help="comma-separated: default, xla")
    parser.add_argument(
        "--without-fold",
        action="store_true",
        help="also train the DO-Conv network with its DOConv2D folds replaced by W's first identity tile: "
        "what the layers cost besides the fold",
    )
    args = parser.parse_args(argv)
    batch, size = SHAPES[args.model]
    args.batch = batch if args.batch is None else args.batch
    args.size = size if args.size is None else args.size
    if args.quick:
        args.batch, args.steps, args.repeats = 4, 1, 3
        args.size = 16 if args.model == SMALL else 75  # 75: InceptionV3's smallest input
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"default", "xla"})
    if unknown or not modes:
        parser.error(f"--modes takes 'default' and/or 'xla'. Received: --modes={args.modes!r}")

    keras = _keras()
    from ..keras import convert_model, fuse_model, use_feature_composition

    use_feature_composition(not args.no_features)
    if args.model == SMALL:
        native, title = resnet_style(keras, args.size), "ResNet-style net (small)"
    else:
        native, title = zoo_network(keras, args.model, args.size), f"keras.applications.{APPLICATIONS[args.model]}"
    control = keras.models.clone_model(native)
    doconv = convert_model(native)
    fused = fuse_model(doconv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch)
    params = {name: model.count_params() for name, model in (("native", native), ("doconv", doconv), ("fused", fused))}
    fold, folding, composing = _fold_step(keras, doconv, args.batch, False)
    print(
        f"DO-Conv vs keras native convolutions, {title}, batch {args.batch}, {args.size}x{args.size}, "
        f"{args.steps} calls x {args.repeats} repeats, keras {keras.__version__}, backend tensorflow"
    )
    print(f"parameters: native {params['native']}, DO-Conv {params['doconv']}, fused {params['fused']}")
    print(
        f"feature composition: {'off' if args.no_features else 'on'}; in a training step at this batch and size "
        f"{composing} DO-Conv layers compose features, {folding} fold (every depthwise layer folds)"
    )
    print(f"the fold of those {folding} layers and its gradient: {_graph_ops(fold)}")
    configured = not args.quick and (args.batch, args.size) == SHAPES[args.model]
    models = (native, control, doconv) + ((_without_fold(keras, convert_model(native)),) if args.without_fold else ())
    controls = []
    for mode in modes:
        controls += _run_mode(keras, mode, args, models, x, y, configured)
    note = busy_note(controls)
    if note:
        print(note)
    return 0


def _compiled(keras, model, jit: bool):
    model.compile(
        optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.SparseCategoricalCrossentropy(True), jit_compile=jit
    )
    return model


def _run_mode(keras, mode: str, args, models, x, y, configured: bool) -> list:
    """Compile every variant for ``mode``, time them alternately, print the table; returns the controls.

    Training is timed first; the fused network is made afterwards from the DO-Conv one, so that its
    batch-norm statistics have moved in training as the native network's have. Fused from the
    untrained network, a deep network's activations shrink towards denormal floats, which CPUs
    compute several times slower: the fused predict would read slow for a reason that has nothing
    to do with its operators. Predicting changes no statistics, so all four predict alike.
    """
    from ..keras import fuse_model

    jit = mode == "xla"
    train, predict = {}, {}
    for name, model in zip(("native", "control", "doconv", "without fold"), models):
        _compiled(keras, model, jit)
        for _ in range(2):  # compile and warm up
            model.train_on_batch(x, y)
        train[name] = _timer(lambda m=model: m.train_on_batch(x, y), args.steps)
    fold, folded_layers, _ = _fold_step(keras, models[2], args.batch, jit)
    fold()
    flush = _cache_flush()

    def flushed_fold():
        flush()
        fold()

    pairs = {
        "train step          DO-Conv / Conv2D": (train["doconv"], train["native"]),
        "train step          Conv2D / Conv2D (control)": (train["control"], train["native"]),
        "fold alone          fold / Conv2D train step": (_timer(fold, args.steps), train["native"]),
        "flushed fold": (_timer(flushed_fold, args.steps), train["native"]),
        "flush": (_timer(flush, args.steps), train["native"]),
    }
    if "without fold" in train:
        pairs[WITHOUT_FOLD] = (train["without fold"], train["native"])
    results = _median_ratios(pairs, args.repeats)
    # What the fold costs with its inputs out of the caches, as a training step meets them among
    # the network's other tensors: the flushed run minus the flush itself.
    results[FOLD_COLD] = results.pop("flushed fold") - results.pop("flush")
    fused = _compiled(keras, fuse_model(models[2]), jit)
    for name, model in zip(("native", "control", "doconv", "fused"), (*models[:3], fused)):
        for _ in range(2):
            model.predict_on_batch(x)
        predict[name] = _timer(lambda m=model: m.predict_on_batch(x), args.steps)
    pairs = {
        "predict, unfused    DO-Conv / Conv2D": (predict["doconv"], predict["native"]),
        "predict, fused      fused / Conv2D": (predict["fused"], predict["native"]),
        "predict             Conv2D / Conv2D (control)": (predict["control"], predict["native"]),
    }
    results.update(_median_ratios(pairs, args.repeats))
    order = ["train step          DO-Conv / Conv2D", "train step          Conv2D / Conv2D (control)"]
    order += [WITHOUT_FOLD] if WITHOUT_FOLD in results else []
    order += [name for name in pairs] + ["fold alone          fold / Conv2D train step", FOLD_COLD]
    results = {name: results[name] for name in order}
    compile_name = "jit_compile=True (XLA)" if jit else "default (jit_compile='auto': no XLA on a CPU-only machine)"
    print(f"\ncompile: {compile_name}")
    print(f"{'measure':<48} median ratio  goal")
    goals = GOALS[args.model]
    for name, ratio in results.items():
        measured_only = "control" in name or name == WITHOUT_FOLD
        target = "-" if measured_only else goals.get(name.split("  ")[0].strip(), "-")
        print(f"{name:<48} {ratio:<12.3f}  {goal(target, configured)}")
    step = results["train step          DO-Conv / Conv2D"]
    share, cold = results["fold alone          fold / Conv2D train step"], results[FOLD_COLD]
    if step > 1.01:
        print(
            f"where the time goes: DO-Conv's train step costs {step - 1:.3f} of a native step more; the fold of its "
            f"{folded_layers} folding layers (forward and backward, alone) costs {share:.3f} of a native step, "
            f"{min(share / (step - 1), 9.99):.0%} of the difference, and {cold:.3f} "
            f"({min(cold / (step - 1), 9.99):.0%}) with the caches flushed before it"
            + (
                f"; with the DOConv2D folds replaced by W's first tile the step reads {results[WITHOUT_FOLD]:.3f}"
                if WITHOUT_FOLD in results
                else ""
            )
        )
    return [ratio for name, ratio in results.items() if "control" in name]


if __name__ == "__main__":
    sys.exit(main())
