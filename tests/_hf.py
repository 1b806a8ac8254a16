"""Importing transformers in tests, and the tiny models the Hugging Face tests build from configs.

transformers imports the package ``kernels`` from the package index (a dependency of transformers 5).
This repository's top-level ``kernels/`` folder (installed as ``sparse_engine.kernels``) shadows it
whenever the repository root is on ``sys.path`` (``python -m pytest`` puts the working directory there,
the bench helpers insert the root): transformers then fails with "cannot import name ... from 'kernels'".
:func:`import_transformers` imports the installed ``kernels`` first, with the root left out of the path.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _is_repo_kernels(module) -> bool:
    path = getattr(module, "__file__", None) or ""
    return bool(path) and Path(path).resolve().is_relative_to(ROOT / "kernels")


def import_transformers():
    """transformers (the test module is skipped, with the reason printed, when it is not installed)."""
    loaded = sys.modules.get("kernels")
    if loaded is None or _is_repo_kernels(loaded):
        sys.modules.pop("kernels", None)
        saved = list(sys.path)
        sys.path[:] = [p for p in sys.path if Path(os.path.abspath(p or ".")) != ROOT]
        try:
            importlib.import_module("kernels")
        except ImportError:
            pass  # not installed: transformers then does not import it either
        finally:
            sys.path[:] = saved
    return pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e '.[hf]'); the HF tests need it"
    )
