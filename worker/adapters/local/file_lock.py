"""An exclusive lock between processes on a lock file: `flock` where the platform has it (Linux,
macOS: a blocked waiter is woken by the kernel the moment the lock is free), filelock's lock
elsewhere (Windows; it polls). Both release when the process dies, so a crash never leaves the
ledger, the registry or the events file locked."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import filelock  # fcntl on POSIX, msvcrt on Windows

try:
    import fcntl as _fcntl
except ImportError:  # Windows
    _fcntl = None  # type: ignore[assignment]


class FileLock:
    """One holder at a time across processes (and across threads: each thread opens its own handle).
    Not reentrant. `portable=True` forces the filelock path that Windows uses (tests run it)."""

    def __init__(self, path: str | os.PathLike[str], portable: bool = False) -> None:
        self.path = Path(path)
        self._use_flock = _fcntl is not None and not portable
        self._local = threading.local()

    def acquire(self) -> None:
        if self._use_flock:
            fd = getattr(self._local, "fd", None)
            if fd is None:
                fd = self._local.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            _fcntl.flock(fd, _fcntl.LOCK_EX)
        else:
            lock = getattr(self._local, "lock", None)
            if lock is None:
                lock = self._local.lock = filelock.FileLock(self.path, thread_local=False, is_singleton=False)
            lock.acquire(poll_interval=0.005)

    def release(self) -> None:
        if self._use_flock:
            _fcntl.flock(self._local.fd, _fcntl.LOCK_UN)
        else:
            self._local.lock.release()

    def close(self) -> None:
        """Close this thread's handle (the lock must not be held)."""
        fd = getattr(self._local, "fd", None)
        if fd is not None:
            os.close(fd)
            self._local.fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


@contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock on `path` for a block, then close the handle (for occasional critical sections)."""
    lock = FileLock(path)
    with lock:
        yield
    lock.close()
