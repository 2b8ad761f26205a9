#!/usr/bin/env bash
# Issue 13's whole GPU check in one command, for a lent GPU machine (no network, nothing
# installed, no vLLM, no CRIU): the CUDA tests of the weights reader, then the weight-path
# benchmark on a Llama-3.2-3B-shaped checkpoint (6.4 GB). Well under 10 minutes on an H200 box.
#
#   bash scripts/gpu_check.sh                            # results in $OUT, else ./gpu-results
#   GPU_CHECK_GIB=0.2 GPU_CHECK_KEEP=0 bash scripts/gpu_check.sh   # small, for a CPU smoke run
#
# It imports fastvllm from this tree (PYTHONPATH), uses pytest if the machine has it and runs
# the test file directly if not. Without a GPU everything still runs: the tests skip with
# their reason and the benchmark prints "no GPU: CUDA figures not measured".
# Environment: OUT, PYTHON (the interpreter; default: the first of .venv/bin/python, python,
# python3 that imports torch and safetensors), GPU_CHECK_GIB (checkpoint size, default full),
# GPU_CHECK_KEEP (1: keep the checkpoint in /var/tmp for a rerun, the default), GPU_CHECK_ARGS
# (more benchmark options), GPU_CHECK_BUDGET_S (benchmark budget, default 330).
# Exit status: 0 when the tests passed or skipped and every checked tensor was bit-identical.
# Hard limits: tests 150 s, benchmark 400 s (its --budget-s trims the sweep and cold runs
# first, and it saves its JSON after every section), so a device command's 10 minutes hold.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT="${OUT:-$ROOT/gpu-results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "gpu_check: $*" | tee -a "$LOG"; }
t0=$(date +%s)

PY=""
for cand in "${PYTHON:-}" "$ROOT/.venv/bin/python" python python3; do
    [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 || continue
    if "$cand" -c "import torch, safetensors" >/dev/null 2>&1; then PY="$cand"; break; fi
done
if [ -z "$PY" ]; then
    log "no python that imports torch and safetensors (set PYTHON=...)"
    exit 2
fi

log "python: $(command -v "$PY") ($("$PY" -c 'import platform; print(platform.python_version())'))," \
    "repo at $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown commit'), results in $OUT"
"$PY" - > "$OUT/env.txt" 2>&1 <<'EOF'
import os, platform, torch, safetensors
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA build", torch.version.cuda,
      "| safetensors", safetensors.__version__, "| cores", os.cpu_count())
ok = torch.cuda.is_available()
print("cuda available:", ok)
if ok:
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"cc {p.major}.{p.minor}")
EOF
cat "$OUT/env.txt" | tee -a "$LOG"
{ command -v nvidia-smi >/dev/null && nvidia-smi; } > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi: not available" > "$OUT/nvidia-smi.txt"

# 1. The CUDA tests (and the reader's CPU-side rotation tests, where pytest is there to run them).
if "$PY" -c "import pytest" >/dev/null 2>&1; then
    log "tests: pytest"
    timeout 150 "$PY" -m pytest -p no:cacheprovider -q -rs tests/gpu \
        tests/unit/test_weights.py::test_cuda_copy_engine_matches_load_file tests/unit/test_device_reader.py \
        2>&1 | tee "$OUT/gpu-tests.log"
    tests_rc=${PIPESTATUS[0]}
else
    log "tests: pytest is not installed here; running tests/gpu/test_weights_cuda.py directly"
    timeout 150 "$PY" tests/gpu/test_weights_cuda.py 2>&1 | tee "$OUT/gpu-tests.log"
    tests_rc=${PIPESTATUS[0]}
fi
log "tests exit status $tests_rc ($(( $(date +%s) - t0 )) s so far)"

# 2. The benchmark. --evict files: cold runs evict the checkpoint's own pages (no root needed,
# nobody else's cache dropped). The budget stops the sweep and cold runs early, not the core.
bench_args=(--out "$OUT" --evict files --budget-s "${GPU_CHECK_BUDGET_S:-330}")
[ -n "${GPU_CHECK_GIB:-}" ] && bench_args+=(--gib "$GPU_CHECK_GIB")
[ "${GPU_CHECK_KEEP:-1}" = 1 ] && bench_args+=(--keep)
# shellcheck disable=SC2206
[ -n "${GPU_CHECK_ARGS:-}" ] && bench_args+=($GPU_CHECK_ARGS)
log "benchmark: $PY -m fastvllm.bench.weights_gpu ${bench_args[*]}"
timeout 400 "$PY" -m fastvllm.bench.weights_gpu "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
log "benchmark exit status $bench_rc; total $(( $(date +%s) - t0 )) s"

rc=0
[ "$tests_rc" = 0 ] || rc=1
[ "$bench_rc" = 0 ] || rc=1
log "done: exit $rc (tests $tests_rc, benchmark $bench_rc); files: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $rc
