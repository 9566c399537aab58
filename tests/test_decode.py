"""rnnkern.Decoder: step logits against torch.nn, state handling, generate, bad inputs.

Logits are judged as in test_backend_cpu.py: against a float64 copy of the model, the decoder's
error may be at most 3x torch.nn's own float32 error plus 8 float32 ulps of the largest logit
(float32 rounding in a different summation order and 2-ulp polynomial activations). For
``weights="bf16"`` the float64 copy has the same bfloat16-rounded matrices, so what remains to
check is again float32 accumulation.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import CUDA_KERNELS_DEVICE, CUDA_KERNELS_REASON
from tolerances import assert_within_float32_error

import rnnkern
from rnnkern import sampling
from rnnkern.backends import cpu as cpu_backend
from rnnkern.backends import cuda as cuda_backend
from rnnkern.backends import cuda_emulation
from rnnkern.decode import Decoder

HAVE_CPU = cpu_backend._cpu is not None
needs_cpu = pytest.mark.skipif(not HAVE_CPU, reason="rnnkern._cpu is not built")
try:  # backend "triton" runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (conftest.py)
    from rnnkern.backends.triton import common as triton_common

    HAVE_TRITON = triton_common.INTERPRET or torch.cuda.is_available()
except ImportError:
    HAVE_TRITON = False
needs_triton = pytest.mark.skipif(
    not HAVE_TRITON, reason="backend 'triton' needs Triton and CUDA or TRITON_INTERPRET=1"
)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Backend "cuda" runs its kernels on a GPU, or on their CPU emulation where there is none
# (conftest.py's cuda_kernels fixture; requested for every test of backend "cuda" below).
HAVE_CUDA_EXT = cuda_backend._cuda is not None  # the real extension (built where nvcc is)
needs_cuda_decode = pytest.mark.skipif(
    CUDA_KERNELS_REASON is not None, reason=f"backend 'cuda': {CUDA_KERNELS_REASON}"
)
BACKENDS = [
    pytest.param("cpu", marks=needs_cpu),
    "torch",
    pytest.param("triton", marks=needs_triton),
    pytest.param("cuda", marks=needs_cuda_decode),
]

V, E, H = 13, 6, 33


@pytest.fixture(autouse=True)
def _cuda_kernels_for_backend_cuda(request):
    """A test parametrized with backend "cuda" gets the kernels (GPU or emulation)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cuda":
        request.getfixturevalue("cuda_kernels")


def make_model(mode, layers, proj=0, seed=0, nonlinearity="tanh"):
    torch.manual_seed(seed)
    kw = {"proj_size": proj} if proj else {}
    if mode == "RNN":
        kw["nonlinearity"] = nonlinearity
    rnn = getattr(torch.nn, mode)(E, H, num_layers=layers, **kw)
    return rnn, torch.nn.Embedding(V, E), torch.nn.Linear(proj or H, V)


def make_decoder(backend, rnn, emb=None, head=None, **kw):
    """A Decoder of copies of the modules on the device its backend runs on (Triton: CUDA, or
    the CPU under the interpreter); step() and generate() move their inputs there."""
    device = {"triton": TRITON_DEVICE, "cuda": CUDA_KERNELS_DEVICE}.get(backend)
    if device is not None:
        rnn, emb, head = (
            None if m is None else copy.deepcopy(m).to(device) for m in (rnn, emb, head)
        )
    return Decoder(rnn, emb, head, backend=backend, **kw)


def teacher_forced(rnn, emb, head, tokens, dtype):
    rnn, emb, head = (copy.deepcopy(m).to(dtype) for m in (rnn, emb, head))
    with torch.no_grad():
        out, _ = rnn(emb(tokens))
        return head(out).double()


def round_streamed_to_bf16(rnn, head):
    """Copies with the matrices the bf16 decoder streams rounded to bfloat16."""
    rnn, head = copy.deepcopy(rnn), copy.deepcopy(head)
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("weight") and name != "weight_ih_l0":
                p.copy_(p.bfloat16().float())
        head.weight.copy_(head.weight.bfloat16().float())
    return rnn, head


def assert_logits_close(got, ref32, gold):
    assert_within_float32_error(got, gold, ref32, "logits")


CASES = [
    ("LSTM", 1, 0),
    ("LSTM", 3, 0),
    ("LSTM", 2, 7),
    ("GRU", 1, 0),
    ("GRU", 3, 0),
    ("RNN", 2, 0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
@pytest.mark.parametrize("mode,layers,proj", CASES)
def test_step_matches_torch_nn(mode, layers, proj, weights, backend):
    rnn, emb, head = make_model(mode, layers, proj)
    T, B = 6, 3
    tokens = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(1))
    ref_rnn, ref_head = round_streamed_to_bf16(rnn, head) if weights == "bf16" else (rnn, head)
    gold = teacher_forced(ref_rnn, emb, ref_head, tokens, torch.float64)
    ref32 = teacher_forced(ref_rnn, emb, ref_head, tokens, torch.float32)
    dec = make_decoder(backend, rnn, emb, head, weights=weights, batch_size=B)
    got = torch.stack([dec.step(tokens[t]) for t in range(T)]).double().cpu()
    assert got.shape == (T, B, V)
    assert_logits_close(got, ref32, gold)


@needs_triton
@pytest.mark.parametrize("split", [False, True], ids=["one program", "split"])
@pytest.mark.parametrize("tiling", ["tile", "gemv, the GPU's chunks"])
@pytest.mark.parametrize("mode,layers,proj", [*CASES, ("RNN-relu, no embedding or head", 2, 0)])
def test_triton_step_in_each_tiling(mode, layers, proj, tiling, split, monkeypatch):
    """The Triton step multiplies by tl.dot on 16-row tiles (more than GEMV_MAX_ROWS streams)
    or by broadcast products summed over k (fewer); both, at 3 streams. Under the interpreter
    GEMV mode takes 16-unit chunks to save time; here it takes the GPU's narrow ones, so
    chunks end inside a gate (H = 33 is not a multiple of 4) as they do on the GPU. ``split``:
    the units spread over the programs of a GPU of 4 multiprocessors, which wait for each
    other after every layer (under the interpreter through emulation.emulate_gpu; on a GPU
    every step with more than one chunk is split already)."""
    from rnnkern.backends.triton import decode as triton_decode

    if split and TRITON_DEVICE == "cuda":
        pytest.skip("on a GPU the steps above are split already (one program per chunk)")
    if tiling == "tile":
        monkeypatch.setattr(triton_decode, "GEMV_MAX_ROWS", 0)
    else:
        monkeypatch.setattr(triton_decode, "INTERPRET_GEMV_CHUNK", None)
    grid = contextlib.nullcontext()
    if split:
        from rnnkern.backends.triton.emulation import emulate_gpu

        grid = emulate_gpu(sms=4)
    T, B = 4, 3
    if mode.startswith("RNN-relu"):
        torch.manual_seed(3)
        rnn, emb, head = torch.nn.RNN(E, H, num_layers=layers, nonlinearity="relu"), None, None
        x = torch.randn(T, B, E)
        with torch.no_grad():
            gold, _ = copy.deepcopy(rnn).double()(x.double())
            ref32, _ = rnn(x)
        ref32 = ref32.double()
    else:
        rnn, emb, head = make_model(mode, layers, proj)
        x = torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(1))
        gold = teacher_forced(rnn, emb, head, x, torch.float64)
        ref32 = teacher_forced(rnn, emb, head, x, torch.float32)
    with grid:
        dec = make_decoder("triton", rnn, emb, head, batch_size=B)
        geometry = dec._triton_step.tiling
        assert geometry.gemv == (tiling != "tile")
        assert geometry.block_h == (16 if tiling == "tile" else triton_decode.GEMV["block_h"])
        # (33 units: 3 chunks of 16 or 9 of 4, on 4 multiprocessors)
        assert dec._triton_step.n_split == (1 if not split else 3 if tiling == "tile" else 4)
        got = torch.stack([dec.step(x[t]) for t in range(T)]).double().cpu()
    assert_logits_close(got, ref32, gold)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_rnn_and_inputs_without_embedding(backend):
    torch.manual_seed(3)
    rnn = torch.nn.RNN(E, H, num_layers=2, nonlinearity="relu")
    T, B = 5, 4
    x = torch.randn(T, B, E)
    with torch.no_grad():
        gold, _ = copy.deepcopy(rnn).double()(x.double())
        ref32, _ = rnn(x)
    dec = make_decoder(backend, rnn, batch_size=B)  # no head: step returns the top output
    got = torch.stack([dec.step(x[t]) for t in range(T)]).double().cpu()
    assert_logits_close(got, ref32.double(), gold)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell_type", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_modules(cell_type, backend):
    torch.manual_seed(4)
    cell = getattr(torch.nn, cell_type)(E, H)
    B = 2
    x = torch.randn(4, B, E)
    dec = make_decoder(backend, cell, batch_size=B)
    state = None
    for t in range(4):
        with torch.no_grad():
            state = cell(x[t], state)
        h = state[0] if cell_type == "LSTMCell" else state
        # One step, float32 on both sides; errors are a few ulps of values <= 1.
        torch.testing.assert_close(dec.step(x[t]).cpu(), h, rtol=0, atol=1e-5)


