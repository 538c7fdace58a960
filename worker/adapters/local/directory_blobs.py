"""A directory as a blob store: images under a root, etags from content, write-once artifacts.

The etag is the first 32 hex digits of the content's sha256, so touching a file is not a new
version but changing its bytes is. Hashes are cached by (size, mtime) so rescans are cheap.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat as stat_module
import time
from collections.abc import Iterator
from pathlib import Path

from shared.files import NotRegularFileError, open_regular
from shared.messages import IMAGE_EXTENSIONS
from shared.redact import printable
from worker.ports import BlobInfo, BlobStore

log = logging.getLogger("retrain.blobs")


class DirectoryBlobStore(BlobStore):
    def __init__(self, root: str | Path, *, settle_seconds: float = 0.0, images_only: bool = True):
        self.root = Path(root)
        self.settle_seconds = settle_seconds  # files younger than this may still be being written
        self.images_only = images_only
        self._etags: dict[str, tuple[int, int, str]] = {}
        self._skipped: set[str] = set()

    def _etag(self, rel: str, stat: os.stat_result) -> str:
        cached = self._etags.get(rel)
        if cached and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        digest = hashlib.sha256()
        with open_regular(self.root / rel) as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        etag = digest.hexdigest()[:32]
        self._etags[rel] = (stat.st_size, stat.st_mtime_ns, etag)
        return etag

    def _skip(self, rel: str, why: str) -> None:
        if rel not in self._skipped:  # once per name, not on every scan
            self._skipped.add(rel)
            log.warning("skipping %s under %s: %s", printable(rel)[:200], printable(self.root)[:200], why)

    def _regular_file(self, rel: str) -> os.stat_result | None:
        """The file's stat if it is a regular file inside the root (a symlink counts only when its
        target is one); None, logged once, for FIFOs, devices, sockets, loops and escapes."""
        path = self.root / rel
        try:
            st = os.lstat(path)
            if stat_module.S_ISLNK(st.st_mode):
                target = Path(os.path.realpath(path))
                root = Path(os.path.realpath(self.root))
                if root != target and root not in target.parents:
                    self._skip(rel, "a symlink that points outside the images folder")
                    return None
                st = os.stat(target)
        except FileNotFoundError:
            return None  # deleted while we looked
        except OSError as exc:  # a symlink loop, a permission problem
            self._skip(rel, f"cannot be read ({exc.strerror or exc.__class__.__name__})")
            return None
        if not stat_module.S_ISREG(st.st_mode):
            self._skip(rel, "not a regular file (a FIFO, device, socket or directory)")
            return None
        return st

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
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
                try:
                    rel.encode("utf-8")
                except UnicodeEncodeError:  # os.walk hands undecodable bytes over as surrogates
                    self._skip(rel, "the name is not valid UTF-8")
                    continue
                if rel.startswith(prefix):
                    names.append(rel)
        for rel in sorted(names):  # by full path, like a blob listing (os.walk order is not)
            stat = self._regular_file(rel)
            if stat is None or (self.settle_seconds and stat.st_mtime > cutoff):
                continue
            try:
                yield BlobInfo(path=rel, etag=self._etag(rel, stat), size=stat.st_size)
            except FileNotFoundError:
                continue  # deleted while we looked
            except (OSError, NotRegularFileError) as exc:  # replaced by something else between the checks
                self._skip(rel, str(exc))

    def info(self, path: str) -> BlobInfo | None:
        try:
            stat = self._regular_file(path)
        except NotADirectoryError:
            return None
        if stat is None:
            return None
        return BlobInfo(path=path, etag=self._etag(path, stat), size=stat.st_size)

    def read(self, path: str) -> bytes:
        with open_regular(self.root / path) as fh:
            return fh.read()

    def write_once(self, path: str, data: bytes) -> bool:
        """Create `path` with `data` if it does not exist; whole or not at all, even across a crash.

        The bytes go to a temporary file first, fsynced, then are linked to the name: link() fails
        if the name exists (the first writer wins) and a crash mid-write leaves only the temporary
        file, never a torn blob under the final name (a torn manifest blocked its model forever).
        """
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        try:
            with open(tmp, "xb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            return True
        finally:
            tmp.unlink(missing_ok=True)

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
