"""Pieces every Triton cell file shares: device helpers, launch configuration, allocation.

Legend: ``T`` time, ``B`` batch, ``H`` hidden, ``P`` state size (proj_size or H), ``G`` gates.

Grid strategy (the same for every cell, forward and backward). The grid is
``(cdiv(B, BLOCK_B), n_split)``: program ``(i, j)`` owns batch rows ``i*BLOCK_B ...`` and the
hidden chunks ``j, j + n_split, ...`` of ``BLOCK_H`` units each. Every time step reads the whole
previous state of its batch tile from a float32 state buffer in global memory and writes its own
chunks of the new state, so the programs of one batch tile must wait for each other once per
step (twice with an LSTM projection):

* ``SPLIT=False`` (``n_split == 1``): one program per batch tile owns every hidden unit; the
  wait is a CTA barrier, there is no cross-program waiting. Used for small shapes, on CPU
  tensors under ``TRITON_INTERPRET=1`` (which runs programs one after another, except inside
  :func:`.emulation.emulate_gpu`) and whenever the batch tiles alone fill the GPU.
* ``SPLIT=True`` (persistent mode): ``n_split > 1`` programs per batch tile, all resident at
  once (the grid never exceeds the number of SMs), synchronised once per phase by a monotonic
  atomic counter per batch tile. Under the interpreter only inside
  :func:`.emulation.emulate_gpu`, which runs a launch's programs concurrently.

Recurrent weights: the kernels keep each program's slices of W_hh on chip across all steps
where they fit and every program owns one chunk (``K_RES > 0``, see :func:`choose_config`;
forward: the gates' rows of the program's hidden units, backward: the columns of its state
units); otherwise, and with an LSTM projection, they are re-read every step from L2, one chunk
at a time. State buffers written by other programs are read with
``cache_modifier=".cg"`` so a stale L1 line is never used.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import tracing
from ..base import Saved, tf32_allowed

# Triton decides between compiling and interpreting when a kernel is decorated, i.e. when this
# package is imported; the backend records that decision once.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
IN_INTERPRETER = tl.constexpr(INTERPRET)  # (for the kernels: no inline PTX there, see dot_acc)


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def tile_matmul(
    acc,  # [BLOCK_M, BLOCK_N] float32 accumulator
    a_ptr,  # A [M, K] float32 (state buffer), element (m, k) at m * stride_am + k * stride_ak
    stride_am,
    stride_ak,
    offs_m,  # [BLOCK_M] row indices of A
    mask_m,  # [BLOCK_M]
    w_ptr,  # W [K, N] weight dtype, element (k, n) at k * stride_wk + n * stride_wn
    stride_wk,
    stride_wn,
    offs_n,  # [BLOCK_N] column indices of W
    mask_n,  # [BLOCK_N]
    K,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee", "tf32" or "gemv" (dot_acc)
):
    """``acc + A[offs_m, :] @ W[:, offs_n]`` with A cast to the weight dtype (tensor cores for
    16-bit weights, exact float32 products with ``PRECISION="ieee"``), float32 accumulation."""
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
            cache_modifier=".cg",
        )
        w = tl.load(
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        acc = dot_acc(acc, a, w, PRECISION)
    return acc


@triton.jit
def dot_acc(
    acc,  # [M, N] float32
    a,  # [M, K] float32
    w,  # [K, N] weight dtype
    PRECISION: tl.constexpr,  # "ieee", "tf32" (float32 weights only) or "gemv" (see below)
):
    """``acc + a @ w`` with ``a`` rounded to the weight dtype, float32 accumulation. With
    ``PRECISION="gemv"`` (float32 weights, few rows: :data:`GEMV_PRODUCTS`) the exact float32
    products are broadcast over the ``[M, K, N]`` block and summed over k, without ``tl.dot``:
    any M (tl.dot needs 16 rows), and no operand staging through shared memory."""
    if PRECISION == "gemv":
        acc += tl.sum(a[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    elif IN_INTERPRETER:
        # Triton's interpreter mishandles tl.dot on bfloat16 operands (it multiplies the raw
        # bits), so there the operands, already rounded to the weight dtype, are multiplied in
        # float32: products of 16-bit floats are exact in float32, so the result is that of a
        # 16-bit dot with float32 accumulation, which is what the compiled kernel computes.
        a = a.to(w.dtype).to(tl.float32)
        acc = tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=PRECISION)
    return acc


# A program that has polled this many times without seeing its batch tile complete gives up
# (seconds): the kernel then finishes with wrong values instead of hanging the GPU, and marks
# its counter with SYNC_TIMEOUT_MARK, which check_grid_sync reports.
MAX_SPINS = tl.constexpr(1 << 22)
SYNC_TIMEOUT_MARK = 1 << 30
_SYNC_TIMEOUT_MARK = tl.constexpr(SYNC_TIMEOUT_MARK)


@triton.jit
def load_acquire(ptr):  # ptr: [] int32 in global memory
    """``*ptr`` loaded with acquire semantics at GPU scope: what the writer released before
    storing the value is visible afterwards. A plain load, so spinning on it leaves the L2
    atomic unit to the arrivals (an acquire atomic per poll queues behind them); the CUTLASS
    grid barrier and rnnkern's CUDA kernels spin the same way (``ld.acquire.gpu``, sm_70+)."""
    if IN_INTERPRETER:  # (emulation.emulate_gpu's programs)
        return tl.load(ptr, volatile=True)
    return tl.inline_asm_elementwise(
        "ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32, is_pure=False,
        pack=1,
    )  # fmt: skip


@triton.jit
def grid_arrive(
    sync_ptr,  # [] int32 counter of this batch tile, zero at launch
    SPLIT: tl.constexpr,
):
    """Count this program as arrived (its stores so far published to the other programs of
    the batch tile); :func:`grid_wait` then waits for the others. A program may store values
    no other program reads in between, so their latency overlaps the wait. Without ``SPLIT``
    a CTA barrier only."""
    tl.debug_barrier()
    if SPLIT:
        # A scalar atomic is issued once per program. Release publishes this program's stores
        # (ordered by the CTA barrier above).
        tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")


