"""README's two commands and CI: scripts/setup.sh, main.sh, test.sh and .ci/run.

The scripts run here for real, in a throwaway copy of their folder, against stand-ins for what they
drive (pip, apt-get, id, the venv's console script and a tiny `sparse_engine`), so each decision they
make can be checked in seconds. The whole path on a fresh machine is what CI runs (`.ci/run`).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what setup.sh checks for
EXTRAS = ("pytest", "ninja", "pybind11", "transformers", "accelerate", "safetensors", "matplotlib")


def _script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.fixture
def project(tmp_path):
    """A copy of scripts/ beside stand-ins: a venv whose python is this one and whose pip only records
    what it is asked (an editable install links the tiny package into a folder on the stand-in python's
    path and writes the console script), an `id` and an `apt-get` that record and pretend."""
    import importlib.util

    missing = [m for m in EXTRAS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"setup.sh checks for {missing}, which this Python lacks (pip install -e '.[test,hf,plot]')")
    proj, site, data, log = tmp_path / "proj", tmp_path / "site", tmp_path / "fashion", tmp_path / "log"
    shutil.copytree(ROOT / "scripts", proj / "scripts")
    for name in ("pyproject.toml", "setup.py"):
        shutil.copy(ROOT / name, proj / name)
    (proj / "csrc").mkdir()
    (proj / "csrc" / "ops.cpp").write_text("// ops\n")
    pkg = proj / "sparse_engine"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_C.py").write_text("")
    (pkg / "kernels" / "k.py").write_text("")
    (pkg / "app").mkdir()
    (pkg / "app" / "__init__.py").write_text("")
    (pkg / "app" / "data.py").write_text(
        "import os\n\nclass DataError(Exception):\n    pass\n\n"
        "def find_fashion_mnist(data_dir=None, *, download=True):\n"
        f"    if not os.path.isdir({str(data)!r}):\n        raise DataError('not found')\n"
    )
    venv = proj / ".venv" / "bin"
    _script(venv / "python", f'PYTHONPATH="{site}" exec "{sys.executable}" "$@"\n')
    _script(venv / "pip", f"""echo "pip $*" >> "{log}"
case " $* " in *" -e "*)
  mkdir -p "{site}" && ln -sfn "{pkg}" "{site}/sparse_engine"
  printf '#!/bin/sh\\necho "sparse-engine $*"\\n' > "{venv}/sparse-engine" && chmod +x "{venv}/sparse-engine";;
esac
""")
    stubs = tmp_path / "bin"
    _script(stubs / "id", 'cat "$(dirname "$0")/uid"\n')
    (stubs / "uid").write_text("0\n")
    _script(stubs / "apt-get", f'echo "apt-get $*" >> "{log}"\ncase "$*" in *install*) mkdir -p "{data}";; esac\n')
    log.touch()
    return {"proj": proj, "log": log, "stubs": stubs, "data": data, "venv": venv}


def run_main(p, *args: str):
    """main.sh with no environment but PATH and HOME, as README's user runs it."""
    env = {"PATH": f"{p['stubs']}:/usr/local/bin:/usr/bin:/bin", "HOME": str(p["proj"].parent)}
    r = subprocess.run(check=False, args=["bash", "scripts/main.sh", *args], cwd=p["proj"], env=env,
                       capture_output=True, text=True, timeout=120)
    calls = p["log"].read_text().splitlines()
    p["log"].write_text("")
    return r, calls


