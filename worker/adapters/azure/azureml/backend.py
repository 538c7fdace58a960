"""The Azure ML training backend, for either SDK: what it submits is built by a `JobBuilder`
(`v2.V2Jobs`: an azure-ai-ml command job, the default; `v1.V1Jobs`: an azureml-core
ScriptRunConfig), and every call to the service goes through an `AzureMLSeam` (`v2.MLClientSeam`,
`v1.WorkspaceSeam`; a fake in the tests).

Submission is idempotent by the deterministic run id (the job's name): the backend looks the id
up first and returns the existing job; a create that races another ("already exists") is
resolved by the seam with the same lookup. Transient errors (429, 5xx, timeouts) are retried
within a bounded total time that fits the Functions timeout. Permanent errors (400, 401, 403,
404) are not retried: `PermanentSubmitError`, and the run fails at once.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_random_exponential

from worker import __version__
from worker.ports import BackendStatus, RunSpec, TrainingBackend

from .seam import AzureMLSeam, RunInfo, is_transient, map_status

log = logging.getLogger("retrain.azureml")

# What completion reads from a run: the weights and metrics, and the ONNX export if the run made one.
OUTPUT_FILES = ("outputs/model.pt", "outputs/model.onnx", "outputs/onnx_report.json", "outputs/metrics.json")


@dataclass(frozen=True)
class AzureMLSettings:
    experiment: str = "retrain"
    compute_target: str = "gpu-cluster"
    node_count: int = 1
    gpus_per_node: int = 1
    curated_environment: str | None = None  # "name:version", e.g. "AzureML-acpt-pytorch-2.2-cuda12.1:23"; else built from training/
    training_image: str | None = None  # training/environment/Dockerfile built in the registry: train.py's dependencies and Horovod
    job_identity_client_id: str | None = None  # the cluster's user-assigned identity, for the credential-less datastores
    base_image: str = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04"
    environment_name: str = "retrain-training"
    images_datastore: str = "images"  # the datastore over the images container
    artifacts_datastore: str = "retrain"  # manifests and champion checkpoints
    max_run_seconds: int = 24 * 3600
    submit_budget_seconds: float = 240.0  # all retries of one submit, inside the Functions timeout
    retry_wait_seconds: float = 1.0  # the first backoff; it doubles, with jitter, up to 30 s
    extra_tags: dict[str, str] = field(default_factory=dict)


class JobBuilder(Protocol):
    """What one SDK submits: its environment object and its job object for one attempt of a run."""

    sdk: str

    def environment(self, settings: AzureMLSettings) -> Any: ...

    def job(self, spec: RunSpec, settings: AzureMLSettings, environment: Any) -> Any: ...


class AzureMLBackend(TrainingBackend):
    def __init__(
        self,
        seam: AzureMLSeam,
        settings: AzureMLSettings,
        *,
        jobs: JobBuilder,
        environment: Any = None,
        outputs_root: Path | None = None,
        worker_version: str | None = None,
    ):
        self.seam, self.settings, self.jobs = seam, settings, jobs
        self._environment = environment
        self.outputs_root = outputs_root or Path(".retrain/azureml-outputs")
        self.worker_version = worker_version or __version__

    def _retrying(self) -> Retrying:
        return Retrying(
            retry=retry_if_exception(is_transient),
            wait=wait_random_exponential(multiplier=self.settings.retry_wait_seconds, max=30),
            stop=stop_after_attempt(8) | stop_after_delay(self.settings.submit_budget_seconds),
            reraise=True,
        )

    def _status(self, info: RunInfo) -> BackendStatus:
        state = map_status(info.status)
        if state == "unknown":
            # The job exists but reports a status we cannot place ("Unknown" while the service
            # loses track of a node, or a new name): it may still be running, so it stays in flight
            # (a retry beside it would train twice); run_timeout bounds the wait.
            detail = f"Azure ML reports status {info.status or 'none'!r}; kept in flight until it reports a final status"
            return BackendStatus(info.run_id, "running", detail, None)
        outputs = str(self.outputs_root / info.run_id) if state == "succeeded" else None
        return BackendStatus(info.run_id, state, info.detail or info.status, outputs)  # type: ignore[arg-type]

    def submit(self, spec: RunSpec) -> BackendStatus:
        for attempt in self._retrying():
            with attempt:
                existing = self.seam.get_run(spec.backend_run_id)
                if existing is not None:  # submitted before (maybe by a call that timed out)
                    return self._status(existing)
                if self._environment is None:  # registered once per worker process, reused by version after
                    self._environment = self.seam.ensure_environment(self.jobs.environment(self.settings))
                job = self.jobs.job(spec, self.settings, self._environment)
                info = self.seam.submit(self.settings.experiment, job, spec.backend_run_id, self.tags(spec))
                log.info("submitted %s to %s on %s", spec.backend_run_id, self.settings.experiment, self.settings.compute_target)
                return self._status(info)
        raise AssertionError("unreachable")  # pragma: no cover

    def tags(self, spec: RunSpec) -> dict[str, str]:
        """Lineage on the job: model, run id, manifest sha256, worker version (and the configured extras)."""
        return {
            **self.settings.extra_tags,
            **{k: str(v) for k, v in spec.tags.items()},
            "backend_run_id": spec.backend_run_id,
            "worker_version": self.worker_version,
            "sdk": self.jobs.sdk,
        }

    def status(self, backend_run_id: str) -> BackendStatus:
        info = self.seam.get_run(backend_run_id)
        if info is None:
            return BackendStatus(backend_run_id, "unknown")
        status = self._status(info)
        if status.state == "succeeded":
            self._download_outputs(backend_run_id, self.outputs_root / backend_run_id)
        return status

    def _download_outputs(self, backend_run_id: str, dest: Path) -> None:
        """Fetches the run's outputs into `dest`, each file appearing whole or not at all: the
        download goes to a private folder and each file is renamed into place, so a completion
        reading `dest` while another (a second worker, the Event Grid handler and a poll tick)
        downloads the same run never reads a half-written model or metrics file."""
        if all((dest / Path(name).name).is_file() for name in OUTPUT_FILES):
            return  # a completed run's outputs never change: fetched before
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{backend_run_id}.") as private:
            self.seam.download_outputs(backend_run_id, list(OUTPUT_FILES), Path(private))
            for file in Path(private).iterdir():
                if file.is_file():
                    os.replace(file, dest / file.name)

    def cancel(self, backend_run_id: str) -> BackendStatus:
        info = self.seam.get_run(backend_run_id)
        if info is None:
            return BackendStatus(backend_run_id, "unknown")
        if map_status(info.status) in ("queued", "running"):
            self.seam.cancel(backend_run_id)
            info = self.seam.get_run(backend_run_id) or info
        return self._status(info)


def settings_from_config(cfg: Any) -> AzureMLSettings:
    return AzureMLSettings(
        experiment=cfg.experiment, compute_target=cfg.compute_target, node_count=cfg.node_count, gpus_per_node=cfg.gpus_per_node,
        curated_environment=cfg.curated_environment, base_image=cfg.base_image, images_datastore=cfg.images_datastore,
        training_image=cfg.training_image, job_identity_client_id=cfg.job_identity_client_id,
        artifacts_datastore=cfg.artifacts_datastore, submit_budget_seconds=cfg.submit_budget_seconds,
    )  # fmt: skip
