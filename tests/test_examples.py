"""examples/train_imagenet_gluon.py, run for a few steps on a tiny synthetic ImageFolder.

Runs in the gluon tox env: the script is GluonCV's ImageNet recipe with DO-Conv swapped in.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")
pytest.importorskip("gluoncv")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_imagenet_gluon.py")


def write_jpeg(path, image):
    """Save an RGB uint8 image as JPEG: PIL if present, else OpenCV (the gluon env has both)."""
    try:
        from PIL import Image

        Image.fromarray(image).save(path, quality=90)
    except ImportError:
        import cv2

        cv2.imwrite(str(path), image[:, :, ::-1])


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """DATA/{train,val}/<class>/*.jpg: 3 classes, random images of a few sizes."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 2)):
        for name in ("n01440764", "n01443537", "n01484850"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = rng.integers(36, 56, size=2)
                write_jpeg(folder / f"{name}_{i}.JPEG", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return root


def run_script(*args, timeout=600):
    env = dict(os.environ)  # the installed doconv, never the checkout
    return subprocess.run(
        [sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_smoke_run_trains_and_exports_a_fused_network(image_folder, tmp_path):
    save = tmp_path / "params"
    proc = run_script(
        "--data-dir", image_folder, "--model", "resnet18_v1b", "--batch-size", 4, "--input-size", 32,
        "--max-steps", 2, "--num-epochs", 3, "--warmup-epochs", 1, "--num-workers", 0, "--log-interval", 1,
        "--save-dir", save,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr + proc.stdout
    assert "resnet18_v1b (doconv), 3 classes" in log
    assert "epoch 0 batch 2" in log and "val top-1" in log
    assert (save / "resnet18_v1b-doconv-0000.params").exists()
    prefix = str(save / "resnet18_v1b-doconv-fused")
    assert os.path.exists(prefix + "-symbol.json") and os.path.exists(prefix + "-0000.params")

    # The export is a plain network: no DO-Conv parameter, and it loads without doconv.
    fused = mx.gluon.SymbolBlock.imports(prefix + "-symbol.json", ["data"], prefix + "-0000.params")
    names = list(fused.collect_params().keys())
    assert names and not any(name.endswith(("_W", "_D")) for name in names)
    assert fused(mx.nd.zeros((1, 3, 32, 32))).shape == (1, 3)
    diff = float(log.split("max |logit difference| ")[1].split()[0])
    assert diff < 1e-3


def test_plain_baseline_uses_the_same_recipe(image_folder, tmp_path):
    proc = run_script(
        "--data-dir", image_folder, "--model", "resnet18_v1b", "--batch-size", 4, "--input-size", 32,
        "--max-steps", 1, "--num-epochs", 2, "--warmup-epochs", 1, "--num-workers", 0, "--plain",
        "--save-dir", tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "resnet18_v1b-plain-symbol.json").exists()


def test_missing_val_folder_is_a_usage_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    proc = run_script("--data-dir", tmp_path, "--max-steps", 1)
    assert proc.returncode == 2
    assert "--data-dir needs train/ and val/ subfolders" in proc.stderr
