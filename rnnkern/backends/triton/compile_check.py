"""Compile every Triton kernel configuration the dispatcher can choose, ahead of time, no GPU.

Usage::

    python -m rnnkern.backends.triton.compile_check --arch sm_80,sm_90 [--kernels NAMES]
        [--dtypes fp32,tf32,bf16,fp16] [--where NAME=VALUE,...] [--jobs N] [--json PATH]

For each kernel x input dtype x launch configuration (:func:`.common.all_configs`; for the
decode step :func:`.decode.all_configs`) x kernel flag (LSTM projection) it runs
``triton.compile`` with an explicit ``GPUTarget("cuda", cap, 32)``, runs ``ptxas -v`` on the
PTX for registers and spills, reads the shared memory from the compiled metadata and compares
it with the architecture's per-block limit. Prints one table row per configuration and exits
non-zero on any compile failure or shared-memory overflow.
``TRITON_INTERPRET`` must not be set (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

# Maximum shared memory per block (opt-in), bytes.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DTYPES = {"fp32": ("fp32", "ieee"), "tf32": ("fp32", "tf32"), "bf16": ("bf16", "ieee"),
          "fp16": ("fp16", "ieee")}  # fmt: skip
# kernel name -> (module, has a projection flag)
KERNELS = {
    "lstm_forward_kernel": ("lstm", True),
    "lstm_backward_kernel": ("lstm", True),
    "gru_forward_kernel": ("gru", False),
    "gru_backward_kernel": ("gru", False),
    "rnn_forward_kernel": ("rnn", False),
    "rnn_backward_kernel": ("rnn", False),
    "decode_step_kernel": ("decode", False),
    "sample_rows_kernel": ("sampling", False),
}
# Pointer arguments in the input dtype; every other pointer is float32 state except these two.
INPUT_DTYPE_PTRS = {"gx_ptr", "w_ptr", "b_ptr", "wr_ptr", "y_ptr", "dy_ptr", "dgx_ptr"}
INT_PTRS = {"len_ptr": "*i64", "sync_ptr": "*i32", "tok_ptr": "*i64", "trace_ptr": "*i64"}
# The decode step's pointers in the weight dtype (its states, tables and biases are float32).
DECODE_WEIGHT_PTRS = {"w_ih0_ptr", "w_ih_ptr", "w_hh_ptr", "head_w_ptr"}
# Per kernel, the arguments that are not covered by the rules above (float32 pointers, int32
# scalars): the decoder's sampler.
ARG_TYPES = {
    "sample_rows_kernel": {"u_ptr": "*fp64", "col_ptr": "*i64", "tokens_ptr": "*i64",
                           "last_ptr": "*i64", "bad_ptr": "*i8", "params_ptr": "*fp64"},
}  # fmt: skip


@dataclass
class Row:
    arch: str
    kernel: str
    config: str
    ok: bool
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    shared_limit: int | None = None
    seconds: float = 0.0
    error: str = ""


# Sizes Triton specialises on (divisible by 16 or not: the weight rows' alignment); every other
# integer argument is in the kernels' do_not_specialize.
ALIGNED_SIZES = {"I", "H", "P"}


def jobs(kernels, dtypes) -> list[tuple[str, str, dict]]:
    """Every (kernel, dtype key, constexpr dict) the dispatcher can launch. Each recurrent and
    decode configuration comes twice, as the launches compile it: ``ALIGNED=True``, every
    pointer 16-byte aligned and the sizes of :data:`ALIGNED_SIZES` divisible by 16 (torch's
    allocations, H = 128, 512, ...), and ``ALIGNED=False``, nothing known."""
    out = [
        (kernel, dkey, c if kernel == "sample_rows_kernel" else c | {"ALIGNED": aligned})
        for kernel, dkey, c in _configs(kernels, dtypes)
        for aligned in ((None,) if kernel == "sample_rows_kernel" else (True, False))
    ]
    return out


def _configs(kernels, dtypes) -> list[tuple[str, str, dict]]:
    from .common import ONE_CHUNK_KERNELS, all_configs

    out = []
    for kernel in kernels:
        if kernel == "decode_step_kernel":
            from .decode import all_configs as decode_configs

            # Weights are float32 or bfloat16 (Decoder weights="fp32" / "bf16"); products run
            # in IEEE float32 whatever the dtype, so tf32 and fp16 add nothing to check.
            for dkey in (d for d in dtypes if d in ("fp32", "bf16")):
                out.extend((kernel, dkey, c) for c in decode_configs())
            continue
        if kernel == "sample_rows_kernel":
            from .sampling import all_configs as sampling_configs

            # float32 logits whatever the weights: one dtype.
            out.extend((kernel, "fp32", c) for c in sampling_configs())
            continue
        _, has_proj = KERNELS[kernel]
        for dkey in dtypes:
            # with the resident configurations of this kernel (common.RESIDENT_SLICES)
            for cfg in all_configs(dkey, kernel.removesuffix("_kernel")):
                for proj in (False, True) if has_proj else (None,):
                    if proj and cfg.k_res:
                        continue  # no resident weights with a projection
                    if proj and cfg.one_chunk and kernel == "lstm_backward_kernel":
                        continue  # its launcher turns ONE_CHUNK off with a projection
                    constexprs = dict(
                        SPLIT=cfg.split, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h,
                        BLOCK_K=cfg.block_k, PRECISION=cfg.precision,
                    )  # fmt: skip
                    if proj is not None:
                        constexprs["HAS_PROJ"] = proj
                    constexprs["K_RES"] = cfg.k_res
                    if kernel.removesuffix("_kernel") in ONE_CHUNK_KERNELS:
                        constexprs["ONE_CHUNK"] = cfg.one_chunk
                    constexprs |= {"TRACE": False, "num_warps": cfg.num_warps}
                    out.append((kernel, dkey, constexprs))
                    # The phase-traced variant (common.phase_stamp: inline PTX for the timer) of
                    # every persistent configuration, which the phases benchmark traces.
                    if cfg.split:
                        out.append((kernel, dkey, constexprs | {"TRACE": True}))
    return out


def _ptxas(arch: int) -> str | None:
    """The ptxas Triton itself assembles with (it accepts the PTX version Triton emits), else
    the one on PATH."""
    try:
        from triton.backends.nvidia import compiler as nv

        try:
            return nv.get_ptxas(arch).path
        except TypeError:  # Triton versions whose get_ptxas takes no argument
            return nv.get_ptxas().path
    except Exception:  # noqa: BLE001 - fall back to PATH; a missing ptxas fails the row
        return shutil.which("ptxas")


def compile_one(arch: int, kernel: str, dkey: str, constexprs: dict) -> Row:
    """Compile one configuration for ``sm_<arch>``; never raises (errors go in the row)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = dict(constexprs)
    num_warps = consts.pop("num_warps")
    label = f"{dkey} " + " ".join(f"{k}={v}" for k, v in consts.items())
    aligned = consts.pop("ALIGNED", False)
    row = Row(f"sm_{arch}", kernel, label, False, shared_limit=SMEM_LIMIT.get(arch))
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"rnnkern.backends.triton.{KERNELS[kernel][0]}")
        fn = getattr(module, kernel)
        dtype = DTYPES[dkey][0]
        signature = {}
        for name in fn.arg_names:
            if name in consts:
                signature[name] = "constexpr"
            elif name in ARG_TYPES.get(kernel, {}):
                signature[name] = ARG_TYPES[kernel][name]
            elif name in INT_PTRS:
                signature[name] = INT_PTRS[name]
            elif name.endswith("_ptr"):
                typed = DECODE_WEIGHT_PTRS if kernel == "decode_step_kernel" else INPUT_DTYPE_PTRS
                signature[name] = f"*{dtype}" if name in typed else "*fp32"
            else:
                signature[name] = "i32"
        attrs = {}
        if aligned:  # what a launch on torch tensors with such sizes specialises
            attrs = {
                (fn.arg_names.index(name),): [["tt.divisibility", 16]]
                for name, kind in signature.items()
                if kind.startswith("*") or (name in ALIGNED_SIZES and kind == "i32")
            }
        src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
        )
        row.shared = int(compiled.metadata.shared)
        ptx = compiled.asm["ptx"]
        gpu_name = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M).group(1)
        ptxas = _ptxas(arch)
        if ptxas is None:
            raise RuntimeError("ptxas not found")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.ptx")
            with open(path, "w") as f:
                f.write(ptx)
            res = subprocess.run(
                [ptxas, "-v", f"--gpu-name={gpu_name}", path, "-o", os.path.join(tmp, "k.o")],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-500:]}")
        info = res.stderr
        regs = re.search(r"Used (\d+) registers", info)
        spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
        row.registers = int(regs.group(1)) if regs else None
        if spill:
            row.spill_stores, row.spill_loads = int(spill.group(1)), int(spill.group(2))
        row.ok = row.shared_limit is None or row.shared <= row.shared_limit
        if not row.ok:
            row.error = f"shared memory {row.shared} B > limit {row.shared_limit} B"
    except Exception as err:  # noqa: BLE001 - every failure is reported as a failed row
        row.error = _error_text(err)
    row.seconds = time.perf_counter() - start
    return row


