"""Processes the tests start, and making sure none of them outlives its test or the suite.

Every process a test launches carries markers in its environment, inherited by everything below
it (torchrun's ranks, their fork servers and DataLoader workers, horovodrun's tasks): the suite's
(`SUITE_MARKER`, set once per pytest session) and, through `run_supervised`, one per launch. A
marker finds a process even after its parent died and it was re-parented to init, where walking
the tree from the launcher would miss it. Processes are only ever stopped by the pids found this
way, never by name.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence

import psutil

from worker.adapters.local.process_tree import kill_tree

SUITE_MARKER = "RETRAIN_TEST_SUITE"
LAUNCH_MARKER = "RETRAIN_TEST_LAUNCH"


def own_multiprocessing_helpers() -> set[int]:
    """The fork server and resource tracker this process started (in-process DataLoader tests):
    they end with this process, by design, when the pipe it holds to them closes."""
    from multiprocessing import forkserver, resource_tracker

    pids = {
        getattr(forkserver._forkserver, "_forkserver_pid", None),
        getattr(resource_tracker._resource_tracker, "_pid", None),
    }
    return {pid for pid in pids if pid is not None}


def marked(name: str, value: str) -> list[psutil.Process]:
    """Live processes (not this one or its multiprocessing helpers, not zombies) whose environment has `name=value`."""
    found = []
    mine = {os.getpid(), *own_multiprocessing_helpers()}
    for process in psutil.process_iter():
        if process.pid in mine:
            continue
        with contextlib.suppress(psutil.Error):
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get(name) == value:
                found.append(process)
    return found


def kill_marked(name: str, value: str) -> list[str]:
    """Stop every process marked `name=value` (repeating until a pass finds no new one), then
    SIGKILL them all; returns their command lines."""
    frozen: dict[int, psutil.Process] = {}
    while True:
        fresh = [p for p in marked(name, value) if p.pid not in frozen]
        if not fresh:
            break
        for process in fresh:
            with contextlib.suppress(psutil.Error):
                process.suspend()
                frozen[process.pid] = process
    lines = []
    for process in frozen.values():
        with contextlib.suppress(psutil.Error):
            lines.append(f"{process.pid} {' '.join(process.cmdline())[:200]}")
            process.kill()
    return lines


def wait_unmarked(name: str, value: str, timeout: float) -> list[psutil.Process]:
    """Wait up to `timeout` s for every process marked `name=value` to end; returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = marked(name, value)
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def run_supervised(
    cmd: Sequence[str],
    *,
    timeout: float,
    env: Mapping[str, str],
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(cmd, capture_output=True, text=True)` for launchers: the command runs in a
    session of its own, and on a timeout (or any interruption, pytest-timeout's included) the
    whole tree it started is killed before the exception propagates, orphans included."""
    launch = uuid.uuid4().hex
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, LAUNCH_MARKER: launch},
        cwd=cwd,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        kill_tree(proc.pid)
        kill_marked(LAUNCH_MARKER, launch)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)
        raise
    left = wait_unmarked(LAUNCH_MARKER, launch, timeout=10)
    if left:
        killed = kill_marked(LAUNCH_MARKER, launch)
        raise AssertionError(f"{cmd[0]} exited ({proc.returncode}) but left processes running (now killed): {killed}")
    return subprocess.CompletedProcess(list(cmd), proc.returncode, stdout, stderr)
