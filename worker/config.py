"""Configuration: a TOML file with one section per model, environment overrides, strict validation.

    [worker]
    state_dir = ".retrain"
    [models.birds]
    min_new_images = 50
    quiet_period = "30s"
    [models.birds.training]
    epochs = 8

Any value can be overridden from the environment with `RETRAIN__<SECTION>__<KEY>=value`, e.g.
`RETRAIN__MODELS__BIRDS__MIN_NEW_IMAGES=10` or `RETRAIN__WORKER__STATE_DIR=/data/retrain`. A model
whose name has a '-' is written with '_' there (app setting names allow no '-'): `bird-cam` is
`RETRAIN__MODELS__BIRD_CAM__...`.
Durations accept seconds or "90s", "5m", "1h", "2d". Everything is validated at start and every
problem is reported at once.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from shared.errors import ConfigError
from shared.messages import MODEL_NAME_PATTERN

ENV_PREFIX = "RETRAIN__"
MODELS_ENV = "RETRAIN_MODELS"  # the models an environment-only configuration declares (comma-separated)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_S = 366 * 86400.0  # a year and a day: longer knobs are mistakes, and datetime arithmetic overflows on absurd ones


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '90s', '5m', '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value)
        if not match:
            raise ValueError(f"{value!r} is not a duration (use seconds or '90s', '5m', '1h', '2d')")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        raise ValueError("a duration is a number of seconds or a string like '90s', '5m', '1h'")
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"{value!r} is longer than the longest duration allowed, 366 days")
    return seconds


Seconds = Annotated[float, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrainingConfig(_Section):
    """What each run of this model trains (train.py arguments)."""

    epochs: int = Field(8, ge=1, le=1000)
    batch_size: int = Field(16, ge=1, le=4096)
    image_size: int = Field(64, ge=16, le=1024)
    learning_rate: float = Field(0.01, gt=0, le=10)
    nproc: int = Field(2, ge=1, le=64, description="processes per run (torchrun --nproc_per_node)")
    distributed: Literal["ddp", "horovod", "none"] = "ddp"
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    extra: tuple[str, ...] = ()

    @field_validator("extra", mode="before")
    @classmethod
    def _json_list(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) and value.startswith("[") else value


class GateConfig(_Section):
    """When a trained model replaces the champion (see README, "Completion")."""

    metric: str = "best_val_acc"
    min_value: float = Field(0.6, ge=0, le=1, description="never register a model below this")
    min_improvement: float = Field(0.0, ge=-1, le=1, description="0: strictly better than the champion on the same validation set")
    onnx_tolerance: float = Field(1e-4, gt=0, description="largest |PyTorch - onnxruntime| logit difference accepted")
    onnx_samples: int = Field(32, ge=1, le=1024)


class ModelConfig(_Section):
    """The retrain policy's knobs for one model (see README, "The policy")."""

    images_dir: str | None = Field(None, description="folder scanned as <label>/<file>; default <worker.images_root>/<model>")
    min_new_images: int = Field(50, ge=1, description="new images needed before a run")
    min_per_class: int = Field(5, ge=1, description="training images every class needs (in the whole data set)")
    min_classes: int = Field(2, ge=2, description="classes needed before a first run")
    quiet_period: Seconds = Field(60.0, description="no new image for this long before a run (debounce)")
    max_wait: Seconds | None = Field(3600.0, description="run anyway once the oldest pending image is this old")
    cooldown: Seconds = Field(300.0, description="pause after a run finishes before the next one")
    in_flight: Literal["coalesce", "queue", "drop"] = "coalesce"
    max_gpu_hours_per_day: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="a cost guard: no new run while the runs of the last 24 h used this many GPU-hours (forced requests need override_budget)",
    )
    max_attempts: int = Field(3, ge=1, le=20, description="attempts per run (1 = no retry)")
    retry_backoff: Seconds = Field(60.0, description="wait before retry n is backoff * 2**(n-1)")
    backoff_after_failed_runs: int = Field(3, ge=1, le=100, description="consecutive failed runs before the model backs off")
    failure_backoff: Seconds = Field(900.0, description="the first back-off; it doubles with each further failed run")
    failure_backoff_max: Seconds = Field(86400.0, description="the longest back-off")
    run_timeout: Seconds = Field(172800.0, gt=0, description="a run still unfinished this long after submission is canceled and fails")
    training_data: Literal["all", "new"] = Field("all", description="train on all images so far, or only the new ones")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    training: TrainingConfig = TrainingConfig()
    gate: GateConfig = GateConfig()


