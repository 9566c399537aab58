"""Suite ``gpu_decode``: generating tokens with ``rnnkern.Decoder`` (backends ``cuda`` and
``triton``) beside stepping torch.nn.LSTM (cuDNN) on a CUDA device.

Model as suite ``cpu_decode`` (folk-rnn's size: 3-layer 512-unit LSTM, V = 137). One timed run
generates ``N`` tokens per stream, sampling each from the logits and feeding it back:

- ``torch.nn.LSTM step`` (baseline): one cuDNN ``nn.LSTM`` call per token with the carried
  state, then softmax + ``torch.multinomial`` on the device;
- ``rnnkern triton generate fp32`` / ``bf16``: one :meth:`rnnkern.Decoder.generate` call
  (one Triton launch per step, sampling on the device, each token replayed from a CUDA graph);
- ``rnnkern triton generate fp32, eager``: the same with CUDA graphs off (what the graphs save);
- ``rnnkern triton generate fp32, a graph per token``: graphs of one sample-and-step instead
  of ``Decoder.graph_tokens`` (8; what replaying 8 tokens at a time saves the host);
- ``rnnkern triton generate fp32, sampling in torch ops``: the same with ``fused_sampling``
  off, the sampling rule as 72-84 torch ops per token (what the one-launch sampler saves);
- ``rnnkern triton generate fp32, tl.dot tiles`` (B=1 only): the step multiplying 16-row
  tiles by ``tl.dot`` instead of GEMV mode (what GEMV mode saves; see
  :mod:`rnnkern.backends.triton.decode`);
- ``rnnkern cuda generate fp32`` / ``bf16``: one :meth:`rnnkern.Decoder.generate` call that is
  one kernel launch for all tokens (present when ``rnnkern._cuda`` is built);
- ``rnnkern cuda generate fp32, barriers``: the same with grid barriers instead of
  flag-carrying words between the blocks (what the flags save);
- ``rnnkern cuda generate fp32, 100 ns between polls``: flags with a pause between polls of a
  word not yet written (whether back-to-back polling slows the writers).

B in {1, 64} (the issue's decode shapes); ``--quick``: B = 1 and fewer tokens.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from torch import device as torch_device

from .cpu_decode import E, H, L, V, _generate, _lstm_steps, _model
from .runner import Case


def decode_fns(rnn, emb, head, B: int, n: int) -> dict[str, Callable[[], None]]:
    """The timed functions of one case, by row label (module docstring): each generates ``n``
    tokens for each of ``B`` streams with the model ``rnn`` (a torch.nn.LSTM), ``emb``,
    ``head`` on their device. The ``cuda`` rows are present where backend ``cuda`` can decode
    there (:func:`rnnkern.backends.cuda_decode.unavailable_reason`)."""
    from ..backends import cuda_decode
    from ..decode import Decoder

    eager = Decoder(rnn, emb, head, batch_size=B, backend="triton")
    eager.cuda_graphs = False
    unfused = Decoder(rnn, emb, head, batch_size=B, backend="triton")
    unfused.fused_sampling = False
    per_token = Decoder(rnn, emb, head, batch_size=B, backend="triton")
    per_token.graph_tokens = 1
    fns = {
        "torch.nn.LSTM step": _lstm_steps(rnn, emb, head, B, n),
        "rnnkern triton generate fp32": _generate(
            Decoder(rnn, emb, head, batch_size=B, backend="triton"), B, n
        ),
        "rnnkern triton generate bf16": _generate(
            Decoder(rnn, emb, head, weights="bf16", batch_size=B, backend="triton"), B, n
        ),
        "rnnkern triton generate fp32, eager": _generate(eager, B, n),
        "rnnkern triton generate fp32, a graph per token": _generate(per_token, B, n),
        "rnnkern triton generate fp32, sampling in torch ops": _generate(unfused, B, n),
    }
    dot = Decoder(rnn, emb, head, batch_size=B, backend="triton")
    if dot._triton_step.tiling.gemv:
        dot._triton_step = dataclasses.replace(dot._triton_step, gemv=False)
        fns["rnnkern triton generate fp32, tl.dot tiles"] = _generate(dot, B, n)
    if cuda_decode.unavailable_reason(rnn.weight_hh_l0.device) is None:
        for weights in ("fp32", "bf16"):
            fns[f"rnnkern cuda generate {weights}"] = _generate(
                Decoder(rnn, emb, head, weights=weights, batch_size=B, backend="cuda"), B, n
            )
        barriers = Decoder(rnn, emb, head, batch_size=B, backend="cuda")
        barriers._cuda.sync = "barrier"
        fns["rnnkern cuda generate fp32, barriers"] = _generate(barriers, B, n)
        pausing = Decoder(rnn, emb, head, batch_size=B, backend="cuda")
        pausing._cuda.spin_sleep_ns = 100
        fns["rnnkern cuda generate fp32, 100 ns between polls"] = _generate(pausing, B, n)
    return fns


def cases(device: str = "cuda", quick: bool = False) -> list[Case]:
    """Runner entry point. GPU only (on other devices: no cases)."""
    if not device.startswith("cuda"):
        return []
    from ..backends import cuda_decode

    rnn, emb, head = _model(device=device)
    cuda_reason = cuda_decode.unavailable_reason(torch_device(device))
    if cuda_reason is not None:
        print(f"gpu_decode: no 'rnnkern cuda generate' rows: {cuda_reason}", file=sys.stderr)
    n = 16 if quick else 128  # tokens per stream per timed run
    out = []
    for B in (1,) if quick else (1, 64):
        fns = decode_fns(rnn, emb, head, B, n)
        out.append(
            Case(
                suite="gpu_decode",
                name=f"decode LSTM {L}x{H} E={E} V={V} B={B}, {n} tokens/stream",
                params=dict(layers=L, hidden=H, vocab=V, batch=B, tokens=n),
                fns=fns,
                baseline="torch.nn.LSTM step",
                work={label: float(B * n) for label in fns},
                work_unit="tokens",
                device=device,
            )
        )
    return out
