"""The run-id format, in one place: `<model>-<seq:04d>-<sha8>` names a run, `<run id>-a<attempt>` one
attempt of it at the training backend (a retry is a new backend run over the same manifest).

The model is the name before the sequence number; the sha8 is the start of the manifest's
sha256. Backends use the attempt id as the job name (Azure ML allows letters, digits, '-' and
'_'), so ids from other systems (Event Grid sends every run in the workspace) are told apart
by `parse_backend_run_id` returning None.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_MODEL = r"(?P<model>[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)"  # shared.messages.MODEL_NAME_PATTERN
_RUN = _MODEL + r"-(?P<seq>\d{4,})-(?P<sha8>[0-9a-f]{8})"
RUN_ID = re.compile(rf"^{_RUN}$")
BACKEND_RUN_ID = re.compile(rf"^(?P<run_id>{_RUN})-a(?P<attempt>\d{{1,6}})$")


class BackendRunId(NamedTuple):
    run_id: str
    model: str
    attempt: int


def make_run_id(model: str, seq: int, manifest_sha256: str) -> str:
    return f"{model}-{seq:04d}-{manifest_sha256[:8]}"


def make_backend_run_id(run_id: str, attempt: int) -> str:
    return f"{run_id}-a{attempt}"


def model_of(run_id: str) -> str | None:
    """The model a run id names, or None for an id retrain did not make."""
    match = RUN_ID.match(run_id)
    return match["model"] if match else None


def seq_of(run_id: str) -> int | None:
    """The sequence number a run id carries (unique per model), or None for an id retrain did not make."""
    match = RUN_ID.match(run_id)
    return int(match["seq"]) if match else None


def parse_backend_run_id(backend_run_id: str) -> BackendRunId | None:
    """`<run_id>-a<attempt>` -> (run_id, model, attempt); None for ids retrain did not make."""
    match = BACKEND_RUN_ID.match(backend_run_id)
    if not match:
        return None
    return BackendRunId(match["run_id"], match["model"], int(match["attempt"]))
