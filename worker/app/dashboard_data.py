"""What each dashboard page shows, as plain data (also served as JSON): the overview of every model,
one model (versions, champion history, run list), one run (why it started and ended, curves,
per-class accuracy and confusion matrix, manifest, cost) and a run's image listing."""

from __future__ import annotations

import collections
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

from shared import events as ev
from shared.files import open_regular
from worker.config import RetrainConfig
from worker.ports import BlobStore
from worker.runs import gpu_held_since
from worker.store import RunRow, Store
from worker.views import explain_view, manifest_view, models_view, run_row, runs_view, status_view

EVENTS_SHOWN = 30
RUNS_SHOWN = 200  # on a model's page
OVERVIEW_RUNS = 10  # per model on the overview
DECISIONS_READ = 400  # the latest decisions read per model, collapsed into at most DECISION_ROWS rows
DECISION_ROWS = 40
CURVE_POINTS = 400  # points per training curve
LISTED_IMAGES = 1000  # paths on a listing page (`retrain manifest` lists them all)
METRICS_BYTES = 16 * 2**20  # a metrics.json larger than this is not read (it is the run's to write)
CLASSES_SHOWN = 50  # the confusion matrix and per-class bars show at most this many classes


class PageNotFoundError(LookupError):
    """The page names a run or model that is not in the ledger or the configuration."""


def run_metrics(config: RetrainConfig, backend_run_id: str, location: str | None = None) -> dict[str, Any]:
    """A run's metrics.json: in the registry (a registered local version), in the local run's outputs,
    or in the outputs downloaded from Azure ML. Empty when none is here or it cannot be read."""
    candidates = [Path(location) / "metrics.json"] if location and not location.startswith("azureml:") else []
    candidates += [
        config.worker.state_dir / "runs" / backend_run_id / "outputs" / "metrics.json",
        config.worker.state_dir / "azureml-outputs" / backend_run_id / "metrics.json",
    ]
    for path in candidates:
        try:
            with open_regular(path) as f:
                document = json.loads(f.read(METRICS_BYTES))  # a larger file is cut short, does not parse, and is skipped
        except (OSError, ValueError):
            continue
        if isinstance(document, dict):
            return document
    return {}


def thinned(rows: list[Any], most: int) -> list[Any]:
    """At most `most` rows, evenly spaced, the first and the last kept: a page stays small whatever
    a run's metrics.json holds (a million epochs made a 20 MiB page)."""
    if len(rows) <= most:
        return rows
    step = (len(rows) - 1) / (most - 1)
    return [rows[round(i * step)] for i in range(most)]


def collapse_decisions(decisions: list[dict[str, Any]], most: int = DECISION_ROWS) -> list[dict[str, Any]]:
    """Consecutive decisions of the same kind as one row with a count and the span they cover: same
    outcome, same run, and the same reason once its numbers are set aside ("waiting: 3/10 new
    images" and "waiting: 4/10 new images" are one kind). The row keeps the newest reason."""
    rows: list[dict[str, Any]] = []
    for d in decisions:  # newest first
        key = (d["outcome"], d.get("run_id"), re.sub(r"\d+(?:\.\d+)?", "#", d["reason"] or ""))
        if rows and rows[-1]["key"] == key:
            rows[-1]["count"] += 1
            rows[-1]["first_at"] = d["at"]
            continue
        if len(rows) == most:
            break
        rows.append({**d, "key": key, "count": 1, "first_at": d["at"]})
    for row in rows:
        del row["key"]
    return rows


def _gpu_hours(run: RunRow, config: RetrainConfig, now: dt.datetime) -> dict[str, Any]:
    """What a run held: from when it began to hold its devices to its end (now, while in flight),
    times the devices per run (nodes x GPUs on Azure ML; processes locally). Nothing before submission."""
    devices = config.gpus_per_run(run.model)
    holding = run.submitted_at is not None or run.started_at is not None
    seconds = max(0.0, ((run.finished_at or now) - gpu_held_since(run)).total_seconds()) if holding else 0.0
    return {
        "hours": round(seconds * devices / 3600, 4),
        "devices": devices,
        "kind": "GPU" if config.worker.backend == "azureml" else "local process",
        "so_far": holding and run.finished_at is None,
    }


