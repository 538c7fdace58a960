"""The read-only console's pages as HTML: the overview, a model, a run, a run's images; and the
routing from a query string (`?model=`, `?run=`, `?run=&images=`) to a page, shared by
`retrain dashboard` and the Functions app.

Each page is one self-contained document: inline CSS and SVG, no font or file from anywhere else,
and one inline script (allowed by its hash in the Content-Security-Policy) that refreshes the page's
content in place every REFRESH_SECONDS without reloading. Every string that came from outside
(blob names, reasons, requester ids, run details, metrics) goes through `e()` (html.escape after
shared.redact.printable); links are built from escaped, URL-quoted ids.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from worker.app.charts import Series, bar_chart, e, finite, label, line_chart
from worker.app.dashboard_data import LISTED_IMAGES, PageNotFoundError, listing_page, model_page, overview, run_page
from worker.config import RetrainConfig
from worker.ports import BlobStore
from worker.store import Store

REFRESH_SECONDS = 10

# Refreshes the page in place: fetches the same URL, swaps <main> and the timestamp, never reloads
# (the scroll position and an open <details> survive). textContent only: no markup from the script.
REFRESH_SCRIPT = (
    "(function(){var b=document.body,s=document.getElementById('refresh-state');"
    "function step(){if(document.hidden)return;"
    "fetch(location.href,{cache:'no-store',credentials:'same-origin',headers:{'X-Retrain-Refresh':'1'}})"
    ".then(function(r){if(!r.ok)throw new Error('HTTP '+r.status);return r.text();})"
    ".then(function(t){var d=new DOMParser().parseFromString(t,'text/html'),m=d.querySelector('main'),g=d.getElementById('generated');"
    "if(!m||!g)throw new Error('not a dashboard page');"
    "var open=Array.prototype.map.call(document.querySelectorAll('details[open][id]'),function(x){return x.id;});"
    "document.querySelector('main').replaceWith(document.adoptNode(m));"
    "open.forEach(function(id){var x=document.getElementById(id);if(x)x.open=true;});"
    "document.getElementById('generated').textContent=g.textContent;"
    "b.dataset.refreshes=String(Number(b.dataset.refreshes||0)+1);s.textContent='';})"
    ".catch(function(err){s.textContent=' (refresh failed: '+err.message+'; showing the last data)';});}"
    "setInterval(step,Number(b.dataset.refreshSeconds||10)*1000);})();"
)
SCRIPT_HASH = base64.b64encode(hashlib.sha256(REFRESH_SCRIPT.encode()).digest()).decode()
CSP_META = (
    f"default-src 'none'; script-src 'sha256-{SCRIPT_HASH}'; connect-src 'self'; style-src 'unsafe-inline'; img-src data:; "
    "base-uri 'none'; form-action 'none'"
)
CSP = CSP_META + "; frame-ancestors 'none'"  # frame-ancestors only works as a header

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1c2430;background:#f5f7fa}
header{background:#1c2430;color:#fff;padding:10px 24px;display:flex;gap:18px;align-items:baseline;flex-wrap:wrap}
header h1{margin:0;font-size:18px}header a{color:#cfe0f5}header .muted{color:#aab6c4}
main{padding:16px 24px}section{background:#fff;border:1px solid #dde3ea;border-radius:8px;margin:0 0 20px;padding:16px}
h2{margin:0 0 8px;font-size:17px}h3{margin:16px 0 6px;font-size:14px;color:#3d4b5c}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:16px}
table{border-collapse:collapse;width:100%;font-size:13px}td,th{border-bottom:1px solid #e6eaef;padding:4px 6px;text-align:left;vertical-align:top}
th{color:#5a6878;font-weight:600}.muted{color:#6b7a8c}.badge{display:inline-block;padding:1px 7px;border-radius:9px;background:#e3ecf7;font-size:12px}
.paused{background:#fdecc8}.champion{background:#d5f0dc}.rejected{background:#f8dcdc}.failed{background:#f8dcdc}
svg text{font:11px system-ui,sans-serif;fill:#3d4b5c}.reason{max-width:60em;overflow-wrap:anywhere}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:0}dl.facts dt{color:#5a6878}dl.facts dd{margin:0;overflow-wrap:anywhere}
table.confusion{width:auto}table.confusion td,table.confusion th{text-align:center;min-width:4em}.count{color:#5a6878;font-size:12px}
"""


# -- links -----------------------------------------------------------------------------------------


def link(text: Any, **query: Any) -> str:
    """A link to another page of the console, relative to this one (works under / and /api/dashboard)."""
    href = "?" + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in query.items())
    return f'<a href="{e(href)}">{e(text)}</a>'


