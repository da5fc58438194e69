"""The demo's results: the summary with its paired difference, the printed report and the curves.

The report has two parts. Everything above :data:`MACHINE_DEPENDENT` is a function of the
settings, the versions and the CPU's instruction set, and repeats exactly; the lines below it
(timing, onnxruntime's kernels) differ from machine to machine and from run to run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics

import numpy as np

from .. import __version__
from .data import optional_import
from .settings import NETWORKS, VARIANTS

MACHINE_DEPENDENT = "Machine-dependent (timing, onnxruntime's kernels; these differ between runs and machines):"

_OPTIMIZERS = {"sgd": "SGD momentum 0.9", "adam": "Adam"}

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (normal beyond): the demo
# runs a handful of seeds, where the normal 1.96 would overstate the confidence a lot.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t95(dof: int) -> float:
    """The two-sided 95% quantile of Student's t with ``dof`` degrees of freedom.

    Example:
        >>> t95(4), t95(9), t95(100)
        (2.776, 2.262, 1.96)
    """
    return _T95[dof - 1] if dof <= len(_T95) else 1.96


def _mean_std(values: list) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_difference(a: list, b: list) -> dict:
    """Mean and standard deviation of ``a - b`` per seed, with the 95% interval of the mean (Student's t).

    Example:
        >>> d = paired_difference([3, 5, 4], [1, 2, 3])
        >>> d["per_seed"], d["mean"], d["std"], [round(v, 2) for v in d["ci95"]], d["within_noise"]
        ([2, 3, 1], 2.0, 1.0, [-0.48, 4.48], True)
    """
    diffs = [x - y for x, y in zip(a, b)]
    mean, std = _mean_std(diffs)
    half = t95(len(diffs) - 1) * std / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    ci = None if half is None else [mean - half, mean + half]
    return {
        "per_seed": diffs,
        "mean": mean,
        "std": std,
        # When the interval holds 0, the seeds give no evidence that either variant is better.
        "ci95": ci,
        "within_noise": None if ci is None else ci[0] <= 0.0 <= ci[1],
    }


def summarise(backend, settings, data, runs, params, fold_diffs, saved, notes) -> dict:
    summary = {}
    for variant in VARIANTS:
        accs = [r["test_acc"][-1] for r in runs[variant]]
        # The first epoch pays one-off costs (allocation, graph tracing); the median ignores it.
        epoch_s = statistics.median(t for r in runs[variant] for t in r["epoch_seconds"])
        mean, std = _mean_std(accs)
        summary[variant] = {
            "test_acc_mean": mean,
            "test_acc_std": std,
            "test_acc_per_seed": accs,
            "params_train": params[variant]["train"],
            "params_deploy": params[variant]["deploy"],
            "seconds_per_epoch_median": epoch_s,
        }
    return {
        "doconv_version": __version__,
        "framework": settings.framework,
        "environment": backend.describe(),
        "network": NETWORKS[settings.dataset],
        "versions": {"python": platform.python_version(), "numpy": np.__version__, **backend.versions()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "settings": {**dataclasses.asdict(settings), "optimizer": settings.optimizer},
        "data": {
            **data.get("info", {"name": settings.dataset}),
            "train": int(len(data["y_train"])),
            "test": int(len(data["y_test"])),
        },
        "summary": summary,
        "difference": paired_difference(summary["DO-Conv"]["test_acc_per_seed"], summary["plain"]["test_acc_per_seed"]),
        "fold_check": {
            "per_seed": fold_diffs,
            "max_abs_diff": max(d["max_abs_diff"] for d in fold_diffs),
            "max_abs_logit": max(d["max_abs_logit"] for d in fold_diffs),
            "same_predictions": all(d["same_predictions"] for d in fold_diffs),
        },
        "deploy": saved,
        "notes": notes,
        "runs": runs,
    }


def _columns(header: list, rows: list) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, ["-" * w for w in widths], *rows]
    ]


def _points(value: float) -> str:
    """A signed value with 2 decimals, and +0.00 for what rounds to zero (never -0.00)."""
    text = f"{value:+.2f}"
    return "+0.00" if text == "-0.00" else text


def format_table(results: dict) -> list[str]:
    """The report printed at the end of a run, as lines of text.

    Args:
        results: the dictionary :func:`doconv.demo.run` returns (or ``results.json``, loaded).
    """
    s, summary, data = results["settings"], results["summary"], results["data"]
    seeds = s["seeds"]
    lines = [
        "",
        f"DO-Conv demo: {data['name']}, {data['train']} train / {data['test']} test {data.get('unit', 'images')}",
        results["environment"],
    ]
    if results.get("network"):
        lines.append(f"network: {results['network']}")
    lines += [
        f"{seeds} seed(s) x {s['epochs']} epochs, the same initial kernels and batches for both variants; "
        f"{_OPTIMIZERS[s['optimizer']]}, lr {s['lr']} (1 warm-up epoch, cosine), batch {s['batch_size']}, "
        f"weight decay {s['weight_decay']}; D_mul {s['D_mul'] or 'K (default)'}",
        "",
    ]
    seed_cols = [f"seed {i}" for i in range(seeds)] if seeds <= 5 else []
    header = ["variant", "test acc (mean ± std)", *seed_cols, "params (train)", "params (deploy)"]
    rows = []
    for variant in VARIANTS:
        v = summary[variant]
        rows.append(
            [
                variant,
                f"{100 * v['test_acc_mean']:.2f} ± {100 * v['test_acc_std']:.2f} %",
                *([f"{100 * a:.2f}" for a in v["test_acc_per_seed"]] if seed_cols else []),
                f"{v['params_train']:,}",
                f"{v['params_deploy']:,}",
            ]
        )
    lines += _columns(header, rows)
    d = results["difference"]
    if not seed_cols:
        # Too many seeds for columns: one row per variant, and the paired differences.
        per_seed = [[v, *(f"{100 * a:.2f}" for a in summary[v]["test_acc_per_seed"])] for v in VARIANTS]
        per_seed.append(["difference", *(_points(100 * x) for x in d["per_seed"])])
        lines += ["", f"test accuracy (%) per seed, seeds 0-{seeds - 1}:"]
        lines += _columns(["", *(str(i) for i in range(seeds))], per_seed)
    if d["within_noise"] is None:
        verdict = "one seed: run more (--seeds) to see the seed-to-seed spread"
    else:
        lo, hi = (100 * v for v in d["ci95"])
        verdict = f"95% interval [{_points(lo)}, {_points(hi)}] " + (
            "holds 0: within seed-to-seed noise, no evidence either way"
            if d["within_noise"]
            else "excludes 0: " + ("DO-Conv" if d["mean"] > 0 else "plain") + " better beyond seed-to-seed noise"
        )
    f = results["fold_check"]
    lines += [
        "",
        f"DO-Conv - plain test accuracy: {_points(100 * d['mean'])} ± {100 * d['std']:.2f} points, paired by seed "
        f"({verdict})",
        f"Folded network vs DO-Conv network on the test set: max |logit difference| {f['max_abs_diff']:.2e} "
        f"(largest |logit| {f['max_abs_logit']:.1f}); same predicted classes: "
        + ("yes" if f["same_predictions"] else "NO"),
    ]
    for note in results.get("notes", []):
        lines.append(f"Note: {note}")
    plain_s = summary["plain"]["seconds_per_epoch_median"]
    doconv_s = summary["DO-Conv"]["seconds_per_epoch_median"]
    lines += [
        "",
        MACHINE_DEPENDENT,
        f"Time per epoch (median): plain {plain_s:.3f} s, DO-Conv {doconv_s:.3f} s; "
        f"DO-Conv / plain {doconv_s / plain_s:.2f}x",
    ]
    deploy = results.get("deploy") or {}
    if "onnx_max_abs_diff" in deploy:
        lines.append(f"ONNX (onnxruntime) vs folded network: max |logit difference| {deploy['onnx_max_abs_diff']:.2e}")
    if "onnx_error" in deploy:
        lines.append(f"ONNX export failed, skipped: {deploy['onnx_error']}")
    return lines


def plot(results: dict, path: str, title: str) -> None:
    """Loss and accuracy (%) at every epoch, both variants: mean over seeds, shaded min..max.

    The third panel zooms on the test accuracy of the second half of training, where the variants
    differ, and labels each variant's last-epoch mean: the table's number.
    """
    matplotlib = optional_import("matplotlib", "matplotlib", "the demo's plot")
    matplotlib.use("Agg")  # no display needed; safe to call before pyplot is imported
    import matplotlib.pyplot as plt

    runs, settings = results["runs"], results["settings"]
    epochs = np.arange(1, settings["epochs"] + 1)
    seeds = settings["seeds"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    colours = {"plain": "tab:blue", "DO-Conv": "tab:orange"}
    panels = [
        (axes[0], "loss", ("train_loss", "test_loss"), "cross-entropy", 1.0),
        (axes[1], "accuracy, every epoch", ("train_acc", "test_acc"), "accuracy (%)", 100.0),
    ]
    for ax, title_, keys, ylabel, scale in panels:
        for variant in VARIANTS:
            for key, style in zip(keys, ("--", "-")):
                curves = scale * np.array([r[key] for r in runs[variant]])
                ax.plot(epochs, curves.mean(0), style, color=colours[variant], label=f"{variant}, {key.split('_')[0]}")
                if len(curves) > 1:
                    ax.fill_between(epochs, curves.min(0), curves.max(0), color=colours[variant], alpha=0.15)
        if title_ == "loss":
            ax.set_yscale("log")  # late epochs differ by small amounts that a linear axis flattens
        ax.set_title(title_)
        ax.set_ylabel(ylabel)
    ax = axes[2]
    first = len(epochs) // 2  # 0 for a 1-epoch run: every epoch
    for variant in VARIANTS:
        curves = 100.0 * np.array([r["test_acc"] for r in runs[variant]])[:, first:]
        final = 100.0 * results["summary"][variant]["test_acc_mean"]
        label = f"{variant}, test: {final:.2f} % at the end"
        ax.plot(epochs[first:], curves.mean(0), "-o", ms=3, color=colours[variant], label=label)
        if len(curves) > 1:
            ax.fill_between(epochs[first:], curves.min(0), curves.max(0), color=colours[variant], alpha=0.15)
    ax.set_title(f"test accuracy, epochs {first + 1}-{len(epochs)} (zoom)")
    ax.set_ylabel("accuracy (%)")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}: mean of {seeds} seed(s), band from the lowest to the highest seed")
    fig.savefig(path, dpi=100)
    plt.close(fig)
