"""The benchmark runner and the rnnkern command (small, fast runs)."""

import json

import pytest

from rnnkern import cli
from rnnkern.bench import runner


def test_measure_interleaves_and_reports_ratio():
    calls = []
    case = runner.Case(
        suite="t",
        name="sleepers",
        params={},
        fns={
            "slow": lambda: calls.append("s") or sum(range(20000)),
            "fast": lambda: calls.append("f") or sum(range(200)),
        },
        baseline="slow",
        work={"slow": 1.0, "fast": 1.0},
        work_unit="runs",
    )
    record = runner.measure(case, warmup=1, repeats=7)
    assert calls.count("s") == calls.count("f") == 8
    rows = record["results"]
    assert rows["slow"]["ratio_vs_baseline"] == 1.0
    assert rows["fast"]["ratio_vs_baseline"] > 1.0
    assert len(rows["fast"]["samples_s"]) == 7
    assert "| t | sleepers | fast |" in runner.format_table([record])


def test_bench_command_writes_json_and_markdown(tmp_path):
    code = cli.main(["bench", "--quick", "--repeats", "1", "--warmup", "1", "--out", str(tmp_path)])
    assert code == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md")
    payload = json.loads((tmp_path / files[0]).read_text())
    assert payload["machine"]["torch"]
    labels = set(payload["cases"][0]["results"])
    assert {"torch.nn", "rnnkern[auto]"} <= labels
    assert "ratio" in (tmp_path / files[1]).read_text().lower()


def test_bench_rejects_unknown_suite(capsys):
    assert cli.main(["bench", "--suite", "nope", "--no-write"]) == 2
    assert "unknown suite" in capsys.readouterr().err


@pytest.mark.parametrize("suite", ["cpu_train", "cpu_dispatch"])
def test_cpu_training_suites_run_quick(suite):
    from rnnkern.backends import cpu

    if cpu._cpu is None:
        pytest.skip("rnnkern._cpu is not built: " + cpu.build_hint())
    records = runner.run_suites([suite], device="cpu", quick=True, warmup=1, repeats=1)
    assert records and all(r["suite"] == suite for r in records)
    for record in records:
        assert set(record["results"]) == {"torch.nn", "rnnkern[cpu]"}


def test_bench_rejects_bad_repeats():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--repeats", "0"])


def test_backends_command_lists_reference(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "reference  available" in out
