"""Backend selection: SPARSE_ENGINE_BACKEND / force(), explicit requests that cannot be met, automatic
fallback, dtype and argument declarations of backend modules, lazy imports, and ``sparse_engine.app.info``.

Most tests replace ``backends._module`` with a stub, so they check the selection logic whatever kernels
happen to be built on this machine.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from _backends import randn

from sparse_engine.ops import backends
from sparse_engine import env, ops

ROOT = Path(__file__).resolve().parent.parent


def _run_python(code: str, **extra_env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "SPARSE_ENGINE_BACKEND"} | extra_env
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def stub(monkeypatch):
    """Replace backend modules: ``stub(backend, module_or_reason)``; anything not set is missing."""
    table: dict[str, object] = {}

    def fake_module(backend, impl):
        if backend == "reference":
            return backends.reference, ""
        got = table.get(backend, f"stub: no {backend} module")
        return (None, got) if isinstance(got, str) else (got, "")

    monkeypatch.setattr(backends, "_module", fake_module)
    monkeypatch.setattr(backends, "_logged", set())
    monkeypatch.delenv("SPARSE_ENGINE_BACKEND", raising=False)

    def set_(backend, module):
        table[backend] = module
    return set_


def _recording_module(name, **attrs):
    """A backend module whose reparam_fwd records that it ran and returns the reference result."""
    calls = []

    def reparam_fwd(m, w, mask):
        calls.append(name)
        return backends.reference.reparam_ref(m, w, mask)

    return types.SimpleNamespace(reparam_fwd=reparam_fwd, **attrs), calls


# ----------------------------------------------------------------------------- requests by name


def test_env_reference_runs_everything(monkeypatch):
    monkeypatch.setenv("SPARSE_ENGINE_BACKEND", "reference")
    assert backends.requested() == "reference"
    assert backends.select("masked_linear_fwd", torch.device("cpu"), torch.float16)[0] == "reference"
    x, w = randn(3, 4), randn(2, 4)
    torch.testing.assert_close(ops.masked_linear(x, None, w), x @ w.t())


def test_env_reads_each_change_of_os_environ(monkeypatch):
    """env.get reads os.environ's own dict on every call (fast path), so a change takes effect at once,
    and it answers as os.environ.get does, also where os.environ is a mapping without that dict."""
    monkeypatch.delenv("SPARSE_ENGINE_CACHE", raising=False)
    assert env.get("SPARSE_ENGINE_CACHE") is None
    assert env.get("SPARSE_ENGINE_CACHE", "fallback") == "fallback"
    monkeypatch.setenv("SPARSE_ENGINE_CACHE", "a cache é x")
    assert env.get("SPARSE_ENGINE_CACHE") == "a cache é x"
    monkeypatch.setenv("SPARSE_ENGINE_BACKEND", " Reference ")
    assert backends.requested() == "reference"
    monkeypatch.delenv("SPARSE_ENGINE_BACKEND")
    assert backends.requested() is None
    monkeypatch.setattr(os, "environ", {"SPARSE_ENGINE_BACKEND": "cpp"})  # no _data: os.environ.get's way
    assert env.get("SPARSE_ENGINE_BACKEND") == "cpp"
    assert env.get("SPARSE_ENGINE_CACHE", "d") == "d"
    with pytest.raises(KeyError, match="unknown sparse_engine environment variable 'NOT_OURS'"):
        env.get("NOT_OURS")


def test_env_reference_end_to_end_in_a_fresh_process():
    code = ("import torch; from sparse_engine import ops; from sparse_engine.ops import backends, reference as R\n"
            "seen = []\n"
            "orig = backends.select\n"
            "def spy(impl, device, dtype=None, args=()):\n"
            "    out = orig(impl, device, dtype, args); seen.append(out[0]); return out\n"
            "backends.select = spy\n"
            "x, m, w = torch.randn(3, 4), torch.randn(2, 4), torch.randn(2, 4)\n"
            "y = ops.masked_linear(x, m, w, None)\n"
            "assert torch.allclose(y, R.masked_linear_ref(x, m, w, None, None))\n"
            "print(sorted(set(seen)))\n")
    out = _run_python(code, SPARSE_ENGINE_BACKEND=" Reference ")  # trimmed and case-insensitive
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "['reference']"


def test_explicit_request_that_cannot_be_met_raises_naming_what_is_missing(stub, monkeypatch):
    stub("cpp", "sparse_engine._C is not importable (no compiler)")
    monkeypatch.setenv("SPARSE_ENGINE_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match=r"backend 'cpp' was requested for reparam_fwd but cannot run it: "
                                           r"sparse_engine._C is not importable \(no compiler\)"):
        ops.reparam(randn(2, 3), randn(2, 3))
    stub("cpp", types.SimpleNamespace())  # imports, but lacks the function
    with pytest.raises(RuntimeError, match="sparse_engine.ops._cpp has no reparam_fwd"):
        ops.reparam(randn(2, 3), randn(2, 3))


def test_explicit_request_for_the_wrong_device_raises(stub):
    module, _ = _recording_module("cuda")
    stub("cuda", module)
    with backends.force("cuda"), \
            pytest.raises(RuntimeError, match="the CUDA backend runs on CUDA tensors, got cpu"):
        ops.reparam(randn(2, 3), randn(2, 3))


def test_explicit_request_for_an_unsupported_dtype_raises(stub):
    module, _ = _recording_module("cpp", SUPPORTED_DTYPES=(torch.float32, torch.float64))
    stub("cpp", module)
    want = r"cpp reparam_fwd supports dtypes \{float32, float64\}, got float16"
    with backends.force("cpp"), pytest.raises(RuntimeError, match=want):
        ops.reparam(randn(2, 3, dtype=torch.float16), randn(2, 3, dtype=torch.float16))


def test_triton_on_cpu_only_when_requested_and_interpreting(stub, monkeypatch):
    module, calls = _recording_module("triton")
    stub("triton", module)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.reason("triton", "reparam_fwd", "cpu", torch.float32, explicit=True) == ""
    assert "only when triton is requested explicitly" in backends.reason("triton", "reparam_fwd", "cpu",
                                                                          explicit=False)
    with backends.force("triton"):
        ops.reparam(randn(2, 3), randn(2, 3))
    assert calls == ["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with backends.force("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.reparam(randn(2, 3), randn(2, 3))


@pytest.mark.parametrize("bad", ["bogus", "Triton2", "c++"])
def test_invalid_name_raises(bad, monkeypatch):
    monkeypatch.setenv("SPARSE_ENGINE_BACKEND", bad)
    with pytest.raises(ValueError, match="SPARSE_ENGINE_BACKEND must be one of"):
        ops.reparam(randn(2, 3), randn(2, 3))
    monkeypatch.delenv("SPARSE_ENGINE_BACKEND")
    with pytest.raises(ValueError, match="backend must be one of"):
        with backends.force(bad):
            pass
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.reason(bad, "reparam_fwd", "cpu")


def test_unknown_implementation_raises():
    with pytest.raises(KeyError, match="unknown implementation 'matmul_fwd'"):
        backends._load("reference", "matmul_fwd")


def test_force_wins_over_env_and_nests(stub, monkeypatch):
    cpp, calls = _recording_module("cpp")
    stub("cpp", cpp)
    monkeypatch.setenv("SPARSE_ENGINE_BACKEND", "cpp")
    with backends.force("reference"):
        assert backends.requested() == "reference"
        with backends.force(None):  # None: automatic, whatever the environment says
            assert backends.requested() is None
            assert backends.select("reparam_fwd", torch.device("cpu"), torch.float32)[0] == "cpp"
        assert backends.requested() == "reference"
    assert backends.requested() == "cpp"
    ops.reparam(randn(2, 3), randn(2, 3))
    assert calls == ["cpp"]


# ---------------------------------------------------------------------------------- automatic choice


def test_automatic_choice_on_cpu_falls_back_to_reference_with_one_log_line(stub, caplog):
    with caplog.at_level(logging.INFO, logger="sparse_engine"):
        for _ in range(3):
            assert backends.select("reparam_fwd", torch.device("cpu"), torch.float32)[0] == "reference"
        theta = ops.reparam(randn(2, 3), randn(2, 3))
    assert theta.shape == (2, 3)
    lines = [r.getMessage() for r in caplog.records if "cpp backend not used" in r.getMessage()]
    assert lines == ["sparse_engine: reparam_fwd: cpp backend not used: stub: no cpp module"]


def test_automatic_choice_prefers_a_working_backend_and_respects_its_dtypes(stub):
    cpp, calls = _recording_module("cpp", SUPPORTED_DTYPES={"reparam_fwd": (torch.float32,)})
    stub("cpp", cpp)
    ops.reparam(randn(2, 3), randn(2, 3))
    assert calls == ["cpp"]
    ops.reparam(randn(2, 3, dtype=torch.float64), randn(2, 3, dtype=torch.float64))  # not declared: reference
    assert calls == ["cpp"]
    assert backends.select("reparam_fwd", torch.device("cpu"), torch.float64)[0] == "reference"


def test_unsupported_hook_sees_the_arguments(stub):
    seen = []

    def unsupported(impl, args):
        seen.append((impl, tuple(a.shape if isinstance(a, torch.Tensor) else a for a in args)))
        return "no kernel for fewer than 4 columns" if args[1].shape[-1] < 4 else ""

    cpp, calls = _recording_module("cpp", unsupported=unsupported)
    stub("cpp", cpp)
    ops.reparam(randn(2, 3), randn(2, 3))  # rejected: automatic choice falls back
    ops.reparam(randn(2, 5), randn(2, 5))
    assert calls == ["cpp"] and seen[0] == ("reparam_fwd", ((2, 3), (2, 3), None))
    with backends.force("cpp"), pytest.raises(RuntimeError, match="no kernel for fewer than 4 columns"):
        ops.reparam(randn(2, 3), randn(2, 3))


def test_choice_is_cached_until_forget(stub):
    """select() (and extra()) answer from a cache keyed by impl, device type, dtype, request and loader;
    forget() drops it, and the next choice looks the modules up again."""
    cpu = torch.device("cpu")
    first, _ = _recording_module("cpp", fused_step_group=lambda *a: None)
    stub("cpp", first)
    backend, fn = backends.select("reparam_fwd", cpu, torch.float32)
    assert backend == "cpp" and fn is first.reparam_fwd
    assert backends.extra("reparam_fwd", cpu, torch.float32, "fused_step_group") is first.fused_step_group
    second, _ = _recording_module("cpp")
    stub("cpp", second)
    assert backends.select("reparam_fwd", cpu, torch.float32)[1] is first.reparam_fwd  # the cached answer
    assert backends.select("reparam_fwd", cpu, torch.float64)[1] is second.reparam_fwd  # another key
    with backends.force("reference"):
        assert backends.select("reparam_fwd", cpu, torch.float32)[0] == "reference"
    backends.forget()
    assert backends.select("reparam_fwd", cpu, torch.float32)[1] is second.reparam_fwd
    assert backends.extra("reparam_fwd", cpu, torch.float32, "fused_step_group") is None


def test_unavailable_flag_and_missing_function_through_the_real_loader(monkeypatch):
    """A compiled backend module that imports but sets UNAVAILABLE, or lacks an implementation."""
    backends.forget()
    try:
        monkeypatch.setitem(sys.modules, "sparse_engine.ops._cpp",
                            types.SimpleNamespace(UNAVAILABLE="the .so was built for another torch"))
        assert backends.reason("cpp", "reparam_fwd", "cpu") == "the .so was built for another torch"
        backends.forget()
        monkeypatch.setitem(sys.modules, "sparse_engine.ops._cpp", types.SimpleNamespace(UNAVAILABLE=None))
        assert backends.reason("cpp", "reparam_fwd", "cpu") == "sparse_engine.ops._cpp has no reparam_fwd"
        with backends.force("cpp"), \
                pytest.raises(RuntimeError, match="sparse_engine.ops._cpp has no reparam_fwd"):
            ops.reparam(randn(2, 3), randn(2, 3))
    finally:
        backends.forget()


def test_real_module_resolution_reports_missing_modules():
    """Against the real import machinery: a kernel module that does not exist names itself."""
    backends.forget()
    try:
        # compact_linear has no Triton kernel by design (the CSR path is C++/CUDA), so its module is missing.
        mod, why = backends._module("triton", "compact_linear_fwd")
        assert mod is None
        assert "sparse_engine.kernels.compact_linear" in why or "triton is not installed" in why
    finally:
        backends.forget()


def test_nothing_is_imported_until_an_op_runs():
    code = ("import sys, sparse_engine, sparse_engine.ops, sparse_engine.ops.backends, sparse_engine.param\n"
            "print(sorted(m for m in sys.modules if m.startswith('sparse_engine.kernels.') or m in "
            "('sparse_engine.ops._cpp', 'sparse_engine.ops._cuda', 'triton')))\n")
    out = _run_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --------------------------------------------------------------------------------------------- info


def test_info_runs_and_prints_versions_env_and_table():
    out = _run_python("import sys; from sparse_engine.app.info import main; sys.exit(main([]))")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ("versions", f"torch             {torch.__version__}", "triton", "python", "CUDA available",
                   "environment variables", "backends (", "implementation", "notes"):
        assert needle in text, f"{needle!r} missing from info output:\n{text}"
    for name in env.VARIABLES:
        assert name in text
    table = text[text.index("implementation"):]
    for impl in backends.REFERENCE:
        assert f"\n  {impl} " in table
    header = table.splitlines()[0]
    for backend in backends.BACKENDS:
        assert backend in header
    assert "auto(cpu, float32)" in header


def test_info_module_entry_point_and_json():
    environ = {k: v for k, v in os.environ.items() if k != "SPARSE_ENGINE_BACKEND"}
    out = subprocess.run([sys.executable, "-m", "sparse_engine.app.info", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=environ)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["versions"]["torch"] == torch.__version__
    assert set(data["environment"]) == set(env.VARIABLES)
    assert set(data["implementations"]) == set(backends.REFERENCE)
    for row in data["implementations"].values():
        assert row["reference"]["available"] is True
        for backend in backends.BACKENDS:
            cell = row[backend]
            assert cell["available"] or cell["reason"], "an unavailable backend must say why"
        assert row["auto"]["cpu"] in backends.BACKENDS


def test_info_reports_an_invalid_env_value_instead_of_crashing(monkeypatch):
    from sparse_engine.app import info

    monkeypatch.setenv("SPARSE_ENGINE_BACKEND", "bogus")
    data = info.collect()
    assert data["backend_request"].startswith("invalid: SPARSE_ENGINE_BACKEND must be one of")
    assert "SPARSE_ENGINE_BACKEND    'bogus'" in info.format_text(data)


# ------------------------------------------------------------------------- every op has an opcheck


#: registered op -> the test file whose test_opcheck covers it (a new op must be added here and tested)
OPCHECKED = {
    "reparam": "test_reparam.py", "reparam_backward": "test_reparam.py",
    "masked_linear": "test_masked_linear.py", "masked_linear_backward": "test_masked_linear.py",
    "block_sparse_linear": "test_block_sparse_linear.py",
    "block_sparse_linear_backward": "test_block_sparse_linear.py",
    "compact_linear": "test_compact_linear.py", "compact_linear_backward": "test_compact_linear.py",
    "sparse_conv2d": "test_sparse_conv.py", "sparse_conv2d_backward": "test_sparse_conv.py",
    "fused_step": "test_fused_step.py", "signin_reset": "test_signin_reset.py",
    "prune_threshold": "test_prune.py",
}


def test_every_registered_op_has_an_opcheck_test():
    import sparse_engine  # noqa: F401  (registration happens on import of ops)

    registered = set()
    for name in dir(torch.ops.sparse_engine):
        if not name.startswith("_") and isinstance(getattr(torch.ops.sparse_engine, name, None),
                                                   torch._ops.OpOverloadPacket):
            registered.add(name)
    differ = sorted(registered ^ set(OPCHECKED))
    assert not differ, f"registered ops and the opcheck table differ: {differ}"
    here = Path(__file__).resolve().parent
    for op, file in OPCHECKED.items():
        text = (here / file).read_text()
        assert f"torch.ops.sparse_engine.{op}.default" in text, f"{file} has no opcheck of {op}"
