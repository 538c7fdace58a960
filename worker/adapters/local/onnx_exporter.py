"""The ONNX exporter's local adapters: training/export_onnx.py in a subprocess.

The export runs where the model file is (next to the worker for local runs); export_onnx.py
checks the graph and its parity with PyTorch on the run's own validation images and writes a
JSON report, which is what the completion handler reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.ports import ExportError, ExportResult, OnnxExporter
from worker.training_code import training_dir


class LocalOnnxExporter(OnnxExporter):
    def __init__(self, python: str = sys.executable, timeout_s: float = 900):
        self.python, self.timeout_s = python, timeout_s

    def export(
        self, model_pt: Path, out_dir: Path, *, data_dir: str | None, manifest: Path | None, tolerance: float, samples: int
    ) -> ExportResult:
        onnx_path, report_path = out_dir / "model.onnx", out_dir / "onnx_report.json"
        cmd = [self.python, str(training_dir() / "export_onnx.py"), "--model", str(model_pt), "--output", str(onnx_path), "--report", str(report_path),
               "--tolerance", repr(tolerance), "--samples", str(samples)]  # fmt: skip
        if data_dir:
            cmd += ["--data_dir", data_dir]
        if manifest:
            cmd += ["--manifest", str(manifest)]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s, env=env, check=False)
        if proc.returncode not in (0, 3) or not report_path.exists():
            raise ExportError(f"export_onnx.py exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}")
        return ExportResult(onnx_path, report_path, json.loads(report_path.read_text()))


class InProcessOnnxExporter(OnnxExporter):
    """Runs export_onnx.export_and_verify inside the worker process.

    The subprocess exporter pays ~2.5 s importing torch, onnx and onnxruntime on every
    completion, more than the export itself; a long-lived worker imports them once, on the first
    completion (never at module import time).
    """

    def __init__(self) -> None:
        self._export_and_verify: Callable[..., dict[str, Any]] | None = None

    def _load(self) -> Callable[..., dict[str, Any]]:
        if self._export_and_verify is None:
            snapshot = str(training_dir())
            if snapshot not in sys.path:
                sys.path.insert(0, snapshot)
            from export_onnx import export_and_verify  # noqa: PLC0415 - torch and onnxruntime, on first use only

            self._export_and_verify = export_and_verify
        return self._export_and_verify

    def export(
        self, model_pt: Path, out_dir: Path, *, data_dir: str | None, manifest: Path | None, tolerance: float, samples: int
    ) -> ExportResult:
        export_and_verify = self._load()
        onnx_path, report_path = out_dir / "model.onnx", out_dir / "onnx_report.json"
        try:
            report = export_and_verify(
                model_pt,
                onnx_path,
                data_dir=data_dir,
                manifest=str(manifest) if manifest else None,
                samples=samples,
                tolerance=tolerance,
                report_path=report_path,
            )
        except ValueError as exc:  # DataError / CheckpointError from the training snapshot
            raise ExportError(str(exc)) from exc
        return ExportResult(onnx_path, report_path, report)
