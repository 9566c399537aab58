"""The reference backend against torch.autograd.gradcheck in float64.

gradcheck compares the explicit back-propagation through time with finite differences of the
forward, for every input of the layer op: x, h0, c0 and every weight and bias.
"""

import zlib

import pytest
import torch

from rnnkern.backends.base import gate_count
from rnnkern.functional import rnn_layer

pytestmark = pytest.mark.host_only  # nothing here needs a GPU (gpu_check.sh leaves it out)

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def _inputs(cell, T, B, I, H, P, bias, proj, gen):
    G = gate_count(cell)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    x = r(T, B, I)
    h0 = r(B, P)
    c0 = r(B, H) if cell == "lstm" else None
    w_ih, w_hh = r(G * H, I), r(G * H, P)
    b_ih, b_hh = (r(G * H), r(G * H)) if bias else (None, None)
    w_hr = r(P, H) if proj else None
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_gradcheck(cell, reverse, with_lengths):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{cell}-{reverse}-{with_lengths}".encode()))
    T, B, I, H = 4, 3, 3, 5
    args = _inputs(cell, T, B, I, H, H, True, False, gen)
    lengths = torch.tensor([4, 1, 3]) if with_lengths else None
    n_out = 3 if cell == "lstm" else 2

    def f(*a):
        return rnn_layer(cell, *a, lengths=lengths, reverse=reverse)[:n_out]

    # rnn_relu: gradcheck's finite differences (eps 1e-6) would fail only if a pre-activation
    # fell within 1e-6 of relu's kink; these fixed seeds keep every one well away from it.
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_lstm_projection_without_bias(reverse):
    gen = torch.Generator().manual_seed(7)
    T, B, I, H, P = 3, 2, 4, 6, 2
    args = _inputs("lstm", T, B, I, H, P, False, True, gen)
    lengths = torch.tensor([3, 2])

    def f(*a):
        return rnn_layer("lstm", *a, lengths=lengths, reverse=reverse)

    assert torch.autograd.gradcheck(f, args)


def test_outputs_past_length_are_zero_and_state_frozen():
    gen = torch.Generator().manual_seed(11)
    args = _inputs("gru", 5, 2, 3, 4, 4, True, False, gen)
    lengths = torch.tensor([2, 5])
    y, h_n, _ = rnn_layer("gru", *args, lengths=lengths)
    assert torch.all(y[2:, 0] == 0)
    torch.testing.assert_close(h_n[0], y[1, 0], rtol=0, atol=0)
    torch.testing.assert_close(h_n[1], y[4, 1], rtol=0, atol=0)
    # reverse: element 0 starts at t=1 and ends at t=0
    y_r, h_r, _ = rnn_layer("gru", *args, lengths=lengths, reverse=True)
    assert torch.all(y_r[2:, 0] == 0)
    torch.testing.assert_close(h_r[0], y_r[0, 0], rtol=0, atol=0)


@pytest.mark.parametrize("used", ["y", "h_n", "c_n"])
def test_gradients_when_only_some_outputs_are_used(used):
    """Outputs the loss does not touch reach backward as None (no zero tensors are
    materialised); the gradients must equal those of zero upstream gradients on them."""
    gen = torch.Generator().manual_seed(21)
    args = _inputs("lstm", 4, 2, 3, 5, 5, True, False, gen)
    y, h_n, c_n = rnn_layer("lstm", *args)
    out = {"y": y, "h_n": h_n, "c_n": c_n}
    weights = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in out.items()}
    leaves = [a for a in args if a is not None]
    grads = torch.autograd.grad((out[used] * weights[used]).sum(), leaves)
    y2, h2, c2 = rnn_layer("lstm", *args)
    full = sum(
        (o * (weights[k] if k == used else torch.zeros_like(o))).sum()
        for k, o in {"y": y2, "h_n": h2, "c_n": c2}.items()
    )
    expected = torch.autograd.grad(full, leaves)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
