"""The Functions app: each trigger called with real azure.functions binding objects, and its metadata."""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys

import azure.functions as func
import pytest
from azure.functions.servicebus import ServiceBusMessage
from azure.functions.timer import TimerRequest

from functions import runtime
from tests.conftest import ROOT
from tests.fakes.harness import make_harness

pytestmark = pytest.mark.unit


@pytest.fixture
def h(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_IMAGES_CONTAINER", "images")
    harness = make_harness(tmp_path)
    runtime.use_worker(harness.worker)
    yield harness
    runtime.use_worker(None)


_FUNCTIONS: dict = {}


def app_functions() -> dict:
    """The app's functions by name (the SDK allows indexing an app once per process)."""
    if not _FUNCTIONS:
        import function_app

        _FUNCTIONS.update({f.get_function_name(): f for f in function_app.app.get_functions()})
    return _FUNCTIONS


def call(name: str, *args):
    return app_functions()[name].get_user_function()(*args)


def pending(h):
    with h.store.transaction() as tx:
        return tx.pending_stats("birds")


# --- the app ----------------------------------------------------------------------------------


def test_importing_the_app_pulls_in_no_heavy_packages_and_opens_nothing():
    code = (
        "import sys, time; t = time.perf_counter(); import function_app; ms = (time.perf_counter() - t) * 1000; "
        "heavy = sorted(m for m in ('torch', 'torchvision', 'azureml', 'azure.ai.ml', 'mlflow', 'onnx', 'onnxruntime', 'numpy', 'sqlite3') if m in sys.modules); "
        "print(ms, heavy, len(function_app.app.get_functions()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin", "PYTHONPATH": str(ROOT)},
    ).stdout.split()
    print(f"function_app import took {float(out[0]):.0f} ms")  # the figure; benchmarks/ has the measurement
    assert out[1:] == ["[]", "8"]


def test_the_functions_declare_the_bindings_the_host_needs():
    # The JSON the host indexes, exactly as the worker reports it.
    bindings = {name: {b["type"]: b for b in json.loads(f.get_function_json())["bindings"]} for name, f in app_functions().items()}
    # BlobCreated through Event Grid, with no blob binding: the host never downloads the image.
    assert set(bindings["image_uploaded"]) == {"eventGridTrigger"}
    sb = bindings["retrain_requested"]["serviceBusTrigger"]
    assert (sb["queueName"], sb["connection"]) == ("%RETRAIN_REQUESTS_QUEUE%", "RETRAIN_SERVICEBUS")
    http = bindings["retrain_http"]["httpTrigger"]
    assert (http["route"], http["authLevel"]) == ("retrain", "FUNCTION")
    assert set(http["methods"]) >= {"POST", "GET", "PUT"}
    status = bindings["status_http"]["httpTrigger"]
    assert (status["route"], status["authLevel"], status["methods"]) == ("status/{model}", "FUNCTION", ["GET"])
    assert "eventGridTrigger" in bindings["run_status_changed"]
    assert bindings["tick"]["timerTrigger"]["schedule"] == "0 */1 * * * *"


def test_host_json_settles_service_bus_messages_by_the_functions_outcome():
    host = json.loads((ROOT / "host.json").read_text())
    assert host["extensions"]["serviceBus"]["autoCompleteMessages"] is True
    assert host["extensionBundle"]["id"] == "Microsoft.Azure.Functions.ExtensionBundle"
    example = json.loads((ROOT / "local.settings.json.example").read_text())["Values"]
    for name in (
        "RETRAIN_STORAGE__blobServiceUri",
        "RETRAIN_SERVICEBUS__fullyQualifiedNamespace",
        "RETRAIN_REQUESTS_QUEUE",
        "RETRAIN_EVENTS_TOPIC",
        "RETRAIN_IMAGES_CONTAINER",
        "RETRAIN_AML_WORKSPACE_TOPIC",
    ):
        assert name in example


# --- blob trigger -----------------------------------------------------------------------------


