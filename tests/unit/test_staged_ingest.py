"""The bus on a staged-ingest ledger (the Table ledger's scale-out path), here on the in-memory fake
with the same staging: an image is one idempotent write, evaluations are throttled per instance and
best effort, and the tick folds everything that waits."""

from __future__ import annotations

import datetime as dt

import pytest

from shared.messages import ImageUploaded, RetrainRequested
from tests.fakes.commit_faults import CommitFaults, conflicts
from tests.fakes.harness import make_harness
from tests.fakes.memory_store import StagedMemoryStore
from worker import ingest as ingest_module

pytestmark = pytest.mark.unit


def _image(i: int, model: str = "birds") -> ImageUploaded:
    return ImageUploaded.of(model, f"{('chicken', 'turkey')[i % 2]}/{i:04d}.jpg", "e1", 10)


def _counts(store, model: str = "birds") -> dict[str, int]:
    with store.transaction() as tx:
        return tx.count_images(model)


@pytest.fixture
def staged():
    return StagedMemoryStore()


def test_an_image_is_staged_and_the_first_delivery_in_an_interval_evaluates(staged, tmp_path):
    h = make_harness(tmp_path, store=staged, evaluate_interval=3600)
    first = h.worker.handle(_image(0))
    assert (first.outcome, first.detail) == ("ok", "staged chicken/0000.jpg and evaluated")
    assert _counts(staged) == {"pending": 1}, "the evaluation folded it in"
    assert h.decisions(1)[0].message_id == _image(0).message_id, "the decision names the message that caused it"
    second = h.worker.handle(_image(1))
    assert (second.outcome, second.detail) == ("staged", "staged turkey/0001.jpg")
    assert _counts(staged) == {"pending": 1, "staged": 1}, "within the interval: staged, not evaluated"


def test_with_no_interval_every_delivery_evaluates(staged, tmp_path):
    h = make_harness(tmp_path, store=staged, evaluate_interval=0)
    for i in range(3):
        assert h.worker.handle(_image(i)).detail.endswith("and evaluated")
    assert _counts(staged) == {"pending": 3}


def test_the_interval_is_kept_per_model(staged, tmp_path):
    h = make_harness(tmp_path, store=staged, evaluate_interval=3600)
    h.worker.config.models["cats"] = h.worker.config.models["birds"]
    assert h.worker.handle(_image(0)).detail.endswith("and evaluated")
    assert h.worker.handle(_image(1, model="cats")).detail.endswith("and evaluated"), "another model's evaluation is its own"


def test_a_version_staged_before_is_a_duplicate_with_the_reason(staged, tmp_path):
    h = make_harness(tmp_path, store=staged, evaluate_interval=3600)
    h.worker.handle(_image(0))
    h.worker.handle(_image(1))  # staged, not folded
    for i in (0, 1):
        again = h.worker.handle(_image(i))
        assert (again.outcome, again.detail) == ("duplicate", f"{_image(i).path} (e1) is already known")


def test_a_delivery_that_finds_another_evaluating_in_this_instance_only_stages(staged, tmp_path):
    h = make_harness(tmp_path, store=staged)
    with h.worker._evaluating:  # another delivery of this instance is evaluating now
        effects = h.worker.handle(_image(0))
    assert (effects.outcome, effects.detail) == ("staged", "staged chicken/0000.jpg")
    assert _counts(staged) == {"staged": 1}
    assert h.worker.handle(_image(1)).detail.endswith("and evaluated"), "the lock is not kept"


def test_an_evaluation_that_loses_the_race_is_tried_once_and_the_image_stays_staged(staged, tmp_path):
    h = make_harness(tmp_path, store=staged)
    h.worker.store = faults = CommitFaults(staged, conflicts(1))
    effects = h.worker.handle(_image(0))
    assert (effects.outcome, effects.detail) == ("staged", "staged chicken/0000.jpg")
    assert faults.attempts == 1, "best effort: another instance's evaluation (or the tick) folds it"
    assert h.worker.handle(_image(1)).detail.endswith("and evaluated")
    assert _counts(staged) == {"pending": 2}


