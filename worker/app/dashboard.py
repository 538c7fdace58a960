"""The read-only page: per model the champion, accuracy per registered version, each run's training
curves, pending images against the threshold, the decisions with their reasons, runs in flight and
the last events.

One self-contained HTML document: inline CSS and SVG, no script, no font or file from anywhere
else, so it works offline and behind a strict Content-Security-Policy. Every string that came
from outside (blob names, reasons, requester ids, run details) goes through `html.escape`.
"""

from __future__ import annotations

import collections
import datetime as dt
import html
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from shared.redact import printable
from worker.config import RetrainConfig
from worker.store import Store
from worker.views import explain_view, models_view, runs_view, status_view

CSP_META = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
CSP = CSP_META + "; frame-ancestors 'none'"  # frame-ancestors only works as a header
EVENTS_SHOWN = 30
RUNS_SHOWN = 200
CURVES_SHOWN = 6
CURVE_POINTS = 400  # points per training curve


def e(value: Any) -> str:
    """Text from anywhere, safe in HTML text and attribute values, and shown as it is: control and
    bidi characters (ESC, U+202E) become visible escapes (shared.redact.printable) before HTML escaping."""
    return html.escape(printable("" if value is None else value), quote=True)


def run_curves(config: RetrainConfig, backend_run_id: str, location: str | None = None) -> list[dict[str, Any]]:
    """A run's per-epoch history from its metrics.json: in the registry (a registered local version),
    in the local run's outputs, or in the outputs downloaded from Azure ML. Empty when none is here."""
    candidates = [Path(location) / "metrics.json"] if location and not location.startswith("azureml:") else []
    candidates += [
        config.worker.state_dir / "runs" / backend_run_id / "outputs" / "metrics.json",
        config.worker.state_dir / "azureml-outputs" / backend_run_id / "metrics.json",
    ]
    for path in candidates:
        try:
            history = json.loads(path.read_text()).get("history")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(history, list):
            return [row for row in history if isinstance(row, dict)]
    return []


def dashboard_data(store: Store, config: RetrainConfig, now: dt.datetime | None = None) -> dict[str, Any]:
    """Everything the page shows, as plain data (also served as JSON)."""
    now = now or dt.datetime.now(dt.UTC)
    status = status_view(store, config, now=now)
    models = models_view(store, config)
    runs = runs_view(store, config, limit=RUNS_SHOWN)
    decisions = explain_view(store, config, limit=40)
    events = [
        {"time": ev.created_at.isoformat(), "type": ev.type, "subject": ev.subject, "id": ev.event_id}
        for ev in collections.deque(store.all_events(), maxlen=EVENTS_SHOWN)  # the last N, without holding the rest
    ][::-1]
    out: dict[str, Any] = {"generated_at": now.isoformat(), "models": {}, "events": events}
    for name in sorted(config.models):
        cfg = config.model(name)
        locations = {v["run_id"]: v["location"] for v in models[name]["versions"]}
        with_curves: list[dict[str, Any]] = []
        for run in runs[name]:
            if len(with_curves) >= CURVES_SHOWN:
                break
            backend_run_id = f"{run['run_id']}-a{run['attempt']}"
            curve = run_curves(config, backend_run_id, locations.get(run["run_id"]))
            if curve:
                with_curves.append({"run_id": run["run_id"], "outcome": run["outcome"] or run["state"], "history": curve})
        out["models"][name] = {
            "status": status[name],
            "threshold": {"min_new_images": cfg.min_new_images, "min_per_class": cfg.min_per_class},
            "versions": models[name]["versions"],
            "champion": models[name]["champion"],
            "runs": runs[name],
            "curves": with_curves,
            "decisions": decisions[name],
        }
    return out


