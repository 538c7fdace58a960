"""Fakes of the small ports (clock, blob store, publisher) for unit tests; they record what they saw."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from worker.ports import BlobInfo, BlobStore, Clock, ExportResult, OnnxExporter, Publisher


class FakeClock(Clock):
    def __init__(self, start: dt.datetime | None = None):
        self.current = start or dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)

    def now(self) -> dt.datetime:
        return self.current

    def advance(self, seconds: float) -> dt.datetime:
        self.current += dt.timedelta(seconds=seconds)
        return self.current


class FakeBlobStore(BlobStore):
    def __init__(self, blobs: Mapping[str, bytes] | None = None):
        self.blobs: dict[str, bytes] = dict(blobs or {})
        self.writes: list[str] = []

    def _info(self, path: str) -> BlobInfo:
        data = self.blobs[path]
        return BlobInfo(path=path, etag=hashlib.sha256(data).hexdigest()[:32], size=len(data))

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        for path in sorted(self.blobs):
            if path.startswith(prefix):
                yield self._info(path)

    def info(self, path: str) -> BlobInfo | None:
        return self._info(path) if path in self.blobs else None

    def read(self, path: str) -> bytes:
        return self.blobs[path]

    def write_once(self, path: str, data: bytes) -> bool:
        if path in self.blobs:
            return False
        self.blobs[path] = data
        self.writes.append(path)
        return True

    def local_path(self, path: str) -> Path | None:
        return None


class RecordingPublisher(Publisher):
    def __init__(self, fail_times: int = 0):
        self.published: list[Mapping[str, Any]] = []
        self.fail_times = fail_times

    def publish(self, events: list[Mapping[str, Any]]) -> None:
        if self.fail_times > 0:
            self.fail_times -= 1
            raise ConnectionError("publisher unavailable")
        self.published.extend(events)


class FakeOnnxExporter(OnnxExporter):
    """Writes a stand-in ONNX file and a report with the parity figure the test chooses."""

    def __init__(self, max_abs_diff: float = 3e-7):
        self.max_abs_diff = max_abs_diff
        self.calls: list[Path] = []

    def export(
        self, model_pt: Path, out_dir: Path, *, data_dir: str | None, manifest: Path | None, tolerance: float, samples: int
    ) -> ExportResult:
        self.calls.append(model_pt)
        onnx_path, report_path = out_dir / "model.onnx", out_dir / "onnx_report.json"
        onnx_path.write_bytes(b"onnx:" + model_pt.read_bytes()[:16])
        report = {
            "max_abs_diff": self.max_abs_diff,
            "tolerance": tolerance,
            "passed": self.max_abs_diff <= tolerance,
            "opset": 17,
            "samples": samples,
        }
        report_path.write_text(json.dumps(report))
        return ExportResult(onnx_path, report_path, report)
