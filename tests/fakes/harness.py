"""A worker wired with fakes (memory store or SQLite, fake backend, fake clock) for handler tests."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from shared.messages import ImageUploaded, RetrainRequested, RunStatusChanged
from tests.fakes.adapters import FakeBlobStore, FakeClock, FakeOnnxExporter, RecordingPublisher
from tests.fakes.backend import FakeTrainingBackend
from tests.fakes.memory_store import MemoryStore
from worker.adapters.local.registry import LocalModelRegistry
from worker.app.bootstrap import build_worker
from worker.config import RetrainConfig, load_config
from worker.store import Store


def small_config(tmp_path: Path, evaluate_interval: float = 0, **knobs) -> RetrainConfig:
    env = {
        "RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"),
        "RETRAIN__WORKER__IMAGES_ROOT": str(tmp_path / "images"),
        # 0: every image is evaluated, on every ledger (a staged-ingest ledger defaults to 0.5 s)
        "RETRAIN__WORKER__EVALUATE_INTERVAL": str(evaluate_interval),
    }
    base = {
        "val_fraction": 0.5,
        "min_new_images": 6,
        "min_per_class": 2,
        "quiet_period": 10,
        "max_wait": 600,
        "cooldown": 30,
        "max_attempts": 2,
        "retry_backoff": 5,
    }
    base.update(knobs)
    for key, value in base.items():
        env[f"RETRAIN__MODELS__BIRDS__{key.upper()}"] = "" if value is None else str(value)
    config = load_config(None, env=env)
    if knobs.get("max_wait", 0) is None:
        models = {"birds": config.models["birds"].model_copy(update={"max_wait": None})}
        config = config.model_copy(update={"models": models})
    return config


@dataclasses.dataclass
class Harness:
    worker: object
    store: Store
    backend: FakeTrainingBackend
    clock: FakeClock
    publisher: RecordingPublisher
    blobs: FakeBlobStore
    exporter: FakeOnnxExporter
    registry: LocalModelRegistry
    root: Path
    n: int = 0

    def upload(self, label: str = "chicken", name: str | None = None, etag: str = "e1", model: str = "birds"):
        self.n += 1
        path = f"{label}/{name or f'img{self.n:05d}'}.jpg"
        return self.worker.handle(ImageUploaded.of(model, path, etag, 100))

    def uploads(self, per_class: int, labels=("chicken", "turkey")):
        for _ in range(per_class):
            for label in labels:
                self.upload(label)

    def request(self, **fields):
        fields.setdefault("message_id", f"req-{self.n}")
        fields.setdefault("model", "birds")
        self.n += 1
        return self.worker.handle(RetrainRequested(**fields))

    def status(self, backend_run_id: str, status: str, message_id: str | None = None, detail: str = ""):
        return self.worker.handle(
            RunStatusChanged(
                message_id=message_id or f"st-{backend_run_id}-{status}",
                model="birds",
                backend_run_id=backend_run_id,
                status=status,
                detail=detail,
            )
        )

    def succeed(
        self, run=None, best: float = 0.9, baseline: float | None = None, model_bytes: bytes | None = None, report: bool = True, **metrics
    ):
        """Write real-looking outputs for the run's current attempt, finish it at the backend, and
        report it succeeded (`report=False`: leave the news to whoever tells the worker)."""
        import hashlib
        import json
        import os

        run = run or self.runs()[0]
        spec = self.backend.specs[run.backend_run_id]
        outputs = self.root / "outputs" / run.backend_run_id
        outputs.mkdir(parents=True, exist_ok=True)
        model_bytes = model_bytes or os.urandom(64)
        (outputs / "model.pt").write_bytes(model_bytes)
        init = spec.init_checkpoint
        body = {
            "best_val_acc": best,
            "baseline_val_acc": baseline,
            "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
            "manifest_sha256": run.manifest_sha256,
            "init_checkpoint_sha256": hashlib.sha256(Path(init).read_bytes()).hexdigest() if init else None,
        }
        body.update(metrics)
        (outputs / "metrics.json").write_text(json.dumps(body))
        self.backend.finish(run.backend_run_id, "succeeded", outputs_dir=str(outputs))
        return self.status(run.backend_run_id, "succeeded") if report else None

    def head(self):
        with self.store.transaction() as tx:
            return tx.model_head("birds")

    def versions(self):
        with self.store.transaction() as tx:
            return tx.model_versions("birds")

    def runs(self, states=None):
        with self.store.transaction() as tx:
            return tx.runs("birds", states)

    def decisions(self, limit=50):
        with self.store.transaction() as tx:
            return tx.decisions("birds", limit)

    def events(self):
        return list(self.store.all_events())

    def manifest(self, run) -> list[dict]:
        """The images of the run's frozen manifest (the content-addressed blob it names)."""
        from worker.manifests import load

        return load(self.worker.manifests, run.manifest_sha256)["images"]

    def images(self) -> dict[str, object]:
        """The latest version of every path, with its derived state."""
        with self.store.transaction() as tx:
            return {i.path: i for i in tx.manifest_candidates("birds", 0, tx.image_watermark("birds"))}


def make_harness(tmp_path: Path, store: Store | None = None, evaluate_interval: float = 0, **knobs) -> Harness:
    config = small_config(tmp_path, evaluate_interval, **knobs)
    store = store or MemoryStore()
    backend, clock, publisher = FakeTrainingBackend(), FakeClock(), RecordingPublisher()
    if os.environ.get("RETRAIN_TEST_BACKEND") == "azureml-v2":  # the same suites against the Azure ML adapter
        from tests.fakes.azureml import AzureMLHarnessBackend

        backend = AzureMLHarnessBackend(tmp_path / "azureml-outputs")
    blobs, exporter, registry = FakeBlobStore(), FakeOnnxExporter(), LocalModelRegistry(tmp_path / "registry")
    worker = build_worker(
        config, store=store, backend=backend, clock=clock, publisher=publisher, blobs={"birds": blobs}, registry=registry, exporter=exporter
    )
    return Harness(
        worker=worker,
        store=store,
        backend=backend,
        clock=clock,
        publisher=publisher,
        blobs=blobs,
        exporter=exporter,
        registry=registry,
        root=tmp_path,
    )
