"""Service Bus adapters: the outbox relay's publisher (a topic) and the request injector (a queue).

Both take a factory for an `azure.servicebus.ServiceBusClient`, built from a connection string
or from a fully qualified namespace with `DefaultAzureCredential`. Sends are retried with
tenacity on transient errors only; every error that leaves this module is redacted, because the
SDK's messages can carry the connection string.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_random_exponential

from shared.messages import MAX_MESSAGE_BYTES
from shared.redact import redact
from worker.ports import BlobStore, Publisher

log = logging.getLogger("retrain.servicebus")
CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"


class ServiceBusError(RuntimeError):
    """A send failed; the message is redacted. `transient` says whether a later retry may succeed."""

    def __init__(self, message: str, transient: bool):
        super().__init__(redact(message))
        self.transient = transient


def client_factory(connection: str | None = None, namespace: str | None = None, **client_kwargs: Any) -> Callable[[], Any]:
    """A connection string, or a namespace (`<name>.servicebus.windows.net`) with DefaultAzureCredential."""
    if bool(connection) == bool(namespace):
        raise ValueError("give exactly one of a connection string or a fully qualified namespace")
    if connection:
        from azure.servicebus import parse_connection_string

        parse_connection_string(connection)  # a malformed one fails here, when the worker is wired, not at the first send

    def build() -> Any:
        from azure.servicebus import ServiceBusClient

        if connection:
            return ServiceBusClient.from_connection_string(connection, **client_kwargs)
        from azure.identity import DefaultAzureCredential

        if not namespace:
            raise ValueError("a Service Bus connection string or namespace is needed")
        return ServiceBusClient(namespace, DefaultAzureCredential(), **client_kwargs)

    return build


def is_transient(exc: BaseException) -> bool:
    """Busy, connection, communication and timeout errors may pass; auth, quota, size, missing entity will not."""
    from azure.servicebus.exceptions import (
        OperationTimeoutError,
        ServiceBusCommunicationError,
        ServiceBusConnectionError,
        ServiceBusServerBusyError,
    )

    if isinstance(exc, ServiceBusError):
        return exc.transient
    return isinstance(
        exc,
        ServiceBusServerBusyError
        | ServiceBusConnectionError
        | ServiceBusCommunicationError
        | OperationTimeoutError
        | TimeoutError
        | ConnectionError,
    )


def _send_in_batches(sender: Any, messages: list[Any]) -> None:
    """As many messages per send as the entity's size limit allows (the SDK's batch measures them).

    A list of messages is one send and must fit in one message's limit (256 KB on Standard): two
    150 KB events together do not, though each does alone. A batch that was sent stays sent if a
    later one fails; sending it again on retry is harmless, because the message id is the event id
    and the topic drops duplicates.
    """
    batch = sender.create_message_batch()
    for message in messages:
        try:
            batch.add_message(message)
        except ValueError:  # MessageSizeExceededError: this batch is full
            if len(batch) == 0:
                raise  # one message over the limit on its own: the publisher keeps events below it
            sender.send_messages(batch)
            batch = sender.create_message_batch()
            batch.add_message(message)
    if len(batch):
        sender.send_messages(batch)


def _send(make_client: Callable[[], Any], entity: str, kind: str, messages: list[Any], attempts: int, max_seconds: float) -> None:
    def once() -> None:
        try:
            with make_client() as client:
                sender = client.get_topic_sender(entity) if kind == "topic" else client.get_queue_sender(entity)
                with sender:
                    _send_in_batches(sender, messages)
        except ServiceBusError:
            raise
        except Exception as exc:
            raise ServiceBusError(
                f"sending to {kind} {entity!r} failed: {exc.__class__.__name__}: {exc}", transient=is_transient(exc)
            ) from None

    for attempt in Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_random_exponential(multiplier=0.2, max=5),
        stop=stop_after_attempt(attempts) | stop_after_delay(max_seconds),
        reraise=True,
    ):
        with attempt:
            once()


class ServiceBusPublisher(Publisher):
    """CloudEvents to a topic: message id = event id (duplicate detection), attributes as properties."""

    def __init__(
        self,
        make_client: Callable[[], Any],
        topic: str,
        *,
        oversize_store: BlobStore | None = None,
        attempts: int = 5,
        max_seconds: float = 60,
    ):
        self.make_client, self.topic = make_client, topic
        self.oversize_store = oversize_store
        self.attempts, self.max_seconds = attempts, max_seconds

    def message_for(self, event: Mapping[str, Any]) -> Any:
        from azure.servicebus import ServiceBusMessage

        body = json.dumps(event, sort_keys=True, separators=(",", ":"))
        if len(body.encode()) > MAX_MESSAGE_BYTES - 8 * 1024:  # headroom for properties and framing
            body = json.dumps(self._by_reference(event, body), sort_keys=True, separators=(",", ":"))
        properties: dict[str | bytes, Any] = {
            f"cloudEvents:{key}": str(event[key]) for key in ("specversion", "id", "source", "type", "time", "subject") if key in event
        }
        return ServiceBusMessage(
            body, message_id=event["id"], content_type=CONTENT_TYPE, subject=event.get("type"), application_properties=properties
        )

    def _by_reference(self, event: Mapping[str, Any], body: str) -> dict[str, Any]:
        if self.oversize_store is None:
            raise ServiceBusError(
                f"event {event['id']} is {len(body)} bytes, over the Service Bus limit, and no blob store is configured", transient=False
            )
        path = f"events/{event['id']}.json"
        self.oversize_store.write_once(path, body.encode())
        slim = {k: v for k, v in event.items() if k != "data"}
        slim["data"] = {"blob_reference": path, "bytes": len(body.encode()), "type": event.get("type")}
        return slim

    def publish(self, events: list[Mapping[str, Any]]) -> None:
        if not events:
            return
        _send(self.make_client, self.topic, "topic", [self.message_for(e) for e in events], self.attempts, self.max_seconds)
        log.info("published %d events to topic %s", len(events), self.topic)


class ServiceBusInjector:
    """Sends a validated RetrainRequested to the requests queue (what `retrain inject --to servicebus` does)."""

    def __init__(self, make_client: Callable[[], Any], queue: str, *, attempts: int = 5, max_seconds: float = 60):
        self.make_client, self.queue = make_client, queue
        self.attempts, self.max_seconds = attempts, max_seconds

    def send(self, request: Any) -> str:
        from azure.servicebus import ServiceBusMessage

        body = request.model_dump_json(exclude_none=True)
        message = ServiceBusMessage(body, message_id=request.message_id, content_type="application/json", subject=request.kind)
        _send(self.make_client, self.queue, "queue", [message], self.attempts, self.max_seconds)
        return str(request.message_id)
