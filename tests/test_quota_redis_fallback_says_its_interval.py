"""The warning of a Redis gate falling back to counting in process says the retry interval it uses
(``LAGO_QUOTA_REDIS_RETRY``): a fractional one was printed rounded, 0.5 s as "retry every 0 s", 2.5 s as "2 s".
Found by an audit of the Redis backend (connections refused on a port nothing listens on: no Redis needed)."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from lago_org_billing._quota import QuotaConfig
from lago_org_billing._quota_redis import RedisBackend

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("interval", "said"), [(0.5, "0.5"), (2.5, "2.5"), (5.0, "5")])
async def test_the_fallback_warning_says_the_retry_interval_used(
    caplog: pytest.LogCaptureFixture, interval: float, said: str
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # (closed again: nothing listens there)
    backend = RedisBackend(f"redis://127.0.0.1:{port}/0", QuotaConfig(redis_retry_interval=interval, redis_timeout=0.5))
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.quota"):
        await backend.reserve("org_1", time.time(), "normal", None)
    await backend.aclose()
    assert f"falls back to this process until it answers (retry every {said} s)" in caplog.text, caplog.text
