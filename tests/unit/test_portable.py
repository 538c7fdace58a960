"""Without POSIX-only modules (as on Windows): the worker core, the SQLite ledger, the CLI's read
commands and the Functions app import and run. The test blocks `fcntl` before anything
is imported, so the file locks take the portable path (filelock) for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = r"""
import sys

class NoFcntl:
    def find_spec(self, name, path=None, target=None):
        if name == "fcntl":
            raise ModuleNotFoundError("No module named 'fcntl' (blocked: the Windows path)")
        return None

sys.meta_path.insert(0, NoFcntl())
sys.modules.pop("fcntl", None)

import function_app  # the Functions app indexes
from shared.messages import ImageUploaded
from worker.adapters.local import file_lock
from worker.adapters.local.sqlite_store import SqliteStore
from worker.app.bootstrap import build_worker
from worker.config import load_config
from worker.views import status_view

assert file_lock._fcntl is None
state = sys.argv[1]
config = load_config(None, env={"RETRAIN__WORKER__STATE_DIR": state, "RETRAIN__WORKER__IMAGES_ROOT": state + "/images"})
worker = build_worker(config, store=SqliteStore(state + "/ledger.db"))
worker.handle(ImageUploaded.of("birds", "chicken/1.jpg", "e1", 10))
assert status_view(worker.store, config)["birds"]["pending"]["total"] == 1
sys.argv = ["retrain", "status", "--json"]
from worker.app.cli import main
try:
    main()
except SystemExit as exit:
    assert not exit.code, exit.code
print("fcntl" in sys.modules)
"""


def test_the_core_the_ledger_the_read_commands_and_the_app_run_without_fcntl(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRAIN")}
    env.update(PYTHONPATH=str(ROOT), RETRAIN__WORKER__STATE_DIR=str(tmp_path), RETRAIN__WORKER__IMAGES_ROOT=str(tmp_path / "images"))
    done = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"total": 1' in done.stdout
    assert done.stdout.strip().endswith("False")
