"""What the trigger functions share: the worker they hand messages to, built once from app settings.

The worker is built lazily on the first invocation (never at import: the Functions host imports
every module to index the functions, and that must stay fast and offline). Tests install their
own worker with `use_worker`.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING

from shared.redact import install_log_redaction

if TYPE_CHECKING:  # the worker package is imported on the first invocation, not at indexing
    from worker.bus import Worker

_lock = threading.Lock()
_worker: Worker | None = None

IMAGES_CONTAINER_SETTING = "RETRAIN_IMAGES_CONTAINER"
AML_TOPIC_SETTING = "RETRAIN_AML_WORKSPACE_TOPIC"
log = logging.getLogger("retrain.functions")


def use_worker(worker: Worker | None) -> None:
    """Install the worker the functions use (tests, or a host that builds its own)."""
    global _worker
    with _lock:
        _worker = worker


def worker() -> Worker:
    global _worker
    with _lock:
        if _worker is None:
            install_log_redaction()
            from worker import telemetry
            from worker.app.bootstrap import build_worker_from_settings

            telemetry.configure()  # Application Insights through OpenTelemetry, when its connection string is set

            _worker = build_worker_from_settings(os.environ)
        return _worker


def setting(name: str, default: str = "") -> str:
    return os.environ.get(name, default)
