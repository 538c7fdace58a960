"""Frozen manifests as content-addressed blobs: `manifests/<sha256>.json`, written once, never rows.

A run's manifest is the exact list of images (path, etag, label, split) it trains on. It is
written before the transaction that plans the run commits, under the name of its own digest, so
a retried or concurrent plan writes the same bytes to the same name (or nothing), a plan that
loses its commit leaves an unreferenced but harmless blob, and the ledger holds only the digest.
The document is the format training/manifests.py reads and verifies.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from shared.files import atomic_write_bytes
from shared.manifest_hash import manifest_sha256
from worker.ports import BlobStore
from worker.store import ManifestEntry

FORMAT = "retrain.manifest/v1"


def manifest_path(sha256: str) -> str:
    return f"manifests/{sha256}.json"


def build_manifest(entries: Iterable[ManifestEntry]) -> dict[str, Any]:
    """The manifest document for these entries, with its digest (entries sorted by path)."""
    ordered = sorted(entries, key=lambda e: (e.path, e.split))
    classes = sorted({e.label for e in ordered})
    images = [{"path": e.path, "label": e.label, "split": e.split, "etag": e.etag} for e in ordered]
    return {"format": FORMAT, "classes": classes, "images": images, "sha256": manifest_sha256(classes, images)}


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def freeze(store: BlobStore, document: dict[str, Any]) -> str:
    """Write the document under its digest (write-once); returns the blob path.

    A blob already under that name is checked: one that does not read back as this manifest (a
    file truncated, replaced by a FIFO, or edited since) is replaced where the store is a local
    folder, so the run planned again over the same images does not meet it a second time.
    """
    path = manifest_path(document["sha256"])
    data = encode(document)
    if not store.write_once(path, data) and not readable(store, document["sha256"]):
        local = store.local_path(path)
        if local is None:
            raise ValueError(f"{path} exists but does not read back as the manifest it names; remove it")
        atomic_write_bytes(local, data)  # the name now holds what it says
    return path


def readable(store: BlobStore, sha256: str) -> bool:
    """True if the frozen manifest reads back and hashes to its name."""
    try:
        load(store, sha256)
    except Exception as exc:
        if unusable(exc):
            return False
        raise
    return True


def unusable(exc: BaseException) -> bool:
    """True for what loading a frozen manifest raises when no retry can help: content that is
    corrupt or was edited (ValueError: JSON and UTF-8 errors included), a file that is missing or
    not a regular file (OSError); not for a connection or a timeout, which may pass."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return False
    return isinstance(exc, ValueError | OSError)


def load(store: BlobStore, sha256: str) -> dict[str, Any]:
    """Read a frozen manifest back and check it is the one the digest names."""
    document: dict[str, Any] = json.loads(store.read(manifest_path(sha256)))
    images, classes = document.get("images"), document.get("classes")
    if (
        not isinstance(images, list)
        or not isinstance(classes, list)
        or document.get("sha256") != sha256
        or manifest_sha256(classes, images) != sha256
    ):
        raise ValueError(f"manifest {manifest_path(sha256)} does not hash to its name: it was changed after it was frozen")
    return document