def test_the_tick_folds_a_backlog_bigger_than_one_fold_in_bounded_commits(staged, tmp_path):
    h = make_harness(tmp_path, store=staged, evaluate_interval=3600, min_new_images=10_000)
    for i in range(150):
        h.worker.handle(_image(i))
    assert _counts(staged) == {"pending": 1, "staged": 149}
    h.worker.tick()
    assert _counts(staged) == {"pending": 150}
    assert "150/10000 new images" in h.decisions(1)[0].reason


def test_a_tick_folds_at_most_its_rounds_and_leaves_the_rest_for_the_next(staged, tmp_path, monkeypatch):
    monkeypatch.setattr(ingest_module, "DRAIN_ROUNDS", 2)
    h = make_harness(tmp_path, store=staged, evaluate_interval=3600, min_new_images=10_000)
    for i in range(151):
        h.worker.handle(_image(i))
    h.worker.tick()  # two folds of 30 by the drain, one more by the tick's own evaluation
    assert _counts(staged) == {"pending": 91, "staged": 60}
    h.worker.tick()
    assert _counts(staged) == {"pending": 151}


def test_a_tick_for_one_model_folds_only_that_models_arrivals(staged, tmp_path):
    h = make_harness(tmp_path, store=staged, evaluate_interval=3600, min_new_images=10_000)
    h.worker.config.models["cats"] = h.worker.config.models["birds"]
    for model in ("birds", "cats"):
        for i in range(3):
            h.worker.handle(_image(i, model=model))
    h.worker.tick(model="birds")
    assert (_counts(staged), _counts(staged, "cats")) == ({"pending": 3}, {"pending": 1, "staged": 2})
    h.worker.tick()
    assert _counts(staged, "cats") == {"pending": 3}


def test_a_backfill_is_folded_at_once_so_its_own_evaluation_sees_it(staged, tmp_path):
    h = make_harness(tmp_path, store=staged, evaluate_interval=3600, min_new_images=10_000)
    for i in range(75):  # more than two folds: the evaluation's own fold would not see them all
        h.blobs.blobs[_image(i).path] = b"x"
    effects = h.worker.handle(RetrainRequested(message_id="bf-1", model="birds", prefix="", force=True))
    assert _counts(staged) == {"in_run": 75}, "every backfilled image is in the run it planned"
    assert len(effects.planned_runs) == 1
    again = h.worker.handle(RetrainRequested(message_id="bf-1", model="birds", prefix="", force=True))
    assert (again.outcome, again.detail) == ("duplicate", "bf-1 was already processed")


def test_a_staged_image_whose_evaluation_plans_a_run_submits_it_after_the_commit(staged, tmp_path):
    h = make_harness(tmp_path, store=staged, quiet_period=0)
    planning = next(effects for effects in map(h.worker.handle, map(_image, range(40))) if effects.planned_runs)
    [run] = h.runs()
    assert planning.planned_runs == [run.run_id]
    assert planning.detail.endswith(" and evaluated")
    assert run.state == "submitted", "submitted by the delivery that planned it, not left for a tick"


def test_the_interval_is_measured_on_this_instances_monotonic_clock_from_its_first_evaluation(staged, tmp_path, monkeypatch):
    now = [10.0]  # a host that booted ten seconds ago: the first delivery still evaluates
    monkeypatch.setattr(ingest_module.time, "monotonic", lambda: now[0])
    h = make_harness(tmp_path, store=staged, evaluate_interval=60)
    assert h.worker.handle(_image(0)).detail.endswith("and evaluated")
    now[0] = 69.999
    assert h.worker.handle(_image(1)).outcome == "staged"
    now[0] = 70.0
    assert h.worker.handle(_image(2)).detail.endswith("and evaluated"), "the interval ends at its instant, not after"


def test_a_staged_image_keeps_its_size_source_and_write_time(staged, tmp_path):
    h = make_harness(tmp_path, store=staged)
    written = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)
    h.worker.handle(ImageUploaded.of("birds", "chicken/a.jpg", "e1", 4321, source="blob", occurred_at=written))
    with staged.transaction() as tx:
        [image] = tx.image_arrivals("birds")
    assert (image.size, image.source, image.occurred_at, image.first_seen_at) == (4321, "blob", written, h.clock.now())
