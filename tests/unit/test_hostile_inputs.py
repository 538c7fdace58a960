"""Inputs an attacker or a careless operator sends: each is refused once, with a reason, and
nothing is lost or done twice."""

from __future__ import annotations

import json
import logging

import pytest

from shared import events as ev
from shared.messages import RetrainRequested
from tests.fakes.harness import make_harness
from worker import handlers

from .test_functions import blob, call, h, post, rejections, sb  # noqa: F401 - h is a fixture

pytestmark = pytest.mark.unit

DEEP = b"[" * 10_000 + b"]" * 10_000
HUGE_INT = b'{"model": "birds", "force": true, "overrides": {"epochs": ' + b"9" * 5000 + b"}}"


# --- 2: deeply nested JSON and huge integers ---------------------------------------------------


@pytest.mark.parametrize("body", [DEEP, b'{"a":' * 5000 + b"1" + b"}" * 5000, HUGE_INT], ids=["list", "object", "int"])
def test_service_bus_rejects_deep_or_huge_json_once(h, body):  # noqa: F811
    call("retrain_requested", sb(body, "deep-1"))
    call("retrain_requested", sb(body, "deep-1", delivery_count=2))
    [event] = rejections(h)
    assert event.payload["data"]["reason"] in ("too_deep", "schema", "malformed_json")


def test_an_already_decoded_document_nested_too_deep_is_refused_as_such():
    from shared.errors import InvalidMessage
    from shared.messages import parse_as, parse_message

    nested: object = 1
    for _ in range(40):
        nested = {"x": nested}
    for parse in (lambda d: parse_as(RetrainRequested, d), parse_message):
        with pytest.raises(InvalidMessage) as caught:
            parse({"kind": "retrain.requested", "message_id": "m", "model": "birds", "force": True, "overrides": nested})
        assert caught.value.reason == "too_deep"


@pytest.mark.parametrize("body", [DEEP, HUGE_INT], ids=["deep", "int"])
def test_http_answers_400_not_500_to_deep_or_huge_json(h, body):  # noqa: F811
    response = post(body)
    assert response.status_code == 400, response.get_body()


def test_a_deep_file_in_the_local_inbox_is_moved_aside_and_serve_goes_on(tmp_path):
    from worker.app.serve import LocalService

    harness = make_harness(tmp_path)
    server = LocalService(harness.worker)
    server.inbox.root.mkdir(parents=True)
    (server.inbox.root / "deep.json").write_bytes(DEEP)
    (server.inbox.root / "huge.json").write_bytes(HUGE_INT)
    report = server.cycle()
    assert report.rejected == 2
    assert sorted(p.name for p in (server.inbox.root / "rejected").glob("*.json")) == ["deep.json", "huge.json"]
    assert server.cycle().rejected == 0  # a restart does not trip over them again


# --- 3: ids that would become paths -----------------------------------------------------------


