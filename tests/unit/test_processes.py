"""The suite's own process hygiene (tests/processes.py): a launch that leaves a process behind is
caught, even one whose parent already exited, and what was left is killed by pid."""

from __future__ import annotations

import os

import pytest

from tests.processes import run_supervised
from worker.adapters.local.process_tree import wait_gone

pytestmark = pytest.mark.unit


def test_a_launch_that_leaves_an_orphan_behind_fails_and_the_orphan_is_killed(tmp_path):
    # The shell exits at once; its background sleep is re-parented to init, out of any tree walk:
    # only the environment marker finds it.
    pid_file = tmp_path / "orphan.pid"
    script = f"sleep 300 >/dev/null 2>&1 </dev/null & echo $! > {pid_file}"
    with pytest.raises(AssertionError, match="left processes running"):
        run_supervised(["sh", "-c", script], timeout=60, env=dict(os.environ))
    assert wait_gone([int(pid_file.read_text())], timeout=10) == []


def test_a_clean_launch_returns_its_output():
    done = run_supervised(["sh", "-c", "echo hello"], timeout=60, env=dict(os.environ))
    assert (done.returncode, done.stdout) == (0, "hello\n")
