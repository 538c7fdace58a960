"""The seam between the Azure ML v1 backend and azureml-core: the workspace, experiment, run and
model calls the backend and registry make (`WorkspaceSeam`, faked in tests), the status mapping,
and which errors are transient."""

from __future__ import annotations

import abc
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
