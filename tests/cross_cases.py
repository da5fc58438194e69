"""The one table of cases every adapter is checked on, and their deterministic parameters.

NumPy only: the cross-environment comparison (tests/cross_compare.py) rebuilds the same
parameters and the core's reference results without any framework installed.
"""

from __future__ import annotations

import itertools

import numpy as np

from doconv import core

KERNELS = [(1, 1), (3, 3), (1, 3), (5, 3)]
# name: (C_in, C_out, groups)
GROUPINGS = {"g1": (3, 4, 1), "g2": (4, 6, 2), "dw": (4, 4, 4), "dwx2": (4, 8, 4)}
D_MULS = ["K", "K+2", "2K"]
# (stride, dilation, padding): stride and dilation are never both > 1 (Keras refuses it),
# 'same' only at stride 1 (PyTorch refuses it otherwise).
GEOMETRIES = [(1, 1, 0), (2, 1, 0), (1, 2, "same"), (1, 1, "same"), (1, 2, 0)]
INPUT_SPATIAL = (9, 8)
BATCH = 2


def cases() -> list[dict]:
    """Every case of the table; 1x1 kernels have D_mul = 1 whatever is asked, so they appear once."""
    table = []
    combos = itertools.product(KERNELS, GROUPINGS.items(), D_MULS)
    for index, (kernel, (grouping, (C_in, C_out, groups)), D_mul_rule) in enumerate(
        c for c in combos if not (c[0] == (1, 1) and c[2] != "K")
    ):
        K = kernel[0] * kernel[1]
        D_mul = {"K": K, "K+2": K + 2, "2K": 2 * K}[D_mul_rule] if K > 1 else 1
        stride, dilation, padding = GEOMETRIES[index % len(GEOMETRIES)]
        case_id = f"k{kernel[0]}x{kernel[1]}-{grouping}-{D_mul_rule}-s{stride}-d{dilation}-p{padding}"
        table.append(
            dict(
                id=case_id,
                index=index,
                in_channels=C_in,
                out_channels=C_out,
                groups=groups,
                kernel_size=kernel,
                D_mul=D_mul,
                stride=stride,
                dilation=dilation,
                padding=padding,
                bias=index % 2 == 0,
                depthwise_layer=False,
            )
        )
    # Twins of the depthwise cases (groups = C_in), same parameters: the Keras adapter builds them as
    # DODepthwiseConv2D, the others as their grouped layer again, so the two meet in every comparison.
    table += [
        dict(case, id=case["id"] + "-dwlayer", depthwise_layer=True)
        for case in table
        if case["groups"] == case["in_channels"]
    ]
    return table


def params(case: dict) -> dict:
    """Canonical float32 parameters, D far from zero, the same in every environment."""
    rng = np.random.default_rng(1000 + case["index"])
    C_in, C_out, g = case["in_channels"], case["out_channels"], case["groups"]
    K = case["kernel_size"][0] * case["kernel_size"][1]
    W = rng.normal(0, 0.5, size=(C_out, C_in // g, case["D_mul"])).astype(np.float32)
    D = rng.normal(0, 0.5, size=(C_in, K, case["D_mul"])).astype(np.float32) if K > 1 else None
    bias = rng.normal(0, 0.5, size=C_out).astype(np.float32) if case["bias"] else None
    return {"W": W, "D": D, "bias": bias}


def inputs(case: dict) -> np.ndarray:
    """The input, channels first (N, C_in, H, W), float32."""
    rng = np.random.default_rng(2000 + case["index"])
    return rng.normal(size=(BATCH, case["in_channels"]) + INPUT_SPATIAL).astype(np.float32)


def reference(case: dict) -> tuple[np.ndarray, np.ndarray]:
    """The core's folded kernel and forward output (float64), channels first."""
    p = {k: None if v is None else v.astype(np.float64) for k, v in params(case).items()}
    kernel = core.fold(p["W"], p["D"], case["groups"], case["kernel_size"])
    output = core.doconv_reference(
        inputs(case).astype(np.float64),
        p["W"],
        p["D"],
        p["bias"],
        case["kernel_size"],
        case["stride"],
        case["padding"],
        case["dilation"],
        case["groups"],
    )
    return kernel, output


def close(got: np.ndarray, want: np.ndarray) -> tuple[bool, float]:
    """DESIGN.md's float32 tolerance (rtol 1e-5, atol 1e-5 · max|want|) and the relative error."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return False, float("inf")
    scale = max(float(np.max(np.abs(want))), 1e-30)
    ok = bool(np.all(np.abs(got - want) <= 1e-5 * np.abs(want) + 1e-5 * scale))
    return ok, float(np.max(np.abs(got - want)) / scale)
