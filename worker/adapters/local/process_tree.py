"""Ending a whole process tree, including the parts that left their parent's process group.

A training launch is a tree: torchrun (or horovodrun) -> one process per rank -> the ranks' fork
servers and DataLoader workers. torchrun starts every rank in a session of its own, so signalling
torchrun's process group misses the ranks, and killing torchrun orphans them (they are re-parented
to init and keep their cores and GPUs). Two tools close that gap:

- `kill_tree` first stops (SIGSTOP) the root and then, level by level, every descendant, until a
  pass finds no new one: a stopped process can neither fork nor exit on its own, so no child
  escapes to init while the tree is being listed. Then everything gets SIGKILL.
- `become_subreaper` (Linux) makes orphans below this process re-parent to it instead of init, so
  a supervisor still finds the ranks after torchrun itself died (`kill_descendants`).

Standard library and psutil only: the local runner imports this at start.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import time

import psutil

_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux 3.4+); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _freeze(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        if _alive(process):
            process.suspend()
            return True
    return False


def _frozen_tree(roots: list[psutil.Process]) -> list[psutil.Process]:
    """Stop `roots` and all their descendants, parents before children, and return them all."""
    frozen: dict[int, psutil.Process] = {}
    frontier = [p for p in roots if _freeze(p)]
    while frontier:
        for process in frontier:
            frozen[process.pid] = process
        found = []
        for process in frontier:
            with contextlib.suppress(psutil.Error):
                found += [c for c in process.children() if c.pid not in frozen]
        frontier = [c for c in found if _freeze(c)]
    return list(frozen.values())


def _kill(processes: list[psutil.Process]) -> list[int]:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()  # SIGKILL ends a stopped process too
    return sorted(p.pid for p in processes)


def kill_tree(pid: int, *, include_root: bool = True) -> list[int]:
    """SIGKILL `pid` (unless `include_root` is False) and every process below it; returns the pids signalled.

    Nothing is reaped here: the caller waits for its own child (e.g. `Popen.wait`, which needs the
    exit status) and then, as a subreaper, for the orphans (`reap_orphans`).
    """
    try:
        root = psutil.Process(pid)
        roots = [root] if include_root else root.children()
    except psutil.Error:
        return []
    return _kill(_frozen_tree(roots))


def kill_descendants() -> list[int]:
    """SIGKILL every descendant of this process (with `become_subreaper`, orphans included).

    Repeated until a pass finds none: a child that exited on its own between the listing and its
    stop leaves its children to us, to be found by the next pass.
    """
    killed: list[int] = []
    for _ in range(10):
        batch = kill_tree(os.getpid(), include_root=False)
        if not batch:
            break
        killed += batch
    return killed


def reap_orphans() -> None:
    """Collect the exit status of every child that has ended (orphans re-parented to a subreaper
    become its children). Call only after `Popen.wait` of the children whose status matters."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of `pids` is a live process (zombies count as gone); returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if _pid_alive(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        return _alive(psutil.Process(pid))
    except psutil.Error:
        return False
