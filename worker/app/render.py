"""How the command line shows a view as text: tables and lines, every string from outside made
printable for a terminal and inert in rich's markup (`--json` output is escaped by JSON itself)."""

from __future__ import annotations

from typing import Any

from typer import echo


def plain(view: Any, markup: bool = True) -> Any:
    """A view with every string made printable for a terminal (escape sequences, C1 controls, bidi
    overrides and newlines from outside become visible escapes: shared.redact.printable) and, with
    `markup`, inert in rich's markup (for tables). For text renderings only: --json output is
    escaped by JSON itself."""
    from rich.markup import escape

    from shared.redact import printable

    if isinstance(view, str):
        return escape(printable(view)) if markup else printable(view)
    if isinstance(view, dict):
        return {plain(k, markup) if isinstance(k, str) else k: plain(v, markup) for k, v in view.items()}
    if isinstance(view, list | tuple):
        return [plain(v, markup) for v in view]
    return view


def status(view: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for name, s in plain(view).items():
        table = Table(title=f"model {name}", title_justify="left", show_header=False)
        table.add_row(
            "pending", f"{s['pending']['total']} new images " + (str(s["pending"]["per_class"]) if s["pending"]["per_class"] else "")
        )
        table.add_row("images", ", ".join(f"{k} {v}" for k, v in s["images_by_state"].items()) or "none")
        table.add_row("champion", f"v{s['champion']}" if s["champion"] else "none yet")
        table.add_row("in flight", ", ".join(f"{r['run_id']} ({r['state']}, attempt {r['attempt']})" for r in s["in_flight"]) or "none")
        for r in s["last_runs"]:
            table.add_row(
                "run",
                f"{r['run_id']} {r['state']}{'/' + r['outcome'] if r['outcome'] else ''} {r['images']} images ({r['new_images']} new) {r['created_at'][:19]}",
            )
        if s["last_decision"]:
            table.add_row("decision", f"{s['last_decision']['outcome']}: {s['last_decision']['reason']}")
        wake = f" (until {s['next']['wake_at'][:19]})" if s["next"]["wake_at"] else ""
        table.add_row("now", f"{s['next']['outcome']}: {s['next']['reason']}{wake}")
        console.print(table)


def explain(view: dict[str, Any]) -> None:
    for name, decisions in plain(view, markup=False).items():
        echo(f"{name}:")
        for d in decisions or []:
            asked = f" (asked: {d['request_reason']})" if d.get("request_reason") else ""
            echo(f"  {d['at'][:19]}  {d['outcome']:<8} {d['reason']}{asked}")
        if not decisions:
            echo("  no decisions yet")


def models(view: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    for name, info in plain(view).items():
        table = Table(
            title=f"{name}: champion v{info['champion']}" if info["champion"] else f"{name}: no champion yet", title_justify="left"
        )
        for column in ("version", "best_val_acc", "baseline", "images", "parent", "run", "registered"):
            table.add_column(column)
        for v in info["versions"]:
            acc = f"{v['best_val_acc']:.4f}" if v["best_val_acc"] is not None else "-"
            base = f"{v['baseline_val_acc']:.4f}" if v["baseline_val_acc"] is not None else "-"
            table.add_row(
                f"{v['version']}{' *' if v['champion'] else ''}",
                acc,
                base,
                str(v["images"]),
                str(v["parent_version"] or "-"),
                v["run_id"],
                v["created_at"][:19],
            )
        Console().print(table)
        if info["champion_onnx"]:
            echo(f"champion ONNX: {info['champion_onnx']}")
        for r in plain(view[name]["rejected"], markup=False):
            echo(f"rejected by the gate: {r['run_id']} ({(r['finished_at'] or '')[:19]}): {r['reason']}")


def runs(view: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    for name, rows in plain(view).items():
        table = Table(title=f"runs of {name}", title_justify="left")
        for column in ("run", "state", "outcome", "images (new)", "duration", "best_val_acc", "why it started", "how it ended"):
            table.add_column(column)
        for r in rows:
            duration = f"{r['duration_s']:.0f}s" if r["duration_s"] is not None else ""
            acc = f"{r['best_val_acc']:.3f}" if isinstance(r.get("best_val_acc"), int | float) else ""
            started = "; ".join([r["reason"] or "", *(f"asked: {why}" for why in r.get("request_reasons", []))]).strip("; ")
            ended = r["detail"] if r["outcome"] not in (None, "registered", "succeeded") else ""  # the gate's or the failure's reason
            table.add_row(r["run_id"], r["state"], r["outcome"] or "", f"{r['images']} ({r['new_images']})", duration, acc, started, ended)
        Console(highlight=False).print(table)


def manifest(view: dict[str, Any], diff_parent: bool) -> None:
    view = plain(view, markup=False)
    echo(f"{view['run_id']}: {view['images']} images, manifest {view['manifest_sha256'][:12]}")
    for split, per_class in sorted(view["per_split"].items()):
        echo(f"  {split}: " + ", ".join(f"{label} {n}" for label, n in sorted(per_class.items())))
    if diff_parent:
        echo(
            f"since {view['parent_run_id'] or 'nothing (no registered run before it)'}: {len(view['added'])} added, {len(view['removed'])} removed"
        )
        for sign, key in (("+", "added"), ("-", "removed")):
            for image in view[key]:
                echo(f"  {sign} {image['path']} ({image['label']}, {image['split']})")
        return
    for image in view["paths"]:
        echo(f"  {image['path']} ({image['label']}, {image['split']})")


def audit(view: dict[str, Any]) -> None:
    for name, rows in plain(view, markup=False).items():
        echo(f"{name}:")
        for r in rows:
            what = r["action"] + (f" v{r['version']}" if r.get("version") else "")
            checked = "verified" if r["verified"] else "claimed"
            why = f": {r['reason']}" if r["reason"] else ""
            echo(f"  {r['at'][:19]}  {what:<11} by {r['actor']} via {r['door']} ({checked}){why}")
        if not rows:
            echo("  nothing yet")


def simulation(report: dict[str, Any], model: str, show_runs: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model}: {report['arrivals']} arrivals, {report['requests']} forced requests, {report['recorded_runs']} recorded runs",
                  title_justify="left")  # fmt: skip
    table.add_column("")
    for result in report["results"]:
        table.add_column(result["config"], justify="right")
    rows = [("runs", "runs"), ("GPU-hours", "gpu_hours"), ("images per run", "images_per_run")]
    for title, key in rows:
        table.add_row(title, *(str(r[key]) for r in report["results"]))
    for title, key in [("staleness median (h)", "median"), ("staleness p95 (h)", "p95"), ("staleness max (h)", "max")]:
        table.add_row(title, *("n/a" if r["staleness_hours"][key] is None else str(r["staleness_hours"][key]) for r in report["results"]))
    table.add_row("images never trained", *(str(r["images_never_trained"]) for r in report["results"]))
    table.add_row("runs in flight at the end", *(str(r["in_flight_at_end"]) for r in report["results"]))
    console = Console(highlight=False)
    console.print(table)
    ended = report["results"][0]["ended_at"] if report["results"] else None
    console.print(f"replayed until {ended[:19].replace('T', ' ')} UTC (the record's end)" if ended else "replayed until a tick after the last event",
                  markup=False)  # fmt: skip
    for result in report["results"]:
        for warning in result["warnings"]:
            echo(f"warning: {result['config']}: {warning}", err=True)
    console.print(f"run durations: {report['results'][0]['durations']}; GPUs per run: {report['gpus_per_run']}")
    for result in report["results"]:
        shown = result["simulated_runs"][:show_runs]
        if shown:
            console.print(f"[bold]{result['config']}[/bold]: first {len(shown)} of {result['runs']} runs")
            for r in shown:
                console.print(f"  {r['planned_at'][:16]}  {r['images']:>7} images ({r['new_images']} new)  {r['minutes']:>6} min  {r['reason']}",
                              markup=False)  # fmt: skip
