"""The worker behaviour suite re-run on the ledger in Azure Table Storage (real Azurite)."""

from __future__ import annotations

import uuid

import pytest

from tests.unit.test_worker import *  # noqa: F403 - the same behaviours, on Table Storage
from worker.adapters.azure.table_store import TableStore

pytestmark = pytest.mark.integration


@pytest.fixture
def new_store(azurite):  # replaces the memory/sqlite-parametrized fixture of the imported suite
    table, opened = f"t{uuid.uuid4().hex[:16]}", []

    def make():
        opened.append(TableStore.from_connection_string(azurite.connection_string, table))
        return opened[-1]

    yield make
    opened[0].table.delete_table()
    for store in opened:
        store.close()
