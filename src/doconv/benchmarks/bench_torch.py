"""DOConv2d against nn.Conv2d, measured side by side in one process.

Every measurement alternates the variants inside each repeat (a new, seeded order each repeat),
so drift of the machine's speed hits all of them alike, and reports the median of
the per-repeat ratios. A second native copy ("control") shows the noise floor:
its ratio to the native model should read 1.00.

Run ``python -m doconv.benchmarks.bench_torch`` (or ``doconv bench``) with doconv installed (the
header line names the doconv it measures and whether its C fold kernel is built); ``--quick`` is a
seconds-long smoke run with small sizes, ``--device cuda`` measures on a GPU, ``--profile`` adds
the fold's share of a training step, ``--fold-split`` times the fold's two ways of splitting work
between threads.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

import doconv
from doconv import _fold_cpu, core
from doconv.benchmarks.report import busy_note, goal
from doconv.torch import (
    DOConv2d,
    cached_kernels,
    compose_features,
    convert_model,
    feature_composition_in_use,
    fuse_model,
    use_feature_composition,
)

# -- a ResNet-18-style network (torchvision does not work with the CPU torch here) --------------


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet18_style(num_classes: int = 10, width: int = 64) -> nn.Module:
    """ResNet-18's layout (7x7 stem, max-pool, 4 stages of 2 basic blocks) with plain nn.Conv2d.

    Args:
        num_classes: outputs of the final linear layer. Default 10.
        width: channels of the first stage (64 in ResNet-18); the stages double it. Default 64.

    Example:
        >>> resnet18_style(width=8)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    widths = [width, 2 * width, 4 * width, 8 * width]
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    in_channels = width
    for stage, out_channels in enumerate(widths):
        stride = 1 if stage == 0 else 2
        layers += [BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels)]
        in_channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    return nn.Sequential(*layers)


# -- MobileNetV2- and EfficientNet-B0-style networks: inverted residuals with depthwise convolutions --


class InvertedResidual(nn.Module):
    """1x1 expansion, depthwise k x k, optional squeeze-and-excitation, 1x1 projection; a residual
    where the shapes allow (MobileNetV2's block with ReLU6, EfficientNet's MBConv with SiLU and SE)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int, kernel: int, se: bool, act):
        super().__init__()
        hidden = in_channels * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act()]
        layers += [
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            act(),
        ]
        self.body = nn.Sequential(*layers)
        squeezed = max(1, in_channels // 4)
        self.se = (
            nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, squeezed, 1), nn.SiLU(), nn.Conv2d(squeezed, hidden, 1)
            )
            if se
            else None
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.se is not None:
            y = y * torch.sigmoid(self.se(y))
        y = self.project(y)
        return x + y if self.residual else y


# (expansion, kernel, stride, output channels, repeats) per stage
_MOBILENET_V2 = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 3, 2, 32, 3), (6, 3, 2, 64, 4), (6, 3, 1, 96, 3)]
_MOBILENET_V2 += [(6, 3, 2, 160, 3), (6, 3, 1, 320, 1)]
_EFFICIENTNET_B0 = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3)]
_EFFICIENTNET_B0 += [(6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


def _inverted_residual_net(stages, se: bool, act, num_classes: int, width: float) -> nn.Module:
    def channels(c: int) -> int:
        return max(8, int(c * width + 4) // 8 * 8)  # multiples of 8, as both papers round them

    stem = channels(32)
    layers: list[nn.Module] = [nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), act()]
    in_channels = stem
    for expand, kernel, stride, out, repeats in stages:
        for i in range(repeats):
            layers.append(
                InvertedResidual(in_channels, channels(out), stride if i == 0 else 1, expand, kernel, se, act)
            )
            in_channels = channels(out)
    head = channels(1280)
    layers += [nn.Conv2d(in_channels, head, 1, bias=False), nn.BatchNorm2d(head), act()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(head, num_classes)]
    return nn.Sequential(*layers)


def mobilenet_v2_style(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """MobileNetV2's layout (inverted residuals, depthwise 3x3, ReLU6) with plain nn.Conv2d.

    Args:
        num_classes: outputs of the final linear layer. Default 10.
        width: the width multiplier (channels rounded to multiples of 8). Default 1.0.

    Example:
        >>> mobilenet_v2_style(width=0.25)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return _inverted_residual_net(_MOBILENET_V2, False, nn.ReLU6, num_classes, width)


