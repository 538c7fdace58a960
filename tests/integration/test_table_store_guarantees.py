"""What only the Table Storage ledger has to prove: every commit is one entity group transaction
(at most 100 operations, one partition) however many images a backfill or a run holds; a crash
between a backfill's chunks is finished by the redelivery; a slow concurrent writer or reader
cannot corrupt state; several processes crossing the threshold at once make one run."""

from __future__ import annotations

import datetime as dt
import random
import subprocess
import sys
import uuid

import pytest

from tests.conftest import ROOT, child_env
from tests.fakes.harness import make_harness
from worker.adapters.azure.table_store import TableStore
from worker.store import ConcurrencyConflict, DecisionRow

pytestmark = pytest.mark.integration


@pytest.fixture
def store(azurite):
    s = TableStore.from_connection_string(azurite.connection_string, f"t{uuid.uuid4().hex[:16]}")
    yield s
    s.table.delete_table()
    s.close()


class BatchRecorder:
    """Wraps the real TableClient's submit_transaction to record every batch sent."""

    def __init__(self, store):
        self.sizes: list[int] = []
        self.partitions: list[set[str]] = []
        inner = store.table.submit_transaction

        def submit(ops, **kwargs):
            self.sizes.append(len(ops))
            self.partitions.append({op[1]["PartitionKey"] for op in ops})
            return inner(ops, **kwargs)

        store.table.submit_transaction = submit


def test_a_backfill_and_a_run_over_thousands_of_images_commit_one_bounded_batch_at_a_time(store, tmp_path):
    batches = BatchRecorder(store)
    h = make_harness(tmp_path, store=store, min_new_images=10_000)
    for i in range(1200):
        h.blobs.blobs[f"{'chicken' if i % 2 else 'turkey'}/b{i:04d}.jpg"] = b"%d" % i
    assert h.request(prefix="").detail == "registered 1200 images"
    with store.transaction() as tx:
        assert tx.pending_stats("birds").count == 1200
    planned_at = len(batches.sizes)
    h.request(force=True)
    [run] = h.runs()
    assert (run.image_count, run.new_image_count) == (1200, 1200)
    assert batches.sizes[planned_at:], "the plan was committed"
    assert max(batches.sizes[planned_at:]) <= 10, "planning a run writes a few records, not one per image"
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"in_run": 1200}
    assert len(h.manifest(run)) == 1200
    h.succeed(run, best=0.9)
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"trained": 1200}
    assert max(batches.sizes) <= 100
    assert all(len(p) == 1 for p in batches.partitions), "a batch holds one partition"
    assert not list(store.query("PartitionKey eq @pk and RowKey ge 'jr|' and RowKey lt 'jr}'", {"pk": "birds"})), "no journal"


def test_the_adapter_refuses_a_commit_that_does_not_fit_one_batch(store, tmp_path):
    from worker.store import CommitTooLargeError, ImageRow

    with store.transaction() as tx:
        for i in range(30):  # 2 entities per image: 60 operations, fine
            tx.add_image(ImageRow(model="birds", path=f"chicken/{i}.jpg", etag="e", label="chicken", split="train", first_seen_at=None))
        tx.commit()
    with store.transaction() as tx:
        for i in range(60):  # 120 operations: more than one entity group transaction holds
            tx.add_image(ImageRow(model="birds", path=f"turkey/{i}.jpg", etag="e", label="turkey", split="train", first_seen_at=None))
        with pytest.raises(CommitTooLargeError):
            tx.commit()
    with store.transaction() as tx:
        tx.claim_message("m1", "x", "birds", dt.datetime.now(dt.UTC))
        tx.claim_message("m2", "x", None, dt.datetime.now(dt.UTC))  # another partition
        with pytest.raises(CommitTooLargeError, match="partitions"):
            tx.commit()
    with store.transaction() as tx:
        assert tx.image_watermark("birds") == 30, "nothing of the refused commits landed"


def test_a_crash_part_way_through_a_backfill_is_finished_by_the_redelivery(store, tmp_path, monkeypatch):
    h = make_harness(tmp_path, store=store, min_new_images=10_000)
    for i in range(120):
        h.blobs.blobs[f"{'chicken' if i % 2 else 'turkey'}/c{i:04d}.jpg"] = b"%d" % i
    real = store.stage_images

    def crash(rows):
        real(rows[:60])
        raise RuntimeError("process killed part-way through the backfill")

    monkeypatch.setattr(store, "stage_images", crash)
    with pytest.raises(RuntimeError, match="killed"):
        h.request(prefix="", message_id="bf-crash", force=True)
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"staged": 60}, "the first 60 arrived"
        assert tx.open_requests("birds") == [], "the request itself did not"
    monkeypatch.setattr(store, "stage_images", real)
    effects = h.request(prefix="", message_id="bf-crash", force=True)  # the redelivery
    assert effects.detail == "registered 60 images"  # the other 60 were already there
    assert h.request(prefix="", message_id="bf-crash", force=True).outcome == "duplicate"
    [run] = h.runs()
    assert run.new_image_count == 120