# -- rendering -------------------------------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1c2430;background:#f5f7fa}
header{background:#1c2430;color:#fff;padding:12px 24px}header h1{margin:0;font-size:18px}
main{padding:16px 24px}section.model{background:#fff;border:1px solid #dde3ea;border-radius:8px;margin:0 0 20px;padding:16px}
h2{margin:0 0 8px;font-size:17px}h3{margin:16px 0 6px;font-size:14px;color:#3d4b5c}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:16px}
table{border-collapse:collapse;width:100%;font-size:13px}td,th{border-bottom:1px solid #e6eaef;padding:4px 6px;text-align:left;vertical-align:top}
th{color:#5a6878;font-weight:600}.muted{color:#6b7a8c}.badge{display:inline-block;padding:1px 6px;border-radius:9px;background:#e3ecf7;font-size:12px}
.paused{background:#fdecc8}.champion{background:#d5f0dc}svg text{font:11px system-ui,sans-serif;fill:#3d4b5c}
.reason{max-width:60em;overflow-wrap:anywhere}
"""


def _scale(values: list[float], lo: float, hi: float, size: float, pad: float) -> list[float]:
    span = (hi - lo) or 1.0
    return [pad + (v - lo) / span * (size - 2 * pad) for v in values]


def accuracy_plot(versions: list[Mapping[str, Any]], champion: int | None) -> str:
    """Validation accuracy per registered version, oldest left; the champion is marked."""
    points: list[tuple[int, float]] = sorted(
        (int(v["version"]), float(v["best_val_acc"])) for v in versions if isinstance(v.get("best_val_acc"), int | float)
    )
    if not points:
        return '<p class="muted" data-plot="accuracy">no registered version yet</p>'
    width, height, pad = 360, 180, 28
    xs = _scale([float(p[0]) for p in points], points[0][0], max(points[-1][0], points[0][0] + 1), width, pad)
    lo = min(0.0, min(p[1] for p in points))
    ys = [height - y for y in _scale([p[1] for p in points], lo, 1.0, height, pad)]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
    marks = []
    for (version, acc), x, y in zip(points, xs, ys, strict=True):
        is_champion = version == champion
        marks.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{6 if is_champion else 3.5}" fill="{"#1a9c4b" if is_champion else "#3469b3"}">'
            f"<title>v{version}: best_val_acc {acc:.4f}{' (champion)' if is_champion else ''}</title></circle>"
            f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle">v{version}</text>'
            + (f'<text x="{x:.1f}" y="{y - 10:.1f}" text-anchor="middle" data-champion="v{version}">champion</text>' if is_champion else "")
        )
    return (
        f'<svg data-plot="accuracy" role="img" aria-label="validation accuracy per version" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#c3ccd6"/>'
        f'<text x="4" y="{pad - 12}">best_val_acc (1.0 top)</text>'
        f'<polyline points="{line}" fill="none" stroke="#3469b3" stroke-width="1.5"/>{"".join(marks)}</svg>'
    )


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _thinned(rows: list[Mapping[str, Any]], most: int) -> list[Mapping[str, Any]]:
    """At most `most` rows, evenly spaced, the first and the last kept: a page stays small whatever
    a run's metrics.json holds (a million epochs made a 20 MiB page)."""
    if len(rows) <= most:
        return rows
    step = (len(rows) - 1) / (most - 1)
    return [rows[round(i * step)] for i in range(most)]


def curve_plot(history: list[Mapping[str, Any]], title: str) -> str:
    """One run: validation accuracy (line) and training loss (dashed, own scale) per epoch."""
    width, height, pad = 320, 140, 22
    total = len(history)
    history = _thinned(history, CURVE_POINTS)
    # metrics.json is the run's to write: a missing, null or non-finite value is drawn as a default, never raised on
    epochs = [float(r["epoch"]) if _finite(r.get("epoch")) else float(i + 1) for i, r in enumerate(history)]
    acc = [float(r["val_acc"]) if _finite(r.get("val_acc")) else 0.0 for r in history]
    loss = [float(r["train_loss"]) if _finite(r.get("train_loss")) else 0.0 for r in history]
    xs = _scale(epochs, min(epochs), max(max(epochs), min(epochs) + 1), width, pad)
    acc_y = [height - y for y in _scale(acc, 0.0, 1.0, height, pad)]
    loss_y = [height - y for y in _scale(loss, 0.0, max(max(loss), 1e-9), height, pad)]
    acc_line = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, acc_y, strict=True))
    loss_line = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, loss_y, strict=True))
    return (
        f'<figure><svg data-plot="curve" role="img" aria-label="training curves of {e(title)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
        f'<polyline points="{acc_line}" fill="none" stroke="#1a9c4b" stroke-width="1.5"/>'
        f'<polyline points="{loss_line}" fill="none" stroke="#b3474a" stroke-dasharray="4 3"/>'
        f'<text x="4" y="12">val_acc (green), train_loss (red, dashed); {total} epochs</text></svg>'
        f"<figcaption>{e(title)}</figcaption></figure>"
    )


def pending_bars(per_class: Mapping[str, int], total: int, threshold: Mapping[str, int]) -> str:
    width, row = 360, 22
    classes = sorted(per_class.items())
    scale = max([threshold["min_new_images"], *(n for _, n in classes), 1])
    bars = []
    for i, (label, n) in enumerate(classes):
        w = 200 * n / scale
        bars.append(
            f'<text x="0" y="{i * row + 15}">{e(label)[:24]}</text><rect x="120" y="{i * row + 4}" width="{w:.1f}" height="14" fill="#3469b3"/>'
            f'<text x="{126 + w:.1f}" y="{i * row + 15}">{n}</text>'
        )
    height = max(row * len(classes), row) + 26
    need = 120 + 200 * threshold["min_new_images"] / scale
    return (
        f'<svg data-plot="pending" role="img" aria-label="pending images per class" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
        f'{"".join(bars)}<line x1="{need:.1f}" y1="0" x2="{need:.1f}" y2="{height - 20}" stroke="#b3474a" stroke-dasharray="3 3"/>'
        f'<text x="0" y="{height - 4}">{total} pending; a run needs {threshold["min_new_images"]} new '
        f"({threshold['min_per_class']} per class)</text></svg>"
    )


def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]], empty: str) -> str:
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in r) + "</tr>" for r in rows)
    if not body:
        return f'<p class="muted">{e(empty)}</p>'
    return "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + f"</tr>{body}</table>"


