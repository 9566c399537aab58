"""What ``benchmarks/gpu_check.sh`` prints last: the headline numbers of the benchmarks that
ran, then each stage's status, so that the end of the run's output carries them even where its
files are not kept:

- ``gpu_decode``: microseconds per generated token (per stream) of every decoder row, and its
  speed against stepping cuDNN's nn.LSTM;
- ``nn_modules`` / ``cuda_train``: each rnnkern row's speed against torch.nn (cuDNN);
- ``gpu_train``: the Triton grid's geometric mean, minimum and maximum against cuDNN per cell,
  mode and dtype;
- ``phases``: each traced kernel's step and its two longest phases, in microseconds.

    python -m rnnkern.bench.gpu_summary RESULTS_DIR
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
import xml.etree.ElementTree as ET


def _newest(out: str, prefix: str) -> dict:
    """The newest ``<prefix>*.json`` file in ``out``, loaded (none: {})."""
    files = sorted(glob.glob(os.path.join(out, f"{prefix}*.json")), key=os.path.getmtime)
    return json.load(open(files[-1])) if files else {}


def _cases(out: str, prefix: str) -> list[dict]:
    """The cases of the newest ``<prefix>*.json`` runner file in ``out`` (none: [])."""
    return _newest(out, prefix).get("cases", [])


def stages(out: str) -> list[str]:
    """The stage table from ``gpu_check_status.tsv``, with the test counts of the pytest
    stages and the compile check's configurations."""
    lines = ["| stage | status | time | exit | details |", "|---|---|---|---|---|"]
    path = os.path.join(out, "gpu_check_status.tsv")
    rows = open(path).read().splitlines() if os.path.exists(path) else []
    for row in rows:
        name, status, secs, what = row.split("\t")
        extra = ""
        xml = {"tests": "pytest.xml", "decode": "pytest-decode.xml"}.get(name)
        if xml and os.path.exists(os.path.join(out, xml)):
            s = ET.parse(os.path.join(out, xml)).getroot()
            s = s if s.tag == "testsuite" else s.find("testsuite")
            extra = (f"{s.get('tests')} tests: {s.get('failures')} failed, "
                     f"{s.get('errors')} errors, {s.get('skipped')} skipped")  # fmt: skip
        if name == "compile_check" and os.path.exists(os.path.join(out, "compile_check.json")):
            got = json.load(open(os.path.join(out, "compile_check.json")))
            spills = sum(1 for r in got if (r.get("spill_stores") or 0) > 0)
            extra = f"{len(got)} configs, {sum(not r['ok'] for r in got)} failed, {spills} spill"
        lines.append(f"| {name} | {status} | {secs} s | {what} | {extra} |")
    return lines


def decode(out: str) -> list[str]:
    lines = []
    for case in _cases(out, "gpu_decode-"):
        n = case["params"]["tokens"]
        lines.append(f"{case['name']}:")
        for label, r in case["results"].items():
            if "median_s" in r:
                us = r["median_s"] / n * 1e6
                lines.append(f"  {label}: {us:.2f} us/token ({r['ratio_vs_baseline']:.2f}x)")
    return ["## gpu_decode (per stream; x: against stepping cuDNN)", *lines] if lines else []


def modules(out: str) -> list[str]:
    lines = []
    for case in _cases(out, "nn_modules+cuda_train-"):
        got = [f"{label} {r['ratio_vs_baseline']:.2f}x" for label, r in case["results"].items()
               if label != case["baseline"] and "ratio_vs_baseline" in r]  # fmt: skip
        lines.append(f"{case['name']}: " + ", ".join(got))
    return ["## nn_modules + cuda_train (against torch.nn)", *lines] if lines else []


def triton_grid(out: str) -> list[str]:
    groups: dict[tuple, list] = {}
    for c in _cases(out, "gpu_train-"):
        p = c["params"]
        key = (p["cell"], "fwd+bwd" if p["train"] else "fwd", p["dtype"].removeprefix("torch."))
        r = c["results"].get("rnnkern[triton]")
        groups.setdefault(key, []).append(r["ratio_vs_baseline"] if r else None)
    if not groups:
        return []
    lines = [
        "## gpu_train: triton against cuDNN",
        "| cell | mode | dtype | shapes measured | not run | geomean | min | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (cell, mode, dt), v in sorted(groups.items()):
        m = [x for x in v if x]
        if m:
            gm = math.exp(sum(map(math.log, m)) / len(m))
            lines.append(f"| {cell} | {mode} | {dt} | {len(m)} | {len(v) - len(m)} | "
                         f"{gm:.2f}x | {min(m):.2f}x | {max(m):.2f}x |")  # fmt: skip
        else:
            lines.append(f"| {cell} | {mode} | {dt} | 0 | {len(v)} | - | - | - |")
    return lines


def phases(out: str) -> list[str]:
    rows = _newest(out, "phases-").get("rows", [])
    if not rows:
        return []
    lines = ["## phases (us: the step, then its two longest phases)"]
    for r in rows:
        if r["kernel"] == "error":
            lines.append(f"{r['case']}: {r['error']}")
            continue
        p = r["phases_us"]
        whole = "token" if r["kernel"] == "generate" else "step"
        parts = sorted(((v, k) for k, v in p.items() if v is not None and k not in
                        (whole, "timer step", "arrival spread")), reverse=True)[:2]  # fmt: skip
        step = p.get(whole)
        top = ", ".join(f"{k} {v:.2f}" for v, k in parts)
        lines.append(f"{r.get('backend', 'cuda')} {r['kernel']} {r['case']}: {whole} "
                     f"{'-' if step is None else f'{step:.2f}'} ({top})")  # fmt: skip
    return lines


def summary(out: str) -> str:
    """Every part that has data, the stage table last: where only the end of the output is
    kept, the most is kept of what matters most (stages, then the decode targets, then the
    training ratios, then the diagnosis)."""
    parts = [phases(out), triton_grid(out), modules(out), decode(out), stages(out)]
    return "\n\n".join("\n".join(p) for p in parts if p)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not os.path.isdir(args[0]):
        print("usage: python -m rnnkern.bench.gpu_summary RESULTS_DIR (an existing directory)")
        return 2
    print(summary(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
