"""`retrain serve`: the long-running local worker loop.

Each cycle: scan every model's images folder, consume the local inbox, tick (poll runs, run the
policy, repair planned runs), relay the outbox. Stops cleanly between steps when asked
(Ctrl-C / SIGTERM); everything it has not done yet is still in the ledger or the folders, so a
restart resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import InvalidMessage
from shared.messages import parse_message
from shared.redact import printable
from worker.adapters.local.directory_blobs import DirectoryBlobStore
from worker.adapters.local.folder_scan import FolderScanner
from worker.adapters.local.inbox import LocalInbox
from worker.bus import Worker
from worker.store import IN_FLIGHT_STATES

log = logging.getLogger("retrain.serve")


class RunProgress:
    """Logs how runs move, so a person watching `serve` sees each one: the epoch lines local runs
    append to their train.log (the full log: `retrain logs <run> -f`), each new attempt, and how
    each run ended with its reason (a run failing on a missing package was silent here)."""

    def __init__(self, worker: Worker, runs_root: Path | None):
        self.worker, self.runs_root = worker, runs_root
        self.offsets: dict[str, int] = {}
        self.attempts: dict[str, int] = {}  # run id -> the attempt last seen in flight

    def show(self) -> None:
        with self.worker.store.read() as tx:
            runs = tx.runs(states=IN_FLIGHT_STATES)
            ended = [tx.get_run(run_id) for run_id in set(self.attempts) - {r.run_id for r in runs}]
        for run in runs:
            if self.attempts.get(run.run_id, 1) < run.attempt:
                log.warning("%s: attempt %d of %s after: %s", run.run_id, run.attempt, run.model, printable(run.detail, limit=300))
            self.attempts[run.run_id] = run.attempt
        for done in ended:
            if done is not None:
                level = logging.INFO if done.outcome == "registered" else logging.WARNING
                log.log(level, "%s %s: %s", done.run_id, done.outcome or done.state, printable(done.detail, limit=300))
                del self.attempts[done.run_id]
        if self.runs_root is None:
            return
        flying = [r.backend_run_id for r in runs]
        for backend_run_id in flying:
            path = self.runs_root / backend_run_id / "train.log"
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.offsets.get(backend_run_id, 0))
                    data = fh.read()
            except OSError:
                continue
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next cycle
            self.offsets[backend_run_id] = self.offsets.get(backend_run_id, 0) + len(complete)
            for line in complete.decode("utf-8", errors="replace").splitlines():
                if " epoch " in f" {line} " or "best_val_acc=" in line:
                    log.info("%s: %s", backend_run_id, printable(line.strip(), limit=300))
        for gone in set(self.offsets) - set(flying):
            del self.offsets[gone]


@dataclass
class CycleReport:
    scanned: int = 0
    inbox: int = 0
    rejected: int = 0
    published: int = 0
    planned: list[str] = field(default_factory=list)


class LocalService:
    def __init__(self, worker: Worker, settle_seconds: float = 1.0):
        self.worker = worker
        config = worker.config
        self.inbox = LocalInbox(config.worker.state_dir / "inbox")
        self.scanners = [
            FolderScanner(name, DirectoryBlobStore(config.images_dir(name), settle_seconds=settle_seconds, images_only=False))
            for name in sorted(config.models)
        ]
        self.stop = threading.Event()
        self.progress = RunProgress(worker, config.worker.state_dir / "runs" if config.worker.backend == "local" else None)

    def cycle(self) -> CycleReport:
        report = CycleReport()
        for scanner in self.scanners:
            for image in scanner.scan():
                if self.stop.is_set():
                    return report
                report.planned += self.worker.handle(image).planned_runs
                report.scanned += 1
        for path in self.inbox.pending():
            if self.stop.is_set():
                return report
            try:
                message = parse_message(self.inbox.read(path), known_models=self.worker.config.models)
            except (InvalidMessage, OSError) as exc:
                if isinstance(exc, OSError):
                    exc = InvalidMessage("unreadable", f"{exc.__class__.__name__}: {exc.strerror or exc}")
                self.inbox.reject(path, f"{exc.reason}: {exc.description}")
                log.warning("rejected inbox message %s: %s", path.name, exc.description)
                report.rejected += 1
                continue
            report.planned += self.worker.handle(message).planned_runs
            self.inbox.done(path)
            report.inbox += 1
        report.planned += self.worker.tick().planned_runs
        report.published = self.worker.relay()
        self.progress.show()
        return report

    def run(self, max_seconds: float | None = None, cycles: int | None = None) -> None:
        interval = self.worker.config.worker.tick_seconds
        started, done = time.monotonic(), 0
        while not self.stop.is_set():
            report = self.cycle()
            done += 1
            if report.scanned or report.inbox or report.rejected or report.planned:
                log.info("cycle: %s", json.dumps(report.__dict__))
            if (cycles is not None and done >= cycles) or (max_seconds is not None and time.monotonic() - started >= max_seconds):
                break
            self.stop.wait(interval)
