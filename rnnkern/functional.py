"""One recurrent layer, one direction, as a torch operator.

The recurrence is registered as torch operators (:mod:`rnnkern.torch_ops`: schema, kernel, fake
kernel and autograd formula): forward and backward are two opaque operators that every backend
implements, so ``torch.compile(fullgraph=True)`` traces rnnkern RNNs without a graph break and
backward runs in eval mode too. The input projection ``x @ W_ihᵀ + b_ih`` stays an ordinary
GEMM around the operator: torch's (``dx`` and ``dW_ih`` then come from torch's autograd), or the
backend's own where it has one, as the operator ``rnnkern::linear`` (:func:`input_projection`).

Legend: ``T`` time, ``B`` batch, ``I`` input size, ``H`` hidden, ``P`` state size (proj_size
or H), ``G`` gates (LSTM 4, GRU 3, RNN 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import torch_ops
from .backends import get_backend
from .backends.base import CELLS, gate_count, state_dtype

__all__ = ["input_projection", "rnn_layer"]


def needs_grad(*groups) -> bool:
    """Whether a call on the tensors of ``groups`` (iterables; None entries skipped) must keep
    what backward needs.

    Grad mode on and some tensor requiring grad, as autograd decides; under ``torch.jit.trace``
    grad mode is not asked. The trace must not depend on it: its check re-traces the call under
    ``no_grad`` and fails when the graphs differ (they did, in the ``save`` flag of
    ``layer_forward``), and the traced graph may run later with gradients either way. The
    groups are walked only with grad mode on (a module's ``parameters()`` is a generator).
    """
    if not (torch.is_grad_enabled() or torch.jit.is_tracing()):
        return False
    return any(t is not None and t.requires_grad for group in groups for t in group)


def _layer_forward_kernel(
    cell: str,
    backend: str,
    gx: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    result = get_backend(backend).forward(
        cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save
    )
    return (result.y, result.h_n, result.c_n, *result.saved)


def _layer_forward_fake(cell, backend, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save):
    T, B, _ = gx.shape
    G = gate_count(cell)
    H = w_hh.shape[0] // G
    P = w_hh.shape[1]
    acc = state_dtype(gx.dtype)
    y = gx.new_empty(T, B, P)
    h_n = gx.new_empty(B, P, dtype=acc)
    c_n = gx.new_empty((B, H) if cell == "lstm" else (0,), dtype=acc)
    if not save:
        shapes = [(0,), (0,), (0,)]
    elif cell == "lstm":
        shapes = [(T + 1, B, P), (T + 1, B, H), (T, B, 4 * H)]
    elif cell == "gru":
        shapes = [(T + 1, B, P), (T, B, H), (T, B, 3 * H)]
    else:
        shapes = [(T + 1, B, P), (0,), (0,)]
    hs, aux, gates = (gx.new_empty(shape, dtype=acc) for shape in shapes)
    return y, h_n, c_n, hs, aux, gates


def _layer_backward_kernel(
    cell: str,
    backend: str,
    hs: Tensor,
    aux: Tensor,
    gates: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    dy: Tensor,
    dh_n: Tensor,
    dc_n: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .backends.base import Saved

    r = get_backend(backend).backward(
        cell, Saved(hs, aux, gates), w_hh, b_hh, w_hr, lengths, reverse, dy, dh_n, dc_n
    )
    # operators cannot return None: absent gradients travel as empty tensors.
    empty = dh_n.new_empty(0)
    return (
        r.dgx,
        r.dh0,
        r.dc0 if r.dc0 is not None else empty,
        r.dw_hh,
        r.db_hh if r.db_hh is not None else w_hh.new_empty(0),
        r.dw_hr if r.dw_hr is not None else w_hh.new_empty(0),
    )


def _layer_backward_fake(
    cell, backend, hs, aux, gates, w_hh, b_hh, w_hr, lengths, reverse, dy, dh_n, dc_n
):
    T, B, _ = dy.shape
    GH = w_hh.shape[0]
    return (
        dy.new_empty(T, B, GH),
        torch.empty_like(dh_n),
        torch.empty_like(dc_n) if (cell == "lstm" and dc_n is not None) else dh_n.new_empty(0),
        torch.empty_like(w_hh),
        torch.empty_like(b_hh) if b_hh is not None else w_hh.new_empty(0),
        torch.empty_like(w_hr) if w_hr is not None else w_hh.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    cell, backend, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save = inputs
    _, h_n, c_n, hs, aux, gates = output
    ctx.cell, ctx.backend, ctx.reverse, ctx.save = cell, backend, reverse, save
    ctx.has_c0, ctx.has_b_hh, ctx.has_w_hr = c0 is not None, b_hh is not None, w_hr is not None
    ctx.y_dtype = gx.dtype
    ctx.save_for_backward(hs, aux, gates, w_hh, b_hh, w_hr, lengths, h_n, c_n)
    # The saved activations are outputs only because an operator must return what backward
    # needs. Marking them non-differentiable and not materialising absent gradients spares
    # backward three zero tensors as large as the activations (84 MB per layer of a 2x512
    # LSTM at B=32, T=256), and the dy / dh_n / dc_n the loss did not touch arrive as None.
    ctx.mark_non_differentiable(hs, aux, gates)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dh_n, dc_n, _dhs, _daux, _dgates):
    if not ctx.save:
        raise RuntimeError(
            "rnnkern: backward through a layer whose forward ran without saving activations "
            "(it ran with gradients disabled or with no input requiring grad)"
        )
    hs, aux, gates, w_hh, b_hh, w_hr, lengths, h_n, c_n = ctx.saved_tensors
    if dy is None:
        T, B = hs.shape[0] - 1, hs.shape[1]
        dy = hs.new_zeros(T, B, w_hh.shape[1], dtype=ctx.y_dtype)
    if dh_n is None:
        dh_n = torch.zeros_like(h_n)
    if ctx.cell == "lstm" and dc_n is None:
        dc_n = torch.zeros_like(c_n)
    dgx, dh0, dc0, dw_hh, db_hh, dw_hr = _layer_backward(
        ctx.cell,
        ctx.backend,
        hs,
        aux,
        gates,
        w_hh,
        b_hh,
        w_hr,
        lengths,
        ctx.reverse,
        dy.contiguous(),
        dh_n.contiguous(),
        dc_n.contiguous() if ctx.cell == "lstm" else None,
    )
    return (
        None,
        None,
        dgx,
        dh0,
        dc0 if ctx.has_c0 else None,
        dw_hh,
        db_hh if ctx.has_b_hh else None,
        dw_hr if ctx.has_w_hr else None,
        None,
        None,
        None,
    )


# What differentiating a gradient through a layer meets (torch.autograd.grad with
# create_graph=True, then backward through its result: a gradient penalty, for instance).
# The backward is one operator with no derivative of its own, as with torch.nn on cuDNN
# (a derivative would need the layer's input projection kept: 4H more per row and step for an
# LSTM, two thirds more than it keeps now). Without these formulas torch's error told the
# user to register one.
DOUBLE_BACKWARD_ERROR = (
    "rnnkern: the gradient of an rnnkern RNN layer cannot be differentiated again (double "
    "backward): the layer's backward is one operator without a derivative of its own, as "
    "cuDNN's is. On the CPU, backend='torch' runs torch.nn's implementation, which has one"
)


def _double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _linear_kernel(backend: str, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return get_backend(backend).linear(x, w, b)


def _linear_fake(backend, x, w, b):
    return x.new_empty(x.shape[0], w.shape[0])


def _linear_backward_kernel(
    backend: str, dy: Tensor, x: Tensor, w: Tensor, need_dx: bool, need_dw: bool, need_db: bool
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = get_backend(backend).linear_backward(dy, x, w, need_dx, need_dw, need_db)
    # operators cannot return None: absent gradients travel as empty tensors.
    return tuple(t if t is not None else dy.new_empty(0) for t in (dx, dw, db))


def _linear_backward_fake(backend, dy, x, w, need_dx, need_dw, need_db):
    return (
        torch.empty_like(x) if need_dx else dy.new_empty(0),
        torch.empty_like(w) if need_dw else dy.new_empty(0),
        dy.new_empty(w.shape[0]) if need_db else dy.new_empty(0),
    )


def _linear_setup_context(ctx, inputs, output):
    ctx.backend = inputs[0]
    ctx.save_for_backward(inputs[1], inputs[2])


def _linear_autograd(ctx, dy):
    x, w = ctx.saved_tensors
    _, need_dx, need_dw, need_db = ctx.needs_input_grad
    if dy is None or not (need_dx or need_dw or need_db):
        return None, None, None, None
    dx, dw, db = _linear_backward(
        ctx.backend, dy.contiguous(), x, w, need_dx, need_dw, bool(need_db)
    )
    return None, dx if need_dx else None, dw if need_dw else None, db if need_db else None


_layer_forward = torch_ops.define(
    "layer_forward",
    _layer_forward_kernel,
    _layer_forward_fake,
    _backward,
    _setup_context,
)
_layer_backward = torch_ops.define(
    "layer_backward",
    _layer_backward_kernel,
    _layer_backward_fake,
    _double_backward,
)
_linear = torch_ops.define(
    "linear",
    _linear_kernel,
    _linear_fake,
    _linear_autograd,
    _linear_setup_context,
)
_linear_backward = torch_ops.define(
    "linear_backward",
    _linear_backward_kernel,
    _linear_backward_fake,
    _double_backward,
)


def input_projection(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, backend: str) -> Tensor:
    """``gx [T, B, G*H] = x [T, B, I] @ w_ihᵀ + b_ih``, contiguous, as one GEMM over all steps.

    The GEMM is the backend's own where it offers one for this input (``linear_supported``,
    see :class:`rnnkern.backends.base.OwnsLinear`), else torch's.
    """
    impl = get_backend(backend)
    if getattr(impl, "linear_supported", None) is not None and impl.linear_supported(x, w_ih):
        T, B, I = x.shape
        gx = _linear(backend, x.reshape(T * B, I).contiguous(), w_ih.contiguous(), b_ih)
        return gx.view(T, B, -1)
    return torch.nn.functional.linear(x, w_ih, b_ih).contiguous()


def layer_recurrence(
    cell: str,
    gx: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The recurrence alone, on precomputed ``gx [T, B, G*H]``; no argument checks.

    ``h0 [B, P]`` and ``c0 [B, H]`` must already be in the state dtype. Returns
    ``y [T, B, P]`` (dtype of ``gx``), ``h_n [B, P]`` and ``c_n [B, H]`` (or None), in the
    state dtype.
    """
    save = needs_grad((gx, h0, c0, w_hh, b_hh, w_hr))
    y, h_n, c_n, *_ = _layer_forward(
        cell, backend, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save
    )
    return y, h_n, (c_n if cell == "lstm" else None)


