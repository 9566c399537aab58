"""Where a step of backend ``cuda``'s training kernels goes: the phases of each step, timed on
the GPU by the kernels themselves.

The ratio benchmarks (``cuda_train``) say how fast a layer is; this says why. Under
:func:`rnnkern.backends.cuda.trace_phases` every block stamps the GPU's global timer at the
points of each step that ``csrc/cuda/api.h`` lists (``kTracePoints``), and
:func:`phase_times` turns the stamps into the median time of each phase over blocks and steps:

- forward: ``stage`` (h_{s-1} of the first batch chunk into shared memory, after the barrier:
  an L2 round trip), ``matvec`` (that chunk's recurrent product), ``cells`` (the cell update,
  and any further chunks' staging and products), ``projection wait`` / ``projection`` (LSTM
  with proj_size: the barrier m_s needs, then h_s = W_hr m_s), ``barrier`` (from the block's
  last phase to the next step's start: the grid barrier, waiting for the slowest block);
- backward: ``projection wait`` (dh + dy complete), ``cells`` (pointwise gradients, and the
  projection's dm product), ``dpre wait`` (the barrier: every block's dpre written),
  ``stage`` (the first chunk of dpre: G*H values a row from L2), ``matvec`` (every chunk's
  dh_{s-1} = dpre W_hh);
- ``step``: from one step's start to the next's; ``arrival spread``: per step, the last
  block's arrival at the step's (first) barrier minus the first block's (load imbalance, or
  blocks that started late);
- generate (``rnnkern.Decoder(..., backend="cuda").generate``, one launch for every token):
  ``layer 0`` (from the token to layer 0's new state), then per layer l >= 1 ``wait l`` (until
  layer l - 1's state of every block is staged: the exchange through L2; where the plan does
  not carry recurrent parts a step early, layer l's recurrent product too, formed while
  waiting) and ``layer l``,
  ``head`` (the top state staged, the block's logits written), ``sample`` (every logit
  staged, the token drawn), and ``token`` (from one model step's start to the next's); for
  the folk-rnn-sized model of suite ``gpu_decode`` (3x512, V = 137), B in {1, 64}, float32
  and bfloat16 weights, with the default flag-word exchange and with grid barriers.

The first ``--skip`` steps (default 1) warm the caches and are left out. ``%globaltimer``
ticks in steps of some tens of ns on recent GPUs (``timer step`` in the results: the smallest
nonzero difference between two stamps), so short phases read as a whole number of ticks;
medians over blocks and steps smooth that only in part.

    python -m rnnkern.bench.cuda_phases [--out benchmarks/results] [--quick]

Writes ``cuda_phases-<gpu>.json`` and ``.md``: a row per layer and kernel with its launch plan
and the phase medians in microseconds.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

import rnnkern

from ..backends import cuda as cuda_backend
from .runner import (
    _atomic_write,
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

# Interval name -> (from point, to point, the "to" point is the next step's); per kernel and
# projection, or layers for generate (the point numbers of csrc/cuda/api.h: kTracePoints,
# generate_trace_points).


def _intervals(kernel: str, proj: bool, layers: int = 0) -> dict[str, tuple[int, int, bool]]:
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


def _arrival_point(kernel: str, proj: bool) -> int | None:
    """The point at which a block arrives at its step's first barrier (None: generate)."""
    if kernel == "generate":
        return None
    if kernel == "forward":
        return 3
    return 0 if proj else 2


