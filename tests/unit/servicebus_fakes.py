"""A stand-in for azure.servicebus.ServiceBusClient at its boundary: it records the real
ServiceBusMessage objects it is given and can fail in chosen ways."""

from __future__ import annotations

from collections import deque


class FakeSender:
    def __init__(self, client: FakeServiceBusClient, entity: str):
        self.client, self.entity = client, entity

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def send_messages(self, messages):
        self.client.attempts.append(self.entity)
        if self.client.failures:
            raise self.client.failures.popleft()
        self.client.sent.extend((self.entity, m) for m in (messages if isinstance(messages, list) else [messages]))


class FakeServiceBusClient:
    def __init__(self):
        self.sent: list = []
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
