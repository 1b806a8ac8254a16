"""Packaging: the top-level kernels/ folder is installed as sparse_engine.kernels (editable and wheel
installs) and, run from the repository root, does not stand in for the PyPI package `kernels` that
transformers imports."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pypi_kernels_or_skip():
    import importlib.metadata

    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` is not installed (transformers >= 5 brings it)")


def test_transformers_loads_a_bert_from_the_repository_root(tmp_path):
    """transformers imports the PyPI package `kernels`; run from the repository root (the current
    directory leads sys.path), the top-level kernels/ folder must not stand in for it."""
    _pypi_kernels_or_skip()
    code = f"""
import kernels, transformers
from pathlib import Path
from transformers import AutoModel, BertConfig
assert Path(kernels.__file__).resolve().parent != Path.cwd().resolve() / 'kernels', kernels.__file__
cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=16)
transformers.BertModel(cfg).save_pretrained({str(tmp_path / 'bert')!r})
model = AutoModel.from_pretrained({str(tmp_path / 'bert')!r})
print(type(model).__name__)
"""
    r = subprocess.run(check=False, args=[sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "BertModel"


def test_kernels_are_sparse_engine_kernels_from_outside_the_tree(tmp_path):
    """The install serves the top-level kernels/ folder as sparse_engine.kernels (editable install)."""
    code = ("import sparse_engine, sparse_engine.kernels.masked_linear as m\n"
            "print(sparse_engine.__file__); print(m.__file__)")
    r = subprocess.run(check=False, args=[sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    package, kernel = (Path(line).resolve() for line in r.stdout.split())
    if package.parent != ROOT / "sparse_engine":
        pytest.skip(f"sparse_engine is installed from {package.parent}, not as an editable install of this checkout")
    assert kernel == ROOT / "kernels" / "masked_linear.py"


def test_a_wheel_ships_the_kernels_as_sparse_engine_kernels(tmp_path):
    """A non-editable install: the wheel holds kernels/*.py as sparse_engine/kernels/*.py, no top-level
    `kernels`, and sparse_engine.kernels imports from it."""
    import zipfile

    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "build", "*.egg-info")
    for name in ("sparse_engine", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run(check=False, args=[sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                                          "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "SPARSE_ENGINE_BUILD": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernels = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert kernels and all(f"sparse_engine/kernels/{k}" in names for k in kernels), names
    assert not [n for n in names if n.startswith("kernels/")]
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")  # what pip install puts in site-packages
    code = "import sparse_engine.kernels.masked_linear as m; print(m.__file__)"
    r = subprocess.run(check=False, args=[sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip()).resolve() == (tmp_path / "site" / "sparse_engine" / "kernels" / "masked_linear.py")
