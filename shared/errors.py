"""Errors both the entry points and the worker understand.

A permanent error (`InvalidMessage`) means retrying cannot help: the message is recorded as
rejected (dead-lettered, or answered with 400) with `reason` and `description`. Anything else a
handler raises is treated as transient, so the platform retries the delivery.
"""

from __future__ import annotations

from typing import Any


class RetrainError(Exception):
    """Base class for retrain's own errors."""


class InvalidMessage(RetrainError, ValueError):  # noqa: N818 - a message, not a program error
    """The message can never be processed as sent. `reason` is a short machine-readable code."""

    def __init__(self, reason: str, description: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(f"{reason}: {description}")
        self.reason = reason
        self.description = description
        self.errors = errors or []


class ConfigError(RetrainError, ValueError):
    """The configuration is unusable; raised at start with every problem listed."""