@needs_cpu
def test_rnnkern_modules_are_accepted():
    rnn, emb, head = make_model("LSTM", 2)
    ours = rnnkern.LSTM(E, H, num_layers=2)
    ours.load_state_dict(rnn.state_dict())
    tokens = torch.randint(0, V, (4, 2), generator=torch.Generator().manual_seed(5))
    a = Decoder(rnn, emb, head, batch_size=2)
    b = Decoder(ours, emb, head, batch_size=2)
    for t in range(4):
        assert torch.equal(a.step(tokens[t]), b.step(tokens[t]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_get_set_reset(backend):
    rnn, emb, head = make_model("LSTM", 2)
    tokens = torch.randint(0, V, (6, 3), generator=torch.Generator().manual_seed(6))
    dec = make_decoder(backend, rnn, emb, head, batch_size=3)
    for t in range(3):
        dec.step(tokens[t])
    with torch.no_grad():
        _, (h_n, c_n) = rnn(emb(tokens[:3]))
    h, c = (t.cpu() for t in dec.get_state())
    torch.testing.assert_close(h, h_n, rtol=0, atol=1e-5)  # float32 both sides, 3 steps
    torch.testing.assert_close(c, c_n, rtol=0, atol=1e-5)
    rest = [dec.step(tokens[t]) for t in range(3, 6)]
    dec.reset()
    assert dec.get_state()[0].abs().max() == 0
    dec.set_state((h, c))
    again = [dec.step(tokens[t]) for t in range(3, 6)]
    for a, b in zip(rest, again, strict=True):
        if backend in ("cpu", "triton", "cuda"):
            assert torch.equal(a, b)  # the kernels do not depend on buffer addresses
        else:
            # torch's GEMM may pick another code path for another buffer alignment (the state
            # ping-pongs between two buffers): float32 rounding only.
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    dec.reset(batch_size=5)
    assert dec.get_state()[0].shape == (2, 5, H)
    with pytest.raises(ValueError, match="state h must have shape"):
        dec.set_state((h, c))


def python_generate(dec, prime, steps, **kw):
    """The generation loop written with Decoder.step and rnnkern.sampling.sample."""
    for s in range(prime.shape[1]):
        logits = dec.step(prime[:, s])
    out = []
    for j in range(steps):
        tok = sampling.sample(logits, step=j, **kw)
        out.append(tok)
        if j + 1 < steps:
            logits = dec.step(tok)
    return torch.stack(out, dim=1)


@needs_cpu
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0},
        {"temperature": 0.7, "top_k": 5, "top_p": 1.0, "seed": 123},
        {"temperature": 1.3, "top_k": 0, "top_p": 0.8, "seed": 2**64 - 1},
        {"temperature": 1.0, "top_k": 4, "top_p": 0.9, "seed": 7},
    ],
)
def test_generate_agrees_with_python_sampler(kw, weights):
    # Same C++ step kernel on both sides, so the logits are bit-identical and the tokens must
    # be identical (up to libm-vs-torch exp ulps, probability ~1e-14 per token).
    rnn, emb, head = make_model("LSTM", 2, seed=8)
    prime = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(9))
    fast = Decoder(rnn, emb, head, weights=weights, batch_size=3)
    slow = Decoder(rnn, emb, head, weights=weights, batch_size=3)
    got = fast.generate(prime, 40, **kw)
    expected = python_generate(slow, prime, 40, **kw)
    assert got.dtype == torch.int64 and got.shape == (3, 40)
    assert torch.equal(got, expected)
    # Same state afterwards: the prime and every sampled token but the last were consumed.
    for a, b in zip(fast.get_state(), slow.get_state(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_is_deterministic_and_seeded(backend):
    rnn, emb, head = make_model("GRU", 2, seed=10)
    prime = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(11))
    dec = make_decoder(backend, rnn, emb, head, batch_size=2)
    a = dec.generate(prime, 30, seed=5)
    dec.reset()
    b = dec.generate(prime, 30, seed=5)
    dec.reset()
    c = dec.generate(prime, 30, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < V


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_in_pieces_equals_one_call(backend):
    """first_step numbers the random draws, so generation continued in several calls (as the
    music layer does, stopping once every tune has ended) draws what one long call draws."""
    rnn, emb, head = make_model("LSTM", 2, seed=13)
    prime = torch.randint(0, V, (3, 2), generator=torch.Generator().manual_seed(14))
    whole = make_decoder(backend, rnn, emb, head, batch_size=3)
    expected = whole.generate(prime, 24, seed=3, first_step=5, top_k=6)
    pieces = make_decoder(backend, rnn, emb, head, batch_size=3)
    first = pieces.generate(prime, 10, seed=3, first_step=5, top_k=6)
    rest = pieces.generate(first[:, -1:], 14, seed=3, first_step=15, top_k=6)
    assert torch.equal(torch.cat([first, rest], dim=1), expected)
    shifted = make_decoder(backend, rnn, emb, head, batch_size=3)
    assert not torch.equal(shifted.generate(prime, 24, seed=3, top_k=6), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_and_sample_loop_is_generate(backend):
    """Decoder.sample is generate's sampler: a Python loop of step + sample draws its tokens."""
    rnn, emb, head = make_model("LSTM", 2, seed=15)
    prime = torch.randint(0, V, (3, 2), generator=torch.Generator().manual_seed(16))
    kw = dict(temperature=0.8, top_k=5, top_p=0.95, seed=4)
    expected = make_decoder(backend, rnn, emb, head, batch_size=3).generate(prime, 20, **kw)
    dec = make_decoder(backend, rnn, emb, head, batch_size=3)
    for s in range(prime.shape[1]):
        logits = dec.step(prime[:, s])
    tokens = []
    for j in range(20):
        tokens.append(dec.sample(logits, step=j, **kw))
        logits = dec.step(tokens[-1])
    assert torch.equal(torch.stack(tokens, dim=1).cpu(), expected.cpu())


@needs_cpu
def test_decoder_sample_is_the_python_sampler():
    """The C++ path of Decoder.sample against the rule's Python reference, with exact ties,
    -inf entries, top-k and top-p (float32 logits), and float64 logits (which Decoder.sample
    hands to the reference itself)."""
    rnn, emb, head = make_model("GRU", 1, seed=17)
    dec = Decoder(rnn, emb, head, batch_size=4)
    g = torch.Generator().manual_seed(18)
    settings = [(1.0, 0, 1.0), (0.5, 3, 1.0), (2.0, 0, 0.5), (1.0, 6, 0.9)]
    for trial in range(25):
        logits = torch.randn(4, V, generator=g) * 3
        if trial % 3 == 0:
            logits = logits.round()  # many exact ties
        if trial % 4 == 0:
            logits[:, ::2] = float("-inf")
        for temperature, top_k, top_p in settings:
            args = (temperature, top_k, top_p, 2**63 + trial, 3 * trial)
            expected = sampling.sample(logits, *args)
            assert torch.equal(dec.sample(logits, *args), expected), (trial, args)
            assert torch.equal(dec.sample(logits.double(), *args), expected), (trial, args)


def test_decoder_sample_errors(decoder):
    logits = torch.zeros(2, V)
    shape_error = rf"logits must be a float tensor \[2, {V}\], got \[2, 4\]"
    with pytest.raises(ValueError, match=shape_error):
        decoder.sample(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logits must be a float tensor"):
        decoder.sample([[0.0] * V] * 2)
    bad = logits.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or \+inf \(row 1 does\)"):
        decoder.sample(bad)
    bad = logits.clone()
    bad[0] = float("-inf")
    with pytest.raises(ValueError, match=r"at least one entry > -inf in every row \(row 0\)"):
        decoder.sample(bad)
    with pytest.raises(ValueError, match="temperature"):
        decoder.sample(logits, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be at least"):
        decoder.sample(logits, temperature=1e-310)
    peaked = torch.tensor([[1.0, 3.0] + [2.0] * (V - 2)] * 2)
    assert decoder.sample(peaked, temperature=sampling.MIN_TEMPERATURE).tolist() == [1, 1]
    with pytest.raises(ValueError, match="top_p"):
        decoder.sample(logits, top_p=1.5)
    with pytest.raises(ValueError, match="step"):
        decoder.sample(logits, step=-1)
    rnn, emb, _ = make_model("LSTM", 1)
    with pytest.raises(ValueError, match="sample needs a head"):
        Decoder(rnn, emb, batch_size=2, backend="torch").sample(logits)


@needs_triton
@pytest.mark.parametrize("V", [137, 17, 1000])
def test_triton_sampler_is_the_rule(V):
    """The Triton Decoder's one-launch sampler against the rule's reference, token for token
    (exact ties, -inf entries, top-k / top-p, bad rows flagged), on every vocabulary width it
    compiles for a row (one lane block, several ranking chunks, a partial last chunk)."""
    from rnnkern.backends.triton import sampling as triton_sampling

    g = torch.Generator().manual_seed(V)
    B, C = 3, 4
    settings = [(1.0, 0, 1.0), (0.5, 3, 1.0), (2.0, 0, 0.5), (0.7, 6, 0.9)]
    for trial in range(4 if V < 1000 else 1):
        logits = torch.randn(B, V, generator=g) * 3
        if trial % 2 == 0:
            logits = logits.round()  # many exact ties
        if trial % 3 == 0:
            logits[:, ::2] = float("-inf")
        if trial == 1:
            logits[1, 5] = float("nan")
            logits[2] = float("-inf")
        for temperature, top_k, top_p in settings:
            dev = TRITON_DEVICE
            u = sampling.uniforms_table(5, 9 * trial, C, B, dev)
            col = torch.tensor(2, device=dev)
            tokens = torch.full((B, C), -1, dtype=torch.int64, device=dev)
            last = torch.full((B,), -1, dtype=torch.int64, device=dev)
            bad = torch.zeros(B, dtype=torch.int8, device=dev)
            params = torch.tensor([temperature, top_p], dtype=torch.float64, device=dev)
            triton_sampling.sample_rows(
                logits.to(dev), u, col, tokens, last, bad, params, top_k, top_p
            )
            expected, flagged = sampling.sample_tensor(
                logits, temperature, top_k, top_p, sampling.u64_tensor(5),
                sampling.u64_tensor(9 * trial + 2),
            )  # fmt: skip
            tokens, last, bad = tokens.cpu(), last.cpu(), bad.cpu()
            assert torch.equal(bad.bool(), flagged)
            assert torch.equal(tokens[:, 2], last)
            assert (tokens[:, [0, 1, 3]] == -1).all()  # only column col is written
            good = ~flagged
            assert torch.equal(last[good], expected[good]), (trial, temperature, top_k, top_p)


@needs_triton
def test_triton_decoder_over_the_kernels_vocabulary_uses_the_rule_in_torch_ops(monkeypatch):
    """Vocabularies wider than the sampling kernel takes sample with the torch-op form of the
    rule from the same uniforms table: the CPU decoder's tune either way."""
    from rnnkern.backends.triton import sampling as triton_sampling

    rnn, emb, head = make_model("LSTM", 2, seed=26)
    prime = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(27))
    kw = dict(temperature=0.9, top_k=5, top_p=0.9, seed=8)
    expected = make_decoder("torch", rnn, emb, head, batch_size=2).generate(prime, 12, **kw)
    unfused = make_decoder("triton", rnn, emb, head, batch_size=2)
    unfused.fused_sampling = False  # the same path, chosen (as gpu_decode's comparison row)
    assert torch.equal(unfused.generate(prime, 12, **kw).cpu(), expected)
    monkeypatch.setattr(triton_sampling, "MAX_VOCAB", V - 1)
    dec = make_decoder("triton", rnn, emb, head, batch_size=2)
    assert dec._triton_sample is None
    assert torch.equal(dec.generate(prime, 12, **kw).cpu(), expected)


@needs_cpu
def test_cpp_sampler_matches_python_sampler():
    _cpu = cpu_backend._cpu
    g = torch.Generator().manual_seed(12)
    for seed, stream, step in [(0, 0, 0), (1, 2, 3), (2**64 - 1, 5, 2**40), (99, 0, 7)]:
        assert _cpu.uniform(seed, stream, step) == sampling.uniform(seed, stream, step)
    B, Vs = 6, 50
    settings = [(1.0, 0, 1.0), (0.5, 3, 1.0), (2.0, 0, 0.5), (1.0, 10, 0.95), (0.9, 1, 1.0)]
    for trial in range(20):
        logits = torch.randn(B, Vs, generator=g) * 3
        if trial % 4 == 0:
            logits = logits.round()  # many exact ties
        if trial % 5 == 0:
            logits[:, ::3] = float("-inf")
        for temperature, top_k, top_p in settings:
            out = torch.empty(B, dtype=torch.int64)
            w = torch.empty(B, Vs, dtype=torch.float64)
            order = torch.empty(B, Vs, dtype=torch.int32)
            err = _cpu.sample_rows(
                logits.data_ptr(), B, Vs, temperature, top_k, top_p, 17, trial,
                out.data_ptr(), w.data_ptr(), order.data_ptr(),
            )  # fmt: skip
            assert err == -1
            expected = sampling.sample(logits, temperature, top_k, top_p, 17, trial)
            assert torch.equal(out, expected), (trial, temperature, top_k, top_p)


# ---------------------------------------------------------------------------------- errors


@pytest.fixture
def decoder():
    rnn, emb, head = make_model("LSTM", 1)
    return Decoder(rnn, emb, head, batch_size=2, backend="cpu" if HAVE_CPU else "torch")


def test_token_ids_out_of_range(decoder):
    with pytest.raises(ValueError, match=r"tokens must hold token ids in \[0, 13\)"):
        decoder.step(torch.tensor([0, V]))
    with pytest.raises(ValueError, match="tokens must hold token ids"):
        decoder.step(torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="prime must hold token ids"):
        decoder.generate(torch.tensor([[1, 99], [0, 0]]), 3)


def test_wrong_shapes_and_dtypes(decoder):
    with pytest.raises(ValueError, match=r"tokens must be a LongTensor of shape \[2\]"):
        decoder.step(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="tokens must have dtype torch.int64"):
        decoder.step(torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"prime must be a LongTensor \[B, S\] with B = 2"):
        decoder.generate(torch.tensor([1, 2]), 3)
    with pytest.raises(ValueError, match="prime must be a LongTensor"):
        decoder.generate(torch.zeros(3, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="at least one token"):
        decoder.generate(torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        decoder.generate(torch.zeros(2, 1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        decoder.step(torch.tensor([1, 2]), out=torch.empty(2, V, dtype=torch.float64))


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -2.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"seed": -1}, "seed"),
        # (the step indices are u64: the C++ decoder wrapped past 2**64, the torch one raised)
        ({"first_step": 2**64 - 2}, r"first_step \+ steps must be at most 2\*\*64"),
    ],
)
def test_bad_sampling_arguments(decoder, kw, name):
    with pytest.raises(ValueError, match=name):
        decoder.generate(torch.zeros(2, 1, dtype=torch.long), 3, **kw)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "torch"])
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_the_decoder_keeps_copies_of_the_weights(backend, weights):
    """Changing any of the modules' parameters in place after the Decoder was built changes
    nothing it computes: it had shared the biases (and on backend torch, most fp32 matrices)
    with the modules and copied the rest, so further training ran a mix of old and new."""
    rnn, emb, head = make_model("LSTM", 2, seed=4)
    dec = Decoder(rnn, emb, head, weights=weights, backend=backend)
    tokens = torch.tensor([3])
    before = dec.step(tokens)
    params = [*rnn.parameters(), *emb.parameters(), *head.parameters()]
    with torch.no_grad():
        for p in params:
            p.add_(0.5)
    dec.reset()
    assert torch.equal(dec.step(tokens), before)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "torch"])
