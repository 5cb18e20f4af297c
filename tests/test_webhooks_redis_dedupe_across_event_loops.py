"""Webhook dedupe in Redis for a receiver served on one event loop after another: a loop per request (Starlette's
``TestClient`` without ``with``) or per test (a module's app under pytest's anyio plugin). The pool's connections
of the loop before were used on the next one, where each failed ("attached to a different loop"): that delivery's
claim was logged as Redis being unavailable and it ran without dedupe, so a delivery Lago sent again ran its handlers
again. The dedupe now drops another loop's connections first (a real ``redis-server`` on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from typing import Any

import httpx
import pytest

from _quota_app import REDIS_SERVER
from test_webhooks import SUB_STARTED, Calls, app_for, hmac_headers, hmac_receiver

pytestmark = [
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"),
    # (the sockets of the loops that ended: dropped, not closed, as a loop's transports close on their own loop only;
    # collected in the test that left them)
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


def _dedupe_unavailable(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if "dedupe unavailable" in record.getMessage()]


def test_a_delivery_sent_again_through_a_test_client_without_with_runs_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request of a ``TestClient`` used without ``with`` runs on an event loop of its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (starlette's note on httpx, where it is said)
        from starlette.testclient import TestClient

    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    calls = Calls()
    receiver = hmac_receiver(calls, redis_url=redis_url)
    client = TestClient(app_for(receiver))
    answers = []
    for delivery in range(3):
        headers = hmac_headers(SUB_STARTED, unique_key=f"loops-client-{delivery}")
        answers.append([client.post("/webhooks/lago", content=SUB_STARTED, headers=headers).json()["status"]])
        answers[-1].append(client.post("/webhooks/lago", content=SUB_STARTED, headers=headers).json()["status"])
    del client, receiver
    gc.collect()
    assert answers == [["processed", "duplicate"]] * 3
    assert len(calls.events) == 3
    assert _dedupe_unavailable(caplog) == []


def test_a_receiver_served_on_one_event_loop_then_another_keeps_its_dedupe(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver made once (a module's app), served by one test's loop, then by the next test's."""
    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    calls = Calls()
    receiver = hmac_receiver(calls, redis_url=redis_url)
    headers = hmac_headers(SUB_STARTED, unique_key="loops-tests")

    async def deliver(app: Any) -> Any:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            response = await client.post("/webhooks/lago", content=SUB_STARTED, headers=headers)
        return response.json()["status"]

    first = asyncio.run(deliver(app_for(receiver)))  # (the first test's loop)
    again = asyncio.run(deliver(app_for(receiver)))  # (Lago's retry, in the next test's loop)
    closing = asyncio.run(receiver.aclose())
    del receiver
    gc.collect()
    assert (first, again, closing) == ("processed", "duplicate", None)
    assert len(calls.events) == 1
    assert _dedupe_unavailable(caplog) == []
