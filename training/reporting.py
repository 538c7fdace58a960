"""What a training run reports as it goes (rank 0 only): a progress line or per-epoch log lines, and
metrics to the Azure ML run when it runs inside one."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

log = logging.getLogger("train")


class Progress:
    """A one-line progress bar on a terminal, plain per-epoch lines otherwise."""

    def __init__(self, enabled: bool, total_epochs: int):
        self.enabled = enabled
        self.bar = enabled and sys.stderr.isatty()
        self.total_epochs = total_epochs

    def step(self, epoch: int, step: int, steps: int, images_per_s: float, loss: float | None) -> None:
        if not self.bar:
            return
        width = 24
        filled = int(width * step / max(1, steps))
        loss_text = f" loss {loss:.4f}" if loss is not None else ""
        sys.stderr.write(
            f"\repoch {epoch}/{self.total_epochs} [{'#' * filled}{'.' * (width - filled)}] {step}/{steps} {images_per_s:6.1f} img/s{loss_text}   "
        )
        sys.stderr.flush()

    def epoch_done(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar:
            sys.stderr.write("\n")
        log.info(
            "epoch %d/%d train_loss=%.4f train_acc=%.4f val_loss=%.4f val_acc=%.4f lr=%.2e %.1fs %.1f img/s data_wait=%.1f%%",
            row["epoch"],
            self.total_epochs,
            row["train_loss"],
            row["train_acc"],
            row["val_loss"],
            row["val_acc"],
            row["lr"],
            row["seconds"],
            row["images_per_s"],
            100.0 * row["data_wait_fraction"],
        )


class AzureMLLogger:
    """Logs metrics to the Azure ML run when running inside one; does nothing otherwise."""

    def __init__(self, enabled: bool):
        self.run = None
        if not enabled:
            return
        try:
            from azureml.core.run import Run  # optional: only present in Azure ML images
        except ImportError:
            return
        try:
            run = Run.get_context()
        except Exception:  # an unconfigured SDK must never break training
            return
        # An offline context means "not inside Azure ML"; logging there only fills memory.
        if not getattr(run, "id", "").startswith("OfflineRun"):
            self.run = run

    def log(self, name: str, value: Any) -> None:
        if self.run is not None and value is not None:
            with contextlib.suppress(Exception):
                self.run.log(name, value)
