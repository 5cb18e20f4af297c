"""A ``LAGO_REDIS_URL`` naming a database Redis refuses (real ``redis-server`` processes on 127.0.0.1): a number past
its ``databases`` setting (``redis://host:6379/16`` on a default Redis: ``DB index is out of range``), or any but 0 on
a cluster-mode Redis (ElastiCache / Memorystore cluster mode, which the README says works with one shard: ``SELECT is
not allowed in cluster mode``). Every connection's ``SELECT`` fails, so no command of the quota backend ever runs.
That was said as an outage ("Redis ... failed ...: quota counting falls back to this process until it answers", a
WARNING), which no wait ends; now it is said once, as the setting to fix, as the other misconfigurations are."""

# ruff: noqa: F811 (the fixtures imported are the tests' parameters)
from __future__ import annotations

import logging
import time

import pytest

from _quota_app import REDIS_SERVER
from lago_org_billing._quota import QuotaConfig
from lago_org_billing._quota_redis import RedisBackend
from test_quota_redis import prefix  # noqa: F401 (its fixture)
from test_quota_redis_clusters_acls_and_tls import one_shard  # noqa: F401 (its fixture)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]


async def _said(
    url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> tuple[RedisBackend, list[logging.LogRecord]]:
    """Three rounds of checks (each past the retry interval) on ``url``: the backend, and what it said (WARNING and
    above)."""
    now = [1000.0]
    backend = RedisBackend(url, QuotaConfig(redis_prefix=prefix), clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="lago_org_billing.quota")
    try:
        for _round in range(3):
            outcome = await backend.reserve("org_1", time.time(), "blind", None)
            backend.settle("org_1", outcome.period, outcome.bucket, time.time(), tokens=1, billed=True)
            await backend.flush()
            now[0] += 3600  # (every retry interval over: Redis is asked again, an operator's fix ends it)
    finally:
        await backend.aclose()
    return backend, [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_database_past_the_ones_redis_has_is_said_as_the_setting_to_fix(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``/16`` on a Redis of 16 databases (0 to 15): said once, as an error naming the database and what to change,
    not as an outage; the worker counts in the process meanwhile and keeps asking Redis."""
    backend, records = await _said(redis_url.removesuffix("/0") + "/16", prefix, caplog)
    assert backend.stats["redis_fallback"] == 1 and backend.stats["redis_errors"] >= 3, backend.stats
    assert len(records) == 1 and records[0].levelno == logging.ERROR, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "DB index is out of range" in message and "LAGO_REDIS_URL" in message
    assert "databases" in message and "falls back until it answers" not in message


async def test_a_database_number_on_a_cluster_mode_redis_is_said_as_the_setting_to_fix(
    one_shard: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``/1`` on a cluster-mode Redis of one shard (which has database 0 only): said once, as an error saying to drop
    the database number, not as an outage retried forever."""
    backend, records = await _said(one_shard.removesuffix("/0") + "/1", prefix, caplog)
    assert backend.stats["redis_fallback"] == 1, backend.stats
    assert len(records) == 1 and records[0].levelno == logging.ERROR, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "SELECT is not allowed in cluster mode" in message and "database 0" in message
    assert "falls back until it answers" not in message
