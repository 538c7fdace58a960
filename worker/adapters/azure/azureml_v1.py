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

import abc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_random_exponential

from shared.messages import normalize_status
from shared.redact import redact
from worker.ports import BackendStatus, ModelRegistry, PermanentBackendError, RegisteredModel, RunSpec, TrainingBackend
from worker.snapshot import training_dir

log = logging.getLogger("retrain.azureml")


def map_status(azure_status: str) -> str:
    """Azure ML's status names -> ours (NotResponding is not terminal; shared with the Event Grid path)."""
    try:
        return normalize_status(azure_status or "")
    except ValueError:
        return "unknown"


class AzureMLError(RuntimeError):
    """An Azure ML call failed. `status_code` when the service answered; the message is redacted."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(redact(message))
        self.status_code = status_code


class PermanentSubmitError(AzureMLError, PermanentBackendError):
    """Retrying cannot help (bad request, no permission, missing compute): the run is marked submit_failed."""


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, PermanentSubmitError):
        return False
    if isinstance(exc, AzureMLError):
        return exc.status_code is None or exc.status_code == 429 or exc.status_code >= 500
    return isinstance(exc, TimeoutError | ConnectionError)


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    status: str  # Azure ML's status name
    detail: str = ""


class AzureMLSeam(abc.ABC):
    """The workspace / experiment / run / model calls, and nothing else."""

    @abc.abstractmethod
    def get_run(self, run_id: str) -> RunInfo | None: ...

    @abc.abstractmethod
    def submit(self, experiment: str, config: Any, run_id: str, tags: dict[str, str]) -> RunInfo: ...

    @abc.abstractmethod
    def ensure_environment(self, environment: Any) -> Any:
        """Register the environment once (a new version only when its definition changes) and return it."""

    @abc.abstractmethod
    def cancel(self, run_id: str) -> None: ...

    @abc.abstractmethod
    def download_outputs(self, run_id: str, names: list[str], dest: Path) -> Path: ...

    @abc.abstractmethod
    def find_model(self, name: str, run_id: str) -> int | None: ...

    @abc.abstractmethod
    def register_model(self, name: str, path: Path, tags: dict[str, str], properties: dict[str, str]) -> int: ...

    @abc.abstractmethod
    def tag_champion(self, name: str, version: int) -> None: ...

    @abc.abstractmethod
    def champion_version(self, name: str) -> int | None: ...


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


class WorkspaceSeam(AzureMLSeam):
    """The real calls, against a `azureml.core.Workspace`. Not exercised offline: the fake is."""

    def __init__(self, workspace: Any):
        self.workspace = workspace

    def _wrap(self, what: str, exc: Exception) -> AzureMLError:
        status = getattr(getattr(exc, "response", None), "status_code", None) or getattr(exc, "status_code", None)
        cls = PermanentSubmitError if status in (400, 401, 403, 404) else AzureMLError
        return cls(f"{what}: {exc.__class__.__name__}: {exc}", status)

    def get_run(self, run_id: str) -> RunInfo | None:
        from azureml.core import Run

        try:
            run = Run.get(self.workspace, run_id)
        except Exception as exc:
            if "not found" in str(exc).lower() or getattr(getattr(exc, "response", None), "status_code", None) == 404:
                return None
            raise self._wrap(f"looking up run {run_id}", exc) from None
        details = run.get_details()
        error = (details.get("error") or {}).get("error", {}).get("message", "")
        return RunInfo(run_id, run.get_status(), error)

    def submit(self, experiment: str, config: Any, run_id: str, tags: dict[str, str]) -> RunInfo:
        from azureml.core import Experiment

        try:
            run = Experiment(self.workspace, experiment).submit(config, tags=tags, run_id=run_id)
            run.add_properties(tags)  # properties are immutable once set: the lineage stays as submitted
        except Exception as exc:
            raise self._wrap(f"submitting {run_id}", exc) from None
        return RunInfo(run.id, run.get_status())

    def ensure_environment(self, environment: Any) -> Any:
        if getattr(environment, "version", None):  # a curated or already registered environment
            return environment
        return environment.register(workspace=self.workspace)

    def cancel(self, run_id: str) -> None:
        from azureml.core import Run

        Run.get(self.workspace, run_id).cancel()

    def download_outputs(self, run_id: str, names: list[str], dest: Path) -> Path:
        from azureml.core import Run

        run = Run.get(self.workspace, run_id)
        dest.mkdir(parents=True, exist_ok=True)
        for name in names:
            target = dest / Path(name).name
            if not target.exists():
                run.download_file(name, output_file_path=str(target))
        return dest

    def find_model(self, name: str, run_id: str) -> int | None:
        from azureml.core import Model

        found = Model.list(self.workspace, name=name, tags=[["run_id", run_id]])
        return max((m.version for m in found), default=None)

    def register_model(self, name: str, path: Path, tags: dict[str, str], properties: dict[str, str]) -> int:
        from azureml.core import Model

        model = Model.register(
            self.workspace, model_path=str(path), model_name=name, tags=tags, properties=properties, model_framework="PyTorch"
        )
        return model.version

    def tag_champion(self, name: str, version: int) -> None:
        from azureml.core import Model

        for model in Model.list(self.workspace, name=name, tags=[["champion", "true"]]):
            if model.version != version:
                model.remove_tags(["champion"])
        Model(self.workspace, name=name, version=version).add_tags({"champion": "true"})

    def champion_version(self, name: str) -> int | None:
        from azureml.core import Model

        return max((m.version for m in Model.list(self.workspace, name=name, tags=[["champion", "true"]])), default=None)


class AzureMLModelRegistry(ModelRegistry):
    """Registers model.pt + model.onnx (+ card, report) as one Azure ML model version per run.

    Idempotent by run id: a version tagged with the run id is returned instead of a new one.
    SDK v1 models have no aliases, so `champion` is a tag moved by `set_champion`; the ledger
    stays the source of truth.
    """

    def __init__(self, seam: AzureMLSeam, staging: Path, artifacts: Any = None):
        self.seam, self.staging = seam, staging
        self.artifacts = artifacts  # BlobStore of the artifacts datastore: champion checkpoints for warm starts

    def register(self, model: str, run_id: str, files: dict[str, Path], card: dict[str, Any]):
        import json
        import shutil

        version = self.seam.find_model(model, run_id)
        if version is None:
            folder = self.staging / run_id
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for name, source in files.items():
                shutil.copyfile(source, folder / name)
            (folder / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
            metrics = card.get("metrics", {})
            tags = {
                "run_id": run_id,
                "manifest_sha256": card.get("manifest", {}).get("sha256", ""),
                "parent_version": str(card.get("parent_version") or ""),
            }
            properties = {
                k: str(v)
                for k, v in {**metrics, "model_sha256": card.get("artifacts", {}).get("model.pt", {}).get("sha256")}.items()
                if v is not None
            }
            version = self.seam.register_model(model, folder, tags, properties)
        if self.artifacts is not None and "model.pt" in files:
            # The next run mounts this as --init_checkpoint (datastore path, see champion_path).
            self.artifacts.write_once(self.champion_path(model, version), Path(files["model.pt"]).read_bytes())
        return RegisteredModel(model, version, run_id, f"azureml://models/{model}/versions/{version}", {})

    def set_champion(self, model: str, version: int) -> None:
        self.seam.tag_champion(model, version)

    def champion_alias(self, model: str) -> int | None:
        return self.seam.champion_version(model)

    def warm_start_checkpoint(self, model: str, version: int) -> str | None:
        # The path in the artifacts datastore that register() copied model.pt to; none without one.
        return self.champion_path(model, version) if self.artifacts is not None else None

    @staticmethod
    def champion_path(model: str, version: int) -> str:
        return f"champions/{model}/{version}/model.pt"


def settings_from_config(cfg: Any) -> AzureMLSettings:
    return AzureMLSettings(
        experiment=cfg.experiment, compute_target=cfg.compute_target, node_count=cfg.node_count, gpus_per_node=cfg.gpus_per_node,
        curated_environment=cfg.curated_environment, base_image=cfg.base_image, images_datastore=cfg.images_datastore,
        artifacts_datastore=cfg.artifacts_datastore, submit_budget_seconds=cfg.submit_budget_seconds,
    )  # fmt: skip


def authentication(cfg: Any, env: Any) -> Any:
    """Service principal, managed identity or the interactive default, chosen by settings."""
    from azureml.core.authentication import InteractiveLoginAuthentication, MsiAuthentication, ServicePrincipalAuthentication

    if cfg.auth == "service_principal":
        secret = env.get(cfg.client_secret_env)
        if not (cfg.tenant_id and cfg.client_id and secret):
            raise ValueError(f"service_principal auth needs azureml.tenant_id, azureml.client_id and ${cfg.client_secret_env}")
        return ServicePrincipalAuthentication(
            tenant_id=cfg.tenant_id, service_principal_id=cfg.client_id, service_principal_password=secret
        )
    if cfg.auth == "managed_identity":
        return MsiAuthentication(identity_config={"client_id": cfg.client_id} if cfg.client_id else None)
    return InteractiveLoginAuthentication(tenant_id=cfg.tenant_id)


def load_workspace(cfg: Any, env: Any) -> Any:
    """The workspace from config.json or from subscription / resource group / name (network)."""
    from azureml.core import Workspace

    auth = authentication(cfg, env)
    if cfg.config_path:
        return Workspace.from_config(path=cfg.config_path, auth=auth)
    if not (cfg.subscription_id and cfg.resource_group and cfg.workspace_name):
        raise ValueError("set azureml.config_path, or azureml.subscription_id, resource_group and workspace_name")
    return Workspace.get(name=cfg.workspace_name, subscription_id=cfg.subscription_id, resource_group=cfg.resource_group, auth=auth)


def compute_provisioning(cfg: Any) -> Any:
    """The AmlCompute cluster the article creates, from settings (built offline, created by ensure_compute)."""
    from azureml.core.compute import AmlCompute

    return AmlCompute.provisioning_configuration(
        vm_size=cfg.vm_size,
        min_nodes=cfg.min_nodes,
        max_nodes=cfg.max_nodes,
        idle_seconds_before_scaledown=cfg.idle_seconds_before_scaledown,
    )


def ensure_compute(workspace: Any, cfg: Any) -> Any:
    from azureml.core.compute import ComputeTarget
    from azureml.exceptions import ComputeTargetException

    try:
        return ComputeTarget(workspace=workspace, name=cfg.compute_target)
    except ComputeTargetException:
        if not cfg.create_compute:
            raise
    target = ComputeTarget.create(workspace, cfg.compute_target, compute_provisioning(cfg))
    target.wait_for_completion(show_output=False, timeout_in_minutes=20)
    return target
