"""Renders the end-of-demo summary: what was trained, how well, how fast, and where the files are."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from worker.demo import DemoResult


def render_summary(result: DemoResult, console: Console) -> None:
    m, r = result.metrics, result.onnx_report
    chance = 1.0 / max(1, len(m.get("class_names", [])) or 2)
    table = Table(title="retrain demo", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row(
        "data", f"{m['num_train']} train / {m['num_val']} val images, classes {m['class_names']}, {m['skipped_images']} unreadable skipped"
    )
    table.add_row(
        "training",
        f"{m['distributed']} x{m['world_size']} ({m['backend']}) on {m['device']}, {len(m['history'])} epochs, {m['images_per_s']:.1f} img/s, data wait {100 * m['data_wait_fraction']:.1f}%",
    )
    table.add_row("accuracy", f"best val_acc {m['best_val_acc']:.3f} (epoch {m['best_epoch']}), chance {chance:.3f}")
    table.add_row(
        "onnx",
        f"opset {r['opset']}, {r['onnx_bytes'] / 1e6:.1f} MB, parity max |diff| {r['max_abs_diff']:.1e} (tolerance {r['tolerance']:g}) {'ok' if r['passed'] else 'FAILED'}",
    )
    table.add_row("inference", f"torch {r['torch_ms_per_image']} ms/img, onnxruntime {r['onnxruntime_ms_per_image']} ms/img")
    table.add_row("timings", ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in result.timings.items()))
    outputs = result.run_dir / "outputs"
    table.add_row(
        "files",
        f"{outputs / 'model.pt'}\n{outputs / 'model.onnx'}\n{outputs / 'metrics.json'}\n{outputs / 'onnx_report.json'}\n{result.run_dir / 'train.log'}",
    )
    table.add_row("data set", str(result.data_dir))
    console.print(table)