def test_bad_state_and_huge_top_k_behave_alike_on_cpu_and_torch(backend):
    """Non-finite state: the same FloatingPointError on both, naming the first bad stream
    (backend torch raised sample's ValueError; cpu named the last bad stream). A top_k past
    the vocabulary is no limit on both (cpu raised pybind's TypeError from 2**63 on)."""
    rnn, emb, head = make_model("LSTM", 1, seed=2)
    dec = Decoder(rnn, emb, head, batch_size=3, backend=backend)
    prime = torch.zeros(3, 1, dtype=torch.long)
    expected = dec.generate(prime, 4, seed=5)
    for top_k in (V, 2**63, 2**70):
        dec.reset()
        assert torch.equal(dec.generate(prime, 4, seed=5, top_k=top_k), expected), top_k
    h = torch.zeros(1, 3, H)
    h[0, [0, 1]] = float("nan")
    dec.set_state((h, torch.zeros(1, 3, H)))
    with pytest.raises(FloatingPointError, match="logits of stream 0 became NaN"):
        dec.generate(prime, 3)


def test_bad_models():
    rnn, emb, head = make_model("LSTM", 1)
    with pytest.raises(ValueError, match="unidirectional"):
        Decoder(torch.nn.LSTM(E, H, bidirectional=True), backend="torch")
    with pytest.raises(ValueError, match="rnn must be a torch.nn or rnnkern LSTM"):
        Decoder(torch.nn.Linear(3, 3), backend="torch")
    with pytest.raises(ValueError, match="embedding_dim must equal"):
        Decoder(rnn, torch.nn.Embedding(V, E + 1), head, backend="torch")
    with pytest.raises(ValueError, match="head.in_features must equal"):
        Decoder(rnn, emb, torch.nn.Linear(H + 1, V), backend="torch")
    with pytest.raises(ValueError, match="weights must be 'fp32' or 'bf16'"):
        Decoder(rnn, emb, head, weights="int8", backend="torch")
    with pytest.raises(ValueError, match="backend must be 'cpu', 'triton', 'cuda' or 'torch'"):
        Decoder(rnn, emb, head, backend="tpu")
    if HAVE_CUDA_EXT:  # built: the model's device is what is wrong
        with pytest.raises(RuntimeError, match="backend 'cuda' decodes models on a CUDA device"):
            Decoder(rnn, emb, head, backend="cuda")
    else:
        with pytest.raises(RuntimeError, match="rnnkern._cuda is not built"):
            Decoder(rnn, emb, head, backend="cuda")
    with pytest.raises(ValueError, match="generate needs an embedding"):
        Decoder(rnn, backend="torch").generate(torch.zeros(1, 1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="must not exceed embedding.num_embeddings"):
        Decoder(rnn, emb, torch.nn.Linear(H, V + 1), backend="torch").generate(
            torch.zeros(1, 1, dtype=torch.long), 2
        )
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        Decoder(rnn, emb, head, batch_size=0, backend="torch")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got None"):
        Decoder(rnn, emb, head, batch_size=None, backend="torch")


@needs_cpu
@pytest.mark.parametrize(
    "backend",
    [pytest.param("triton", marks=needs_triton), pytest.param("cuda", marks=needs_cuda_decode)],
)
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0},
        {"temperature": 0.8, "top_k": 5, "top_p": 0.9, "seed": 2**64 - 1},
    ],
)
def test_device_backends_generate_the_cpu_decoders_tune(kw, weights, backend):
    """Same seed, same tokens on backends 'triton' (on-device sampling), 'cuda' (one kernel,
    the C++ rule's code on the device) and 'cpu' (C++). Their logits differ by float32
    rounding (about 1e-7 relative), which changes a token only when a uniform falls that close
    to a cumulative boundary (about 1e-6 per token); the seeds are fixed, so the outcome does
    not vary between runs."""
    rnn, emb, head = make_model("LSTM", 3, seed=15)
    prime = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(16))
    cpu = Decoder(rnn, emb, head, weights=weights, batch_size=3, backend="cpu")
    gpu = make_decoder(backend, rnn, emb, head, weights=weights, batch_size=3)
    expected = cpu.generate(prime, 40, **kw)
    got = gpu.generate(prime, 40, **kw)
    assert got.dtype == torch.int64
    assert got.device.type == (TRITON_DEVICE if backend == "triton" else CUDA_KERNELS_DEVICE)
    assert torch.equal(got.cpu(), expected)
    for a, b in zip(gpu.get_state(), cpu.get_state(), strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=1e-5)  # float32, 43 steps


