"""CloudEvents ids are a function of what happened: the same fact twice has one id, different facts
never share one (the outbox, the broker's duplicate detection and consumers rely on it)."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest

from shared import events as ev
from tests.fakes.memory_store import MemoryStore
from worker.outbox import queue_event

pytestmark = pytest.mark.unit
AT = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)


def test_the_id_is_the_documented_digest_of_type_subject_and_discriminator():
    expected = "evt-" + hashlib.sha256(b"retrain.run.failed\x00runs/birds-0001-aaaaaaaa\x00a2").hexdigest()[:32]
    assert ev.event_id(ev.RUN_FAILED, "runs/birds-0001-aaaaaaaa", "a2") == expected
    event = ev.new_event(ev.RUN_FAILED, "runs/birds-0001-aaaaaaaa", {"x": 1}, time=AT, discriminator="a2")
    assert (event.id, event.source, event.type, event.subject) == (expected, "/retrain/worker", ev.RUN_FAILED, "runs/birds-0001-aaaaaaaa")
    assert ev.new_event(ev.RUN_FAILED, "runs/x", {}, time=AT).id == ev.event_id(ev.RUN_FAILED, "runs/x", "")


@pytest.mark.parametrize(
    "other",
    [(ev.MODEL_REJECTED, "runs/x", ""), (ev.RUN_FAILED, "runs/y", ""), (ev.RUN_FAILED, "runs/x", "2"), (ev.RUN_FAILED, "runs/x\x00", "")],
)
def test_different_facts_get_different_ids(other):
    assert ev.new_event(*other[:2], {}, time=AT, discriminator=other[2]).id != ev.new_event(ev.RUN_FAILED, "runs/x", {}, time=AT).id


def test_unknown_event_types_are_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown event type 'retrain\.run\.exploded'"):
        ev.new_event("retrain.run.exploded", "runs/x", {}, time=AT)


def test_the_outbox_keeps_the_discriminator_and_redacts_secrets_in_lists():
    store = MemoryStore()
    with store.transaction() as tx:
        for attempt in ("1", "2", "2"):
            queue_event(tx, ev.RUN_SUBMITTED, "runs/x", {"logs": ["ok", "AccountKey=c2VjcmV0c2VjcmV0c2VjcmV0"]}, AT, discriminator=attempt)
        tx.commit()
    events = list(store.all_events())
    assert len({e.event_id for e in events}) == 2  # attempts 1 and 2; the second "2" is the same fact
    assert events[0].event_id == ev.event_id(ev.RUN_SUBMITTED, "runs/x", "1")
    assert "c2VjcmV0" not in str(events[0].payload["data"]["logs"])
    assert events[0].payload["data"]["logs"][0] == "ok"


def test_without_a_discriminator_the_id_is_the_digest_with_an_empty_one_and_the_source_is_kept():
    import datetime as dt
    import hashlib

    from shared import events as ev

    digest = hashlib.sha256(f"{ev.RUN_FAILED}\x00runs/r1\x00".encode()).hexdigest()[:32]
    assert ev.event_id(ev.RUN_FAILED, "runs/r1") == f"evt-{digest}"
    at = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    event = ev.new_event(ev.RUN_FAILED, "runs/r1", {}, time=at, source="/retrain/test")
    assert (event.id, event.source) == (f"evt-{digest}", "/retrain/test")


def test_the_outbox_queues_an_event_without_a_discriminator_under_the_plain_id(tmp_path):
    import datetime as dt

    from shared import events as ev
    from tests.fakes.memory_store import MemoryStore
    from worker.outbox import queue_event

    store = MemoryStore()
    with store.transaction() as tx:
        queue_event(tx, ev.RUN_FAILED, "runs/r1", {"a": 1}, dt.datetime(2026, 11, 30, tzinfo=dt.UTC))
        tx.commit()
    [row] = store.unpublished_events()
    assert row.event_id == ev.event_id(ev.RUN_FAILED, "runs/r1", "")
