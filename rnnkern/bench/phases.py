"""Where a step of the GPU training kernels goes (backends ``cuda`` and ``triton``), and a
generated token of backend ``cuda``: the phases of each step, timed on the GPU by the kernels
themselves.

The ratio benchmarks (``cuda_train``, ``gpu_train``) say how fast a layer is; this says why.
Under :func:`rnnkern.backends.tracing.trace_phases` every block (a Triton program) stamps the
GPU's global timer at fixed points of each step, after a block-wide synchronisation, and
:func:`phase_times` turns the stamps into the median time of each phase over blocks and steps.

Backend ``cuda`` (the points of ``csrc/cuda/api.h``, ``kTracePoints``):

- forward: ``stage`` (h_{s-1} of the first batch chunk into shared memory, after the barrier:
  an L2 round trip), ``matvec`` (that chunk's recurrent product), ``cells`` (the cell update,
  and any further chunks' staging and products), ``projection wait`` / ``projection`` (LSTM
  with proj_size: the barrier m_s needs, then h_s = W_hr m_s), ``barrier`` (from the block's
  last phase to the next step's start: the grid barrier, waiting for the slowest block);
- backward: ``projection wait`` (dh + dy complete), ``cells`` (pointwise gradients, and the
  projection's dm product), ``dpre wait`` (the barrier: every block's dpre written),
  ``stage`` (the first chunk of dpre: G*H values a row from L2), ``matvec`` (every chunk's
  dh_{s-1} = dpre W_hh);
- generate (``rnnkern.Decoder(..., backend="cuda").generate``, one launch for every token):
  ``layer 0`` (from the token to layer 0's new state), then per layer l >= 1 ``wait l`` (until
  layer l - 1's state of every block is staged: the exchange through L2; where the plan does
  not carry recurrent parts a step early, layer l's recurrent product too, formed while
  waiting) and ``layer l``,
  ``head`` (the top state staged, the block's logits written), ``sample`` (every logit
  staged, the token drawn), and ``token`` (from one model step's start to the next's); for
  the folk-rnn-sized model of suite ``gpu_decode`` (3x512, V = 137), B in {1, 64}, float32
  and bfloat16 weights, with the default flag-word exchange and with grid barriers.

Backend ``triton`` (the points of :data:`rnnkern.backends.triton.common.TRACE_POINTS`; a
Triton program's loads and products cannot be timed apart, so its phases are coarser):

- forward: ``products`` (from the step's start until every recurrent product of the program is
  computed: the state read and the products; stamped where each program owns one hidden
  chunk, by a timer read that waits for the products' registers) and ``cells`` (until h_s is
  published: the cell update and the stores the other programs read; also the products
  stamp's own cost, a reduction of the threads' timer reads: some shuffles and a CTA
  barrier), or, in the chunk loop,
  both as ``work``; with a projection these end when m_s is published, then ``projection
  wait`` and ``projection``; then ``stores`` (the program's other stores, issued before it
  waits) and ``wait`` (the grid-wide wait, until the next step starts);
- backward: ``projection`` / ``projection wait`` (LSTM with proj_size: dh + dy of the state
  units), ``cells`` (until dgh is published), ``stores`` (dgx), ``wait`` (every program's
  dgh), ``dh product`` (dh_{s-1} = dgh_s W_hh: the read of dgh and the products).

For both: ``step`` is from one step's start to the next's; ``arrival spread``, per step, the
last block's arrival at the step's wait minus the first block's (load imbalance, or blocks
that started late).

The first ``--skip`` steps (default 1) warm the caches and are left out. ``%globaltimer``
ticks in steps of some tens of ns on recent GPUs (``timer step`` in the results: the smallest
nonzero difference between two stamps), so short phases read as a whole number of ticks;
medians over blocks and steps smooth that only in part.

    python -m rnnkern.bench.phases [--out benchmarks/results] [--quick] [--backends cuda,triton]

Writes ``phases-<gpu>.json`` and ``.md``: a row per layer and kernel with its launch plan and
the phase medians in microseconds, a table per backend and kernel.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

import rnnkern

from ..atomic import atomic_write_text
from ..backends import tracing
from .runner import (
    exact_float32,
    machine_info,
    machine_line,
    machine_slug,
    module_step,
)

CELLS = ("LSTM", "GRU")
DTYPES = (torch.float32, torch.bfloat16)
BATCHES = (1, 16, 64)
HIDDEN = {"quick": (256, 1024), "full": (256, 512, 1024)}
T = 256
TRACED_STEPS = 64

BACKENDS = ("cuda", "triton")

# Interval name -> (from point, to point, the "to" point is the next step's); per backend,
# kernel and projection, or layers for generate (the point numbers of csrc/cuda/api.h:
# kTracePoints, generate_trace_points; rnnkern.backends.triton.common.TRACE_POINTS).


def _intervals(
    kernel: str, proj: bool, layers: int = 0, backend: str = "cuda", products: bool = False
) -> dict[str, tuple[int, int, bool]]:
    if backend == "triton":
        return _triton_intervals(kernel, proj, products)
    if kernel == "generate":
        L = layers
        out = {"layer 0": (0, 2, False)}
        for layer in range(1, L):
            out[f"wait {layer}"] = (2 * layer, 1 + 2 * layer, False)
            out[f"layer {layer}"] = (1 + 2 * layer, 2 + 2 * layer, False)
        out.update({"head": (2 * L, 2 * L + 1, False), "sample": (2 * L + 1, 2 * L + 2, False),
                    "token": (0, 0, True)})  # fmt: skip
        return out
    if kernel == "forward":
        out = {"stage": (0, 1, False), "matvec": (1, 2, False), "cells": (2, 3, False)}
        if proj:
            out.update({"projection wait": (3, 4, False), "projection": (4, 5, False)})
        out["barrier"] = (5 if proj else 3, 0, True)  # (from the step's last point)
    else:
        out = {"projection wait": (0, 1, False)} if proj else {}
        out.update({"cells": (1 if proj else 0, 2, False), "dpre wait": (2, 3, False),
                    "stage": (3, 4, False), "matvec": (4, 5, False)})  # fmt: skip
    out["step"] = (0, 0, True)
    return out


def _triton_intervals(kernel: str, proj: bool, products: bool) -> dict[str, tuple[int, int, bool]]:
    if kernel == "forward":
        end = 1 if proj else 3  # (m_s, or h_s, published)
        # (the chunk loop has no stamp between a chunk's products and cells: "work" is both)
        out = ({"products": (0, 5, False), "cells": (5, end, False)} if products
               else {"work": (0, end, False)})  # fmt: skip
        if proj:
            out.update({"projection wait": (1, 2, False), "projection": (2, 3, False)})
        out.update({"stores": (3, 4, False), "wait": (4, 0, True)})
    else:
        out = {"cells": (0, 3, False)}
        if proj:
            out = {"projection": (0, 1, False), "projection wait": (1, 2, False),
                   "cells": (2, 3, False)}  # fmt: skip
        out.update({"stores": (3, 4, False), "wait": (4, 5, False), "dh product": (5, 0, True)})
    out["step"] = (0, 0, True)
    return out


def _arrival_point(kernel: str, proj: bool, backend: str = "cuda") -> int | None:
    """The point at which a block arrives at its step's (last) wait (None: generate)."""
    if kernel == "generate":
        return None
    if backend == "triton" or kernel == "forward":
        return 3
    return 0 if proj else 2


