"""`LocalTorchrunBackend`: training runs as detached local processes, one directory per run.

Everything the backend knows about a run is in `runs_root/<backend_run_id>/`, not in memory, so a
restarted worker (or a second one) sees the same runs:

    manifest.json     the frozen manifest train.py reads (--manifest)
    spec.json         command line, data_dir, init_checkpoint, tags, created_at (UTC)
    train.log         stdout + stderr of the runner and the training
    outputs/          --output_dir: model.pt, then metrics.json (its presence means complete)
    runner.json       the runner's pid, its start time and process group
    exit_code         the training's exit status (negative: killed by that signal), written last
    cancel_requested  cancel() was called

The training command runs under `python -m worker.adapters.local.torchrun_runner` (see that module), started in a
new session so that it outlives the worker. `os.mkdir` of the run directory is the claim on a
`backend_run_id`: it is atomic, so two submits of one id (threads or processes) start one run.
Liveness is "the recorded pid is alive and started when runner.json says", which tells the
runner apart from a later process that got its pid. POSIX only (sessions and process groups).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.files import atomic_write_text
from worker.adapters.local.torchrun_runner import (
    CANCEL_FILE,
    EXIT_CODE_FILE,
    KILL_GRACE_S,
    LOG_FILE,
    MANIFEST_FILE,
    OUTPUTS_DIR,
    RUNNER_FILE,
    SPEC_FILE,
    is_same_process_alive,
)
from worker.ports import BackendStatus, RunSpec, TrainingBackend
from worker.training_code import training_dir as default_training_dir

_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
REPO_ROOT = Path(__file__).resolve().parents[3]  # holds the worker package; goes on the runner's PYTHONPATH
QUEUED_GRACE_S = 60.0  # a run dir without runner.json older than this lost its runner before it started
DETAIL_MAX_CHARS = 500


def valid_run_id(backend_run_id: str) -> bool:
    """Ids become directory names: a safe character set, no leading dot (no "..", no hidden files)."""
    return bool(_RUN_ID.fullmatch(backend_run_id)) and not backend_run_id.startswith(".")


class LocalTorchrunBackend(TrainingBackend):
    """Runs `torchrun --standalone --nproc_per_node=N train.py ...` (or horovodrun, or plain python) on this machine.

    `launcher` replaces everything before train.py's arguments (tests use a small fake script);
    `env` adds variables to the training's environment on top of this process's.
    """

    def __init__(
        self,
        runs_root: Path,
        training_dir: Path | None = None,
        python: str = sys.executable,
        launcher: list[str] | None = None,
        env: Mapping[str, str] | None = None,
        mlflow_uri: str | None = None,
        stop_grace_s: float = KILL_GRACE_S,
    ) -> None:
        # Absolute paths throughout: the runner and the training run with the run directory as cwd.
        self.runs_root = Path(os.path.abspath(runs_root))
        self.launcher = list(launcher) if launcher is not None else None
        if training_dir is None and launcher is None:
            training_dir = default_training_dir()
        self.training_dir = Path(os.path.abspath(training_dir)) if training_dir is not None else None
        self.python = python
        self.env = dict(env or {})
        self.mlflow_uri = mlflow_uri  # each run logs to this MLflow store, one experiment per model
        self.stop_grace_s = stop_grace_s  # after a cancel: how long the training may shut down before its tree is killed

    # -- paths and commands ---------------------------------------------------------------------

    def run_dir(self, backend_run_id: str) -> Path:
        if not valid_run_id(backend_run_id):
            raise ValueError(f"invalid backend_run_id {backend_run_id!r}: use 1-128 of A-Z a-z 0-9 _ . -, not starting with '.'")
        return self.runs_root / backend_run_id

    def build_command(self, spec: RunSpec, run_dir: Path) -> list[str]:
        """The full training command line for `spec`, with its files in `run_dir`."""
        t = spec.training
        if self.launcher is not None:
            launcher = list(self.launcher)
        else:
            assert self.training_dir is not None
            train_py = str(self.training_dir / "train.py")
            if t.distributed == "horovod":
                bin_dir = os.path.dirname(self.python)  # the venv's horovodrun, not whatever is first on PATH
                horovodrun = os.path.join(bin_dir, "horovodrun") if bin_dir else "horovodrun"
                launcher = [horovodrun, "-np", str(t.nproc), "-H", f"localhost:{t.nproc}", "--gloo", self.python, train_py]
            elif t.distributed == "none":
                launcher = [self.python, train_py]
            else:
                launcher = [self.python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={t.nproc}", train_py]
        digest = spec.tags.get("manifest_sha256") or spec.manifest.get("sha256")
        args = [
            "--data_dir", os.path.abspath(spec.data_dir),
            "--manifest", str(run_dir / MANIFEST_FILE),
            # train.py refuses a manifest that is not the one the run was frozen with
            *(["--manifest_sha256", str(digest)] if digest else []),
            "--output_dir", str(run_dir / OUTPUTS_DIR),
            *t.train_py_args(),
        ]  # fmt: skip
        if spec.init_checkpoint:
            args += ["--init_checkpoint", os.path.abspath(spec.init_checkpoint)]
        return [*launcher, *args]

    def _child_env(self, spec: RunSpec) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["RETRAIN_RUN_ID"] = spec.backend_run_id  # the tracked run's name
        if self.mlflow_uri:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
            env["MLFLOW_EXPERIMENT_NAME"] = f"retrain-{spec.model}"
        env.setdefault("OMP_NUM_THREADS", "1")  # ranks share the cores; torchrun would set it too, with a warning
        env["PYTHONUNBUFFERED"] = "1"  # train.log fills as the run goes, not when it ends
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    # -- the port -------------------------------------------------------------------------------

    def submit(self, spec: RunSpec) -> BackendStatus:
        run_dir = self.run_dir(spec.backend_run_id)
        # Serialise before claiming the id, so a spec that cannot be written does not leave a dead run behind.
        manifest_text = json.dumps(spec.manifest, indent=2, sort_keys=True) + "\n"
        spec_doc = {
            "backend_run_id": spec.backend_run_id,
            "model": spec.model,
            "command": self.build_command(spec, run_dir),
            "data_dir": os.path.abspath(spec.data_dir),
            "init_checkpoint": spec.init_checkpoint,
            "tags": dict(spec.tags),
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "stop_grace_s": self.stop_grace_s,
        }
        spec_text = json.dumps(spec_doc, indent=2, sort_keys=True) + "\n"
        self.runs_root.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(run_dir)
        except FileExistsError:
            return self.status(spec.backend_run_id)
        try:
            atomic_write_text(run_dir / MANIFEST_FILE, manifest_text)
            atomic_write_text(run_dir / SPEC_FILE, spec_text)
            (run_dir / OUTPUTS_DIR).mkdir()
            self._start_runner(run_dir, spec)
        except OSError as exc:
            # The id is claimed; record why it failed rather than leaving a run that looks queued.
            with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
                log.write(f"could not start the run: {exc}\n")
            atomic_write_text(run_dir / EXIT_CODE_FILE, "127\n")
        return self.status(spec.backend_run_id)

    def _start_runner(self, run_dir: Path, spec: RunSpec) -> None:
        with open(run_dir / LOG_FILE, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker.adapters.local.torchrun_runner", str(run_dir)],
                cwd=run_dir,
                env=self._child_env(spec),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session: no SIGINT from the worker's terminal, survives the worker
            )
        # While this process lives it is the runner's parent: reap it when it ends so it does not
        # linger as a zombie. The thread holds the Popen, so it is never collected while running.
        threading.Thread(target=proc.wait, name=f"reap-runner-{proc.pid}", daemon=True).start()

    def status(self, backend_run_id: str) -> BackendStatus:
        if not valid_run_id(backend_run_id) or not (self.runs_root / backend_run_id).is_dir():
            return BackendStatus(backend_run_id, "unknown")
        run_dir = self.runs_root / backend_run_id
        outputs = str(run_dir / OUTPUTS_DIR)
        cancel_requested = (run_dir / CANCEL_FILE).exists()
        code = _read_exit_code(run_dir)
        if code is None:
            runner = _read_json(run_dir / RUNNER_FILE)
            if runner is None and time.time() - run_dir.stat().st_mtime < QUEUED_GRACE_S:
                return BackendStatus(backend_run_id, "queued", "cancel requested" if cancel_requested else "", outputs)
            if runner is not None and _runner_alive(runner):
                return BackendStatus(backend_run_id, "running", "cancel requested" if cancel_requested else "", outputs)
            if cancel_requested:
                return BackendStatus(backend_run_id, "canceled", "", outputs)
            return BackendStatus(backend_run_id, "failed", _with_log_tail("runner vanished", run_dir), outputs)
        if cancel_requested:
            return BackendStatus(backend_run_id, "canceled", f"stopped, {_describe_exit(code)}", outputs)
        if code == 0 and (run_dir / OUTPUTS_DIR / "metrics.json").is_file():
            return BackendStatus(backend_run_id, "succeeded", "", outputs)
        reason = _describe_exit(code) if code != 0 else "exit code 0 but outputs/metrics.json is missing"
        return BackendStatus(backend_run_id, "failed", _with_log_tail(reason, run_dir), outputs)

    def cancel(self, backend_run_id: str) -> BackendStatus:
        current = self.status(backend_run_id)
        if current.state == "unknown" or current.terminal:
            return current
        run_dir = self.runs_root / backend_run_id
        # Marker first, then runner.json: the runner writes runner.json first, then checks the
        # marker, so either it sees the marker or we see it (and signal it).
        atomic_write_text(run_dir / CANCEL_FILE, dt.datetime.now(dt.UTC).isoformat() + "\n")
        runner = _read_json(run_dir / RUNNER_FILE)
        if runner is not None and _runner_alive(runner):
            pgid = runner.get("pgid")
            with contextlib.suppress(ProcessLookupError):
                if not isinstance(pgid, int) or pgid == os.getpgrp():  # never the worker's own group, whatever runner.json says
                    os.kill(int(runner["pid"]), signal.SIGTERM)
                else:
                    os.killpg(pgid, signal.SIGTERM)
        return self.status(backend_run_id)

    # -- conveniences ---------------------------------------------------------------------------

    def wait(self, backend_run_id: str, timeout: float, poll: float = 0.2) -> BackendStatus:
        """Poll until the run is terminal (or unknown) or `timeout` seconds pass; returns the last status."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.status(backend_run_id)
            if current.terminal or current.state == "unknown" or time.monotonic() >= deadline:
                return current
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))

    def list_runs(self) -> list[str]:
        """Ids of every run under runs_root, finished or not: what a restarted worker looks through."""
        if not self.runs_root.is_dir():
            return []
        return sorted(p.name for p in self.runs_root.iterdir() if p.is_dir() and valid_run_id(p.name))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return document
    except (OSError, ValueError):
        return None


