"""The Azure ML model registry (SDK v1 and v2): one model version per run, champion as a tag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.run_ids import seq_of
from worker.ports import ModelRegistry, RegisteredModel

from .seam import AzureMLSeam


class AzureMLModelRegistry(ModelRegistry):
    """Registers model.pt + model.onnx (+ card, report) as one Azure ML model version per run.

    Idempotent by run id: a version tagged with the run id is returned instead of a new one. The
    version is the run's sequence number (unique per model), so with SDK v2, which takes the
    version from the caller, two completions of one run that overlap (a tick's poll and the Event
    Grid event) write the same version: one registers it, the other finds it. SDK v1 numbers
    versions itself; there the find-then-register window remains (docs/azure.md). Each
    registration stages its files in a folder of its own. Models have no aliases in either SDK,
    so `champion` is a tag moved by `set_champion`; the ledger stays the source of truth.
    """

    def __init__(self, seam: AzureMLSeam, staging: Path, artifacts: Any = None):
        self.seam, self.staging = seam, staging
        self.artifacts = artifacts  # BlobStore of the artifacts datastore: champion checkpoints for warm starts

    def register(self, model: str, run_id: str, files: dict[str, Path], card: dict[str, Any]) -> RegisteredModel:
        import json
        import shutil
        import tempfile

        seq = seq_of(run_id)
        if seq is None:
            raise ValueError(f"{run_id!r} is not a retrain run id")
        version = self.seam.find_model(model, run_id)
        if version is None:
            self.staging.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=self.staging, prefix=f"{run_id}-") as tmp:
                folder = Path(tmp)
                for name, source in files.items():
                    shutil.copyfile(source, folder / name)
                (folder / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
                version = self.seam.register_model(model, folder, *self._labels(run_id, card), version=seq)
        if self.artifacts is not None and "model.pt" in files:
            # The next run mounts this as --init_checkpoint (datastore path, see champion_path).
            self.artifacts.write_once(self.champion_path(model, version), Path(files["model.pt"]).read_bytes())
        return RegisteredModel(model, version, run_id, f"azureml://models/{model}/versions/{version}", {})

    @staticmethod
    def _labels(run_id: str, card: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
        """(tags, properties) of a model version: its lineage, and its metrics as properties."""
        metrics = card.get("metrics", {})
        tags = {
            "run_id": run_id,
            "manifest_sha256": card.get("manifest", {}).get("sha256", ""),
            "parent_version": str(card.get("parent_version") or ""),
        }
        properties = {
            k: str(v)
            for k, v in {**metrics, "model_sha256": card.get("artifacts", {}).get("model.pt", {}).get("sha256")}.items()
            if v is not None
        }
        return tags, properties

    def set_champion(self, model: str, version: int) -> None:
        self.seam.tag_champion(model, version)

    def champion_alias(self, model: str) -> int | None:
        return self.seam.champion_version(model)

    def warm_start_checkpoint(self, model: str, version: int) -> str | None:
        # The path in the artifacts datastore that register() copied model.pt to; none without one.
        return self.champion_path(model, version) if self.artifacts is not None else None

    @staticmethod
    def champion_path(model: str, version: int) -> str:
        return f"champions/{model}/{version}/model.pt"
