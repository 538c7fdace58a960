"""Shared fixtures: synthetic image sets and helpers that run the training snapshot for real."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.azurite import Azurite
from tests.processes import SUITE_MARKER, kill_marked, run_supervised, wait_unmarked
from worker.adapters.local.process_tree import kill_tree

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ROOT / "training"


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite() -> Iterator[None]:
    """Every process the tests start inherits a marker for this session; whatever still carries it
    once every other fixture is torn down was left behind by a test: it is killed (by pid) and the
    suite fails, naming it."""
    os.environ[SUITE_MARKER] = uuid.uuid4().hex
    yield
    if wait_unmarked(SUITE_MARKER, os.environ[SUITE_MARKER], timeout=15):
        left = kill_marked(SUITE_MARKER, os.environ[SUITE_MARKER])
        pytest.fail(f"{len(left)} process(es) outlived the test suite (now killed):\n" + "\n".join(left), pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks_on_a_free_port(launch, attempts: int = 3) -> tuple[list[int], list[str]]:
    """Start the processes `launch(port)` returns on a probed free port and wait for them; if
    another process took the port between the probe and the bind, start them again on a new one.
    Returns (exit codes, outputs). The processes must pipe stdout (stderr merged) as text; on a
    timeout every one of them is killed with all it started."""
    for _ in range(attempts):
        procs = launch(free_port())
        try:
            outputs = [p.communicate(timeout=300)[0] for p in procs]
        except BaseException:
            for p in procs:
                kill_tree(p.pid)
            raise
        if not any("address already in use" in out.lower() for out in outputs):
            break
    return [p.returncode for p in procs], outputs


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "default"})
    env.update(extra)
    return env


def run_train(args: list[str], *, nproc: int = 1, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """train.py as a real process: plain python for nproc=1, torchrun --standalone otherwise; on a
    timeout the launcher, its ranks and their loader workers are all killed (`run_supervised`)."""
    if nproc == 1:
        cmd = [sys.executable, str(TRAINING / "train.py"), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(TRAINING / "train.py"),
            *args,
        ]
    return run_supervised(cmd, timeout=timeout, env=env or child_env())


def read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


@pytest.fixture(scope="session")
def tiny_birds(tmp_path_factory) -> Path:
    """Flat <class>/<image> set: 20 images per class and 2 corrupt files."""
    from synthetic_birds import generate

    root = tmp_path_factory.mktemp("tiny-birds")
    generate(root, 20, layout="flat", corrupt=2, seed=1)
    return root


@pytest.fixture(scope="session")
def split_birds(tmp_path_factory) -> Path:
    """Reference layout train/<class>/ and val/<class>/, 16 per class, no corrupt files."""
    from synthetic_birds import generate

    root = tmp_path_factory.mktemp("split-birds")
    generate(root, 16, layout="split", val_fraction=0.25, seed=2)
    return root


@pytest.fixture(scope="session")
def azurite(tmp_path_factory) -> Iterator[Azurite]:
    """One real Azurite per test session, started on first use and stopped by its PID at the end;
    its data and output stay in pytest's tmp dir (the Azure adapters are tested against it, not mocks)."""
    with Azurite(tmp_path_factory.mktemp("azurite")) as emulator:
        yield emulator
