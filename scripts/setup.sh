#!/usr/bin/env bash
# Create .venv with the pinned dev stack and install sparse_engine into it (editable, with its C++ CPU
# kernels and the test / hf / plot extras). Idempotent: a second run only checks, in a few seconds, what is
# really installed (scripts/install_check.py, run from outside the source tree) and reinstalls when
# something is missing or pyproject.toml, setup.py or csrc/ changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PATH="$ROOT/.venv/bin:$PATH"   # the venv's ninja builds the C++ kernels
PY="$ROOT/.venv/bin/python"
# From / : in the repository root `import sparse_engine` would find the checkout, not the install.
check() { (cd / && "$PY" "$ROOT/scripts/install_check.py" "$@"); }

fresh=""
if [ ! -x "$PY" ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
  fresh=1
fi

if command -v "${CXX:-c++}" >/dev/null || command -v g++ >/dev/null; then
  cxx=--cxx build=1   # a compiler is here: a failing C++ build is an error, not a silent fallback
else
  cxx="" build=0
  echo "setup: no C++ compiler (apt-get install g++): the C++ CPU kernels are not built, the slower" \
       "PyTorch reference runs instead"
fi
if why=$(check check "$ROOT" $cxx 2>&1); then
  exit 0
fi
[ -n "$fresh" ] || echo "$why"
if ! check deps; then
  echo "setup: installing torch 2.13.0 (CPU), triton 3.7.1, numpy, pytest, ninja, pybind11"
  # torch pinned to the CPU wheel (a range would pull a multi-GB CUDA build); triton as torch 2.13 declares.
  .venv/bin/pip install -q torch==2.13.0 triton==3.7.1 numpy pytest ninja pybind11
fi
echo "setup: installing sparse_engine into .venv (pip install -e '.[test,hf,plot]'; about a minute)"
rm -f .venv/sparse_engine-install.sha256
SPARSE_ENGINE_BUILD=$build .venv/bin/pip install -q --no-build-isolation -e '.[test,hf,plot]'
check stamp "$ROOT" > .venv/sparse_engine-install.sha256
if ! check check "$ROOT" $cxx; then
  echo "setup: the install above did not give a working sparse_engine" >&2
  exit 1
fi
