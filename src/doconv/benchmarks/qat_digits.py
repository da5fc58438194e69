"""Int8 accuracy on the digits data: DO-Conv against plain convolutions, post-training and quantization-aware.

For every seed, a small Conv-BN-ReLU network is built twice from that seed, once with ``nn.Conv2d`` and once
with :class:`~doconv.torch.DOConv2d`, and each goes through two int8 chains with the same hyper-parameters:

* **PTQ**: float training, ``fuse_model`` (DO-Conv), ``torch.export``, torchao's ``prepare_pt2e`` with the x86
  quantizer's default static config, calibration on the training images, ``convert_pt2e``;
* **QAT**: the float-trained network, :func:`~doconv.torch.quantization.export_for_qat`,
  ``prepare_qat_pt2e``, a few epochs of fine-tuning with fake-quantized weights and activations (for DO-Conv
  the fake-quantizer sits on the composed kernel, and W and D train),
  :func:`~doconv.torch.quantization.fuse_exported` (DO-Conv), ``convert_pt2e``.

The table gives test accuracy (%) of the float model, of its PTQ int8 model, and of the QAT int8 model.
Everything runs on one CPU thread from fixed seeds, so the numbers repeat exactly on the same software.

Run ``python -m doconv.benchmarks.qat_digits`` (``--seeds``, ``--epochs``); it needs torchao and scikit-learn.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from doconv._optional import require
from doconv.cli import _positive_int
from doconv.torch import DOConv2d, fuse_model
from doconv.torch.quantization import export_for_qat, fuse_exported, unquantized_convolutions

Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

HYPER = {"epochs": 8, "batch": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "width": 8}
# Quantization-aware fine-tuning of the float-trained network, as torchao's QAT recipe does it.
QAT = {"epochs": 3, "lr": 0.005}


def digits(size: int = 8, test_fraction: float = 0.25) -> Data:
    """scikit-learn's 8x8 digits as float tensors (N, 1, size, size) in [0, 1], split by a fixed permutation.

    Args:
        size: image side; other than 8, the images are resized bilinearly. Default 8.
        test_fraction: share of the 1797 images held out. Default 0.25.

    Returns:
        ``(x_train, y_train, x_test, y_test)``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def small_cnn(conv: Callable[..., nn.Module] = nn.Conv2d, width: int = 16, in_channels: int = 1) -> nn.Sequential:
    """Three 3x3 Conv-BN-ReLU blocks (the second strided), global pooling and a linear classifier.

    Args:
        conv: the convolution class, ``nn.Conv2d`` or ``DOConv2d``. Default ``nn.Conv2d``.
        width: channels of the first block; the others have twice as many. Default 16.
        in_channels: input channels. Default 1.

    Example:
        >>> small_cnn(width=4)(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    w = width
    return nn.Sequential(
        conv(in_channels, w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        conv(w, 2 * w, 3, 2, 1, bias=False),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),
        conv(2 * w, 2 * w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * w, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, hyper: Optional[dict] = None):
    """SGD with momentum, cosine learning rate, full batches only (an exported graph has a fixed batch size).

    Works on a module and on an exported (prepared) graph alike; returns the last epoch's mean loss.
    """
    hyper = {**HYPER, **(hyper or {})}
    batch = hyper["batch"]
    optimizer = torch.optim.SGD(
        model.parameters(), lr=hyper["lr"], momentum=hyper["momentum"], weight_decay=hyper["weight_decay"]
    )
    steps = epochs * (len(y) // batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        losses = []
        for start in range(0, len(y) - batch + 1, batch):
            index = order[start : start + batch]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    return statistics.mean(losses) if losses else float("nan")


def predict(model: Callable, x: torch.Tensor, batch: int = HYPER["batch"]) -> torch.Tensor:
    """Top-1 classes, in batches of ``batch`` (the last one padded, for graphs exported at that batch size)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            chunk = x[start : start + batch]
            n = len(chunk)
            if n < batch:
                chunk = torch.cat([chunk, chunk[:1].expand(batch - n, *chunk.shape[1:])])
            out.append(model(chunk)[:n].argmax(1))
    return torch.cat(out)


def accuracy(model: Callable, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * (predict(model, x) == y).float().mean().item()


def agreement(a: Callable, b: Callable, x: torch.Tensor) -> float:
    """Percent of inputs on which the two models' top-1 classes agree."""
    return 100.0 * (predict(a, x) == predict(b, x)).float().mean().item()


def _quantizer(is_qat: bool):
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=is_qat))


