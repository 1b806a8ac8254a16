"""Which implementation of each op is available, and the choice between them.

An *implementation name* is ``<op>`` or ``<op>_<pass>`` (``masked_linear_fwd``, ``masked_linear_bwd``,
``fused_step``, ...). Every backend provides some of them with exactly the signature of the reference
function listed in ``REFERENCE`` (see reference.py). Backends:

* ``reference`` – reference.py; always available, every device.
* ``triton``    – ``sparse_engine.kernels.<op>`` module, attribute ``<impl name>``; CUDA tensors, or CPU
  tensors under ``TRITON_INTERPRET=1`` (only when requested explicitly: the interpreter is for tests).
* ``cpp``       – the compiled CPU extension, loaded by ``sparse_engine.ops._cpp``; CPU tensors.
* ``cuda``      – the compiled CUDA extension, loaded by ``sparse_engine.ops._cuda``; CUDA tensors.

Automatic choice takes the first backend of ``PREFERENCE[device type]`` that provides the implementation
and accepts the arguments; it falls back quietly with one log line per (impl, backend, reason). The
environment variable ``SPARSE_ENGINE_BACKEND`` (or :func:`force`) requests one backend: a request that
cannot be met raises, naming what is missing. Nothing is imported until an op first runs.

What a backend module may declare besides the functions (all optional):

* ``UNAVAILABLE: str`` – non-empty when the module imported but cannot run (e.g. the .so is missing).
* ``SUPPORTED_DTYPES`` – a collection of ``torch.dtype`` for every impl, or a dict impl -> collection.
  Absent: every floating dtype. (The compute dtype of an op is the dtype of its weight / parameter.)
* ``unsupported(impl: str, args: tuple) -> str`` – "" when the backend accepts these exact arguments,
  else why not (e.g. a block shape it has no kernel for). Called before every automatic choice, so it
  must be cheap (shapes and dtypes only, no data).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from typing import Callable, Iterator

import torch

from .. import env
from . import reference

log = logging.getLogger("sparse_engine")

BACKENDS = ("reference", "triton", "cpp", "cuda")

#: implementation name -> reference function (the spec and the signature every backend follows)
REFERENCE: dict[str, Callable] = {
    "reparam_fwd": reference.reparam_ref,
    "reparam_bwd": reference.reparam_backward_ref,
    "masked_linear_fwd": reference.masked_linear_ref,
    "masked_linear_bwd": reference.masked_linear_backward_ref,
    "block_sparse_linear_fwd": reference.block_sparse_linear_ref,
    "block_sparse_linear_bwd": reference.block_sparse_linear_backward_ref,
    "compact_linear_fwd": reference.compact_linear_ref,
    "compact_linear_bwd": reference.compact_linear_backward_ref,
    "sparse_conv2d_fwd": reference.sparse_conv2d_ref,
    "sparse_conv2d_bwd": reference.sparse_conv2d_backward_ref,
    "fused_step": reference.fused_step_ref,
    "signin_reset": reference.signin_reset_ref,
    "prune_threshold": reference.prune_threshold_ref,
    "all_finite": reference.all_finite_ref,
}

#: automatic order per device type; reference is always the last resort
PREFERENCE: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpp", "reference"),
}

_forced: list[str] = []  # stack set by force(); wins over the environment variable


def _op_of(impl: str) -> str:
    for suffix in ("_fwd", "_bwd"):
        if impl.endswith(suffix):
            return impl[: -len(suffix)]
    return impl


_MODULE_OF = {"cpp": "sparse_engine.ops._cpp", "cuda": "sparse_engine.ops._cuda"}


def module_name(backend: str, impl: str) -> str:
    """The module that holds ``impl`` for ``backend`` (not for "reference")."""
    if backend == "triton":
        return f"sparse_engine.kernels.{_op_of(impl)}"
    if backend in _MODULE_OF:
        return _MODULE_OF[backend]
    raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")


@functools.lru_cache(maxsize=None)
def _module(backend: str, impl: str) -> tuple[object | None, str]:
    """(module, "") or (None, why it cannot be imported). Cached: import failures are not retried."""
    if impl not in REFERENCE:
        raise KeyError(f"unknown implementation {impl!r}; known: {sorted(REFERENCE)}")
    if backend == "reference":
        return reference, ""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    name = module_name(backend, impl)
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return None, f"triton is not installed ({e})"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return None, f"{name} does not exist (no {backend} kernel for {_op_of(impl)})"
        return None, f"importing {name} failed: {e}"
    except Exception as e:  # a broken build must not break import of the library
        return None, f"importing {name} failed: {type(e).__name__}: {e}"
    unavailable = getattr(module, "UNAVAILABLE", None)  # compiled backends set this when the .so is missing
    if unavailable:
        return None, str(unavailable)
    return module, ""


def _load(backend: str, impl: str) -> tuple[Callable | None, str]:
    """(function, "") or (None, why it is unavailable)."""
    if backend == "reference":
        if impl not in REFERENCE:
            raise KeyError(f"unknown implementation {impl!r}; known: {sorted(REFERENCE)}")
        return REFERENCE[impl], ""
    module, why = _module(backend, impl)
    if module is None:
        return None, why
    fn = getattr(module, impl, None)
    if fn is None:
        return None, f"{module_name(backend, impl)} has no {impl}"
    return fn, ""


def supported_dtypes(backend: str, impl: str) -> frozenset[torch.dtype] | None:
    """The dtypes ``backend`` declares for ``impl`` (None: no declaration, i.e. every floating dtype)."""
    if backend == "reference":
        return None
    module, _ = _module(backend, impl)
    declared = getattr(module, "SUPPORTED_DTYPES", None) if module is not None else None
    if isinstance(declared, dict):
        declared = declared.get(impl)
    return None if declared is None else frozenset(declared)


def _dtype_reason(backend: str, impl: str, dtype: torch.dtype | None) -> str:
    if dtype is None:
        return ""
    allowed = supported_dtypes(backend, impl)
    if allowed is None or dtype in allowed:
        return ""
    names = ", ".join(sorted(str(d).replace("torch.", "") for d in allowed))
    return f"{backend} {impl} supports dtypes {{{names}}}, got {str(dtype).replace('torch.', '')}"


def _args_reason(backend: str, impl: str, args: tuple) -> str:
    if backend == "reference" or not args:
        return ""
    module, _ = _module(backend, impl)
    check = getattr(module, "unsupported", None) if module is not None else None
    return (check(impl, args) or "") if check is not None else ""


def _device_reason(backend: str, device: torch.device, explicit: bool) -> str:
    """Why ``backend`` cannot run on ``device`` ("" if it can)."""
    if backend == "reference":
        return ""
    if backend == "triton":
        if device.type == "cuda":
            return ""
        if device.type == "cpu" and env.triton_interpret():
            if explicit:
                return ""
            return "the Triton interpreter (TRITON_INTERPRET=1) runs only when triton is requested explicitly"
        return f"triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
    if backend == "cpp":
        return "" if device.type == "cpu" else f"the C++ backend runs on CPU tensors, got {device.type}"
    if backend == "cuda":
        return "" if device.type == "cuda" else f"the CUDA backend runs on CUDA tensors, got {device.type}"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def requested() -> str | None:
    """The backend requested by force() or SPARSE_ENGINE_BACKEND, if any."""
    name = _forced[-1] if _forced else env.backend_override()
    if name is not None and name not in BACKENDS:
        raise ValueError(f"SPARSE_ENGINE_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def force(backend: str | None) -> Iterator[None]:
    """Run the enclosed ops on ``backend`` (None: automatic). Mainly for tests and benchmarks."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _forced.append(backend)  # type: ignore[arg-type]
    try:
        yield
    finally:
        _forced.pop()


