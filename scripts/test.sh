#!/usr/bin/env bash
# The test suite: Triton kernels under the interpreter on CPU, then the GPU-compile checks (Triton AOT
# for sm_80/sm_90 and nvcc for every .cu) in their own process with TRITON_INTERPRET=0. Both stages run
# even when the first fails; the exit status is non-zero when either failed. Extra arguments go to both
# pytest runs (a stage that then selects no test counts as passed).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit
status=0
stage() {
  "$@"
  local rc=$?
  # 5: no test collected, which extra arguments may cause (e.g. a single file without AOT tests)
  if [ $rc -ne 0 ] && ! { [ $rc -eq 5 ] && [ $n_args -gt 0 ]; }; then status=1; fi
}
n_args=$#
stage .venv/bin/python -m pytest -q -m "not aot" "$@"
TRITON_INTERPRET=0 stage .venv/bin/python -m pytest -q -m aot "$@"
exit $status
