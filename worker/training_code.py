"""Locates the training snapshot (training/) that runs are launched from or uploaded as source."""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path


def _candidates() -> list[Path]:
    override = os.environ.get("RETRAIN_TRAINING_DIR")
    if override:
        return [Path(override)]
    return [
        Path(__file__).resolve().parent.parent / "training",  # a checkout (or an editable install)
        Path(sysconfig.get_path("data")) / "share" / "retrain" / "training",  # pip install / pipx: the wheel's data files
        Path(sys.prefix) / "share" / "retrain" / "training",
    ]


def training_dir() -> Path:
    """training/ beside the worker package, the copy an installed wheel carries, or RETRAIN_TRAINING_DIR."""
    candidates = _candidates()
    for path in candidates:
        if (path / "train.py").is_file():
            return path
    raise FileNotFoundError(f"no training snapshot (train.py) in {', '.join(map(str, candidates))}; set RETRAIN_TRAINING_DIR")
