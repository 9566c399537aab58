"""Suite ``cpu_train``: rnnkern.LSTM / GRU with backend ``cpu`` beside torch.nn on the CPU.

One timed run is a forward + backward (``y.sum().backward()``, all parameter and input
gradients) or a forward alone under ``no_grad``. The target shape is LSTM 2x512,
B=32, T=256; smaller shapes show where backend ``cpu`` wins or loses, for ``auto``.
Forward-only cases also time ONNX Runtime's LSTM / GRU operators on the same weights
(:mod:`.onnxrt`; inference only) when ``onnxruntime`` and ``onnx`` are installed.
"""

from __future__ import annotations

import torch

import rnnkern

from . import onnxrt
from .runner import Case, module_step

SHAPES = [  # (cell, layers, batch, hidden, time)
    ("LSTM", 2, 32, 512, 256),
    ("LSTM", 1, 16, 256, 64),
    ("GRU", 1, 16, 256, 64),
    ("LSTM", 1, 1, 128, 64),
]
QUICK_SHAPES = [("LSTM", 1, 8, 128, 32), ("GRU", 1, 8, 128, 32)]


def cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []
    shapes = QUICK_SHAPES if quick else SHAPES
    return training_cases("cpu_train", shapes, (True, False), with_onnxruntime=True)


def _ort_forward(rnn: torch.nn.RNNBase, x: torch.Tensor):
    session = onnxrt.sequence_session(rnn)
    feed = {"x": x.detach().numpy()}
    return lambda: session.run(["y"], feed)


def training_cases(
    suite: str,
    shapes,
    modes,
    with_onnxruntime: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[Case]:
    """torch.nn beside rnnkern[cpu] for each ``(cell, layers, batch, hidden, time)`` shape and
    each mode in ``modes`` (True: forward + backward, False: forward under ``no_grad``), with
    modules and input in ``dtype``; with ``with_onnxruntime``, forward-only float32 cases time
    ONNX Runtime too where installed."""
    from ..backends import cpu as cpu_backend

    if cpu_backend._cpu is None:
        raise RuntimeError(f"suite {suite}: " + cpu_backend.build_hint())
    gen = torch.Generator().manual_seed(0)
    out = []
    for cell, L, B, H, T in shapes:
        for train in modes:
            base = getattr(torch.nn, cell)(H, H, num_layers=L).to(dtype)
            ours = getattr(rnnkern, cell)(H, H, num_layers=L, backend="cpu").to(dtype)
            ours.load_state_dict(base.state_dict())
            x = torch.randn(T, B, H, generator=gen).to(dtype).requires_grad_(train)
            fns = {
                "torch.nn": module_step(base, x, train),
                "rnnkern[cpu]": module_step(ours, x, train),
            }
            notes = f"kernels {cpu_backend._cpu.isa()}, {torch.get_num_threads()} threads"
            if with_onnxruntime and not train and dtype == torch.float32:
                if onnxrt.available():
                    fns["onnxruntime"] = _ort_forward(base, x)
                else:
                    notes += f"; no onnxruntime row: {onnxrt.install_hint()}"
            out.append(
                Case(
                    suite=suite,
                    name=f"{cell} {'fwd+bwd' if train else 'fwd'} L={L} B={B} H={H} T={T}"
                    + ("" if dtype == torch.float32 else f" {str(dtype).removeprefix('torch.')}"),
                    params=dict(
                        cell=cell,
                        layers=L,
                        batch=B,
                        hidden=H,
                        time=T,
                        train=train,
                        isa=cpu_backend._cpu.isa(),
                        threads=torch.get_num_threads(),
                        dtype=str(dtype).removeprefix("torch."),
                    ),  # fmt: skip
                    fns=fns,
                    baseline="torch.nn",
                    work={label: float(T * B) for label in fns},
                    work_unit="tokens",
                    notes=notes,
                )
            )
    return out
