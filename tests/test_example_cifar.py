"""examples/train_cifar_torch.py, run for two steps per run on tiny synthetic folders in CIFAR's binary format.

Runs in the torch tox env (CPU): the script reads the files with NumPy, trains plain and DO-Conv
ResNet-8 for two seeds, folds, and checks the folded network against the DO-Conv one.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_cifar_torch.py")


def write_records(path, n, label_bytes, classes, rng):
    """n records: label byte(s), then 3072 pixel bytes (red, green, blue planes)."""
    labels = rng.integers(0, classes, (n, label_bytes), dtype=np.uint8)
    pixels = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    np.concatenate([labels, pixels], axis=1).tofile(path)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        write_records(root / f"data_batch_{i}.bin", 8, 1, 10, rng)
    write_records(root / "test_batch.bin", 12, 1, 10, rng)
    return root


@pytest.fixture(scope="module")
def script():
    """The example as a module, for its functions and an in-process main()."""
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import train_cifar_torch
    finally:
        sys.path.pop(0)
    return train_cifar_torch


def run_script(*args, timeout=300):
    return subprocess.run(
        [sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, env=dict(os.environ), timeout=timeout
    )


def test_two_seeds_train_fold_and_compare(cifar10, tmp_path, script):
    proc = run_script(
        "--data-dir", cifar10, "--depth", 8, "--seeds", 2, "--batch-size", 8, "--max-steps", 2,
        "--device", "cpu", "--log-interval", 1, "--save-dir", tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cifar10, 40 train / 12 test images; ResNet-8; 2 seed(s)" in proc.stdout
    assert "seed 1 DO-Conv: epoch 0 step 2/2" in proc.stderr
    assert "DO-Conv - plain: " in proc.stdout and "95% interval" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    for seed in results["seeds"]:
        fold = seed["fold_check"]
        assert fold["same_predictions"] and fold["max_abs_diff"] <= 1e-5 * max(1.0, fold["max_abs_logit"])
        assert seed["plain"]["steps"] == seed["DO-Conv"]["steps"] == 2
        assert fold["params_deploy"] == seed["plain"]["params_train"] < seed["DO-Conv"]["params_train"]
        assert fold["fused_test_acc"] == seed["DO-Conv"]["test_acc"]
    # The DO-Conv checkpoint holds W and D; the fused one loads into the plain network.
    doconv_sd = torch.load(tmp_path / "cifar10-resnet8-seed0-doconv.pt", weights_only=True)
    assert "stem.0.W" in doconv_sd and "stem.0.D" in doconv_sd
    fused_sd = torch.load(tmp_path / "cifar10-resnet8-seed0-fused.pt", weights_only=True)
    script.CifarResNet(8, 10).load_state_dict(fused_sd)


def test_reader_and_augmenter(tmp_path, script):
    """The reader takes CIFAR-100's fine label (the second byte); crops and flips move pixels as they should."""
    tc = script
    rng = np.random.default_rng(1)
    write_records(tmp_path / "train.bin", 3, 2, 100, rng)
    raw = np.fromfile(tmp_path / "train.bin", dtype=np.uint8).reshape(3, -1)
    images, labels = tc.read_records(str(tmp_path / "train.bin"), 2, 100)
    assert labels.tolist() == raw[:, 1].tolist()
    assert np.array_equal(images[:, 0, 0, :5], raw[:, 2:7])  # red plane first, row by row

    x = torch.from_numpy(images)
    aug = tc.Augmenter(x, torch.zeros(1, 3, 1, 1), torch.full((1, 3, 1, 1), 1 / 255.0))
    got = aug.batch(np.arange(3), np.random.default_rng(5))
    check = np.random.default_rng(5)  # the same draws, replayed
    dy, dx, flip = check.integers(0, 9, 3), check.integers(0, 9, 3), check.random(3) < 0.5
    padded = np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)))
    for i in range(3):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        expected = crop[:, :, ::-1] if flip[i] else crop
        assert np.array_equal(got[i].round().numpy().astype(np.uint8), expected)


@pytest.mark.parametrize("files, message", [
    ({}, "holds neither CIFAR-10's binary files"),
    ({"train.bin": 3073 * 2 + 5, "test.bin": 3074}, "not a whole number of 3074-byte records"),
])  # fmt: skip
def test_bad_folders_are_usage_errors(tmp_path, capsys, script, files, message):
    for name, size in files.items():
        (tmp_path / name).write_bytes(bytes(size))
    try:  # argparse's errors exit; the reader's return 2
        status = script.main(["--data-dir", str(tmp_path), "--max-steps", "1", "--save-dir", str(tmp_path / "out")])
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and message in err, err
    assert not (tmp_path / "out").exists()
