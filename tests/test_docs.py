"""The documents: README's API example runs and reports per epoch; the committed files hold no machine
paths, and the documents (README, docs/, bench/ with its results, scripts/, .ci/) speak of the project
only, without pointing at files that are not in it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_data import fake_fashion_dir

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/", "bench/", "scripts/", ".ci/")
# Built from pieces so that this file does not match itself.
MACHINE_PATH = re.compile("(?<![\\w.~-])/(" + "|".join(["wo" + "rk", "t" + "mp", "ro" + "ot", "ho" + "me"]) + ")/")
NOT_OF_THE_PROJECT = re.compile(
    r"DESIGN\.md|METHODS\.md|BUILD-NOTES|\bthe lead\b|\blead's\b|\bthe issue\b|\bissue's\b|\bsessions?\b"
    r"|\bhelper's\b", re.IGNORECASE)


def tracked_text_files() -> dict[str, str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout, cannot list the committed files ({e})")
    files = {}
    for name in out.decode().split("\0"):
        path = ROOT / name
        if not name or path.is_symlink() or not path.is_file():
            continue
        try:
            files[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images and other binary files
            continue
    return files


def test_no_machine_paths_in_committed_files():
    hits = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for name, text in tracked_text_files().items() for m in MACHINE_PATH.finditer(text)]
    assert not hits, hits[:20]


def test_documents_speak_of_the_project_only():
    hits = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for name, text in tracked_text_files().items() if name.startswith(DOCUMENTS)
            for m in NOT_OF_THE_PROJECT.finditer(text)]
    assert not hits, hits[:20]


OUTSIDE_FILES = re.compile(r"DESIGN\.md|METHODS\.md|BUILD-NOTES")
SOURCES = (".py", ".sh", ".cpp", ".cu", ".h", ".toml")


def test_code_cites_no_file_outside_the_repository():
    """Comments and docstrings say the thing itself (or cite README, docs/, RESULTS), never notes that
    are not in the repository."""
    this = Path(__file__).relative_to(ROOT).as_posix()
    hits = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for name, text in tracked_text_files().items() if name.endswith(SOURCES) and name != this
            for m in OUTSIDE_FILES.finditer(text)]
    assert not hits, hits[:20]


def readme_api_example() -> str:
    return re.search(r"## Python API\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)


def test_readme_api_example_runs_and_prints_accuracy_per_epoch(tmp_path):
    code = readme_api_example()
    assert "torch.set_num_threads(" in code  # it says how many threads to use
    fake = fake_fashion_dir(tmp_path / "fashion", n_train=300, n_test=50)
    r = subprocess.run(check=False, args=[sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "SPARSE_ENGINE_DATA": str(fake)})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    pattern = r"epoch {}: train \d+\.\d\d %, test \d+\.\d\d %"
    assert len(lines) == 6 and all(re.fullmatch(pattern.format(k + 1), ln) for k, ln in enumerate(lines[:5])), lines
    assert re.fullmatch(r"final: test \d+\.\d\d %", lines[5]), lines
