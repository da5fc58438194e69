"""DO-Conv against gluon Conv2D on a GluonCV ResNet, hybridized, side by side in one process.

The DO-Conv network is ``convert_model`` of the native one, the fused network is
``fuse_model`` of the DO-Conv one. Every repeat times each variant for the same number of
steps, alternating which goes first, and the table reports the median of the per-repeat
ratios (and their range). "Conv2D / Conv2D" times two copies of the native network
against each other: it shows how much a ratio moves by noise alone.

Run ``python benchmarks/bench_gluon.py`` (or ``--quick`` for a seconds-long smoke run).
"""

from __future__ import annotations

import argparse
import statistics
import time

from .report import busy_note, goal

DEFAULTS = {"model": "resnet18_v1b", "batch": 16, "size": 112, "mxnet_ops": False}  # what the goals were set for
GOALS = {("train", "DO-Conv / Conv2D"): "<= 1.05", ("inference", "fused / Conv2D"): "1.00"}


def _parse(argv):
    parser = argparse.ArgumentParser(prog="bench_gluon", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULTS["model"], help="GluonCV model-zoo name (default resnet18_v1b)")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="batch size (default 16)")
    parser.add_argument("--size", type=int, default=DEFAULTS["size"], help="input height and width (default 112)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per variant and repeat (default 1)")
    parser.add_argument("--repeats", type=int, default=25, help="repeats; the table shows medians (default 25)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run: tiny input, few steps")
    parser.add_argument(
        "--mxnet-ops", action="store_true", help="fold with MXNet's own operators instead of doconv's C kernel"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.steps, args.repeats = 2, 32, 1, 2
    return args


def _networks(args):
    import mxnet as mx
    from gluoncv.model_zoo import get_model
    from mxnet import nd

    from doconv.gluon import _copy_block, convert_model, fuse_model

    mx.random.seed(0)
    native = get_model(args.model, pretrained=False, classes=100)
    native.initialize(mx.init.Xavier())
    native(nd.zeros((1, 3, args.size, args.size)))  # finish deferred initialisation
    control = _copy_block(native)
    doconv = convert_model(native)
    fused = fuse_model(doconv)
    nets = {"Conv2D": native, "Conv2D (control)": control, "DO-Conv": doconv, "fused": fused}
    for net in nets.values():
        net.hybridize(static_alloc=True, static_shape=True)
    return nets


def _timers(nets, args):
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

    return {
        "train": {name: train(nets[name]) for name in ("Conv2D", "Conv2D (control)", "DO-Conv")},
        "inference": {name: infer(nets[name]) for name in ("Conv2D", "Conv2D (control)", "DO-Conv", "fused")},
    }


def _time(step, n):
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def measure(args) -> list[tuple[str, str, float, float, float, float]]:
    """Rows (mode, comparison, median ratio, min, max, median ms of the baseline per step)."""
    timers = _timers(_networks(args), args)
    rows = []
    for mode, steps in timers.items():
        for step in steps.values():
            step()  # warm up: build the cached ops, allocate
            step()
        names = list(steps)
        times = {name: [] for name in names}
        for r in range(args.repeats):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                times[name].append(_time(steps[name], args.steps))
        base = times["Conv2D"]
        for name in names[1:]:
            ratios = [t / b for t, b in zip(times[name], base)]
            rows.append(
                (
                    mode,
                    f"{name} / Conv2D",
                    statistics.median(ratios),
                    min(ratios),
                    max(ratios),
                    1000 * statistics.median(base),
                )
            )
    return rows


def main(argv=None) -> int:
    """Measure and print the table; returns 0.

    Args:
        argv: command-line arguments (None: ``sys.argv[1:]``); see ``--help``.

    Returns:
        0.

    Example:
        ``python benchmarks/bench_gluon.py --quick``
    """
    from doconv.gluon import fold_kernel_in_use, use_fold_kernel

    args = _parse(argv)
    was = fold_kernel_in_use()
    kernel = use_fold_kernel(not args.mxnet_ops)
    try:
        rows = measure(args)
    finally:
        use_fold_kernel(was)
    fold = "C kernel" if kernel else "MXNet ops"
    print(
        f"doconv.gluon benchmark: {args.model}, batch {args.batch}, {args.size}x{args.size}, hybridized, "
        f"{args.repeats} repeats x {args.steps} steps, fold: {fold}, median of per-repeat ratios"
    )
    configured = not args.quick and all(getattr(args, key) == value for key, value in DEFAULTS.items())
    header = f"| {'mode':<9} | {'comparison':<27} | {'ratio':>6} | {'range':>13} | {'Conv2D ms/step':>14} | goal    |"
    print(header)
    print("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
    for mode, what, median, low, high, base_ms in rows:
        target = goal(GOALS.get((mode, what), "-"), configured)
        print(f"| {mode:<9} | {what:<27} | {median:>5.3f}x | {low:.3f}-{high:.3f}x | {base_ms:>14.1f} | {target:<7} |")
    note = busy_note(median for _, what, median, *_ in rows if "control" in what)
    if note:
        print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