def blob(
    name: str, etag: str = '"0x8DC1"', length: int = 1234, api: str = "PutBlob", when=None, event_type="Microsoft.Storage.BlobCreated"
):
    """The BlobCreated event Event Grid delivers for `<container>/<blob name>` (as the storage service sends it)."""
    import datetime as dt

    container, _, blob_name = name.partition("/")
    data = {"api": api, "clientRequestId": "c", "requestId": "r", "eTag": etag, "contentType": "image/jpeg", "contentLength": length,
            "blobType": "BlockBlob", "url": f"https://acct.blob.core.windows.net/{name}", "sequencer": "00"}  # fmt: skip
    return func.EventGridEvent(
        id=f"evt-{name}-{etag}", data=data, topic="/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/acct",
        subject=f"/blobServices/default/containers/{container}/blobs/{blob_name}", event_type=event_type,
        event_time=when or dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC), data_version="",
    )  # fmt: skip


def test_a_new_blob_becomes_one_pending_image_even_when_delivered_twice(h):
    call("image_uploaded", blob("images/birds/chicken/1.jpg"))
    call("image_uploaded", blob("images/birds/chicken/1.jpg"))
    assert pending(h).per_class == {"chicken": 1}
    call("image_uploaded", blob("images/birds/chicken/1.jpg", etag='"0x8DC2"'))  # overwritten: a new version
    assert pending(h).count == 1


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("images/birds/chicken/a\x07b.jpg", "control characters"),
        ("images/birds/chicken/notes.txt", "unsupported image extension"),
        ("images/birds/1.jpg", "<label>/<file>"),
        ("images/cats/tabby/1.jpg", "not configured"),
        ("images/birds/chicken/\ud800.jpg", "lone surrogate"),  # a JSON escape in the event's subject
    ],
)
def test_bad_blob_names_are_logged_escaped_and_not_counted(h, caplog, name, words):
    with caplog.at_level(logging.WARNING, logger="retrain.functions.blob"):
        call("image_uploaded", blob(name))
    assert pending(h).count == 0
    assert words in caplog.text
    assert "\x07" not in caplog.text
    assert "\ud800" not in caplog.text, "escaped: a log stream cannot encode a lone surrogate"


def test_empty_blobs_and_blobs_without_an_etag_are_ignored(h):
    call("image_uploaded", blob("images/birds/chicken/empty.jpg", length=0))
    call("image_uploaded", blob("images/birds/chicken/noetag.jpg", etag=""))
    call("image_uploaded", blob("images/birds/chicken/odd.jpg", length="lots"))
    assert pending(h).count == 0


@pytest.mark.parametrize("api", ["PutBlob", "PutBlockList", "CopyBlob", "FlushWithClose"])
def test_every_api_that_commits_a_whole_blob_counts(h, api):
    call("image_uploaded", blob(f"images/birds/chicken/{api}.jpg", api=api))
    assert pending(h).count == 1


@pytest.mark.parametrize(
    ("event", "why"),
    [
        ({"api": "PutBlock"}, "does not commit"),  # a block staged, not a blob
        ({"api": ""}, "does not commit"),
        ({"name": "other/birds/chicken/1.jpg"}, "not in the images container"),
        ({"event_type": "Microsoft.Storage.BlobDeleted"}, "not a BlobCreated"),
    ],
)
def test_events_that_are_not_a_committed_image_in_the_images_container_are_ignored(h, caplog, event, why):
    event = dict(event)  # the parametrized dict is shared between runs of the test: never change it
    name = event.pop("name", "images/birds/chicken/1.jpg")
    with caplog.at_level(logging.INFO, logger="retrain.functions.blob"):
        call("image_uploaded", blob(name, **event))
    assert pending(h).count == 0
    assert why in caplog.text


# --- Service Bus trigger ----------------------------------------------------------------------


def sb(body: bytes, message_id: str = "m-1", delivery_count: int = 1) -> ServiceBusMessage:
    return ServiceBusMessage(
        body=body,
        message_id=message_id,
        delivery_count=delivery_count,
        content_type="application/json",
        sequence_number=7,
        application_properties={},
        user_properties={},
    )


def rejections(h):
    return [e for e in h.events() if e.type == "retrain.request.rejected"]