def efficientnet_b0_style(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """EfficientNet-B0's layout (MBConv with depthwise 3x3 and 5x5, squeeze-and-excitation, SiLU);
    arguments as :func:`mobilenet_v2_style`.

    Example:
        >>> efficientnet_b0_style(width=0.25)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return _inverted_residual_net(_EFFICIENTNET_B0, True, nn.SiLU, num_classes, width)


# -- timing ------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(variants: dict[str, Callable[[], object]], repeats: int, warmup: int, device) -> dict[str, list]:
    """Seconds per call of each variant, alternating them inside every repeat.

    Each repeat runs the variants in a new order (a seeded shuffle): a variant that fills the
    caches with memory of its own slows whatever runs next, and a fixed or merely rotated order
    would always hand that cost to the same neighbour.
    """
    names = list(variants)
    shuffle = random.Random(0).shuffle
    for _ in range(warmup):
        for name in names:
            variants[name]()
    _sync(device)
    times: dict[str, list] = {name: [] for name in names}
    for _ in range(repeats):
        order = list(names)
        shuffle(order)
        for name in order:
            _sync(device)
            start = time.perf_counter()
            variants[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: dict[str, list], name: str, base: str = "native") -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def _train_step(model: nn.Module, optimizer, x, target) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()

    return step


def _layer_step(layer: nn.Module, optimizer, x) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
        optimizer.step()

    return step


def _folding_only(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with feature composition switched off: every DO-Conv layer folds."""

    def folding_step() -> None:
        before = feature_composition_in_use()
        use_feature_composition(False)
        try:
            step()
        finally:
            use_feature_composition(before)

    return folding_step


def _eval(model: nn.Module, x) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            model(x)

    return forward


def _sgd(model: nn.Module):
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def _state_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _sizes(quick: bool) -> dict:
    if quick:
        return dict(
            batch=2, image=32, width=8, layer_channels=64, layer_batch=2, mobile_image=32, mobile_width=0.25,
            repeats=3, warmup=1,
        )  # fmt: skip
    return dict(
        batch=16, image=64, width=64, layer_channels=512, layer_batch=8, mobile_image=112, mobile_width=1.0,
        repeats=30, warmup=3,
    )  # fmt: skip


# -- peak training memory, one fresh process per variant -------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_child(variant: str, quick: bool, device: str) -> None:
    """Print the peak memory of three training steps above the memory before them (bytes)."""
    sizes = _sizes(quick)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = resnet18_style(width=sizes["width"]).to(dev)
    if variant == "doconv":
        model = convert_model(model)
    x = torch.randn(sizes["batch"], 3, sizes["image"], sizes["image"], device=dev)
    target = torch.randint(0, 10, (sizes["batch"],), device=dev)
    step = _train_step(model, _sgd(model), x, target)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated() - before)
        return
    before = _rss_bytes()
    for _ in range(3):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak - before)


def _peak_memory(variant: str, quick: bool, device: str) -> int:
    code = f"from doconv.benchmarks.bench_torch import _memory_child; _memory_child({variant!r}, {quick}, {device!r})"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(done.stdout.strip().splitlines()[-1])


# -- the measurements --------------------------------------------------------------------------


