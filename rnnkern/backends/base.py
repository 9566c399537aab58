"""The backend contract: what every rnnkern backend implements for one layer, one direction.

Legend for shapes: ``T`` time steps, ``B`` batch, ``H`` hidden size, ``P`` size of the
recurrent state ``h`` (``proj_size`` when the LSTM has a projection, else ``H``), ``G`` gates
per cell (LSTM 4: i, f, g, o; GRU 3: r, z, n; RNN 1).

The input projection ``gx = x @ W_ihᵀ + b_ih`` is computed for all time steps at once by one
large GEMM before a backend is called, and ``dW_ih``, ``dx`` are GEMMs again after its backward,
so a backend owns only the recurrence. That GEMM is torch's, unless the backend offers its own
(the optional ``linear`` / ``linear_backward`` of :class:`Backend`, used through the
``rnnkern::linear`` operator): backend ``cpu`` does, because torch's CPU GEMM (MKL) runs at
about half the speed of the backend's on AMD processors and the projection is half of an
LSTM's arithmetic.

Dtypes: ``gx``, ``w_hh``, ``b_hh``, ``w_hr`` and the output ``y`` are in the input dtype
(float32, float64, float16 or bfloat16). States, saved activations and all accumulation are in
the *state dtype*: float64 for float64 inputs, float32 for every other input dtype.

Variable lengths: ``lengths[b]`` in ``[1, T]`` (int64, on the device of ``gx``) says that batch
element ``b`` is valid for ``t < lengths[b]``. Past its length an element's state is frozen (the
final state is the state after step ``lengths[b] - 1``) and its output is zero, as torch.nn does
for a PackedSequence. With ``reverse=True`` each element is processed from ``t = lengths[b] - 1``
down to ``0``.

Saved activations are returned in *processing order*: step ``s`` is the ``s``-th step an
element takes (so for ``reverse`` step ``s`` of element ``b`` is time ``lengths[b] - 1 - s``).
Their layout is fixed per cell so that ``register_fake`` knows every shape:

=========  ======================  =========================  ======================
cell       hs                      aux                        gates
=========  ======================  =========================  ======================
lstm       [T+1, B, P] h0..h_T     [T+1, B, H] c0..c_T        [T, B, 4H] i, f, g, o
gru        [T+1, B, H] h0..h_T     [T, B, H] W_hn h + b_hn    [T, B, 3H] r, z, n
rnn_*      [T+1, B, H] h0..h_T     [0]                        [0]
=========  ======================  =========================  ======================

``gates`` hold activated values (after sigmoid / tanh). With ``save=False`` all three are
empty tensors of shape ``[0]`` and backward must not be called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# The numbering the compiled kernels use for cells (``enum Cell`` in csrc/cpu/api.h and
# csrc/cuda/api.h).
CELL_CODES = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}


def gate_count(cell: str) -> int:
    """Number of gates ``G`` of a cell name (one of :data:`CELLS`)."""
    try:
        return GATES[cell]
    except KeyError:
        raise ValueError(f"cell must be one of {CELLS}, got {cell!r}") from None


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and accumulators use for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tf32_allowed(dtype: torch.dtype) -> bool:
    """Whether a kernel may multiply ``dtype`` inputs in TF32: float32 only, and only when the
    caller allowed it through ``torch.set_float32_matmul_precision("high"|"medium")``, as
    torch's own matmuls do. float32 products are exact IEEE otherwise (every GPU backend's
    rule: Triton's dot precision, the CUDA kernels' tensor-core matvec)."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"


def cudnn_rnn_tf32() -> bool:
    """Whether torch.nn's float32 RNNs on cuDNN multiply in TF32 (torch's default on GPUs that
    have it): ``torch.backends.cudnn.rnn.fp32_precision`` (torch 2.9+; "none" defers to
    ``torch.backends.cudnn.fp32_precision``, then ``torch.backends.fp32_precision``), else
    ``torch.backends.cudnn.allow_tf32``."""
    levels = (getattr(torch.backends.cudnn, "rnn", None), torch.backends.cudnn, torch.backends)
    for level in levels:
        precision = getattr(level, "fp32_precision", None)
        if precision not in (None, "none"):
            return precision == "tf32"
    if getattr(torch.backends.cudnn, "rnn", None) is not None:
        return False  # the new flags, all "none": IEEE
    return bool(torch.backends.cudnn.allow_tf32)


_poison = False


