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
        ({"temperature": 1e-310}, "temperature must be at least 1e-100"),
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


def test_the_smallest_temperature_samples_the_argmax():
    """At MIN_TEMPERATURE every finite float32 logit still scales to a finite z (below it, a
    finite logit overflowed and the row became an error, or a token of -1). A float64 logit
    that overflows all the same is an error naming the row, never a token of -1."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [-3e38, 3e38, 1.0]])
    t = sampling.MIN_TEMPERATURE
    for step in range(5):
        assert sampling.sample(logits, temperature=t, seed=1, step=step).tolist() == [1, 1]
    huge = torch.tensor([[1e300, 0.0], [1.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"divided by the temperature .* \(row 0 does\)"):
        sampling.sample(huge, temperature=1e-10)
    _, bad = sampling.sample_tensor(huge, 1e-10, 0, 1.0, _u64(0), _u64(0))
    assert bad.tolist() == [True, False]


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


# ------------------------------------------------- on-device form (uniforms_tensor, sample_tensor)

U64_EDGES = [0, 1, 2**63 - 1, 2**63, 2**64 - 1]


def _u64(value):
    return sampling.u64_tensor(value, "cpu")


@pytest.mark.parametrize("batch", [1, 37])
@pytest.mark.parametrize("seed", [*U64_EDGES, 12345])
def test_uniforms_tensor_equals_uniforms_bit_for_bit(seed, batch):
    for step in [*U64_EDGES, 7, 2**40 + 3, 2**63 + 5]:
        got = sampling.uniforms_tensor(_u64(seed), _u64(step), batch)
        assert got.dtype == torch.float64 and got.shape == (batch,)
        assert torch.equal(got, sampling.uniforms(seed, step, batch)), (seed, step)


def test_u64_tensor_is_twos_complement():
    assert sampling.u64_tensor(0).item() == 0
    assert sampling.u64_tensor(2**63 - 1).item() == 2**63 - 1
    assert sampling.u64_tensor(2**63).item() == -(2**63)
    assert sampling.u64_tensor(2**64 - 1).item() == -1
    assert sampling.u64_tensor(5).dtype == torch.int64 and sampling.u64_tensor(5).dim() == 0


@pytest.mark.parametrize(
    "value,error,message",
    [
        (-1, ValueError, r"seed must be an int in \[0, 2\*\*64\), got -1"),
        (2**64, ValueError, r"seed must be an int in \[0, 2\*\*64\), got 18446744073709551616"),
        (1.5, TypeError, r"seed must be an int in \[0, 2\*\*64\), got float"),
        (True, TypeError, r"seed must be an int in \[0, 2\*\*64\), got bool"),
    ],
)
def test_u64_tensor_rejects_non_u64(value, error, message):
    with pytest.raises(error, match=message):
        sampling.u64_tensor(value, "cpu", name="seed")


def test_tensor_keys_must_be_int64_scalars():
    logits = torch.zeros(2, 5)
    with pytest.raises(TypeError, match="seed must be an int64 0-dim tensor.*got int"):
        sampling.sample_tensor(logits, 1.0, 0, 1.0, 3, _u64(0))
    with pytest.raises(TypeError, match=r"step must be an int64 0-dim tensor.*got torch.int32"):
        sampling.sample_tensor(logits, 1.0, 0, 1.0, _u64(3), torch.tensor(0, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"seed must be .*shape \[1\]"):
        sampling.uniforms_tensor(torch.zeros(1, dtype=torch.int64), _u64(0), 2)
    with pytest.raises(ValueError, match="top_p"):
        sampling.sample_tensor(logits, 1.0, 0, 1.5, _u64(3), _u64(0))
    with pytest.raises(ValueError, match="logits"):
        sampling.sample_tensor(torch.zeros(5), 1.0, 0, 1.0, _u64(3), _u64(0))


@pytest.mark.parametrize("ties", [False, True])
def test_sample_tensor_equals_sample(ties):
    g = torch.Generator().manual_seed(5)
    B, V = 16, 137
    logits = torch.randn(B, V, generator=g) * 3
    if ties:
        logits = logits.round()  # many exact ties: exercises the lower-id-first rule
    for temperature in (0.5, 1.0, 1.7):
        for top_k in (0, 1, 5, 137, 200):
            for top_p in (0.3, 0.9, 1.0):
                for seed, step in [(0, 0), (2**64 - 1, 2**63 + 5), (12345, 17)]:
                    args = (logits, temperature, top_k, top_p)
                    tokens, bad = sampling.sample_tensor(*args, _u64(seed), _u64(step))
                    expected = sampling.sample(*args, seed, step)
                    assert torch.equal(tokens, expected), (temperature, top_k, top_p, seed, step)
                    assert bad.dtype == torch.bool and bad.shape == (B,) and not bad.any()


def test_sample_tensor_flags_bad_rows():
    g = torch.Generator().manual_seed(9)
    B, V = 7, 11
    nan, inf = float("nan"), float("inf")
    logits = torch.randn(B, V, generator=g)
    logits[1, 3] = nan
    logits[3, 0] = inf
    logits[4] = -inf
    logits[5, ::2] = -inf  # partly -inf: a healthy row
    logits[6, 2], logits[6, 5] = nan, -inf
    expected_bad = [False, True, False, True, True, False, True]
    healthy = torch.tensor([not b for b in expected_bad])
    # sample() raises on the bad rows; give it zeros there so it runs, keeping each healthy
    # row at its own index (its stream).
    repaired = torch.where(healthy.unsqueeze(1), logits, torch.zeros(()))
    for top_k, top_p in [(0, 1.0), (3, 1.0), (0, 0.7), (4, 0.5)]:
        for step in range(5):
            tokens, bad = sampling.sample_tensor(logits, 0.8, top_k, top_p, _u64(2), _u64(step))
            assert bad.tolist() == expected_bad
            assert bool(((tokens >= 0) & (tokens < V)).all())
            expected = sampling.sample(repaired, 0.8, top_k, top_p, 2, step)
            assert torch.equal(tokens[healthy], expected[healthy]), (top_k, top_p, step)


def _have_cxx_compiler():
    import os
    import shutil

    return bool(os.environ.get("CXX")) or any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def test_sample_tensor_compiles_to_one_graph():
    # fullgraph=True turns any graph break (a host sync such as .item() or a data-dependent
    # branch) into an error, so this passing means sample_tensor is one host-sync-free graph.
    if not _have_cxx_compiler():
        pytest.skip("torch.compile on CPU needs a C++ compiler and none is on PATH")
    torch._dynamo.reset()
    compiled = torch.compile(sampling.sample_tensor, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 19, generator=g) * 2
    logits[2, 5] = float("nan")
    for temperature, top_k, top_p in [(0.7, 5, 0.9), (1.0, 0, 1.0)]:
        keys = [(0, 0), (2**64 - 1, 2**63 + 5), (77, 3)]
        for i, (seed, step) in enumerate(keys):
            # New seed / step values must reuse the compiled graph (they are tensor inputs,
            # not constants baked in), as a captured CUDA graph needs.
            stance = "fail_on_recompile" if i > 0 else "default"
            with torch.compiler.set_stance(stance):
                tokens, bad = compiled(logits, temperature, top_k, top_p, _u64(seed), _u64(step))
            eager, eager_bad = sampling.sample_tensor(
                logits, temperature, top_k, top_p, _u64(seed), _u64(step)
            )
            assert torch.equal(tokens, eager) and torch.equal(bad, eager_bad)
            assert bad.tolist() == [False, False, True, False]
            assert torch.equal(tokens[[0, 1, 3]], eager[[0, 1, 3]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")
def test_sample_tensor_captures_in_a_cuda_graph():
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(8, 300, generator=g) * 2).to(dev)
    seed, step = sampling.u64_tensor(0, dev), sampling.u64_tensor(0, dev)
    args = (0.9, 7, 0.8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch.cuda.graphs recommends
        sampling.sample_tensor(logits, *args, seed, step)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, bad = sampling.sample_tensor(logits, *args, seed, step)
        u = sampling.uniforms_tensor(seed, step, 8)
    for s, t in [(5, 0), (2**64 - 1, 2**63 + 5), (123, 9)]:
        seed.copy_(sampling.u64_tensor(s, dev))
        step.copy_(sampling.u64_tensor(t, dev))
        graph.replay()
        eager, _ = sampling.sample_tensor(logits, *args, seed, step)
        assert torch.equal(tokens, eager) and not bad.any()
        assert torch.equal(u.cpu(), sampling.uniforms(s, t, 8))


def test_uniforms_table_is_uniform_bit_for_bit():
    seed, first = 2**64 - 1, 2**64 - 3  # the step counter wraps past 2**64 - 1
    table = sampling.uniforms_table(seed, first, 6, 4)
    assert table.dtype == torch.float64 and table.shape == (6, 4)
    for j in range(6):
        for b in range(4):
            assert table[j, b].item() == sampling.uniform(seed, b, (first + j) % 2**64)
    assert sampling.uniforms_table(0, 0, 0, 3).shape == (0, 3)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        sampling.uniforms_table(0, 0, -1, 3)
    with pytest.raises(ValueError, match="first_step must be an int in"):
        sampling.uniforms_table(0, -5, 2, 3)
