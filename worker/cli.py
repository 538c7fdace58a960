"""The `retrain` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Event-driven retraining worker for PyTorch image classifiers.")


@app.callback()
def _root() -> None:
    """Event-driven retraining worker for PyTorch image classifiers."""


@app.command()
def demo(
    workspace: Annotated[Path, typer.Option(help="where data, runs and outputs go")] = Path("retrain-demo"),
    per_class: Annotated[int, typer.Option(min=4, help="synthetic images per class")] = 120,
    epochs: Annotated[int, typer.Option(min=1, help="training epochs")] = 8,
    image_size: Annotated[int, typer.Option(min=16, help="training image size in pixels")] = 64,
    nproc: Annotated[int, typer.Option(min=1, help="DDP processes (torchrun --nproc_per_node)")] = 2,
) -> None:
    """Train on a synthetic set with 2-process DDP, export ONNX, check parity, show the results."""
    from rich.console import Console

    from worker.demo import DemoConfig, DemoError, run_demo
    from worker.demo_report import render_summary

    console = Console(highlight=False)
    cfg = DemoConfig(workspace=workspace, per_class=per_class, epochs=epochs, image_size=image_size, nproc=nproc)
    try:
        result = run_demo(cfg, echo=lambda line: console.print(line, markup=False))
    except DemoError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    render_summary(result, console)
    if not result.ok:
        raise typer.Exit(1)


def main() -> None:
    app()
