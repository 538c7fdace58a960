"""train.py's progress watchdog: it fires once progress stops for its timeout, naming the phase, and never otherwise."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from stall_watchdog import EXIT_STALLED, STALL_PREFIX, Watchdog

from tests.conftest import TRAINING

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watched(timeout: float = 60.0) -> tuple[Watchdog, Clock, list[str]]:
    clock, fired = Clock(), []
    return Watchdog(timeout, on_stall=fired.append, clock=clock), clock, fired


def test_it_fires_once_the_timeout_passes_without_progress_naming_the_phase_and_position():
    dog, clock, fired = watched(60)
    dog.phase("training, epoch 3")
    dog.beat("step 12/40")
    clock.now += 59.9
    assert dog.check() is False
    clock.now += 0.1
    assert dog.check() is True
    assert len(fired) == 1
    assert fired[0].startswith(STALL_PREFIX)
    assert "no progress for 60 s (limit 60 s) in phase 'training, epoch 3 (step 12/40)'" in fired[0]


def test_steady_progress_never_fires():
    dog, clock, fired = watched(60)
    for step in range(100):
        clock.now += 30
        dog.beat(f"step {step}")
        dog.check()
    assert fired == []


def test_entering_a_phase_counts_as_progress_and_forgets_the_old_position():
    dog, clock, _ = watched(60)
    dog.beat("step 40/40")
    clock.now += 50
    dog.phase("evaluation, epoch 1")
    clock.now += 50
    assert dog.check() is False
    assert dog.describe() == "evaluation, epoch 1"


def test_a_zero_timeout_turns_it_off():
    dog, clock, fired = watched(0)
    clock.now += 1e9
    assert dog.check() is False
    assert dog.start()._thread is None  # no thread either
    assert fired == []


def test_the_running_thread_fires_when_the_main_thread_stops_reporting():
    fired = threading.Event()
    messages: list[str] = []

    def on_stall(message: str) -> None:
        messages.append(message)
        fired.set()

    with Watchdog(0.3, on_stall=on_stall, poll_s=0.02) as dog:
        dog.phase("gathering the screening results from every rank")
        assert fired.wait(timeout=30)
    assert "phase 'gathering the screening results from every rank'" in messages[0]


def test_by_default_a_stall_ends_the_process_with_its_own_status_the_phase_and_every_threads_stack():
    program = (
        "import sys, time\n"
        f"sys.path.insert(0, {str(TRAINING)!r})\n"
        "from stall_watchdog import Watchdog\n"
        "dog = Watchdog(0.5, poll_s=0.05).start()\n"
        "dog.phase('evaluation, epoch 2')\n"
        "time.sleep(120)\n"
        "print('never reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == EXIT_STALLED
    assert "never reached" not in done.stdout
    first = done.stderr.splitlines()[0]
    assert first.startswith(STALL_PREFIX)
    assert "in phase 'evaluation, epoch 2'" in first
    assert 'File "<string>", line 6' in done.stderr  # the stuck main thread's stack: where it waited
