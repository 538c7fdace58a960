"""The seam between the SDK-neutral Azure ML backend and registry and an Azure ML SDK: the calls
they make (submit, status, cancel, outputs, register, tags), implemented for SDK v2 (`v2.MLClientSeam`,
azure-ai-ml) and v1 (`v1.WorkspaceSeam`, azureml-core) and faked in tests; the status mapping; and
which errors are transient."""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.messages import normalize_status
from shared.redact import redact
from worker.ports import PermanentBackendError


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


def status_code(exc: BaseException) -> int | None:
    """The HTTP status an SDK error carries, if the service answered at all."""
    code = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", None)
    return code if isinstance(code, int) else None


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Errors raised when a request got no answer: the service may answer the next one."""
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError
    from requests.exceptions import ConnectionError as RequestsConnectionError  # azureml-core (SDK v1) talks through requests
    from requests.exceptions import Timeout

    return (ServiceRequestError, ServiceResponseError, TimeoutError, ConnectionError, RequestsConnectionError, Timeout)


def error_from(what: str, exc: BaseException) -> AzureMLError:
    """An SDK error as ours, transient or permanent.

    Transient: the service answered 408, 429 or 5xx, or never answered (connection, DNS, timeout).
    Everything else is permanent: a 4xx, and the errors the SDKs raise before sending anything,
    which carry no status (azure-ai-ml's ValidationException, azure-identity's
    ClientAuthenticationError for a credential that cannot get a token, a bad argument): retrying
    those every tick would keep the run planned forever.
    """
    code = status_code(exc)
    transient = (code in (408, 429) or code >= 500) if code is not None else isinstance(exc, _network_error_types())
    cls = AzureMLError if transient else PermanentSubmitError
    return cls(f"{what}: {exc.__class__.__name__}: {exc}", code)


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
    def download_outputs(self, run_id: str, names: list[str], dest: Path) -> Path:
        """Writes the named run outputs that exist, flat, into `dest` (a fresh private folder:
        the backend renames each file into place)."""

    @abc.abstractmethod
    def find_model(self, name: str, run_id: str) -> int | None: ...

    @abc.abstractmethod
    def register_model(self, name: str, path: Path, tags: dict[str, str], properties: dict[str, str], version: int | None = None) -> int:
        """Register `path` as a version of `name`: `version` when given (SDK v2: the run's sequence
        number, so two registrations of one run name the same version and cannot make two), else
        the next one (SDK v1 picks it itself). Returns the version."""

    @abc.abstractmethod
    def tag_champion(self, name: str, version: int) -> None: ...

    @abc.abstractmethod
    def champion_version(self, name: str) -> int | None: ...


class ConnectingSeam(AzureMLSeam):
    """Connects to the workspace at the first call that needs it, not when the worker is built.

    Building the worker happens on every Functions cold start, for every function: the Event Grid
    image ingest, the status endpoint and the timer included. Had it reached Azure ML (SDK v1 reads
    the workspace; creating compute needs a role the app should not have), an unreachable or
    misconfigured workspace would fail them all. Here only the calls that need Azure ML fail, with
    the error classified as any other (an unreachable service is transient, a refused credential
    permanent), and the next call tries to connect again.
    """

    def __init__(self, connect: Callable[[], AzureMLSeam]):
        self._connect = connect
        self._seam: AzureMLSeam | None = None
        self._lock = threading.Lock()

    def connected(self) -> AzureMLSeam:
        with self._lock:
            if self._seam is None:
                try:
                    self._seam = self._connect()
                except AzureMLError:
                    raise
                except Exception as exc:
                    raise error_from("connecting to the Azure ML workspace", exc) from None
            return self._seam

    def get_run(self, run_id: str) -> RunInfo | None:
        return self.connected().get_run(run_id)

    def submit(self, experiment: str, config: Any, run_id: str, tags: dict[str, str]) -> RunInfo:
        return self.connected().submit(experiment, config, run_id, tags)

    def ensure_environment(self, environment: Any) -> Any:
        return self.connected().ensure_environment(environment)

    def cancel(self, run_id: str) -> None:
        self.connected().cancel(run_id)

    def download_outputs(self, run_id: str, names: list[str], dest: Path) -> Path:
        return self.connected().download_outputs(run_id, names, dest)

    def find_model(self, name: str, run_id: str) -> int | None:
        return self.connected().find_model(name, run_id)

    def register_model(self, name: str, path: Path, tags: dict[str, str], properties: dict[str, str], version: int | None = None) -> int:
        return self.connected().register_model(name, path, tags, properties, version=version)

    def tag_champion(self, name: str, version: int) -> None:
        self.connected().tag_champion(name, version)

    def champion_version(self, name: str) -> int | None:
        return self.connected().champion_version(name)
