"""Installed outside `make`: a fresh virtual environment, `pip install .`, the CLI.

Runs on Python 3.12 when this machine has it (CI does): the suite itself runs on 3.11, so this is
where 3.12 support is checked. The base install has no torch: the read commands must work
without it and the demo must say what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _python312() -> str | None:
    for candidate in [*sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")), shutil.which("python3.12")]:
        if candidate and subprocess.run([str(candidate), "--version"], capture_output=True, check=False).returncode == 0:
            return str(candidate)
    return None


PY312 = _python312()


def _source(tmp: Path) -> Path:
    """The files a source distribution holds (a clean copy: no caches, no state, no node_modules)."""
    src = tmp / "src"
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    for folder in ("worker", "shared", "functions", "training"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "outputs", "mlruns"))
    return src


@pytest.mark.skipif(PY312 is None, reason="no python3.12 on this machine")
def test_pip_install_gives_a_working_cli_on_python_3_12_without_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([str(PY312), "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(_source(tmp_path))], capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    retrain = str(venv / "bin" / "retrain")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RETRAIN", "PYTHONPATH", "VIRTUAL_ENV"))}
    empty = tmp_path / "empty"
    empty.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([retrain, *args], cwd=empty, env=env, capture_output=True, text=True, timeout=120)

    assert run("--version").stdout.strip() == "retrain 0.2.0"
    assert "serve" in run("--help").stdout
    assert "--per-class" in run("demo", "--help").stdout
    status = run("status")
    assert status.returncode == 1
    assert status.stderr.startswith("error: no ledger at")
    demo = run("demo")
    assert demo.returncode == 2
    assert "pip install 'retrain[train]'" in demo.stderr
    assert list(empty.iterdir()) == []
    # The training snapshot comes with the wheel: an installed worker finds it without any setting.
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "from worker.training_code import training_dir; print(training_dir())"],
                           cwd=empty, env=env, capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    snapshot = Path(where.stdout.strip())
    assert snapshot.is_relative_to(venv)
    assert (snapshot / "train.py").is_file()
    assert (snapshot / "requirements.txt").is_file()
    imports = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys, worker.bus, worker.views, worker.app.cli; print('torch' in sys.modules)"],
                             cwd=empty, env=env, capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert imports.stdout.strip() == "False"