def run(quick: bool = False, device: str = "cpu", repeats: int | None = None, memory: bool = True) -> list[dict]:
    """Measure every ratio; returns one row per measurement.

    Args:
        quick: small sizes and few repeats, for a smoke run. Default False.
        device: 'cpu' or 'cuda'. Default 'cpu'.
        repeats: override the number of repeats. Default None (30, or 3 with quick).
        memory: also measure peak training memory (two subprocesses). Default True.

    Returns:
        Rows ``{"measurement", "ratio", "control", "native_ms", "doconv_ms", "goal"}``.
    """
    sizes = _sizes(quick)
    repeats = repeats or sizes["repeats"]
    dev = torch.device(device)
    rows: list[dict] = []

    def add(measurement: str, times: dict, variant: str, target: str) -> None:
        rows.append(
            {
                "measurement": measurement,
                "ratio": median_ratio(times, variant),
                "control": median_ratio(times, "control"),
                "native_ms": 1e3 * statistics.median(times["native"]),
                "doconv_ms": 1e3 * statistics.median(times[variant]),
                "goal": target,
            }
        )

    # The whole network: same initial kernels (convert_model keeps the outputs).
    torch.manual_seed(0)
    native = resnet18_style(width=sizes["width"]).to(dev)
    control = copy.deepcopy(native)
    doconv = convert_model(native)
    folding = copy.deepcopy(doconv)
    x = torch.randn(sizes["batch"], 3, sizes["image"], sizes["image"], device=dev)
    target = torch.randint(0, 10, (sizes["batch"],), device=dev)
    net = f"ResNet-18-style, batch {sizes['batch']}, {sizes['image']}x{sizes['image']}"
    steps = {m: _train_step(model, _sgd(model), x, target) for m, model in _named(native, control, doconv).items()}
    # The same DO-Conv network folding in every layer: what feature composition changes (CPU only).
    steps["folding"] = _folding_only(_train_step(folding, _sgd(folding), x, target))
    times = side_by_side(steps, repeats, sizes["warmup"], dev)
    add(f"{net}: train step", times, "doconv", "<= 1.03")
    add(f"{net}: train step, every layer folding", times, "folding", "-")
    for model in (native, control, doconv):
        model.eval()
    fused = fuse_model(doconv)
    cached = copy.deepcopy(doconv)
    # Folding every forward fills the caches with new kernels: it is timed apart from the others.
    forwards = {m: _eval(model, x) for m, model in _named(native, control, cached).items()}
    forwards["fused"] = _eval(fused, x)
    with cached_kernels(cached):  # the explicit cache, open for the whole measurement
        times = side_by_side(forwards, repeats, sizes["warmup"], dev)
    add(f"{net}: eval forward, unfused, inside cached_kernels", times, "doconv", "<= 1.02")
    add(f"{net}: eval forward, fused", times, "fused", "1.00")
    forwards = {m: _eval(model, x) for m, model in _named(native, control, doconv).items()}
    times = side_by_side(forwards, repeats, sizes["warmup"], dev)
    add(f"{net}: eval forward, unfused, folding every forward", times, "doconv", "-")

    # Depthwise-heavy networks: many small layers, each folding once per step.
    for name, make in (("MobileNetV2-style", mobilenet_v2_style), ("EfficientNet-B0-style", efficientnet_b0_style)):
        torch.manual_seed(0)
        mobile = make(width=sizes["mobile_width"]).to(dev)
        image = sizes["mobile_image"]
        xm = torch.randn(sizes["batch"], 3, image, image, device=dev)
        models = _named(mobile, copy.deepcopy(mobile), convert_model(mobile))
        steps = {m: _train_step(model, _sgd(model), xm, target) for m, model in models.items()}
        times = side_by_side(steps, repeats, sizes["warmup"], dev)
        add(f"{name}, batch {sizes['batch']}, {image}x{image}: train step", times, "doconv", "<= 1.15")

    # The worst layer: 3x3, 512 -> 512 at 7x7, batch 8 (the fold is largest next to the conv).
    channels = sizes["layer_channels"]
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(dev)
    layers = _named(conv, copy.deepcopy(conv), DOConv2d.from_conv(conv))
    xl = torch.randn(sizes["layer_batch"], channels, 7, 7, device=dev)
    layer = f"3x3 {channels}->{channels} at 7x7, batch {sizes['layer_batch']}"
    steps = {m: _layer_step(mod, _sgd(mod), xl) for m, mod in layers.items()}
    add(f"{layer}: train step", side_by_side(steps, repeats, sizes["warmup"], dev), "doconv", "<= 1.15")
    for mod in layers.values():
        mod.eval()
    forwards = {m: _eval(mod, xl) for m, mod in layers.items()}
    with cached_kernels(layers["doconv"]):
        times = side_by_side(forwards, repeats, sizes["warmup"], dev)
    add(f"{layer}: eval forward, unfused, inside cached_kernels", times, "doconv", "<= 1.02")
    times = side_by_side(forwards, repeats, sizes["warmup"], dev)
    add(f"{layer}: eval forward, unfused, folding every forward", times, "doconv", "-")

    # The same layer at the ResNet's last stage (2x2 feature maps, the network's batch): DO-Conv
    # composes features there, and its second step is one matrix product where nn.Conv2d runs
    # the native convolution; the row shows the two side by side, with folding for comparison.
    xs = torch.randn(sizes["batch"], channels, 2, 2, device=dev)
    steps = {m: _layer_step(mod, _sgd(mod), xs) for m, mod in layers.items()}
    steps["folding"] = _folding_only(steps["doconv"])
    for mod in layers.values():
        mod.train()
    times = side_by_side(steps, repeats, sizes["warmup"], dev)
    small = f"3x3 {channels}->{channels} at 2x2, batch {sizes['batch']}"
    add(f"{small}: train step", times, "doconv", "-")
    add(f"{small}: train step, folding", times, "folding", "-")

    # Tensor bytes are exact; the pickled file adds a few bytes per key name on top.
    native_bytes, doconv_bytes = _tensor_bytes(native), _tensor_bytes(doconv)
    d_bytes = sum(m.D.numel() * m.D.element_size() for m in doconv.modules() if getattr(m, "D", None) is not None)
    file_ratio = _state_bytes(doconv) / _state_bytes(native)
    rows.append(
        {
            "measurement": f"state_dict tensor bytes (DO-Conv - native - D = {doconv_bytes - native_bytes - d_bytes} B;"
            f" saved file {file_ratio:.3f}x)",
            "ratio": doconv_bytes / native_bytes,
            "control": 1.0,
            "native_ms": None,
            "doconv_ms": None,
            "goal": f"{(native_bytes + d_bytes) / native_bytes:.3f} (= native + D)",
        }
    )
    if memory:
        native_peak = _peak_memory("native", quick, device)
        doconv_peak = _peak_memory("doconv", quick, device)
        rows.append(
            {
                "measurement": f"{net}: peak training memory",
                "ratio": doconv_peak / max(native_peak, 1),
                "control": 1.0,
                "native_ms": None,
                "doconv_ms": None,
                "goal": "<= 1.10",
            }
        )
    return rows


