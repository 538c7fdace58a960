"""The property tests' random interleavings (uploads, duplicates, overwrites, ticks, completions,
failures, forced requests) on the Table Storage ledger, through its staged ingest: no image lost,
none new to two successful runs, never two runs in flight, every manifest matching its digest.
Fewer examples than on the embedded ledgers: each step is a few real calls to Azurite."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, settings

from tests.unit.test_worker_properties import WorkerMachine
from worker.adapters.azure.table_store import TableStore

pytestmark = pytest.mark.integration


class TableWorkerMachine(WorkerMachine):
    connection: str = ""
    store_factory = staticmethod(lambda root: TableStore.from_connection_string(TableWorkerMachine.connection, f"p{uuid.uuid4().hex[:16]}"))

    def teardown(self):
        self.h.store.table.delete_table()
        self.h.store.close()


def test_random_interleavings_keep_every_guarantee_on_the_table_ledger(azurite):
    TableWorkerMachine.connection = azurite.connection_string
    test = TableWorkerMachine.TestCase
    test.settings = settings(max_examples=12, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck))
    test().runTest()
