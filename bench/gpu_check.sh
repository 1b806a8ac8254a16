#!/usr/bin/env bash
# Build, test and benchmark sparse_engine on a CUDA machine in under 8 minutes; logs and CSV go to OUTDIR.
#
#   bash bench/gpu_check.sh OUTDIR [BUDGET_SECONDS]      (default budget 450 s: a 7.5 min wall clock)
#
# Steps (each under `timeout`, capped by what is left of the budget; a failing step is logged and the
# script goes on; the summary says what passed):
#   0. refuse at once (exit 2) unless python sees a CUDA GPU            -> gpu_check.log
#   1. environment: nvidia-smi, python / torch / triton / nvcc versions -> env.txt
#   2. build: SPARSE_ENGINE_CUDA=1 pip install --no-deps --no-build-isolation -e .  -> build.log
#      (no venv, no downloads); if sparse_engine.kernels is still not importable, a pure-Python
#      install (SPARSE_ENGINE_BUILD=0), then a symlinked package tree on PYTHONPATH as the last resort
#   3. the benchmarks (bench_*.py --out OUTDIR)                         -> <bench>.csv, bench_<op>.log
#   4. tests/test_triton_kernels.py on CUDA, then pytest -m gpu (the rest) -> pytest_*.log, pytest_*.xml
#   5. registers / spills of every kernel config (bench/kernel_resources.py) -> kernel_resources.csv
#   6. summary                                                          -> summary.txt
# The Python used is $PYTHON, else python3 (on the GPU machines: the one that has torch).
# Exit: 0 all steps passed, 1 some step failed or was cut short, 2 no GPU / usage.
set -u -o pipefail

