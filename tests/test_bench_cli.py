"""The benchmark runner and the rnnkern command (small, fast runs)."""

import json
import os

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
    umask = os.umask(0)
    os.umask(umask)
    for name in files:  # (mkstemp's 0600 had stayed: results only their owner could read)
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_bench_rejects_unknown_suite(capsys):
    assert cli.main(["bench", "--suite", "nope", "--no-write"]) == 2
    assert "unknown suite" in capsys.readouterr().err


@pytest.mark.parametrize("suite", ["cpu_train", "cpu_dispatch", "cpu_short", "cpu_16bit"])
def test_cpu_training_suites_run_quick(suite):
    from rnnkern.backends import cpu

    if cpu._cpu is None:
        pytest.skip("rnnkern._cpu is not built: " + cpu.build_hint())
    records = runner.run_suites([suite], device="cpu", quick=True, warmup=1, repeats=1)
    assert records and all(r["suite"] == suite for r in records)
    from rnnkern.bench import onnxrt

    for record in records:
        expected = {"torch.nn", "rnnkern[cpu]"} | (
            {"rnnkern[auto]"} if suite == "cpu_short" else set()
        )
        if suite == "cpu_16bit":
            assert record["params"]["dtype"] in ("bfloat16", "float16"), record["params"]
            if record["params"]["dtype"] == "float16" and not cpu._NATIVE_FLOAT16:
                expected.add("rnnkern[cpu], float16 products by torch")
        if suite == "cpu_train" and not record["params"]["train"]:
            if onnxrt.available():
                expected.add("onnxruntime")  # inference-only baseline, forward cases
            else:
                assert "no onnxruntime row" in record["notes"]
        assert set(record["results"]) == expected


