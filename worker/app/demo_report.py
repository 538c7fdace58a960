"""Renders the end-of-demo summary: runs, models, events, timings and where the files are."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.table import Table

from worker.app.demo import DemoResult


def _f(value: Any, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def render_summary(result: DemoResult, console: Console) -> None:
    runs = Table(title="runs", title_justify="left")
    for column in (
        "run",
        "images (new)",
        "outcome",
        "best_val_acc",
        "baseline (champion)",
        "skipped",
        "ranks",
        "train s",
        "img/s",
        "ONNX |diff|",
    ):
        runs.add_column(column)
    for r in result.runs:
        runs.add_row(
            r["run_id"], f"{r['images']} ({r['new_images']})", r["outcome"] or r["state"], _f(r["best_val_acc"]), _f(r["baseline_val_acc"]),
            str(r["skipped_images"]), str(r["world_size"]), _f(r["train_s"], ".1f"), _f(r["images_per_s"], ".0f"), _f(r["onnx_max_abs_diff"], ".1e"),
        )  # fmt: skip
    console.print(runs)
    models = Table(title=f"models: birds, champion v{result.models.get('champion')}", title_justify="left")
    for column in ("version", "best_val_acc", "baseline", "images", "parent", "run"):
        models.add_column(column)
    for v in result.models.get("versions", []):
        models.add_row(
            f"{v['version']}{' *' if v['champion'] else ''}",
            _f(v["best_val_acc"]),
            _f(v["baseline_val_acc"]),
            str(v["images"]),
            str(v["parent_version"] or "-"),
            v["run_id"],
        )
    console.print(models)
    counts = Counter(e["type"] for e in result.events)
    files = Table(title="where things are", title_justify="left", show_header=False)
    files.add_row("champion ONNX", str(result.models.get("champion_onnx")))
    files.add_row("registry", str(result.state_dir / "registry" / "birds"))
    files.add_row("ledger", str(result.state_dir / "ledger.db"))
    files.add_row("manifests", str(result.state_dir / "manifests"))
    files.add_row("runs (logs, outputs)", str(result.state_dir / "runs"))
    files.add_row("events", f"{result.state_dir / 'events.jsonl'}: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())))
    files.add_row("configuration", str(result.config_file))
    files.add_row("demo time", f"{result.seconds:.0f}s")
    console.print(files)
    console.print(
        f"Look at it:  retrain runs -c {result.config_file}   retrain dashboard -c {result.config_file}   "
        f"retrain simulate birds --tick 1 -c {result.config_file}",
        soft_wrap=True,
        markup=False,
    )  # fmt: skip: one line to copy
    console.print(
        "Load the champion:  onnxruntime.InferenceSession(champion ONNX).run(['logits'], {'image': x})  # x: float32 RGB in [0, 1], NCHW"
    )
