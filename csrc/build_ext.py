"""How the optional compiled extensions are built: sources, flags, and the setup.py hook.

Used in three places:
* ``setup.py`` calls :func:`extensions` (ext_modules, cmdclass) on ``pip install``;
* ``sparse_engine/ops/_cpp.py`` and ``sparse_engine/ops/_cuda.py`` build the same sources at first use with
  ``torch.utils.cpp_extension.load`` when ``SPARSE_ENGINE_JIT=1`` and no prebuilt library is installed.

C++ (CPU): ``sparse_engine._C`` = ops.cpp (the one TORCH_LIBRARY(sparse_engine_C) schema file) + cpu/*.cpp.
No ``-march=native``: the build must run on any x86-64 (CI, other machines). The hot row kernels are
compiled three times instead (cpu/isa_{base,avx2,avx512}.cpp, each under its own ``#pragma GCC target``)
and picked at run time from what the CPU supports.

CUDA: ``sparse_engine._cuda_C``, a split build: each cuda/*.cu (no torch headers) is
compiled by nvcc into an object, and the objects are linked with the static CUDA runtime into a plain
C++ extension around cuda_binding.cpp. It builds and imports with a CPU-only torch as well.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parent
ROOT = CSRC.parent

#: sources of sparse_engine._C, relative to the repository root (setuptools wants relative paths)
CPP_SOURCES = [
    "csrc/ops.cpp",
    "csrc/cpu/compact_linear.cpp",
    "csrc/cpu/elementwise.cpp",
    "csrc/cpu/sparse_conv.cpp",
    "csrc/cpu/isa_base.cpp",
    "csrc/cpu/isa_avx2.cpp",
    "csrc/cpu/isa_avx512.cpp",
]
#: -g0 overrides the -g that Python's sysconfig adds (it doubles the build time); -fno-math-errno lets
#: sqrt vectorise; no -ffast-math: NaN/inf must keep their IEEE meaning (masked coordinates, tests).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
LD_FLAGS = ["-fopenmp"]

CUDA_BINDING = "csrc/cuda_binding.cpp"
#: (arch, code) pairs: sm_80 and sm_90 machine code plus compute_90 PTX for newer GPUs to JIT.
CUDA_GENCODE = [("compute_80", "sm_80"), ("compute_90", "sm_90"), ("compute_90", "compute_90")]
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-lineinfo"]


def cuda_sources() -> list[str]:
    """The .cu files (relative to the repository root)."""
    return sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu"))


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, else PATH, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.exists(default) else None


def cuda_root(nvcc: str) -> str:
    """The toolkit root of an nvcc (follows wrapper scripts that exec the real one)."""
    real = os.path.realpath(nvcc)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            for token in head.decode(errors="ignore").split():
                if token.endswith("/bin/nvcc") and os.path.exists(token):
                    real = os.path.realpath(token)
                    break
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(real))


def cuda_lib_dir(root: str) -> str:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        d = os.path.join(root, sub)
        if os.path.exists(os.path.join(d, "libcudart_static.a")):
            return d
    return os.path.join(root, "lib64")


def nvcc_command(nvcc: str, src: str, obj: str) -> list[str]:
    cmd = [nvcc, "-c", src, "-o", obj, *NVCC_FLAGS, f"-I{CSRC / 'cuda'}"]
    for arch, code in CUDA_GENCODE:
        cmd.append(f"-gencode=arch={arch},code={code}")
    return cmd


def compile_cuda_objects(nvcc: str, out_dir: str, sources: list[str] | None = None) -> list[str]:
    """nvcc -c every .cu into out_dir (in parallel); returns the object paths. Raises on failure."""
    os.makedirs(out_dir, exist_ok=True)
    sources = sources or [str(ROOT / s) for s in cuda_sources()]
    jobs = []
    for src in sources:
        obj = os.path.join(out_dir, Path(src).stem + ".o")
        if not (os.path.exists(obj) and os.path.getmtime(obj) >= max(
                os.path.getmtime(src), *(p.stat().st_mtime for p in (CSRC / "cuda").glob("*.h")))):
            jobs.append((src, obj))

    def run(job):
        src, obj = job
        proc = subprocess.run(nvcc_command(nvcc, src, obj), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src}:\n{proc.stdout}{proc.stderr}")

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        list(pool.map(run, jobs))
    return [os.path.join(out_dir, Path(s).stem + ".o") for s in sources]


def cuda_link_args(nvcc: str) -> tuple[list[str], list[str]]:
    """(library_dirs, libraries) that link the static CUDA runtime."""
    return [cuda_lib_dir(cuda_root(nvcc))], ["cudart_static", "rt", "dl", "pthread"]


def cuda_include_dirs(nvcc: str) -> list[str]:
    """cuda_runtime.h for the binding (cuda/kernels.h includes it)."""
    root = cuda_root(nvcc)
    return [d for d in (os.path.join(root, "include"), os.path.join(root, "targets/x86_64-linux/include"))
            if os.path.isdir(d)]


def want_cuda() -> tuple[bool, str]:
    """Build the CUDA extension? SPARSE_ENGINE_CUDA=1 forces, =0 disables, else only with a CUDA torch + nvcc."""
    flag = os.environ.get("SPARSE_ENGINE_CUDA", "").strip()
    if flag == "0":
        return False, "SPARSE_ENGINE_CUDA=0"
    nvcc = find_nvcc()
    if flag == "1":
        return (nvcc is not None), ("nvcc not found" if nvcc is None else "")
    try:
        import torch

        torch_cuda = torch.version.cuda is not None
    except ImportError:
        torch_cuda = False
    if not torch_cuda:
        return False, "torch has no CUDA (set SPARSE_ENGINE_CUDA=1 to build anyway)"
    if nvcc is None:
        return False, "nvcc not found"
    return True, ""


def _warn(msg: str) -> None:
    print(f"WARNING: sparse_engine: {msg}", file=sys.stderr)


def extensions():
    """(ext_modules, cmdclass) for setup.py. Never raises unless SPARSE_ENGINE_BUILD=1."""
    strict = os.environ.get("SPARSE_ENGINE_BUILD", "").strip() == "1"
    if os.environ.get("SPARSE_ENGINE_BUILD", "").strip() == "0":
        print("sparse_engine: SPARSE_ENGINE_BUILD=0: compiled extensions not built", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:
        if strict:
            raise
        _warn(f"torch is not importable at build time ({e}); compiled extensions not built")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        if strict:
            raise RuntimeError("no C++ compiler found (CXX / c++ / g++)")
        _warn("no C++ compiler found; compiled extensions not built (the reference backend serves)")
        return [], {}

    exts = [CppExtension("sparse_engine._C", CPP_SOURCES, extra_compile_args=CXX_FLAGS, extra_link_args=LD_FLAGS)]
    cuda, why = want_cuda()
    if cuda:
        exts.append(CppExtension("sparse_engine._cuda_C", [CUDA_BINDING], include_dirs=cuda_include_dirs(find_nvcc()),
                                 extra_compile_args=["-O2", "-g0"]))
    elif os.environ.get("SPARSE_ENGINE_CUDA", "").strip() == "1":
        if strict:
            raise RuntimeError(f"SPARSE_ENGINE_CUDA=1 but the CUDA extension cannot be built: {why}")
        _warn(f"SPARSE_ENGINE_CUDA=1 but the CUDA extension cannot be built: {why}")

    class OptionalBuildExt(BuildExtension.with_options(use_ninja=True)):
        """Builds each extension on its own; a failure warns once and the install goes on."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # e.g. no working compiler: BuildExtension checks it up front
                if strict:
                    raise
                _warn(f"compiled extensions not built ({type(e).__name__}: {e}); the reference backend serves")

        def build_extension(self, ext):
            try:
                if ext.name == "sparse_engine._cuda_C":
                    nvcc = find_nvcc()
                    objs = compile_cuda_objects(nvcc, os.path.join(self.build_temp, "cuda_objects"))
                    ext.extra_objects = list(ext.extra_objects or []) + objs
                    lib_dirs, libs = cuda_link_args(nvcc)
                    ext.library_dirs = list(ext.library_dirs or []) + lib_dirs
                    ext.libraries = list(ext.libraries or []) + libs
                super().build_extension(ext)
            except Exception as e:
                if strict:
                    raise
                _warn(f"{ext.name} not built ({type(e).__name__}: {str(e)[:2000]}); "
                      "the other backends serve (sparse-engine info says which)")

    return exts, {"build_ext": OptionalBuildExt}
