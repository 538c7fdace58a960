"""Azure ML through azure-ai-ml (SDK v2), the supported path and the default (`[azureml] sdk = "v2"`).

`V2Jobs` builds the real `command()` job for one attempt of a run: training/ as `code`, the images
folder, the frozen manifest and (for a warm start) the champion's model.pt as inputs on their
datastores, a named `outputs` folder, `PyTorchDistribution(process_count_per_instance=G)` for DDP
or `MpiDistribution(process_count_per_instance=G)` for Horovod with `instance_count=N`, the
environment, the compute, and the run id as the job's name. Azure ML launches one process per
GPU and sets RANK, WORLD_SIZE, LOCAL_RANK, NODE_RANK, MASTER_ADDR and MASTER_PORT (PyTorch) or the
Open MPI variables Horovod reads (MPI): train.py's topology takes either.

`MLClientSeam` makes the calls through an `MLClient`: get-then-create by name, with a create that
loses a race ("already exists") resolved by reading the job that won; outputs downloaded by
output name; models registered as `custom_model` (the files are retrain's checkpoint, ONNX export
and card, not an MLflow model: nothing serves it through MLflow's flavours), found by their
`run_id` tag, the champion marked with a `champion` tag.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from shared.run_ids import seq_of
from worker.ports import RunSpec
from worker.training_code import training_dir

from .backend import AzureMLSettings
from .seam import AzureMLError, AzureMLSeam, PermanentSubmitError, RunInfo, error_from
from .seam import status_code as _status_code

# Azure ML job names: letters, digits, '-' and '_', starting with a letter or digit, at most 255.
JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,254}$")
OUTPUT_NAME = "outputs"
AZUREML_MLFLOW = "1.62.0.post6"


def check_job_name(name: str) -> str:
    if not JOB_NAME.fullmatch(name):
        raise PermanentSubmitError(f"{name!r} cannot be an Azure ML job name (letters, digits, '-' and '_'; at most 255)")
    return name


def datastore_uri(datastore: str, path: str) -> str:
    return f"azureml://datastores/{datastore}/paths/{path.strip('/')}"


class V2Jobs:
    """Builds what SDK v2 submits: an Environment entity (or a curated one by name) and a command job."""

    sdk = "v2"

    def environment(self, settings: AzureMLSettings) -> Any:
        return build_environment(settings)

    def job(self, spec: RunSpec, settings: AzureMLSettings, environment: Any) -> Any:
        return build_command_job(spec, settings, environment)


def build_environment(settings: AzureMLSettings) -> Any:
    """The training image (training/environment/Dockerfile: the dependencies and Horovod), a
    curated environment pinned by version (`azureml:<name>:<version>`), or training/requirements.txt
    as a conda file on the CUDA base image; an entity is registered once per worker."""
    from azure.ai.ml.entities import Environment

    if settings.training_image:
        return Environment(name=settings.environment_name, image=settings.training_image, description="retrain training image")
    if settings.curated_environment:
        name = settings.curated_environment
        return name if name.startswith("azureml:") else f"azureml:{name}"
    requirements = [line.strip() for line in (training_dir() / "requirements.txt").read_text().splitlines()]
    # azureml-mlflow lets train.py's MLflow calls reach the workspace (the job sets MLFLOW_TRACKING_URI).
    pip = [r for r in requirements if r and not r.startswith("#")] + [f"azureml-mlflow=={AZUREML_MLFLOW}"]
    conda = {"name": settings.environment_name, "channels": ["conda-forge"], "dependencies": ["python=3.11", "pip", {"pip": pip}]}
    return Environment(name=settings.environment_name, image=settings.base_image, conda_file=conda, description="retrain training")


def build_command_job(spec: RunSpec, settings: AzureMLSettings, environment: Any) -> Any:
    """The real azure-ai-ml command job for one attempt of a run."""
    from azure.ai.ml import Input, MpiDistribution, Output, PyTorchDistribution, command
    from azure.ai.ml.constants import AssetTypes, InputOutputModes

    name = check_job_name(spec.backend_run_id)
    manifest = f"manifests/{spec.tags['manifest_sha256']}.json"
    inputs: dict[str, Any] = {
        "images": Input(type=AssetTypes.URI_FOLDER, path=datastore_uri(settings.images_datastore, spec.model), mode=InputOutputModes.RO_MOUNT),
        "manifest": Input(type=AssetTypes.URI_FILE, path=datastore_uri(settings.artifacts_datastore, manifest), mode=InputOutputModes.DOWNLOAD),
    }  # fmt: skip
    args = [
        "python", "train.py",
        "--data_dir", "${{inputs.images}}",
        "--manifest", "${{inputs.manifest}}",
        "--manifest_sha256", spec.tags["manifest_sha256"],
        "--output_dir", "${{outputs." + OUTPUT_NAME + "}}",
        *spec.training.train_py_args(),
    ]  # fmt: skip
    instances = settings.node_count
    distribution: Any
    if spec.training.distributed == "horovod" and not settings.training_image:
        raise PermanentSubmitError(
            "Horovod jobs need azureml.training_image (training/environment/Dockerfile, built in the workspace's registry): "
            "the curated and the default environments have no Horovod"
        )
    if spec.training.distributed == "horovod":
        distribution = MpiDistribution(process_count_per_instance=settings.gpus_per_node)
    elif spec.training.distributed == "none":
        distribution, instances = None, 1  # one process on one node (train_py_args says --distributed none)
    else:
        distribution = PyTorchDistribution(process_count_per_instance=settings.gpus_per_node)
        args += ["--distributed", "ddp"]
    # Export and check ONNX on the cluster, where torch and the validation images already are.
    args += ["--export_onnx"]
    if spec.init_checkpoint:
        # The champion's model.pt, as the registry copied it to the artifacts datastore.
        inputs["champion"] = Input(
            type=AssetTypes.URI_FILE, path=datastore_uri(settings.artifacts_datastore, spec.init_checkpoint), mode=InputOutputModes.DOWNLOAD
        )
        args += ["--init_checkpoint", "${{inputs.champion}}"]
    tags = {k: str(v) for k, v in spec.tags.items()}
    return command(
        name=name,
        display_name=name,
        experiment_name=settings.experiment,
        description=f"retrain {spec.model}: {spec.tags.get('run_id', name)}",
        code=str(training_dir()),
        command=" ".join(args),
        inputs=inputs,
        outputs={OUTPUT_NAME: Output(type=AssetTypes.URI_FOLDER, mode=InputOutputModes.RW_MOUNT)},
        environment=environment,
        compute=settings.compute_target,
        instance_count=instances,
        distribution=distribution,
        timeout=settings.max_run_seconds,
        tags=tags,
        properties=tags,  # properties cannot change after creation: the lineage stays as submitted
        environment_variables={"PYTHONUNBUFFERED": "1", "RETRAIN_RUN_ID": name},
        identity=_job_identity(settings),
    )


def _job_identity(settings: AzureMLSettings) -> Any:
    """The cluster's identity when configured: it reads the credential-less datastores (infra/ grants
    it Storage Blob Data Reader on the two containers); else Azure ML's default for the compute."""
    from azure.ai.ml.entities import ManagedIdentityConfiguration

    if not settings.job_identity_client_id:
        return None
    return ManagedIdentityConfiguration(client_id=settings.job_identity_client_id)


