"""`retrain serve` as a user runs it: drop images, read `explain`, watch one real 2-rank run happen."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, child_env

pytestmark = pytest.mark.e2e

CONFIG = """
[worker]
state_dir = "state"
images_root = "images"
tick_seconds = 0.5
[models.birds]
min_new_images = 16
min_per_class = 3
quiet_period = "1s"
cooldown = 0
val_fraction = 0.25
[models.birds.training]
epochs = 1
image_size = 32
batch_size = 4
nproc = 2
extra = ["--weights", "none", "--workers", "0"]
"""


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=cwd,
        env=child_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _drop(source: Path, target: Path, names: list[str]) -> None:
    for name in names:
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name, dest)


def test_serve_waits_with_reasons_then_runs_exactly_once_and_keeps_the_files(tmp_path):
    from synthetic_birds import generate

    source = tmp_path / "source"
    generate(source, 10, layout="flat", seed=3)
    names = sorted(p.relative_to(source).as_posix() for p in source.rglob("*.*"))
    (tmp_path / "retrain.toml").write_text(CONFIG)
    images = tmp_path / "images" / "birds"
    serve = subprocess.Popen(
        [sys.executable, "-m", "worker", "serve", "-c", "retrain.toml", "--max-seconds", "300", "--settle-seconds", "0.2", "--create-folders"],
        cwd=tmp_path, env=child_env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        first = [n for n in names if n.split("/")[1][-6:-4] < "05"]  # 5 per class
        _drop(source, images, first)
        (images / "chicken" / "bad\x07name.jpg").write_bytes(b"hostile name")  # rejected, never counted

        seen: list[str] = []

        def waiting():
            out = _cli("explain", "birds", "--json", "-c", "retrain.toml", cwd=tmp_path)
            decisions = json.loads(out.stdout)["birds"] if out.returncode == 0 else []
            seen.append(decisions[0]["reason"] if decisions else f"exit {out.returncode}: {out.stderr[-500:]}")
            return decisions and "10/16 new images" in decisions[0]["reason"] and decisions

        try:
            _wait(waiting, 120, "the policy to say it waits for 16 images")
        except AssertionError:
            serve.send_signal(signal.SIGINT)
            raise AssertionError(f"explain said {seen[-3:]}; serve printed {serve.communicate(timeout=30)[0][-3000:]}") from None
        _drop(source, images, [n for n in names if n not in first])
        _drop(source, images, first)  # the same files again: duplicates, not new images

        def finished():
            out = _cli("status", "birds", "--json", "-c", "retrain.toml", cwd=tmp_path)
            runs = json.loads(out.stdout)["birds"]["last_runs"] if out.returncode == 0 else []
            return runs and runs[0]["state"] in ("succeeded", "finalized") and runs

        runs = _wait(finished, 240, "the run to finish")
        assert len(runs) == 1
        assert runs[0]["images"] == 20
        run_id = runs[0]["run_id"]
        state = tmp_path / "state"
        manifest = json.loads((state / "manifests" / f"{runs[0]['manifest_sha256']}.json").read_text())  # by digest
        assert len(manifest["images"]) == 20
        assert (state / "runs" / f"{run_id}-a1" / "outputs" / "model.pt").exists()
        metrics = json.loads((state / "runs" / f"{run_id}-a1" / "outputs" / "metrics.json").read_text())
        assert metrics["manifest_sha256"] == manifest["sha256"]
        assert metrics["world_size"] == 2
        _wait(lambda: (state / "events.jsonl").exists(), 10, "the events file")
        events = [json.loads(line) for line in (state / "events.jsonl").read_text().splitlines()]
        types = [e["type"] for e in events]  # completion may or may not have finished by now
        assert types[0] == "retrain.run.submitted", types
        assert types.count("retrain.run.submitted") == 1, types
        assert set(types) <= {"retrain.run.submitted", "retrain.model.registered", "retrain.model.rejected"}, types
    finally:
        serve.send_signal(signal.SIGINT)  # Ctrl-C, by our own child's PID
        output = serve.communicate(timeout=30)[0]
    assert serve.returncode == 0, output[-3000:]
    assert "rejected" in output
    assert "bad\\u0007name.jpg" in output


def test_inject_force_wait_backfills_trains_and_answers_with_the_runs_end(tmp_path):
    """No `serve` running: `inject --force --wait` registers the images, plans the run, ticks the
    worker through a real 2-rank training and its completion, and exits 0 once it is registered."""
    from synthetic_birds import generate

    generate(tmp_path / "images" / "birds", 6, layout="flat", seed=5)
    (tmp_path / "retrain.toml").write_text(CONFIG + "[models.birds.gate]\nmin_value = 0\n")  # a first model on 12 images passes
    cmd = [sys.executable, "-m", "worker", "inject", "birds", "--prefix", "", "--force", "--wait", "--timeout", "240",
           "--reason", "first model", "-c", "retrain.toml"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=child_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("registered 12 images")
    assert lines[1].startswith("a run starts now (birds-0001-")
    assert any(line.endswith(": running") or line.endswith(": submitted") for line in lines)
    assert lines[-1].startswith("birds-0001-")
    assert " registered: registered as v1: first model" in lines[-1]
    runs = json.loads(_cli("runs", "birds", "--json", "-c", "retrain.toml", cwd=tmp_path).stdout)["birds"]
    assert [(r["outcome"], r["request_reasons"]) for r in runs] == [("registered", ["first model"])]
