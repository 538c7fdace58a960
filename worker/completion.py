"""Completion of a succeeded run: verify outputs, gate, export ONNX, register, move `champion`, publish.

Like submission it is a protocol, idempotent by run id, because the slow parts (reading the
model, exporting ONNX) cannot sit inside a ledger transaction:

1. read the run (it must be `succeeded`) and the champion it will be compared with;
2. fetch and verify outputs (model.pt's sha256 must be the one training recorded, and the run
   must have trained on its own manifest), gate, export + parity;
3. register the files in the model registry (idempotent by run id);
4. in one transaction: check the run is still `succeeded` and the champion unchanged (else a
   concurrent completion won; start over), record the version, move `champion`, finalize the
   run and queue `retrain.model.registered` (or, for a rejection, finalize and queue
   `retrain.model.rejected`);
5. point the registry's champion alias at the version.

A crash anywhere leaves the run `succeeded`; the next tick runs completion again, the registry
returns the version it already has for the run id, and the event ids are derived from the run
id, so there is never a second version or a second event.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared import events as ev
from shared.files import atomic_write_bytes
from worker import telemetry
from worker.champion import crown
from worker.config import RetrainConfig
from worker.context import Context
from worker.crashpoints import crashpoint
from worker.gate import Champion, GateResult, GateRules, evaluate_gate
from worker.manifests import encode, manifest_path
from worker.manifests import load as load_manifest
from worker.outbox import queue_event
from worker.ports import BlobStore, Clock, ExportError, ExportResult, ModelRegistry, OnnxExporter, TrainingBackend
from worker.runs import after_run
from worker.store import ModelHead, ModelVersionRow, RunRow, Store, clipped, retry_lost_races
from worker.submission import training_args
from worker.training_code import training_dir

log = logging.getLogger("retrain.completion")
SUMMARY_KEYS = (
    "best_val_acc",
    "baseline_val_acc",
    "best_epoch",
    "final_val_acc",
    "images_per_s",
    "world_size",
    "num_train",
    "num_val",
    "skipped_images",
    "duration_s",
)


def _retrying(commit: Callable[..., list[str]], *args: Any) -> list[str]:
    """Step 4 on a ledger shared by instances: a lost optimistic race (another completion, or any
    writer, committed first) re-runs the step on fresh state, where its checks see who won."""
    for attempt in retry_lost_races(attempts=20, max_wait=0.5):
        with attempt:
            return commit(*args)
    raise AssertionError("unreachable")  # pragma: no cover


class CompletionRejected(Exception):  # noqa: N818 - a verdict, raised to leave the pipeline early
    """The run's outputs cannot be accepted; the message is the reason recorded and published."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def snapshot_version() -> str:
    """A digest of the training code that produced a model (part of its lineage)."""
    digest = hashlib.sha256()
    for path in sorted(training_dir().glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class Completer:
    def __init__(
        self,
        store: Store,
        backend: TrainingBackend,
        registry: ModelRegistry,
        exporter: OnnxExporter,
        config: RetrainConfig,
        clock: Clock,
        manifests: BlobStore,
    ):
        self.store, self.backend, self.registry, self.exporter = store, backend, registry, exporter
        self.config, self.clock, self.manifests = config, clock, manifests

    def complete(self, run_id: str) -> list[str]:
        """Finish the run if it is succeeded; returns runs the policy planned afterwards."""
        with self.store.transaction() as tx:
            run = tx.get_run(run_id)
            if run is None or run.state != "succeeded":
                return []
            head = tx.model_head(run.model)
        with telemetry.span("retrain.complete", parent=run.traceparent, model=run.model, run_id=run.run_id):
            return self._complete(run, head)

    def _complete(self, run: RunRow, head: ModelHead) -> list[str]:
        champion = Champion(head.champion_version, head.champion_sha256 or "") if head.champion_version else None
        timings: dict[str, float] = {}
        try:
            outputs = self._outputs(run)
            metrics = self._verified_metrics(run, outputs)
            rules = self._rules(run.model)
            gate = evaluate_gate(metrics, champion, rules)
            if not gate.passed:
                return self._finalize_rejected(run, champion, gate.reason, metrics, gate)
            started = time.perf_counter()
            in_run = self._exported_in_run(outputs, metrics)
            if in_run is not None:
                short = self._short_of_the_gate(in_run.report, metrics, run.model)
                if short:
                    return self._finalize_rejected(run, champion, short, metrics, gate)
            export = in_run or self.exporter.export(
                outputs / "model.pt",
                outputs,
                data_dir=str(self.config.images_dir(run.model)),
                manifest=self._manifest_file(run, outputs),
                tolerance=self.config.model(run.model).gate.onnx_tolerance,
                samples=self.config.model(run.model).gate.onnx_samples,
            )
            timings["export_s"] = time.perf_counter() - started
            if not export.passed:
                reason = f"ONNX parity failed: max |PyTorch - onnxruntime| {export.report.get('max_abs_diff', float('nan')):.2e} > tolerance {export.report.get('tolerance')}"
                return self._finalize_rejected(run, champion, reason, metrics, gate)
        except CompletionRejected as exc:
            return self._finalize_rejected(run, champion, str(exc), {}, None)
        except ExportError as exc:
            return self._finalize_rejected(run, champion, f"ONNX export failed: {exc}", metrics, gate)
        started = time.perf_counter()
        card = self._card(run, champion, metrics, gate, export.report, outputs)
        files = {name: outputs / name for name in ("model.pt", "model.onnx", "onnx_report.json", "metrics.json")}
        registered = self.registry.register(run.model, run.run_id, files, card)
        timings["register_s"] = time.perf_counter() - started
        crashpoint("after_register")
        return self._finalize_registered(run, champion, registered.version, registered.location, metrics, card, timings)

    # -- steps ---------------------------------------------------------------------------------

    def _outputs(self, run: RunRow) -> Path:
        status = self.backend.status(run.backend_run_id)
        if not status.outputs_dir:
            raise CompletionRejected(f"the backend reports no outputs for {run.backend_run_id}")
        outputs = Path(status.outputs_dir)
        missing = [name for name in ("model.pt", "metrics.json") if not (outputs / name).is_file()]
        if missing:
            raise CompletionRejected(f"the run's outputs lack {', '.join(missing)}")
        return outputs

    def _verified_metrics(self, run: RunRow, outputs: Path) -> dict[str, Any]:
        try:
            metrics = json.loads((outputs / "metrics.json").read_text())
        except (ValueError, OSError) as exc:
            raise CompletionRejected(f"metrics.json is unreadable: {exc}") from None
        if not isinstance(metrics, dict):
            raise CompletionRejected("metrics.json is not an object")
        recorded = metrics.get("model_sha256")
        if not recorded:
            raise CompletionRejected("metrics.json records no model_sha256, so model.pt cannot be verified")
        actual = file_sha256(outputs / "model.pt")
        if actual != recorded:
            raise CompletionRejected(f"model.pt has sha256 {actual[:12]}..., but training recorded {recorded[:12]}...")
        if metrics.get("manifest_sha256") != run.manifest_sha256:
            raise CompletionRejected(
                f"the run trained on manifest {str(metrics.get('manifest_sha256'))[:12]}..., not its own {run.manifest_sha256[:12]}..."
            )
        return metrics

    def _exported_in_run(self, outputs: Path, metrics: dict[str, Any]) -> ExportResult | None:
        """The ONNX the run exported itself (train.py --export_onnx), if it is there and matches this model.pt."""

        onnx_path, report_path = outputs / "model.onnx", outputs / "onnx_report.json"
        if not (onnx_path.is_file() and report_path.is_file()):
            return None
        try:
            report = json.loads(report_path.read_text())
        except ValueError:
            return None
        if report.get("model_sha256") != metrics.get("model_sha256") or report.get("onnx_sha256") != file_sha256(onnx_path):
            log.warning("ignoring the run's own ONNX export in %s: it does not match model.pt", outputs)
            return None
        return ExportResult(onnx_path, report_path, report)

    def _short_of_the_gate(self, report: dict[str, Any], metrics: dict[str, Any], model: str) -> str | None:
        """Why the run's own parity check does not meet the configured gate, or None. The run's
        `passed` is not trusted: it checked at whatever tolerance it was given; the figures are."""
        g = self.config.model(model).gate
        diff, samples = report.get("max_abs_diff"), report.get("samples")
        if not isinstance(diff, int | float) or isinstance(diff, bool) or not math.isfinite(diff) or diff > g.onnx_tolerance:
            return f"ONNX parity failed: max |PyTorch - onnxruntime| {diff} > the configured tolerance {g.onnx_tolerance:g} (the run checked at {report.get('tolerance')})"
        available = metrics.get("num_val")
        needed = min(g.onnx_samples, available) if isinstance(available, int) and available > 0 else g.onnx_samples
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < needed:
            return f"ONNX parity checked on {samples} images; the gate asks for {needed} (onnx_samples {g.onnx_samples})"
        return None

    def _manifest_file(self, run: RunRow, outputs: Path) -> Path:
        """The run's frozen manifest as a local file (the exporter checks parity on its validation images)."""
        local = self.manifests.local_path(manifest_path(run.manifest_sha256))
        if local is not None and local.is_file():
            return local
        target = outputs / "manifest.json"
        if not target.is_file():  # whole or absent: a completion racing this one may read it now
            atomic_write_bytes(target, encode(load_manifest(self.manifests, run.manifest_sha256)))
        return target

    def _rules(self, model: str) -> GateRules:
        g = self.config.model(model).gate
        return GateRules(metric=g.metric, min_value=g.min_value, min_improvement=g.min_improvement)

    def _card(
        self, run: RunRow, champion: Champion | None, metrics: dict[str, Any], gate: GateResult, onnx: dict[str, Any], outputs: Path
    ) -> dict[str, Any]:
        cfg = self.config.model(run.model)
        return {
            "run_id": run.run_id,
            "backend_run_id": run.backend_run_id,
            "manifest": {
                "sha256": run.manifest_sha256,
                "images": run.image_count,
                "new_images": run.new_image_count,
                "classes": run.classes,
            },
            # The version it was warm-started from, which the gate has checked is the champion; none
            # for a run that started from scratch.
            "parent_version": champion.version if champion and metrics.get("init_checkpoint_sha256") == champion.model_sha256 else None,
            "trained_from_sha256": metrics.get("init_checkpoint_sha256"),
            "metrics": {k: metrics.get(k) for k in SUMMARY_KEYS},
            "gate": gate.as_dict(),
            "onnx": {k: onnx.get(k) for k in ("opset", "max_abs_diff", "tolerance", "argmax_agreement", "onnxruntime_version", "samples")},
            "artifacts": {
                name: {"sha256": file_sha256(outputs / name), "bytes": (outputs / name).stat().st_size}
                for name in ("model.pt", "model.onnx")
            },
            "config": {"training": dataclasses.asdict(training_args(self.config, run)), "gate": cfg.gate.model_dump()},
            "code_version": {"training_snapshot": snapshot_version(), "torch": metrics.get("torch_version")},
            "registered_at": self.clock.now().isoformat(),
        }

    def _finalize_registered(self, *args: Any) -> list[str]:
        return _retrying(self._commit_registered, *args)

    def _finalize_rejected(self, *args: Any) -> list[str]:
        return _retrying(self._commit_rejected, *args)

    def _commit_registered(
        self,
        run: RunRow,
        champion: Champion | None,
        version: int,
        location: str,
        metrics: dict[str, Any],
        card: dict[str, Any],
        timings: dict[str, float],
    ) -> list[str]:
        now = self.clock.now()
        with self.store.transaction() as tx:
            current = tx.get_run(run.run_id)
            head = tx.model_head(run.model)
            if current is None or current.state != "succeeded":
                return []  # another completion of the same run finished first
            if head.champion_version != (champion.version if champion else None):
                log.warning("champion of %s changed while %s was completing; gating again", run.model, run.run_id)
                return []  # still succeeded: the next tick gates against the new champion
            summary = {k: metrics.get(k) for k in SUMMARY_KEYS}
            tx.add_model_version(
                ModelVersionRow(
                    model=run.model, version=version, run_id=run.run_id, created_at=now, location=location, metrics=summary, card=card
                )
            )
            crown(head, version, card["artifacts"]["model.pt"]["sha256"])
            tx.save_model_head(head)
            current.state, current.outcome = "finalized", "registered"
            current.detail = f"registered as v{version}: {card['gate']['reason']}"
            tx.update_run(current)
            data = {
                "model": run.model, "version": version, "run_id": run.run_id, "champion": True, "parent_version": card["parent_version"],
                "metrics": summary, "gate": card["gate"], "manifest": card["manifest"], "onnx": card["onnx"], "artifacts": card["artifacts"],
                "location": location, "timings": {k: round(v, 3) for k, v in timings.items()},
            }  # fmt: skip
            queue_event(tx, ev.MODEL_REGISTERED, f"models/{run.model}/versions/{version}", data, now, discriminator=run.run_id)
            telemetry.count("retrain.runs", model=run.model, outcome="registered")
            if run.oldest_image_at is not None:
                telemetry.record(
                    "retrain.image_to_champion.seconds", (now - run.oldest_image_at).total_seconds(), unit="s", model=run.model
                )
            tx.decided(run.model, now, "registered", f"v{version} is champion: {card['gate']['reason']}", run.run_id)
            planned = after_run(Context(self.config, now, manifests=self.manifests), tx, run.model, None)
            tx.commit()
        crashpoint("after_finalize")
        self.registry.set_champion(run.model, version)
        log.info("%s registered as %s v%d (champion)", run.run_id, run.model, version)
        return planned

    def _commit_rejected(
        self, run: RunRow, champion: Champion | None, reason: str, metrics: dict[str, Any], gate: GateResult | None
    ) -> list[str]:
        now = self.clock.now()
        with self.store.transaction() as tx:
            current = tx.get_run(run.run_id)
            if current is None or current.state != "succeeded":
                return []
            current.state, current.outcome, current.detail = "finalized", "rejected", clipped(reason)
            tx.update_run(current)
            data = {
                "model": run.model, "run_id": run.run_id, "reason": reason, "champion_version": champion.version if champion else None,
                "metrics": {k: metrics.get(k) for k in SUMMARY_KEYS}, "gate": gate.as_dict() if gate else None,
            }  # fmt: skip
            queue_event(tx, ev.MODEL_REJECTED, f"runs/{run.run_id}", data, now)
            telemetry.count("retrain.runs", model=run.model, outcome="rejected")
            tx.decided(run.model, now, "rejected", f"{run.run_id} not registered: {reason}", run.run_id)
            planned = after_run(Context(self.config, now, manifests=self.manifests), tx, run.model, None)
            tx.commit()
        log.info("%s rejected: %s", run.run_id, reason)
        return planned

    def sync_champion_alias(self, model: str) -> None:
        """Repair the registry's alias after a crash between the ledger commit and the alias move."""
        with self.store.transaction() as tx:
            version = tx.model_head(model).champion_version
        if version is not None and self.registry.champion_alias(model) != version:
            self.registry.set_champion(model, version)
