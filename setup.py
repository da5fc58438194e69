"""Packaging for doconv. NumPy is the only hard dependency; frameworks are extras."""

import re
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "src" / "doconv" / "__init__.py").read_text(), re.M).group(1)

# Pins that install together on Python 3.11 (see docs/install.rst). torch < 2.14 keeps pip on
# the CPU wheel where one is provided; mxnet 1.9.1 is the last release and needs numpy < 1.24.
TORCH = ["torch>=2.1,<2.14"]
KERAS = ["keras>=3.0", "tensorflow-cpu>=2.16"]
GLUON = [
    "mxnet==1.9.1",
    "numpy==1.23.5",
    "scipy==1.10.1",
    "pandas==1.5.3",
    "matplotlib==3.7.5",
    "opencv-python==4.8.1.78",
    "gluoncv==0.10.5.post0",
]
DEMO = TORCH + [
    "scikit-learn>=1.2",
    "matplotlib>=3.5",
    "tqdm>=4.60",
    "mnist1d>=0.0.2",
    "onnx>=1.15",
    "onnxscript>=0.1",
    "onnxruntime>=1.16",
]


class OptionalBuildExt(build_ext):
    """Build the C fold kernel where a compiler is available; doconv works without it (slower)."""

    def run(self):
        try:
            super().run()
        except Exception as err:  # no compiler, no Python headers: fall back to the NumPy path
            print(f"doconv: the C fold kernel was not built ({err}); doconv.torch uses its NumPy path", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:
            print(f"doconv: the C fold kernel was not built ({err}); doconv.torch uses its NumPy path", file=sys.stderr)


setup(
    name="doconv",
    version=VERSION,
    description="DO-Conv (depthwise over-parameterized convolution) for PyTorch, Keras and MXNet Gluon",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages("src", include=["doconv", "doconv.*"]),
    package_dir={"": "src"},
    ext_modules=[
        Extension("doconv._foldkernel", ["src/doconv/_foldkernel.c"], extra_compile_args=["-O3"], optional=True)
    ],
    cmdclass={"build_ext": OptionalBuildExt},
    python_requires=">=3.9",
    install_requires=["numpy>=1.21"],
    extras_require={
        "torch": TORCH,
        "keras": KERAS,
        "gluon": GLUON,
        # One interpreter with all three frameworks: TensorFlow 2.17 is the newest that accepts
        # mxnet's numpy, and mxnet must be imported before TensorFlow.
        "all": ["numpy==1.23.5", "torch==2.13.0", "tensorflow-cpu==2.17.1", "mxnet==1.9.1"],
        "demo": DEMO,
        "test": ["pytest>=7", "hypothesis>=6"],
        "docs": ["sphinx>=7"],
    },
    entry_points={"console_scripts": ["doconv=doconv.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