def job_document(job: Any) -> dict[str, Any]:
    """The job as Azure ML would receive it (its YAML form, as `az ml job show` prints it), built offline."""
    document: dict[str, Any] = job._to_job()._to_dict()
    return document


def _already_exists(exc: BaseException) -> bool:
    from azure.core.exceptions import ResourceExistsError

    text = str(exc).lower()
    return isinstance(exc, ResourceExistsError) or _status_code(exc) == 409 or "already exists" in text


class MLClientSeam(AzureMLSeam):
    """The real calls through an `azure.ai.ml.MLClient` (tests pass a fake client with the same methods)."""

    def __init__(self, client: Any, staging: Path | None = None):
        self.client = client
        self.staging = staging or Path(tempfile.gettempdir()) / "retrain-azureml"

    def _wrap(self, what: str, exc: BaseException) -> AzureMLError:
        return error_from(what, exc)

    def get_run(self, run_id: str) -> RunInfo | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            job = self.client.jobs.get(run_id)
        except ResourceNotFoundError:
            return None
        except Exception as exc:
            if _status_code(exc) == 404:
                return None
            raise self._wrap(f"looking up job {run_id}", exc) from None
        error = getattr(job, "error", None)
        return RunInfo(job.name, str(job.status or "Unknown"), str(getattr(error, "message", "") or ""))

    def submit(self, experiment: str, config: Any, run_id: str, tags: dict[str, str]) -> RunInfo:
        config.tags = {**(config.tags or {}), **tags}
        try:
            job = self.client.jobs.create_or_update(config, experiment_name=experiment)
        except Exception as exc:
            if _already_exists(exc):  # another submit created it first: that job is the one
                existing = self.get_run(run_id)
                if existing is not None:
                    return existing
            raise self._wrap(f"submitting {run_id}", exc) from None
        return RunInfo(job.name, str(job.status or "NotStarted"))

    def ensure_environment(self, environment: Any) -> Any:
        if isinstance(environment, str):  # a curated environment by reference
            return environment
        try:
            return self.client.environments.create_or_update(environment)  # a new version only when it changed
        except Exception as exc:
            raise self._wrap(f"registering environment {environment.name}", exc) from None

    def cancel(self, run_id: str) -> None:
        try:
            self.client.jobs.begin_cancel(run_id).result()
        except Exception as exc:
            raise self._wrap(f"canceling {run_id}", exc) from None

    def download_outputs(self, run_id: str, names: list[str], dest: Path) -> Path:
        """The job's `outputs` folder, then the named files copied flat into `dest`."""
        wanted = {Path(n).name for n in names}
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            try:
                self.client.jobs.download(run_id, download_path=tmp, output_name=OUTPUT_NAME)
            except Exception as exc:
                raise self._wrap(f"downloading the outputs of {run_id}", exc) from None
            for root, _dirs, files in os.walk(tmp):
                for file in files:
                    if file in wanted and not (dest / file).exists():
                        shutil.copyfile(Path(root) / file, dest / file)
        return dest

    def _version_of_run(self, name: str, version: int, run_id: str) -> int | None:
        """`version` if that version of `name` exists and was registered for `run_id`; None if it does
        not exist; an error if another run holds it (a ledger that does not match this registry)."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            found = self.client.models.get(name=name, version=str(version))
        except ResourceNotFoundError:
            return None
        except Exception as exc:
            if _status_code(exc) == 404:
                return None
            raise self._wrap(f"looking up {name} version {version}", exc) from None
        owner = (found.tags or {}).get("run_id")
        if owner != run_id:
            raise PermanentSubmitError(f"{name} version {version} is registered for run {owner!r}, not {run_id!r}")
        return version

    def find_model(self, name: str, run_id: str) -> int | None:
        from azure.core.exceptions import ResourceNotFoundError

        seq = seq_of(run_id)
        if seq is not None:
            try:
                own = self._version_of_run(name, seq, run_id)
            except PermanentSubmitError:  # that version is another run's: look for ours by its tag below
                own = None
            if own is not None:
                return own
        try:  # registrations made before versions were the run's sequence number
            models = list(self.client.models.list(name=name))
        except ResourceNotFoundError:
            return None
        return max((int(m.version) for m in models if (m.tags or {}).get("run_id") == run_id), default=None)

    def register_model(self, name: str, path: Path, tags: dict[str, str], properties: dict[str, str], version: int | None = None) -> int:
        from azure.ai.ml.constants import AssetTypes
        from azure.ai.ml.entities import Model

        entity = Model(name=name, path=str(path), type=AssetTypes.CUSTOM_MODEL, tags=tags, properties=properties,
                       version=str(version) if version is not None else None,
                       description=f"retrain run {tags.get('run_id', '')}")  # fmt: skip
        try:
            return int(self.client.models.create_or_update(entity).version)
        except Exception as exc:
            # Another completion of the same run registered this version first (its files were
            # uploaded to another path, so the service refuses ours): that version is the one.
            if version is not None and self._version_of_run(name, version, tags.get("run_id", "")) is not None:
                return version
            raise self._wrap(f"registering {name}", exc) from None

    def tag_champion(self, name: str, version: int) -> None:
        for model in self.client.models.list(name=name):
            tags = dict(model.tags or {})
            is_new = int(model.version) == version
            if (tags.get("champion") == "true") != is_new:
                if is_new:
                    tags["champion"] = "true"
                else:
                    tags.pop("champion", None)
                model.tags = tags
                self.client.models.create_or_update(model)

    def champion_version(self, name: str) -> int | None:
        return max((int(m.version) for m in self.client.models.list(name=name) if (m.tags or {}).get("champion") == "true"), default=None)


def credential(cfg: Any, env: Any) -> Any:
    """Managed identity (default), a service principal, or the developer's DefaultAzureCredential."""
    from azure.identity import ClientSecretCredential, DefaultAzureCredential, InteractiveBrowserCredential, ManagedIdentityCredential

    if cfg.auth == "service_principal":
        secret = env.get(cfg.client_secret_env)
        if not (cfg.tenant_id and cfg.client_id and secret):
            raise ValueError(f"service_principal auth needs azureml.tenant_id, azureml.client_id and ${cfg.client_secret_env}")
        return ClientSecretCredential(cfg.tenant_id, cfg.client_id, secret)
    if cfg.auth == "managed_identity":
        return ManagedIdentityCredential(client_id=cfg.client_id) if cfg.client_id else DefaultAzureCredential()
    return InteractiveBrowserCredential(tenant_id=cfg.tenant_id) if cfg.tenant_id else DefaultAzureCredential()


def ml_client(cfg: Any, env: Any) -> Any:
    """The MLClient from a workspace config.json or from subscription / resource group / name."""
    from azure.ai.ml import MLClient

    if cfg.config_path:
        return MLClient.from_config(credential(cfg, env), path=cfg.config_path)
    return MLClient(credential(cfg, env), cfg.subscription_id, cfg.resource_group, cfg.workspace_name)


def compute_cluster(cfg: Any) -> Any:
    """The AmlCompute cluster from settings (built offline, created by ensure_compute when asked)."""
    from azure.ai.ml.entities import AmlCompute

    return AmlCompute(
        name=cfg.compute_target, size=cfg.vm_size, min_instances=cfg.min_nodes, max_instances=cfg.max_nodes,
        idle_time_before_scale_down=cfg.idle_seconds_before_scaledown,
    )  # fmt: skip


def ensure_compute(client: Any, cfg: Any) -> None:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        client.compute.get(cfg.compute_target)
    except ResourceNotFoundError:
        if not cfg.create_compute:
            raise
        client.compute.begin_create_or_update(compute_cluster(cfg)).result()
