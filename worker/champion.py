"""How the champion moves on a model's head: a new champion (the gate registered it, or an operator
promoted it) remembers the one it replaces; a rollback returns to an earlier one."""

from __future__ import annotations

from worker.store import ModelHead

CHAMPIONS_REMEMBERED = 20  # earlier champions a rollback can return to


def crown(head: ModelHead, version: int, model_sha256: str | None) -> None:
    """`version` is the champion; the one it replaces is remembered (`retrain rollback` returns to it)."""
    if head.champion_version is not None:
        head.previous_champions = [*head.previous_champions, head.champion_version][-CHAMPIONS_REMEMBERED:]
    head.champion_version, head.champion_sha256 = version, model_sha256


def roll_back(head: ModelHead, version: int, model_sha256: str | None) -> None:
    """Return to an earlier champion: the history down to it is consumed (a second rollback goes further back)."""
    history = head.previous_champions
    head.previous_champions = history[: len(history) - history[::-1].index(version) - 1]
    head.champion_version, head.champion_sha256 = version, model_sha256
