"""Every CUDA kernel file compiles with nvcc for sm_80 and sm_90 (no GPU needed).

The .cu files include no torch headers (csrc/cuda/kernels.h: raw pointers, a stream, cudaError_t), so
nvcc alone compiles them; this catches what only the device compiler rejects before a GPU machine sees
the code. Marker ``aot``: scripts/test.sh runs it in the second pytest process.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

pytestmark = pytest.mark.aot


def _build_ext():
    spec = importlib.util.spec_from_file_location("_se_build_ext_for_test", ROOT / "csrc" / "build_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/cuda/*.cu not found"
    assert {p.name for p in CU_FILES} >= {"compact_linear.cu", "elementwise.cu"}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(cu, arch, tmp_path):
    nvcc = _build_ext().find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, PATH, /usr/local/cuda): cannot compile the .cu files here")
    obj = tmp_path / (cu.stem + ".o")
    cmd = [nvcc, "-c", str(cu), "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
           f"-I{ROOT / 'csrc' / 'cuda'}", f"-gencode=arch=compute_{arch[3:]},code={arch}", "-Werror", "all-warnings"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed for {cu.name} ({arch}):\n{proc.stdout}{proc.stderr}"
    assert obj.stat().st_size > 0
    # the object holds machine code (an ELF cubin) for the requested architecture
    cuobjdump = _cuobjdump(nvcc)
    if cuobjdump is not None:
        listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True)
        assert listing.returncode == 0, listing.stderr
        assert f".{arch}." in listing.stdout, listing.stdout


def _cuobjdump(nvcc: str) -> str | None:
    """cuobjdump beside nvcc, on PATH, or the copy triton ships (the compiler-only toolkit has none)."""
    candidates = [Path(nvcc).resolve().parent / "cuobjdump", shutil.which("cuobjdump")]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    for c in candidates:
        if c and Path(c).exists():
            return str(c)
    return None
