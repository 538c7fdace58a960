"""`retrain demo`: the whole loop on one machine with the embedded defaults, narrated.

It makes a synthetic chickens-vs-turkeys set (with a few corrupt files), starts the local
worker (SQLite ledger, torchrun backend, local registry, JSON-lines events), drops images in
batches and shows the policy's reasons, lets the threshold start a 2-rank DDP run, shows its
progress, the gate, registration, ONNX parity and the published events; then a second batch
starts a run warm-started from the champion, whose gate compares both models on the same
validation set. It ends with a summary of runs, models, timings and where the files are.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.training_code import training_dir

if TYPE_CHECKING:
    from worker.app.serve import LocalService
    from worker.bus import Worker
    from worker.config import RetrainConfig
    from worker.store import RunRow


@dataclass(frozen=True)
class DemoConfig:
    workspace: Path
    per_class: int = 120  # images per class in all; half arrive in round one
    corrupt: int = 3
    image_size: int = 64
    epochs: int = 4
    batch_size: int = 16
    learning_rate: float = 0.01
    nproc: int = 2
    batches: int = 4  # round one arrives in this many drops
    min_value: float = 0.6  # the gate's absolute minimum
    quiet_period: float = 1.0
    seed: int = 0
    run_timeout_s: float = 900


@dataclass
class DemoResult:
    workspace: Path
    state_dir: Path
    runs: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    config_file: Path | None = None

    @property
    def ok(self) -> bool:
        return len(self.runs) >= 2 and all(r["state"] == "finalized" for r in self.runs) and self.models.get("champion") is not None


class DemoError(RuntimeError):
    """A demo step failed; the message says which and where its log is."""


def _config(cfg: DemoConfig, state: Path, images: Path, workspace: Path) -> tuple[RetrainConfig, Path]:
    """The demo's configuration, written to <workspace>/retrain.toml and loaded from there: the
    commands that inspect the demo afterwards (runs, dashboard, simulate) read the same settings."""
    from worker.config import load_config

    threshold = max(4, int(cfg.per_class * 2 * 0.5 * 0.8))  # crossed by round one's last batch
    sections: dict[str, dict[str, Any]] = {
        "worker": {"state_dir": str(state), "images_root": str(images), "tick_seconds": 0.5},
        "models.birds": {"min_new_images": threshold, "min_per_class": 4, "quiet_period": cfg.quiet_period, "cooldown": 0,
                         "val_fraction": 0.25},
        "models.birds.training": {"epochs": cfg.epochs, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
                                  "learning_rate": cfg.learning_rate, "nproc": cfg.nproc,
                                  "extra": ["--step_size", str(max(1, cfg.epochs * 3 // 4))]},
        "models.birds.gate": {"min_value": cfg.min_value},
    }  # fmt: skip
    lines = ["# written by `retrain demo`: the settings it ran with (retrain status|runs|dashboard|simulate -c this file)"]
    for section, values in sections.items():
        lines += [
            "",
            f"[{section}]",
            *(f"{key} = {json.dumps(value)}" for key, value in values.items()),
        ]  # JSON strings, numbers, lists are TOML
    path = workspace / "retrain.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_config(path, env={}), path


def _source_set(cfg: DemoConfig, workspace: Path, echo: Callable[[str], None]) -> tuple[Path, list[str]]:
    source = workspace / "source" / f"birds-{cfg.per_class}-{cfg.corrupt}-{cfg.seed}"
    if not (source / ".complete").exists():
        echo(f"== making a synthetic chickens-vs-turkeys set ({cfg.per_class} per class, {cfg.corrupt} corrupt files) in {source}")
        sys.path.insert(0, str(training_dir()))
        try:
            from synthetic_birds import generate
        finally:
            sys.path.remove(str(training_dir()))
        shutil.rmtree(source, ignore_errors=True)
        generate(source, cfg.per_class, layout="flat", corrupt=cfg.corrupt, seed=cfg.seed)
        (source / ".complete").write_text("ok\n")
    else:
        echo(f"== reusing the synthetic set in {source}")
    files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    return source, files


class _Narrator:
    """Follows the ledger and the run's log and says what changed."""

    def __init__(self, worker: Worker, echo: Callable[[str], None]):
        self.worker, self.echo = worker, echo
        self.last_decision: tuple[str, str] | None = None
        self.log_offsets: dict[str, int] = {}
        self.seen_events: set[str] = set()

    def decisions(self) -> None:
        with self.worker.store.transaction() as tx:
            latest = next(iter(tx.decisions("birds", 1)), None)
        if latest and (latest.outcome, latest.reason) != self.last_decision:
            self.last_decision = (latest.outcome, latest.reason)
            self.echo(f"  policy: {latest.outcome}: {latest.reason}")

    def training_log(self, run: RunRow) -> None:
        log = self.worker.config.worker.state_dir / "runs" / run.backend_run_id / "train.log"
        if not log.exists():
            return
        with open(log, encoding="utf-8", errors="replace") as fh:
            fh.seek(self.log_offsets.get(run.backend_run_id, 0))
            for line in fh:
                if "[train]" in line and (
                    "epoch" in line or "baseline" in line or "best_val_acc" in line or "skipping" in line or "training " in line
                ):
                    self.echo(f"    {line.strip()}")
            self.log_offsets[run.backend_run_id] = fh.tell()

    def events(self) -> None:
        for event in self.worker.store.all_events():
            if event.published_at and event.event_id not in self.seen_events:
                self.seen_events.add(event.event_id)
                data = event.payload["data"]
                detail = {
                    "retrain.run.submitted": lambda d: f"{d['run_id']}: {d['image_count']} images ({d['new_image_count']} new)",
                    "retrain.model.registered": lambda d: (
                        f"birds v{d['version']} from {d['run_id']}: {d['gate']['reason']}; ONNX parity {d['onnx']['max_abs_diff']:.1e}"
                    ),
                    "retrain.model.rejected": lambda d: f"{d['run_id']}: {d['reason']}",
                    "retrain.run.failed": lambda d: f"{d['run_id']}: {d['detail'][-300:]}",
                }.get(event.type, lambda d: json.dumps(d)[:200])(data)
                self.echo(f"  event {event.type}: {detail}")


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> DemoResult:
    from worker.app.bootstrap import build_worker
    from worker.app.serve import LocalService
    from worker.views import models_view

    started = time.monotonic()
    workspace = cfg.workspace.resolve()
    state, images = workspace / "state", workspace / "images"
    for folder in (state, images):  # each demo starts from an empty ledger and registry
        shutil.rmtree(folder, ignore_errors=True)
    source, files = _source_set(cfg, workspace, echo)
    config, config_file = _config(cfg, state, images, workspace)
    worker = build_worker(config)
    service = LocalService(worker, settle_seconds=0.0)
    narrator = _Narrator(worker, echo)
    m = config.model("birds")
    echo(
        f"== worker: ledger {state / 'ledger.db'}, images {images / 'birds'}; policy: run at {m.min_new_images} new images after {m.quiet_period:g}s quiet"
    )

    half = [f for i, f in enumerate(files) if i % 2 == 0]
    rest = [f for f in files if f not in set(half)]
    batches = [half[i :: cfg.batches] for i in range(cfg.batches)]
    timeline: list[dict[str, Any]] = []
    for round_no, drops in ((1, batches), (2, [rest])):
        echo(f"== round {round_no}: {sum(len(d) for d in drops)} new images arrive in {len(drops)} batch(es)")
        for batch in drops:
            for name in batch:
                target = images / "birds" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, target)
            dropped_at = time.time()
            echo(f"  dropped {len(batch)} images")
            service.cycle()
            narrator.decisions()
        timeline.append(_follow_run(service, narrator, cfg, dropped_at, echo))
    result = DemoResult(
        workspace=workspace, state_dir=state, timeline=timeline, seconds=time.monotonic() - started, config_file=config_file
    )
    with worker.store.transaction() as tx:
        result.runs = [_run_summary(r, state) for r in reversed(tx.runs("birds"))]
    result.models = models_view(worker.store, config, "birds")["birds"]
    result.events = [e.payload for e in worker.store.all_events()]
    return result


