#!/usr/bin/env bash
# Create .venv with the pinned dev stack and install sparse_engine into it (idempotent, ~1 min the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, triton, numpy, pytest, transformers, matplotlib" 2>/dev/null; then
  # torch pinned to the CPU wheel (a range would pull a multi-GB CUDA build); triton as torch 2.13 declares.
  .venv/bin/pip install -q torch==2.13.0 triton==3.7.1 numpy pytest ninja pybind11
fi
if ! .venv/bin/python -c "import sparse_engine, accelerate, safetensors" 2>/dev/null || [ "${SPARSE_ENGINE_REINSTALL:-0}" = 1 ]; then
  .venv/bin/pip install -q --no-build-isolation -e '.[test,hf,plot]'
fi
