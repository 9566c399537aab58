"""Suite ``nn_modules``: rnnkern.LSTM / GRU beside torch.nn, training step and forward.

For each shape it times torch.nn (the baseline: cuDNN on CUDA, oneDNN/ATen on CPU), rnnkern
with ``backend="auto"`` and rnnkern with each fused kernel backend available on the device
(and the ``reference`` backend in quick CPU runs, to show what the fused kernels save).
Inputs are random (never zeros: zeros can run faster than real data and hide bugs).
"""

from __future__ import annotations

import torch

import rnnkern

from .runner import Case, module_step

# (cell, layers, batch, hidden, time) shapes; CPU shapes are small enough for a 2-core machine.
CPU_SHAPES = [
    ("LSTM", 1, 16, 256, 64),
    ("GRU", 1, 16, 256, 64),
    ("LSTM", 2, 32, 512, 32),
]
CPU_QUICK_SHAPES = [("LSTM", 1, 8, 128, 32), ("GRU", 1, 8, 128, 32)]
CUDA_SHAPES = [
    (cell, 1, B, H, T)
    for cell in ("LSTM", "GRU")
    for B in (1, 16, 64, 256)
    for H in (128, 256, 512, 1024)
    for T in (256, 1024)
]
CUDA_QUICK_SHAPES = [("LSTM", 1, 16, 256, 256), ("GRU", 1, 64, 512, 256)]


def _implementations(device: str, quick: bool) -> list[str]:
    names = ["auto"]
    for name in rnnkern.available_backends(device):
        if name in ("torch",):
            continue
        if name == "reference" and not (quick and device == "cpu"):
            continue
        if name == "triton" and not device.startswith("cuda"):
            continue  # Triton's CPU interpreter is a correctness tool, not something to time
        names.append(name)
    return names


def cases(device: str = "cpu", quick: bool = False, dtype=torch.float32) -> list[Case]:
    if device.startswith("cuda"):
        shapes = CUDA_QUICK_SHAPES if quick else CUDA_SHAPES
    else:
        shapes = CPU_QUICK_SHAPES if quick else CPU_SHAPES
    out = []
    gen = torch.Generator().manual_seed(0)
    for cell, L, B, H, T in shapes:
        for train in (True, False):
            torch_cls = getattr(torch.nn, cell)
            ours_cls = getattr(rnnkern, cell)
            baseline = torch_cls(H, H, num_layers=L).to(device=device, dtype=dtype)
            x = torch.randn(T, B, H, generator=gen).to(device=device, dtype=dtype)
            x.requires_grad_(train)
            fns = {"torch.nn": module_step(baseline, x, train)}
            for impl in _implementations(device, quick):
                module = ours_cls(H, H, num_layers=L, backend=impl).to(device=device, dtype=dtype)
                module.load_state_dict(baseline.state_dict())
                fns[f"rnnkern[{impl}]"] = module_step(module, x, train)
            tokens = float(T * B)
            out.append(
                Case(
                    suite="nn_modules",
                    name=f"{cell} {'fwd+bwd' if train else 'fwd'} L={L} B={B} H={H} T={T} "
                    f"{str(dtype).removeprefix('torch.')}",
                    params=dict(
                        cell=cell,
                        layers=L,
                        batch=B,
                        hidden=H,
                        time=T,
                        train=train,
                        dtype=str(dtype),
                    ),
                    fns=fns,
                    baseline="torch.nn",
                    device=device,
                    work={label: tokens for label in fns},
                    work_unit="tokens",
                )
            )
    return out
