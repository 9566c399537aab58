"""Build rnnkern's optional compiled extensions.

The C++ CPU kernels (``csrc/cpu`` -> ``rnnkern._cpu``) are built whenever their sources exist;
the CUDA kernels (``csrc/cuda`` -> ``rnnkern._cuda``) only when ``nvcc`` is found. A failed or
skipped extension is a message, never a failed install: ``import rnnkern`` works without them
and asking for the backend explains how to build it.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build each extension, reporting (not raising) failures."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - any compiler failure must not fail the install
            sys.stderr.write(
                f"\nrnnkern: building {ext.name} failed ({err}); the package installs without it "
                f"and backend '{ext.name.rsplit('_', 1)[-1]}' will say how to build it.\n\n"
            )


def extensions():
    exts = []
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if cpu_sources and os.environ.get("RNNKERN_NO_CPU_EXT") != "1":
        from pybind11.setup_helpers import Pybind11Extension

        exts.append(
            Pybind11Extension(
                "rnnkern._cpu",
                cpu_sources,
                cxx_std=17,
                # -ffp-contract=fast lets GCC fuse a*b+c into FMA under -std=c++17 (ISO mode
                # turns contraction off); -Wno-psabi silences notes about vector-argument ABI
                # changes between the ISA-specific copies, which never call each other.
                extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"],
                extra_link_args=["-fopenmp"],
            )
        )
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
