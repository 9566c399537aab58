"""Suite ``cpu_short``: where a call's fixed cost decides, short sequences and single steps.

torch.nn runs GRU and RNN on the CPU as per-step ATen ops, which backend ``cpu`` beats on long
sequences (suite ``cpu_train``). A call through rnnkern's operators costs a fixed ~100 us more
than torch.nn's before its first step (the custom operators' dispatch, argument checks, output
allocation), so over few steps, and for the cells (one step a call), torch.nn's path wins.
This grid is what ``CPUBackend.faster_than_torch`` decides short calls from: GRU and RNN-tanh
over T in 1..32, the three cells, and the LSTM with a projection and in float64 at T = 1 and
16, torch.nn beside rnnkern[cpu], and beside ``auto``, which is what a user gets: torch.nn's
path where the rule keeps it, plus the cost of choosing. Each sample times ``CALLS`` calls, so
that a sample is well above the timer's and the scheduler's noise.
"""

from __future__ import annotations

import torch

import rnnkern

from .runner import Case, module_step

CALLS = 20
SEQUENCES = ("GRU", "RNN")
# The other configurations torch.nn runs as per-step ATen ops on the CPU (no oneDNN LSTM):
# with a projection, and float64; at the smaller size only, T = 1 and 16.
LSTM_KINDS = ("LSTM-proj", "LSTM-float64")
CELLS = ("GRUCell", "RNNCell", "LSTMCell")
TIMES = (1, 4, 8, 16, 32)
BATCHES = (1, 16)
HIDDENS = (64, 512)


def _repeated(fn, n: int):
    def run():
        for _ in range(n):
            fn()

    return run


def cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    from ..backends import cpu as cpu_backend

    if device != "cpu":
        return []
    if cpu_backend._cpu is None:
        raise RuntimeError("suite cpu_short: " + cpu_backend.build_hint())
    times, batches, hiddens = ((1, 8), (1,), (64,)) if quick else (TIMES, BATCHES, HIDDENS)
    gen = torch.Generator().manual_seed(0)
    shapes = [(c, B, H, T) for c in SEQUENCES for H in hiddens for B in batches for T in times]
    shapes += [(c, B, H, 1) for c in CELLS for H in hiddens for B in batches]
    shapes += [(c, 1, 64, T) for c in LSTM_KINDS for T in ((1,) if quick else (1, 16))]
    notes = f"kernels {cpu_backend._cpu.isa()}, {torch.get_num_threads()} threads"
    out = []
    for cell, B, H, T in shapes:
        for train in (True, False):
            kind, _, variant = cell.partition("-")
            kw = {"proj_size": H // 2} if variant == "proj" else {}
            dtype = torch.float64 if variant == "float64" else torch.float32
            base = getattr(torch.nn, kind)(H, H, dtype=dtype, **kw)
            ours = getattr(rnnkern, kind)(H, H, dtype=dtype, backend="cpu", **kw)
            auto = getattr(rnnkern, kind)(H, H, dtype=dtype, **kw)
            ours.load_state_dict(base.state_dict())
            auto.load_state_dict(base.state_dict())
            is_cell = cell.endswith("Cell")
            shape = (B, H) if is_cell else (T, B, H)
            x = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(train)
            modules = (("torch.nn", base), ("rnnkern[cpu]", ours), ("rnnkern[auto]", auto))
            fns = {label: _repeated(module_step(m, x, train), CALLS) for label, m in modules}
            out.append(
                Case(
                    suite="cpu_short",
                    name=f"{cell} {'fwd+bwd' if train else 'fwd'} B={B} H={H} T={T}",
                    params=dict(cell=cell, batch=B, hidden=H, time=T, train=train, calls=CALLS),
                    fns=fns,
                    baseline="torch.nn",
                    work={label: float(CALLS * T * B) for label in fns},
                    work_unit="tokens",
                    notes=notes + f"; {CALLS} calls a sample",
                )
            )
    return out
