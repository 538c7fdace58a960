"""A request's images (a backfill), resolved against the blob store before its transactions: the
versions found, the paths that do not exist, the names that are not <label>/<file> images."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.messages import RetrainRequested, check_blob_path
from worker.ports import BlobStore


@dataclass
class Backfill:
    """The images a request names, resolved against the blob store (outside any transaction)."""

    refs: list[tuple[str, str, int]] = field(default_factory=list)  # (path, etag, size)
    missing: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    registered: int = 0  # versions that were new, over all chunks


def resolve_backfill(blobs: BlobStore | None, msg: RetrainRequested) -> Backfill:
    """List the prefix and look up etags the request left out: blob I/O, no ledger access."""
    backfill = Backfill()
    refs: list[tuple[str, str | None]] = [(r.path, r.etag) for r in msg.images]
    if msg.prefix is not None:
        if blobs is None:
            raise RuntimeError(f"no blob store configured for model {msg.model}")
        for blob in blobs.list(msg.prefix):
            try:  # a listing holds whatever was uploaded: the same rules as an upload event
                refs.append((check_blob_path(blob.path), blob.etag))
            except ValueError:
                backfill.invalid.append(blob.path)
    for path, etag in refs:
        size = 0
        if etag is None:
            info = blobs.info(path) if blobs else None
            if info is None:
                backfill.missing.append(path)
                continue
            etag, size = info.etag, info.size
        backfill.refs.append((path, etag, size))
    return backfill
