"""The detached wrapper around one local training process: `python -m worker.adapters.local.torchrun_runner <run_dir>`.

`LocalTorchrunBackend` starts this in a new session, so the run outlives the worker that started
it (a worker restart, a Ctrl-C in the worker's terminal). The runner exists so that the outcome of
a run is on disk even when nobody was watching: it records who it is (`runner.json`: pid, the
kernel's start time for that pid, process group), starts the training command as its child, and
when the child ends writes `exit_code` atomically. A worker that comes back later reads those
files instead of needing to be the training process's parent.

Signals: SIGTERM/SIGINT sent to the runner are forwarded to the training command's process
group. The child gets its own process group (same session) so that the backend's
`killpg(runner pgid)` reaches the runner only and the training receives exactly one signal, from
the runner; torchrun shuts its ranks down on that signal, and a second one while it is doing so
can cut its cleanup short. If anything is still alive `stop_grace_s` (spec.json, default
`KILL_GRACE_S`) after the first signal, the whole tree is killed.

No process outlives its run: the runner is a child subreaper (Linux), so ranks orphaned by a
torchrun that died (torchrun starts each rank in a session of its own) re-parent to the runner
rather than to init; when the training command ends, for whatever reason, every process still
below the runner (a rank that ignored SIGTERM, a DataLoader worker, a fork server) is killed
before `exit_code` is written. See process_tree.py.

This module also holds the on-disk layout and the few helpers both sides need; it imports only
the standard library and psutil, so starting it is quick. POSIX only (sessions, process groups):
the local torchrun backend runs on Linux and macOS; on Windows use the Azure ML backend.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from shared.files import atomic_write_text
from worker.adapters.local.process_tree import become_subreaper, kill_descendants, reap_orphans

MANIFEST_FILE = "manifest.json"
SPEC_FILE = "spec.json"
LOG_FILE = "train.log"
OUTPUTS_DIR = "outputs"
RUNNER_FILE = "runner.json"
EXIT_CODE_FILE = "exit_code"
CANCEL_FILE = "cancel_requested"

EXIT_CANNOT_START = 127  # the shell's "command not found"
KILL_GRACE_S = 45.0  # more than torchrun's own 30 s between SIGTERM and SIGKILL for its ranks


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(status, start time in milliseconds since the epoch) of a process, or None if there is none.

    The start time tells a process apart from a later one that reuses its pid. psutil reads it
    from /proc on Linux and from the kernel elsewhere (macOS, Windows).
    """
    try:
        process = psutil.Process(pid)
        return process.status(), round(process.create_time() * 1000)
    except (psutil.Error, ValueError, OSError):
        return None


def is_same_process_alive(pid: int, start_time: int) -> bool:
    """True if `pid` is running and is the process that started at `start_time` (not a zombie, not a reused pid)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) and stat[1] == start_time


class Runner:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.child: subprocess.Popen[bytes] | None = None
        self.stop_signal: int | None = None
        self.first_signal_at: float | None = None
        self.stop_grace_s = KILL_GRACE_S

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_signal = signum
        if self.first_signal_at is None:
            self.first_signal_at = time.monotonic()
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        # An unreaped child keeps its pid (and so its process group id), so this cannot hit a stranger.
        if self.child is not None and self.child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signum)

    def _record_self(self) -> None:
        pid = os.getpid()
        stat = proc_stat(pid)
        record: dict[str, Any] = {"pid": pid, "start_time": stat[1] if stat else None, "pgid": os.getpgid(0)}
        atomic_write_text(self.run_dir / RUNNER_FILE, json.dumps(record, sort_keys=True) + "\n")

    def _finish(self, code: int) -> int:
        log(f"training exited with code {code}")
        left = kill_descendants()
        if left:
            log(f"killed {len(left)} process(es) the training left behind: {left}")
        reap_orphans()
        atomic_write_text(self.run_dir / EXIT_CODE_FILE, f"{code}\n")
        return 0

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if not become_subreaper():
            log("cannot become a child subreaper here: ranks orphaned by a dead launcher are not tracked")
        spec = json.loads((self.run_dir / SPEC_FILE).read_text(encoding="utf-8"))
        command = spec["command"]
        grace = spec.get("stop_grace_s")
        if isinstance(grace, (int, float)) and not isinstance(grace, bool) and 0 <= grace < float("inf"):
            self.stop_grace_s = float(grace)
        # runner.json before the cancel check: a concurrent cancel() writes its marker before it
        # reads runner.json, so either it signals us or we see the marker here.
        self._record_self()
        if self.stop_signal is not None or (self.run_dir / CANCEL_FILE).exists():
            log("canceled before the training started")
            return self._finish(-signal.SIGTERM)
        log(f"starting: {' '.join(command)}")
        try:
            # stdout/stderr are inherited: the backend opened them on train.log for us.
            self.child = subprocess.Popen(command, cwd=self.run_dir, stdin=subprocess.DEVNULL, process_group=0)
        except OSError as exc:
            log(f"cannot start the training command: {exc}")
            return self._finish(EXIT_CANNOT_START)
        if self.stop_signal is not None:  # arrived while the child was being created
            self._forward(self.stop_signal)
        killed = False
        while True:
            try:
                code = self.child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if not killed and self.first_signal_at is not None and time.monotonic() - self.first_signal_at > self.stop_grace_s:
                    log(f"training still running {self.stop_grace_s:g} s after the stop signal; killing it and every process below it")
                    kill_descendants()
                    killed = True
        return self._finish(code)


def log(message: str) -> None:
    print(f"[local_runner {os.getpid()}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m worker.adapters.local.torchrun_runner <run_dir>", file=sys.stderr)
        return 2
    return Runner(Path(args[0]).resolve()).run()


if __name__ == "__main__":
    sys.exit(main())