def test_a_slow_writer_cannot_overwrite_newer_state_and_a_slow_reader_writes_nothing(store, tmp_path):
    h = make_harness(tmp_path, store=store, min_new_images=10_000)
    for i in range(150):
        h.blobs.blobs[f"{'chicken' if i % 2 else 'turkey'}/s{i:04d}.jpg"] = b"%d" % i
    h.request(prefix="")
    with store.transaction() as reader:
        before = reader.count_images("birds")  # a reader that began before the run was planned ...
        with store.transaction() as slow:
            slow.model_head("birds")
            slow.pending_stats("birds")  # ... and a writer that read the same state
            h.request(force=True)  # meanwhile the run over all 150 images commits
            slow.record_decision(DecisionRow(model="birds", at=h.clock.now(), outcome="wait", reason="from a stale view"))
            with pytest.raises(ConcurrencyConflict):
                slow.commit()
        reader.commit()  # a reader has nothing to apply: reads never write
    assert before == {"pending": 150}
    [run] = h.runs()
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"in_run": 150}
        assert tx.pending_stats("birds").count == 0
    h.succeed(run, best=0.9)
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"trained": 150}


def test_four_processes_on_one_table_count_each_image_once_and_make_one_run(azurite, tmp_path):
    table = f"t{uuid.uuid4().hex[:16]}"
    rng = random.Random(3)
    unique = 70
    universe = [(f"{'chicken' if i % 2 else 'turkey'}/{i:05d}.jpg", f"e{i}") for i in range(4 * unique)]
    files = []
    for p in range(4):
        events = universe[p * unique : (p + 1) * unique] + rng.choices(universe, k=30)  # 30% duplicates, across processes
        rng.shuffle(events)
        path = tmp_path / f"events-{p}.txt"
        path.write_text("\n".join(f"{a} {b}" for a, b in events))
        files.append(path)
    env = child_env(PYTHONPATH=str(ROOT), RETRAIN_TABLE_CONNECTION=azurite.connection_string)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.integration.ledger_client", f"table:{table}", str(tmp_path / "state"), str(p), str(f), "200"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p, f in enumerate(files)
    ]
    results = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [r[1][-2000:] for r in results]
    store = TableStore.from_connection_string(azurite.connection_string, table)
    with store.transaction() as tx:
        counts = tx.count_images("birds")
        runs = tx.runs("birds")
    assert sum(counts.values()) == len(universe)
    assert len(runs) == 1
    assert counts.get("in_run", 0) == runs[0].new_image_count >= 200
    store.table.delete_table()
    store.close()


def test_configuration_alone_moves_the_ledger_to_table_storage(azurite, tmp_path):
    from shared.errors import ConfigError
    from worker.app.bootstrap import open_ledger
    from worker.config import load_config

    config = load_config(
        None,
        env={
            "RETRAIN__WORKER__STORE": "table",
            "RETRAIN__WORKER__TABLE_NAME": f"cfg{uuid.uuid4().hex[:12]}",
            "RETRAIN__WORKER__STATE_DIR": str(tmp_path),
        },
    )
    ledger = open_ledger(config, env={"RETRAIN_TABLES": azurite.connection_string})
    assert isinstance(ledger, TableStore)
    ledger.table.delete_table()
    ledger.close()
    with pytest.raises(ConfigError, match="RETRAIN_TABLES"):
        open_ledger(config, env={})


def test_messages_for_unknown_or_invalid_models_create_no_partition(store, tmp_path):
    h = make_harness(tmp_path, store=store)
    h.upload("chicken")
    results = [h.worker.reject("m-unknown", model, "unknown_model", "not configured", "servicebus") for model in ("a/b", "a#b", "x" * 2000)]
    assert results == [True, False, False]  # one message id: recorded once, under no model
    assert store.partitions() == ["birds"]
    [event] = [e for e in h.events() if e.type == "retrain.request.rejected"]  # one message id: rejected once
    assert event.payload["data"]["model"] is None


def test_processed_ids_are_pruned_after_the_retention(store, tmp_path):
    from shared.messages import ImageUploaded, RetrainRequested

    h = make_harness(tmp_path, store=store)
    request = RetrainRequested(message_id="req-old", model="birds", force=True)
    h.worker.handle(request)
    h.clock.advance(7 * 86400)
    h.worker.tick()
    assert h.worker.handle(request).outcome == "duplicate", "kept through the redelivery window"
    h.clock.advance(2 * 86400)
    assert h.worker.prune_inbox() >= 1
    assert not list(store.query("PartitionKey eq @pk and RowKey ge 'in|' and RowKey lt 'in}'", {"pk": "birds"}))
    image = ImageUploaded.of("birds", "chicken/a.jpg", "e1", 10)  # images need no inbox row: the version is the key
    h.worker.handle(image)
    assert h.worker.handle(image).outcome == "duplicate"


