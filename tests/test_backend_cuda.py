"""Backend ``cuda`` (csrc/cuda, module ``rnnkern._cuda``).

Everywhere: the kernels compile for sm_80 and sm_90 (one representative configuration per
kernel: every cell's forward and backward in float32; ``python -m
rnnkern.backends.cuda_compile_check`` compiles every dtype), and the backend explains why it
cannot run. Then the kernels run (fixture ``cuda_kernels``, tests/conftest.py): on a GPU where
there is one and the extension is built, else on their CPU emulation
(``rnnkern.backends.cuda_emulation``: the same sources compiled for the CPU, every CUDA thread a
fiber). Parity against ``reference`` through ``rnnkern.functional.rnn_layer`` (outputs, final
states, every gradient; odd shapes, lengths, reverse, no bias, projection, batch larger than
one shared-memory chunk, weights too large to stay resident in shared memory), the inference
path, the saved-activation layout and the 16-bit dtypes. The emulation is slow (a fiber switch
at every barrier and warp shuffle), so it runs the large GPU cases at emulation size instead:
the emulated device's SM count and shared memory are set so that the same plan branches
(split-K partial sums, several batch chunks, weights read from global memory, uneven work
split) are taken by small layers. Every buffer the backend allocates starts as NaN
(tests/conftest.py), so an element a kernel never writes fails the comparison; the emulation
also fills each block's shared memory with NaN bytes.

On a GPU, before any kernel runs in this process, a subprocess runs every cell once with
``RNNKERN_CUDA_DEBUG=1`` and a 5 s barrier timeout: a kernel that faults or deadlocks then
fails these tests with its message instead of leaving this process's CUDA context unusable for
the rest of the suite.

Tolerances.

* float32: both sides round every product and sum to float32 but sum in a different order
  (the kernel: per-warp strided partial sums and a butterfly reduction; torch: its GEMM). Over
  these sizes (sums of at most 4*H <= 8192 terms, T <= 16 steps, a backward pass) that is a
  few 1e-7 relative to the largest magnitude, so ``rtol=1e-5`` and
  ``atol=1e-5 * max(1, max|ref|)`` (the Triton backend's tests use the same), while a real
  mistake (a wrong gate, a missing term, a wrong time index) changes values at 1e-2 or more.
* bfloat16 / float16: truth is the float64 reference on the same (already rounded) inputs.
  torch's own error in that dtype is the larger of torch.nn's (cuDNN) and the ``reference``
  backend's run in that dtype. The kernel rounds at exactly the points the reference does
  (``gx`` as given, ``y`` and ``dgx`` to the 16-bit dtype, everything else float32: ``h`` is
  never rounded to 16 bits), so the two differ only where a float32 summation-order
  difference moves a value across a 16-bit rounding boundary: at most one more 16-bit half-ulp
  on the affected element, i.e. at most twice the reference's own rounding error. Hence
  ``K_LOW = 2`` plus a float32 floor of 4 ulps of the largest value. The bfloat16 tensor-core
  matvec (``mma``) also rounds h (forward) and dpre (backward) to bfloat16 as they enter the
  product, which torch.nn's bfloat16 path does too (its states and gradients are bfloat16
  tensors), so its extra error is of the kind already in torch's and the same bound holds
  (emulated, the largest ratio to torch's error over every cell and plan is 1.7).
* float32 with TF32 allowed (the TF32 tensor-core matvec): truth is the float64 reference, the
  yardstick the float64 reference with its products' operands rounded to TF32; the same
  argument gives ``K_LOW`` (see ``test_tf32_matvec_within_k_times_a_tf32_computation``).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import layer_cases  # sibling test modules (pytest puts tests/ on sys.path)
import pytest
import test_nn_parity
import torch
from layer_cases import cell_of, layer_config, run
from tolerances import assert_float32_close

from rnnkern.backends import cuda as cuda_backend
from rnnkern.backends import cuda_emulation, get_backend, tracing
from rnnkern.backends.base import LayerConfig

ROOT = Path(__file__).resolve().parents[1]
BACKEND = cuda_backend.BACKEND
HAVE_GPU = torch.cuda.is_available() and cuda_backend._cuda is not None
NO_GPU_REASON = (
    "no CUDA device visible to torch"
    if not torch.cuda.is_available()
    else "rnnkern._cuda is not built: " + cuda_backend.build_hint()
)

CELLS = ("lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu")
K_LOW = 2.0


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# ----------------------------------------------------------------------------------------------
# without a GPU
# ----------------------------------------------------------------------------------------------


NO_NVCC = shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME")


@pytest.mark.host_only  # an ahead-of-time compile
@pytest.mark.skipif(NO_NVCC, reason="nvcc (CUDA toolkit) is not installed: nothing to compile with")
def test_compile_check_subset_compiles_every_kernel_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, "-m", "rnnkern.backends.cuda_compile_check", "--arch", "sm_80,sm_90",
         "--subset", "--json", str(out)],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    # forward and backward of 4 cells (the training lstm covers the projection at run time)
    # and generation of 5 (the projection is a variant of its own), 2 archs
    assert len(rows) == 26
    cells = ("lstm", "gru", "rnn_tanh", "rnn_relu")
    assert {(r["kernel"], r["cell"], r["arch"]) for r in rows} == {
        (k, c, a)
        for k in ("layer_forward_kernel", "layer_backward_kernel", "generate_kernel")
        for c in cells + (("lstm_proj",) if k == "generate_kernel" else ())
        for a in ("sm_80", "sm_90")
    }
    for r in rows:
        assert r["ok"] and 0 < r["registers"] <= 128, r
    assert "26 kernels compiled for sm_80, sm_90: 0 failed" in res.stdout


@pytest.mark.host_only
def test_compile_check_rejects_unknown_arch():
    res = subprocess.run(
        [sys.executable, "-m", "rnnkern.backends.cuda_compile_check", "--arch", "ampere"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert res.returncode != 0 and "unknown architecture 'ampere'" in res.stderr


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_cuda", None)
    reason = cuda_backend.CUDABackend().available()
    assert isinstance(reason, str)
    assert "rnnkern._cuda is not built" in reason and "setup.py build_ext" in reason
    with pytest.raises(RuntimeError, match="nvcc"):
        cuda_backend.CUDABackend()._check("gru", torch.zeros(2, 1, 3), torch.zeros(3, 1), None)


@pytest.mark.skipif(HAVE_GPU, reason="a CUDA device is present: covered by the GPU tests")
def test_without_a_device_the_reason_is_given():
    config = LayerConfig("lstm", "cuda", torch.float32, 256, 256, 0, 16, 256, False, True)
    for reason in (BACKEND.supports(config), BACKEND.faster_than_torch(config)):
        assert isinstance(reason, str)
        assert ("no CUDA device" in reason) or ("not built" in reason)


# ----------------------------------------------------------------------------------------------
# with a GPU
# ----------------------------------------------------------------------------------------------

_CANARY = r"""
import itertools, os
import torch
from rnnkern.functional import rnn_layer
torch.manual_seed(0)
cells = (("lstm", 0), ("lstm", 3), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0))
shapes = ((3, 2, 7), (2, 3, 2048), (3, 20, 64))
matvecs = (("simple", torch.float32), ("tiled", torch.float32), ("mma", torch.bfloat16),
           ("mma", "tf32"))  # fmt: skip
