"""Elman RNN (tanh or relu): fused forward and backward kernels, launch wrappers.

Legend: ``T`` time, ``B`` batch, ``H`` hidden; ``h' = act(gx + W_hh h + b_hh)``. Grid strategy
and synchronisation: see :mod:`.common`.
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
def _rnn_tile_step(
    gx,  # [BLOCK_B, BLOCK_H] gx of the step, input dtype (gate_tiles; CARRIED)
    b,  # [1, BLOCK_H] float32 b_hh (gate_biases; CARRIED)
    h_prev,  # [BLOCK_B, BLOCK_H] float32 h_{s-1} of the tile (CARRIED)
    gx_rows,  # [BLOCK_B, 1] pointers to gx[t, b, 0] (not CARRIED)
    b_ptr,  # [H] b_hh (not CARRIED)
    h_all_ptr,  # [B, H] float32 state slot h_{s-1} (every unit: the recurrent product)
    w_ptr,  # [H, H] W_hh
    w_res,  # [K_RES, BLOCK_H] resident slice of W_hhᵀ (K_RES > 0), else unused
    h_next_ptr,  # [B, H] float32 state slot h_s
    y_ptr,  # [T, B, H] input dtype
    t,  # [BLOCK_B] int64 time index of the step per row
    valid,  # [BLOCK_B] s < length
    relu,
    offs_b,  # [BLOCK_B]
    mask_b,  # [BLOCK_B]
    offs_h,  # [BLOCK_H] hidden units of the tile
    mask_h,  # [BLOCK_H]
    B,
    H,
    sync,  # [] int32 arrival counter of the batch tile (ARRIVE)
    s,  # processing step (phase stamps)
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
    """One step of a [BLOCK_B, BLOCK_H] tile: ``act(h_{s-1} W_hhᵀ + gx + b)`` and the stores
    of ``h_s`` and ``y``; rows past their length keep their state. Without CARRIED the step's
    gx, b and h_{s-1} tiles are loaded after the product (see the LSTM's). Returns the tile's
    ``h_s``."""
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    acc = gate_products(
        acc, acc, acc, acc, h_all_ptr, offs_b, mask_b, H, w_ptr, offs_h, mask_h, H,
        w_res, w_res, w_res, w_res, 1, BLOCK_K, K_RES, PRECISION,
    )[0]  # fmt: skip
    if CARRIED:  # (ONE_CHUNK: one tile a step)
        phase_stamp_after(trace_ptr, s, trace_steps, 5, TRACE, acc, acc, acc, acc)
    mask = mask_b[:, None] & mask_h[None, :]
    bh = offs_b[:, None] * H + offs_h[None, :]
    if not CARRIED:
        gx = gate_tiles(gx_rows, offs_h, mask, H, 1)[0]
        b = gate_biases(b_ptr, offs_h, mask_h, H, 1)[0]
    pre = acc + gx.to(tl.float32)
    pre += b
    h_new = tl.where(relu != 0, tl.maximum(pre, 0.0), 2.0 * tl.sigmoid(2.0 * pre) - 1.0)
    if not CARRIED:
        h_prev = tl.load(h_all_ptr + bh, mask=mask, other=0.0, cache_modifier=".cg")
    keep = valid[:, None] & mask
    h_next = tl.where(keep, h_new, h_prev)
    tl.store(h_next_ptr + bh, h_next, mask=mask)  # what other programs read, first
    if ARRIVE:
        phase_stamp(trace_ptr, s, trace_steps, 3, TRACE)
        grid_arrive(sync, SPLIT)
    rows = (t[:, None] * B + offs_b[:, None]) * H + offs_h[None, :]
    tl.store(y_ptr + rows, tl.where(keep, h_new, 0.0).to(y_ptr.dtype.element_ty), mask=mask)
    return h_next


# T, B and flags are not specialised on; the sizes that set the weight rows' alignment (H, P) are
# (Triton's "divisible by 16" or not), which lets 16-bit W tiles be copied asynchronously and
# vectorised: without it each tile was a synchronous 2-byte-per-element load (TTGIR).
@triton.jit(do_not_specialize=["T", "B", "reverse", "save", "relu", "trace_steps"])
def rnn_forward_kernel(
    gx_ptr,  # [T, B, H] input dtype
    w_ptr,  # [H, H] input dtype (W_hh)
    b_ptr,  # [H] input dtype (b_hh, zeros when absent)
    len_ptr,  # [B] int64 valid lengths
    y_ptr,  # [T, B, H] input dtype
    hs_ptr,  # [T+1, B, H] float32 when save else [2, B, H]; slot 0 holds h0
    sync_ptr,  # [cdiv(B, BLOCK_B)] int32 zeros (SPLIT only)
    trace_ptr,  # [programs, trace_steps, TRACE_POINTS] int64 stamps + clock (TRACE only)
    T,
    B,
    H,
    reverse,  # int 0/1
    save,  # int 0/1
    relu,  # int: 1 relu, 0 tanh
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
    w_res = resident_gates(w_ptr, pid_h, H, H, 1, BLOCK_H, K_RES)[0]
    if ONE_CHUNK:
        # The chunk's bias, its h carried across steps, and step 0's gx tile.
        offs_c, mask_c, mask_bc = own_chunk(pid_h, mask_b, H, BLOCK_H)
        b_own = gate_biases(b_ptr, offs_c, mask_c, H, 1)[0]
        h_own = tl.load(hs_ptr + offs_b[:, None] * H + offs_c[None, :], mask=mask_bc, other=0.0)
        gx_own = gate_tiles(
            step_rows(gx_ptr, 0, lens, reverse, offs_b, B, H), offs_c, mask_bc, H, 1
        )[0]
    for s in range(T):
        phase_stamp(trace_ptr, s, trace_steps, 0, TRACE)
        t, valid = step_time(s, lens, reverse)
        cur = tl.where(save != 0, s, s % 2).to(tl.int64)
        nxt = tl.where(save != 0, s + 1, (s + 1) % 2).to(tl.int64)
        h_prev_ptr = hs_ptr + cur * B * H
        if ONE_CHUNK:
            # Issue step s+1's gx load now; nothing waits for it before step s+1.
            gx_nxt = gate_tiles(
                step_rows(gx_ptr, s + 1, lens, reverse, offs_b, B, H), offs_c,
                mask_in_steps(mask_bc, offs_c, s + 1, T), H, 1,
            )[0]  # fmt: skip
            h_own = _rnn_tile_step(
                gx_own, b_own, h_own, gx_ptr, b_ptr, h_prev_ptr, w_ptr, w_res,
                hs_ptr + nxt * B * H, y_ptr, t, valid, relu, offs_b, mask_b, offs_c, mask_c, B, H,
                sync, s, trace_ptr, trace_steps, True, True, SPLIT, BLOCK_B, BLOCK_H, BLOCK_K,
                PRECISION, K_RES, TRACE,
            )  # fmt: skip
            gx_own = gx_nxt
        else:
            gx_rows = gx_ptr + (t[:, None] * B + offs_b[:, None]) * H
            for j in range(pid_h, tl.cdiv(H, BLOCK_H), n_split):
                offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
                _rnn_tile_step(
                    0.0, 0.0, 0.0, gx_rows, b_ptr, h_prev_ptr, w_ptr, w_res,
                    hs_ptr + nxt * B * H, y_ptr, t, valid, relu, offs_b, mask_b, offs_h,
                    offs_h < H, B, H, sync, s, trace_ptr, trace_steps, False, False, SPLIT,
                    BLOCK_B, BLOCK_H, BLOCK_K, PRECISION, K_RES, TRACE,
                )  # fmt: skip
        # ONE_CHUNK programs arrived (and stamped point 3) in _rnn_tile_step
        if not ONE_CHUNK:
            phase_stamp(trace_ptr, s, trace_steps, 3, TRACE)
        phase_stamp(trace_ptr, s, trace_steps, 4, TRACE)
        arrivals = step_sync(sync, arrivals, n_split, SPLIT, ONE_CHUNK)


@triton.jit
def _rnn_grad(
    dtot,  # [BLOCK_B, BLOCK_H] float32 total gradient of h_s (dh_s + dy)
    h_new,  # [BLOCK_B, BLOCK_H] float32 saved h_s
    relu,
    valid,  # [BLOCK_B] s < length
    dgh_tile,  # [BLOCK_B, BLOCK_H] pointers to dgh[s, b, unit]
    dgx_tile,  # [BLOCK_B, BLOCK_H] pointers to dgx[t, b, unit]
    mask,  # [BLOCK_B, BLOCK_H]
    sync,  # [] int32 arrival counter of the batch tile (ARRIVE)
    r,  # processing step (the backward's r-th, for the phase stamps)
    trace_ptr,  # phase stamps (common.phase_stamp; TRACE only)
    trace_steps,
    ARRIVE: tl.constexpr,  # grid_arrive once dgh is stored (the caller then only waits)
    SPLIT: tl.constexpr,
    TRACE: tl.constexpr,
):
    """Gradient of step ``s``'s pre-activation (zero past a row's length), stored to ``dgh``
    (float32) and ``dgx`` (its dtype)."""
    deriv = tl.where(relu != 0, (h_new > 0).to(tl.float32), 1.0 - h_new * h_new)
    dpre = tl.where(valid[:, None], dtot * deriv, 0.0)
    tl.store(dgh_tile, dpre, mask=mask)
    if ARRIVE:  # dgh is what the other programs read; dgx only the caller
        phase_stamp(trace_ptr, r, trace_steps, 3, TRACE)
        grid_arrive(sync, SPLIT)
    tl.store(dgx_tile, dpre.to(dgx_tile.dtype.element_ty), mask=mask)


# T, B and flags are not specialised on; the sizes that set the weight rows' alignment (H, P) are
# (Triton's "divisible by 16" or not), which lets 16-bit W tiles be copied asynchronously and
# vectorised: without it each tile was a synchronous 2-byte-per-element load (TTGIR).
@triton.jit(do_not_specialize=["T", "B", "reverse", "relu", "trace_steps"])
def rnn_backward_kernel(
    w_ptr,  # [H, H] input dtype (W_hh)
    len_ptr,  # [B] int64 valid lengths
    dy_ptr,  # [T, B, H] dtype of y
    hs_ptr,  # [T+1, B, H] float32 saved states (processing order)
    dh_ptr,  # [B, H] float32: dh_n in, dh0 out
    dgh_ptr,  # [T, B, H] float32 out: gradient of the pre-activation (processing order)
    dgx_ptr,  # [T, B, H] dtype of gx out: the same in time order
    sync_ptr,  # [cdiv(B, BLOCK_B)] int32 zeros (SPLIT only)
    trace_ptr,  # [programs, trace_steps, TRACE_POINTS] int64 stamps + clock (TRACE only)
    T,
    B,
    H,
    reverse,  # int 0/1
    relu,  # int: 1 relu, 0 tanh
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
    w_res = resident_columns(w_ptr, pid_h, H, H, BLOCK_H, K_RES)
    if ONE_CHUNK:
        # The chunk's dh carried across steps, and the last step's dy and h_s tiles.
        offs_c, mask_c, mask_bc = own_chunk(pid_h, mask_b, H, BLOCK_H)
        bc = offs_b[:, None] * H + offs_c[None, :]
        dh_own = tl.load(dh_ptr + bc, mask=mask_bc, other=0.0)
        dy_n = gate_tiles(step_rows(dy_ptr, T - 1, lens, reverse, offs_b, B, H), offs_c, mask_bc,
                          H, 1)[0]  # fmt: skip
        hs_n = tl.load(hs_ptr + T.to(tl.int64) * B * H + bc, mask=mask_bc, other=0.0)
    for r in range(T):
        s = T - 1 - r
        if ONE_CHUNK:  # (the previous step's dh product is kept in registers: wait for it)
            phase_stamp_after(trace_ptr, r, trace_steps, 0, TRACE, dh_own, dh_own, dh_own, dh_own)
        else:
            phase_stamp(trace_ptr, r, trace_steps, 0, TRACE)
        t, valid = step_time(s, lens, reverse)
        s64 = s.to(tl.int64)
        keep = valid[:, None]
        # phase 1: derivative of the pre-activation of step s.
        if ONE_CHUNK:
            dy_c, hs_c = dy_n, hs_n
            # Issue step s-1's loads now; nothing waits for them before step s-1.
            more = mask_in_steps(mask_bc, offs_c, s - 1, T)
            dy_n = gate_tiles(step_rows(dy_ptr, s - 1, lens, reverse, offs_b, B, H), offs_c, more,
                              H, 1)[0]  # fmt: skip
            hs_n = tl.load(hs_ptr + s64 * B * H + bc, mask=more, other=0.0)
            _rnn_grad(
                dh_own + dy_c.to(tl.float32), hs_c, relu, valid, dgh_ptr + s64 * B * H + bc,
                dgx_ptr + (t[:, None] * B + offs_b[:, None]) * H + offs_c[None, :], mask_bc,
                sync, r, trace_ptr, trace_steps, True, SPLIT, TRACE,
            )  # fmt: skip
        else:
            for j in range(pid_h, tl.cdiv(H, BLOCK_H), n_split):
                offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
                mask = mask_b[:, None] & (offs_h < H)[None, :]
                bh = offs_b[:, None] * H + offs_h[None, :]
                rows = (t[:, None] * B + offs_b[:, None]) * H + offs_h[None, :]
                dtot = tl.load(dh_ptr + bh, mask=mask, other=0.0)
                dtot += tl.load(dy_ptr + rows, mask=mask, other=0.0).to(tl.float32)
                h_new = tl.load(hs_ptr + (s64 + 1) * B * H + bh, mask=mask, other=0.0)
                _rnn_grad(dtot, h_new, relu, valid, dgh_ptr + s64 * B * H + bh, dgx_ptr + rows,
                          mask, sync, r, trace_ptr, trace_steps, False, SPLIT, TRACE)  # fmt: skip
        # ONE_CHUNK programs arrived (and stamped point 3) in _rnn_grad
        if not ONE_CHUNK:
            phase_stamp(trace_ptr, r, trace_steps, 3, TRACE)
        phase_stamp(trace_ptr, r, trace_steps, 4, TRACE)
        arrivals = step_sync(sync, arrivals, n_split, SPLIT, ONE_CHUNK)
        phase_stamp(trace_ptr, r, trace_steps, 5, TRACE)
        # phase 2: dh_{s-1} = dgh_s @ W_hh where valid, else unchanged.
        if ONE_CHUNK:
            acc = column_product(
                dgh_ptr + s64 * B * H, offs_b, mask_b, H, w_ptr, offs_c, mask_c, H, w_res,
                BLOCK_K, K_RES, PRECISION,
            )  # fmt: skip
            dh_own = tl.where(keep, acc, dh_own)
        else:
            for j in range(pid_h, tl.cdiv(H, BLOCK_H), n_split):
                offs_h = j * BLOCK_H + tl.arange(0, BLOCK_H)
                mask_h = offs_h < H
                mask = mask_b[:, None] & mask_h[None, :]
                bh = offs_b[:, None] * H + offs_h[None, :]
                acc = column_product(
                    dgh_ptr + s64 * B * H, offs_b, mask_b, H, w_ptr, offs_h, mask_h, H,
                    w_res, BLOCK_K, K_RES, PRECISION,
                )  # fmt: skip
                dh = tl.load(dh_ptr + bh, mask=mask, other=0.0)
                tl.store(dh_ptr + bh, tl.where(keep, acc, dh), mask=mask)
            # dh is only touched by the program owning its chunk, but by other threads of it.
            tl.debug_barrier()
    if ONE_CHUNK:
        tl.store(dh_ptr + bc, dh_own, mask=mask_bc)


# ----------------------------------------------------------------------------------------------
# launch wrappers
# ----------------------------------------------------------------------------------------------


def rnn_forward(
    relu: bool,
    gx: torch.Tensor,  # [T, B, H]
    h0: torch.Tensor,  # [B, H] float32
    w_hh: torch.Tensor,  # [H, H]
    b_hh: torch.Tensor | None,  # [H]
    lengths: torch.Tensor | None,  # [B] int64
    reverse: bool,
    save: bool,
) -> ForwardResult:
    """Fused Elman-RNN layer forward; returns ``y [T, B, H]``, ``h_n [B, H]`` and, when
    ``save``, ``Saved(hs [T+1, B, H], [0], [0])``."""
    T, B, H = gx.shape
    dev, f32 = gx.device, torch.float32
    config, n_split = launch_config("rnn_forward", B, H, H, gx.dtype, dev)
    slots = T + 1 if save else 2
    hs = empty((slots, B, H), f32, dev)
    hs[0] = h0
    y = empty((T, B, H), gx.dtype, dev)
    lens = lengths_or_full(lengths, T, B, dev)
    grid = launch_grid(config, B, n_split)
    sync = sync_buffer(grid[0], dev)
    trace, trace_steps = trace_buffer(grid, lens)
    rnn_forward_kernel[grid](
        gx, w_hh, bias_or_zeros(b_hh, H, w_hh), lens, y, hs, sync, trace,
        T, B, H, int(reverse), int(save), int(relu), trace_steps,
        SPLIT=config.split, BLOCK_B=config.block_b, BLOCK_H=config.block_h,
        BLOCK_K=config.block_k, PRECISION=config.precision, K_RES=config.k_res,
        ONE_CHUNK=config.one_chunk, TRACE=trace_steps > 0, num_warps=config.num_warps,
    )  # fmt: skip
    check_grid_sync(sync, config)
    record_trace("forward", config, grid, trace, trace_steps, B, gx.dtype)
    h_n = hs[T % slots].clone()
    saved = Saved(hs, hs.new_empty(0), hs.new_empty(0)) if save else empty_saved(hs)
    return ForwardResult(y, h_n, hs.new_empty(0), saved)


def rnn_backward(
    relu: bool,
    saved: Saved,  # hs [T+1, B, H]
    w_hh: torch.Tensor,  # [H, H]
    b_hh: torch.Tensor | None,  # [H]
    lengths: torch.Tensor | None,  # [B] int64
    reverse: bool,
    dy: torch.Tensor,  # [T, B, H]
    dh_n: torch.Tensor,  # [B, H] float32
) -> BackwardResult:
    """Fused Elman-RNN layer backward; returns ``dgx [T, B, H]``, ``dh0 [B, H]``, ``dw_hh``,
    ``db_hh`` (weight gradients as float32 GEMMs after the kernel)."""
    hs = saved.hs
    T, B, H = dy.shape
    dev, f32 = dy.device, torch.float32
    config, n_split = launch_config("rnn_backward", B, H, H, dy.dtype, dev)
    dh = dh_n.to(f32).contiguous().clone()
    dgh = empty((T, B, H), f32, dev)
    dgx = empty((T, B, H), dy.dtype, dev)
    lens = lengths_or_full(lengths, T, B, dev)
    grid = launch_grid(config, B, n_split)
    sync = sync_buffer(grid[0], dev)
    trace, trace_steps = trace_buffer(grid, lens)
    rnn_backward_kernel[grid](
        w_hh, lens, dy.contiguous(), hs, dh, dgh, dgx, sync, trace,
        T, B, H, int(reverse), int(relu), trace_steps,
        SPLIT=config.split, BLOCK_B=config.block_b, BLOCK_H=config.block_h,
        BLOCK_K=config.block_k, PRECISION=config.precision, K_RES=config.k_res,
        ONE_CHUNK=config.one_chunk, TRACE=trace_steps > 0, num_warps=config.num_warps,
    )  # fmt: skip
    check_grid_sync(sync, config)
    record_trace("backward", config, grid, trace, trace_steps, B, dy.dtype)
    dw_hh, db_hh = weight_grads(dgh, hs, w_hh, b_hh)
    return BackwardResult(dgx, dh, None, dw_hh, db_hh, None)
