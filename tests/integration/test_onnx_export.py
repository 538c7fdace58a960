"""export_onnx.py on a really trained model: checker, parity with onnxruntime, dynamic batch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.conftest import TRAINING, child_env, run_train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tiny_birds, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-model")
    proc = run_train(
        [
            "--data_dir",
            str(tiny_birds),
            "--output_dir",
            str(out),
            "--num_epochs",
            "1",
            "--image_size",
            "48",
            "--batch_size",
            "8",
            "--workers",
            "0",
            "--weights",
            "none",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    return out


def _export(trained, tiny_birds, *extra):
    cmd = [sys.executable, str(TRAINING / "export_onnx.py"), "--model", str(trained / "model.pt"), "--data_dir", str(tiny_birds), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=child_env(), check=False)


def test_export_matches_pytorch_on_validation_images_and_takes_any_batch_size(trained, tiny_birds):
    proc = _export(trained, tiny_birds)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((trained / "onnx_report.json").read_text())
    assert report["passed"] is True
    assert report["max_abs_diff"] < 1e-4
    assert report["parity_inputs"] == "validation images"
    assert report["argmax_agreement"] == 1.0
    assert report["exporter"].startswith("torchscript")
    model = onnx.load(str(trained / "model.onnx"))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["class_names"]) == ["chicken", "turkey"]
    assert meta["image_size"] == "48"
    # An independent check: onnxruntime and PyTorch (loaded here, not by the exporter) agree on new inputs.
    import torch

    from export_onnx import Normalized
    from modelio import load_checkpoint, model_from_checkpoint

    checkpoint = load_checkpoint(trained / "model.pt")
    norm = checkpoint["normalization"]
    reference = Normalized(model_from_checkpoint(checkpoint), norm["mean"], norm["std"]).eval()
    images = np.random.default_rng(0).random((3, 3, 48, 48), dtype=np.float32)
    session = ort.InferenceSession(str(trained / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": images})[0]
    with torch.inference_mode():
        expected = reference(torch.from_numpy(images)).numpy()
    assert logits.shape == (3, 2)
    assert np.abs(logits - expected).max() < 1e-4


def test_an_onnx_model_that_computes_something_else_fails_parity_with_exit_3(trained, tiny_birds, tmp_path, monkeypatch, capsys):
    """The parity check must compare onnxruntime's logits with PyTorch's: here the exported graph
    is tampered with (the classifier's weights negated) and the real tolerance must catch it."""
    import export_onnx

    real_export = export_onnx.export

    def export_then_tamper(model, example, output, opset, metadata):
        real_export(model, example, output, opset, metadata)
        graph = onnx.load(str(output))
        [classifier] = [t for t in graph.graph.initializer if list(t.dims)[:1] == [2] and len(t.dims) == 2]
        weights = onnx.numpy_helper.to_array(classifier)
        classifier.CopyFrom(onnx.numpy_helper.from_array(-weights, classifier.name))
        onnx.save(graph, str(output))

    monkeypatch.setattr(export_onnx, "export", export_then_tamper)
    report_path = tmp_path / "report.json"
    args = ["--model", str(trained / "model.pt"), "--data_dir", str(tiny_birds), "--output", str(tmp_path / "m.onnx")]
    code = export_onnx.main([*args, "--report", str(report_path)])  # the default tolerance, 1e-4
    assert code == 3
    assert "FAILED" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["passed"] is False
    assert report["max_abs_diff"] > 1e-2
    assert report["mean_abs_diff"] > 1e-2  # over the whole batch, not only the single-image check
    assert report["argmax_agreement"] < 0.5  # negated logits: the predicted class flips


def test_two_exports_into_one_folder_at_once_each_write_a_whole_model(tmp_path, monkeypatch):
    """Two completions of one run may export into the run's outputs folder at the same moment:
    here the second export runs entirely while the first has written only its temporary graph."""
    import torch

    import export_onnx

    model, example = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2)).eval(), torch.rand(1, 3, 4, 4)
    real_onnx_export, nested = torch.onnx.export, []

    def export_then_let_the_other_run(*args, **kwargs):
        real_onnx_export(*args, **kwargs)
        if not nested:
            nested.append(True)
            export_onnx.export(model, example, tmp_path / "model.onnx", 17, {"by": "second"})

    monkeypatch.setattr(torch.onnx, "export", export_then_let_the_other_run)
    export_onnx.export(model, example, tmp_path / "model.onnx", 17, {"by": "first"})
    graph = onnx.load(str(tmp_path / "model.onnx"))
    assert {p.key: p.value for p in graph.metadata_props} == {"by": "first"}
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": example.numpy()})[0].shape == (1, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"], "no temporary file left"


def test_a_missing_model_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(TRAINING / "export_onnx.py"), "--model", str(tmp_path / "none.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        check=False,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


@pytest.mark.parametrize("kind", ["subprocess", "in_process"])
def test_the_worker_exporters_report_parity_for_a_trained_model(trained, tiny_birds, tmp_path, kind):
    import shutil
    from pathlib import Path

    from worker.adapters.local.onnx_exporter import InProcessOnnxExporter, LocalOnnxExporter

    exporter = LocalOnnxExporter() if kind == "subprocess" else InProcessOnnxExporter()
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained / "model.pt", out / "model.pt")
    result = exporter.export(Path(out / "model.pt"), out, data_dir=str(tiny_birds), manifest=None, tolerance=2e-3, samples=4)
    assert result.passed
    assert result.report["max_abs_diff"] < 1e-4
    assert (result.report["tolerance"], result.report["samples"]) == (2e-3, 4)  # the configured values, not the defaults
    assert result.onnx_path.exists()
    # A tolerance below the measured difference fails the export: the value reaches the check itself.
    strict = exporter.export(Path(out / "model.pt"), out, data_dir=str(tiny_birds), manifest=None, tolerance=1e-12, samples=8)
    assert strict.report["max_abs_diff"] > 1e-12
    assert strict.passed is False
    assert strict.report["tolerance"] == 1e-12


def test_the_subprocess_exporter_turns_a_broken_model_into_an_export_error(tmp_path):
    from worker.adapters.local.onnx_exporter import LocalOnnxExporter
    from worker.ports import ExportError

    (tmp_path / "model.pt").write_bytes(b"garbage")
    with pytest.raises(ExportError, match="exited 2"):
        LocalOnnxExporter().export(tmp_path / "model.pt", tmp_path, data_dir=None, manifest=None, tolerance=1e-4, samples=4)