def _profiled_step(quick: bool, network: str, doconv: bool, steps: int) -> dict[str, float]:
    """Self CPU seconds per training step, by op (``torch.profiler``), of a native or DO-Conv network."""
    sizes = _sizes(quick)
    torch.manual_seed(0)
    if network == "resnet18":
        model, image = resnet18_style(width=sizes["width"]), sizes["image"]
    else:
        make = {"mobilenet_v2": mobilenet_v2_style, "efficientnet_b0": efficientnet_b0_style}[network]
        model, image = make(width=sizes["mobile_width"]), sizes["mobile_image"]
    if doconv:
        model = convert_model(model)
    x = torch.randn(sizes["batch"], 3, image, image)
    step = _train_step(model, _sgd(model), x, torch.randint(0, 10, (sizes["batch"],)))
    step()
    with torch.profiler.profile() as profile:
        for _ in range(steps):
            step()
    return {e.key: e.self_cpu_time_total * 1e-6 / steps for e in profile.key_averages()}


_FOLD_OPS = ("_FoldCPU", "_FoldCPUBackward")


def fold_share(quick: bool = False, steps: int = 3, network: str = "resnet18") -> float:
    """The share of a DO-Conv network's training step spent folding (forward and backward).

    Measured with ``torch.profiler``: self CPU time of the fold's autograd nodes over all ops.
    Eager CPU only (the C kernel or NumPy path; the einsum path shows up as its aten ops).

    Args:
        quick: the quick sizes. Default False.
        steps: training steps profiled. Default 3.
        network: 'resnet18', 'mobilenet_v2' or 'efficientnet_b0'. Default 'resnet18'.
    """
    ops = _profiled_step(quick, network, True, steps)
    return sum(ops.get(op, 0.0) for op in _FOLD_OPS) / sum(ops.values())


