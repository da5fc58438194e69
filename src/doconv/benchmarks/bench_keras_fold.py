"""The Keras DOConv2D fold alone, forward and gradient: ``doconv.keras.fold`` against the plain einsum.

Times ``fold_kernel`` (the layers' fold), ``ops.einsum("ksc,sco->kco")`` (what they ran
before) and, for one group, the fold as a depthwise convolution (no transposed copy at all; not
used, as it shows) on the Keras backend in use, alternating in every repeat, for ResNet-sized 3x3
layers and a grouped one; prints the median time of each and the median per-repeat ratios, and
the TensorFlow graph's op counts (``Transpose`` nodes: W-sized copies; an ``Einsum`` node makes
its own copies inside its kernel). On tensorflow ``--modes graph,xla`` runs both ``tf.function``
without and with ``jit_compile``; on jax the functions are ``jax.jit``-ed; on torch, eager.

Run: ``KERAS_BACKEND=jax python -m doconv.benchmarks.bench_keras_fold [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

# (C_in, C_out, groups) of 3x3 layers with D_mul = K = 9: ResNet50's three widths, a ResNeXt-style grouped one.
SIZES = ((64, 64, 1), (256, 256, 1), (512, 512, 1), (256, 256, 32))


def gradient_step(backend: str, mode: str, fn):
    """``step(*inputs, G)``: the gradients of ``fn(*inputs)`` w.r.t. every input for an incoming gradient G.

    Compiled as ``mode`` says on tensorflow (``tf.function``, with ``jit_compile`` for ``'xla'``),
    ``jax.jit``-ed on jax, eager on torch. bench_keras_layer times whole layers with it.
    """
    if backend == "tensorflow":
        import tensorflow as tf

        def step(*args):
            *inputs, G = args
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                y = fn(*inputs)
            return tape.gradient(y, inputs, output_gradients=G)

        return tf.function(step, jit_compile=mode == "xla")
    if backend == "jax":
        import jax

        def step(*args):
            *inputs, G = args
            _, pullback = jax.vjp(fn, *inputs)
            return pullback(G)

        return jax.jit(step)
    import torch

    def step(*args):
        *inputs, G = args
        inputs = [t.detach().requires_grad_(True) for t in inputs]
        return torch.autograd.grad(fn(*inputs), inputs, G)

    return step


def parse_args(prog: str, description: str, argv, repeats: int, quick_help: str):
    """The keras micro-benchmarks' command line: ``(args, keras, backend, modes, repeats)``.

    ``--modes`` (tensorflow only: graph and/or xla; the other backends run in their one mode),
    ``--repeats`` (3 with ``--quick``) and ``--quick``; an unknown mode is refused by name.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--modes", default="graph,xla", help="tensorflow only: comma-separated graph, xla")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    import keras

    backend = keras.backend.backend()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if backend == "tensorflow" else [backend]
    unknown = sorted(set(modes) - {"graph", "xla", backend})
    if unknown or not modes:
        parser.error(f"--modes takes 'graph' and/or 'xla'. Received: --modes={args.modes!r}")
    return args, keras, backend, modes, 3 if args.quick else args.repeats


def alternating_times(steps: dict, inputs: dict, repeats: int, calls: int) -> dict:
    """name -> ms per call of ``steps[name](*inputs[name])`` in each repeat, the order reversed every other repeat.

    Each timing ends by reading one output back to NumPy, so that asynchronous backends finish.
    """
    import keras

    times = {name: [] for name in steps}
    for r in range(repeats):
        for name in sorted(steps, reverse=r % 2 == 1):
            start = time.perf_counter()
            for _ in range(calls):
                out = steps[name](*inputs[name])
            keras.ops.convert_to_numpy(out[0])
            times[name].append((time.perf_counter() - start) / calls * 1e3)
    return times


