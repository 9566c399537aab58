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
       NaN or +inf logits are an error, -inf is a weight of 0).
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

Legend: ``B`` batch (streams), ``V`` vocabulary size.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["check_sampling_args", "uniform", "uniforms", "sample", "filter_mask"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


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


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError (naming the argument) unless ``temperature > 0``, ``top_k`` is an int
    ``>= 0`` (0 disables it) and ``0 < top_p <= 1`` (1 disables it)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not float(temperature) > 0 or float(temperature) == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p!r}")


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
    ``logits``. Raises ValueError for bad arguments or NaN / +inf logits.
    """
    check_sampling_args(temperature, top_k, top_p)
    _check_u64("seed", seed)
    _check_u64("step", step)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        got = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor [B, V] with V >= 1, got {got}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        raise ValueError("logits must not contain NaN or +inf")
    if bool(torch.isneginf(logits).all(dim=1).any()):
        raise ValueError("logits must have at least one entry > -inf in every row")
    B, V = logits.shape
    weights = _weights(logits, temperature)
    kept = weights * filter_mask(weights, top_k, top_p)  # x + 0.0 == x: zeros do not perturb sums
    cum = kept.cumsum(dim=1)  # sequential float64 sum in ascending token id (step 5)
    r = uniforms(seed, step, B).to(logits.device).unsqueeze(1) * cum[:, -1:]
    above = cum > r
    first = above.to(torch.int8).argmax(dim=1)
    # Rounding can leave no running sum above r; then the rule takes the last non-zero weight.
    ids = torch.arange(V, device=logits.device).expand(B, V)
    last_nonzero = torch.where(kept > 0, ids, -1).max(dim=1).values
    return torch.where(above.any(dim=1), first, last_nonzero).to(torch.int64)
