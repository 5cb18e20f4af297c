"""Redis clients made from a URL reconnect a pooled connection Redis closed, instead of taking it for an outage.

redis-py 8 turns maintenance notifications on with RESP3, and with them on its pool hands out a connection the server
closed (a restart, its ``timeout`` dropping idle clients, a proxy doing the same) without reconnecting it: the next
command failed with "Connection closed by server". The quota gate already turned them off; the webhooks' dedupe did
not: the first webhook after such a drop went without dedupe (a Lago retry of it then ran its handlers twice).
``CLIENT KILL TYPE normal`` here is Redis closing every client connection, as its ``timeout`` does to idle ones.
"""

from __future__ import annotations

import logging
import uuid

import pytest
import redis.asyncio

from lago_org_billing._webhooks import RedisDedupe

pytestmark = pytest.mark.anyio


async def _drop_every_client(redis_url: str) -> None:
    killer = redis.asyncio.from_url(redis_url)
    try:
        await killer.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    finally:
        await killer.aclose()


async def test_the_webhooks_dedupe_claims_after_redis_closed_its_connections(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim after Redis closed the dedupe's pooled connection is made in Redis (a second claim sees it), with no
    outage logged."""
    prefix = f"test:{uuid.uuid4().hex}:"
    a, b = RedisDedupe(redis_url, prefix=prefix), RedisDedupe(redis_url, prefix=prefix)
    try:
        assert await a.claim("first") == "new"
        await _drop_every_client(redis_url)
        with caplog.at_level(logging.WARNING):
            assert await a.claim("second") == "new"
        assert await b.claim("second") == "processing"  # (claimed in Redis, not run without dedupe)
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        await a.aclose()
        await b.aclose()
