"""The package surface: lazy subpackages and re-exported names (PEP 562), and the wings' import rules."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("ops", "nn", "optim", "methods", "export")


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_loads_no_subpackage_and_attributes_load_them():
    code = ("import sys, sparse_engine as se\n"
            f"subs = {SUBPACKAGES!r}\n"
            "print(sorted(m for m in sys.modules if m.startswith('sparse_engine.')))\n"
            "mods = [getattr(se, s) for s in subs]\n"
            "print(all(m is sys.modules['sparse_engine.' + s] for m, s in zip(mods, subs)))\n"
            "print(se.export.extract is se.extract, se.save is se.export.save, se.load is se.export.load)\n"
            "print(sorted(set(subs) - set(dir(se))))\n")
    lines = _run(code).splitlines()
    assert lines == ["[]", "True", "True True True", "[]"]


def test_every_public_name_resolves():
    import sparse_engine as se

    for name in se.__all__:
        assert getattr(se, name) is not None, name


def test_export_imports_nothing_from_the_application():
    code = ("import sys, sparse_engine.export as E\n"
            "print(sorted(m for m in sys.modules if m.startswith('sparse_engine.app')))\n")
    assert _run(code) == "[]"
