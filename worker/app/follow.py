"""`retrain logs`: a run's training log, printed once or followed while the run goes on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from shared.run_ids import parse_backend_run_id
from worker.config import RetrainConfig
from worker.store import Store


class LogNotFoundError(RuntimeError):
    """No such run, or its log is not on this machine (an Azure ML run)."""


def log_path(config: RetrainConfig, store: Store, run_id: str) -> tuple[Path, str]:
    """The local run's train.log and its backend run id; a run id names its latest attempt."""
    with store.read() as tx:
        run = tx.get_run(run_id)
        if run is None and "-a" in run_id:
            run = tx.get_run(run_id.rsplit("-a", 1)[0])
    if run is None:
        raise LogNotFoundError(f"no run {run_id!r} in the ledger")
    backend_run_id = run.backend_run_id if run_id == run.run_id else run_id
    attempt = parse_backend_run_id(backend_run_id)
    if attempt is None or attempt.run_id != run.run_id:
        # Only ids of the form <run id>-a<attempt> become a path: '<run>-a1/../../x' names no attempt.
        raise LogNotFoundError(f"{run_id!r} is neither a run id nor one of its attempts (<run id>-a<n>)")
    if config.worker.backend != "local":
        raise LogNotFoundError(f"{backend_run_id} runs on Azure ML: `az ml job stream -n {backend_run_id}` follows its log")
    path = config.worker.state_dir / "runs" / backend_run_id / "train.log"
    if not path.is_file():
        raise LogNotFoundError(f"{backend_run_id} has no log yet at {path} (not started?)")
    return path, backend_run_id


def _attempt_over(store: Store, backend_run_id: str) -> bool:
    """The ledger says this attempt ended (a later attempt, or the run is no longer in flight)."""
    attempt = parse_backend_run_id(backend_run_id)
    if attempt is None:
        return True
    with store.read() as tx:
        run = tx.get_run(attempt.run_id)
    return run is None or run.backend_run_id != backend_run_id or not run.in_flight


def follow_log(config: RetrainConfig, store: Store, run_id: str, follow: bool = False, poll_s: float = 0.5) -> Iterator[str]:
    """The log's text; with `follow`, then what is appended, until the run's exit code is written or
    the ledger says the attempt ended (a runner that vanished never writes its exit code)."""
    path, backend_run_id = log_path(config, store, run_id)
    done = path.parent / "exit_code"
    with open(path, encoding="utf-8", errors="replace") as fh:
        while True:
            chunk = fh.read()
            if chunk:
                yield chunk
            if not follow or done.exists() or _attempt_over(store, backend_run_id):
                rest = fh.read()
                if rest:
                    yield rest
                return
            time.sleep(poll_s)