def _when(iso: Any) -> str:
    return e(str(iso or "")[:19].replace("T", " "))


def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]], empty: str, attrs: str = "") -> str:
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in r) + "</tr>" for r in rows)
    if not body:
        return f'<p class="muted">{e(empty)}</p>'
    return f"<table{attrs}><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + f"</tr>{body}</table>"


def _acc(value: Any) -> str:
    return f"{value:.4f}" if finite(value) else "-"


def _outcome_badge(run: Mapping[str, Any]) -> str:
    outcome = run.get("outcome") or run.get("state")
    kind = {"registered": "champion", "rejected": "rejected", "failed": "failed", "canceled": "failed"}.get(str(outcome), "")
    return f'<span class="badge {kind}">{e(outcome)}</span>'


def _why_started(run: Mapping[str, Any]) -> str:
    asked = "".join(f'<br><span class="muted">asked: {e(why)}</span>' for why in run.get("request_reasons") or [])
    return f'<span class="reason">{e(run.get("reason"))}</span>{asked}'


def _how_ended(run: Mapping[str, Any]) -> str:
    return f'<span class="reason">{e(run.get("detail"))}</span>' if run.get("outcome") or run.get("state") in ("failed", "canceled") else ""


def runs_table(runs: list[Mapping[str, Any]]) -> str:
    return _table(
        ["run", "outcome", "images (new)", "duration", "best_val_acc", "why it started", "how it ended"],
        (
            [link(r["run_id"], run=r["run_id"]), _outcome_badge(r), f"{e(r.get('images'))} ({e(r.get('new_images'))})",
             e(f"{r['duration_s']:.0f} s") if finite(r.get("duration_s")) else "", _acc(r.get("best_val_acc")),
             _why_started(r), _how_ended(r)]
            for r in runs
        ),
        "no runs yet",
        ' data-list="runs"',
    )  # fmt: skip


def decisions_table(decisions: list[Mapping[str, Any]]) -> str:
    """The collapsed timeline: one row per run of decisions of the same kind, with how many and since when."""

    def when(d: Mapping[str, Any]) -> str:
        if d["count"] == 1:
            return _when(d["at"])
        return f'{_when(d["at"])}<br><span class="count">&times;{d["count"]} since {_when(d["first_at"])}</span>'

    return _table(
        ["time", "decision", "reason"],
        (
            [when(d), e(d["outcome"]) + (f' <span class="badge" data-count="{d["count"]}">&times;{d["count"]}</span>' if d["count"] > 1 else ""),
             f'<span class="reason">{e(d["reason"])}</span>' + (" " + link("run", run=d["run_id"]) if d.get("run_id") else "")
             + (f'<br><span class="muted">asked: {e(d["request_reason"])}</span>' if d.get("request_reason") else "")]
            for d in decisions
        ),
        "no decisions yet",
    )  # fmt: skip


# -- charts ----------------------------------------------------------------------------------------


def accuracy_plot(versions: list[Mapping[str, Any]], champion: int | None) -> str:
    """The gate's metric per registered version, oldest left; the champion is marked."""
    points = sorted((int(v["version"]), float(v["best_val_acc"])) for v in versions if finite(v.get("best_val_acc")))
    if not points:
        return '<p class="muted" data-plot="accuracy">no registered version yet</p>'
    names = {float(version): f"v{version}" + (" ★" if version == champion else "") for version, _ in points}
    hover = [f"v{version}: best_val_acc {acc:.4f}" + (" (champion)" if version == champion else "") for version, acc in points]
    chart = line_chart([Series("best_val_acc", [(float(v), a) for v, a in points], point_labels=hover)], plot="accuracy",
                       title="validation accuracy per version", x_label="registered version (★ champion)",
                       y_label="best_val_acc", y_range=(0.0, 1.0), x_names=names)  # fmt: skip
    return chart.replace("</svg>", f'<desc data-champion="v{champion}">champion v{champion}</desc></svg>') if champion else chart


def curve_plots(history: list[Mapping[str, Any]], epochs: int) -> str:
    """Two charts per run: accuracy (train, validation) and loss (train, validation) per epoch."""

    def series(key: str, name: str, dashed: bool = False) -> Series:
        points = [(float(r["epoch"]) if finite(r.get("epoch")) else float(i + 1), r.get(key)) for i, r in enumerate(history)]
        return Series(name, [(x, float(y)) for x, y in points if finite(y)], dashed=dashed)

    of = f" ({epochs} epochs)" if epochs > len(history) else ""
    accuracy = line_chart([series("val_acc", "val_acc"), series("train_acc", "train_acc", True)], plot="curve",
                          title=f"accuracy per epoch{of}", x_label="epoch", y_label="accuracy", y_range=(0.0, 1.0))  # fmt: skip
    loss = line_chart([series("val_loss", "val_loss"), series("train_loss", "train_loss", True)], plot="loss",
                      title=f"loss per epoch{of}", x_label="epoch", y_label="cross-entropy loss")  # fmt: skip
    return f'<div class="grid"><div>{accuracy}</div><div>{loss}</div></div>'


