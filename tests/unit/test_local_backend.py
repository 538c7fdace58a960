"""LocalTorchrunBackend with train.py replaced by a tiny script: files, states, idempotency, cancel, restarts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.adapters.local.torchrun_backend import LocalTorchrunBackend
from worker.adapters.local.torchrun_runner import proc_stat
from worker.ports import RunSpec, TrainingArgs

pytestmark = pytest.mark.unit

FAKE_TRAIN = """\
import json, os, sys, time
from pathlib import Path

argv = sys.argv[1:]
mode = argv[argv.index("--mode") + 1] if "--mode" in argv else "ok"
out = Path(argv[argv.index("--output_dir") + 1])
with open(os.environ["FAKE_TRAIN_PIDS"], "a") as f:
    f.write(f"{os.getpid()}\\n")
print("fake train.py", " ".join(argv), flush=True)
if mode == "ok":
    (out / "metrics.json").write_text(json.dumps({"argv": argv}))
elif mode == "fail":
    print("train.py: error: the data set is empty", file=sys.stderr)
    sys.exit(3)
elif mode == "sleep":
    while True:
        time.sleep(0.05)
elif mode == "stall":
    print("train.py: stalled: no progress for 900 s (limit 900 s) in phase 'evaluation, epoch 2 (batch 3)'; pid 1", file=sys.stderr)
    for i in range(40):
        print(f'  File "train.py", line {i} in evaluate', file=sys.stderr)
    sys.exit(124)
