"""Wires the worker from settings: the one place adapters are chosen. Tests pass their fakes in."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from shared.errors import ConfigError
from worker.adapters.local.directory_blobs import DirectoryBlobStore
from worker.adapters.local.jsonl_publisher import JsonlPublisher
from worker.adapters.local.onnx_exporter import InProcessOnnxExporter, LocalOnnxExporter
from worker.adapters.local.registry import LocalModelRegistry
from worker.bus import Worker
from worker.completion import Completer
from worker.config import RetrainConfig
from worker.ports import BlobStore, Clock, ModelRegistry, OnnxExporter, Publisher, SystemClock, TrainingBackend
from worker.store import Store
from worker.submission import Submitter

IDENTITY_FORM = {"RETRAIN_TABLES": "RETRAIN_TABLES__tableServiceUri", "RETRAIN_STORAGE": "RETRAIN_STORAGE__blobServiceUri",
                 "RETRAIN_ARTIFACTS": "RETRAIN_ARTIFACTS__blobServiceUri", "RETRAIN_SERVICEBUS": "RETRAIN_SERVICEBUS__fullyQualifiedNamespace"}  # fmt: skip
T = TypeVar("T")


def from_connection_setting(name: str, make: Callable[[], T]) -> T:
    """An adapter built from the connection string in setting `name`; a malformed one is a
    ConfigError that names the setting and both fixes (the SDKs say only "blank or malformed")."""
    try:
        return make()
    except ValueError as exc:
        from shared.redact import printable, redact

        raise ConfigError(
            f"{name} is not a usable connection string ({printable(redact(exc), limit=160)}): copy it from the resource's "
            f"'Access keys' page, or set {IDENTITY_FORM.get(name, name + '__...')} instead to connect with an identity"
        ) from None


def ledger_path(config: RetrainConfig) -> Path:
    return config.worker.state_dir / "ledger.db"


class NoLedgerError(RuntimeError):
    """A read-only command found no ledger where the configuration says it is (it creates none)."""


def open_ledger(config: RetrainConfig, env: Mapping[str, str] | None = None, *, existing_only: bool = False) -> Store:
    """SQLite in state_dir, or Azure Table Storage: RETRAIN_TABLES (a connection string) or
    RETRAIN_TABLES__tableServiceUri (identity-based, DefaultAzureCredential). `existing_only`: the
    read-only commands' way in, which never creates a ledger (or its folder)."""
    import os

    if config.worker.store == "table":
        from worker.adapters.azure.table_store import TableStore

        env = os.environ if env is None else env
        if env.get("RETRAIN_TABLES"):
            return from_connection_setting(
                "RETRAIN_TABLES", lambda: TableStore.from_connection_string(env["RETRAIN_TABLES"], config.worker.table_name)
            )
        if env.get("RETRAIN_TABLES__tableServiceUri"):
            return TableStore.from_endpoint(env["RETRAIN_TABLES__tableServiceUri"], config.worker.table_name)
        raise ConfigError("worker.store = 'table' needs RETRAIN_TABLES or RETRAIN_TABLES__tableServiceUri")
    from worker.adapters.local.sqlite_store import SqliteStore

    path = ledger_path(config)
    if existing_only and not path.is_file():
        raise NoLedgerError(
            f"no ledger at {path.resolve()}: nothing has run with this configuration here "
            "(start `retrain serve`, or pass -c with the configuration the worker uses)"
        )
    return SqliteStore(path, synchronous=config.worker.sqlite_synchronous)