def test_a_valid_request_is_handled_once_per_message_id(h):
    h.uploads(6)
    body = json.dumps({"model": "birds", "force": True, "requested_by": "pipeline"}).encode()
    call("retrain_requested", sb(body, "abc"))
    call("retrain_requested", sb(body, "abc", delivery_count=2))
    assert len(h.runs()) == 1
    assert h.runs()[0].request_ids == ["sb-abc"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{nope", "malformed_json"),
        (b"", "empty"),
        (b"[]", "schema"),
        (json.dumps({"model": "cats", "force": True}).encode(), "unknown_model"),
        (json.dumps({"model": "birds", "force": "yes"}).encode(), "schema"),
        (json.dumps({"model": "birds", "force": True, "pad": "x" * 300_000}).encode(), "too_large"),
        (json.dumps({"kind": "tick", "model": "birds"}).encode(), "schema"),
    ],
)
def test_a_permanently_bad_message_is_completed_with_one_rejected_event(h, body, reason):
    call("retrain_requested", sb(body, "bad-1"))
    call("retrain_requested", sb(body, "bad-1", delivery_count=2))  # redelivered: still one rejection
    [event] = rejections(h)
    assert event.payload["data"]["reason"] == reason
    assert event.payload["data"]["source"] == "servicebus"


def test_a_transient_failure_raises_so_the_host_retries(h, monkeypatch):
    def unavailable(message):
        raise ConnectionError("ledger unavailable")

    monkeypatch.setattr(h.worker, "handle", unavailable)
    with pytest.raises(ConnectionError):
        call("retrain_requested", sb(json.dumps({"model": "birds", "force": True}).encode()))


# --- HTTP -------------------------------------------------------------------------------------


def post(body, headers=None, method="POST"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return call("retrain_http", func.HttpRequest(method=method, url="/api/retrain", headers=headers or {}, body=data))


def test_post_accepts_a_request_with_202_and_its_id(h):
    h.uploads(6)
    response = post({"model": "birds", "force": True})
    assert response.status_code == 202
    body = json.loads(response.get_body())
    assert body["request_id"].startswith("http-")
    assert h.runs()[0].request_ids == [body["request_id"]]


def test_the_same_idempotency_key_and_body_get_the_same_answer_and_one_effect(h):
    h.uploads(6)
    first = post({"model": "birds", "force": True}, {"Idempotency-Key": "k1"})
    second = post({"model": "birds", "force": True}, {"Idempotency-Key": "k1"})
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.get_body() == second.get_body()
    assert len(h.runs()) == 1
    conflict = post({"model": "birds", "force": True, "reason": "other"}, {"Idempotency-Key": "k1"})
    assert conflict.status_code == 409


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b"{bad json", 400, None),
        ({"model": "cats", "force": True}, 400, None),
        ({"model": "birds"}, 400, None),
        ({"model": "birds", "force": True, "overrides": {"epochs": 0}}, 400, "overrides.epochs"),
        ({"model": "birds", "force": True, "images": [{"path": "../x.jpg"}]}, 400, "images.0.path"),
        ({"model": "birds", "force": True, "pad": "x" * 300_000}, 413, None),
    ],
)
def test_bad_posts_get_specific_errors(h, body, status, field):
    response = post(body)
    assert response.status_code == status
    if field:
        assert field in [e["field"] for e in json.loads(response.get_body())["errors"]]


def test_other_methods_get_405(h):
    response = post({}, method="GET")
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


def test_status_returns_the_models_view_or_404(h):
    h.uploads(2)
    ok = call("status_http", func.HttpRequest(method="GET", url="/api/status/birds", route_params={"model": "birds"}, body=b""))
    assert ok.status_code == 200
    assert json.loads(ok.get_body())["pending"]["total"] == 4
    missing = call("status_http", func.HttpRequest(method="GET", url="/api/status/cats", route_params={"model": "cats"}, body=b""))
    assert missing.status_code == 404


# --- Event Grid -------------------------------------------------------------------------------

TOPIC = "/subscriptions/s/resourceGroups/r/providers/Microsoft.MachineLearningServices/workspaces/w"


def eg(event_id: str, event_type: str, data: dict, topic: str = TOPIC) -> func.EventGridEvent:
    return func.EventGridEvent(
        id=event_id,
        data=data,
        topic=topic,
        subject="experiments/x/runs/y",
        event_type=event_type,
        event_time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        data_version="2",
    )


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        ("Microsoft.MachineLearningServices.RunCompleted", {"runId": None}),
        ("Microsoft.MachineLearningServices.RunStatusChanged", {"RunId": None, "RunStatus": "COMPLETED"}),
        ("microsoft.machinelearningservices.runstatuschanged", {"runId": None, "runStatus": "Completed"}),
    ],
)
def test_run_events_in_any_casing_complete_the_run_once(h, monkeypatch, event_type, data):
    monkeypatch.setenv("RETRAIN_AML_WORKSPACE_TOPIC", TOPIC)
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()
    run = h.runs()[0]
    key = "runId" if "runId" in data else "RunId"
    data[key] = run.backend_run_id
    h.succeed(run, report=False)  # outputs in place; only the Event Grid event tells the worker
    assert h.runs()[0].state in ("submitted", "running")
    call("run_status_changed", eg("e1", event_type, data))
    call("run_status_changed", eg("e1", event_type, data))
    assert h.runs()[0].outcome == "registered"
    assert len([e for e in h.events() if e.type == "retrain.model.registered"]) == 1


