"""Backend ``cuda``: persistent cooperative CUDA kernels (``csrc/cuda``, module ``rnnkern._cuda``).

One kernel launch runs all ``T`` steps of a layer: the grid has at most one block per SM, each
block owns a slice of the hidden units (all gates of each) and keeps its slice of ``W_hh``
resident in shared memory for the whole sequence when it fits (otherwise it reads the slice
from global memory each step, where it stays in L2), and the blocks meet at one grid-wide
barrier per step (two with an LSTM projection). The backward runs the sequential part of BPTT
the same way (``dgx``, ``dh0``, ``dc0``); the weight gradients ``dW_hh = Σ dghᵀ h``, ``db_hh``
and ``dW_hr`` are each one large GEMM over all ``T·B`` rows afterwards, done by torch.

float32, float16 and bfloat16 inputs; states, saved activations and accumulation are float32.
Outputs are allocated here (through :func:`rnnkern.backends.base.empty`) and the kernels get
their device addresses and torch's current stream.

Safety: the grid barrier gives up after ``RNNKERN_CUDA_BARRIER_TIMEOUT_S`` seconds (default 30;
0 waits forever) instead of hanging, and every launch's status word is read back, so a deadlock
or an out-of-range length becomes a Python exception. The read-back does not stall the host: the
word is copied to pinned memory behind the launch, and the next call into the backend raises the
error of any launch that has finished by then; ``BACKEND.synchronize()`` waits for all of them
and raises (call it after the last launch whose errors matter, e.g. at the end of training).
``rnn_layer`` checks lengths on the host before any launch, so what remains is the deadlock
guard. ``RNNKERN_CUDA_DEBUG=1`` checks each launch at once, synchronising after it so
that an asynchronous CUDA fault is also reported by the launch that caused it. Under CUDA graph
capture nothing is read back (a captured launch has no status to read until it is replayed).

Emulation: when ``_cuda`` is ``rnnkern._cuda_emulated`` (:mod:`rnnkern.backends.cuda_emulation`,
the same kernels compiled for the CPU; tests), the backend runs on CPU tensors, each launch
synchronously, and reads every status word at once.

Legend: ``T`` time, ``B`` batch, ``H`` hidden, ``P`` state size (proj_size or H), ``G`` gates.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading

import torch

from . import tracing
from .base import (
    CELL_CODES,
    BackwardResult,
    ForwardResult,
    LayerConfig,
    Saved,
    cudnn_rnn_tf32,
    empty,
    gate_count,
    tf32_allowed,
)
from .reference import _gather_time, reversed_time_index

try:
    from .. import _cuda
except ImportError as err:  # the extension is optional; available() explains how to build it
    _cuda = None
    _IMPORT_ERROR = str(err)
else:
    _IMPORT_ERROR = ""

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ERRORS = {
    1: "a wait for other blocks (a grid-wide barrier, or a value another block writes) timed "
    "out (a kernel deadlock, or the GPU was preempted for longer than "
    "RNNKERN_CUDA_BARRIER_TIMEOUT_S); the outputs of this call are invalid",
    2: "lengths has a value outside [1, T]",
}


def build_hint() -> str:
    """How to get ``rnnkern._cuda`` when it is missing."""
    return (
        "the CUDA extension rnnkern._cuda is not built"
        + (f" ({_IMPORT_ERROR})" if _IMPORT_ERROR else "")
        + "; build it on a machine with the CUDA toolkit (nvcc on PATH or CUDA_HOME set) with "
        "`python setup.py build_ext --inplace` or `pip install .`; RNNKERN_CUDA_ARCHS chooses "
        "the GPU targets (default sm_80,sm_90+PTX)"
    )


def _timeout_ns() -> int:
    seconds = float(os.environ.get("RNNKERN_CUDA_BARRIER_TIMEOUT_S", "30"))
    return int(seconds * 1e9) if seconds > 0 else 0


def _debug() -> bool:
    return os.environ.get("RNNKERN_CUDA_DEBUG") == "1"


def _emulated() -> bool:
    """True when the kernels in use are the CPU emulation (module docstring)."""
    return bool(getattr(_cuda, "EMULATED", False))


def device_type() -> str:
    """The device type whose tensors the kernels in use take: ``cuda``, or ``cpu`` under the
    emulation."""
    return "cpu" if _emulated() else "cuda"


def on_device(device: torch.device):
    """A context making ``device`` current for the launchers (nothing to do on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def stream_handle(device: torch.device) -> int:
    """torch's current stream on ``device`` as the launchers take it (0 under the emulation,
    whose launches run at once)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def plans(cell: str, dtype: torch.dtype, B: int, H: int, P: int, proj: bool) -> list[dict]:
    """The forward and backward launch plans of a layer on the current device, as a call now
    would get them (float32 in TF32 where :func:`tf32_allowed`; the planning knobs read from
    the environment). Raises the launchers' ValueError where a layer cannot run."""
    tf32 = tf32_allowed(dtype)
    code, dt = CELL_CODES[cell], _DTYPE_CODE[dtype]
    return [_cuda.plan(backward, code, dt, B, H, P, proj, tf32) for backward in (False, True)]


def _trace_buffer(device: torch.device, points: int = 0) -> tuple[torch.Tensor | None, int]:
    """A launch's zeroed stamp buffer ``[sms, steps, points]`` (a block per SM at most;
    ``points`` a step, default the training kernels') and the steps it traces, or (None, 0)
    outside :func:`rnnkern.backends.tracing.trace_phases`."""
    steps = tracing.traced_steps()
    if not steps:
        return None, 0
    shape = (int(_cuda.device_info()["sms"]), steps, points or int(_cuda.TRACE_POINTS))
    return torch.zeros(shape, dtype=torch.int64, device=device), steps


def _record_trace(kernel: str, info: dict, buffer: torch.Tensor | None) -> None:
    """Append the stamps of the launch's blocks to the running trace list (:mod:`.tracing`)."""
    if buffer is not None:
        tracing.record("cuda", kernel, info, buffer[: info["blocks"]])


class CUDABackend:
    name = "cuda"

    def __init__(self) -> None:
        self._plans: dict[tuple, bool | str] = {}
        self.last_launch: dict | None = None  # layout of the latest launch (tests, benchmarks)
        # Status words on their way back: (event after the copy, pinned copy, device word, what)
        self._pending: collections.deque = collections.deque()
        self._pending_lock = threading.Lock()  # autograd runs a thread per device

    def available(self) -> bool | str:
        if _cuda is None:
            return build_hint()
        if _emulated():
            return True
        if not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        return True

    def supports(self, config: LayerConfig) -> bool | str:
        ok = self.available()
        if ok is not True:
            return ok
        if config.cell not in CELL_CODES:
            return f"unknown cell {config.cell!r}"
        if config.device_type != device_type():
            return (
                f"backend 'cuda' runs on {device_type().upper()} tensors, got device type "
                f"{config.device_type!r}"
            )
        if config.dtype not in _DTYPE_CODE:
            return (
                f"dtype {config.dtype} is not supported by the CUDA kernels (float32, float16, "
                "bfloat16); use backend 'reference' for float64"
            )
        if not _cuda.dtype_compiled(_DTYPE_CODE[config.dtype]):
            return f"this build of rnnkern._cuda was compiled without {config.dtype}"
        if config.proj_size and config.cell != "lstm":
            return "projection is only defined for lstm"
        P = config.proj_size or config.hidden_size
        return self._fits(config.cell, config.dtype, config.batch_size, config.hidden_size, P,
                          bool(config.proj_size))  # fmt: skip

    def faster_than_torch(self, config: LayerConfig) -> bool | str:
        """True where backend ``cuda`` measured faster than torch.nn (cuDNN), else why not.

        Measured on an NVIDIA H100 80GB HBM3 (torch 2.11 + CUDA 13.0, cuDNN 9.19, TF32 off),
        one layer, input_size == hidden_size, T = 256, training step (forward + backward with a
        fixed upstream gradient), interleaved medians (``rnnkern bench --suite cuda_train
        --device cuda --quick``; results in benchmarks/results/nn_modules+cuda_train-quick-*):

        Ranges over the two runs (commits 797d39b and 3733e8f):

        - B = 1: faster for H in {256, 512, 1024}, LSTM and GRU, float32 and bfloat16:
          1.41-2.17x.
        - B = 16: faster for H in {256, 512}: 1.27-1.95x; at H = 1024 it is a wash
          (0.86-1.14x), so torch.nn keeps it.
        - B = 64: 1.13-1.34x at H = 256 except LSTM bfloat16 (0.94-0.99x); 0.24-0.91x at
          H >= 512, where every block staged the whole batch's rows each step (the backward:
          all of dpre, 1 MB per block at H = 1024). torch.nn keeps B > 16. Those runs predate
          the batch split (the plan now splits B = 64 over blocks where that reads fewer bytes
          per step; unmeasured: the cuda_train row "batch not split" will show it).
        - Forward alone measured at two shapes: LSTM B=16 H=256 1.70x; GRU B=64 H=512 1.16x.

        So: LSTM or GRU without projection, float32 or bfloat16, T >= 256, and either
        B <= 16 with 256 <= H <= 512 or B = 1 with 256 <= H <= 1024; float32 only where it
        was measured, exact on both sides (torch's default lets cuDNN's RNNs take TF32,
        against which nothing is measured yet). Elman RNNs, projections,
        float16, shorter sequences and H < 256 were not measured.
        """
        ok = self.supports(config)
        if ok is not True:
            return ok
        if config.cell not in ("lstm", "gru") or config.proj_size:
            return "not measured against cuDNN for this cell (measured: LSTM and GRU, no proj)"
        if config.dtype not in (torch.float32, torch.bfloat16):
            return f"not measured against cuDNN for {config.dtype} inputs"
        if config.seq_len < 256:
            return "not measured against cuDNN for sequences shorter than 256 steps"
        if config.dtype == torch.float32 and (cudnn_rnn_tf32() or tf32_allowed(torch.float32)):
            return "measured against cuDNN with float32 exact on both sides, and here " + (
                "cuDNN's RNNs take TF32 (torch.backends.cudnn.rnn.fp32_precision)"
                if cudnn_rnn_tf32()
                else "TF32 is allowed (torch.set_float32_matmul_precision)"
            )
        B, H = config.batch_size, config.hidden_size
        if (B <= 16 and 256 <= H <= 512) or (B == 1 and 256 <= H <= 1024):
            return True
        return (
            f"cuDNN measured as fast or faster at B={B}, H={H} (the cuda kernels win for "
            "B <= 16 with H in [256, 512] and B = 1 with H in [256, 1024])"
        )

    def describe(self, config: LayerConfig) -> str:
        """The launch plans a call of ``config`` gets on the current device (for
        :func:`rnnkern.explain`): blocks, batch groups and chunks, where the weights live, and
        which matrix-vector product runs."""
        P = config.proj_size or config.hidden_size
        tensor_cores = {torch.float32: "TF32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
        products = {
            "tiled": "float32 FMAs",
            "simple": "float32 FMAs, one row per warp",
            "mma": "tensor cores, " + tensor_cores[config.dtype],
        }
        layer = (config.cell, config.dtype, config.batch_size, config.hidden_size, P)
        lines = []
        for backward, p in enumerate(plans(*layer, bool(config.proj_size))):
            groups = p["batch_groups"]
            where = "resident in shared memory" if p["weights_in_smem"] else "read from L2"
            lines.append(
                f"{'backward' if backward else 'forward'}: {p['blocks']} blocks "
                f"({p['blocks'] // groups} unit groups x {groups} batch groups of "
                f"{p['batch_per_group']} rows), {p['units_per_block']} hidden units a block, "
                f"batch chunks of {p['batch_chunk']} rows, weights {where}, products on "
                f"{products[p['matvec']]}"
            )
        return "\n".join(lines)

    def _fits(self, cell: str, dtype: torch.dtype, B: int, H: int, P: int, proj: bool):
        """True when both kernels can be laid out on the current device, else the reason.
        Whether a layout exists does not depend on B (the batch is staged in chunks that
        shrink to one row), so the answer is cached without it, but with the planning knobs
        the launchers read (an explicit ``RNNKERN_CUDA_MATVEC=mma`` can make a layer an
        error, and unsetting it must not leave that answer behind; so can float32 without
        TF32 allowed)."""
        device = _cuda.device_info()["device"] if _emulated() else torch.cuda.current_device()
        knobs = tuple(
            os.environ.get(k)
            for k in (
                "RNNKERN_CUDA_MATVEC",
                "RNNKERN_CUDA_BATCH_SPLIT",
                "RNNKERN_CUDA_RESIDENT_CHUNK",
            )
        )
        key = (_cuda, device, cell, dtype, H, P, proj, tf32_allowed(dtype), knobs)
        if key not in self._plans:
            try:
                plans(cell, dtype, B, H, P, proj)
            except (ValueError, RuntimeError) as err:
                self._plans[key] = str(err)
            else:
                self._plans[key] = True
        return self._plans[key]

    def _check(self, cell: str, like: torch.Tensor, w_hh: torch.Tensor, w_hr) -> None:
        """Raise a ValueError naming the reason when ``like [T, B, *]`` (gx or dy) with
        ``w_hh [G*H, P]`` is not supported."""
        if _cuda is None:
            raise RuntimeError(build_hint())
        T, B = like.shape[:2]
        G = gate_count(cell)
        H, P = w_hh.shape[0] // G, w_hh.shape[1]
        proj = P if w_hr is not None else 0
        config = LayerConfig(cell, like.device.type, like.dtype, 0, H, proj, B, T, False, False)
        with on_device(like.device):
            ok = self.supports(config)
        if ok is not True:
            raise ValueError(f"backend 'cuda' cannot run this layer: {ok}")

    def _finish(self, sync: torch.Tensor, info: dict, what: str) -> None:
        """Start reading the kernel's status word back (see the module docstring), and raise
        the error of any earlier launch that has finished."""
        self.last_launch = info
        if _debug() or _emulated():  # (an emulated launch has finished)
            self._raise_if_error(int(sync[1].item()), what)
            return
        if torch.cuda.is_current_stream_capturing():
            return
        host = torch.empty(1, dtype=torch.int64, pin_memory=True)
        host.copy_(sync[1:2], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        with self._pending_lock:
            self._pending.append((done, host, sync, what))
        self.poll()

    @staticmethod
    def _raise_if_error(code: int, what: str) -> None:
        if code:
            raise RuntimeError(f"rnnkern._cuda {what}: {_ERRORS.get(code, f'error code {code}')}")

    def poll(self, wait: bool = False) -> None:
        """Raise the first error among the launches whose status has come back (with ``wait``,
        after waiting for all of them); each status is reported once. Does nothing while the
        current stream is being captured into a CUDA graph (no event may be queried then)."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        while True:
            with self._pending_lock:
                if not self._pending:
                    return
                done, host, _, what = self._pending[0]
                if not wait and not done.query():
                    return
                self._pending.popleft()
            done.synchronize()
            self._raise_if_error(int(host[0]), what)

    def synchronize(self) -> None:
        """Wait for every launch so far and raise the first error any of them recorded."""
        self.poll(wait=True)

    def forward(self, cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save) -> ForwardResult:
        """Shapes and layout: see :mod:`rnnkern.backends.base`."""
        self.poll()
        self._check(cell, gx, w_hh, w_hr)
        with on_device(gx.device):
            return self._forward(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save)

    def _forward(self, cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save):
        T, B, GH = gx.shape
        dt, dev, f32 = gx.dtype, gx.device, torch.float32
        H = GH // gate_count(cell)
        P = w_hh.shape[1]
        lstm, gru = cell == "lstm", cell == "gru"
        proj = w_hr is not None
        gx = gx.contiguous()  # [T, B, G*H]
        w = w_hh.to(dt).contiguous()  # [G*H, P]
        b = None if b_hh is None else b_hh.to(dt).contiguous()  # [G*H]
        wr = w_hr.to(dt).contiguous() if proj else None  # [P, H]
        h0 = h0.to(device=dev, dtype=f32).contiguous()  # [B, P]
        c0 = c0.to(device=dev, dtype=f32).contiguous() if lstm else None  # [B, H]
        lens = None if lengths is None else lengths.to(device=dev, dtype=torch.int64).contiguous()

        y = empty((T, B, P), dt, dev)
        h_n = empty((B, P), f32, dev)
        c_n = empty((B, H), f32, dev) if lstm else torch.empty(0, dtype=f32, device=dev)
        steps = T + 1 if save else 2  # without save, h (and c) live in 2-slot rings
        hs = empty((steps, B, P), f32, dev)
        aux = None
        if lstm:
            aux = empty((steps, B, H), f32, dev)
        elif gru and save:
            aux = empty((T, B, H), f32, dev)
        gates = empty((T, B, GH), f32, dev) if save and (lstm or gru) else None
        m = empty((B, H), f32, dev) if proj else None
        # barrier arrivals per batch group, error code (csrc/cuda/api.h: kTrainSyncWords)
        sync = torch.zeros(int(_cuda.TRAIN_SYNC_WORDS), dtype=torch.int64, device=dev)
        trace, trace_steps = _trace_buffer(dev)

        info = _cuda.layer_forward(
            CELL_CODES[cell], _DTYPE_CODE[dt], T, B, H, P, bool(reverse), bool(save),
            _ptr(gx), _ptr(h0), _ptr(c0), _ptr(w), _ptr(b), _ptr(wr), _ptr(lens),
            _ptr(y), _ptr(h_n), _ptr(c_n if lstm else None), _ptr(hs), _ptr(aux), _ptr(gates),
            _ptr(m), _ptr(sync), stream_handle(dev),
            _timeout_ns(), _debug(), tf32_allowed(dt), _ptr(trace), trace_steps,
        )  # fmt: skip
        self._finish(sync, info, "layer_forward")
        _record_trace("forward", info, trace)
        if save:
            empty_f32 = torch.empty(0, dtype=f32, device=dev)
            saved = Saved(hs, aux if aux is not None else empty_f32,
                          gates if gates is not None else empty_f32.clone())  # fmt: skip
        else:  # three distinct tensors: outputs of a custom op must not alias each other
            saved = Saved(*(torch.empty(0, dtype=f32, device=dev) for _ in range(3)))
        return ForwardResult(y, h_n, c_n, saved)

    def backward(
        self, cell, saved, w_hh, b_hh, w_hr, lengths, reverse, dy, dh_n, dc_n
    ) -> BackwardResult:
        """Shapes and layout: see :mod:`rnnkern.backends.base`."""
        if saved.hs.numel() == 0:
            raise RuntimeError("cuda backward called on a forward that ran with save=False")
        self.poll()
        self._check(cell, dy, w_hh, w_hr)
        with on_device(dy.device):
            return self._backward(cell, saved, w_hh, b_hh, w_hr, lengths, reverse, dy, dh_n,
                                  dc_n)  # fmt: skip

    def _backward(self, cell, saved, w_hh, b_hh, w_hr, lengths, reverse, dy, dh_n, dc_n):
        T, B, P = dy.shape
        dt, dev, f32 = dy.dtype, dy.device, torch.float32
        G = gate_count(cell)
        GH = w_hh.shape[0]
        H = GH // G
        lstm, gru = cell == "lstm", cell == "gru"
        proj = w_hr is not None
        hs, aux, gates = (t.to(f32).contiguous() for t in saved)
        if hs.shape != (T + 1, B, P):
            raise ValueError(f"saved hs must have shape {[T + 1, B, P]}, got {list(hs.shape)}")
        w_t = w_hh.to(dt).t().contiguous()  # [P, G*H]: a state unit's column is one row
        wr_t = w_hr.to(dt).t().contiguous() if proj else None  # [H, P]
        dy = dy.contiguous()  # [T, B, P]
        dh_n = dh_n.to(f32).contiguous()  # [B, P]
        dc_n = dc_n.to(f32).contiguous() if lstm else None  # [B, H]
        lens = None if lengths is None else lengths.to(device=dev, dtype=torch.int64).contiguous()

        dgx = empty((T, B, GH), f32, dev)
        dgh = empty((T, B, GH), f32, dev) if gru else None
        dh_proj = empty((T, B, P), f32, dev) if proj else None
        dh0 = empty((B, P), f32, dev)
        dc0 = empty((B, H), f32, dev) if lstm else None
        dpre = empty((2, B, GH), f32, dev)
        dht = empty((B, P), f32, dev) if proj else None
        dloc = empty((B, H), f32, dev) if gru else None
        sync = torch.zeros(int(_cuda.TRAIN_SYNC_WORDS), dtype=torch.int64, device=dev)
        trace, trace_steps = _trace_buffer(dev)

        info = _cuda.layer_backward(
            CELL_CODES[cell], _DTYPE_CODE[dt], T, B, H, P, bool(reverse),
            _ptr(hs), _ptr(aux if (lstm or gru) else None), _ptr(gates if (lstm or gru) else None),
            _ptr(w_t), _ptr(wr_t), _ptr(lens), _ptr(dy), _ptr(dh_n), _ptr(dc_n),
            _ptr(dgx), _ptr(dgh), _ptr(dh_proj), _ptr(dh0), _ptr(dc0),
            _ptr(dpre), _ptr(dht), _ptr(dloc), _ptr(sync),
            stream_handle(dev), _timeout_ns(), _debug(), tf32_allowed(dt), _ptr(trace),
            trace_steps,
        )  # fmt: skip
        self._finish(sync, info, "layer_backward")
        _record_trace("backward", info, trace)

        # Weight gradients: one GEMM each over all T*B rows. The kernel wrote dgx / dgh /
        # dh_proj in time order; the saved states are in processing order, so reversed layers
        # gather them to time order first (the index map is its own inverse).
        h_prev = hs[:T]
        index = reversed_time_index(lengths, T, B, dev) if reverse else None
        if index is not None:
            h_prev = _gather_time(h_prev, index)
        dgh_t = dgh if gru else dgx
        dw_hh = (dgh_t.reshape(T * B, GH).t() @ h_prev.reshape(T * B, P)).to(w_hh.dtype)
        db_hh = None if b_hh is None else dgh_t.sum(dim=(0, 1)).to(b_hh.dtype)
        dw_hr = None
        if proj:
            m_all = gates[:, :, 3 * H :] * aux[1:].tanh()  # o * tanh(c), processing order
            if index is not None:
                m_all = _gather_time(m_all, index)
            dw_hr = (dh_proj.reshape(T * B, P).t() @ m_all.reshape(T * B, H)).to(w_hr.dtype)
        return BackwardResult(dgx.to(dt), dh0, dc0, dw_hh, db_hh, dw_hr)


BACKEND = CUDABackend()
