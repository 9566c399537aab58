"""Compile every CUDA kernel of ``csrc/cuda`` for sm_80 / sm_90 with ``nvcc -Xptxas -v``; no GPU
needed. Fails (exit status 1) on any compile error; prints a table of registers, spills and
stack per kernel and architecture (the kernels run 512 threads per block with
``__launch_bounds__(512, 1)``, so ptxas caps them at 128 registers: any spill shows up here).

    python -m rnnkern.backends.cuda_compile_check [--arch sm_80,sm_90] [--subset] [--json F]

Kernels: the training layers (``recurrence.cu``: forward and backward per cell and dtype) and
whole-sequence generation (``generate.cu``: per cell and weight dtype). ``--subset`` compiles
one representative configuration per kernel (float32 only: every cell's forward, backward and
generation), which is what the fast test runs; the default compiles every dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
KERNEL_SOURCES = ("recurrence.cu", "generate.cu")
CELLS = {"0": "lstm", "1": "gru", "2": "rnn_tanh", "3": "rnn_relu"}
DTYPES = {"f": "float32", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}
MAX_REGISTERS = 128  # 65536 registers per SM / 512 threads

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_NAME = re.compile(
    r"(layer_(?:forward|backward)_kernel|generate_kernel)I(f|6__half|13__nv_bfloat16)Li(\d)E"
    r"(?:Lb(\d)E)?"
)
# Kernels per architecture: training forward + backward of 4 cells for 3 dtypes (--subset:
# float32) and generation of 5 (the 4 cells and the LSTM with projection, a variant of its
# own) for 2 weight dtypes (float32, bfloat16; --subset: float32).
EXPECTED = {"full": 3 * 2 * 4 + 2 * 5, "subset": 2 * 4 + 5}
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def parse_ptxas(log: str) -> list[dict]:
    """One row per compiled entry function from ``-Xptxas -v`` output."""
    rows: list[dict] = []
    current: dict | None = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            name = _NAME.search(m.group(1))
            current = {
                "kernel": name.group(1) if name else m.group(1),
                "dtype": DTYPES.get(name.group(2), "?") if name else "?",
                "cell": (CELLS.get(name.group(3), "?") + ("_proj" if name.group(4) == "1" else ""))
                if name
                else "?",
                "arch": m.group(2),
                "registers": None,
                "stack": None,
                "spill_stores": None,
                "spill_loads": None,
            }
            rows.append(current)
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m and current["stack"] is None:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = _REGS.search(line)
        if m and current["registers"] is None:
            current["registers"] = int(m.group(1))
    return rows


def compile_arch(nvcc: str, arch: str, subset: bool) -> tuple[bool, str, list[dict]]:
    """Compile the kernel sources for one ``sm_XY``; returns (ok, log, rows)."""
    cap = arch.removeprefix("sm_")
    defines = ["-DRNNKERN_WITH_F16=0", "-DRNNKERN_WITH_BF16=0"] if subset else []
    logs, rows, ok = [], [], True
    with tempfile.TemporaryDirectory() as tmp:
        for src in KERNEL_SOURCES:
            cmd = [nvcc, "-c", str(SOURCE_DIR / src), "-o", os.path.join(tmp, src + ".o"),
                   "-std=c++17", "-O3", "-Xptxas", "-v", "-Xcompiler", "-fPIC",
                   "-gencode", f"arch=compute_{cap},code=sm_{cap}", *defines]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True)
            log = res.stdout + res.stderr
            logs.append(" ".join(cmd) + "\n" + log)
            ok = ok and res.returncode == 0
            rows += parse_ptxas(log)
    return ok, "\n".join(logs), rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", default="sm_80,sm_90", help="comma list of sm_XY targets")
    ap.add_argument("--subset", action="store_true", help="float32 kernels only (fast)")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        if not re.fullmatch(r"sm_\d+", a):
            ap.error(f"unknown architecture {a!r} (expected sm_XY, e.g. sm_90)")
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (put it on PATH or set CUDA_HOME)", file=sys.stderr)
        return 2

    all_rows, failed = [], []
    for arch in archs:
        ok, log, rows = compile_arch(nvcc, arch, args.subset)
        if not ok:
            failed.append(arch)
            print(f"== compile FAILED for {arch}:\n{log}", file=sys.stderr)
        expected = EXPECTED["subset" if args.subset else "full"]
        if ok and len(rows) != expected:
            failed.append(arch)
            print(f"== {arch}: expected {expected} kernels in the ptxas report, got {len(rows)}",
                  file=sys.stderr)  # fmt: skip
        for r in rows:
            r["ok"] = ok and r["registers"] is not None and r["registers"] <= MAX_REGISTERS
        all_rows += rows

    print("| arch | kernel | cell | dtype | registers | spill stores | spill loads | stack |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(all_rows, key=lambda r: (r["arch"], r["kernel"], r["cell"], r["dtype"])):
        print(f"| {r['arch']} | {r['kernel']} | {r['cell']} | {r['dtype']} | {r['registers']} | "
              f"{r['spill_stores']} | {r['spill_loads']} | {r['stack']} |")  # fmt: skip
    spills = sum(1 for r in all_rows if (r["spill_stores"] or 0) > 0)
    stack = sum(1 for r in all_rows if (r["stack"] or 0) > 0)
    bad = sum(1 for r in all_rows if not r["ok"])
    print(f"\n{len(all_rows)} kernels compiled for {', '.join(archs)}: {bad} failed, "
          f"{spills} with spills, {stack} with a stack frame (local memory)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(all_rows, indent=1))
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
