"""GRU: fused forward and backward kernels, launch wrappers.

Legend: ``T`` time, ``B`` batch, ``H`` hidden; gates r, z, n in torch.nn's order with
``n = tanh(gx_n + r * (W_hn h + b_hn))`` and ``h' = (1 - z) * n + z * h``. Grid strategy and
synchronisation: see :mod:`.common`.
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
    grid_arrive,
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
    trace_buffer,
    weight_grads,
)

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gru_tile_step(
    gx_r,  # [BLOCK_B, BLOCK_H] gx of the step per gate, input dtype (gate_tiles; CARRIED)
    gx_z,
    gx_n,
    b_r,  # [1, BLOCK_H] float32 b_hh per gate (gate_biases; CARRIED)
    b_z,
    b_n,
    h_prev,  # [BLOCK_B, BLOCK_H] float32 h_{s-1} of the tile (CARRIED)
    gx_rows,  # [BLOCK_B, 1] pointers to gx[t, b, 0] (not CARRIED)
    b_ptr,  # [3H] b_hh (not CARRIED)
    h_all_ptr,  # [B, H] float32 state slot h_{s-1} (every unit: the recurrent product)
    w_ptr,  # [3H, H] W_hh
    w_r,  # [K_RES, BLOCK_H] resident slices of W_gᵀ (K_RES > 0), else unused
    w_z,
    w_n,
    h_next_ptr,  # [B, H] float32 state slot h_s
    hn_ptr,  # [T, B, H] float32 W_hn h + b_hn (written when save)
    gates_ptr,  # [T, B, 3H] float32 activated gates (written when save)
    y_ptr,  # [T, B, H] input dtype
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
    sync,  # [] int32 arrival counter of the batch tile (ARRIVE)
    trace_ptr,  # phase stamps (common.phase_stamp; TRACE only)
    trace_steps,
    CARRIED: tl.constexpr,  # gx, b, h_prev given (ONE_CHUNK), else loaded here
    ARRIVE: tl.constexpr,  # grid_arrive once h_s is stored (the caller then only waits)
    SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    K_RES: tl.constexpr,
    TRACE: tl.constexpr,
):
    """One step of a [BLOCK_B, BLOCK_H] tile: the recurrent parts ``h_{s-1} W_gᵀ + b_g`` of
    the r, z, n gates (one pass over ``H``, each ``h_{s-1}`` tile loaded once for all three;
    with resident weights one load and three dots), the cell, and the stores of ``h_s``, ``y``
    and (save) the gates and ``W_hn h + b_hn``. Rows past their length keep their state.
    Without CARRIED the step's gx, b and h_{s-1} tiles are loaded after the products (see
    the LSTM's). Returns the tile's ``h_s``."""
    zero = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    hr, hz, hn, _hn = gate_products(
        zero, zero, zero, zero, h_all_ptr, offs_b, mask_b, H, w_ptr, offs_h, mask_h, H,
        w_r, w_z, w_n, w_n, 3, BLOCK_K, K_RES, PRECISION,
    )  # fmt: skip
    if CARRIED:  # (ONE_CHUNK: one tile a step)
        phase_stamp_after(trace_ptr, s, trace_steps, 5, TRACE, hr, hz, hn, hn)
    mask = mask_b[:, None] & mask_h[None, :]
    bh = offs_b[:, None] * H + offs_h[None, :]
    if not CARRIED:
        b_r, b_z, b_n, _b = gate_biases(b_ptr, offs_h, mask_h, H, 3)
        gx_r, gx_z, gx_n, _g = gate_tiles(gx_rows, offs_h, mask, H, 3)
    hr += b_r
    hz += b_z
    hn += b_n
    r = tl.sigmoid(gx_r.to(tl.float32) + hr)
    z = tl.sigmoid(gx_z.to(tl.float32) + hz)
    n = 2.0 * tl.sigmoid(2.0 * (gx_n.to(tl.float32) + r * hn)) - 1.0  # tanh
    if not CARRIED:
        h_prev = tl.load(h_all_ptr + bh, mask=mask, other=0.0, cache_modifier=".cg")
    h_new = (1.0 - z) * n + z * h_prev
    keep = valid[:, None] & mask
    h_next = tl.where(keep, h_new, h_prev)
    tl.store(h_next_ptr + bh, h_next, mask=mask)  # what other programs read, first
    if ARRIVE:
        phase_stamp(trace_ptr, s, trace_steps, 3, TRACE)
        grid_arrive(sync, SPLIT)
    y_rows = y_ptr + (t[:, None] * B + offs_b[:, None]) * H + offs_h[None, :]
    tl.store(y_rows, tl.where(keep, h_new, 0.0).to(y_ptr.dtype.element_ty), mask=mask)
    smask = mask & (offs_h * 0 + save != 0)[None, :]
    sb = (s * B + offs_b[:, None]).to(tl.int64)
    tl.store(hn_ptr + sb * H + offs_h[None, :], hn, mask=smask)
    g_rows = gates_ptr + sb * (3 * H) + offs_h[None, :]
    tl.store(g_rows, r, mask=smask)
    tl.store(g_rows + H, z, mask=smask)
    tl.store(g_rows + 2 * H, n, mask=smask)
    return h_next


# T, B and flags are not specialised on; the sizes that set the weight rows' alignment (H, P) are
# (Triton's "divisible by 16" or not), which lets 16-bit W tiles be copied asynchronously and
# vectorised: without it each tile was a synchronous 2-byte-per-element load (TTGIR).
@triton.jit(do_not_specialize=["T", "B", "reverse", "save", "trace_steps"])
def gru_forward_kernel(
    gx_ptr,  # [T, B, 3H] input dtype
    w_ptr,  # [3H, H] input dtype (W_hh)
    b_ptr,  # [3H] input dtype (b_hh, zeros when absent)
    len_ptr,  # [B] int64 valid lengths
    y_ptr,  # [T, B, H] input dtype
    hs_ptr,  # [T+1, B, H] float32 when save else [2, B, H]; slot 0 holds h0
    hn_ptr,  # [T, B, H] float32 W_hn h + b_hn (written when save)
    gates_ptr,  # [T, B, 3H] float32 activated gates (written when save)
    sync_ptr,  # [cdiv(B, BLOCK_B)] int32 zeros (SPLIT only)
    trace_ptr,  # [programs, trace_steps, TRACE_POINTS] int64 stamps + clock (TRACE only)
    T,
    B,
    H,
    reverse,  # int 0/1
    save,  # int 0/1
    trace_steps,  # steps stamped (TRACE only)
    SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    K_RES: tl.constexpr = 0,  # > 0: W_hh slice resident (see lstm_forward_kernel)
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
    w_r, w_z, w_n, _w = resident_gates(w_ptr, pid_h, H, H, 3, BLOCK_H, K_RES)
    if ONE_CHUNK:
        # The chunk's biases, its h carried across steps, and step 0's gx tiles.
        offs_c, mask_c, mask_bc = own_chunk(pid_h, mask_b, H, BLOCK_H)
        b_r, b_z, b_n, _b = gate_biases(b_ptr, offs_c, mask_c, H, 3)
        h_own = tl.load(hs_ptr + offs_b[:, None] * H + offs_c[None, :], mask=mask_bc, other=0.0)
        gx_r, gx_z, gx_n, _g = gate_tiles(
            step_rows(gx_ptr, 0, lens, reverse, offs_b, B, 3 * H), offs_c, mask_bc, H, 3
        )
    for s in range(T):
        phase_stamp(trace_ptr, s, trace_steps, 0, TRACE)
        t, valid = step_time(s, lens, reverse)
        cur = tl.where(save != 0, s, s % 2).to(tl.int64)
        nxt = tl.where(save != 0, s + 1, (s + 1) % 2).to(tl.int64)
        h_prev_ptr = hs_ptr + cur * B * H
        if ONE_CHUNK:
            # Issue step s+1's gx loads now; nothing waits for them before step s+1.
            nx_r, nx_z, nx_n, _n = gate_tiles(
                step_rows(gx_ptr, s + 1, lens, reverse, offs_b, B, 3 * H), offs_c,
                mask_in_steps(mask_bc, offs_c, s + 1, T), H, 3,
            )  # fmt: skip
            h_own = _gru_tile_step(
                gx_r, gx_z, gx_n, b_r, b_z, b_n, h_own, gx_ptr, b_ptr, h_prev_ptr, w_ptr, w_r,
                w_z, w_n, hs_ptr + nxt * B * H, hn_ptr, gates_ptr, y_ptr, s, t, valid, save,
                offs_b, mask_b, offs_c, mask_c, B, H, sync, trace_ptr, trace_steps, True, True,
                SPLIT, BLOCK_B, BLOCK_H, BLOCK_K, PRECISION, K_RES, TRACE,
            )  # fmt: skip
            gx_r, gx_z, gx_n = nx_r, nx_z, nx_n
        else:
            gx_rows = gx_ptr + (t[:, None] * B + offs_b[:, None]) * (3 * H)
            for j in range(pid_h, tl.cdiv(H, BLOCK_H), n_split):
                offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
                _gru_tile_step(
                    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, gx_rows, b_ptr, h_prev_ptr, w_ptr, w_r,
                    w_z, w_n, hs_ptr + nxt * B * H, hn_ptr, gates_ptr, y_ptr, s, t, valid, save,
                    offs_b, mask_b, offs_h, offs_h < H, B, H, sync, trace_ptr, trace_steps, False,
                    False, SPLIT, BLOCK_B, BLOCK_H, BLOCK_K, PRECISION, K_RES, TRACE,
                )  # fmt: skip
        # ONE_CHUNK programs arrived (and stamped point 3) in _gru_tile_step
        if not ONE_CHUNK:
            phase_stamp(trace_ptr, s, trace_steps, 3, TRACE)
        phase_stamp(trace_ptr, s, trace_steps, 4, TRACE)
        arrivals = step_sync(sync, arrivals, n_split, SPLIT, ONE_CHUNK)


@triton.jit
def _gru_saved_tiles(
    gates_ptr,  # [T, B, 3H] float32 saved activated gates (processing order)
    hs_ptr,  # [T+1, B, H] float32 saved states (processing order)
    hn_ptr,  # [T, B, H] float32 saved W_hn h + b_hn
    s,  # processing step
    offs_b,  # [BLOCK_B]
    offs_h,  # [BLOCK_H]
    mask,  # [BLOCK_B, BLOCK_H]
    B,
    H,
):
    """What the backward's step ``s`` reads of the forward for a tile: the gates r, z, n,
    ``h_{s-1}`` and ``W_hn h_{s-1} + b_hn``."""
    s64 = s.to(tl.int64)
    bh = offs_b[:, None] * H + offs_h[None, :]
    g_rows = gates_ptr + (s64 * B + offs_b[:, None]) * (3 * H) + offs_h[None, :]
    r = tl.load(g_rows, mask=mask, other=0.0)
    z = tl.load(g_rows + H, mask=mask, other=0.0)
    n = tl.load(g_rows + 2 * H, mask=mask, other=0.0)
    h_prev = tl.load(hs_ptr + s64 * B * H + bh, mask=mask, other=0.0)
    hn = tl.load(hn_ptr + s64 * B * H + bh, mask=mask, other=0.0)
    return r, z, n, h_prev, hn


@triton.jit
def _gru_gate_grads(
    dtot,  # [BLOCK_B, BLOCK_H] float32 total gradient of h_s (dh_s + dy)
    r,  # [BLOCK_B, BLOCK_H] float32 saved gates, state and W_hn h + b_hn of step s
    z,
    n,
    h_prev,
    hn,
    valid,  # [BLOCK_B] s < length
    dgh_rows,  # [BLOCK_B, BLOCK_H] pointers to dgh[s, b, unit] (gate r)
    dgx_rows,  # [BLOCK_B, BLOCK_H] pointers to dgx[t, b, unit] (gate r)
    mask,  # [BLOCK_B, BLOCK_H]
    H,
    sync,  # [] int32 arrival counter of the batch tile (ARRIVE)
    r_,  # processing step (the backward's r-th, for the phase stamps)
    trace_ptr,  # phase stamps (common.phase_stamp; TRACE only)
    trace_steps,
    ARRIVE: tl.constexpr,  # grid_arrive once dgh is stored (the caller then only waits)
    SPLIT: tl.constexpr,
    TRACE: tl.constexpr,
):
    """Gradients of the r, z, n pre-activations of step ``s`` (zero past a row's length),
    stored to ``dgh`` (of ``W_hh h + b_hh``, float32) and ``dgx`` (its dtype)."""
    keep = valid[:, None]
    dn = tl.where(keep, dtot * (1.0 - z) * (1.0 - n * n), 0.0)
    dr = tl.where(keep, dn * hn * r * (1.0 - r), 0.0)
    dz = tl.where(keep, dtot * (h_prev - n) * z * (1.0 - z), 0.0)
    tl.store(dgh_rows, dr, mask=mask)
    tl.store(dgh_rows + H, dz, mask=mask)
    tl.store(dgh_rows + 2 * H, dn * r, mask=mask)
    if ARRIVE:  # dgh is what the other programs read; dgx only the caller
        phase_stamp(trace_ptr, r_, trace_steps, 3, TRACE)
        grid_arrive(sync, SPLIT)
    out_ty = dgx_rows.dtype.element_ty
    tl.store(dgx_rows, dr.to(out_ty), mask=mask)
    tl.store(dgx_rows + H, dz.to(out_ty), mask=mask)
    tl.store(dgx_rows + 2 * H, dn.to(out_ty), mask=mask)


# T, B and flags are not specialised on; the sizes that set the weight rows' alignment (H, P) are
# (Triton's "divisible by 16" or not), which lets 16-bit W tiles be copied asynchronously and
# vectorised: without it each tile was a synchronous 2-byte-per-element load (TTGIR).
@triton.jit(do_not_specialize=["T", "B", "reverse", "trace_steps"])
def gru_backward_kernel(
    w_ptr,  # [3H, H] input dtype (W_hh)
    len_ptr,  # [B] int64 valid lengths
    dy_ptr,  # [T, B, H] dtype of y
    hs_ptr,  # [T+1, B, H] float32 saved states (processing order)
    hn_ptr,  # [T, B, H] float32 saved W_hn h + b_hn
    gates_ptr,  # [T, B, 3H] float32 saved activated gates
    dh_ptr,  # [B, H] float32: dh_n in, dh0 out
    dgh_ptr,  # [T, B, 3H] float32 out: gradient of W_hh h + b_hh (processing order)
    dgx_ptr,  # [T, B, 3H] dtype of gx out: gradient of gx (time order)
    sync_ptr,  # [cdiv(B, BLOCK_B)] int32 zeros (SPLIT only)
    trace_ptr,  # [programs, trace_steps, TRACE_POINTS] int64 stamps + clock (TRACE only)
    T,
    B,
    H,
    reverse,  # int 0/1
    trace_steps,  # steps stamped (TRACE only)
    SPLIT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    K_RES: tl.constexpr = 0,  # > 0: the program's columns of W_hh stay on chip (phase 2)
    ONE_CHUNK: tl.constexpr = False,  # the program owns hidden chunk pid_h only
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
    w_res = resident_columns(w_ptr, pid_h, 3 * H, H, BLOCK_H, K_RES)
    if ONE_CHUNK:
        # The chunk's dh carried across steps, and the last step's saved tiles.
        offs_c, mask_c, mask_bc = own_chunk(pid_h, mask_b, H, BLOCK_H)
        bc = offs_b[:, None] * H + offs_c[None, :]
        dh_own = tl.load(dh_ptr + bc, mask=mask_bc, other=0.0)
        dy_n = gate_tiles(step_rows(dy_ptr, T - 1, lens, reverse, offs_b, B, H), offs_c, mask_bc,
                          H, 1)[0]  # fmt: skip
        r_n, z_n, n_n, hp_n, hn_n = _gru_saved_tiles(
            gates_ptr, hs_ptr, hn_ptr, T - 1, offs_b, offs_c, mask_bc, B, H
        )
    for r_ in range(T):
        s = T - 1 - r_
        if ONE_CHUNK:  # (the previous step's dh product is kept in registers: wait for it)
            phase_stamp_after(trace_ptr, r_, trace_steps, 0, TRACE, dh_own, dh_own, dh_own, dh_own)
        else:
            phase_stamp(trace_ptr, r_, trace_steps, 0, TRACE)
        t, valid = step_time(s, lens, reverse)
        s64 = s.to(tl.int64)
        keep = valid[:, None]
        # phase 1: gate derivatives of step s.
        if ONE_CHUNK:
            dy_c, r_c, z_c, n_c, hp_c, hn_c = dy_n, r_n, z_n, n_n, hp_n, hn_n
            # Issue step s-1's loads now; nothing waits for them before step s-1.
            more = mask_in_steps(mask_bc, offs_c, s - 1, T)
            dy_n = gate_tiles(step_rows(dy_ptr, s - 1, lens, reverse, offs_b, B, H), offs_c, more,
                              H, 1)[0]  # fmt: skip
            r_n, z_n, n_n, hp_n, hn_n = _gru_saved_tiles(
                gates_ptr, hs_ptr, hn_ptr, s - 1, offs_b, offs_c, more, B, H
            )
            dtot_c = dh_own + dy_c.to(tl.float32)
            _gru_gate_grads(
                dtot_c, r_c, z_c, n_c, hp_c, hn_c, valid,
                dgh_ptr + (s64 * B + offs_b[:, None]) * (3 * H) + offs_c[None, :],
                dgx_ptr + (t[:, None] * B + offs_b[:, None]) * (3 * H) + offs_c[None, :],
                mask_bc, H, sync, r_, trace_ptr, trace_steps, True, SPLIT, TRACE,
            )  # fmt: skip
        else:
            for j in range(pid_h, tl.cdiv(H, BLOCK_H), n_split):
                offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
                mask = mask_b[:, None] & (offs_h < H)[None, :]
                bh = offs_b[:, None] * H + offs_h[None, :]
                dy_rows = dy_ptr + (t[:, None] * B + offs_b[:, None]) * H + offs_h[None, :]
                dtot = tl.load(dh_ptr + bh, mask=mask, other=0.0)
                dtot += tl.load(dy_rows, mask=mask, other=0.0).to(tl.float32)
                r, z, n, h_prev, hn = _gru_saved_tiles(
                    gates_ptr, hs_ptr, hn_ptr, s, offs_b, offs_h, mask, B, H
                )
                _gru_gate_grads(
                    dtot, r, z, n, h_prev, hn, valid,
                    dgh_ptr + (s64 * B + offs_b[:, None]) * (3 * H) + offs_h[None, :],
                    dgx_ptr + (t[:, None] * B + offs_b[:, None]) * (3 * H) + offs_h[None, :],
                    mask, H, sync, r_, trace_ptr, trace_steps, False, SPLIT, TRACE,
                )  # fmt: skip
        # ONE_CHUNK programs arrived (and stamped point 3) in _gru_gate_grads
        if not ONE_CHUNK:
            phase_stamp(trace_ptr, r_, trace_steps, 3, TRACE)
        phase_stamp(trace_ptr, r_, trace_steps, 4, TRACE)
        arrivals = step_sync(sync, arrivals, n_split, SPLIT, ONE_CHUNK)
        phase_stamp(trace_ptr, r_, trace_steps, 5, TRACE)
        # phase 2: dh_{s-1} = dtot * z + dgh_s @ W_hh where valid, else unchanged.
        if ONE_CHUNK:
            acc = column_product(
                dgh_ptr + s64 * B * 3 * H, offs_b, mask_b, 3 * H, w_ptr, offs_c, mask_c, H,
                w_res, BLOCK_K, K_RES, PRECISION,
            )  # fmt: skip
            dh_own = tl.where(keep, dtot_c * z_c + acc, dh_own)
        else:
            for j in range(pid_h, tl.cdiv(H, BLOCK_H), n_split):
                offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
                mask_h = offs_h < H
                mask = mask_b[:, None] & mask_h[None, :]
                bh = offs_b[:, None] * H + offs_h[None, :]
                acc = column_product(
                    dgh_ptr + s64 * B * 3 * H, offs_b, mask_b, 3 * H, w_ptr, offs_h, mask_h,
                    H, w_res, BLOCK_K, K_RES, PRECISION,
                )  # fmt: skip
                dy_rows = dy_ptr + (t[:, None] * B + offs_b[:, None]) * H + offs_h[None, :]
                dh = tl.load(dh_ptr + bh, mask=mask, other=0.0)
                dtot = dh + tl.load(dy_rows, mask=mask, other=0.0).to(tl.float32)
                z = tl.load(
                    gates_ptr + (s64 * B + offs_b[:, None]) * (3 * H) + H + offs_h[None, :],
                    mask=mask,
                    other=0.0,
                )
                tl.store(dh_ptr + bh, tl.where(keep, dtot * z + acc, dh), mask=mask)
            # dh is only touched by the program owning its chunk, but by other threads of it.
            tl.debug_barrier()
    if ONE_CHUNK:
        tl.store(dh_ptr + bc, dh_own, mask=mask_bc)


# ----------------------------------------------------------------------------------------------
# launch wrappers
# ----------------------------------------------------------------------------------------------


def gru_forward(
    gx: torch.Tensor,  # [T, B, 3H]
    h0: torch.Tensor,  # [B, H] float32
    w_hh: torch.Tensor,  # [3H, H]
    b_hh: torch.Tensor | None,  # [3H]
    lengths: torch.Tensor | None,  # [B] int64
    reverse: bool,
    save: bool,
) -> ForwardResult:
    """Fused GRU layer forward; returns ``y [T, B, H]``, ``h_n [B, H]`` and, when ``save``,
    ``Saved(hs [T+1, B, H], hn [T, B, H], gates [T, B, 3H])``."""
    T, B, G3 = gx.shape
    H = G3 // 3
    dev, f32 = gx.device, torch.float32
    config, n_split = launch_config("gru_forward", B, H, H, gx.dtype, dev)
    slots = T + 1 if save else 2
    hs = empty((slots, B, H), f32, dev)
    hs[0] = h0
    hn = empty((T, B, H), f32, dev) if save else hs.new_empty(0)
    gates = empty((T, B, 3 * H), f32, dev) if save else hs.new_empty(0)
    y = empty((T, B, H), gx.dtype, dev)
    lens = lengths_or_full(lengths, T, B, dev)
    grid = launch_grid(config, B, n_split)
    sync = sync_buffer(grid[0], dev)
    trace, trace_steps = trace_buffer(grid, lens)
    gru_forward_kernel[grid](
        gx, w_hh, bias_or_zeros(b_hh, 3 * H, w_hh), lens, y, hs, hn, gates,
        sync, trace, T, B, H, int(reverse), int(save), trace_steps,
        SPLIT=config.split, BLOCK_B=config.block_b, BLOCK_H=config.block_h,
        BLOCK_K=config.block_k, PRECISION=config.precision, K_RES=config.k_res,
        ONE_CHUNK=config.one_chunk, TRACE=trace_steps > 0, num_warps=config.num_warps,
    )  # fmt: skip
    check_grid_sync(sync, config)
    record_trace("forward", config, grid, trace, trace_steps, B, gx.dtype)
    h_n = hs[T % slots].clone()
    saved = Saved(hs, hn, gates) if save else empty_saved(hs)
    return ForwardResult(y, h_n, hs.new_empty(0), saved)


def gru_backward(
    saved: Saved,  # hs [T+1, B, H], hn [T, B, H], gates [T, B, 3H]
    w_hh: torch.Tensor,  # [3H, H]
    b_hh: torch.Tensor | None,  # [3H]
    lengths: torch.Tensor | None,  # [B] int64
    reverse: bool,
    dy: torch.Tensor,  # [T, B, H]
    dh_n: torch.Tensor,  # [B, H] float32
) -> BackwardResult:
    """Fused GRU layer backward; returns ``dgx [T, B, 3H]``, ``dh0 [B, H]``, ``dw_hh``,
    ``db_hh`` (weight gradients as float32 GEMMs after the kernel)."""
    hs, hn, gates = saved
    T, B, H = dy.shape
    dev, f32 = dy.device, torch.float32
    config, n_split = launch_config("gru_backward", B, H, H, dy.dtype, dev)
    dh = dh_n.to(f32).contiguous().clone()
    dgh = empty((T, B, 3 * H), f32, dev)
    dgx = empty((T, B, 3 * H), dy.dtype, dev)
    lens = lengths_or_full(lengths, T, B, dev)
    grid = launch_grid(config, B, n_split)
    sync = sync_buffer(grid[0], dev)
    trace, trace_steps = trace_buffer(grid, lens)
    gru_backward_kernel[grid](
        w_hh, lens, dy.contiguous(), hs, hn, gates, dh, dgh, dgx, sync, trace,
        T, B, H, int(reverse), trace_steps,
        SPLIT=config.split, BLOCK_B=config.block_b, BLOCK_H=config.block_h,
        BLOCK_K=config.block_k, PRECISION=config.precision, K_RES=config.k_res,
        ONE_CHUNK=config.one_chunk, TRACE=trace_steps > 0, num_warps=config.num_warps,
    )  # fmt: skip
    check_grid_sync(sync, config)
    record_trace("backward", config, grid, trace, trace_steps, B, dy.dtype)
    dw_hh, db_hh = weight_grads(dgh, hs, w_hh, b_hh)
    return BackwardResult(dgx, dh, None, dw_hh, db_hh, None)
