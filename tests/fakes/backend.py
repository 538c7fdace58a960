"""`FakeTrainingBackend`: an in-memory `TrainingBackend` for unit tests of the code that drives runs.

It behaves like a real backend where callers depend on it (submit is idempotent per id, cancel
of an unknown or finished run changes nothing) and lets a test decide everything else: when a run
finishes and how (`finish`), and which submits fail (`fail_next_submit`, for retry paths). Every
call is recorded in `calls` as (method, backend_run_id), so a test can assert, say, that a
restarted worker polled instead of submitting again.
"""

from __future__ import annotations

import threading
from collections import deque

from worker.ports import BackendState, BackendStatus, RunSpec, TrainingBackend


class FakeTrainingBackend(TrainingBackend):
    def __init__(self, start_state: BackendState = "queued") -> None:
        self.start_state: BackendState = start_state  # the state a newly submitted run is in
        self.calls: list[tuple[str, str]] = []
        self.runs: dict[str, BackendStatus] = {}
        self.specs: dict[str, RunSpec] = {}  # what each run was submitted with
        self._failures: deque[BaseException] = deque()
        self._lock = threading.Lock()

    def submit(self, spec: RunSpec) -> BackendStatus:
        with self._lock:
            self.calls.append(("submit", spec.backend_run_id))
            if self._failures:
                raise self._failures.popleft()
            if spec.backend_run_id not in self.runs:
                self.specs[spec.backend_run_id] = spec
                self.runs[spec.backend_run_id] = BackendStatus(spec.backend_run_id, self.start_state)
            return self.runs[spec.backend_run_id]

    def status(self, backend_run_id: str) -> BackendStatus:
        with self._lock:
            self.calls.append(("status", backend_run_id))
            return self.runs.get(backend_run_id, BackendStatus(backend_run_id, "unknown"))

    def cancel(self, backend_run_id: str) -> BackendStatus:
        with self._lock:
            self.calls.append(("cancel", backend_run_id))
            current = self.runs.get(backend_run_id)
            if current is None:
                return BackendStatus(backend_run_id, "unknown")
            if not current.terminal:
                current = BackendStatus(backend_run_id, "canceled", outputs_dir=current.outputs_dir)
                self.runs[backend_run_id] = current
            return current

    # -- test controls (not recorded in `calls`) ------------------------------------------------

    def finish(self, backend_run_id: str, state: BackendState, outputs_dir: str | None = None, detail: str = "") -> BackendStatus:
        """Put a submitted run into `state` (any state, not only terminal ones); KeyError for an unknown id."""
        with self._lock:
            if backend_run_id not in self.runs:
                raise KeyError(f"no run {backend_run_id!r} was submitted")
            self.runs[backend_run_id] = BackendStatus(backend_run_id, state, detail, outputs_dir)
            return self.runs[backend_run_id]

    def fail_next_submit(self, exc: BaseException, times: int = 1) -> None:
        """The next `times` submits raise `exc` (and start nothing), like a transient outage."""
        with self._lock:
            self._failures.extend([exc] * times)

    def calls_to(self, method: str) -> list[str]:
        """The ids passed to `method`, in order."""
        return [run_id for name, run_id in self.calls if name == method]
