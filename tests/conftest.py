from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio."""
    return "asyncio"


@pytest.fixture(autouse=True)
def _clean_lago_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never see LAGO_* variables of the machine they run on."""
    for name in list(os.environ):
        if name.startswith("LAGO_"):
            monkeypatch.delenv(name)
    yield
