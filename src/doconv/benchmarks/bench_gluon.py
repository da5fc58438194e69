"""DO-Conv against gluon Conv2D on a GluonCV network, hybridized, side by side in one process.

The DO-Conv network is ``convert_model`` of the native one, the fused network is
``fuse_model`` of the DO-Conv one. Every repeat times each variant for the same number of
steps, in a new (seeded, shuffled) order each repeat, and the table reports the median of the per-repeat
ratios (and their range). "Conv2D / Conv2D" times two copies of the native network
against each other: it shows how much a ratio moves by noise alone.

Two DO-Conv variants train: "DO-Conv", a hybridized network as it is by default (every layer
folds W and D in every step), and "DO-Conv, plan_compositions", the same network after
``doconv.gluon.plan_compositions`` fixed the layers with few output positions to compose features
(a hybridized graph cannot choose per batch). Below the table, "where the time goes" times the
fold alone: every DO-Conv layer's fold and its backward, as one training step runs them.

The default network, ``resnet18_v1b`` at batch 16, 112x112, is a small ResNet. ``--model`` also
takes the networks of issue 16, each with its own default batch and size (chosen so that a run fits
in minutes on 2 cores; ``--batch``/``--size`` override them): resnet50_v1b, mobilenetv2_1.0 and
resnext50_32x4d at batch 8, 64x64; inceptionv3 at batch 2, 299x299 (its last pooling needs 8x8
features, so it takes no smaller input). Any other model-zoo name runs at batch 16, 112x112.

Run ``python -m doconv.benchmarks.bench_gluon [--model NAME]`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from .report import busy_note, goal

SMALL = "resnet18_v1b"
# (batch, size) per network of issue 16; every other name takes the small network's.
MODELS = {
    "resnet50_v1b": (8, 64),
    "mobilenetv2_1.0": (8, 64),
    "resnext50_32x4d": (8, 64),
    "inceptionv3": (2, 299),
}
DEFAULT_SHAPE = (16, 112)
# Goals hold at a network's own batch and size, with doconv's C kernel: the small ResNet's
# training goal is the README's, the zoo networks' that of issue 16.
GOALS = {("train", "DO-Conv / Conv2D"): "<= 1.05", ("inference", "fused / Conv2D"): "1.00"}
ZOO_GOALS = {("train", "DO-Conv / Conv2D"): "<= 1.10", ("inference", "fused / Conv2D"): "1.00"}


def _parse(argv):
    parser = argparse.ArgumentParser(prog="bench_gluon", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=SMALL, help=f"GluonCV model-zoo name (default {SMALL}, a small ResNet); see the docstring"
    )
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the model's, see above)")
    parser.add_argument("--size", type=int, default=None, help="input height and width (default: the model's)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per variant and repeat (default 1)")
    parser.add_argument("--repeats", type=int, default=25, help="repeats; the table shows medians (default 25)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run: tiny input, few steps")
    parser.add_argument(
        "--mxnet-ops", action="store_true", help="fold with MXNet's own operators instead of doconv's C kernel"
    )
    parser.add_argument(
        "--fold-sizes",
        action="store_true",
        help="only time one layer's fold and its backward, custom operator vs MXNet ops, per layer size",
    )
    args = parser.parse_args(argv)
    batch, size = MODELS.get(args.model, DEFAULT_SHAPE)
    args.batch = batch if args.batch is None else args.batch
    args.size = size if args.size is None else args.size
    if args.quick:
        args.batch, args.size, args.steps, args.repeats = 2, (299 if args.model == "inceptionv3" else 32), 1, 2
    return args


def _networks(args):
    import mxnet as mx
    from gluoncv.model_zoo import get_model
    from mxnet import nd

    from doconv.gluon import convert_model, plan_compositions
    from doconv.gluon.convert import _copy_block

    mx.random.seed(0)
    native = get_model(args.model, pretrained=False, classes=100)
    native.initialize(mx.init.Xavier())
    native(nd.zeros((1, 3, args.size, args.size)))  # finish deferred initialisation
    control = _copy_block(native)
    doconv = convert_model(native)
    planned = _copy_block(doconv)
    nets = {"Conv2D": native, "Conv2D (control)": control, "DO-Conv": doconv, "plan": planned}
    for net in nets.values():
        net.hybridize(static_alloc=True, static_shape=True)
    plan = plan_compositions(planned, nd.zeros((args.batch, 3, args.size, args.size)))
    return nets, plan


def _fused(nets) -> None:
    """Add the fused network, made from the DO-Conv one after the training measurement.

    Fused before it, the network would keep the batch-norm statistics of an untrained one while
    the native network's have moved in its training steps; its activations then shrink layer
    after layer into denormal floats, which x86 CPUs compute several times slower (a fused
    MobileNetV2 read 1.15-1.45x the native inference that way, with the same operators).
    """
    from doconv.gluon import fuse_model

    nets["fused"] = fuse_model(nets["DO-Conv"])
    nets["fused"].hybridize(static_alloc=True, static_shape=True)


def _timers(nets, plan, args):
    import mxnet as mx
    from mxnet import autograd, gluon, nd

    x = nd.random.uniform(shape=(args.batch, 3, args.size, args.size))
    labels = nd.array([i % 100 for i in range(args.batch)])
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()

    def train(net):
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 1e-3, "momentum": 0.9, "wd": 1e-4})

        def step():
            with autograd.record():
                loss = loss_fn(net(x), labels)
            loss.backward()
            trainer.step(args.batch)
            mx.nd.waitall()

        return step

    def infer(net):
        def step():
            net(x).wait_to_read()

        return step

    training = {"Conv2D": "Conv2D", "Conv2D (control)": "Conv2D (control)", "DO-Conv": "DO-Conv"}
    if "feature" in plan.values():  # else the planned graph is the folding one
        training["DO-Conv, plan_compositions"] = "plan"
    return {
        "train": lambda: {label: train(nets[name]) for label, name in training.items()},
        "inference": lambda: {name: infer(nets[name]) for name in ("Conv2D", "Conv2D (control)", "DO-Conv", "fused")},
    }


def _fold_timer(net):
    """A step that runs every DO-Conv layer's fold and its backward in one hybridized graph, as the
    network's training graph runs them; and the number of layers that fold."""
    import mxnet as mx
    from mxnet import autograd, gluon, nd

    from doconv.gluon import DOConv2D
    from doconv.gluon.convert import _walk

    layers = list({id(b): b for _, b in _walk(net) if isinstance(b, DOConv2D) and b.D is not None}.values())

    class Folds(gluon.HybridBlock):
        def hybrid_forward(self, F, *arrays):
            return [layer._kernel(F, W, D) for layer, W, D in zip(layers, arrays[0::2], arrays[1::2])]

    folds = Folds()
    folds.hybridize(static_alloc=True, static_shape=True)
    arrays = [p.data().copy() for layer in layers for p in (layer.W, layer.D)]
    for array in arrays:
        array.attach_grad()

    def step():
        with autograd.record():
            kernels = folds(*arrays)
        autograd.backward(kernels, head_grads=heads)
        mx.nd.waitall()

    with autograd.record():
        heads = [nd.ones_like(k) for k in folds(*arrays)]
    return step, len(layers)


