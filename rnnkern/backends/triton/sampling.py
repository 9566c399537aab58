"""The sampling rule of :mod:`rnnkern.sampling` as one Triton launch, for the Triton Decoder.

Why a kernel: the rule written in torch ops (``sampling.sample_tensor``) is 72 kernel launches
per token without top-k / top-p and 84 with them (counted with a TorchDispatchMode at B=1,
V=137), and each launch of a CUDA graph still costs the GPU a microsecond or more, against a
decode-step target of 10 us per token. Here one program per stream row does all of it.

Legend: ``B`` streams, ``V`` vocabulary, ``C`` capacity of the token record (columns).

The rule (module docstring of :mod:`rnnkern.sampling`), per row:

1. ``z = float64(logits) / temperature``, ``e = exp(z - max z)``; a row holding NaN or +inf, or
   only -inf, is *bad*: it is flagged and drawn from all-zero logits, as ``sample_tensor`` does.
2. Rank by ``e`` descending, ties by lower id: ``before(j, i) = e_j > e_i or (e_j == e_i and
   j < i)``; ``rank_i`` counts the ``j`` before ``i``, ``prior_i`` sums their ``e``.
3. top-k keeps ``rank_i < top_k``.
4. top-p keeps ``prior_i < top_p * (sum of e over the top-k kept)``: the ranked prefix up to
   and including the first token whose running sum reaches the threshold (every token ranked
   before a kept one is kept, so ``prior_i`` is that running sum before ``i``).
5. Inverse CDF in ascending id over the kept weights with the row's uniform ``u``.

Sums here are parallel reductions and a scan, not the sequential float64 sums of the reference,
so a token can differ from :func:`rnnkern.sampling.sample` only where ``u`` or a top-p
threshold falls within rounding of a boundary ("up to float rounding of ties"); under
``TRITON_INTERPRET=1`` the tests compare them token for token.

The uniforms come from a table filled once per ``generate`` call
(:func:`rnnkern.sampling.uniforms_table`), so the kernel needs no 64-bit integer hashing and a
captured CUDA graph reads the draw for each token from the column counter ``col``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Vocabularies up to this many entries are sampled by the kernel (one row per program, the
# ranking a [BLOCK_V, BLOCK_J] comparison per chunk); larger ones use the rule in torch ops.
# 1024 covers folk-rnn's 137 tokens and the 388 / 413 MIDI performance events.
MAX_VOCAB = 1024
# Elements of one ranking chunk: with [256, 32] float64 chunks ptxas reported 232-255 registers
# and 1024-wide rows spilled kilobytes (compile_check, sm_80 / sm_90).
CHUNK_ELEMS = 2048


def block_j(block_v: int) -> int:
    """Columns of a ranking chunk for rows of ``block_v`` lanes."""
    return max(1, min(block_v, CHUNK_ELEMS // block_v))


@triton.jit
def _scaled(x, valid, bad, temperature):
    """Step 1's ``z = float64(x) / temperature`` (-inf outside the row; 0 on a bad row)."""
    z = tl.where(bad, 0.0, x.to(tl.float64) / temperature)
    return tl.where(valid, z, float("-inf"))


@triton.jit
def _weights(z, valid, m):
    """Step 1's ``e = exp(z - m)`` (0 outside the row)."""
    return tl.where(valid, tl.exp(z - m), 0.0)


