"""The demo's PyTorch side: both data sets' networks, training, prediction and the saved artefacts.

The networks (channels first):

* digits: 3x3 conv 1->32, BN, ReLU; 3x3 conv 32->64 (groups=4), BN, ReLU, 2x2 max pool;
  3x3 depthwise conv 64->64, BN, ReLU; 1x1 conv 64->128, BN, ReLU, 2x2 max pool; linear 512->10.
  The convolutions have no bias (BN follows), as in most CNNs DO-Conv is used in.
* mnist1d: three 1-D convolutions (kernel 5, stride 2, 25 channels, with bias), each followed by
  ReLU, and a linear head 125->10: MNIST-1D's reference CNN (Greydanus & Kobak), with kernel 5 in
  all three layers.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import warnings
from typing import Callable

import numpy as np

from .settings import Settings
from .training import learning_rate


class TorchBackend:
    name = "torch"

    def __init__(self, settings: Settings):
        self.torch = importlib.import_module("torch")
        self.dt = importlib.import_module("doconv.torch")
        self.settings = settings

    def versions(self) -> dict:
        from .. import _fold_cpu

        return {
            "torch": self.torch.__version__,
            # Both change the last bits of every float32 sum, so they belong to the numbers' identity.
            "aten_cpu_capability": self.torch.backends.cpu.get_cpu_capability(),
            "fold": "C kernel" if _fold_cpu.kernel is not None else "NumPy (no C kernel)",
        }

    def describe(self) -> str:
        v = self.versions()
        return f"PyTorch {v['torch']} on CPU ({v['aten_cpu_capability']}), 1 thread, deterministic; fold: {v['fold']}"

    def layout(self, x: np.ndarray) -> np.ndarray:
        return x[:, None]

    def build(self, seed: int):
        nn = self.torch.nn
        self.torch.manual_seed(seed)
        if self.settings.dataset == "mnist1d":

            def conv1d(c_in, c_out):
                return [nn.Conv1d(c_in, c_out, 5, stride=2, padding=2), nn.ReLU()]

            # Length 40 -> 20 -> 10 -> 5.
            return nn.Sequential(*conv1d(1, 25), *conv1d(25, 25), *conv1d(25, 25), nn.Flatten(), nn.Linear(125, 10))

        def block(c_in, c_out, k, groups=1):
            return [
                nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]

        return nn.Sequential(
            *block(1, 32, 3),
            *block(32, 64, 3, groups=4),
            nn.MaxPool2d(2),
            *block(64, 64, 3, groups=64),
            *block(64, 128, 1),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(128 * 2 * 2, 10),
        )

    @contextlib.contextmanager
    def session(self):
        """One intra-op thread and deterministic algorithms, restored afterwards.

        One thread fixes the order of every reduction, so a run repeats bit for bit on the same
        CPU and build; this network's ops are also too small to gain from more threads, and with
        more threads than free cores every step waits on the busiest core.
        """
        torch = self.torch
        threads = torch.get_num_threads()
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)

    def convert(self, model, D_mul):
        return self.dt.convert_model(model, D_mul=D_mul)

    def fuse(self, model):
        return self.dt.fuse_model(model).eval()

    def count(self, model) -> int:
        return sum(p.numel() for p in model.parameters())

    def trainer(self, model, total_steps: int, warmup_steps: int) -> Callable:
        torch, s = self.torch, self.settings
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if s.optimizer == "adam":
            opt = torch.optim.Adam(groups, lr=s.lr)
        else:
            opt = torch.optim.SGD(groups, lr=s.lr, momentum=0.9)
        step = [0]

        def epoch(x: np.ndarray, y: np.ndarray, order: np.ndarray) -> tuple[float, float]:
            model.train()
            total_loss, correct = 0.0, 0
            for start in range(0, len(order), s.batch_size):
                idx = order[start : start + s.batch_size]
                xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
                for group in opt.param_groups:
                    group["lr"] = learning_rate(s.lr, step[0], total_steps, warmup_steps)
                logits = model(xb)
                loss = torch.nn.functional.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step[0] += 1
                total_loss += loss.item() * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
            return total_loss / len(order), correct / len(order)

        return epoch

    def predict(self, model, x: np.ndarray) -> np.ndarray:
        model.eval()
        with self.torch.no_grad():
            return model(self.torch.from_numpy(x)).numpy().astype(np.float64)

    def save(self, fused, doconv_model, folder: str, x_example: np.ndarray) -> dict:
        """state_dicts of the folded network (loads into ``build()``'s model) and of the DO-Conv one, and ONNX.

        The DO-Conv state_dict holds W and D, for ``doconv fuse`` or for more training.
        """
        torch = self.torch
        torch.save(fused.state_dict(), os.path.join(folder, "model_folded.pt"))
        torch.save(doconv_model.state_dict(), os.path.join(folder, "model_doconv.pt"))
        files = {"state_dict": "model_folded.pt", "doconv_state_dict": "model_doconv.pt"}
        report: dict = {}
        onnx_path = os.path.join(folder, "model_folded.onnx")
        try:
            example = (torch.from_numpy(x_example[:2]),)
            with warnings.catch_warnings(), _quiet_stdout(), _quiet_logger("torch.onnx"):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    fused,
                    example,
                    onnx_path,
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
            files["onnx"] = "model_folded.onnx"
        except Exception as err:  # noqa: BLE001 - ONNX export is a bonus; the run's results stand without it
            report["onnx_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if os.path.exists(onnx_path):
                os.remove(onnx_path)
        if "onnx" in files:
            try:
                ort = importlib.import_module("onnxruntime")
            except ImportError:
                report["onnx_check"] = "onnxruntime not installed"
            else:
                session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
                got = session.run(None, {"input": x_example})[0]
                report["onnx_max_abs_diff"] = float(np.abs(got - self.predict(fused, x_example)).max())
        return {"files": files, **report}


class _quiet_logger:
    """Raise a logger's level to ERROR for a block (the ONNX exporter warns about missing torchvision)."""

    def __init__(self, name: str):
        self._logger = logging.getLogger(name)

    def __enter__(self):
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


class _quiet_stdout:
    """Silence a library's prints to stdout (the ONNX exporter's progress lines) for a block."""

    def __enter__(self):
        self._saved = sys.stdout
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - closed in __exit__

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self._saved
