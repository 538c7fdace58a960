"""Steps 2-4 of the submit protocol: write the manifest, call the backend, mark the run submitted.

Step 1 (freeze the manifest, record the run as planned) happened in the handler's transaction.
Every step here is idempotent: the manifest file is content-addressed by run id, the backend
returns the existing run for a known id, and marking checks the run is still the planned
attempt. So running this twice, or after a crash at any point, makes exactly one run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from shared import events as ev
from worker.config import RetrainConfig
from worker.crashpoints import crashpoint
from worker.handlers import manifest_document, queue_event
from worker.ports import BackendStatus, BlobStore, Clock, PermanentBackendError, RunSpec, TrainingArgs, TrainingBackend
from worker.store import RunRow, Store

log = logging.getLogger("retrain.submit")


def training_args(config: RetrainConfig, run: RunRow) -> TrainingArgs:
    t = config.model(run.model).training
    o = run.overrides
    return TrainingArgs(
        epochs=o.get("epochs", t.epochs),
        batch_size=o.get("batch_size", t.batch_size),
        image_size=o.get("image_size", t.image_size),
        learning_rate=o.get("learning_rate", t.learning_rate),
        nproc=t.nproc,
        distributed=t.distributed,
        arch=t.arch,
        extra=tuple(t.extra),
    )


class Submitter:
    def __init__(
        self,
        store: Store,
        backend: TrainingBackend,
        config: RetrainConfig,
        clock: Clock,
        manifests_dir: Path,
        init_checkpoint: Callable[[str], str | None] = lambda model: None,
        artifacts: BlobStore | None = None,
    ):
        self.store, self.backend, self.config, self.clock = store, backend, config, clock
        self.manifests_dir = manifests_dir
        self.init_checkpoint = init_checkpoint
        self.artifacts = artifacts  # where a remote backend reads the manifest (manifests/<model>/<run>.json)

    def submit(self, run_id: str) -> BackendStatus | None:
        """Submit the planned run (its current attempt); None when there is nothing to do."""
        with self.store.transaction() as tx:
            run = tx.get_run(run_id)
            if run is None or run.state != "planned":
                return None
            if run.next_attempt_at is not None and run.next_attempt_at > self.clock.now():
                return None
            entries = tx.manifest_entries(run_id)
        document = manifest_document(run, entries)
        self._write_manifest(run_id, document)
        if self.artifacts is not None:  # write-once: a retry or a second instance writes nothing new
            self.artifacts.write_once(f"manifests/{run.model}/{run_id}.json", json.dumps(document, indent=1, sort_keys=True).encode())
        spec = RunSpec(
            backend_run_id=run.backend_run_id,
            model=run.model,
            manifest=document,
            data_dir=str(self.config.images_dir(run.model)),
            training=training_args(self.config, run),
            init_checkpoint=self.init_checkpoint(run.model),
            tags={"model": run.model, "run_id": run.run_id, "manifest_sha256": run.manifest_sha256, "attempt": str(run.attempt)},
        )
        try:
            status = self.backend.submit(spec)
        except PermanentBackendError as exc:
            self._mark_submit_failed(run, str(exc))
            return None
        crashpoint("after_backend_submit")
        crashpoint("before_mark_submitted")
        self._mark_submitted(run, status)
        return status

    def _write_manifest(self, run_id: str, document: dict) -> Path:
        path = self.manifests_dir / f"{run_id}.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{id(document)}.tmp")
            tmp.write_text(json.dumps(document, indent=1, sort_keys=True))
            tmp.replace(path)
        return path

    def _mark_submit_failed(self, planned: RunRow, reason: str) -> None:
        """The backend refused the run for good (bad request, no permission): no retry, images back."""
        from worker.handlers import Context, run_failed

        with self.store.transaction() as tx:
            run = tx.get_run(planned.run_id)
            if run is None or run.state != "planned" or run.attempt != planned.attempt:
                return
            run_failed(Context(self.config, self.clock.now()), tx, run, "submit_failed", reason, None)
            tx.commit()
        log.warning("the backend refused %s for good: %s", planned.run_id, reason)

    def _mark_submitted(self, planned: RunRow, status: BackendStatus) -> None:
        now = self.clock.now()
        with self.store.transaction() as tx:
            run = tx.get_run(planned.run_id)
            if run is None or run.state != "planned" or run.attempt != planned.attempt:
                return  # someone else marked it (or a status event overtook us)
            run.state = "running" if status.state == "running" else "submitted"
            run.submitted_at, run.next_attempt_at = now, None
            if run.state == "running":
                run.started_at = now
            tx.update_run(run)
            data = {
                "run_id": run.run_id, "model": run.model, "attempt": run.attempt, "backend_run_id": run.backend_run_id,
                "manifest_sha256": run.manifest_sha256, "image_count": run.image_count, "new_image_count": run.new_image_count,
                "classes": run.classes, "reason": run.reason, "request_ids": run.request_ids, "overrides": run.overrides,
            }  # fmt: skip
            queue_event(tx, ev.RUN_SUBMITTED, f"runs/{run.run_id}", data, now, discriminator=str(run.attempt))
            tx.commit()
        log.info("submitted %s (attempt %d) to the backend: %s", planned.run_id, planned.attempt, status.state)
