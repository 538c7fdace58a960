"""A stand-in for azure.servicebus.ServiceBusClient at its boundary: it records the real
ServiceBusMessage objects it is given and can fail in chosen ways. Sizes are the service's: a list
or a batch is checked with the SDK's own ServiceBusMessageBatch against the Standard tier's 256 KB,
so a send the service would refuse raises the SDK's MessageSizeExceededError here too."""

from __future__ import annotations

from collections import deque

from azure.servicebus import ServiceBusMessageBatch

MAX_BATCH_BYTES = 262144  # Standard tier: one message or one batch


class FakeSender:
    def __init__(self, client: FakeServiceBusClient, entity: str):
        self.client, self.entity = client, entity

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def create_message_batch(self, max_size_in_bytes=None):
        return ServiceBusMessageBatch(max_size_in_bytes=max_size_in_bytes or MAX_BATCH_BYTES)

    def send_messages(self, messages):
        self.client.attempts.append(self.entity)
        if self.client.failures:
            raise self.client.failures.popleft()
        if isinstance(messages, ServiceBusMessageBatch):
            listed = list(messages._messages)
        else:
            listed = messages if isinstance(messages, list) else [messages]
            as_batch = self.create_message_batch()
            for message in listed:
                as_batch.add_message(message)  # raises MessageSizeExceededError as the SDK does for a list too big for one send
        self.client.batches.append(len(listed))
        self.client.sent.extend((self.entity, m) for m in listed)


class FakeServiceBusClient:
    def __init__(self):
        self.sent: list = []
        self.batches: list[int] = []  # messages per successful send
        self.attempts: list[str] = []
        self.failures: deque = deque()

    def factory(self):
        return lambda: self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def get_topic_sender(self, topic_name):
        return FakeSender(self, f"topic:{topic_name}")

    def get_queue_sender(self, queue_name):
        return FakeSender(self, f"queue:{queue_name}")