def _median_ratio(a, b) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def fold_as_depthwise_conv(D_hat, W, groups: int):
    """The one-group fold as a depthwise convolution, with no transposed copy of anything.

    D + I ``(K, D_mul, C_in)`` is a batch of K images of D_mul x 1 pixels and C_in channels; W
    ``(D_mul, C_in, C_out)`` is, as it lies, a D_mul x 1 depthwise filter with channel multiplier
    C_out. A 'valid' depthwise convolution sums over the D_mul rows per channel c, and its output
    ``(K, 1, 1, C_in·C_out)`` is the HWIO kernel ``(K, C_in, C_out)`` without a copy. The
    backends' depthwise kernels are written for small channel multipliers, which is why the layers
    do not fold this way (the ``depthwise_conv`` column).
    """
    if groups != 1:
        raise ValueError(f"fold_as_depthwise_conv folds one group only. Received: groups={groups}")
    import keras

    K, D_mul, C_in = D_hat.shape
    C_out = W.shape[-1]
    images = keras.ops.reshape(D_hat, (K, D_mul, 1, C_in))
    kernel = keras.ops.reshape(W, (D_mul, 1, C_in, C_out))
    out = keras.ops.depthwise_conv(images, kernel, strides=1, padding="valid", data_format="channels_last")
    return keras.ops.reshape(out, (K, C_in, C_out))


def _graph_ops(step, args) -> str:
    types = [op.type for op in step.get_concrete_function(*args).graph.get_operations()]
    return f"{len(types)} ops, {types.count('Transpose')} Transpose, {types.count('Einsum')} Einsum"


def main(argv=None) -> int:
    """Print the fold's forward + gradient time, before (einsum) and now (fold_kernel), per layer size.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``): ``--modes``, ``--repeats``, ``--quick``.

    Returns:
        0.

    Example:
        >>> main(["--quick"])  # doctest: +ELLIPSIS
        fold + gradient, keras ... backend tensorflow, ...
        graph 3x3 16->16 groups=1: einsum ... ms, fold_kernel ... ms, ... fold_kernel / einsum ...
        ...
        0
    """
    description, quick = __doc__.splitlines()[0], "a seconds-long smoke run"
    args, keras, backend, modes, repeats = parse_args("bench_keras_fold", description, argv, 9, quick)
    from ..keras.fold import _fold_einsum, fold_kernel

    ops = keras.ops
    sizes = ((16, 16, 1), (16, 16, 4)) if args.quick else SIZES
    print(f"fold + gradient, keras {keras.__version__}, backend {backend}, median of {repeats} repeats (ms)")
    # The einsum: what the layers ran before; the depthwise convolution: a fold without copies, one group only.
    variants = {"einsum": _fold_einsum, "fold_kernel": fold_kernel, "depthwise_conv": fold_as_depthwise_conv}
    rng = np.random.default_rng(0)
    for mode in modes:
        for C_in, C_out, groups in sizes:
            K = D_mul = 9
            args_ = tuple(
                ops.convert_to_tensor(rng.standard_normal(shape).astype("float32"))
                for shape in ((K, D_mul, C_in), (D_mul, C_in // groups, C_out), (K, C_in // groups, C_out))
            )
            steps = {
                name: gradient_step(backend, mode, lambda D_hat, W, f=fold, g=groups: f(D_hat, W, g))
                for name, fold in variants.items()
                if groups == 1 or fold is not fold_as_depthwise_conv
            }
            grads = {name: [ops.convert_to_numpy(g) for g in step(*args_)] for name, step in steps.items()}
            for name in steps:
                for new, ref in zip(grads[name], grads["einsum"]):
                    np.testing.assert_allclose(new, ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(ref))))
            calls = 20 if C_in * C_out < 512 * 512 else 5
            times = alternating_times(steps, {name: args_ for name in steps}, repeats, calls)
            line = f"{mode} 3x3 {C_in}->{C_out} groups={groups}: " + ", ".join(
                f"{name} {statistics.median(t):.2f} ms" for name, t in times.items()
            )
            ratios = [("fold_kernel", "einsum")]
            if "depthwise_conv" in times:
                ratios.append(("depthwise_conv", "fold_kernel"))
            print(line + "".join(f", {a} / {b} {_median_ratio(times[a], times[b]):.2f}" for a, b in ratios))
            if mode == "graph":
                print("    graph: " + "; ".join(f"{n} {_graph_ops(s, args_)}" for n, s in steps.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
