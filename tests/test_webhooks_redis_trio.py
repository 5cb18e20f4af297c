"""Webhook dedupe with ``LAGO_REDIS_URL`` under trio (``hypercorn -k trio``): the redis client runs only under
asyncio. Each delivery's claim raised, was logged as "dedupe unavailable (check Redis)" and the webhook was processed
without dedupe (Lago's retry of a delivery ran its handlers again); closing the receiver raised a ``TypeError``. The
dedupe now stays in the process, said once with what to do (a real ``redis-server`` on 127.0.0.1)."""

# ruff: noqa: F811 (the fixtures imported are the test's parameters)
from __future__ import annotations

import logging
from typing import Any

import pytest

from _quota_app import REDIS_SERVER
from test_quota_redis_recovery import port, redis_dir  # noqa: F401 (its fixtures)
from test_webhooks import SUB_STARTED, Calls, hmac_headers, hmac_receiver, post  # noqa: F401 (post: a fixture)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_a_delivery_sent_again_under_trio_runs_once_and_the_receiver_closes_cleanly(
    redis_url: str, post: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    calls = Calls()
    receiver = hmac_receiver(calls, redis_url=redis_url)
    headers = hmac_headers(SUB_STARTED, unique_key="same")
    try:
        first = await post(receiver, SUB_STARTED, headers)
        second = await post(receiver, SUB_STARTED, headers)
    finally:
        await receiver.aclose()  # raised TypeError (redis.asyncio's disconnect gathers asyncio futures)
    assert (first.status_code, first.json()["status"]) == (200, "processed")
    assert (second.status_code, second.json()["status"]) == (200, "duplicate")
    assert len(calls.events) == 1
    messages = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    said = [message for message in messages if "LAGO_REDIS_URL" in message]
    assert len(said) == 1 and "asyncio" in said[0] and "trio" in said[0], messages
