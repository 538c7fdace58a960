"""FakeTrainingBackend behaves like a backend where callers rely on it, and is steerable where tests need it."""

from __future__ import annotations

import pytest

from tests.fakes.backend import FakeTrainingBackend
from worker.ports import RunSpec, TrainingBackend

pytestmark = pytest.mark.unit


def spec(run_id: str) -> RunSpec:
    return RunSpec(backend_run_id=run_id, model="birds", manifest={"images": []}, data_dir="/data")


def test_it_is_a_training_backend():
    assert isinstance(FakeTrainingBackend(), TrainingBackend)


def test_submit_starts_a_run_and_a_second_submit_of_the_id_returns_it():
    backend = FakeTrainingBackend()
    first = backend.submit(spec("r1"))
    assert first.state == "queued"
    backend.finish("r1", "running")
    assert backend.submit(spec("r1")).state == "running"
    assert list(backend.runs) == ["r1"]
    assert backend.specs["r1"] == spec("r1")


def test_every_call_is_recorded_in_order():
    backend = FakeTrainingBackend(start_state="running")
    backend.submit(spec("r1"))
    backend.status("r1")
    backend.cancel("r1")
    backend.status("other")
    assert backend.calls == [("submit", "r1"), ("status", "r1"), ("cancel", "r1"), ("status", "other")]
    assert backend.calls_to("status") == ["r1", "other"]


def test_finish_sets_the_state_outputs_and_detail_a_caller_then_sees():
    backend = FakeTrainingBackend()
    backend.submit(spec("r1"))
    backend.finish("r1", "succeeded", outputs_dir="/runs/r1/outputs")
    st = backend.status("r1")
    assert (st.state, st.outputs_dir, st.terminal) == ("succeeded", "/runs/r1/outputs", True)
    backend.submit(spec("r2"))
    assert backend.finish("r2", "failed", detail="exit code 2").detail == "exit code 2"


def test_finish_of_an_id_never_submitted_is_a_test_bug():
    with pytest.raises(KeyError):
        FakeTrainingBackend().finish("nope", "succeeded")


def test_unknown_ids_are_unknown_and_cancel_changes_nothing_for_them_or_finished_runs():
    backend = FakeTrainingBackend()
    assert backend.status("nope").state == "unknown"
    assert backend.cancel("nope").state == "unknown"
    assert "nope" not in backend.runs
    backend.submit(spec("done"))
    backend.finish("done", "succeeded", outputs_dir="/o")
    assert backend.cancel("done").state == "succeeded"


def test_cancel_of_an_active_run_makes_it_canceled():
    backend = FakeTrainingBackend(start_state="running")
    backend.submit(spec("r1"))
    assert backend.cancel("r1").state == "canceled"
    assert backend.status("r1").state == "canceled"


def test_failing_submits_raise_the_given_error_then_recover():
    backend = FakeTrainingBackend()
    backend.fail_next_submit(ConnectionError("service unavailable"), times=2)
    for _ in range(2):
        with pytest.raises(ConnectionError, match="service unavailable"):
            backend.submit(spec("r1"))
    assert backend.status("r1").state == "unknown"  # a failed submit starts nothing
    assert backend.submit(spec("r1")).state == "queued"
    assert backend.calls_to("submit") == ["r1", "r1", "r1"]