# --- scale-out ingest: staged arrivals folded by the evaluation ---------------------------------


def test_an_image_is_staged_with_one_write_and_counted_once_when_delivered_by_many_threads(store, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from shared.messages import ImageUploaded

    h = make_harness(tmp_path, store=store)
    batches = BatchRecorder(store)
    same = ImageUploaded.of("birds", "chicken/same.jpg", "e1", 10)
    others = [ImageUploaded.of("birds", f"turkey/{i}.jpg", "e1", 10) for i in range(40)]
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(h.worker.handle, [same] * 8 + others))
    assert [e.outcome for e in outcomes[:8]].count("duplicate") == 7
    staging = [n for n in batches.sizes if n % 2 == 0 and n <= 98]
    assert len(batches.sizes) < 48, "concurrent deliveries share staging batches (group commit)"
    assert staging
    h.worker.tick()
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"pending": 41}
        assert tx.pending_stats("birds").per_class == {"chicken": 1, "turkey": 40}


def test_a_backlog_bigger_than_one_fold_is_folded_by_the_tick_in_bounded_batches(store, tmp_path):
    from shared.messages import ImageUploaded

    h = make_harness(tmp_path, store=store, evaluate_interval=3600, min_new_images=10_000)
    batches = BatchRecorder(store)
    for i in range(150):
        h.worker.handle(ImageUploaded.of("birds", f"{('chicken', 'turkey')[i % 2]}/{i:04d}.jpg", "e1", 10))
    with store.transaction() as tx:
        staged = tx.count_images("birds").get("staged", 0)
    assert staged >= 120, "with a long evaluate_interval most images wait, staged"
    h.worker.tick()
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"pending": 150}
        assert tx.pending_stats("birds").count == 150
    assert max(batches.sizes) <= 100
    assert "150/10000 new images" in h.decisions(1)[0].reason


def test_an_overwrite_and_a_late_older_version_staged_together_fold_in_the_right_order(store, tmp_path):
    import datetime as _dt

    from shared.messages import ImageUploaded

    h = make_harness(tmp_path, store=store)
    t0 = _dt.datetime(2026, 11, 30, 10, 0, tzinfo=_dt.UTC)
    old = ImageUploaded.of("birds", "chicken/a.jpg", "v1", 10, occurred_at=t0)
    new = ImageUploaded.of("birds", "chicken/a.jpg", "v2", 10, occurred_at=t0 + _dt.timedelta(seconds=5))
    from worker.handlers import image_row

    ctx = h.worker._context()
    for m in (new, old):  # both staged, unfolded; the older write arrives last: it must not become latest
        assert store.stage_image(image_row(ctx, m.model, m.path, m.etag, m.size, m.source, m.occurred_at)) == "staged"
    h.worker.tick()
    images = h.images()
    assert images["chicken/a.jpg"].etag == "v2"
    with store.transaction() as tx:
        assert tx.count_images("birds") == {"pending": 1, "superseded": 1}


# -- limits of the service that a first deployment would have met ------------------------------


class KeyRecorder:
    """Every RowKey the store sends, by batch or single write."""

    def __init__(self, store):
        self.keys: list[str] = []
        table = store.table
        inner_submit, inner_upsert = table.submit_transaction, table.upsert_entity

        def submit(ops, **kwargs):
            self.keys += [op[1]["RowKey"] for op in ops]
            return inner_submit(ops, **kwargs)

        def upsert(entity, **kwargs):
            self.keys.append(entity["RowKey"])
            return inner_upsert(entity, **kwargs)

        table.submit_transaction, table.upsert_entity = submit, upsert


def test_an_image_with_the_longest_allowed_path_gets_keys_within_the_services_limit_and_is_counted_once(store, tmp_path):
    """Base64 of a 1,024-character path is 1,366 characters: over the 1 KiB a RowKey may hold, so
    the service refused the whole commit (Azurite does not check; the recorder does)."""
    from shared.messages import MAX_PATH_CHARS, ImageUploaded

    keys = KeyRecorder(store)
    h = make_harness(tmp_path, store=store, min_new_images=1000)
    path = "chicken/" + "p" * (MAX_PATH_CHARS - len("chicken/") - len(".jpg")) + ".jpg"
    etag = "0x" + "e" * 200
    for _ in range(2):  # a duplicate delivery
        h.worker.handle(ImageUploaded.of("birds", path, etag, 10))
    h.worker.tick()
    with store.transaction() as tx:
        assert tx.pending_stats("birds").count == 1
    assert keys.keys
    assert max(len(k) for k in keys.keys) <= 1024


