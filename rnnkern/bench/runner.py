"""Benchmark runner: rnnkern beside its baseline in one process, medians, ratios, results files.

A suite is a module in :mod:`rnnkern.bench` that defines ``cases(device, quick) -> list[Case]``.
For every case the runner warms each implementation up, then times them *interleaved* (one
run of each per round, in a shuffled order) so that a noisy, shared machine slows all of them
alike, and reports medians and the ratio ``baseline median / implementation median`` (above 1
means faster than the baseline). Results are written as JSON (every sample, machine, versions,
commit) and a markdown table under ``benchmarks/results/``, one pair of files per suite and
machine, each written atomically.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import pkgutil
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..atomic import atomic_write_text

__all__ = [
    "Case",
    "measure",
    "module_step",
    "run_suites",
    "suite_names",
    "write_results",
    "format_table",
]


@dataclasses.dataclass
class Case:
    """One shape of one benchmark, timed for several implementations side by side.

    ``fns`` maps a label to a callable doing one complete timed run (no arguments). The
    runner synchronises ``device`` around each call, so callables need not. ``baseline`` is the
    label the ratios are taken against. ``work`` optionally maps a label to a count per run
    (e.g. tokens, or bytes of weights read) and ``work_unit`` names it, for a rate column.
    """

    suite: str
    name: str
    params: dict
    fns: dict[str, Callable[[], object]]
    baseline: str
    device: str = "cpu"
    work: dict[str, float] = dataclasses.field(default_factory=dict)
    work_unit: str = ""
    notes: str = ""


def module_step(module: torch.nn.Module, x: torch.Tensor, train: bool, dy=None):
    """A callable running one forward (``train=False``, under no_grad) or one forward and
    backward of a recurrent module or cell on ``x``; backward takes ``dy`` as the upstream
    gradient of the output (a sequence module's ``y``, a cell's ``h``; ``None``: the gradient
    of its sum)."""

    def run():
        if train:
            module.zero_grad(set_to_none=True)
            x.grad = None
            out = module(x)
            y = out[0] if isinstance(out, tuple) else out
            if dy is None:
                y.sum().backward()
            else:
                y.backward(dy)
        else:
            with torch.no_grad():
                module(x)

    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(case: Case, warmup: int = 3, repeats: int = 15, seed: int = 0) -> dict:
    """Time every implementation of ``case``; returns per-label samples (seconds) and stats."""
    rng = random.Random(seed)
    labels = list(case.fns)
    for _ in range(warmup):
        for label in labels:
            case.fns[label]()
    _sync(case.device)
    samples: dict[str, list[float]] = {label: [] for label in labels}
    for _ in range(repeats):
        order = labels[:]
        rng.shuffle(order)
        for label in order:
            _sync(case.device)
            t0 = time.perf_counter()
            case.fns[label]()
            _sync(case.device)
            samples[label].append(time.perf_counter() - t0)
    medians = {label: statistics.median(s) for label, s in samples.items()}
    base = medians[case.baseline]
    rows = {}
    for label in labels:
        row = {
            "median_s": medians[label],
            "min_s": min(samples[label]),
            "samples_s": samples[label],
            "ratio_vs_baseline": base / medians[label],
        }
        if label in case.work:
            row["rate"] = case.work[label] / medians[label]
        rows[label] = row
    return {
        "suite": case.suite,
        "name": case.name,
        "params": case.params,
        "baseline": case.baseline,
        "device": case.device,
        "work_unit": case.work_unit,
        "notes": case.notes,
        "results": rows,
    }


def suite_names() -> list[str]:
    """Modules of :mod:`rnnkern.bench` that define ``cases``."""
    import rnnkern.bench as pkg

    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name == "runner":
            continue
        # (helpers and tools live here too: onnxrt, phases, gpu_summary; importing all takes
        # about 20 ms)
        if hasattr(importlib.import_module(f"rnnkern.bench.{info.name}"), "cases"):
            names.append(info.name)
    return sorted(names)


def _load_suite(name: str):
    if name not in suite_names():
        raise ValueError(f"suite must be one of {suite_names()}, got {name!r}")
    module = importlib.import_module(f"rnnkern.bench.{name}")
    if not hasattr(module, "cases"):
        raise ValueError(f"rnnkern.bench.{name} defines no cases(device, quick)")
    return module


def exact_float32() -> None:
    """Make float32 exact float32 on every side of a GPU comparison. cuDNN's RNNs take TF32
    tensor-core products for float32 by default (``torch.backends.cudnn.rnn.fp32_precision``
    is "tf32" in torch 2.9+, ``torch.backends.cudnn.allow_tf32`` True before), while rnnkern's
    kernels compute IEEE float32 unless ``torch.set_float32_matmul_precision`` allows TF32: the
    baseline would be timed at lower precision. Turns TF32 off in cuDNN and cuBLAS and sets the
    matmul precision to "highest"; :func:`machine_info` records the flags with the results."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def run_suites(
    names: list[str],
    device: str = "cpu",
    quick: bool = False,
    repeats: int = 15,
    warmup: int = 3,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run the named suites' cases on ``device``; returns one record per case. On CUDA,
    float32 is exact on every side (:func:`exact_float32`)."""
    if device.startswith("cuda"):
        exact_float32()
    records = []
    for name in names:
        for case in _load_suite(name).cases(device=device, quick=quick):
            record = measure(case, warmup=warmup, repeats=repeats)
            records.append(record)
            if progress is not None:
                progress(record)
    return records


def _git_commit() -> str | None:
    """HEAD, with ``+modified`` when tracked files other than the results differ from it (the
    numbers then come from code that no commit holds)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        diff = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", ".", ":(exclude)benchmarks/results"],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    head = out.stdout.strip()
    if not head:
        return None
    return head + ("+modified" if diff.returncode == 1 else "")


