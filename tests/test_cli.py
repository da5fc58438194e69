"""The ``doconv`` command line: demo, fuse, bench, info, and one-line errors for bad input.

Runs in the torch tox env. ``cli.main`` is called in-process (fast, and its return value is
the exit status); two tests run ``python -m doconv`` to cover the module entry point.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from doconv import cli, core

try:
    import torch

    from doconv.torch import DOConv2d, fuse_model
except ImportError:  # the keras and gluon envs run the tests of their own demo only
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch")


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``doconv *argv``."""
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def assert_usage_error(status, err, match):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


# -- demo ------------------------------------------------------------------------------------------


@pytest.fixture
def demo_deps():
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")


@needs_torch
def test_demo_tiny_run_writes_every_artefact(demo_deps, tmp_path, capsys):
    out = tmp_path / "demo"
    # D_mul 10 > K = 9: checks that --D-mul reaches convert_model (1x1 layers stay at D_mul 1).
    status, stdout, _ = run_cli(capsys, "demo", "--epochs", 1, "--seeds", 1, "--D-mul", 10, "--out", out)
    assert status == 0
    # The ONNX export needs the demo extra's onnx, onnxscript and onnxruntime (the torch tox env has them).
    with_onnx = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
    for name in ("results.json", "curves.png", "model_folded.pt") + (("model_folded.onnx",) if with_onnx else ()):
        assert (out / name).stat().st_size > 0, name
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # the staging folder is gone
    assert "test acc (mean ± std)" in stdout and "params (deploy)" in stdout and "Saved to" in stdout

    results = json.loads((out / "results.json").read_text())
    fold = results["fold_check"]
    assert fold["same_predictions"]
    assert fold["max_abs_diff"] <= 1e-5 * max(1.0, fold["max_abs_logit"])
    if with_onnx:
        assert results["deploy"]["onnx_max_abs_diff"] <= 1e-4 * max(1.0, fold["max_abs_logit"])
    summary = results["summary"]
    assert summary["plain"]["params_train"] == summary["plain"]["params_deploy"] == summary["DO-Conv"]["params_deploy"]

    from doconv.demo import Settings, _TorchBackend
    from doconv.torch import convert_model

    backend = _TorchBackend(Settings())
    plain = backend.build(0)
    assert summary["DO-Conv"]["params_train"] == backend.count(convert_model(plain, D_mul=10))
    # The deploy state_dict is the plain network's: it loads strictly into build()'s model.
    plain.load_state_dict(torch.load(out / "model_folded.pt", weights_only=True))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32))
    assert plain.eval()(x).shape == (4, 10)

    if with_onnx:
        import onnx

        onnx.checker.check_model(str(out / "model_folded.onnx"))


@pytest.fixture
def digits_or_synthetic(monkeypatch):
    """The real digits where scikit-learn is installed; otherwise a small random stand-in of the same shapes.

    The keras and gluon envs pin what their frameworks need and may lack scikit-learn; the demo's
    framework code is what these tests check, not the data set.
    """
    pytest.importorskip("matplotlib")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        rng = np.random.default_rng(0)

        def fake_data():
            return {
                "x_train": rng.standard_normal((128, 8, 8)).astype(np.float32),
                "y_train": rng.integers(0, 10, 128),
                "x_test": rng.standard_normal((40, 8, 8)).astype(np.float32),
                "y_test": rng.integers(0, 10, 40),
            }

        monkeypatch.setattr("doconv.demo.data.load_digits", fake_data)


