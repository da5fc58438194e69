"""The Keras DOConv2D fold alone, forward and gradient: ``doconv.keras.fold`` against the plain einsum.

Times ``fold_kernel`` (the layers' fold) and ``ops.einsum("ksc,sco->kco")`` (what they ran
before) on the Keras backend in use, alternating in every repeat, for ResNet-sized 3x3 layers
and a grouped one; prints the median time of each and the median per-repeat ratio, and the
TensorFlow graph's op counts (``Transpose`` nodes: W-sized copies; an ``Einsum`` node makes its
own copies inside its kernel). On tensorflow ``--modes graph,xla`` runs both ``tf.function``
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


def _step(backend: str, mode: str, fold, groups: int):
    """fold's gradients w.r.t. D_hat and W for an incoming kernel gradient G, compiled as ``mode`` says."""
    if backend == "tensorflow":
        import tensorflow as tf

        def step(D_hat, W, G):
            with tf.GradientTape() as tape:
                tape.watch([D_hat, W])
                y = fold(D_hat, W, groups)
            return tape.gradient(y, [D_hat, W], output_gradients=G)

        return tf.function(step, jit_compile=mode == "xla")
    if backend == "jax":
        import jax

        def step(D_hat, W, G):
            _, pullback = jax.vjp(lambda a, b: fold(a, b, groups), D_hat, W)
            return pullback(G)

        return jax.jit(step)
    import torch

    def step(D_hat, W, G):
        D_hat, W = D_hat.detach().requires_grad_(True), W.detach().requires_grad_(True)
        return torch.autograd.grad(fold(D_hat, W, groups), (D_hat, W), G)

    return step


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
        graph 3x3 16->16 groups=1: einsum ... ms, fold_kernel ... ms, fold_kernel / einsum ...
        ...
        0
    """
    parser = argparse.ArgumentParser(prog="bench_keras_fold", description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="graph,xla", help="tensorflow only: comma-separated graph, xla")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (small sizes)")
    args = parser.parse_args(argv)
    import keras

    from ..keras.fold import _fold_einsum, fold_kernel

    ops = keras.ops
    backend = keras.backend.backend()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] if backend == "tensorflow" else [backend]
    sizes = ((16, 16, 1), (16, 16, 4)) if args.quick else SIZES
    repeats = 3 if args.quick else args.repeats
    print(f"fold + gradient, keras {keras.__version__}, backend {backend}, median of {repeats} repeats (ms)")
    variants = {"einsum": _fold_einsum, "fold_kernel": fold_kernel}  # the einsum: what the layers ran before
    rng = np.random.default_rng(0)
    for mode in modes:
        for C_in, C_out, groups in sizes:
            K = D_mul = 9
            args_ = tuple(
                ops.convert_to_tensor(rng.standard_normal(shape).astype("float32"))
                for shape in ((K, D_mul, C_in), (D_mul, C_in // groups, C_out), (K, C_in // groups, C_out))
            )
            steps = {name: _step(backend, mode, fold, groups) for name, fold in variants.items()}
            grads = {name: [ops.convert_to_numpy(g) for g in step(*args_)] for name, step in steps.items()}
            for new, ref in zip(grads["fold_kernel"], grads["einsum"]):
                np.testing.assert_allclose(new, ref, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(ref))))
            calls = 20 if C_in * C_out < 512 * 512 else 5
            times = {name: [] for name in steps}
            for r in range(repeats):
                for name in sorted(steps, reverse=r % 2 == 1):
                    start = time.perf_counter()
                    for _ in range(calls):
                        out = steps[name](*args_)
                    ops.convert_to_numpy(out[-1])
                    times[name].append((time.perf_counter() - start) / calls * 1e3)
            ratio = statistics.median(a / b for a, b in zip(times["fold_kernel"], times["einsum"]))
            line = f"{mode} 3x3 {C_in}->{C_out} groups={groups}: " + ", ".join(
                f"{name} {statistics.median(t):.2f} ms" for name, t in times.items()
            )
            print(f"{line}, fold_kernel / einsum {ratio:.2f}")
            if mode == "graph":
                print("    graph: " + "; ".join(f"{n} {_graph_ops(s, args_)}" for n, s in steps.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
