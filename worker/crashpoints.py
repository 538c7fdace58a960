"""Named crash points for fault-injection tests of the submit protocol.

`crashpoint("after_plan")` kills this process with SIGKILL (no cleanup, no flush: like a power
cut for the process) when RETRAIN_CRASH_AT names that point. Unset, it does nothing.
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_backfill_chunk", "after_plan", "after_backend_submit", "after_mark_submitted", "after_register", "after_finalize")


def crashpoint(name: str) -> None:
    if name not in POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    if os.environ.get("RETRAIN_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