@pytest.mark.parametrize("bad", ["/../../../../tmp/x", "../x", "a/b", "a\\b", ".hidden", "x" * 300, "a b", "a\u202eb"])
def test_ids_are_checked_against_a_strict_pattern_at_the_message_boundary(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        RetrainRequested(message_id=bad, model="birds", force=True)


def test_inject_refuses_a_request_id_that_is_a_path_and_writes_nothing_outside(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from worker.app.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RETRAIN__WORKER__STATE_DIR", str(tmp_path / "state"))
    escape = tmp_path / "escaped"
    result = CliRunner().invoke(app, ["inject", "birds", "--force", "--request-id", f"/../../../../../../../..{escape}"])
    assert result.exit_code != 0
    assert not escape.with_suffix(".json").exists()
    assert not list((tmp_path / "state").rglob("*.json")) if (tmp_path / "state").exists() else True


def test_the_local_inbox_itself_refuses_an_id_that_is_not_a_file_name(tmp_path):
    from shared.errors import InvalidMessage
    from worker.adapters.local.inbox import LocalInbox

    with pytest.raises(InvalidMessage):
        LocalInbox(tmp_path / "inbox").put("../../x", {"kind": "retrain.requested"})
    assert not (tmp_path / "x.json").exists()


# --- 4: the Idempotency-Key is stored with the effect -----------------------------------------


def test_a_request_that_failed_is_carried_out_on_retry_not_replayed(h, monkeypatch):  # noqa: F811
    h.uploads(6)
    real = handlers.HANDLERS[RetrainRequested]

    def broken(ctx, tx, msg):
        raise ConnectionError("the ledger went away mid-request")

    monkeypatch.setitem(handlers.HANDLERS, RetrainRequested, broken)
    with pytest.raises(ConnectionError):  # the host answers 500
        post({"model": "birds", "force": True}, {"Idempotency-Key": "retry-me"})
    monkeypatch.setitem(handlers.HANDLERS, RetrainRequested, real)
    retried = post({"model": "birds", "force": True}, {"Idempotency-Key": "retry-me"})
    assert retried.status_code == 202
    assert "Idempotent-Replayed" not in retried.headers
    assert len(h.runs()) == 1, "the retry did what the first attempt could not"
    replay = post({"model": "birds", "force": True}, {"Idempotency-Key": "retry-me"})
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_body() == retried.get_body()
    assert len(h.runs()) == 1


def test_an_idempotency_key_with_any_printable_characters_is_kept_out_of_ids(h):  # noqa: F811
    h.uploads(6)
    response = post({"model": "birds", "force": True}, {"Idempotency-Key": "a/../../b#?x"})
    assert response.status_code == 202
    request_id = json.loads(response.get_body())["request_id"]
    assert request_id.startswith("http-")
    assert "/" not in request_id


# --- 5: model names that are not configured never reach the ledger ----------------------------


@pytest.mark.parametrize("model", ["a/b", "a#b", "x" * 2000, "cats", "../birds"])
def test_an_unknown_or_invalid_model_is_rejected_once_under_no_model(h, model):  # noqa: F811
    body = json.dumps({"model": model, "force": True}).encode()
    call("retrain_requested", sb(body, "unknown-model"))
    call("retrain_requested", sb(body, "unknown-model", delivery_count=2))
    [event] = rejections(h)
    assert event.payload["data"]["model"] is None
    assert len(event.payload["data"]["given_model"]) <= 100


# --- 6: runs that would block a model forever -------------------------------------------------


def test_a_run_that_never_ends_is_canceled_at_its_timeout_and_fails(tmp_path):
    harness = make_harness(tmp_path, run_timeout=3600, max_attempts=1)
    harness.uploads(6)
    harness.clock.advance(11)
    harness.worker.tick()
    [run] = harness.runs()
    harness.backend.finish(run.backend_run_id, "running")
    harness.clock.advance(1800)
    harness.worker.tick()
    assert harness.runs()[0].state == "running"
    harness.clock.advance(1801)
    harness.worker.tick()
    [run] = harness.runs()
    assert (run.state, run.outcome) == ("finalized", "failed")
    assert "timed out" in run.detail
    assert harness.backend.calls_to("cancel") == [run.backend_run_id]
    with harness.store.transaction() as tx:
        assert tx.pending_stats("birds").count == 12, "its images are pending again"


def test_a_completion_that_always_fails_fails_the_run_and_frees_the_model(tmp_path, monkeypatch):
    from worker.bus import COMPLETION_ATTEMPTS

    harness = make_harness(tmp_path, max_attempts=1, cooldown=86400)  # no new run while we look
    harness.uploads(6)
    harness.clock.advance(11)
    harness.worker.tick()
    [run] = harness.runs()

    def unreadable(run_id):
        raise PermissionError("outputs are not readable")

    monkeypatch.setattr(harness.worker.completer, "complete", unreadable)
    harness.succeed(run)
    for _ in range(COMPLETION_ATTEMPTS + 2):
        harness.clock.advance(60)
        harness.worker.tick()
    [run] = harness.runs()
    assert (run.state, run.outcome) == ("finalized", "completion_failed")
    assert "PermissionError" in run.detail
    with harness.store.transaction() as tx:
        assert tx.count_images("birds") == {"pending": 12}, "not trained after all: pending again"
    failed = [e for e in harness.events() if e.type == ev.RUN_FAILED]
    assert len(failed) == 1


# --- 7: a model that keeps failing backs off --------------------------------------------------


def test_repeated_failed_runs_back_off_exponentially_until_a_forced_request(tmp_path):
    harness = make_harness(tmp_path, max_attempts=1, cooldown=0, backoff_after_failed_runs=2, failure_backoff=600)
    harness.uploads(6)

    def fail_next():
        harness.clock.advance(11)
        harness.worker.tick()
        flying = [r for r in harness.runs() if r.in_flight]
        for run in flying:
            harness.backend.finish(run.backend_run_id, "failed")
            harness.status(run.backend_run_id, "failed")
        return len(flying)

    assert fail_next() == 1
    assert fail_next() == 1  # the second failure starts the back-off
    assert fail_next() == 0
    assert "backing off: 2 runs failed in a row" in harness.decisions(1)[0].reason
    harness.clock.advance(600)
    assert fail_next() == 1  # the back-off ended; the third failure doubles it
    harness.clock.advance(700)
    assert fail_next() == 0
    harness.clock.advance(500)
    assert fail_next() == 1
    assert len(harness.runs()) == 4
    harness.request(force=True)  # an operator: the back-off ends at once
    assert len([r for r in harness.runs() if r.in_flight]) == 1


# --- 9: non-finite metrics and durations ------------------------------------------------------


@pytest.mark.parametrize("best", [float("nan"), float("inf")])
def test_a_non_finite_metric_fails_the_gate(tmp_path, best):
    harness = make_harness(tmp_path)
    harness.uploads(6)
    harness.clock.advance(11)
    harness.worker.tick()
    harness.succeed(best=best)
    [run] = harness.runs()
    assert run.outcome == "rejected"
    assert "not a finite number" in run.detail
    assert harness.versions() == []


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_toml_nan_or_inf_durations_are_refused_at_load(tmp_path, value):
    from shared.errors import ConfigError
    from worker.config import load_config

    path = tmp_path / "retrain.toml"
    path.write_text(f"[models.birds]\nquiet_period = {value}\n[models.birds.gate]\nonnx_tolerance = {value}\n")
    with pytest.raises(ConfigError):
        load_config(path, env={})


# --- 10: the submitted event when the backend's status overtakes the submitter ---------------


@pytest.mark.parametrize("status", ["running", "succeeded", "failed"])
def test_run_submitted_is_published_even_when_a_status_event_overtakes_the_mark(tmp_path, status):
    harness = make_harness(tmp_path, max_attempts=1)
    real_submit = harness.worker.submitter._mark_submitted
    harness.worker.submitter._mark_submitted = lambda run, st: None  # the submitter is slow ...
    harness.uploads(6)
    harness.clock.advance(11)
    harness.worker.tick()
    [run] = harness.runs()
    assert run.state == "planned"
    if status == "succeeded":
        harness.succeed(run)
    else:
        harness.status(run.backend_run_id, status)  # ... the backend's event arrives first
    state_before = harness.runs()[0].state
    real_submit(run, harness.backend.status(run.backend_run_id))  # then the submitter's mark: a no-op
    assert harness.runs()[0].state == state_before != "planned"
    submitted = [e for e in harness.events() if e.type == ev.RUN_SUBMITTED]
    assert len(submitted) == 1
    assert submitted[0].payload["data"]["run_id"] == run.run_id


# --- 11: the blob's time orders versions ------------------------------------------------------


def test_the_blob_event_passes_its_time_so_an_older_write_delivered_late_is_stale(h):  # noqa: F811
    import datetime as dt

    at = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
    call("image_uploaded", blob("images/birds/chicken/a.jpg", etag='"0x2"', when=at + dt.timedelta(seconds=5)))
    call(
        "image_uploaded", blob("images/birds/chicken/a.jpg", etag='"0x1"', when=at + dt.timedelta(seconds=1))
    )  # written earlier, delivered later
    images = h.images()
    assert images["chicken/a.jpg"].etag == "0x2"


# --- 12: the inbox is pruned after the redelivery windows -------------------------------------


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
def test_processed_ids_are_kept_past_the_redelivery_window_then_pruned(tmp_path, store_kind):
    from worker.adapters.local.sqlite_store import SqliteStore

    store = SqliteStore(tmp_path / "ledger.db") if store_kind == "sqlite" else None
    harness = make_harness(tmp_path, store=store)
    harness.upload("chicken", "a")
    harness.clock.advance(7 * 86400)  # Service Bus's longest duplicate detection window
    harness.worker.tick()
    from shared.messages import ImageUploaded

    assert harness.worker.handle(ImageUploaded.of("birds", "chicken/a.jpg", "e1", 100)).outcome == "duplicate"
    harness.clock.advance(2 * 86400)  # past the 8-day retention
    harness.worker.tick()
    with harness.store.transaction() as tx:
        assert tx.claim_message(ImageUploaded.of("birds", "chicken/a.jpg", "e1", 100).message_id, "x", "birds", harness.clock.now())
    # A redelivery after the window would be a new message, but the ledger still knows the version.
    assert harness.worker.handle(ImageUploaded.of("birds", "chicken/a.jpg", "e1", 100)).outcome == "duplicate"


# --- 14: strict overrides, no raw control characters in logs ----------------------------------


@pytest.mark.parametrize("overrides", [{"epochs": True}, {"epochs": "8"}, {"batch_size": 1.5}, {"learning_rate": "0.1"}])
def test_overrides_take_numbers_only(overrides):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        RetrainRequested(message_id="o-1", model="birds", force=True, overrides=overrides)


def test_control_and_bidi_characters_from_outside_are_escaped_in_logs(caplog):
    from shared.redact import install_log_redaction

    install_log_redaction()
    with caplog.at_level(logging.INFO):
        logging.getLogger("retrain.test").info("rejected %s", "evil\u202egpj.exe\x1b[31m\rfake line")
    [record] = [r for r in caplog.records if r.name == "retrain.test"]
    text = record.getMessage()
    assert "\u202e" not in text
    assert "\x1b" not in text
    assert "\r" not in text
    assert "\\u202e" in text


def test_a_newline_from_outside_cannot_forge_a_log_line_but_a_traceback_keeps_its_lines(caplog):
    from shared.redact import install_log_redaction

    install_log_redaction()
    with caplog.at_level(logging.INFO):
        logging.getLogger("retrain.test").info("rejected %s", "a.jpg\nERROR retrain: champion deleted\tby admin")
        try:
            raise ValueError("bad")
        except ValueError:
            logging.getLogger("retrain.test").exception("failed on %s", "b.jpg\nforged")
    forged, failed = [r.getMessage() for r in caplog.records if r.name == "retrain.test"]
    assert forged == "rejected a.jpg\\nERROR retrain: champion deleted\\tby admin"
    first, *traceback = failed.split("\n")
    assert first == "failed on b.jpg\\nforged"
    assert traceback[0] == "Traceback (most recent call last):"
    assert traceback[-1] == "ValueError: bad"


def test_log_redaction_is_installed_once_on_the_root_its_handlers_and_the_azure_loggers():
    from shared.redact import AZURE_LOGGERS, RedactingFilter, install_log_redaction

    root, handler = logging.getLogger(), logging.StreamHandler()
    root.addHandler(handler)
    try:
        flt = install_log_redaction()
        factory = logging.getLogRecordFactory()
        assert install_log_redaction() is flt
        assert logging.getLogRecordFactory() is factory, "the record factory is not wrapped twice"
        for logger in [root, *(logging.getLogger(name) for name in AZURE_LOGGERS)]:
            assert [f for f in logger.filters if isinstance(f, RedactingFilter)] == [flt], logger.name
        assert [f for f in handler.filters if isinstance(f, RedactingFilter)] == [flt]
        # The factory passes whatever it is given on to the one it wraps, keywords included.
        record = factory(name="x", level=logging.INFO, pathname="p", lineno=1, msg="AccountKey=%s", args=("c2VjcmV0",), exc_info=None)
        assert "c2VjcmV0" not in record.getMessage()
    finally:
        root.removeHandler(handler)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Endpoint=sb://x/;SharedAccessKey=abc123;EntityPath=q", "Endpoint=sb://x/;SharedAccessKey=***;EntityPath=q"),
        ('{"client_secret": "s3cr3t"}', '{"client_secret": "***"}'),
        ("Authorization: Bearer eyJhbGciOi.def", "Authorization: Bearer ***"),
        ("https://a.blob.core.windows.net/c?sv=1&sig=abcd%2B&se=2", "https://a.blob.core.windows.net/c?sv=1&sig=***&se=2"),
        ("amqps://user:hunter22@host/", "amqps://user:***@host/"),
    ],
)
def test_a_secret_is_masked_and_everything_around_it_kept_as_it_was(text, shown):
    """What is left says which secret was there (its name, separator and quotes), not its value."""
    from shared.redact import redact

    assert redact(text) == shown


