"""Builds doconv's optional C fold kernel; the metadata is in pyproject.toml.

Where the kernel cannot be built (no C compiler, no Python headers) the install still
succeeds and doconv folds with NumPy or the framework's ops. Either way the build writes
what happened next to the kernel, in doconv/_foldkernel-build.txt, so that ``doconv info``
can say why a kernel is missing, as the build said it.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNEL = "doconv._foldkernel"
BUILD_RECORD = "_foldkernel-build.txt"  # read by doconv._kernel_status


class OptionalBuildExt(build_ext):
    """Build the C fold kernel where a compiler is available, and record whether it was built."""

    def run(self):
        try:
            super().run()
        except Exception as err:  # no compiler at all: setuptools fails before any extension
            self._record(f"not built: {_one_line(err)}")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:  # a compiler error, missing headers
            self._record(f"not built: {_one_line(err)}")
        else:
            self._record("built")

    def copy_extensions_to_source(self):
        # An editable install (or build_ext --inplace) copies the kernel into src/doconv: the record goes with it.
        super().copy_extensions_to_source()
        package_dir = self.get_finalized_command("build_py").get_package_dir("doconv")
        built = os.path.join(self.build_lib, "doconv", BUILD_RECORD)
        if os.path.exists(built):
            self.copy_file(built, os.path.join(package_dir, BUILD_RECORD), level=self.verbose)

    def _record(self, text):
        if text != "built":
            print(f"doconv: the C fold kernel was {text}; doconv folds with NumPy instead", file=sys.stderr)
        path = os.path.join(os.path.dirname(self.get_ext_fullpath(KERNEL)), BUILD_RECORD)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


def _one_line(err):
    return " ".join(str(err).split()) or type(err).__name__


setup(
    ext_modules=[Extension(KERNEL, ["src/doconv/_foldkernel.c"], extra_compile_args=["-O3"], optional=True)],
    cmdclass={"build_ext": OptionalBuildExt},
)
