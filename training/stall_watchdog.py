"""A progress watchdog: a training process that stops making progress ends itself, naming where it stalled.

A rank stuck in a collective whose peer died, in a DataLoader whose worker hung, or on a file
system that stopped answering would otherwise hold its GPUs until someone notices. train.py
reports progress at every step and evaluation batch (`beat`) and names the phase it enters
(`phase`); when nothing was reported for `timeout_s`, the watchdog prints one line saying which
phase stalled and for how long, dumps every thread's Python stack to stderr, and exits the
process with `EXIT_STALLED`. The launcher (torchrun, horovodrun, Azure ML) sees a failed rank,
stops the others, and the run is recorded as failed with that line as the reason, so the
worker's retry policy takes over.

Only the standard library: this file is part of the training snapshot uploaded to the cluster.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable

EXIT_STALLED = 124  # the exit status of coreutils' `timeout`: "ran out of time", not "bad input"
STALL_PREFIX = "train.py: stalled:"  # the line the local backend looks for to give the reason


class Watchdog:
    """Calls `on_stall(message)` (default: print it, dump stacks, exit `EXIT_STALLED`) once no
    `beat` or `phase` came for `timeout_s` seconds; `timeout_s` <= 0 turns it off.

    `beat` is cheap (two attribute writes, no lock): the step loop calls it every step, and a
    torn read of the two can only misname the step by one in the message.
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        on_stall: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float | None = None,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.on_stall = on_stall or _exit_stalled
        self.clock = clock
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(0.05, self.timeout_s / 10))
        self.current_phase = "starting"
        self.where = ""
        self.last_progress = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def phase(self, name: str) -> None:
        """Entering `name` (e.g. "screening images", "evaluation, epoch 3") counts as progress."""
        self.current_phase, self.where = name, ""
        self.last_progress = self.clock()

    def beat(self, where: str = "") -> None:
        """Progress inside the current phase; `where` (e.g. "step 12/40") is shown if it stalls next."""
        self.where = where
        self.last_progress = self.clock()

    def describe(self) -> str:
        """The phase and the last position reported in it, for messages."""
        return f"{self.current_phase} ({self.where})" if self.where else self.current_phase

    def check(self) -> bool:
        """Fire if the timeout has passed since the last progress; True if it fired."""
        idle = self.clock() - self.last_progress
        if not self.enabled or idle < self.timeout_s:
            return False
        self.on_stall(
            f"{STALL_PREFIX} no progress for {idle:.0f} s (limit {self.timeout_s:g} s) in phase '{self.describe()}'; "
            f"pid {os.getpid()}; stopping this process so the run fails instead of hanging"
        )
        return True

    def start(self) -> Watchdog:
        if self.enabled and self._thread is None:
            self.last_progress = self.clock()
            self._thread = threading.Thread(target=self._watch, name="train-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            if self.check():
                return

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _exit_stalled(message: str) -> None:
    # os._exit, not sys.exit: the main thread is the one that is stuck, so nothing else would
    # unwind it; atexit handlers and `finally` blocks could block on the same stuck resource.
    print(message, file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(EXIT_STALLED)