def _error_text(err: BaseException) -> str:
    """The innermost cause of a compile error and its message: Triton wraps the error of a
    nested ``@triton.jit`` call in one CompilationError per call level, each ending with a
    source excerpt and a caret line."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip(" ^")]
    return f"{type(err).__name__}: {(lines[-1] if lines else '')[:300]}"


def _print_table(rows: list[Row]) -> None:
    head = f"{'arch':6} {'kernel':22} {'configuration':60} {'regs':>5} {'spill st/ld':>12} "
    head += f"{'smem/limit (B)':>16}  status"
    print(head)
    print("-" * len(head))
    for r in rows:
        spill = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        smem = "-" if r.shared is None else f"{r.shared}/{r.shared_limit}"
        status = "ok" if r.ok else f"FAIL {r.error}"
        regs = "-" if r.registers is None else str(r.registers)
        print(f"{r.arch:6} {r.kernel:22} {r.config:60} {regs:>5} {spill:>12} {smem:>16}  {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma list, e.g. sm_80,sm_90")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma list of kernels")
    parser.add_argument(
        "--dtypes", default=",".join(DTYPES), help="comma list: " + ",".join(DTYPES)
    )
    parser.add_argument(
        "--where",
        default="",
        help="only configurations with these constexpr values, e.g. GEMV=True,CELL=0",
    )
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
        return 2
    archs = []
    for a in args.arch.split(","):
        m = re.fullmatch(r"sm_(\d+)", a.strip())
        if not m:
            parser.error(f"--arch must be a comma list like sm_80,sm_90; got {a!r}")
        archs.append(int(m.group(1)))
    kernels = [k.strip() for k in args.kernels.split(",")]
    for k in kernels:
        if k not in KERNELS:
            parser.error(f"--kernels: unknown kernel {k!r}; expected some of {', '.join(KERNELS)}")
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"--dtypes: unknown dtype {d!r}; expected some of {', '.join(DTYPES)}")
    where = {}
    for item in filter(None, (w.strip() for w in args.where.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            parser.error(f"--where must be a comma list of NAME=VALUE; got {item!r}")
        where[key.strip()] = value.strip()
    selected = [
        job
        for job in jobs(kernels, dtypes)
        if all(k in job[2] and str(job[2][k]) == v for k, v in where.items())
    ]
    if not selected:
        parser.error(f"no configuration of {args.kernels} matches --where {args.where}")
    from .common import compiles_for

    work = [
        (arch, *job)
        for arch in archs
        for job in selected
        if "PRECISION" not in job[2]  # (the decode step and the sampler: every arch)
        or compiles_for(arch, job[2]["BLOCK_H"], job[2]["PRECISION"])
    ]
    start = time.perf_counter()
    if args.jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(compile_one, *zip(*work, strict=True)))
    else:
        rows = [compile_one(*w) for w in work]
    _print_table(rows)
    failed = [r for r in rows if not r.ok]
    total = time.perf_counter() - start
    print(f"\n{len(rows)} configurations, {len(failed)} failed, {total:.0f} s wall")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