class AzureMLConfig(_Section):
    """Where and how runs go when `worker.backend = "azureml"` (see README, "Deploy to Azure")."""

    sdk: Literal["v2", "v1"] = Field(
        "v2", description="v2: azure-ai-ml command jobs (supported); v1: azureml-core ScriptRunConfig (out of support since 2026-06-30)"
    )
    config_path: str | None = Field(None, description="a workspace config.json; else the three ids below")
    subscription_id: str | None = None
    resource_group: str | None = None
    workspace_name: str | None = None
    auth: Literal["interactive", "service_principal", "managed_identity"] = "managed_identity"
    tenant_id: str | None = None
    client_id: str | None = Field(None, description="service principal or user-assigned identity client id")
    client_secret_env: str = Field("AZUREML_CLIENT_SECRET", description="the environment variable holding the service principal secret")
    experiment: str = "retrain"
    compute_target: str = "gpu-cluster"
    create_compute: bool = Field(False, description="create the cluster if it does not exist")
    vm_size: str = "Standard_NC4as_T4_v3"
    min_nodes: int = Field(0, ge=0)
    max_nodes: int = Field(2, ge=1)
    idle_seconds_before_scaledown: int = Field(1800, ge=60)
    node_count: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=1)
    curated_environment: str | None = Field(
        None,
        description="a curated environment pinned to a version, 'name:version' (e.g. AzureML-acpt-pytorch-2.2-cuda12.1:23); "
        "'@latest' is refused: it changes under a running deployment. DDP only (no curated image has Horovod)",
    )
    training_image: str | None = Field(
        None,
        description="a Docker image with train.py's dependencies and Horovod (training/environment/Dockerfile, built in the "
        "workspace's registry), e.g. <acr>.azurecr.io/retrain-training:2.14.1-hvd0.28.1; needed for Horovod jobs",
    )
    job_identity_client_id: str | None = Field(
        None, description="the cluster's user-assigned identity: jobs read the credential-less datastores with it"
    )
    base_image: str = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04"
    images_datastore: str = "images"
    artifacts_datastore: str = "retrain"
    submit_budget_seconds: float = Field(240.0, gt=0, le=540, description="all retries of one submit; below the Functions timeout")

    @field_validator("training_image", "job_identity_client_id", "curated_environment", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # An app setting set to "" (a Bicep parameter left empty) means "not set".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("curated_environment")
    @classmethod
    def _pinned(cls, value: str | None) -> str | None:
        if value is None:
            return value
        name = value.removeprefix("azureml:")
        if "@" in name or ":" not in name or not name.rsplit(":", 1)[1]:
            raise ValueError(
                f"pin the curated environment to a version, 'name:version' (not {value!r}): a label such as @latest changes under you"
            )
        return value

    @field_validator("training_image")
    @classmethod
    def _tagged(cls, value: str | None) -> str | None:
        if value is None:
            return value
        last = value.rsplit("/", 1)[-1]
        if "@sha256:" not in value and (":" not in last or last.endswith(":latest")):
            raise ValueError(f"give the training image a version tag or digest (not {value!r}): ':latest' changes under you")
        return value


class WorkerConfig(_Section):
    state_dir: Path = Path(".retrain")
    images_root: Path = Path("images")
    tick_seconds: Seconds = 2.0
    scan_seconds: Seconds = 2.0
    backend: Literal["local", "azureml"] = "local"
    tracking: Literal["none", "mlflow"] = Field(
        "none",
        description="mlflow: local runs log params, per-epoch metrics and results to sqlite:///<state_dir>/mlflow.db (needs "
        "retrain[tracking] where training runs; the full `mlflow` package's `mlflow ui` shows them). Azure ML v2 jobs always log "
        "to the workspace's MLflow.",
    )
    store: Literal["sqlite", "table"] = Field(
        "sqlite", description="the ledger: a SQLite file in state_dir, or Azure Table Storage (RETRAIN_TABLES)"
    )
    table_name: str = Field("retrain", pattern=r"^[A-Za-z][A-Za-z0-9]{2,62}$")
    sqlite_synchronous: Literal["NORMAL", "FULL"] = Field(
        "NORMAL", description="NORMAL: a commit survives a crash of the process; FULL: also a power cut (an fsync per commit)"
    )
    events_file: Path | None = Field(None, description="JSON lines sink for published events; default <state_dir>/events.jsonl")
    registry_dir: Path | None = Field(None, description="local model registry; default <state_dir>/registry")
    evaluate_interval: Seconds = Field(
        1.0,
        description="on a staged-ingest ledger (Table Storage), evaluate the policy after an image at most this often per model and instance (ticks always evaluate)",
    )
    inbox_retention: Seconds = Field(
        8 * 86400.0,
        description="how long processed message ids are kept (longer than Service Bus's 7-day duplicate window and Event Grid's 24 h retries)",
    )
    export_in_process: bool = Field(
        True, description="export ONNX inside the worker (imports torch once) or in a subprocess per completion"
    )


class RetrainConfig(_Section):
    worker: WorkerConfig = WorkerConfig()
    azureml: AzureMLConfig = AzureMLConfig()
    models: dict[Annotated[str, Field(pattern=MODEL_NAME_PATTERN)], ModelConfig] = Field(default_factory=lambda: {"birds": ModelConfig()})

    @field_validator("models")
    @classmethod
    def _at_least_one(cls, value: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        if not value:
            raise ValueError("configure at least one model under [models.<name>]")
        return value

    def model(self, name: str) -> ModelConfig:
        return self.models[name]

    def gpus_per_run(self, name: str) -> int:
        """What one run occupies: nodes x GPUs on Azure ML, processes (one device each) locally."""
        if self.worker.backend == "azureml":
            return self.azureml.node_count * self.azureml.gpus_per_node
        return self.models[name].training.nproc

    def images_dir(self, name: str) -> Path:
        configured = self.models[name].images_dir
        return Path(configured) if configured else self.worker.images_root / name

    @property
    def events_file(self) -> Path:
        return self.worker.events_file or self.worker.state_dir / "events.jsonl"

    @property
    def registry_dir(self) -> Path:
        return self.worker.registry_dir or self.worker.state_dir / "registry"


def _declare_models(document: dict[str, Any], env: Mapping[str, str]) -> set[str]:
    """The models the environment may configure: the file's (or the built-in `birds` without any),
    plus those RETRAIN_MODELS declares (comma-separated; it replaces the built-in `birds`)."""
    declared = [name.strip() for name in env.get(MODELS_ENV, "").split(",") if name.strip()]
    models = document.get("models")
    if models is not None and not isinstance(models, dict):
        raise ConfigError("models is not a section")
    if declared:
        models = document.setdefault("models", {})
        for name in declared:
            models.setdefault(name, {})
    return set(models) if models is not None else {"birds"}


def _apply_env(document: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    known = _declare_models(document, env)
    for key, value in sorted(env.items()):
        if not key.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX) :].split("__") if part]
        if not path:
            continue
        if path[0] == "models" and len(path) > 1:
            # App setting names hold letters, digits, '.' and '_' only, and model names hold no '_':
            # RETRAIN__MODELS__BIRD_CAM__... is the model `bird-cam`.
            path[1] = path[1].replace("_", "-")
            if path[1] not in known:  # a typo must not make a model of its own
                listed = ",".join(sorted(known | {path[1]}))
                raise ConfigError(
                    f"{key}: no model {path[1]!r} is configured (configured: {', '.join(sorted(known))}); "
                    f"fix the name, or declare the model: {MODELS_ENV}={listed}"
                )
        node = document
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {'.'.join(path[:-1])} is not a section")
            node = child
        node[path[-1]] = value
    return document


