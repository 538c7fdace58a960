"""What a ledger transition needs besides its transaction: the configuration, the time, the stores
it reads and writes outside the ledger, and a request's images resolved beforehand."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from worker.config import RetrainConfig
from worker.ports import BlobStore


@dataclass
class Backfill:
    """The images a request names, resolved against the blob store (outside any transaction)."""

    refs: list[tuple[str, str, int]] = field(default_factory=list)  # (path, etag, size)
    missing: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    registered: int = 0  # versions that were new, over all chunks


@dataclass
class Context:
    config: RetrainConfig
    now: dt.datetime
    blobs: dict[str, BlobStore] = field(default_factory=dict)  # per model, for backfills
    manifests: BlobStore | None = None  # where frozen manifests are written (manifests/<sha256>.json)
    backfill: Backfill | None = None  # a request's images, registered before its own transaction
