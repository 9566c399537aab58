"""LSTM (with and without projection): fused forward and backward kernels, launch wrappers.

Legend: ``T`` time, ``B`` batch, ``H`` hidden, ``P`` state size (proj_size or H); gates i, f,
g, o in torch.nn's order. Grid strategy and synchronisation: see :mod:`.common`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..base import BackwardResult, ForwardResult, Saved, empty
from .common import (
    bias_or_zeros,
    check_grid_sync,
    column_product,
    empty_saved,
    gate_biases,
    gate_products,
    gate_tiles,
    gemm_tn,
    grid_arrive,
    grid_sync,
    launch_config,
    launch_grid,
    lengths_or_full,
    mask_in_steps,
    own_chunk,
    phase_stamp,
    phase_stamp_after,
    record_trace,
    resident_columns,
    resident_gates,
    step_rows,
    step_sync,
    step_time,
    sync_buffer,
    tile_matmul,
    trace_buffer,
    weight_grads,
)

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lstm_tile_step(
    gx_i,  # [BLOCK_B, BLOCK_H] gx of the step per gate, input dtype (gate_tiles; CARRIED)
    gx_f,
    gx_g,
    gx_o,
    b_i,  # [1, BLOCK_H] float32 b_hh per gate (gate_biases; CARRIED)
    b_f,
    b_g,
    b_o,
    c_prev,  # [BLOCK_B, BLOCK_H] float32 c_{s-1} of the tile (CARRIED)
    h_prev,  # [BLOCK_B, BLOCK_H] float32 h_{s-1} of the tile (CARRIED, no HAS_PROJ)
    gx_rows,  # [BLOCK_B, 1] pointers to gx[t, b, 0] (not CARRIED)
    b_ptr,  # [4H] b_hh (not CARRIED)
    c_prev_ptr,  # [B, H] float32 state slot c_{s-1} (not CARRIED)
    h_all_ptr,  # [B, P] float32 state slot h_{s-1} (every unit: the recurrent product)
    w_ptr,  # [4H, P] W_hh
    w_i,  # [K_RES, BLOCK_H] resident slices of W_gᵀ (K_RES > 0), else unused
    w_f,
    w_g,
    w_o,
    c_next_ptr,  # [B, H] float32 state slot c_s
    h_next_ptr,  # [B, P] float32 state slot h_s (unused with HAS_PROJ)
    gates_ptr,  # [T, B, 4H] float32 activated gates (written when save)
    m_ptr,  # [B, H] float32 o * tanh(c) (HAS_PROJ only)
    y_ptr,  # [T, B, P] input dtype
    s,  # processing step
    t,  # [BLOCK_B] int64 time index of the step per row
    valid,  # [BLOCK_B] s < length
    save,
    offs_b,  # [BLOCK_B]
    mask_b,  # [BLOCK_B]
    offs_h,  # [BLOCK_H] hidden units of the tile
    mask_h,  # [BLOCK_H]
    B,
    H,
    P,
    sync,  # [] int32 arrival counter of the batch tile (ARRIVE)
    trace_ptr,  # phase stamps (common.phase_stamp; TRACE only)
    trace_steps,
    HAS_PROJ: tl.constexpr,
    CARRIED: tl.constexpr,  # gx, b, c_prev, h_prev given (ONE_CHUNK), else loaded here
    ARRIVE: tl.constexpr,  # grid_arrive once h_s is stored (the caller then only waits)
    SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    K_RES: tl.constexpr,
    TRACE: tl.constexpr,
):
    """One step of a [BLOCK_B, BLOCK_H] tile: pre-activations ``h_{s-1} W_gᵀ + gx + b`` (one
    pass over ``P``, each ``h_{s-1}`` tile loaded once for all four gates; with resident
    weights one load and four dots), the cell, and the stores of ``c_s``, the gates (save),
    ``h_s`` and ``y`` (or ``m`` with a projection). Rows past their length keep their state.
    Without CARRIED the step's gx, b, c_{s-1} and h_{s-1} tiles are loaded after the products
    (loaded before, they would stay live across the streamed loop over ``P``: spills in the
    32-row configurations). Returns the tile's ``c_s`` and ``h_s`` (``h_prev`` with a
    projection)."""
    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc_i, acc_f, acc_g, acc_o = gate_products(
        zero, zero, zero, zero, h_all_ptr, offs_b, mask_b, P, w_ptr, offs_h, mask_h, H,
        w_i, w_f, w_g, w_o, 4, BLOCK_K, K_RES, PRECISION,
    )  # fmt: skip
    if CARRIED:  # (ONE_CHUNK: one tile a step)
        phase_stamp_after(trace_ptr, s, trace_steps, 5, TRACE, acc_i, acc_f, acc_g, acc_o)
    mask = mask_b[:, None] & mask_h[None, :]
    bh = offs_b[:, None] * H + offs_h[None, :]
    if not CARRIED:
        gx_i, gx_f, gx_g, gx_o = gate_tiles(gx_rows, offs_h, mask, H, 4)
    acc_i += gx_i.to(tl.float32)
    acc_f += gx_f.to(tl.float32)
    acc_g += gx_g.to(tl.float32)
    acc_o += gx_o.to(tl.float32)
    if not CARRIED:
        b_i, b_f, b_g, b_o = gate_biases(b_ptr, offs_h, mask_h, H, 4)
    i = tl.sigmoid(acc_i + b_i)
    f = tl.sigmoid(acc_f + b_f)
    g = 2.0 * tl.sigmoid(2.0 * (acc_g + b_g)) - 1.0  # tanh
    o = tl.sigmoid(acc_o + b_o)
    if not CARRIED:
        c_prev = tl.load(c_prev_ptr + bh, mask=mask, other=0.0)
    c_new = f * c_prev + i * g
    m = o * (2.0 * tl.sigmoid(2.0 * c_new) - 1.0)
    keep = valid[:, None] & mask
    c_next = tl.where(keep, c_new, c_prev)
    # First what other programs read (h_s, or m with a projection), then, after the arrival
    # when ARRIVE, what only this program or the caller reads.
    h_next = h_prev
    if HAS_PROJ:
        tl.store(m_ptr + bh, m, mask=mask)
    else:  # P == H
        if not CARRIED:
            h_prev = tl.load(h_all_ptr + bh, mask=mask, other=0.0, cache_modifier=".cg")
        h_next = tl.where(keep, m, h_prev)
        tl.store(h_next_ptr + bh, h_next, mask=mask)
    if ARRIVE:
        phase_stamp(trace_ptr, s, trace_steps, 3, TRACE)
        grid_arrive(sync, SPLIT)
    tl.store(c_next_ptr + bh, c_next, mask=mask)
    gmask = mask & (offs_h * 0 + save != 0)[None, :]
    g_rows = gates_ptr + (s * B + offs_b[:, None]).to(tl.int64) * (4 * H) + offs_h[None, :]
    tl.store(g_rows, i, mask=gmask)
    tl.store(g_rows + H, f, mask=gmask)
    tl.store(g_rows + 2 * H, g, mask=gmask)
    tl.store(g_rows + 3 * H, o, mask=gmask)
    if not HAS_PROJ:
        y_rows = y_ptr + (t[:, None] * B + offs_b[:, None]) * P + offs_h[None, :]
        tl.store(y_rows, tl.where(keep, m, 0.0).to(y_ptr.dtype.element_ty), mask=mask)
    return c_next, h_next


# T, B and flags are not specialised on; the sizes that set the weight rows' alignment (H, P) are
# (Triton's "divisible by 16" or not), which lets 16-bit W tiles be copied asynchronously and
# vectorised: without it each tile was a synchronous 2-byte-per-element load (TTGIR).
@triton.jit(do_not_specialize=["T", "B", "reverse", "save", "trace_steps"])
def lstm_forward_kernel(
    gx_ptr,  # [T, B, 4H] input dtype
    w_ptr,  # [4H, P] input dtype (W_hh)
    b_ptr,  # [4H] input dtype (b_hh, zeros when absent)
    wr_ptr,  # [P, H] input dtype (W_hr; unused without HAS_PROJ)
    len_ptr,  # [B] int64 valid lengths
    y_ptr,  # [T, B, P] input dtype
    hs_ptr,  # [T+1, B, P] float32 when save else [2, B, P]; slot 0 holds h0
    cs_ptr,  # [T+1, B, H] float32 when save else [2, B, H]; slot 0 holds c0
    gates_ptr,  # [T, B, 4H] float32 activated gates (written when save)
    m_ptr,  # [B, H] float32 scratch o * tanh(c) (HAS_PROJ only)
    sync_ptr,  # [cdiv(B, BLOCK_B)] int32 zeros (SPLIT only)
    trace_ptr,  # [programs, trace_steps, TRACE_POINTS] int64 stamps + clock (TRACE only)
    T,
    B,
    H,
    P,
    reverse,  # int 0/1
    save,  # int 0/1
    trace_steps,  # steps stamped (TRACE only)
    HAS_PROJ: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    K_RES: tl.constexpr = 0,  # > 0: the program's W_hh slice stays in registers (see below)
    ONE_CHUNK: tl.constexpr = False,  # the program owns hidden chunk pid_h only (common.py)
    TRACE: tl.constexpr = False,  # stamp the phases of each step (common.TRACE_POINTS)
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    lens = tl.load(len_ptr + offs_b, mask=mask_b, other=0)
    sync = sync_ptr + pid_b
    arrivals = 0
    # Resident weights (K_RES = P rounded up to a power of two; no projection; the program owns
    # exactly one hidden chunk, pid_h): its four [K_RES, BLOCK_H] slices of W_hhᵀ are loaded
    # once, before the time loop, instead of from L2 at every step.
    w_i, w_f, w_g, w_o = resident_gates(w_ptr, pid_h, H, P, 4, BLOCK_H, K_RES)
    if ONE_CHUNK:
        # The chunk's biases, its c (and h) carried across steps, and step 0's gx tiles.
        offs_c, mask_c, mask_bc = own_chunk(pid_h, mask_b, H, BLOCK_H)
        b_i, b_f, b_g, b_o = gate_biases(b_ptr, offs_c, mask_c, H, 4)
        c_own = tl.load(cs_ptr + offs_b[:, None] * H + offs_c[None, :], mask=mask_bc, other=0.0)
        h_own = c_own  # (placeholder with a projection, whose h is not per hidden unit)
        if not HAS_PROJ:
            h_own = tl.load(hs_ptr + offs_b[:, None] * P + offs_c[None, :], mask=mask_bc, other=0.0)
        gx_i, gx_f, gx_g, gx_o = gate_tiles(
            step_rows(gx_ptr, 0, lens, reverse, offs_b, B, 4 * H), offs_c, mask_bc, H, 4
        )
    for s in range(T):
        phase_stamp(trace_ptr, s, trace_steps, 0, TRACE)
        t, valid = step_time(s, lens, reverse)
        cur = tl.where(save != 0, s, s % 2).to(tl.int64)
        nxt = tl.where(save != 0, s + 1, (s + 1) % 2).to(tl.int64)
        h_prev_ptr = hs_ptr + cur * B * P
        if ONE_CHUNK:
            # Issue step s+1's gx loads now; nothing waits for them before step s+1.
            nx_i, nx_f, nx_g, nx_o = gate_tiles(
                step_rows(gx_ptr, s + 1, lens, reverse, offs_b, B, 4 * H), offs_c,
                mask_in_steps(mask_bc, offs_c, s + 1, T), H, 4,
            )  # fmt: skip
            c_own, h_own = _lstm_tile_step(
                gx_i, gx_f, gx_g, gx_o, b_i, b_f, b_g, b_o, c_own, h_own, gx_ptr, b_ptr, cs_ptr,
                h_prev_ptr, w_ptr, w_i, w_f, w_g, w_o, cs_ptr + nxt * B * H,
                hs_ptr + nxt * B * P, gates_ptr, m_ptr, y_ptr, s, t, valid, save, offs_b, mask_b,
                offs_c, mask_c, B, H, P, sync, trace_ptr, trace_steps, HAS_PROJ, True,
                not HAS_PROJ, SPLIT, BLOCK_B, BLOCK_H, BLOCK_K, PRECISION, K_RES, TRACE,
            )  # fmt: skip
            gx_i, gx_f, gx_g, gx_o = nx_i, nx_f, nx_g, nx_o
        else:
            gx_rows = gx_ptr + (t[:, None] * B + offs_b[:, None]) * (4 * H)
            for j in range(pid_h, tl.cdiv(H, BLOCK_H), n_split):
                offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
                _lstm_tile_step(
                    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, gx_rows, b_ptr,
                    cs_ptr + cur * B * H, h_prev_ptr, w_ptr, w_i, w_f, w_g, w_o,
                    cs_ptr + nxt * B * H, hs_ptr + nxt * B * P, gates_ptr, m_ptr, y_ptr, s, t,
                    valid, save, offs_b, mask_b, offs_h, offs_h < H, B, H, P, sync, trace_ptr,
                    trace_steps, HAS_PROJ, False, False, SPLIT, BLOCK_B, BLOCK_H, BLOCK_K,
                    PRECISION, K_RES, TRACE,
                )  # fmt: skip
        if HAS_PROJ:
            phase_stamp(trace_ptr, s, trace_steps, 1, TRACE)
            arrivals = grid_sync(sync, arrivals, n_split, SPLIT)
            phase_stamp(trace_ptr, s, trace_steps, 2, TRACE)
            for j in range(pid_h, tl.cdiv(P, BLOCK_H), n_split):
                offs_p = j * BLOCK_H + tl.arange(0, BLOCK_H)
                mask_p = offs_p < P
                mask = mask_b[:, None] & mask_p[None, :]
                bp = offs_b[:, None] * P + offs_p[None, :]
                acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                acc = tile_matmul(
                    acc, m_ptr, H, 1, offs_b, mask_b,
                    wr_ptr, 1, H, offs_p, mask_p, H, BLOCK_K, PRECISION,
                )  # fmt: skip
                keep = valid[:, None] & mask
                h_prev = tl.load(h_prev_ptr + bp, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(hs_ptr + nxt * B * P + bp, tl.where(keep, acc, h_prev), mask=mask)
                y_rows = y_ptr + (t[:, None] * B + offs_b[:, None]) * P + offs_p[None, :]
                tl.store(y_rows, tl.where(keep, acc, 0.0).to(y_ptr.dtype.element_ty), mask=mask)
        # ONE_CHUNK programs arrived (and stamped point 3) in _lstm_tile_step
        if not (ONE_CHUNK and not HAS_PROJ):
            phase_stamp(trace_ptr, s, trace_steps, 3, TRACE)
        phase_stamp(trace_ptr, s, trace_steps, 4, TRACE)
        arrivals = step_sync(sync, arrivals, n_split, SPLIT, ONE_CHUNK and not HAS_PROJ)


@triton.jit
def _lstm_saved_tiles(
    gates_ptr,  # [T, B, 4H] float32 saved activated gates (processing order)
    cs_ptr,  # [T+1, B, H] float32 saved cell states (processing order)
    s,  # processing step
    offs_b,  # [BLOCK_B]
    offs_h,  # [BLOCK_H]
    mask,  # [BLOCK_B, BLOCK_H]
    B,
    H,
):
    """What the backward's step ``s`` reads of the forward for a tile: the gates i, f, g, o
    and the cells ``c_{s-1}``, ``c_s``."""
    s64 = s.to(tl.int64)
    bh = offs_b[:, None] * H + offs_h[None, :]
    g_rows = gates_ptr + (s64 * B + offs_b[:, None]) * (4 * H) + offs_h[None, :]
    i = tl.load(g_rows, mask=mask, other=0.0)
    f = tl.load(g_rows + H, mask=mask, other=0.0)
    g = tl.load(g_rows + 2 * H, mask=mask, other=0.0)
    o = tl.load(g_rows + 3 * H, mask=mask, other=0.0)
    c_prev = tl.load(cs_ptr + s64 * B * H + bh, mask=mask, other=0.0)
    c_new = tl.load(cs_ptr + (s64 + 1) * B * H + bh, mask=mask, other=0.0)
    return i, f, g, o, c_prev, c_new


@triton.jit
def _lstm_gate_grads(
    dm,  # [BLOCK_B, BLOCK_H] float32 gradient of m = o * tanh(c_s) (dh_s + dy, or via W_hr)
    dc,  # [BLOCK_B, BLOCK_H] float32 gradient of c_s from step s+1
    i,  # [BLOCK_B, BLOCK_H] float32 saved gates and cells of step s
    f,
    g,
    o,
    c_prev,
    c_new,
    valid,  # [BLOCK_B] s < length
    dgh_rows,  # [BLOCK_B, BLOCK_H] pointers to dgh[s, b, unit] (gate i)
    dgx_rows,  # [BLOCK_B, BLOCK_H] pointers to dgx[t, b, unit] (gate i)
    mask,  # [BLOCK_B, BLOCK_H]
    H,
    sync,  # [] int32 arrival counter of the batch tile (ARRIVE)
    r,  # processing step (the backward's r-th, for the phase stamps)
    trace_ptr,  # phase stamps (common.phase_stamp; TRACE only)
    trace_steps,
    ARRIVE: tl.constexpr,  # grid_arrive once dgh is stored (the caller then only waits)
    SPLIT: tl.constexpr,
    TRACE: tl.constexpr,
):
    """Gradients of the four pre-activations of step ``s`` (zero past a row's length), stored
    to ``dgh`` (float32) and ``dgx`` (its dtype); returns the gradient of ``c_{s-1}``."""
    tc = 2.0 * tl.sigmoid(2.0 * c_new) - 1.0
    dct = dc + dm * o * (1.0 - tc * tc)
    keep = valid[:, None]
    di = tl.where(keep, dct * g * i * (1.0 - i), 0.0)
    df = tl.where(keep, dct * c_prev * f * (1.0 - f), 0.0)
    dg = tl.where(keep, dct * i * (1.0 - g * g), 0.0)
    do = tl.where(keep, dm * tc * o * (1.0 - o), 0.0)
    tl.store(dgh_rows, di, mask=mask)
    tl.store(dgh_rows + H, df, mask=mask)
    tl.store(dgh_rows + 2 * H, dg, mask=mask)
    tl.store(dgh_rows + 3 * H, do, mask=mask)
    if ARRIVE:  # dgh is what the other programs read; dgx only the caller
        phase_stamp(trace_ptr, r, trace_steps, 3, TRACE)
        grid_arrive(sync, SPLIT)
    out_ty = dgx_rows.dtype.element_ty
    tl.store(dgx_rows, di.to(out_ty), mask=mask)
    tl.store(dgx_rows + H, df.to(out_ty), mask=mask)
    tl.store(dgx_rows + 2 * H, dg.to(out_ty), mask=mask)
    tl.store(dgx_rows + 3 * H, do.to(out_ty), mask=mask)
    return tl.where(keep, dct * f, dc)


# T, B and flags are not specialised on; the sizes that set the weight rows' alignment (H, P) are
# (Triton's "divisible by 16" or not), which lets 16-bit W tiles be copied asynchronously and
# vectorised: without it each tile was a synchronous 2-byte-per-element load (TTGIR).
@triton.jit(do_not_specialize=["T", "B", "reverse", "trace_steps"])
def lstm_backward_kernel(
    w_ptr,  # [4H, P] input dtype (W_hh)
    wr_ptr,  # [P, H] input dtype (W_hr; unused without HAS_PROJ)
    len_ptr,  # [B] int64 valid lengths
    dy_ptr,  # [T, B, P] dtype of y
    gates_ptr,  # [T, B, 4H] float32 saved activated gates (processing order)
    cs_ptr,  # [T+1, B, H] float32 saved cell states (processing order)
    dh_ptr,  # [B, P] float32: dh_n in, dh0 out
    dc_ptr,  # [B, H] float32: dc_n in, dc0 out
    dgh_ptr,  # [T, B, 4H] float32 out: gradient of the pre-activations (processing order)
    dgx_ptr,  # [T, B, 4H] dtype of gx out: the same in time order
    dhp_ptr,  # [T, B, P] float32 out: gradient of h before W_hr (HAS_PROJ only)
    sync_ptr,  # [cdiv(B, BLOCK_B)] int32 zeros (SPLIT only)
    trace_ptr,  # [programs, trace_steps, TRACE_POINTS] int64 stamps + clock (TRACE only)
    T,
    B,
    H,
    P,
    reverse,  # int 0/1
    trace_steps,  # steps stamped (TRACE only)
    HAS_PROJ: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    K_RES: tl.constexpr = 0,  # > 0: the program's columns of W_hh stay on chip (phase 2)
    ONE_CHUNK: tl.constexpr = False,  # the program owns chunk pid_h only, no projection
    TRACE: tl.constexpr = False,  # stamp the phases of each step (common.TRACE_POINTS)
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    lens = tl.load(len_ptr + offs_b, mask=mask_b, other=0)
    sync = sync_ptr + pid_b
    arrivals = 0
    w_res = resident_columns(w_ptr, pid_h, 4 * H, P, BLOCK_H, K_RES)
    tl.static_assert(not (ONE_CHUNK and HAS_PROJ), "ONE_CHUNK needs P == H chunks")
    if ONE_CHUNK:
        # The chunk's dh and dc carried across steps, and the last step's saved tiles (P == H).
        offs_c, mask_c, mask_bc = own_chunk(pid_h, mask_b, H, BLOCK_H)
        bc = offs_b[:, None] * H + offs_c[None, :]
        dh_own = tl.load(dh_ptr + bc, mask=mask_bc, other=0.0)
        dc_own = tl.load(dc_ptr + bc, mask=mask_bc, other=0.0)
        dy_n = gate_tiles(step_rows(dy_ptr, T - 1, lens, reverse, offs_b, B, P), offs_c, mask_bc,
                          P, 1)[0]  # fmt: skip
        i_n, f_n, g_n, o_n, cp_n, cn_n = _lstm_saved_tiles(
            gates_ptr, cs_ptr, T - 1, offs_b, offs_c, mask_bc, B, H
        )
    for r in range(T):
        s = T - 1 - r
        if ONE_CHUNK:  # (the previous step's dh product is kept in registers: wait for it)
            phase_stamp_after(trace_ptr, r, trace_steps, 0, TRACE, dh_own, dc_own, dh_own, dc_own)
        else:
            phase_stamp(trace_ptr, r, trace_steps, 0, TRACE)
        t, valid = step_time(s, lens, reverse)
        s64 = s.to(tl.int64)
        if HAS_PROJ:
            # phase 0 (P chunks): total gradient of h_s, masked, for W_hr and for phase 1.
            for j in range(pid_h, tl.cdiv(P, BLOCK_H), n_split):
                offs_p = j * BLOCK_H + tl.arange(0, BLOCK_H)
                mask = mask_b[:, None] & (offs_p < P)[None, :]
                bp = offs_b[:, None] * P + offs_p[None, :]
                dh = tl.load(dh_ptr + bp, mask=mask, other=0.0)
                dy_rows = dy_ptr + (t[:, None] * B + offs_b[:, None]) * P + offs_p[None, :]
                dy = tl.load(dy_rows, mask=mask, other=0.0).to(tl.float32)
                dtot = tl.where(valid[:, None], dh + dy, 0.0)
                tl.store(dhp_ptr + s64 * B * P + bp, dtot, mask=mask)
            phase_stamp(trace_ptr, r, trace_steps, 1, TRACE)
            arrivals = grid_sync(sync, arrivals, n_split, SPLIT)
            phase_stamp(trace_ptr, r, trace_steps, 2, TRACE)
        # phase 1 (H chunks): gate derivatives of step s.
        if ONE_CHUNK:
            dy_c, i_c, f_c, g_c, o_c, cp_c, cn_c = dy_n, i_n, f_n, g_n, o_n, cp_n, cn_n
            # Issue step s-1's loads now; nothing waits for them before step s-1.
            more = mask_in_steps(mask_bc, offs_c, s - 1, T)
            dy_n = gate_tiles(step_rows(dy_ptr, s - 1, lens, reverse, offs_b, B, P), offs_c, more,
                              P, 1)[0]  # fmt: skip
            i_n, f_n, g_n, o_n, cp_n, cn_n = _lstm_saved_tiles(
                gates_ptr, cs_ptr, s - 1, offs_b, offs_c, more, B, H
            )
            dc_own = _lstm_gate_grads(
                dh_own + dy_c.to(tl.float32), dc_own, i_c, f_c, g_c, o_c, cp_c, cn_c, valid,
                dgh_ptr + (s64 * B + offs_b[:, None]) * (4 * H) + offs_c[None, :],
                dgx_ptr + (t[:, None] * B + offs_b[:, None]) * (4 * H) + offs_c[None, :],
                mask_bc, H, sync, r, trace_ptr, trace_steps, True, SPLIT, TRACE,
            )  # fmt: skip
        else:
            for j in range(pid_h, tl.cdiv(H, BLOCK_H), n_split):
                offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
                mask_h = offs_h < H
                mask = mask_b[:, None] & mask_h[None, :]
                bh = offs_b[:, None] * H + offs_h[None, :]
                if HAS_PROJ:
                    dm = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                    dm = tile_matmul(
                        dm, dhp_ptr + s64 * B * P, P, 1, offs_b, mask_b,
                        wr_ptr, H, 1, offs_h, mask_h, P, BLOCK_K, PRECISION,
                    )  # fmt: skip
                else:
                    dy_rows = dy_ptr + (t[:, None] * B + offs_b[:, None]) * P + offs_h[None, :]
                    dy = tl.load(dy_rows, mask=mask, other=0.0).to(tl.float32)
                    dm = tl.load(dh_ptr + bh, mask=mask, other=0.0) + dy
                i, f, g, o, c_prev, c_new = _lstm_saved_tiles(
                    gates_ptr, cs_ptr, s, offs_b, offs_h, mask, B, H
                )
                dc = tl.load(dc_ptr + bh, mask=mask, other=0.0)
                dc = _lstm_gate_grads(
                    dm, dc, i, f, g, o, c_prev, c_new, valid,
                    dgh_ptr + (s64 * B + offs_b[:, None]) * (4 * H) + offs_h[None, :],
                    dgx_ptr + (t[:, None] * B + offs_b[:, None]) * (4 * H) + offs_h[None, :],
                    mask, H, sync, r, trace_ptr, trace_steps, False, SPLIT, TRACE,
                )  # fmt: skip
                tl.store(dc_ptr + bh, dc, mask=mask)
        # ONE_CHUNK programs arrived (and stamped point 3) in _lstm_gate_grads
        if not ONE_CHUNK:
            phase_stamp(trace_ptr, r, trace_steps, 3, TRACE)
        phase_stamp(trace_ptr, r, trace_steps, 4, TRACE)
        arrivals = step_sync(sync, arrivals, n_split, SPLIT, ONE_CHUNK)
        phase_stamp(trace_ptr, r, trace_steps, 5, TRACE)
        # phase 2 (P chunks): dh_{s-1} = dgh_s @ W_hh where valid, else unchanged.
        if ONE_CHUNK:
            acc = column_product(
                dgh_ptr + s64 * B * 4 * H, offs_b, mask_b, 4 * H, w_ptr, offs_c, mask_c, P,
                w_res, BLOCK_K, K_RES, PRECISION,
            )  # fmt: skip
            dh_own = tl.where(valid[:, None], acc, dh_own)
        else:
            for j in range(pid_h, tl.cdiv(P, BLOCK_H), n_split):
                offs_p = j * BLOCK_H + tl.arange(0, BLOCK_H)
                mask_p = offs_p < P
                mask = mask_b[:, None] & mask_p[None, :]
                bp = offs_b[:, None] * P + offs_p[None, :]
                acc = column_product(
                    dgh_ptr + s64 * B * 4 * H, offs_b, mask_b, 4 * H, w_ptr, offs_p, mask_p,
                    P, w_res, BLOCK_K, K_RES, PRECISION,
                )  # fmt: skip
                dh = tl.load(dh_ptr + bp, mask=mask, other=0.0)
                tl.store(dh_ptr + bp, tl.where(valid[:, None], acc, dh), mask=mask)
            # dh and dc are only ever touched by the program owning their chunk, but by other
            # threads of it in the next phase.
            tl.debug_barrier()
    if ONE_CHUNK:
        tl.store(dh_ptr + bc, dh_own, mask=mask_bc)
        tl.store(dc_ptr + bc, dc_own, mask=mask_bc)


# ----------------------------------------------------------------------------------------------
# launch wrappers
# ----------------------------------------------------------------------------------------------


def lstm_forward(
    gx: torch.Tensor,  # [T, B, 4H]
    h0: torch.Tensor,  # [B, P] float32
    c0: torch.Tensor,  # [B, H] float32
    w_hh: torch.Tensor,  # [4H, P]
    b_hh: torch.Tensor | None,  # [4H]
    w_hr: torch.Tensor | None,  # [P, H]
    lengths: torch.Tensor | None,  # [B] int64
    reverse: bool,
    save: bool,
) -> ForwardResult:
    """Fused LSTM layer forward; returns ``y [T, B, P]``, ``h_n [B, P]``, ``c_n [B, H]`` and,
    when ``save``, ``Saved(hs [T+1, B, P], cs [T+1, B, H], gates [T, B, 4H])``."""
    T, B, G4 = gx.shape
    H, P = G4 // 4, w_hh.shape[1]
    dev, f32 = gx.device, torch.float32
    config, n_split = launch_config("lstm_forward", B, H, P, gx.dtype, dev, w_hr is not None)
    slots = T + 1 if save else 2
    hs = empty((slots, B, P), f32, dev)
    cs = empty((slots, B, H), f32, dev)
    hs[0] = h0
    cs[0] = c0
    gates = empty((T, B, 4 * H), f32, dev) if save else hs.new_empty(0)
    m = empty((B, H), f32, dev) if w_hr is not None else hs.new_empty(0)
    y = empty((T, B, P), gx.dtype, dev)
    lens = lengths_or_full(lengths, T, B, dev)
    grid = launch_grid(config, B, n_split)
    sync = sync_buffer(grid[0], dev)
    trace, trace_steps = trace_buffer(grid, lens)
    lstm_forward_kernel[grid](
        gx, w_hh, bias_or_zeros(b_hh, 4 * H, w_hh), w_hr if w_hr is not None else w_hh,
        lens, y, hs, cs, gates, m, sync, trace,
        T, B, H, P, int(reverse), int(save), trace_steps,
        HAS_PROJ=w_hr is not None, SPLIT=config.split, BLOCK_B=config.block_b,
        BLOCK_H=config.block_h, BLOCK_K=config.block_k, PRECISION=config.precision,
        K_RES=config.k_res, ONE_CHUNK=config.one_chunk, TRACE=trace_steps > 0,
        num_warps=config.num_warps,
    )  # fmt: skip
    check_grid_sync(sync, config)
    record_trace("forward", config, grid, trace, trace_steps, B, gx.dtype)
    h_n, c_n = hs[T % slots].clone(), cs[T % slots].clone()
    saved = Saved(hs, cs, gates) if save else empty_saved(hs)
    return ForwardResult(y, h_n, c_n, saved)


def lstm_backward(
    saved: Saved,  # hs [T+1, B, P], cs [T+1, B, H], gates [T, B, 4H]
    w_hh: torch.Tensor,  # [4H, P]
    b_hh: torch.Tensor | None,  # [4H]
    w_hr: torch.Tensor | None,  # [P, H]
    lengths: torch.Tensor | None,  # [B] int64
    reverse: bool,
    dy: torch.Tensor,  # [T, B, P]
    dh_n: torch.Tensor,  # [B, P] float32
    dc_n: torch.Tensor,  # [B, H] float32
) -> BackwardResult:
    """Fused LSTM layer backward (explicit BPTT); weight gradients are float32 GEMMs after
    the kernel. Returns ``dgx [T, B, 4H]``, ``dh0 [B, P]``, ``dc0 [B, H]``, ``dw_hh``,
    ``db_hh``, ``dw_hr``."""
    hs, cs, gates = saved
    T, B, P = dy.shape
    H = w_hh.shape[0] // 4
    dev, f32 = dy.device, torch.float32
    config, n_split = launch_config("lstm_backward", B, H, P, dy.dtype, dev, w_hr is not None)
    dh = dh_n.to(f32).contiguous().clone()
    dc = dc_n.to(f32).contiguous().clone()
    dgh = empty((T, B, 4 * H), f32, dev)
    dgx = empty((T, B, 4 * H), dy.dtype, dev)
    dhp = empty((T, B, P), f32, dev) if w_hr is not None else dh.new_empty(0)
    lens = lengths_or_full(lengths, T, B, dev)
    grid = launch_grid(config, B, n_split)
    sync = sync_buffer(grid[0], dev)
    trace, trace_steps = trace_buffer(grid, lens)
    lstm_backward_kernel[grid](
        w_hh, w_hr if w_hr is not None else w_hh, lens, dy.contiguous(), gates, cs, dh, dc,
        dgh, dgx, dhp, sync, trace, T, B, H, P, int(reverse), trace_steps,
        HAS_PROJ=w_hr is not None, SPLIT=config.split, BLOCK_B=config.block_b,
        BLOCK_H=config.block_h, BLOCK_K=config.block_k, PRECISION=config.precision,
        K_RES=config.k_res, ONE_CHUNK=config.one_chunk, TRACE=trace_steps > 0,
        num_warps=config.num_warps,
    )  # fmt: skip
    check_grid_sync(sync, config)
    record_trace("backward", config, grid, trace, trace_steps, B, dy.dtype)
    dw_hh, db_hh = weight_grads(dgh, hs, w_hh, b_hh)
    dw_hr = None
    if w_hr is not None:
        o = gates[:, :, 3 * H :]
        m_all = (o * torch.tanh(cs[1:])).reshape(T * B, H)
        dw_hr = gemm_tn(dhp.reshape(T * B, P), m_all, w_hr.dtype)
    return BackwardResult(dgx, dh, dc, dw_hh, db_hh, dw_hr)
