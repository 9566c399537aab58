"""Backend ``cpu`` (csrc/cpu) against the ``reference`` backend: outputs, states, every gradient.

float32 (and float16/bfloat16) results are judged against a float64 reference: the kernel's
error may be at most 3x the error of the float32 reference backend on the same inputs, plus a
floor of 8 float32 ulps of the largest magnitude (the rule flash-attention uses). Both errors
are float32 rounding: different summation orders in the GEMMs and polynomial activations
(about 2 ulp) instead of torch's (1 ulp), so a factor of 3 covers them while a wrong formula
(an error of order 1e-2 or more) fails. float64 results must match the float64 reference to
1e-12 relative: sums of a few hundred float64 terms over at most 8 steps err by less than 1e-13.

Every buffer the kernels write is filled with NaN first (tests/conftest.py poisons
``backends.base.empty``), so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_within_float32_error

import rnnkern
from rnnkern.backends import cpu as cpu_backend
from rnnkern.backends.base import LayerConfig
from rnnkern.functional import rnn_layer

pytestmark = [
    pytest.mark.skipif(
        cpu_backend._cpu is None, reason="rnnkern._cpu is not built: " + cpu_backend.build_hint()
    ),
    pytest.mark.host_only,  # nothing here needs a GPU (gpu_check.sh leaves it out)
]

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def make_inputs(cell, T, B, I, H, proj, seed=0):
    """float64 leaves; weights scaled like torch.nn's init (uniform in +-1/sqrt(H))."""
    G, P = GATES[cell], proj or H
    g = torch.Generator().manual_seed(seed)
    bound = H**-0.5

    def u(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * bound

    return {
        "x": torch.randn(T, B, I, generator=g, dtype=torch.float64),
        "h0": torch.randn(B, P, generator=g, dtype=torch.float64) * 0.5,
        "c0": torch.randn(B, H, generator=g, dtype=torch.float64) * 0.5 if cell == "lstm" else None,
        "w_ih": u(G * H, I),
        "w_hh": u(G * H, P),
        "b_ih": u(G * H),
        "b_hh": u(G * H),
        "w_hr": u(P, H) if proj else None,
    }


NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def run(cell, inputs, dtype, backend, lengths, reverse, grads_seed=1):
    """Outputs (y, h_n, c_n) and gradients of all leaves under random upstream gradients."""
    leaves = {k: (None if v is None else v.to(dtype).requires_grad_()) for k, v in inputs.items()}
    y, h_n, c_n = rnn_layer(
        cell, *(leaves[k] for k in NAMES), lengths=lengths, reverse=reverse, backend=backend
    )
    outs = [o for o in (y, h_n, c_n) if o is not None]
    g = torch.Generator().manual_seed(grads_seed)
    upstream = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    present = [v for v in leaves.values() if v is not None]
    grads = torch.autograd.grad(outs, present, upstream)
    return [t.detach().double() for t in (*outs, *grads)]


def check(cell, T, B, I, H, proj=0, lengths=None, reverse=False, dtype=torch.float32):
    inputs = make_inputs(cell, T, B, I, H, proj)
    gold = run(cell, inputs, torch.float64, "reference", lengths, reverse)
    got = run(cell, inputs, dtype, "cpu", lengths, reverse)
    if dtype == torch.float64:
        for k, (a, b) in enumerate(zip(got, gold, strict=True)):
            scale = 1.0 + float(b.abs().max())
            assert float((a - b).abs().max()) <= 1e-12 * scale, f"tensor {k}"
        return
    ref = run(cell, inputs, dtype, "reference", lengths, reverse)
    for k, (a, r, b) in enumerate(zip(got, ref, gold, strict=True)):
        assert_within_float32_error(a, b, r, f"tensor {k}")


CELL_CASES = [("lstm", 0), ("lstm", 5), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)]


@pytest.mark.parametrize("cell,proj", CELL_CASES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_parity_float32(cell, proj, reverse, with_lengths):
    lengths = torch.tensor([7, 3, 1, 7, 5]) if with_lengths else None
    check(cell, 7, 5, 6, 33, proj, lengths, reverse)


@pytest.mark.parametrize("cell,proj", CELL_CASES)
def test_parity_float64(cell, proj):
    check(cell, 6, 3, 5, 33, proj, torch.tensor([6, 2, 4]), True, torch.float64)
    check(cell, 6, 3, 5, 33, proj, None, False, torch.float64)


@pytest.mark.parametrize(
    "T,B,I,H",
    [(1, 1, 1, 1), (1, 3, 4, 100), (5, 2, 3, 1), (9, 8, 16, 100)],
    ids=["T1-B1-H1", "T1-H100", "H1", "threaded-H100"],
)
@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 3), ("gru", 0), ("rnn_tanh", 0)])
def test_odd_shapes(T, B, I, H, cell, proj):
    lengths = torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(T + B))
    check(cell, T, B, I, H, proj, lengths, reverse=True)
    check(cell, T, B, I, H, proj)