@triton.jit
def sample_rows_kernel(
    logits_ptr,  # [B, V] float32 (row stride V)
    u_ptr,  # [C, B] float64 uniforms: row col holds this token's draws
    col_ptr,  # [] int64: the column of this token
    tokens_ptr,  # [B, C] int64: token record (column col is written)
    last_ptr,  # [B] int64: this token again, contiguous (the next step's input)
    bad_ptr,  # [B] int8: set to 1 for a bad row (never cleared here)
    params_ptr,  # [2] float64: temperature > 0, top_p (used when USE_P)
    B,
    V,
    C,
    top_k,  # int, used when USE_K
    USE_K: tl.constexpr,
    USE_P: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0)
    col = tl.load(col_ptr)
    # From memory, not as scalar arguments: Triton passes a Python float as float32, and the
    # rule divides by the float64 temperature.
    temperature = tl.load(params_ptr)
    top_p = tl.load(params_ptr + 1)
    row = logits_ptr + b.to(tl.int64) * V
    offs = tl.arange(0, BLOCK_V)
    valid = offs < V
    x = tl.load(row + offs, mask=valid, other=float("-inf"))
    nonfinite = (x != x) | (x == float("inf"))
    bad = (tl.max(nonfinite.to(tl.int32), axis=0) > 0) | (tl.max(x, axis=0) == float("-inf"))
    z = _scaled(x, valid, bad, temperature)
    m = tl.max(z, axis=0)
    e = _weights(z, valid, m)
    keep = valid
    if USE_K or USE_P:
        rank = tl.zeros((BLOCK_V,), dtype=tl.int32)
        prior = tl.zeros((BLOCK_V,), dtype=tl.float64)
        for j0 in range(0, V, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            valid_j = offs_j < V
            x_j = tl.load(row + offs_j, mask=valid_j, other=float("-inf"))
            e_j = _weights(_scaled(x_j, valid_j, bad, temperature), valid_j, m)
            first = (e_j[None, :] > e[:, None]) | (
                (e_j[None, :] == e[:, None]) & (offs_j[None, :] < offs[:, None])
            )
            first = first & valid_j[None, :]
            rank += tl.sum(first.to(tl.int32), axis=1)
            prior += tl.sum(tl.where(first, e_j[None, :], 0.0), axis=1)
        if USE_K:
            keep = keep & (rank < top_k)
        if USE_P:
            total = tl.sum(tl.where(keep, e, 0.0), axis=0)
            keep = keep & (prior < top_p * total)
    kept = tl.where(keep, e, 0.0)
    cum = tl.cumsum(kept, axis=0)
    u = tl.load(u_ptr + col * B + b)
    r = u * tl.max(cum, axis=0)
    first_above = tl.min(tl.where(valid & (cum > r), offs, BLOCK_V), axis=0)
    last_nonzero = tl.max(tl.where(kept > 0.0, offs, -1), axis=0)
    token = tl.where(first_above < BLOCK_V, first_above, last_nonzero).to(tl.int64)
    tl.store(tokens_ptr + b.to(tl.int64) * C + col, token)
    tl.store(last_ptr + b, token)
    if bad:
        tl.store(bad_ptr + b, 1)


def supports(vocab: int) -> bool:
    """Whether :func:`sample_rows` takes a vocabulary of this size."""
    return 1 <= vocab <= MAX_VOCAB


def sample_rows(
    logits: torch.Tensor,
    u: torch.Tensor,
    col: torch.Tensor,
    tokens: torch.Tensor,
    last: torch.Tensor,
    bad: torch.Tensor,
    params: torch.Tensor,
    top_k: int,
    top_p: float,
) -> None:
    """Draw one token per row of ``logits [B, V]`` (float32, contiguous) with uniforms
    ``u[col]`` (``u`` float64 ``[C, B]``, ``col`` an int64 0-dim tensor), writing it to
    ``tokens[:, col]`` (int64 ``[B, C]``) and ``last`` (int64 ``[B]``) and setting ``bad[b]``
    (int8 ``[B]``) for bad rows. ``params`` is float64 ``[2]``: temperature and top_p (the
    latter also passed as ``top_p`` to choose the compiled variant). Device tensors only,
    nothing read back: CUDA-graph capturable. Arguments are assumed checked
    (``check_sampling_args``); V must pass :func:`supports`."""
    B, V = logits.shape
    C = tokens.shape[1]
    use_k = 0 < top_k < V
    block_v = triton.next_power_of_2(V)
    sample_rows_kernel[(B,)](
        logits, u, col, tokens, last, bad, params, B, V, C, int(top_k) if use_k else 0,
        USE_K=use_k, USE_P=top_p < 1.0, BLOCK_V=block_v, BLOCK_J=block_j(block_v),
        num_warps=num_warps(block_v),
    )  # fmt: skip


def num_warps(block_v: int) -> int:
    return 4 if block_v <= 256 else 8


def all_configs() -> list[dict]:
    """The constexpr combinations compile_check covers: each filter choice at the vocabulary
    sizes 16, 256 (folk-rnn's 137), 512 (the MIDI event vocabularies) and the maximum."""
    return [
        dict(USE_K=k, USE_P=p, BLOCK_V=v, BLOCK_J=block_j(v), num_warps=num_warps(v))
        for v in (16, 256, 512, MAX_VOCAB)
        for k in (False, True)
        for p in (False, True)
    ]
