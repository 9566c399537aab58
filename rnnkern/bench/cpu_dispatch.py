"""Suite ``cpu_dispatch``: where backend ``cpu`` beats torch.nn's LSTM (oneDNN) on the CPU.

float32 LSTM without projection is the one configuration where torch.nn runs a fused kernel of
its own (oneDNN's); GRU, RNN, projections and float64 run per-step ATen ops there, which
backend ``cpu`` beats everywhere measured (suite ``cpu_train``). This grid of one-layer runs
(forward + backward, and forward alone), batch x hidden at T=128, is what
``CPUBackend.faster_than_torch`` decides LSTM from.
"""

from __future__ import annotations

from .cpu_train import training_cases
from .runner import Case

BATCHES = (4, 16, 32, 64)
HIDDENS = (128, 256, 512, 1024)
T = 128


def cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []
    batches, hiddens = ((4, 32), (128,)) if quick else (BATCHES, HIDDENS)
    shapes = [("LSTM", 1, B, H, 32 if quick else T) for H in hiddens for B in batches]
    return training_cases("cpu_dispatch", shapes, (True, False))