def _checked(graph):
    left = unquantized_convolutions(graph)
    if left:
        raise RuntimeError(f"convert_pt2e left convolutions in float: {left}")
    return graph


def post_training_int8(model: nn.Module, calibration: torch.Tensor, batch: int = HYPER["batch"]):
    """The PTQ chain on a trained model: fuse_model, export, prepare_pt2e, calibrate, convert_pt2e."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    has_doconv = any(isinstance(m, DOConv2d) for m in model.modules())
    fused = (fuse_model(model) if has_doconv else copy.deepcopy(model)).eval()
    exported = torch.export.export(fused, (calibration[:batch],)).module()
    prepared = prepare_pt2e(exported, _quantizer(is_qat=False))
    with torch.no_grad():
        for start in range(0, len(calibration) - batch + 1, batch):
            prepared(calibration[start : start + batch])
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    return _checked(converted)


def prepare_qat(model: nn.Module, example: torch.Tensor):
    """export_for_qat and prepare_qat_pt2e: the graph to train with fake-quantized kernels and activations."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    return prepare_qat_pt2e(export_for_qat(model.train(), (example,)), _quantizer(is_qat=True))


def convert_qat(prepared):
    """fuse_exported (where there are DO-Conv kernels) and convert_pt2e: the int8 graph, in eval mode."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    if any(node.op == "get_attr" and "doconv_fold" in node.meta for node in prepared.graph.nodes):
        fuse_exported(prepared)
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    return _checked(converted)


def run_seed(
    seed: int, conv: Callable[..., nn.Module], data: Data, epochs: int, qat_epochs: int = QAT["epochs"]
) -> dict[str, float]:
    """Float, PTQ int8 and QAT int8 test accuracy of one network built from ``seed``."""
    x_train, y_train, x_test, y_test = data
    batch = HYPER["batch"]
    torch.manual_seed(seed)
    model = small_cnn(conv, HYPER["width"])
    train(model, x_train, y_train, epochs, seed)
    model.eval()
    result = {"float": accuracy(model, x_test, y_test)}
    result["ptq_int8"] = accuracy(post_training_int8(model, x_train, batch), x_test, y_test)
    prepared = prepare_qat(model, x_train[:batch])
    train(prepared, x_train, y_train, qat_epochs, seed + 1, {"lr": QAT["lr"]})
    result["qat_int8"] = accuracy(convert_qat(prepared), x_test, y_test)
    return result


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=_positive_int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument(
        "--epochs", type=_positive_int, default=HYPER["epochs"], help=f"float training, default {HYPER['epochs']}"
    )
    parser.add_argument(
        "--qat-epochs", type=_positive_int, default=QAT["epochs"], help=f"QAT fine-tuning, default {QAT['epochs']}"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread: the same sums in the same order, so the same numbers every run
    torchao = require("torchao", "doconv.benchmarks.qat_digits", "quant", "torchao (PT2E quantization)")

    data = digits()
    sizes = f"digits 8x8: {len(data[1])} train, {len(data[3])} test"
    print(f"torch {torch.__version__}, torchao {torchao.__version__}; {sizes}")
    qat = dict(QAT, epochs=args.qat_epochs)
    print(f"hyper-parameters (both variants): {dict(HYPER, epochs=args.epochs)}, QAT fine-tuning {qat}, SGD, cosine")
    print("test accuracy %: float model, its PTQ int8 model, its QAT-fine-tuned int8 model (x86 quantizer, default)")
    print(f"{'seed':>4} {'variant':>8} {'float':>7} {'ptq_int8':>9} {'qat_int8':>9}")
    variants = {"plain": nn.Conv2d, "doconv": DOConv2d}
    table: dict[str, list[dict]] = {name: [] for name in variants}
    start = time.perf_counter()
    for seed in range(args.seeds):
        for name, conv in variants.items():
            r = run_seed(seed, conv, data, args.epochs, args.qat_epochs)
            table[name].append(r)
            print(f"{seed:>4} {name:>8} {r['float']:>7.2f} {r['ptq_int8']:>9.2f} {r['qat_int8']:>9.2f}", flush=True)
    for name, rows in table.items():
        cells = []
        for key in ("float", "ptq_int8", "qat_int8"):
            values = [row[key] for row in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f}±{spread:.2f}")
        print(f"mean {name:>8} " + " ".join(cells))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
