"""Several worker processes sharing one SQLite ledger: no lost update, no lock crash, one run."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from tests.conftest import ROOT, child_env
from worker.adapters.local.sqlite_store import SqliteStore

pytestmark = pytest.mark.integration

PROCESSES, EVENTS, DUPLICATE_SHARE = 4, 2000, 0.3


@pytest.mark.parametrize("lock", ["sqlite", "sqlite-portable"])  # flock (Linux, macOS) and filelock's lock (the Windows path)
def test_four_processes_with_duplicates_count_every_image_once_and_make_one_run(tmp_path, lock):
    rng = random.Random(7)
    unique_per_process = int(EVENTS * (1 - DUPLICATE_SHARE))
    universe = [(f"{'chicken' if i % 2 else 'turkey'}/{i:06d}.jpg", f"e{i}") for i in range(PROCESSES * unique_per_process)]
    files = []
    for p in range(PROCESSES):
        mine = universe[p * unique_per_process : (p + 1) * unique_per_process]
        duplicates = rng.choices(universe, k=EVENTS - len(mine))  # re-deliveries of anyone's events
        events = mine + duplicates
        rng.shuffle(events)
        path = tmp_path / f"events-{p}.txt"
        path.write_text("\n".join(f"{a} {b}" for a, b in events))
        files.append(path)
    db = tmp_path / "ledger.db"
    SqliteStore(db).close()  # create the schema once, as `retrain serve` does at start
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.integration.ledger_client", f"{lock}:{db}", str(tmp_path / "state"), str(p), str(f)],
            cwd=ROOT,
            env=child_env(PYTHONPATH=str(ROOT)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p, f in enumerate(files)
    ]
    results = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0] * PROCESSES, [r[1][-2000:] for r in results]
    store = SqliteStore(db)
    with store.transaction() as tx:
        counts = tx.count_images("birds")
        runs = tx.runs("birds")
        inbox = tx.conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0]
    assert sum(counts.values()) == len(universe)
    assert inbox == 0, "an image version is its own key: image messages need no inbox row"
    assert len(runs) == 1, [r.run_id for r in runs]
    assert runs[0].new_image_count >= 1000
    assert counts.get("in_run", 0) == runs[0].new_image_count
    assert counts.get("pending", 0) + counts.get("in_run", 0) == len(universe)
