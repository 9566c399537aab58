"""Backend ``triton`` against ``reference``: outputs, final states, every gradient.

Without a CUDA device the kernels run on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``, set by ``tests/conftest.py`` before the backend is imported; set here
too when this file runs alone), at small shapes, one program after another, and in the
persistent split-hidden mode with the programs of a launch running at once
(``emulation.emulate_gpu``); with a CUDA device the same tests run compiled on CUDA tensors, at
more shapes (including the persistent split-hidden mode). Every buffer the
backend allocates starts as NaN (conftest fixture), so an output element a kernel never writes
fails the comparison.

Tolerances.

* float32: both sides round every product and sum to float32 (eps 1.2e-7) but sum in a different
  order. Over these sizes (sums of at most 4*H + P <= ~1300 terms, T <= 24 steps, a backward
  pass) the differences observed are a few 1e-7 relative to the largest magnitude, so
  ``rtol=1e-5`` and ``atol=1e-5 * max(1, max|ref|)``: ~80 ulps, still 1000x below a real mistake
  (a wrong gate or a missing term changes values at 1e-2).
* bfloat16 / float16: the float64 reference on the same (already rounded) inputs is the truth.
  Torch's own error in that dtype is measured with torch's two implementations run in that
  dtype: torch.nn (its fused RNN kernels) and the ``reference`` backend (the contract's
  roundings: ``gx``, ``y``, ``dgx`` in the 16-bit dtype); the larger of the two is the baseline.
  The kernel's maximum error on every output and gradient must be at most ``K_LOW = 4`` times
  that, plus a float32-rounding floor. Like cuDNN, the kernel rounds the recurrent matmul
  operands (``h``, ``dgh``, weights) to the 16-bit dtype at every step, which the reference
  does not; over 4 seeds x 5 cells x both dtypes the observed ratio peaks at 2.7 (max-abs errors
  over a few hundred elements fluctuate ~2x between seeds), so 4 holds with margin while a real
  mistake (a wrong term, a dropped rounding of state) shows up as 10x or more.
"""

from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.6')")

import layer_cases  # noqa: E402  (shared with test_backend_cuda.py)
from layer_cases import cell_of, layer_config, run  # noqa: E402
from tolerances import assert_float32_close

from rnnkern.backends import get_backend  # noqa: E402
from rnnkern.backends.triton import BACKEND, common  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not common.INTERPRET:
    pytest.skip(
        "no CUDA device and rnnkern.backends.triton was imported before TRITON_INTERPRET=1 was "
        "set; run with TRITON_INTERPRET=1",
        allow_module_level=True,
    )

CELLS = ("lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu")


@pytest.fixture(autouse=True)
def check_grid_waits(monkeypatch):
    """Every persistent-mode launch checks that no grid-wide wait timed out (CUDA only)."""
    monkeypatch.setattr(common, "CHECK_GRID_SYNC", True)


