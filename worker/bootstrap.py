"""Wires the worker from settings: the one place adapters are chosen. Tests pass their fakes in."""

from __future__ import annotations

from pathlib import Path

from worker.bus import Worker
from worker.config import RetrainConfig
from worker.directory_blobs import DirectoryBlobStore
from worker.jsonl_publisher import JsonlPublisher
from worker.ports import BlobStore, Clock, Publisher, SystemClock, TrainingBackend
from worker.store import Store
from worker.submission import Submitter


def ledger_path(config: RetrainConfig) -> Path:
    return config.worker.state_dir / "ledger.db"


def build_worker(
    config: RetrainConfig,
    *,
    store: Store | None = None,
    backend: TrainingBackend | None = None,
    clock: Clock | None = None,
    publisher: Publisher | None = None,
    blobs: dict[str, BlobStore] | None = None,
) -> Worker:
    if store is None:
        from worker.sqlite_store import SqliteStore

        store = SqliteStore(ledger_path(config))
    if backend is None:
        from worker.local_backend import LocalTorchrunBackend

        backend = LocalTorchrunBackend(config.worker.state_dir / "runs")
    clock = clock or SystemClock()
    publisher = publisher or JsonlPublisher(config.events_file)
    if blobs is None:
        blobs = {name: DirectoryBlobStore(config.images_dir(name)) for name in config.models}
    submitter = Submitter(store, backend, config, clock, manifests_dir=config.worker.state_dir / "manifests")
    return Worker(store, backend, config, clock, submitter, blobs=blobs, publisher=publisher)
