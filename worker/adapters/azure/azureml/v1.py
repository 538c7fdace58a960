"""Azure ML through azureml-core (SDK v1), as the reference article does it. Support for SDK v1
ended on 2026-06-30; workspaces still accept its submissions. Selected with `[azureml] sdk = "v1"`.

`V1Jobs` builds the real `ScriptRunConfig`: training/ as the source directory,
`PyTorchConfiguration(communication_backend='Nccl', node_count=N, process_count=N*G)` for DDP or
`MpiConfiguration(node_count=N, process_count_per_node=G)` for Horovod, the environment, the
compute target, and the run's inputs as datastore mounts (images, the frozen manifest, the
champion checkpoint). `WorkspaceSeam` makes the workspace, experiment, run and model calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.ports import RunSpec
from worker.training_code import training_dir

from .backend import AzureMLSettings
from .seam import AzureMLError, AzureMLSeam, RunInfo, error_from


class V1Jobs:
    """Builds what SDK v1 submits: an Environment and a ScriptRunConfig."""

    sdk = "v1"

    def environment(self, settings: AzureMLSettings, workspace: Any = None) -> Any:
        return build_environment(settings, workspace)

    def job(self, spec: RunSpec, settings: AzureMLSettings, environment: Any) -> Any:
        return build_script_run_config(spec, settings, environment)


def build_environment(settings: AzureMLSettings, workspace: Any = None) -> Any:
    """The curated environment by name, or training/requirements.txt on a CUDA base image."""
    from azureml.core import Environment

    if settings.training_image:  # training/environment/Dockerfile: everything installed, Horovod included
        env = Environment(settings.environment_name)
        env.docker.base_image = settings.training_image
        env.python.user_managed_dependencies = True
        return env
    if settings.curated_environment:
        if workspace is None:
            raise ValueError("a curated environment is looked up in a workspace")
        name, _, version = settings.curated_environment.removeprefix("azureml:").rpartition(":")
        return Environment.get(workspace=workspace, name=name, version=version)
    env = Environment.from_pip_requirements(settings.environment_name, str(training_dir() / "requirements.txt"))
    env.docker.base_image = settings.base_image
    return env


def build_script_run_config(spec: RunSpec, settings: AzureMLSettings, environment: Any) -> Any:
    """The real azureml-core ScriptRunConfig for one attempt of a run."""
    from azureml.core import ScriptRunConfig
    from azureml.core.runconfig import DataReferenceConfiguration, MpiConfiguration, PyTorchConfiguration

    nodes, gpus = settings.node_count, settings.gpus_per_node
    distributed: Any
    if spec.training.distributed == "horovod":
        distributed = MpiConfiguration(node_count=nodes, process_count_per_node=gpus)
    elif spec.training.distributed == "none":
        distributed = None  # one process on one node: no launcher, train.py runs as the script
    else:
        distributed = PyTorchConfiguration(communication_backend="Nccl", node_count=nodes, process_count=nodes * gpus)
    arguments = [
        "--data_dir", "$AZUREML_DATAREFERENCE_images",
        "--manifest", f"$AZUREML_DATAREFERENCE_manifests/{spec.tags['manifest_sha256']}.json",
        "--manifest_sha256", spec.tags["manifest_sha256"],
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

    document: dict[str, Any] = _serialize_to_dict(get_run_config_from_script_run(src))
    return document


class WorkspaceSeam(AzureMLSeam):
    """The real calls, against a `azureml.core.Workspace`. Not exercised offline: the fake is."""

    def __init__(self, workspace: Any):
        self.workspace = workspace

    def _wrap(self, what: str, exc: Exception) -> AzureMLError:
        return error_from(what, exc)

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

    def register_model(self, name: str, path: Path, tags: dict[str, str], properties: dict[str, str], version: int | None = None) -> int:
        from azureml.core import Model

        # azureml-core's Model.register numbers versions itself: `version` cannot be honoured (see the registry).

        model = Model.register(
            self.workspace, model_path=str(path), model_name=name, tags=tags, properties=properties, model_framework="PyTorch"
        )
        return int(model.version)

    def tag_champion(self, name: str, version: int) -> None:
        from azureml.core import Model

        for model in Model.list(self.workspace, name=name, tags=[["champion", "true"]]):
            if model.version != version:
                model.remove_tags(["champion"])
        Model(self.workspace, name=name, version=version).add_tags({"champion": "true"})

    def champion_version(self, name: str) -> int | None:
        from azureml.core import Model

        return max((m.version for m in Model.list(self.workspace, name=name, tags=[["champion", "true"]])), default=None)


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
