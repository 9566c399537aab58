#!/usr/bin/env bash
# One command for a GPU machine: build, compile_check, the test suite on CUDA, then the benchmarks
# against cuDNN (Triton and CUDA training; decoding with the Triton and CUDA Decoder backends);
# everything lands in one results directory; a summary table last.
#
#   benchmarks/gpu_check.sh [RESULTS_DIR]          (default: $RNNKERN_RESULTS or benchmarks/results)
#
# Environment knobs (all optional):
#   GPU_CHECK_BUDGET_S   total wall budget in seconds (default 560: fits a 10-minute call)
#   GPU_CHECK_STAGES     comma list of build,compile,decode,tests,bench (default: build,decode,
#                        tests,bench; decode runs tests/test_decode.py first, so the decoders'
#                        results come back even when the long tests run out of time; bench also
#                        runs cuda_bench, decode_bench and phases, in that order (the targets'
#                        ratios before the diagnosis), which can be named alone). compile is
#                        the ahead-of-time table of every Triton configuration (~1000 for sm_90
#                        in fp32 and bf16); it needs no GPU, so run it elsewhere unless the GPU
#                        machine's Triton version is in question. Within 10-minute calls, run
#                        build,decode,tests in one call and bench in the next (the tests compile
#                        ~50 kernel variants on their first run).
#   GPU_CHECK_GRID       quick (bounded subset, default) or full (the whole benchmark grid)
#   GPU_CHECK_TESTS      pytest selection (default: tests/)
#   GPU_CHECK_MARKS      pytest -m expression (default: "not host_only": the tests that need no
#                        GPU and check nothing a GPU changes, the ahead-of-time compile checks,
#                        the C++ CPU kernels, the tokenizers, run in CI, not on device time; "" runs
#                        everything)
#   PYTHON               interpreter (default: python3, or python if python3 is missing)
#
# Works from a plain copy of the repository (no pip install: PYTHONPATH=.) with no network.
# Every stage runs under `timeout`; a stage that fails or times out is reported in the summary and
# the next stage still runs. Exit status: 0 when every stage that ran passed.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${1:-${RNNKERN_RESULTS:-benchmarks/results}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
BUDGET="${GPU_CHECK_BUDGET_S:-560}"
STAGES=",${GPU_CHECK_STAGES:-build,decode,tests,bench},"
GRID="${GPU_CHECK_GRID:-quick}"
TESTS="${GPU_CHECK_TESTS:-tests/}"
MARKS="${GPU_CHECK_MARKS-not host_only}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
# A kernel deadlock must cost seconds, not the 30 s default per wait, across many tests.
export RNNKERN_CUDA_BARRIER_TIMEOUT_S="${RNNKERN_CUDA_BARRIER_TIMEOUT_S:-10}"
unset TRITON_INTERPRET
START=$(date +%s)
STATUS_FILE="$OUT_DIR/gpu_check_status.tsv"
: >"$STATUS_FILE"

left() { echo $((BUDGET - ($(date +%s) - START))); }

# run_stage NAME LIMIT_S CMD...: runs CMD under timeout, logs to OUT_DIR/NAME.log, records status.
run_stage() {
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskipped\t0\tno time left in the budget\n' "$name" >>"$STATUS_FILE"
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  local dt=$(($(date +%s) - t0))
  local what="exit $rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="timed out after ${limit}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAIL)" "$dt" "$what" \
    >>"$STATUS_FILE"
  tail -n 5 "$OUT_DIR/$name.log"
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: ${RNNKERN_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
  # (the build reads pyproject.toml through it: which license syntax it accepts)
  "$PY" -c 'import setuptools; print("setuptools", setuptools.__version__)' 2>&1
  command -v nvcc >/dev/null && nvcc --version | tail -n 2
} >"$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"

if [[ $STAGES == *,build,* ]]; then
  # C++ (and CUDA, when nvcc is present) extensions in place; Triton needs no build. The CUDA
  # kernels for this machine's GPU only (unless RNNKERN_CUDA_ARCHS says otherwise): half the
  # nvcc time of the default sm_80,sm_90+PTX, out of a device budget counted in minutes.
  if [ -z "${RNNKERN_CUDA_ARCHS:-}" ]; then
    CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
    [[ $CAP =~ ^[0-9]+\.[0-9]+$ ]] && export RNNKERN_CUDA_ARCHS="$CAP"
  fi
  echo "RNNKERN_CUDA_ARCHS=${RNNKERN_CUDA_ARCHS:-default}" >>"$OUT_DIR/environment.txt"
  run_stage build "$(($(left) < 150 ? $(left) : 150))" "$PY" setup.py build_ext --inplace
