"""The unit suites' ledgers: every test that asks for one runs on the in-memory fake and on SQLite."""

from __future__ import annotations

import pytest

from tests.fakes.memory_store import MemoryStore
from worker.adapters.local.sqlite_store import SqliteStore


@pytest.fixture(params=["memory", "sqlite"])
def new_store(request, tmp_path):
    """Opens the test's ledger (each call a new connection to the same one). The Table Storage
    suites, which import the worker and completion suites, define their own, so those tests also
    run on Table Storage."""
    memory, opened = MemoryStore(), []

    def make():
        opened.append(memory if request.param == "memory" else SqliteStore(tmp_path / "ledger.db"))
        return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(new_store):
    """One connection to the test's ledger."""
    return new_store()