def phase_times(
    trace: tracing.PhaseTrace, proj: bool = False, skip: int = 1, layers: int = 0
) -> dict:
    """Median microseconds of each phase (module docstring) over the launch's blocks and its
    traced steps from ``skip`` on, where both ends were stamped; plus ``arrival spread``
    (training kernels) and ``timer step`` (the smallest nonzero difference between two
    stamps). ``proj``: the layer has an LSTM projection; ``layers``: the generating model's."""
    st = trace.stamps.cpu()[:, skip:].to(torch.int64)  # [blocks, steps, points]
    out: dict[str, float | None] = {}
    # (a Triton forward stamps its products, point 5, where each program owns one chunk)
    products = trace.backend == "triton" and bool((st[..., 5] > 0).any())
    intervals = _intervals(trace.kernel, proj, layers, trace.backend, products)
    for name, (a, b, next_step) in intervals.items():
        start = st[:, :-1, a] if next_step else st[:, :, a]
        end = st[:, 1:, b] if next_step else st[:, :, b]
        ok = (start > 0) & (end > 0)
        d = (end - start)[ok]
        out[name] = float(d.double().median()) / 1e3 if d.numel() else None
    point = _arrival_point(trace.kernel, proj, trace.backend)
    if point is not None:
        arrive = st[:, :, point]
        reached = (arrive > 0).all(dim=0)  # steps every block stamped
        spread = (arrive.max(dim=0).values - arrive.min(dim=0).values)[reached]
        out["arrival spread"] = float(spread.double().median()) / 1e3 if spread.numel() else None
    stamps = st[st > 0].unique()  # sorted
    gaps = stamps[1:] - stamps[:-1]
    out["timer step"] = float(gaps.min()) / 1e3 if gaps.numel() else None
    return out


