"""The run manifest: the exact, hashed list of images (path, label, split, etag) a run trains on.

Format (JSON, UTF-8)::

    {
      "format": "retrain.manifest/v1",
      "classes": ["chicken", "turkey"],          # optional; defaults to the sorted labels
      "images": [
        {"path": "chicken/0001.jpg", "label": "chicken", "split": "train", "etag": "0x8D..."},
        ...
      ],
      "sha256": "<hex>"                          # optional; verified when present
    }

`sha256` is the digest of the canonical form of `classes` and `images` (see `manifest_sha256`):
image entries sorted by path, keys sorted, no insignificant whitespace, UTF-8. The worker writes
the same digest when it freezes a manifest, so a run can prove it trained on exactly that data.
Paths are relative to `--data_dir`; absolute paths and `..` are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

MANIFEST_FORMAT = "retrain.manifest/v1"
SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """The data given to a run is unusable; the message says what to fix."""


@dataclass(frozen=True)
class ImageRecord:
    path: str  # relative, POSIX separators
    label: str
    split: str
    etag: str = ""


@dataclass(frozen=True)
class Manifest:
    classes: tuple[str, ...]
    images: tuple[ImageRecord, ...]
    sha256: str

    def split(self, name: str) -> list[ImageRecord]:
        return [r for r in self.images if r.split == name]


def _canonical_entry(record: ImageRecord) -> dict[str, str]:
    return {"path": record.path, "label": record.label, "split": record.split, "etag": record.etag}


def manifest_sha256(classes: list[str] | tuple[str, ...], images: list[ImageRecord] | tuple[ImageRecord, ...]) -> str:
    """Digest of the canonical JSON of (classes, images sorted by path)."""
    body = {
        "classes": list(classes),
        "images": [_canonical_entry(r) for r in sorted(images, key=lambda r: (r.path, r.split))],
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_relative_path(path: str) -> str:
    """Refuse paths that could escape the data directory or that no blob store would produce."""
    if not isinstance(path, str) or not path:
        raise DataError("image path must be a non-empty string")
    if "\\" in path or any(ord(c) < 32 for c in path):
        raise DataError(f"image path has a backslash or control character: {path!r}")
    posix = PurePosixPath(path)
    if posix.is_absolute() or ".." in posix.parts:
        raise DataError(f"image path must be relative and must not contain '..': {path!r}")
    return str(posix)


def _record_from_json(raw: Any, index: int) -> ImageRecord:
    if not isinstance(raw, dict):
        raise DataError(f"manifest image #{index} is not an object")
    missing = [k for k in ("path", "label", "split") if k not in raw]
    if missing:
        raise DataError(f"manifest image #{index} lacks {', '.join(missing)}")
    split = raw["split"]
    if split not in SPLITS:
        raise DataError(f"manifest image #{index} ({raw['path']!r}) has split {split!r}; expected one of {SPLITS}")
    label = raw["label"]
    if not isinstance(label, str) or not label:
        raise DataError(f"manifest image #{index} ({raw['path']!r}) has an empty label")
    etag = raw.get("etag", "")
    return ImageRecord(path=check_relative_path(raw["path"]), label=label, split=split, etag=str(etag or ""))


def parse_manifest(document: Any) -> Manifest:
    """Validate a decoded manifest document; verify its sha256 when it carries one."""
    if isinstance(document, list):  # a bare list of images is accepted too
        document = {"images": document}
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise DataError("manifest must be an object with an 'images' list")
    fmt = document.get("format", MANIFEST_FORMAT)
    if fmt != MANIFEST_FORMAT:
        raise DataError(f"unsupported manifest format {fmt!r}; this script reads {MANIFEST_FORMAT}")
    images = tuple(_record_from_json(raw, i) for i, raw in enumerate(document["images"]))
    if not images:
        raise DataError("manifest lists no images")
    seen: set[str] = set()
    for record in images:
        if record.path in seen:
            raise DataError(f"manifest lists {record.path!r} twice")
        seen.add(record.path)
    labels = sorted({r.label for r in images})
    classes = document.get("classes") or labels
    if not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise DataError("manifest 'classes' must be distinct non-empty strings")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise DataError(f"manifest labels {unknown} are not in its classes {list(classes)}")
    digest = manifest_sha256(classes, images)
    claimed = document.get("sha256")
    if claimed and claimed != digest:
        raise DataError(
            f"manifest sha256 mismatch: it claims {claimed} but its content hashes to {digest}; the file was changed after it was frozen"
        )
    return Manifest(classes=tuple(classes), images=images, sha256=digest)


class NotARegularFileError(OSError):
    """A FIFO, device, socket or folder where a data file was expected."""


def open_regular_file(path: str | Path) -> BinaryIO:
    """Open a regular file for reading (binary). O_NONBLOCK and the fstat: a FIFO or a device named
    like an image or a manifest would block the reader forever (a stalled screening, loader or
    run), so anything but a regular file is refused before it is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFileError(f"not a regular file: {path}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_regular_file(path: str | Path) -> str:
    with open_regular_file(path) as fh:
        return fh.read().decode("utf-8")


def load_manifest(path: str | Path, expected_sha256: str | None = None) -> Manifest:
    """The manifest at `path`, verified: its content must hash to the digest it carries and, when
    the caller knows which manifest the run was frozen with (`expected_sha256`), to that one too: a
    manifest rewritten with a recomputed digest is refused rather than trained on."""
    try:
        text = _read_regular_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read manifest {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"manifest {path} is not valid JSON: {exc}") from exc
    manifest = parse_manifest(document)
    if expected_sha256 is not None and manifest.sha256 != expected_sha256:
        raise DataError(
            f"manifest {path} hashes to {manifest.sha256}, but this run was frozen with {expected_sha256}: "
            "it is not the manifest the run was planned with"
        )
    return manifest


def dump_manifest(classes: list[str], images: list[ImageRecord]) -> dict[str, Any]:
    """The JSON document for a manifest, digest included."""
    return {
        "format": MANIFEST_FORMAT,
        "classes": list(classes),
        "images": [_canonical_entry(r) for r in sorted(images, key=lambda r: r.path)],
        "sha256": manifest_sha256(classes, images),
    }


def stable_split(path: str, val_fraction: float) -> str:
    """A split that depends only on the path, so an image never moves between train and val as data grows."""
    bucket = zlib.crc32(path.encode("utf-8")) % 10_000
    return "val" if bucket < round(val_fraction * 10_000) else "train"


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _class_images(root: Path, folder: Path, classes: set[str]) -> Iterator[tuple[str, str]]:
    """(label, path relative to root) for every image under folder/<label>/; adds each label to `classes`."""
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes.add(class_dir.name)
        for file in sorted(class_dir.rglob("*")):
            if file.is_file() and _is_image_name(file.name):
                yield class_dir.name, file.relative_to(root).as_posix()


def scan_image_folder(data_dir: str | Path, val_fraction: float = 0.2) -> Manifest:
    """Build a manifest from an ImageFolder tree.

    `data_dir/train/<class>/*` and `data_dir/val/<class>/*` when both exist (the reference
    layout); otherwise `data_dir/<class>/*` split by `stable_split`. Class folders with no images
    are kept as classes so that the empty class is reported rather than silently dropped.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data_dir {root} is not a directory")
    split_dirs = {name: root / name for name in SPLITS}
    records: list[ImageRecord] = []
    classes: set[str] = set()
    if all(d.is_dir() for d in split_dirs.values()):  # the reference layout: the split is the folder's
        for split, split_dir in split_dirs.items():
            for label, rel in _class_images(root, split_dir, classes):
                records.append(ImageRecord(path=rel, label=label, split=split))
    else:
        for label, rel in _class_images(root, root, classes):
            records.append(ImageRecord(path=rel, label=label, split=stable_split(rel, val_fraction)))
    if not classes:
        raise DataError(f"no class folders under {root} (expected <class>/<image> or train/<class>/<image>)")
    if not records:
        raise DataError(f"no images under {root} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    ordered = sorted(classes)
    return Manifest(classes=tuple(ordered), images=tuple(records), sha256=manifest_sha256(ordered, records))
