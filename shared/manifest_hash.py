"""The manifest digest and the stable train/val split, exactly as training/manifests.py computes them.

training/ may not import from shared/ (it is uploaded alone), so the two definitions are kept
identical and a test compares them on random input.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable, Mapping


def manifest_sha256(classes: Iterable[str], images: Iterable[Mapping[str, str]]) -> str:
    """sha256 of the canonical JSON of {classes, images sorted by (path, split)}."""
    entries = [
        {"path": i["path"], "label": i["label"], "split": i["split"], "etag": i.get("etag", "") or ""}
        for i in sorted(images, key=lambda i: (i["path"], i["split"]))
    ]
    canonical = json.dumps({"classes": list(classes), "images": entries}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def stable_split(path: str, val_fraction: float) -> str:
    """ "val" or "train" from a hash of the path alone: an image never changes split as data grows."""
    bucket = zlib.crc32(path.encode("utf-8")) % 10_000
    return "val" if bucket < round(val_fraction * 10_000) else "train"