def _plan(info: dict) -> str:
    if "programs" in info:  # a Triton launch (common.record_trace)
        return info["plan"]
    if "sample_warps" in info:  # a generate launch (GenerateInfo)
        where = "resident" if info["weights_in_smem"] else "from L2"
        return (
            f"{info['blocks']} blocks, {info['units_per_block']} units, weights {where}, "
            f"{info['sync']}" + (", carry" if info["carry"] else "")
        )
    groups = info["batch_groups"]
    where = "resident" if info["weights_in_smem"] else "from L2"
    return (
        f"{info['blocks']} blocks" + (f" in {groups} batch groups" if groups > 1 else "")
        + f", {info['units_per_block']} units, chunk {info['batch_chunk']}, weights {where}, "
        + info["matvec"]
    )  # fmt: skip


def profile(
    cell: str,
    dtype: torch.dtype,
    B: int,
    H: int,
    device: str,
    T: int = T,
    proj: int = 0,
    steps: int = TRACED_STEPS,
    skip: int = 1,
    backend: str = "cuda",
) -> list[dict]:
    """Phase times of one forward and backward of a one-layer ``cell`` module
    (``input_size = hidden_size = H``, ``proj_size=proj`` for an LSTM) with ``backend``
    (cuda or triton) on ``x [T, B, H]`` in ``dtype``, after one traced warm-up (it compiles
    Triton's traced kernels and warms the allocator and the caches): a row per kernel."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    torch.manual_seed(0)
    kwargs = {"proj_size": proj} if proj else {}
    module = getattr(rnnkern, cell)(H, H, backend=backend, **kwargs)
    module = module.to(device=device, dtype=dtype)
    x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=True)
    step = module_step(module, x, train=True)
    for _ in range(2):  # (the warm-up's traces are dropped)
        with tracing.trace_phases(steps=min(steps, T)) as traces:
            step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    name = f"{cell} B={B} H={H} T={T} {str(dtype).removeprefix('torch.')}" + (
        f" proj={proj}" if proj else ""
    )
    return [
        dict(
            case=name,
            backend=backend,
            kernel=t.kernel,
            plan=_plan(t.info),
            launch=t.info,
            phases_us=phase_times(t, bool(proj), skip),
        )  # fmt: skip
        for t in traces
    ]


def profile_generate(
    B: int,
    weights: str,
    sync: str,
    device: str,
    model: tuple | None = None,
    tokens: int = TRACED_STEPS,
    skip: int = 1,
) -> dict:
    """Phase times of one ``Decoder(..., backend="cuda").generate`` of ``tokens`` tokens for
    ``B`` streams (``weights``: "fp32" or "bf16"; ``sync``: "flags" or "barrier"), after an
    untraced one; ``model``: (rnn, embedding, head), default suite ``gpu_decode``'s on
    ``device``."""
    from ..decode import Decoder
    from .cpu_decode import _generate, _model

    rnn, emb, head = model if model is not None else _model(device=device)
    dec = Decoder(rnn, emb, head, weights=weights, batch_size=B, backend="cuda")
    dec._cuda.sync = sync
    run = _generate(dec, B, tokens)  # (reset, then tokens from one prime token per stream)
    run()
    with tracing.trace_phases(steps=tokens) as traces:
        run()
    if dec.device.type == "cuda":
        torch.cuda.synchronize()
    (trace,) = traces
    L, H = rnn.num_layers, rnn.hidden_size
    name = f"generate LSTM {L}x{H} V={head.out_features} B={B} {weights} {sync}"
    return dict(case=name, backend="cuda", kernel="generate", plan=_plan(trace.info),
                launch=trace.info, phases_us=phase_times(trace, skip=skip, layers=L))  # fmt: skip


def _table(rows: list[dict], backend: str, kernel: str) -> list[str]:
    rows = [r for r in rows if r["kernel"] == kernel and r.get("backend") == backend]
    if not rows:
        return []
    names = list(dict.fromkeys(n for r in rows for n in r["phases_us"]))
    lines = [
        f"## {backend} {kernel}",
        "",
        "| case | plan | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = ["" if r["phases_us"].get(n) is None else f"{r['phases_us'][n]:.2f}" for n in names]
        lines.append(f"| {r['case']} | {r['plan']} | " + " | ".join(cells) + " |")
    return lines + [""]


def write(rows: list[dict], out_dir: str | Path, command: str, device: str = "cuda") -> Path:
    """``phases-<machine>.json`` and ``.md`` under ``out_dir``; returns the markdown's path."""
    info = machine_info(device)
    slug = machine_slug(info, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": command, "rows": rows}
    atomic_write_text(out / f"phases-{slug}.json", json.dumps(payload, indent=1) + "\n")
    text = [
        f"# rnnkern: where the steps of the GPU kernels go, on {slug}",
        "",
        f"Command: `{command}`",
        machine_line(info),
        "",
        "Median microseconds over blocks (Triton programs) and traced steps "
        "(rnnkern/bench/phases.py says what each phase is).",
        "",
    ]
    for backend in BACKENDS:
        for kernel in ("forward", "backward", "generate"):
            text += _table(rows, backend, kernel)
    errors = [f"- {r['case']}: {r['error']}" for r in rows if r["kernel"] == "error"]
    text += ["## errors", "", *errors, ""] if errors else []
    md = out / f"phases-{slug}.md"
    atomic_write_text(md, "\n".join(text))
    return md


def jobs_for(backends: list[str], hidden: tuple[int, ...], steps: int, skip: int) -> list[tuple]:
    """The ``(name, fn)`` jobs of a run on CUDA: backend cuda's generation first (it compiles
    nothing and is the shortest), then every training shape, each for every backend in turn,
    so a stage that runs out of time has rows of each."""
    jobs = []
    if "cuda" in backends:
        jobs += [
            (f"cuda generate B={B} {weights} {sync}",
             functools.partial(profile_generate, B, weights, sync, "cuda", skip=skip))
            for B in (1, 64)
            for weights in ("fp32", "bf16")
            for sync in ("flags", "barrier")
        ]  # fmt: skip
    jobs += [
        (f"{backend} {cell} B={B} H={H} {str(dtype).removeprefix('torch.')}",
         functools.partial(profile, cell, dtype, B, H, "cuda", steps=steps, skip=skip,
                           backend=backend))
        for H in hidden
        for B in BATCHES
        for dtype in DTYPES
        for cell in CELLS
        for backend in backends
    ]  # fmt: skip
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Phase times of the GPU kernels")
    parser.add_argument("--out", default="benchmarks/results", help="results directory")
    parser.add_argument("--quick", action="store_true", help=f"H in {HIDDEN['quick']} only")
    parser.add_argument("--steps", type=int, default=TRACED_STEPS, help="steps traced")
    parser.add_argument("--skip", type=int, default=1, help="first traced steps left out")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma list of " + ",".join(BACKENDS)
    )
    args = parser.parse_args(argv)
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in wanted:
        if b not in BACKENDS:
            parser.error(f"--backends: unknown backend {b!r}; expected some of {BACKENDS}")
    if not torch.cuda.is_available():
        print("phases: needs a CUDA device; nothing measured")
        return 2
    available = rnnkern.available_backends("cuda")
    backends = [b for b in wanted if b in available]
    for b in sorted(set(wanted) - set(backends)):
        print(f"phases: backend {b} is not available on CUDA here; left out")
    if not backends:
        return 2
    exact_float32()
    command = "python -m rnnkern.bench.phases " + " ".join(argv or sys.argv[1:])
    hidden = HIDDEN["quick" if args.quick else "full"]
    print(run_jobs(jobs_for(backends, hidden, args.steps, args.skip), args.out, command))
    return 0


