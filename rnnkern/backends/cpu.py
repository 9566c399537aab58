"""Backend ``cpu``: fused C++ recurrences (``csrc/cpu``, module ``rnnkern._cpu``).

The forward runs all ``T`` steps of a layer in one call: one OpenMP parallel region, each thread
owning a range of hidden units (all their gates), one barrier per step. Per step it does the
recurrent product ``h @ W_hhᵀ`` with register-tiled vector code and the cell's pointwise update
in the same pass. The backward runs the sequential part of BPTT the same way (``dgx``, ``dh0``,
``dc0``); the weight gradients ``dW_hh = Σ dghᵀ h``, ``db_hh`` and ``dW_hr`` are each one large
GEMM over all ``T·B`` rows afterwards, by the extension's own GEMM (:func:`gemm`), which also
serves the input projection (``linear``, ``linear_backward``). Large output buffers come from
the extension's caching pool (:func:`_alloc`).

Instruction sets are chosen at run time (AVX-512, AVX2+FMA or portable vectors; the
environment variable ``RNNKERN_CPU_ISA`` or :func:`rnnkern._cpu.set_isa` forces one).

float32 and float64 run natively; float16 and bfloat16 inputs are converted to float32 (the
state dtype) around the kernel, which is what the contract's float32 accumulation asks anyway.

Legend: ``T`` time, ``B`` batch, ``H`` hidden, ``P`` state size (proj_size or H), ``G`` gates.
"""

from __future__ import annotations

import math
import os

import torch
import torch.utils.dlpack

from .base import (
    CELL_CODES,
    BackwardResult,
    ForwardResult,
    LayerConfig,
    Saved,
    empty,
    fresh,
    gate_count,
    state_dtype,
)
from .reference import _gather_time, reversed_time_index

try:
    from .. import _cpu
except ImportError as err:  # the extension is optional; available() explains how to build it
    _cpu = None
    _IMPORT_ERROR = str(err)
else:
    _IMPORT_ERROR = ""

_NATIVE = (torch.float32, torch.float64)  # what the kernels compute in
_DTYPES = (*_NATIVE, torch.float16, torch.bfloat16)


def _torch_cpu_check(namespace, name: str, missing: bool) -> bool:
    """One of torch's CPU capability checks, or ``missing`` in a torch without it."""
    check = getattr(namespace, name, None)
    return missing if check is None else bool(check())