@triton.jit
def grid_wait(
    sync_ptr,  # [] int32 counter of this batch tile
    arrivals,  # counter value every program of the tile reached at the previous wait
    n_split,  # programs per batch tile
    SPLIT: tl.constexpr,
):
    """Wait until every program of this batch tile has arrived (:func:`grid_arrive`); returns
    the new arrival count. Every thread polls with acquire loads, which make the other
    programs' published stores visible to it. Without ``SPLIT`` nothing (the arrival's CTA
    barrier was the whole wait)."""
    if SPLIT:
        target = arrivals + n_split
        seen = load_acquire(sync_ptr)
        spins = 0
        while (seen < target) & (spins < MAX_SPINS):
            seen = load_acquire(sync_ptr)
            spins += 1
        if seen < target:
            # Timed out (programs not all resident): release everyone, never wait again.
            tl.atomic_add(sync_ptr, _SYNC_TIMEOUT_MARK, sem="release", scope="gpu")
        tl.debug_barrier()
        arrivals = target
    return arrivals


@triton.jit
def grid_sync(
    sync_ptr,  # [] int32 counter of this batch tile, zero at launch
    arrivals,  # counter value every program of the tile reached at the previous sync
    n_split,  # programs per batch tile
    SPLIT: tl.constexpr,
):
    """Wait until every program of this batch tile has reached this point (arrive, then
    wait); returns the new arrival count. Without ``SPLIT`` it is a CTA barrier only (the
    only form the interpreter runs outside :func:`.emulation.emulate_gpu`)."""
    grid_arrive(sync_ptr, SPLIT)
    return grid_wait(sync_ptr, arrivals, n_split, SPLIT)


@triton.jit
def step_sync(
    sync_ptr,  # [] int32 counter of this batch tile
    arrivals,  # counter value every program of the tile reached at the previous wait
    n_split,  # programs per batch tile
    SPLIT: tl.constexpr,
    ARRIVED: tl.constexpr,  # this program already called grid_arrive in this step
):
    """The end of a time step: :func:`grid_sync`, or only :func:`grid_wait` after an early
    :func:`grid_arrive` (the ONE_CHUNK kernels)."""
    if ARRIVED:
        arrivals = grid_wait(sync_ptr, arrivals, n_split, SPLIT)
    else:
        arrivals = grid_sync(sync_ptr, arrivals, n_split, SPLIT)
    return arrivals


# ----------------------------------------------------------------------------------------------
# phase tracing (rnnkern.backends.tracing.trace_phases)
# ----------------------------------------------------------------------------------------------

# Points a traced training kernel stamps in each of its first trace_steps steps (0 where a step
# does not pass one). Forward: 0 step begins (the previous step's wait passed), 5 the recurrent
# products done (ONE_CHUNK only, phase_stamp_after; the chunk loop has one per chunk), 1 m_s
# published (projection: the arrival at the projection's wait), 2 the projection's wait passed,
# 3 h_s published (the arrival at the step's wait: the cells and the stores the other programs
# read all issued), 4 the step's wait begins (the program's other stores issued; the chunk loop
# arrives and waits at once, so there 3 and 4 are the same place). Backward: 0 step begins (the
# previous step's dh product done), 1 dh + dy published (projection), 2 the projection's wait
# passed, 3 dgh published (arrival), 4 wait begins, 5 the wait passed (dh_{s-1} = dgh_s W_hh
# begins).
TRACE_POINTS = 6
_TRACE_POINTS = tl.constexpr(TRACE_POINTS)


@triton.jit
def read_timer(clock_ptr):  # clock_ptr: [] int64, the interpreter's logical clock
    """The GPU's ``%globaltimer`` (ns); under the interpreter, which cannot run inline PTX, a
    logical clock that counts the stamps (the order of the stamps is what it keeps)."""
    if IN_INTERPRETER:
        now = tl.atomic_add(clock_ptr, 1) + 1
    else:
        now = tl.inline_asm_elementwise(
            "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
        )
    return now


@triton.jit
def phase_stamp(
    trace_ptr,  # [programs, trace_steps, TRACE_POINTS] int64 stamps, then the logical clock
    s,  # processing step
    trace_steps,  # steps traced
    POINT: tl.constexpr,  # which point of TRACE_POINTS
    TRACE: tl.constexpr,  # False: nothing (not even the barrier)
):
    """Stamp the timer at ``POINT`` of step ``s`` for this program, once every thread of it
    has reached this place (a CTA barrier first; a scalar store is written by one thread).
    Stores and products issued before it have had their operands ready, not necessarily landed:
    a phase ends when its last instruction issued."""
    if TRACE:
        tl.debug_barrier()
        if s < trace_steps:
            programs = tl.num_programs(0) * tl.num_programs(1)
            now = read_timer(trace_ptr + programs * trace_steps * _TRACE_POINTS)
            _store_stamp(trace_ptr, s, trace_steps, POINT, now)


@triton.jit
def _store_stamp(trace_ptr, s, trace_steps, POINT: tl.constexpr, value):
    """``value`` as this program's stamp at ``POINT`` of step ``s < trace_steps``."""
    prog = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    row = (prog * trace_steps + s).to(tl.int64) * _TRACE_POINTS
    tl.store(trace_ptr + row + POINT, value)


@triton.jit
def phase_stamp_after(
    trace_ptr,  # as phase_stamp
    s,
    trace_steps,
    POINT: tl.constexpr,
    TRACE: tl.constexpr,
    a,  # [BLOCK_B, BLOCK_H] float32 tiles the stamp waits for (repeat one for fewer)
    b,
    c,
    d,
):
    """:func:`phase_stamp` at the time the tiles ``a`` .. ``d`` were computed: each thread
    reads the timer once its own elements of them are ready (they are the timer's asm's
    inputs), and the stamp is the latest over the program (a reduction). Where the values are
    kept in registers rather than stored, a plain stamp could come before the instructions that
    compute them had finished. (Under the interpreter a plain stamp.)"""
    if TRACE:
        if IN_INTERPRETER:
            phase_stamp(trace_ptr, s, trace_steps, POINT, TRACE)
        else:
            # The timer read follows (and in the PTX is predicated on) a comparison of the
            # inputs' sum, and a warp issues in order, so it cannot read the timer before they
            # are all in registers. (An asm input that no instruction uses orders nothing:
            # the SASS then read the timer right after issuing the HMMAs, before they were
            # done; with the sum, FADDs of their results and the FSETP come first.)
            ready = tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .f32 t;\n"
                "add.f32 t, $1, $2;\nadd.f32 t, t, $3;\nadd.f32 t, t, $4;\n"
                "setp.eq.f32 p, t, t;\n"
                "@p mov.u64 $0, %globaltimer;\n@!p mov.u64 $0, %globaltimer; }",
                "=l,r,r,r,r", [a, b, c, d], dtype=tl.int64, is_pure=False, pack=1,
            )  # fmt: skip
            latest = tl.max(tl.max(ready, axis=1), axis=0)
            if s < trace_steps:
                _store_stamp(trace_ptr, s, trace_steps, POINT, latest)


