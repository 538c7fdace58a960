"""A fake `AzureMLSeam` for tests: records every call and fails in chosen ways.

It keeps the real azureml-core ScriptRunConfig it was given, so tests can serialize it.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, ClassVar

from worker.adapters.azure.azureml.seam import AzureMLSeam, RunInfo


class FakeAzureMLSeam(AzureMLSeam):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.runs: dict[str, RunInfo] = {}
        self.configs: dict[str, Any] = {}
        self.tags: dict[str, dict[str, str]] = {}
        self.submit_failures: deque[BaseException] = deque()
        self.create_then_fail: BaseException | None = None  # the run is created, then the call fails
        self.models: dict[str, list[dict[str, Any]]] = {}
        self.champions: dict[str, int] = {}
        self.outputs: dict[str, dict[str, bytes]] = {}

    def get_run(self, run_id: str) -> RunInfo | None:
        self.calls.append(("get_run", run_id))
        return self.runs.get(run_id)

    def submit(self, experiment: str, config: Any, run_id: str, tags: dict[str, str]) -> RunInfo:
        self.calls.append(("submit", run_id))
        if self.submit_failures:
            raise self.submit_failures.popleft()
        self.runs[run_id] = RunInfo(run_id, "Queued")
        self.configs[run_id], self.tags[run_id] = config, dict(tags)
        if self.create_then_fail is not None:
            exc, self.create_then_fail = self.create_then_fail, None
            raise exc
        return self.runs[run_id]

    def ensure_environment(self, environment: Any) -> Any:
        self.calls.append(("ensure_environment", environment.name))
        return environment

    def cancel(self, run_id: str) -> None:
        self.calls.append(("cancel", run_id))
        self.runs[run_id] = RunInfo(run_id, "Canceled")

    def download_outputs(self, run_id: str, names: list[str], dest: Path) -> Path:
        self.calls.append(("download", run_id))
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in self.outputs.get(run_id, {}).items():
            (dest / name).write_bytes(data)
        return dest

    def find_model(self, name: str, run_id: str) -> int | None:
        self.calls.append(("find_model", run_id))
        return max((m["version"] for m in self.models.get(name, []) if m["tags"].get("run_id") == run_id), default=None)

    def register_model(self, name: str, path: Path, tags: dict[str, str], properties: dict[str, str], version: int | None = None) -> int:
        self.calls.append(("register_model", tags.get("run_id", "")))
        versions = self.models.setdefault(name, [])
        version = version if version is not None else len(versions) + 1
        versions.append(
            {"version": version, "tags": dict(tags), "properties": dict(properties), "files": sorted(p.name for p in path.iterdir())}
        )
        return version

    def tag_champion(self, name: str, version: int) -> None:
        self.champions[name] = version

    def champion_version(self, name: str) -> int | None:
        return self.champions.get(name)

    # test controls
    def set_status(self, run_id: str, status: str, detail: str = "") -> None:
        self.runs[run_id] = RunInfo(run_id, status, detail)


class AzureMLHarnessBackend:
    """The real `AzureMLBackend` with the v2 job builder over a `FakeAzureMLSeam`, with the test
    controls of `FakeTrainingBackend` (specs, finish, fail_next_submit, calls_to, runs), so the
    worker and completion suites run unchanged against the Azure ML adapter:
    RETRAIN_TEST_BACKEND=azureml-v2 (see tests/unit/test_behaviour_on_azureml.py)."""

    STATUS: ClassVar[dict[str, str]] = {
        "queued": "Queued",
        "running": "Running",
        "succeeded": "Completed",
        "failed": "Failed",
        "canceled": "Canceled",
    }

    def __init__(self, outputs_root: Path) -> None:
        from worker.adapters.azure.azureml.backend import AzureMLBackend, AzureMLSettings
        from worker.adapters.azure.azureml.v2 import V2Jobs

        self.seam = FakeAzureMLSeam()
        self.inner = AzureMLBackend(
            self.seam,
            AzureMLSettings(retry_wait_seconds=0.001, submit_budget_seconds=5, training_image="retrain.azurecr.io/retrain-training:1.0"),
            jobs=V2Jobs(),
            environment="azureml:curated@latest", outputs_root=outputs_root,
        )  # fmt: skip
        self.specs: dict[str, Any] = {}
        self.calls: list[tuple[str, str]] = []

    @property
    def runs(self) -> dict[str, RunInfo]:
        return self.seam.runs

    start_state = "queued"  # "running": the job reports Running as soon as it exists

    def submit(self, spec: Any) -> Any:
        self.calls.append(("submit", spec.backend_run_id))
        status = self.inner.submit(spec)
        self.specs.setdefault(spec.backend_run_id, spec)
        if self.start_state == "running":
            self.seam.set_status(spec.backend_run_id, "Running")
            status = self.inner.status(spec.backend_run_id)
        return status

    def status(self, backend_run_id: str) -> Any:
        self.calls.append(("status", backend_run_id))
        return self.inner.status(backend_run_id)

    def cancel(self, backend_run_id: str) -> Any:
        self.calls.append(("cancel", backend_run_id))
        return self.inner.cancel(backend_run_id)

    def finish(self, backend_run_id: str, state: str, outputs_dir: str | None = None, detail: str = "") -> None:
        if backend_run_id not in self.seam.runs:
            raise KeyError(f"no run {backend_run_id!r} was submitted")
        if outputs_dir is not None:
            self.seam.outputs[backend_run_id] = {p.name: p.read_bytes() for p in Path(outputs_dir).iterdir() if p.is_file()}
        self.seam.set_status(backend_run_id, self.STATUS[state], detail)

    def fail_next_submit(self, exc: BaseException, times: int = 1) -> None:
        """The next `times` submits fail: a transient error outlasts the adapter's own retries (8
        attempts); a permanent one is not retried, so it fails one submit per error."""
        from worker.ports import PermanentBackendError

        self.seam.submit_failures.extend([exc] * (times if isinstance(exc, PermanentBackendError) else times * 8))

    def calls_to(self, method: str) -> list[str]:
        return [run_id for name, run_id in self.calls if name == method]
