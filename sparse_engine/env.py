"""Every environment variable sparse_engine reads, in one place.

Read lazily (functions, not module constants) so that tests can monkeypatch the environment.
"""
from __future__ import annotations

import os

#: name -> what it does. `sparse-engine info` prints this table.
VARIABLES: dict[str, str] = {
    "SPARSE_ENGINE_BACKEND": "force one backend for every op: reference | triton | cpp | cuda "
    "(an explicit request that cannot be met raises)",
    "SPARSE_ENGINE_BUILD": "setup.py: 0 disables building the optional C++ extension, 1 makes a failed build fatal",
    "SPARSE_ENGINE_CUDA": "setup.py: 1 builds the CUDA extension (needs nvcc and a CUDA torch)",
    "SPARSE_ENGINE_DATA": "directory holding the Fashion-MNIST IDX files",
    "SPARSE_ENGINE_CACHE": "cache directory (layout crossover measurements, downloads); default ~/.cache/sparse_engine",
    "SPARSE_ENGINE_JIT": "1 builds the C++ extension at first use with torch.utils.cpp_extension.load "
    "when no prebuilt one is installed (default 0)",
    "SPARSE_ENGINE_TEST_SEED": "tests: fix the random seed (each run draws a fresh one and prints it on failure)",
    "TRITON_INTERPRET": "(Triton's own) 1 runs Triton kernels on CPU tensors in the interpreter",
}


def get(name: str, default: str | None = None) -> str | None:
    if name not in VARIABLES:
        raise KeyError(f"unknown sparse_engine environment variable {name!r}; known: {sorted(VARIABLES)}")
    # os.environ.get of an unset name costs ~1 µs (os.environ raises and catches a KeyError inside), and
    # backend selection asks on every op call: a tenth of a batch-1 layer. os.environ keeps its entries in
    # a plain dict (`_data`, keys and values as its encodekey / decodevalue make them); read that where it
    # exists. Still read on every call, so a change to os.environ takes effect at once.
    environ = os.environ
    data = getattr(environ, "_data", None)
    if data is None:
        return environ.get(name, default)
    key = _encoded.get(name)
    if key is None:
        key = _encoded[name] = environ.encodekey(name)
    value = data.get(key)
    return default if value is None else environ.decodevalue(value)


#: name -> os.environ's key for it (encodekey is a Python function: ~0.15 µs per call)
_encoded: dict[str, object] = {}


def backend_override() -> str | None:
    value = get("SPARSE_ENGINE_BACKEND")
    return value.strip().lower() if value else None


def triton_interpret() -> bool:
    return get("TRITON_INTERPRET", "0") == "1"


def cache_dir() -> str:
    return get("SPARSE_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparse_engine")