def where_the_rest_goes(quick: bool = False, steps: int = 3, network: str = "resnet18", top: int = 5) -> list:
    """The ops whose self CPU time per training step grows most from the native network to DO-Conv.

    Returns:
        Up to ``top`` pairs ``(op, extra milliseconds per step)``, largest first, the fold's own
        nodes included; profiling inflates small ops, so read them as a ranking.
    """
    native = _profiled_step(quick, network, False, steps)
    doconv = _profiled_step(quick, network, True, steps)
    extra = {op: 1e3 * (t - native.get(op, 0.0)) for op, t in doconv.items()}
    return sorted(extra.items(), key=lambda item: -item[1])[:top]


def composing_layers(quick: bool = False) -> tuple[list[str], list[str]]:
    """Which DO-Conv layers of the ResNet-18-style net compose features in a training step, and which fold.

    Returns:
        (names of the layers composing features, names of the layers folding); 1x1 layers (no D) in neither.
    """
    sizes = _sizes(quick)
    model = convert_model(resnet18_style(width=sizes["width"]))
    features: list[str] = []
    folding: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, DOConv2d) and module.D is not None:

            def record(module, inputs, name=name) -> None:
                (features if module._composes_features(inputs[0]) else folding).append(name)

            hooks.append(module.register_forward_pre_hook(record))
    model(torch.randn(sizes["batch"], 3, sizes["image"], sizes["image"]))
    for hook in hooks:
        hook.remove()
    return features, folding


# The ResNet-18-style net's parts, as indices into its nn.Sequential (resnet18_style): the 7x7
# stem and each stage's two basic blocks.
RESNET_PARTS = {"stem": (0,), "stage 1": (4, 5), "stage 2": (6, 7), "stage 3": (8, 9), "stage 4": (10, 11)}


def part_by_part(quick: bool = False, repeats: int | None = None) -> dict[str, float]:
    """The ResNet-18-style training step with DO-Conv in one part of the net only, each / native.

    Every variant converts one part (:data:`RESNET_PARTS`) and keeps ``nn.Conv2d`` elsewhere; all
    are timed side by side with the native net and the whole DO-Conv net, so each part's excess
    over 1.00 is what that part adds to the whole net's, measured rather than attributed by op.

    Returns:
        ``{"all": ratio, part name: ratio, ..., "control": native / native}``.
    """
    sizes = _sizes(quick)
    torch.manual_seed(0)
    base = resnet18_style(width=sizes["width"])
    nets = {"native": base, "control": copy.deepcopy(base), "all": convert_model(base)}
    for name, indices in RESNET_PARTS.items():
        net = copy.deepcopy(base)
        for i in indices:
            net[i] = convert_model(nn.Sequential(net[i]))[0]  # the stem is a bare nn.Conv2d
        nets[name] = net
    x = torch.randn(sizes["batch"], 3, sizes["image"], sizes["image"])
    target = torch.randint(0, 10, (sizes["batch"],))
    steps = {name: _train_step(net, _sgd(net), x, target) for name, net in nets.items()}
    times = side_by_side(steps, repeats or sizes["repeats"], sizes["warmup"], torch.device("cpu"))
    return {name: median_ratio(times, name) for name in nets if name != "native"}