fi
if [[ $STAGES == *,compile,* ]]; then
  # ~400 configurations (the decode step has 320), a few seconds each: one job per core.
  run_stage compile_check "$(($(left) < 150 ? $(left) : 150))" "$PY" -m \
    rnnkern.backends.triton.compile_check --arch sm_90 --dtypes fp32,bf16 \
    --jobs "$(nproc 2>/dev/null || echo 8)" --json "$OUT_DIR/compile_check.json"
fi
TEST_DECODE=tests/test_decode.py
if [[ $STAGES == *,decode,* ]]; then
  # The Decoder on the GPU (backends triton and cuda against torch.nn and the C++ decoder),
  # before the long suite; at most 180 s.
  run_stage decode "$(($(left) < 180 ? $(left) : 180))" "$PY" -m pytest "$TEST_DECODE" -q -rs -m "$MARKS" \
    --durations=10 -p no:cacheprovider --junitxml="$OUT_DIR/pytest-decode.xml"
fi
if [[ $STAGES == *,tests,* ]]; then
  SKIP_DECODE=()
  [[ $STAGES == *,decode,* ]] && SKIP_DECODE=(--ignore="$TEST_DECODE")
  # The first CUDA run compiles every kernel variant the tests use (~50, a few seconds each).
  # With the bench stage in the same call the tests get at most 300 s; alone, all that is left.
  if [[ $STAGES == *,bench,* ]]; then TESTS_LIMIT=$(($(left) < 300 ? $(left) : 300)); else
    TESTS_LIMIT=$(($(left) - 10)); fi
  run_stage tests "$TESTS_LIMIT" "$PY" -m pytest $TESTS ${SKIP_DECODE[@]+"${SKIP_DECODE[@]}"} -q -rs -m "$MARKS" \
    --durations=15 -p no:cacheprovider --junitxml="$OUT_DIR/pytest.xml"
fi
if [[ $STAGES == *,cuda_bench,* || $STAGES == *,bench,* ]]; then
  # CUDA backend: the nn_modules quick suite times every backend available on the
  # GPU (torch.nn/cuDNN, auto, cuda, triton) on the same shapes, and cuda_train times backend
  # cuda against cuDNN on its training grid; at most 180 s. Runs before the bench
  # stage, or alone with GPU_CHECK_STAGES=cuda_bench.
  run_stage cuda_bench "$(($(left) < 180 ? $(left) : 180))" "$PY" -m rnnkern.cli bench \
    --suite nn_modules --suite cuda_train --device cuda --quick --repeats 10 --out "$OUT_DIR"
fi
if [[ $STAGES == *,decode_bench,* || $STAGES == *,bench,* ]]; then
  # Decoder generate, backends triton (CUDA graphs, on-device sampling) and cuda (one launch),
  # against stepping cuDNN nn.LSTM, 3x512 V=137, B in {1, 64}; at most 120 s.
  run_stage decode_bench "$(($(left) < 120 ? $(left) : 120))" "$PY" -m rnnkern.cli bench \
    --suite gpu_decode --device cuda --repeats 10 --warmup 2 --out "$OUT_DIR"
fi
if [[ $STAGES == *,phases,* || $STAGES == *,bench,* ]]; then
  # Where the steps go: every block (Triton program) stamps the GPU timer at each phase of a
  # step (backend cuda: staging, matvec, cells, barrier waits; triton: products, cells,
  # stores, waits), LSTM and GRU, float32 and bfloat16, B in {1, 16, 64}, H in {256, 1024},
  # both backends shape by shape, after backend cuda's generated tokens (per layer, head,
  # sampling; 3x512, V=137, B in {1, 64}); the ratios say how fast, this says why. The files
  # are rewritten after every job, so what the limit cuts off is only the rest. At most 120 s.
  run_stage phases "$(($(left) < 120 ? $(left) : 120))" "$PY" -m rnnkern.bench.phases \
    --quick --out "$OUT_DIR"
fi
if [[ $STAGES == *,bench,* ]]; then
  BENCH_LIMIT=$(($(left) - 20))
  run_stage bench "$BENCH_LIMIT" "$PY" -m rnnkern.bench.gpu_train --out "$OUT_DIR" \
    --grid "$GRID" --budget-s "$((BENCH_LIMIT > 60 ? BENCH_LIMIT - 45 : 15))"
fi

echo
echo "== summary ($(($(date +%s) - START)) s; results in $OUT_DIR)"
"$PY" -m rnnkern.bench.gpu_summary "$OUT_DIR"
! grep -q -P '\tFAIL\t' "$STATUS_FILE"
