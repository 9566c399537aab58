"""Suite ``cpu_16bit``: backend ``cpu`` beside torch.nn with bfloat16 and float16 modules.

On the CPU torch.nn runs a bfloat16 LSTM through oneDNN's fused LSTM, and everything else in
16 bits (GRU, RNN, a float16 LSTM) as per-step ATen ops in that dtype; without hardware
float16 products (AVX512-FP16 or AVX-NE-CONVERT) torch multiplies float16 slowly. Backend
``cpu`` keeps float32 state and computes in float32, rounding the contract's tensors (gx, y,
dgx) to the input's dtype. This grid is what ``CPUBackend.faster_than_torch`` decides 16-bit
inputs from. (``torch.autocast("cpu")`` runs LSTMs in bfloat16 and the other cells in
float32.)
"""

from __future__ import annotations

import torch

from .cpu_train import training_cases
from .runner import Case

# (cell, layers, batch, hidden, time): latency (B=1), the cpu_train shapes and the target
# shape's layer (bfloat16 only: torch.nn's float16 LSTM of it takes seconds here), at 64-128
# steps and at 16 (where a call's fixed cost shows).
CELLS = ("LSTM", "GRU", "RNN")
SHAPES = {
    torch.bfloat16: [
        *[(cell, 1, B, H, T) for B, H, T in ((1, 128, 64), (16, 256, 64)) for cell in CELLS],
        *[(cell, 1, 32, 512, 128) for cell in ("LSTM", "GRU")],
        *[(cell, 1, B, H, 16) for B, H in ((1, 128), (16, 256)) for cell in CELLS],
    ],
    torch.float16: [
        *[(cell, 1, B, H, T) for B, H, T in ((1, 128, 64), (16, 256, 64)) for cell in CELLS],
        *[(cell, 1, B, H, 16) for B, H in ((1, 128), (16, 256)) for cell in CELLS],
    ],
}
QUICK_SHAPES = [("LSTM", 1, 4, 64, 16), ("GRU", 1, 4, 64, 16)]
TORCH_PRODUCTS = "rnnkern[cpu], float16 products by torch"


def _with_torch_products(fn):
    """``fn`` with backend cpu's input projections left to torch (as on CPUs with float16
    arithmetic), to time what its own float16 products save."""
    from ..backends import cpu

    def run():
        own = cpu._NATIVE_FLOAT16
        cpu._NATIVE_FLOAT16 = True
        try:
            fn()
        finally:
            cpu._NATIVE_FLOAT16 = own

    return run


def cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    from ..backends import cpu

    if device != "cpu":
        return []
    out = []
    for dtype, shapes in SHAPES.items():
        out += training_cases("cpu_16bit", QUICK_SHAPES if quick else shapes, (True, False),
                              dtype=dtype)  # fmt: skip
    for case in out:
        if case.params["dtype"] == "float16" and not cpu._NATIVE_FLOAT16:
            case.fns[TORCH_PRODUCTS] = _with_torch_products(case.fns["rnnkern[cpu]"])
            case.work[TORCH_PRODUCTS] = case.work["rnnkern[cpu]"]
    return out
