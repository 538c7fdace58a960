"""Read models for people and machines: the status of each model and the reasons behind decisions."""

from __future__ import annotations

import datetime as dt
from typing import Any

from shared import events as ev
from worker.config import RetrainConfig
from worker.manifests import load
from worker.policy import decide
from worker.ports import BlobStore
from worker.runs import snapshot_of
from worker.store import IN_FLIGHT_STATES, RunRow, Store, Tx

REJECTIONS_READ, REJECTIONS_SHOWN = 50, 5  # the latest runs looked at for gate rejections, and how many are shown


def _run(run: RunRow) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "state": run.state,
        "outcome": run.outcome,
        "attempt": run.attempt,
        "images": run.image_count,
        "new_images": run.new_image_count,
        "manifest_sha256": run.manifest_sha256,
        "created_at": run.created_at.isoformat(),
        "submitted_at": run.submitted_at.isoformat() if run.submitted_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "next_attempt_at": run.next_attempt_at.isoformat() if run.next_attempt_at else None,
        "reason": run.reason,
        "detail": run.detail,
    }


def status_view(store: Store, config: RetrainConfig, model: str | None = None, now: dt.datetime | None = None) -> dict[str, Any]:
    """Each model's state, with what the policy would decide now (`next`: the verdict, and when
    waiting ends without a new event) beside the last decision the worker recorded."""
    models = [model] if model else sorted(config.models)
    now = now or dt.datetime.now(dt.UTC)
    out: dict[str, Any] = {}
    with store.read() as tx:
        for name in models:
            pending = tx.pending_stats(name)
            decisions = tx.decisions(name, 1)
            verdict = decide(snapshot_of(tx, name, config, now), now, config.model(name))
            out[name] = {
                "pending": {
                    "total": pending.count,
                    "per_class": dict(sorted(pending.per_class.items())),
                    "oldest_at": pending.oldest_at.isoformat() if pending.oldest_at else None,
                },
                "images_by_state": dict(sorted(tx.count_images(name).items())),
                "in_flight": [_run(r) for r in tx.runs(name, IN_FLIGHT_STATES)],
                "last_runs": [_run(r) for r in tx.runs(name, limit=5)],
                "followup_wanted": tx.model_head(name).followup_wanted,
                "paused": tx.model_head(name).paused,
                "champion": tx.model_head(name).champion_version,
                "last_decision": {"at": decisions[0].at.isoformat(), "outcome": decisions[0].outcome, "reason": decisions[0].reason}
                if decisions
                else None,
                "next": {
                    "outcome": verdict.outcome,
                    "reason": verdict.reason,
                    "wake_at": verdict.wake_at.isoformat() if verdict.wake_at else None,
                    "forced": verdict.forced,
                },
            }
    return out


def explain_view(store: Store, config: RetrainConfig, model: str | None = None, limit: int = 10) -> dict[str, list[dict[str, Any]]]:
    """The latest decisions, newest first, each with the reason of the request it answered (if any)."""
    models = [model] if model else sorted(config.models)
    out: dict[str, list[dict[str, Any]]] = {}
    with store.read() as tx:
        for name in models:
            decisions = tx.decisions(name, limit)
            asked = request_reasons(tx, name) if any(d.message_id for d in decisions) else {}
            out[name] = [
                {"at": d.at.isoformat(), "outcome": d.outcome, "reason": d.reason, "run_id": d.run_id, "message_id": d.message_id,
                 "request_reason": asked.get(d.message_id or "")}
                for d in decisions
            ]  # fmt: skip
    return out


def models_view(store: Store, config: RetrainConfig, model: str | None = None) -> dict[str, Any]:
    """Registered versions per model, newest first, with their headline metrics and the champion;
    and the latest runs the gate rejected, with its reason."""
    models = [model] if model else sorted(config.models)
    out: dict[str, Any] = {}
    with store.read() as tx:
        for name in models:
            champion = tx.model_head(name).champion_version
            out[name] = {
                "champion": champion,
                "rejected": [
                    {"run_id": r.run_id, "finished_at": r.finished_at.isoformat() if r.finished_at else None, "reason": r.detail}
                    for r in tx.runs(name, limit=REJECTIONS_READ)
                    if r.outcome == "rejected"
                ][:REJECTIONS_SHOWN],
                "champion_onnx": str(config.registry_dir / name / "champion" / "model.onnx") if champion else None,
                "versions": [
                    {
                        "version": v.version,
                        "champion": v.version == champion,
                        "run_id": v.run_id,
                        "created_at": v.created_at.isoformat(),
                        "best_val_acc": v.metrics.get("best_val_acc"),
                        "baseline_val_acc": v.metrics.get("baseline_val_acc"),
                        "images": v.card.get("manifest", {}).get("images"),
                        "parent_version": v.card.get("parent_version"),
                        "location": v.location,
                    }
                    for v in tx.model_versions(name)
                ],
            }
    return out


def version_view(store: Store, model: str, version: int | None = None) -> dict[str, Any] | None:
    """One version's full lineage card (the champion when no version is given)."""
    with store.read() as tx:
        versions = tx.model_versions(model)
        champion = tx.model_head(model).champion_version
    wanted = version if version is not None else champion
    found = next((v for v in versions if v.version == wanted), None)
    if found is None:
        return None
    return {"model": model, "version": found.version, "champion": found.version == champion, "location": found.location, **found.card}


