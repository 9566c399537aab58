"""Suite ``gpu_train``: rnnkern's Triton kernels beside torch.nn (cuDNN) on a GPU.

Training (forward + backward with a fixed random upstream gradient) and forward-only, for LSTM
and GRU, one layer, ``input_size == hidden_size``, in bfloat16 and float32 (TF32 off, so
float32 is exact on both sides). For each shape both implementations run in the same process,
interleaved by :func:`rnnkern.bench.runner.measure`; the ratio is cuDNN median / Triton median
(above 1: Triton is faster). Where the Triton forward keeps its recurrent weights resident
(:func:`rnnkern.backends.triton.common.choose_config`), the case also times the kernels with
the weights streamed from L2 at every step (in float32 GEMV mode up to 16 rows, from the chunks
streaming takes there, 8 units where 32-unit ones would be resident; from 17 rows GEMV mode
needs residency, so streaming is the ``tl.dot`` row below and is not timed twice); where its
programs own one hidden chunk each
(``ONE_CHUNK``), with the chunk's state and next inputs re-read after every step's grid-wide
wait instead (the chunk loop, which never takes the 16-unit chunks of wide 16-bit layers:
there it also streams the weights from 32-unit chunks), what carrying them saves; where its
float32 products run in
GEMV mode (``GEMV_PRODUCTS``: broadcast and summed over k), with them through ``tl.dot`` on
16- or 32-row tiles instead.

The full grid is B in {1, 16, 64, 256} x H in {128, 256, 512, 1024} x T in {256, 1024}; the
quick grid (the default of ``main``) is a bounded subset that fits a few minutes. ``main``
builds one case at a time (the largest needs ~20 GB), stops starting new cases when its time
budget is spent (the cases left are written as explicitly skipped, not measured), and rewrites
the JSON + markdown results after every case so a killed run keeps what it measured.

    python -m rnnkern.bench.gpu_train --out DIR [--grid quick|full] [--budget-s SECONDS]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import rnnkern

from .runner import Case, exact_float32, measure, module_step, write_results

CELLS = ("LSTM", "GRU")
DTYPES = (torch.bfloat16, torch.float32)
FULL = dict(B=(1, 16, 64, 256), H=(128, 256, 512, 1024), T=(256, 1024))
QUICK = dict(B=(1, 16, 64, 256), H=(128, 512, 1024), T=(256,))


def shapes(grid: str) -> list[tuple[str, torch.dtype, int, int, int, bool]]:
    """``(cell, dtype, B, H, T, train)`` in run order (short sequences and small H first)."""
    g = QUICK if grid == "quick" else FULL
    return [
        (cell, dtype, B, H, T, train)
        for T in g["T"]
        for H in g["H"]
        for B in g["B"]
        for dtype in DTYPES
        for cell in CELLS
        for train in (True, False)
    ]


def _name(cell, dtype, B, H, T, train) -> str:
    mode = "fwd+bwd" if train else "fwd"
    return f"{cell} {mode} B={B} H={H} T={T} {str(dtype).removeprefix('torch.')}"


def make_case(cell, dtype, B, H, T, train, device="cuda") -> Case:
    """torch.nn (baseline) and rnnkern with backend ``triton`` sharing weights and data."""
    gen = torch.Generator().manual_seed(B * 7919 + H * 31 + T)
    torch.manual_seed(0)
    base = getattr(torch.nn, cell)(H, H).to(device=device, dtype=dtype)
    ours = getattr(rnnkern, cell)(H, H, backend="triton").to(device=device, dtype=dtype)
    ours.load_state_dict(base.state_dict())
    x = torch.randn(T, B, H, generator=gen).to(device=device, dtype=dtype)
    x.requires_grad_(train)
    dy = torch.randn(T, B, H, generator=gen).to(device=device, dtype=dtype)
    fns = {
        "torch.nn": module_step(base, x, train, dy),
        "rnnkern[triton]": module_step(ours, x, train, dy),
    }
    from ..backends.triton import common

    config = _forward_config(cell, dtype, B, H, device)
    gemv_needs_residency = config.precision == "gemv" and B > common.GEMV_MAX_BATCH
    if config.k_res and not gemv_needs_residency:
        step = module_step(ours, x, train, dy)
        fns["rnnkern[triton], weights streamed"] = _switched_off("RESIDENT", step)
    if config.one_chunk:
        step = module_step(ours, x, train, dy)
        fns["rnnkern[triton], state reloaded"] = _switched_off("ONE_CHUNK", step)
    if config.precision == "gemv":
        step = module_step(ours, x, train, dy)
        fns["rnnkern[triton], float32 products by tl.dot"] = _switched_off("GEMV_PRODUCTS", step)
    return Case(
        suite="gpu_train",
        name=_name(cell, dtype, B, H, T, train),
        params=dict(cell=cell, batch=B, hidden=H, time=T, train=train, dtype=str(dtype)),
        fns=fns,
        baseline="torch.nn",
        device=device,
        work={label: float(T * B) for label in fns},
        work_unit="tokens",
    )


def _forward_config(cell: str, dtype: torch.dtype, B: int, H: int, device: str):
    """The launch configuration of the Triton forward at this shape (whether it keeps its
    weights resident, whether each program owns one chunk, how the products run)."""
    from ..backends.triton import common

    return common.launch_config(f"{cell.lower()}_forward", B, H, H, dtype, torch.device(device))[0]


def _switched_off(flag: str, step):
    """``step`` with the Triton backend's ``common.<flag>`` (``RESIDENT``, ``ONE_CHUNK``,
    ``GEMV_PRODUCTS``) off while it runs."""
    from ..backends.triton import common

    def run():
        setattr(common, flag, False)
        try:
            return step()
        finally:
            setattr(common, flag, True)

    return run


def cases(device: str = "cpu", quick: bool = False) -> list[Case]:
    """Runner entry point. GPU only (on other devices: no cases). Every case's tensors are
    allocated up front here, so use ``main`` (one case at a time) for the full grid."""
    if not device.startswith("cuda"):
        return []
    return [make_case(*s, device=device) for s in shapes("quick" if quick else "full")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Triton vs cuDNN training benchmark")
    parser.add_argument("--out", default="benchmarks/results", help="results directory")
    parser.add_argument("--grid", choices=("quick", "full"), default="quick")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting cases after")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_train: no CUDA device; nothing measured")
        return 2
    exact_float32()  # float32 exact on both sides (no TF32 in cuDNN nor in the Triton kernels)
    start = time.monotonic()
    records: list[dict] = []
    todo = shapes(args.grid)
    command = "python -m rnnkern.bench.gpu_train " + " ".join(argv or sys.argv[1:])
    for i, shape in enumerate(todo):
        name = _name(*shape)
        if time.monotonic() - start > args.budget_s:
            for rest in todo[i:]:
                records.append(_skipped(rest, f"not run: time budget of {args.budget_s:.0f} s"))
            print(f"gpu_train: time budget spent; {len(todo) - i} cases not run")
            break
        case = None
        try:
            case = make_case(*shape)
            rec = measure(case, warmup=args.warmup, repeats=args.repeats)
        except torch.cuda.OutOfMemoryError as err:
            rec = _skipped(shape, f"out of memory: {str(err).splitlines()[0][:200]}")
        del case
        torch.cuda.empty_cache()
        records.append(rec)
        res = rec["results"]
        if res:
            r = res["rnnkern[triton]"]
            print(
                f"[{time.monotonic() - start:6.0f}s] {name}: cuDNN "
                f"{res['torch.nn']['median_s'] * 1e3:.3f} ms, triton {r['median_s'] * 1e3:.3f} ms"
                f" ({r['ratio_vs_baseline']:.2f}x)",
                flush=True,
            )
        else:
            print(f"{name}: {rec['notes']}", flush=True)
        write_results(records, args.out, "gpu_train", device="cuda", command=command)
    write_results(records, args.out, "gpu_train", device="cuda", command=command)
    return 0


def _skipped(shape, why: str) -> dict:
    cell, dtype, B, H, T, train = shape
    return {
        "suite": "gpu_train",
        "name": _name(*shape),
        "params": dict(cell=cell, batch=B, hidden=H, time=T, train=train, dtype=str(dtype)),
        "baseline": "torch.nn",
        "device": "cuda",
        "work_unit": "tokens",
        "notes": why,
        "results": {},
    }


if __name__ == "__main__":
    sys.exit(main())