@pytest.mark.parametrize("isa", cpu_backend._cpu.supported_isas() if cpu_backend._cpu else [])
@pytest.mark.parametrize("cell,proj", [("lstm", 4), ("gru", 0), ("rnn_relu", 0)])
def test_every_instruction_set(isa, cell, proj):
    before = cpu_backend._cpu.isa()
    cpu_backend._cpu.set_isa(isa)
    try:
        # H=37 exercises vector tails of every width; B=8 with H=37 runs on several threads.
        check(cell, 5, 8, 7, 37, proj, torch.tensor([5, 1, 3, 5, 2, 4, 5, 5]), reverse=True)
        check(cell, 4, 3, 7, 37, proj, None, reverse=False, dtype=torch.float64)
    finally:
        cpu_backend._cpu.set_isa(before)


@pytest.mark.parametrize("cell,proj", CELL_CASES)
def test_inference_without_saved_activations(cell, proj):
    # Under no_grad the forward keeps h (and c) in a 2-slot ring instead of the saved layout;
    # the result must be the same computation, bit for bit.
    inputs = {
        k: None if v is None else v.float().requires_grad_()
        for k, v in make_inputs(cell, 6, 4, 5, 40, proj).items()
    }
    lengths = torch.tensor([6, 2, 5, 1])
    with_grad = rnn_layer(cell, *(inputs[k] for k in NAMES), lengths=lengths, reverse=True,
                          backend="cpu")  # fmt: skip
    with torch.no_grad():
        without = rnn_layer(cell, *(inputs[k] for k in NAMES), lengths=lengths, reverse=True,
                            backend="cpu")  # fmt: skip
    for a, b in zip(with_grad, without, strict=True):
        assert (a is None and b is None) or torch.equal(a.detach(), b)
    assert with_grad[0].requires_grad and not without[0].requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(dtype):
    check("lstm", 5, 4, 6, 24, 0, torch.tensor([5, 2, 4, 1]), False, dtype)


def test_saved_layout_matches_reference():
    from rnnkern.backends import reference

    inputs = make_inputs("lstm", 6, 4, 5, 16, 0)
    lengths = torch.tensor([6, 2, 5, 3])
    w_ih, b_ih = inputs["w_ih"].float(), inputs["b_ih"].float()
    gx = torch.nn.functional.linear(inputs["x"].float(), w_ih, b_ih).contiguous()
    args = ("lstm", gx, inputs["h0"].float(), inputs["c0"].float(), inputs["w_hh"].float(),
            inputs["b_hh"].float(), None, lengths, True, True)  # fmt: skip
    got = cpu_backend.BACKEND.forward(*args)
    ref = reference.BACKEND.forward(*args)
    # Same float32 inputs, the same formulas: only rounding differs (< 1e-5 on values <= 1).
    for a, b in zip(got.saved, ref.saved, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.y, ref.y, rtol=0, atol=1e-5)


def test_supports_gives_reasons():
    config = LayerConfig("lstm", "cpu", torch.float32, 4, 8, 0, 2, 3, False, True)
    assert cpu_backend.BACKEND.supports(config) is True
    cuda = LayerConfig("lstm", "cuda", torch.float32, 4, 8, 0, 2, 3, False, True)
    assert "CPU" in cpu_backend.BACKEND.supports(cuda)
    ints = LayerConfig("gru", "cpu", torch.int32, 4, 8, 0, 2, 3, False, True)
    assert "int32" in cpu_backend.BACKEND.supports(ints)


def test_faster_than_torch_follows_the_measured_grid():
    """LSTM float32 goes to ``cpu`` only where benchmarks/results/cpu_dispatch-* measured it
    faster than oneDNN (B*H >= 8192, H <= 512, T >= 128); other cells always."""
    from rnnkern import dispatch

    def cfg(cell="lstm", B=32, H=512, T=256, proj=0, dtype=torch.float32, grad=True):
        return LayerConfig(cell, "cpu", dtype, H, H, proj, B, T, False, grad)

    be = cpu_backend.BACKEND
    for faster in (cfg(), cfg(B=64, H=128, T=128), cfg(B=16, H=512), cfg(H=256)):
        assert be.faster_than_torch(faster) is True, faster
    for slower in (cfg(B=16, H=256), cfg(B=4, H=512), cfg(H=1024), cfg(T=64), cfg(grad=False)):
        assert "oneDNN" in be.faster_than_torch(slower), slower
        assert dispatch.choose("auto", slower, training=True).backend == "torch"
    assert dispatch.choose("auto", cfg(), training=True).backend == "cpu"
    for other in (
        cfg(cell="gru", B=1, H=64, T=16),
        cfg(cell="rnn_tanh", B=1, H=64, T=32, grad=False),
        cfg(B=1, T=16, proj=64),
        cfg(dtype=torch.float64),
    ):
        assert be.faster_than_torch(other) is True, other


