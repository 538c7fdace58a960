"""train.py under torchrun never hangs: loader workers never come from a fork of a threaded process,
a stalled rank makes the run fail with the phase named, and a collective waits only so long."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, TRAINING, child_env, read_metrics, run_train
from worker.adapters.local.process_tree import kill_tree

pytestmark = pytest.mark.integration

FORK_AUDIT = ROOT / "tests" / "fork_audit"
SMALL = ["--image_size", "32", "--batch_size", "4", "--weights", "none"]


def audited_env(audit_file: Path) -> dict[str, str]:
    """child_env with the fork audit (tests/fork_audit/sitecustomize.py) loaded into every Python process."""
    env = child_env(RETRAIN_FORK_AUDIT=str(audit_file))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FORK_AUDIT), env.get("PYTHONPATH", "")) if p)
    return env


def audited_forks(audit_file: Path) -> list[dict]:
    return [json.loads(line) for line in audit_file.read_text().splitlines()] if audit_file.exists() else []


def test_the_fork_audit_records_a_fork_made_while_another_thread_runs(tmp_path):
    """The audit the next test relies on does see the hazard it is there to catch."""
    audit = tmp_path / "forks.jsonl"
    program = (
        "import os, threading, time\n"
        "t = threading.Thread(target=time.sleep, args=(2,)); t.start()\n"
        "pid = os.fork()\n"
        "os._exit(0) if pid == 0 else os.waitpid(pid, 0)\n"
    )
    subprocess.run([sys.executable, "-c", program], env=audited_env(audit), check=True, timeout=60)
    forks = audited_forks(audit)
    assert len(forks) == 1
    assert forks[0]["threads"] == 2


def test_two_ranks_with_loader_workers_train_and_evaluate_without_forking_a_threaded_process(tiny_birds, tmp_path):
    """The deadlock's cause, checked on every fork rather than waited for: before, the validation
    loader forked its workers from a rank running gloo's and the training loader's threads."""
    audit, out = tmp_path / "forks.jsonl", tmp_path / "out"
    args = ["--data_dir", str(tiny_birds), "--output_dir", str(out), "--num_epochs", "3", "--workers", "2", *SMALL]
    proc = run_train(args, nproc=2, env=audited_env(audit), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [row["epoch"] for row in read_metrics(out)["history"]] == [1, 2, 3]  # evaluated after every epoch
    forks = audited_forks(audit)
    # 2 ranks x 2 loaders (train, val) x 2 persistent workers: every worker was forked and seen.
    assert len(forks) >= 8, forks
    threaded = [f for f in forks if f["threads"] != 1]
    assert not threaded, f"forked while other threads ran: {threaded}"
    assert all("multiprocessing.forkserver" in f["cmdline"] for f in forks), forks


def test_one_process_without_thread_settings_forks_its_workers_from_a_single_threaded_server(tiny_birds, tmp_path):
    """No OMP_NUM_THREADS (torchrun sets it, a plain `python train.py` on a VM does not): numpy's
    BLAS would start its thread pool in the fork server unless train.py keeps it off there."""
    audit = tmp_path / "forks.jsonl"
    env = {k: v for k, v in audited_env(audit).items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    args = ["--data_dir", str(tiny_birds), "--output_dir", str(tmp_path / "out"), "--num_epochs", "1", "--workers", "2", *SMALL]
    proc = run_train(args, nproc=1, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    forks = audited_forks(audit)
    assert len(forks) >= 4, forks  # 2 loaders x 2 workers
    assert [f["threads"] for f in forks] == [1] * len(forks), forks


class Launch:
    """train.py under torchrun with output streamed line by line, so a test can act mid-run."""

    def __init__(self, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAINING / "train.py"), *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(), start_new_session=True
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            assert self.proc.poll() is None or self.reader.is_alive(), f"exited {self.proc.returncode} first:\n{self.output[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.output[-3000:]}")

    def rank_pid(self, rank: int) -> int:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and any("train.py" in part for part in child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        raise AssertionError(f"no rank {rank} below torchrun")

    def close(self) -> None:
        kill_tree(self.proc.pid)
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# The limits in these tests (20 s) leave room for the two ranks to start and meet on a loaded
# 2-core machine (importing torch, the rendezvous, the screening): every phase counts, not only training.


def stall_rank_one_mid_training(launch: Launch) -> int:
    """SIGSTOP rank 1 once rank 0 reports that training starts: rank 0 is then left waiting for it."""
    launch.wait_for_line(r"\[train\] training resnet18", timeout=180)
    rank1 = launch.rank_pid(1)
    os.kill(rank1, signal.SIGSTOP)
    return rank1


def test_a_stalled_rank_makes_the_run_fail_with_the_watchdog_naming_the_phase(tiny_birds, tmp_path):
    args = ["--data_dir", str(tiny_birds), "--output_dir", str(tmp_path / "out"), "--num_epochs", "200", "--workers", "0", *SMALL,
            "--stall_timeout", "20", "--collective_timeout", "600"]  # fmt: skip
    launch = Launch(args)
    try:
        rank1 = stall_rank_one_mid_training(launch)
        stalled = launch.wait_for_line(r"train\.py: stalled:", timeout=120)
        os.kill(rank1, signal.SIGCONT)  # so that torchrun's SIGTERM ends it now rather than after torchrun's 30 s
        launch.proc.wait(timeout=120)
    finally:
        launch.close()
    assert launch.proc.returncode != 0
    assert re.search(
        r"no progress for \d+ s \(limit 20 s\) in phase '(training, epoch \d+|wrapping the model|evaluation, epoch \d+|averaging)", stalled
    ), stalled
    assert "exitcode: 124" in launch.output or "exitcode  : 124" in launch.output, launch.output[-3000:]  # torchrun's summary
    assert 'File "' in launch.output  # the stack of every thread of the stalled rank, for the post-mortem
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_collective_that_waits_past_its_timeout_fails_the_rank_with_one_line(tiny_birds, tmp_path):
    args = ["--data_dir", str(tiny_birds), "--output_dir", str(tmp_path / "out"), "--num_epochs", "200", "--workers", "0", *SMALL,
            "--stall_timeout", "0", "--collective_timeout", "20"]  # fmt: skip
    launch = Launch(args)
    try:
        rank1 = stall_rank_one_mid_training(launch)
        failed = launch.wait_for_line(r"train\.py: error: rank 0: a collective failed", timeout=120)
        os.kill(rank1, signal.SIGCONT)
        launch.proc.wait(timeout=120)
    finally:
        launch.close()
    assert launch.proc.returncode != 0
    assert "--collective_timeout 20 s" in failed
    assert re.search(r"in phase '[^']+'", failed), failed
