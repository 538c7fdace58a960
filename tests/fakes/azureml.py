"""A fake `AzureMLSeam` for tests: records every call and fails in chosen ways.

It keeps the real azureml-core ScriptRunConfig it was given, so tests can serialize it.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

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

    def register_model(self, name: str, path: Path, tags: dict[str, str], properties: dict[str, str]) -> int:
        self.calls.append(("register_model", tags.get("run_id", "")))
        versions = self.models.setdefault(name, [])
        version = len(versions) + 1
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