@triton.jit
def resident_gates(
    w_ptr,  # [G*H, P] W_hh (gate g's rows at g*H)
    chunk,  # the program's hidden chunk
    H,
    P,
    G: tl.constexpr,  # gates (1 .. 4)
    BLOCK_H: tl.constexpr,
    K_RES: tl.constexpr,  # 0: nothing resident (returns placeholders)
):
    """The ``[K_RES, BLOCK_H]`` slices ``W_gᵀ[:, chunk]`` of gates ``g < G`` (zero past ``P``
    and ``H``; the rest repeat gate 0), for kernels that keep them on chip across time steps
    instead of reading them from L2 at every step (Triton stages them in shared memory once,
    before the time loop, and each step's dot reads them from there)."""
    if K_RES > 0:
        offs_k = tl.arange(0, K_RES)
        offs_h = chunk * BLOCK_H + tl.arange(0, BLOCK_H)
        rows = w_ptr + offs_h[None, :] * P + offs_k[:, None]
        mask = (offs_k < P)[:, None] & (offs_h < H)[None, :]
        w0 = tl.load(rows, mask=mask, other=0.0)
        w1, w2, w3 = w0, w0, w0  # (names must exist before a compile-time branch sets them)
        if G > 1:
            w1 = tl.load(rows + H * P, mask=mask, other=0.0)
        if G > 2:
            w2 = tl.load(rows + 2 * H * P, mask=mask, other=0.0)
        if G > 3:
            w3 = tl.load(rows + 3 * H * P, mask=mask, other=0.0)
    else:
        w0 = tl.zeros((1, 1), dtype=w_ptr.dtype.element_ty)
        w1, w2, w3 = w0, w0, w0
    return w0, w1, w2, w3


@triton.jit
def resident_columns(
    w_ptr,  # [K, P] W_hh (row k of every gate's pre-activations, column p of the state)
    chunk,  # the program's state chunk
    K,
    P,
    BLOCK_H: tl.constexpr,
    K_RES: tl.constexpr,  # 0: nothing resident (returns a placeholder)
):
    """The ``[K_RES, BLOCK_H]`` slice ``W[:, chunk]`` (zero past ``K`` and ``P``), which the
    backward kernels multiply ``dgh_s [B, K]`` by for ``dh_{s-1}``, kept across steps."""
    if K_RES > 0:
        offs_k = tl.arange(0, K_RES)
        offs_p = chunk * BLOCK_H + tl.arange(0, BLOCK_H)
        w = tl.load(
            w_ptr + offs_k[:, None] * P + offs_p[None, :],
            mask=(offs_k < K)[:, None] & (offs_p < P)[None, :],
            other=0.0,
        )
    else:
        w = tl.zeros((1, 1), dtype=w_ptr.dtype.element_ty)
    return w


