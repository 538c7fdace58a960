"""What a Function App deployment gets: the files a publish uploads, the packages Azure installs,
and app settings that are valid as written."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from publish_contents import problems, uploaded  # noqa: E402


def test_a_publish_uploads_the_app_and_nothing_else():
    files = uploaded(ROOT)
    assert problems(files) == []
    assert {f.split("/")[0] for f in files} == {
        "function_app.py",
        "host.json",
        "requirements.txt",
        "functions",
        "worker",
        "shared",
        "training",
    }


def test_state_folders_secrets_tests_and_node_modules_left_in_the_tree_are_not_uploaded(tmp_path):
    shutil.copy(ROOT / ".funcignore", tmp_path / ".funcignore")
    junk = ["tests/unit/test_x.py", "node_modules/azurite/x.js", ".retrain/ledger.db", "retrain-demo/ws/.retrain/runs/a/model.pt",
            "local.settings.json", "images/birds/chicken/1.jpg", "mutants/worker/bus.py", "worker/__pycache__/bus.cpython-311.pyc",
            "training/outputs/model.pt", "training/mlruns/0/meta.yaml", ".venv/bin/python", "ledger.db"]  # fmt: skip
    app = [
        "function_app.py",
        "host.json",
        "requirements.txt",
        "functions/runtime.py",
        "worker/bus.py",
        "shared/messages.py",
        "training/train.py",
    ]
    for name in junk + app:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert uploaded(tmp_path) == sorted(app)
    (tmp_path / ".funcignore").write_text("")  # without the ignore file, the check says what would go
    assert any("tests/" in p for p in problems(uploaded(tmp_path)))
    assert any("local.settings.json" in p for p in problems(uploaded(tmp_path)))


def test_azure_installs_only_what_the_app_imports():
    wanted = {re.split(r"[=<>\[]", line)[0].strip().lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}  # fmt: skip
    for cli_or_training in ("typer", "rich", "torch", "torchvision", "onnx", "onnxruntime", "mlflow-skinny", "pytest"):
        assert cli_or_training not in wanted
    assert {"azure-functions", "azure-servicebus", "azure-identity", "pydantic", "tenacity", "azure-ai-ml"} <= wanted


def test_the_example_settings_are_valid_app_settings_that_configure_the_worker():
    from worker.app.bootstrap import check_azureml_settings
    from worker.config import load_config

    document = json.loads((ROOT / "local.settings.json.example").read_text())
    assert set(document) == {"IsEncrypted", "Values"}
    values = document["Values"]
    for name, value in values.items():
        assert re.fullmatch(r"[A-Za-z0-9_.]+", name), f"{name} cannot be an app setting name"
        assert isinstance(value, str)
    if "RETRAIN_CONFIG" in values:
        assert (ROOT / values["RETRAIN_CONFIG"]).is_file()
    config = load_config(None, env=values)  # the overrides in it parse and validate
    assert (config.worker.store, config.worker.backend, config.azureml.sdk) == ("table", "azureml", "v2")
    assert config.models["birds"].min_new_images == 200
    check_azureml_settings(config.azureml, values)


def test_overrides_reach_a_model_whose_name_has_a_hyphen(tmp_path):
    from worker.config import load_config

    path = tmp_path / "retrain.toml"
    path.write_text("[models.bird-cam]\nmin_new_images = 5\n")
    config = load_config(path, env={"RETRAIN__MODELS__BIRD_CAM__MIN_NEW_IMAGES": "7"})
    assert set(config.models) == {"bird-cam"}
    assert config.models["bird-cam"].min_new_images == 7


@pytest.mark.parametrize("command", [["status"], ["explain"], ["models"], ["status", "birds", "--json"]])
def test_read_commands_in_an_empty_folder_create_nothing_and_say_where_they_looked(tmp_path, command):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRAIN")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "worker", *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith(f"error: no ledger at {tmp_path.resolve() / '.retrain' / 'ledger.db'}")
    assert list(tmp_path.iterdir()) == []


def test_a_table_ledger_without_its_setting_is_one_line_and_exit_2(tmp_path):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRAIN")}
    env.update(PYTHONPATH=str(ROOT), RETRAIN__WORKER__STORE="table")
    done = subprocess.run([sys.executable, "-m", "worker", "status"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        "error: worker.store = 'table' needs RETRAIN_TABLES or RETRAIN_TABLES__tableServiceUri"
    ]
