"""The sampling rule and its counter-based generator (rnnkern.sampling)."""

from __future__ import annotations

import math

import pytest
import torch

from rnnkern import sampling


def test_mix_matches_splitmix64_known_answer():
    # SplitMix64 seeded with 0 produces 0xE220A8397B1DCDAF first (Vigna's reference code).
    assert sampling._mix(0) == 0xE220A8397B1DCDAF


def test_uniform_is_a_pure_function_in_unit_interval():
    values = [sampling.uniform(7, b, s) for b in range(4) for s in range(250)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert values == [sampling.uniform(7, b, s) for b in range(4) for s in range(250)]
    # Distinct keys give distinct values (a collision among 1000 53-bit draws has p ~ 1e-10).
    assert len(set(values)) == len(values)
    assert sampling.uniform(8, 0, 0) != sampling.uniform(7, 0, 0)
    assert sampling.uniforms(7, 3, 4).tolist() == [sampling.uniform(7, b, 3) for b in range(4)]


def test_uniform_is_uniform():
    n, bins = 20000, 20
    counts = [0] * bins
    for s in range(n):
        counts[int(sampling.uniform(123, 5, s) * bins)] += 1
    expected = n / bins
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    # 19 degrees of freedom: P(chi2 > 43.8) = 0.001 for a uniform generator.
    assert chi2 < 43.8


@pytest.mark.parametrize("name,value", [("seed", -1), ("stream", 1 << 64), ("step", 1.5)])
def test_uniform_rejects_bad_keys(name, value):
    args = {"seed": 0, "stream": 0, "step": 0, name: value}
    with pytest.raises((ValueError, TypeError), match=name):
        sampling.uniform(**args)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
    ],
)
def test_bad_sampling_args_name_the_argument(kwargs, name):
    args = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kwargs}
    with pytest.raises(ValueError, match=name):
        sampling.check_sampling_args(**args)
    with pytest.raises(ValueError, match=name):
        sampling.sample(torch.zeros(2, 5), **args)


def test_bad_logits():
    with pytest.raises(ValueError, match="logits"):
        sampling.sample(torch.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        sampling.sample(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="-inf"):
        sampling.sample(torch.full((1, 3), float("-inf")))


def test_top_k_one_is_argmax_with_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0]])
    for step in range(20):
        assert sampling.sample(logits, top_k=1, seed=3, step=step).tolist() == [1, 0]


def test_support_of_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    seen_k, seen_p = set(), set()
    for step in range(400):
        seen_k.add(int(sampling.sample(logits, top_k=2, seed=1, step=step)))
        seen_p.add(int(sampling.sample(logits, top_p=0.8, seed=1, step=step)))
    assert seen_k == {1, 3}
    # Ranked 0.4, 0.3, 0.15 reach 0.85 >= 0.8: the nucleus is {1, 3, 4}.
    assert seen_p == {1, 3, 4}


def test_frequencies_follow_the_tempered_softmax():
    torch.manual_seed(0)
    V, n, temperature = 6, 6000, 0.7
    logits = torch.randn(1, V)
    probs = torch.softmax(logits.double() / temperature, dim=1)[0]
    counts = torch.zeros(V)
    for step in range(n):
        counts[int(sampling.sample(logits, temperature=temperature, seed=11, step=step))] += 1
    expected = probs * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 5 degrees of freedom: P(chi2 > 20.5) = 0.001.
    assert chi2 < 20.5


def test_rows_use_their_own_stream():
    logits = torch.zeros(3, 1000)  # uniform over 1000 tokens: the token is floor(u * 1000)
    tokens = sampling.sample(logits, seed=42, step=9)
    expected = [math.floor(sampling.uniform(42, b, 9) * 1000) for b in range(3)]
    assert tokens.tolist() == expected


def test_neg_inf_logits_are_never_sampled():
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf"), 0.0]])
    tokens = {int(sampling.sample(logits, seed=0, step=s)) for s in range(100)}
    assert tokens == {1, 3}
