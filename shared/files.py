"""Files from outside and files shared between processes: reading one without ever blocking on a
FIFO or a device, and writing one so that readers see the old file or the whole new one."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import BinaryIO

from shared.redact import printable


class NotRegularFileError(OSError):
    """The path is a FIFO, device, socket or folder: reading it could block forever or never end."""


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for reading (binary) without ever blocking on a FIFO or a device: the
    open does not wait for a writer, and anything but a regular file is refused before a read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(f"{printable(path)[:200]} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to a temporary name of its own (unique per call, so concurrent writers of the
    same path never share one), syncs it and renames it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