def overview(store: Store, config: RetrainConfig, now: dt.datetime | None = None) -> dict[str, Any]:
    """Every model at a glance: champion, verdict now, pending images, runs in flight, the latest
    runs and the decisions (collapsed), and the last events."""
    now = now or dt.datetime.now(dt.UTC)
    status = status_view(store, config, now=now)
    models = models_view(store, config)
    runs = runs_view(store, config, limit=OVERVIEW_RUNS)
    decisions = explain_view(store, config, limit=DECISIONS_READ)
    events = [
        {"time": e.created_at.isoformat(), "type": e.type, "subject": e.subject, "id": e.event_id}
        for e in collections.deque(store.all_events(), maxlen=EVENTS_SHOWN)  # the last N, without holding the rest
    ][::-1]
    out: dict[str, Any] = {"page": "overview", "generated_at": now.isoformat(), "models": {}, "events": events}
    for name in sorted(config.models):
        cfg = config.model(name)
        out["models"][name] = {
            "status": status[name],
            "threshold": {"min_new_images": cfg.min_new_images, "min_per_class": cfg.min_per_class},
            "versions": models[name]["versions"],
            "champion": models[name]["champion"],
            "runs": runs[name],
            "decisions": collapse_decisions(decisions[name]),
        }
    return out


def model_page(store: Store, config: RetrainConfig, name: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """One model: its versions with their metrics, how the champion moved, and its runs."""
    if name not in config.models:
        raise PageNotFoundError(f"no model {name!r} is configured")
    now = now or dt.datetime.now(dt.UTC)
    info = models_view(store, config, name)[name]
    history = [
        {"at": v["created_at"], "version": v["version"], "action": "registered", "by": "the gate", "reason": "", "previous_version": None}
        for v in reversed(info["versions"])  # oldest first: on a tie in time, what was recorded later stays later
    ]
    for event in store.all_events():
        data = event.payload.get("data") or {}
        if event.type == ev.MODEL_PROMOTED and data.get("model") == name:
            history.append({"at": event.created_at.isoformat(), "version": data.get("version"), "action": data.get("action") or "promote",
                            "by": data.get("requested_by", ""), "reason": data.get("reason", ""),
                            "previous_version": data.get("previous_version")})  # fmt: skip
        elif event.type == ev.MODEL_REGISTERED and data.get("model") == name:
            for row in history:  # the gate's reason for a registration still in the outbox
                if row["action"] == "registered" and row["version"] == data.get("version"):
                    row["reason"] = (data.get("gate") or {}).get("reason", "")
    history.sort(key=lambda row: row["at"])  # stable: a rollback in the same second as a registration comes after it
    history.reverse()
    return {"page": "model", "generated_at": now.isoformat(), "model": name, "champion": info["champion"],
            "champion_onnx": info["champion_onnx"], "versions": info["versions"], "champion_history": history,
            "runs": runs_view(store, config, name, limit=RUNS_SHOWN)[name]}  # fmt: skip


def run_page(
    store: Store, config: RetrainConfig, manifests: BlobStore | None, run_id: str, now: dt.datetime | None = None
) -> dict[str, Any]:
    """One run: why it started and how it ended (the gate's verdict and reason), its curves, per-class
    accuracy and confusion matrix on its own validation set, what it trained on, and its cost."""
    now = now or dt.datetime.now(dt.UTC)
    with store.read() as tx:
        run = tx.get_run(run_id)
        if run is None:
            raise PageNotFoundError(f"no run {run_id!r} in the ledger")
        version = next((v for v in tx.model_versions(run.model) if v.run_id == run_id), None)
        asked = {r.request_id: r for r in tx.all_requests(run.model)}
    row = run_row(run, {i: r.reason for i, r in asked.items() if r.reason}, version.metrics if version else None)
    metrics = run_metrics(config, run.backend_run_id, version.location if version else None)
    written = metrics.get("history")
    history: list[Any] = written if isinstance(written, list) else []
    gate = config.model(run.model).gate
    requests = [{"request_id": i, "by": asked[i].requested_by, "reason": asked[i].reason} for i in run.request_ids if i in asked]
    return {
        "page": "run",
        "generated_at": now.isoformat(),
        "model": run.model,
        "run": row,
        "backend_run_id": run.backend_run_id,
        "requests": requests,
        "version": version.version if version else None,
        "verdict": _verdict(run, metrics, gate.min_value, gate.min_improvement, gate.metric),
        "cost": _gpu_hours(run, config, now),
        "curves": thinned([r for r in history if isinstance(r, dict)], CURVE_POINTS),
        "epochs": len(history),
        "evaluation": _evaluation(metrics),
        "manifest": _manifest(store, manifests, run_id),
    }


def _verdict(run: RunRow, metrics: dict[str, Any], min_value: float, min_improvement: float, metric: str) -> dict[str, Any]:
    """The gate's verdict as the ledger recorded it, with the figures it weighed."""
    if run.outcome == "registered":
        verdict = "registered"
    elif run.outcome == "rejected":
        verdict = "rejected by the gate"
    elif run.state in ("failed", "canceled") or run.outcome in ("failed", "canceled"):
        verdict = f"{run.outcome or run.state} before the gate"
    else:
        verdict = "not judged yet"
    return {"verdict": verdict, "reason": run.detail, "metric": metric, "value": metrics.get(metric),
            "baseline": metrics.get("baseline_val_acc"), "min_value": min_value, "min_improvement": min_improvement}  # fmt: skip


def _evaluation(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The best epoch's confusion matrix and per-class accuracy, when the run wrote a well-formed one."""
    names, confusion = metrics.get("class_names"), metrics.get("confusion_matrix")
    if not (isinstance(names, list) and isinstance(confusion, list) and names and len(confusion) == len(names)):
        return None
    size = len(names)
    if not all(isinstance(r, list) and len(r) == size and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in r)
               for r in confusion):  # fmt: skip
        return None
    shown = min(size, CLASSES_SHOWN)
    per_class = {str(n): (r[i] / sum(r) if sum(r) else None) for i, (n, r) in enumerate(zip(names, confusion, strict=True))}
    return {"class_names": [str(n) for n in names[:shown]], "confusion": [r[:shown] for r in confusion[:shown]],
            "per_class_accuracy": per_class, "classes": size, "images": sum(map(sum, confusion)),
            "best_epoch": metrics.get("best_epoch")}  # fmt: skip


def _manifest(store: Store, manifests: BlobStore | None, run_id: str) -> dict[str, Any]:
    """Counts per split and class, and how many images were added or removed since the parent run."""
    if manifests is None:
        return {"error": "the manifests' store is not configured here"}
    try:
        view = manifest_view(store, manifests, run_id, diff_parent=True)
    except (OSError, ValueError, KeyError) as exc:  # missing, unreadable or changed after it was frozen
        return {"error": f"the manifest cannot be read: {type(exc).__name__}: {str(exc)[:200]}"}
    return {"sha256": view["manifest_sha256"], "images": view["images"], "classes": view["classes"], "per_split": view["per_split"],
            "parent_run_id": view["parent_run_id"], "added": len(view["added"]), "removed": len(view["removed"])}  # fmt: skip


def listing_page(store: Store, manifests: BlobStore | None, run_id: str, which: str, now: dt.datetime | None = None) -> dict[str, Any]:
    """A run's images: all of them, or those added or removed since its parent (at most LISTED_IMAGES)."""
    if which not in ("all", "added", "removed"):
        raise ValueError("images= must be all, added or removed")
    if manifests is None:
        raise PageNotFoundError("the manifests' store is not configured here")
    try:
        view = manifest_view(store, manifests, run_id, diff_parent=which != "all")
    except KeyError as exc:
        raise PageNotFoundError(str(exc.args[0])) from exc
    except (OSError, ValueError) as exc:
        raise PageNotFoundError(f"the manifest of {run_id!r} cannot be read: {type(exc).__name__}") from exc
    images = view["paths"] if which == "all" else view[which]
    return {"page": "images", "generated_at": (now or dt.datetime.now(dt.UTC)).isoformat(), "run_id": run_id, "model": view["model"],
            "which": which, "parent_run_id": view.get("parent_run_id"), "total": len(images),
            "images": images[:LISTED_IMAGES]}  # fmt: skip
