"""Build script for the optional native kernels (sparseferry._native).

Everything else lives in pyproject.toml. If the C compiler is missing or fails, the package
still installs and runs on the pure-torch reference kernels (with a one-line notice at run time).
"""
import glob
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build native extensions, but never fail the install because of them."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any compiler failure
            print(f"sparseferry: native kernels not built ({e}); using the torch reference", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"sparseferry: native kernels not built ({e}); using the torch reference", file=sys.stderr)


sources = sorted(glob.glob("csrc/*.c"))
ext_modules = []
if sources:
    ext_modules.append(
        Extension(
            "sparseferry._native",
            sources=sources,
            depends=sorted(glob.glob("csrc/*.h")),  # rebuild when the shared header changes
            # -fno-trapping-math: float comparisons may be evaluated without their branches (the values
            # are the same; no code here reads FP exception flags), so that loops such as silu's range
            # checks vectorize on AVX2 and baseline x86-64 too, not only with AVX-512's masks.
            extra_compile_args=["-O3", "-std=c11", "-fopenmp", "-fno-strict-aliasing", "-fno-trapping-math"],
            extra_link_args=["-fopenmp"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
