"""The demo beyond the CLI basics of test_cli.py: MNIST-1D, repeatability, the unfused checkpoint and ``doconv fuse``.

Runs in the torch tox env, in quick mode (a seed or a few, an epoch or two, a few hundred MNIST-1D samples).
"""

import json

import numpy as np
import pytest

from doconv import cli
from doconv.demo import MACHINE_DEPENDENT, Settings, TorchBackend, format_table

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")


def run_cli(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def load(path):
    return torch.load(path, weights_only=True)


def assert_fuse_equals_the_demo(capsys, out, settings, *fuse_args):
    """``doconv fuse model_doconv.pt`` gives the demo's folded state_dict, to float32 rounding, and its predictions."""
    status, stdout, err = run_cli(capsys, "fuse", out / "model_doconv.pt", "-o", out / "fused.pt", *fuse_args)
    assert status == 0, err
    ours, demos = load(out / "fused.pt"), load(out / "model_folded.pt")
    assert list(ours) == list(demos)
    for key in demos:
        # fuse folds in float64, the layer in float32: the two kernels agree to float32 rounding.
        scale = max(1.0, float(demos[key].abs().max())) if demos[key].is_floating_point() else 0.0
        torch.testing.assert_close(ours[key], demos[key], rtol=0, atol=1e-6 * scale)
    backend = TorchBackend(settings)
    nets = []
    for state in (ours, demos):
        net = backend.build(0)
        net.load_state_dict(state)
        nets.append(net)
    shape = (64, 1, 40) if settings.dataset == "mnist1d" else (64, 1, 8, 8)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    with torch.no_grad():
        a, b = (n.eval()(x) for n in nets)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.fixture(scope="module")
def mnist1d_run(tmp_path_factory):
    pytest.importorskip("mnist1d")
    out = tmp_path_factory.mktemp("mnist1d")
    # Six seeds: more than the table's per-seed columns, so the per-seed rows are printed.
    status = cli.main(
        ["demo", "--dataset", "mnist1d", "--seeds", "6", "--epochs", "2", "--samples", "200", "--out", str(out),
         "--no-progress"]
    )  # fmt: skip
    assert status == 0
    return out


def test_mnist1d_quick_run_writes_every_artefact(mnist1d_run, capsys):
    out = mnist1d_run
    for name in ("results.json", "curves.png", "model_folded.pt", "model_doconv.pt"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["train"] == 160 and results["data"]["test"] == 40
    assert "mnist1d" in results["data"]["name"] and "200 samples, seed 42" in results["data"]["name"]
    s = results["settings"]
    assert (s["optimizer"], s["lr"], s["batch_size"], s["weight_decay"]) == ("adam", 0.01, 100, 0.0)
    summary = results["summary"]
    # 7,710 plain parameters; DO-Conv adds D: 1*5*5 + 2 * 25*5*5.
    assert summary["plain"]["params_train"] == summary["DO-Conv"]["params_deploy"] == 7710
    assert summary["DO-Conv"]["params_train"] == 7710 + 25 + 2 * 625
    fold = results["fold_check"]
    assert fold["same_predictions"] and fold["max_abs_diff"] <= 1e-5 * max(1.0, fold["max_abs_logit"])
    d = results["difference"]
    assert np.allclose(
        d["per_seed"], np.subtract(summary["DO-Conv"]["test_acc_per_seed"], summary["plain"]["test_acc_per_seed"])
    )
    assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    lines = format_table(results)
    assert any(line.startswith("difference ") for line in lines)  # the per-seed rows
    # Timing only below the machine-dependent heading: the part above repeats exactly.
    split = lines.index(MACHINE_DEPENDENT)
    assert not any("Time per epoch" in line or " s," in line for line in lines[:split])
    assert any("Time per epoch" in line for line in lines[split:])


def test_doconv_fuse_on_the_mnist1d_checkpoint(mnist1d_run, capsys):
    out = mnist1d_run
    assert_fuse_equals_the_demo(capsys, out, Settings(dataset="mnist1d"), "--kernel-size", "5")


def test_digits_repeats_exactly_and_fuse_matches(tmp_path, capsys):
    """Two runs with the same settings give the same numbers, epoch by epoch (one thread, deterministic)."""
    pytest.importorskip("sklearn")
    curves = []
    for name in ("a", "b"):
        status, stdout, _ = run_cli(capsys, "demo", "--seeds", 1, "--epochs", 2, "--out", tmp_path / name)
        assert status == 0
        results = json.loads((tmp_path / name / "results.json").read_text())
        curves.append(
            {v: {k: r[k] for k in ("train_loss", "test_loss", "test_acc")} for v, [r] in results["runs"].items()}
        )
        reproducible = stdout.split(MACHINE_DEPENDENT)[0]
        assert "deterministic" in reproducible and "s/epoch" not in reproducible
    assert curves[0] == curves[1]
    assert_fuse_equals_the_demo(capsys, tmp_path / "a", Settings())


@pytest.mark.parametrize("args, message", [
    (["--framework", "keras", "--dataset", "mnist1d"],
     "--dataset mnist1d needs a 1-D DO-Conv layer, and doconv.keras has none (only DOConv2D): run it with --framework torch"),
    (["--framework", "gluon", "--dataset", "mnist1d"], "doconv.gluon has none (only DOConv2D)"),
    (["--dataset", "mnist"], "unknown data set 'mnist': choose one of digits, mnist1d"),
    (["--samples", "500"], "--samples applies to generated data sets (mnist1d), not to digits"),
    (["--dataset", "mnist1d", "--samples", "50"], "samples must be an integer >= 100. Received: samples=50"),
])  # fmt: skip
def test_refusals_are_one_line_usage_errors(capsys, tmp_path, args, message):
    status, _, err = run_cli(capsys, "demo", *args, "--out", tmp_path / "never")
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("doconv demo: error: ") and message in err, err
    assert not (tmp_path / "never").exists()


def test_recipes_fill_only_what_is_not_given():
    s = Settings(dataset="mnist1d", seeds=3).resolved()
    assert (s.seeds, s.epochs, s.samples, s.optimizer) == (3, 50, 10000, "adam")
    d = Settings().resolved()
    assert (d.seeds, d.epochs, d.batch_size, d.lr, d.samples, d.optimizer) == (5, 10, 32, 0.05, None, "sgd")
