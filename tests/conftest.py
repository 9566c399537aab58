"""Shared test fixtures."""

import os
from pathlib import Path

import pytest
import torch

# Triton chooses between compiling and interpreting when a kernel is decorated, i.e. when
# rnnkern.backends.triton is first imported. Without a CUDA device, choose the interpreter for the
# whole test process (before any test module can import that package), so backend "triton" runs
# its kernels on CPU tensors; with a CUDA device the kernels are compiled and run on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# cuDNN runs float32 RNNs in TF32 by default (10-bit mantissa, errors near 1e-3); comparisons
# against it are of float32 arithmetic, so turn TF32 off for the whole suite.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

from rnnkern import backends  # noqa: E402  (after the env setup)
from rnnkern.backends import cuda as cuda_backend  # noqa: E402
from rnnkern.backends import cuda_emulation  # noqa: E402
from rnnkern.backends.base import poison_allocations  # noqa: E402

# The CUDA kernels (csrc/cuda) run on a GPU where there is one and rnnkern._cuda is built;
# elsewhere their CPU emulation (rnnkern.backends.cuda_emulation: the same sources compiled
# for the CPU, built on first use) runs them on CPU tensors. Tests take the device from the
# ``cuda_kernels`` fixture.
CUDA_ON_GPU = torch.cuda.is_available() and cuda_backend._cuda is not None
CUDA_KERNELS_REASON = None if CUDA_ON_GPU else cuda_emulation.unavailable_reason()
CUDA_KERNELS_DEVICE = "cuda" if CUDA_ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def nan_poisoned_allocations():
    """Every buffer a backend allocates through ``backends.base.empty`` starts as NaN, so an
    output element a kernel never writes fails the comparison instead of passing as zero."""
    with poison_allocations():
        yield


@pytest.fixture
def cuda_kernels(monkeypatch) -> str:
    """The device whose tensors the CUDA kernels take in this test: ``"cuda"``, or ``"cpu"``
    with the emulation patched in as ``rnnkern.backends.cuda._cuda`` for this test only, on
    its default device (4 SMs, 232448 bytes of shared memory per block)."""
    if CUDA_KERNELS_REASON is not None:
        pytest.skip(f"no GPU for the CUDA kernels, and no emulation: {CUDA_KERNELS_REASON}")
    if not CUDA_ON_GPU:
        monkeypatch.setattr(cuda_backend, "_cuda", cuda_emulation.load())
        # the registry caches each backend's availability (an earlier test may have found
        # backend "cuda" unavailable): it is available now
        monkeypatch.setitem(backends._loaded, "cuda", cuda_backend.BACKEND)
        cuda_emulation.configure()
    return CUDA_KERNELS_DEVICE


@pytest.fixture
def huge_allocations_fail() -> None:
    """Skips a test unless the kernel refuses an allocation larger than its memory
    (vm.overcommit_memory 0 or 2); with 1 it might succeed and be paged in until killed."""
    mode = Path("/proc/sys/vm/overcommit_memory")
    if not mode.is_file() or mode.read_text().strip() == "1":
        pytest.skip("the kernel may grant an allocation larger than its memory (overcommit)")