def test_a_document_that_shrinks_leaves_no_stale_chunk_behind(store):
    """Documents are split into 30,000-character properties d000, d001, ...; a write that merged
    instead of replacing kept the old d001 and read it back as part of the new document."""
    import datetime as dt

    from worker.store import RunRow

    created = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    run = RunRow(run_id="birds-0001-abcd1234", model="birds", seq=1, state="planned", manifest_sha256="a" * 64, image_count=1,
                 new_image_count=1, classes=["chicken"], created_at=created, detail="x" * 70_000)  # fmt: skip
    with store.transaction() as tx:
        tx.insert_run(run)
        tx.commit()
    with store.transaction() as tx:
        shorter = tx.get_run(run.run_id)
        assert shorter is not None
        assert len(shorter.detail) == 70_000
        shorter.detail = "now short"
        tx.update_run(shorter)
        tx.commit()
    with store.transaction() as tx:
        again = tx.get_run(run.run_id)
    assert again is not None
    assert again.detail == "now short"


def test_an_event_too_big_for_one_entity_is_kept_without_its_data_and_the_change_still_commits(store):
    """An entity holds at most 1 MiB; the event shares its commit with the change it reports, so an
    event too big made that commit fail on every retry."""
    import datetime as dt

    from worker.store import OutboxRow

    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    payload = {"specversion": "1.0", "id": "ev-big", "type": "retrain.run.failed", "source": "/retrain/worker", "subject": "runs/r",
               "data": {"model": "birds", "run_id": "birds-0001-abcd1234", "detail": "y" * 900_000}}  # fmt: skip
    with store.transaction() as tx:
        assert tx.enqueue_event(OutboxRow("ev-big", "retrain.run.failed", "runs/r", payload, at)) is True
        tx.commit()
    [row] = store.unpublished_events()
    assert row.payload["id"] == "ev-big"
    assert row.payload["type"] == "retrain.run.failed"
    assert row.payload["data"]["run_id"] == "birds-0001-abcd1234"
    assert "detail" not in row.payload["data"]
    assert row.payload["data"]["retrain_outbox"]["truncated"] is True


def test_marking_events_published_reads_each_event_once_whatever_the_number_of_partitions(store):
    """It used to look for every event in every partition: cost growing with the table."""
    import datetime as dt

    from worker.store import OutboxRow

    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for i in range(12):  # 12 models, one event each
        with store.transaction() as tx:
            payload = {"id": f"ev-{i}", "type": "t", "data": {"model": f"m{i}"}}
            tx.enqueue_event(OutboxRow(f"ev-{i}", "t", f"s{i}", payload, at))
            tx.commit()
    events = store.unpublished_events()
    reads: list[tuple[str, str]] = []
    inner = store.get

    def counting_get(pk, rk):
        reads.append((pk, rk))
        return inner(pk, rk)

    store.get = counting_get
    store.mark_published([e.event_id for e in events], at)
    assert len(reads) == 12  # one read of each event's own entity
    assert store.unpublished_events() == []
    assert {e.published_at for e in store.all_events()} == {at}


def test_overwriting_the_image_at_the_pending_floor_counts_only_its_new_version(store, tmp_path):
    """The image with the run's watermark (the floor) is in the run, not pending: replacing it adds
    one pending image and takes none away (a boundary that counted it as pending lost one)."""
    h = make_harness(tmp_path, store=store)
    h.uploads(6)  # 12 images; the last, turkey/img00012.jpg, gets seq 12
    h.clock.advance(11)
    h.worker.tick()
    [run] = h.runs()
    assert run.watermark == 12
    assert run.in_flight
    h.upload("chicken", name="extra", etag="e1")  # pending is counted again above the new floor (12) and kept on the head
    h.clock.advance(1)
    h.worker.tick()
    h.upload("turkey", name="img00012", etag="e2")  # a new version of the image at the floor
    h.worker.tick()
    with store.transaction() as tx:
        stats = tx.pending_stats("birds")
    assert (stats.count, stats.per_class) == (2, {"chicken": 1, "turkey": 1})


def test_an_instance_that_did_not_list_the_events_still_marks_them_published(store):
    """The relay of one Functions instance may mark events another listed: the event's own entity
    is found by its marker, in one query."""
    import datetime as dt

    from worker.store import OutboxRow

    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with store.transaction() as tx:
        tx.enqueue_event(OutboxRow("ev-other", "t", "s", {"id": "ev-other", "type": "t", "data": {"model": "m7"}}, at))
        tx.commit()
    other = TableStore(store.table)  # same table, nothing listed yet
    other.mark_published(["ev-other"], at)
    assert store.unpublished_events() == []
    assert [e.published_at for e in store.all_events()] == [at]
