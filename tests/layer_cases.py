"""Inputs and the outputs-plus-gradients run of one recurrent layer, shared by the GPU backend
tests (test_backend_triton.py, test_backend_cuda.py), which check a backend against
``reference`` on the same inputs.

Cell names: ``lstm``, ``lstm_proj`` (an LSTM with ``proj_size = H // 2``), ``gru``,
``rnn_tanh``, ``rnn_relu``.
"""

from __future__ import annotations

import math

import torch

from rnnkern.backends.base import LayerConfig
from rnnkern.functional import rnn_layer


def cell_of(name: str) -> str:
    """The rnn_layer cell of a test cell name."""
    return "lstm" if name == "lstm_proj" else name


def make_inputs(name, T, B, H, *, device, I=5, bias=True, dtype=torch.float32, seed=0):
    """Random layer inputs in ``dtype`` on ``device`` (states: float32 values representable in
    ``dtype``); weights scaled by 1/sqrt(fan-in)."""
    cell = cell_of(name)
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    P = max(1, H // 2) if name == "lstm_proj" else H
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    return dict(
        x=rnd(T, B, I, scale=1.0),
        h0=rnd(B, P, scale=0.5).float(),
        c0=rnd(B, H, scale=0.5).float() if cell == "lstm" else None,
        w_ih=rnd(G * H, I, scale=1 / math.sqrt(I)),
        w_hh=rnd(G * H, P, scale=1 / math.sqrt(P)),
        b_ih=rnd(G * H, scale=0.1) if bias else None,
        b_hh=rnd(G * H, scale=0.1) if bias else None,
        w_hr=rnd(P, H, scale=1 / math.sqrt(H)) if name == "lstm_proj" else None,
    )


def run(name, inp, backend, lengths=None, reverse=False, grad=True, dtype=None, seed=1):
    """Outputs and (with ``grad``) the gradients of every input under random upstream
    gradients on every output, as a dict by name (``y``, ``h_n``, ``c_n``, ``x``, ...)."""
    leaves = {
        k: (None if v is None else (v if dtype is None else v.to(dtype)).detach().clone())
        for k, v in inp.items()
    }
    if grad:
        for v in leaves.values():
            if v is not None:
                v.requires_grad_(True)
    y, h_n, c_n = rnn_layer(
        cell_of(name), leaves["x"], leaves["h0"], leaves["c0"], leaves["w_ih"], leaves["w_hh"],
        leaves["b_ih"], leaves["b_hh"], leaves["w_hr"], lengths=lengths, reverse=reverse,
        backend=backend,
    )  # fmt: skip
    out = dict(y=y, h_n=h_n, c_n=c_n)
    if grad:
        gen = torch.Generator().manual_seed(seed)
        loss = 0
        for t in (y, h_n, c_n):
            if t is not None:
                u = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device)
                loss = loss + (t.double() * u).sum()
        names = [k for k, v in leaves.items() if v is not None]
        grads = torch.autograd.grad(loss, [leaves[k] for k in names])
        out.update(zip(names, grads, strict=True))
    return {k: v for k, v in out.items() if v is not None}


def layer_config(**over) -> LayerConfig:
    """A LayerConfig of a small float32 LSTM layer on the CPU, with ``over`` changed
    (``functools.partial(layer_config, device_type="cuda", ...)`` for other defaults)."""
    base = dict(cell="lstm", device_type="cpu", dtype=torch.float32, input_size=4,
                hidden_size=8, proj_size=0, batch_size=2, seq_len=3, has_lengths=False,
                needs_grad=True)  # fmt: skip
    base.update(over)
    return LayerConfig(**base)
