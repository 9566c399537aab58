"""The suite's one rule for float32 results, in one place.

A kernel's float32 result is judged against a float64 ``gold`` by the error of a float32
reference computed on the same inputs (torch.nn, or backend ``reference``): the kernel may err
by at most 3x that reference error plus a floor of 8 float32 ulps of the largest magnitude (the
rule flash-attention uses). Both errors are float32 rounding in different summation orders,
plus the 2-ulp polynomial activations of the compiled kernels, so a factor of 3 covers them,
while a wrong formula (an error of order 1e-2 or more) fails.
"""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps


def assert_within_float32_error(got, gold, ref, what: str = "", floor_min: float = 1.0) -> None:
    """``|got - gold| <= 3 |ref - gold| + 8 eps32 max(floor_min, |gold|)`` (max norms).

    ``floor_min`` = 1 keeps the floor at 8 ulps of 1 for results below 1 in magnitude; 0 ties
    it to the result's own scale.
    """
    assert got.shape == gold.shape, f"{what}: shape {list(got.shape)} vs {list(gold.shape)}"
    if gold.numel() == 0:
        return
    assert not torch.isnan(got).any(), f"{what}: NaN (an element was not written)"
    err = float((got.double() - gold.double()).abs().max())
    ref_err = float((ref.double() - gold.double()).abs().max())
    floor = 8 * EPS32 * max(floor_min, float(gold.abs().max()))
    assert err <= 3 * ref_err + floor, f"{what}: error {err:.3g} vs reference {ref_err:.3g}"


def assert_float32_close(got: dict, ref: dict) -> None:
    """GPU kernels against a float32 reference computed alike: rtol 1e-5 and an absolute
    tolerance of 1e-5 of the largest magnitude (at least 1e-5): float32 rounding in another
    summation order, over the short sequences these tests run."""
    assert got.keys() == ref.keys()
    for k in ref:
        r = ref[k].double()
        atol = 1e-5 * max(1.0, r.abs().max().item()) if r.numel() else 0.0
        torch.testing.assert_close(
            got[k].double(), r, rtol=1e-5, atol=atol, msg=lambda m, k=k: f"{k}: {m}"
        )
