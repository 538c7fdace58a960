"""The worker's ports: what it needs from a training backend, a blob store, a model registry, an
ONNX exporter, a publisher and a clock.

Each port is a small abstract class with real adapters under `worker.adapters` (local: torchrun,
a directory, a JSON-lines file; Azure: Azure ML, Blob Storage, Service Bus) and a fake for unit
tests under `tests/fakes`. The ledger's port lives in `worker.store`.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

BackendState = Literal["queued", "running", "succeeded", "failed", "canceled", "unknown"]
TERMINAL_BACKEND_STATES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


@dataclass(frozen=True)
class TrainingArgs:
    """What train.py is asked to do for one run (defaults are the model's config, then overrides)."""

    epochs: int = 8
    batch_size: int = 16
    image_size: int = 64
    learning_rate: float = 0.01
    nproc: int = 2
    distributed: str = "ddp"  # ddp | horovod | none
    arch: str = "resnet18"
    extra: tuple[str, ...] = ()  # more train.py arguments, passed through verbatim
    onnx_tolerance: float = 1e-4  # the model's gate.onnx_tolerance: a run that exports ONNX checks parity at it
    onnx_samples: int = 32  # the model's gate.onnx_samples: validation images in that check

    def train_py_args(self) -> list[str]:
        args = [
            "--num_epochs", str(self.epochs),
            "--batch_size", str(self.batch_size),
            "--image_size", str(self.image_size),
            "--learning_rate", repr(self.learning_rate),
            "--arch", self.arch,
            "--onnx_tolerance", repr(self.onnx_tolerance),
            "--onnx_samples", str(self.onnx_samples),
        ]  # fmt: skip
        if self.distributed == "horovod":
            args += ["--distributed", "horovod"]
        elif self.distributed == "none":
            args += ["--distributed", "none"]
        return [*args, *self.extra]


@dataclass(frozen=True)
class RunSpec:
    """Everything a backend needs to start one attempt of a run. `backend_run_id` is the idempotency key."""

    backend_run_id: str
    model: str
    manifest: Mapping[str, Any]  # the frozen manifest document (training/manifests.py format)
    data_dir: str  # where the manifest's relative paths resolve
    training: TrainingArgs = field(default_factory=TrainingArgs)
    init_checkpoint: str | None = None  # the champion's model.pt, for a warm start
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendStatus:
    backend_run_id: str
    state: BackendState
    detail: str = ""
    outputs_dir: str | None = None  # where model.pt / metrics.json are (or will be)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_BACKEND_STATES


class PermanentBackendError(RuntimeError):
    """The backend refused a run for good (bad request, no permission): retrying cannot help."""


class TrainingBackend(abc.ABC):
    """Starts, watches and cancels training runs. Every method is idempotent."""

    @abc.abstractmethod
    def submit(self, spec: RunSpec) -> BackendStatus:
        """Start the run, or return the existing one if `spec.backend_run_id` was submitted before."""

    @abc.abstractmethod
    def status(self, backend_run_id: str) -> BackendStatus:
        """Current state; "unknown" when the backend has never seen this id."""

    @abc.abstractmethod
    def cancel(self, backend_run_id: str) -> BackendStatus:
        """Ask the run to stop; canceling a finished or unknown run changes nothing."""


@dataclass(frozen=True)
class BlobInfo:
    path: str  # relative to the store's root, POSIX separators
    etag: str
    size: int


class BlobStore(abc.ABC):
    """Images (read), manifests and artifacts (write once)."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Blobs under `prefix`, with their current etag."""

    @abc.abstractmethod
    def info(self, path: str) -> BlobInfo | None:
        """The blob's current etag and size, or None if it does not exist."""

    @abc.abstractmethod
    def read(self, path: str) -> bytes: ...

    @abc.abstractmethod
    def write_once(self, path: str, data: bytes) -> bool:
        """Write unless the blob exists; True if this call wrote it. Same content twice is fine."""

    @abc.abstractmethod
    def local_path(self, path: str) -> Path | None:
        """A filesystem path for the blob when the store is a directory (None for remote stores)."""


class Publisher(abc.ABC):
    """Publishes CloudEvents; the event id is the message id, so a re-send is a droppable duplicate."""

    @abc.abstractmethod
    def publish(self, events: list[Mapping[str, Any]]) -> None: ...


class Clock(abc.ABC):
    @abc.abstractmethod
    def now(self) -> dt.datetime:
        """Timezone-aware UTC now."""


class SystemClock(Clock):
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class RegisteredModel:
    model: str
    version: int
    run_id: str
    location: str  # a directory (local) or a registry URI (Azure ML)
    files: dict[str, str]  # name -> path or URI


class ModelRegistry(abc.ABC):
    """Where registered versions live; the ledger stays the source of truth for the champion."""

    @abc.abstractmethod
    def register(self, model: str, run_id: str, files: dict[str, Path], card: dict[str, Any]) -> RegisteredModel:
        """Store a new version (or return the one already registered for `run_id`)."""

    @abc.abstractmethod
    def set_champion(self, model: str, version: int) -> None:
        """Point the registry's `champion` alias at `version` (atomically)."""

    @abc.abstractmethod
    def champion_alias(self, model: str) -> int | None:
        """The version the registry's `champion` alias points at."""

    @abc.abstractmethod
    def warm_start_checkpoint(self, model: str, version: int) -> str | None:
        """Where a training run finds the version's model.pt (a local path, or a path in the run's
        artifacts datastore), or None when the registry cannot hand it to a run."""


class ExportError(RuntimeError):
    """The export could not run at all (bad model file, bad data); not a parity verdict."""


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    report_path: Path
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report.get("passed"))


class OnnxExporter(abc.ABC):
    """Exports model.pt to ONNX and checks it against PyTorch on the run's validation images."""

    @abc.abstractmethod
    def export(
        self, model_pt: Path, out_dir: Path, *, data_dir: str | None, manifest: Path | None, tolerance: float, samples: int
    ) -> ExportResult: ...
