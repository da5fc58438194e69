"""Train a CIFAR ResNet with plain convolutions and with DO-Conv, paired by seed, and compare.

For every seed the plain network is built once and ``doconv.torch.convert_model`` copies it
into a DO-Conv network with the same outputs (same initial kernels); both train on the same
batches, with the same augmentation, in the same order, with the same optimiser. At the end
the DO-Conv network is folded (``doconv.torch.fuse_model``) into plain ``nn.Conv2d`` layers,
and the script checks that the folded network's logits equal the DO-Conv network's and
reports its test accuracy. The summary gives both variants' accuracies over the seeds and
their paired difference with a 95 % interval (Student's t).

Network: the CIFAR ResNets of He et al. ("Deep Residual Learning for Image Recognition",
CVPR 2016, section 4.2): a 3x3 conv with 16 channels, three stages of n basic blocks (16, 32
and 64 channels, stride 2 at the start of the second and third), parameter-free shortcuts
(option A: subsampling and zero channels), global average pooling and a linear classifier;
depth 6n+2 (ResNet-20, 32, 44, 56, 110).

Recipe (He et al.'s): SGD with momentum 0.9, batch 128, lr 0.1 divided by 10 at 50 % and 75 %
of training, 164 epochs (64k iterations on 50k images), weight decay 1e-4 on conv and linear
weights (on DO-Conv's W and D too), 4-pixel zero padding with random 32x32 crops and
horizontal flips, per-channel standardisation with the training set's statistics. Mixed
precision (float16 autocast with a gradient scaler) on CUDA; float32 on CPU.

Data: a folder holding the binary version of CIFAR-10 (``data_batch_1.bin`` ...
``data_batch_5.bin`` and ``test_batch.bin``: records of 1 label byte and 3072 pixel bytes,
the red, green and blue 32x32 planes) or of CIFAR-100 (``train.bin`` and ``test.bin``: a
coarse and a fine label byte, then the pixels; the fine labels are used). The files are read
with NumPy; nothing is unpickled.

Examples::

    # ResNet-20 on CIFAR-10, plain vs DO-Conv, 5 seeds, on the first GPU
    python examples/train_cifar_torch.py --data-dir ~/cifar-10-batches-bin --depth 20 --seeds 5

    # a smoke run on CPU: two steps per run
    python examples/train_cifar_torch.py --data-dir DATA --depth 8 --seeds 2 --max-steps 2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from doconv.demo.report import paired_difference
from doconv.torch import convert_model, fuse_model

VARIANTS = ("plain", "DO-Conv")
PIXELS = 3 * 32 * 32
# (training files, test files, label bytes per record, classes); the label used is the record's last label byte.
LAYOUTS = {
    "cifar10": ([f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"], 1, 10),
    "cifar100": (["train.bin"], ["test.bin"], 2, 100),
}


# -- data ----------------------------------------------------------------------------------------


def detect_dataset(folder: str) -> str:
    """'cifar10' or 'cifar100', from the files present; ValueError naming what is missing."""
    for name, (train, test, _, _) in LAYOUTS.items():
        if all(os.path.isfile(os.path.join(folder, f)) for f in train + test):
            return name
    raise ValueError(
        f"{folder} holds neither CIFAR-10's binary files (data_batch_1.bin ... data_batch_5.bin, test_batch.bin) "
        "nor CIFAR-100's (train.bin, test.bin)"
    )


def read_records(path: str, label_bytes: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 3, 32, 32) uint8, labels (N,) int64)`` from one binary-version file."""
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + PIXELS
    if raw.size == 0 or raw.size % record:
        raise ValueError(f"{path}: {raw.size} bytes, not a whole number of {record}-byte records")
    raw = raw.reshape(-1, record)
    labels = raw[:, label_bytes - 1].astype(np.int64)
    if labels.max() >= classes:
        raise ValueError(f"{path}: label {labels.max()} found, but the data set has {classes} classes")
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32), labels


def load_cifar(folder: str, dataset: str) -> dict:
    train_files, test_files, label_bytes, classes = LAYOUTS[dataset]
    parts = {
        split: [read_records(os.path.join(folder, f), label_bytes, classes) for f in files]
        for split, files in (("train", train_files), ("test", test_files))
    }
    data = {"classes": classes}
    for split, records in parts.items():
        data[f"x_{split}"] = np.concatenate([r[0] for r in records])
        data[f"y_{split}"] = np.concatenate([r[1] for r in records])
    return data


