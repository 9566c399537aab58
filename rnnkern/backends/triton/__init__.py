"""Backend ``triton``: fused LSTM / GRU / Elman-RNN recurrences written in Triton.

One file per cell (:mod:`.lstm`, :mod:`.gru`, :mod:`.rnn`), each holding its forward and
backward kernels (time loop inside the kernel, float32 state and accumulation) and their launch
wrappers; :mod:`.common` holds the shared device helpers and the launch-configuration table;
:mod:`.compile_check` compiles every configuration ahead of time for sm_80 / sm_90, and
:mod:`.emulation` runs the persistent launches (programs waiting for each other) on the CPU.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before this package
was imported (Triton's interpreter: same kernel source, programs run one after another, or all
at once inside :func:`.emulation.emulate_gpu`).
"""

from __future__ import annotations

import contextlib

import torch

from ..base import BackwardResult, ForwardResult, LayerConfig, Saved

try:
    import triton  # noqa: F401
except ImportError as err:  # triton is an optional dependency (extra "triton")
    _IMPORT_ERROR: str | None = (
        f"triton is not importable ({err}); install it with pip install 'triton>=3.6'"
    )
else:
    _IMPORT_ERROR = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpret() -> bool:
    from . import common

    return common.INTERPRET


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton launches on the current device's current stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class TritonBackend:
    name = "triton"

    def available(self) -> bool | str:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if not _interpret() and not torch.cuda.is_available():
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
        return True

    def faster_than_torch(self, config: LayerConfig) -> bool | str:
        """True where backend ``triton`` measured faster than torch.nn (cuDNN), else why not.

        Measured on an NVIDIA H100 80GB HBM3 (torch 2.11 + CUDA 13.0, Triton 3.6, cuDNN 9.19,
        TF32 off), one layer, input_size == hidden_size, T = 256, interleaved medians
        (``python -m rnnkern.bench.gpu_train --grid quick``, commit 797d39b;
        benchmarks/results/gpu_train-nvidia-h100-80gb-hbm3.md):

        - bfloat16, H = 128, B in {1, 16, 64, 256}: LSTM and GRU, forward 1.15-2.30x and
          training step 1.62-2.62x; cuDNN's per-step work dominates at this size.
        - bfloat16, H = 512: 0.63-1.11x; H = 1024: 0.22-0.62x (the weights streamed from L2
          every step; since then, on sm_90 16-unit chunks keep them resident up to H = 512
          for the LSTM, :data:`.common.NARROW_BLOCK_H`, not yet timed).
        - float32: 0.07-0.58x everywhere (the dots ran as IEEE float32 through ``tl.dot``, on
          FMA units with operands staged through shared memory). Float32 up to 16 rows (64
          with resident weights) now runs in GEMV mode (:data:`.common.GEMV_PRODUCTS`), not
          yet timed on a GPU; until it is, ``auto`` does not choose triton for float32.

        So: LSTM or GRU without projection, bfloat16, H <= 128, T >= 256, on CUDA. Elman RNNs,
        projections, float16 and shorter sequences were not measured.
        """
        ok = self.supports(config)
        if ok is not True:
            return ok
        if config.device_type != "cuda":
            return "measured against torch.nn on CUDA only (the CPU runs Triton's interpreter)"
        if config.cell not in ("lstm", "gru") or config.proj_size:
            return "not measured against cuDNN for this cell (measured: LSTM and GRU, no proj)"
        if config.dtype != torch.bfloat16:
            return f"cuDNN measured faster or {config.dtype} not measured (triton wins in bf16)"
        if config.seq_len < 256:
            return "not measured against cuDNN for sequences shorter than 256 steps"
        if config.hidden_size > 128:
            return (
                f"cuDNN measured as fast or faster at H={config.hidden_size} (triton wins at "
                "H <= 128 in bfloat16)"
            )
        return True

    def supports(self, config: LayerConfig) -> bool | str:
        ok = self.available()
        if ok is not True:
            return ok
        if config.cell not in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
            return f"unknown cell {config.cell!r}"
        if config.dtype not in SUPPORTED_DTYPES:
            return (
                f"dtype {config.dtype} is not supported by the triton kernels "
                "(float32, float16, bfloat16)"
            )
        if config.device_type == "cpu" and not _interpret():
            return (
                "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before "
                "rnnkern.backends.triton is imported"
            )
        if config.device_type not in ("cuda", "cpu"):
            return f"device type {config.device_type!r} is not supported (cuda)"
        if config.proj_size and config.cell != "lstm":
            return "projection is only defined for lstm"
        return True

    def describe(self, config: LayerConfig) -> str:
        """The launches a call of ``config`` gets on the current device (for
        :func:`rnnkern.explain`): programs, batch tiles and hidden splits, chunks, where the
        weights live and what the products run on."""
        from . import common

        kernel = "rnn" if config.cell.startswith("rnn") else config.cell
        device = torch.device(config.device_type)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        B, H = config.batch_size, config.hidden_size
        P = config.proj_size or H
        lines = []
        for direction in ("forward", "backward"):
            launch, n_split = common.launch_config(
                f"{kernel}_{direction}", B, H, P, config.dtype, device, bool(config.proj_size)
            )
            lines.append(f"{direction}: {common.plan_text(launch, n_split, B, config.dtype)}")
        return "\n".join(lines)

    def _check(self, cell: str, like: torch.Tensor, w_hh: torch.Tensor) -> None:
        """Raise a ValueError naming the reason when ``like [T, B, *]`` (gx or dy) with
        ``w_hh [G*H, P]`` is not supported."""
        T, B = like.shape[:2]
        GH = w_hh.shape[0]
        G = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}.get(cell)
        if G is None:
            raise ValueError(f"cell must be one of lstm, gru, rnn_tanh, rnn_relu; got {cell!r}")
        H, P = GH // G, w_hh.shape[1]
        config = LayerConfig(cell, like.device.type, like.dtype, 0, H, P if P != H else 0, B, T,
                             False, False)  # fmt: skip
        ok = self.supports(config)
        if ok is not True:
            raise ValueError(f"triton backend cannot run this layer: {ok}")

    def forward(self, cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save) -> ForwardResult:
        self._check(cell, gx, w_hh)
        with _on_device(gx):
            return self._forward(cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save)

    def _forward(self, cell, gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, save):
        gx, h0, w_hh = gx.contiguous(), h0.float().contiguous(), w_hh.contiguous()
        w_hr = w_hr.contiguous() if w_hr is not None else None
        if cell == "lstm":
            from .lstm import lstm_forward

            return lstm_forward(
                gx, h0, c0.float().contiguous(), w_hh, b_hh, w_hr, lengths, reverse, save
            )
        if cell == "gru":
            from .gru import gru_forward

            return gru_forward(gx, h0, w_hh, b_hh, lengths, reverse, save)
        from .rnn import rnn_forward

        return rnn_forward(cell == "rnn_relu", gx, h0, w_hh, b_hh, lengths, reverse, save)

    def backward(
        self, cell, saved: Saved, w_hh, b_hh, w_hr, lengths, reverse, dy, dh_n, dc_n
    ) -> BackwardResult:
        if saved.hs.numel() == 0:
            raise RuntimeError("triton backward called on a forward that ran with save=False")
        self._check(cell, dy, w_hh)
        with _on_device(dy):
            return self._backward(cell, saved, w_hh, b_hh, w_hr, lengths, reverse, dy, dh_n, dc_n)

    def _backward(self, cell, saved, w_hh, b_hh, w_hr, lengths, reverse, dy, dh_n, dc_n):
        w_hh = w_hh.contiguous()
        if cell == "lstm":
            from .lstm import lstm_backward

            w_hr = w_hr.contiguous() if w_hr is not None else None
            return lstm_backward(saved, w_hh, b_hh, w_hr, lengths, reverse, dy, dh_n, dc_n)
        if cell == "gru":
            from .gru import gru_backward

            return gru_backward(saved, w_hh, b_hh, lengths, reverse, dy, dh_n)
        from .rnn import rnn_backward

        return rnn_backward(cell == "rnn_relu", saved, w_hh, b_hh, lengths, reverse, dy, dh_n)


BACKEND = TritonBackend()
