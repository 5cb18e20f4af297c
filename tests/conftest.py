from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio."""
    return "asyncio"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server on 127.0.0.1 for the module (skipped when not installed; .ci/run installs it)."""
    from _quota_app import REDIS_SERVER, redis_server

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(autouse=True)
def _clean_lago_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never see LAGO_* variables of the machine they run on."""
    for name in list(os.environ):
        if name.startswith("LAGO_"):
            monkeypatch.delenv(name)
    yield