@pytest.mark.parametrize("framework, module, files", [
    ("keras", "keras", ["model_folded.keras"]),
    ("gluon", "mxnet", ["model_folded-symbol.json", "model_folded-0000.params"]),
])  # fmt: skip
def test_demo_other_frameworks(digits_or_synthetic, tmp_path, capsys, framework, module, files):
    pytest.importorskip(module)
    pytest.importorskip(f"doconv.{framework}")
    out = tmp_path / framework
    status, stdout, _ = run_cli(capsys, "demo", "--framework", framework, "--epochs", 2, "--seeds", 1, "--out", out)
    assert status == 0
    for name in ["results.json", "curves.png", *files]:
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    fold = results["fold_check"]
    assert fold["max_abs_diff"] <= 1e-4 * max(1.0, fold["max_abs_logit"])
    summary = results["summary"]
    assert summary["plain"]["params_train"] == summary["DO-Conv"]["params_deploy"] < summary["DO-Conv"]["params_train"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--framework", "caffe"], "unknown framework 'caffe': choose one of torch, keras, gluon"),
        (["--seeds", "0"], "argument --seeds: must be a positive integer, got 0"),
        (["--epochs", "-1"], "argument --epochs: must be a positive integer, got -1"),
        (["--epochs", "two"], "argument --epochs: must be a positive integer, got 'two'"),
        (["--D-mul", "0"], "argument --D-mul: must be a positive integer, got 0"),
    ],
)
def test_demo_bad_arguments(capsys, tmp_path, args, message):
    out = tmp_path / "never"
    status, _, err = run_cli(capsys, "demo", *args, "--out", out)
    assert_usage_error(status, err, message)
    assert err.startswith("doconv demo: error: ")
    assert not out.exists()


def test_demo_framework_not_installed_names_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "keras", None)  # makes `import keras` fail, installed or not
    status, _, err = run_cli(capsys, "demo", "--framework", "keras", "--out", tmp_path / "never")
    assert_usage_error(
        status, err, "--framework keras needs Keras, which is not installed: pip install 'doconv-layers[tensorflow]'"
    )


@needs_torch
def test_demo_unwritable_output_fails_before_training(demo_deps, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status, _, err = run_cli(capsys, "demo", "--out", blocker / "sub")
    assert_usage_error(status, err, "cannot write to output folder")
    status, _, err = run_cli(capsys, "demo", "--out", blocker)
    assert_usage_error(status, err, "is a file, not a folder")
    assert blocker.read_text() == "not a folder"


@needs_torch
def test_demo_refuses_a_special_file_in_an_artefact_s_place_before_training(demo_deps, capsys, tmp_path):
    """A folder named results.json failed the publish after training, half the artefacts replaced."""
    (tmp_path / "results.json").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    status, out, err = run_cli(capsys, "demo", "--out", tmp_path, "--seeds", "1", "--epochs", "1")
    assert_usage_error(status, err, "holds results.json, which is a folder")
    assert "seed 0" not in out + err  # before training
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "results.json"]


def test_demo_publish_checks_every_destination_first(tmp_path):
    from doconv.demo.output import publish
    from doconv.demo.settings import DemoError

    staging, out = tmp_path / "staging", tmp_path / "out"
    staging.mkdir()
    out.mkdir()
    for name in ("a.pt", "b.json"):
        (staging / name).write_text("new")
    (out / "a.pt").write_text("old")
    (out / "b.json").mkdir()
    with pytest.raises(DemoError, match=r"holds b.json, which is a folder"):
        publish(str(staging), str(out))
    assert (out / "a.pt").read_text() == "old"  # nothing moved


# -- fuse ------------------------------------------------------------------------------------------


if torch is not None:

    class Net(torch.nn.Module):
        """Every kind of layer fuse has to handle: 3x3, grouped, depthwise, 1x1, non-square (1x3)."""

        def __init__(self, conv=DOConv2d):
            super().__init__()
            self.features = torch.nn.Sequential(
                conv(3, 8, 3, padding=1),
                torch.nn.BatchNorm2d(8),
                torch.nn.ReLU(),
                conv(8, 8, 3, padding=1, groups=2, bias=False),
                conv(8, 8, 3, padding=1, groups=8),
                conv(8, 6, 1),
            )
            self.wide = conv(6, 4, (1, 3), padding=(0, 1))
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.wide(self.features(x)).mean((2, 3)))

    def trained_like(net):
        """Non-zero D and random W: a fold that ignored D or mixed up channels would show."""
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            bn = net.features[1]
            bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
            bn.running_var.uniform_(0.5, 1.5, generator=gen)
        return net.eval()


