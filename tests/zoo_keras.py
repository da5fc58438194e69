"""keras.applications networks through convert_model and fuse_model: a table, not a test (pytest skips it).

For each network (weights=None, a small input, seeded), prints the DO-Conv layers after
conversion and the conv-like layers left as they are, the worst relative output difference
after convert (against the original) and after fuse (against the converted model once every D
has been set away from zero, as fine-tuning would), and whether both are within DESIGN.md's
float32 tolerance with the original parameter count. Exits 1 if any network is not exact.

Usage: KERAS_BACKEND=tensorflow python tests/zoo_keras.py [NETWORK ...] [--size 64]
       (default: every network below; names as in keras.applications)
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np

NETWORKS = [
    "MobileNet",
    "MobileNetV2",
    "MobileNetV3Small",
    "MobileNetV3Large",
    "ResNet50",
    "ResNet50V2",
    "InceptionV3",
    "Xception",
    "DenseNet121",
    "EfficientNetB0",
    "EfficientNetV2B0",
    "ConvNeXtTiny",
    "NASNetMobile",
    "VGG16",
]
# Networks whose own input checks want more than the default size.
MIN_SIZE = {"InceptionV3": 75, "Xception": 71, "NASNetMobile": 224}


def relative_error(got, want) -> float:
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def exact(got, want) -> bool:
    """DESIGN.md's float32 tolerance: rtol 1e-5, atol 1e-5 * max|want|."""
    return bool(np.all(np.abs(got - want) <= 1e-5 * np.abs(want) + 1e-5 * float(np.max(np.abs(want)))))


def conv_counts(model, do_layers, native_convs) -> tuple[int, int]:
    layers = list(model._flatten_layers(include_self=False))
    return sum(isinstance(layer, do_layers) for layer in layers), sum(
        isinstance(layer, native_convs) for layer in layers
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("networks", nargs="*", default=NETWORKS)
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    args = parser.parse_args(argv)

    import keras

    from doconv.keras import DOConv2D, DODepthwiseConv2D, DOSeparableConv2D, convert_model, fuse_model

    do_layers = (DOConv2D, DODepthwiseConv2D, DOSeparableConv2D)
    native_convs = tuple(
        getattr(keras.layers, name)
        for name in ("Conv1D", "Conv2D", "Conv3D", "Conv2DTranspose", "DepthwiseConv2D", "SeparableConv2D")
    )
    print(f"keras {keras.__version__} ({keras.backend.backend()}), input {args.size}x{args.size}, batch 2")
    header = f"{'network':<18} {'converted':>9} {'left':>5} {'convert err':>12} {'fuse err':>10} {'params':>7} {'exact':>6} {'s':>5}"
    print(header)
    failures = 0
    for name in args.networks:
        start = time.perf_counter()
        size = max(args.size, MIN_SIZE.get(name, 0))
        keras.utils.set_random_seed(0)
        try:
            # Logits, not softmax: a near-uniform softmax would hide differences.
            model = getattr(keras.applications, name)(
                weights=None, input_shape=(size, size, 3), classifier_activation=None
            )
        except Exception as err:  # a network this Keras does not have, or refuses the size
            print(f"{name:<18} not built: {err}"[:200])
            continue
        x = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype("float32")
        y = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), np.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            converted = convert_model(model)
        n_do, n_left = conv_counts(converted, do_layers, native_convs)
        yc = np.asarray(keras.ops.convert_to_numpy(converted(x, training=False)), np.float64)
        # As after fine-tuning: D away from zero, so that fusing has something to fold.
        rng = np.random.default_rng(1)
        for layer in converted._flatten_layers(include_self=False):
            if isinstance(layer, do_layers) and layer.D is not None:
                layer.D.assign(rng.normal(0, 0.05, tuple(layer.D.shape)).astype(layer.D.dtype))
        yd = np.asarray(keras.ops.convert_to_numpy(converted(x, training=False)), np.float64)
        fused = fuse_model(converted)
        yf = np.asarray(keras.ops.convert_to_numpy(fused(x, training=False)), np.float64)
        same_params = fused.count_params() == model.count_params()
        if relative_error(yd, y) < 1e-3:
            print(f"{name:<18} setting D did not change the output: the fuse check would be empty")
            failures += 1
            continue
        ok = exact(yc, y) and exact(yf, yd) and same_params and conv_counts(fused, do_layers, native_convs)[0] == 0
        failures += not ok
        print(
            f"{name:<18} {n_do:>9} {n_left:>5} {relative_error(yc, y):>12.1e} {relative_error(yf, yd):>10.1e} "
            f"{'same' if same_params else 'DIFF':>7} {'yes' if ok else 'NO':>6} {time.perf_counter() - start:>5.0f}"
        )
        for warning in caught:
            print(f"    warning: {warning.message}"[:400])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
