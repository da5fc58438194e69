"""The demo's settings, and each data set's recipe: the hyper-parameters fixed before any run.

A recipe is chosen per data set once and is the same for both variants; nothing here is
tuned towards a result. A field of :class:`Settings` left at None takes the recipe's value.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

FRAMEWORKS = ("torch", "keras", "gluon")
DATASETS = ("digits", "mnist1d")
VARIANTS = ("plain", "DO-Conv")

# Frameworks whose doconv adapter has the layer a data set's network needs.
_DATASET_FRAMEWORKS = {"digits": FRAMEWORKS, "mnist1d": ("torch",)}


class DemoError(Exception):
    """A problem with the user's input or environment; the CLI prints it as one line and exits 2."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One data set's fixed training recipe (the same for plain and DO-Conv)."""

    seeds: int
    epochs: int
    batch_size: int
    optimizer: str  # "sgd" (momentum 0.9) or "adam"
    lr: float
    weight_decay: float
    samples: Optional[int]  # generated samples (MNIST-1D); None: the data set's fixed size


RECIPES = {
    # A small 2-D CNN on 8x8 images: SGD with momentum, the usual CNN recipe.
    "digits": Recipe(seeds=5, epochs=10, batch_size=32, optimizer="sgd", lr=0.05, weight_decay=5e-4, samples=None),
    # MNIST-1D's reference training (Greydanus & Kobak): Adam, lr 1e-2, batch 100, no weight decay;
    # here with a cosine decay after one warm-up epoch, as the digits recipe. 10000 samples (twice
    # the package's default) give 2000 test sequences: each accuracy's sampling noise / 1.4.
    "mnist1d": Recipe(seeds=10, epochs=50, batch_size=100, optimizer="adam", lr=0.01, weight_decay=0.0, samples=10000),
}

# The network each data set trains, for the report (backend_torch builds them).
NETWORKS = {
    "digits": "3x3 conv 1->32, 3x3 conv 32->64 (groups 4), 3x3 depthwise conv 64->64, 1x1 conv 64->128, "
    "each with BatchNorm and ReLU, two 2x2 max pools, linear 512->10",
    "mnist1d": "three 1-D convs (kernel 5, stride 2, 1->25->25->25 channels), each with ReLU, linear 125->10",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The demo's settings. Fields left at None take the data set's recipe (:data:`RECIPES`).

    Args:
        framework: 'torch', 'keras' or 'gluon'. Default 'torch'.
        dataset: 'digits' (scikit-learn's 8x8 digits, 2-D CNN) or 'mnist1d' (MNIST-1D, 1-D CNN,
            PyTorch only). Default 'digits'.
        seeds: number of seeds (0 .. seeds-1). Default None: 5 (digits), 10 (mnist1d).
        epochs: training epochs per run. Default None: 10 (digits), 50 (mnist1d).
        D_mul: depth multiplier for every DO-Conv layer, None for K. Default None.
        out: output folder. Default './doconv-demo'.
        batch_size: training batch size. Default None: 32 (digits), 100 (mnist1d).
        lr: peak learning rate (SGD with momentum 0.9 for digits, Adam for mnist1d), after one
            warm-up epoch cosine-decayed to 0. Default None: 0.05 (digits), 0.01 (mnist1d).
        weight_decay: L2 on conv and dense kernels (and on DO-Conv's W and D), not on BN or biases.
            Default None: 5e-4 (digits), 0 (mnist1d).
        progress: show progress bars (tqdm; hidden anyway when stderr is not a terminal). Default True.
        samples: MNIST-1D samples to generate (80 % train, 20 % test). Default None: 10000.

    Example:
        >>> Settings(dataset="mnist1d").resolved().seeds
        10
    """

    framework: str = "torch"
    seeds: Optional[int] = None
    epochs: Optional[int] = None
    D_mul: Optional[int] = None
    out: str = "doconv-demo"
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    progress: bool = True
    dataset: str = "digits"
    samples: Optional[int] = None

    def resolved(self) -> Settings:
        """These settings with every None replaced by the data set's recipe, validated.

        Raises:
            DemoError: an unknown framework or data set, a combination that cannot run, a bad number.
        """
        if self.framework not in FRAMEWORKS:
            raise DemoError(f"unknown framework {self.framework!r}: choose one of {', '.join(FRAMEWORKS)}")
        if self.dataset not in DATASETS:
            raise DemoError(f"unknown data set {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.framework not in _DATASET_FRAMEWORKS[self.dataset]:
            raise DemoError(
                f"--dataset {self.dataset} needs a 1-D DO-Conv layer, and doconv.{self.framework} has none "
                f"(only DOConv2D): run it with --framework torch"
            )
        recipe = RECIPES[self.dataset]
        if self.samples is not None and recipe.samples is None:
            raise DemoError(f"--samples applies to generated data sets (mnist1d), not to {self.dataset}")
        filled = {
            f.name: getattr(recipe, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is None and hasattr(recipe, f.name)
        }
        settings = dataclasses.replace(self, **filled)
        for name in ("seeds", "epochs", "batch_size"):
            _check_positive_int(name, getattr(settings, name))
        if settings.D_mul is not None:
            _check_positive_int("D_mul", settings.D_mul)
        if settings.samples is not None:
            # 10 classes, 80/20 split: at least a few test sequences per class.
            if not (isinstance(settings.samples, int) and settings.samples >= 100):
                raise DemoError(f"samples must be an integer >= 100. Received: samples={settings.samples!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(settings, name)
            if not (isinstance(value, (int, float)) and value >= 0 and value == value):
                raise DemoError(f"{name} must be a non-negative number. Received: {name}={value!r}")
        return settings

    @property
    def optimizer(self) -> str:
        return RECIPES[self.dataset].optimizer


def _check_positive_int(name: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise DemoError(f"{name} must be a positive integer. Received: {name}={value!r}")