def confusion_table(evaluation: Mapping[str, Any]) -> str:
    """Rows are true classes, columns predicted; each cell shaded by its share of the row."""
    names, matrix = evaluation["class_names"], evaluation["confusion"]
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>"
    rows = []
    for name, row in zip(names, matrix, strict=True):
        total = sum(row) or 1
        cells = "".join(
            f'<td style="background:rgba(52,105,179,{0.08 + 0.8 * c / total:.2f})" title="{e(name)} predicted as {e(names[j])}: {c}">{c}</td>'
            for j, c in enumerate(row)
        )
        rows.append(f"<tr><th>{e(name)}</th>{cells}</tr>")
    more = evaluation["classes"] - len(names)
    note = f'<p class="muted">the first {len(names)} of {evaluation["classes"]} classes</p>' if more > 0 else ""
    return f'<table class="confusion" data-table="confusion">{head}{"".join(rows)}</table>{note}'


# -- pages -----------------------------------------------------------------------------------------


def _document(title: str, body: str, generated_at: str, nav: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP_META}"><title>{e(title)}</title><style>{STYLE}</style></head>'
        f'<body data-refresh-seconds="{REFRESH_SECONDS}"><header><h1>retrain</h1>{nav}'
        f'<span class="muted">read-only; updated <span id="generated">{_when(generated_at)}</span> UTC'
        f'<span id="refresh-state"></span></span></header><main>{body}</main><script>{REFRESH_SCRIPT}</script></body></html>'
    )


def _nav(models: Iterable[str]) -> str:
    return '<nav data-nav="models">' + " · ".join([link("overview"), *(link(m, model=m) for m in models)]) + "</nav>"


def render_overview(data: Mapping[str, Any]) -> str:
    sections = []
    for name, m in data["models"].items():
        s = m["status"]
        champion = m["champion"]
        champ = next((v for v in m["versions"] if v["version"] == champion), None)
        headline = (
            f'<span class="badge champion">champion v{e(champion)}</span> best_val_acc {_acc(champ["best_val_acc"])}'
            if champ
            else '<span class="badge">no champion yet</span>'
        )
        if s.get("paused"):
            p = s["paused"]
            headline += f' <span class="badge paused">paused by {e(p.get("by"))}: {e(p.get("reason"))}</span>'
        now = s.get("next") or {}
        flying = _table(
            ["run", "state", "attempt", "images (new)", "submitted"],
            ([link(r["run_id"], run=r["run_id"]), e(r["state"]), e(r["attempt"]), f"{e(r['images'])} ({e(r['new_images'])})",
              _when(r["submitted_at"])] for r in s["in_flight"]),
            "no run in flight",
        )  # fmt: skip
        pending = s["pending"]
        bars = bar_chart(pending["per_class"], plot="pending", title="new images per class", x_label="new images (dashed: the run threshold)",
                         marker=(float(m["threshold"]["min_new_images"]), f"a run needs {m['threshold']['min_new_images']} new images"))  # fmt: skip
        sections.append(
            f'<section class="model" data-model="{e(name)}"><h2>{link(name, model=name)}</h2><p>{headline}</p>'
            f'<p>now: <b>{e(now.get("outcome"))}</b> <span class="reason">{e(now.get("reason"))}</span></p>'
            f'<div class="grid"><div><h3>Validation accuracy per version</h3>{accuracy_plot(m["versions"], champion)}</div>'
            f"<div><h3>Pending images: {e(pending['total'])} (a run needs {e(m['threshold']['min_new_images'])}, "
            f"{e(m['threshold']['min_per_class'])} per class)</h3>{bars}</div></div>"
            f"<h3>Runs in flight</h3>{flying}"
            f'<h3>Decisions</h3><div data-timeline="decisions">{decisions_table(m["decisions"])}</div>'
            f"<h3>Latest runs ({link('all runs', model=name)})</h3>{runs_table(m['runs'])}</section>"
        )
    events = _table(
        ["time", "type", "subject"],
        ([_when(ev["time"]), e(ev["type"]), e(ev["subject"])] for ev in data["events"]),
        "no events yet",
    )
    body = "".join(sections) + f"<section><h2>Last events</h2>{events}</section>"
    return _document("retrain", body, data["generated_at"], _nav(data["models"]))