def _resolve_paths(config: RetrainConfig, base: Path) -> RetrainConfig:
    def resolve(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p))

    worker = config.worker.model_copy(
        update={
            "state_dir": resolve(config.worker.state_dir),
            "images_root": resolve(config.worker.images_root),
            "events_file": resolve(config.worker.events_file),
            "registry_dir": resolve(config.worker.registry_dir),
        }
    )
    models = {
        name: m.model_copy(update={"images_dir": str(resolve(Path(m.images_dir)))}) if m.images_dir else m
        for name, m in config.models.items()
    }
    return config.model_copy(update={"worker": worker, "models": models})


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None, base_dir: Path | None = None) -> RetrainConfig:
    """Read the TOML file (if any), apply RETRAIN__ overrides, validate, make paths absolute.

    Relative paths are taken relative to the config file's folder (or `base_dir`/the current
    directory without a file).
    """
    env = os.environ if env is None else env
    path = path or env.get("RETRAIN_CONFIG")
    document: dict[str, Any] = {}
    source = "defaults"
    if path:
        source = str(path)
        try:
            document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    document = _apply_env(document, env)
    try:
        config = RetrainConfig.model_validate(document)
    except ValidationError as exc:
        problems = "\n".join(f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))
        raise ConfigError(f"invalid configuration ({source}, with RETRAIN__ overrides):\n{problems}") from None
    base = Path(path).resolve().parent if path else (base_dir or Path.cwd())
    return _resolve_paths(config, base)
