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
rule. Where the plan multiplies on the tensor cores (bfloat16, 16 rows or more per batch group:
the ``mma`` matvec), the row ``rnnkern[cuda], fma matvec`` runs the float32-FMA matvec instead
(``RNNKERN_CUDA_MATVEC=tiled``). Where keeping the weights resident costs the plan its batch
chunk size (chunks under 16 rows), the row ``rnnkern[cuda], resident only with 16-row chunks``
runs the plan that streams the weights from L2 instead, or splits the batch otherwise
(``RNNKERN_CUDA_RESIDENT_CHUNK=16``). At B >= 16 float32 is also timed with TF32 allowed on both
sides (cases named ``... float32 TF32``: cuDNN's TF32 RNNs, which are torch's default, against
the kernels' TF32 tensor-core matvec; :func:`with_tf32`), and float16 (torch.autocast's dtype on
CUDA; the kernels' forward takes the tensor cores, their backward the FMAs).

    rnnkern bench --suite cuda_train --device cuda [--quick]
"""

from __future__ import annotations

import os

import torch

import rnnkern

from .runner import Case, exact_float32, module_step

CELLS = ("LSTM", "GRU")
# (dtype, TF32 allowed on both sides, smallest B): TF32 and float16 (autocast's CUDA dtype,
# whose forward takes the tensor cores) from B = 16, where the tensor-core matvec runs
PRECISIONS = (
    (torch.float32, False, 1),
    (torch.bfloat16, False, 1),
    (torch.float32, True, 16),
    (torch.float16, False, 16),
)
BATCHES = (1, 16, 64)
HIDDEN = (256, 512, 1024)
T = 256


def plans(cell: str, dtype: torch.dtype, B: int, H: int, tf32: bool = False) -> list[dict]:
    """Backend ``cuda``'s forward and backward plans for this layer (on the current device;
    ``tf32``: float32 with TF32 allowed)."""
    from ..backends import cuda as cuda_backend

    return with_tf32(lambda: cuda_backend.plans(cell.lower(), dtype, B, H, H, False), tf32)()


def _layout(plan: dict) -> tuple:
    """What the resident-chunk rule can change in a plan."""
    return plan["batch_groups"], plan["batch_chunk"], plan["weights_in_smem"]


def with_tf32(fn, tf32: bool = True):
    """``fn`` run with TF32 allowed everywhere: cuDNN's RNNs, cuBLAS, and rnnkern's kernels
    (``torch.set_float32_matmul_precision("high")``); float32 exact again afterwards, as the
    runner keeps it (:func:`rnnkern.bench.runner.exact_float32`). ``fn`` itself when not
    ``tf32``."""
    if not tf32:
        return fn

    def run():
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        try:
            return fn()
        finally:
            exact_float32()

    return run


def with_env(fn, var: str, value: str):
    """``fn`` run with the environment variable ``var=value`` (the launchers read theirs when
    they plan, i.e. during the call), restored afterwards."""

    def run():
        before = os.environ.get(var)
        os.environ[var] = value
        try:
            return fn()
        finally:
            if before is None:
                del os.environ[var]
            else:
                os.environ[var] = before

    return run


def make_case(
    cell: str,
    dtype: torch.dtype,
    B: int,
    H: int,
    train: bool,
    device: str,
    T: int = T,
    tf32: bool = False,
) -> Case:
    """torch.nn (baseline) and rnnkern with backend ``cuda`` sharing weights and data:
    x, dy ``[T, B, H]``; ``tf32``: float32 timed with TF32 allowed on both sides."""
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
    layer_plans = plans(cell, dtype, B, H, tf32)
    ours_fn = fns["rnnkern[cuda]"]
    if any(p["batch_groups"] > 1 for p in layer_plans):
        fns["rnnkern[cuda], batch not split"] = with_env(ours_fn, "RNNKERN_CUDA_BATCH_SPLIT", "off")
    elif B == 16:
        fns["rnnkern[cuda], batch in 2 groups"] = with_env(ours_fn, "RNNKERN_CUDA_BATCH_SPLIT", "2")
    chunked = with_env(lambda: plans(cell, dtype, B, H, tf32), "RNNKERN_CUDA_RESIDENT_CHUNK", "16")
    if [_layout(p) for p in chunked()] != [_layout(p) for p in layer_plans]:
        fns["rnnkern[cuda], resident only with 16-row chunks"] = with_env(
            ours_fn, "RNNKERN_CUDA_RESIDENT_CHUNK", "16"
        )
    if any(p["matvec"] == "mma" for p in layer_plans):
        fns["rnnkern[cuda], fma matvec"] = with_env(ours_fn, "RNNKERN_CUDA_MATVEC", "tiled")
    fns = {label: with_tf32(fn, tf32) for label, fn in fns.items()}
    return Case(
        suite="cuda_train",
        name=f"{cell} {mode} B={B} H={H} T={T} {str(dtype).removeprefix('torch.')}"
        + (" TF32" if tf32 else ""),
        params=dict(cell=cell, batch=B, hidden=H, time=T, train=train, dtype=str(dtype), tf32=tf32),
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
        make_case(cell, dtype, B, H, train, device, tf32=tf32)
        for H in HIDDEN
        for B in BATCHES
        for dtype, tf32, smallest_batch in PRECISIONS
        if B >= smallest_batch
        for cell in CELLS
        for train in modes
    ]