_logged: set[tuple[str, str, str]] = set()


def reason(
    backend: str, impl: str, device: torch.device | str, dtype: torch.dtype | None = None, args: tuple = (),
    *, explicit: bool = True,
) -> str:
    """Why ``backend`` cannot run ``impl`` on ``device`` / ``dtype`` / ``args`` ("" if it can).

    ``explicit`` is True for a backend requested by name: only then may Triton run on CPU tensors
    (under TRITON_INTERPRET=1).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    fn, why = _load(backend, impl)
    if fn is None:
        return why
    return (_device_reason(backend, device, explicit) or _dtype_reason(backend, impl, dtype)
            or _args_reason(backend, impl, args))


# select()'s answers that cannot depend on the arguments (no backend consulted has an `unsupported` hook),
# by (impl, device type, dtype, request, Triton interpreter flag, the module loader). Eager ops ask on every
# call, and the full walk (imports, dtype tables, device rules) costs several µs: a small layer's whole
# kernel time at batch 1. The loader is part of the key so that replacing it (tests do) starts afresh.
_selected: dict[tuple, tuple[str, Callable]] = {}
_extras: dict[tuple, Callable | None] = {}  # extra()'s answers, under the same keys


def forget() -> None:
    """Drop every cached answer (imported modules, choices): the next op looks everything up again. For
    tests that swap the backend modules in sys.modules."""
    clear = getattr(_module, "cache_clear", None)  # absent where a test replaced the loader
    if clear is not None:
        clear()
    _selected.clear()
    _extras.clear()


#: device (torch.device or str) -> its type: torch.device.type costs ~0.2 µs, a dict lookup a quarter of it
_kinds: dict = {}


def _key(impl: str, device, dtype) -> tuple[tuple, str | None, str]:
    """(cache key of select's answer, the requested backend, the device type)."""
    want = requested()
    kind = _kinds.get(device)
    if kind is None:
        kind = _kinds[device] = device.type if isinstance(device, torch.device) else torch.device(device).type
    return (impl, kind, dtype, want, env.triton_interpret() if want == "triton" else None, _module), want, kind


def _args_dependent(backend: str, impl: str) -> bool:
    if backend == "reference":
        return False
    module, _ = _module(backend, impl)
    return module is not None and getattr(module, "unsupported", None) is not None


def select(
    impl: str, device: torch.device, dtype: torch.dtype | None = None, args: tuple = ()
) -> tuple[str, Callable]:
    """(backend name, function) that runs ``impl`` on ``device`` with compute dtype ``dtype``.

    ``args`` (the exact arguments, optional) are offered to a backend's ``unsupported`` hook.
    """
    key, want, kind = _key(impl, device, dtype)
    hit = _selected.get(key)
    if hit is not None:
        return hit
    backend, fn = _select(impl, device, dtype, args, want)
    consulted = (want,) if want is not None else PREFERENCE.get(kind, ("reference",))
    if not any(_args_dependent(b, impl) for b in consulted):
        _selected[key] = (backend, fn)
    return backend, fn


def _select(impl: str, device, dtype, args: tuple, want: str | None) -> tuple[str, Callable]:
    if want is not None:
        why = reason(want, impl, device, dtype, args, explicit=True)
        if why:
            raise RuntimeError(f"backend {want!r} was requested for {impl} but cannot run it: {why}")
        return want, _load(want, impl)[0]  # type: ignore[return-value]
    for backend in PREFERENCE.get(torch.device(device).type, ("reference",)):
        why = reason(backend, impl, device, dtype, args, explicit=False)
        if not why:
            return backend, _load(backend, impl)[0]  # type: ignore[return-value]
        key = (impl, backend, why)
        if key not in _logged:
            _logged.add(key)
            log.info("sparse_engine: %s: %s backend not used: %s", impl, backend, why)
    return "reference", REFERENCE[impl]


def extra(impl: str, device: torch.device, dtype: torch.dtype | None, name: str) -> Callable | None:
    """The function ``name`` of the backend module :func:`select` takes for ``impl`` (an entry point
    beyond the reference names, e.g. a whole-group optimizer step), or None when that backend has none."""
    key = (_key(impl, device, dtype)[0], name)
    if key in _extras:  # cached with select's answer (the same conditions), as it is asked per call
        return _extras[key]
    backend, _ = select(impl, device, dtype)
    if backend == "reference":
        fn = None
    else:
        module, _ = _module(backend, impl)
        fn = getattr(module, name, None)
    if key[0] in _selected:
        _extras[key] = fn
    return fn


def which(impl: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend :func:`select` takes for ``impl`` now (a request included), or ``"unavailable: why"``
    when a requested backend cannot run it. For the cache keys of measurements: a new kernel, or another
    request, is another situation."""
    try:
        return select(impl, torch.device(device), dtype)[0]
    except RuntimeError as e:
        return f"unavailable: {e}"


def automatic(impl: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend the automatic choice takes for ``impl``, whatever is requested."""
    with force(None):
        return select(impl, torch.device(device), dtype)[0]


def availability() -> dict[str, dict[str, dict]]:
    """impl -> backend -> ``{"available": bool, "reason": why not ("" if available), "dtypes": the dtypes
    the backend declares, or None for every floating dtype}`` (what ``sparse-engine info`` prints).

    Imports every backend module (the loads are cached, as for :func:`select`).
    """
    table: dict[str, dict[str, dict]] = {}
    for impl in REFERENCE:
        row = {}
        for backend in BACKENDS:
            fn, why = _load(backend, impl)
            row[backend] = {"available": fn is not None, "reason": why,
                            "dtypes": supported_dtypes(backend, impl) if fn is not None else None}
        table[impl] = row
    return table
