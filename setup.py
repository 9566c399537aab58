"""Build rnnkern's optional compiled extensions.

The C++ CPU kernels (``csrc/cpu`` -> ``rnnkern._cpu``) are built whenever their sources exist;
the CUDA kernels (``csrc/cuda`` -> ``rnnkern._cuda``) only when ``nvcc`` is found. A failed or
skipped extension is a message, never a failed install: ``import rnnkern`` works without them
and asking for the backend explains how to build it.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

CUDA_EXT = "rnnkern._cuda"
CUDA_SOURCES = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
# Headers the compiled sources include: csrc/common holds what the CPU and CUDA code share
# (the sampling rule), so a change there rebuilds both extensions.
COMMON_HEADERS = sorted(glob.glob(os.path.join("csrc", "common", "*.h")))
CUDA_HEADERS = sorted(
    glob.glob(os.path.join("csrc", "cuda", "*.h"))
    + glob.glob(os.path.join("csrc", "cuda", "*.cuh"))
    + COMMON_HEADERS
)
DEFAULT_CUDA_ARCHS = "sm_80,sm_90+PTX"


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME / $CUDA_PATH, else from PATH; None when there is none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def find_cudart_static(nvcc: str) -> str | None:
    """libcudart_static.a of the toolkit that owns ``nvcc`` (static: the extension then needs
    no libcudart on the library path at run time; it shares torch's CUDA context through the
    driver)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:  # nvcc may be a wrapper script; its dry run names the real toolkit root (TOP=...)
        dry = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True)
        for line in (dry.stdout + dry.stderr).splitlines():
            if "TOP=" in line:
                homes.append(line.split("TOP=", 1)[1].strip())
    except OSError:
        pass
    homes += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in filter(None, homes):
        for sub in ("lib64", "lib", *glob.glob(os.path.join(home, "targets", "*", "lib"))):
            candidate = os.path.join(home, sub, "libcudart_static.a")
            if os.path.isfile(candidate):
                return os.path.normpath(candidate)
    return None


def cuda_gencode_flags(spec: str) -> list[str]:
    """nvcc -gencode flags for ``RNNKERN_CUDA_ARCHS``: comma/semicolon/space separated targets
    such as ``sm_80``, ``90`` or ``9.0``; ``+PTX`` after one also embeds its PTX (so newer
    GPUs can JIT it). Default ``sm_80,sm_90+PTX``."""
    flags = []
    for token in spec.replace(";", ",").replace(" ", ",").split(","):
        token = token.strip()
        if not token:
            continue
        ptx = token.upper().endswith("+PTX")
        arch = token[:-4] if ptx else token
        arch = arch.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not arch.isdigit():
            raise ValueError(f"RNNKERN_CUDA_ARCHS: cannot read target {token!r}")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    if not flags:
        raise ValueError(f"RNNKERN_CUDA_ARCHS names no target: {spec!r}")
    return flags


class OptionalBuildExt(build_ext):
    """Build each extension, reporting (not raising) failures. For ``rnnkern._cuda`` the
    ``.cu`` sources are compiled with nvcc first and linked into the extension as objects."""

    def build_extension(self, ext):
        try:
            if ext.name == CUDA_EXT:
                self._compile_cuda(ext)
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - any compiler failure must not fail the install
            sys.stderr.write(
                f"\nrnnkern: building {ext.name} failed ({err}); the package installs without it "
                f"and backend '{ext.name.rsplit('_', 1)[-1]}' will say how to build it.\n\n"
            )

    def _compile_cuda(self, ext) -> None:
        """nvcc -c each .cu (targets from RNNKERN_CUDA_ARCHS) and add the objects and the
        static CUDA runtime to ``ext``'s link."""
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found")
        cudart = find_cudart_static(nvcc)
        if cudart is None:
            raise RuntimeError(f"libcudart_static.a not found for {nvcc} (set CUDA_HOME)")
        gencode = cuda_gencode_flags(os.environ.get("RNNKERN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        flags = " ".join(gencode)
        objects, jobs = [], []
        for src in CUDA_SOURCES:
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            objects.append(obj)
            inputs = [src, *CUDA_HEADERS]
            stamp = obj + ".flags"  # the targets the object was built for
            if (
                os.path.exists(obj)
                and os.path.exists(stamp)
                and open(stamp).read() == flags
                and all(os.path.getmtime(obj) >= os.path.getmtime(f) for f in inputs)
            ):
                continue  # up to date
            cmd = [nvcc, "-c", src, "-o", obj, "-std=c++17", "-O3", "--threads", "0",
                   "-Xcompiler", "-fPIC", *gencode]  # fmt: skip
            jobs.append((cmd, stamp))

        def compile_one(job):
            cmd, stamp = job
            print("rnnkern:", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            with open(stamp, "w") as f:
                f.write(flags)

        # The sources compile side by side (--threads 0 only spreads one source's targets over
        # cores, and a GPU machine's build names one target).
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
            list(pool.map(compile_one, jobs))
        ext.extra_objects = [*objects, cudart]


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
                depends=sorted(glob.glob(os.path.join("csrc", "cpu", "*.h"))) + COMMON_HEADERS,
                # -ffp-contract=fast lets GCC fuse a*b+c into FMA under -std=c++17 (ISO mode
                # turns contraction off); -Wno-psabi silences notes about vector-argument ABI
                # changes between the ISA-specific copies, which never call each other.
                extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi"],
                extra_link_args=["-fopenmp"],
            )
        )
    if os.environ.get("RNNKERN_NO_CUDA_EXT") == "1":
        pass  # asked not to build the CUDA extension
    elif CUDA_SOURCES and find_nvcc() is None:
        sys.stderr.write(
            "rnnkern: nvcc not found (set CUDA_HOME or put nvcc on PATH); skipping the CUDA "
            "extension rnnkern._cuda. Backend 'cuda' will say how to build it.\n"
        )
    elif CUDA_SOURCES:
        from pybind11.setup_helpers import Pybind11Extension

        exts.append(
            Pybind11Extension(
                CUDA_EXT,
                [os.path.join("csrc", "cuda", "bindings.cpp")],
                cxx_std=17,
                depends=CUDA_SOURCES + CUDA_HEADERS,
                extra_compile_args=["-O2"],
                extra_link_args=["-ldl", "-lrt", "-lpthread"],
            )
        )
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
