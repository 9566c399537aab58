"""The CUDA kernels of ``csrc/cuda`` compiled for the CPU: module ``rnnkern._cuda_emulated``.

``csrc/cuda/emulation.h`` emulates the part of the CUDA execution model the kernels use (every
CUDA thread a fiber, switched at barriers, warp collectives and polling loops) and the runtime
calls of their launchers, so the unchanged kernel sources compile with the host C++ compiler
and run on CPU memory. Backend ``cuda`` and ``Decoder(backend="cuda")`` run on it when
``rnnkern.backends.cuda._cuda`` is this module (tests/conftest.py's ``cuda_kernels``): CPU
tensors instead of CUDA ones, every launch synchronous. What it checks is the kernels' logic
(indexing, the work split over blocks, batch chunks, shared-memory layouts, barriers and the
exchange between blocks, sampling, error reporting) on machines without a GPU. It measures
nothing about speed, and what only hardware shows (the memory model, occupancy, timing) stays
the GPU check's (benchmarks/gpu_check.sh).

The emulated device has ``sms`` multiprocessors and ``smem_optin`` bytes of shared memory per
block (:func:`configure`; default 4 and 232448, an H100's shared memory), so a small layer
already spreads over several blocks and a small budget sends weights to the "read from
global memory every step" path.

:func:`load` builds the module on first use from the source tree (``csrc/`` beside the
package; an installed wheel has no sources) with the host C++ compiler (``$CXX``, else
``c++``) into ``build/cuda_emulation/<hash of sources and flags>/`` (about 15 s on two cores),
reuses that build while nothing changed, and removes the builds of earlier sources.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
MODULE = "rnnkern._cuda_emulated"
# -O1: the kernels' templates (3 dtypes x 4 cells x 2 directions, generate x 2 x 5) compile in
# about half the time of -O2, and the emulation's cost is the fiber switches, not the arithmetic.
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-DRNNKERN_CUDA_EMULATION=1", "-Wno-unknown-pragmas"]
_module: ModuleType | None = None


def _sources() -> list[Path]:
    return sorted(
        [*CUDA_DIR.glob("*.cu"), *CUDA_DIR.glob("*.cuh"), *CUDA_DIR.glob("*.h"),
         *CUDA_DIR.glob("*.cpp"), *(ROOT / "csrc" / "common").glob("*.h")]
    )  # fmt: skip


def _includes() -> list[str]:
    try:
        import pybind11

        pybind = pybind11.get_include()
    except ImportError:  # torch ships the pybind11 headers too
        import torch.utils.cpp_extension

        pybind = torch.utils.cpp_extension.include_paths()[0]
    return [f"-I{CUDA_DIR}", f"-I{sysconfig.get_paths()['include']}", f"-I{pybind}"]


def unavailable_reason() -> str | None:
    """Why the emulation cannot be built here (no source tree, no C++ compiler), or None."""
    if not (CUDA_DIR / "emulation.cpp").is_file():
        return f"the CUDA emulation builds from the source tree, and {CUDA_DIR} is missing"
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")):
        return "the CUDA emulation needs a C++17 compiler: none found (set CXX or install g++)"
    return None


def _compiler() -> str:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build_dir() -> Path:
    """Where the module for the current sources and flags lives (built or not)."""
    h = hashlib.sha256()
    for path in _sources():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join([_compiler(), *FLAGS, sys.version]).encode())
    return ROOT / "build" / "cuda_emulation" / h.hexdigest()[:16]


def _build(out: Path) -> None:
    cxx = _compiler()
    flags = [*FLAGS, *_includes()]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp = Path(tmp)
        units = [CUDA_DIR / "emulation.cpp", CUDA_DIR / "bindings.cpp"]
        for name in ("recurrence", "generate"):  # the .cu files as C++ translation units
            unit = tmp / f"{name}_emulated.cpp"
            unit.write_text(f'#include "{name}.cu"\n')
            units.append(unit)

        def compile_unit(src: Path) -> Path:
            obj = tmp / (src.stem + ".o")
            res = subprocess.run([cxx, *flags, "-c", str(src), "-o", str(obj)],
                                 capture_output=True, text=True)  # fmt: skip
            if res.returncode != 0:
                raise RuntimeError(f"compiling {src.name} for the CUDA emulation failed:\n"
                                   + res.stderr[-6000:])  # fmt: skip
            return obj

        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = list(pool.map(compile_unit, units))
        lib = tmp / out.name
        res = subprocess.run([cxx, "-shared", *map(str, objects), "-o", str(lib)],
                             capture_output=True, text=True)  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError("linking the CUDA emulation failed:\n" + res.stderr[-6000:])
        os.replace(lib, out)  # atomic: a concurrent build leaves one complete file
    for old in out.parent.parent.iterdir():  # builds of earlier sources are not used again
        if old != out.parent and old.is_dir():
            shutil.rmtree(old)


def load() -> ModuleType:
    """``rnnkern._cuda_emulated``, built first when the sources changed."""
    global _module
    if _module is None:
        out = build_dir() / ("_cuda_emulated" + sysconfig.get_config_var("EXT_SUFFIX"))
        if not out.is_file():
            _build(out)
        spec = importlib.util.spec_from_file_location(MODULE, out)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _module = module
    return _module


def configure(sms: int = 4, smem_optin: int = 232448, schedule_seed: int = 0) -> None:
    """Give the emulated device ``sms`` multiprocessors and ``smem_optin`` bytes of shared
    memory per block (what the launchers plan the grid and shared memory against), and a
    schedule: 0 runs the threads in order, each until it waits; another value seeds random
    rounds in which a random half of the blocks runs, so blocks run ahead of each other
    (csrc/cuda/emulation.h, "Schedules")."""
    load().configure_emulation(sms, smem_optin, schedule_seed)
