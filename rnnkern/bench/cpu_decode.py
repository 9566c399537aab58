"""Suite ``cpu_decode``: generating tokens with rnnkern.Decoder beside stepping torch.nn.

Model: folk-rnn's size, a 3-layer 512-unit LSTM, vocabulary V = 137 (embedding 137 x 128 and a
512 -> 137 head). One timed run generates ``N`` tokens per stream, sampling each from the
logits and feeding it back:

- ``torch.nn.LSTM step`` (baseline): one ``nn.LSTM`` call per token with the carried state,
  then softmax + ``torch.multinomial``;
- ``torch.nn.LSTMCell step``: three ``nn.LSTMCell`` calls per token, same sampling;
- ``rnnkern generate fp32`` / ``bf16``: one :meth:`rnnkern.Decoder.generate` call for all
  ``N`` tokens (sampling in C++);
- ``rnnkern step fp32``: :meth:`Decoder.step` then :meth:`Decoder.sample` per token from
  Python (what a Python loop around the fused step costs);
- ``onnxruntime LSTM step``: one ONNX Runtime session run per token (embedding, its fused
  LSTM operator for each layer, head; weights pre-packed when the session is created; see
  :mod:`.onnxrt`) with the carried state, same sampling as the torch.nn rows. Present when
  ``onnxruntime`` and ``onnx`` are installed; the case's note says when it is not.

At B = 1 a second case generates 256 tokens per timed run (the steady state; see ``cases``), and
a third reports the weight bandwidth: the bytes of the matrices a decoding
step streams (``W_hh`` of layer 0, ``W_ih`` and ``W_hh`` of layers 1-2, the head; layer 0's
input projection is a table lookup) per second, beside ``torch.mv`` over a float32 matrix of
the same bytes (what a plain matrix-vector product reaches on this machine) and ``torch.sum``
over those bytes (reading them and nothing else: the floor of a float32 step at B = 1, since
every weight is read once per token and cannot be reused before the next token is known).
"""

from __future__ import annotations

import torch

from . import onnxrt
from .runner import Case

V, E, H, L = 137, 128, 512, 3


def _model(seed: int = 0, device: str = "cpu"):
    torch.manual_seed(seed)
    rnn = torch.nn.LSTM(E, H, num_layers=L).eval()
    modules = rnn, torch.nn.Embedding(V, E), torch.nn.Linear(H, V)
    return tuple(m.to(device) for m in modules)


def _sample_torch(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen).squeeze(1)


def _lstm_steps(rnn, emb, head, B: int, n: int):
    """One ``nn.LSTM`` call per token with the carried state (cuDNN on CUDA, oneDNN on the
    CPU), then softmax + ``torch.multinomial``, on the model's device."""
    device = rnn.weight_hh_l0.device
    gen = torch.Generator(device=device).manual_seed(0)

    @torch.no_grad()
    def run():
        tok = torch.zeros(B, dtype=torch.long, device=device)
        state = None
        for _ in range(n):
            out, state = rnn(emb(tok).unsqueeze(0), state)
            tok = _sample_torch(head(out[0]), gen)

    return run


def _cell_steps(rnn, emb, head, B: int, n: int):
    cells = []
    for l in range(L):
        cell = torch.nn.LSTMCell(E if l == 0 else H, H)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, name).copy_(getattr(rnn, f"{name}_l{l}"))
        cells.append(cell)
    gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def run():
        tok = torch.zeros(B, dtype=torch.long)
        states = [None] * L
        for _ in range(n):
            x = emb(tok)
            for l, cell in enumerate(cells):
                states[l] = cell(x, states[l])
                x = states[l][0]
            tok = _sample_torch(head(x), gen)

    return run


def _ort_steps(session, B: int, n: int):
    """One ONNX Runtime run per token with the carried state, then the torch.nn rows'
    sampling (the logits come back as a NumPy array, wrapped without a copy)."""
    import numpy as np

    gen = torch.Generator().manual_seed(0)

    def run():
        tok = np.zeros(B, dtype=np.int64)
        h = np.zeros((L, B, H), dtype=np.float32)
        c = np.zeros((L, B, H), dtype=np.float32)
        for _ in range(n):
            logits, h, c = session.run(None, {"tokens": tok, "h": h, "c": c})
            tok = _sample_torch(torch.from_numpy(logits), gen).numpy()

    return run


def _python_steps(dec, B: int, n: int):
    out = torch.empty(B, V)

    def run():
        dec.reset()
        tok = torch.zeros(B, dtype=torch.long)
        for j in range(n):
            tok = dec.sample(dec.step(tok, out=out), seed=0, step=j)

    return run


def _generate(dec, B: int, n: int):
    prime = torch.zeros(B, 1, dtype=torch.long, device=dec.device)

    def run():
        dec.reset()
        dec.generate(prime, n, seed=0)

    return run


def streamed_bytes(element_size: int) -> int:
    """Bytes of the matrices one decoding step reads (layer 0's W_ih is a table lookup)."""
    per_layer_hh = 4 * H * H
    return element_size * (per_layer_hh + (L - 1) * (4 * H * H + per_layer_hh) + V * H)


def cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    if device != "cpu":
        return []
    from ..backends import cpu as cpu_backend
    from ..decode import Decoder

    if cpu_backend._cpu is None:
        raise RuntimeError("suite cpu_decode: " + cpu_backend.build_hint())
    rnn, emb, head = _model()
    n = 8 if quick else 32  # tokens per stream per timed run
    ort = onnxrt.decode_session(rnn, emb, head) if onnxrt.available() else None
    ort_label = "onnxruntime LSTM step"
    ort_note = "" if ort is not None else f"; no {ort_label} row: {onnxrt.install_hint()}"
    out = []
    for B in (1,) if quick else (1, 16):
        dec32 = Decoder(rnn, emb, head, weights="fp32", batch_size=B)
        dec16 = Decoder(rnn, emb, head, weights="bf16", batch_size=B)
        fns = {
            "torch.nn.LSTM step": _lstm_steps(rnn, emb, head, B, n),
            "torch.nn.LSTMCell step": _cell_steps(rnn, emb, head, B, n),
            "rnnkern step fp32": _python_steps(Decoder(rnn, emb, head, batch_size=B), B, n),
            "rnnkern generate fp32": _generate(dec32, B, n),
            "rnnkern generate bf16": _generate(dec16, B, n),
        }
        if ort is not None:
            fns[ort_label] = _ort_steps(ort, B, n)
        isa = cpu_backend._cpu.isa()
        threads = torch.get_num_threads()
        out.append(
            Case(
                suite="cpu_decode",
                name=f"decode LSTM {L}x{H} V={V} B={B}, {n} tokens/stream",
                params=dict(
                    layers=L, hidden=H, vocab=V, batch=B, tokens=n, isa=isa, threads=threads
                ),  # fmt: skip
                fns=fns,
                baseline="torch.nn.LSTM step",
                work={label: float(B * n) for label in fns},
                work_unit="tokens",
                notes=f"rnnkern kernels: {isa}, {threads} threads{ort_note}",
            )
        )
        if B == 1 and not quick:
            # Steady state: with 32 tokens per timed run every run starts with the decoder's
            # 20 MB of fp32 weights evicted from the (shared, 32 MB) L3 by the interleaved
            # baselines' re-ordered weight copies; 256 tokens, a whole tune rather than a
            # phrase, measure the rate a generation loop settles at.
            long_n = 256
            steady = {
                "torch.nn.LSTM step": _lstm_steps(rnn, emb, head, B, long_n),
                "torch.nn.LSTMCell step": _cell_steps(rnn, emb, head, B, long_n),
                "rnnkern generate fp32": _generate(dec32, B, long_n),
                "rnnkern generate bf16": _generate(dec16, B, long_n),
            }
            if ort is not None:
                steady[ort_label] = _ort_steps(ort, B, long_n)
            out.append(
                Case(
                    suite="cpu_decode",
                    name=f"decode LSTM {L}x{H} V={V} B=1, {long_n} tokens/stream (steady state)",
                    params=dict(
                        layers=L,
                        hidden=H,
                        vocab=V,
                        batch=1,
                        tokens=long_n,
                        isa=isa,
                        threads=threads,
                    ),  # fmt: skip
                    fns=steady,
                    baseline="torch.nn.LSTM step",
                    work={label: float(long_n) for label in steady},
                    work_unit="tokens",
                    notes=f"rnnkern kernels: {isa}, {threads} threads{ort_note}",
                )
            )
        # Bandwidth: the same decoder runs beside a plain matrix-vector product over as many
        # float32 bytes as one fp32 step streams (B = 1 only: at B = 16 the step is compute-bound).
        if B == 1:
            rows = streamed_bytes(4) // (4 * H)
            w = torch.randn(rows, H)
            x = torch.randn(H)

            def mv(w=w, x=x):
                for _ in range(n):
                    torch.mv(w, x)

            def read(w=w):
                for _ in range(n):
                    w.sum()

            bw = {
                "torch.mv fp32 (same bytes)": mv,
                "torch.sum fp32 (same bytes, read only)": read,
                "rnnkern generate fp32": fns["rnnkern generate fp32"],
                "rnnkern generate bf16": fns["rnnkern generate bf16"],
            }
            out.append(
                Case(
                    suite="cpu_decode",
                    name=f"weight bandwidth B=1 ({streamed_bytes(4) / 1e6:.1f} MB fp32 / step)",
                    params=dict(layers=L, hidden=H, vocab=V, batch=1, tokens=n),
                    fns=bw,
                    baseline="torch.mv fp32 (same bytes)",
                    work={
                        "torch.mv fp32 (same bytes)": float(n * rows * H * 4),
                        "torch.sum fp32 (same bytes, read only)": float(n * rows * H * 4),
                        "rnnkern generate fp32": float(n * streamed_bytes(4)),
                        "rnnkern generate bf16": float(n * streamed_bytes(2)),
                    },
                    work_unit="B",
                    notes="rate = weight bytes streamed per second",
                )
            )
    return out