class Augmenter:
    """4-pixel zero padding, a random 32x32 crop and a random horizontal flip, on the device, per batch.

    The offsets and flips come from a NumPy generator seeded by (seed, epoch), so both variants of
    a seed see exactly the same augmented images.
    """

    def __init__(self, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.padded = F.pad(images, (4, 4, 4, 4))  # uint8 (N, 3, 40, 40), zeros around
        self.mean, self.std = mean, std
        self.taps = torch.arange(32, device=images.device)

    def batch(self, idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        device = self.padded.device
        n = len(idx)
        dy, dx = (torch.from_numpy(rng.integers(0, 9, n)).to(device) for _ in range(2))
        flip = torch.from_numpy(rng.random(n) < 0.5).to(device)
        rows = (dy[:, None] + self.taps)[:, None, :, None]
        cols = (dx[:, None] + self.taps)[:, None, None, :]
        cols = torch.where(flip[:, None, None, None], 2 * dx[:, None, None, None] + 31 - cols, cols)
        images = self.padded[torch.from_numpy(idx).to(device)]
        channels = torch.arange(3, device=device)[None, :, None, None]
        crops = images[torch.arange(n, device=device)[:, None, None, None], channels, rows, cols]
        return (crops.float() / 255.0 - self.mean) / self.std


# -- network -------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.extra = stride, c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A of He et al.: subsample, then zero channels; no parameters, so no convolution to convert.
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, classes: int):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, c_in = [], 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


# -- training ------------------------------------------------------------------------------------


def learning_rate(args, step: int, total: int) -> float:
    return args.lr * (0.1 ** sum(step >= m * total for m in (0.5, 0.75)))


@torch.no_grad()
def predict(net: nn.Module, x: torch.Tensor, mean, std, batch: int = 1000) -> torch.Tensor:
    """Float32 logits (no autocast): the fold check compares networks, not float16 rounding."""
    net.eval()
    return torch.cat([net((x[i : i + batch].float() / 255.0 - mean) / std).float() for i in range(0, len(x), batch)])


def train(net: nn.Module, data: dict, aug: Augmenter, args, seed: int, device: torch.device, label: str) -> dict:
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        momentum=0.9,
    )
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    y_train = torch.from_numpy(data["y_train"]).to(device)
    n = len(y_train)
    steps_per_epoch = n // args.batch_size  # the last partial batch is dropped, as usual
    total = (
        steps_per_epoch * args.epochs if args.max_steps is None else min(args.max_steps, steps_per_epoch * args.epochs)
    )
    step, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        net.train()
        rng = np.random.default_rng([seed, epoch])  # the same order and augmentation for both variants
        order = rng.permutation(n)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            x = aug.batch(idx, rng)
            for group in opt.param_groups:
                group["lr"] = learning_rate(args, step, total)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = F.cross_entropy(net(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            if step % args.log_interval == 0:
                print(f"{label}: epoch {epoch} step {step}/{total} loss {loss.item():.4f}", file=sys.stderr, flush=True)
        if step >= total:
            break
    return {"steps": step, "seconds": time.perf_counter() - start}


def run_seed(seed: int, data: dict, tensors: dict, args, device: torch.device) -> dict:
    torch.manual_seed(seed)
    plain = CifarResNet(args.depth, data["classes"]).to(device)
    doconv_net = convert_model(plain)  # a copy with the same outputs: the same initial kernels
    result = {"seed": seed}
    for variant, net in (("plain", plain), ("DO-Conv", doconv_net)):
        stats = train(net, data, tensors["aug"], args, seed, device, f"seed {seed} {variant}")
        logits = predict(net, tensors["x_test"], tensors["mean"], tensors["std"])
        acc = float((logits.argmax(1) == tensors["y_test"]).float().mean())
        result[variant] = {"test_acc": acc, **stats}
        if variant == "DO-Conv":
            fused = fuse_model(net.eval())
            folded = predict(fused, tensors["x_test"], tensors["mean"], tensors["std"])
            result["fold_check"] = {
                "max_abs_diff": float((folded - logits).abs().max()),
                "max_abs_logit": float(logits.abs().max()),
                "same_predictions": bool((folded.argmax(1) == logits.argmax(1)).all()),
                "fused_test_acc": float((folded.argmax(1) == tensors["y_test"]).float().mean()),
                "params_deploy": sum(p.numel() for p in fused.parameters()),
            }
            os.makedirs(args.save_dir, exist_ok=True)
            stem = os.path.join(args.save_dir, f"{args.dataset}-resnet{args.depth}-seed{seed}")
            torch.save(net.state_dict(), stem + "-doconv.pt")
            torch.save(fused.state_dict(), stem + "-fused.pt")
        result[variant]["params_train"] = sum(p.numel() for p in net.parameters())
    return result


# -- command line --------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data-dir", required=True, help="folder holding CIFAR-10's or CIFAR-100's binary-version files")
    p.add_argument("--depth", type=int, default=20, help="6n+2: 20, 32, 44, 56, 110 (8 for a smoke run)")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1, each training both variants")
    p.add_argument("--epochs", type=int, default=164, help="164 epochs at batch 128 = He et al.'s 64k iterations")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="divided by 10 at 50 %% and 75 %% of the steps")
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay on conv and linear weights")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda where available)")
    p.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps (smoke runs)")
    p.add_argument("--log-interval", type=int, default=100, help="steps between log lines")
    p.add_argument("--save-dir", default="cifar-runs", help="folder for results.json and the checkpoints")
    args = p.parse_args(argv)
    if not os.path.isdir(args.data_dir):
        p.error(f"--data-dir {args.data_dir} is not a folder")
    if args.depth < 8 or (args.depth - 2) % 6:
        p.error(f"--depth must be 6n+2 with n >= 1 (8, 20, 32, 44, 56, 110), got {args.depth}")
    for name in ("seeds", "epochs", "batch_size", "log_interval") + (
        ("max_steps",) if args.max_steps is not None else ()
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this PyTorch sees no CUDA device")
    try:
        args.dataset = detect_dataset(args.data_dir)
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        data = load_cifar(args.data_dir, args.dataset)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if len(data["y_train"]) < args.batch_size:
        print(
            f"error: {len(data['y_train'])} training images, fewer than one batch of {args.batch_size}", file=sys.stderr
        )
        return 2
    x_train = torch.from_numpy(data["x_train"]).to(device)
    scaled = data["x_train"].astype(np.float64) / 255.0
    mean = torch.tensor(scaled.mean((0, 2, 3)), dtype=torch.float32, device=device)[None, :, None, None]
    std = torch.tensor(scaled.std((0, 2, 3)), dtype=torch.float32, device=device)[None, :, None, None]
    tensors = {
        "aug": Augmenter(x_train, mean, std),
        "x_test": torch.from_numpy(data["x_test"]).to(device),
        "y_test": torch.from_numpy(data["y_test"]).to(device),
        "mean": mean,
        "std": std,
    }
    print(
        f"{args.dataset}, {len(data['y_train'])} train / {len(data['y_test'])} test images; ResNet-{args.depth}; "
        f"{args.seeds} seed(s) x {args.epochs} epochs, batch {args.batch_size}, SGD momentum 0.9, lr {args.lr} "
        f"(/10 at 50 % and 75 %), weight decay {args.wd}; {device}"
        + (", float16 autocast" if device.type == "cuda" else ", float32"),
        flush=True,
    )
    seeds = [run_seed(seed, data, tensors, args, device) for seed in range(args.seeds)]
    for r in seeds:
        f = r["fold_check"]
        plain_acc, doconv_acc = 100 * r["plain"]["test_acc"], 100 * r["DO-Conv"]["test_acc"]
        print(
            f"seed {r['seed']}: plain {plain_acc:.2f} %, DO-Conv {doconv_acc:.2f} %"
            f" (fused {100 * f['fused_test_acc']:.2f} %, max |logit difference| {f['max_abs_diff']:.2e}, "
            f"same predictions: {'yes' if f['same_predictions'] else 'NO'})"
        )
    accs = {v: [r[v]["test_acc"] for r in seeds] for v in VARIANTS}
    for v in VARIANTS:
        mean_acc = 100 * float(np.mean(accs[v]))
        std_acc = 100 * float(np.std(accs[v], ddof=1)) if len(accs[v]) > 1 else 0.0
        print(
            f"{v}: {mean_acc:.2f} ± {std_acc:.2f} % over {len(accs[v])} seed(s), {seeds[0][v]['params_train']:,} params"
        )
    diff = paired_difference(accs["DO-Conv"], accs["plain"])
    line = f"DO-Conv - plain: {100 * diff['mean']:+.2f} ± {100 * diff['std']:.2f} points, paired by seed"
    if diff["ci95"] is not None:
        lo, hi = (100 * v for v in diff["ci95"])
        line += f", 95% interval [{lo:+.2f}, {hi:+.2f}] " + ("holds 0" if diff["within_noise"] else "excludes 0")
    print(line)
    with open(os.path.join(args.save_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "seeds": seeds, "difference": diff}, fh, indent=2)
    fold_ok = all(r["fold_check"]["same_predictions"] for r in seeds)
    return 0 if fold_ok and all(math.isfinite(a) for v in VARIANTS for a in accs[v]) else 1


if __name__ == "__main__":
    sys.exit(main())
