"""What a ledger transition needs besides its transaction: the configuration, the time, the stores
it reads and writes outside the ledger, and a request's images resolved beforehand (worker.backfill)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from worker.backfill import Backfill
from worker.config import RetrainConfig
from worker.ports import BlobStore


@dataclass
class Context:
    config: RetrainConfig
    now: dt.datetime
    blobs: dict[str, BlobStore] = field(default_factory=dict)  # per model, for backfills
    manifests: BlobStore | None = None  # where frozen manifests are written (manifests/<sha256>.json)
    backfill: Backfill | None = None  # a request's images, registered before its own transaction
