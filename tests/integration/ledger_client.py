"""A worker process for the multi-process tests: feeds upload events into a shared SQLite ledger.

    python -m tests.integration.ledger_client STORE STATE_DIR PROCESS_INDEX EVENTS_FILE [THRESHOLD]

EVENTS_FILE holds one "path etag" per line; the client handles them in order through a full
worker (real SQLite store, local runs folder via a fake launcher when given).
"""

from __future__ import annotations

import sys
from pathlib import Path

from shared.messages import ImageUploaded, Tick
from tests.fakes.backend import FakeTrainingBackend
from worker.adapters.local.sqlite_store import SqliteStore
from worker.app.bootstrap import build_worker
from worker.config import load_config


def config_env(state_dir: str, **knobs: str) -> dict[str, str]:
    env = {"RETRAIN__WORKER__STATE_DIR": state_dir, "RETRAIN__WORKER__IMAGES_ROOT": str(Path(state_dir) / "images")}
    for key, value in knobs.items():
        env[f"RETRAIN__MODELS__BIRDS__{key.upper()}"] = value
    return env


def open_store(spec: str):
    """`sqlite:<path>` (or a bare path), `sqlite-portable:<path>` (the writers' lock Windows uses) or
    `table:<table name>` (connection string in $RETRAIN_TABLE_CONNECTION)."""
    kind, _, where = spec.partition(":")
    if kind == "table":
        import os

        from worker.adapters.azure.table_store import TableStore

        return TableStore.from_connection_string(os.environ["RETRAIN_TABLE_CONNECTION"], where)
    if kind == "sqlite-portable":
        return SqliteStore(where, portable_lock=True)
    return SqliteStore(where if kind == "sqlite" else spec)


def main(argv: list[str]) -> int:
    store, state_dir, index, events_file = argv[:4]
    threshold = argv[4] if len(argv) > 4 else "1000"
    env = config_env(state_dir, min_new_images=threshold, min_per_class="5", quiet_period="0", cooldown="1d", val_fraction="0.2")
    worker = build_worker(load_config(None, env=env), store=open_store(store), backend=FakeTrainingBackend())
    handled = 0
    for line in Path(events_file).read_text().splitlines():
        path, etag = line.split(" ")
        worker.handle(ImageUploaded.of("birds", path, etag, 1))
        handled += 1
    # As the timer's tick does (without polling: each process has its own fake backend): on a
    # staged-ingest ledger this folds and evaluates what the throttled evaluations left.
    worker.handle(Tick(message_id=f"tick-{index}", model="birds"))
    print(f"process {index} handled {handled}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
