"""A directory as a blob store: images under a root, etags from content, write-once artifacts.

The etag is the first 32 hex digits of the content's sha256, so touching a file is not a new
version but changing its bytes is. Hashes are cached by (size, mtime) so rescans are cheap.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from shared.messages import IMAGE_EXTENSIONS
from worker.ports import BlobInfo, BlobStore


class DirectoryBlobStore(BlobStore):
    def __init__(self, root: str | Path, *, settle_seconds: float = 0.0, images_only: bool = True):
        self.root = Path(root)
        self.settle_seconds = settle_seconds  # files younger than this may still be being written
        self.images_only = images_only
        self._etags: dict[str, tuple[int, int, str]] = {}

    def _etag(self, rel: str, stat: os.stat_result) -> str:
        cached = self._etags.get(rel)
        if cached and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        digest = hashlib.sha256()
        with open(self.root / rel, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        etag = digest.hexdigest()[:32]
        self._etags[rel] = (stat.st_size, stat.st_mtime_ns, etag)
        return etag

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        import time

        if not self.root.is_dir():
            return
        cutoff = time.time() - self.settle_seconds
        names = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") or (self.images_only and not name.lower().endswith(IMAGE_EXTENSIONS)):
                    continue
                rel = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    names.append(rel)
        for rel in sorted(names):  # by full path, like a blob listing (os.walk order is not)
            try:
                stat = (self.root / rel).stat()
                if self.settle_seconds and stat.st_mtime > cutoff:
                    continue
                yield BlobInfo(path=rel, etag=self._etag(rel, stat), size=stat.st_size)
            except FileNotFoundError:
                continue  # deleted while we looked

    def info(self, path: str) -> BlobInfo | None:
        try:
            stat = (self.root / path).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not (self.root / path).is_file():
            return None
        return BlobInfo(path=path, etag=self._etag(path, stat), size=stat.st_size)

    def read(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def write_once(self, path: str, data: bytes) -> bool:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(target, "xb") as fh:  # exclusive create: the first writer wins
                fh.write(data)
            return True
        except FileExistsError:
            return False

    def local_path(self, path: str) -> Path | None:
        return self.root / path


class PrefixedBlobStore(BlobStore):
    """One model's view of a shared container: `<prefix><path>` outside, `<path>` inside.

    The images container holds `<model>/<label>/<file>`; the worker's paths are `<label>/<file>`.
    """

    def __init__(self, inner: BlobStore, prefix: str):
        self.inner, self.prefix = inner, prefix

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        for blob in self.inner.list(self.prefix + prefix):
            yield BlobInfo(path=blob.path[len(self.prefix) :], etag=blob.etag, size=blob.size)

    def info(self, path: str) -> BlobInfo | None:
        blob = self.inner.info(self.prefix + path)
        return None if blob is None else BlobInfo(path=path, etag=blob.etag, size=blob.size)

    def read(self, path: str) -> bytes:
        return self.inner.read(self.prefix + path)

    def write_once(self, path: str, data: bytes) -> bool:
        return self.inner.write_once(self.prefix + path, data)

    def local_path(self, path: str) -> Path | None:
        return self.inner.local_path(self.prefix + path)
