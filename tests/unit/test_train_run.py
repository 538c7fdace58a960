"""train.run in-process on a tiny set: who writes, what is written, and how bad input ends."""

import json

import pytest
import torch

from topology import Topology
from train import main, parse_args, run

pytestmark = pytest.mark.unit

TINY = ["--num_epochs", "1", "--image_size", "32", "--batch_size", "8", "--workers", "0", "--weights", "none"]


def test_rank_zero_writes_model_and_metrics_atomically(tiny_birds, tmp_path):
    out = tmp_path / "out"
    metrics = run(parse_args(["--data_dir", str(tiny_birds), "--output_dir", str(out), *TINY]), Topology(kind="none"))
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt"]  # no temp files left
    written = json.loads((out / "metrics.json").read_text())
    assert written["best_val_acc"] == metrics["best_val_acc"]
    assert written["skipped_images"] == 2
    assert len(written["skipped_examples"]) == 2
    assert written["model_sha256"]
    checkpoint = torch.load(out / "model.pt", weights_only=True)
    assert checkpoint["metrics"]["best_val_acc"] == metrics["best_val_acc"]
    assert checkpoint["manifest_sha256"] == written["manifest_sha256"]
    assert_confusion_matches_accuracy(written)


def assert_confusion_matches_accuracy(metrics):
    """The best epoch's confusion matrix covers every validation image once and agrees with its accuracy."""
    confusion, names = metrics["confusion_matrix"], metrics["class_names"]
    assert len(confusion) == len(names)
    assert all(len(row) == len(names) for row in confusion)
    assert sum(map(sum, confusion)) == metrics["num_val"]
    diagonal = sum(confusion[i][i] for i in range(len(names)))
    assert diagonal / metrics["num_val"] == pytest.approx(metrics["best_val_acc"])
    for i, name in enumerate(names):
        row = confusion[i]
        assert metrics["per_class_val_acc"][name] == (pytest.approx(row[i] / sum(row)) if sum(row) else None)


def test_other_ranks_write_nothing(tiny_birds, tmp_path):
    out = tmp_path / "out"
    topo = Topology(kind="none", rank=1, world_size=2)  # collectives stay local; this process is rank 1
    run(parse_args(["--data_dir", str(tiny_birds), "--output_dir", str(out), *TINY]), topo)
    assert not out.exists()


