"""One DOConv2D layer's training computation in keras.ops: feature composition, the fold, and a plain conv.

For layers whose batch has few output positions, times the forward and the gradients w.r.t. the
input, W and D + I of the same layer computed in several ways, alternating in every repeat, on the
Keras backend in use:

- ``features``: ``doconv.keras.composition.compose_features``, what the layer runs when
  ``core.training_composition`` picks feature composition (taps as ``ops.slice`` windows, both
  products as matmuls on tensorflow and jax);
- ``features, strided taps``: the same products with the taps taken by strided slicing
  (``x[:, i:i+H, j:j+W]``), which TensorFlow differentiates with one StridedSliceGrad per tap;
- ``features, einsums``: the products as two ``ops.einsum`` (the torch backend's form);
- ``fold``: ``doconv.keras.fold.fold_kernel`` and ``ops.conv``, what the layer runs otherwise;
- ``conv``: ``ops.conv`` with a kernel of the folded shape, the native layer's computation
  (its gradient w.r.t. the kernel replaces those w.r.t. W and D + I).

Every variant's gradients are checked against the fold's before timing. Prints the median time of
each and its median per-repeat ratio to ``conv``, and the composition rule's choice for the layer.

Run: ``python -m doconv.benchmarks.bench_keras_layer [--modes graph,xla] [--quick]`` (tensorflow;
``KERAS_BACKEND=jax`` or ``torch`` for the others).
"""

from __future__ import annotations

import statistics
import sys

import numpy as np

from .bench_keras_fold import alternating_times, gradient_step, parse_args

# (what the layer is, batch, input height = width, C_in, C_out, kernel size); padding 'same', stride 1.
LAYERS = (
    ("keras.applications ResNet50, last stage", 16, 2, 512, 512, (3, 3)),
    ("keras.applications InceptionV3, mixed 4-7", 8, 4, 160, 160, (1, 7)),
)
QUICK_LAYERS = (("a small layer", 2, 3, 16, 16, (3, 3)),)


def strided_patches(x, kernel_size):
    """The 'same'-padded stride-1 taps ``(N, H, W, K, C)`` by strided slicing, for comparison with ops.slice."""
    import keras

    from .. import core

    ops = keras.ops
    (kh, kw), (H, W) = kernel_size, x.shape[1:3]
    pads = core.padding_pairs("same", kernel_size, (1, 1), (1, 1), (H, W))  # the layer's own split
    x = ops.pad(x, ((0, 0),) + pads + ((0, 0),))
    return ops.stack([x[:, i : i + H, j : j + W, :] for i in range(kh) for j in range(kw)], axis=3)


def variants(kernel_size, C_in: int, C_out: int) -> dict:
    """name -> (function of the inputs, the inputs' names); every function returns ``(N, H, W, C_out)``."""
    import keras

    from ..keras import composition
    from ..keras.fold import fold_kernel

    ops = keras.ops
    one = (1, 1)

    def conv(x, kernel):
        return ops.conv(x, kernel, padding="same")

    def fold(x, W, D_hat):
        return conv(x, ops.reshape(fold_kernel(D_hat, W, 1), tuple(kernel_size) + (C_in, C_out)))

    def features(x, W, D_hat):
        return composition.compose_features(x, W, D_hat, 1, kernel_size, one, "same", one, "channels_last")

    def composed(patches_of, products):
        def run(x, W, D_hat):
            return ops.reshape(products(patches_of(x), W, D_hat, 1), tuple(x.shape[:3]) + (C_out,))

        return run

    def window_patches(x):
        return composition._patches(x, kernel_size, one, one, "same")

    return {
        "features": (features, ("x", "W", "D_hat")),
        "features, strided taps": (
            composed(lambda x: strided_patches(x, kernel_size), composition._compose_matmul),
            ("x", "W", "D_hat"),
        ),
        "features, einsums": (composed(window_patches, composition._compose_einsum), ("x", "W", "D_hat")),
        "fold": (fold, ("x", "W", "D_hat")),
        "conv": (conv, ("x", "kernel")),
    }


def main(argv=None) -> int:
    """Print each variant's forward + gradient time per layer, and its ratio to the plain conv.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``): ``--modes``, ``--repeats``, ``--quick``.

    Returns:
        0.

    Example:
        >>> main(["--quick", "--modes", "graph"])  # doctest: +ELLIPSIS
        one layer's forward + gradients, keras ... backend tensorflow, ...
        graph, a small layer: 3x3 16->16, batch 2, 3x3 maps, D_mul 9: the composition rule picks ...
            features ... ms (... of conv)
        ...
        0
    """
    description = __doc__.splitlines()[0]
    args, keras, backend, modes, repeats = parse_args("bench_keras_layer", description, argv, 11, "a small layer")
    from .. import core

    ops = keras.ops
    layers = QUICK_LAYERS if args.quick else LAYERS
    print(f"one layer's forward + gradients, keras {keras.__version__}, backend {backend}, median of {repeats} repeats")
    rng = np.random.default_rng(0)
    for mode in modes:
        for what, batch, size, C_in, C_out, kernel_size in layers:
            K = kernel_size[0] * kernel_size[1]
            D_mul = K
            shapes = {
                "x": (batch, size, size, C_in),
                "W": (D_mul, C_in, C_out),
                "D_hat": (K, D_mul, C_in),
                "kernel": tuple(kernel_size) + (C_in, C_out),
            }
            values = {name: rng.standard_normal(shape).astype("float32") * 0.1 for name, shape in shapes.items()}
            values["D_hat"] += core.identity(K, D_mul)[:, :, None].astype("float32")
            tensors = {name: ops.convert_to_tensor(v) for name, v in values.items()}
            G = ops.convert_to_tensor(rng.standard_normal((batch, size, size, C_out)).astype("float32"))
            steps, inputs, folds_alike = {}, {}, []
            for name, (fn, names) in variants(kernel_size, C_in, C_out).items():
                steps[name] = gradient_step(backend, mode, fn)
                inputs[name] = tuple(tensors[n] for n in names) + (G,)
                if names == ("x", "W", "D_hat") and name != "fold":
                    folds_alike.append(name)  # same inputs as the fold: the same gradients, up to rounding
            reference = [ops.convert_to_numpy(g) for g in steps["fold"](*inputs["fold"])]
            for name in folds_alike:
                for got, want in zip(steps[name](*inputs[name]), reference):
                    tol = 1e-4 * float(np.max(np.abs(want)))
                    np.testing.assert_allclose(ops.convert_to_numpy(got), want, rtol=1e-3, atol=tol)
            times = alternating_times(steps, inputs, repeats, calls=5)
            positions = batch * size * size
            choice = core.training_composition(positions, C_in, C_out, 1, K, D_mul)
            fold_macs, feature_macs = core.composition_macs(positions, C_in, C_out, 1, K, D_mul)
            M, N = kernel_size
            print(
                f"{mode}, {what}: {M}x{N} {C_in}->{C_out}, batch {batch}, {size}x{size} maps, D_mul {D_mul}: "
                f"the composition rule picks {choice!r} (features / fold multiply-adds "
                f"{feature_macs / fold_macs:.2f}; 'feature' needs <= {1 / core.FEATURE_COMPOSITION_MARGIN:.2f})"
            )
            for name, t in times.items():
                ratio = statistics.median(a / b for a, b in zip(t, times["conv"]))
                print(f"    {name:<24} {statistics.median(t):8.2f} ms ({ratio:.2f} of conv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
