"""``sparse-engine bench``: run the benchmark suite of ``bench/`` and plot it.

    sparse-engine bench --quick        # a few minutes: trimmed grids
    sparse-engine bench                # the full grids
    sparse-engine bench --smoke        # seconds: CI smoke test (numbers meaningless)

Results go to runs/bench/ in the checkout (a scratch folder); ``--out bench/results`` replaces the
committed ones.

The suite lives in the source tree (``bench/run_suite.py`` and the ``bench_<op>.py`` scripts next to it),
not in the installed package: benchmarks are run from a checkout. ``--bench-dir`` (or running from the
repository root) says where it is. Every option after ``bench`` goes to ``bench/run_suite.py``
(``sparse-engine bench --help`` lists them).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


def _find_bench_dir(argv: list[str]) -> tuple[Path | None, list[str]]:
    rest, given = [], None
    it = iter(argv)
    for a in it:
        if a == "--bench-dir":
            given = next(it, None)
            if given is None:
                from .cli import UserError

                raise UserError("--bench-dir needs a directory")
        elif a.startswith("--bench-dir="):
            given = a.split("=", 1)[1]
        else:
            rest.append(a)
    if given is not None:
        d = Path(given).expanduser()
        if not (d / "run_suite.py").is_file():
            from .cli import UserError

            raise UserError(f"--bench-dir {given!r} holds no run_suite.py")
        return d, rest
    candidates = [Path(__file__).resolve().parent.parent / "bench", Path.cwd() / "bench"]
    for d in candidates:
        if (d / "run_suite.py").is_file():
            return d, rest
    return None, rest


def main(argv: list[str]) -> int:
    bench_dir, rest = _find_bench_dir(list(argv))
    if bench_dir is None:
        from .cli import UserError

        raise UserError("the benchmark suite (bench/run_suite.py) is not installed with the package; run "
                        "`sparse-engine bench` from a source checkout or pass --bench-dir <checkout>/bench")
    spec = importlib.util.spec_from_file_location("sparse_engine_bench_suite", bench_dir / "run_suite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    sys.path.insert(0, os.fspath(bench_dir))  # run_suite imports its sibling plot.py
    try:
        spec.loader.exec_module(module)
        return int(module.main(rest) or 0)
    finally:
        if sys.path and sys.path[0] == os.fspath(bench_dir):
            sys.path.pop(0)


__all__ = ["main"]

if __name__ == "__main__":  # python -m sparse_engine.bench_cli (before the CLI table names this module)
    sys.exit(main(sys.argv[1:]))
