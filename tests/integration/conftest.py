"""Integration fixtures: one real Azurite per test session (Azure adapters are tested against it, not mocks)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.azurite import Azurite


@pytest.fixture(scope="session")
def azurite(tmp_path_factory) -> Iterator[Azurite]:
    """Started on first use, stopped by its PID at the end of the session; its data and output stay in pytest's tmp dir."""
    with Azurite(tmp_path_factory.mktemp("azurite")) as emulator:
        yield emulator