@triton.jit
def resident_product(
    acc0,  # [BLOCK_B, BLOCK_H] float32 accumulators of gates 0 .. G-1 (the rest pass through)
    acc1,
    acc2,
    acc3,
    a_ptr,  # A [B, K] float32 (state buffer), row stride K
    offs_b,  # [BLOCK_B]
    mask_b,  # [BLOCK_B]
    K,
    w0,  # [K_RES, BLOCK_H] resident slices (resident_gates, resident_columns)
    w1,
    w2,
    w3,
    G: tl.constexpr,
    K_RES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``acc_g + A[offs_b, :] @ w_g`` for gates ``g < G``: one ``[BLOCK_B, K_RES]`` load of A,
    then one dot per gate with its resident weights."""
    offs_r = tl.arange(0, K_RES)
    a = tl.load(
        a_ptr + offs_b[:, None] * K + offs_r[None, :],
        mask=mask_b[:, None] & (offs_r < K)[None, :],
        other=0.0,
        cache_modifier=".cg",  # written by other programs of this launch
    )
    acc0 = dot_acc(acc0, a, w0, PRECISION)
    if G > 1:
        acc1 = dot_acc(acc1, a, w1, PRECISION)
    if G > 2:
        acc2 = dot_acc(acc2, a, w2, PRECISION)
    if G > 3:
        acc3 = dot_acc(acc3, a, w3, PRECISION)
    return acc0, acc1, acc2, acc3


@triton.jit
def gate_products(
    acc0,  # [BLOCK_B, BLOCK_H] float32 accumulators of gates 0 .. G-1 (the rest pass through)
    acc1,
    acc2,
    acc3,
    a_ptr,  # A [B, K] float32 (state buffer), row stride K
    offs_b,  # [BLOCK_B]
    mask_b,  # [BLOCK_B]
    K,
    w_ptr,  # W [G*H, K] (W_hh; gate g's rows at g*H)
    offs_h,  # [BLOCK_H] hidden units of the tile
    mask_h,  # [BLOCK_H]
    H,
    w0,  # [K_RES, BLOCK_H] resident slices of W_gᵀ (resident_gates), unused without K_RES
    w1,
    w2,
    w3,
    G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    K_RES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``acc_g + A[offs_b] @ W[g*H + offs_h]ᵀ`` for gates ``g < G``: with resident slices one
    load of A and G dots; else one pass over K, each A tile loaded once for all gates and the
    W tiles read from L2."""
    if K_RES > 0:
        acc0, acc1, acc2, acc3 = resident_product(
            acc0, acc1, acc2, acc3, a_ptr, offs_b, mask_b, K, w0, w1, w2, w3, G, K_RES,
            PRECISION,
        )  # fmt: skip
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(
                a_ptr + offs_b[:, None] * K + offs_k[None, :],
                mask=mask_b[:, None] & mask_k[None, :],
                other=0.0,
                cache_modifier=".cg",
            )
            w_rows = w_ptr + offs_h[None, :] * K + offs_k[:, None]  # [BLOCK_K, BLOCK_H] of W_0ᵀ
            wm = mask_k[:, None] & mask_h[None, :]
            acc0 = dot_acc(acc0, a, tl.load(w_rows, mask=wm, other=0.0), PRECISION)
            if G > 1:
                acc1 = dot_acc(acc1, a, tl.load(w_rows + H * K, mask=wm, other=0.0), PRECISION)
            if G > 2:
                w = tl.load(w_rows + 2 * H * K, mask=wm, other=0.0)
                acc2 = dot_acc(acc2, a, w, PRECISION)
            if G > 3:
                w = tl.load(w_rows + 3 * H * K, mask=wm, other=0.0)
                acc3 = dot_acc(acc3, a, w, PRECISION)
    return acc0, acc1, acc2, acc3


@triton.jit
def column_product(
    a_ptr,  # A [B, K] float32 (dgh of a step), row stride K
    offs_b,  # [BLOCK_B]
    mask_b,  # [BLOCK_B]
    K,
    w_ptr,  # W [K, P] (W_hh)
    offs_p,  # [BLOCK_H] state units of the tile
    mask_p,  # [BLOCK_H]
    P,
    w_res,  # [K_RES, BLOCK_H] resident W[:, chunk] (resident_columns), unused without K_RES
    BLOCK_K: tl.constexpr,
    K_RES: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``A[offs_b] @ W[:, offs_p]``, ``[BLOCK_B, BLOCK_H]`` float32 (the backward's
    ``dh_{s-1} = dgh_s W_hh``), from the resident slice or streamed from L2."""
    acc = tl.zeros((offs_b.shape[0], offs_p.shape[0]), dtype=tl.float32)
    if K_RES > 0:
        acc = resident_product(
            acc, acc, acc, acc, a_ptr, offs_b, mask_b, K, w_res, w_res, w_res, w_res, 1, K_RES,
            PRECISION,
        )[0]  # fmt: skip
    else:
        acc = tile_matmul(
            acc, a_ptr, K, 1, offs_b, mask_b, w_ptr, P, 1, offs_p, mask_p, K, BLOCK_K, PRECISION
        )
    return acc


@triton.jit
def gate_tiles(
    rows,  # [BLOCK_B, 1] pointers to row starts of a [.., G*H] gate-major tensor (gx)
    offs_h,  # [BLOCK_H] hidden units of the tile
    mask,  # [BLOCK_B, BLOCK_H]
    H,
    G: tl.constexpr,  # gates (1 .. 4)
):
    """The ``[BLOCK_B, BLOCK_H]`` tiles of gates ``g < G`` in the tensor's own dtype (the rest
    repeat gate 0), loaded and not converted: a caller prefetching them leaves the wait for
    the data to the point of use."""
    p = rows + offs_h[None, :]
    v0 = tl.load(p, mask=mask, other=0.0)
    v1, v2, v3 = v0, v0, v0
    if G > 1:
        v1 = tl.load(p + H, mask=mask, other=0.0)
    if G > 2:
        v2 = tl.load(p + 2 * H, mask=mask, other=0.0)
    if G > 3:
        v3 = tl.load(p + 3 * H, mask=mask, other=0.0)
    return v0, v1, v2, v3


@triton.jit
def gate_biases(
    b_ptr,  # [G*H] recurrent bias
    offs_h,  # [BLOCK_H]
    mask_h,  # [BLOCK_H]
    H,
    G: tl.constexpr,
):
    """The float32 ``[1, BLOCK_H]`` rows of bias of gates ``g < G`` (the rest repeat gate 0)."""
    b0 = tl.load(b_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    b1, b2, b3 = b0, b0, b0
    if G > 1:
        b1 = tl.load(b_ptr + H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    if G > 2:
        b2 = tl.load(b_ptr + 2 * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    if G > 3:
        b3 = tl.load(b_ptr + 3 * H + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    return b0, b1, b2, b3


@triton.jit
def step_time(
    s,  # processing step
    lens,  # [BLOCK_B] int64 valid lengths of the tile's rows
    reverse,  # int: 1 to process each row from lens - 1 down to 0
):
    """Time index ``t [BLOCK_B]`` (int64) of processing step ``s`` per row, and ``valid``
    (``s < lens``). Past a row's length ``t == s``, as in the reference's gather map."""
    valid = s < lens
    t = tl.where(valid & (reverse != 0), lens - 1 - s, s + 0 * lens)
    return t.to(tl.int64), valid


@triton.jit
def step_rows(
    ptr,  # time-major [T, B, row_len] tensor (gx, y, dy, ...)
    s,  # processing step
    lens,  # [BLOCK_B] int64 valid lengths of the tile's rows
    reverse,  # int: 1 to process each row from lens - 1 down to 0
    offs_b,  # [BLOCK_B]
    B,
    row_len,
):
    """``[BLOCK_B, 1]`` pointers to the rows of processing step ``s`` (their time index per
    row, :func:`step_time`)."""
    t = step_time(s, lens, reverse)[0]
    return ptr + (t[:, None] * B + offs_b[:, None]) * row_len


@triton.jit
def own_chunk(
    pid_h,  # the program's hidden chunk
    mask_b,  # [BLOCK_B]
    H,
    BLOCK_H: tl.constexpr,
):
    """A ONE_CHUNK program's hidden units ``offs_c [BLOCK_H]``, their mask and the tile's
    ``[BLOCK_B, BLOCK_H]`` mask."""
    offs_c = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_c = offs_c < H
    return offs_c, mask_c, mask_b[:, None] & mask_c[None, :]


@triton.jit
def mask_in_steps(
    mask,  # [BLOCK_B, BLOCK_H]
    offs_h,  # [BLOCK_H]
    s,  # processing step
    T,
):
    """``mask`` where processing step ``s`` exists (``0 <= s < T``), else all off: a prefetch
    past the first or last step loads nothing."""
    inside = (offs_h * 0 + s >= 0) & (offs_h * 0 + s < T)
    return mask & inside[None, :]


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """One compiled variant of a kernel: tile sizes, warps, grid strategy, the resident
    weights' k extent (0: the weights stream from L2 every step), whether every program owns
    exactly one hidden chunk (``one_chunk``: the forward kernels then carry the chunk's state
    in registers and prefetch the next step's inputs; see :data:`ONE_CHUNK_KERNELS`) and how
    the products run (``precision``, the kernels' ``PRECISION``: ``"ieee"`` or ``"tf32"``
    through ``tl.dot``, ``"gemv"`` broadcast and summed; see :data:`GEMV_PRODUCTS`)."""

    block_b: int
    block_h: int
    block_k: int
    num_warps: int
    split: bool
    k_res: int = 0
    one_chunk: bool = False
    precision: str = "ieee"


# The fixed configuration table the dispatcher chooses from (no autotuning: a compile_check run
# covers every entry). Small batches use 16-row tiles (tl.dot's minimum), larger ones 32 rows.
# BLOCK_K = 32 and 8 warps: with BLOCK_K = 64 or 4 warps ptxas reports 255 registers and spills
# for most kernels (compile_check); this table compiles without spills.
BLOCK_B_CHOICES = (16, 32)
BLOCK_H = 32
BLOCK_K = 32
NUM_WARPS = 8

# Exact float32 products for few rows (GEMV mode, PRECISION="gemv"). tl.dot without tensor
# cores (IEEE float32) runs on the FMA units with both operands staged through shared memory
# in its dot-operand layouts: a 16 x 32 tile over 8 warps gives each thread 2 outputs, each
# needing its row of A and column of W from shared memory, and at B = 1 15 of the 16 rows are
# padding. The H100 grid at 797d39b (benchmarks/results/gpu_train-nvidia-h100-80gb-hbm3.md)
# measured the float32 kernels 6-10x slower than the same kernels in bfloat16 and 0.07-0.37x
# cuDNN. In GEMV mode a tile's products are broadcast over [rows, k, units] and summed over k
# (common.dot_acc): 1 row per batch tile at B = 1 (the latency case), else 4 (no padding to
# 16), and resident weights stay in registers, where no step reads them again. The PTX of the
# LSTM forward's time loop (sm_90, resident K_RES = 64, one chunk, persistent) has per thread
# and step 538 FMAs and 209 shared-memory loads (418 words) through tl.dot; in GEMV mode 44
# multiplies and FMAs and 40 shared loads at 1 row, 140 and 48 at 4 rows (the loads are the
# cross-warp sums and layout conversions). The weights of a
# layer spread over more programs instead: 8-unit chunks instead of 32 where a program's slices
# then fit in GEMV_RESIDENT_FLOATS (132 SMs: an LSTM forward up to H = 512 at B <= 8, its
# backward at B = 1: GEMV_PRODUCT_FLOATS), as far as one program per
# SM allows (choose_config). Two row counts and two chunk sizes keep the variants that
# compile_check compiles to a few hundred per kernel. Up to GEMV_MAX_BATCH rows, and up to
# GEMV_RESIDENT_BATCH where every program keeps its slices resident (4-row tiles: a program's
# work a step is the same as at B = 4, in more programs; B = 64 at H = 128: 16 tiles x 4
# chunks); otherwise larger batches keep tl.dot's 16/32-row tiles (their products reuse each
# weight over the tile's rows, where GEMV mode would stream the weights from L2 for every 4
# rows). Not yet timed on a GPU: the gpu_train benchmark times both (rnnkern[triton] and
# "float32 products by tl.dot").
GEMV_PRODUCTS = True  # False: IEEE float32 products always through tl.dot
GEMV_MAX_BATCH = 16
GEMV_RESIDENT_BATCH = 64
GEMV_BLOCK_B = 4  # rows per batch tile for B > 1 (the [rows, k, units] block's registers)
GEMV_BLOCK_H = (32, 8)  # chunk sizes, largest (fewest programs to wait for) first
# Floats of resident W_hh one program keeps, slices * K_RES * block_h: 16384 over 8 warps are
# 64 registers a thread (an LSTM forward's four 128 x 32 slices). And the floats of one resident
# product block, rows * K_RES * block_h: with Triton 3.6 (sm_90) the single-slice backward (and
# RNN forward) at 4 rows x 2048 x 8 = 65536 spilled 2-2.1 KB at 32 registers (Triton 3.9: no
# spill); at 32768 and below neither spills.
GEMV_RESIDENT_FLOATS = 16384
GEMV_PRODUCT_FLOATS = 32768

# Resident weights (16-row batch tiles, every program owning one chunk, no LSTM projection): the
# program's slices of W_hh, [K_RES, BLOCK_H] each with K_RES the reduction length rounded up to a
# power of two, are loaded once per launch; Triton keeps them in shared memory and registers.
# Forward: one slice per gate over the state (K = P). Backward: one slice of W_hh's columns over
# all gates' rows (K = G*H), for dh_{s-1} = dgh_s W_hh. What fits, from compile_check on sm_90
# (8 warps):
#   IEEE float32 dots (FMA units, operands in registers): G * K_RES <= 256. LSTM forward
#     K_RES = 64: 173 registers, no spill; 128: 176 bytes of spill; GRU 128: 264 bytes.
#   tensor-core dots (bfloat16, float16, TF32): G * K_RES <= 1024. LSTM forward bf16
#     K_RES = 256: 255 registers, 8 bytes of spill, 100 KB of shared memory; tf32: 166 KB.
#   K_RES <= 256, except 512 in 16-bit for the LSTM and RNN backward, which compile at 512
#     without spills (sm_80 and sm_90; 100 KB of shared memory): at 512 the GRU backward
#     spilled 104-164 bytes and the RNN forward 8-352, TF32 kilobytes; at 1024 shared
#     memory overflowed (198-264 KB). And 64 for those two in IEEE float32: with aligned
#     sizes they spilled 128-184 bytes at 128 and 2.5 KB at 256.
#   GEMV mode: in registers, GEMV_RESIDENT_FLOATS per program, any K_RES, any architecture.
# Shared memory reaches 166 KB, which only sm_80 and sm_90 offer (RESIDENT_ARCHS); compile_check
# compares every configuration with the architecture's limit.
RESIDENT = True  # False: weights always stream from L2 (benchmarks compare the two)
RESIDENT_GATE_K = {"ieee": 256, "tensor": 1024}  # max slices * K_RES
RESIDENT_MAX_K = 256  # max K_RES ...
RESIDENT_MAX_K_16BIT = {"lstm_backward": 512, "rnn_backward": 512}  # ... but these, in 16-bit
RESIDENT_MAX_K_IEEE = {"gru_backward": 64, "rnn_forward": 64}  # ... and these, IEEE float32
RESIDENT_ARCHS = ((8, 0), (9, 0))
# 16-bit dots whose slices do not fit 32-unit chunks (bfloat16 LSTMs from H = 257 forward and
# 129 backward, GRUs from 257 and 86) keep them in 16-unit chunks instead, on sm_90 only
# (shared memory up to 192 KB), where the batch tile's chunks fit one program per SM, with the
# ONE_CHUNK kernels only (the chunk loop's backward at K_RES = 2048 needs 321 KB, its GRU
# backward spills 148-604 bytes from 512). compile_check, sm_90, 16-row tiles, one chunk,
# persistent, bf16 and fp16: the backward's columns compile without spill up to K_RES = 2048
# (LSTM and RNN: 80-222 registers, 96-192 KB; GRU: 114-223); at 4096 shared memory overflows
# (384 KB). The GRU forward up to 1024 (150-195 registers, 160 KB; 2048: 320 KB). The LSTM
# forward at 512 spills 28-100 bytes (255 registers; Triton 3.6: 48-140; 1024: 1.4-1.6 KB; the
# bf16 configurations of 32-unit chunks up to 60); the RNN forward gains
# nothing (512 spilled 112-136 bytes; 32-unit chunks hold 256).
NARROW_BLOCK_H = 16
NARROW_ARCHS = ((9, 0),)
RESIDENT_MAX_K_NARROW = {"lstm_forward": 512, "gru_forward": 1024, "rnn_forward": 256,
                         "lstm_backward": 2048, "gru_backward": 2048,
                         "rnn_backward": 2048}  # fmt: skip
# slices of W_hh a program keeps, per kernel: forward, one per gate ([K_RES, BLOCK_H] of W_gᵀ,
# K = state size); backward, one of W_hh's columns (K = G*H)
RESIDENT_SLICES = {"lstm_forward": 4, "gru_forward": 3, "rnn_forward": 1,
                   "lstm_backward": 1, "gru_backward": 1, "rnn_backward": 1}  # fmt: skip

# Kernels with a ONE_CHUNK variant, for programs that own exactly one hidden chunk (every
# persistent launch with B <= 16 up to H = 32 * SMs, and H <= BLOCK_H): the chunk's own values
# (forward: c, and h where a step may keep it; backward: the running dh and dc) stay in
# registers across steps instead of being re-read from global memory, the biases are loaded
# once, and the next step's inputs (forward: gx; backward: dy and the saved gates and states)
# are loaded at the top of a step. Those loads depend on nothing the step computes, but the
# chunk loop issues them after the grid-wide wait (SASS, LSTM forward bf16 sm_90, resident:
# the gx loads after the wait for the state copy, the c and h loads between the HMMAs; the
# backward's saved tiles after the previous step's dh product), so their L2 latency lay on
# every step's critical path. With ONE_CHUNK the only global loads after a wait are the ones
# that need it (the state copy; the backward's dgh of all units), and the backward drops its
# CTA barrier per step (dh and dc no longer pass through global memory between threads).
# And a program arrives at the grid-wide wait (grid_arrive) as soon as what the others read is
# stored (h_s; the backward's dgh), then stores the rest (c, the gates, y; dgx) while they
# arrive, and only then waits (grid_wait): the release fence no longer waits for those six
# stores and their layout conversions (SASS, LSTM forward bf16 sm_90: 11 CTA barriers now lie
# between the arrival and the first poll).
# With an LSTM projection (state and hidden chunks differ) the backward keeps the loop and the
# forward the plain grid_sync.
ONE_CHUNK_KERNELS = ("lstm_forward", "gru_forward", "rnn_forward",
                     "lstm_backward", "gru_backward", "rnn_backward")  # fmt: skip
ONE_CHUNK = True  # False: always the chunk loop (benchmarks and tests compare the two)
# Only with 16-row batch tiles (B <= 16, the latency-bound shapes): the carried tiles are live
# across the whole step, and the 32-row configurations, at 174-255 registers already, spilled
# 24-76 bytes more with them (compile_check sm_90, bf16/fp32, LSTM forward).
ONE_CHUNK_BLOCK_B = 16


def resident_k(
    kernel: str, K: int, dtype: torch.dtype, precision: str, block_h: int = BLOCK_H,
    block_b: int = GEMV_BLOCK_B,
) -> int:  # fmt: skip
    """``K_RES`` for ``kernel``'s (a key of :data:`RESIDENT_SLICES`) resident slices over a
    ``K``-long reduction with ``precision``'s products, ``block_h``-unit chunks and (GEMV mode)
    ``block_b``-row tiles, or 0 where they do not fit (see the tables above)."""
    k_res = max(16, triton.next_power_of_2(K))  # tl.dot's smallest k
    slices = RESIDENT_SLICES[kernel]
    if precision == "gemv":
        fits = slices * k_res * block_h <= GEMV_RESIDENT_FLOATS
        return k_res if fits and block_b * k_res * block_h <= GEMV_PRODUCT_FLOATS else 0
    if block_h == NARROW_BLOCK_H:
        narrow = dtype in (torch.float16, torch.bfloat16) and precision == "ieee"
        return k_res if narrow and k_res <= RESIDENT_MAX_K_NARROW[kernel] else 0
    ieee = dtype == torch.float32 and precision == "ieee"
    fits = slices * k_res <= RESIDENT_GATE_K["ieee" if ieee else "tensor"]
    max_k = RESIDENT_MAX_K
    if dtype in (torch.float16, torch.bfloat16):
        max_k = RESIDENT_MAX_K_16BIT.get(kernel, RESIDENT_MAX_K)
    elif ieee:
        max_k = RESIDENT_MAX_K_IEEE.get(kernel, RESIDENT_MAX_K)
    return k_res if fits and k_res <= max_k else 0


def products(dtype: torch.dtype, batch: int) -> str:
    """How a layer call's products run (the kernels' ``PRECISION``): ``"tf32"`` where
    :func:`rnnkern.backends.base.tf32_allowed`; exact float32 in GEMV mode (``"gemv"``) up to
    :data:`GEMV_MAX_BATCH` rows, else ``"ieee"`` (``tl.dot``; 16-bit inputs: tensor cores)."""
    precision = dot_precision(dtype)
    if precision == "ieee" and dtype == torch.float32 and GEMV_PRODUCTS:
        if batch <= GEMV_MAX_BATCH:
            return "gemv"
    return precision


# A GPU the interpreter stands in for, (multiprocessors, compute capability), while
# emulation.emulate_gpu runs every launch's programs concurrently; None otherwise.
EMULATED_GPU: tuple[int, tuple[int, int]] | None = None


def persistent_geometry(device: torch.device) -> tuple[int, tuple[int, int]] | None:
    """``(multiprocessors, compute capability)`` of ``device`` where its launches may be
    persistent (programs waiting for each other: a compiled CUDA launch, or the interpreter
    under :func:`.emulation.emulate_gpu`), else None (the interpreter runs programs one after
    another)."""
    if INTERPRET:
        return EMULATED_GPU
    if device.type != "cuda":
        return None
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return sms, tuple(torch.cuda.get_device_capability(device))


def choose_config(
    batch: int,
    hidden: int,
    device: torch.device,
    resident: tuple[str, int, torch.dtype, str] | None = None,
    precision: str = "ieee",
) -> tuple[LaunchConfig, int]:
    """The launch configuration and ``n_split`` (programs per batch tile) for a layer call
    with ``precision``'s products (:func:`products`). ``resident``: ``(kernel, K, dtype,
    precision)`` of a kernel that can keep its weights (see :func:`resident_k`), else None."""
    gemv = precision == "gemv"
    if gemv:
        block_b = 1 if batch == 1 else GEMV_BLOCK_B
    else:
        block_b = 16 if batch <= 16 else 32
    n_btiles = triton.cdiv(batch, block_b)
    gpu = persistent_geometry(device)
    persistent = gpu is not None
    sms, capability = gpu if persistent else (0, None)
    # The chunk sizes to choose from, largest (fewest programs to wait for) first: GEMV mode's;
    # on NARROW_ARCHS the tensor-core dots of the ONE_CHUNK kernels may also take 16 units.
    chunks = GEMV_BLOCK_H if gemv else (BLOCK_H,)
    if not gemv and persistent and ONE_CHUNK and block_b == 16 and resident is not None:
        if capability in NARROW_ARCHS:
            chunks = (BLOCK_H, NARROW_BLOCK_H)
    block_h = chunks[0]
    if persistent and len(chunks) > 1:
        # Every program must be resident at once for the grid-wide wait, one per SM: among the
        # chunks that allows, the largest whose slices stay resident; else (weights streamed)
        # GEMV mode takes the smallest, the most programs pulling them from L2.
        fit = [bh for bh in chunks if n_btiles * triton.cdiv(hidden, bh) <= sms]
        if gemv and fit:
            block_h = fit[-1]
        if resident is not None and RESIDENT:
            block_h = next((bh for bh in fit if resident_k(*resident, bh, block_b)), block_h)
    n_chunks = triton.cdiv(hidden, block_h)
    n_split = 1
    if persistent and n_chunks > 1:
        n_split = min(n_chunks, sms // n_btiles)
        if n_split < 2:
            n_split = 1
    k_res = 0
    # One chunk per program (the slices are loaded for chunk pid_h only); under the
    # interpreter that means a single chunk.
    if resident is not None and RESIDENT and block_b <= 16 and n_split == n_chunks:
        # (in GEMV mode the slices stay in registers: any architecture)
        arch_ok = gemv or not persistent or capability in RESIDENT_ARCHS
        if arch_ok:
            k_res = resident_k(*resident, block_h, block_b)
    one_chunk = ONE_CHUNK and n_split == n_chunks and block_b <= ONE_CHUNK_BLOCK_B
    config = LaunchConfig(
        block_b, block_h, BLOCK_K, NUM_WARPS, n_split > 1, k_res, one_chunk, precision
    )
    return config, n_split


def launch_config(
    kernel: str, batch: int, hidden: int, state: int, dtype: torch.dtype, device: torch.device,
    proj: bool = False,
) -> tuple[LaunchConfig, int]:  # fmt: skip
    """What a layer's launcher runs ``kernel`` (a key of :data:`RESIDENT_SLICES`) with: the
    configuration and ``n_split`` for ``batch`` rows, ``hidden`` units and ``state`` units
    (proj_size, or ``hidden``), with the products of :func:`products` (and GEMV mode up to
    :data:`GEMV_RESIDENT_BATCH` rows where it keeps the weights resident) and the resident
    weights of that kernel where they fit (the forward's over the state, the backward's over
    every gate's rows; none with a projection), and no ONE_CHUNK for the backward of an LSTM with a
    projection (its state and hidden chunks differ)."""
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[kernel.split("_")[0]]
    k = state if kernel.endswith("_forward") else gates * hidden
    precision = products(dtype, batch)
    resident = None if proj else (kernel, k, dtype, precision)
    wide = precision == "ieee" and dtype == torch.float32 and GEMV_PRODUCTS
    if wide and resident is not None and batch <= GEMV_RESIDENT_BATCH:
        gemv = choose_config(batch, hidden, device, (kernel, k, dtype, "gemv"), "gemv")
        if gemv[0].k_res:
            return gemv
    config, n_split = choose_config(batch, max(hidden, state), device, resident, precision)
    if proj and kernel == "lstm_backward":
        config = dataclasses.replace(config, one_chunk=False)
    return config, n_split


def plan_text(config: LaunchConfig, n_split: int, batch: int, dtype: torch.dtype) -> str:
    """A launch in words (``rnnkern.explain``, the phases benchmark): programs, batch tiles
    and hidden splits, chunks, where the weights live and what the products run on."""
    tiles = triton.cdiv(batch, config.block_b)
    if config.k_res:
        where = "registers" if config.precision == "gemv" else "shared memory"
        where = f"resident in {where} ({config.k_res}-row slices)"
    else:
        where = "read from L2"
    if config.precision == "gemv":
        products = "float32 FMAs (GEMV: broadcast, summed over k)"
    elif dtype == torch.float32:
        products = "TF32 tensor cores" if config.precision == "tf32" else "float32 FMAs (tl.dot)"
    else:
        products = f"{str(dtype).removeprefix('torch.')} tensor cores"

    def count(n: int, what: str) -> str:
        return f"{n} {what}" + ("s" if n != 1 else "")

    return (
        f"{count(tiles * n_split, 'program')} ({count(tiles, 'batch tile')} of "
        f"{count(config.block_b, 'row')} x {count(n_split, 'hidden split')}), "
        f"{config.block_h} units a chunk, "
        + ("one chunk a program" if config.one_chunk else "chunk loop")
        + f", weights {where}, products on {products}"
    )


def all_configs(dkey: str | None = None, kernel: str | None = None) -> list[LaunchConfig]:
    """Every configuration :func:`choose_config` can return for ``kernel`` (a key of
    :data:`RESIDENT_SLICES`; None: any); with the dtype key of compile_check (fp32, tf32, bf16,
    fp16) and a kernel, the resident ones too, and for fp32 the GEMV ones (:data:`GEMV_PRODUCTS`:
    1 or 4 rows x every chunk size). ``one_chunk`` varies only for
    :data:`ONE_CHUNK_KERNELS` (the other kernels have no such variant)."""
    has_one = kernel is None or kernel in ONE_CHUNK_KERNELS
    precision = "tf32" if dkey == "tf32" else "ieee"
    out = [
        LaunchConfig(bb, BLOCK_H, BLOCK_K, NUM_WARPS, split, one_chunk=one, precision=precision)
        for bb in BLOCK_B_CHOICES
        for split in (False, True)
        for one in ((False, True) if has_one and bb <= ONE_CHUNK_BLOCK_B else (False,))
    ]
    if dkey is not None and kernel is not None:
        dtype = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
                 "fp16": torch.float16}[dkey]  # fmt: skip
        for k in (16, 32, 64, 128, 256, 512):
            if resident_k(kernel, k, dtype, precision) == k:
                out += [
                    LaunchConfig(16, BLOCK_H, BLOCK_K, NUM_WARPS, split, k, one, precision)
                    for split in (False, True)
                    for one in ((False, True) if has_one else (False,))
                ]
        # 16-unit chunks where 32-unit ones hold no slices (persistent, so split, and one chunk
        # a program; sm_90 only: compiles_for)
        for k in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
            narrow = resident_k(kernel, k, dtype, precision, NARROW_BLOCK_H) == k
            if narrow and has_one and not resident_k(kernel, k, dtype, precision):
                out.append(
                    LaunchConfig(16, NARROW_BLOCK_H, BLOCK_K, NUM_WARPS, True, k, True, precision)
                )
        if dkey == "fp32":
            out += _gemv_configs(kernel, has_one)
    return out


def compiles_for(arch: int, block_h: int, precision: str) -> bool:
    """Whether the dispatcher can launch a configuration on ``sm_<arch>`` (compile_check
    compiles it only there): 16-unit chunks on tensor cores only on :data:`NARROW_ARCHS`."""
    narrow = block_h == NARROW_BLOCK_H and precision != "gemv"
    return not narrow or (arch // 10, arch % 10) in NARROW_ARCHS


def _gemv_configs(kernel: str, has_one: bool) -> list[LaunchConfig]:
    """Every GEMV-mode configuration of ``kernel``: rows x chunk size x grid mode x ONE_CHUNK,
    streamed, and resident at every K_RES whose slices fit that chunk size."""
    out = []
    for bb in (1, GEMV_BLOCK_B):
        for bh in GEMV_BLOCK_H:
            k_choices = [0] + [
                k for k in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
                if resident_k(kernel, k, torch.float32, "gemv", bh, bb) == k
            ]  # fmt: skip
            out += [
                LaunchConfig(bb, bh, BLOCK_K, NUM_WARPS, split, k, one, "gemv")
                for k in k_choices
                for split in (False, True)
                for one in ((False, True) if has_one else (False,))
            ]
    return out


def dot_precision(dtype: torch.dtype) -> str:
    """``"tf32"`` where :func:`rnnkern.backends.base.tf32_allowed`; exact ``"ieee"`` otherwise."""
    return "tf32" if tf32_allowed(dtype) else "ieee"


def empty_saved(like: torch.Tensor) -> Saved:
    """``Saved`` of three distinct empty float32 tensors (``save=False``; outputs of a
    torch.library op must not alias each other)."""
    return Saved(like.new_empty(0), like.new_empty(0), like.new_empty(0))


def lengths_or_full(lengths: torch.Tensor | None, T: int, B: int, device) -> torch.Tensor:
    """``lengths [B]`` int64 contiguous, or ``T`` for every row when None."""
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int64, device=device)
    return lengths.to(device=device, dtype=torch.int64).contiguous()


def bias_or_zeros(b: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """The recurrent bias ``[n]``, or zeros in the weight dtype when there is none."""
    if b is None:
        return torch.zeros(n, dtype=like.dtype, device=like.device)
    return b.contiguous()


def sync_buffer(n_btiles: int, device) -> torch.Tensor:
    """Zeroed ``[n_btiles]`` int32 arrival counters for :func:`grid_sync`."""
    return torch.zeros(n_btiles, dtype=torch.int32, device=device)


# When True, every launch in persistent mode is followed by a check (a device sync) that no
# grid-wide wait timed out; the tests turn it on.
CHECK_GRID_SYNC = False


def check_grid_sync(sync: torch.Tensor, config: LaunchConfig) -> None:
    """Raise if a grid-wide wait of the launch that used ``sync`` timed out (only when
    :data:`CHECK_GRID_SYNC`; the check synchronises with the device)."""
    if CHECK_GRID_SYNC and config.split and int(sync.max()) >= SYNC_TIMEOUT_MARK:
        raise RuntimeError(
            "rnnkern triton: a grid-wide wait timed out (not every program of the persistent "
            "launch was resident); the results of this call are wrong"
        )


def launch_grid(config: LaunchConfig, batch: int, n_split: int) -> tuple[int, int]:
    return (triton.cdiv(batch, config.block_b), n_split)


def trace_buffer(grid: tuple[int, int], placeholder: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Under :func:`rnnkern.backends.tracing.trace_phases`, a launch's zeroed stamp buffer
    (``[programs, steps, TRACE_POINTS]`` flat, then the interpreter's clock) and the steps it
    traces; otherwise ``placeholder`` (any int64 tensor of the launch: never written) and 0."""
    steps = tracing.traced_steps()
    if not steps:
        return placeholder, 0
    size = grid[0] * grid[1] * steps * TRACE_POINTS + 1
    return torch.zeros(size, dtype=torch.int64, device=placeholder.device), steps


def record_trace(
    kernel: str, config: LaunchConfig, grid: tuple[int, int], buffer: torch.Tensor, steps: int,
    batch: int, dtype: torch.dtype,
) -> None:  # fmt: skip
    """Append a traced launch's stamps (:func:`trace_buffer`) to the running trace list, with
    its layout; nothing when ``steps`` is 0."""
    if steps:
        stamps = buffer[:-1].view(grid[0] * grid[1], steps, TRACE_POINTS)
        info = dict(dataclasses.asdict(config), programs=grid[0] * grid[1], batch_tiles=grid[0],
                    n_split=grid[1], plan=plan_text(config, grid[1], batch, dtype))  # fmt: skip
        tracing.record("triton", kernel, info, stamps)


def weight_grads(
    dgh: torch.Tensor,  # [T, B, G*H] float32, zero past each length
    hs: torch.Tensor,  # [T+1, B, P] float32 saved states
    w_hh: torch.Tensor,  # [G*H, P]
    b_hh: torch.Tensor | None,  # [G*H]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dW_hh [G*H, P]`` as one GEMM over T*B and ``db_hh [G*H]`` as a float32 reduction."""
    T, B, GH = dgh.shape
    P = hs.shape[2]
    dw = gemm_tn(dgh.reshape(T * B, GH), hs[:T].reshape(T * B, P), w_hh.dtype)
    db = None if b_hh is None else dgh.sum(dim=(0, 1)).to(b_hh.dtype)
    return dw, db


def gemm_tn(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``aᵀ @ b`` for ``a [N, M]``, ``b [N, K]`` (float32) as an ``[M, K]`` tensor of
    ``out_dtype``. For 16-bit weights the operands are rounded to that dtype first (float32
    accumulation, as cuDNN computes weight gradients); float32 stays float32."""
    if out_dtype in (torch.float16, torch.bfloat16):
        return a.to(out_dtype).t() @ b.to(out_dtype)
    return (a.t() @ b).to(out_dtype)