def test_an_empty_data_dir_exits_2_with_a_message(tmp_path, capsys):
    assert main(["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "o"), *TINY]) == 2
    assert "no class folders" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_corrupt_init_checkpoint_exits_2_with_a_message(tiny_birds, tmp_path, capsys):
    bad = tmp_path / "champion.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["--data_dir", str(tiny_birds), "--init_checkpoint", str(bad), "--output_dir", str(tmp_path / "o"), *TINY]) == 2
    assert "cannot be loaded" in capsys.readouterr().err


def test_ddp_without_a_launcher_exits_2_and_says_how_to_launch(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--distributed", "ddp", "--data_dir", str(tmp_path)]) == 2
    assert "torchrun" in capsys.readouterr().err


def test_a_manifest_restricts_training_to_exactly_its_images(tiny_birds, tmp_path):
    from manifests import dump_manifest, scan_image_folder

    scanned = scan_image_folder(tiny_birds)
    chosen = [r for r in scanned.images if "corrupt" not in r.path][::2]
    doc = dump_manifest(list(scanned.classes), chosen)
    (tmp_path / "m.json").write_text(json.dumps(doc))
    metrics = run(
        parse_args(["--data_dir", str(tiny_birds), "--manifest", str(tmp_path / "m.json"), "--output_dir", str(tmp_path / "o"), *TINY]),
        Topology(kind="none"),
    )
    assert metrics["manifest_sha256"] == doc["sha256"]
    assert metrics["num_train"] + metrics["num_val"] == len(chosen)
    assert metrics["skipped_images"] == 0


def test_export_onnx_writes_a_checked_model_before_metrics(tiny_birds, tmp_path):
    out = tmp_path / "out"
    metrics = run(parse_args(["--data_dir", str(tiny_birds), "--output_dir", str(out), "--export_onnx", *TINY]), Topology(kind="none"))
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.onnx", "model.pt", "onnx_report.json"]
    report = json.loads((out / "onnx_report.json").read_text())
    assert report["passed"] is True
    assert report["model_sha256"] == metrics["model_sha256"]
    assert json.loads((out / "metrics.json").read_text())["onnx"]["onnx_sha256"] == report["onnx_sha256"]


def test_progress_draws_a_bar_on_a_terminal_and_plain_lines_otherwise(monkeypatch, caplog):
    import io
    import logging
    import sys

    from train import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = Progress(enabled=True, total_epochs=3)
    bar.step(epoch=1, step=5, steps=10, images_per_s=42.0, loss=0.5)
    assert "epoch 1/3 [############............] 5/10" in terminal.getvalue()
    assert "loss 0.5000" in terminal.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    lines = Progress(enabled=True, total_epochs=3)
    lines.step(epoch=1, step=5, steps=10, images_per_s=42.0, loss=0.5)
    assert sys.stderr.getvalue() == ""  # no bar in a log file
    row = {
        "epoch": 1,
        "train_loss": 0.5,
        "train_acc": 0.8,
        "val_loss": 0.4,
        "val_acc": 0.9,
        "lr": 0.001,
        "seconds": 1.0,
        "images_per_s": 42.0,
        "data_wait_fraction": 0.01,
    }
    with caplog.at_level(logging.INFO, logger="train"):
        lines.epoch_done(row)
    assert "epoch 1/3 train_loss=0.5000" in caplog.text


def test_training_refuses_a_manifest_other_than_the_one_the_run_was_frozen_with(tiny_birds, tmp_path):
    import json

    from manifests import DataError, dump_manifest, scan_image_folder

    scanned = scan_image_folder(tiny_birds)
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(dump_manifest(list(scanned.classes), list(scanned.images))))
    args = [
        "--data_dir",
        str(tiny_birds),
        "--output_dir",
        str(tmp_path / "out"),
        "--manifest",
        str(path),
        "--manifest_sha256",
        "0" * 64,
        *TINY,
    ]
    with pytest.raises(DataError, match="not the manifest the run was planned with"):
        run(parse_args(args), Topology(kind="none"))
    assert not (tmp_path / "out").exists()


def test_an_export_in_the_run_checks_parity_at_the_tolerance_and_samples_it_is_given(tiny_birds, tmp_path):
    out = tmp_path / "out"
    args = [
        "--data_dir",
        str(tiny_birds),
        "--output_dir",
        str(out),
        "--export_onnx",
        "--onnx_tolerance",
        "1e-12",
        "--onnx_samples",
        "3",
        *TINY,
    ]
    metrics = run(parse_args(args), Topology(kind="none"))
    report = json.loads((out / "onnx_report.json").read_text())
    assert (report["tolerance"], report["samples"]) == (1e-12, 3)
    assert metrics["onnx"]["tolerance"] == 1e-12
    assert report["passed"] is (report["max_abs_diff"] <= 1e-12)


def test_every_phase_and_every_step_reports_progress_to_the_watchdog(tiny_birds, tmp_path):
    """The watchdog only sees a stall if progress is reported as it happens: each screened image,
    each training step, each evaluation batch, and the phases between them."""
    from stall_watchdog import Watchdog

    class Recording(Watchdog):
        def __init__(self) -> None:
            super().__init__(0)  # off: only the reports are kept
            self.phases: list[str] = []
            self.beats: list[str] = []

        def phase(self, name: str) -> None:
            super().phase(name)
            self.phases.append(name)

        def beat(self, where: str = "") -> None:
            super().beat(where)
            self.beats.append(f"{self.current_phase}: {where}")

    dog = Recording()
    args = ["--data_dir", str(tiny_birds), "--output_dir", str(tmp_path / "out"), *TINY, "--num_epochs", "2"]
    run(parse_args(args), Topology(kind="none"), dog)
    for phase in (
        "screening images",
        "training, epoch 1",
        "evaluation, epoch 1",
        "training, epoch 2",
        "evaluation, epoch 2",
        "writing the outputs",
    ):
        assert phase in dog.phases, phase
    for beat in ("screening images: image 1 of", "training, epoch 2: step 1/", "training, epoch 2: waiting for batch 1 of",
                 "evaluation, epoch 2: batch 1", "training, epoch 1: summing the epoch over the ranks"):  # fmt: skip
        assert any(b.startswith(beat) for b in dog.beats), beat