def test_printable_escapes_controls_keeps_newlines_only_when_asked_and_cuts_at_its_limit():
    from shared.redact import printable

    assert printable("a\nb\tc\rd\u202ee\x1b") == "a\\nb\\tc\\u000dd\\u202ee\\u001b"
    assert printable("a\nb\tc", keep_newlines=True) == "a\nb\tc"
    assert (printable("x" * 10, limit=4), printable("x" * 4, limit=4), printable(7)) == ("xxxx...", "xxxx", "7")


# --- 1: what else can sit in an images folder ---------------------------------------------------


def _scan_with_deadline(scanner, seconds: float = 20.0) -> list:
    import threading

    found: list = []
    worker = threading.Thread(target=lambda: found.extend(scanner.scan()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "the scan hung"
    return found


def test_only_regular_files_inside_the_root_are_counted_and_nothing_hangs_or_crashes(tmp_path, caplog):
    import os

    from worker.adapters.local.directory_blobs import DirectoryBlobStore
    from worker.adapters.local.folder_scan import FolderScanner

    root = tmp_path / "images"
    (root / "chicken").mkdir(parents=True)
    (root / "chicken" / "ok.jpg").write_bytes(b"a real file")
    os.mkfifo(root / "chicken" / "fifo.jpg")
    os.symlink("/dev/zero", root / "chicken" / "zero.jpg")
    os.symlink(root / "chicken" / "loop2.jpg", root / "chicken" / "loop1.jpg")
    os.symlink(root / "chicken" / "loop1.jpg", root / "chicken" / "loop2.jpg")
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"not yours")
    os.symlink(outside, root / "chicken" / "escape.jpg")
    os.symlink(root / "chicken" / "ok.jpg", root / "chicken" / "inside-link.jpg")
    (root / "chicken").joinpath(os.fsdecode(b"bad\xff\xfename.jpg")).write_bytes(b"x")
    scanner = FolderScanner("birds", DirectoryBlobStore(root, images_only=False))
    with caplog.at_level(logging.WARNING):
        found = _scan_with_deadline(scanner)
        again = _scan_with_deadline(scanner)  # a restart's rescan: no crash, nothing logged twice
    assert sorted(m.path for m in found) == ["chicken/inside-link.jpg", "chicken/ok.jpg"]
    assert again == []
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 6, skipped  # fifo, zero, two loop ends, escape, the bad name: once each
    [bad_name] = [m for m in skipped if "not valid UTF-8" in m]
    assert "\\udcff" in bad_name  # escaped, not written raw


def test_a_fifo_in_the_local_inbox_is_moved_aside_not_read(tmp_path):
    import os

    from worker.app.serve import LocalService

    harness = make_harness(tmp_path)
    server = LocalService(harness.worker)
    server.inbox.root.mkdir(parents=True)
    os.mkfifo(server.inbox.root / "pipe.json")
    os.symlink("/dev/zero", server.inbox.root / "zero.json")
    import threading

    done = threading.Event()
    threading.Thread(target=lambda: (server.cycle(), done.set()), daemon=True).start()
    assert done.wait(20), "serve hung on a FIFO in its inbox"
    assert sorted(p.name for p in (server.inbox.root / "rejected").iterdir() if p.suffix == ".json") == ["pipe.json", "zero.json"]


# --- 8: the local event sink across processes and after a torn write --------------------------


def test_the_event_file_recovers_a_torn_tail_without_losing_the_next_event(tmp_path):
    from worker.adapters.local.jsonl_publisher import JsonlPublisher

    path = tmp_path / "events.jsonl"
    JsonlPublisher(path).publish([{"id": "e1", "type": "t", "subject": "s"}])
    with open(path, "ab") as fh:
        fh.write(b'{"id":"e2","type":"t","subj')  # a crash mid-write
    JsonlPublisher(path).publish([{"id": "e2", "type": "t", "subject": "s"}, {"id": "e3", "type": "t", "subject": "s"}])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["id"] for e in lines] == ["e1", "e2", "e3"]


