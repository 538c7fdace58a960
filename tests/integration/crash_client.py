"""One life of a worker process for the crash tests.

    python -m tests.integration.crash_client STATE_DIR FAKE_TRAIN feed|backfill|recover

"feed" uploads 10 images per class; the upload that crosses the threshold plans and submits a
run, and RETRAIN_CRASH_AT (if set) kills the process at that point of the protocol. "backfill"
sends one forced request that registers 60 images by prefix (in chunks); "recover" is the
restarted worker: it redelivers that request (the platform would) and ticks until the run has
finished.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from shared.messages import ImageUploaded, RetrainRequested
from tests.integration.ledger_client import config_env
from worker.adapters.local.torchrun_backend import LocalTorchrunBackend
from worker.app.bootstrap import build_worker
from worker.config import load_config


def main(argv: list[str]) -> int:
    state_dir, fake_train, mode = argv
    config = load_config(
        None, env=config_env(state_dir, min_new_images="20", min_per_class="2", quiet_period="0", cooldown="0", val_fraction="0.3")
    )
    backend = LocalTorchrunBackend(Path(state_dir) / "runs", launcher=[sys.executable, fake_train])
    worker = build_worker(config, backend=backend)
    backfill = RetrainRequested(message_id="backfill-1", model="birds", prefix="", force=True, requested_by="crash test")
    if mode == "backfill":
        images = config.images_dir("birds")
        for i in range(30):
            for label in ("chicken", "turkey"):
                (images / label).mkdir(parents=True, exist_ok=True)
                (images / label / f"{i:03d}.jpg").write_bytes(b"image %d %s" % (i, label.encode()))
        print(worker.handle(backfill).detail)
        return 0
    if mode == "recover" and config.images_dir("birds").exists():
        print(worker.handle(backfill).detail)
    if mode == "feed":
        for i in range(10):
            for label in ("chicken", "turkey"):
                worker.handle(ImageUploaded.of("birds", f"{label}/{i:03d}.jpg", "e1", 1))
        print("fed without crashing")
        return 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        worker.tick()
        with worker.store.transaction() as tx:
            runs = tx.runs("birds")
        if runs and all(r.state == "finalized" for r in runs):
            print("recovered")
            return 0
        time.sleep(0.2)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