def test_faster_than_torch_in_16_bits_follows_the_measured_grid(monkeypatch):
    """16-bit inputs go to ``cpu`` where benchmarks/results/cpu_16bit-* measured it faster
    (from T = 16; float16 inference from 32): bfloat16 GRU and RNN up to the largest layer
    measured, and every cell in float16 on a CPU without float16 arithmetic; the bfloat16 LSTM
    stays with oneDNN's, and what was not measured (float16 where the CPU has float16
    arithmetic, bfloat16 where it has no AVX512-BF16, larger bfloat16 layers, projections)
    with torch.nn."""
    from rnnkern import dispatch

    def cfg(cell="gru", dtype=torch.bfloat16, T=16, grad=True, proj=0):
        return LayerConfig(cell, "cpu", dtype, 128, 128, proj, 1, T, False, grad)

    def wide(cell="gru", B=32, H=512):
        return LayerConfig(cell, "cpu", torch.bfloat16, H, H, 0, B, 128, False, True)

    be = cpu_backend.BACKEND
    monkeypatch.setattr(cpu_backend, "_NATIVE_FLOAT16", False)
    monkeypatch.setattr(cpu_backend, "_AVX512_BF16", True)
    faster = [cfg(), cfg(grad=False), cfg("rnn_relu", T=64), cfg("rnn_tanh", grad=False)]
    faster += [wide(B=8), wide("rnn_tanh", B=16, H=256)]
    faster += [cfg(cell, torch.float16) for cell in ("lstm", "gru", "rnn_tanh")]
    faster += [cfg(cell, torch.float16, T=32, grad=False) for cell in ("lstm", "rnn_tanh")]
    for config in faster:
        assert be.faster_than_torch(config) is True, config
        assert dispatch.choose("auto", config, training=True).backend == "cpu", config
    for config, why in (
        (cfg("lstm"), "oneDNN's fused bfloat16 LSTM"),
        (cfg("lstm", grad=False, T=64), "oneDNN's fused bfloat16 LSTM"),
        (cfg(T=15), "below T=16 for bfloat16 training"),
        (cfg("rnn_tanh", torch.float16, T=31, grad=False), "below T=32 for float16 inference"),
        (cfg("lstm", torch.float16, T=8), "below T=16 for float16 training"),
        (cfg("lstm", proj=64), "for bfloat16 LSTMs with a projection"),
        (wide(B=9), "up to batch*hidden = 4096 and hidden 512 only"),
        (wide("rnn_tanh", B=1, H=1024), "its lead falling as layers grow (got B=1, H=1024)"),
    ):
        assert why in be.faster_than_torch(config), config
        assert dispatch.choose("auto", config, training=True).backend == "torch", config
    monkeypatch.setattr(cpu_backend, "_NATIVE_FLOAT16", True)
    assert "multiplies float16 at hardware speed" in be.faster_than_torch(cfg(dtype=torch.float16))
    assert be.faster_than_torch(cfg()) is True
    monkeypatch.setattr(cpu_backend, "_AVX512_BF16", False)
    assert "without AVX512-BF16" in be.faster_than_torch(cfg())


def test_short_calls_stay_with_torch(monkeypatch):
    """Per-step-ATen configurations go to ``cpu`` only from the sequence lengths where
    benchmarks/results/cpu_short-* measured it faster: training from T = 8 (GRU) or 16 (the
    others), inference from T = 32; the cells (T = 1) never."""
    from rnnkern import dispatch

    def cfg(cell="gru", T=1, grad=True, proj=0, dtype=torch.float32):
        return LayerConfig(cell, "cpu", dtype, 64, 64, proj, 16, T, False, grad)

    be = cpu_backend.BACKEND
    for short in (cfg(), cfg(T=7), cfg(T=31, grad=False), cfg("rnn_relu", T=15),
                  cfg("lstm", proj=32), cfg("lstm", dtype=torch.float64, grad=False)):  # fmt: skip
        assert "fixed cost" in be.faster_than_torch(short), short
        assert dispatch.choose("auto", short, training=True).backend == "torch"
    for long_enough in (cfg(T=8), cfg("rnn_tanh", T=16), cfg(T=32, grad=False)):
        assert be.faster_than_torch(long_enough) is True, long_enough

    chosen = []
    real_select = rnnkern.nn.select
    monkeypatch.setattr(
        rnnkern.nn, "select", lambda *a, **k: chosen.append(real_select(*a, **k)) or chosen[-1]
    )
    for cls in (rnnkern.GRUCell, rnnkern.RNNCell, rnnkern.LSTMCell):
        for dtype in (torch.float32, torch.float64):
            cell, x = cls(64, 64, dtype=dtype), torch.randn(16, 64, dtype=dtype)
            cell(x)
            text = rnnkern.explain(cell, x)  # (explain and choose_backend take cells too)
            assert text.startswith("backend 'torch'") and "skipped 'cpu'" in text, text
            assert cell.choose_backend(x).backend == "torch"
    assert chosen == ["torch"] * 6


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_cpu", None)
    reason = cpu_backend.CPUBackend().available()
    assert isinstance(reason, str) and "pip install" in reason and "C++17" in reason
    with pytest.raises(RuntimeError, match="pip install"):
        cpu_backend.BACKEND.forward(
            "rnn_tanh", torch.zeros(1, 1, 2), torch.zeros(1, 2), None, torch.zeros(2, 2),
            None, None, None, False, False,
        )  # fmt: skip


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu_backend._cpu.set_isa("sse9")