def phase_times(
    trace: cuda_backend.PhaseTrace, proj: bool = False, skip: int = 1, layers: int = 0
) -> dict:
    """Median microseconds of each phase (module docstring) over the launch's blocks and its
    traced steps from ``skip`` on, where both ends were stamped; plus ``arrival spread``
    (training kernels) and ``timer step`` (the smallest nonzero difference between two
    stamps). ``proj``: the layer has an LSTM projection; ``layers``: the generating model's."""
    st = trace.stamps.cpu()[:, skip:].to(torch.int64)  # [blocks, steps, points]
    out: dict[str, float | None] = {}
    for name, (a, b, next_step) in _intervals(trace.kernel, proj, layers).items():
        start = st[:, :-1, a] if next_step else st[:, :, a]
        end = st[:, 1:, b] if next_step else st[:, :, b]
        ok = (start > 0) & (end > 0)
        d = (end - start)[ok]
        out[name] = float(d.double().median()) / 1e3 if d.numel() else None
    point = _arrival_point(trace.kernel, proj)
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
) -> list[dict]:
    """Phase times of one forward and backward of a one-layer ``cell`` module
    (``input_size = hidden_size = H``, ``proj_size=proj`` for an LSTM) with backend ``cuda``
    on ``x [T, B, H]`` in ``dtype``, after one untraced warm-up: a row per kernel."""
    torch.manual_seed(0)
    kwargs = {"proj_size": proj} if proj else {}
    module = getattr(rnnkern, cell)(H, H, backend="cuda", **kwargs).to(device=device, dtype=dtype)
    x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=True)
    step = module_step(module, x, train=True)
    step()  # compiles nothing, but warms the allocator and the caches
    with cuda_backend.trace_phases(steps=min(steps, T)) as traces:
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    name = f"{cell} B={B} H={H} T={T} {str(dtype).removeprefix('torch.')}" + (
        f" proj={proj}" if proj else ""
    )
    return [
        dict(
            case=name,
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
    with cuda_backend.trace_phases(steps=tokens) as traces:
        run()
    if dec.device.type == "cuda":
        torch.cuda.synchronize()
    (trace,) = traces
    L, H = rnn.num_layers, rnn.hidden_size
    name = f"generate LSTM {L}x{H} V={head.out_features} B={B} {weights} {sync}"
    return dict(case=name, kernel="generate", plan=_plan(trace.info), launch=trace.info,
                phases_us=phase_times(trace, skip=skip, layers=L))  # fmt: skip


def _table(rows: list[dict], kernel: str) -> list[str]:
    rows = [r for r in rows if r["kernel"] == kernel]
    if not rows:
        return []
    names = list(dict.fromkeys(n for r in rows for n in r["phases_us"]))
    lines = [
        f"## {kernel}",
        "",
        "| case | plan | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = ["" if r["phases_us"].get(n) is None else f"{r['phases_us'][n]:.2f}" for n in names]
        lines.append(f"| {r['case']} | {r['plan']} | " + " | ".join(cells) + " |")
    return lines + [""]


def write(rows: list[dict], out_dir: str | Path, command: str, device: str = "cuda") -> Path:
    """``cuda_phases-<machine>.json`` and ``.md`` under ``out_dir``; returns the markdown's
    path."""
    info = machine_info(device)
    slug = machine_slug(info, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "command": command, "rows": rows}
    _atomic_write(out / f"cuda_phases-{slug}.json", json.dumps(payload, indent=1) + "\n")
    text = [
        f"# rnnkern: where the steps of backend cuda's kernels go, on {slug}",
        "",
        f"Command: `{command}`",
        machine_line(info),
        "",
        "Median microseconds over blocks and traced steps (rnnkern/bench/cuda_phases.py says "
        "what each phase is).",
        "",
    ]
    text += _table(rows, "forward") + _table(rows, "backward") + _table(rows, "generate")
    errors = [f"- {r['case']}: {r['error']}" for r in rows if r["kernel"] == "error"]
    text += ["## errors", "", *errors, ""] if errors else []
    md = out / f"cuda_phases-{slug}.md"
    _atomic_write(md, "\n".join(text))
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Phase times of backend cuda's kernels")
    parser.add_argument("--out", default="benchmarks/results", help="results directory")
    parser.add_argument("--quick", action="store_true", help=f"H in {HIDDEN['quick']} only")
    parser.add_argument("--steps", type=int, default=TRACED_STEPS, help="steps traced")
    parser.add_argument("--skip", type=int, default=1, help="first traced steps left out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or "cuda" not in rnnkern.available_backends("cuda"):
        print("cuda_phases: needs a CUDA device and backend cuda; nothing measured")
        return 2
    exact_float32()
    command = "python -m rnnkern.bench.cuda_phases " + " ".join(argv or sys.argv[1:])
    jobs = [
        (f"{cell} B={B} H={H} {str(dtype).removeprefix('torch.')}",
         functools.partial(profile, cell, dtype, B, H, "cuda", steps=args.steps, skip=args.skip))
        for H in HIDDEN["quick" if args.quick else "full"]
        for B in BATCHES
        for dtype in DTYPES
        for cell in CELLS
    ]  # fmt: skip
    jobs += [
        (f"generate B={B} {weights} {sync}",
         functools.partial(profile_generate, B, weights, sync, "cuda", skip=args.skip))
        for B in (1, 64)
        for weights in ("fp32", "bf16")
        for sync in ("flags", "barrier")
    ]  # fmt: skip
    print(run_jobs(jobs, args.out, command))
    return 0


def run_jobs(
    jobs: list[tuple], out_dir: str | Path, command: str, device: str = "cuda"
) -> Path | None:
    """Run ``(name, fn)`` jobs (fn: :func:`profile` or :func:`profile_generate` with its
    arguments bound) and write the results after each, so a stage that runs out of time keeps
    what it measured; a job that raises (a kernel error, no memory) becomes an error row with
    the message, and the others still run. Returns the markdown's path."""
    rows: list[dict] = []
    md = None
    for name, fn in jobs:
        try:
            got = fn()
        except (RuntimeError, ValueError) as err:
            message = (str(err).splitlines() or [type(err).__name__])[0][:300]
            got = [dict(case=name, kernel="error", plan="", launch={}, phases_us={}, error=message)]
        for r in got if isinstance(got, list) else [got]:
            rows.append(r)
            p = r["phases_us"]
            what = r.get("error") or (
                f"{'token' if r['kernel'] == 'generate' else 'step'} "
                f"{p.get('token', p.get('step'))} us ({r['plan']})"
            )
            print(f"{r['case']} {r['kernel']}: {what}", flush=True)
        md = write(rows, out_dir, command, device)
    return md


if __name__ == "__main__":
    sys.exit(main())
