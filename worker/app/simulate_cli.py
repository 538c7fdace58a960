"""`retrain simulate`: reading the history, applying settings, running each configuration."""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from worker.config import ModelConfig, RetrainConfig
from worker.simulate import DurationModel, History, history_lines, ledger_history, load_history, simulate
from worker.store import Store


class SimulateError(ValueError):
    """Bad settings or an unreadable history; the message says which."""


MAX_CONFIGURATIONS = 1000  # one replay each


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise SimulateError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def configurations(base: ModelConfig, sets: list[str], grid: list[str]) -> list[tuple[str, ModelConfig]]:
    """The live configuration with --set applied, once per combination of --grid values."""
    fixed = dict(_pair(s) for s in sets)
    axes = [(key, [v.strip() for v in values.split(",") if v.strip()]) for key, values in map(_pair, grid)]
    for key, values in axes:
        if not values:
            raise SimulateError(f"--grid {key}= needs at least one value (e.g. {key}=10,50)")
    if math.prod(len(values) for _, values in axes) > MAX_CONFIGURATIONS:
        raise SimulateError(f"--grid makes more than {MAX_CONFIGURATIONS} configurations; narrow it")
    combos = list(itertools.product(*(values for _, values in axes))) or [()]
    found = []
    for combo in combos:
        changes = {**fixed, **{key: value for (key, _), value in zip(axes, combo, strict=True)}}
        unknown = sorted(set(changes) - set(ModelConfig.model_fields))
        if unknown:
            raise SimulateError(f"unknown setting {unknown[0]!r} (model settings: {', '.join(sorted(ModelConfig.model_fields))})")
        try:
            cfg = ModelConfig.model_validate({**base.model_dump(), **{k: (None if v.lower() == "none" else v) for k, v in changes.items()}})
        except ValidationError as exc:
            raise SimulateError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False))) from None
        label = ", ".join(f"{k}={v}" for k, v in changes.items()) or "live"
        found.append((label, cfg))
    return found


def run_simulation(
    config: RetrainConfig, model: str, open_store: Callable[[RetrainConfig], Store] | None, sets: list[str], grid: list[str],
    events: Path | None, export: Path | None, run_minutes: float | None, tick: float,
) -> dict[str, Any] | None:  # fmt: skip
    if not (math.isfinite(tick) and 1 <= tick <= 86400):
        raise SimulateError(f"--tick is the seconds between ticks, from 1 to 86400, not {tick}")
    if run_minutes is not None and not (math.isfinite(run_minutes) and 0 < run_minutes <= 366 * 24 * 60):
        raise SimulateError(f"--run-minutes is from 0 to a year of minutes, not {run_minutes}")
    if events is not None:
        try:
            history = load_history(events)
        except (OSError, ValueError) as exc:
            raise SimulateError(f"{events}: {exc}") from None
    else:
        assert open_store is not None
        history = ledger_history(open_store(config), model)
    if export is not None:
        _export(history, export)
        return None
    replaying_live = not sets and not grid
    if run_minutes is not None:
        durations = DurationModel("fixed", history.runs, minutes=run_minutes)
    else:
        durations = DurationModel("recorded" if replaying_live else "fitted", history.runs)
    results = []
    for label, cfg in configurations(config.model(model), sets, grid):
        result = simulate(history, cfg, tick_seconds=tick, durations=durations, gpus_per_run=config.gpus_per_run(model), label=label)
        results.append({**result.summary(), "simulated_runs": [r.as_dict() for r in result.runs]})
    return {
        "model": model, "arrivals": len(history.arrivals), "requests": len(history.requests), "recorded_runs": len(history.runs),
        "gpus_per_run": config.gpus_per_run(model), "tick_seconds": tick, "results": results,
    }  # fmt: skip


def _export(history: History, export: Path) -> None:
    if str(export) == "-":
        for line in history_lines(history):
            sys.stdout.write(line + "\n")
        return
    with open(export, "w", encoding="utf-8") as fh:
        for line in history_lines(history):
            fh.write(line + "\n")
