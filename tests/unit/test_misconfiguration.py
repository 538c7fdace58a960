"""Every configuration or credential problem met at run time is one line on stderr naming the
setting and the fix; the traceback only with --debug; secrets never shown."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

SECRET = "c2VjcmV0c2VjcmV0c2VjcmV0"


def retrain(tmp_path, *args: str, **settings: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RETRAIN", "AZURE_"))}
    env.update({"PYTHONPATH": str(ROOT), "RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"),
                "RETRAIN__WORKER__IMAGES_ROOT": str(tmp_path / "images"), **settings})  # fmt: skip
    (tmp_path / "images" / "birds").mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path, check=False
    )


CASES = [
    pytest.param(("status",), {"RETRAIN__WORKER__STORE": "table", "RETRAIN_TABLES": f"AccountKey={SECRET};garbage"}, 2,
                 ["RETRAIN_TABLES is not a usable connection string", "set RETRAIN_TABLES__tableServiceUri instead"], id="malformed-tables"),
    pytest.param(("status",), {"RETRAIN__WORKER__STORE": "table", "RETRAIN_TABLES__tableServiceUri": "https://nosuchaccount.table.core.windows.net"},
                 1, ["Azure sign-in failed for RETRAIN_TABLES__tableServiceUri", "az login"], id="no-credential"),
    pytest.param(("status",), {"RETRAIN__WORKER__STORE": "table",
                               "RETRAIN_TABLES": f"DefaultEndpointsProtocol=https;AccountName=nosuchaccount;AccountKey={SECRET}"},
                 1, ["cannot reach Azure", "check RETRAIN_TABLES:", "account or namespace name"], id="unknown-account"),
    pytest.param(("serve", "--cycles", "1"), {"RETRAIN__WORKER__STATE_DIR": "/proc/retrain/state"}, 1,
                 ["cannot use /proc/retrain", "RETRAIN__WORKER__STATE_DIR", "choose a folder this user can write"], id="unwritable-state"),
    pytest.param(("serve", "--cycles", "1"), {"RETRAIN__WORKER__BACKEND": "azureml"}, 2,
                 ["needs azureml.subscription_id, azureml.resource_group, azureml.workspace_name"], id="azureml-without-workspace"),
    pytest.param(("status",), {"RETRAIN__MODELS__BRDS__MIN_NEW_IMAGES": "5"}, 2,
                 ["RETRAIN__MODELS__BRDS__MIN_NEW_IMAGES: no model 'brds' is configured", "RETRAIN_MODELS=birds,brds"], id="unknown-model"),
    pytest.param(("inject", "birds", "--force", "--to", "servicebus"),
                 {"RETRAIN_REQUESTS_QUEUE": "requests", "RETRAIN_SERVICEBUS": f"SharedAccessKey={SECRET}"}, 2,
                 ["RETRAIN_SERVICEBUS is not a usable connection string", "RETRAIN_SERVICEBUS__fullyQualifiedNamespace"], id="malformed-servicebus"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "settings", "status", "words"), CASES)
def test_a_misconfiguration_is_one_line_naming_the_setting_and_the_fix(tmp_path, args, settings, status, words):
    done = retrain(tmp_path, *args, **settings)
    lines = [line for line in done.stderr.splitlines() if line.strip() and "retrain.serve" not in line]
    assert done.returncode == status, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0]
    assert SECRET not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_debug_shows_the_traceback(tmp_path):
    done = retrain(tmp_path, "--debug", "serve", "--cycles", "1", RETRAIN__WORKER__STATE_DIR="/proc/retrain/state")
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr


def test_serve_refuses_a_backend_whose_packages_are_missing_and_names_the_install(tmp_path, monkeypatch):
    """A plain `pipx install .` accepted `serve` with the local backend; every run then failed on
    `No module named 'torch'`, retried, silent in serve's log."""
    import importlib.util

    from worker.app.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "onnxruntime") else real(name, *a))
    env = {
        "RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"),
        "RETRAIN__WORKER__IMAGES_ROOT": str(tmp_path / "images"),
        "RETRAIN_CONFIG": "",
    }
    for command in (["serve", "--cycles", "1", "--create-folders"], ["inject", "birds", "--force"]):
        result = CliRunner().invoke(app, command, env=env)
        assert result.exit_code == 2, result.output
        assert (
            "worker.backend = 'local' needs torch (pip install 'retrain[train]'); onnxruntime (pip install 'retrain[train]')"
            in result.output
        )
    assert not (tmp_path / "state").exists()  # refused before anything was written


def test_the_packages_each_configuration_needs():
    from worker.app.diagnose import missing_dependencies
    from worker.config import load_config

    def needs(env):
        import importlib.util

        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None  # nothing installed
        try:
            return [m.split(" ")[0] for m in missing_dependencies(load_config(None, env=env), env)]
        finally:
            importlib.util.find_spec = real

    assert needs({}) == ["torch", "torchvision", "numpy", "PIL", "onnx", "onnxruntime"]
    assert needs({"RETRAIN__WORKER__TRACKING": "mlflow", "RETRAIN__MODELS__BIRDS__TRAINING__DISTRIBUTED": "horovod"})[-3:] == [
        "horovod",
        "mlflow",
        "sqlalchemy",
    ]
    assert needs({"RETRAIN__WORKER__BACKEND": "azureml", "RETRAIN__WORKER__STORE": "table", "RETRAIN_STORAGE": "x"}) == [
        "azure.ai.ml", "azure.identity", "azure.data.tables", "azure.storage.blob"]  # fmt: skip
    assert needs({"RETRAIN__WORKER__BACKEND": "azureml", "RETRAIN__AZUREML__SDK": "v1"}) == ["azureml.core", "azure.identity"]