def render_model(data: Mapping[str, Any], models: Iterable[str]) -> str:
    name, champion = data["model"], data["champion"]
    versions = _table(
        ["version", "best_val_acc", "baseline (same val set)", "images", "parent", "run", "registered"],
        (
            [(f'<span class="badge champion">v{e(v["version"])} champion</span>' if v["champion"] else f"v{e(v['version'])}"),
             _acc(v["best_val_acc"]), _acc(v["baseline_val_acc"]), e(v["images"]),
             f"v{e(v['parent_version'])}" if v["parent_version"] else "-", link(v["run_id"], run=v["run_id"]), _when(v["created_at"])]
            for v in data["versions"]
        ),
        "no registered version yet",
        ' data-list="versions"',
    )  # fmt: skip
    history = _table(
        ["time", "champion", "how", "by", "reason"],
        (
            [_when(h["at"]), f"v{e(h['version'])}",
             e(h["action"]) + (f" (from v{e(h['previous_version'])})" if h.get("previous_version") else ""),
             e(h["by"]), f'<span class="reason">{e(h["reason"])}</span>']
            for h in data["champion_history"]
        ),
        "the champion has not moved yet",
        ' data-list="champion-history"',
    )  # fmt: skip
    onnx = f'<p class="muted">champion ONNX: {e(data["champion_onnx"])}</p>' if data.get("champion_onnx") else ""
    body = (
        f'<section data-model="{e(name)}"><h2>{e(name)}: '
        + (f"champion v{e(champion)}" if champion else "no champion yet")
        + f"</h2>{onnx}"
        f'<div class="grid"><div>{accuracy_plot(data["versions"], champion)}</div></div>'
        f"<h3>Versions</h3>{versions}<h3>Champion history</h3>{history}</section>"
        f"<section><h2>Runs ({len(data['runs'])} latest)</h2>{runs_table(data['runs'])}</section>"
    )
    return _document(f"retrain: {name}", body, data["generated_at"], _nav(models))


def render_run(data: Mapping[str, Any], models: Iterable[str]) -> str:
    run, verdict, cost = data["run"], data["verdict"], data["cost"]
    run_id = run["run_id"]
    asked = "".join(
        f"<dd>{e(r['request_id'])} by {e(r['by'])}" + (f': <span class="reason">{e(r["reason"])}</span>' if r["reason"] else "") + "</dd>"
        for r in data["requests"]
    )
    figures = f"{e(verdict['metric'])} {_acc(verdict['value'])}; the champion on the same validation set {_acc(verdict['baseline'])}"
    rules = f"the gate needs at least {label(verdict['min_value'])} and +{label(verdict['min_improvement'])} over the champion"
    hours = f"{cost['hours']:.3f} {e(cost['kind'])}-hours ({e(cost['devices'])} × {e(cost['kind'])}{'; so far' if cost['so_far'] else ''})"
    facts = (
        f'<dl class="facts" data-facts="run"><dt>model</dt><dd>{link(data["model"], model=data["model"])}</dd>'
        f"<dt>state</dt><dd>{_outcome_badge(run)} attempt {e(run.get('attempt'))}, backend run {e(data['backend_run_id'])}</dd>"
        f"<dt>why it started</dt><dd>{_why_started(run)}</dd>"
        + (f"<dt>requests</dt>{asked}" if asked else "")
        + f'<dt>verdict</dt><dd data-verdict="{e(verdict["verdict"])}"><b>{e(verdict["verdict"])}</b>'
        + (f" as v{e(data['version'])}" if data.get("version") else "")
        + f'<br><span class="reason">{e(verdict["reason"])}</span></dd><dt>figures</dt><dd>{figures}<br><span class="muted">{rules}</span></dd>'
        f'<dt>cost</dt><dd data-cost="gpu-hours">{hours}</dd>'
        f"<dt>timing</dt><dd>created {_when(run.get('created_at'))}, submitted {_when(run.get('submitted_at'))}, "
        f"finished {_when(run.get('finished_at'))}</dd></dl>"
    )
    curves = curve_plots(data["curves"], data["epochs"]) if data["curves"] else '<p class="muted">no metrics.json for this run here yet</p>'
    evaluation = data["evaluation"]
    if evaluation:
        per_class = bar_chart(evaluation["per_class_accuracy"], plot="per-class", title="accuracy per class", x_label="accuracy (recall)",
                              x_max=1.0)  # fmt: skip
        judged = (f"<h3>Per class, on this run's validation set ({e(evaluation['images'])} images, best epoch "
                  f"{e(evaluation['best_epoch'])})</h3><div class=\"grid\"><div>{per_class}</div><div>{confusion_table(evaluation)}</div></div>")  # fmt: skip
    else:
        judged = '<p class="muted">this run wrote no confusion matrix (its metrics.json is missing or from an older train.py)</p>'
    manifest = data["manifest"]
    if "error" in manifest:
        trained_on = f'<p class="muted">{e(manifest["error"])}</p>'
    else:
        splits = _table(
            ["split", *manifest["classes"]],
            ([e(split), *(e(per_class.get(c, 0)) for c in manifest["classes"])] for split, per_class in sorted(manifest["per_split"].items())),
            "no images",
            ' data-table="manifest"',
        )  # fmt: skip
        parent = (
            link(manifest["parent_run_id"], run=manifest["parent_run_id"])
            if manifest["parent_run_id"]
            else "nothing (no registered run before it)"
        )
        trained_on = (
            f"<p>{e(manifest['images'])} images, manifest {e(manifest['sha256'][:16])}… ({link('list them', run=run_id, images='all')})</p>{splits}"
            f'<p data-diff="parent">since {parent}: {link(str(manifest["added"]) + " added", run=run_id, images="added")}, '
            f"{link(str(manifest['removed']) + ' removed', run=run_id, images='removed')}</p>"
        )
    body = (
        f'<section data-run="{e(run_id)}"><h2>run {e(run_id)}</h2>{facts}</section>'
        f"<section><h2>Training curves</h2>{curves}{judged}</section>"
        f"<section><h2>What it trained on</h2>{trained_on}</section>"
    )
    return _document(f"retrain: {run_id}", body, data["generated_at"], _nav(models))


