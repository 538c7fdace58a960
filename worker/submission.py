"""Steps 2-4 of the submit protocol: write the manifest, call the backend, mark the run submitted.

Step 1 (freeze the manifest, record the run as planned) happened in the handler's transaction.
Every step here is idempotent: the manifest blob is content-addressed by its digest, the backend
returns the existing run for a known id, and marking checks the run is still the planned
attempt. So running this twice, or after a crash at any point, makes exactly one run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from worker import telemetry
from worker.config import RetrainConfig
from worker.context import Context
from worker.crashpoints import crashpoint
from worker.manifests import load as load_manifest
from worker.manifests import unusable as manifest_unusable
from worker.ports import BackendStatus, BlobStore, Clock, PermanentBackendError, RunSpec, TrainingArgs, TrainingBackend
from worker.runs import mark_submitted, run_failed
from worker.store import RunRow, Store, clipped

log = logging.getLogger("retrain.submit")


def training_args(config: RetrainConfig, run: RunRow) -> TrainingArgs:
    t, gate = config.model(run.model).training, config.model(run.model).gate
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
        onnx_tolerance=gate.onnx_tolerance,
        onnx_samples=gate.onnx_samples,
    )


class Submitter:
    def __init__(
        self,
        store: Store,
        backend: TrainingBackend,
        config: RetrainConfig,
        clock: Clock,
        manifests: BlobStore,
        init_checkpoint: Callable[[str], str | None] = lambda model: None,
    ):
        self.store, self.backend, self.config, self.clock = store, backend, config, clock
        self.manifests = manifests  # frozen manifests, manifests/<sha256>.json (written when the run was planned)
        self.init_checkpoint = init_checkpoint

    def submit(self, run_id: str) -> BackendStatus | None:
        """Submit the planned run (its current attempt); None when there is nothing to do."""
        with self.store.transaction() as tx:
            run = tx.get_run(run_id)
            if run is None or run.state != "planned":
                return None
            if run.next_attempt_at is not None and run.next_attempt_at > self.clock.now():
                return None
        try:
            document = load_manifest(self.manifests, run.manifest_sha256)
        except Exception as exc:
            if not manifest_unusable(exc):
                raise
            # A torn, deleted or edited manifest cannot become readable by waiting: fail the run (its
            # images return to pending; planned again, the manifest is written afresh) rather than
            # fail its submission on every tick, for ever.
            self._mark_submit_failed(run, clipped(f"its frozen manifest cannot be used: {exc.__class__.__name__}: {exc}"))
            return None
        spec = RunSpec(
            backend_run_id=run.backend_run_id,
            model=run.model,
            manifest=document,
            data_dir=str(self.config.images_dir(run.model)),
            training=training_args(self.config, run),
            init_checkpoint=self.init_checkpoint(run.model),
            tags={"model": run.model, "run_id": run.run_id, "manifest_sha256": run.manifest_sha256, "attempt": str(run.attempt),
                  **({"traceparent": run.traceparent} if run.traceparent else {})},
        )  # fmt: skip
        with telemetry.span("retrain.submit", parent=run.traceparent, model=run.model, run_id=run.run_id, attempt=run.attempt):
            try:
                status = self.backend.submit(spec)
            except PermanentBackendError as exc:
                telemetry.count("retrain.submit.errors", model=run.model, permanent=True)
                self._mark_submit_failed(run, str(exc))
                return None
            except Exception:
                telemetry.count("retrain.submit.errors", model=run.model, permanent=False)
                raise
        crashpoint("after_backend_submit")
        self._mark_submitted(run, status)
        return status

    def _mark_submit_failed(self, planned: RunRow, reason: str) -> None:
        """The backend refused the run for good (bad request, no permission): no retry, images back."""
        with self.store.transaction() as tx:
            run = tx.get_run(planned.run_id)
            if run is None or run.state != "planned" or run.attempt != planned.attempt:
                return
            run_failed(Context(self.config, self.clock.now(), manifests=self.manifests), tx, run, "submit_failed", reason, None)
            tx.commit()
        log.warning("the backend refused %s for good: %s", planned.run_id, reason)

    def _mark_submitted(self, planned: RunRow, status: BackendStatus) -> None:
        with self.store.transaction() as tx:
            run = tx.get_run(planned.run_id)
            if run is None or run.state != "planned" or run.attempt != planned.attempt:
                return  # someone else marked it (or a status event overtook us and queued the event)
            mark_submitted(
                Context(self.config, self.clock.now(), manifests=self.manifests),
                tx,
                run,
                "running" if status.state == "running" else "submitted",
            )
            tx.commit()
        crashpoint("after_mark_submitted")  # marked and the event queued, not yet relayed
        log.info("submitted %s (attempt %d) to the backend: %s", planned.run_id, planned.attempt, status.state)