def test_foreign_topics_unknown_runs_and_other_events_are_ignored(h, monkeypatch, caplog):
    monkeypatch.setenv("RETRAIN_AML_WORKSPACE_TOPIC", TOPIC)
    with caplog.at_level(logging.INFO, logger="retrain.functions.eventgrid"):
        call(
            "run_status_changed",
            eg("e1", "Microsoft.MachineLearningServices.RunCompleted", {"runId": "birds-0001-abcdef12-a1"}, topic="/other/workspace"),
        )
        call("run_status_changed", eg("e2", "Microsoft.MachineLearningServices.RunCompleted", {"runId": "someone_elses_run_17"}))
        call("run_status_changed", eg("e3", "Microsoft.Storage.BlobCreated", {"url": "x"}))
        call(
            "run_status_changed",
            eg("e4", "Microsoft.MachineLearningServices.RunStatusChanged", {"runId": "birds-0009-abcdef12-a1", "runStatus": "Running"}),
        )
    assert "another workspace" in caplog.text
    assert "not started by retrain" in caplog.text
    assert "not a run event" in caplog.text
    assert h.runs() == []


# --- timer ------------------------------------------------------------------------------------


def test_the_timer_ticks_and_relays_the_outbox(h):
    h.uploads(6)
    h.clock.advance(11)
    call("tick", TimerRequest(past_due=False))
    assert len(h.runs()) == 1
    assert [e["type"] for e in h.publisher.published] == ["retrain.run.submitted"]


def test_the_app_wires_service_bus_publishing_from_settings(tmp_path):
    from worker.adapters.azure.servicebus import ServiceBusPublisher
    from worker.adapters.local.jsonl_publisher import JsonlPublisher
    from worker.app.bootstrap import build_worker_from_settings

    base = {"RETRAIN__WORKER__STATE_DIR": str(tmp_path)}
    assert isinstance(build_worker_from_settings(base).publisher, JsonlPublisher)
    with_bus = {
        **base,
        "RETRAIN_SERVICEBUS": "Endpoint=sb://127.0.0.1/;SharedAccessKeyName=n;SharedAccessKey=k",
        "RETRAIN_EVENTS_TOPIC": "retrain-events",
    }
    publisher = build_worker_from_settings(with_bus).publisher
    assert isinstance(publisher, ServiceBusPublisher)
    assert publisher.topic == "retrain-events"
    identity = {**base, "RETRAIN_SERVICEBUS__fullyQualifiedNamespace": "ns.servicebus.windows.net", "RETRAIN_EVENTS_TOPIC": "t"}
    assert isinstance(build_worker_from_settings(identity).publisher, ServiceBusPublisher)


# --- steering over HTTP and Service Bus ---------------------------------------------------------


def control(action: str, body=None, headers=None, model="birds", method="POST"):
    data = b"" if body is None else json.dumps(body).encode()
    request = func.HttpRequest(method=method, url=f"/api/models/{model}/{action}", headers=headers or {}, body=data,
                               route_params={"model": model, "action": action})  # fmt: skip
    return call("control_http", request)


def test_pause_and_resume_over_http_are_recorded_with_who_asked_and_replayed_by_key(h):
    paused = control("pause", {"reason": "labelling fix", "requested_by": "ops"}, {"Idempotency-Key": "p-1"})
    assert paused.status_code == 202
    assert json.loads(paused.get_body())["outcome"] == "paused"
    assert h.head().paused["by"] == "function key (on behalf of ops)"  # the actor is who holds the key; the body's name a note
    again = control("pause", {"reason": "labelling fix", "requested_by": "ops"}, {"Idempotency-Key": "p-1"})
    assert (again.status_code, again.headers.get("Idempotent-Replayed")) == (202, "true")
    assert control("resume").status_code == 202  # an empty body is fine for a control
    assert h.head().paused is None


