"""The Azure ML training backend (azureml-core, SDK v1), as the reference article submits runs.

`build_script_run_config` makes the real `ScriptRunConfig`: training/ as the source directory,
`PyTorchConfiguration(communication_backend='Nccl', node_count=N, process_count=N*G)` for DDP or
`MpiConfiguration(node_count=N, process_count_per_node=G)` for Horovod, the environment, the
compute target, and the run's inputs as datastore mounts (images, the frozen manifest, the
champion checkpoint). Workspace, experiment and run calls go through `AzureMLSeam`, a thin seam
with a real implementation (`WorkspaceSeam`) and a fake for tests.

Submission is idempotent by the deterministic run id: the backend looks the id up first and
returns the existing run (tags are set after a run is created, so they cannot be the lookup).
Transient errors (429, 5xx, timeouts) are retried within a bounded total time that fits the
Functions timeout; a timeout after Azure ML created the run is resolved by the same lookup.
Permanent errors (400, 401, 403, 404) are not retried: `PermanentSubmitError`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_random_exponential

from worker.ports import BackendStatus, RunSpec, TrainingBackend
from worker.snapshot import training_dir

from .seam import AzureMLSeam, RunInfo, is_transient, map_status

log = logging.getLogger("retrain.azureml")


@dataclass(frozen=True)
class AzureMLSettings:
    experiment: str = "retrain"
    compute_target: str = "gpu-cluster"
    node_count: int = 1
    gpus_per_node: int = 1
    curated_environment: str | None = None  # e.g. "AzureML-ACPT-pytorch-2.2-cuda12.1"; else built from training/
    base_image: str = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04"
    environment_name: str = "retrain-training"
    images_datastore: str = "images"  # the datastore over the images container
    artifacts_datastore: str = "retrain"  # manifests and champion checkpoints
    max_run_seconds: int = 24 * 3600
    submit_budget_seconds: float = 240.0  # all retries of one submit, inside the Functions timeout
    retry_wait_seconds: float = 1.0  # the first backoff; it doubles, with jitter, up to 30 s
    extra_tags: dict[str, str] = field(default_factory=dict)


def build_environment(settings: AzureMLSettings, workspace: Any = None) -> Any:
    """The curated environment by name, or training/requirements.txt on a CUDA base image."""
    from azureml.core import Environment

    if settings.curated_environment:
        if workspace is None:
            raise ValueError("a curated environment is looked up in a workspace")
        return Environment.get(workspace=workspace, name=settings.curated_environment)
    env = Environment.from_pip_requirements(settings.environment_name, str(training_dir() / "requirements.txt"))
    env.docker.base_image = settings.base_image
    return env


def build_script_run_config(spec: RunSpec, settings: AzureMLSettings, environment: Any) -> Any:
    """The real azureml-core ScriptRunConfig for one attempt of a run."""
    from azureml.core import ScriptRunConfig
    from azureml.core.runconfig import DataReferenceConfiguration, MpiConfiguration, PyTorchConfiguration

    nodes, gpus = settings.node_count, settings.gpus_per_node
    if spec.training.distributed == "horovod":
        distributed = MpiConfiguration(node_count=nodes, process_count_per_node=gpus)
    else:
        distributed = PyTorchConfiguration(communication_backend="Nccl", node_count=nodes, process_count=nodes * gpus)
    arguments = [
        "--data_dir", "$AZUREML_DATAREFERENCE_images",
        "--manifest", f"$AZUREML_DATAREFERENCE_manifests/{spec.tags['manifest_sha256']}.json",
        "--output_dir", "./outputs",
        *spec.training.train_py_args(),
    ]  # fmt: skip
    if spec.training.distributed == "ddp":
        arguments += ["--distributed", "ddp"]
    # Export and check ONNX on the cluster, where torch and the validation images already are.
    arguments += ["--export_onnx"]
    references = {
        "images": DataReferenceConfiguration(datastore_name=settings.images_datastore, mode="mount", path_on_datastore=spec.model),
        "manifests": DataReferenceConfiguration(datastore_name=settings.artifacts_datastore, mode="mount", path_on_datastore="manifests"),
    }
    if spec.init_checkpoint:
        # The champion's model.pt, as the registry stored it in the artifacts datastore.
        references["champion"] = DataReferenceConfiguration(
            datastore_name=settings.artifacts_datastore, mode="download", path_on_datastore=spec.init_checkpoint
        )
        arguments += ["--init_checkpoint", f"$AZUREML_DATAREFERENCE_champion/{Path(spec.init_checkpoint).name}"]
    src = ScriptRunConfig(
        source_directory=str(training_dir()),
        script="train.py",
        arguments=arguments,
        compute_target=settings.compute_target,
        environment=environment,
        distributed_job_config=distributed,
        max_run_duration_seconds=settings.max_run_seconds,
    )
    src.run_config.data_references = references
    return src


def serialized_run_config(src: Any) -> dict[str, Any]:
    """Exactly the run configuration Azure ML would receive (built offline)."""
    from azureml.core._serialization_utils import _serialize_to_dict
    from azureml.core.script_run_config import get_run_config_from_script_run

    return _serialize_to_dict(get_run_config_from_script_run(src))


class AzureMLBackend(TrainingBackend):
    def __init__(
        self,
        seam: AzureMLSeam,
        settings: AzureMLSettings,
        *,
        environment: Any = None,
        outputs_root: Path | None = None,
        worker_version: str = "0.1.0",
    ):
        self.seam, self.settings = seam, settings
        self._environment = environment
        self.outputs_root = outputs_root or Path(".retrain/azureml-outputs")
        self.worker_version = worker_version

    def _retrying(self) -> Retrying:
        return Retrying(
            retry=retry_if_exception(is_transient),
            wait=wait_random_exponential(multiplier=self.settings.retry_wait_seconds, max=30),
            stop=stop_after_attempt(8) | stop_after_delay(self.settings.submit_budget_seconds),
            reraise=True,
        )

    def _status(self, info: RunInfo) -> BackendStatus:
        state = map_status(info.status)
        outputs = str(self.outputs_root / info.run_id) if state == "succeeded" else None
        return BackendStatus(info.run_id, state, info.detail or info.status, outputs)  # type: ignore[arg-type]

    def submit(self, spec: RunSpec) -> BackendStatus:
        for attempt in self._retrying():
            with attempt:
                existing = self.seam.get_run(spec.backend_run_id)
                if existing is not None:  # submitted before (maybe by a call that timed out)
                    return self._status(existing)
                if self._environment is None:  # registered once per worker process, reused by version after
                    self._environment = self.seam.ensure_environment(build_environment(self.settings))
                environment = self._environment
                src = build_script_run_config(spec, self.settings, environment)
                tags = {**self.settings.extra_tags, **{k: str(v) for k, v in spec.tags.items()}, "worker_version": self.worker_version}
                info = self.seam.submit(self.settings.experiment, src, spec.backend_run_id, tags)
                log.info("submitted %s to %s on %s", spec.backend_run_id, self.settings.experiment, self.settings.compute_target)
                return self._status(info)
        raise AssertionError("unreachable")  # pragma: no cover

    def status(self, backend_run_id: str) -> BackendStatus:
        info = self.seam.get_run(backend_run_id)
        if info is None:
            return BackendStatus(backend_run_id, "unknown")
        status = self._status(info)
        if status.state == "succeeded":
            names = ["outputs/model.pt", "outputs/model.onnx", "outputs/onnx_report.json", "outputs/metrics.json"]
            self.seam.download_outputs(backend_run_id, names, self.outputs_root / backend_run_id)
        return status

    def cancel(self, backend_run_id: str) -> BackendStatus:
        info = self.seam.get_run(backend_run_id)
        if info is None:
            return BackendStatus(backend_run_id, "unknown")
        if map_status(info.status) in ("queued", "running"):
            self.seam.cancel(backend_run_id)
            info = self.seam.get_run(backend_run_id) or info
        return self._status(info)