"""

MANIFEST = {"format": "retrain.manifest/v1", "classes": ["a", "b"], "images": [], "sha256": "0" * 64}


def spec(run_id: str, mode: str = "ok", **kw) -> RunSpec:
    return RunSpec(
        backend_run_id=run_id,
        model="birds",
        manifest=MANIFEST,
        data_dir="/data/birds",
        training=TrainingArgs(epochs=1, nproc=2, extra=("--mode", mode)),
        **kw,
    )


def live_members(pgid: int) -> list[int]:
    """Processes in process group `pgid` that are not zombies."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "runs"
        self.pids_file = tmp_path / "pids.txt"
        self.pids_file.touch()
        self.script = tmp_path / "fake_train.py"
        self.script.write_text(FAKE_TRAIN)

    def backend(self) -> LocalTorchrunBackend:
        return LocalTorchrunBackend(self.root, launcher=[sys.executable, str(self.script)], env={"FAKE_TRAIN_PIDS": str(self.pids_file)})

    def training_pids(self) -> list[int]:
        return [int(line) for line in self.pids_file.read_text().split()]

    def kill_everything(self) -> None:
        """Stop whatever a test left running, by the pids the runs recorded."""
        for pid in self.training_pids():
            if proc_stat(pid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # the training is its own group leader
        for runner_json in self.root.glob("*/runner.json"):
            runner = json.loads(runner_json.read_text())
            stat = proc_stat(runner["pid"])
            if stat is not None and stat[1] == runner["start_time"]:
                os.kill(runner["pid"], signal.SIGKILL)


@pytest.fixture
def harness(tmp_path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    yield h
    h.kill_everything()


def test_submit_creates_the_run_directory_and_reaches_succeeded(harness):
    backend = harness.backend()
    first = backend.submit(spec("run-1", init_checkpoint="/models/champion.pt", tags={"model": "birds"}))
    assert first.state in ("queued", "running")
    final = backend.wait("run-1", timeout=30)
    assert final.state == "succeeded", final.detail
    run_dir = harness.root / "run-1"
    assert final.outputs_dir == str(run_dir / "outputs")
    assert json.loads((run_dir / "manifest.json").read_text()) == MANIFEST
    written = json.loads((run_dir / "spec.json").read_text())
    assert written["data_dir"] == "/data/birds"
    assert written["init_checkpoint"] == "/models/champion.pt"
    assert written["tags"] == {"model": "birds"}
    assert written["created_at"].endswith("+00:00")
    argv = json.loads((run_dir / "outputs" / "metrics.json").read_text())["argv"]
    assert argv[:8] == ["--data_dir", "/data/birds", "--manifest", str(run_dir / "manifest.json"), "--manifest_sha256", MANIFEST["sha256"],
                        "--output_dir", str(run_dir / "outputs")]  # fmt: skip
    assert argv[argv.index("--init_checkpoint") + 1] == "/models/champion.pt"
    assert argv[argv.index("--num_epochs") + 1] == "1"
    assert (run_dir / "exit_code").read_text().strip() == "0"
    assert "fake train.py" in (run_dir / "train.log").read_text()
    assert set(json.loads((run_dir / "runner.json").read_text())) == {"pid", "start_time", "pgid"}


def test_submitting_an_existing_id_returns_that_run_without_starting_another(harness):
    backend = harness.backend()
    backend.submit(spec("run-1"))
    assert backend.wait("run-1", timeout=30).state == "succeeded"
    again = backend.submit(spec("run-1", mode="fail"))
    assert again.state == "succeeded"
    time.sleep(0.3)  # room for a second process to show up, were one started
    assert len(harness.training_pids()) == 1


def test_two_threads_submitting_the_same_id_at_once_start_one_process(harness):
    backend = harness.backend()
    barrier = threading.Barrier(2)
    results = []

    def submit() -> None:
        barrier.wait()
        results.append(backend.submit(spec("race")))

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.backend_run_id for r in results] == ["race", "race"]
    assert backend.wait("race", timeout=30).state == "succeeded"
    time.sleep(0.3)
    assert len(harness.training_pids()) == 1


def test_a_nonzero_exit_is_failed_with_the_exit_code_and_the_end_of_the_log(harness):
    backend = harness.backend()
    backend.submit(spec("bad", mode="fail"))
    final = backend.wait("bad", timeout=30)
    assert final.state == "failed"
    assert final.detail.startswith("exit code 3")
    assert "the data set is empty" in final.detail
    assert len(final.detail) <= 500


def test_a_stalled_training_is_failed_with_the_watchdogs_line_not_only_the_stack_dump_after_it(harness):
    backend = harness.backend()
    backend.submit(spec("stalled", mode="stall"))
    final = backend.wait("stalled", timeout=30)
    assert final.state == "failed"
    assert final.detail.startswith(
        "exit code 124; train.py: stalled: no progress for 900 s (limit 900 s) in phase 'evaluation, epoch 2 (batch 3)'"
    )
    assert len(final.detail) <= 500
    assert json.loads((harness.root / "stalled" / "spec.json").read_text())["stop_grace_s"] == 45.0


def test_exit_zero_without_metrics_json_is_failed(harness):
    backend = harness.backend()
    backend.submit(spec("no-metrics", mode="quiet"))
    final = backend.wait("no-metrics", timeout=30)
    assert final.state == "failed"
    assert "metrics.json is missing" in final.detail


def test_cancel_stops_a_running_training_and_its_process_group(harness):
    backend = harness.backend()
    backend.submit(spec("long", mode="sleep"))
    wait_for(lambda: harness.training_pids())
    assert backend.status("long").state == "running"
    runner = json.loads((harness.root / "long" / "runner.json").read_text())
    training_pid = harness.training_pids()[0]

    backend.cancel("long")
    final = backend.wait("long", timeout=30)

    assert final.state == "canceled"
    assert "SIGTERM" in final.detail
    assert (harness.root / "long" / "cancel_requested").exists()
    wait_for(lambda: not live_members(runner["pgid"]) and not live_members(training_pid))


def test_cancel_right_after_submit_ends_canceled(harness):
    backend = harness.backend()
    backend.submit(spec("early", mode="sleep"))
    backend.cancel("early")
    assert backend.wait("early", timeout=30).state == "canceled"


def test_cancel_of_a_finished_or_unknown_run_changes_nothing(harness):
    backend = harness.backend()
    backend.submit(spec("done"))
    assert backend.wait("done", timeout=30).state == "succeeded"
    assert backend.cancel("done").state == "succeeded"
    assert not (harness.root / "done" / "cancel_requested").exists()
    assert backend.cancel("never-submitted").state == "unknown"
    assert not (harness.root / "never-submitted").exists()


def test_a_restarted_worker_finds_its_running_and_finished_runs(harness):
    before = harness.backend()
    before.submit(spec("finished"))
    before.submit(spec("still-going", mode="sleep"))
    assert before.wait("finished", timeout=30).state == "succeeded"
    wait_for(lambda: before.status("still-going").state == "running")

    after = harness.backend()
    assert after.list_runs() == ["finished", "still-going"]
    assert after.status("finished").state == "succeeded"
    assert after.status("still-going").state == "running"
    assert after.submit(spec("still-going")).state == "running"
    after.cancel("still-going")
    assert after.wait("still-going", timeout=30).state == "canceled"
    assert len(harness.training_pids()) == 2


SUBMITTER = """\
import sys, time
from worker.adapters.local.torchrun_backend import LocalTorchrunBackend
from worker.ports import RunSpec, TrainingArgs

root, script, pids = sys.argv[1:4]
backend = LocalTorchrunBackend(root, launcher=[sys.executable, script], env={"FAKE_TRAIN_PIDS": pids})
backend.submit(RunSpec("detached", "birds", {}, "/data", TrainingArgs(extra=("--mode", "sleep"))))
print("submitted", flush=True)
time.sleep(60)
"""


def test_a_run_survives_ctrl_c_and_exit_of_the_worker_that_started_it(harness):
    repo = Path(__file__).resolve().parents[2]
    worker = subprocess.Popen(
        [sys.executable, "-c", SUBMITTER, str(harness.root), str(harness.script), str(harness.pids_file)],
        cwd=repo,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own terminal-like process group, so the Ctrl-C below reaches it alone
    )
    try:
        assert worker.stdout.readline().strip() == "submitted"
        wait_for(lambda: harness.training_pids())
        os.killpg(worker.pid, signal.SIGINT)  # what Ctrl-C in the worker's terminal sends
        worker.wait(timeout=10)
    finally:
        worker.kill()
        worker.wait()
        worker.stdout.close()

    backend = harness.backend()
    assert backend.status("detached").state == "running"
    assert proc_stat(harness.training_pids()[0]) is not None
    backend.cancel("detached")
    assert backend.wait("detached", timeout=30).state == "canceled"


def test_a_live_process_that_reused_the_runner_pid_is_not_taken_for_the_runner(tmp_path):
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        run_dir = tmp_path / "runs" / "reused"
        run_dir.mkdir(parents=True)
        (run_dir / "spec.json").write_text("{}")
        real_start = proc_stat(stranger.pid)[1]
        runner = {"pid": stranger.pid, "start_time": real_start - 1, "pgid": stranger.pid}
        (run_dir / "runner.json").write_text(json.dumps(runner))
        backend = LocalTorchrunBackend(tmp_path / "runs", launcher=[sys.executable, "unused.py"])

        assert backend.status("reused").state == "failed"
        assert "runner vanished" in backend.status("reused").detail
        backend.cancel("reused")
        assert stranger.poll() is None  # never signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_a_run_directory_without_a_runner_is_queued_then_failed_after_a_minute(tmp_path):
    run_dir = tmp_path / "runs" / "orphan"
    run_dir.mkdir(parents=True)
    backend = LocalTorchrunBackend(tmp_path / "runs", launcher=[sys.executable, "unused.py"])
    assert backend.status("orphan").state == "queued"
    old = time.time() - 120
    os.utime(run_dir, (old, old))
    assert backend.status("orphan").state == "failed"


@pytest.mark.parametrize("bad_id", ["", ".hidden", "..", "a/b", "../escape", "with space", "ümlaut", "x" * 129, "tab\t"])
def test_invalid_run_ids_are_rejected_on_submit_and_unknown_elsewhere(tmp_path, bad_id):
    backend = LocalTorchrunBackend(tmp_path / "runs", launcher=[sys.executable, "unused.py"])
    with pytest.raises(ValueError, match="invalid backend_run_id"):
        backend.submit(spec(bad_id))
    assert backend.status(bad_id).state == "unknown"
    assert backend.cancel(bad_id).state == "unknown"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_id_never_submitted_is_unknown_and_no_runs_are_listed(tmp_path):
    backend = LocalTorchrunBackend(tmp_path / "runs", launcher=[sys.executable, "unused.py"])
    assert backend.status("nope").state == "unknown"
    assert backend.wait("nope", timeout=5).state == "unknown"
    assert backend.list_runs() == []


def test_default_commands_use_torchrun_horovodrun_or_plain_python(tmp_path):
    training = tmp_path / "training"
    backend = LocalTorchrunBackend(tmp_path / "runs", training_dir=training, python="/venv/bin/python")
    run_dir = tmp_path / "runs" / "r"

    def command(distributed: str) -> list[str]:
        return backend.build_command(RunSpec("r", "m", MANIFEST, "/d", TrainingArgs(nproc=3, distributed=distributed)), run_dir)

    train_py = str(training / "train.py")
    assert command("ddp")[:6] == ["/venv/bin/python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", train_py]
    assert command("horovod")[:8] == ["/venv/bin/horovodrun", "-np", "3", "-H", "localhost:3", "--gloo", "/venv/bin/python", train_py]
    assert command("horovod")[-2:] == ["--distributed", "horovod"]
    assert command("none")[:2] == ["/venv/bin/python", train_py]
    assert "--init_checkpoint" not in command("ddp")
    ddp = command("ddp")
    assert ddp[ddp.index("--manifest_sha256") + 1] == MANIFEST["sha256"]  # train.py checks the manifest is the frozen one
    assert ddp[ddp.index("--onnx_tolerance") + 1] == "0.0001"  # the gate's tolerance reaches a run that exports in place


def test_the_training_environment_is_unbuffered_single_threaded_and_can_import_the_worker(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    backend = LocalTorchrunBackend(tmp_path / "runs", launcher=[sys.executable, "unused.py"], env={"EXTRA": "1"})
    run = spec("birds-0001-abcd1234-a1")
    env = backend._child_env(run)
    assert (env["OMP_NUM_THREADS"], env["PYTHONUNBUFFERED"], env["EXTRA"]) == ("1", "1", "1")
    assert str(Path(__file__).resolve().parents[2]) in env["PYTHONPATH"].split(os.pathsep)
    assert env["RETRAIN_RUN_ID"] == "birds-0001-abcd1234-a1"
    assert "MLFLOW_TRACKING_URI" not in env or env["MLFLOW_TRACKING_URI"] == os.environ.get("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert backend._child_env(run)["OMP_NUM_THREADS"] == "4"


def test_with_mlflow_tracking_each_run_logs_to_the_store_under_its_models_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    backend = LocalTorchrunBackend(tmp_path / "runs", launcher=[sys.executable, "unused.py"], mlflow_uri=uri)
    env = backend._child_env(spec("birds-0001-abcd1234-a1"))
    assert (env["MLFLOW_TRACKING_URI"], env["MLFLOW_EXPERIMENT_NAME"]) == (uri, "retrain-birds")


def test_the_backend_modules_do_not_import_torch():
    code = "import sys, worker.adapters.local.torchrun_backend, worker.adapters.local.torchrun_runner, tests.fakes.backend; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"
