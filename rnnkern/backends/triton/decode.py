"""Decode step: every layer of one step of a stacked LSTM / GRU / RNN and the output head in one
launch, for ``rnnkern.Decoder(backend="triton")``.

Legend: ``B`` streams, ``L`` layers, ``I`` input size of layer 0, ``H`` hidden, ``P`` state
size (proj_size of an LSTM with projection, else H), ``G`` gates (LSTM 4: i f g o; GRU 3: r z
n; RNN 1), ``GH = G * H``, ``V`` head outputs.

Grid ``(cdiv(B, BLOCK_B), n_split)``, as the training kernels (:mod:`.common`): program
``(i, j)`` owns stream rows ``i*BLOCK_B ...`` and hidden chunks ``j, j + n_split, ...`` of
``BLOCK_H`` units (every gate of them), then head chunks of ``BLOCK_V`` outputs. Layer ``l``
reads the whole new state of layer ``l - 1`` and the head the whole new top state, so the
programs of a batch tile meet at one grid-wide wait after every layer, and one more before an
LSTM projection ``h = W_hr (o * tanh c)`` (``SPLIT``, compiled GPUs only); under the
interpreter one program per batch tile does everything (``SPLIT=False``).

The state is updated in place: ``h_next`` is the Decoder's other ping-pong slot, and ``c`` is
overwritten by the program owning each unit (nothing else reads a unit's cell during a step).

Numerics are the CPU decoder's, so the same seed gives the same tokens on both up to float
rounding: float32 state and accumulation, and bfloat16 weights (``weights="bf16"``) widened to
float32 before the product (``tl.dot`` in IEEE float32). Rounding the state to bfloat16 for
tensor-core products would move logits by about 0.4% and with them tokens; a decode step is
bound by reading the weights once, which it does either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..base import CELL_CODES
from .common import INTERPRET, SYNC_TIMEOUT_MARK, grid_sync

# Fixed configuration (no autotuning: autotune re-runs a launch, which would advance the state
# twice). tl.dot needs at least 16 rows and columns: up to 16 streams share one 16-row tile,
# and 16-unit chunks give H / 16 programs per tile to spread the weight reads over SMs.
BLOCK_H = 16
BLOCK_K = 32
BLOCK_V = 16


def num_warps(block_b: int) -> int:
    """Warps per program. With 4 warps, 32- and 64-row tiles hit 255 registers and spilled
    (up to 628 bytes per thread; compile_check for sm_90); 64-row tiles spilled at 8 warps too,
    hence at most 32 rows per tile."""
    return 4 if block_b <= 16 else 8


def block_b(batch: int) -> int:
    """Rows per batch tile: 16 up to 16 streams, else 32 (more streams take more tiles)."""
    return 16 if batch <= 16 else 32


def all_configs() -> list[dict]:
    """Every constexpr combination :class:`DecodeStep` can launch (for compile_check): each
    cell (LSTM with and without projection), with or without the token table and the head,
    every batch tile, both grid modes."""
    lstm = CELL_CODES["lstm"]
    cells = [(c, False) for c in sorted(set(CELL_CODES.values()))] + [(lstm, True)]
    return [
        dict(CELL=cell, HAS_TABLE=table, HAS_HEAD=head, HAS_PROJ=proj, SPLIT=split, BLOCK_B=bb,
             BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, num_warps=num_warps(bb))
        for cell, proj in cells
        for table, head in ((True, True), (False, False), (False, True), (True, False))
        for bb in (16, 32)
        for split in (False, True)
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rows_times_weight(
    acc,  # [BLOCK_B, BLOCK_N] float32
    a_ptr,  # A [B, K] float32, row stride K
    offs_b,  # [BLOCK_B]
    mask_b,  # [BLOCK_B]
    w_ptr,  # W [N, K] float32 or bfloat16 (a torch.nn weight, used transposed)
    offs_n,  # [BLOCK_N] rows of W
    mask_n,  # [BLOCK_N]
    K,
    BLOCK_K: tl.constexpr,
):
    """``acc + A[offs_b] @ W[offs_n]ᵀ`` in float32 (weights widened, IEEE products)."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + offs_b[:, None] * K + offs_k[None, :],
            mask=mask_b[:, None] & mask_k[None, :],
            other=0.0,
            cache_modifier=".cg",  # states written by other programs of this launch
        )
        w = tl.load(
            w_ptr + offs_n[None, :] * K + offs_k[:, None],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _gate(
    g: tl.constexpr,  # gate index
    in_ptr,  # [B, K_in] float32 layer input (unused with USE_TABLE)
    K_in,
    w_in_ptr,  # [GH, K_in] W_ih of the layer
    b_in_ptr,  # [GH] float32 b_ih of the layer
    tok,  # [BLOCK_B] int64 token ids (USE_TABLE only)
    table_ptr,  # [vocab, GH] float32 embedding @ W_ih0ᵀ + b_ih0 (USE_TABLE only)
    h_ptr,  # [B, P] float32 state of the layer before the step
    w_h_ptr,  # [GH, P] W_hh of the layer
    b_h_ptr,  # [GH] float32 b_hh of the layer
    offs_b,
    mask_b,
    offs_h,
    mask_h,
    H,
    P,
    GH,
    USE_TABLE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Input part ``x W_igᵀ + b_ig`` and recurrent part ``h W_hgᵀ + b_hg`` of gate ``g`` for
    the tile, each ``[BLOCK_B, BLOCK_H]`` float32 (GRU's n gate needs them apart)."""
    rows = g * H + offs_h
    if USE_TABLE:
        gi = tl.load(
            table_ptr + tok[:, None] * GH + rows[None, :],
            mask=mask_b[:, None] & mask_h[None, :],
            other=0.0,
        )
    else:
        gi = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        gi = _rows_times_weight(gi, in_ptr, offs_b, mask_b, w_in_ptr, rows, mask_h, K_in, BLOCK_K)
        gi += tl.load(b_in_ptr + rows, mask=mask_h, other=0.0)[None, :]
    gh = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    gh = _rows_times_weight(gh, h_ptr, offs_b, mask_b, w_h_ptr, rows, mask_h, P, BLOCK_K)
    gh += tl.load(b_h_ptr + rows, mask=mask_h, other=0.0)[None, :]
    return gi, gh


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _layer(
    in_ptr,  # [B, K_in] float32 layer input (unused with USE_TABLE)
    K_in,
    w_in_ptr,  # [GH, K_in]
    b_in_ptr,  # [GH] float32
    tok,  # [BLOCK_B] int64
    table_ptr,  # [vocab, GH] float32
    h_ptr,  # [B, P] float32 state before the step
    w_h_ptr,  # [GH, P]
    b_h_ptr,  # [GH] float32
    h_out_ptr,  # [B, P] float32 state after the step (without HAS_PROJ)
    c_ptr,  # [B, H] float32 cell state, updated in place (LSTM only)
    m_ptr,  # [B, H] float32 o * tanh(c), the projection's input (HAS_PROJ only)
    offs_b,
    mask_b,
    pid_h,
    n_split,
    H,
    P,
    CELL: tl.constexpr,
    USE_TABLE: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One layer's step for this program's hidden chunks (torch.nn's cell formulas). With a
    projection the chunks' ``m = o * tanh(c)`` go to ``m_ptr`` and :func:`_project` makes h.
    Without one ``P == H``."""
    G = 4 if CELL == 0 else (3 if CELL == 1 else 1)
    GH = G * H
    for j in range(pid_h, tl.cdiv(H, BLOCK_H), n_split):
        offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        mask = mask_b[:, None] & mask_h[None, :]
        bh = offs_b[:, None] * H + offs_h[None, :]  # c and m; h too, as P == H without HAS_PROJ
        # Each gate is activated as soon as it is computed, so at most two pre-activation
        # tiles are live (fewer registers: compile_check).
        gi, gh = _gate(
            0, in_ptr, K_in, w_in_ptr, b_in_ptr, tok, table_ptr, h_ptr, w_h_ptr, b_h_ptr,
            offs_b, mask_b, offs_h, mask_h, H, P, GH, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K,
        )  # fmt: skip
        if CELL == 0:  # LSTM: i, f, g, o
            i = tl.sigmoid(gi + gh)
            gi, gh = _gate(
                1, in_ptr, K_in, w_in_ptr, b_in_ptr, tok, table_ptr, h_ptr, w_h_ptr, b_h_ptr,
                offs_b, mask_b, offs_h, mask_h, H, P, GH, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K,
            )  # fmt: skip
            c_new = tl.sigmoid(gi + gh) * tl.load(c_ptr + bh, mask=mask, other=0.0)
            gi, gh = _gate(
                2, in_ptr, K_in, w_in_ptr, b_in_ptr, tok, table_ptr, h_ptr, w_h_ptr, b_h_ptr,
                offs_b, mask_b, offs_h, mask_h, H, P, GH, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K,
            )  # fmt: skip
            c_new += i * _tanh(gi + gh)
            tl.store(c_ptr + bh, c_new, mask=mask)
            gi, gh = _gate(
                3, in_ptr, K_in, w_in_ptr, b_in_ptr, tok, table_ptr, h_ptr, w_h_ptr, b_h_ptr,
                offs_b, mask_b, offs_h, mask_h, H, P, GH, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K,
            )  # fmt: skip
            h_new = tl.sigmoid(gi + gh) * _tanh(c_new)  # m with a projection
        elif CELL == 1:  # GRU: r, z, n
            r = tl.sigmoid(gi + gh)
            gi, gh = _gate(
                1, in_ptr, K_in, w_in_ptr, b_in_ptr, tok, table_ptr, h_ptr, w_h_ptr, b_h_ptr,
                offs_b, mask_b, offs_h, mask_h, H, P, GH, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K,
            )  # fmt: skip
            z = tl.sigmoid(gi + gh)
            gi, gh = _gate(
                2, in_ptr, K_in, w_in_ptr, b_in_ptr, tok, table_ptr, h_ptr, w_h_ptr, b_h_ptr,
                offs_b, mask_b, offs_h, mask_h, H, P, GH, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K,
            )  # fmt: skip
            n = _tanh(gi + r * gh)
            h_prev = tl.load(h_ptr + bh, mask=mask, other=0.0)
            h_new = (1.0 - z) * n + z * h_prev
        elif CELL == 2:  # RNN tanh
            h_new = _tanh(gi + gh)
        else:  # RNN relu
            h_new = tl.maximum(gi + gh, 0.0)
        if HAS_PROJ:
            tl.store(m_ptr + bh, h_new, mask=mask)
        else:
            tl.store(h_out_ptr + bh, h_new, mask=mask)


@triton.jit
def _project(
    m_ptr,  # [B, H] float32
    w_hr_ptr,  # [P, H] W_hr of the layer
    h_out_ptr,  # [B, P] float32 state after the step
    offs_b,
    mask_b,
    pid_h,
    n_split,
    H,
    P,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """LSTM projection ``h = m W_hrᵀ`` for this program's chunks of ``P``."""
    for j in range(pid_h, tl.cdiv(P, BLOCK_H), n_split):
        offs_p = j * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_p = offs_p < P
        acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        acc = _rows_times_weight(acc, m_ptr, offs_b, mask_b, w_hr_ptr, offs_p, mask_p, H, BLOCK_K)
        tl.store(
            h_out_ptr + offs_b[:, None] * P + offs_p[None, :],
            acc,
            mask=mask_b[:, None] & mask_p[None, :],
        )


# Sizes are not specialised on (one compiled variant per cell, weight dtype and configuration).
@triton.jit(do_not_specialize=["B", "L", "I", "H", "P", "V"])
def decode_step_kernel(
    tok_ptr,  # [B] int64 token ids (HAS_TABLE)
    x_ptr,  # [B, I] float32 inputs of layer 0 (without HAS_TABLE)
    table_ptr,  # [vocab, GH] float32 embedding @ W_ih0ᵀ + b_ih0 (HAS_TABLE)
    w_ih0_ptr,  # [GH, I] weight dtype, W_ih of layer 0 (without HAS_TABLE)
    w_ih_ptr,  # [L - 1, GH, P] weight dtype, W_ih of layers 1 .. L-1
    w_hh_ptr,  # [L, GH, P] weight dtype
    b_ih_ptr,  # [L, GH] float32 (zeros when the model has no bias)
    b_hh_ptr,  # [L, GH] float32
    w_hr_ptr,  # [L, P, H] weight dtype (HAS_PROJ)
    h_cur_ptr,  # [L, B, P] float32 state before the step
    h_next_ptr,  # [L, B, P] float32 state after the step
    c_ptr,  # [L, B, H] float32 cell state, updated in place (LSTM)
    m_ptr,  # [B, H] float32 scratch (HAS_PROJ)
    head_w_ptr,  # [V, P] weight dtype (HAS_HEAD)
    head_b_ptr,  # [V] float32 (HAS_HEAD; zeros when the head has no bias)
    logits_ptr,  # [B, V] float32 (HAS_HEAD)
    sync_ptr,  # [cdiv(B, BLOCK_B)] int32 zeros (SPLIT)
    B,
    L,
    I,
    H,
    P,  # state size: proj_size with HAS_PROJ, else H
    V,
    CELL: tl.constexpr,  # rnnkern.backends.base.CELL_CODES
    HAS_TABLE: tl.constexpr,
    HAS_HEAD: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    G = 4 if CELL == 0 else (3 if CELL == 1 else 1)
    GH = G * H
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    if HAS_TABLE:
        tok = tl.load(tok_ptr + offs_b, mask=mask_b, other=0).to(tl.int64)
    else:
        tok = offs_b.to(tl.int64)  # unused
    sync = sync_ptr + pid_b
    BP = B * P
    BH = B * H
    arrivals = 0
    for l in range(0, L):
        if l == 0:  # input from the table or from x
            _layer(
                x_ptr, I, w_ih0_ptr, b_ih_ptr, tok, table_ptr, h_cur_ptr, w_hh_ptr, b_hh_ptr,
                h_next_ptr, c_ptr, m_ptr, offs_b, mask_b, pid_h, n_split, H, P,
                CELL, HAS_TABLE, HAS_PROJ, BLOCK_B, BLOCK_H, BLOCK_K,
            )  # fmt: skip
        else:  # input: the new state of the layer below
            _layer(
                h_next_ptr + (l - 1) * BP, P, w_ih_ptr + (l - 1) * GH * P, b_ih_ptr + l * GH,
                tok, table_ptr, h_cur_ptr + l * BP, w_hh_ptr + l * GH * P, b_hh_ptr + l * GH,
                h_next_ptr + l * BP, c_ptr + l * BH, m_ptr, offs_b, mask_b, pid_h, n_split,
                H, P, CELL, False, HAS_PROJ, BLOCK_B, BLOCK_H, BLOCK_K,
            )  # fmt: skip
        if HAS_PROJ:
            arrivals = grid_sync(sync, arrivals, n_split, SPLIT)  # every m of the layer
            _project(
                m_ptr, w_hr_ptr + l * P * H, h_next_ptr + l * BP, offs_b, mask_b, pid_h,
                n_split, H, P, BLOCK_B, BLOCK_H, BLOCK_K,
            )  # fmt: skip
        arrivals = grid_sync(sync, arrivals, n_split, SPLIT)  # the layer's whole new state
    if HAS_HEAD:
        top = h_next_ptr + (L - 1) * BP
        for j in range(pid_h, tl.cdiv(V, BLOCK_V), n_split):
            offs_v = j * BLOCK_V + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            acc = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
            acc = _rows_times_weight(
                acc, top, offs_b, mask_b, head_w_ptr, offs_v, mask_v, P, BLOCK_K
            )
            acc += tl.load(head_b_ptr + offs_v, mask=mask_v, other=0.0)[None, :]
            tl.store(
                logits_ptr + offs_b[:, None] * V + offs_v[None, :],
                acc,
                mask=mask_b[:, None] & mask_v[None, :],
            )


# ----------------------------------------------------------------------------------------------
# launch wrapper
# ----------------------------------------------------------------------------------------------


@dataclass
class DecodeStep:
    """The stacked weights of a model and the launch geometry for ``B`` streams.

    Built once by the Decoder; :meth:`__call__` launches one step. All tensors live on one
    device (CUDA, or CPU under ``TRITON_INTERPRET=1``).
    """

    cell: str
    B: int
    L: int
    I: int
    H: int
    P: int  # proj_size of an LSTM with projection, else H
    V: int
    table: torch.Tensor | None  # [vocab, GH] float32
    w_ih0: torch.Tensor | None  # [GH, I] weight dtype (None with a table)
    w_ih: torch.Tensor  # [max(L - 1, 1), GH, P] weight dtype
    w_hh: torch.Tensor  # [L, GH, P] weight dtype
    b_ih: torch.Tensor  # [L, GH] float32
    b_hh: torch.Tensor  # [L, GH] float32
    w_hr: torch.Tensor | None  # [L, P, H] weight dtype (LSTM projection)
    head_w: torch.Tensor | None  # [V, P] weight dtype
    head_b: torch.Tensor | None  # [V] float32

    def __post_init__(self) -> None:
        device = self.w_hh.device
        self.block_b = block_b(self.B)
        n_btiles = triton.cdiv(self.B, self.block_b)
        n_chunks = triton.cdiv(max(self.H, self.P, self.V), BLOCK_H)
        self.n_split = 1
        if device.type == "cuda" and not INTERPRET and n_chunks > 1:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            # Every program must be resident at once for the grid-wide wait: one per SM.
            self.n_split = max(1, min(n_chunks, sms // n_btiles))
        self.grid = (n_btiles, self.n_split)
        self.sync = torch.zeros(n_btiles, dtype=torch.int32, device=device)
        self._dummy = torch.zeros(1, dtype=torch.float32, device=device)
        self._dummy_tok = torch.zeros(1, dtype=torch.int64, device=device)
        self.m = (
            torch.empty(self.B, self.H, dtype=torch.float32, device=device)
            if self.w_hr is not None
            else None
        )

    def __call__(
        self,
        tokens: torch.Tensor | None,  # [B] int64 (with a table)
        x: torch.Tensor | None,  # [B, I] float32 (without a table)
        h_cur: torch.Tensor,  # [L, B, P] float32
        h_next: torch.Tensor,  # [L, B, P] float32, written
        c: torch.Tensor | None,  # [L, B, H] float32, updated (LSTM)
        logits: torch.Tensor | None,  # [B, V] float32, written (with a head)
    ) -> None:
        """One step of every stream; nothing is allocated, so the call can be graph-captured."""
        split = self.n_split > 1
        if split:
            self.sync.zero_()
        d = self._dummy
        decode_step_kernel[self.grid](
            tokens if tokens is not None else self._dummy_tok,
            x if x is not None else d,
            self.table if self.table is not None else d,
            self.w_ih0 if self.w_ih0 is not None else self.w_hh,
            self.w_ih, self.w_hh, self.b_ih, self.b_hh,
            self.w_hr if self.w_hr is not None else self.w_hh,
            h_cur, h_next, c if c is not None else d,
            self.m if self.m is not None else d,
            self.head_w if self.head_w is not None else self.w_hh,
            self.head_b if self.head_b is not None else d,
            logits if logits is not None else d,
            self.sync,
            self.B, self.L, self.I, self.H, self.P, self.V,
            CELL=CELL_CODES[self.cell], HAS_TABLE=self.table is not None,
            HAS_HEAD=self.head_w is not None, HAS_PROJ=self.w_hr is not None, SPLIT=split,
            BLOCK_B=self.block_b, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V,
            num_warps=num_warps(self.block_b),
        )  # fmt: skip

    def check_sync(self) -> None:
        """Raise if a grid-wide wait of the last step timed out (synchronises the device)."""
        if self.n_split > 1 and int(self.sync.max()) >= SYNC_TIMEOUT_MARK:
            raise RuntimeError(
                "rnnkern triton decode: a grid-wide wait timed out (not every program of the "
                "launch was resident); the state of the decoder is wrong, reset() it"
            )