def test_control_over_http_refuses_what_the_ledger_refuses_and_what_does_not_validate(h):
    refused = control("promote", {"version": 3})
    assert refused.status_code == 409
    assert json.loads(refused.get_body())["description"] == "v3 is not a registered version of birds"
    assert control("promote").status_code == 400  # promote needs a version
    assert control("explode").status_code == 400
    assert control("pause", model="cats").status_code == 400
    assert control("pause", method="GET").status_code == 405


def test_a_control_message_on_the_requests_queue_is_refused_unless_the_deployment_opts_in(h, monkeypatch):
    """Anyone with Data Sender on the queue could pause or promote: controls need a verified operator."""
    pause = json.dumps({"kind": "model.control", "model": "birds", "action": "pause", "reason": "incident"}).encode()
    call("retrain_requested", sb(pause, message_id="m-0"))
    assert h.head().paused is None
    assert rejections(h)[-1].payload["data"]["reason"] == "forbidden"
    assert "RETRAIN_QUEUE_CONTROLS=true" in rejections(h)[-1].payload["data"]["description"]
    monkeypatch.setenv("RETRAIN_QUEUE_CONTROLS", "true")
    call("retrain_requested", sb(pause, message_id="m-1"))
    assert h.head().paused["reason"] == "incident"
    assert h.head().paused["by"] == "queue requests: unknown (unverified)"
    call("retrain_requested", sb(json.dumps({"kind": "model.purge", "model": "birds"}).encode(), message_id="m-2"))
    assert rejections(h)[-1].payload["data"]["reason"] == "schema"


def test_one_idempotency_key_sent_for_two_models_is_two_requests_each_carried_out(tmp_path, monkeypatch):
    """The message id came from the key alone while the key's record is per model: the second
    model's request was answered 202 and dropped as a duplicate of the first."""
    from tests.fakes.adapters import FakeBlobStore, FakeClock, FakeOnnxExporter, RecordingPublisher
    from tests.fakes.backend import FakeTrainingBackend
    from tests.fakes.harness import small_config
    from tests.fakes.memory_store import MemoryStore
    from worker.adapters.local.registry import LocalModelRegistry
    from worker.app.bootstrap import build_worker

    monkeypatch.setenv("RETRAIN_IMAGES_CONTAINER", "images")
    config = small_config(tmp_path)
    config = config.model_copy(update={"models": {**config.models, "fish": config.models["birds"]}})
    store = MemoryStore()
    worker = build_worker(config, store=store, backend=FakeTrainingBackend(), clock=FakeClock(), publisher=RecordingPublisher(),
                          blobs={"birds": FakeBlobStore(), "fish": FakeBlobStore()}, registry=LocalModelRegistry(tmp_path / "registry"),
                          exporter=FakeOnnxExporter())  # fmt: skip
    runtime.use_worker(worker)
    try:
        birds = post({"model": "birds", "force": True, "reason": "backfill"}, {"Idempotency-Key": "k1"})
        fish = post({"model": "fish", "force": True, "reason": "backfill"}, {"Idempotency-Key": "k1"})
        paused_birds = control("pause", {"reason": "incident"}, {"Idempotency-Key": "p-1"}, model="birds")
        paused_fish = control("pause", {"reason": "incident"}, {"Idempotency-Key": "p-1"}, model="fish")
    finally:
        runtime.use_worker(None)
    assert (birds.status_code, fish.status_code) == (202, 202)
    assert json.loads(birds.get_body())["request_id"] != json.loads(fish.get_body())["request_id"]
    assert fish.headers.get("Idempotent-Replayed") is None
    with store.transaction() as tx:
        assert [r.model for r in tx.open_requests("fish")] == ["fish"]  # carried out, not dropped
        assert tx.model_head("fish").paused is not None
        assert tx.model_head("birds").paused is not None
    assert (paused_birds.status_code, paused_fish.status_code) == (202, 202)


