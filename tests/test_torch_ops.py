"""rnnkern's torch operators as registered by rnnkern.torch_ops: torch's own operator checks
(schema, autograd registration, fake kernel, AOT dispatch) pass for each, and the autograd
formula runs only where a gradient is needed."""

import pytest
import torch

import rnnkern.functional  # noqa: F401  (registers the operators)
from rnnkern.functional import DOUBLE_BACKWARD_ERROR

pytestmark = pytest.mark.host_only  # nothing here needs a GPU (gpu_check.sh leaves it out)

OPS = torch.ops.rnnkern


def _layer_args(cell: str, backend: str, grad: bool, proj: bool = False):
    g = torch.Generator().manual_seed(0)
    T, B, H = 3, 2, 5
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    P = 3 if proj else H

    def t(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    lstm = cell == "lstm"
    lengths = torch.tensor([3, 2])
    return (cell, backend, t(T, B, G * H), t(B, P), t(B, H) if lstm else None, t(G * H, P),
            t(G * H), t(P, H) if proj else None, lengths, True, True)  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("cell,proj", [("lstm", False), ("lstm", True), ("gru", False),
                                       ("rnn_relu", False)])  # fmt: skip
def test_layer_forward_passes_opcheck(backend, cell, proj):
    torch.library.opcheck(OPS.layer_forward.default, _layer_args(cell, backend, True, proj))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_layer_backward_passes_opcheck(backend):
    cell, _, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, _ = _layer_args("lstm", backend, False)
    _, h_n, c_n, hs, aux, gates = OPS.layer_forward(
        cell, backend, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, True
    )
    dy = torch.randn(gx.shape[0], gx.shape[1], h0.shape[1])
    args = (cell, backend, hs, aux, gates, w_hh, b_hh, w_hr, lengths, reverse, dy,
            torch.randn_like(h_n), torch.randn_like(c_n))  # fmt: skip
    torch.library.opcheck(OPS.layer_backward.default, args)


def test_linear_ops_pass_opcheck():
    x, w, b, dy = torch.randn(12, 7), torch.randn(20, 7), torch.randn(20), torch.randn(12, 20)
    for args in ((x, w, b), (x.requires_grad_(), w.requires_grad_(), None)):
        torch.library.opcheck(OPS.linear.default, ("cpu", *args))
    args = ("cpu", dy, x.detach(), w.detach(), True, True, False)
    torch.library.opcheck(OPS.linear_backward.default, args)
    half = [t.detach().half() for t in (x, w, b, dy)]  # (float16: computed in float32)
    torch.library.opcheck(OPS.linear.default, ("cpu", *half[:3]))
    torch.library.opcheck(
        OPS.linear_backward.default, ("cpu", half[3], *half[:2], True, True, True)
    )


def test_outputs_carry_the_formula_only_where_a_gradient_is_needed():
    """No input requiring grad, grad mode off, or inference mode: the outputs carry no
    autograd node (the kernel runs without the formula's Function). Otherwise the node is
    rnnkern's formula, and backward reaches every input that asked for it."""
    args = _layer_args("gru", "cpu", False)
    assert all(o.grad_fn is None for o in OPS.layer_forward(*args))
    args = _layer_args("gru", "cpu", True)
    with torch.no_grad():
        assert all(o.grad_fn is None for o in OPS.layer_forward(*args))
    with torch.inference_mode():
        assert all(o.grad_fn is None for o in OPS.layer_forward(*args))
    y, h_n, *_ = OPS.layer_forward(*args)
    assert type(y.grad_fn).__name__ == "rnnkern_layer_forwardBackward"
    (y.sum() + h_n.sum()).backward()
    grads = [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_the_backward_operators_refuse_double_backward():
    args = _layer_args("gru", "cpu", True)
    y, *_ = OPS.layer_forward(*args)
    (dgx,) = torch.autograd.grad(y.pow(2).sum(), args[2], create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        dgx.sum().backward()
    assert "double backward" in DOUBLE_BACKWARD_ERROR
