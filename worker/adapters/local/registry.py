"""The model registry's local adapter: a directory of versions beside the ledger.

    <root>/<model>/<version>/model.pt, model.onnx, onnx_report.json, metrics.json, card.json
    <root>/<model>/champion -> <version>      (a symlink, moved atomically)

Registration is idempotent by run id: registering the same run again returns its version.
The ledger is the source of truth for which version is champion; the symlink follows it so a
user can load `<root>/<model>/champion/model.onnx` with onnxruntime.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from worker.adapters.local.file_lock import locked
from worker.ports import ModelRegistry, RegisteredModel


class LocalModelRegistry(ModelRegistry):
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _versions(self, model: str) -> list[int]:
        folder = self.root / model
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []

    def find(self, model: str, run_id: str) -> RegisteredModel | None:
        for version in self._versions(model):
            card_path = self.root / model / str(version) / "card.json"
            if card_path.exists() and json.loads(card_path.read_text()).get("run_id") == run_id:
                folder = card_path.parent
                return RegisteredModel(
                    model, version, run_id, str(folder), {p.name: str(p) for p in sorted(folder.iterdir()) if not p.name.startswith(".")}
                )
        return None

    def register(self, model: str, run_id: str, files: dict[str, Path], card: dict[str, Any]) -> RegisteredModel:
        (self.root / model).mkdir(parents=True, exist_ok=True)
        with locked(self.root / model / ".lock"):  # one registration per model at a time, across processes
            existing = self.find(model, run_id)
            if existing is not None:
                return existing
            versions = self._versions(model)
            version = (versions[-1] + 1) if versions else 1
            staging = self.root / model / f".staging-{version}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            for name, source in files.items():
                shutil.copyfile(source, staging / name)
            (staging / "card.json").write_text(
                json.dumps({**card, "model": model, "version": version, "run_id": run_id}, indent=2, sort_keys=True)
            )
            os.replace(staging, self.root / model / str(version))  # the version appears complete or not at all
        return self.find(model, run_id)  # type: ignore[return-value]

    def set_champion(self, model: str, version: int) -> None:
        link = self.root / model / "champion"
        tmp = self.root / model / f".champion-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(str(version), tmp)
        os.replace(tmp, link)

    def champion_alias(self, model: str) -> int | None:
        link = self.root / model / "champion"
        return int(os.readlink(link)) if link.is_symlink() else None

    def warm_start_checkpoint(self, model: str, version: int) -> str | None:
        path = self.root / model / str(version) / "model.pt"
        return str(path) if path.exists() else None

    def card(self, model: str, version: int) -> dict[str, Any] | None:
        path = self.root / model / str(version) / "card.json"
        return json.loads(path.read_text()) if path.exists() else None