# Whether torch's oneDNN multiplies float16 at hardware speed (AVX512-FP16, or AVX-NE-CONVERT:
# the check torch's own float16 matmul makes); without it torch's float16 products are slow
# (see CPUBackend.linear_supported). And whether the CPU has AVX512-BF16, as the one the
# bfloat16 rule was measured on (faster_than_torch). A torch without a check keeps its path.
_NATIVE_FLOAT16 = _torch_cpu_check(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", True)
_AVX512_BF16 = _torch_cpu_check(torch.cpu, "_is_avx512_bf16_supported", False)


def build_hint() -> str:
    return (
        "the C++ extension rnnkern._cpu is not built"
        + (f" ({_IMPORT_ERROR})" if _IMPORT_ERROR else "")
        + "; build it with `pip install .` (or `pip install -e .`) on a machine with a C++17 "
        "compiler (g++ >= 9 or clang >= 10) and OpenMP"
    )


# Smaller input projections (multiply-adds) stay with torch's GEMM: see linear_supported.
_OWN_LINEAR_MACS = 1 << 23
_POOL_MIN_BYTES = 1 << 20  # buffers from this size on come from the caching pool
_CACHE_ENV = "RNNKERN_CPU_CACHE_MB"


def _alloc(shape, dtype) -> torch.Tensor:
    """A fresh output buffer. Large float32/64 buffers come from the extension's caching pool
    (``csrc/cpu/buffer_pool.h``: reused pages instead of page faults, 93 -> 58 ms for an LSTM
    layer's forward at H=512, B=32, T=256); all go through ``base.fresh``/``base.empty``, so
    that tests' poison_allocations() fills every buffer the kernels write with NaN and an
    element a kernel forgets to write fails loudly."""
    nbytes = math.prod(shape) * dtype.itemsize
    if _cpu is not None and dtype in _NATIVE and nbytes >= _POOL_MIN_BYTES:
        capsule = _cpu.pooled_empty([int(n) for n in shape], dtype.itemsize * 8)
        return fresh(torch.utils.dlpack.from_dlpack(capsule))
    return empty(shape, dtype, "cpu")


def set_cache_limit(megabytes: int) -> None:
    """Keep at most ``megabytes`` MiB of freed output buffers for reuse (0 keeps none; default
    1024, or the environment variable ``RNNKERN_CPU_CACHE_MB``)."""
    if isinstance(megabytes, bool) or not isinstance(megabytes, int) or megabytes < 0:
        raise ValueError(f"megabytes must be an int >= 0, got {megabytes!r}")
    if _cpu is None:
        raise RuntimeError(build_hint())
    _cpu.pool_set_limit(megabytes << 20)


def empty_cache() -> None:
    """Free every output buffer backend ``cpu`` keeps for reuse (the CPU counterpart of
    ``torch.cuda.empty_cache``)."""
    if _cpu is not None:
        _cpu.pool_trim()


def cache_info() -> dict[str, int]:
    """``cached_bytes``, ``limit_bytes``, ``hits`` and ``misses`` of the buffer cache."""
    if _cpu is None:
        raise RuntimeError(build_hint())
    return dict(_cpu.pool_info())


def _cache_limit_from_env() -> None:
    value = os.environ.get(_CACHE_ENV, "").strip()
    if not value:
        return
    try:
        megabytes = int(value)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise ValueError(f"{_CACHE_ENV} must be a whole number of MiB >= 0, got {value!r}")
    set_cache_limit(megabytes)


if _cpu is not None:
    _cache_limit_from_env()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _work(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` as a contiguous CPU tensor of the kernel's element type."""
    return None if t is None else t.to(dtype).contiguous()


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    rowsum: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out [M, N] = a [M, K] @ b [K, N] (+ bias [N])`` and ``rowsum [M] = a.sum(1)`` with the
    extension's blocked AVX-512/AVX2 product (``gemm`` in csrc/cpu/kernels.h).

    ``a`` and ``b`` may be any strided views (a transpose is a stride, not a copy); ``out``,
    ``bias`` and ``rowsum`` are contiguous; all share one dtype, float32 or float64. Why not
    torch's GEMM: on CPUs torch uses MKL, which runs its AVX2 code on AMD processors (about
    90 GFLOP/s on one core of the 2-core AVX-512 machine the benchmarks ran on, against
    170-240 for this, depending on the shape); see ``faster_than_torch``.
    """
    M, K = a.shape
    N = b.shape[1]
    for name, t in (("b", b), ("out", out), ("bias", bias), ("rowsum", rowsum)):
        if t is not None and (t.dtype != a.dtype or t.device.type != "cpu"):
            raise ValueError(
                f"gemm: {name} must be a CPU {a.dtype} tensor, got {t.dtype} on {t.device}"
            )
    if b.shape[0] != K or tuple(out.shape) != (M, N) or not out.is_contiguous():
        raise ValueError(
            f"gemm: shapes a {list(a.shape)}, b {list(b.shape)}, out {list(out.shape)} do not "
            "make out = a @ b (out contiguous)"
        )
    _cpu.gemm(
        a.element_size(), M, N, K, _ptr(a), a.stride(0), a.stride(1), _ptr(b), b.stride(0),
        b.stride(1), _ptr(_work(bias, a.dtype)), _ptr(out), _ptr(rowsum),
    )  # fmt: skip
    return out


# The shortest sequences (steps a call) from which ``cpu`` beats torch.nn's per-step ATen ops
# (GRU, RNN, LSTM with a projection, float64), measured by suite cpu_short (faster_than_torch):
# for training by cell, for inference one length for all.
_SHORT_TRAINING = {"gru": 8, "rnn_tanh": 16, "rnn_relu": 16, "lstm": 16}
_SHORT_INFERENCE = 32
# The same for 16-bit inputs (suite cpu_16bit), where torch.nn's per-step ops are slower than in
# float32: the shortest length measured, 16, except float16 inference, from 32 as in float32;
# and for bfloat16 the largest layer measured for both cells (B=16, H=256; the lead falls as
# layers grow: the GRU at B=32, H=512 trained 1.12x and inferred 0.99x).
_SHORT_16BIT = 16
_BFLOAT16_MAX_BH = 16 * 256
_BFLOAT16_MAX_H = 512


def _faster_in_16_bits(config: LayerConfig) -> bool | str:
    """CPUBackend.faster_than_torch for float16 and bfloat16 inputs (measurements there)."""
    dtype = str(config.dtype).removeprefix("torch.")
    B, H, T = config.batch_size, config.hidden_size, config.seq_len
    if config.proj_size > 0:
        return f"not measured against torch.nn for {dtype} LSTMs with a projection"
    if config.dtype == torch.float16 and _NATIVE_FLOAT16:
        return (
            "not measured against torch.nn for float16 where torch multiplies float16 at "
            "hardware speed (AVX512-FP16 or AVX-NE-CONVERT)"
        )
    if config.dtype == torch.bfloat16:
        if not _AVX512_BF16:
            return "not measured against torch.nn for bfloat16 on a CPU without AVX512-BF16"
        if config.cell == "lstm":
            return (
                "torch.nn.LSTM runs oneDNN's fused bfloat16 LSTM on the CPU; backend 'cpu' "
                "measured 0.52-0.89x its speed (1.10x at one shape: B=1, H=128, T=64, training)"
            )
        if B * H > _BFLOAT16_MAX_BH or H > _BFLOAT16_MAX_H:
            return (
                f"measured faster than torch.nn in bfloat16 up to batch*hidden = "
                f"{_BFLOAT16_MAX_BH} and hidden {_BFLOAT16_MAX_H} only, its lead falling as "
                f"layers grow (got B={B}, H={H})"
            )
    shortest = _SHORT_16BIT
    if config.dtype == torch.float16 and not config.needs_grad:
        shortest = _SHORT_INFERENCE
    if T >= shortest:
        return True
    return (
        f"a call's fixed cost may exceed what the kernels save below T={shortest} for {dtype} "
        f"{'training' if config.needs_grad else 'inference'} (got T={T}; cells are T=1)"
    )


class CPUBackend:
    name = "cpu"

    def available(self) -> bool | str:
        return True if _cpu is not None else build_hint()

    def supports(self, config: LayerConfig) -> bool | str:
        if config.cell not in CELL_CODES:
            return f"unknown cell {config.cell!r}"
        if config.device_type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got device type {config.device_type!r}"
        if config.dtype not in _DTYPES:
            return f"backend 'cpu' supports float32/64 and float16/bfloat16, got {config.dtype}"
        return True

    def faster_than_torch(self, config: LayerConfig) -> bool | str:
        """True where backend ``cpu`` measured faster than torch.nn's own CPU path, else why not.

        Interleaved medians on a shared 2-core AVX-512 x86-64 (AMD), torch 2.13, 2 threads
        (torch's default there); results in benchmarks/results/cpu_train-* and cpu_dispatch-*:

        - GRU and RNN: torch.nn runs them as per-step ATen ops on the CPU (oneDNN's fused RNN is
          used for LSTM only), and ``cpu`` wins everywhere measured: GRU 1x256 B=16 T=64
          fwd+bwd 2.59x (fwd 2.42x); at 1 thread GRU 2x512 B=32 T=256 1.32x, GRU 1x128 B=1
          T=64 3.96x, RNN-tanh 1x256 B=16 T=64 1.46x, RNN-tanh 1x128 B=1 T=64 2.56x.
        - LSTM float32 without projection: torch.nn runs oneDNN's fused LSTM. With its own
          GEMMs for the input projection, ``dx`` and the weight gradients (torch's MKL GEMM runs
          AVX2 code on AMD CPUs at half the speed) and cached output buffers, ``cpu`` beats it
          at the target shape, 2x512 B=32 T=256: fwd+bwd 1.16-1.19x, fwd 1.08-1.09x. Over the
          grid of ``rnnkern bench --suite cpu_dispatch`` (1 layer, T=128; two runs) training
          (fwd+bwd) is faster exactly where B*H >= 8192 and H <= 512 (1.04-1.56x: B=64 H=128,
          B>=32 H=256, B>=16 H=512) and slower elsewhere: smaller products leave the per-step
          barrier and call overheads exposed (0.78-1.01x), and at H=1024 both are bound by
          reading W_hh (16 MB) from L3 every step (0.87-1.07x). Forward alone is at parity
          over the grid (0.87-1.15x, one outlier B=4 H=1024 1.83x), so inference stays with
          torch.nn. Shorter sequences than T=128 were not measured. Part of the training
          advantage is memory: glibc gives freed memory back, so oneDNN's buffers are fresh
          pages every call while ``cpu`` reuses its own (caching pool). With glibc told to keep
          freed memory (``rnnkern bench --allocator no-trim``, torch.nn's best case) the target
          shape is at parity: fwd+bwd 1.01x, fwd 0.91x (cpu_train-notrim-*).
          Those figures are from an AMD Zen 5. On a Zen 4 (half the FMA width; cpu_dispatch-*
          at 4549fdd, one run of 5 repeats) the rule's region measured 0.98-1.19x (B=32 H=256
          0.98x, B=16 H=512 1.00x, the others 1.03-1.19x) and the rest 0.77-0.97x, except
          H=1024, where ``cpu`` was faster (fwd+bwd 1.10-1.29x, fwd 1.07-1.67x). The rule is
          kept: at H=1024 the two machines disagree (0.87-1.07x on the Zen 5), and where it
          picks ``cpu`` neither measured it more than 2% slower. The target shape on the Zen 4:
          fwd+bwd 1.03-1.12x, no-trim 1.00-1.04x.
        - LSTM with proj_size (oneDNN has none; torch.nn falls back to per-step ops): 1x256
          proj 128 B=16 T=64 fwd+bwd 1.24x. LSTM float64 (oneDNN has none): 1x256 B=16 T=64
          1.14x (both at 1 thread).
        - Short calls, for all of the above (suite ``cpu_short``, 20 calls a sample; the
          figures below to "Three earlier runs" are the run at 32a819d): a call through
          rnnkern's operators cost about 100 us more than torch.nn's before its first step,
          so torch.nn wins single steps (the cells and T=1: 0.18-0.73x) and mostly few steps
          (T=8: 0.52-1.88x at 6e47dbf). At T=32 ``cpu`` won every case (1.25-4.93x, GRU and
          RNN, H 64 and 512, B 1 and 16); at T=16 training won every case (1.18-2.72x,
          including LSTM with a projection and float64) and inference lost two of ten (0.77x,
          0.87x). Three earlier runs agree, except that one T=16 training case lost in the
          two before the backward's weight packing was sped up (6e47dbf; GRU B=1 H=512,
          0.95x). Registering the operators without custom_op's wrappers (rnnkern.torch_ops)
          cut the fixed cost of a layer's forward + backward by about 80 us. In the committed
          run after it (c58858c) GRU training at T=8 measured 1.11-2.17x (a run before it:
          1.38-1.80x, and 0.99x at B=16 H=512), so GRU trains on ``cpu`` from T=8; RNN at T=8
          lost one case in each run (0.96-0.97x), GRU at T=4 one (B=16 H=512, 0.81-0.90x).
          Hence ``cpu`` from T=8 (GRU) or 16 (the others) for training and from T=32 for
          inference (_SHORT_TRAINING, _SHORT_INFERENCE).
        - 16-bit inputs (suite ``cpu_16bit``, committed run at 2e6263e, 2-core AMD EPYC Zen 4
          with AVX512-BF16 and without AVX512-FP16; one layer, B=1 H=128 and B=16 H=256 at
          T=16 and 64, and bfloat16 B=32 H=512 T=128; the kernels compute in float32 and round
          what the contract rounds). bfloat16: torch.nn runs the GRU and RNN as per-step
          bfloat16 ATen ops; ``cpu`` trained 1.12-8.07x faster and inferred 0.99-3.84x (from
          T=16; the lead shrinks as the layer grows: GRU inference 3.60x at B=1 H=128, 1.96x at
          B=16 H=256, 0.99x at B=32 H=512). Its LSTM is oneDNN's fused bfloat16 LSTM, which
          ``cpu`` lost to (0.52-0.89x) except at B=1 H=128 T=64 training (1.10x): the LSTM
          stays with torch.nn. float16, on a CPU without hardware float16 products (no
          AVX512-FP16 or AVX-NE-CONVERT: torch's ``_is_mkldnn_fp16_supported``), where torch.nn
          runs every cell as slow per-step float16 ops and ``cpu`` takes its larger input
          projections through its own float32 GEMM (linear_supported): training 1.78-23.95x,
          inference 0.97-7.40x, the one loss the RNN at B=1 T=16 (0.97x; from T=64 1.88x and
          up). With torch's float16 products instead (the suite's ``float16 products by
          torch`` row) B=16 H=256 measured 1.51-2.13x, against 3.37-23.95x: the own GEMM is
          the rest. Hence ``cpu`` from T=16
          for bfloat16 GRU and RNN up to B*H = 4096 (the largest layer measured for both) and
          H = 512, and every float16 cell (float16 inference from T=32, as in float32):
          _SHORT_16BIT, _SHORT_INFERENCE, _BFLOAT16_MAX_BH. Not measured, so left to
          torch.nn: float16 where torch multiplies it at hardware speed (AVX512-FP16 or
          AVX-NE-CONVERT), bfloat16 on CPUs without AVX512-BF16, and 16-bit LSTMs with a
          projection.
        """
        ok = self.supports(config)
        if ok is not True:
            return ok
        B, H, T = config.batch_size, config.hidden_size, config.seq_len
        if config.dtype in (torch.float16, torch.bfloat16):
            return _faster_in_16_bits(config)
        if config.cell != "lstm" or config.proj_size > 0 or config.dtype == torch.float64:
            shortest = _SHORT_TRAINING[config.cell] if config.needs_grad else _SHORT_INFERENCE
            if T >= shortest:
                return True
            return (
                f"a call's fixed cost makes torch.nn's per-step ops faster below T={shortest} "
                f"for {'training' if config.needs_grad else 'inference'} (got T={T}; cells "
                "are T=1)"
            )
        if config.needs_grad and B * H >= 8192 and H <= 512 and T >= 128:
            return True
        return (
            "torch.nn.LSTM runs oneDNN's fused LSTM on the CPU; backend 'cpu' measured faster "
            "only for training where batch*hidden >= 8192, hidden <= 512 and T >= 128 (got "
            f"{'training' if config.needs_grad else 'inference'}, B={B}, H={H}, T={T})"
        )

    # The input projection's GEMM (base.OwnsLinear). bfloat16 stays with torch, whose oneDNN
    # path multiplies it natively on CPUs with AVX512-BF16 (and which this GEMM, in float32 on
    # converted operands, would not beat there), and so does float16 where the CPU has float16
    # arithmetic. Without it torch multiplies float16 slowly, and float16 products run here in
    # float32, their results rounded to float16 as torch's are: suite cpu_16bit's rows
    # "rnnkern[cpu]" against "float16 products by torch" (B=16, H=256: 3.37-23.95x against
    # 1.51-2.13x torch.nn). Products below _OWN_LINEAR_MACS multiply-adds stay with torch in
    # every dtype: calling a custom operator costs more than the faster product saves (LSTM
    # 1x128, B=1, T=64 fwd+bwd, 4.2M multiply-adds per product: 0.98 ms with this GEMM
    # against 0.88 ms with torch's, float32, 2 threads; not measured for float16, where the
    # two suite rows agree at B=1, H=128, below it).
    def linear_supported(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        return (
            _cpu is not None
            and x.device.type == "cpu"
            and (x.dtype in _NATIVE or (x.dtype == torch.float16 and not _NATIVE_FLOAT16))
            and x.numel() * w.shape[0] >= _OWN_LINEAR_MACS
        )

    def linear(self, x, w, b):
        """``[M, K] @ [N, K]ᵀ + [N] -> [M, N]`` (in ``x``'s dtype; float16 computed in
        float32)."""
        S = state_dtype(x.dtype)
        out = gemm(_work(x, S), _work(w, S).t(), _alloc((x.shape[0], w.shape[0]), S),
                   bias=_work(b, S))  # fmt: skip
        return out.to(x.dtype)

    def linear_backward(self, dy, x, w, need_dx, need_dw, need_db):
        """``dx = dy @ w``, ``dw = dyᵀ @ x``, ``db = dy.sum(0)`` (None where not needed), each
        in its tensor's dtype (float16 computed in float32)."""
        M, N = dy.shape
        S = state_dtype(dy.dtype)
        dy_w, w_w = _work(dy, S), _work(w, S)
        dx = gemm(dy_w, w_w, _alloc(x.shape, S)).to(x.dtype) if need_dx else None
        dw = db = None
        if need_dw or need_db:
            db = _alloc((N,), S) if need_db else None
            if need_dw:
                dw = gemm(dy_w.t(), _work(x, S), _alloc(w.shape, S), rowsum=db).to(w.dtype)
            else:
                db = dy_w.sum(0)
            db = None if db is None else db.to(dy.dtype)
        return dx, dw, db

    def _check(self, gx: torch.Tensor) -> None:
        if _cpu is None:
            raise RuntimeError(build_hint())
        if gx.device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got gx on {gx.device}")
        if gx.dtype not in _DTYPES:
            raise ValueError(f"backend 'cpu' does not support dtype {gx.dtype}")

    def forward(self, cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save) -> ForwardResult:
        """Shapes and layout: see :mod:`rnnkern.backends.base`."""
        self._check(gx)
        T, B, GH = gx.shape
        S = state_dtype(gx.dtype)
        H = GH // gate_count(cell)
        P = w_hh.shape[1]
        lstm, gru = cell == "lstm", cell == "gru"
        gx_w, w_w, b_w, wr_w = (_work(t, S) for t in (gx, w_hh, b_hh, w_hr))
        h0_w, c0_w = _work(h0, S), _work(c0, S) if lstm else None
        lens = None if lengths is None else lengths.to(torch.int64).contiguous()

        y = _alloc((T, B, P), S)
        h_n = _alloc((B, P), S)
        c_n = _alloc((B, H), S) if lstm else torch.empty(0, dtype=S)
        steps = T + 1 if save else 2  # without save, h (and c) live in a 2-slot ring
        hs = _alloc((steps, B, P), S)
        if lstm:
            aux = _alloc((steps, B, H), S)
        elif gru and save:
            aux = _alloc((T, B, H), S)
        else:
            aux = torch.empty(0, dtype=S)
        gates = _alloc((T, B, GH), S) if save and (lstm or gru) else torch.empty(0, dtype=S)
        gh = _alloc((B, GH), S)
        m = _alloc((B, H), S) if wr_w is not None else None

        _cpu.layer_forward(
            S.itemsize, CELL_CODES[cell], T, B, H, P,
            _ptr(gx_w), _ptr(h0_w), _ptr(c0_w), _ptr(w_w), _ptr(b_w), _ptr(wr_w), _ptr(lens),
            bool(reverse), bool(save),
            _ptr(y), _ptr(h_n), _ptr(c_n), _ptr(hs), _ptr(aux), _ptr(gates), _ptr(gh), _ptr(m),
        )  # fmt: skip
        if save:
            saved = Saved(hs, aux, gates)
        else:  # three distinct tensors: outputs of a custom op must not alias each other
            saved = Saved(*(torch.empty(0, dtype=S) for _ in range(3)))
        return ForwardResult(y.to(gx.dtype), h_n, c_n, saved)

    def backward(
        self, cell, saved, w_hh, b_hh, w_hr, lengths, reverse, dy, dh_n, dc_n
    ) -> BackwardResult:
        """Shapes and layout: see :mod:`rnnkern.backends.base`."""
        self._check(dy)
        hs, aux, gates = saved
        T, B, P = dy.shape
        S = state_dtype(dy.dtype)
        G = gate_count(cell)
        GH = w_hh.shape[0]
        H = GH // G
        lstm, gru = cell == "lstm", cell == "gru"
        proj = w_hr is not None
        w_w = _work(w_hh, S)  # [G*H, P]; the kernel packs it into panels of columns
        wr_w = _work(w_hr, S) if proj else None  # [P, H]
        dy_w, dh_w = _work(dy, S), _work(dh_n, S)
        dc_w = _work(dc_n, S) if lstm else None
        lens = None if lengths is None else lengths.to(torch.int64).contiguous()
        hs, aux, gates = (t.contiguous() for t in (hs, aux, gates))

        dgx = _alloc((T, B, GH), S)
        dgh = _alloc((T, B, GH), S) if gru else None
        dh_proj = _alloc((T, B, P), S) if proj else None
        dh0 = _alloc((B, P), S)
        dc0 = _alloc((B, H), S) if lstm else None
        ring, dht, dpre = _alloc((2, B, P), S), _alloc((B, P), S), _alloc((B, GH), S)
        dm = _alloc((B, H), S) if proj else None

        _cpu.layer_backward(
            S.itemsize, CELL_CODES[cell], T, B, H, P,
            _ptr(hs), _ptr(aux), _ptr(gates), _ptr(w_w), _ptr(wr_w), _ptr(lens), bool(reverse),
            _ptr(dy_w), _ptr(dh_w), _ptr(dc_w),
            _ptr(dgx), _ptr(dgh), _ptr(dh_proj), _ptr(dh0), _ptr(dc0),
            _ptr(ring), _ptr(dht), _ptr(dpre), _ptr(dm),
        )  # fmt: skip

        # Weight gradients: one product each over all T*B rows. The kernel wrote dgx / dgh /
        # dh_proj in time order; the saved states are in processing order, so reversed layers
        # gather them to time order first (the index map is its own inverse).
        h_prev = hs[:T]
        index = reversed_time_index(lengths, T, B, hs.device) if reverse else None
        if index is not None:
            h_prev = _gather_time(h_prev, index).contiguous()
        dgh_t = dgh if gru else dgx
        dw_hh = _alloc((GH, P), S)
        db_hh = None if b_hh is None else _alloc((GH,), S)
        gemm(dgh_t.view(T * B, GH).t(), h_prev.view(T * B, P), dw_hh, rowsum=db_hh)
        dw_hh = dw_hh.to(w_hh.dtype)
        db_hh = None if db_hh is None else db_hh.to(b_hh.dtype)
        dw_hr = None
        if proj:
            m_all = gates[:, :, 3 * H :] * aux[1:].tanh()  # o * tanh(c), processing order
            if index is not None:
                m_all = _gather_time(m_all, index)
            dw_hr = _alloc((P, H), S)
            gemm(dh_proj.view(T * B, P).t(), m_all.contiguous().view(T * B, H), dw_hr)
            dw_hr = dw_hr.to(w_hr.dtype)
        return BackwardResult(dgx.to(dy.dtype), dh0, dc0, dw_hh, db_hh, dw_hr)


BACKEND = CPUBackend()
