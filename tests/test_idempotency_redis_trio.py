"""Idempotency keys with ``LAGO_REDIS_URL`` under trio (``hypercorn -k trio``): the redis client runs only under
asyncio. Each request's Redis call raised (logged as an outage), and closing the client raised at shutdown (a
``TypeError`` out of ``aclose()``, the lifespan's shutdown). The first timestamps now stay in the process, as while
Redis is down: a retry is still one event, the reason is said once, and the shutdown is clean (a real
``redis-server`` on 127.0.0.1)."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import REDIS_SERVER, chat
from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing.testing import FakeLago
from test_quota_redis_recovery import port, redis_dir  # noqa: F401 (its fixtures)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_retried_request_under_trio_is_one_event_and_the_shutdown_is_clean(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    lago = FakeLago(api_key="k")
    settings = BillingSettings(
        api_url=lago.base_url, api_key="k", max_retries=0, redis_url=redis_url, org_header="x-org-id", quota_mode="off"
    )
    app = Starlette(routes=[Route("/v1/chat", chat, methods=["POST"])])
    middleware = OrgBillingMiddleware(
        app, settings=settings, transport=lago.transport(), idempotency_header="Idempotency-Key"
    )
    statuses: list[int] = []
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(middleware), base_url="http://t") as http:
            for _ in range(2):
                response = await http.post("/v1/chat", headers={"x-org-id": "org_1", "Idempotency-Key": "k1"}, json={})
                statuses.append(response.status_code)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()  # raised TypeError (redis.asyncio's disconnect gathers asyncio futures)
    assert statuses == [200, 200]
    events: list[Any] = lago.events
    assert len(events) == 1 and events[0]["properties"]["org_id"] == "org_1"
    messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    said = [message for message in messages if "LAGO_REDIS_URL" in message]
    assert len(said) == 1 and "asyncio" in said[0] and "trio" in said[0], messages
    assert not any("unavailable" in message for message in messages), messages