K_LOW = 4.0
NAMES = ("y", "h_n", "c_n", "x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def make_inputs(name, T, B, H, **kw):
    return layer_cases.make_inputs(name, T, B, H, device=DEVICE, **kw)


# ----------------------------------------------------------------------------------------------
# cases: (T, B, H, lengths, reverse, bias)
# ----------------------------------------------------------------------------------------------

CPU_CASES = {
    "T1_B1_H1": (1, 1, 1, None, False, True),
    "plain_H33": (4, 3, 33, None, False, True),
    "lengths": (5, 3, 33, [5, 2, 4], False, True),
    "reverse": (4, 2, 7, None, True, True),
    "lengths_reverse": (5, 3, 33, [3, 5, 1], True, True),
    "two_batch_tiles": (3, 33, 20, "random", True, True),
    "no_bias": (3, 2, 9, None, False, False),
}
GPU_CASES = {
    **CPU_CASES,
    "H32_one_chunk": (8, 4, 32, None, False, True),
    "H100_split": (12, 5, 100, "random", True, True),
    "H256_B64_split": (16, 64, 256, "random", False, True),
    "H500_B17": (6, 17, 500, None, True, True),
    "B300_many_tiles": (5, 300, 64, "random", True, True),
}
CASES = GPU_CASES if DEVICE == "cuda" else CPU_CASES


def _lengths(spec, T, B):
    if spec is None:
        return None
    if spec == "random":
        gen = torch.Generator().manual_seed(T * 1000 + B)
        lens = torch.randint(1, T + 1, (B,), generator=gen)
        lens[0] = T
        return lens.to(DEVICE)
    return torch.tensor(spec, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", CELLS)
def test_float32_matches_reference(name, case):
    T, B, H, spec, reverse, bias = CASES[case]
    if name == "lstm_proj" and H < 2:
        pytest.skip("a projection needs proj_size < hidden_size, impossible with H=1")
    inp = make_inputs(name, T, B, H, bias=bias)
    lengths = _lengths(spec, T, B)
    got = run(name, inp, "triton", lengths, reverse)
    ref = run(name, inp, "reference", lengths, reverse)
    assert_float32_close(got, ref)


@pytest.mark.parametrize("name", CELLS)
def test_inference_without_saving_matches_reference(name):
    # No input requires grad: the forward runs with save=False (ping-pong state buffers).
    T, B, H = 6, 3, 33
    inp = make_inputs(name, T, B, H)
    lengths = _lengths([6, 1, 4], T, B)
    with torch.no_grad():
        got = run(name, inp, "triton", lengths, True, grad=False)
        ref = run(name, inp, "reference", lengths, True, grad=False)
    assert_float32_close(got, ref)


@pytest.mark.parametrize("name", CELLS)
def test_saved_activations_follow_the_contract_layout(name):
    # backward of one backend must be able to consume what the contract says forward saves.
    cell = cell_of(name)
    inp = make_inputs(name, 4, 3, 10)
    lengths = _lengths([4, 2, 3], 4, 3)
    gx = torch.nn.functional.linear(inp["x"], inp["w_ih"], inp["b_ih"]).contiguous()
    args = (cell, gx, inp["h0"], inp["c0"], inp["w_hh"], inp["b_hh"], inp["w_hr"], lengths, True)
    got = BACKEND.forward(*args, True).saved
    ref = get_backend("reference").forward(*args, True).saved
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def _torch_module(name, inp, dtype):
    """torch.nn's own layer holding ``inp``'s weights, in ``dtype``."""
    I = inp["x"].shape[2]
    H = inp["w_hh"].shape[0] // {"lstm": 4, "gru": 3}.get(cell_of(name), 1)
    kw = dict(bias=inp["b_ih"] is not None)
    if name == "lstm_proj":
        mod = torch.nn.LSTM(I, H, proj_size=inp["w_hr"].shape[0], **kw)
    elif name == "lstm":
        mod = torch.nn.LSTM(I, H, **kw)
    elif name == "gru":
        mod = torch.nn.GRU(I, H, **kw)
    else:
        mod = torch.nn.RNN(I, H, nonlinearity=name[4:], **kw)
    with torch.no_grad():
        for pname in ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr"):
            if inp[pname] is not None:
                getattr(mod, f"weight_{pname[2:]}_l0" if pname[0] == "w" else f"bias_{pname[2:]}_l0"
                        ).copy_(inp[pname])  # fmt: skip
    return mod.to(device=DEVICE, dtype=dtype)


def _run_torch(name, inp, dtype, seed=1):
    """torch.nn in ``dtype``: outputs and gradients named as :func:`run` names them."""
    mod = _torch_module(name, inp, dtype)
    x = inp["x"].to(dtype).detach().clone().requires_grad_(True)
    h0 = inp["h0"].to(dtype).unsqueeze(0).detach().clone().requires_grad_(True)
    if cell_of(name) == "lstm":
        c0 = inp["c0"].to(dtype).unsqueeze(0).detach().clone().requires_grad_(True)
        y, (h_n, c_n) = mod(x, (h0, c0))
        outs, leaves = [y, h_n[0], c_n[0]], {"x": x, "h0": h0, "c0": c0}
    else:
        y, h_n = mod(x, h0)
        outs, leaves = [y, h_n[0]], {"x": x, "h0": h0}
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    for t in outs:
        u = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device)
        loss = loss + (t.double() * u).sum()
    for pname in ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr"):
        if inp[pname] is not None:
            attr = f"weight_{pname[2:]}_l0" if pname[0] == "w" else f"bias_{pname[2:]}_l0"
            leaves[pname] = getattr(mod, attr)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    out = dict(zip(("y", "h_n", "c_n")[: len(outs)], outs, strict=True))
    out.update({k: g.reshape(inp[k].shape) for k, g in zip(leaves, grads, strict=True)})
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", CELLS)
def test_low_precision_within_k_times_torch_error(name, dtype):
    T, B, H = (6, 3, 33) if DEVICE == "cpu" else (24, 16, 256)
    _check_low_precision(name, dtype, T, B, H)


@pytest.mark.parametrize("H", [16, 20])
@pytest.mark.parametrize("name", CELLS)
def test_16_unit_chunks_within_k_times_torch_error(name, H, monkeypatch):
    """The 16-unit chunks sm_90 gives 16-bit layers whose slices 32-unit chunks cannot hold
    (common.NARROW_BLOCK_H), run here as every layer's chunk: one chunk with its slices
    resident (H = 16, the narrow K_RES table), and two chunks streamed (H = 20)."""
    if DEVICE == "cuda":  # (device time: each is a kernel variant to compile)
        pytest.skip("on a GPU the wide-layer test below runs the 16-unit chunks the rule picks")
    monkeypatch.setattr(common, "BLOCK_H", common.NARROW_BLOCK_H)
    chosen = _spy_configs(monkeypatch, name, "k_res")
    _check_low_precision(name, torch.bfloat16, 5, 3, H)
    resident = H == 16 and name != "lstm_proj"
    assert [k > 0 for k in chosen] == [resident, resident], chosen


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_wide_16bit_layers_on_sm_90_keep_16_unit_slices(name):
    """On sm_90 a bfloat16 H = 512 LSTM or GRU keeps its slices resident in 16-unit chunks
    both ways (32-unit ones hold at most 1024 rows of slices forward, 512 backward), and stays
    within K_LOW times torch's error."""
    if DEVICE != "cuda" or torch.cuda.get_device_capability() not in common.NARROW_ARCHS:
        pytest.skip("the 16-unit chunks are chosen on sm_90 GPUs only")
    H = 512
    for kernel in (f"{name}_forward", f"{name}_backward"):
        config = common.launch_config(kernel, 4, H, H, torch.bfloat16, torch.device("cuda"))[0]
        assert (config.block_h, config.k_res > 0) == (16, True), (kernel, config)
    _check_low_precision(name, torch.bfloat16, 12, 4, H)


def _check_low_precision(name, dtype, T, B, H):
    inp = make_inputs(name, T, B, H, dtype=dtype)
    truth = run(name, inp, "reference", dtype=torch.float64)
    got = run(name, inp, "triton")
    torch_nn = _run_torch(name, inp, dtype)
    torch_ref = run(name, inp, "reference")
    for k, r in truth.items():
        err = (got[k].double() - r).abs().max().item()
        err_torch = max((t[k].double() - r).abs().max().item() for t in (torch_nn, torch_ref))
        # floor: float32 rounding of the largest value (the kernel's states are float32).
        floor = 4 * torch.finfo(torch.float32).eps * max(1.0, r.abs().max().item())
        assert err <= K_LOW * err_torch + floor, (
            f"{k}: triton error {err:.3e} > {K_LOW} x torch's {err_torch:.3e} + {floor:.1e}"
        )


def test_supports_gives_reasons():
    cfg = functools.partial(layer_config, device_type=DEVICE)

    assert BACKEND.supports(cfg()) is True
    reason = BACKEND.supports(cfg(dtype=torch.float64))
    assert isinstance(reason, str) and "float64" in reason
    reason = BACKEND.supports(cfg(device_type="mps"))
    assert isinstance(reason, str) and "mps" in reason


def test_faster_than_torch_follows_the_measured_table():
    cfg = functools.partial(layer_config, cell="gru", device_type="cuda",
                            dtype=torch.bfloat16, input_size=128, hidden_size=128,
                            batch_size=16, seq_len=256)  # fmt: skip

    if BACKEND.supports(cfg()) is not True:
        pytest.skip(f"triton cannot run CUDA configurations here: {BACKEND.supports(cfg())}")
    assert BACKEND.faster_than_torch(cfg()) is True
    assert BACKEND.faster_than_torch(cfg(cell="lstm", batch_size=256)) is True
    for slower in (dict(hidden_size=512), dict(dtype=torch.float32), dict(seq_len=64),
                   dict(cell="rnn_tanh"), dict(cell="lstm", proj_size=64)):  # fmt: skip
        assert isinstance(BACKEND.faster_than_torch(cfg(**slower)), str), slower


def test_float64_call_is_a_clear_error():
    inp = make_inputs("gru", 2, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        run("gru", inp, "triton", grad=False)


# ----------------------------------------------------------------------------------------------
# resident weights (forward kernels)
# ----------------------------------------------------------------------------------------------


def test_resident_weights_rule():
    """K_RES is the reduction length rounded up to a power of two (at least tl.dot's 16), while
    the slices fit: slices * K_RES <= 256 for IEEE float32 dots, <= 1024 on tensor cores, and
    K_RES <= 256 (512 for the LSTM and RNN backward in 16-bit, 64 for the GRU backward and the
    RNN forward in IEEE float32)."""
    f32, bf16 = torch.float32, torch.bfloat16
    assert common.resident_k("lstm_forward", 9, f32, "ieee") == 16
    assert common.resident_k("lstm_forward", 64, f32, "ieee") == 64
    assert common.resident_k("lstm_forward", 65, f32, "ieee") == 0
    assert common.resident_k("lstm_forward", 65, f32, "tf32") == 128
    assert common.resident_k("gru_forward", 256, bf16, "ieee") == 256
    assert common.resident_k("lstm_forward", 257, bf16, "ieee") == 0
    assert common.resident_k("rnn_forward", 256, f32, "tf32") == 256
    assert common.resident_k("rnn_forward", 65, f32, "ieee") == 0  # spills at 128 (IEEE)
    assert common.resident_k("rnn_backward", 256, f32, "ieee") == 256
    assert common.resident_k("rnn_forward", 257, bf16, "ieee") == 0  # one slice: <= 256 ...
    assert common.resident_k("lstm_backward", 4 * 128, bf16, "ieee") == 512  # ... but these
    assert common.resident_k("gru_backward", 3 * 128, bf16, "ieee") == 0
    assert common.resident_k("lstm_backward", 4 * 128, f32, "tf32") == 0
    cpu = torch.device("cpu")
    request = ("gru_forward", 9, f32, "ieee")
    config, n_split = common.choose_config(3, 9, cpu, request)
    assert (config.k_res, n_split) == (16, 1)
    # 32-row batch tiles, several hidden chunks per program, or no resident request: streamed
    assert common.choose_config(33, 9, cpu, request)[0].k_res == 0
    if common.INTERPRET:
        assert common.choose_config(3, 33, cpu, ("gru_forward", 33, f32, "ieee"))[0].k_res == 0
    assert common.choose_config(3, 9, cpu)[0].k_res == 0


def test_one_chunk_rule():
    """ONE_CHUNK exactly when every program owns one hidden chunk, with 16-row batch tiles."""
    cpu = torch.device("cpu")
    assert common.choose_config(3, 9, cpu)[0].one_chunk
    assert common.choose_config(16, 32, cpu)[0].one_chunk
    assert not common.choose_config(17, 9, cpu)[0].one_chunk  # 32-row tiles
    if common.INTERPRET:  # one program per batch tile: two chunks at H = 33
        assert not common.choose_config(3, 33, cpu)[0].one_chunk
    if DEVICE == "cuda":  # persistent: one chunk per program up to 32 * SMs units
        assert common.choose_config(16, 512, torch.device("cuda"))[0].one_chunk


def test_gemv_products_rule(monkeypatch):
    """Exact float32 up to GEMV_MAX_BATCH rows runs in GEMV mode (1 row a tile at B = 1, else
    4); TF32, 16-bit inputs and larger batches keep tl.dot; GEMV_PRODUCTS off gives tl.dot."""
    f32, bf16, cpu = torch.float32, torch.bfloat16, torch.device("cpu")
    assert common.products(f32, 1) == common.products(f32, 16) == "gemv"
    assert common.products(f32, 17) == "ieee"
    assert common.products(bf16, 1) == "ieee"
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert common.products(f32, 1) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    monkeypatch.setattr(common, "GEMV_PRODUCTS", False)
    assert common.products(f32, 1) == "ieee"
    # slices * K_RES * block_h <= GEMV_RESIDENT_FLOATS (16384 floats), any K_RES, and
    # rows * K_RES * block_h <= GEMV_PRODUCT_FLOATS (32768)
    assert common.resident_k("lstm_forward", 128, f32, "gemv", 32, 4) == 128
    assert common.resident_k("lstm_forward", 129, f32, "gemv", 32, 1) == 0
    assert common.resident_k("lstm_forward", 512, f32, "gemv", 8, 4) == 512
    assert common.resident_k("lstm_backward", 4 * 512, f32, "gemv", 8, 1) == 2048
    assert common.resident_k("lstm_backward", 4 * 512, f32, "gemv", 8, 4) == 0
    assert common.resident_k("gru_forward", 1024, f32, "gemv", 8, 1) == 0
    one = common.choose_config(1, 9, cpu, ("gru_forward", 9, f32, "gemv"), "gemv")[0]
    assert (one.block_b, one.block_h, one.k_res, one.one_chunk) == (1, 32, 16, True)
    assert common.choose_config(2, 9, cpu, None, "gemv")[0].block_b == 4
    assert common.choose_config(2, 9, cpu)[0].block_b == 16  # tl.dot's tiles


def test_gemv_chunks_spread_the_weights_over_the_sms(monkeypatch):
    """On a GPU (here a stand-in with 132 SMs) GEMV mode takes 32-unit chunks where a
    program's slices fit in registers, else 8-unit ones where those fit and one program per SM
    allows, else streams the weights from the smallest chunks that fit on the SMs."""
    import types

    monkeypatch.setattr(common, "INTERPRET", False)
    props = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    cuda = torch.device("cuda")

    def plan(kernel, B, H):
        config, n_split = common.launch_config(kernel, B, H, H, torch.float32, cuda)
        assert config.precision == "gemv"
        tiles = -(-B // config.block_b)
        return config.block_b, config.block_h, tiles * n_split, config.k_res, config.one_chunk

    assert plan("lstm_forward", 1, 128) == (1, 32, 4, 128, True)
    assert plan("lstm_backward", 1, 128) == (1, 32, 4, 512, True)
    assert plan("lstm_forward", 1, 512) == (1, 8, 64, 512, True)
    assert plan("lstm_backward", 1, 512) == (1, 8, 64, 2048, True)
    assert plan("lstm_backward", 4, 512) == (4, 8, 64, 0, True)  # 4 x 2048 x 8: too big
    assert plan("gru_forward", 16, 256) == (4, 8, 128, 256, True)
    # too many weights a program at any chunk size that fits: streamed, from 8-unit chunks
    assert plan("lstm_forward", 1, 1024) == (1, 8, 128, 0, True)
    # 4 batch tiles of 8-unit chunks would need 256 programs: 32-unit chunks, streamed
    assert plan("lstm_forward", 16, 512) == (4, 32, 64, 0, True)
    # more than 16 rows: GEMV mode where it keeps the slices resident, up to 64 rows
    assert plan("lstm_forward", 64, 128) == (4, 32, 64, 128, True)
    assert plan("gru_backward", 33, 64) == (4, 32, 18, 256, True)
    for B, H in ((64, 256), (65, 128)):  # not resident (128 programs of 32 units), 65 rows
        config = common.launch_config("lstm_forward", B, H, H, torch.float32, cuda)[0]
        assert (config.precision, config.block_b) == ("ieee", 32), (B, H, config)


@pytest.mark.parametrize("rows", [3, 33])
@pytest.mark.parametrize("name", CELLS)
def test_float32_products_through_tl_dot_match_reference(name, rows, monkeypatch):
    """GEMV mode off: float32 runs on tl.dot's 16- and 32-row tiles again, and matches the
    reference (the comparisons above run GEMV mode at these batch sizes)."""
    chosen = _spy_configs(monkeypatch, name, "precision")
    monkeypatch.setattr(common, "GEMV_PRODUCTS", False)
    T, B, H = (5, rows, 20) if DEVICE == "cpu" else (12, 16 * (rows // 3), 100)
    inp = make_inputs(name, T, B, H)
    lengths = _lengths("random", T, B)
    got = run(name, inp, "triton", lengths, reverse=True)
    assert chosen == ["ieee", "ieee"], chosen
    assert_float32_close(got, run(name, inp, "reference", lengths, reverse=True))


@pytest.mark.parametrize("geometry", ["1_row_resident", "4_rows_chunk_loop"])
@pytest.mark.parametrize("name", CELLS)
def test_gemv_chunks_of_8_units_match_reference(name, geometry, monkeypatch):
    """GEMV mode with the 8-unit chunks the GPU rule picks for larger layers: one row and a
    single chunk (weights resident, ONE_CHUNK), and 4-row tiles over 2 batch tiles and 3
    chunks (the chunk loop; on the CPU, one program a tile, the weights streamed)."""
    monkeypatch.setattr(common, "GEMV_BLOCK_H", (8,))
    if geometry == "4_rows_chunk_loop":  # (on a GPU too: every program runs the loop)
        monkeypatch.setattr(common, "ONE_CHUNK", False)
    chosen = _spy_configs(monkeypatch, name, "block_h")
    T, B, H = (4, 1, 8) if geometry == "1_row_resident" else (5, 5, 20)
    inp = make_inputs(name, T, B, H)
    lengths = None if B == 1 else _lengths([5, 2, 4, 1, 3], T, B)
    got = run(name, inp, "triton", lengths, reverse=True)
    assert chosen == [8, 8] or DEVICE == "cuda", chosen
    assert_float32_close(got, run(name, inp, "reference", lengths, reverse=True))


def test_16_unit_chunks_rule(monkeypatch):
    """On sm_90 (here a stand-in with 132 SMs), a 16-bit layer at B <= 16 whose slices no
    32-unit chunk holds keeps them in 16-unit chunks where the narrow K_RES table allows and
    the chunks fit one program per SM (ONE_CHUNK kernels); elsewhere (other GPUs, 32-row
    tiles, the chunk loop) nothing changes."""
    import types

    monkeypatch.setattr(common, "INTERPRET", False)
    props = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[0])
    cuda, bf16 = torch.device("cuda"), torch.bfloat16

    def plan(kernel, B, H, dtype=bf16):
        config, n_split = common.launch_config(kernel, B, H, H, dtype, cuda)
        return config.block_h, n_split, config.k_res

    assert plan("lstm_forward", 16, 256) == (32, 8, 256)  # 32-unit slices fit
    assert plan("lstm_forward", 1, 512) == (16, 32, 512)
    assert plan("lstm_backward", 16, 512) == (16, 32, 2048)
    assert plan("lstm_forward", 1, 1024) == (32, 32, 0)  # spills at 1024: streamed
    assert plan("gru_forward", 1, 1024) == (16, 64, 1024)
    assert plan("gru_backward", 1, 1024) == (32, 32, 0)  # 3 * 1024 rows: 4096 overflows
    assert plan("rnn_forward", 1, 512) == (32, 16, 0)
    assert plan("gru_forward", 1, 4096)[0] == 32  # 256 chunks of 16 > 132 SMs
    assert plan("lstm_forward", 17, 512) == (32, 16, 0)  # 32-row tiles
    assert plan("lstm_forward", 1, 512, torch.float16) == (16, 32, 512)
    monkeypatch.setattr(common, "ONE_CHUNK", False)  # the chunk loop's slices would not fit
    assert plan("lstm_backward", 16, 512) == (32, 16, 0)
    monkeypatch.setattr(common, "ONE_CHUNK", True)
    capability[0] = (8, 0)
    assert plan("lstm_forward", 1, 512) == (32, 16, 0)
    assert common.compiles_for(90, 16, "ieee") and not common.compiles_for(80, 16, "ieee")
    assert common.compiles_for(80, 32, "ieee") and common.compiles_for(80, 8, "gemv")


def _spy_configs(monkeypatch, name, attr):
    """The list that collects ``config.<attr>`` of every launch configuration the cell's
    launchers choose from now on (forward, then backward)."""
    from rnnkern.backends.triton import gru, lstm, rnn

    module = {"lstm": lstm, "gru": gru}.get(cell_of(name), rnn)
    chosen = []
    real = common.launch_config

    def spy(*args, **kw):
        config, n_split = real(*args, **kw)
        chosen.append(getattr(config, attr))
        return config, n_split

    monkeypatch.setattr(module, "launch_config", spy)
    return chosen


@pytest.mark.parametrize("name", CELLS)
def test_one_chunk_kernels_equal_the_chunk_loop(name, monkeypatch):
    """The ONE_CHUNK variant of the forward and backward kernels (the chunk's state or running
    gradients, and the next step's inputs, carried in registers) computes exactly what the
    chunk loop does, bit for bit: the same operations in the same order, only the loads
    move."""
    chosen = _spy_configs(monkeypatch, name, "one_chunk")
    T, B, H = (7, 3, 20) if DEVICE == "cpu" else (24, 16, 256)
    inp = make_inputs(name, T, B, H)
    lengths = _lengths([7, 2, 5] if DEVICE == "cpu" else "random", T, B)
    carried = run(name, inp, "triton", lengths, reverse=True)
    # forward and backward (the LSTM backward loops with a projection: its state and hidden
    # chunks differ)
    assert chosen == [True, name != "lstm_proj"], chosen
    monkeypatch.setattr(common, "ONE_CHUNK", False)
    chosen.clear()
    looped = run(name, inp, "triton", lengths, reverse=True)
    assert chosen == [False, False], chosen
    for key in carried:
        assert torch.equal(carried[key], looped[key]), key


@pytest.mark.parametrize("name", CELLS)
def test_kernels_keep_weights_resident_where_the_rule_allows(name, monkeypatch):
    """The forward and backward launchers ask for resident weights (not the LSTM with a
    projection) and get them at this size, and outputs and gradients equal the streamed
    kernels' up to float32 rounding (the reference comparisons above run both paths at their
    sizes)."""
    chosen = _spy_configs(monkeypatch, name, "k_res")
    T, B, H = (5, 3, 9) if DEVICE == "cpu" else (12, 16, 64)
    inp = make_inputs(name, T, B, H)
    resident = run(name, inp, "triton")
    assert len(chosen) == 2, chosen  # forward, backward
    assert all((k > 0) == (name != "lstm_proj") for k in chosen), chosen
    monkeypatch.setattr(common, "RESIDENT", False)
    chosen.clear()
    streamed = run(name, inp, "triton")
    assert chosen == [0, 0]
    assert_float32_close(resident, streamed)


def test_resident_slices_are_the_programs_chunk():
    """resident_gates returns W_gᵀ[:, chunk] of each gate and resident_columns W[:, chunk]
    (zeros past the matrix): checked for a chunk other than 0 directly (the layer tests reach
    it only in persistent launches: on a GPU, or under emulation.emulate_gpu)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(w_ptr, out_ptr, chunk, H, P, G: tl.constexpr, BLOCK_H: tl.constexpr,
              K_RES: tl.constexpr):  # fmt: skip
        w0, w1, w2, w3 = common.resident_gates(w_ptr, chunk, H, P, G, BLOCK_H, K_RES)
        cols = common.resident_columns(w_ptr, chunk, G * H, P, BLOCK_H, K_RES)
        idx = tl.arange(0, K_RES)[:, None] * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
        n = K_RES * BLOCK_H
        tl.store(out_ptr + idx, w0.to(tl.float32))
        tl.store(out_ptr + n + idx, w1.to(tl.float32))
        tl.store(out_ptr + 2 * n + idx, w2.to(tl.float32))
        tl.store(out_ptr + 3 * n + idx, w3.to(tl.float32))
        tl.store(out_ptr + 4 * n + idx, cols.to(tl.float32))

    G, H, P, BH, KR = 3, 40, 20, 32, 32
    w = torch.randn(G * H, P, device=DEVICE)
    out = torch.full((5, KR, BH), float("nan"), device=DEVICE)
    probe[(1,)](w, out, 1, H, P, G=G, BLOCK_H=BH, K_RES=KR)
    for g in range(4):
        expected = torch.zeros(KR, BH, device=DEVICE)
        gate = g if g < G else 0  # gates past G repeat gate 0
        expected[:P, : H - BH] = w[gate * H + BH : gate * H + H].t()
        assert torch.equal(out[g], expected), g
    # columns: chunk 1 of P = 20 is empty (units 32..63), so use a wider matrix as well
    assert torch.equal(out[4], torch.zeros(KR, BH, device=DEVICE))
    w = torch.randn(KR - 2, 2 * BH + 5, device=DEVICE)  # K = 30 rows, P = 69 columns
    out = torch.full((5, KR, BH), float("nan"), device=DEVICE)
    probe[(1,)](w, out, 1, 10, w.shape[1], G=G, BLOCK_H=BH, K_RES=KR)
    expected = torch.zeros(KR, BH, device=DEVICE)
    expected[: KR - 2] = w[:, BH : 2 * BH]
    assert torch.equal(out[4], expected)


# ----------------------------------------------------------------------------------------------
# persistent launches on the CPU (emulation.emulate_gpu: the interpreter runs a launch's programs
# at once, so they meet at their grid-wide waits as on a GPU)
# ----------------------------------------------------------------------------------------------

# geometry: (T, B, H, sms, dtype, settings of common changed to reach it at a small size, the
# plan (block_h, n_split, one_chunk) of every launch, and exceptions to it by cell name or by
# cell name and direction). The LSTM backward with a projection always loops (its state and
# hidden chunks differ), and no launch with a projection keeps its weights resident.
EMULATED = {
    # 4-row GEMV tiles, 2 programs of one 32-unit chunk each, slices resident in registers
    "gemv_one_chunk": (5, 3, 40, 4, torch.float32, {}, (32, 2, True), {}),
    # GEMV's 8-unit chunks, which wide layers get (a lower register budget makes H = 40 one):
    # 5 programs of 1-row tiles; the RNN's one slice still fits 32 units
    "gemv_8_unit_chunks": (5, 1, 40, 8, torch.float32, {"GEMV_RESIDENT_FLOATS": 2048},
                           (8, 5, True), {"rnn_tanh": (32, 2, True), "rnn_relu": (32, 2, True)}),
    # 4 chunks over 2 programs: each loops over 2 chunks, weights streamed
    "gemv_chunk_loop": (4, 3, 100, 2, torch.float32, {}, (32, 2, False), {}),
    # tl.dot's 16-row tiles, 2 programs of one chunk each (the GRU backward's slices exceed the
    # IEEE table and stream)
    "dot_one_chunk": (5, 5, 40, 4, torch.float32, {"GEMV_PRODUCTS": False}, (32, 2, True), {}),
    # 32-row tiles, 4 chunks over 2 programs (one chunk a program only up to 16 rows)
    "dot_chunk_loop": (4, 20, 100, 2, torch.float32, {"GEMV_PRODUCTS": False}, (32, 2, False),
                       {}),
    # two batch tiles of 2 programs each, a counter each: GEMV's 4-row tiles and tl.dot's 32
    "gemv_two_batch_tiles": (4, 7, 40, 4, torch.float32, {}, (32, 2, True), {}),
    "dot_two_batch_tiles": (4, 33, 40, 4, torch.float32, {"GEMV_PRODUCTS": False},
                            (32, 2, False), {}),
    # sm_90's 16-unit chunks for 16-bit layers whose slices 32-unit chunks cannot hold (a lower
    # K_RES limit makes H = 40 one): 3 programs. The LSTM and RNN backward's own 16-bit limit
    # (512) still takes 32 units; a projection keeps no slices.
    "bf16_16_unit_chunks": (5, 3, 40, 4, torch.bfloat16, {"RESIDENT_MAX_K": 32}, (16, 3, True),
                            {"lstm backward": (32, 2, True), "rnn_tanh backward": (32, 2, True),
                             "rnn_relu backward": (32, 2, True), "lstm_proj": (32, 2, True)}),
}  # fmt: skip


@pytest.fixture
def emulated_gpu():
    """emulation.emulate_gpu, on the CPU only: on a GPU the persistent launches run for real
    (GPU_CASES)."""
    if DEVICE == "cuda":
        pytest.skip("on a GPU the persistent launches run compiled (GPU_CASES and the rest)")
    from rnnkern.backends.triton.emulation import emulate_gpu

    return emulate_gpu


def _spy_plans(monkeypatch, name):
    """The list that collects ``(kernel, config, n_split)`` of every launch the cell's
    launchers plan from now on."""
    from rnnkern.backends.triton import gru, lstm, rnn

    module = {"lstm": lstm, "gru": gru}.get(cell_of(name), rnn)
    plans = []
    real = common.launch_config

    def spy(kernel, *args, **kw):
        config, n_split = real(kernel, *args, **kw)
        plans.append((kernel, config, n_split))
        return config, n_split

    monkeypatch.setattr(module, "launch_config", spy)
    return plans


@pytest.mark.parametrize("geometry", list(EMULATED))
@pytest.mark.parametrize("name", CELLS)
def test_persistent_launches_match_reference(name, geometry, emulated_gpu, monkeypatch):
    """Forward and backward in the persistent modes a GPU runs (hidden units split over
    programs that wait for each other once a step, twice with a projection), with variable
    lengths, reversed. float32: outputs and every gradient as the reference's. bfloat16: as
    the same kernels' with programs one after another (their error against float64 is the
    K_LOW tests'; here only the split differs, which changes no sum). Every launch is checked
    to be planned as the geometry says, so none of this runs the sequential mode."""
    T, B, H, sms, dtype, settings, plan, exceptions = EMULATED[geometry]
    for key, value in settings.items():
        monkeypatch.setattr(common, key, value)
    lengths = _lengths("random", T, B) if B > 1 else None
    inp = make_inputs(name, T, B, H, dtype=dtype)
    if dtype == torch.float32:
        want = run(name, inp, "reference", lengths, reverse=True)
    else:
        want = run(name, inp, "triton", lengths, reverse=True)
    plans = _spy_plans(monkeypatch, name)
    with emulated_gpu(sms=sms):
        got = run(name, inp, "triton", lengths, reverse=True)
    assert [kernel.split("_")[1] for kernel, *_ in plans] == ["forward", "backward"], plans
    for kernel, config, n_split in plans:
        direction = kernel.split("_")[1]
        block_h, n, one = exceptions.get(f"{name} {direction}", exceptions.get(name, plan))
        one = one and not (name == "lstm_proj" and direction == "backward")
        assert config.split and (config.block_h, n_split, config.one_chunk) == (block_h, n, one), (
            kernel, config, n_split
        )  # fmt: skip
    assert_float32_close(got, want)


def test_emulated_gpu_runs_programs_at_once_and_reports_failures(emulated_gpu, monkeypatch):
    """Under emulate_gpu the programs of a launch meet at a counter (one after another they
    never would); a program that raises fails the launch with its error before the timeout
    (the others, left waiting for it, stop at their next load); a wait that never completes
    (common.grid_wait, a jit function inside the kernel) fails it after ``timeout_s``; on
    leaving the block, by an error too, the interpreter is as it was, and launches are
    planned for one program a batch tile again."""
    import sys
    import time

    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    from rnnkern.backends.triton.emulation import emulate_gpu

    @triton.jit
    def meet(counter_ptr, seen_ptr, target, FAIL: tl.constexpr):
        pid = tl.program_id(0)
        if FAIL:
            if pid == 2:
                tl.arange(0, 3)  # (not a power of 2: the interpreter raises)
        tl.atomic_add(counter_ptr, 1)
        seen = tl.load(counter_ptr, volatile=True)
        while seen < target:
            seen = tl.load(counter_ptr, volatile=True)
        tl.store(seen_ptr + pid, seen)

    @triton.jit
    def wait_for_one_more(sync_ptr):
        common.grid_arrive(sync_ptr, True)
        common.grid_wait(sync_ptr, 0, tl.num_programs(0) + 1, True)

    executor = interpreter.GridExecutor
    state = (sys.getswitchinterval(), executor.__init__, executor.__call__,
             type(interpreter.interpreter_builder))  # fmt: skip
    counter = torch.zeros(1, dtype=torch.int32)
    seen = torch.zeros(4, dtype=torch.int32)
    with emulated_gpu(sms=4, timeout_s=60):
        meet[(4,)](counter, seen, 4, FAIL=False)
        assert seen.tolist() == [4, 4, 4, 4]
        counter.zero_()
        start = time.monotonic()
        with pytest.raises(Exception, match=r"program \(2, 0\) of the launch failed.*power"):
            meet[(4,)](counter, seen, 4, FAIL=True)
        assert time.monotonic() - start < 30  # (stopped long before the timeout)
    with pytest.raises(ZeroDivisionError):
        with emulated_gpu(sms=4, timeout_s=1):
            with pytest.raises(Exception, match="4 of 4 programs were still running after 1 s"):
                wait_for_one_more[(4,)](torch.zeros(1, dtype=torch.int32))
            with pytest.raises(RuntimeError, match="not reentrant"):
                with emulate_gpu():
                    pass
            cpu = torch.device("cpu")
            assert common.launch_config("gru_forward", 3, 40, 40, torch.float32, cpu)[1] == 2
            raise ZeroDivisionError("leaving the block by an error")
    assert (sys.getswitchinterval(), executor.__init__, executor.__call__,
            type(interpreter.interpreter_builder)) == state  # fmt: skip
    assert common.EMULATED_GPU is None
    cpu = torch.device("cpu")
    assert common.launch_config("gru_forward", 3, 40, 40, torch.float32, cpu)[1] == 1
    with pytest.raises(ValueError, match="sms must be an int >= 1, got 0"):
        with emulate_gpu(sms=0):
            pass
    monkeypatch.setattr(common, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="emulate_gpu needs Triton's interpreter"):
        with emulate_gpu():
            pass


# ----------------------------------------------------------------------------------------------
# phase tracing (rnnkern.backends.tracing.trace_phases; the phases benchmark's source)
# ----------------------------------------------------------------------------------------------

# The points each kernel passes (common.TRACE_POINTS), in program order, by kernel, projection
# and ONE_CHUNK (the forward stamps its products, 5, only there).
TRACED = {
    ("forward", False, False): [0, 3, 4],
    ("forward", False, True): [0, 5, 3, 4],
    ("forward", True, False): [0, 1, 2, 3, 4],
    ("forward", True, True): [0, 5, 1, 2, 3, 4],
    ("backward", False, False): [0, 3, 4, 5],
    ("backward", False, True): [0, 3, 4, 5],
    ("backward", True, False): [0, 1, 2, 3, 4, 5],
}
# (a, b, next): a grid-wide wait between point b of a step and point a of that step (of the
# next step with next): no program of a batch tile gets to a before all of them passed b.
WAITS = {
    ("forward", False): [(0, 3, True)],
    ("forward", True): [(2, 1, False), (0, 3, True)],
    ("backward", False): [(5, 3, False)],
    ("backward", True): [(2, 1, False), (5, 3, False)],
}


@pytest.mark.parametrize("grid", ["device", "emulated GPU"])
@pytest.mark.parametrize("chunks", ["one chunk", "chunk loop"])
@pytest.mark.parametrize("name", ["lstm", "lstm_proj", "gru", "rnn_tanh"])
def test_phase_trace_stamps_each_phase_in_order(name, chunks, grid, request):
    """Under trace_phases every program of the forward and backward kernels stamps, for each
    traced step, the points its kernel passes and no other, in program order, and no step past
    T; where programs wait for each other (a GPU's persistent launches, and the interpreter's
    under emulation.emulate_gpu, where the clock is a counter all programs share), none passes
    a wait before every program of its batch tile arrived; tracing changes no result, bit for
    bit. With one hidden chunk per program (ONE_CHUNK: the arrival is stamped inside the tile
    step) and with the chunk loop."""
    from rnnkern.backends import tracing

    if DEVICE == "cuda" and (name, chunks) not in (("lstm", "one chunk"),
                                                   ("lstm_proj", "chunk loop")):  # fmt: skip
        pytest.skip(
            "on CUDA two cases, which between them pass every stamp of the LSTM "
            "kernels (one chunk a program; the loop with a projection): each traced "
            "variant is a compile of its own, and the GPU check's tests have minutes"
        )
    one = chunks == "one chunk"
    emulated = grid == "emulated GPU"
    if emulated:  # 4-row GEMV tiles: 2 programs of one chunk, or 2 looping over 4 chunks
        emulate_gpu = request.getfixturevalue("emulated_gpu")
        T, B, H, sms = 5, 3, 40 if one else 100, 4 if one else 2
    elif DEVICE == "cpu":  # one program per batch tile: H <= 32 is one chunk
        T, B, H = 5, 3, 20 if one else 40
    else:  # persistent launches: 16-row tiles one chunk each, or 32-row tiles looping
        T, B, H = 6, 16 if one else 40, 256
    inp = make_inputs(name, T, B, H)
    lengths = _lengths("random", T, B)
    with emulate_gpu(sms=sms) if emulated else contextlib.nullcontext():
        plain = run(name, inp, "triton", lengths, reverse=True)
        with tracing.trace_phases(steps=T + 1) as traces:
            traced = run(name, inp, "triton", lengths, reverse=True)
    assert plain.keys() == traced.keys()
    for key in plain:
        assert torch.equal(plain[key], traced[key]), key
    assert [(t.backend, t.kernel) for t in traces] == [("triton", "forward"),
                                                        ("triton", "backward")]  # fmt: skip
    proj = name == "lstm_proj"
    for t in traces:
        # (the backward of an LSTM with a projection always loops: its state and hidden
        # chunks differ)
        assert t.info["one_chunk"] == (one and not (proj and t.kernel == "backward")), t.info
        st = t.stamps.cpu()
        assert st.shape == (t.info["programs"], T + 1, common.TRACE_POINTS)
        assert not st[:, T].any()  # no step T: nothing stamped
        st = st[:, :T]
        points = TRACED[t.kernel, proj, t.info["one_chunk"]]
        others = [p for p in range(common.TRACE_POINTS) if p not in points]
        assert (st[:, :, points] > 0).all() and not st[:, :, others].any()
        order = st[:, :, points].flatten(1)  # each program's stamps in program order
        assert (order[:, 1:] >= order[:, :-1]).all()
        if DEVICE == "cpu" and not emulated:
            assert not t.info["split"]  # (programs run one after another: no waits to check)
            continue
        assert t.info["split"] and t.info["n_split"] > 1, t.info
        tiles = st.view(t.info["batch_tiles"], t.info["n_split"], T, common.TRACE_POINTS)
        for a, b, next_step in WAITS[t.kernel, proj]:
            first_out = tiles[:, :, 1:, a] if next_step else tiles[:, :, :, a]
            last_in = tiles[:, :, :-1, b] if next_step else tiles[:, :, :, b]
            assert (first_out.min(dim=1).values >= last_in.max(dim=1).values).all(), (t.kernel, a)


def test_phases_profile_times_every_triton_phase(tmp_path):
    """The phases benchmark's rows for backend triton: each kernel's phases, every one timed
    (under the interpreter the clock counts stamps: the columns and files are what is
    checked)."""
    if DEVICE == "cuda":
        pytest.skip(
            "the rows are checked under the interpreter; on a GPU the gpu_check stage "
            "'phases' runs this with real times (its traced compiles cost tens of seconds here)"
        )
    from rnnkern.bench import phases

    rows = []
    for cell, H, proj in (("LSTM", 9, 0), ("LSTM", 9, 4), ("GRU", 9, 0), ("LSTM", 40, 0)):
        rows += phases.profile(cell, torch.float32, 3, H, DEVICE, T=6, proj=proj, steps=6,
                               backend="triton")  # fmt: skip
    assert [(r["backend"], r["case"].split()[0], r["kernel"]) for r in rows] == [
        ("triton", cell, kernel) for cell in ("LSTM", "LSTM", "GRU", "LSTM")
        for kernel in ("forward", "backward")
    ]  # fmt: skip
    for r in rows:
        proj = "proj=" in r["case"]
        if r["kernel"] == "forward":  # H = 9: one chunk, the products stamped; 40: a loop
            want = ["products", "cells"] if "H=9 " in r["case"] else ["work"]
            want += (["projection wait", "projection"] if proj else []) + ["stores", "wait"]
        else:
            want = ["projection", "projection wait"] if proj else []
            want += ["cells", "stores", "wait", "dh product"]
        want += ["step", "arrival spread", "timer step"]
        assert list(r["phases_us"]) == want, r["case"]
        assert all(v is not None and v >= 0 for v in r["phases_us"].values()), r
        assert r["plan"] == r["launch"]["plan"], r
        assert r["plan"].startswith(f"{r['launch']['programs']} program"), r["plan"]
    md = phases.write(rows, tmp_path, "test", device=DEVICE)
    text = md.read_text()
    assert "## triton forward" in text and "## triton backward" in text
    assert "| LSTM B=3 H=9 T=6 float32 proj=4 |" in text


def test_explain_describes_the_triton_launches():
    """rnnkern.explain gives, for backend triton, the forward's and the backward's launch in
    words: programs, batch tiles, chunks, where the weights live, what the products run on."""
    import rnnkern

    gru = rnnkern.GRU(20, 20, backend="triton").to(DEVICE)
    text = rnnkern.explain(gru, torch.randn(5, 3, 20, device=DEVICE))
    lines = text.splitlines()
    assert lines[0] == "backend 'triton': asked for by name", text
    dev = torch.device(DEVICE)
    for line, kernel in zip(lines[1:], ("gru_forward", "gru_backward"), strict=True):
        config, n_split = common.launch_config(kernel, 3, 20, 20, torch.float32, dev)
        assert config.k_res and config.one_chunk  # one 32-unit chunk, weights on chip
        direction = kernel.split("_")[1]
        assert line == f"  {direction}: {common.plan_text(config, n_split, 3, torch.float32)}"
    if DEVICE == "cpu":  # one program, no split; the forward's slices span H, the backward's 3H
        assert lines[1] == (
            "  forward: 1 program (1 batch tile of 4 rows x 1 hidden split), 32 units a chunk, "
            "one chunk a program, weights resident in registers (32-row slices), products on "
            "float32 FMAs (GEMV: broadcast, summed over k)"
        )
        assert "weights resident in registers (64-row slices)" in lines[2]
    lstm = rnnkern.LSTM(40, 40, proj_size=8, backend="triton").to(DEVICE)
    text = rnnkern.explain(lstm, torch.randn(5, 3, 40, device=DEVICE))
    assert text.count("weights read from L2") == 2, text  # no residency with a projection
    assert "backward: " in text and "chunk loop" in text.splitlines()[2], text
