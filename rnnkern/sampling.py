"""The project's one sampling rule and its counter-based random generator.

Every backend that samples (this module, the C++ decoder in ``csrc/cpu``) follows the rule
below, so the same seed gives the same tokens on every backend and machine.

Random numbers
    ``uniform(seed, stream, step)`` is a pure function of three unsigned 64-bit integers, built
    from SplitMix64's finaliser ``mix``::

        mix(z):  z += 0x9E3779B97F4A7C15
                 z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
                 z = (z ^ (z >> 27)) * 0x94D049BB133111EB
                 return z ^ (z >> 31)                       (all mod 2**64)

        u = (mix(mix(mix(seed) ^ stream) ^ step) >> 11) * 2**-53      in [0, 1)

    Integer arithmetic only, so C++ reproduces it bit for bit. ``stream`` is the batch row
    (the stream index ``b``) and ``step`` the index of the token being sampled.

Sampling rule, per row of logits ``[V]``
    1. ``z = float64(logits) / temperature``; ``e = exp(z - max(z))`` (unnormalised weights;
       NaN or +inf in ``z`` is an error, -inf is a weight of 0; ``temperature`` is at least
       ``MIN_TEMPERATURE``, so a finite float32 logit never scales to an infinity).
    2. Rank tokens by ``e`` descending, ties broken by the lower token id first.
    3. top-k (``top_k > 0``): keep the first ``top_k`` ranked tokens.
    4. top-p (``top_p < 1``): over the kept tokens in rank order, ``cum`` is the running sum of
       ``e``; keep the ranked prefix up to and including the first token with
       ``cum >= top_p * cum[last]``.
    5. Inverse CDF in ascending token id: ``S`` is the sum of the kept weights in ascending id
       order, ``r = u * S``; the token is the first kept id whose running sum exceeds ``r``
       (if rounding leaves none, the last kept id with a non-zero weight).

    All sums are sequential float64 sums in the order stated. Python (torch) and C++ (libm)
    ``exp`` may differ in the last bit for some inputs, so the two agree token for token except
    when ``r`` falls within a few float64 ulps of a cumulative boundary: probability about
    ``V * 1e-16`` per token.

Two forms of the rule
    ``sample`` / ``uniforms`` take Python ints for ``seed`` and ``step`` and raise on bad
    logits (they read values back to the host). ``sample_tensor`` / ``uniforms_tensor`` are
    the on-device, CUDA-graph-capturable form of the same rule: ``seed`` and ``step`` are
    int64 scalar tensors (``u64_tensor``), the generator is emulated with int64 tensor ops, and
    bad rows are flagged in a returned mask instead of raised, so nothing syncs with the host
    and ``torch.compile(fullgraph=True)`` sees one graph. Both forms share one implementation
    of steps 1-5 (``_draw``) and agree token for token on the CPU; on CUDA ``cumsum`` is a
    parallel scan, so sums may differ in the last bits from the sequential order stated above.

Legend: ``B`` batch (streams), ``V`` vocabulary size.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = [
    "MIN_TEMPERATURE",
    "check_sampling_args",
    "uniform",
    "uniforms",
    "u64_tensor",
    "uniforms_tensor",
    "uniforms_table",
    "sample",
    "sample_tensor",
    "check_finite_rows",
    "filter_mask",
]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _as_i64(value: int) -> int:
    """The int64 two's-complement reading of a u64 ``value`` (same 64 bits)."""
    return value - (1 << 64) if value >= 1 << 63 else value


# The same constants as int64 scalars for the tensor form: torch's int64 + and * wrap modulo
# 2**64, so with these the bit patterns are those of the u64 arithmetic above.
_GOLDEN_I64 = _as_i64(_GOLDEN)
_MUL1_I64 = _as_i64(_MUL1)
_MUL2_I64 = _as_i64(_MUL2)


def _mix(z: int) -> int:
    """SplitMix64's output function (one increment by the golden gamma, then the finaliser)."""
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)


