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
    """Write the document under its digest (write-once); returns the blob path."""
    path = manifest_path(document["sha256"])
    store.write_once(path, encode(document))
    return path


def load(store: BlobStore, sha256: str) -> dict[str, Any]:
    """Read a frozen manifest back and check it is the one the digest names."""
    document = json.loads(store.read(manifest_path(sha256)))
    images, classes = document.get("images"), document.get("classes")
    if document.get("sha256") != sha256 or manifest_sha256(classes, images) != sha256:
        raise ValueError(f"manifest {manifest_path(sha256)} does not hash to its name: it was changed after it was frozen")
    return document
