"""What a message brings besides itself and what handling it leaves for the caller: an HTTP
Idempotency-Key to remember (`Remember`), and the effects (`Effects`): runs to submit, complete or
cancel, a champion to tag, the outcome to answer with, a replayed answer (`Replayed`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.backfill import Backfill
from worker.policy import Decision


@dataclass(frozen=True)
class Remember:
    """An idempotency key with the request's fingerprint and the response to replay."""

    key: str
    fingerprint: str
    response: dict[str, Any]


@dataclass(frozen=True)
class Replayed:
    """The answer an Idempotency-Key already has: the fingerprint of the body it came with, and the response."""

    fingerprint: str
    response: dict[str, Any]


@dataclass
class Effects:
    """What the bus must do after the commit, and what to tell the caller."""

    planned_runs: list[str] = field(default_factory=list)
    completed_runs: list[str] = field(default_factory=list)  # succeeded runs awaiting completion
    champion_moved: list[str] = field(default_factory=list)  # models whose registry alias must follow the ledger
    cancel_runs: list[str] = field(default_factory=list)  # runs an operator asked to stop
    outcome: str = "ok"
    detail: str = ""
    decision: Decision | None = None  # what the policy decided on the message (requests), for the caller to show
    backfill: Backfill | None = None  # a request's images: found, missing, invalid, newly registered
    replay: Replayed | None = None  # outcome "replayed": the key's earlier answer

    @classmethod
    def replayed(cls, previous: tuple[str, dict[str, Any]]) -> Effects:
        fingerprint, response = previous
        return cls(outcome="replayed", detail="answered before under this Idempotency-Key", replay=Replayed(fingerprint, response))
