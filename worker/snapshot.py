"""Locates the training snapshot (training/) that runs are launched from or uploaded as source."""

from __future__ import annotations

import os
from pathlib import Path


def training_dir() -> Path:
    """training/ beside the worker package, or RETRAIN_TRAINING_DIR when set."""
    override = os.environ.get("RETRAIN_TRAINING_DIR")
    path = Path(override) if override else Path(__file__).resolve().parent.parent / "training"
    if not (path / "train.py").is_file():
        raise FileNotFoundError(f"no training snapshot at {path} (train.py missing); set RETRAIN_TRAINING_DIR")
    return path
