"""What scripts/setup.sh and scripts/main.sh ask about the environment (standard library only).

    python scripts/install_check.py deps              # exit 0 when torch, triton and numpy are installed
    python scripts/install_check.py stamp ROOT        # hash of what an install of ROOT compiles or reads
    python scripts/install_check.py check ROOT [--cxx] # why ROOT/.venv needs a (re)install; exit 1 if so
    python scripts/install_check.py data              # exit 0 when Fashion-MNIST is found without a download

``check`` and ``data`` are run by the venv's Python from outside the source tree: from the repository
root, ``import sparse_engine`` would find the checkout itself and pass for an install that is not there
(no console script, no compiled kernels).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

STAMP = Path(".venv") / "sparse_engine-install.sha256"
# What `pip install -e .` reads or compiles; the Python sources are linked (editable), not copied.
INSTALL_INPUTS = ("pyproject.toml", "setup.py", "csrc")
# The pinned stack setup.sh installs first, and the modules the install's extras (test, hf, plot) bring.
STACK = ("torch", "triton", "numpy")
EXTRAS = ("pytest", "ninja", "pybind11", "transformers", "accelerate", "safetensors", "matplotlib")


def stamp(root: Path) -> str:
    """sha256 over the path and bytes of every file in INSTALL_INPUTS (sorted, caches skipped)."""
    files: list[Path] = []
    for name in INSTALL_INPUTS:
        p = root / name
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    h = hashlib.sha256()
    for f in files:
        if "__pycache__" in f.parts or f.suffix in (".pyc", ".o", ".so"):
            continue
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes() if f.exists() else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()


def missing(modules: tuple[str, ...]) -> list[str]:
    """Those of ``modules`` that are not installed (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def problems(root: Path, cxx: bool) -> list[str]:
    """Why the venv under ``root`` does not hold a working install of ``root``; empty when it does.

    cxx: a C++ compiler is present, so the compiled CPU kernels (sparse_engine._C) must be there too.
    """
    root = root.resolve()
    found: list[str] = []
    if not (root / ".venv" / "bin" / "sparse-engine").exists():
        found.append("no console script .venv/bin/sparse-engine")
    stamp_file = root / STAMP
    if not stamp_file.exists():
        found.append(f"no install record {STAMP}")
    elif stamp_file.read_text().strip() != stamp(root):
        found.append("pyproject.toml, setup.py or csrc/ changed since the last install")
    absent = missing(EXTRAS)
    if absent:
        found.append(f"not installed: {', '.join(absent)}")
    try:
        import sparse_engine
    except ImportError as e:
        return found + [f"sparse_engine is not importable ({e})"]
    where = Path(sparse_engine.__file__).resolve().parent
    if where != root / "sparse_engine":
        return found + [f"sparse_engine is imported from {where}, not from this checkout"]
    modules = ["sparse_engine.kernels"] + (["sparse_engine._C"] if cxx else [])
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            found.append(f"{name} is not importable ({e})")
    return found


def data_found() -> bool:
    """Whether sparse_engine finds Fashion-MNIST (argument-free lookup) without downloading it."""
    from sparse_engine.app.data import DataError, find_fashion_mnist

    try:
        find_fashion_mnist(download=False)
    except DataError:
        return False
    return True


def main(argv: list[str]) -> int:
    if argv == ["deps"]:
        return 1 if missing(STACK) else 0
    if argv[:1] == ["stamp"] and len(argv) == 2:
        print(stamp(Path(argv[1])))
        return 0
    if argv[:1] == ["check"] and len(argv) in (2, 3):
        found = problems(Path(argv[1]), cxx="--cxx" in argv[2:])
        for line in found:
            print(f"setup: {line}")
        return 1 if found else 0
    if argv == ["data"]:
        return 0 if data_found() else 1
    print("usage: install_check.py deps | stamp ROOT | check ROOT [--cxx] | data", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
