"""Shared test fixtures."""

import os

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

from rnnkern.backends.base import poison_allocations  # noqa: E402  (after the env setup)


@pytest.fixture(autouse=True)
def nan_poisoned_allocations():
    """Every buffer a backend allocates through ``backends.base.empty`` starts as NaN, so an
    output element a kernel never writes fails the comparison instead of passing as zero."""
    with poison_allocations():
        yield
