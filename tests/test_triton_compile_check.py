"""compile_check compiles Triton kernels ahead of time for a GPU architecture, with no GPU.

A small subset here (one kernel, one dtype, sm_90: every launch configuration of it) so the
suite stays fast; the full table is ``python -m rnnkern.backends.triton.compile_check --arch
sm_80,sm_90``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.6')")

ROOT = Path(__file__).resolve().parents[1]

# Ahead-of-time compiles: nothing here needs a GPU (gpu_check.sh leaves it out).
pytestmark = pytest.mark.host_only


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run(
        [sys.executable, "-m", "rnnkern.backends.triton.compile_check", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_compile_check_subset_compiles_and_reports_registers(tmp_path):
    out = tmp_path / "rows.json"
    res = _run("--arch", "sm_90", "--kernels", "rnn_forward_kernel", "--dtypes", "bf16",
               "--jobs", "2", "--json", str(out))  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    # every launch configuration the dispatcher can choose: block_b in {16, 32} x split, the
    # 16-row ones with and without ONE_CHUNK, and with resident weights K_RES in {16, ..., 256}
    # x split x ONE_CHUNK (16-row tiles; 512 spilled here); the phase-traced twins of the 13
    # persistent ones; each with aligned pointers and H % 16 == 0, and without
    assert len(rows) == 78
    assert sum("K_RES=0" in row["config"] for row in rows) == 18
    assert sum("ONE_CHUNK=True" in row["config"] for row in rows) == 36
    assert sum("TRACE=True" in row["config"] for row in rows) == 26
    assert sum("ALIGNED=True" in row["config"] for row in rows) == 39
    for row in rows:
        assert row["ok"], row
        assert row["arch"] == "sm_90" and row["registers"] > 0
        assert 0 < row["shared"] <= row["shared_limit"]
    assert "78 configurations, 0 failed" in res.stdout


@pytest.mark.slow
def test_compile_check_covers_the_gemv_configurations(tmp_path):
    """Float32 in GEMV mode (common.GEMV_PRODUCTS) for the LSTM, forward and backward: the
    persistent one-chunk configurations, the ones an H100 runs up to 16 rows, every row count,
    chunk size and resident K_RES, compile for sm_90 with at most a few words of spill (16
    bytes; 188 registers at most with Triton 3.9, 221 with 3.6). A layout that does not fit
    spills kilobytes (the IEEE tl.dot configurations at K_RES = 256: 2.5 KB; with Triton 3.6 a
    4-row GEMV backward at K_RES = 2048: 2.1 KB, hence common.GEMV_PRODUCT_FLOATS)."""
    out = tmp_path / "rows.json"
    res = _run("--arch", "sm_90", "--kernels", "lstm_forward_kernel,lstm_backward_kernel",
               "--dtypes", "fp32", "--where",
               "PRECISION=gemv,SPLIT=True,ONE_CHUNK=True,TRACE=False,ALIGNED=True,HAS_PROJ=False",
               "--jobs", "2", "--json", str(out))  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    # forward: 1 or 4 rows x (32-unit chunks: streamed or K_RES 16 .. 128; 8-unit: .. 512);
    # backward: the same up to 512 and 2048 at 1 row, 256 and 1024 at 4 (GEMV_PRODUCT_FLOATS)
    assert len(rows) == 2 * (5 + 7) + (7 + 9) + (6 + 8)
    for row in rows:
        assert row["ok"] and "PRECISION=gemv" in row["config"], row
        assert row["registers"] > 0 and row["spill_stores"] <= 16, row


def test_compile_check_covers_the_16_unit_chunks_on_sm_90_only(tmp_path):
    """The 16-unit chunks of 16-bit LSTM layers too wide for 32-unit slices (H = 512 forward,
    256 and 512 backward): compiled for sm_90 within its shared memory, with at most the
    forward's spill (K_RES = 512, aligned: 28 bytes with Triton 3.9, 48-52 with 3.6; the
    backward none), and not for sm_80, where the
    dispatcher never picks them (192 KB of shared memory would overflow its 163 KB)."""
    out = tmp_path / "rows.json"
    res = _run("--arch", "sm_80,sm_90", "--kernels", "lstm_forward_kernel,lstm_backward_kernel",
               "--dtypes", "bf16", "--where", "BLOCK_H=16,TRACE=False,ALIGNED=True",
               "--jobs", "2", "--json", str(out))  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    # forward K_RES 512, backward 1024 and 2048; one chunk a program (the chunk loop's
    # backward at 2048 would need 321 KB)
    assert len(rows) == 1 + 2
    for row in rows:
        assert row["ok"] and row["arch"] == "sm_90" and "ONE_CHUNK=True" in row["config"], row
        limit = 52 if row["kernel"] == "lstm_forward_kernel" else 0
        assert row["spill_stores"] <= limit and row["shared"] <= row["shared_limit"], row


def test_compile_check_covers_the_decoders_sampler(tmp_path):
    """The Triton Decoder's sampling kernel: every variant compile_check lists, for sm_90, with
    no spills (rows of float64 ranking chunks once spilled kilobytes; see sampling.CHUNK_ELEMS)."""
    out = tmp_path / "rows.json"
    res = _run("--arch", "sm_90", "--kernels", "sample_rows_kernel", "--jobs", "1",
               "--json", str(out))  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    assert len(rows) == 16  # 4 vocabulary widths x top-k on/off x top-p on/off
    for row in rows:
        assert row["ok"], row
        assert row["registers"] > 0 and row["spill_stores"] == 0, row


def test_compile_check_covers_the_decoders_gemv_step(tmp_path):
    """The Triton Decoder's step in GEMV mode (up to 4 streams; B = 1 is the latency target),
    for an LSTM with token table and head as Decoder(nn.LSTM, Embedding, Linear) builds it:
    compiles for sm_90 in both grid modes and weight dtypes, aligned or not."""
    out = tmp_path / "rows.json"
    res = _run("--arch", "sm_90", "--kernels", "decode_step_kernel", "--dtypes", "fp32,bf16",
               "--where", "GEMV=True,CELL=0,HAS_TABLE=True,HAS_HEAD=True,HAS_PROJ=False",
               "--jobs", "2", "--json", str(out))  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())
    assert len(rows) == 16  # 2 weight dtypes x 1 or 4 rows x both grid modes x aligned or not
    for row in rows:
        assert row["ok"] and "GEMV=True" in row["config"], row
        assert row["registers"] > 0, row
        # One stream: no spill. Four: ptxas keeps a few words on the stack in some variants
        # (40 bytes at 72 registers, bf16 with alignment known); a tile layout that does not
        # fit spills kilobytes (the sampler's first float64 layout: tens of KB).
        limit = 0 if "BLOCK_B=1 " in row["config"] else 64
        assert row["spill_stores"] <= limit, row


def test_compile_check_rejects_unknown_arguments():
    res = _run("--arch", "sm_90", "--kernels", "no_such_kernel")
    assert res.returncode != 0
    assert "unknown kernel 'no_such_kernel'" in res.stderr
    res = _run("--arch", "sm_90", "--kernels", "decode_step_kernel", "--where", "GEMV")
    assert res.returncode != 0
    assert "--where must be a comma list of NAME=VALUE; got 'GEMV'" in res.stderr
    res = _run("--arch", "sm_90", "--kernels", "rnn_forward_kernel", "--where", "GEMV=True")
    assert res.returncode != 0
    assert "no configuration of rnn_forward_kernel matches --where GEMV=True" in res.stderr