def _follow_run(
    service: LocalService, narrator: _Narrator, cfg: DemoConfig, dropped_at: float, echo: Callable[[str], None]
) -> dict[str, Any]:
    """Cycle the worker until the run this round started is finalized; return its timeline."""
    worker = service.worker
    deadline = time.monotonic() + cfg.run_timeout_s
    run = None
    while time.monotonic() < deadline:
        service.cycle()
        narrator.decisions()
        with worker.store.transaction() as tx:
            latest = next(iter(tx.runs("birds", limit=1)), None)
        if latest is not None and latest.created_at.timestamp() >= dropped_at - 1:
            if run is None:
                init = "warm start from the champion" if latest.seq > 1 else "random init (no ImageNet weights here)"
                echo(f"== run {latest.run_id}: {latest.image_count} images, {cfg.nproc}-rank DDP under torchrun (gloo on CPU), {init}")
            run = latest
            narrator.training_log(run)
            narrator.events()
            if run.state == "finalized":
                narrator.training_log(run)
                break
        time.sleep(0.3)
    else:
        raise DemoError(f"no run finished within {cfg.run_timeout_s:.0f}s; see {worker.config.worker.state_dir / 'runs'}")
    service.worker.relay()
    narrator.events()
    return {"run_id": run.run_id, "dropped_at": dropped_at, "created_at": run.created_at.timestamp(), "outcome": run.outcome}


def _run_summary(run: RunRow, state: Path) -> dict[str, Any]:
    metrics_path = state / "runs" / run.backend_run_id / "outputs" / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    report_path = metrics_path.with_name("onnx_report.json")
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return {
        "run_id": run.run_id,
        "state": run.state,
        "outcome": run.outcome,
        "images": run.image_count,
        "new_images": run.new_image_count,
        "best_val_acc": metrics.get("best_val_acc"),
        "baseline_val_acc": metrics.get("baseline_val_acc"),
        "skipped_images": metrics.get("skipped_images"),
        "world_size": metrics.get("world_size"),
        "train_s": metrics.get("duration_s"),
        "images_per_s": metrics.get("images_per_s"),
        "onnx_max_abs_diff": report.get("max_abs_diff"),
        "created_at": run.created_at.timestamp(),
        "submitted_at": run.submitted_at.timestamp() if run.submitted_at else None,
        "finished_at": run.finished_at.timestamp() if run.finished_at else None,
        "detail": run.detail,
        "outputs": str(metrics_path.parent),
    }