def run_jobs(
    jobs: list[tuple], out_dir: str | Path, command: str, device: str = "cuda"
) -> Path | None:
    """Run ``(name, fn)`` jobs (fn: :func:`profile` or :func:`profile_generate` with its
    arguments bound) and write the results after each, so a stage that runs out of time keeps
    what it measured; a job that raises (a kernel error, no memory, a Triton compile error)
    becomes an error row with the message, and the others still run. Returns the markdown's
    path."""
    rows: list[dict] = []
    md = None
    for name, fn in jobs:
        try:
            got = fn()
        except Exception as err:  # noqa: BLE001 - reported as the job's error row, not dropped
            message = (str(err).splitlines() or [type(err).__name__])[0][:300]
            got = [dict(case=name, kernel="error", plan="", launch={}, phases_us={},
                        error=f"{type(err).__name__}: {message}")]  # fmt: skip
        for r in got if isinstance(got, list) else [got]:
            rows.append(r)
            p = r["phases_us"]
            what = r.get("error") or (
                f"{'token' if r['kernel'] == 'generate' else 'step'} "
                f"{p.get('token', p.get('step'))} us ({r['plan']})"
            )
            print(f"{r.get('backend', '')} {r['case']} {r['kernel']}: {what}", flush=True)
        md = write(rows, out_dir, command, device)
    return md


if __name__ == "__main__":
    sys.exit(main())
