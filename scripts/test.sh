#!/usr/bin/env bash
# The test suite: Triton kernels under the interpreter on CPU, then the GPU-compile checks
# (Triton AOT for sm_80/sm_90 and nvcc for every .cu) in their own process with TRITON_INTERPRET=0.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -m "not aot" "$@"
TRITON_INTERPRET=0 .venv/bin/python -m pytest -q -m aot "$@"