def empty(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A fresh output buffer. Backends allocate through this so that tests can fill every
    fresh allocation with NaN (:func:`poison_allocations`) and an element a kernel never
    writes fails loudly instead of reading as a plausible zero."""
    return fresh(torch.empty(shape, dtype=dtype, device=device))


def fresh(t: torch.Tensor) -> torch.Tensor:
    """``t``, a buffer a backend just allocated by other means than :func:`empty`, filled
    with NaN under :func:`poison_allocations`."""
    if _poison and t.is_floating_point():
        t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def poison_allocations() -> Iterator[None]:
    """Within the block, :func:`empty` returns NaN-filled buffers (a test aid)."""
    global _poison
    before, _poison = _poison, True
    try:
        yield
    finally:
        _poison = before


@dataclass(frozen=True)
class LayerConfig:
    """What a backend needs to know to say whether it supports a layer call."""

    cell: str
    device_type: str  # "cpu", "cuda", ...
    dtype: torch.dtype  # input dtype
    input_size: int
    hidden_size: int  # H
    proj_size: int  # 0 when there is no projection
    batch_size: int  # B
    seq_len: int  # T
    has_lengths: bool
    needs_grad: bool
    # Why torch.nn's own path fails for this call where rnnkern learnt it ahead of the call
    # (a float16 autocast that torch sends to a oneDNN LSTM the CPU has no primitive for:
    # rnnkern.nn._torch_autocast_dtypes), else "".
    torch_problem: str = ""


class Saved(NamedTuple):
    """Activations the forward keeps for backward (layout in the module docstring)."""

    hs: torch.Tensor
    aux: torch.Tensor
    gates: torch.Tensor


class ForwardResult(NamedTuple):
    y: torch.Tensor  # [T, B, P], input dtype, zero past each length
    h_n: torch.Tensor  # [B, P], state dtype
    c_n: torch.Tensor  # [B, H] state dtype for lstm, else empty [0]
    saved: Saved


class BackwardResult(NamedTuple):
    dgx: torch.Tensor  # [T, B, G*H], dtype of gx
    dh0: torch.Tensor  # [B, P], state dtype
    dc0: torch.Tensor | None  # [B, H] for lstm, else None
    dw_hh: torch.Tensor  # [G*H, P], dtype of w_hh
    db_hh: torch.Tensor | None  # [G*H] when b_hh was given, else None
    dw_hr: torch.Tensor | None  # [P, H] when w_hr was given, else None


class Backend(Protocol):
    """One implementation of the recurrence. See the module docstring for the contract."""

    name: str

    def available(self) -> bool | str:
        """True, or the reason this backend cannot run on this machine at all."""
        ...

    def supports(self, config: LayerConfig) -> bool | str:
        """True, or a human-readable reason why ``config`` is not supported."""
        ...

    def forward(
        self,
        cell: str,
        gx: torch.Tensor,  # [T, B, G*H]
        h0: torch.Tensor,  # [B, P], state dtype
        c0: torch.Tensor | None,  # [B, H], state dtype (lstm only)
        w_hh: torch.Tensor,  # [G*H, P]
        b_hh: torch.Tensor | None,  # [G*H]
        w_hr: torch.Tensor | None,  # [P, H] (lstm with proj_size only)
        lengths: torch.Tensor | None,  # [B] int64
        reverse: bool,
        save: bool,
    ) -> ForwardResult: ...

    def backward(
        self,
        cell: str,
        saved: Saved,
        w_hh: torch.Tensor,  # [G*H, P]
        b_hh: torch.Tensor | None,  # [G*H]
        w_hr: torch.Tensor | None,  # [P, H]
        lengths: torch.Tensor | None,  # [B] int64
        reverse: bool,
        dy: torch.Tensor,  # [T, B, P], dtype of y
        dh_n: torch.Tensor,  # [B, P], state dtype
        dc_n: torch.Tensor | None,  # [B, H], state dtype (lstm only)
    ) -> BackwardResult: ...


class OwnsLinear(Protocol):
    """Optional part of a backend: its own GEMM for the input projection, ``rnnkern::linear``.

    ``linear_supported(x, w)`` says whether it takes this product (dtype, device, size);
    ``linear`` and ``linear_backward`` must then agree with ``torch.nn.functional.linear`` and
    its gradients within the dtype's rounding.
    """

    def linear_supported(self, x: torch.Tensor, w: torch.Tensor) -> bool: ...

    def linear(
        self,
        x: torch.Tensor,  # [M, K]
        w: torch.Tensor,  # [N, K]
        b: torch.Tensor | None,  # [N]
    ) -> torch.Tensor: ...  # [M, N] = x @ wᵀ + b

    def linear_backward(
        self,
        dy: torch.Tensor,  # [M, N]
        x: torch.Tensor,  # [M, K]
        w: torch.Tensor,  # [N, K]
        need_dx: bool,
        need_dw: bool,
        need_db: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]: ...

    # dx [M, K] = dy @ w, dw [N, K] = dyᵀ @ x, db [N] = dy.sum(0); None where not needed