@pytest.fixture
def checkpoint(tmp_path):
    net = trained_like(Net())
    path = tmp_path / "doconv.pt"
    torch.save(net.state_dict(), path)
    return net, path


@needs_torch
def test_fuse_output_loads_into_the_plain_network(checkpoint, tmp_path, capsys):
    net, path = checkpoint
    out = tmp_path / "plain.pt"
    status, stdout, _ = run_cli(capsys, "fuse", path, "-o", out, "--kernel-size", "wide=1x3")
    assert status == 0
    assert "Folded 5 DO-Conv layer(s)" in stdout
    plain = Net(conv=torch.nn.Conv2d).eval()
    plain.load_state_dict(torch.load(out, weights_only=True))  # strict: exactly the plain keys
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), net(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(x), fuse_model(net)(x), rtol=1e-5, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["doconv.pt", "plain.pt"]  # no temporary file left


@needs_torch
def test_fuse_checkpoint_of_the_original_code(tmp_path, capsys):
    """Layers saved by the original DO-Conv code (with D_diag) fold as that code computed them."""
    rng = np.random.default_rng(1)
    C_in, C_out, groups, M, N, D_mul = 4, 6, 2, 3, 3, 10
    W = rng.standard_normal((C_out, C_in // groups, D_mul))
    D = rng.standard_normal((C_in, M * N, D_mul)) * 0.1
    D_diag = np.tile(np.eye(M * N), (C_in, 1, D_mul // (M * N)))
    D_diag = np.concatenate([D_diag, np.zeros((C_in, M * N, D_mul % (M * N)))], axis=2)
    sd = {"conv.W": W, "conv.D": D, "conv.D_diag": D_diag, "conv.bias": rng.standard_normal(C_out)}
    torch.save({k: torch.from_numpy(v).float() for k, v in sd.items()}, tmp_path / "ref.pt")
    status, stdout, _ = run_cli(capsys, "fuse", tmp_path / "ref.pt", "-o", tmp_path / "out.pt")
    assert status == 0 and "from the original DO-Conv code" in stdout
    folded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert sorted(folded) == ["conv.bias", "conv.weight"]
    # The original forward pass (do_conv_pytorch.py), written out independently of doconv:
    W_ref = W.reshape(C_out // groups, C_in, D_mul)
    expected = np.einsum("ims,ois->oim", D + D_diag, W_ref).reshape(C_out, C_in // groups, M, N)
    np.testing.assert_allclose(folded["conv.weight"].numpy(), expected, rtol=1e-5, atol=1e-5)
    # ...which differs from doconv's own channel map for this grouped layer:
    assert not np.allclose(expected, core.fold(W, D + D_diag - core.identity(M * N, D_mul), groups, (M, N)))


@needs_torch
def test_fuse_takes_the_state_dict_out_of_a_training_checkpoint(checkpoint, tmp_path, capsys):
    net, _ = checkpoint
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, tmp_path / "ckpt.pt")
    status, stdout, _ = run_cli(
        capsys, "fuse", tmp_path / "ckpt.pt", "-o", tmp_path / "out.pt", "--kernel-size", "wide=1x3"
    )
    assert status == 0 and "under 'state_dict'" in stdout
    Net(conv=torch.nn.Conv2d).load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True))


@needs_torch
def test_fuse_non_square_kernel_needs_its_size(checkpoint, tmp_path, capsys):
    _, path = checkpoint
    status, _, err = run_cli(capsys, "fuse", path, "-o", tmp_path / "out.pt")
    assert_usage_error(
        status, err, "layer 'wide' has K=3 kernel taps, not a square: give its kernel size, e.g. --kernel-size wide=1x3"
    )
    status, _, err = run_cli(capsys, "fuse", path, "-o", tmp_path / "out.pt", "--kernel-size", "wide=2x2")
    assert_usage_error(status, err, "--kernel-size for layer 'wide' is 2x2, but the layer has K=3 taps")
    status, _, err = run_cli(capsys, "fuse", path, "-o", tmp_path / "out.pt", "--kernel-size", "wide=1by3")
    assert_usage_error(status, err, "--kernel-size wants [LAYER=]SIZE")
    assert not (tmp_path / "out.pt").exists()


@needs_torch
@pytest.mark.parametrize("rank", [1, 3])
def test_fuse_gives_1x1_layers_the_rank_of_the_network(rank, tmp_path, capsys):
    """A Conv1d/Conv3d network's 1x1 layer (no D) folds to a 1 / 1x1x1 kernel, with or without a size
    for all layers (which is for the layers with D: a 1-tap layer refused it)."""
    import torch

    from doconv.torch import DOConv1d, DOConv3d

    layer = {1: DOConv1d, 3: DOConv3d}[rank]
    native = {1: torch.nn.Conv1d, 3: torch.nn.Conv3d}[rank]
    model = torch.nn.Sequential(layer(2, 3, 3), layer(3, 4, 1))
    with torch.no_grad():
        model[0].D.normal_()
    path = tmp_path / "doconv.pt"
    torch.save(model.state_dict(), path)
    plain = torch.nn.Sequential(native(2, 3, 3), native(3, 4, 1))
    x = torch.randn(1, 2, *(5,) * rank)
    for i, size in enumerate(["x".join(["3"] * rank)] * 2):
        out = tmp_path / f"out{i}.pt"
        extra = ["--kernel-size", size] if i else ["--kernel-size", f"0={size}"]
        status, _, err = run_cli(capsys, "fuse", path, "-o", out, *extra)
        assert status == 0, err
        plain.load_state_dict(torch.load(out, weights_only=True))
        with torch.no_grad():
            torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)


@needs_torch
def test_fuse_refuses_a_pickled_model(tmp_path, capsys):
    torch.save(trained_like(Net()), tmp_path / "whole.pt")  # the model object: pickled code
    status, _, err = run_cli(capsys, "fuse", tmp_path / "whole.pt", "-o", tmp_path / "out.pt")
    assert_usage_error(status, err, "holds pickled Python objects")
    assert "save model.state_dict() instead" in err
    assert not (tmp_path / "out.pt").exists()


@needs_torch
def test_fuse_never_overwrites_its_input(checkpoint, tmp_path, capsys):
    _, path = checkpoint
    before = path.read_bytes()
    for output in (path, tmp_path / "." / "doconv.pt"):
        status, _, err = run_cli(capsys, "fuse", path, "-o", output, "--force")
        assert_usage_error(status, err, "the output must not be the checkpoint itself")
    assert path.read_bytes() == before


@needs_torch
def test_fuse_existing_output_needs_force(checkpoint, tmp_path, capsys):
    _, path = checkpoint
    out = tmp_path / "out.pt"
    out.write_text("keep me")
    status, _, err = run_cli(capsys, "fuse", path, "-o", out, "--kernel-size", "wide=1x3")
    assert_usage_error(status, err, "exists; use --force to replace it")
    assert out.read_text() == "keep me"
    assert run_cli(capsys, "fuse", path, "-o", out, "--kernel-size", "wide=1x3", "--force")[0] == 0
    assert "features.0.weight" in torch.load(out, weights_only=True)


@needs_torch
@pytest.mark.parametrize(
    "content, message",
    [
        (b"hello world\n", "is not a PyTorch checkpoint (a file written by torch.save)"),
        (b"", "is not a PyTorch checkpoint"),
        (None, "does not exist or is not a file"),
    ],
)
def test_fuse_not_a_pytorch_file(tmp_path, capsys, content, message):
    path = tmp_path / "in.pt"
    if content is not None:
        path.write_bytes(content)
    status, _, err = run_cli(capsys, "fuse", path, "-o", tmp_path / "out.pt")
    assert_usage_error(status, err, message)
    assert not (tmp_path / "out.pt").exists()


@needs_torch
def test_fuse_without_doconv_layers(tmp_path, capsys):
    torch.save(torch.nn.Conv2d(2, 2, 3).state_dict(), tmp_path / "plain.pt")
    status, _, err = run_cli(capsys, "fuse", tmp_path / "plain.pt", "-o", tmp_path / "out.pt")
    assert_usage_error(status, err, "has no DO-Conv layer")


@needs_torch
def test_fuse_state_dict_keeps_dtype_and_order():
    net = trained_like(Net()).double()
    folded, layers = cli.fuse_state_dict(net.state_dict(), {"wide": (1, 3)})
    assert [key for key in folded][:3] == ["features.0.weight", "features.0.bias", "features.1.weight"]
    assert all(v.dtype == torch.float64 for v in folded.values() if v.is_floating_point())
    assert ("features.5", (1, 1), "doconv") in layers


# -- info, bench, entry point ----------------------------------------------------------------------


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_from_the_repository_root(has_c_compiler):
    """`python -m doconv info` where the README runs its main command: the checkout's root.

    With the src/ layout nothing in the root is importable as doconv, so this is the installed
    doconv, and the compiled kernel its install built is the one used (or, with no compiler,
    the build's reason is reported).
    """
    proc = subprocess.run([sys.executable, "-m", "doconv", "info"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stdout = proc.stdout
    from doconv import __version__

    assert stdout.startswith(f"doconv {__version__} (Python ")
    if torch is not None:
        torch_line = next(line for line in stdout.splitlines() if line.strip().startswith("torch "))
        assert torch.__version__ in torch_line and "doconv.torch" in torch_line
    for name in ("tensorflow", "keras", "jax", "mxnet", "gluoncv", "scikit-learn"):
        assert any(line.strip().startswith(name + " ") for line in stdout.splitlines()), name
    kernel_line = next(line for line in stdout.splitlines() if line.startswith("CPU fold kernel"))
    code = "import doconv, doconv._fold_cpu as f; print(doconv.__file__); print(f.kernel is not None)"
    where, used = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not where.startswith(os.path.join(ROOT, "src")), where  # the installed copy, not the checkout
    assert (": built (_foldkernel" in kernel_line) == (used == "True"), kernel_line
    if used != "True":
        assert "not built:" in kernel_line and not has_c_compiler, kernel_line
        pytest.skip(f"no C compiler here, and the build said so: {kernel_line}")
    if torch is not None:  # the demo's path: doconv.torch folds with the kernel
        code = "import doconv.torch.folding as t; print(t._foldkernel is not None)"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert proc.stdout.strip() == "True", proc.stderr


@pytest.mark.parametrize(
    "record, expected",
    [
        (
            "not built: command 'gcc' failed: No such file or directory\n",
            "not built: command 'gcc' failed: No such file or directory (the build's message;",
        ),
        ("built\n", "built at install but does not import: No module named 'doconv_no_such_kernel'"),
        (None, "which was not built by pip install"),
    ],
)
def test_kernel_status_says_why_there_is_no_kernel(tmp_path, record, expected):
    from doconv._kernel_status import BUILD_RECORD, fold_kernel_status

    if record is not None:
        (tmp_path / BUILD_RECORD).write_text(record)
    built, reason = fold_kernel_status(str(tmp_path), kernel="doconv_no_such_kernel")
    assert not built and expected in reason, reason


def test_child_env_adds_no_site_packages(monkeypatch, tmp_path):
    """An installed doconv needs nothing on PYTHONPATH; one imported from a folder gets that folder first."""
    import site

    monkeypatch.delenv("PYTHONPATH", raising=False)
    installed = os.path.join(site.getsitepackages()[0], "doconv", "cli.py")
    monkeypatch.setattr(cli, "__file__", installed)
    assert "PYTHONPATH" not in cli._child_env()
    source = tmp_path / "src" / "doconv" / "cli.py"
    monkeypatch.setattr(cli, "__file__", str(source))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    assert cli._child_env()["PYTHONPATH"] == os.pathsep.join([str(tmp_path / "src"), "/elsewhere"])


def test_bench_says_when_the_machine_is_busy(capfd, tmp_path, monkeypatch):
    """A benchmark whose control is far from 1 says its ratios are unreliable, and `doconv bench` repeats it."""
    from doconv.benchmarks.report import BUSY, busy_note

    assert busy_note([1.0, 0.96, 1.04]) is None
    (tmp_path / "fake_bench_torch.py").write_text(
        "from doconv.benchmarks.report import busy_note\n"
        "def main(argv=None):\n    print('ratio 2.6, control 0.13')\n    print(busy_note([0.13]))\n    return 0\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(cli, "_BENCH_MODULE", "fake_bench_{}")
    monkeypatch.setattr(cli, "_probe_all", lambda modules: {m: (True, "stand-in") for m in modules})
    status = cli.main(["bench", "--framework", "torch"])
    out, _ = capfd.readouterr()
    assert status == 0
    lines = out.splitlines()
    assert f"note: {BUSY} (control 0.13 outside 0.95-1.05)" in lines
    assert lines[-1] == "the machine was busy during the torch benchmark(s): their ratios are unreliable"


@needs_torch
def test_bench_runs_each_benchmark_in_a_child_process(capfd, tmp_path, monkeypatch):
    """The plumbing, with a stand-in benchmark: imported in a child process, --quick passed through."""
    (tmp_path / "fake_bench_torch.py").write_text(
        "def main(argv=None):\n    print('fake bench ran with', argv)\n    return 0\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(cli, "_BENCH_MODULE", "fake_bench_{}")
    status = cli.main(["bench", "--framework", "torch", "--quick"])
    out, _ = capfd.readouterr()
    assert status == 0
    assert "fake bench ran with ['--quick']" in out
    assert "fake_bench_torch" not in sys.modules  # not imported into this process


@needs_torch
def test_bench_quick(capfd):
    """The real PyTorch benchmark, quick mode (tens of seconds on 2 busy cores)."""
    pytest.importorskip("doconv.benchmarks.bench_torch")
    status = cli.main(["bench", "--framework", "torch", "--quick"])
    out, _ = capfd.readouterr()
    assert status == 0
    assert "== torch" in out


def test_bench_unknown_framework(capsys):
    status, _, err = run_cli(capsys, "bench", "--framework", "caffe")
    assert_usage_error(status, err, "unknown framework 'caffe'")


def test_bench_refuses_a_missing_framework_before_running_any(capfd, monkeypatch):
    """--framework torch --framework gluon without MXNet: said at once, not after the torch benchmark ran."""
    ran = []
    monkeypatch.setattr(cli, "_run_benchmark", lambda module, argv: ran.append(module) or (0, False))
    monkeypatch.setattr(
        cli,
        "_probe_all",
        lambda modules: {m: (m != "mxnet", "stand-in" if m != "mxnet" else "not installed") for m in modules},
    )
    status = cli.main(["bench", "--framework", "torch", "--framework", "gluon"])
    _, err = capfd.readouterr()
    assert_usage_error(status, err, "--framework gluon needs mxnet, which is not installed")
    assert ran == []


@pytest.mark.parametrize(
    "command,required", [("fuse", ["in.pt", "-o", "out.pt"]), ("demo", []), ("bench", []), ("info", [])]
)
def test_an_unknown_flag_is_reported_by_its_command(capsys, command, required):
    status, _, err = run_cli(capsys, command, *required, "--bogus")
    assert_usage_error(status, err, f"doconv {command}: error: unrecognized arguments: --bogus")


@needs_torch
def test_python_dash_m_entry_point(tmp_path):
    env = dict(os.environ)  # the installed doconv, never the checkout
    proc = subprocess.run([sys.executable, "-m", "doconv", "--version"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().startswith("doconv ")
    proc = subprocess.run(
        [sys.executable, "-m", "doconv", "fuse", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "o.pt")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"doconv fuse: error: checkpoint {tmp_path / 'missing.pt'} does not exist or is not a file"
    ]
