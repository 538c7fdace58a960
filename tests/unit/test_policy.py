"""The policy as a pure function: one table row per knob and situation."""

import datetime as dt

import pytest

from worker.config import ModelConfig
from worker.policy import Snapshot, decide
from worker.store import DataStats, ModelHead, PendingStats, RequestRow, RunRow

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
CFG = ModelConfig(min_new_images=10, min_per_class=3, quiet_period=60, max_wait=3600, cooldown=300)
ENOUGH_DATA = DataStats(train_per_class={"chicken": 8, "turkey": 8}, val_count=4)


def ago(seconds: float) -> dt.datetime:
    return NOW - dt.timedelta(seconds=seconds)


def pending(count: int, oldest: float = 600, newest: float = 120) -> PendingStats:
    return PendingStats(
        count=count, per_class={"chicken": count - count // 2, "turkey": count // 2}, oldest_at=ago(oldest), newest_at=ago(newest)
    )


def run(state: str = "running") -> RunRow:
    return RunRow(
        run_id="birds-0003-abcd1234",
        model="birds",
        seq=3,
        state=state,
        manifest_sha256="x",
        image_count=1,
        new_image_count=1,
        classes=[],
        created_at=ago(100),
    )


FORCE = RequestRow(request_id="req-1", model="birds", force=True, created_at=ago(5), requested_by="ops")


def snap(p=None, data=ENOUGH_DATA, head=None, in_flight=None, force=None) -> Snapshot:
    return Snapshot(pending=p or PendingStats(), data=data, head=head or ModelHead("birds"), in_flight=in_flight, force_request=force)


CASES = [
    # name, snapshot, config overrides, expected outcome, words in the reason
    ("nothing pending", snap(), {}, "idle", "no new images"),
    ("below the count", snap(pending(4)), {}, "wait", "4/10 new images"),
    ("count met but not quiet", snap(pending(12, newest=20)), {}, "wait", "quiet period"),
    ("count met and quiet", snap(pending(12, newest=61)), {}, "submit", "12/10 new images and quiet"),
    ("max wait overrides count", snap(pending(2, oldest=3601, newest=1)), {}, "submit", "has waited 60m01s"),
    ("max wait disabled", snap(pending(2, oldest=99999, newest=1)), {"max_wait": None}, "wait", "2/10 new images"),
    ("one class only", snap(pending(12), data=DataStats({"chicken": 20}, 5)), {}, "wait", "1/2 classes"),
    (
        "a class below min_per_class",
        snap(pending(12), data=DataStats({"chicken": 20, "turkey": 2}, 5)),
        {},
        "wait",
        "'turkey' has 2/3 training images",
    ),
    ("no validation images", snap(pending(12), data=DataStats({"chicken": 20, "turkey": 20}, 0)), {}, "wait", "validation split"),
    ("cooldown after a run", snap(pending(12), head=ModelHead("birds", last_run_finished_at=ago(100))), {}, "wait", "cooldown"),
    ("cooldown over", snap(pending(12), head=ModelHead("birds", last_run_finished_at=ago(301))), {}, "submit", "quiet"),
    ("force bypasses counts", snap(pending(1, newest=1), force=FORCE), {}, "submit", "forced by request req-1"),
    (
        "force bypasses cooldown",
        snap(pending(1), head=ModelHead("birds", last_run_finished_at=ago(5)), force=FORCE),
        {},
        "submit",
        "forced",
    ),
    ("force does not bypass missing data", snap(pending(1), data=DataStats({"chicken": 9}, 1), force=FORCE), {}, "wait", "classes"),
    ("force never bypasses single flight", snap(pending(1), in_flight=run(), force=FORCE), {}, "coalesce", "in flight"),
    ("in flight, nothing triggered", snap(pending(3), in_flight=run()), {}, "wait", "birds-0003-abcd1234 in flight"),
    ("in flight, threshold met: coalesce", snap(pending(12), in_flight=run("submitted")), {}, "coalesce", "one follow-up"),
    ("in flight, queue mode", snap(pending(12), in_flight=run()), {"in_flight": "queue"}, "coalesce", "queued behind"),
    ("in flight, drop mode", snap(pending(12), in_flight=run()), {"in_flight": "drop"}, "drop", "dropped"),
    ("a planned run counts as in flight", snap(pending(12), in_flight=run("planned")), {}, "coalesce", "planned"),
    (
        "coalesced follow-up runs after the run",
        snap(pending(2, newest=1), head=ModelHead("birds", followup_wanted=True)),
        {},
        "submit",
        "coalesced follow-up",
    ),
    (
        "coalesced follow-up still respects cooldown",
        snap(pending(2), head=ModelHead("birds", followup_wanted=True, last_run_finished_at=ago(10))),
        {},
        "wait",
        "cooldown",
    ),
    (
        "training on new images only counts pending per class",
        snap(pending(12), data=DataStats({}, 0)),
        {"training_data": "new"},
        "submit",
        "quiet",
    ),
]


@pytest.mark.parametrize(("name", "snapshot", "overrides", "outcome", "words"), CASES, ids=[c[0] for c in CASES])
def test_policy_decides(name, snapshot, overrides, outcome, words):
    decision = decide(snapshot, NOW, CFG.model_copy(update=overrides))
    assert decision.outcome == outcome
    assert words in decision.reason


def test_waiting_for_the_count_says_when_max_wait_will_fire():
    decision = decide(snap(pending(4, oldest=600)), NOW, CFG)
    assert decision.wake_at == ago(600) + dt.timedelta(seconds=3600)
    assert "12:50:00 UTC" in decision.reason


def test_the_quiet_period_wakes_when_it_ends():
    decision = decide(snap(pending(12, newest=20)), NOW, CFG)
    assert decision.wake_at == NOW + dt.timedelta(seconds=40)
