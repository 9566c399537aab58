"""Phase tracing of the GPU kernels: when each block (CUDA) or program (Triton) of a launch
reaches each phase of its first steps, stamped by the kernel itself.

Under :func:`trace_phases` the training kernels of backends ``cuda`` and ``triton`` (and the
``cuda`` Decoder's generation) stamp a timer at fixed points of each of their first ``steps``
processing steps, right after a block-wide synchronisation, and append one :class:`PhaseTrace`
per launch to the list the block yields. The points of each kernel are listed where its stamps
are written: ``csrc/cuda/api.h`` (``kTracePoints``, ``generate_trace_points``) and
:data:`rnnkern.backends.triton.common.TRACE_POINTS`. :mod:`rnnkern.bench.phases` turns the
stamps into the time of each phase.

The timer is the GPU's ``%globaltimer`` (ns). Where the kernels run on the CPU (the CUDA
emulation, Triton's interpreter) it is a logical clock that counts stamps, so the order of the
stamps is what tests can check there.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

# The list traced launches append to, and the steps they trace, while a trace_phases block runs.
_tracing: tuple[list, int] | None = None


@dataclasses.dataclass
class PhaseTrace:
    """One traced launch: ``stamps[block, step, point]`` is the timer when the block (a Triton
    program: ``pid_b * n_split + pid_h``) reached ``point`` of processing step ``step``; 0
    where a step does not reach it."""

    kernel: str  # "forward", "backward" or "generate"
    info: dict  # the launch's layout (backend cuda: as CUDABackend.last_launch)
    stamps: torch.Tensor  # [blocks, steps, points] int64
    backend: str  # "cuda" or "triton"


@contextlib.contextmanager
def trace_phases(steps: int = 32):
    """Within the block, every launch of the traced kernels (module docstring) records when
    each of its blocks reaches each phase of its first ``steps`` processing steps (one thread
    writes a timestamp after a block-wide synchronisation, a few times a step); yields the list
    of :class:`PhaseTrace` the launches append to. The kernels write the stamps: read them
    after the launches have finished. For benchmarks (:mod:`rnnkern.bench.phases`); blocks do
    not nest, and they are not for CUDA graph capture (each launch allocates its buffer)."""
    global _tracing
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if _tracing is not None:
        raise RuntimeError("trace_phases blocks do not nest")
    traces: list[PhaseTrace] = []
    _tracing = (traces, steps)
    try:
        yield traces
    finally:
        _tracing = None


def traced_steps() -> int:
    """The steps a launch now traces: 0 outside :func:`trace_phases`."""
    return 0 if _tracing is None else _tracing[1]


def record(backend: str, kernel: str, info: dict, stamps: torch.Tensor | None) -> None:
    """Append a launch's ``stamps [blocks, steps, points]`` to the running
    :func:`trace_phases` list (nothing outside one, or without stamps)."""
    if stamps is not None and _tracing is not None:
        _tracing[0].append(PhaseTrace(kernel, info, stamps, backend))