# (in_channels, channels, groups) of 3x3 layers: depthwise ones as in MobileNetV2, then dense ones.
FOLD_SIZES = [(32, 32, 32), (192, 192, 192), (960, 960, 960), (32, 32, 1), (64, 64, 1), (128, 128, 1), (256, 256, 1)]


def fold_sizes(repeats: int, quick: bool = False) -> list[tuple]:
    """One hybridized 3x3 layer's fold and backward, with the custom operator and with MXNet's ops.

    Returns:
        Rows ``(in_channels, channels, groups, fold multiply-adds, kernel ms, MXNet ops ms, ratio)``;
        the two ways alternate in every repeat, the figures are medians (ratio: kernel / MXNet ops).
    """
    import mxnet as mx
    from mxnet import autograd, gluon

    from doconv.gluon import DOConv2D, fold_kernel_in_use, use_fold_kernel

    class Fold(gluon.HybridBlock):
        def __init__(self, layer, **kwargs):
            super().__init__(**kwargs)
            self.fold = layer._kernel  # a bound method, not a child: W and D come in as inputs

        def hybrid_forward(self, F, W, D):
            return self.fold(F, W, D)

    rows, was = [], fold_kernel_in_use()
    try:
        for C_in, C_out, groups in FOLD_SIZES[:2] if quick else FOLD_SIZES:
            layer = DOConv2D(C_out, 3, in_channels=C_in, groups=groups)
            layer.initialize()
            W, D = layer.W.data().copy(), layer.D.data().copy()
            W.attach_grad()
            D.attach_grad()
            steps = {}
            for impl in ("kernel", "mxnet ops"):
                use_fold_kernel(impl == "kernel", min_macs=0)
                block = Fold(layer)
                block.hybridize(static_alloc=True, static_shape=True)

                def step(block=block, W=W, D=D):
                    with autograd.record():
                        folded = block(W, D)
                    folded.backward()
                    mx.nd.waitall()

                step()  # traced now, with this impl
                steps[impl] = step
            times = {impl: [] for impl in steps}
            for r in range(repeats):
                for impl in list(steps) if r % 2 == 0 else list(steps)[::-1]:
                    times[impl].append(_time(steps[impl], 1))
            kernel_ms, ops_ms = (1000 * statistics.median(times[i]) for i in ("kernel", "mxnet ops"))
            ratio = statistics.median(a / b for a, b in zip(times["kernel"], times["mxnet ops"]))
            rows.append((C_in, C_out, groups, C_out * (C_in // groups) * 81, kernel_ms, ops_ms, ratio))
    finally:
        use_fold_kernel(was)
    return rows


def _time(step, n):
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def measure(args):
    """Rows (mode, comparison, median ratio, min, max, median ms of the baseline per step), the plan,
    and where the time goes: {"fold ms", "folded layers", "DO-Conv ms", "Conv2D ms"}."""
    nets, plan = _networks(args)
    timers = _timers(nets, plan, args)
    rows, medians = [], {}
    for mode, make_steps in timers.items():
        if mode == "inference":
            _fused(nets)
        steps = make_steps()
        if mode == "train":
            steps["fold alone"], folded = _fold_timer(nets["DO-Conv"])
        for step in steps.values():
            step()  # warm up: build the cached ops, allocate
            step()
        names = list(steps)
        times = {name: [] for name in names}
        shuffle = random.Random(0).shuffle  # a new order every repeat: no variant always follows the same one
        for _ in range(args.repeats):
            order = list(names)
            shuffle(order)
            for name in order:
                times[name].append(_time(steps[name], args.steps))
        medians[mode] = {name: 1000 * statistics.median(t) for name, t in times.items()}
        base = times["Conv2D"]
        for name in names[1:]:
            if name == "fold alone":
                continue
            ratios = [t / b for t, b in zip(times[name], base)]
            row = (mode, f"{name} / Conv2D", statistics.median(ratios), min(ratios), max(ratios))
            rows.append(row + (1000 * statistics.median(base),))
    train = medians["train"]
    where = {
        "fold ms": train["fold alone"],
        "folded layers": folded,
        "DO-Conv ms": train["DO-Conv"],
        "Conv2D ms": train["Conv2D"],
    }
    return rows, plan, where


def main(argv=None) -> int:
    """Measure and print the table; returns 0.

    Args:
        argv: command-line arguments (None: ``sys.argv[1:]``); see ``--help``.

    Returns:
        0.

    Example:
        ``python -m doconv.benchmarks.bench_gluon --model resnet50_v1b --repeats 2``
    """
    from doconv.gluon import fold_kernel_in_use, use_fold_kernel

    args = _parse(argv)
    if args.fold_sizes:
        from doconv.gluon import KERNEL_MIN_MACS

        print(
            f"doconv.gluon fold per layer size: one 3x3 layer's fold and backward, hybridized, {args.repeats} "
            f"repeats, custom operator (C kernel) vs MXNet ops, medians; layers below {KERNEL_MIN_MACS} "
            "multiply-adds fold with MXNet ops by default"
        )
        print("| in -> out channels, groups | fold MACs | kernel ms | MXNet ops ms | kernel / ops |")
        print("|---|---|---|---|---|")
        for C_in, C_out, groups, macs, kernel_ms, ops_ms, ratio in fold_sizes(args.repeats, args.quick):
            print(f"| {C_in} -> {C_out}, {groups} | {macs} | {kernel_ms:.3f} | {ops_ms:.3f} | {ratio:.2f} |")
        return 0
    was = fold_kernel_in_use()
    kernel = use_fold_kernel(not args.mxnet_ops)
    try:
        rows, plan, where = measure(args)
    finally:
        use_fold_kernel(was)
    fold = "C kernel" if kernel else "MXNet ops"
    what = "a small ResNet" if args.model == SMALL else "a network of issue 16" if args.model in MODELS else "GluonCV"
    print(
        f"doconv.gluon benchmark: {args.model} ({what}), batch {args.batch}, {args.size}x{args.size}, hybridized, "
        f"{args.repeats} repeats x {args.steps} steps, fold: {fold}, median of per-repeat ratios"
    )
    configured = (
        not args.quick
        and not args.mxnet_ops
        and (args.batch, args.size) == MODELS.get(args.model, DEFAULT_SHAPE)
        and (args.model == SMALL or args.model in MODELS)
    )
    goals = GOALS if args.model == SMALL else ZOO_GOALS
    header = f"| {'mode':<9} | {'comparison':<44} | {'ratio':>6} | {'range':>13} | {'Conv2D ms/step':>14} | goal    |"
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for mode, comparison, median, low, high, base_ms in rows:
        target = goal(goals.get((mode, comparison), "-"), configured)
        print(
            f"| {mode:<9} | {comparison:<44} | {median:>5.3f}x | {low:.3f}-{high:.3f}x | {base_ms:>14.1f} | "
            f"{target:<7} |"
        )
    note = busy_note(median for _, comparison, median, *_ in rows if "control" in comparison)
    if note:
        print(note)
    features = sorted(name for name, choice in plan.items() if choice == "feature")
    print(
        f"plan_compositions: {len(features)} of {len(plan)} DO-Conv layers compose features at this batch and size"
        + (f" ({', '.join(features)})" if features else "")
    )
    extra = where["DO-Conv ms"] - where["Conv2D ms"]
    fold_ms, step_ms = where["fold ms"], where["DO-Conv ms"]
    print(
        f"where the time goes (train, medians): DO-Conv (folding in every layer) {step_ms:.1f} ms/step, Conv2D "
        f"{where['Conv2D ms']:.1f} ms/step, difference {extra:.1f} ms; the fold alone ({where['folded layers']} "
        f"layers, forward and backward) {fold_ms:.1f} ms, {fold_ms / step_ms:.1%} of the DO-Conv step"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