def _check_tensor(name: str, t, shape: tuple[int, ...], device, dtype=None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(t)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on device {device}, got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")


def _check_state(name: str, t, shape: tuple[int, ...], device, dtype, acc) -> None:
    """An initial state: in the input's dtype or the state dtype (float32 for 16-bit inputs),
    as the modules take it; a float64 state for float32 input was silently rounded."""
    _check_tensor(name, t, shape, device)
    if t.dtype not in (dtype, acc):
        allowed = f"{dtype}" if dtype == acc else f"{dtype} or {acc}"
        raise ValueError(f"{name} must have dtype {allowed} (the input's), got {t.dtype}")


def rnn_layer(
    cell: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    w_hr: Tensor | None = None,
    lengths: Tensor | None = None,
    reverse: bool = False,
    backend: str = "reference",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run one recurrent layer in one direction.

    Args:
        cell: ``"lstm"``, ``"gru"``, ``"rnn_tanh"`` or ``"rnn_relu"``.
        x: ``[T, B, I]`` input.
        h0: ``[B, P]`` initial hidden state; c0: ``[B, H]`` initial cell state (LSTM only,
            else None).
        w_ih: ``[G*H, I]``; w_hh: ``[G*H, P]``; b_ih, b_hh: ``[G*H]`` or None;
            w_hr: ``[P, H]`` LSTM projection or None. Gate order is torch.nn's.
        lengths: ``[B]`` int64 valid lengths in ``[1, T]`` or None (all ``T``).
        reverse: process each sequence from its last valid step to its first.
        backend: a kernel backend name (see :func:`rnnkern.available_backends`).

    Returns:
        ``y [T, B, P]`` in the dtype of ``x``; ``h_n [B, P]`` and ``c_n [B, H]`` (None for
        non-LSTM cells) in the state dtype (float64 for float64 input, else float32).
    """
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
    if not isinstance(x, Tensor) or x.dim() != 3:
        got = f"{x.dim()}-D tensor" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a 3-D tensor [T, B, I], got {got}")
    T, B, I = x.shape
    if T < 1 or B < 1:
        raise ValueError(f"x must have T >= 1 and B >= 1, got shape {list(x.shape)}")
    if not isinstance(w_hh, Tensor) or w_hh.dim() != 2:
        raise ValueError("w_hh must be a 2-D tensor [G*H, P]")
    G = gate_count(cell)
    GH, P = w_hh.shape
    if GH % G:
        raise ValueError(f"w_hh.shape[0] must be a multiple of {G} for {cell}, got {GH}")
    H = GH // G
    dev, dt = x.device, x.dtype
    _check_tensor("w_ih", w_ih, (GH, I), dev, dt)
    _check_tensor("w_hh", w_hh, (GH, P), dev, dt)
    if w_hr is not None:
        if cell != "lstm":
            raise ValueError(f"w_hr (projection) is only supported for lstm, got cell {cell!r}")
        _check_tensor("w_hr", w_hr, (P, H), dev, dt)
    elif P != H:
        raise ValueError(f"w_hh must have shape [{GH}, {H}] without w_hr, got {list(w_hh.shape)}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            _check_tensor(name, b, (GH,), dev, dt)
    acc = state_dtype(dt)
    _check_state("h0", h0, (B, P), dev, dt, acc)
    if cell == "lstm":
        _check_state("c0", c0, (B, H), dev, dt, acc)
    elif c0 is not None:
        raise ValueError(f"c0 must be None for cell {cell!r}")
    if lengths is not None:
        _check_tensor(
            "lengths", lengths, (B,), lengths.device if isinstance(lengths, Tensor) else dev
        )
        if lengths.dtype != torch.int64:
            raise ValueError(f"lengths must be int64, got {lengths.dtype}")
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > T:
            raise ValueError(f"lengths must lie in [1, {T}], got values in [{lo}, {hi}]")
        lengths = lengths.to(dev)
    gx = input_projection(x, w_ih, b_ih, backend)
    return layer_recurrence(
        cell,
        gx,
        h0.to(acc).contiguous(),
        c0.to(acc).contiguous() if c0 is not None else None,
        w_hh.contiguous(),
        b_hh,
        w_hr.contiguous() if w_hr is not None else None,
        lengths,
        bool(reverse),
        backend,
    )
