"""What a training run reports as it goes (rank 0 only): a progress line or per-epoch log lines, and
its parameters, per-epoch metrics and results to a tracking service when there is one: MLflow when
MLFLOW_TRACKING_URI is set (Azure ML SDK v2 jobs set it; locally the worker's `tracking = "mlflow"`
points it at a SQLite store), else the Azure ML v1 run context. Tracking never fails a run."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("train")


class Progress:
    """A one-line progress bar on a terminal, plain per-epoch lines otherwise."""

    def __init__(self, enabled: bool, total_epochs: int):
        self.enabled = enabled
        self.bar = enabled and sys.stderr.isatty()
        self.total_epochs = total_epochs

    def step(self, epoch: int, step: int, steps: int, images_per_s: float, loss: float | None) -> None:
        if not self.bar:
            return
        width = 24
        filled = int(width * step / max(1, steps))
        loss_text = f" loss {loss:.4f}" if loss is not None else ""
        sys.stderr.write(
            f"\repoch {epoch}/{self.total_epochs} [{'#' * filled}{'.' * (width - filled)}] {step}/{steps} {images_per_s:6.1f} img/s{loss_text}   "
        )
        sys.stderr.flush()

    def epoch_done(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar:
            sys.stderr.write("\n")
        log.info(
            "epoch %d/%d train_loss=%.4f train_acc=%.4f val_loss=%.4f val_acc=%.4f lr=%.2e %.1fs %.1f img/s data_wait=%.1f%%",
            row["epoch"],
            self.total_epochs,
            row["train_loss"],
            row["train_acc"],
            row["val_loss"],
            row["val_acc"],
            row["lr"],
            row["seconds"],
            row["images_per_s"],
            100.0 * row["data_wait_fraction"],
        )


class AzureMLLogger:
    """Logs metrics to the Azure ML run when running inside one; does nothing otherwise."""

    def __init__(self, enabled: bool):
        self.run = None
        if not enabled:
            return
        try:
            from azureml.core.run import Run  # optional: only present in Azure ML images
        except ImportError:
            return
        try:
            run = Run.get_context()
        except Exception:  # an unconfigured SDK must never break training
            return
        # An offline context means "not inside Azure ML"; logging there only fills memory.
        if not getattr(run, "id", "").startswith("OfflineRun"):
            self.run = run

    def log(self, name: str, value: Any) -> None:
        if self.run is not None and value is not None:
            with contextlib.suppress(Exception):
                self.run.log(name, value)


EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "data_wait_fraction")
FINAL_METRICS = ("best_val_acc", "baseline_val_acc", "final_val_acc", "best_epoch", "images_per_s", "data_wait_fraction", "duration_s")


class MlflowLogger:
    """One MLflow run per training run, from rank 0: parameters, one point per epoch, the results,
    the manifest digest as a tag and metrics.json as an artifact. Inside an Azure ML v2 job
    `start_run` attaches to the job's own run (MLFLOW_RUN_ID is set there)."""

    def __init__(self, enabled: bool):
        self.mlflow: Any = None
        if not enabled or not os.environ.get("MLFLOW_TRACKING_URI"):
            return
        try:
            import mlflow  # optional: the Azure ML v2 image has it (azureml-mlflow); locally `pip install mlflow-skinny`
        except ImportError:
            log.warning("MLFLOW_TRACKING_URI is set but mlflow is not installed: metrics are not tracked")
            return
        try:
            run_name = os.environ.get("RETRAIN_RUN_ID")
            mlflow.start_run(run_name=run_name, tags={"retrain.run_id": run_name} if run_name else None)
        except Exception as exc:
            log.warning("MLflow tracking is off for this run: %s: %s", exc.__class__.__name__, exc)
            return
        self.mlflow = mlflow

    @property
    def active(self) -> bool:
        return self.mlflow is not None

    def _call(self, what: str, *args: Any, **kwargs: Any) -> None:
        if self.mlflow is None:
            return
        try:
            getattr(self.mlflow, what)(*args, **kwargs)
        except Exception as exc:  # a tracking outage must not cost the training
            log.warning("MLflow %s failed: %s: %s", what, exc.__class__.__name__, exc)

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        self._call("log_params", {k: v for k, v in params.items() if v is not None})
        self._call("set_tags", tags)

    def epoch(self, row: dict[str, Any]) -> None:
        self._call("log_metrics", {k: float(row[k]) for k in EPOCH_METRICS if row.get(k) is not None}, step=int(row["epoch"]))

    def finish(self, metrics: dict[str, Any], files: list[Path]) -> None:
        self._call("log_metrics", {k: float(metrics[k]) for k in FINAL_METRICS if isinstance(metrics.get(k), int | float)})
        for file in files:
            if file.exists():
                self._call("log_artifact", str(file))
        self._call("end_run")


class Tracking:
    """Where rank 0 reports the run: MLflow when configured, else the Azure ML v1 run (never both:
    inside a v2 job both would record the same metrics)."""

    def __init__(self, enabled: bool):
        self.mlflow = MlflowLogger(enabled)
        self.azureml = AzureMLLogger(enabled and not self.mlflow.active)

    def start(self, params: dict[str, Any], tags: dict[str, str]) -> None:
        self.mlflow.start(params, tags)

    def epoch(self, row: dict[str, Any]) -> None:
        self.mlflow.epoch(row)
        for name in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            self.azureml.log(name, row[name])

    def finish(self, metrics: dict[str, Any], files: list[Path]) -> None:
        self.mlflow.finish(metrics, files)
        self.azureml.log("best_val_acc", metrics.get("best_val_acc"))
        self.azureml.log("baseline_val_acc", metrics.get("baseline_val_acc"))  # None is not logged
