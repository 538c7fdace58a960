"""The completion behaviour suite re-run on the ledger in Azure Table Storage (real Azurite)."""

from __future__ import annotations

import uuid

import pytest

from tests.unit.test_completion import *  # noqa: F403 - the same behaviours, on Table Storage
from tests.unit.worker_harness import make_harness
from worker.table_store import TableStore

pytestmark = pytest.mark.integration


@pytest.fixture
def h(azurite, tmp_path):  # replaces the memory/sqlite-parametrized fixture of the imported suite
    store = TableStore.from_connection_string(azurite.connection_string, f"t{uuid.uuid4().hex[:16]}")
    yield make_harness(tmp_path, store=store, cooldown=0)
    store.table.delete_table()
    store.close()
