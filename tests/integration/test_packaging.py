"""The built wheel holds the worker with its adapters and entry points, and none of the tests' fakes."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_ships_the_layers_and_no_fakes(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("retrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("tests/") or "fake" in n]
    for expected in ("worker/policy.py", "worker/adapters/local/sqlite_store.py", "worker/adapters/azure/table_store.py",
                     "worker/adapters/azure/azureml/v2.py", "worker/app/cli.py", "shared/run_ids.py", "functions/runtime.py"):  # fmt: skip
        assert expected in names
