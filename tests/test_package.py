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


# ------------------------------------------------------------------------------------- the layout


PACKAGE = ROOT / "sparse_engine"


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_the_top_level_holds_at_most_eight_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, f"sparse_engine/*.py: {top} (library wings go in ops/, nn/, optim/, methods/, export/)"


def test_the_training_loop_modules_stay_small():
    """The training application (what was one 1,000-line train.py) stays in modules under 450 lines."""
    long = [f"{p.name} ({n} lines)" for p in sorted((ROOT / "sparse_engine" / "app").glob("*.py"))
            if p.name in ("config.py", "loop.py", "checkpoint.py", "compare.py", "progress.py")
            and (n := len(p.read_text().splitlines())) >= 450]
    assert not long, long


def test_no_function_over_120_lines():
    import ast

    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 120:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_only_ops_chooses_a_backend():
    """backends.select is called in sparse_engine/ops/ only; elsewhere the library asks ops which backend
    runs (backends.which / automatic / availability)."""
    callers = [str(p.relative_to(ROOT)) for p in _sources()
               if p.parent.name != "ops" and "backends.select(" in p.read_text()]
    assert not callers, callers


def test_the_library_imports_nothing_from_the_application():
    import re

    wings = [p for p in _sources() if "app" not in p.relative_to(PACKAGE).parts]
    bad = [str(p.relative_to(ROOT)) for p in wings
           if re.search(r"^\s*from (\.\.?app|sparse_engine\.app)\b|^\s*import sparse_engine\.app", p.read_text(), re.M)]
    assert not bad, bad
