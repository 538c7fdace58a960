"""The policy as a pure function: one table row per knob and situation."""

import dataclasses
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


# --- boundaries and exact texts (each kills a mutant that survived `make mutate`) ---------------


def decide_with(s: Snapshot, **overrides):
    return decide(s, NOW, CFG.model_copy(update=overrides))


def test_exactly_the_threshold_is_enough_and_exactly_max_wait_is_long_enough():
    assert decide_with(snap(pending(10, newest=61))).outcome == "submit"
    assert decide_with(snap(pending(2, oldest=3600, newest=1))).outcome == "submit"
    assert decide_with(snap(pending(2, oldest=3599, newest=1))).outcome == "wait"


def test_a_cooldown_and_a_backoff_end_at_their_instant_not_after():
    head = ModelHead("birds", last_run_finished_at=ago(300))
    assert decide_with(snap(pending(12, newest=61), head=head)).outcome == "submit"
    assert decide_with(snap(pending(12, newest=61), head=ModelHead("birds", last_run_finished_at=ago(299)))).outcome == "wait"
    backoff = ModelHead("birds", failed_runs=3, backoff_until=NOW)
    assert decide_with(snap(pending(12, newest=61), head=backoff)).outcome == "submit"
    waiting = decide_with(snap(pending(12, newest=61), head=ModelHead("birds", failed_runs=3, backoff_until=NOW + dt.timedelta(seconds=1))))
    assert (waiting.outcome, waiting.wake_at) == ("wait", NOW + dt.timedelta(seconds=1))
    assert waiting.reason.startswith("backing off: 3 runs failed in a row; no new run before 12:00:01 UTC")


def test_nothing_pending_never_triggers_a_follow_up_even_with_max_wait_zero():
    assert decide_with(snap(in_flight=run()), max_wait=0).outcome == "wait"


def test_forced_is_carried_by_drop_coalesce_and_submit():
    assert decide_with(snap(in_flight=run(), force=FORCE), in_flight="drop").forced is True
    assert decide_with(snap(in_flight=run(), force=FORCE)).forced is True
    assert decide_with(snap(pending(1), force=FORCE)).forced is True
    assert decide_with(snap(pending(12, oldest=0, newest=0), in_flight=run())).forced is False


def test_the_reasons_read_exactly_as_documented():
    coalesce = decide_with(snap(pending(12), in_flight=run()))
    assert coalesce.reason == "run birds-0003-abcd1234 in flight (running): 12 new images, coalescing into one follow-up run"
    queued = decide_with(snap(in_flight=run(), force=FORCE), in_flight="queue")
    assert queued.reason == "run birds-0003-abcd1234 in flight (running): a forced request, queued behind it"
    short = decide_with(snap(pending(4), data=DataStats({"chicken": 20, "turkey": 2, "duck": 1}, 5), force=FORCE))
    assert short.reason == "waiting for data: class 'duck' has 1/3 training images (and 1 more classes) (a forced request is waiting too)"
    none = decide_with(snap(pending(4), data=DataStats({}, 0)))
    assert none.reason == "waiting: 4/10 new images; waiting for data: 0/2 classes have images (none)"
    max_wait = decide_with(snap(pending(2, oldest=7300, newest=1)), max_wait=7200)
    assert max_wait.reason == "the oldest of 2 new images has waited 2h01m (max_wait 2h00m)"


def test_the_quiet_period_wakes_at_the_earlier_of_its_end_and_max_wait():
    quiet = decide_with(snap(pending(12, oldest=3590, newest=20)))
    assert quiet.wake_at == ago(3590) + dt.timedelta(seconds=3600)  # max_wait comes first
    late = decide_with(snap(pending(12, oldest=100, newest=20)))
    assert late.wake_at == NOW + dt.timedelta(seconds=40)  # the quiet period ends first
    assert "the last 20s ago; waiting until 12:00:40 UTC" in late.reason


def test_without_an_arrival_time_the_quiet_period_counts_as_over():
    p = PendingStats(count=12, per_class={"chicken": 6, "turkey": 6}, oldest_at=None, newest_at=None)
    assert decide_with(snap(p)).outcome == "submit"