def render_listing(data: Mapping[str, Any], models: Iterable[str]) -> str:
    title = {"all": "every image", "added": "images added since", "removed": "images removed since"}[data["which"]]
    since = f" {e(data['parent_run_id'] or 'nothing')}" if data["which"] != "all" else ""
    rows = _table(["path", "label", "split"], ([e(i["path"]), e(i["label"]), e(i["split"])] for i in data["images"]), "none",
                  ' data-list="images"')  # fmt: skip
    more = (f'<p class="muted">the first {LISTED_IMAGES} of {data["total"]}: `retrain manifest {e(data["run_id"])}'
            f'{" --diff-parent" if data["which"] != "all" else ""}` lists them all</p>') if data["total"] > LISTED_IMAGES else ""  # fmt: skip
    body = f"<section><h2>{link(data['run_id'], run=data['run_id'])}: {title}{since} ({e(data['total'])})</h2>{more}{rows}</section>"
    return _document(f"retrain: {data['run_id']} images", body, data["generated_at"], _nav(models))


def _error_page(status: int, message: str, models: Iterable[str]) -> str:
    body = f'<section data-error="{status}"><h2>{status}</h2><p>{e(message)}</p></section>'
    return _document("retrain", body, dt.datetime.now(dt.UTC).isoformat(), _nav(models))


def respond(query: Mapping[str, str], store: Store, config: RetrainConfig, manifests: BlobStore | None = None) -> tuple[int, str, str]:
    """(status, content type, body) for a console URL's query: the overview; `model=NAME`; `run=ID`;
    `run=ID&images=all|added|removed`; any of them with `format=json` for the page's data."""
    models = sorted(config.models)

    def error(status: int, message: str) -> tuple[int, str, str]:
        if query.get("format") == "json":
            return status, "application/json", json.dumps({"error": message})
        return status, "text/html; charset=utf-8", _error_page(status, message, models)

    known = {"model", "run", "images", "format"}
    if set(query) - known or query.get("format", "html") not in ("html", "json") or ("images" in query and "run" not in query):
        return error(400, "this page takes ?model=NAME, ?run=ID, ?run=ID&images=all|added|removed (and format=json)")
    try:
        if "run" in query and "images" in query:
            data, render = listing_page(store, manifests, query["run"], query["images"]), render_listing
        elif "run" in query:
            data, render = run_page(store, config, manifests, query["run"]), render_run
        elif "model" in query:
            data, render = model_page(store, config, query["model"]), render_model
        else:
            data, render = overview(store, config), None
    except PageNotFoundError as exc:
        return error(404, str(exc))
    except ValueError as exc:
        return error(400, str(exc))
    if query.get("format") == "json":
        return 200, "application/json", json.dumps(data, default=str)
    return 200, "text/html; charset=utf-8", render_overview(data) if render is None else render(data, models)
