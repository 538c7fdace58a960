"""The unit suites' ledgers: every test that asks for one runs on the in-memory fake and on SQLite;
the behaviour suites (`new_store`) also on the in-memory fake with the Table ledger's staged ingest."""

from __future__ import annotations

import pytest

from tests.fakes.memory_store import MemoryStore, StagedMemoryStore
from worker.adapters.local.sqlite_store import SqliteStore


@pytest.fixture(params=["memory", "sqlite", "staged"])
def new_store(request, tmp_path):
    """Opens the test's ledger (each call a new connection to the same one). The Table Storage
    suites, which import the worker and completion suites, define their own, so those tests also
    run on Table Storage."""
    memory, opened = (StagedMemoryStore() if request.param == "staged" else MemoryStore()), []

    def make():
        opened.append(SqliteStore(tmp_path / "ledger.db") if request.param == "sqlite" else memory)
        return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    """The test's ledger, for tests of the store port itself and of transactions."""
    opened = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "ledger.db")
    yield opened
    opened.close()
