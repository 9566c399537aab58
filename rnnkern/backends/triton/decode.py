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

Two ways to multiply a tile by its weights (:class:`Tiling`): up to :data:`GEMV_MAX_ROWS`
streams, GEMV mode (products broadcast over a ``[rows, units, k]`` block and summed over k,
4-unit chunks, so a 512-unit layer spreads over 128 programs); more streams, ``tl.dot`` on 16-
or 32-row tiles. Either way one pass over k loads the tiles of every gate before using any,
so each program waits for one round of loads per k block rather than one per gate.

The state is updated in place: ``h_next`` is the Decoder's other ping-pong slot, and ``c`` is
overwritten by the program owning each unit (nothing else reads a unit's cell during a step).

Numerics are the CPU decoder's, so the same seed gives the same tokens on both up to float
rounding: float32 state and accumulation, and bfloat16 weights (``weights="bf16"``) widened to
float32 before the product (IEEE float32 products in both modes). Rounding the state to
bfloat16 for tensor-core products would move logits by about 0.4% and with them tokens; a
decode step is bound by reading the weights once, which it does either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..base import CELL_CODES
from . import common
from .common import INTERPRET, SYNC_TIMEOUT_MARK, grid_sync, persistent_geometry


@dataclass(frozen=True)
class Tiling:
    """One launch geometry of the step: rows per batch tile, units per chunk (hidden, state
    and head outputs), k block, warps, and how a tile is multiplied by its weights."""

    gemv: bool  # broadcast products summed over k (few rows) instead of tl.dot
    block_b: int
    block_h: int
    block_k: int
    block_v: int
    num_warps: int

    def constexprs(self) -> dict:
        return dict(GEMV=self.gemv, BLOCK_B=self.block_b, BLOCK_H=self.block_h,
                    BLOCK_K=self.block_k, BLOCK_V=self.block_v)  # fmt: skip


# Fixed geometries (no autotuning: autotune re-runs a launch, which would advance the state
# twice). A step reads every weight once, so it is bound by how fast the programs pull weights
# from L2 and by how many dependent rounds of loads each one waits through; the arithmetic is
# a few hundred MFLOP/s of a GPU's tens of TFLOP/s.
#
# Up to GEMV_MAX_ROWS streams (GEMV mode): tl.dot needs 16-row, 16-column tiles, which at B=1
# wastes 15 of 16 rows and, for 3x512 units, gives only 512 / 16 = 32 programs to pull 25 MB
# of float32 weights. Broadcasting products and summing over k takes any tile: 4-unit chunks
# make 128 programs (one per SM on an H100). Each k block loads all gates' tiles of a chunk in
# one round: at one stream 512 wide (4 gates x 4 units x 512 x 4 B = 32 KB; a 512-wide input is
# one round, not two) over 8 warps (with 4, the aligned float32 LSTM step spilled 48 bytes; with
# 8, 88-127 registers and no spill, compile_check sm_90), at 4 streams 256 wide over 4 warps
# (512 took 218-225 registers against 128).
GEMV_MAX_ROWS = 4
GEMV = dict(block_h=4, block_v=4)
GEMV_BLOCK_K = {1: 512, GEMV_MAX_ROWS: 256}  # by rows per tile
GEMV_WARPS = {1: 8, GEMV_MAX_ROWS: 4}
# The interpreter runs the programs one after another at a cost per tile operation, so there
# GEMV mode uses 16-unit chunks (4-unit ones made the Triton decoder tests 1.8x slower); the
# code is the same, and a test runs the GPU's geometry too (None: no override).
INTERPRET_GEMV_CHUNK: int | None = 16 if INTERPRET else None
# More streams (tile mode): up to 16 share one 16-row tile, then 32-row tiles; 16-unit chunks
# give H / 16 programs per batch tile. With 4 warps, 32- and 64-row tiles hit 255 registers
# and spilled (up to 628 bytes per thread; compile_check for sm_90); 64-row tiles spilled at
# 8 warps too, hence at most 32 rows per tile.
TILE = dict(block_h=16, block_k=32, block_v=16)


def tiling(batch: int, gemv: bool | None = None) -> Tiling:
    """The geometry for ``batch`` streams; ``gemv`` forces a mode (None: GEMV up to
    :data:`GEMV_MAX_ROWS` streams)."""
    if gemv is None:
        gemv = batch <= GEMV_MAX_ROWS
    if gemv:
        if batch > GEMV_MAX_ROWS:
            raise ValueError(
                f"GEMV mode takes at most {GEMV_MAX_ROWS} streams per tile, got batch {batch}"
            )
        geometry = dict(GEMV)
        if INTERPRET_GEMV_CHUNK is not None:
            geometry.update(block_h=INTERPRET_GEMV_CHUNK, block_v=INTERPRET_GEMV_CHUNK)
        # one stream (the latency case) or GEMV_MAX_ROWS rows, fewer variants to compile
        rows = 1 if batch == 1 else GEMV_MAX_ROWS
        return Tiling(True, rows, block_k=GEMV_BLOCK_K[rows], num_warps=GEMV_WARPS[rows],
                      **geometry)  # fmt: skip
    bb = 16 if batch <= 16 else 32
    return Tiling(False, bb, **TILE, num_warps=4 if bb <= 16 else 8)


def all_tilings() -> list[Tiling]:
    """Every geometry :func:`tiling` can return."""
    return [tiling(1, True), tiling(GEMV_MAX_ROWS, True), tiling(16, False), tiling(32, False)]


def all_configs() -> list[dict]:
    """Every constexpr combination :class:`DecodeStep` can launch (for compile_check): each
    cell (LSTM with and without projection), with or without the token table and the head,
    every geometry, both grid modes."""
    lstm = CELL_CODES["lstm"]
    cells = [(c, False) for c in sorted(set(CELL_CODES.values()))] + [(lstm, True)]
    return [
        dict(CELL=cell, HAS_TABLE=table, HAS_HEAD=head, HAS_PROJ=proj, SPLIT=split,
             **t.constexprs(), num_warps=t.num_warps)
        for cell, proj in cells
        for table, head in ((True, True), (False, False), (False, True), (True, False))
        for t in all_tilings()
        for split in (False, True)
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _times_weight(
    acc,  # [BLOCK_B, BLOCK_N] float32
    w,  # GEMV: [BLOCK_N, BLOCK_K] weight tile; else [BLOCK_K, BLOCK_N] (see _load_weight)
    a,  # [BLOCK_B, BLOCK_K] float32 rows of A
    GEMV: tl.constexpr,
):
    """``acc + a @ wᵀ`` in float32 (weights widened, IEEE products): broadcast products summed
    over k in GEMV mode, ``tl.dot`` otherwise."""
    if GEMV:
        acc += tl.sum(a[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    else:
        acc = tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _load_weight(
    w_ptr,  # W [N, K] float32 or bfloat16 (a torch.nn weight, used transposed)
    offs_n,  # [BLOCK_N] rows of W
    mask_n,
    offs_k,  # [BLOCK_K] columns of W
    mask_k,
    K,
    GEMV: tl.constexpr,
):
    """The tile ``W[offs_n, offs_k]`` as :func:`_times_weight` takes it: ``[BLOCK_N, BLOCK_K]``
    in GEMV mode (each row's k run contiguous), else ``[BLOCK_K, BLOCK_N]`` for ``tl.dot``."""
    if GEMV:
        w = tl.load(
            w_ptr + offs_n[:, None] * K + offs_k[None, :],
            mask=mask_n[:, None] & mask_k[None, :],
            other=0.0,
        )
    else:
        w = tl.load(
            w_ptr + offs_n[None, :] * K + offs_k[:, None],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
    return w


@triton.jit
def _gates_pass(
    acc0,  # [BLOCK_B, BLOCK_N] float32 accumulators of gates 0 .. G-1 (the rest pass through)
    acc1,
    acc2,
    acc3,
    a_ptr,  # A [B, K] float32, row stride K
    offs_b,  # [BLOCK_B]
    mask_b,  # [BLOCK_B]
    w_ptr,  # W [G * N_gate, K] weight dtype: gate g's rows start at g * N_gate
    offs_n,  # [BLOCK_N] rows of W within a gate
    mask_n,  # [BLOCK_N]
    N_gate,
    K,
    G: tl.constexpr,  # gates (1 .. 4)
    BLOCK_K: tl.constexpr,
    GEMV: tl.constexpr,
):
    """``acc_g + A[offs_b] @ W[g * N_gate + offs_n]ᵀ`` for every gate ``g < G`` in one pass
    over ``K``; each k block's ``G`` weight tiles are loaded before any is used."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + offs_b[:, None] * K + offs_k[None, :],
            mask=mask_b[:, None] & mask_k[None, :],
            other=0.0,
            cache_modifier=".cg",  # states written by other programs of this launch
        )
        gate = N_gate * K
        w0 = _load_weight(w_ptr, offs_n, mask_n, offs_k, mask_k, K, GEMV)
        w1, w2, w3 = w0, w0, w0  # (names must exist before a compile-time branch sets them)
        if G > 1:
            w1 = _load_weight(w_ptr + gate, offs_n, mask_n, offs_k, mask_k, K, GEMV)
        if G > 2:
            w2 = _load_weight(w_ptr + 2 * gate, offs_n, mask_n, offs_k, mask_k, K, GEMV)
        if G > 3:
            w3 = _load_weight(w_ptr + 3 * gate, offs_n, mask_n, offs_k, mask_k, K, GEMV)
        acc0 = _times_weight(acc0, w0, a, GEMV)
        if G > 1:
            acc1 = _times_weight(acc1, w1, a, GEMV)
        if G > 2:
            acc2 = _times_weight(acc2, w2, a, GEMV)
        if G > 3:
            acc3 = _times_weight(acc3, w3, a, GEMV)
    return acc0, acc1, acc2, acc3


@triton.jit
def _rows_times_gates(
    acc0,  # [BLOCK_B, BLOCK_N] float32 accumulators of gates 0 .. G-1 (the rest pass through)
    acc1,
    acc2,
    acc3,
    a_ptr,  # A [B, K] float32, row stride K
    offs_b,  # [BLOCK_B]
    mask_b,  # [BLOCK_B]
    w_ptr,  # W [G * N_gate, K] weight dtype: gate g's rows start at g * N_gate
    offs_n,  # [BLOCK_N] rows of W within a gate
    mask_n,  # [BLOCK_N]
    N_gate,
    K,
    G: tl.constexpr,  # gates (1 .. 4)
    BLOCK_K: tl.constexpr,
    GEMV: tl.constexpr,
):
    """``acc_g + A[offs_b] @ W[g * N_gate + offs_n]ᵀ`` for every gate ``g < G``. GEMV mode:
    one pass over ``K`` for all gates, so a program waits for one round of loads per k block
    (a decode step waits on memory, not on arithmetic). Tile mode: one pass per gate, as
    tl.dot's operand layouts for four gates at once spilled (compile_check, sm_90: 2368
    bytes over the tile configurations against 844 one gate at a time)."""
    if GEMV:
        acc0, acc1, acc2, acc3 = _gates_pass(
            acc0, acc1, acc2, acc3, a_ptr, offs_b, mask_b, w_ptr, offs_n, mask_n, N_gate, K,
            G, BLOCK_K, GEMV,
        )  # fmt: skip
    else:
        gate = N_gate * K
        acc0, _, _, _ = _gates_pass(
            acc0, acc0, acc0, acc0, a_ptr, offs_b, mask_b, w_ptr, offs_n, mask_n, N_gate, K,
            1, BLOCK_K, GEMV,
        )  # fmt: skip
        if G > 1:
            acc1, _, _, _ = _gates_pass(
                acc1, acc1, acc1, acc1, a_ptr, offs_b, mask_b, w_ptr + gate, offs_n, mask_n,
                N_gate, K, 1, BLOCK_K, GEMV,
            )  # fmt: skip
        if G > 2:
            acc2, _, _, _ = _gates_pass(
                acc2, acc2, acc2, acc2, a_ptr, offs_b, mask_b, w_ptr + 2 * gate, offs_n,
                mask_n, N_gate, K, 1, BLOCK_K, GEMV,
            )  # fmt: skip
        if G > 3:
            acc3, _, _, _ = _gates_pass(
                acc3, acc3, acc3, acc3, a_ptr, offs_b, mask_b, w_ptr + 3 * gate, offs_n,
                mask_n, N_gate, K, 1, BLOCK_K, GEMV,
            )  # fmt: skip
    return acc0, acc1, acc2, acc3


@triton.jit
def _gate_inputs(
    in_ptr,  # [B, K_in] float32 layer input (unused with USE_TABLE)
    K_in,
    w_in_ptr,  # [GH, K_in] W_ih of the layer
    b_in_ptr,  # [GH] float32 b_ih of the layer
    tok,  # [BLOCK_B] int64 token ids (USE_TABLE only)
    table_ptr,  # [vocab, GH] float32 embedding @ W_ih0ᵀ + b_ih0 (USE_TABLE only)
    GH,  # the table's row length (all gates of the layer)
    offs_b,
    mask_b,
    offs_h,
    mask_h,
    H,
    G: tl.constexpr,
    USE_TABLE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GEMV: tl.constexpr,
):
    """Input parts ``x W_igᵀ + b_ig`` of gates 0 .. G-1 for the tile (the pointers start at
    the first of them), each ``[BLOCK_B, BLOCK_H]`` float32 (zeros past G)."""
    mask = mask_b[:, None] & mask_h[None, :]
    z = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    if USE_TABLE:
        # (not common.gate_tiles: its placeholders past G repeat gate 0, and loaded tiles kept
        # live as accumulators cost up to 87 registers in the GEMV steps, compile_check sm_90)
        rows = table_ptr + tok[:, None] * GH + offs_h[None, :]
        g0 = tl.load(rows, mask=mask, other=0.0)
        g1, g2, g3 = z, z, z
        if G > 1:
            g1 = tl.load(rows + H, mask=mask, other=0.0)
        if G > 2:
            g2 = tl.load(rows + 2 * H, mask=mask, other=0.0)
        if G > 3:
            g3 = tl.load(rows + 3 * H, mask=mask, other=0.0)
    else:
        g0, g1, g2, g3 = _rows_times_gates(
            z, z, z, z, in_ptr, offs_b, mask_b, w_in_ptr, offs_h, mask_h, H, K_in,
            G, BLOCK_K, GEMV,
        )  # fmt: skip
        b = b_in_ptr + offs_h
        g0 += tl.load(b, mask=mask_h, other=0.0)[None, :]
        if G > 1:
            g1 += tl.load(b + H, mask=mask_h, other=0.0)[None, :]
        if G > 2:
            g2 += tl.load(b + 2 * H, mask=mask_h, other=0.0)[None, :]
        if G > 3:
            g3 += tl.load(b + 3 * H, mask=mask_h, other=0.0)[None, :]
    return g0, g1, g2, g3


@triton.jit
def _preacts(
    in_ptr,  # [B, K_in] float32 layer input (unused with USE_TABLE)
    K_in,
    w_in_ptr,  # [GH, K_in]
    b_in_ptr,  # [GH] float32
    tok,  # [BLOCK_B] int64
    table_ptr,  # [vocab, GH] float32
    h_ptr,  # [B, P] float32 state before the step
    w_h_ptr,  # [GH, P]
    offs_b,
    mask_b,
    offs_h,
    mask_h,
    H,
    P,
    CELL: tl.constexpr,
    USE_TABLE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GEMV: tl.constexpr,
):
    """Pre-activations of the tile's gates without the recurrent bias: ``x W_igᵀ + b_ig +
    h W_hgᵀ`` per gate, except GRU's n gate, returned as ``h W_hnᵀ`` (third) and ``x W_inᵀ +
    b_in`` (fourth) apart. Recurrent products accumulate onto the input parts, so four tiles
    are live, not eight. GEMV mode: every gate in one pass over k (one round of loads per k
    block). Tile mode: gate by gate, as four gates' tl.dot operands at once spilled
    (compile_check, sm_90, float32: 56-80 bytes in configurations that had none)."""
    G = 4 if CELL == 0 else (3 if CELL == 1 else 1)
    GH = G * H
    if GEMV:
        i0, i1, i2, i3 = _gate_inputs(
            in_ptr, K_in, w_in_ptr, b_in_ptr, tok, table_ptr, GH, offs_b, mask_b, offs_h,
            mask_h, H, G, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K, GEMV,
        )  # fmt: skip
        if CELL == 1:
            i3 = i2
            i2 = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        p0, p1, p2, p3 = _rows_times_gates(
            i0, i1, i2, i3, h_ptr, offs_b, mask_b, w_h_ptr, offs_h, mask_h, H, P, G, BLOCK_K,
            GEMV,
        )  # fmt: skip
    else:
        p0 = _gate_preact(
            0, in_ptr, K_in, w_in_ptr, b_in_ptr, tok, table_ptr, GH, h_ptr, w_h_ptr, offs_b,
            mask_b, offs_h, mask_h, H, P, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K,
        )  # fmt: skip
        p1, p2, p3 = p0, p0, p0  # (names must exist before a compile-time branch sets them)
        if G > 1:
            p1 = _gate_preact(
                1, in_ptr, K_in, w_in_ptr, b_in_ptr, tok, table_ptr, GH, h_ptr, w_h_ptr,
                offs_b, mask_b, offs_h, mask_h, H, P, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K,
            )  # fmt: skip
        if CELL == 1:
            p3 = _gate_preact(
                2, in_ptr, K_in, w_in_ptr, b_in_ptr, tok, table_ptr, GH, h_ptr, w_h_ptr,
                offs_b, mask_b, offs_h, mask_h, H, 0, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K,
            )  # fmt: skip
            z = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            p2, _, _, _ = _rows_times_gates(
                z, z, z, z, h_ptr, offs_b, mask_b, w_h_ptr + 2 * H * P, offs_h, mask_h, H, P,
                1, BLOCK_K, False,
            )  # fmt: skip
        elif G > 2:
            p2 = _gate_preact(
                2, in_ptr, K_in, w_in_ptr, b_in_ptr, tok, table_ptr, GH, h_ptr, w_h_ptr,
                offs_b, mask_b, offs_h, mask_h, H, P, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K,
            )  # fmt: skip
            p3 = _gate_preact(
                3, in_ptr, K_in, w_in_ptr, b_in_ptr, tok, table_ptr, GH, h_ptr, w_h_ptr,
                offs_b, mask_b, offs_h, mask_h, H, P, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K,
            )  # fmt: skip
    return p0, p1, p2, p3


@triton.jit
def _gate_preact(
    g: tl.constexpr,  # gate index
    in_ptr,
    K_in,
    w_in_ptr,
    b_in_ptr,
    tok,
    table_ptr,
    GH,
    h_ptr,
    w_h_ptr,
    offs_b,
    mask_b,
    offs_h,
    mask_h,
    H,
    P,  # 0: no recurrent part
    USE_TABLE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Tile mode: ``x W_igᵀ + b_ig + h W_hgᵀ`` of gate ``g`` alone (see :func:`_preacts`)."""
    gi, _, _, _ = _gate_inputs(
        in_ptr, K_in, w_in_ptr + g * H * K_in, b_in_ptr + g * H, tok, table_ptr + g * H, GH,
        offs_b, mask_b, offs_h, mask_h, H, 1, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K, False,
    )  # fmt: skip
    # (a zero accumulator, the input part added after the loop: starting the loop from the
    # input part spilled 80 bytes in float32, compile_check sm_90)
    z = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    gh, _, _, _ = _rows_times_gates(
        z, z, z, z, h_ptr, offs_b, mask_b, w_h_ptr + g * H * P, offs_h, mask_h, H, P, 1,
        BLOCK_K, False,
    )  # fmt: skip
    return gi + gh


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
    GEMV: tl.constexpr,
):
    """One layer's step for this program's hidden chunks (torch.nn's cell formulas). With a
    projection the chunks' ``m = o * tanh(c)`` go to ``m_ptr`` and :func:`_project` makes h.
    Without one ``P == H``."""
    for j in range(pid_h, tl.cdiv(H, BLOCK_H), n_split):
        offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        mask = mask_b[:, None] & mask_h[None, :]
        bh = offs_b[:, None] * H + offs_h[None, :]  # c and m; h too, as P == H without HAS_PROJ
        p0, p1, p2, p3 = _preacts(
            in_ptr, K_in, w_in_ptr, b_in_ptr, tok, table_ptr, h_ptr, w_h_ptr, offs_b, mask_b,
            offs_h, mask_h, H, P, CELL, USE_TABLE, BLOCK_B, BLOCK_H, BLOCK_K, GEMV,
        )  # fmt: skip
        b = b_h_ptr + offs_h
        p0 += tl.load(b, mask=mask_h, other=0.0)[None, :]
        if CELL == 0:  # LSTM: i, f, g, o
            p1 += tl.load(b + H, mask=mask_h, other=0.0)[None, :]
            p2 += tl.load(b + 2 * H, mask=mask_h, other=0.0)[None, :]
            p3 += tl.load(b + 3 * H, mask=mask_h, other=0.0)[None, :]
            c_new = tl.sigmoid(p1) * tl.load(c_ptr + bh, mask=mask, other=0.0)
            c_new += tl.sigmoid(p0) * _tanh(p2)
            tl.store(c_ptr + bh, c_new, mask=mask)
            h_new = tl.sigmoid(p3) * _tanh(c_new)  # m with a projection
        elif CELL == 1:  # GRU: r, z, n; p2 = h W_hn, p3 = x W_in + b_in
            p1 += tl.load(b + H, mask=mask_h, other=0.0)[None, :]
            p2 += tl.load(b + 2 * H, mask=mask_h, other=0.0)[None, :]
            r = tl.sigmoid(p0)
            zg = tl.sigmoid(p1)
            n = _tanh(p3 + r * p2)
            h_prev = tl.load(h_ptr + bh, mask=mask, other=0.0)
            h_new = (1.0 - zg) * n + zg * h_prev
        elif CELL == 2:  # RNN tanh
            h_new = _tanh(p0)
        else:  # RNN relu
            h_new = tl.maximum(p0, 0.0)
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
    GEMV: tl.constexpr,
):
    """LSTM projection ``h = m W_hrᵀ`` for this program's chunks of ``P``."""
    for j in range(pid_h, tl.cdiv(P, BLOCK_H), n_split):
        offs_p = j * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_p = offs_p < P
        z = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
        acc, _, _, _ = _rows_times_gates(
            z, z, z, z, m_ptr, offs_b, mask_b, w_hr_ptr, offs_p, mask_p, P, H, 1, BLOCK_K, GEMV
        )
        tl.store(
            h_out_ptr + offs_b[:, None] * P + offs_p[None, :],
            acc,
            mask=mask_b[:, None] & mask_p[None, :],
        )


# B, L and V are not specialised on; the sizes that set the weight rows' alignment (I, H, P) are
# (Triton's "divisible by 16" or not), so weight tiles load as 16-byte vectors where rows allow.
@triton.jit(do_not_specialize=["B", "L", "V"])
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
    GEMV: tl.constexpr,  # multiply by broadcasting and summing (few rows) instead of tl.dot
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
                CELL, HAS_TABLE, HAS_PROJ, BLOCK_B, BLOCK_H, BLOCK_K, GEMV,
            )  # fmt: skip
        else:  # input: the new state of the layer below
            _layer(
                h_next_ptr + (l - 1) * BP, P, w_ih_ptr + (l - 1) * GH * P, b_ih_ptr + l * GH,
                tok, table_ptr, h_cur_ptr + l * BP, w_hh_ptr + l * GH * P, b_hh_ptr + l * GH,
                h_next_ptr + l * BP, c_ptr + l * BH, m_ptr, offs_b, mask_b, pid_h, n_split,
                H, P, CELL, False, HAS_PROJ, BLOCK_B, BLOCK_H, BLOCK_K, GEMV,
            )  # fmt: skip
        if HAS_PROJ:
            arrivals = grid_sync(sync, arrivals, n_split, SPLIT)  # every m of the layer
            _project(
                m_ptr, w_hr_ptr + l * P * H, h_next_ptr + l * BP, offs_b, mask_b, pid_h,
                n_split, H, P, BLOCK_B, BLOCK_H, BLOCK_K, GEMV,
            )  # fmt: skip
        arrivals = grid_sync(sync, arrivals, n_split, SPLIT)  # the layer's whole new state
    if HAS_HEAD:
        top = h_next_ptr + (L - 1) * BP
        for j in range(pid_h, tl.cdiv(V, BLOCK_V), n_split):
            offs_v = j * BLOCK_V + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            z = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
            acc, _, _, _ = _rows_times_gates(
                z, z, z, z, top, offs_b, mask_b, head_w_ptr, offs_v, mask_v, V, P, 1, BLOCK_K,
                GEMV,
            )  # fmt: skip
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
    gemv: bool | None = None  # force a tiling mode (benchmarks, tests); None: by B

    def __post_init__(self) -> None:
        device = self.w_hh.device
        self.tiling = tiling(self.B, self.gemv)
        t = self.tiling
        n_btiles = triton.cdiv(self.B, t.block_b)
        n_chunks = max(triton.cdiv(max(self.H, self.P), t.block_h), triton.cdiv(self.V, t.block_v))
        self.n_split = 1
        gpu = persistent_geometry(device)
        if gpu is not None and n_chunks > 1:
            sms = gpu[0]
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
        if split and INTERPRET and common.EMULATED_GPU is None:
            # (its programs would run one after another, the first waiting for the others)
            raise RuntimeError(
                "this Triton decoder was built inside emulation.emulate_gpu, which split its "
                "step over programs that wait for each other: step it inside emulate_gpu too"
            )
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
            **self.tiling.constexprs(), num_warps=self.tiling.num_warps,
        )  # fmt: skip

    def check_sync(self) -> None:
        """Raise if a grid-wide wait of the last step timed out (synchronises the device)."""
        if self.n_split > 1 and int(self.sync.max()) >= SYNC_TIMEOUT_MARK:
            raise RuntimeError(
                "rnnkern triton decode: a grid-wide wait timed out (not every program of the "
                "launch was resident); the state of the decoder is wrong, reset() it"
            )
