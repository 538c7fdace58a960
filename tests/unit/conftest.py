"""The unit suites' ledgers: every test that asks for one runs on the in-memory fake and on SQLite;
the behaviour suites (`new_store`) also on the in-memory fake with the Table ledger's staged ingest.
A module marked `on_table_storage` also runs them on Azure Table Storage (real Azurite; those
cases carry the `integration` mark), except its tests marked `not_on_table_storage`."""

from __future__ import annotations

import uuid

import pytest

from tests.fakes.memory_store import MemoryStore, StagedMemoryStore
from worker.adapters.local.sqlite_store import SqliteStore

TABLE = pytest.param("table", marks=pytest.mark.integration, id="table")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The ledgers each fixture runs on; `table` where the module asks for it."""
    on_table = metafunc.definition.get_closest_marker("on_table_storage") is not None
    on_table = on_table and metafunc.definition.get_closest_marker("not_on_table_storage") is None
    for name, ledgers in (("new_store", ["memory", "sqlite", "staged"]), ("store", ["memory", "sqlite"])):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, [*ledgers, *([TABLE] if on_table else [])], indirect=True)


def _table_store(request: pytest.FixtureRequest, table: str):
    from worker.adapters.azure.table_store import TableStore

    return TableStore.from_connection_string(request.getfixturevalue("azurite").connection_string, table)


@pytest.fixture
def new_store(request, tmp_path):
    """Opens the test's ledger (each call a new connection to the same one)."""
    kind, opened = request.param, []
    memory = StagedMemoryStore() if kind == "staged" else MemoryStore()
    table = f"t{uuid.uuid4().hex[:16]}"

    def make():
        if kind == "table":
            opened.append(_table_store(request, table))
        else:
            opened.append(SqliteStore(tmp_path / "ledger.db") if kind == "sqlite" else memory)
        return opened[-1]

    yield make
    if kind == "table" and opened:
        opened[0].table.delete_table()
    for store in opened:
        store.close()


@pytest.fixture
def store(request, tmp_path):
    """The test's ledger, for tests of the store port itself and of transactions."""
    kind = request.param
    if kind == "table":
        opened = _table_store(request, f"t{uuid.uuid4().hex[:16]}")
    else:
        opened = MemoryStore() if kind == "memory" else SqliteStore(tmp_path / "ledger.db")
    yield opened
    if kind == "table":
        opened.table.delete_table()
    opened.close()