if [ $# -lt 1 ] || [ -z "${1:-}" ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR [BUDGET_SECONDS]" >&2
  exit 2
fi
mkdir -p "$1" || { echo "gpu_check: cannot create $1" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
BUDGET=${2:-450}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
if command -v "$PY" > /dev/null 2>&1; then PY=$(command -v "$PY"); fi
case "$PY" in /*) ;; *) [ -x "$PY" ] && PY="$(pwd)/$PY" ;; esac  # steps run from other directories
START=$SECONDS
LOG="$OUT/gpu_check.log"
: > "$LOG"
declare -A STATUS=()
ORDER=()

log() { printf '[gpu_check %s +%ss] %s\n' "$(date +%T)" "$((SECONDS - START))" "$*" | tee -a "$LOG"; }
left() { echo $((BUDGET - (SECONDS - START))); }

# run_step NAME CAP_SECONDS MIN_SECONDS CMD...: run CMD with output to OUTDIR/NAME.log under a timeout
run_step() {
  local name=$1 cap=$2 min=$3 rc
  shift 3
  ORDER+=("$name")
  local t
  t=$(left)
  if (( t < cap )); then cap=$t; fi
  if (( cap < min )); then
    log "SKIP $name: only ${t}s of the ${BUDGET}s budget left (needs ${min}s)"
    STATUS[$name]="skipped (out of time)"
    return 0
  fi
  log "RUN  $name (limit ${cap}s): $*"
  timeout --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if (( rc == 0 )); then
    STATUS[$name]="ok"
  elif (( rc == 124 || rc == 137 )); then
    STATUS[$name]="TIMEOUT after ${cap}s"
  else
    STATUS[$name]="FAILED (exit $rc)"
  fi
  log "     $name: ${STATUS[$name]}; last lines of $name.log:"
  tail -n 6 "$OUT/$name.log" | sed 's/^/         /' | tee -a "$LOG"
  return 0
}

# ---------------------------------------------------------------------------------- 0. a GPU at all?
log "repository $ROOT, python $(command -v "$PY" || echo "$PY: not found"), budget ${BUDGET}s, output $OUT"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' >> "$LOG" 2>&1; then
  log "FAIL: no CUDA GPU visible to torch in $PY (or torch is missing): run this on a GPU machine"
  exit 2
fi

# ----------------------------------------------------------------------------------- 1. environment
{
  echo "date: $(date -Is)"
  echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo -dirty)"
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvcc --version 2>&1 | tail -n 2 || echo "nvcc: not available"
  "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
      "SMs", torch.cuda.get_device_properties(0).multi_processor_count)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton: not installed", e)
for mod in ("pytest", "numpy", "setuptools"):
    try:
        print(mod, __import__(mod).__version__)
    except ImportError:
        print(mod, "not installed")
EOF
} > "$OUT/env.txt" 2>&1
log "environment: $(grep -E '^(gpu|python|triton)' "$OUT/env.txt" | tr '\n' ' ')"

# ----------------------------------------------------------------------------------------- 2. build
kernels_importable() {
  (cd "$OUT" && "$PY" -c 'import sparse_engine.kernels.masked_linear, sparse_engine.kernels.fused_step' ) >> "$OUT/build.log" 2>&1
}
export MAX_JOBS=${MAX_JOBS:-16}
run_step build 180 30 env SPARSE_ENGINE_CUDA=1 "$PY" -m pip install --no-deps --no-build-isolation -e .
if ! kernels_importable; then
  log "sparse_engine.kernels not importable after the build step: pure-Python install (SPARSE_ENGINE_BUILD=0)"
  run_step build_pure 60 15 env SPARSE_ENGINE_BUILD=0 SPARSE_ENGINE_CUDA=0 "$PY" -m pip install --no-deps --no-build-isolation -e .
fi
if ! kernels_importable; then
  # last resort: a package tree of symlinks (sparse_engine/* plus kernels/ as sparse_engine/kernels)
  SHADOW=$(mktemp -d)
  mkdir -p "$SHADOW/sparse_engine"
  for f in "$ROOT"/sparse_engine/*; do ln -s "$f" "$SHADOW/sparse_engine/"; done
  ln -s "$ROOT/kernels" "$SHADOW/sparse_engine/kernels"
  export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
  log "using a symlinked package tree on PYTHONPATH: $SHADOW"
fi
if kernels_importable; then
  log "sparse_engine.kernels importable"
else
  log "FAIL: sparse_engine.kernels still not importable (see build.log); tests and benchmarks will fail"
fi
(cd "$OUT" && "$PY" -c '
import sparse_engine.ops._cuda as c
why = getattr(c, "UNAVAILABLE", None)
print("CUDA extension:", "unavailable: " + str(why) if why else "loaded")
' ) 2>&1 | tail -n 1 | tee -a "$LOG" "$OUT/env.txt" > /dev/null

# ------------------------------------------------------------------------------------ 3. benchmarks
for spec in "bench_masked_linear 110" "bench_block_sparse_linear 130" "bench_fused_step 60" "bench_prune_threshold 40"; do
  set -- $spec
  if [ -f "bench/$1.py" ]; then
    run_step "$1" "$2" 20 "$PY" "bench/$1.py" --out "$OUT"
  fi
done

# --------------------------------------------------------------------------------------- 4. GPU tests
# (a) the Triton kernel tests, all of them on CUDA (not only the `gpu`-marked ones): every launcher vs
#     its reference, every autotune config; (b) the rest of the `gpu`-marked suite with the time left.
if "$PY" -c 'import pytest' >> "$LOG" 2>&1; then
  PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rfEs --durations=10)
  run_step pytest_triton_kernels 150 30 "${PYTEST[@]}" --junitxml="$OUT/pytest_triton_kernels.xml" \
    tests/test_triton_kernels.py
  run_step pytest_gpu 240 30 "${PYTEST[@]}" -m gpu --junitxml="$OUT/pytest_gpu.xml" \
    --ignore=tests/test_triton_kernels.py tests
else
  log "SKIP tests: pytest is not installed in $PY (no downloads here; carry a wheel to run the tests)"
  ORDER+=("pytest")
  STATUS[pytest]="skipped (no pytest)"
fi
for f in pytest_triton_kernels pytest_gpu; do
  if [ -f "$OUT/$f.log" ]; then
    log "$f: $(grep -E '(passed|failed|error|skipped)' "$OUT/$f.log" | tail -n 1)"
  fi
done

# ------------------------------------------------------- 5. registers / spills of every kernel config
# (static, no GPU needed: what this image's triton and ptxas make of every config; explains slow ones)
run_step kernel_resources 90 20 "$PY" bench/kernel_resources.py --modules all --out "$OUT"

# --------------------------------------------------------------------------------------- 6. summary
rc=0
{
  echo "gpu_check summary ($(date -Is), $((SECONDS - START))s of ${BUDGET}s)"
  grep -E '^(gpu|python|triton|CUDA extension)' "$OUT/env.txt"
  for name in "${ORDER[@]}"; do
    printf '  %-28s %s\n' "$name" "${STATUS[$name]}"
  done
  echo "files:"
  (cd "$OUT" && ls -1)
} > "$OUT/summary.txt"
for name in "${ORDER[@]}"; do
  case "$name:${STATUS[$name]}" in
    build_pure:*|*:ok) ;;
    build:*) ;;  # a failed CUDA-extension build is reported, not fatal (the Triton path needs none)
    *) rc=1 ;;
  esac
done
cat "$OUT/summary.txt" | tee -a "$LOG"
log "done in $((SECONDS - START))s, exit $rc"
exit $rc
