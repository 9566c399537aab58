"""Suite ``cuda_train``: backend ``cuda`` (csrc/cuda) beside torch.nn (cuDNN) on a GPU.

The training grid: LSTM and GRU, one layer, ``input_size == hidden_size``,
B in {1, 16, 64} x H in {256, 512, 1024}, T = 256, float32 (TF32 off on both sides) and
bfloat16. The quick grid is training only (forward + backward with a fixed random upstream
gradient); the full grid adds forward-only. Both implementations hold the same weights and run
interleaved in one process (:func:`rnnkern.bench.runner.measure`); the ratio is cuDNN median /
cuda median (above 1: the CUDA backend is faster). Where the kernels' plan splits the batch over
blocks (csrc/cuda/recurrence.cu, top comment; B = 64 here), the row ``rnnkern[cuda], batch not
split`` runs the same module with ``RNNKERN_CUDA_BATCH_SPLIT=off``; at B = 16, which the plan
never splits, the row ``rnnkern[cuda], batch in 2 groups`` forces a split
(``RNNKERN_CUDA_BATCH_SPLIT=2``), so a run shows what splitting changes on both sides of the
rule.

    rnnkern bench --suite cuda_train --device cuda [--quick]
"""

from __future__ import annotations

import os

import torch

import rnnkern

from .runner import Case, module_step

CELLS = ("LSTM", "GRU")
DTYPES = (torch.float32, torch.bfloat16)
BATCHES = (1, 16, 64)
HIDDEN = (256, 512, 1024)
T = 256


def batch_split(cell: str, dtype: torch.dtype, B: int, H: int) -> bool:
    """Whether backend ``cuda``'s forward or backward plan splits this batch over blocks (on
    the current device)."""
    from ..backends import cuda as cuda_backend
    from ..backends.base import CELL_CODES

    code, dt = CELL_CODES[cell.lower()], cuda_backend._DTYPE_CODE[dtype]
    return any(
        cuda_backend._cuda.plan(backward, code, dt, B, H, H, False)["batch_groups"] > 1
        for backward in (False, True)
    )


def with_batch_split(fn, value: str):
    """``fn`` run with ``RNNKERN_CUDA_BATCH_SPLIT=value`` (read by the launchers when they plan,
    i.e. during the call)."""

    def run():
        before = os.environ.get("RNNKERN_CUDA_BATCH_SPLIT")
        os.environ["RNNKERN_CUDA_BATCH_SPLIT"] = value
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["RNNKERN_CUDA_BATCH_SPLIT"]
            else:
                os.environ["RNNKERN_CUDA_BATCH_SPLIT"] = before

    return run


def make_case(
    cell: str, dtype: torch.dtype, B: int, H: int, train: bool, device: str, T: int = T
) -> Case:
    """torch.nn (baseline) and rnnkern with backend ``cuda`` sharing weights and data:
    x, dy ``[T, B, H]``."""
    gen = torch.Generator().manual_seed(B * 7919 + H * 31 + T)
    torch.manual_seed(0)
    base = getattr(torch.nn, cell)(H, H).to(device=device, dtype=dtype)
    ours = getattr(rnnkern, cell)(H, H, backend="cuda").to(device=device, dtype=dtype)
    ours.load_state_dict(base.state_dict())
    x = torch.randn(T, B, H, generator=gen).to(device=device, dtype=dtype)
    x.requires_grad_(train)
    dy = torch.randn(T, B, H, generator=gen).to(device=device, dtype=dtype)
    mode = "fwd+bwd" if train else "fwd"
    fns = {
        "torch.nn": module_step(base, x, train, dy),
        "rnnkern[cuda]": module_step(ours, x, train, dy),
    }
    if batch_split(cell, dtype, B, H):
        fns["rnnkern[cuda], batch not split"] = with_batch_split(fns["rnnkern[cuda]"], "off")
    elif B == 16:
        fns["rnnkern[cuda], batch in 2 groups"] = with_batch_split(fns["rnnkern[cuda]"], "2")
    return Case(
        suite="cuda_train",
        name=f"{cell} {mode} B={B} H={H} T={T} {str(dtype).removeprefix('torch.')}",
        params=dict(cell=cell, batch=B, hidden=H, time=T, train=train, dtype=str(dtype)),
        fns=fns,
        baseline="torch.nn",
        device=device,
        work={label: float(T * B) for label in fns},
        work_unit="tokens",
    )


def cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    """Runner entry point: CUDA only (no cases on other devices or without backend cuda);
    run_suites makes float32 exact before building them."""
    if not device.startswith("cuda") or "cuda" not in rnnkern.available_backends(device):
        return []
    modes = (True,) if quick else (True, False)
    return [
        make_case(cell, dtype, B, H, train, device)
        for H in HIDDEN
        for B in BATCHES
        for dtype in DTYPES
        for cell in CELLS
        for train in modes
    ]