@pytest.mark.parametrize(
    "args,words",
    [
        (["--repeats", "0"], "expected an integer >= 1"),
        (["--warmup", "-1"], "expected an integer >= 0"),  # (was accepted)
        (["--threads", "-1"], "expected an integer >= 0"),  # (was a traceback)
        (["--device", "CPU"], "expected cpu, cuda or cuda:N, got 'CPU'"),  # (a traceback)
        (["--device", "foo"], "got 'foo'"),  # (ran nothing and said nothing)
    ],
)
def test_bench_rejects_bad_arguments(args, words, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--no-write", *args])
    assert info.value.code == 2 and words in capsys.readouterr().err


def test_bench_refuses_before_running_what_it_could_not_finish(tmp_path, capsys):
    """A results folder that cannot be made is refused before the run (it failed with a
    traceback after it, losing the results); a suite with no case on the device is an error
    that writes nothing (GPU suites on the CPU printed an empty table and wrote empty files);
    modules of rnnkern.bench that are not suites are not offered (they raised)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker, blocker / "sub"):
        assert cli.main(["bench", "--quick", "--out", str(out)]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err
    assert cli.main(["bench", "--suite", "gpu_train", "--out", str(tmp_path / "r")]) == 2
    assert "have no case on device cpu" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert {"onnxrt", "phases", "gpu_summary"}.isdisjoint(runner.suite_names())
    assert {"nn_modules", "cpu_short", "gpu_train"} <= set(runner.suite_names())
    assert cli.main(["bench", "--suite", "onnxrt", "--no-write"]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_backends_rejects_a_bad_device(capsys):
    with pytest.raises(SystemExit):
        cli.main(["backends", "--device", "foo"])


def test_backends_command_lists_reference(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "reference  available" in out


def test_bench_no_trim_allocator_reruns_with_glibc_keeping_memory(tmp_path):
    """--allocator no-trim re-executes the benchmark with glibc's trimming off and says so in
    the file name and the recorded command."""
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("--allocator no-trim needs glibc")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("RNNKERN_BENCH_ALLOCATOR", None)
    code = "import os, sys; from rnnkern import cli; sys.exit(cli.main(sys.argv[1:]))"
    args = ["bench", "--suite", "nn_modules", "--quick", "--repeats", "1", "--warmup", "1",
            "--allocator", "no-trim", "--out", str(tmp_path)]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=root,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    md = [p for p in tmp_path.iterdir() if p.suffix == ".md"]
    assert len(md) == 1 and "-notrim" in md[0].name
    assert "--allocator no-trim" in md[0].read_text()


def test_commit_is_marked_when_tracked_code_differs_from_head(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.md").write_text("old\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m", "c")
    monkeypatch.chdir(tmp_path)
    head = runner._git_commit()
    assert head is not None and len(head) == 40
    (tmp_path / "benchmarks" / "results" / "r.md").write_text("new results\n")
    assert runner._git_commit() == head  # results written by the run itself do not count
    (tmp_path / "code.py").write_text("a = 2\n")
    assert runner._git_commit() == head + "+modified"


def test_cpu_model_names_family_and_model():
    text = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC\n\nprocessor\t: 1\nmodel name\t: other\n"
    )
    assert runner.cpu_model_of(text) == "AMD EPYC (family 25, model 17)"
    assert runner.cpu_model_of("processor\t: 0\nmodel name\t: Neoverse-V2\n") == "Neoverse-V2"
    assert runner.cpu_model_of("processor\t: 0\n") is None
    assert "cpu_model" in runner.machine_info()


def test_cuda_runs_make_float32_exact_on_every_side(monkeypatch):
    """cuDNN's RNNs take TF32 products for float32 by default; a CUDA run turns that off (and
    TF32 in cuBLAS and in rnnkern's kernels) before any case is built, whichever suite comes
    first, and the results header says how float32 ran."""
    import types

    import torch

    # (torch's flag objects intercept attribute access, so no monkeypatch.setattr for them)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    precision = torch.get_float32_matmul_precision()
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda p: seen.append(p))
    seen: list[str] = []
    flags = []

    def cases(device, quick):
        flags.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return []

    monkeypatch.setattr(runner, "_load_suite", lambda name: types.SimpleNamespace(cases=cases))
    try:
        runner.run_suites(["any"], device="cpu")
        assert flags == [(True, True)] and seen == []  # CPU runs leave the flags alone
        runner.run_suites(["any"], device="cuda")
        assert flags[-1] == (False, False) and seen == ["highest"]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert runner._float32_math({"cudnn": False, "cublas": False, "rnnkern": False}) == (
        "exact (TF32 off everywhere)"
    )
    assert runner._float32_math({"cudnn": True, "cublas": False, "rnnkern": True}) == (
        "TF32 allowed in cudnn, rnnkern"
    )


def test_gpu_train_case_times_streamed_weights_where_the_kernel_keeps_them(monkeypatch):
    """Where the Triton forward keeps its weights resident, the case has a row with them
    streamed, and that row really streams (RESIDENT is off during its call, on after); where
    each program owns one chunk, a row with the chunk loop (ONE_CHUNK off during its call); where
    float32 runs in GEMV mode, a row with tl.dot's products (GEMV_PRODUCTS off during its
    call)."""
    import torch

    from rnnkern.backends.triton import common

    if not common.INTERPRET:
        pytest.skip("runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1")
    from rnnkern.bench import gpu_train

    seen = []
    real = common.launch_config

    def spy(*args, **kw):
        config, n_split = real(*args, **kw)
        seen.append((config.k_res, config.one_chunk, config.precision))
        return config, n_split

    small = gpu_train.make_case("GRU", torch.float32, 3, 9, 4, False, device="cpu")
    dot = "rnnkern[triton], float32 products by tl.dot"
    assert set(small.fns) == {"torch.nn", "rnnkern[triton]", "rnnkern[triton], weights streamed",
                              "rnnkern[triton], state reloaded", dot}  # fmt: skip
    wide = gpu_train.make_case("GRU", torch.float32, 3, 40, 4, False, device="cpu")
    assert set(wide.fns) == {"torch.nn", "rnnkern[triton]", dot}  # two chunks: no resident
    # from 17 rows GEMV mode needs resident weights: streaming them is the tl.dot row
    rows33 = gpu_train.make_case("GRU", torch.float32, 33, 9, 4, False, device="cpu")
    assert set(rows33.fns) == {"torch.nn", "rnnkern[triton]", "rnnkern[triton], state reloaded",
                               dot}  # fmt: skip
    half = gpu_train.make_case("GRU", torch.bfloat16, 3, 40, 4, False, device="cpu")
    assert set(half.fns) == {"torch.nn", "rnnkern[triton]"}  # tensor cores: no GEMV mode
    import rnnkern.backends.triton.gru as gru

    monkeypatch.setattr(gru, "launch_config", spy)
    small.fns["rnnkern[triton]"]()
    small.fns["rnnkern[triton], weights streamed"]()
    small.fns["rnnkern[triton], state reloaded"]()
    small.fns[dot]()
    assert seen == [(16, True, "gemv"), (0, True, "gemv"), (16, False, "gemv"), (16, True, "ieee")]
    assert common.RESIDENT is True and common.ONE_CHUNK is True and common.GEMV_PRODUCTS is True


@pytest.mark.parametrize("B", [1, 3])
def test_gpu_decode_rows_all_run(B, cuda_kernels):
    """Every row of the gpu_decode benchmark runs (on the CPU: the Triton kernels interpreted,
    the CUDA kernels emulated), so a GPU run's decode stage does not fail on its first call."""
    import torch

    from rnnkern.backends.triton import common

    if not common.INTERPRET and not torch.cuda.is_available():
        pytest.skip("runs the Triton decoder under TRITON_INTERPRET=1 or on a GPU")
    from rnnkern.bench import gpu_decode

    torch.manual_seed(0)
    rnn = torch.nn.LSTM(6, 16, num_layers=2).eval()
    emb, head = torch.nn.Embedding(11, 6), torch.nn.Linear(16, 11)
    rnn, emb, head = (m.to(cuda_kernels) for m in (rnn, emb, head))
    fns = gpu_decode.decode_fns(rnn, emb, head, B, 3)
    cuda_rows = {"rnnkern cuda generate fp32", "rnnkern cuda generate bf16",
                 "rnnkern cuda generate fp32, barriers",
                 "rnnkern cuda generate fp32, 100 ns between polls"}  # fmt: skip
    triton_rows = {"rnnkern triton generate fp32", "rnnkern triton generate bf16",
                   "rnnkern triton generate fp32, eager",
                   "rnnkern triton generate fp32, a graph per token",
                   "rnnkern triton generate fp32, sampling in torch ops",
                   "rnnkern triton generate fp32, tl.dot tiles"}  # fmt: skip
    assert set(fns) == {"torch.nn.LSTM step"} | triton_rows | cuda_rows
    for fn in fns.values():
        fn()


def test_backends_for_a_cuda_device_where_there_is_none(capsys):
    import torch

    from rnnkern.backends import available_backends

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert available_backends("cuda") == []
    assert cli.main(["backends", "--device", "cuda"]) == 0
    assert "for device cuda: none (torch sees no CUDA device)" in capsys.readouterr().out
