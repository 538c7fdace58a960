"""The worker and completion behaviour suites, unchanged, against the Azure ML adapter: the real
`AzureMLBackend` with the SDK v2 job builder behind the fake seam."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
SUITES = [
    "test_worker.py",
    "test_completion.py",
    "test_worker_properties.py",
    "test_steering.py",
    "test_run_transitions.py",
    "test_handler_effects.py",
]


@pytest.mark.skipif(os.environ.get("RETRAIN_TEST_BACKEND") == "azureml-v2", reason="already the Azure ML run")
def test_the_behaviour_suites_pass_with_the_azure_ml_v2_backend():
    env = {**os.environ, "RETRAIN_TEST_BACKEND": "azureml-v2"}
    done = subprocess.run(
        # the ledgers of the unit run (the Azurite cases test the ledger, not the backend), and not the
        # tests that reach into the outputs folder of the fake backend (the Azure ML one downloads elsewhere)
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not integration and not fake_backend_outputs",
         *(str(ROOT / "tests" / "unit" / s) for s in SUITES)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:]
    assert " passed" in done.stdout.splitlines()[-1]