def test_an_idempotency_key_is_bound_to_the_body_sent_not_to_its_spelling_or_to_what_it_parses_into(h):
    """The fingerprint is over the body's JSON document: the same fields in another order or spacing
    are the same request (replayed); a field the body spells out that another leaves to its default
    is another body (409), though both parse into the same request."""
    h.uploads(6)
    first = post({"model": "birds", "force": True}, {"Idempotency-Key": "k-order"})
    respelled = call("retrain_http", func.HttpRequest(
        method="POST", url="/api/retrain", headers={"Idempotency-Key": "k-order"}, body=b'{ "force" : true,\n  "model": "birds" }',
    ))  # fmt: skip
    assert (first.status_code, respelled.status_code) == (202, 202)
    assert respelled.headers.get("Idempotent-Replayed") == "true"
    assert respelled.get_body() == first.get_body()
    defaulted = post({"model": "birds", "force": True, "reason": ""}, {"Idempotency-Key": "k-order"})
    assert defaulted.status_code == 409
    assert len(h.runs()) == 1


def test_the_functions_app_installs_log_redaction_when_it_builds_its_worker(tmp_path):
    """In a fresh interpreter, as on a cold start: the first invocation builds the worker and from then
    on every log line is one line with secrets masked."""
    import os

    from tests.conftest import ROOT

    program = (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='%(name)s %(message)s')\n"
        "from functions import runtime\n"
        "runtime.worker()\n"
        "logging.getLogger('retrain.functions').warning('blob %s', 'x\\nFORGED line AccountKey=c2VjcmV0c2VjcmV0c2VjcmV0==')\n"
    )
    env = {**os.environ, "RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"), "RETRAIN__WORKER__IMAGES_ROOT": str(tmp_path / "images"),
           "RETRAIN_CONFIG": "", "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "c2VjcmV0c2VjcmV0c2VjcmV0" not in done.stdout
    assert not any(line.startswith("FORGED") for line in done.stdout.splitlines())
    assert "retrain.functions blob x\\nFORGED line AccountKey=" in done.stdout


def test_the_workspace_topic_is_compared_without_regard_to_case(h, monkeypatch):
    """Azure resource ids are case-insensitive: Event Grid may send the workspace's id in another
    case than the app setting holds (the template writes it from resourceId())."""
    from functions.eventgrid_runs import status_message
    from shared.messages import RunStatusChanged

    monkeypatch.setenv("RETRAIN_AML_WORKSPACE_TOPIC", TOPIC.lower())
    message, why = status_message(
        eg("e1", "Microsoft.MachineLearningServices.RunCompleted", {"runId": "birds-0001-abcdef12-a1"}, topic=TOPIC.upper())
    )
    assert why is None
    assert isinstance(message, RunStatusChanged)
    monkeypatch.setenv("RETRAIN_AML_WORKSPACE_TOPIC", TOPIC.upper())
    _, foreign = status_message(
        eg("e2", "Microsoft.MachineLearningServices.RunCompleted", {"runId": "birds-0001-abcdef12-a1"}, topic=TOPIC + "2")
    )
    assert foreign == "event from another workspace"


# --- who may do what (App Service Authentication with Entra ID, or a function key) -------------


def principal(object_id="11111111-2222-3333-4444-555555555555", name="Ada Ops", roles=("Retrain.Operator",)) -> str:
    import base64

    claims = [{"typ": "http://schemas.microsoft.com/identity/claims/objectidentifier", "val": object_id}, {"typ": "name", "val": name}]
    claims += [{"typ": "roles", "val": role} for role in roles]
    body = {"auth_typ": "aad", "claims": claims, "name_typ": "name", "role_typ": "roles"}
    return base64.b64encode(json.dumps(body).encode()).decode()


def test_a_principal_header_while_the_platforms_authentication_is_off_is_refused_as_forged(h, monkeypatch):
    monkeypatch.delenv("WEBSITE_AUTH_ENABLED", raising=False)
    forged = {"X-MS-CLIENT-PRINCIPAL": principal(name="ceo@contoso.com")}
    for response in (control("pause", {"reason": "x"}, forged), post({"model": "birds", "force": True}, forged),
                     call("status_http", func.HttpRequest(method="GET", url="/api/status/birds", headers=forged, body=b"",
                                                          route_params={"model": "birds"}))):  # fmt: skip
        assert response.status_code == 401
        assert json.loads(response.get_body())["error"] == "forged_principal"
    assert h.head().paused is None


