"""The rules every ledger shares (worker/store.py): when a delivery is stale, what state an image
version is in, and how a backfill is registered in bounded, retried chunks."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from tests.fakes.commit_faults import CommitFaults, conflicts
from worker.store import IMAGES_PER_COMMIT, ConcurrencyConflict, ImageRow, image_state, is_stale

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def _at(seconds: float | None) -> dt.datetime | None:
    return None if seconds is None else T0 + dt.timedelta(seconds=seconds)


def _row(occurred: float | None, first_seen: float | None, path: str = "chicken/a.jpg", etag: str = "e") -> ImageRow:
    return ImageRow("birds", path, etag, "chicken", "train", occurred_at=_at(occurred), first_seen_at=_at(first_seen))


@pytest.mark.parametrize(
    ("mine", "newest", "stale"),
    [
        ((5, 100), (10, 0), True),  # written before the newest version: its source time decides, not arrival
        ((10, 100), (10, 0), False),  # the same instant is not older
        ((11, 0), (10, 100), False),
        ((None, 5), (None, 10), True),  # no source times: arrival order
        ((None, 10), (None, 10), False),
        ((None, 5), (10, 0), True),  # mine has no source time: my arrival against its source time
        ((5, 0), (None, 10), True),  # it has no source time: my source time against its arrival
        ((None, None), (10, 10), False),  # nothing to compare: never stale
        ((5, 5), (None, None), False),
    ],
)
def test_a_delivery_is_stale_only_when_written_strictly_before_the_newest_known_version(mine, newest, stale):
    assert is_stale(_row(*mine), _at(newest[0]), _at(newest[1])) is stale


@pytest.mark.parametrize(
    ("latest", "seq", "trained", "flying", "state"),
    [
        (False, 1, 0, None, "superseded"),
        (False, 1, 5, 9, "superseded"),
        (True, 5, 5, None, "trained"),  # the watermark itself is trained
        (True, 6, 5, None, "pending"),
        (True, 6, 5, 6, "in_run"),  # the in-flight watermark itself is in the run
        (True, 7, 5, 6, "pending"),
        (True, 3, 5, 6, "trained"),
    ],
)
def test_an_image_versions_state_follows_from_the_watermarks(latest, seq, trained, flying, state):
    assert image_state(latest, seq, trained, flying) == state


def test_a_backfill_is_registered_in_chunks_of_images_per_commit_and_counts_only_new_images(store, monkeypatch):
    rows = [_row(None, 0, path=f"chicken/{i}.jpg") for i in range(2 * IMAGES_PER_COMMIT + 4)]
    store.stage_images([*rows[:3], _row(10, 0, path="chicken/rewritten.jpg", etag="v2")])  # known already
    rows.append(_row(5, 0, path="chicken/rewritten.jpg", etag="v1"))  # an older write, delivered late: stale
    commits = CommitFaults.in_place(store, conflicts(0), monkeypatch).committed
    assert store.stage_images(rows) == len(rows) - 3 - 1, "neither duplicates nor stale versions are new"
    assert len(commits) == 3  # 20 + 20 + 5
    with store.transaction() as tx:
        assert tx.image_watermark("birds") == 4 + len(rows) - 3  # stale versions are recorded too (not as latest)


def test_a_chunk_that_loses_a_race_is_retried_whole_and_nothing_is_counted_twice(store, monkeypatch):
    rows = [_row(None, 0, path=f"chicken/{i}.jpg") for i in range(IMAGES_PER_COMMIT + 1)]
    commits = CommitFaults.in_place(store, conflicts({1}), monkeypatch).committed
    assert store.stage_images(rows) == len(rows)
    assert commits == [2, 3]
    with store.transaction() as tx:
        assert tx.image_watermark("birds") == len(rows)


def test_a_chunk_that_loses_every_race_gives_up_after_40_attempts_raising_the_conflict(store, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)  # tenacity sleeps through time.sleep
    faults = CommitFaults.in_place(store, conflicts(200), monkeypatch)
    with pytest.raises(ConcurrencyConflict):
        store.stage_images([_row(None, 0)])
    assert (faults.attempts, faults.committed) == (40, [])
    assert len(waits) == 39
    assert all(0 <= w <= 0.25 for w in waits)
    assert waits[0] <= 0.005
    assert max(waits) > 0.05, "it backs off"
