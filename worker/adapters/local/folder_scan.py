"""Turns a local images folder (`<dir>/<label>/<file>`) into ImageUploaded messages.

Only new or changed files produce messages (a changed file has a new content etag, which is a
new version). Files still being written (modified within `settle_seconds`) wait for the next
scan. Names that fail validation are rejected once, with the reason, and never counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydantic import ValidationError

from shared.messages import ImageUploaded
from shared.redact import printable
from worker.adapters.local.directory_blobs import DirectoryBlobStore

log = logging.getLogger("retrain.scan")


@dataclass
class FolderScanner:
    model: str
    blobs: DirectoryBlobStore
    seen: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    def scan(self) -> Iterator[ImageUploaded]:
        for blob in self.blobs.list():
            if self.seen.get(blob.path) == blob.etag or blob.path in self.rejected:
                continue
            try:
                message = ImageUploaded.of(self.model, blob.path, blob.etag, blob.size, source="folder")
            except ValidationError as exc:
                reason = "; ".join(e["msg"] for e in exc.errors(include_url=False, include_input=False))
                self.rejected[blob.path] = reason
                log.warning("rejected %s in %s: %s", printable(blob.path, limit=120), self.model, reason)
                continue
            self.seen[blob.path] = blob.etag
            yield message