@needs_cpu
@needs_triton
def test_triton_decoder_split_over_programs_generates_the_cpu_decoders_tune():
    """As above, with the Triton step's units split over the programs of a GPU of 4
    multiprocessors, which wait for each other after every layer (emulation.emulate_gpu; on a
    GPU the test above runs split already)."""
    if TRITON_DEVICE == "cuda":
        pytest.skip("on a GPU the test above runs the split step")
    from rnnkern.backends.triton.emulation import emulate_gpu

    rnn, emb, head = make_model("LSTM", 2, seed=15)
    prime = torch.randint(0, V, (3, 2), generator=torch.Generator().manual_seed(16))
    kw = {"temperature": 0.8, "top_k": 5, "top_p": 0.9, "seed": 7}
    cpu = Decoder(rnn, emb, head, batch_size=3, backend="cpu")
    expected = cpu.generate(prime, 12, **kw)
    with emulate_gpu(sms=4):
        split = make_decoder("triton", rnn, emb, head, batch_size=3)
        assert split._triton_step.n_split == 3  # (33 units in 16-unit chunks)
        got = split.generate(prime, 12, **kw)
    assert torch.equal(got, expected)
    for a, b in zip(split.get_state(), cpu.get_state(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # float32, 13 steps
    with pytest.raises(RuntimeError, match="step it inside emulate_gpu too"):
        split.step(prime[:, 0])  # (outside: its programs would run one after another)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@needs_triton
@pytest.mark.parametrize("graph_tokens", [8, 1])
def test_triton_cuda_graph_generate_equals_eager(graph_tokens):
    """The graphs replay the very launches the eager loop makes: identical tokens and state,
    with graphs of 8 tokens (33 tokens: 3 of them, then 7 of one token) and of one."""
    rnn, emb, head = make_model("LSTM", 3, seed=18)
    prime = torch.randint(0, V, (4, 3), generator=torch.Generator().manual_seed(19))
    graphed = make_decoder("triton", rnn, emb, head, batch_size=4)
    graphed.graph_tokens = graph_tokens
    eager = make_decoder("triton", rnn, emb, head, batch_size=4)
    eager.cuda_graphs = False
    for kw in ({"seed": 1}, {"seed": 2, "top_k": 5, "temperature": 0.8}):
        a = graphed.generate(prime, 33, **kw)
        b = eager.generate(prime, 33, **kw)
        assert torch.equal(a, b)
        for x, y in zip(graphed.get_state(), eager.get_state(), strict=True):
            assert torch.equal(x, y)
        # continuing reuses the captured graphs (same parity and sampling arguments)
        a = graphed.generate(a[:, -1:], 10, first_step=33, **kw)
        b = eager.generate(b[:, -1:], 10, first_step=33, **kw)
        assert torch.equal(a, b)


def test_replay_plan_runs_every_token_once():
    """generate's schedule on the device: every token once, the first and the last eagerly,
    graphs of graph_tokens in between and graphs of one for the remainder; graph_tokens=1 is
    a graph per token; without graphs every token is eager."""
    from rnnkern.decode import _replay_plan

    for steps in range(12):
        for per_graph in (1, 2, 8):
            plan = _replay_plan(steps, per_graph, True)
            assert sum(max(c, 1) for c in plan) == steps, (steps, per_graph, plan)
            if steps >= 3:
                assert plan[0] == 0 and plan[-1] == 0 and 0 not in plan[1:-1], plan
                ones = plan.count(1) if per_graph > 1 else 0
                assert plan[1 : len(plan) - 1 - ones] == [per_graph] * ((steps - 2) // per_graph)
                assert ones == (steps - 2) % per_graph
            else:
                assert plan == [0] * steps
        assert _replay_plan(steps, 1, True) == ([0] + [1] * (steps - 2) + [0] if steps >= 3
                                               else [0] * steps)  # fmt: skip
        assert _replay_plan(steps, 8, False) == [0] * steps
    assert _replay_plan(19, 8, True) == [0, 8, 8, 1, 0]
    for bad in (0, 3, -2, True, 2.0):
        with pytest.raises(ValueError, match="graph_tokens must be 1 or a positive even int"):
            _replay_plan(10, bad, True)


@needs_triton
def test_triton_errors():
    from rnnkern.decode import _triton_decode_module

    with pytest.raises(ValueError, match="backend 'triton' decodes CUDA tensors"):
        _triton_decode_module(torch.device("meta"))
    rnn, emb, head = make_model("GRU", 1, seed=17)
    with torch.no_grad():
        head.bias[3] = float("nan")
    dec = make_decoder("triton", rnn, emb, head, batch_size=2)
    with pytest.raises(FloatingPointError, match="logits of stream 0 became NaN"):
        dec.generate(torch.zeros(2, 1, dtype=torch.long), 3)
    dec = make_decoder("triton", *make_model("GRU", 1, seed=17), batch_size=2)
    before = [t.clone() for t in dec.get_state()]
    dec.graph_tokens = 3  # odd: a replay would end on the other state parity
    with pytest.raises(ValueError, match="graph_tokens must be 1 or a positive even int, got 3"):
        dec.generate(torch.zeros(2, 1, dtype=torch.long), 3)
    for a, b in zip(before, dec.get_state(), strict=True):  # nothing moved
        assert torch.equal(a, b)


def test_missing_extension_is_an_error_not_a_fallback(monkeypatch):
    rnn, emb, head = make_model("GRU", 1)
    monkeypatch.setattr(cpu_backend, "_cpu", None)
    with pytest.raises(RuntimeError, match="backend='torch'"):
        Decoder(rnn, emb, head)


# ---------------------------------------------------------------------------------- cuda


@needs_cuda_decode
@pytest.mark.parametrize("mode,layers,proj", [("LSTM", 3, 0), ("LSTM", 2, 7), ("GRU", 2, 0)])
def test_cuda_generate_state_matches_stepping(cuda_kernels, mode, layers, proj):
    """One launch for the prime and every token leaves the state and logits that stepping the
    same tokens one launch at a time leaves (the same kernel code per step)."""
    rnn, emb, head = make_model(mode, layers, proj, seed=20)
    prime = torch.randint(0, V, (4, 3), generator=torch.Generator().manual_seed(21))
    whole = make_decoder("cuda", rnn, emb, head, batch_size=4)
    out = whole.generate(prime, 25, seed=9, top_p=0.9)
    stepped = make_decoder("cuda", rnn, emb, head, batch_size=4)
    tokens = torch.cat([prime, out[:, :-1].cpu()], dim=1)
    for t in range(tokens.shape[1]):
        logits = stepped.step(tokens[:, t])
    assert torch.equal(logits, whole._logits)
    for a, b in zip(whole.get_state(), stepped.get_state(), strict=True):
        assert torch.equal(a, b)
    assert whole._cuda.last_launch["blocks"] >= 1


@needs_cuda_decode
@pytest.mark.parametrize(
    "mode,layers,proj,hidden,batch",
    [
        ("LSTM", 3, 0, H, 3),
        ("LSTM", 2, 7, H, 2),
        ("GRU", 1, 0, H, 2),  # the top layer carried through the head; the GRU reads its h
        ("GRU", 2, 0, 512, 40),
        ("RNN", 1, 0, H, 1),
    ],
)
def test_cuda_sync_modes_agree_bit_for_bit(cuda_kernels, mode, layers, proj, hidden, batch):
    """Flag-carrying words and grid barriers order the same arithmetic, and a recurrent part
    formed a step early is the same product of the same values: identical tokens, logits and
    state. 40 streams of a 512-unit GRU take several batch chunks per layer (nothing
    carried); the emulation takes them with 48 units and 16 KB of shared memory per block."""
    if cuda_kernels == "cpu" and hidden == 512:
        hidden = 48
        cuda_emulation.configure(4, 16 * 1024)
    torch.manual_seed(24)
    kw = {"proj_size": proj} if proj else {}
    rnn = getattr(torch.nn, mode)(E, hidden, num_layers=layers, **kw)
    emb, head = torch.nn.Embedding(V, E), torch.nn.Linear(proj or hidden, V)
    prime = torch.randint(0, V, (batch, 3), generator=torch.Generator().manual_seed(25))
    results = []
    for sync in ("flags", "barrier"):
        for carry in (True, False):
            dec = make_decoder("cuda", rnn, emb, head, batch_size=batch)
            dec._cuda.sync, dec._cuda.carry = sync, carry
            tokens = dec.generate(prime, 12, seed=8, top_k=7)
            launch = dec._cuda.last_launch
            assert launch["sync"] == sync
            assert launch["carry"] <= carry
            if batch <= 3:  # small models: everything fits, carry is taken when allowed
                assert launch["carry"] == carry
            if batch == 40:
                assert launch["batch_chunk"] < batch and not launch["carry"]
            tokens2 = dec.generate(tokens[:, -1:], 5, seed=8, first_step=12)  # tags continue
            logits = dec.step(tokens2[:, -1])
            results.append((tokens, tokens2, logits, *dec.get_state()))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@needs_cuda_decode
@pytest.mark.parametrize("sync", ["flags", "barrier"])
def test_cuda_generate_is_the_same_under_random_schedules(cuda_kernels, sync):
    """Emulation only: with blocks running ahead of each other at random (emulated schedule
    seeds, csrc/cuda/emulation.h), tokens, logits and state equal the in-order schedule's. The
    flags mode has no grid-wide barrier, so this is where a block that reads a ping-pong slot
    another block has already rewritten would show. 33 units on 32 SMs: 17 blocks of 2 units,
    13 of them with a head row, 4 without (which still stage the carried top state)."""
    if cuda_kernels != "cpu":
        pytest.skip("a GPU schedules its own blocks: this checks the emulation's schedules")
    rnn, emb, head = make_model("LSTM", 2, proj=7, seed=26)
    prime = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(27))
    results = []
    for schedule in (0, 1, 2, 3):
        cuda_emulation.configure(32, 232448, schedule)
        dec = make_decoder("cuda", rnn, emb, head, batch_size=2)
        dec._cuda.sync = sync
        tokens = dec.generate(prime, 8, seed=3, top_k=6)
        logits = dec.step(tokens[:, -1])
        assert dec._cuda.last_launch["blocks"] == 17
        results.append((tokens, logits, *dec.get_state()))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@needs_cuda_decode
def test_cuda_weights_in_l2_generate_the_cpu_decoders_tune(cuda_kernels):
    """A model too large for shared memory reads its weight slices from global memory (L2)
    instead; its tokens equal the CPU decoder's as for small models (fixed seeds, see
    test_device_backends_generate_the_cpu_decoders_tune). The emulation takes that path with
    64 units and 8 KB of shared memory per block."""
    torch.manual_seed(22)
    Hl = 1024
    if cuda_kernels == "cpu":
        Hl = 64
        cuda_emulation.configure(4, 8 * 1024)
    rnn = torch.nn.LSTM(E, Hl, num_layers=2)
    emb, head = torch.nn.Embedding(V, E), torch.nn.Linear(Hl, V)
    prime = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(23))
    gpu = make_decoder("cuda", rnn, emb, head, batch_size=2)
    got = gpu.generate(prime, 20, seed=4)
    assert not gpu._cuda.last_launch["weights_in_smem"]
    if HAVE_CPU:
        cpu = Decoder(rnn, emb, head, batch_size=2, backend="cpu")
        assert torch.equal(got.cpu(), cpu.generate(prime, 20, seed=4))


@needs_cuda_decode
def test_cuda_non_finite_logits_raise(cuda_kernels):
    """Non-finite logits are reported after the launch; as in the C++ decoder the streams go on
    with token 0, so the state afterwards is the C++ decoder's."""
    rnn, emb, head = make_model("GRU", 1, seed=17)
    with torch.no_grad():
        head.bias[3] = float("nan")
    dec = make_decoder("cuda", rnn, emb, head, batch_size=2)
    prime = torch.tensor([[1, 2], [3, 4]])
    with pytest.raises(FloatingPointError, match="logits of stream [01] became NaN"):
        dec.generate(prime, 3)
    if HAVE_CPU:
        cpu = Decoder(rnn, emb, head, batch_size=2, backend="cpu")
        with pytest.raises(FloatingPointError):
            cpu.generate(prime, 3)
        torch.testing.assert_close(dec.get_state().cpu(), cpu.get_state(), rtol=0, atol=1e-5)
    with torch.no_grad():  # the error was reported once and cleared
        dec._head_b[3] = 0.0
    assert dec.generate(torch.zeros(2, 1, dtype=torch.long), 3).shape == (2, 3)


@pytest.mark.skipif(
    not HAVE_CUDA_EXT,
    reason="rnnkern._cuda is not built (nvcc was not found at install time)",
)
def test_cuda_generate_plan_without_a_gpu():
    """The launch planner's arithmetic (host code) for an H100-like device (132 SMs, 227 KB of
    shared memory per block): folk-rnn's 3x512 LSTM keeps every weight slice on chip, in fp32
    and in bf16; a 3x1024 LSTM (80 MB of fp32 weights) reads them through L2; too large a
    vocabulary is a clear error."""
    from rnnkern import _cuda

    args = dict(
        cell=0, wdtype=0, proj=0, L=3, B=1, I=512, H=512, P=512, V=137, vocab_in=137, layers=1,
        table=1, head_w=1, head_b=1, h=1, parity=0, c=1, m=0, logits=1, feed=1, prime=1, x=0,
        steps=16, out=1, temperature=1.0, top_k=0, top_p=1.0, seed=0, first_step=0, sync=1,
        flags=0, carry=1, spin_sleep_ns=0, tag_base=0, xh=0, xm=0, xl=0, trace=0, trace_steps=0,
    )  # fmt: skip
    budget = 227 * 1024
    fp32 = _cuda.plan_generate_on(args, 132, budget)
    # 128 blocks of 4 units: W_hh0 (16 x 512) + 2 x (W_ih, W_hh) (16 x 512 each) + 2 head
    # rows, fp32: 32 + 128 + 4 KB of weights
    assert (fp32["blocks"], fp32["units_per_block"], fp32["head_per_block"]) == (128, 4, 2)
    assert fp32["weights_in_smem"] and fp32["smem_bytes"] >= (32 + 128 + 4) * 1024
    bf16 = _cuda.plan_generate_on(dict(args, wdtype=2), 132, budget)
    assert bf16["weights_in_smem"] and bf16["smem_bytes"] < fp32["smem_bytes"] - 80 * 1024
    b64 = _cuda.plan_generate_on(dict(args, B=64), 132, budget)
    assert b64["weights_in_smem"] and b64["sample_warps"] == 16 and b64["smem_bytes"] <= budget
    step = _cuda.plan_generate_on(dict(args, steps=0), 132, budget)  # Decoder.step
    assert not step["weights_in_smem"]  # one model step: copying in would cost a full read
    assert not step["carry"] and fp32["carry"] and bf16["carry"]
    assert not b64["carry"]  # 64 streams take several batch chunks: nothing carried
    assert not _cuda.plan_generate_on(dict(args, carry=0), 132, budget)["carry"]
    wide = _cuda.plan_generate_on(dict(args, B=32, V=1000, vocab_in=1000), 132, budget)
    # a 24 KB sampling slot per warp: beside the resident weights there is room for a few
    assert wide["weights_in_smem"] and 1 < wide["sample_warps"] < 16
    assert wide["smem_bytes"] <= budget
    big = _cuda.plan_generate_on(dict(args, I=1024, H=1024, P=1024), 132, budget)
    assert not big["weights_in_smem"] and big["units_per_block"] == 8
    with pytest.raises(ValueError, match="vocabulary of 20000 needs 480000 bytes"):
        _cuda.plan_generate_on(dict(args, V=20000, vocab_in=20000), 132, budget)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        _cuda.plan_generate_on(dict(args, temperature=0.0), 132, budget)
    with pytest.raises(ValueError, match="sampling needs a token table"):
        _cuda.plan_generate_on(dict(args, table=0, x=1), 132, budget)
    # flags mode: 16 model steps x 7 phases of fresh tags below 2^32, and exchange buffers
    flagged = dict(args, flags=1, tag_base=1, xh=1, xl=1)
    assert _cuda.plan_generate_on(flagged, 132, budget)["sync"] == "flags"
    assert fp32["sync"] == "barrier"
    with pytest.raises(ValueError, match=r"tags tag_base .. tag_base \+ 112 must lie in"):
        _cuda.plan_generate_on(dict(flagged, tag_base=2**32 - 100), 132, budget)
    with pytest.raises(ValueError, match="flags mode needs the exchange buffers"):
        _cuda.plan_generate_on(dict(flagged, xl=0), 132, budget)


def test_cuda_exchange_tags_are_never_reused():
    """Host side of flags mode (no GPU needed: the buffers are made on the CPU here): each
    launch spends fresh 32-bit tags; when they would run out, or the batch size changes, the
    exchange buffers are zeroed again and tags restart at 1 (0 is the buffers' initial value);
    one launch needing more tags than exist is an error that says how to split it."""
    from rnnkern.backends.cuda_decode import CudaDecode

    dec = CudaDecode.__new__(CudaDecode)  # geometry only: L=2, P=H=5, no projection, V=7
    dec.device, dec._geometry, dec._base = torch.device("cpu"), (2, 5, 5, False), {"V": 7, "L": 2}
    dec._exchange_batch, dec._xh, dec._xm, dec._xl, dec._tag_base = 0, None, None, None, 1
    dec._prepare_exchange(3, 50)
    assert dec._xh.shape == (2, 2, 3, 5) and dec._xl.shape == (3, 7) and dec._xm is None
    dec._xh.fill_(123)
    dec._tag_base = 2**32 - 60
    dec._prepare_exchange(3, 50)  # 50 more tags still fit below 2^32: buffers kept
    assert dec._tag_base == 2**32 - 60 and int(dec._xh.max()) == 123
    dec._prepare_exchange(3, 61)  # would pass 2^32: fresh zeroed buffers, tags from 1
    assert dec._tag_base == 1 and int(dec._xh.abs().max()) == 0
    dec._xh.fill_(123)
    dec._prepare_exchange(4, 5)  # another batch size: new buffers
    assert dec._xh.shape == (2, 2, 4, 5) and int(dec._xh.abs().max()) == 0
    with pytest.raises(ValueError, match="split it"):
        dec._prepare_exchange(4, 2**32)


def test_cuda_decode_settings_from_the_environment(monkeypatch):
    from rnnkern.backends import cuda_decode as cd

    monkeypatch.setenv("RNNKERN_CUDA_GENERATE_SYNC", "barrier")
    monkeypatch.setenv("RNNKERN_CUDA_GENERATE_CARRY", "0")
    assert cd._sync_mode_from_env() == "barrier" and cd._carry_from_env() is False
    monkeypatch.setenv("RNNKERN_CUDA_GENERATE_SYNC", "spin")
    with pytest.raises(ValueError, match="RNNKERN_CUDA_GENERATE_SYNC must be 'flags' or"):
        cd._sync_mode_from_env()
    monkeypatch.setenv("RNNKERN_CUDA_GENERATE_CARRY", "yes")
    with pytest.raises(ValueError, match="RNNKERN_CUDA_GENERATE_CARRY must be 0 or 1"):
        cd._carry_from_env()
    monkeypatch.setenv("RNNKERN_CUDA_GENERATE_SPIN_SLEEP_NS", "64")
    assert cd._spin_sleep_from_env() == 64
    monkeypatch.setenv("RNNKERN_CUDA_GENERATE_SPIN_SLEEP_NS", "-5")
    with pytest.raises(ValueError, match="SPIN_SLEEP_NS must be an int in"):
        cd._spin_sleep_from_env()


@pytest.mark.skipif(not HAVE_CUDA_EXT, reason="rnnkern._cuda is not built (no nvcc at install)")
def test_cuda_decode_status_words_become_exceptions():
    """CudaDecode.check decodes the kernel's status words ([arrivals, abort, error, row]) on
    the host: each error is raised once, as its own exception type, then cleared."""
    from rnnkern import _cuda
    from rnnkern.backends.cuda_decode import CudaDecode

    dec = CudaDecode.__new__(CudaDecode)
    dec._sync = torch.zeros(4, dtype=torch.int64)
    dec.check()  # nothing recorded
    dec._sync.copy_(torch.tensor([7, 0, int(_cuda.ERR_NON_FINITE), 2]))
    with pytest.raises(FloatingPointError, match="logits of stream 2 became NaN or"):
        dec.check()
    assert dec._sync[1:].tolist() == [0, 0, 0]
    dec.check()  # reported once
    dec._sync.copy_(torch.tensor([0, 0, int(_cuda.ERR_BAD_TOKEN), 1]))
    with pytest.raises(ValueError, match="token id of stream 1 is outside"):
        dec.check()
    # an abort (a wait past the timeout) is fatal and reported before anything else
    dec._sync.copy_(torch.tensor([0, int(_cuda.ERR_BARRIER_TIMEOUT), int(_cuda.ERR_NON_FINITE), 0]))
    with pytest.raises(RuntimeError, match="timed out"):
        dec.check()
    dec.check()


@needs_cuda_decode
@pytest.mark.parametrize("sync", ["flags", "barrier"])
@pytest.mark.parametrize("proj", [0, 4])
def test_cuda_generate_phase_trace(cuda_kernels, sync, proj):
    """Under rnnkern.backends.tracing.trace_phases the generate kernel stamps, for every block
    and model step, the points of csrc/cuda/api.h's generate_trace_points that it passes (layer
    0 reads the token table: no input stamp), in program order; with barriers, no block passes
    one before all arrived; tracing changes no token; and the phases benchmark reads it."""
    from rnnkern.backends import tracing
    from rnnkern.bench import phases

    L, n = 3, 5
    rnn, emb, head = make_model("LSTM", L, proj=proj)
    prime = torch.zeros(2, 1, dtype=torch.long)

    def decoder():
        dec = make_decoder("cuda", rnn, emb, head, batch_size=2)
        dec._cuda.sync = sync
        return dec

    plain = decoder().generate(prime, n, seed=3)
    with tracing.trace_phases(steps=n + 2) as traces:
        traced = decoder().generate(prime, n, seed=3)
    assert torch.equal(plain, traced)
    (trace,) = traces
    assert trace.kernel == "generate"
    st = trace.stamps.cpu()
    assert st.shape == (trace.info["blocks"], n + 2, 2 * L + 3)
    assert not st[
        :, n:
    ].any()  # n model steps (the prime's, then one per sampled token but the last)
    st = st[:, :n]
    passed = [0, 2] + [p for layer in range(1, L) for p in (1 + 2 * layer, 2 + 2 * layer)]
    passed += [2 * L + 1, 2 * L + 2]
    assert (st[:, :, passed] > 0).all() and not st[:, :, 1].any()
    flat = st[:, :, passed].flatten(1)  # each block's stamps in program order, step after step
    assert (flat[:, 1:] >= flat[:, :-1]).all()
    if sync == "barrier":  # (a, b): a barrier between point b and point a of each step
        for a, b in [(1 + 2 * layer, 2 * layer) for layer in range(1, L)] + [
            (2 * L + 2, 2 * L + 1)
        ]:
            assert (st[:, :, a].min(dim=0).values >= st[:, :, b].max(dim=0).values).all(), a
    row = phases.profile_generate(2, "fp32", sync, "cpu", model=(rnn, emb, head), tokens=4)
    assert sorted(row["phases_us"]) == sorted(
        [
            "layer 0",
            "wait 1",
            "layer 1",
            "wait 2",
            "layer 2",
            "head",
            "sample",
            "token",
            "timer step",
        ]  # fmt: skip
    )
    assert all(v is not None and v >= 0 for v in row["phases_us"].values())
    assert row["plan"].startswith(f"{row['launch']['blocks']} blocks") and sync in row["plan"]
