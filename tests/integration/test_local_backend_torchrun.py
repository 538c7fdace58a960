"""LocalTorchrunBackend driving real torchrun: a 2-rank train.py run succeeds, cancel stops one, and no rank outlives its run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from worker.adapters.local.process_tree import wait_gone
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


# A rank that ignores SIGTERM and starts a helper process of its own (as a DataLoader worker or a
# fork server would), recording every pid it owns.
STUBBORN_RANK = """\
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
helper = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
with open(os.environ["STUBBORN_PIDS"], "a") as f:
    f.write(f"{os.getpid()} {helper.pid}\\n")
while True:
    time.sleep(0.1)
"""


def stubborn_backend(tmp_path: Path, **kw) -> tuple[LocalTorchrunBackend, Path]:
    script, pids = tmp_path / "stubborn.py", tmp_path / "pids.txt"
    script.write_text(STUBBORN_RANK)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    return LocalTorchrunBackend(tmp_path / "runs", launcher=launcher, env={"STUBBORN_PIDS": str(pids)}, **kw), pids


def recorded_pids(pids: Path, count: int) -> list[int]:
    deadline = time.monotonic() + 120
    while len(pids.read_text().split()) < count if pids.exists() else True:
        assert time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.1)
    return [int(p) for p in pids.read_text().split()]


def test_cancel_leaves_no_process_behind_even_ranks_that_ignore_sigterm(tiny_birds, tmp_path):
    backend, pids = stubborn_backend(tmp_path, stop_grace_s=2)
    backend.submit(birds_spec("stubborn", tiny_birds))
    owned = recorded_pids(pids, 4)  # 2 ranks, each with a helper
    runner = json.loads((tmp_path / "runs" / "stubborn" / "runner.json").read_text())
    try:
        backend.cancel("stubborn")
        final = backend.wait("stubborn", timeout=120)

        assert final.state == "canceled", final.detail
        assert "killed by SIGKILL" in final.detail  # torchrun itself was still waiting for its ranks after the grace
        assert wait_gone([*owned, runner["pid"]], timeout=30) == []
        assert "killing it and every process below it" in (tmp_path / "runs" / "stubborn" / "train.log").read_text()
    finally:
        for pid in owned:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_ranks_orphaned_by_a_launcher_that_died_are_killed_before_the_run_is_recorded_as_ended(tiny_birds, tmp_path):
    """torchrun starts each rank in a session of its own: killing torchrun alone used to leave them
    running. The runner is their subreaper, so it finds and ends them."""
    backend, pids = stubborn_backend(tmp_path)
    backend.submit(birds_spec("orphans", tiny_birds))
    owned = recorded_pids(pids, 4)
    launcher = psutil.Process(owned[0]).parent()
    assert launcher is not None
    assert "torch.distributed.run" in " ".join(launcher.cmdline())
    try:
        launcher.kill()
        final = backend.wait("orphans", timeout=120)

        assert final.state == "failed"
        assert "killed by SIGKILL" in final.detail
        assert wait_gone(owned, timeout=30) == []  # gone by the time exit_code was written (plus reaping)
        assert "left behind" in (tmp_path / "runs" / "orphans" / "train.log").read_text()
    finally:
        for pid in owned:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