def _read_exit_code(run_dir: Path) -> int | None:
    try:
        return int((run_dir / EXIT_CODE_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _runner_alive(runner: Mapping[str, Any]) -> bool:
    try:
        return is_same_process_alive(int(runner["pid"]), int(runner["start_time"]))
    except (KeyError, TypeError, ValueError):
        return False


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# The one-line verdicts train.py prints (an unusable input, a failed collective, its watchdog):
# worth more than the log's last lines, which after a stall are a stack dump and torchrun's summary.
_VERDICT = re.compile(r"train\.py: (?:stalled|error): [^\r\n]*")
VERDICT_SCAN_BYTES = 65536


def _training_verdict(run_dir: Path) -> str | None:
    """The last `train.py: error:` / `train.py: stalled:` line of train.log's end, if any."""
    try:
        with open(run_dir / LOG_FILE, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - VERDICT_SCAN_BYTES))
            found = _VERDICT.findall(f.read().decode("utf-8", "replace"))
    except OSError:
        return None
    return found[-1][:300] if found else None


def _with_log_tail(reason: str, run_dir: Path, lines: int = 5) -> str:
    """`reason`, train.py's own verdict if it printed one, then the last lines of train.log, at
    most DETAIL_MAX_CHARS in all (the end of the log is kept)."""
    verdict = _training_verdict(run_dir)
    if verdict:
        reason = f"{reason}; {verdict}"
    try:
        with open(run_dir / LOG_FILE, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        tail = []
    text = "\n".join(line for line in tail if line.strip())
    if not text:
        return reason
    room = DETAIL_MAX_CHARS - len(reason) - 2
    if room < 20:
        return reason
    if len(text) > room:
        text = "…" + text[-(room - 1) :]
    return f"{reason}: {text}"