def cpu_model() -> str | None:
    """The CPU's model as Linux reports it, with family and model numbers (a VM may name only
    the vendor's line, e.g. "AMD EPYC": the numbers still tell its generation apart), or None
    elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return cpu_model_of(f.read(65536))
    except OSError:
        return None


def cpu_model_of(text: str) -> str | None:
    """:func:`cpu_model` from the text of ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return None
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine_info(device: str = "cpu") -> dict:
    """Machine, versions and commit to store beside the numbers."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        # A copy of the tree without .git (a GPU machine, a tarball) names its commit this way.
        "commit": os.environ.get("RNNKERN_COMMIT") or _git_commit(),
    }
    try:
        import rnnkern

        info["rnnkern"] = rnnkern.__version__
    except ImportError:  # pragma: no cover - the runner lives inside rnnkern
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_sms"] = props.multi_processor_count
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["float32_tf32"] = {  # False everywhere after exact_float32()
            "cudnn": bool(torch.backends.cudnn.allow_tf32),
            "cublas": bool(torch.backends.cuda.matmul.allow_tf32),
            "rnnkern": torch.get_float32_matmul_precision() != "highest",
        }
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
            info["driver"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def machine_slug(info: dict, device: str) -> str:
    """A short file-name-safe name of the machine the numbers came from."""
    if device.startswith("cuda") and info.get("gpu"):
        name = info["gpu"]
    else:
        name = f"cpu-{info['machine']}-{info['cpu_count']}cores"
    return "".join(c.lower() if c.isalnum() else "-" for c in name).strip("-")


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def format_table(records: list[dict]) -> str:
    """Markdown table: one row per case and implementation, with the ratio to the baseline."""
    lines = [
        "| suite | case | implementation | median | ratio vs baseline | rate |",
        "|---|---|---|---|---|---|",
    ]
    for rec in records:
        for label, row in rec["results"].items():
            is_base = label == rec["baseline"]
            rate = ""
            if "rate" in row:
                rate = f"{row['rate']:.4g} {rec['work_unit']}/s"
            lines.append(
                f"| {rec['suite']} | {rec['name']} | {label}{' (baseline)' if is_base else ''} "
                f"| {_fmt_time(row['median_s'])} | {row['ratio_vs_baseline']:.2f}x | {rate} |"
            )
    return "\n".join(lines)


def _float32_math(tf32: dict) -> str:
    """How float32 products ran, from :func:`machine_info`'s ``float32_tf32`` flags."""
    allowed = [name for name, on in tf32.items() if on]
    return "TF32 allowed in " + ", ".join(allowed) if allowed else "exact (TF32 off everywhere)"


def machine_line(info: dict) -> str:
    """:func:`machine_info` as one line of a results file."""
    return (
        f"Date: {info['date']}; commit: {info['commit']}; torch {info['torch']}; "
        f"triton {info.get('triton')}; {info['platform']}; {info['cpu_count']} CPUs"
        + (f" ({info['cpu_model']})" if info.get("cpu_model") else "")
        + (
            f"; GPU {info['gpu']}, driver {info.get('driver')}, CUDA {info.get('cuda')}"
            if "gpu" in info
            else ""
        )
        + (f"; float32 {_float32_math(info['float32_tf32'])}" if "float32_tf32" in info else "")
    )


def write_results(
    records: list[dict], out_dir: str | Path, tag: str, device: str = "cpu", command: str = ""
) -> tuple[Path, Path]:
    """Write ``<tag>-<machine>.json`` and ``.md`` under ``out_dir``; returns both paths."""
    info = machine_info(device)
    slug = machine_slug(info, device)
    out = Path(out_dir)
    json_path = out / f"{tag}-{slug}.json"
    md_path = out / f"{tag}-{slug}.md"
    payload = {"machine": info, "command": command, "cases": records}
    atomic_write_text(json_path, json.dumps(payload, indent=1) + "\n")
    header = [
        f"# rnnkern benchmarks: {tag} on {slug}",
        "",
        f"Command: `{command}`" if command else "",
        machine_line(info),
        "",
        "Ratio = baseline median / implementation median (above 1: faster than the baseline); "
        "implementations timed interleaved in one process.",
        "",
        "",
    ]
    notes = [f"- {r['name']}: {r['notes']}" for r in records if r.get("notes")]
    text = (
        "\n".join(header)
        + format_table(records)
        + "\n"
        + ("\n" + "\n".join(notes) + "\n" if notes else "")
    )
    atomic_write_text(md_path, text)
    return json_path, md_path