def test_main_installs_the_package_and_the_data_then_trains(project):
    # from the repository root the checkout itself is importable: that must not pass for an install
    r, calls = run_main(project, "--epochs", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert any(c.startswith("pip install") and "-e .[test,hf,plot]" in c for c in calls), calls
    assert any(c.startswith("apt-get install") and "dataset-fashion-mnist" in c for c in calls), calls
    assert "sparse-engine train --compare dense,static,signin,pilot --density 0.1 --layout auto --epochs 1" \
        in r.stdout
    assert (project["proj"] / ".venv" / "sparse_engine-install.sha256").exists()

    # the second time: nothing to do
    r, calls = run_main(project)
    assert r.returncode == 0 and calls == [], (calls, r.stdout + r.stderr)
    assert "sparse-engine train" in r.stdout

    # what the install compiles changed, or its console script went: install again
    (project["proj"] / "csrc" / "ops.cpp").write_text("// ops, changed\n")
    r, calls = run_main(project)
    assert r.returncode == 0 and [c for c in calls if " -e " in c], (calls, r.stdout)
    assert "csrc/ changed" in r.stdout
    (project["venv"] / "sparse-engine").unlink()
    r, calls = run_main(project)
    assert r.returncode == 0 and [c for c in calls if " -e " in c], (calls, r.stdout)


def test_main_without_root_says_how_to_install_the_data(project):
    (project["stubs"] / "uid").write_text("1000\n")
    r, calls = run_main(project)
    assert r.returncode == 0, r.stderr
    assert not [c for c in calls if c.startswith("apt-get")]
    lines = [ln for ln in r.stdout.splitlines() if "Fashion-MNIST" in ln]
    assert len(lines) == 1 and "apt-get install dataset-fashion-mnist" in lines[0], r.stdout
    # where the arguments say where the data is, main.sh does not look for it
    r, calls = run_main(project, "--data-dir", "somewhere")
    assert "Fashion-MNIST" not in r.stdout and not [c for c in calls if c.startswith("apt-get")]


def test_setup_reports_a_failed_install(project):
    # pip "succeeds" but leaves no console script: setup.sh must say so and fail, not go on
    _script(project["venv"] / "pip", f'echo "pip $*" >> "{project["log"]}"\n')
    r, _ = run_main(project)
    assert r.returncode == 1
    assert "no console script" in r.stdout and "did not give a working sparse_engine" in r.stderr


def test_test_sh_runs_the_aot_stage_after_a_failure(tmp_path):
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    _script(tmp_path / "scripts" / "setup.sh", "exit 0\n")
    log = tmp_path / "log"
    # the first stage fails (exit 1), the AOT stage passes
    _script(tmp_path / ".venv" / "bin" / "python",
            f'echo "TRITON_INTERPRET=${{TRITON_INTERPRET:-}} $*" >> "{log}"\n'
            'case "$*" in *"not aot"*) exit 1;; esac\n')
    r = subprocess.run(check=False, args=["bash", "scripts/test.sh"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    runs = log.read_text().splitlines()
    assert len(runs) == 2 and "-m not aot" in runs[0], runs
    assert runs[1].startswith("TRITON_INTERPRET=0 ") and runs[1].endswith("-m aot"), runs
    assert r.returncode == 1


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    return [ln.split("#")[0].strip() for ln in block.splitlines() if ln.strip()]


def test_ci_runs_exactly_the_readme_commands():
    readme = _readme_commands()
    assert readme == ["bash scripts/main.sh", "bash scripts/test.sh"], readme
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [ln for ln in ci if ln and not ln.startswith("#") and not ln.startswith("set ")
                and ln not in ('cd "$(dirname "$0")/.."', "status=0", "exit $status")]
    assert [c.removesuffix(" || status=1") for c in commands] == readme, commands


@pytest.mark.parametrize("main_rc, test_rc", [(0, 0), (1, 0), (0, 1)])
def test_ci_fails_when_either_command_fails(tmp_path, main_rc, test_rc):
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    log = tmp_path / "log"
    _script(tmp_path / "scripts" / "main.sh", f'echo main >> "{log}"\nexit {main_rc}\n')
    _script(tmp_path / "scripts" / "test.sh", f'echo test >> "{log}"\nexit {test_rc}\n')
    r = subprocess.run(check=False, args=["bash", ".ci/run"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert log.read_text().split() == ["main", "test"]
    assert (r.returncode != 0) == bool(main_rc or test_rc)
