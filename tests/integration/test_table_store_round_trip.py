"""The ledger round-trip suite re-run on Azure Table Storage (real Azurite): every field reads back."""

from __future__ import annotations

import uuid

import pytest

from tests.unit.test_store_round_trip import *  # noqa: F403 - the same round trips, on Table Storage
from worker.adapters.azure.table_store import TableStore

pytestmark = pytest.mark.integration


@pytest.fixture
def store(azurite):  # replaces the memory/sqlite-parametrized fixture of the imported suite
    opened = TableStore.from_connection_string(azurite.connection_string, f"t{uuid.uuid4().hex[:16]}")
    yield opened
    opened.table.delete_table()
    opened.close()