def fold_traffic_floor(quick: bool = False, folding: list[str] | None = None) -> tuple[float, float]:
    """The memory traffic the folding layers add to a training step, and this machine's speed for it.

    Per step a folding layer must read W and write the folded kernel, then read the kernel's
    gradient and W again and write W's gradient: five passes over kernel-sized tensors (those layers
    of the ResNet-18-style net that fold, see :func:`composing_layers`), whatever the kernels'
    arithmetic. The bandwidth is that of summing a tensor larger than the caches (the median of five
    reads).

    Args:
        quick: the quick sizes. Default False.
        folding: the names of the folding layers, as :func:`composing_layers` returns them. Default
            None (found here).

    Returns:
        (bytes moved per step, bytes per second).
    """
    sizes = _sizes(quick)
    model = convert_model(resnet18_style(width=sizes["width"]))
    if folding is None:
        _, folding = composing_layers(quick)
    kernels = [model.get_submodule(name).W for name in folding]
    kernel_bytes = sum(W.numel() * W.element_size() for W in kernels)
    probe = torch.ones((2 << 20) if quick else (50 << 20))  # 8 MB quick, else 200 MB
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        probe.sum()
        seconds.append(time.perf_counter() - start)
    return 5.0 * kernel_bytes, probe.numel() * probe.element_size() / statistics.median(seconds)


