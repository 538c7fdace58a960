"""Service Bus publisher and injector at the azure-servicebus boundary, and secrets never leaking."""

from __future__ import annotations

import json
import logging

import pytest
from azure.servicebus import ServiceBusMessage
from azure.servicebus.exceptions import ServiceBusAuthenticationError, ServiceBusServerBusyError
from typer.testing import CliRunner

from shared import events as ev
from shared.messages import RetrainRequested
from shared.redact import install_log_redaction, redact
from tests.fakes.adapters import FakeBlobStore
from tests.fakes.servicebus import FakeServiceBusClient
from worker.adapters.azure import servicebus

pytestmark = pytest.mark.unit

SECRET = "c2VjcmV0LWtleS1kby1ub3QtbGVhaw=="
CONNECTION = f"Endpoint=sb://127.0.0.1/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={SECRET}"


def event(size: int = 10) -> dict:
    import datetime as dt

    e = ev.new_event(
        ev.RUN_SUBMITTED,
        "runs/birds-0001-abcd1234",
        {"run_id": "birds-0001-abcd1234", "pad": "x" * size},
        time=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    return e.to_json_dict()


def test_events_are_sent_with_the_event_id_as_message_id_and_cloudevents_properties():
    client = FakeServiceBusClient()
    servicebus.ServiceBusPublisher(client.factory(), "retrain-events").publish([event()])
    [(entity, message)] = client.sent
    assert entity == "topic:retrain-events"
    assert isinstance(message, ServiceBusMessage)
    e = event()
    assert message.message_id == e["id"]
    assert message.content_type.startswith("application/cloudevents+json")
    assert message.subject == ev.RUN_SUBMITTED
    properties = {k.decode() if isinstance(k, bytes) else k: v for k, v in message.application_properties.items()}
    assert properties["cloudEvents:type"] == ev.RUN_SUBMITTED
    assert properties["cloudEvents:id"] == e["id"]
    assert properties["cloudEvents:specversion"] == "1.0"
    assert properties["cloudEvents:source"] == "/retrain/worker"
    body = json.loads(b"".join(message.body))
    assert body == e


def test_an_event_over_the_size_limit_travels_as_a_blob_reference():
    client, blobs = FakeServiceBusClient(), FakeBlobStore()
    big = event(size=300_000)
    servicebus.ServiceBusPublisher(client.factory(), "t", oversize_store=blobs).publish([big])
    body = json.loads(b"".join(client.sent[0][1].body))
    assert body["id"] == big["id"]
    assert body["data"]["blob_reference"] == f"events/{big['id']}.json"
    assert json.loads(blobs.blobs[body["data"]["blob_reference"]]) == big


def test_events_that_fit_alone_but_not_together_are_sent_in_several_batches():
    """Two 150 KB events exceed one send's 256 KB; sent as one list, MessageSizeExceededError
    (permanent) left the outbox stuck on them forever."""
    client = FakeServiceBusClient()
    events = [event(size=150_000), event(size=150_000), event(), event()]
    events[1]["id"], events[2]["id"], events[3]["id"] = "e2", "e3", "e4"
    servicebus.ServiceBusPublisher(client.factory(), "t").publish(events)
    assert [m.message_id for _, m in client.sent] == [e["id"] for e in events]
    assert client.batches == [1, 3]  # the first alone; the second with the two small ones


def test_an_oversized_event_without_a_blob_store_is_a_permanent_error():
    with pytest.raises(servicebus.ServiceBusError) as exc:
        servicebus.ServiceBusPublisher(FakeServiceBusClient().factory(), "t").publish([event(size=300_000)])
    assert exc.value.transient is False


def test_transient_errors_are_retried_and_permanent_ones_are_not():
    client = FakeServiceBusClient()
    client.failures.extend([ServiceBusServerBusyError(message="busy"), ServiceBusServerBusyError(message="busy")])
    servicebus.ServiceBusPublisher(client.factory(), "t", attempts=5).publish([event()])
    assert len(client.attempts) == 3
    assert len(client.sent) == 1
    client = FakeServiceBusClient()
    client.failures.append(ServiceBusAuthenticationError(message="unauthorized"))
    with pytest.raises(servicebus.ServiceBusError) as exc:
        servicebus.ServiceBusPublisher(client.factory(), "t", attempts=5).publish([event()])
    assert exc.value.transient is False
    assert len(client.attempts) == 1


def test_the_injector_sends_the_request_with_its_id(monkeypatch, tmp_path):
    client = FakeServiceBusClient()
    request = RetrainRequested(message_id="req-9", model="birds", force=True)
    assert servicebus.ServiceBusInjector(client.factory(), "retrain-requests").send(request) == "req-9"
    [(entity, message)] = client.sent
    assert (entity, message.message_id) == ("queue:retrain-requests", "req-9")
    assert json.loads(b"".join(message.body))["force"] is True


def test_retrain_inject_to_servicebus_validates_then_sends(monkeypatch, tmp_path):
    from worker.app.cli import app

    client = FakeServiceBusClient()
    monkeypatch.setattr(servicebus, "client_factory", lambda **kw: client.factory())
    env = {
        "RETRAIN__WORKER__STATE_DIR": str(tmp_path),
        "RETRAIN_SERVICEBUS": CONNECTION,
        "RETRAIN_REQUESTS_QUEUE": "rq",
        "RETRAIN_CONFIG": "",
    }
    ok = CliRunner().invoke(
        app, ["inject", "--model", "birds", "--prefix", "chicken/", "--to", "servicebus", "--request-id", "bf-1"], env=env
    )
    assert ok.exit_code == 0, ok.output
    assert client.sent[0][1].message_id == "bf-1"
    bad = CliRunner().invoke(app, ["inject", "--model", "cats", "--force", "--to", "servicebus"], env=env)
    assert bad.exit_code == 2
    assert len(client.sent) == 1


@pytest.mark.parametrize(
    "text",
    [
        CONNECTION,
        f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={SECRET};EndpointSuffix=core.windows.net",
        f"https://acct.blob.core.windows.net/images?sv=2024&sig={SECRET}&se=2030",
        f"https://app.azurewebsites.net/api/retrain?code={SECRET}",
        f"Authorization: Bearer {SECRET}",
    ],
)
def test_redact_masks_every_kind_of_secret(text):
    assert SECRET not in redact(text)
    assert "***" in redact(text)


def test_a_real_sdk_failure_leaks_no_secret_into_logs_or_exceptions(caplog):
    """The real azure-servicebus client, a real connection string, a refused loopback connection."""
    install_log_redaction()
    caplog.set_level(logging.DEBUG)
    for name in ("azure", "azure.servicebus", "azure.servicebus._pyamqp", "retrain"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    logging.getLogger("retrain.test").debug("configured with %s", CONNECTION)
    make_client = servicebus.client_factory(connection=CONNECTION, retry_total=0, socket_timeout=2)
    publisher = servicebus.ServiceBusPublisher(make_client, "retrain-events", attempts=1)
    with pytest.raises(servicebus.ServiceBusError) as exc:
        publisher.publish([event()])
    assert SECRET not in str(exc.value)
    assert SECRET not in repr(exc.value)
    assert (exc.value.__cause__ is None and exc.value.__context__ is None) or SECRET not in str(exc.value.__context__)
    assert [r for r in caplog.records if r.name.startswith("azure")], "the SDK itself logged (not only this test)"
    assert SECRET not in caplog.text
    for record in caplog.records:
        assert SECRET not in record.getMessage()


@pytest.mark.parametrize("transient", [True, False])
def test_an_sdk_error_that_quotes_the_connection_string_leaves_redacted(transient, caplog):
    """The real SDK exception types, carrying the secret in their text (as some do for auth errors)."""
    from azure.servicebus.exceptions import ServiceBusAuthenticationError, ServiceBusConnectionError

    client = FakeServiceBusClient()
    kind = ServiceBusConnectionError if transient else ServiceBusAuthenticationError
    client.failures.extend([kind(message=f"could not open {CONNECTION}")] * 3)
    publisher = servicebus.ServiceBusPublisher(client.factory(), "retrain-events", attempts=3)
    install_log_redaction()
    with caplog.at_level(logging.DEBUG), pytest.raises(servicebus.ServiceBusError) as exc:
        publisher.publish([event()])
    assert exc.value.transient is transient
    assert SECRET not in str(exc.value)
    assert "***" in str(exc.value)
    assert SECRET not in caplog.text
