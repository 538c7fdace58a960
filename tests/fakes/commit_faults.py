"""A ledger whose commits fail on cue: lost optimistic races and broken disks, for retry tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

from worker.store import ConcurrencyConflict


def conflicts(on: Iterable[int] | int) -> Callable[[int], BaseException | None]:
    """The commits another writer wins: the first `on` (an int) or those numbered in `on` (from 1).
    Each raises ConcurrencyConflict, as a shared ledger's ETag or lock check does."""
    lost = (lambda n: n <= on) if isinstance(on, int) else frozenset(on).__contains__
    return lambda n: ConcurrencyConflict("another writer committed first") if lost(n) else None


class CommitFaults:
    """Wraps a store: commit number n (counted from 1 over every transaction) raises `fault(n)`
    when that is an exception, and commits for real otherwise. Everything else is the store's own.

    `attempts` counts the commits tried; `committed` lists the numbers of those that went through.
    Give it to the code under test in place of the store, or use `in_place` when the store's own
    methods open the transactions.
    """

    def __init__(self, inner, fault: Callable[[int], BaseException | None]):
        self.inner, self.fault = inner, fault
        self._open = inner.transaction  # kept: `in_place` replaces the store's own
        self.attempts = 0
        self.committed: list[int] = []

    @classmethod
    def in_place(cls, store, fault: Callable[[int], BaseException | None], monkeypatch) -> CommitFaults:
        """Make the store's own transactions fail on cue (undone by monkeypatch at the test's end)."""
        faults = cls(store, fault)
        monkeypatch.setattr(store, "transaction", faults.transaction)
        return faults

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @contextmanager
    def transaction(self):
        with self._open() as tx:
            real = tx.commit

            def commit():
                self.attempts += 1
                error = self.fault(self.attempts)
                if error is not None:
                    raise error
                real()
                self.committed.append(self.attempts)

            tx.commit = commit
            yield tx


class RetryClock:
    """tenacity's view of time for the retry tests: its sleeps are recorded (`waits`) and advance
    a monotonic clock at once (`offset`; a test adds to it to make an attempt take long)."""

    def __init__(self, monkeypatch) -> None:
        self.waits: list[float] = []
        self.offset = 0.0
        real_monotonic = time.monotonic
        monkeypatch.setattr(time, "sleep", self.sleep)
        monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + self.offset)

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.offset += seconds