def runs_view(store: Store, config: RetrainConfig, model: str | None = None, limit: int = 20) -> dict[str, list[dict[str, Any]]]:
    """Each model's latest runs, newest first: state, outcome, images, duration, and the metrics of a
    registered run (its model version's summary)."""
    models = [model] if model else sorted(config.models)
    out: dict[str, list[dict[str, Any]]] = {}
    with store.read() as tx:
        for name in models:
            metrics = {v.run_id: v.metrics for v in tx.model_versions(name)}
            asked = request_reasons(tx, name)
            out[name] = [run_row(run, asked, metrics.get(run.run_id)) for run in tx.runs(name, limit=limit)]
    return out


def request_reasons(tx: Tx, model: str) -> dict[str, str]:
    """request id -> the reason its requester gave, for the model's requests that gave one."""
    return {r.request_id: r.reason for r in tx.all_requests(model) if r.reason}


def run_row(run: RunRow, asked: dict[str, str], version_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """A run as `retrain runs` and the console show it: its record, why someone asked for it (the
    requests it carried out, beside why the policy started it), its duration, and the metrics of
    its model version if it was registered."""
    row = _run(run)
    row["request_reasons"] = [asked[i] for i in run.request_ids if i in asked]
    began = run.started_at or run.submitted_at
    row["duration_s"] = round((run.finished_at - began).total_seconds(), 1) if run.finished_at and began else None
    row["version_metrics"] = version_metrics
    row["best_val_acc"] = (version_metrics or {}).get("best_val_acc")
    return row


def door_of(actor: str) -> tuple[str, bool]:
    """(the door a request came through, whether who asked was verified), read from how the actor
    was recorded (functions/auth.py, the queue trigger, the command line)."""
    if actor.startswith("entra:"):
        return "http (Entra ID)", True
    if actor.startswith("function key"):
        return "http (function key)", False
    if actor.startswith("queue "):
        return "queue", False
    return "local", False


def audit_view(store: Store, config: RetrainConfig, model: str | None = None, limit: int = 100) -> dict[str, list[dict[str, Any]]]:
    """Per model, newest first: every control (promote, rollback, pause, resume) and every request
    (forced run or backfill), with who asked, when, through which door, and whether it was verified."""
    names = [model] if model else sorted(config.models)
    entries: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for event in store.all_events():
        data = event.payload.get("data") or {}
        name = data.get("model")
        if event.type in ev.CONTROL_EVENTS and name in entries:
            action = data.get("action") or event.type.rsplit(".", 1)[-1]
            entries[name].append({"at": event.created_at, "action": action, "actor": data.get("requested_by", ""),
                                  "reason": data.get("reason", ""), "request_id": data.get("request_id"),
                                  "version": data.get("version")})  # fmt: skip
    with store.read() as tx:
        for name in names:
            for r in tx.all_requests(name):
                action = "forced run" if r.force else "backfill"
                entries[name].append({"at": r.created_at, "action": action, "actor": r.requested_by, "reason": r.reason,
                                      "request_id": r.request_id, "state": r.state})  # fmt: skip
    view: dict[str, list[dict[str, Any]]] = {}
    for name, rows in entries.items():
        rows.sort(key=lambda row: row["at"], reverse=True)
        view[name] = []
        for row in rows[:limit]:
            door, verified = door_of(row["actor"])
            view[name].append({**row, "at": row["at"].isoformat(), "door": door, "verified": verified})
    return view


def manifest_view(store: Store, manifests: BlobStore, run_id: str, diff_parent: bool = False) -> dict[str, Any]:
    """What a run trained on: its frozen manifest's images, counted per split and class; with
    `diff_parent`, the images added and removed since the last registered run before it (by path
    and etag: an overwritten image counts as removed and added)."""
    with store.read() as tx:
        run = tx.get_run(run_id)
        if run is None:
            raise KeyError(f"no run {run_id!r} in the ledger")
        earlier = [r for r in tx.runs(run.model) if r.seq < run.seq and r.outcome == "registered"]
    document = load(manifests, run.manifest_sha256)
    images = document["images"]
    counts: dict[str, dict[str, int]] = {}
    for image in images:
        per_class = counts.setdefault(image["split"], {})
        per_class[image["label"]] = per_class.get(image["label"], 0) + 1
    view: dict[str, Any] = {"run_id": run.run_id, "model": run.model, "manifest_sha256": run.manifest_sha256,
                            "classes": document["classes"], "images": len(images), "per_split": counts}  # fmt: skip
    if not diff_parent:
        view["paths"] = [{"path": i["path"], "label": i["label"], "split": i["split"]} for i in images]
        return view
    parent = max(earlier, key=lambda r: r.seq, default=None)
    before = {(i["path"], i["etag"]): i for i in load(manifests, parent.manifest_sha256)["images"]} if parent else {}
    now = {(i["path"], i["etag"]): i for i in images}
    view["parent_run_id"] = parent.run_id if parent else None
    view["added"] = [{"path": i["path"], "label": i["label"], "split": i["split"]} for key, i in sorted(now.items()) if key not in before]
    view["removed"] = [{"path": i["path"], "label": i["label"], "split": i["split"]} for key, i in sorted(before.items()) if key not in now]
    return view