@pytest.mark.parametrize(("seconds", "text"), [(-5, "0s"), (0, "0s"), (119, "119s"), (120, "2m00s"), (7199, "119m59s"), (7200, "2h00m")])
def test_spans_are_written_for_people(seconds, text):
    from worker.policy import _span

    assert _span(seconds) == text


def test_cooldown_and_backoff_apply_only_when_something_waits():
    finished = ModelHead("birds", last_run_finished_at=ago(10))
    assert decide_with(snap(head=finished)).outcome == "idle"
    one = decide_with(snap(pending(1, oldest=20, newest=20), head=finished))
    assert (one.outcome, one.wake_at) == ("wait", ago(10) + dt.timedelta(seconds=300))
    assert one.reason == "cooldown after the last run until 12:04:50 UTC"
    backing = ModelHead("birds", failed_runs=3, backoff_until=NOW + dt.timedelta(hours=1))
    assert decide_with(snap(head=backing)).outcome == "idle"
    waiting = decide_with(snap(pending(1, oldest=20, newest=20), head=backing))
    assert waiting.reason == "backing off: 3 runs failed in a row; no new run before 13:00:00 UTC (a success or a forced request ends it)"


def test_one_image_past_max_wait_runs_and_a_wanted_follow_up_alone_coalesces():
    assert decide_with(snap(pending(1, oldest=3600, newest=3600))).outcome == "submit"
    assert decide_with(snap(in_flight=run(), head=ModelHead("birds", followup_wanted=True))).outcome == "coalesce"


def test_more_exact_texts():
    anonymous = RequestRow(request_id="req-2", model="birds", force=True, created_at=ago(5))
    assert decide_with(snap(pending(3), force=anonymous)).reason == "forced by request req-2 (unknown): 3 new images"
    assert decide_with(snap()).reason == "no new images"
    assert decide_with(snap(pending(4, oldest=600))).reason == "waiting: 4/10 new images; max_wait runs it at 12:50:00 UTC"
    assert decide_with(snap(pending(4)), max_wait=None).reason == "waiting: 4/10 new images"
    assert decide_with(snap(pending(2, oldest=1, newest=1)), max_wait=0).reason == "the oldest of 2 new images has waited 1s (max_wait 0s)"
    two = decide_with(snap(pending(12), data=DataStats({"chicken": 5, "turkey": 5}, 3)), min_classes=3)
    assert two.reason.endswith("waiting for data: 2/3 classes have images (chicken, turkey)")
    one_short = decide_with(snap(pending(12), data=DataStats({"chicken": 5, "turkey": 1}, 3)))
    assert one_short.reason == "waiting for data: class 'turkey' has 1/3 training images"
    no_val = decide_with(snap(pending(12, newest=61), data=DataStats({"chicken": 5, "turkey": 5}, 0)))
    assert no_val.reason == "waiting for data: no image falls in the validation split yet"
    assert decide_with(snap(pending(12, newest=61), data=DataStats({"chicken": 5, "turkey": 5}, 1))).outcome == "submit"


def test_without_max_wait_the_quiet_period_alone_sets_the_wake_up():
    d = decide_with(snap(pending(12, newest=20)), max_wait=None)
    assert (d.outcome, d.wake_at) == ("wait", NOW + dt.timedelta(seconds=40))


def test_times_are_shown_in_utc_whatever_the_input_zone():
    from worker.policy import _hms, _span

    assert _hms(dt.datetime(2026, 1, 1, 14, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))) == "12:00:00 UTC"
    assert _span(7260) == "2h01m"


def test_times_are_shown_in_utc_whatever_the_machines_zone(monkeypatch):
    import time

    from worker.policy import _hms

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert _hms(dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)) == "12:00:00 UTC"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_pause_recorded_without_who_or_when_still_reads_plainly():
    """A pause written by an older worker or by hand may lack its author and time."""
    decision = decide(snap(pending(12), head=ModelHead("birds", paused={})), NOW, CFG)
    assert (decision.outcome, decision.reason) == (
        "wait",
        "paused by unknown at ? UTC; 12 new images are counted, no run starts until resumed",
    )
    at = decide(snap(pending(12), head=ModelHead("birds", paused={"by": "ops", "at": "2026-01-01T11:00:00.123+00:00"})), NOW, CFG)
    assert at.reason.startswith("paused by ops at 2026-01-01 11:00:00 UTC; ")