for (matvec, dtype), (cell, proj), (T, B, H) in itertools.product(matvecs, cells, shapes):
    if matvec == "mma" and (H % 4 or (proj or H) % 4):
        continue  # its wide loads need sizes in multiples of 4
    os.environ["RNNKERN_CUDA_MATVEC"] = matvec
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
    dtype = torch.float32 if dtype == "tf32" else dtype
    print("running", matvec, cell, "proj", proj, "T B H", T, B, H, flush=True)
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    P = proj or H
    d = dict(device="cuda", requires_grad=True)
    w = dict(device="cuda", dtype=dtype)
    x = torch.randn(T, B, 5, **w).requires_grad_()
    h0 = torch.randn(B, P, **d)
    c0 = torch.randn(B, H, **d) if cell == "lstm" else None
    w_ih = torch.randn(G * H, 5, **w).requires_grad_()
    w_hh = (torch.randn(G * H, P, **w) / P**0.5).requires_grad_()
    w_hr = torch.randn(P, H, **w).requires_grad_() if proj else None
    lengths = torch.tensor([T] + [1] * (B - 1), device="cuda")
    y, h, c = rnn_layer(cell, x, h0, c0, w_ih, w_hh, None, None, w_hr, lengths=lengths,
                        reverse=True, backend="cuda")
    loss = y.sum() + h.sum() + (c.sum() if c is not None else 0)
    loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), (cell, proj, T, B, H)