def build_worker(
    config: RetrainConfig,
    *,
    store: Store | None = None,
    backend: TrainingBackend | None = None,
    clock: Clock | None = None,
    publisher: Publisher | None = None,
    blobs: dict[str, BlobStore] | None = None,
    registry: ModelRegistry | None = None,
    exporter: OnnxExporter | None = None,
    artifacts: BlobStore | None = None,
) -> Worker:
    """Wire the worker from its configuration; anything passed in replaces the configured adapter.
    `artifacts` is where manifests go when training runs read them remotely (the state folder if None)."""
    if store is None:
        store = open_ledger(config)
    if backend is None and config.worker.backend == "azureml":
        backend, registry, artifacts = _azureml(config, registry, artifacts)
    if backend is None:
        from worker.adapters.local.torchrun_backend import LocalTorchrunBackend

        mlflow_uri = f"sqlite:///{(config.worker.state_dir / 'mlflow.db').resolve()}" if config.worker.tracking == "mlflow" else None
        backend = LocalTorchrunBackend(config.worker.state_dir / "runs", mlflow_uri=mlflow_uri)
    clock = clock or SystemClock()
    publisher = publisher or JsonlPublisher(config.events_file)
    if blobs is None:
        blobs = {name: DirectoryBlobStore(config.images_dir(name)) for name in config.models}
    registry = registry or LocalModelRegistry(config.registry_dir)
    exporter = exporter or (InProcessOnnxExporter() if config.worker.export_in_process else LocalOnnxExporter())
    # Frozen manifests (manifests/<sha256>.json): the artifacts container when the registry has one
    # (Azure ML reads them from there), else the state folder.
    manifests = artifacts or DirectoryBlobStore(config.worker.state_dir, images_only=False)

    def champion_checkpoint(model: str) -> str | None:
        """Warm start from the champion's weights (train.py then measures it as the baseline)."""
        with store.transaction() as tx:
            version = tx.model_head(model).champion_version
        return registry.warm_start_checkpoint(model, version) if version else None

    submitter = Submitter(store, backend, config, clock, manifests=manifests, init_checkpoint=champion_checkpoint)
    completer = Completer(store, backend, registry, exporter, config, clock, manifests=manifests)
    return Worker(store, backend, config, clock, submitter, blobs=blobs, publisher=publisher, completer=completer, manifests=manifests)


def _azureml(
    config: RetrainConfig, registry: ModelRegistry | None, artifacts: BlobStore | None
) -> tuple[TrainingBackend, ModelRegistry, BlobStore | None]:
    """Azure ML for training and the registry: configuration alone switches a deployment to it.
    Also the artifacts container (manifests, champion checkpoints) the runs read, when configured."""
    import os

    from worker.adapters.azure.azureml.backend import AzureMLBackend, settings_from_config
    from worker.adapters.azure.azureml.registry import AzureMLModelRegistry
    from worker.adapters.azure.azureml.seam import AzureMLSeam, ConnectingSeam

    cfg = config.azureml
    check_azureml_settings(cfg, os.environ)  # offline: what is missing is reported now, in one line
    jobs: Any
    if cfg.sdk == "v1":
        from worker.adapters.azure.azureml import v1

        def connect() -> AzureMLSeam:
            workspace = v1.load_workspace(cfg, os.environ)
            if cfg.create_compute:
                v1.ensure_compute(workspace, cfg)
            return v1.WorkspaceSeam(workspace)

        jobs = v1.V1Jobs()
    else:
        from worker.adapters.azure.azureml import v2

        def connect() -> AzureMLSeam:
            client = v2.ml_client(cfg, os.environ)
            if cfg.create_compute:  # off by default: infra/ creates the cluster; creating it needs more than AzureML Data Scientist
                v2.ensure_compute(client, cfg)
            return v2.MLClientSeam(client, staging=config.worker.state_dir / "azureml-downloads")

        jobs = v2.V2Jobs()
    seam = ConnectingSeam(connect)  # nothing reaches Azure ML until a call needs it
    outputs = config.worker.state_dir / "azureml-outputs"
    backend = AzureMLBackend(seam, settings_from_config(cfg), jobs=jobs, outputs_root=outputs)
    artifacts = artifacts or artifacts_store(os.environ)
    registry = registry or AzureMLModelRegistry(seam, config.worker.state_dir / "azureml-staging", artifacts=artifacts)
    return backend, registry, artifacts


def check_azureml_settings(cfg: Any, env: Mapping[str, str]) -> None:
    """Every missing workspace id or credential at once, as one ConfigError (no SDK call is made)."""
    problems = []
    if not cfg.config_path:
        missing = [name for name in ("subscription_id", "resource_group", "workspace_name") if not getattr(cfg, name)]
        if missing:
            problems.append(f"azureml.{', azureml.'.join(missing)} (or azureml.config_path, a workspace config.json)")
    elif not Path(cfg.config_path).is_file():
        problems.append(f"azureml.config_path {cfg.config_path} (no such file)")
    if cfg.auth == "service_principal":
        needed = [f"azureml.{n}" for n in ("tenant_id", "client_id") if not getattr(cfg, n)]
        needed += [f"${cfg.client_secret_env}"] if not env.get(cfg.client_secret_env) else []
        if needed:
            problems.append(f"{', '.join(needed)} for service_principal auth")
    if problems:  # one line per problem
        raise ConfigError("\n".join(f"worker.backend = 'azureml' needs {problem}" for problem in problems))


