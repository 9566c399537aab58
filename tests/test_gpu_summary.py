"""The summary benchmarks/gpu_check.sh prints last (rnnkern.bench.gpu_summary), from the files
a run leaves: the headline numbers of each benchmark, then the stage table."""

from __future__ import annotations

import json

import pytest

from rnnkern.bench import gpu_summary

pytestmark = pytest.mark.host_only  # reads files; nothing here needs a GPU


def _result(median_s, ratio):
    return {"median_s": median_s, "ratio_vs_baseline": ratio}


def _runner_file(path, cases):
    path.write_text(json.dumps({"machine": {}, "command": "test", "cases": cases}))


def test_summary_reads_every_file_and_ends_with_the_stages(tmp_path):
    (tmp_path / "gpu_check_status.tsv").write_text(
        "build\tok\t80\texit 0\ntests\tFAIL\t200\ttimed out after 200s\n"
    )
    (tmp_path / "pytest.xml").write_text(
        '<testsuites><testsuite tests="734" failures="2" errors="0" skipped="9"/></testsuites>'
    )
    _runner_file(tmp_path / "gpu_decode-gpu.json", [{
        "name": "decode B=1", "params": {"tokens": 128}, "baseline": "torch.nn.LSTM step",
        "results": {"torch.nn.LSTM step": _result(0.0128, 1.0),
                    "rnnkern cuda generate fp32": _result(0.000512, 25.0)},
    }])  # fmt: skip
    _runner_file(tmp_path / "nn_modules+cuda_train-quick-gpu.json", [{
        "name": "LSTM fwd+bwd B=16", "params": {}, "baseline": "torch.nn",
        "results": {"torch.nn": _result(1.0, 1.0), "rnnkern[cuda]": _result(0.5, 2.0)},
    }])  # fmt: skip
    grid = [
        {"name": f"c{i}", "baseline": "torch.nn",
         "params": {"cell": "LSTM", "train": True, "dtype": "torch.bfloat16"},
         "results": {"torch.nn": _result(1.0, 1.0), "rnnkern[triton]": _result(1.0, ratio)}}
        for i, ratio in enumerate((0.5, 2.0))
    ]  # fmt: skip
    _runner_file(tmp_path / "gpu_train-gpu.json", grid)
    (tmp_path / "phases-gpu.json").write_text(json.dumps({"rows": [
        {"backend": "triton", "kernel": "forward", "case": "LSTM B=1 H=256",
         "phases_us": {"products": 1.5, "cells": 0.5, "stores": 0.25, "wait": 3.0, "step": 5.25,
                       "arrival spread": 9.0, "timer step": 0.03}},
        {"backend": "cuda", "kernel": "error", "case": "GRU B=64", "error": "RuntimeError: x"},
    ]}))  # fmt: skip
    text = gpu_summary.summary(str(tmp_path))
    assert "  rnnkern cuda generate fp32: 4.00 us/token (25.00x)" in text
    assert "LSTM fwd+bwd B=16: rnnkern[cuda] 2.00x" in text
    assert "| LSTM | fwd+bwd | bfloat16 | 2 | 0 | 1.00x | 0.50x | 2.00x |" in text
    assert "triton forward LSTM B=1 H=256: step 5.25 (wait 3.00, products 1.50)" in text
    assert "GRU B=64: RuntimeError: x" in text
    assert text.rstrip().endswith(
        "| tests | FAIL | 200 s | timed out after 200s | 734 tests: 2 failed, 0 errors, 9 skipped |"
    )
    assert text.index("## phases") < text.index("## gpu_decode") < text.index("| stage |")


def test_summary_of_an_empty_directory_and_a_bad_argument(tmp_path, capsys):
    assert gpu_summary.summary(str(tmp_path)) == "| stage | status | time | exit | details |\n" + (
        "|---|---|---|---|---|"
    )
    assert gpu_summary.main([str(tmp_path / "missing")]) == 2
    assert "an existing directory" in capsys.readouterr().out