def composition_sweep(quick: bool = False, repeats: int | None = None) -> list[dict]:
    """Training steps of one 3x3 layer composing features vs folding, from few output positions to many.

    The measurements behind ``core.FEATURE_COMPOSITION_MARGIN``: a 512->512 layer (64 with quick),
    D_mul = 9, padding 1, at batches and feature-map sizes whose feature composition costs from an
    eighth of the fold's multiply-adds to as much. Both variants train the same layer, alternating.

    Returns:
        Rows ``{"input", "macs_ratio" (feature / fold multiply-adds), "ratio" (feature / fold time),
        "fold_ms"}``.
    """
    sizes = _sizes(quick)
    repeats = repeats or sizes["repeats"]
    channels = sizes["layer_channels"]
    cases = [(2, 2), (2, 4), (1, 7), (2, 8)] if quick else [(16, 2), (16, 4), (8, 7), (32, 4)]
    rows = []
    for batch, size in cases:
        torch.manual_seed(0)
        layer = DOConv2d(channels, channels, 3, padding=1, bias=False)
        x = torch.randn(batch, channels, size, size)
        optimizer = _sgd(layer)

        def features_step(layer=layer, x=x, optimizer=optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            geometry = ((3, 3), (1, 1), (1, 1), (1, 1), 1)
            compose_features(x, layer.W, layer.D, layer.identity, None, *geometry).square().mean().backward()
            optimizer.step()

        steps = {"folding": _folding_only(_layer_step(layer, optimizer, x)), "features": features_step}
        times = side_by_side(steps, repeats, sizes["warmup"], torch.device("cpu"))
        fold, feature = core.composition_macs(batch * size * size, channels, channels, 1, 9, 9)
        rows.append(
            {
                "input": f"batch {batch}, {size}x{size}",
                "macs_ratio": feature / fold,
                "ratio": median_ratio(times, "features", base="folding"),
                "fold_ms": 1e3 * statistics.median(times["folding"]),
            }
        )
    return rows


def fold_split(quick: bool = False, repeats: int | None = None) -> list[dict]:
    """The C kernel's fold (forward and backward) split on torch's OpenMP threads vs on a Python pool.

    The measurement behind keeping ``_fold_cpu.openmp_parallel_address`` (the /proc/self/maps and
    ctypes lookup of torch's OpenMP runtime): it stays only while the pool is slower by more than
    the noise, which the second OpenMP copy ("control") shows. Layers 3x3 C -> C, D_mul 9.

    Returns:
        Rows ``{"layer", "ratio" (pool / OpenMP), "control" (OpenMP / OpenMP), "openmp_ms"}``;
        empty where the C kernel is not built or torch's OpenMP runtime was not found.
    """
    from doconv.torch import folding

    if folding._foldkernel is None or not folding._GOMP:
        return []
    sizes = _sizes(quick)
    repeats = repeats or sizes["repeats"]
    rows = []
    for channels in (64, 256) if quick else (128, 256, 512):
        g = torch.Generator().manual_seed(0)
        W = torch.randn(channels, channels, 9, generator=g, requires_grad=True)
        D = torch.randn(channels, 9, 9, generator=g, requires_grad=True)
        identity = torch.as_tensor(core.identity(9, 9))
        shape = [channels, channels, 3, 3]
        upstream = torch.randn(shape, generator=g)

        def fold_and_grad(openmp: bool, W=W, D=D, identity=identity, shape=shape, upstream=upstream) -> None:
            folding._GOMP = openmp
            try:
                torch.autograd.grad(folding._fold_fast(W, D, identity, 1, shape), (W, D), upstream)
            finally:
                folding._GOMP = True

        variants = {"openmp": lambda: fold_and_grad(True), "control": lambda: fold_and_grad(True)}
        variants["pool"] = lambda: fold_and_grad(False)
        times = side_by_side(variants, repeats, sizes["warmup"], torch.device("cpu"))
        rows.append(
            {
                "layer": f"3x3 {channels}->{channels}",
                "ratio": median_ratio(times, "pool", base="openmp"),
                "control": median_ratio(times, "control", base="openmp"),
                "openmp_ms": 1e3 * statistics.median(times["openmp"]),
            }
        )
    return rows


def which_doconv() -> tuple[str, bool]:
    """(where the measured doconv is imported from and whether its C fold kernel is built, a warning or '')."""
    location = os.path.dirname(doconv.__file__)
    built = _fold_cpu.kernel is not None
    where = f"doconv {doconv.__version__} from {location}, C fold kernel {'built' if built else 'NOT built'}"
    installed = any(part in location for part in ("site-packages", "dist-packages"))
    warning = ""
    if not built:
        warning = (
            "WARNING: doconv's C fold kernel is not built here"
            + ("" if installed else " (this doconv is a source tree)")
            + ": these numbers measure the NumPy fallback, not the installed package. "
            "Install with `pip install .` where a C compiler is available."
        )
    return where, warning


def _named(native: nn.Module, control: nn.Module, doconv: nn.Module) -> dict[str, nn.Module]:
    return {"native": native, "control": control, "doconv": doconv}


def format_table(rows: list[dict]) -> str:
    """Render rows as a Markdown table."""
    lines = [
        "| measurement | DO-Conv / native | control (native / native) | native ms | DO-Conv ms | goal |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ms = ["-" if row[k] is None else f"{row[k]:.1f}" for k in ("native_ms", "doconv_ms")]
        lines.append(
            f"| {row['measurement']} | {row['ratio']:.3f} | {row['control']:.3f} | {ms[0]} | {ms[1]} | {row['goal']} |"
        )
    return "\n".join(lines)


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print a title line, then a Markdown table."""
    print(title)
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main(argv: list[str] | None = None) -> int:
    """Print the ratio table. Returns 0.

    Args:
        argv: command-line arguments (``--quick``, ``--device``, ``--threads``, ``--repeats``,
            ``--no-memory``, ``--json PATH``). Default None (sys.argv).
    """
    parser = argparse.ArgumentParser(prog="bench_torch", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument(
        "--numpy-fold", action="store_true", help="measure the NumPy fallback instead of the C fold kernel"
    )
    parser.add_argument(
        "--composition-sweep",
        action="store_true",
        help="only time one layer composing features vs folding at several input sizes (CPU)",
    )
    parser.add_argument(
        "--fold-split",
        action="store_true",
        help="only time the C kernel's fold split on torch's OpenMP threads vs on a Python thread pool (CPU)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print the fold's share of a training step (torch.profiler) and its memory-traffic floor",
    )
    args = parser.parse_args(argv)
    if args.numpy_fold:
        from doconv.torch import folding

        folding._foldkernel = None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_torch: --device cuda asked for, but CUDA is not available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    where, warning = which_doconv()
    if warning:
        print(warning, file=sys.stderr)
    print(where)
    if args.fold_split:
        rows = fold_split(quick=args.quick, repeats=args.repeats)
        if not rows:
            print("bench_torch: --fold-split needs the C kernel and torch's OpenMP runtime", file=sys.stderr)
            return 2
        _print_table(
            f"fold forward + backward, D_mul 9: Python pool / torch's OpenMP threads, CPU, {args.threads} threads",
            ["layer", "pool / OpenMP", "control (OpenMP / OpenMP)", "OpenMP ms"],
            [[r["layer"], f"{r['ratio']:.3f}", f"{r['control']:.3f}", f"{r['openmp_ms']:.2f}"] for r in rows],
        )
        return 0
    if args.composition_sweep:
        sweep = composition_sweep(quick=args.quick, repeats=args.repeats)
        channels = _sizes(args.quick)["layer_channels"]
        where = f"CPU, {args.threads} threads"
        _print_table(
            f"3x3 {channels}->{channels}, D_mul 9, train step: composing features / folding, {where}",
            ["input", "feature / fold multiply-adds", "feature / fold time", "folding ms"],
            [[r["input"], f"{r['macs_ratio']:.3f}", f"{r['ratio']:.3f}", f"{r['fold_ms']:.1f}"] for r in sweep],
        )
        return 0
    rows = run(quick=args.quick, device=args.device, repeats=args.repeats, memory=not args.no_memory)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    if not args.device.startswith("cuda"):
        from doconv.torch import folding

        where += ", fold: " + ("C kernel" if folding._foldkernel is not None else "NumPy")
    print(f"doconv.torch vs nn.Conv2d — torch {torch.__version__}, {where}; median of per-repeat ratios")
    for row in rows:  # goals were set for the full-size run only
        row["goal"] = goal(row["goal"], not args.quick)
    print(format_table(rows))
    note = busy_note(row["control"] for row in rows if row.get("native_ms") is not None)
    if note:
        print(note)
    if args.profile and not args.device.startswith("cuda"):
        share = fold_share(quick=args.quick)
        print(f"fold (forward + backward) share of a DO-Conv ResNet-18-style training step: {100 * share:.1f} %")
        for network, name in (("mobilenet_v2", "MobileNetV2-style"), ("efficientnet_b0", "EfficientNet-B0-style")):
            share = fold_share(quick=args.quick, network=network)
            print(f"fold (forward + backward) share of a DO-Conv {name} training step: {100 * share:.1f} %")
        for network, name in (("resnet18", "ResNet-18-style"), ("mobilenet_v2", "MobileNetV2-style")):
            rest = where_the_rest_goes(quick=args.quick, network=network)
            print(f"{name}, DO-Conv step minus native, by op: " + ", ".join(f"{op} {ms:+.1f} ms" for op, ms in rest))
        parts = part_by_part(quick=args.quick, repeats=args.repeats)
        excess = sum(parts[name] - 1 for name in RESNET_PARTS)
        print(
            "ResNet-18-style train step with DO-Conv in one part only / native: "
            + ", ".join(f"{name} {parts[name]:.3f}" for name in RESNET_PARTS)
            + f"; the parts' excesses sum to {excess:.3f}, the whole net's is {parts['all'] - 1:.3f}"
            + f" (control {parts['control']:.3f})"
        )
        features, folding = composing_layers(quick=args.quick)
        print(
            f"layers composing features in a training step: {len(features)} of {len(features) + len(folding)} "
            f"with a depthwise kernel ({', '.join(features) or 'none'})"
        )
        moved, bandwidth = fold_traffic_floor(quick=args.quick, folding=folding)
        floor_ms, native_ms = 1e3 * moved / bandwidth, rows[0]["native_ms"]
        print(
            f"fold memory-traffic floor: {moved / 1e6:.1f} MB per step at {bandwidth / 1e9:.1f} GB/s = "
            f"{floor_ms:.1f} ms, {100 * floor_ms / native_ms:.1f} % of the native step ({native_ms:.1f} ms)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