def manifests_store(config: RetrainConfig, env: Mapping[str, str]) -> BlobStore:
    """Where the worker freezes manifests, for the commands that read them: the artifacts container
    when Azure ML trains (it reads them from there), else the state folder (as `build_worker` wires)."""
    artifacts = artifacts_store(env) if config.worker.backend == "azureml" else None
    return artifacts or DirectoryBlobStore(config.worker.state_dir, images_only=False)


def artifacts_store(env: Mapping[str, str]) -> BlobStore | None:
    """The artifacts container (manifests, champion checkpoints, oversize events) when configured:
    RETRAIN_ARTIFACTS (a connection string) or RETRAIN_ARTIFACTS__blobServiceUri, container RETRAIN_ARTIFACTS_CONTAINER."""
    from worker.adapters.azure.blob_store import AzureBlobStore

    container = env.get("RETRAIN_ARTIFACTS_CONTAINER", "retrain")
    if env.get("RETRAIN_ARTIFACTS"):
        return from_connection_setting(
            "RETRAIN_ARTIFACTS", lambda: AzureBlobStore.from_connection_string(env["RETRAIN_ARTIFACTS"], container)
        )
    if env.get("RETRAIN_ARTIFACTS__blobServiceUri"):
        return AzureBlobStore.from_account_url(env["RETRAIN_ARTIFACTS__blobServiceUri"], container)
    return None


def build_worker_from_settings(env: Mapping[str, str]) -> Worker:
    """The Functions app's wiring: config from RETRAIN_CONFIG/RETRAIN__*, Service Bus when configured.

    Settings: RETRAIN_SERVICEBUS (a connection string) or RETRAIN_SERVICEBUS__fullyQualifiedNamespace
    (managed identity via DefaultAzureCredential), and RETRAIN_EVENTS_TOPIC for published events.
    """
    from worker.adapters.azure.servicebus import ServiceBusPublisher, client_factory
    from worker.config import load_config

    config = load_config(env.get("RETRAIN_CONFIG") or None, env=env)
    blobs = images_stores(config, env)
    publisher = None
    topic = env.get("RETRAIN_EVENTS_TOPIC")
    connection, namespace = env.get("RETRAIN_SERVICEBUS"), env.get("RETRAIN_SERVICEBUS__fullyQualifiedNamespace")
    if topic and (connection or namespace):
        make_client = from_connection_setting(
            "RETRAIN_SERVICEBUS", lambda: client_factory(connection=connection or None, namespace=None if connection else namespace)
        )
        oversize = artifacts_store(env) or DirectoryBlobStore(config.worker.state_dir, images_only=False)
        publisher = ServiceBusPublisher(make_client, topic, oversize_store=oversize)
    return build_worker(config, publisher=publisher, blobs=blobs)


def images_stores(config: RetrainConfig, env: Mapping[str, str]) -> dict[str, BlobStore] | None:
    """Each model's view of the images container (for backfills by prefix or list) when RETRAIN_STORAGE is set."""
    from worker.adapters.local.directory_blobs import PrefixedBlobStore

    container = env.get("RETRAIN_IMAGES_CONTAINER", "images")
    if env.get("RETRAIN_STORAGE"):
        from worker.adapters.azure.blob_store import AzureBlobStore

        shared = from_connection_setting(
            "RETRAIN_STORAGE", lambda: AzureBlobStore.from_connection_string(env["RETRAIN_STORAGE"], container)
        )
    elif env.get("RETRAIN_STORAGE__blobServiceUri"):
        from worker.adapters.azure.blob_store import AzureBlobStore

        shared = AzureBlobStore.from_account_url(env["RETRAIN_STORAGE__blobServiceUri"], container)
    else:
        return None
    return {name: PrefixedBlobStore(shared, f"{name}/") for name in config.models}