print("canary ok")
"""


@pytest.fixture(scope="module")
def gpu_canary():
    """Run every cell once in a subprocess first (debug mode, short barrier timeout)."""
    env = _env()
    env.update(RNNKERN_CUDA_DEBUG="1", RNNKERN_CUDA_BARRIER_TIMEOUT_S="5")
    try:
        res = subprocess.run([sys.executable, "-c", _CANARY], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=240)  # fmt: skip
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the CUDA canary run did not finish in 240 s: {err}")
    if res.returncode != 0 or "canary ok" not in res.stdout:
        pytest.fail("the CUDA canary run failed; not running kernels in this process:\n"
                    + res.stdout[-2000:] + res.stderr[-4000:])  # fmt: skip
    yield


@pytest.fixture
def device(request, cuda_kernels):
    """``"cuda"`` (after the GPU canary) or ``"cpu"`` (the emulation, patched in)."""
    if cuda_kernels == "cuda":
        request.getfixturevalue("gpu_canary")
    return cuda_kernels


@pytest.fixture
def gpu(device):
    """Tests of what only a GPU shows (cuDNN, the measured dispatch)."""
    if device != "cuda":
        pytest.skip(NO_GPU_REASON)
    return device


# (T, B, H, lengths, reverse, bias); the emulation runs the large ones at its own size
# (EMULATED_PLANS below)
CASES = {
    "T1_B1_H1": (1, 1, 1, None, False, True),
    "plain_H33": (4, 3, 33, None, False, True),
    "lengths": (5, 3, 33, [5, 2, 4], False, True),
    "reverse": (4, 2, 7, None, True, True),
    "lengths_reverse": (5, 3, 33, [3, 5, 1], True, True),
    "no_bias": (3, 2, 9, None, False, False),
    "H100_random_lengths": (12, 5, 100, "random", True, True),
    "H256_B64": (16, 64, 256, "random", False, True),  # split-K tiles, one 64-row chunk
    "H500_B17": (6, 17, 500, None, True, True),  # several units per block, odd everything
    "B300": (4, 300, 64, "random", True, True),  # several shared-memory batch chunks
    "H2048_weights_in_L2": (3, 3, 2048, [3, 1, 2], True, True),  # slice too big for smem
}
GPU_SIZED = {"H256_B64", "H500_B17", "B300", "H2048_weights_in_L2"}


def _lengths(spec, T, B, device):
    if spec is None:
        return None
    if spec == "random":
        gen = torch.Generator().manual_seed(T * 1000 + B)
        lens = torch.randint(1, T + 1, (B,), generator=gen)
        lens[0] = T
        return lens.to(device)
    return torch.tensor(spec, dtype=torch.int64, device=device)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", CELLS)
def test_float32_matches_reference(device, name, case):
    T, B, H, spec, reverse, bias = CASES[case]
    if name == "lstm_proj" and H < 2:
        pytest.skip("a projection needs proj_size < hidden_size, impossible with H=1")
    if device == "cpu" and case in GPU_SIZED:
        pytest.skip("GPU-sized: the emulation covers its plan at emulation size "
                    "(test_emulated_plans_match_reference)")  # fmt: skip
    inp = make_inputs(name, T, B, H, bias=bias, device=device)
    lengths = _lengths(spec, T, B, device)
    got = run(name, inp, "cuda", lengths, reverse)
    ref = run(name, inp, "reference", lengths, reverse)
    assert_float32_close(got, ref)
    if case == "H2048_weights_in_L2" and cell_of(name) in ("lstm", "gru"):
        # the streaming path ran (an RNN's slice, G=1, still fits in shared memory at H=2048)
        assert BACKEND.last_launch["weights_in_smem"] is False


# Emulated device and layer for each plan branch the GPU-sized cases take, at emulation size:
# name -> (sms, shared memory per block, (T, B, H, lengths, reverse, bias), what must hold of
# the backward launch's layout, environment).
EMULATED_PLANS = {
    # 32 blocks of 4 units: fewer register tiles than warps, so the matvecs split K over
    # warps and add the partial sums (forward K = 128: 2-way; backward K = G*H: up to 8-way)
    "split_k": (32, 232448, (3, 3, 128, [3, 1, 2], True, True), dict(units_per_block=4), {}),
    # 3 KB of shared memory: weights read from global memory (even the RNN's 1.2 KB slice, as
    # the split-K buffer takes 2 KB), batch chunks of 1-6 rows, and the backward's running
    # dh / dc in global memory too
    "streamed": (
        4,
        3072,
        (4, 12, 33, "random", True, True),
        dict(weights_in_smem=False, running_in_smem=False),
        {},
    ),
    # more rows than the largest batch chunk (64), the batch not split
    "B70": (
        4,
        232448,
        (3, 70, 8, "random", False, True),
        dict(batch_chunk=64),
        {"RNNKERN_CUDA_BATCH_SPLIT": "off"},
    ),
    # 10 units over 4 blocks: 3, 3, 3, 1
    "uneven_split": (4, 232448, (4, 3, 10, [4, 2, 3], False, True), dict(blocks=4), {}),
    # one block owns every unit
    "one_block": (1, 232448, (3, 2, 20, None, True, False), dict(blocks=1), {}),
    # 40 rows on 8 SMs: the plan splits the batch in 2 groups of 20 (4 unit groups x 2)
    "batch_split": (
        8,
        232448,
        (4, 40, 33, "random", True, True),
        dict(batch_groups=2, batch_per_group=20, running_in_smem=True),
        {},
    ),
    # 70 rows in 3 groups (24, 24, 22), each staged in chunks of a few rows (3 KB of shared
    # memory)
    "batch_split_3": (
        8,
        3072,
        (3, 70, 12, "random", True, True),
        dict(batch_groups=3, batch_per_group=24),
        {"RNNKERN_CUDA_BATCH_SPLIT": "3"},
    ),
}


# every plan with the default (tiled) matvec; the simple one on the split-K, streamed and
# batch-split plans
PLAN_RUNS = [(plan, "tiled") for plan in EMULATED_PLANS] + [
    ("split_k", "simple"),
    ("streamed", "simple"),
    ("batch_split_3", "simple"),
]


@pytest.mark.parametrize("plan,matvec", PLAN_RUNS)
@pytest.mark.parametrize("name", CELLS)
def test_emulated_plans_match_reference(cuda_kernels, monkeypatch, name, plan, matvec):
    if cuda_kernels != "cpu":
        pytest.skip("a GPU is here: the GPU-sized cases of test_float32_matches_reference "
                    "take these plans on the real device")  # fmt: skip
    sms, smem, (T, B, H, spec, reverse, bias), layout, env = EMULATED_PLANS[plan]
    monkeypatch.setenv("RNNKERN_CUDA_MATVEC", matvec)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cuda_emulation.configure(sms, smem)
    inp = make_inputs(name, T, B, H, bias=bias, device="cpu")
    lengths = _lengths(spec, T, B, "cpu")
    assert_float32_close(run(name, inp, "cuda", lengths, reverse),
                         run(name, inp, "reference", lengths, reverse))  # fmt: skip
    info = BACKEND.last_launch  # the backward launch
    for key, want in layout.items():
        assert info[key] == want, (key, info)
    if plan == "batch_split_3":
        assert info["batch_chunk"] < 22, info  # several chunks in every group


@pytest.mark.parametrize("name", ["lstm_proj", "gru"])
def test_emulated_batch_groups_under_random_schedules(cuda_kernels, name):
    # Each batch group has a barrier of its own, so groups drift apart; under random emulated
    # schedules (some blocks run ahead, csrc/cuda/emulation.h) the results match the
    # reference and are bit-identical to the in-order schedule's.
    if cuda_kernels != "cpu":
        pytest.skip("a GPU schedules its own blocks: this checks the emulation's schedules")
    inp = make_inputs(name, 4, 40, 33, device="cpu")
    lengths = _lengths("random", 4, 40, "cpu")
    ref = run(name, inp, "reference", lengths, True)
    results = []
    for schedule in (0, 1, 2, 3):
        cuda_emulation.configure(8, 232448, schedule)
        got = run(name, inp, "cuda", lengths, True)
        assert BACKEND.last_launch["batch_groups"] == 2
        assert_float32_close(got, ref)
        results.append(got)
    for other in results[1:]:
        for key, value in results[0].items():
            assert torch.equal(value, other[key]), key


@pytest.mark.parametrize("case", ["lengths_reverse", "H256_B64", "H2048_weights_in_L2"])
@pytest.mark.parametrize("name", CELLS)
def test_simple_matvec_matches_reference(device, monkeypatch, name, case):
    # The one-row-per-warp matvec (RNNKERN_CUDA_MATVEC=simple) is kept as a cross-check of the
    # default register-tiled split-K one: both must match the reference.
    if device == "cpu" and case in GPU_SIZED:
        pytest.skip("GPU-sized: the emulation cross-checks the simple matvec in "
                    "test_emulated_plans_match_reference")  # fmt: skip
    monkeypatch.setenv("RNNKERN_CUDA_MATVEC", "simple")
    T, B, H, spec, reverse, bias = CASES[case]
    inp = make_inputs(name, T, B, H, bias=bias, device=device)
    lengths = _lengths(spec, T, B, device)
    assert_float32_close(run(name, inp, "cuda", lengths, reverse),
                         run(name, inp, "reference", lengths, reverse))  # fmt: skip


def test_batch_split_choice(device, monkeypatch):
    # On a device of the size (132 SMs) the plan splits a batch of 64 where that cuts
    # the bytes each block reads per step, never a batch of 16 or less, and the knob overrides.
    if device == "cpu":
        cuda_emulation.configure(132, 232448)
    elif cuda_backend._cuda.device_info()["sms"] < 128:
        pytest.skip("the expectations below are for an H100-sized GPU (>= 128 SMs)")
    plan = cuda_backend._cuda.plan
    lstm, fp32 = 0, 0
    for backward in (False, True):
        assert plan(backward, lstm, fp32, 16, 512, 512, False)["batch_groups"] == 1
        # H = 512: 4 groups of 16 rows; every block stages 16 rows instead of 64
        info = plan(backward, lstm, fp32, 64, 512, 512, False)
        assert (info["batch_groups"], info["batch_per_group"]) == (4, 16), info
        assert info["blocks"] <= cuda_backend._cuda.device_info()["sms"]
    monkeypatch.setenv("RNNKERN_CUDA_BATCH_SPLIT", "off")
    assert plan(True, lstm, fp32, 64, 512, 512, False)["batch_groups"] == 1
    monkeypatch.setenv("RNNKERN_CUDA_BATCH_SPLIT", "2")
    assert plan(True, lstm, fp32, 64, 512, 512, False)["batch_groups"] == 2
    monkeypatch.setenv("RNNKERN_CUDA_BATCH_SPLIT", "many")
    with pytest.raises(ValueError, match="RNNKERN_CUDA_BATCH_SPLIT must be 'auto', 'off' or"):
        plan(True, lstm, fp32, 64, 512, 512, False)


def test_a_layer_too_large_for_shared_memory_says_why(device):
    # LSTM backward at H = 100000: one staged row of dpre is 400000 float32 values (1.6 MB),
    # more than any block's shared memory even with the weights read from L2.
    with pytest.raises(ValueError, match=(
        r"does not fit in shared memory even with the weights in L2 \(one batch row of "
        r"400000 staged values and \d+ float32 results need \d+ bytes, more than the \d+ "
        r"available\)"
    )):  # fmt: skip
        cuda_backend._cuda.plan(True, 0, 0, 1, 100000, 100000, False)


def test_supports_follows_the_matvec_knob(device, monkeypatch):
    # An explicit RNNKERN_CUDA_MATVEC=mma makes a bf16 layer with H = 36, P = 18 an error
    # (proj_size not a multiple of 4); unset again, the same layer is supported: the cached
    # answer follows the knob.
    cfg = functools.partial(layer_config, device_type=device, dtype=torch.bfloat16)
    monkeypatch.setenv("RNNKERN_CUDA_MATVEC", "mma")
    reason = BACKEND.supports(cfg(hidden_size=36, proj_size=18))
    assert isinstance(reason, str) and "multiples of 4, got 36 and 18" in reason
    monkeypatch.delenv("RNNKERN_CUDA_MATVEC")
    assert BACKEND.supports(cfg(hidden_size=36, proj_size=18)) is True
    # ... and the float32 matmul precision: mma runs float32 layers only with TF32 allowed
    monkeypatch.setenv("RNNKERN_CUDA_MATVEC", "mma")
    f32 = cfg(dtype=torch.float32, hidden_size=32)
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert BACKEND.supports(f32) is True
        torch.set_float32_matmul_precision("highest")
        reason = BACKEND.supports(f32)
        assert isinstance(reason, str) and "unless TF32 is allowed" in reason
    finally:
        torch.set_float32_matmul_precision(precision)


def test_resident_chunk_knob(device, monkeypatch):
    # RNNKERN_CUDA_RESIDENT_CHUNK=N keeps the weights resident only with batch chunks of N rows
    # or more (at most the group's rows); unset (1), residency comes first. Emulated: 24 KB of
    # shared memory per block, an LSTM of H = 64 (16 KB of W_hh^T per block) and B = 20: the
    # resident backward has room for 5-row chunks, the streaming one for all 20 rows.
    if device == "cuda":
        pytest.skip("plans at an emulated shared-memory size; the GPU runs cuda_train's row")
    cuda_emulation.configure(4, 24 * 1024)
    plan = cuda_backend._cuda.plan
    monkeypatch.delenv("RNNKERN_CUDA_RESIDENT_CHUNK", raising=False)
    bwd = plan(True, 0, 0, 20, 64, 64, False)
    assert (bwd["weights_in_smem"], bwd["batch_chunk"]) == (True, 5)
    monkeypatch.setenv("RNNKERN_CUDA_RESIDENT_CHUNK", "16")
    bwd = plan(True, 0, 0, 20, 64, 64, False)
    assert (bwd["weights_in_smem"], bwd["batch_chunk"]) == (False, 20)
    inp = make_inputs("lstm", 3, 20, 64, device=device)  # that plan computes the same layer
    assert_float32_close(run("lstm", inp, "cuda"), run("lstm", inp, "reference"))
    assert BACKEND.last_launch["batch_chunk"] == 20 and not BACKEND.last_launch["weights_in_smem"]
    monkeypatch.setenv("RNNKERN_CUDA_RESIDENT_CHUNK", "0")
    with pytest.raises(ValueError, match="RNNKERN_CUDA_RESIDENT_CHUNK must be a number of batch "
                       "rows >= 1, got '0'"):  # fmt: skip
        plan(True, 0, 0, 20, 64, 64, False)


def test_cuda_train_row_with_resident_only_16_row_chunks(device, monkeypatch):
    # Where residency costs the plan its chunk size, the benchmark's row runs the plan that
    # RNNKERN_CUDA_RESIDENT_CHUNK=16 makes (the layer of test_resident_chunk_knob).
    if device == "cuda":
        pytest.skip("plans at an emulated shared-memory size; the GPU runs cuda_train's row")
    from rnnkern.bench import cuda_train

    cuda_emulation.configure(4, 24 * 1024)
    monkeypatch.delenv("RNNKERN_CUDA_RESIDENT_CHUNK", raising=False)
    case = cuda_train.make_case("LSTM", torch.float32, 20, 64, True, device, T=3)
    case.fns["rnnkern[cuda]"]()
    assert BACKEND.last_launch["batch_chunk"] == 5
    case.fns["rnnkern[cuda], resident only with 16-row chunks"]()
    assert BACKEND.last_launch["batch_chunk"] == 20
    assert "RNNKERN_CUDA_RESIDENT_CHUNK" not in os.environ  # restored after the call


def _bench_row_shape(device):
    """(B, H, T) of a layer whose plan splits the batch in groups of 16+ rows: emulated, 40
    rows on 8 SMs (configured here); on a GPU, B = 64 and H = 512."""
    if device == "cpu":
        cuda_emulation.configure(8, 232448)
        return 40, 8, 3
    return 64, 512, 4


def test_cuda_train_row_without_the_batch_split(device, monkeypatch):
    # The benchmark's "batch not split" row (rnnkern.bench.cuda_train) runs the plan without a
    # split, next to the default one that splits; at B = 16 (never split) the "batch in 2
    # groups" row forces one.
    from rnnkern.bench import cuda_train

    monkeypatch.delenv("RNNKERN_CUDA_BATCH_SPLIT", raising=False)
    B, H, T = _bench_row_shape(device)
    case = cuda_train.make_case("LSTM", torch.float32, B, H, True, device, T=T)
    assert set(case.fns) == {"torch.nn", "rnnkern[cuda]", "rnnkern[cuda], batch not split"}
    case.fns["rnnkern[cuda]"]()
    assert BACKEND.last_launch["batch_groups"] > 1
    case.fns["rnnkern[cuda], batch not split"]()
    assert BACKEND.last_launch["batch_groups"] == 1
    assert "RNNKERN_CUDA_BATCH_SPLIT" not in os.environ  # restored after the call
    small = cuda_train.make_case("LSTM", torch.float32, 16, H, True, device, T=T)
    assert set(small.fns) == {"torch.nn", "rnnkern[cuda]", "rnnkern[cuda], batch in 2 groups"}
    small.fns["rnnkern[cuda]"]()
    assert BACKEND.last_launch["batch_groups"] == 1
    small.fns["rnnkern[cuda], batch in 2 groups"]()
    assert BACKEND.last_launch["batch_groups"] == 2
    assert "RNNKERN_CUDA_BATCH_SPLIT" not in os.environ


def test_cuda_train_row_with_the_fma_matvec(device, monkeypatch):
    # Where the plan multiplies on the tensor cores (bfloat16, >= 16 rows a group), the
    # benchmark's "fma matvec" row runs the same layer with the float32-FMA matvec.
    from rnnkern.bench import cuda_train

    monkeypatch.delenv("RNNKERN_CUDA_MATVEC", raising=False)
    monkeypatch.delenv("RNNKERN_CUDA_BATCH_SPLIT", raising=False)
    B, H, T = _bench_row_shape(device)
    case = cuda_train.make_case("GRU", torch.bfloat16, B, H, True, device, T=T)
    assert "rnnkern[cuda], fma matvec" in case.fns
    case.fns["rnnkern[cuda]"]()
    assert BACKEND.last_launch["matvec"] == "mma"
    case.fns["rnnkern[cuda], fma matvec"]()
    assert BACKEND.last_launch["matvec"] == "tiled"
    assert "RNNKERN_CUDA_MATVEC" not in os.environ  # restored after the call
    fp32 = cuda_train.make_case("GRU", torch.float32, B, H, True, device, T=T)
    assert "rnnkern[cuda], fma matvec" not in fp32.fns
    assert "rnnkern[cuda], resident only with 16-row chunks" not in fp32.fns  # (a full chunk)
    # float32 with TF32 allowed on both sides: the tensor cores, with their fma row, and
    # float32 exact again after each call
    tf32 = cuda_train.make_case("GRU", torch.float32, B, H, True, device, T=T, tf32=True)
    assert tf32.name.endswith("float32 TF32") and "rnnkern[cuda], fma matvec" in tf32.fns
    tf32.fns["rnnkern[cuda]"]()
    assert BACKEND.last_launch["matvec"] == "mma"
    assert torch.get_float32_matmul_precision() == "highest"
    tf32.fns["rnnkern[cuda], fma matvec"]()
    assert BACKEND.last_launch["matvec"] == "tiled"
    tf32.fns["torch.nn"]()
    assert not torch.backends.cudnn.allow_tf32


def test_small_layers_keep_weights_resident(device):
    H = 256 if device == "cuda" else 64  # (the emulated device has 4 SMs)
    inp = make_inputs("lstm", 4, 8, H, device=device)
    run("lstm", inp, "cuda")
    info = BACKEND.last_launch  # the backward launch
    assert info["weights_in_smem"] is True
    sms = cuda_backend._cuda.device_info()["sms"]
    assert info["blocks"] <= sms


@pytest.mark.parametrize("name", CELLS)
def test_inference_without_saving_matches_reference(device, name):
    # No input requires grad: the forward runs with save=False (2-slot state rings).
    T, B, H = 6, 3, 33
    inp = make_inputs(name, T, B, H, device=device)
    lengths = _lengths([6, 1, 4], T, B, device)
    with torch.no_grad():
        got = run(name, inp, "cuda", lengths, True, grad=False)
        ref = run(name, inp, "reference", lengths, True, grad=False)
    assert_float32_close(got, ref)


@pytest.mark.parametrize("name", CELLS)
def test_saved_activations_follow_the_contract_layout(device, name):
    # What forward saves must be exactly what the contract says (another backend's backward
    # may consume it), including the steps past each length.
    cell = cell_of(name)
    inp = make_inputs(name, 4, 3, 10, device=device)
    lengths = _lengths([4, 2, 3], 4, 3, device)
    gx = torch.nn.functional.linear(inp["x"], inp["w_ih"], inp["b_ih"]).contiguous()
    args = (cell, gx, inp["h0"], inp["c0"], inp["w_hh"], inp["b_hh"], inp["w_hr"], lengths, True)
    got = BACKEND.forward(*args, True).saved
    ref = get_backend("reference").forward(*args, True).saved
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def make_inputs(name, T, B, H, *, device, **kw):
    return layer_cases.make_inputs(name, T, B, H, device=device, **kw)


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
                attr = f"weight_{pname[2:]}_l0" if pname[0] == "w" else f"bias_{pname[2:]}_l0"
                getattr(mod, attr).copy_(inp[pname])
    mod = mod.to(device=inp["x"].device, dtype=dtype)
    mod.flatten_parameters()
    return mod.train()  # cuDNN refuses RNN backward in eval mode


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


def _assert_within_k_times_torch_error(name, inp, keys=None):
    """The cuda backend's error against the float64 truth, on every output and gradient (or
    those named in ``keys``; the others must be finite), is at most K_LOW x torch's own error
    in the inputs' dtype (module docstring)."""
    dtype = inp["w_hh"].dtype
    truth = run(name, inp, "reference", dtype=torch.float64)
    got = run(name, inp, "cuda")
    torch_nn = _run_torch(name, inp, dtype)
    torch_ref = run(name, inp, "reference")
    for k, r in truth.items():
        assert got[k].dtype == torch_ref[k].dtype, k
        if keys is not None and k not in keys:
            assert bool(got[k].isfinite().all()), k
            continue
        err = (got[k].double() - r).abs().max().item()
        err_torch = max((t[k].double() - r).abs().max().item() for t in (torch_nn, torch_ref))
        floor = 4 * torch.finfo(torch.float32).eps * max(1.0, r.abs().max().item())
        assert err <= K_LOW * err_torch + floor, (
            f"{k}: cuda error {err:.3e} > {K_LOW} x torch's {err_torch:.3e} + {floor:.1e}"
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", CELLS)
def test_low_precision_within_k_times_torch_error(device, name, dtype):
    T, B, H = (24, 16, 256) if device == "cuda" else (8, 4, 40)  # emulation size on the CPU
    _assert_within_k_times_torch_error(name, make_inputs(name, T, B, H, dtype=dtype, device=device))


# The bfloat16 tensor-core matvec (RNNKERN_CUDA_MATVEC=mma) on the plan branches it meets:
# name -> (sms, shared memory per block, (T, B, H), what must hold of the backward launch).
MMA_PLANS = {
    # 20 rows: a full and a partial 16-row batch tile; 10 row tiles, the last one partial
    "two_batch_tiles": (4, 232448, (6, 20, 40), dict(batch_chunk=20)),
    # 32 blocks of 4 units: one tile per matvec, so K is split over warps into the 8 KB buffer
    # (forward 2-way, backward 8-way)
    "split_k": (32, 232448, (3, 16, 128), dict(units_per_block=4)),
    # 2.75 KB of shared memory: weights read from global memory (even the RNN's 800-byte
    # slice), batch chunks of a row or two, the 2 KB split-K buffer
    "streamed": (4, 2816, (4, 12, 40), dict(weights_in_smem=False)),
    # 40 rows in 2 groups of 20 on 8 SMs
    "batch_split": (8, 232448, (4, 40, 32), dict(batch_groups=2)),
}


@pytest.mark.parametrize("plan", list(MMA_PLANS))
@pytest.mark.parametrize("name", CELLS)
def test_mma_matvec_within_k_times_torch_error(device, monkeypatch, name, plan):
    # The mma matvec rounds h (forward) and dpre (backward) to bfloat16 as they enter the
    # product, as torch.nn's bfloat16 path does (its states and gradients are bfloat16
    # tensors), so its error is of torch's kind and the same K_LOW bound holds.
    sms, smem, (T, B, H), layout = MMA_PLANS[plan]
    if device == "cuda":
        B, H = B * 4, H * 8  # GPU-sized: more row and batch tiles
        layout = {}
    else:
        cuda_emulation.configure(sms, smem)
    monkeypatch.setenv("RNNKERN_CUDA_MATVEC", "mma")
    _assert_within_k_times_torch_error(
        name, make_inputs(name, T, B, H, dtype=torch.bfloat16, device=device)
    )
    info = BACKEND.last_launch  # the backward launch
    assert info["matvec"] == "mma", info
    for key, want in layout.items():
        assert info[key] == want, (key, info)


# (the "streamed" plan has 12 rows, under the 16 from which auto takes the tensor cores)
@pytest.mark.parametrize("plan", [p for p in MMA_PLANS if p != "streamed"])
@pytest.mark.parametrize("name", CELLS)
def test_float16_forward_on_the_tensor_cores(device, monkeypatch, name, plan):
    # float16 takes the mma matvec in the forward only (h staged as float16, which torch.nn's
    # float16 path holds as a float16 tensor too, so K_LOW holds as for bfloat16); the backward
    # keeps the FMAs (dpre rounded to float16 would lose small gradients). The relu RNN's
    # gradients are not compared: its derivative jumps at 0, and a pre-activation within
    # float16's error of 0 takes the other slope in one computation and not in another, so the
    # largest gradient error is one element's whole gradient whoever rounds (emulated, torch's
    # own float16 error in dx is 0.45 there); its outputs are, and the FMA backward of the relu
    # RNN in float16 is test_low_precision_within_k_times_torch_error's.
    sms, smem, (T, B, H), _ = MMA_PLANS[plan]
    if device == "cuda":
        B, H = B * 4, H * 8
    else:
        cuda_emulation.configure(sms, smem)
    monkeypatch.delenv("RNNKERN_CUDA_MATVEC", raising=False)
    inp = make_inputs(name, T, B, H, dtype=torch.float16, device=device)
    run(name, inp, "cuda", grad=False)
    assert BACKEND.last_launch["matvec"] == "mma", BACKEND.last_launch  # the forward
    _assert_within_k_times_torch_error(name, inp, ("y", "h_n") if name == "rnn_relu" else None)
    assert BACKEND.last_launch["matvec"] == "tiled", BACKEND.last_launch  # the backward


def _round_tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` through float32 rounded to TF32 (10 mantissa bits, to nearest, ties away from
    zero: the kernels' cvt.rna.tf32.f32), back in ``t``'s dtype."""
    bits = t.detach().float().view(torch.int32)
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = torch.where(finite, (bits + 0x1000) & ~0x1FFF, bits).view(torch.float32)
    return t + (rounded.to(t.dtype) - t).detach()  # (gradients pass through unchanged)


class _Tf32Products(torch.overrides.TorchFunctionMode):
    """Matrix products with their operands rounded to TF32 (then multiplied in the tensors' own
    dtype): what a TF32 computation does to a layer's products, as a yardstick."""

    # (``a @ b`` reaches the mode as TensorBase.matmul)
    PRODUCTS = {torch.matmul, torch.mm, torch.addmm, torch.Tensor.__matmul__,
                torch._C.TensorBase.matmul, torch._C.TensorBase.mm}  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.PRODUCTS:
            operands = (1, 2) if func is torch.addmm else (0, 1)  # not addmm's bias
            args = tuple(_round_tf32(a) if i in operands else a for i, a in enumerate(args))
        return func(*args, **kwargs)


def _tf32_reference_run(monkeypatch, name, inp):
    """``run`` on backend reference in float64 with TF32 products (:class:`_Tf32Products`) in
    its forward and backward (the layer runs as a torch.library op, where a mode the caller
    entered does not reach, so the mode is entered inside the backend's methods)."""
    ref = get_backend("reference")
    for method in ("forward", "backward"):
        plain = getattr(ref, method)

        def rounded(*args, _plain=plain, **kwargs):
            with _Tf32Products():
                return _plain(*args, **kwargs)

        monkeypatch.setattr(ref, method, rounded)
    try:
        return run(name, inp, "reference", dtype=torch.float64)
    finally:
        for method in ("forward", "backward"):
            monkeypatch.delattr(ref, method)


# The TF32 tensor-core matvec (float32 with torch.set_float32_matmul_precision("high")) on the
# same plan branches.
@pytest.mark.parametrize("plan", list(MMA_PLANS))
@pytest.mark.parametrize("name", CELLS)
def test_tf32_matvec_within_k_times_a_tf32_computation(device, monkeypatch, name, plan):
    # The yardstick is the float64 reference with the operands of its recurrent products
    # (forward and backward) and weight-gradient products rounded to TF32. The kernel rounds
    # the same operands of its recurrent products the same way (cvt.rna) and sums in float32 in
    # another order, so the two differ only where a float32 difference moves a value across a
    # TF32 rounding boundary, and K_LOW bounds it as for the 16-bit dtypes (emulated, the
    # largest ratio over every cell, plan and output is 1.33). x and W_ih are TF32 values, so
    # the input projection is exact whoever computes it. Under "high" torch's own GEMMs take
    # TF32 on a GPU, with cuBLAS's rounding, not the yardstick's: there the gradients that
    # pass through them (x, the weights) are not compared; on the CPU they are exact float32,
    # which only lowers the error.
    sms, smem, (T, B, H), layout = MMA_PLANS[plan]
    if device == "cuda":
        B, H = B * 4, H * 8
        layout = {}
    else:
        cuda_emulation.configure(sms, smem)
    monkeypatch.setenv("RNNKERN_CUDA_MATVEC", "mma")
    inp = make_inputs(name, T, B, H, device=device)
    inp["x"], inp["w_ih"] = _round_tf32(inp["x"]), _round_tf32(inp["w_ih"])
    truth = run(name, inp, "reference", dtype=torch.float64)
    tf32 = _tf32_reference_run(monkeypatch, name, inp)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        got = run(name, inp, "cuda")
        info = BACKEND.last_launch  # the backward launch
    finally:
        torch.set_float32_matmul_precision(precision)
    assert info["matvec"] == "mma", info
    for key, want in layout.items():
        assert info[key] == want, (key, info)
    for k, r in truth.items():
        assert got[k].dtype == torch.float32 and bool(got[k].isfinite().all()), k
        if device == "cuda" and k in ("x", "w_ih", "w_hh", "w_hr"):
            continue
        err = (got[k].double() - r).abs().max().item()
        err_tf32 = (tf32[k] - r).abs().max().item()
        scale = max(1.0, r.abs().max().item())
        # the yardstick is TF32-sized (TF32's unit roundoff is 2^-11, float32's 2^-24), so
        # the mode reached every product, the backward's too
        assert err_tf32 > 1e-5 * scale, (k, err_tf32)
        floor = 4 * torch.finfo(torch.float32).eps * scale
        assert err <= K_LOW * err_tf32 + floor, (
            f"{k}: cuda error {err:.3e} > {K_LOW} x TF32's {err_tf32:.3e} + {floor:.1e}"
        )


def test_matvec_choice(device, monkeypatch):
    # By default the bfloat16 layers of 16 or more rows per batch group take the tensor cores,
    # and so do float32 ones where TF32 is allowed and float16 forwards; exact float32 and the
    # float16 backward (range) keep the FMA matvec, and so do sizes the mma loads cannot take.
    # RNNKERN_CUDA_MATVEC overrides, with an error where mma cannot run.
    if device == "cpu":
        cuda_emulation.configure(132, 232448)
    plan = cuda_backend._cuda.plan
    lstm, fp32, fp16, bf16 = 0, 0, 1, 2
    monkeypatch.delenv("RNNKERN_CUDA_MATVEC", raising=False)
    for backward in (False, True):
        assert plan(backward, lstm, bf16, 64, 1024, 1024, False)["matvec"] == "mma"
        assert plan(backward, lstm, bf16, 16, 512, 512, False)["matvec"] == "mma"
        assert plan(backward, lstm, bf16, 8, 512, 512, False)["matvec"] == "tiled"
        assert plan(backward, lstm, fp32, 64, 512, 512, False)["matvec"] == "tiled"
        # float16: the forward on the tensor cores, the backward on the FMAs
        want = "tiled" if backward else "mma"
        assert plan(backward, lstm, fp16, 64, 512, 512, False)["matvec"] == want
        assert plan(backward, lstm, bf16, 64, 510, 510, False)["matvec"] == "tiled"
        # float32 with TF32 allowed (tf32=True: torch's float32 matmul precision is not
        # "highest") takes the tensor cores from 16 rows too
        assert plan(backward, lstm, fp32, 64, 512, 512, False, tf32=True)["matvec"] == "mma"
        assert plan(backward, lstm, fp32, 8, 512, 512, False, tf32=True)["matvec"] == "tiled"
    monkeypatch.setenv("RNNKERN_CUDA_MATVEC", "mma")
    assert plan(True, lstm, bf16, 1, 256, 256, False)["matvec"] == "mma"
    assert plan(True, lstm, fp32, 1, 256, 256, False, tf32=True)["matvec"] == "mma"
    with pytest.raises(ValueError, match=r"mma cannot run this layer: float32 products stay "
                       r"exact unless TF32 is allowed"):  # fmt: skip
        plan(True, lstm, fp32, 64, 512, 512, False)
    assert plan(False, lstm, fp16, 1, 256, 256, False)["matvec"] == "mma"
    with pytest.raises(ValueError, match="the float16 backward keeps the float32 FMAs"):
        plan(True, lstm, fp16, 64, 512, 512, False)
    with pytest.raises(ValueError, match="multiples of 4, got 510 and 510"):
        plan(False, lstm, bf16, 64, 510, 510, False)
    monkeypatch.setenv("RNNKERN_CUDA_MATVEC", "tiled")
    assert plan(True, lstm, bf16, 64, 512, 512, False)["matvec"] == "tiled"
    monkeypatch.setenv("RNNKERN_CUDA_MATVEC", "fast")
    with pytest.raises(ValueError, match="must be 'auto', 'tiled', 'mma' or 'simple', got 'fast'"):
        plan(True, lstm, bf16, 64, 512, 512, False)


def test_supports_gives_reasons(device):
    cfg = functools.partial(layer_config, device_type=device)

    assert BACKEND.supports(cfg()) is True
    assert BACKEND.supports(cfg(dtype=torch.bfloat16, proj_size=4)) is True
    reason = BACKEND.supports(cfg(dtype=torch.float64))
    assert isinstance(reason, str) and "float64" in reason
    other = "cpu" if device == "cuda" else "cuda"
    reason = BACKEND.supports(cfg(device_type=other))
    assert isinstance(reason, str) and f"'{other}'" in reason
    reason = BACKEND.supports(cfg(cell="gru", proj_size=4))
    assert isinstance(reason, str) and "projection" in reason


def test_auto_takes_cuda_only_where_it_measured_faster(gpu):
    cfg = functools.partial(layer_config, device_type="cuda", input_size=256, hidden_size=256,
                            batch_size=16, seq_len=256)  # fmt: skip

    assert BACKEND.faster_than_torch(cfg()) is True
    assert BACKEND.faster_than_torch(cfg(cell="gru", dtype=torch.bfloat16, hidden_size=512))
    assert BACKEND.faster_than_torch(cfg(batch_size=1, hidden_size=1024)) is True
    for slower in (cfg(batch_size=64), cfg(hidden_size=1024), cfg(seq_len=32),
                   cfg(cell="rnn_tanh"), cfg(dtype=torch.float16), cfg(proj_size=128)):  # fmt: skip
        assert isinstance(BACKEND.faster_than_torch(slower), str), slower
    from rnnkern import dispatch

    assert dispatch.choose("auto", cfg(), training=True).backend == "cuda"
    assert dispatch.choose("auto", cfg(batch_size=64), training=True).backend != "cuda"


def test_float32_claims_only_where_both_sides_were_exact(device):
    # The float32 measurements were made with TF32 off on both sides; torch's default lets
    # cuDNN's float32 RNNs take TF32, and TF32 allowed changes rnnkern's own products: neither
    # was measured, so auto keeps torch.nn there. (The test suite runs with TF32 off: conftest.)
    cfg = layer_config(device_type=device, input_size=256, hidden_size=256, batch_size=16,
                       seq_len=256)  # fmt: skip
    assert BACKEND.faster_than_torch(cfg) is True
    precision = torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.allow_tf32 = True  # (torch's default)
        reason = BACKEND.faster_than_torch(cfg)
        assert isinstance(reason, str) and "cuDNN's RNNs take TF32" in reason
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("high")
        reason = BACKEND.faster_than_torch(cfg)
        assert isinstance(reason, str) and "TF32 is allowed" in reason
        assert BACKEND.faster_than_torch(layer_config(
            device_type=device, dtype=torch.bfloat16, input_size=256, hidden_size=256,
            batch_size=16, seq_len=256)) is True  # fmt: skip
    finally:
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision(precision)


def test_explain_gives_the_launch_plans(device):
    import rnnkern

    m = rnnkern.GRU(32, 32, backend="cuda").to(device)
    text = rnnkern.explain(m, torch.randn(5, 3, 32, device=device))
    plan = cuda_backend._cuda.plan(False, 1, 0, 3, 32, 32, False)
    assert text.startswith("backend 'cuda': asked for by name\n  forward: "), text
    assert f"forward: {plan['blocks']} blocks (" in text and "\n  backward: " in text
    assert "products on float32 FMAs" in text and "tensor cores" not in text
    m = m.to(torch.bfloat16)
    text = rnnkern.explain(m, torch.randn(5, 16, 32, device=device, dtype=torch.bfloat16))
    assert text.count("products on tensor cores, bfloat16") == 2, text  # (16 rows: mma)
    m = m.to(torch.float16)  # the forward on the tensor cores, the backward on the FMAs
    text = rnnkern.explain(m, torch.randn(5, 16, 32, device=device, dtype=torch.float16))
    assert "forward: " in text and "products on tensor cores, float16\n  backward: " in text
    assert text.endswith("products on float32 FMAs"), text
    m = rnnkern.GRU(32, 32, backend="torch").to(device)
    assert "forward:" not in rnnkern.explain(m, torch.randn(5, 3, 32, device=device))


def test_cudnn_rnn_tf32_reads_both_flag_apis():
    from rnnkern.backends.base import cudnn_rnn_tf32

    try:
        torch.backends.cudnn.allow_tf32 = True  # legacy API: cuDNN's conv and RNN flags
        assert cudnn_rnn_tf32()
        torch.backends.cudnn.allow_tf32 = False
        assert not cudnn_rnn_tf32()
        if hasattr(torch.backends.cudnn, "rnn"):  # torch 2.9+: the RNN's own flag
            torch.backends.cudnn.rnn.fp32_precision = "tf32"
            assert cudnn_rnn_tf32()
            torch.backends.cudnn.rnn.fp32_precision = "ieee"
            assert not cudnn_rnn_tf32()
    finally:
        torch.backends.cudnn.allow_tf32 = False  # (the suite's setting: conftest)


def test_float64_call_is_a_clear_error(device):
    inp = make_inputs("gru", 2, 2, 4, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="float64"):
        run("gru", inp, "cuda", grad=False)


def test_length_out_of_range_is_reported_by_the_kernel(device):
    # rnn_layer validates lengths; calling the backend directly reaches the kernel's own check
    # (it records the error and clamps, so nothing is read out of bounds).
    inp = make_inputs("rnn_tanh", 3, 2, 8, device=device)
    gx = torch.nn.functional.linear(inp["x"], inp["w_ih"], inp["b_ih"]).contiguous()
    bad = torch.tensor([3, 0], device=device)
    with pytest.raises(RuntimeError, match=r"lengths has a value outside \[1, T\]"):
        BACKEND.forward("rnn_tanh", gx, inp["h0"], None, inp["w_hh"], inp["b_hh"], None, bad,
                        False, False)  # fmt: skip
        BACKEND.synchronize()  # the status comes back behind the launch (unless debug mode)
    BACKEND.synchronize()  # reported once: nothing left


# The float32 cases of the module parity suite (float64 is not a CUDA-kernel dtype).
MODULE_CASES = [c for c in test_nn_parity.CASES if c["dtype"] == torch.float32][::3]


@pytest.mark.parametrize("case", MODULE_CASES, ids=test_nn_parity._ids)
def test_modules_with_backend_cuda_match_torch_nn(device, case):
    # Whole nn.Modules (layers, directions, projection, packed and unbatched inputs, given or
    # default states) with every layer on backend "cuda", against torch.nn on the same device
    # (cuDNN on a GPU), with the module parity suite's float32 tolerance.
    test_nn_parity.check_case(case, backend="cuda", device=device, train=True)


class _FakeEvent:
    """Stands in for a CUDA event in the host-side bookkeeping test."""

    def __init__(self, done: bool) -> None:
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited, self.done = True, True


def test_deferred_status_reports_each_error_once_in_launch_order(monkeypatch):
    """The training backend's status words come back behind the launches (no host stall):
    poll() raises the first error among the launches that have finished, each once and in
    launch order, stops at the first unfinished one, and waits for all with synchronize();
    under graph capture it does nothing. Host logic only: fake events, CPU status copies."""
    from rnnkern.backends.cuda import CUDABackend

    backend = CUDABackend()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fine, late = _FakeEvent(True), _FakeEvent(False)
    for event, code, what in ((fine, 0, "a"), (_FakeEvent(True), 2, "b"), (late, 1, "c")):
        backend._pending.append((event, torch.tensor([code]), None, what))
    with pytest.raises(RuntimeError, match=r"rnnkern._cuda b: lengths has a value outside"):
        backend.poll()
    backend.poll()  # "c" has not finished: nothing to report, nothing waited for
    assert len(backend._pending) == 1 and not late.waited
    with pytest.raises(RuntimeError, match="rnnkern._cuda c: a wait for other blocks .* timed out"):
        backend.synchronize()
    assert late.waited and not backend._pending
    backend._pending.append((_FakeEvent(True), torch.tensor([1]), None, "d"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    backend.poll(wait=True)  # capturing: no event may be queried
    assert len(backend._pending) == 1


@pytest.mark.parametrize("name", ["lstm", "lstm_proj", "gru", "rnn_tanh"])
def test_phase_trace_stamps_each_phase_in_order(device, name):
    """trace_phases (the phases benchmark's source) stamps, for every block and traced
    step, each point the kernel passes (csrc/cuda/api.h: kTracePoints) and no other, in
    program order, no block past a barrier before every block reached it; tracing changes no
    result."""
    T, B, H = 5, 3, 33  # every block owns hidden and state units (emulation: 4 blocks)
    inp = make_inputs(name, T, B, H, device=device)
    plain = run(name, inp, "cuda")
    with tracing.trace_phases(steps=T + 1) as traces:
        traced = run(name, inp, "cuda")
    assert plain.keys() == traced.keys()
    for k in plain:
        assert torch.equal(plain[k], traced[k]), k
    assert [t.kernel for t in traces] == ["forward", "backward"]
    proj = name == "lstm_proj"
    passed = {  # the points each kernel passes, in program order
        "forward": [0, 1, 2, 3] + ([4, 5] if proj else []),
        "backward": [0] + ([1] if proj else []) + [2, 3, 4, 5],
    }
    # (a, b, next): a barrier between point b of a step and point a of that step (of the next
    # step with next): no block reaches a before every block passed b. (The backward's steps
    # end without one: the next step needs only the block's own values.)
    last = passed["forward"][-1]
    barriers = {
        "forward": ([(4, 3, False)] if proj else []) + [(0, last, True)],
        "backward": ([(1, 0, False)] if proj else []) + [(3, 2, False)],
    }
    for t in traces:
        st = t.stamps.cpu()
        assert st.shape == (t.info["blocks"], T + 1, cuda_backend._cuda.TRACE_POINTS)
        assert not st[:, T].any()  # no step T: nothing stamped
        st = st[:, :T]
        points = passed[t.kernel]
        others = [p for p in range(st.shape[2]) if p not in points]
        assert (st[:, :, points] > 0).all() and not st[:, :, others].any()
        order = st[:, :, points].flatten(1)  # each block's stamps in program order
        assert (order[:, 1:] >= order[:, :-1]).all()
        for a, b, next_step in barriers[t.kernel]:
            first_out = st[:, 1:, a] if next_step else st[:, :, a]
            last_in = st[:, :-1, b] if next_step else st[:, :, b]
            assert (first_out.min(dim=0).values >= last_in.max(dim=0).values).all(), (t.kernel, a)


def test_trace_phases_checks_its_argument():
    for bad in (0, -1, 2.0, True, "8"):
        with pytest.raises(ValueError, match="steps must be a positive int"):
            with tracing.trace_phases(steps=bad):
                pass
    with tracing.trace_phases(steps=2):
        with pytest.raises(RuntimeError, match="do not nest"):
            with tracing.trace_phases(steps=2):
                pass
    assert tracing._tracing is None


def test_phases_profile_times_every_phase(device, tmp_path):
    """The phases benchmark's rows: each kernel's phases, every one timed (on the
    emulation the times are the CPU's, and meaningless; the columns and files are what is
    checked)."""
    import json

    from rnnkern.bench import phases

    rows = []
    for cell, proj in (("LSTM", 0), ("LSTM", 4), ("GRU", 0)):
        rows += phases.profile(cell, torch.float32, 3, 9, device, T=6, proj=proj, steps=6)
    assert [(r["case"].split()[0], r["kernel"]) for r in rows] == [
        (cell, kernel) for cell in ("LSTM", "LSTM", "GRU") for kernel in ("forward", "backward")
    ]
    common = ["step", "arrival spread", "timer step", "cells", "stage", "matvec"]
    for r in rows:
        proj = "proj=" in r["case"]
        want = common + (["barrier"] if r["kernel"] == "forward" else ["dpre wait"])
        want += ["projection wait"] + (["projection"] if r["kernel"] == "forward" else [])
        if not proj:
            want = [n for n in want if not n.startswith("projection")]
        assert sorted(r["phases_us"]) == sorted(want), r["case"]
        assert all(v is not None and v >= 0 for v in r["phases_us"].values()), r
        assert r["plan"].startswith(f"{r['launch']['blocks']} blocks")
    md = phases.write(rows, tmp_path, "test", device=device)
    text = md.read_text()
    assert (
        "## cuda forward" in text
        and "## cuda backward" in text
        and "| LSTM B=3 H=9 T=6 float32 proj=4 |" in text
    )
    payload = json.loads(md.with_suffix(".json").read_text())
    assert len(payload["rows"]) == 6


def test_phases_keeps_what_it_measured(device, tmp_path):
    """The benchmark writes its files after every job, and a job that raises becomes an error
    row while the others run: a GPU stage that times out or meets a kernel error keeps the
    rows it has."""
    import functools
    import json

    from rnnkern.bench import phases

    seen = []

    def failing():
        seen.append(json.loads(next(tmp_path.glob("phases-*.json")).read_text())["rows"])
        raise RuntimeError("rnnkern._cuda layer_forward: a wait for other blocks timed out\nmore")

    jobs = [
        ("GRU small", functools.partial(phases.profile, "GRU", torch.float32, 2, 9, device,
                                        T=4, steps=4)),
        ("LSTM failing", failing),
    ]  # fmt: skip
    md = phases.run_jobs(jobs, tmp_path, "test", device=device)
    assert [r["kernel"] for r in seen[0]] == ["forward", "backward"]  # written before job 2
    rows = json.loads(md.with_suffix(".json").read_text())["rows"]
    assert [r["kernel"] for r in rows] == ["forward", "backward", "error"]
    assert rows[2]["case"] == "LSTM failing" and rows[2]["error"].endswith("timed out")
    text = md.read_text()
    assert "## errors" in text
    assert "- LSTM failing: RuntimeError: rnnkern._cuda layer_forward" in text
    assert "| GRU B=2 H=9 T=4 float32 |" in text
