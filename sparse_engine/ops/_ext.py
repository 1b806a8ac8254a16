"""Loading a compiled extension (the C++ one, sparse_engine._C, and the CUDA one, sparse_engine._cuda_C).

Both follow the same steps: use the ops if they are registered already; else import the library that
``pip install`` built; else, with ``SPARSE_ENGINE_JIT=1``, build the same sources at first use; else say
why not (the caller stores that as its ``UNAVAILABLE`` and the reference serves the ops).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path

import torch

from .. import env

ROOT = Path(__file__).resolve().parent.parent.parent


def registered(namespace: str, ops: tuple[str, ...]) -> bool:
    """Whether ``torch.ops.<namespace>`` has every one of ``ops``."""
    try:
        space = getattr(torch.ops, namespace)
        return all(hasattr(space, op) for op in ops)
    except (AttributeError, RuntimeError):
        return False


def build_ext_module():
    """csrc/build_ext.py (sources and flags of both extensions), loaded from the source checkout."""
    path = ROOT / "csrc" / "build_ext.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (JIT builds need a source checkout)")
    spec = importlib.util.spec_from_file_location("_sparse_engine_build_ext", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def build_dir(name: str) -> Path:
    """The JIT build folder of extension ``name`` for this torch version (kept between runs)."""
    return Path(env.cache_dir()) / "torch_extensions" / f"{name}-torch{torch.__version__}"


def jit_load(name: str, build_dir: Path, verbose: bool, **options) -> None:
    """torch.utils.cpp_extension.load of a library that only registers ops (no Python module), built in
    ``build_dir`` (kept between runs); ``options``: sources and flags."""
    from torch.utils.cpp_extension import load as cpp_load

    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_load(name=name, build_directory=str(build_dir), is_python_module=False, verbose=verbose, **options)


def load(library: str, is_registered: Callable[[], bool], jit_build: Callable[[], None], hint: str) -> str | None:
    """Load ``library`` (a module name); None when its ops are registered, else why not.

    hint: how to get the prebuilt library (appended to the reason when there is no JIT build).
    """
    if is_registered():
        return None
    try:
        importlib.import_module(library)  # registers the ops with torch
    except ImportError as e:
        prebuilt = f"{library} is not importable ({e})"
    else:
        return None if is_registered() else f"{library} loaded but registered no ops (stale build?)"
    if env.get("SPARSE_ENGINE_JIT", "0") == "1":
        try:
            jit_build()
        except Exception as e:  # compiler missing or failing: say so, keep the library usable
            return f"{prebuilt}; the SPARSE_ENGINE_JIT=1 build failed: {type(e).__name__}: {str(e)[-1500:]}"
        return None if is_registered() else "the JIT build registered no ops"
    return f"{prebuilt}: {hint}"


def takes(backend: str, arg: str, dtypes: tuple[torch.dtype, ...], *, device_type: str = "cpu",
          csr_only: bool = False) -> Callable[[Callable], Callable]:
    """Decorator of a compiled kernel's wrapper: the tensor argument ``arg`` must have one of ``dtypes``,
    be on ``device_type`` and (``csr_only``) hold 1-D CSR values, else ValueError naming what is wrong.

    Only a check: backends.select never sends such arguments here (it reads SUPPORTED_DTYPES and the
    ``unsupported`` hook), so a call that fails it comes from code calling the kernel module directly.
    """
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)

    def deco(fn: Callable) -> Callable:
        position = list(inspect.signature(fn).parameters).index(arg)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t = kwargs[arg] if arg in kwargs else args[position]
            if t.device.type != device_type:
                raise ValueError(f"{arg} must be a {device_type.upper()} tensor for the {backend} backend, "
                                 f"got {t.device}")
            if t.dtype not in dtypes:
                raise ValueError(f"the {backend} backend computes {fn.__name__} in {names} only, got {t.dtype}")
            if csr_only and t.dim() != 1:
                raise ValueError(f"the {backend} {fn.__name__} takes CSR values (nnz,), got shape {tuple(t.shape)}")
            return fn(*args, **kwargs)

        return wrapper

    return deco