def render(data: Mapping[str, Any]) -> str:
    sections = []
    for name, m in data["models"].items():
        s = m["status"]
        champion = m["champion"]
        champ = next((v for v in m["versions"] if v["version"] == champion), None)
        headline = (
            f'<span class="badge champion">champion v{champion}</span> best_val_acc {champ["best_val_acc"]}'
            if champ
            else '<span class="badge">no champion yet</span>'
        )
        if s.get("paused"):
            p = s["paused"]
            headline += f' <span class="badge paused">paused by {e(p.get("by"))}: {e(p.get("reason"))}</span>'
        now = s.get("next") or {}
        flying = _table(
            ["run", "state", "attempt", "images (new)", "submitted"],
            (
                [e(r["run_id"]), e(r["state"]), e(r["attempt"]), f"{e(r['images'])} ({e(r['new_images'])})", e(r["submitted_at"])]
                for r in s["in_flight"]
            ),
            "no run in flight",
        )
        runs = _table(
            ["run", "state", "outcome", "images (new)", "duration", "best_val_acc", "why"],
            (
                [e(r["run_id"]), e(r["state"]), e(r["outcome"]), f"{e(r['images'])} ({e(r['new_images'])})",
                 e(f"{r['duration_s']:.0f} s" if r["duration_s"] is not None else ""), e(r["best_val_acc"]), f'<span class="reason">{e(r["reason"])}</span>']
                for r in m["runs"][:20]
            ),
            "no runs yet",
        )  # fmt: skip
        decisions = _table(
            ["time", "decision", "reason"],
            ([e(d["at"][:19].replace("T", " ")), e(d["outcome"]), f'<span class="reason">{e(d["reason"])}</span>'] for d in m["decisions"]),
            "no decisions yet",
        )
        curves = (
            "".join(curve_plot(c["history"], f"{c['run_id']} ({c['outcome']})") for c in m["curves"])
            or '<p class="muted">no curves here yet</p>'
        )
        sections.append(
            f'<section class="model" data-model="{e(name)}"><h2>{e(name)}</h2><p>{headline}</p>'
            f'<p>now: <b>{e(now.get("outcome"))}</b> <span class="reason">{e(now.get("reason"))}</span></p>'
            f'<div class="grid"><div><h3>Validation accuracy per version</h3>{accuracy_plot(m["versions"], champion)}</div>'
            f"<div><h3>Pending images</h3>{pending_bars(s['pending']['per_class'], s['pending']['total'], m['threshold'])}</div></div>"
            f'<h3>Runs in flight</h3>{flying}<h3>Training curves</h3><div class="grid">{curves}</div>'
            f'<h3>Decisions</h3><div data-timeline="decisions">{decisions}</div><h3>Runs</h3>{runs}</section>'
        )
    events = _table(
        ["time", "type", "subject"],
        ([e(ev["time"][:19].replace("T", " ")), e(ev["type"]), e(ev["subject"])] for ev in data["events"]),
        "no events yet",
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP_META}"><title>retrain</title><style>{STYLE}</style></head>'
        f'<body><header><h1>retrain</h1><span class="muted">read-only; generated {e(data["generated_at"][:19].replace("T", " "))} UTC</span></header>'
        f'<main>{"".join(sections)}<section class="model"><h2>Last events</h2>{events}</section></main></body></html>'
    )


def page(store: Store, config: RetrainConfig) -> str:
    return render(dashboard_data(store, config))
