"""LocalTorchrunBackend driving the real train.py under torchrun: a 2-rank run succeeds, and cancel stops one."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from worker.adapters.local.torchrun_backend import LocalTorchrunBackend
from worker.ports import RunSpec, TrainingArgs

from manifests import dump_manifest, scan_image_folder

pytestmark = pytest.mark.integration


def birds_spec(run_id: str, data_dir: Path, epochs: int = 1) -> RunSpec:
    scanned = scan_image_folder(data_dir)
    manifest = dump_manifest(list(scanned.classes), list(scanned.images))
    training = TrainingArgs(epochs=epochs, image_size=32, batch_size=4, nproc=2, extra=("--weights", "none", "--workers", "0"))
    return RunSpec(backend_run_id=run_id, model="birds", manifest=manifest, data_dir=str(data_dir), training=training)


def processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `text`: the runner, torchrun and its ranks."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if text in cmdline and state not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def test_a_two_rank_torchrun_run_succeeds_with_the_manifest_it_was_given(tiny_birds, tmp_path):
    backend = LocalTorchrunBackend(tmp_path / "runs")
    spec = birds_spec("birds-1", tiny_birds)

    backend.submit(spec)
    final = backend.wait("birds-1", timeout=240)

    assert final.state == "succeeded", final.detail
    outputs = Path(final.outputs_dir)
    assert (outputs / "model.pt").is_file()
    metrics = json.loads((outputs / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["manifest_sha256"] == spec.manifest["sha256"]


def test_cancel_stops_torchrun_and_all_its_ranks(tiny_birds, tmp_path):
    backend = LocalTorchrunBackend(tmp_path / "runs")
    run_dir = tmp_path / "runs" / "long"
    backend.submit(birds_spec("long", tiny_birds, epochs=500))
    try:
        deadline = time.monotonic() + 120
        while "training " not in (run_dir / "train.log").read_text(errors="replace"):  # the ranks are up and training
            assert not backend.status("long").terminal, backend.status("long").detail
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)

        backend.cancel("long")
        final = backend.wait("long", timeout=60)

        assert final.state == "canceled", final.detail
        deadline = time.monotonic() + 10
        while processes_mentioning(str(run_dir)):
            assert time.monotonic() < deadline, f"left running: {processes_mentioning(str(run_dir))}"
            time.sleep(0.1)
    finally:
        for pid in processes_mentioning(str(run_dir)):
            os.kill(pid, signal.SIGKILL)
