"""Backend ``cpu``'s own GEMM, the ``rnnkern::linear`` operator built on it, and the caching
pool its large output buffers come from.

float32 products are judged against float64 ones: the kernel's error may be at most 3x torch's
float32 error on the same inputs plus 8 float32 ulps of the largest magnitude (the rule of
tests/test_backend_cpu.py: both errors are float32 rounding of sums in different orders).
float64 products must match torch's float64 to 1e-12 relative (sums of at most 1100 float64
terms err by less than 1e-13).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerances import assert_within_float32_error

from rnnkern.backends import cpu as cpu_backend
from rnnkern.functional import input_projection

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.skipif(
        cpu_backend._cpu is None, reason="rnnkern._cpu is not built: " + cpu_backend.build_hint()
    ),
    pytest.mark.host_only,  # nothing here needs a GPU (gpu_check.sh leaves it out)
]


def assert_product_close(got, exact, torch_result):
    """``got`` against the float64 ``exact``, with torch's own error in ``got.dtype`` as scale."""
    assert got.shape == exact.shape
    if exact.numel() == 0:
        return
    if got.dtype == torch.float64:
        torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12 * exact.abs().max().item())
        return
    assert_within_float32_error(got, exact, torch_result, floor_min=0.0)


def strided(t, transposed):
    """``t`` itself, or the same values in a column-major layout (a transposed view)."""
    return t.t().contiguous().t() if transposed else t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "M, N, K",
    # Edges of the blocking: one row; tails of the 6-row tiles and 64-column panels; one k
    # block up to K = 2048, then blocks of 1024 with a partial last one (K = 2500); K = 0
    # (C = bias).
    [
        (1, 1, 1),
        (7, 13, 5),
        (97, 65, 513),
        (200, 130, 1100),
        (6, 64, 256),
        (30, 70, 2500),
        (5, 3, 0),
        (0, 4, 3),
    ],
)
@pytest.mark.parametrize("a_t, b_t", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_matches_torch(M, N, K, dtype, a_t, b_t):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    a = torch.randn(M, K, generator=g, dtype=torch.float64)
    b = torch.randn(K, N, generator=g, dtype=torch.float64)
    bias = torch.randn(N, generator=g, dtype=torch.float64)
    out = torch.full((M, N), float("nan"), dtype=dtype)
    rowsum = torch.full((M,), float("nan"), dtype=dtype)
    cpu_backend.gemm(
        strided(a.to(dtype), a_t), strided(b.to(dtype), b_t), out, bias=bias.to(dtype),
        rowsum=rowsum,
    )  # fmt: skip
    assert_product_close(out, a @ b + bias, a.to(dtype) @ b.to(dtype) + bias.to(dtype))
    assert_product_close(rowsum, a.sum(1), a.to(dtype).sum(1))


def test_gemm_rejects_mismatched_operands():
    a, b = torch.randn(4, 3), torch.randn(3, 5)
    with pytest.raises(ValueError, match="do not make out = a @ b"):
        cpu_backend.gemm(a, b, torch.empty(4, 4))
    with pytest.raises(ValueError, match="do not make out = a @ b"):
        cpu_backend.gemm(a, b, torch.empty(5, 4).t())  # out not contiguous
    with pytest.raises(ValueError, match="b must be a CPU torch.float32 tensor"):
        cpu_backend.gemm(a, b.double(), torch.empty(4, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_grad", [True, False])
def test_linear_op_matches_torch_linear(dtype, bias, x_grad):
    """``input_projection`` with backend ``cpu`` runs ``rnnkern::linear``; its value and the
    gradients of x, w and b are F.linear's, and dx is not computed when x needs none. float16
    (on CPUs without float16 arithmetic) is multiplied in float32 and rounded to float16."""
    if dtype == torch.float16 and cpu_backend._NATIVE_FLOAT16:
        pytest.skip("this CPU multiplies float16 natively: torch's products are kept")
    g = torch.Generator().manual_seed(3)
    T, B, I, GH = 33, 8, 130, 4 * 65  # 8.9M multiply-adds: above _OWN_LINEAR_MACS
    x64 = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    w64 = torch.randn(GH, I, generator=g, dtype=torch.float64) * I**-0.5
    b64 = torch.randn(GH, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(T, B, GH, generator=g, dtype=torch.float64)

    def grads(fn, dt):
        x = x64.to(dt, copy=True).requires_grad_(x_grad)
        w = w64.to(dt, copy=True).requires_grad_()
        b = None if b64 is None else b64.to(dt, copy=True).requires_grad_()
        y = fn(x, w, b)
        y.backward(dy.to(dt))
        return [y] + [t.grad for t in (x, w, b) if t is not None and t.requires_grad]

    def projection(x, w, b):
        gx = input_projection(x, w, b, "cpu")
        assert gx.grad_fn.next_functions[0][0].name() == "rnnkern_linearBackward"
        return gx

    ours = grads(projection, dtype)
    exact = grads(torch.nn.functional.linear, torch.float64)
    theirs = grads(torch.nn.functional.linear, dtype)
    assert len(ours) == len(exact) == 2 + bias + x_grad
    for got, ex, th in zip(ours, exact, theirs, strict=True):
        assert got.dtype == dtype and got.shape == ex.shape
        assert_product_close(got.reshape(ex.shape), ex, th)


def test_float16_linear_backward_without_the_weight_gradient():
    """The bias gradient alone (``need_dw`` False) is summed in float32 and rounded once, as
    torch's, and every gradient comes back in its tensor's dtype."""
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(300, 40, generator=g).half()
    x, w = torch.randn(300, 24, generator=g).half(), torch.randn(40, 24, generator=g).half()
    dx, dw, db = cpu_backend.BACKEND.linear_backward(dy, x, w, True, False, True)
    assert dw is None and (dx.dtype, db.dtype) == (torch.float16, torch.float16)
    exact = dy.double().sum(0)
    assert_product_close(db, exact, dy.sum(0))
    assert_product_close(dx, dy.double() @ w.double(), dy @ w)


def test_bfloat16_native_float16_and_small_products_use_torch_linear(monkeypatch):
    """torch's GEMM for bfloat16, for float16 where the CPU multiplies it natively, and for
    products below _OWN_LINEAR_MACS; the backend's otherwise."""
    x, w = torch.randn(64, 32, 128, dtype=torch.bfloat16), torch.randn(512, 128)
    assert not cpu_backend.BACKEND.linear_supported(x, w)
    assert cpu_backend.BACKEND.linear_supported(x.float(), w)
    assert not cpu_backend.BACKEND.linear_supported(x[:, :1].float(), w)  # 4.2M multiply-adds
    for native in (False, True):
        monkeypatch.setattr(cpu_backend, "_NATIVE_FLOAT16", native)
        assert cpu_backend.BACKEND.linear_supported(x.half(), w) is not native


def test_pool_reuses_freed_buffers_and_honours_its_limit():
    shape = (256, 1024)  # 1 MiB float32: the smallest size that comes from the pool
    cpu_backend.empty_cache()
    before = cpu_backend.cache_info()
    a = cpu_backend._alloc(shape, torch.float32)
    a.fill_(1.0)
    address = a.data_ptr()
    del a
    assert cpu_backend.cache_info()["cached_bytes"] >= 1 << 20
    b = cpu_backend._alloc(shape, torch.float32)
    c = cpu_backend._alloc(shape, torch.float32)  # b is live: c must not alias it
    assert b.data_ptr() == address and c.data_ptr() != address
    b.fill_(2.0)
    c.fill_(3.0)
    assert b.eq(2.0).all() and c.eq(3.0).all()
    info = cpu_backend.cache_info()
    assert info["hits"] == before["hits"] + 1 and info["misses"] >= before["misses"] + 2
    try:
        cpu_backend.set_cache_limit(0)
        del b, c
        assert cpu_backend.cache_info()["cached_bytes"] == 0
    finally:
        cpu_backend.set_cache_limit(1024)


def test_pool_keeps_buffers_that_outlive_the_training_step_intact():
    """Saved activations from the pool survive later allocations (no buffer is handed out
    twice): a forward whose graph stays alive while a second forward allocates gives outputs
    and gradients bitwise equal to a run alone (the kernels are deterministic)."""
    import rnnkern

    torch.manual_seed(0)
    lstm = rnnkern.LSTM(64, 128, backend="cpu")
    x = torch.randn(40, 32, 64)  # gx is 40*32*512*4 B = 2.6 MB: pooled

    def step(interleave: bool):
        xi = x.clone().requires_grad_()
        y, _ = lstm(xi)
        if interleave:
            y2, _ = lstm(x * 2)  # allocates while y's graph still holds its buffers
            y2.sum().backward()
        y.sum().backward()
        return y.detach(), xi.grad

    alone, interleaved = step(False), step(True)
    assert all(torch.equal(a, b) for a, b in zip(alone, interleaved, strict=True))


def test_pool_reuses_larger_blocks_up_to_twice_the_size():
    """Batches of varying length ask for a different size every step: a freed block serves
    requests down to half its size, not smaller ones (which would strand most of it)."""
    cpu_backend.empty_cache()
    mib = 1 << 18  # float32 elements per MiB
    a = cpu_backend._alloc((4 * mib,), torch.float32)
    address = a.data_ptr()
    del a
    b = cpu_backend._alloc((5 * mib // 2,), torch.float32)  # 2.5 MiB from the 4 MiB block
    assert b.data_ptr() == address
    b.fill_(1.0)
    del b
    c = cpu_backend._alloc((3 * mib // 2,), torch.float32)  # 1.5 MiB: a fresh block
    assert c.data_ptr() != address
    cpu_backend.empty_cache()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "64"])
def test_set_cache_limit_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="megabytes must be an int >= 0"):
        cpu_backend.set_cache_limit(bad)


def test_cache_size_environment_variable_is_checked():
    code = "import rnnkern.backends.cpu"
    env = {**os.environ, "RNNKERN_CPU_CACHE_MB": "lots"}
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode != 0
    assert "RNNKERN_CPU_CACHE_MB must be a whole number of MiB >= 0, got 'lots'" in r.stderr
    env["RNNKERN_CPU_CACHE_MB"] = "16"
    code += "; print(rnnkern.backends.cpu.cache_info()['limit_bytes'])"
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(16 << 20)


def test_lstm_training_with_own_gemm_matches_torch_nn():
    """A 2-layer LSTM on backend ``cpu`` at a size where the input projection runs through
    ``rnnkern::linear`` (40*16*128*512 = 42M multiply-adds): outputs and every gradient agree
    with torch.nn's float32 LSTM within float32 rounding (judged against torch.nn in float64)."""
    import rnnkern

    torch.manual_seed(0)
    ref64 = torch.nn.LSTM(128, 128, num_layers=2).double()
    x64 = torch.randn(40, 16, 128, dtype=torch.float64)
    dy = torch.randn(40, 16, 128, dtype=torch.float64)

    def run(module, dtype):
        x = x64.to(dtype, copy=True).requires_grad_()
        y, _ = module(x)
        y.backward(dy.to(dtype))
        return [y, x.grad] + [p.grad for p in module.parameters()]

    theirs32 = torch.nn.LSTM(128, 128, num_layers=2)
    theirs32.load_state_dict(ref64.state_dict())
    ours = rnnkern.LSTM(128, 128, num_layers=2, backend="cpu")
    ours.load_state_dict(ref64.state_dict())
    exact, th, got = (
        run(ref64, torch.float64),
        run(theirs32, torch.float32),
        run(ours, torch.float32),
    )
    for g, e, t in zip(got, exact, th, strict=True):
        assert_product_close(g, e, t)


def test_pool_and_kernels_from_two_python_threads_at_once():
    """Two threads training at once share the pool (acquire/release under its lock) and each
    runs its own OpenMP teams: results are bitwise those of the same steps run one by one."""
    import threading

    import rnnkern

    def make(seed):
        torch.manual_seed(seed)
        # gates [80, 16, 288] float32 = 1.5 MB: from the pool
        return rnnkern.GRU(64, 96, num_layers=2, backend="cpu"), torch.randn(80, 16, 64)

    def step(model, x):
        x = x.clone().requires_grad_()
        y, _ = model(x)
        y.square().sum().backward()
        return [y.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]

    jobs = [make(1), make(2)]
    alone = [step(m, x) for m, x in jobs]
    for m, _ in jobs:
        m.zero_grad(set_to_none=True)
    together: list = [None, None]

    def run(i):
        m, x = jobs[i]
        for _ in range(3):  # several rounds, so that buffers go back and forth through the pool
            m.zero_grad(set_to_none=True)
            together[i] = step(m, x)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