def _check_u64(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {type(value).__name__}")
    value = int(value)
    if not 0 <= value <= _MASK64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {value}")
    return value


def uniform(seed: int, stream: int, step: int) -> float:
    """The uniform in ``[0, 1)`` for ``(seed, stream, step)``; see the module docstring."""
    seed, stream, step = (
        _check_u64(n, v) for n, v in (("seed", seed), ("stream", stream), ("step", step))
    )
    z = _mix(_mix(_mix(seed) ^ stream) ^ step)
    return (z >> 11) * (1.0 / (1 << 53))


def uniforms(seed: int, step: int, batch: int) -> Tensor:
    """float64 ``[B]``: ``uniform(seed, b, step)`` for streams ``b = 0 .. batch - 1``."""
    return torch.tensor([uniform(seed, b, step) for b in range(batch)], dtype=torch.float64)


def u64_tensor(value: int, device: torch.device | str | None = None, name: str = "value") -> Tensor:
    """int64 0-dim tensor on ``device`` holding the u64 ``value`` as two's complement.

    This is how ``seed`` and ``step`` are passed to :func:`uniforms_tensor` and
    :func:`sample_tensor`. ``value`` must be an int in ``[0, 2**64)`` (``name`` is used in the
    error message).
    """
    value = _check_u64(name, value)
    return torch.tensor(_as_i64(value), dtype=torch.int64, device=device)


def _shr(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 ``z`` read as u64: torch's ``>>`` on int64 is arithmetic
    (copies the sign bit), so the ``bits`` high bits it fills are masked off."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix_tensor(z: Tensor) -> Tensor:
    """:func:`_mix` on int64 tensors holding u64 bit patterns (elementwise, wraps mod 2**64)."""
    z = z + _GOLDEN_I64
    z = (z ^ _shr(z, 30)) * _MUL1_I64
    z = (z ^ _shr(z, 27)) * _MUL2_I64
    return z ^ _shr(z, 31)


def _check_key_tensor(name: str, value, device: torch.device | None = None) -> None:
    # Metadata checks only (dtype, shape, device): no value is read, so no host sync.
    if not isinstance(value, Tensor) or value.dtype != torch.int64 or value.dim() != 0:
        got = (
            f"{value.dtype} tensor of shape {list(value.shape)}"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        raise TypeError(f"{name} must be an int64 0-dim tensor (see u64_tensor), got {got}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on the device of logits ({device}), got {value.device}")


def uniforms_tensor(seed: Tensor, step: Tensor, batch: int) -> Tensor:
    """float64 ``[B]`` on ``seed``'s device: ``uniform(seed, b, step)`` for ``b < batch``,
    bit for bit.

    ``seed`` and ``step`` are int64 0-dim tensors holding u64 values as two's complement
    (:func:`u64_tensor`). Only tensor ops, so it runs inside CUDA graph capture and
    ``torch.compile(fullgraph=True)``; ``batch`` is a Python int (a static shape).
    """
    _check_key_tensor("seed", seed)
    _check_key_tensor("step", step, seed.device)
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 0:
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    stream = torch.arange(int(batch), dtype=torch.int64, device=seed.device)
    return _uniforms_of(seed, stream, step)


def _uniforms_of(seed: Tensor, stream: Tensor, step: Tensor) -> Tensor:
    """``uniform`` on int64 tensors holding u64 bit patterns, broadcast over their shapes."""
    z = _mix_tensor(_mix_tensor(_mix_tensor(seed) ^ stream) ^ step)
    # The logical z >> 11 is below 2**53, so the float64 conversion is exact, and scaling by a
    # power of two is exact: the same double as the Python int * float in uniform().
    return _shr(z, 11).to(torch.float64) * (1.0 / (1 << 53))


def uniforms_table(
    seed: int, first_step: int, steps: int, batch: int, device: torch.device | str | None = None
) -> Tensor:
    """float64 ``[steps, B]`` on ``device``: row ``j`` is ``uniform(seed, b, first_step + j)``
    for ``b < batch`` (the step wraps modulo 2**64), bit for bit; a few tensor ops for all of
    them, so a device generation loop can look its draws up by column."""
    seed = _check_u64("seed", seed)
    first_step = _check_u64("first_step", first_step)
    for name, value in (("steps", steps), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    seed_t = u64_tensor(seed, device)
    stream = torch.arange(int(batch), dtype=torch.int64, device=seed_t.device)
    # int64 addition wraps modulo 2**64, as the u64 step counter does.
    step = torch.arange(int(steps), dtype=torch.int64, device=seed_t.device) + _as_i64(first_step)
    return _uniforms_of(seed_t, stream.unsqueeze(0), step.unsqueeze(1))


# The smallest temperature. Step 1's float64 z = logit / temperature stays finite for every
# finite float32 logit (|logit| <= 3.4e38) down to a temperature of about 1.9e-270; below that a
# finite logit scaled to +inf made the row an error that blamed the model (the compiled
# decoders) or a token of -1 (this module). This floor keeps that margin for float32 logits and
# float64 logits up to 1e208; any temperature near it samples the argmax of practical logits.
MIN_TEMPERATURE = 1e-100


def check_sampling_args(
    temperature: float,
    top_k: int,
    top_p: float,
    names: tuple[str, str, str] = ("temperature", "top_k", "top_p"),
) -> None:
    """Raise ValueError (naming the argument: ``names``, e.g. a command's flags) unless
    ``temperature`` is finite and at least :data:`MIN_TEMPERATURE`, ``top_k`` is an int
    ``>= 0`` (0 disables it) and ``0 < top_p <= 1`` (1 disables it)."""
    t_name, k_name, p_name = names
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"{t_name} must be a number > 0, got {temperature!r}")
    if not float(temperature) > 0 or float(temperature) == float("inf"):
        raise ValueError(f"{t_name} must be a finite number > 0, got {temperature!r}")
    if float(temperature) < MIN_TEMPERATURE:
        raise ValueError(
            f"{t_name} must be at least {MIN_TEMPERATURE:g} (below it the scaled logits "
            f"overflow; a temperature that small samples the argmax anyway), got {temperature!r}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"{k_name} must be an int >= 0 (0 disables it), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise ValueError(f"{p_name} must be a number in (0, 1], got {top_p!r}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"{p_name} must be in (0, 1] (1 disables it), got {top_p!r}")


def _weights(logits: Tensor, temperature: float) -> Tensor:
    """Step 1 of the rule: float64 ``[B, V]`` unnormalised weights ``exp(z - max z)``."""
    z = logits.to(torch.float64) / float(temperature)
    return (z - z.max(dim=1, keepdim=True).values).exp()


def filter_mask(weights: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Steps 2-4 of the rule: bool ``[B, V]``, True for the tokens that stay candidates.

    ``weights`` is float64 ``[B, V]`` (``exp(z - max z)``, as computed by the rule).
    """
    B, V = weights.shape
    if (top_k == 0 or top_k >= V) and top_p >= 1.0:
        return torch.ones(B, V, dtype=torch.bool, device=weights.device)
    # A stable descending sort ranks equal weights by ascending token id (step 2's tie rule).
    ranked, order = torch.sort(weights, dim=1, descending=True, stable=True)
    keep = V if top_k == 0 else min(int(top_k), V)
    kept_ranked = torch.zeros(B, V, dtype=torch.bool, device=weights.device)
    kept_ranked[:, :keep] = True
    if top_p < 1.0:
        cum = ranked[:, :keep].cumsum(dim=1)  # sequential float64 sum in rank order
        threshold = float(top_p) * cum[:, -1:]
        # Index of the first ranked token whose running sum reaches the threshold.
        last = (cum >= threshold).to(torch.int8).argmax(dim=1)
        kept_ranked = torch.arange(V, device=weights.device).unsqueeze(0) <= last.unsqueeze(1)
    mask = torch.zeros(B, V, dtype=torch.bool, device=weights.device)
    mask.scatter_(1, order, kept_ranked)
    return mask


def _draw(logits: Tensor, temperature: float, top_k: int, top_p: float, u: Tensor) -> Tensor:
    """Steps 1-5 of the rule, shared by :func:`sample` and :func:`sample_tensor`.

    ``logits`` ``[B, V]`` (finite or -inf, at least one finite per row), ``u`` float64 ``[B]``
    on the same device. Returns int64 ``[B]``. Tensor ops only: no host sync.
    """
    B, V = logits.shape
    weights = _weights(logits, temperature)
    kept = weights * filter_mask(weights, top_k, top_p)  # x + 0.0 == x: zeros do not perturb sums
    cum = kept.cumsum(dim=1)  # sequential float64 sum in ascending token id on CPU (step 5)
    r = u.unsqueeze(1) * cum[:, -1:]
    above = cum > r
    first = above.to(torch.int8).argmax(dim=1)
    # Rounding can leave no running sum above r; then the rule takes the last non-zero weight.
    ids = torch.arange(V, device=logits.device).expand(B, V)
    last_nonzero = torch.where(kept > 0, ids, -1).max(dim=1).values
    return torch.where(above.any(dim=1), first, last_nonzero).to(torch.int64)


def _check_logits(logits) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor [B, V] with V >= 1, got {got}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def _row_faults(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Rows of ``logits [B, V]`` the rule cannot draw from, as two bool ``[B]``: whose scaled
    logits ``z`` (step 1) hold NaN or +inf, and whose every ``z`` is -inf."""
    z = logits.to(torch.float64) / float(temperature)
    nonfinite = torch.isnan(z).any(dim=1) | torch.isposinf(z).any(dim=1)
    return nonfinite, torch.isneginf(z).all(dim=1)


def check_finite_rows(logits: Tensor, temperature: float = 1.0) -> None:
    """Raise ValueError naming the first row of ``logits [B, V]`` that holds NaN or +inf (or
    a logit that divided by ``temperature`` overflows), or whose every entry is -inf (rows the
    rule cannot draw from)."""
    nonfinite, empty = _row_faults(logits, temperature)
    if bool(nonfinite.any()):
        row = int(nonfinite.nonzero()[0, 0])
        raise ValueError(
            f"logits divided by the temperature must not hold NaN or +inf (row {row} does)"
        )
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        raise ValueError(f"logits must have at least one entry > -inf in every row (row {row})")


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    step: int = 0,
) -> Tensor:
    """Sample one token per row of ``logits [B, V]`` by the rule in the module docstring.

    Row ``b`` uses ``uniform(seed, b, step)``. Returns int64 ``[B]`` on the device of
    ``logits``. Raises ValueError for bad arguments or NaN / +inf logits (TypeError for a
    ``seed`` or ``step`` that is not an int).
    """
    check_sampling_args(temperature, top_k, top_p)
    _check_u64("seed", seed)
    _check_u64("step", step)
    _check_logits(logits)
    check_finite_rows(logits, temperature)
    u = uniforms(seed, step, logits.shape[0]).to(logits.device)
    return _draw(logits, temperature, top_k, top_p, u)


def sample_tensor(
    logits: Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: Tensor,
    step: Tensor,
) -> tuple[Tensor, Tensor]:
    """:func:`sample`'s rule with no host sync: for CUDA graphs and ``torch.compile``.

    ``logits`` ``[B, V]`` floating point; ``seed`` and ``step`` int64 0-dim tensors on the
    device of ``logits`` holding u64 values (:func:`u64_tensor`); ``temperature``, ``top_k``,
    ``top_p`` Python numbers as for :func:`sample`. Row ``b`` uses
    ``uniform(seed, b, step)``.

    Returns ``(tokens, bad)``: int64 ``[B]`` and bool ``[B]``. ``bad[b]`` is True where row
    ``b`` holds a NaN or +inf, or is all -inf (where :func:`sample` raises); its token is then
    some id in ``[0, V)`` and meaningless. The other rows' tokens equal :func:`sample`'s on the
    CPU. Raises ValueError / TypeError only for bad argument types, shapes or devices, checked
    without reading tensor values.
    """
    check_sampling_args(temperature, top_k, top_p)
    _check_logits(logits)
    _check_key_tensor("seed", seed, logits.device)
    _check_key_tensor("step", step, logits.device)
    u = uniforms_tensor(seed, step, logits.shape[0])
    return sample_with_uniforms(logits, temperature, top_k, top_p, u)


def sample_with_uniforms(
    logits: Tensor, temperature: float, top_k: int, top_p: float, u: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`sample_tensor` with the rows' uniforms given: float64 ``u [B]`` on the logits'
    device (a row of :func:`uniforms_table`). Arguments are assumed checked."""
    nonfinite, empty = _row_faults(logits, temperature)
    bad = nonfinite | empty
    # Bad rows get all-zero logits (a uniform draw over [0, V)) so that no NaN reaches the sort
    # and the sums; the rows are independent, so the healthy rows are unaffected.
    safe = torch.where(
        bad.unsqueeze(1), torch.zeros((), dtype=logits.dtype, device=logits.device), logits
    )
    return _draw(safe, temperature, top_k, top_p, u), bad