# --- the GPU budget's verdicts, exactly ----
BUDGET = CFG.model_copy(update={"max_gpu_hours_per_day": 4.0})


def over_budget(p=None, head=None, force=None, used=4.0, frees_at=None) -> Snapshot:
    return dataclasses.replace(snap(p, head=head, force=force), gpu_hours_24h=used, budget_frees_at=frees_at)


def test_a_budget_used_to_its_exact_limit_holds_new_images_until_it_frees_up():
    decision = decide(over_budget(pending(12, newest=61), frees_at=NOW + dt.timedelta(hours=3)), NOW, BUDGET)
    assert (decision.outcome, decision.wake_at, decision.forced) == ("wait", NOW + dt.timedelta(hours=3), False)
    assert decision.reason == "GPU budget: 4.0 of 4 GPU-hours used in the last 24 h; it frees up at 15:00:00 UTC"
    assert decide(over_budget(pending(12, newest=61), used=3.99), NOW, BUDGET).outcome == "submit", "under the limit"


def test_the_budget_holds_a_single_image_and_a_coalesced_follow_up_but_says_nothing_when_idle():
    assert decide(over_budget(pending(1)), NOW, BUDGET).reason.startswith("GPU budget: ")
    follow_up = decide(over_budget(head=ModelHead("birds", followup_wanted=True)), NOW, BUDGET)
    assert follow_up.reason.startswith("GPU budget: ")
    assert decide(over_budget(), NOW, BUDGET) == decide(snap(), NOW, BUDGET), "nothing pending: idle, budget or not"


def test_a_forced_request_over_budget_waits_and_is_told_how_to_run_now():
    decision = decide(over_budget(pending(2), force=FORCE, used=5.5), NOW, BUDGET)
    assert (decision.outcome, decision.wake_at) == ("wait", None)  # a run in flight: no known time
    assert decision.reason == (
        "GPU budget: 5.5 of 4 GPU-hours used in the last 24 h (a forced request is waiting too; override_budget runs it now)"
    )
    override = dataclasses.replace(FORCE, override_budget=True)
    assert decide(over_budget(pending(2), force=override, used=5.5), NOW, BUDGET).outcome == "submit"


def test_a_pause_refuses_forced_requests_as_forced_and_names_its_reason():
    paused = ModelHead("birds", paused={"by": "ops", "at": "2026-01-01T11:00:00+00:00", "reason": "label audit"})
    dropped = decide(snap(pending(2), head=paused, force=FORCE), NOW, CFG)
    assert (dropped.outcome, dropped.forced) == ("drop", True)
    assert (
        dropped.reason == "paused by ops at 2026-01-01 11:00:00 UTC: label audit; forced requests are refused while paused (resume first)"
    )


def test_a_pause_outranks_a_run_in_flight_no_follow_up_is_coalesced_and_no_forced_request_queued():
    """While paused, a run in flight finishes but nothing is lined up behind it: neither images past
    the threshold nor a forced request become a follow-up that would start the moment it is resumed."""
    paused = ModelHead("birds", paused={"by": "ops", "at": "2026-01-01T11:00:00+00:00"})
    busy = decide(snap(pending(12), in_flight=run(), head=paused), NOW, CFG)
    assert (busy.outcome, busy.forced) == ("wait", False)
    assert busy.reason.startswith("paused by ops")
    forced = decide(snap(pending(12), in_flight=run(), head=paused, force=FORCE), NOW, CFG)
    assert (forced.outcome, forced.forced) == ("drop", True)
    assert "forced requests are refused while paused" in forced.reason
    queued = decide(snap(pending(12), in_flight=run(), head=paused), NOW, CFG.model_copy(update={"in_flight": "queue"}))
    assert queued.outcome == "wait"