def test_with_entra_the_signed_in_principal_is_the_actor_and_its_app_roles_decide(h, monkeypatch):
    monkeypatch.setenv("RETRAIN_AUTH", "entra")
    monkeypatch.setenv("WEBSITE_AUTH_ENABLED", "True")
    reader = {"X-MS-CLIENT-PRINCIPAL": principal(object_id="r-1", name="Rita Reader", roles=("Retrain.Reader",))}
    operator = {"X-MS-CLIENT-PRINCIPAL": principal(object_id="o-1", name="Otto Operator", roles=("Retrain.Operator",))}
    assert control("pause", {"reason": "x"}).status_code == 401  # not signed in
    refused = control("pause", {"reason": "x"}, reader)
    assert refused.status_code == 403
    assert "Rita Reader has none of the app roles ['Retrain.Operator'] needed to control" in json.loads(refused.get_body())["description"]
    assert post({"model": "birds", "force": True}, reader).status_code == 403  # a reader may not request a run
    status = call(
        "status_http", func.HttpRequest(method="GET", url="/api/status/birds", headers=reader, body=b"", route_params={"model": "birds"})
    )
    assert status.status_code == 200
    paused = control("pause", {"reason": "label audit", "requested_by": "ceo@contoso.com"}, operator)
    assert paused.status_code == 202
    assert h.head().paused["by"] == "entra:o-1 (Otto Operator) (on behalf of ceo@contoso.com)"
    [event] = [e.payload["data"] for e in h.events() if e.type == "retrain.model.paused"]
    assert event["requested_by"].startswith("entra:o-1 (Otto Operator)")
    assert h.decisions()[0].reason.startswith("paused by entra:o-1 (Otto Operator)")


def test_entra_mode_without_the_platforms_authentication_is_a_configuration_error_not_an_open_door(h, monkeypatch):
    monkeypatch.setenv("RETRAIN_AUTH", "entra")
    monkeypatch.delenv("WEBSITE_AUTH_ENABLED", raising=False)
    response = control("pause", {"reason": "x"})
    assert response.status_code == 500
    assert json.loads(response.get_body())["error"] == "misconfigured"
    assert h.head().paused is None


def test_a_queue_message_records_the_queue_as_the_door_and_its_requester_as_an_unverified_claim(h, monkeypatch):
    monkeypatch.setenv("RETRAIN_REQUESTS_QUEUE", "retrain-requests")
    h.uploads(6)
    body = json.dumps({"model": "birds", "force": True, "requested_by": "ceo@contoso.com"}).encode()
    call("retrain_requested", sb(body, message_id="m-actor"))
    with h.store.transaction() as tx:
        requests = [r for r in tx.all_requests("birds") if r.request_id == "sb-m-actor"]
    assert [r.requested_by for r in requests] == ["queue retrain-requests: ceo@contoso.com (unverified)"]


def dashboard(headers=None, params=None):
    return call(
        "dashboard_http", func.HttpRequest(method="GET", url="/api/dashboard", headers=headers or {}, params=params or {}, body=b"")
    )


def test_the_deployed_dashboard_needs_a_signed_in_reader_and_never_a_key_in_its_url(h, monkeypatch):
    """The route takes no function key (a key in a page's URL ends up in history and proxy logs):
    it serves a principal with a Retrain role, and nobody when only function keys are in use."""
    monkeypatch.delenv("WEBSITE_AUTH_ENABLED", raising=False)
    off = dashboard()
    assert off.status_code == 403
    assert json.loads(off.get_body())["error"] == "sign_in_required"
    monkeypatch.setenv("RETRAIN_AUTH", "entra")
    monkeypatch.setenv("WEBSITE_AUTH_ENABLED", "True")
    assert dashboard().status_code == 401
    assert dashboard({"X-MS-CLIENT-PRINCIPAL": principal(roles=())}).status_code == 403
    page = dashboard({"X-MS-CLIENT-PRINCIPAL": principal(roles=("Retrain.Reader",))})
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    function = app_functions()["dashboard_http"]
    assert "anonymous" in str(function.get_bindings()[0].auth_level).lower()  # no key in the URL
    reader = {"X-MS-CLIENT-PRINCIPAL": principal(roles=("Retrain.Reader",))}
    assert dashboard(reader, {"model": "birds"}).status_code == 200  # the console's other pages, by query
    missing = dashboard(reader, {"run": "birds-0404", "format": "json"})
    assert (missing.status_code, missing.mimetype, json.loads(missing.get_body())) == (
        404,
        "application/json",
        {"error": "no run 'birds-0404' in the ledger"},
    )
    assert "script-src 'sha256-" in page.headers["Content-Security-Policy"]