def test_two_processes_on_one_event_file_write_each_event_once(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    path = tmp_path / "events.jsonl"
    code = (
        "import sys; from worker.adapters.local.jsonl_publisher import JsonlPublisher; p = JsonlPublisher(sys.argv[1])\n"
        "for i in range(200):\n"
        "    p.publish([{'id': f'e{i}', 'type': 't', 'subject': 's'}, {'id': f'e{i + 1}', 'type': 't', 'subject': 's'}])\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert sorted(ids) == sorted({f"e{i}" for i in range(201)})


# --- 13: secrets in every spelling ------------------------------------------------------------

SECRET = "S3cr3tV4lue+/="
SPELLINGS = [
    f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={SECRET};EndpointSuffix=core.windows.net",
    json.dumps({"AccountKey": SECRET}),
    repr({"AccountKey": SECRET}),
    repr({"client_secret": SECRET}),
    f"AZUREML_CLIENT_SECRET={SECRET}",
    f"x-functions-key: {SECRET}",
    f"Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey={SECRET}",
    f"https://acct.blob.core.windows.net/c?sv=2024&sig={SECRET}&se=2026",
    f"AccountKey%3D{SECRET}%3BEndpointSuffix",
    f"https://admin:{SECRET}@db.example.com/x",
    f"Authorization: Bearer {SECRET}",
    f"password={SECRET}",
]


@pytest.mark.parametrize("text", SPELLINGS)
def test_a_secret_never_reaches_logs_exceptions_or_events(tmp_path, caplog, text):
    from shared.redact import install_log_redaction

    install_log_redaction()
    with caplog.at_level(logging.INFO):
        logging.getLogger("retrain.test").info("connecting with %s", text)
        try:
            raise RuntimeError(f"could not connect: {text}")
        except RuntimeError:
            logging.getLogger("retrain.test").exception("failed")
    logged = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert SECRET not in logged
    assert "S3cr3t" not in logged
    harness = make_harness(tmp_path, max_attempts=1)
    harness.uploads(6)
    harness.clock.advance(11)
    harness.worker.tick()
    [run] = harness.runs()
    harness.backend.finish(run.backend_run_id, "failed", detail=f"trainer crashed: {text}")
    harness.status(run.backend_run_id, "failed", detail=f"trainer crashed: {text}")
    assert harness.worker.reject("m-secret", "birds", "schema", f"bad message: {text}", "servicebus")
    published = json.dumps([e.payload for e in harness.events()])
    assert "S3cr3t" not in published


# --- the design: every commit fits one batch --------------------------------------------------


def test_the_memory_fake_refuses_a_commit_larger_than_one_batch_like_the_table_store():
    from tests.fakes.memory_store import MemoryStore
    from worker.store import CommitTooLargeError, ImageRow

    store = MemoryStore()
    with store.transaction() as tx:
        for i in range(49):  # 2 records per image: 98 fit
            tx.add_image(ImageRow(model="birds", path=f"chicken/{i}.jpg", etag="e", label="chicken", split="train"))
        row = ImageRow(model="birds", path="chicken/one-too-many.jpg", etag="e", label="chicken", split="train")
        with pytest.raises(CommitTooLargeError):
            tx.add_image(row)


def test_a_backfill_and_a_run_over_thousands_of_images_never_need_a_large_commit(tmp_path):
    harness = make_harness(tmp_path, min_new_images=10**6)  # the memory store counts every commit's writes
    for i in range(2500):
        harness.blobs.blobs[f"{('chicken', 'turkey')[i % 2]}/b{i:05d}.jpg"] = b"%d" % i
    assert harness.request(prefix="").detail == "registered 2500 images"
    harness.request(force=True)
    [run] = harness.runs()
    assert run.new_image_count == 2500
    harness.succeed(run)
    with harness.store.transaction() as tx:
        assert tx.count_images("birds") == {"trained": 2500}


def test_a_ledger_from_before_the_watermarks_is_refused_with_a_way_out(tmp_path):
    import sqlite3

    from worker.adapters.local.sqlite_store import LedgerSchemaError, SqliteStore

    old = sqlite3.connect(tmp_path / "ledger.db")
    old.execute("CREATE TABLE images (model TEXT, path TEXT, etag TEXT, state TEXT, run_id TEXT)")
    old.execute("CREATE TABLE run_images (run_id TEXT, path TEXT)")
    old.commit()
    old.close()
    with pytest.raises(LedgerSchemaError, match="move the file aside") as refused:
        SqliteStore(tmp_path / "ledger.db")
    assert str(refused.value).endswith(
        "the new ledger re-registers the images from the images folder on the next scan (counted as new once)."
    )
    fresh = SqliteStore(tmp_path / "new" / "ledger.db")  # a new file gets the current schema
    fresh.close()
    SqliteStore(tmp_path / "new" / "ledger.db").close()  # and opens again


@pytest.mark.parametrize("logger", ["root", "azure.storage.blob", "retrain.worker", "some.library", "own.handler"])
def test_a_fresh_process_that_installs_redaction_logs_no_secret_anywhere(logger):
    """In a new interpreter (the install is once per process): root handlers, the SDK loggers and
    any other logger all write masked text, messages and tracebacks alike."""
    import subprocess
    import sys

    from shared.redact import install_log_redaction
    from tests.conftest import ROOT

    # Also here (idempotent): mutmut runs a mutant only against tests that call the mutated function
    # in-process, and the subprocess below is what fails when the installation is broken.
    install_log_redaction()
    code = (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stdout, level=logging.DEBUG, format='%(name)s %(message)s')\n"
        "from shared.redact import install_log_redaction\n"
        "install_log_redaction(); install_log_redaction()  # idempotent\n"
        f"log = logging.getLogger('' if {logger!r} == 'root' else {logger!r})\n"
        # A library logger with its own handler, set up after the install and not propagating: only
        # the record factory (redaction at record creation) stands between it and the secret.
        f"if {logger!r} == 'own.handler':\n"
        "    log.propagate = False; log.addHandler(logging.StreamHandler(sys.stdout))\n"
        f"log.warning('connecting with %s', {SPELLINGS[0]!r})\n"
        "try:\n"
        f"    raise RuntimeError({SPELLINGS[1]!r})\n"
        "except RuntimeError:\n"
        "    log.exception('failed')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "connecting with" in out
    assert "RuntimeError" in out
    assert "S3cr3t" not in out
    assert out.count("***") >= 2


def test_a_backfill_posted_twice_with_one_key_is_replayed_and_another_body_conflicts(h):  # noqa: F811
    h.blobs.blobs.update({f"chicken/{i}.jpg": b"%d" % i for i in range(5)})
    first = post({"model": "birds", "prefix": "chicken/"}, {"Idempotency-Key": "bf-key"})
    again = post({"model": "birds", "prefix": "chicken/"}, {"Idempotency-Key": "bf-key"})
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert post({"model": "birds", "prefix": "turkey/"}, {"Idempotency-Key": "bf-key"}).status_code == 409


def test_a_service_bus_message_id_with_any_characters_is_accepted_by_its_digest(h):  # noqa: F811
    h.uploads(6)
    body = json.dumps({"model": "birds", "force": True}).encode()
    call("retrain_requested", sb(body, "orders/2026 11/#42"))
    call("retrain_requested", sb(body, "orders/2026 11/#42", delivery_count=2))
    [run] = h.runs()
    [request_id] = run.request_ids
    assert request_id.startswith("sb-")
    assert "/" not in request_id
    assert rejections(h) == []


def test_a_queue_message_whose_path_escapes_a_lone_surrogate_is_rejected_once_not_a_crash(h):  # noqa: F811
    body = b'{"kind": "retrain.requested", "message_id": "sur-1", "model": "birds", "images": [{"path": "chicken/\\ud800.jpg"}]}'
    call("retrain_requested", sb(body, "sur-1"))
    call("retrain_requested", sb(body, "sur-1", delivery_count=2))
    [event] = rejections(h)
    assert event.payload["data"]["reason"] == "schema"
    assert "lone surrogate" in event.payload["data"]["description"]


def test_a_symlink_into_a_sibling_folder_whose_name_extends_the_images_folder_is_outside_it(tmp_path):
    """Containment is by path, not by string prefix: /data/birds-private is not inside /data/birds."""
    from worker.adapters.local.directory_blobs import DirectoryBlobStore

    root, sibling = tmp_path / "birds", tmp_path / "birds-private"
    (root / "chicken").mkdir(parents=True)
    sibling.mkdir()
    (sibling / "secret.jpg").write_bytes(b"not for training")
    (root / "chicken" / "inside.jpg").write_bytes(b"an image")
    (root / "chicken" / "escape.jpg").symlink_to(sibling / "secret.jpg")
    (root / "chicken" / "alias.jpg").symlink_to(root / "chicken" / "inside.jpg")  # inside: counts
    store = DirectoryBlobStore(root)
    assert sorted(b.path for b in store.list()) == ["chicken/alias.jpg", "chicken/inside.jpg"]
    assert store.info("chicken/escape.jpg") is None
