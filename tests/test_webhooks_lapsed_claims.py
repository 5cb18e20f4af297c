"""A worker whose claim on a delivery lapsed (its renewals lost for longer than ``processing_ttl``) and was taken by
another worker must not, when it gives up, drop the claim that is now the other worker's: Lago's next retry would
find the delivery unclaimed and run its handlers alongside the worker still processing it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio
from starlette.applications import Starlette
from starlette.routing import Route

from lago_org_billing import BillingSettings
from lago_org_billing._webhooks import LagoWebhooks, RedisDedupe, WebhookEvent, sign_hmac

pytestmark = pytest.mark.anyio

HMAC_KEY = "5d2b7f0e-lapsed-claims"
SETTINGS = BillingSettings(
    api_url="http://lago.test", api_key="secret-api-key", max_retries=0, webhook_hmac_key=HMAC_KEY
)
BODY = (
    b'{"webhook_type":"invoice.created","object_type":"invoice","organization_id":"lago-org",'
    b'"invoice":{"lago_id":"inv_1"}}'
)


def _headers(unique_key: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Lago-Signature": sign_hmac(BODY, HMAC_KEY),
        "X-Lago-Signature-Algorithm": "hmac",
        "X-Lago-Unique-Key": unique_key,
    }


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Any]:
    """A plain client of the test's Redis, to see and expire the dedupe keys as Redis would."""
    client = redis.asyncio.from_url(redis_url)
    yield client
    await client.aclose()


async def test_releasing_a_lapsed_claim_leaves_the_claim_another_worker_took(redis_url: str, store: Any) -> None:
    """The dedupe drops only its own claim: worker A's claim expired, worker B claimed the delivery, A released."""
    prefix = f"test:{uuid.uuid4().hex}:"
    a, b, c = (RedisDedupe(redis_url, prefix=prefix) for _ in range(3))
    try:
        assert await a.claim("k") == "new"
        await store.delete(prefix + "k")  # (A's claim lapsed: Redis expired it)
        assert await b.claim("k") == "new"
        await a.release("k")
        assert await c.claim("k") == "processing"  # B still holds it
        await b.complete("k")
        assert await c.claim("k") == "done"
    finally:
        for dedupe in (a, b, c):
            await dedupe.aclose()


async def test_a_released_claim_lets_the_retry_run_it(redis_url: str) -> None:
    """A worker's release of its own claim still frees the delivery for Lago's retry (what release is for)."""
    prefix = f"test:{uuid.uuid4().hex}:"
    a, b = (RedisDedupe(redis_url, prefix=prefix) for _ in range(2))
    try:
        assert await a.claim("k") == "new"
        await a.release("k")
        assert await b.claim("k") == "new"
        assert await a.claim("k") == "processing"
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_failing_worker_whose_claim_lapsed_does_not_let_a_retry_run_beside_the_new_owner(
    redis_url: str, store: Any
) -> None:
    """Two workers on one Redis: A's handler stalls past its claim, B takes Lago's retry and is still running it when
    A's handler fails. Lago's next retry is answered 409 (B is processing it), not run a third time at once."""
    prefix = f"test:{uuid.uuid4().hex}:"
    runs: list[str] = []
    a_running, b_running, a_answered = anyio.Event(), anyio.Event(), anyio.Event()
    a_may_fail, b_may_finish = anyio.Event(), anyio.Event()

    async def handler_a(event: WebhookEvent) -> None:
        runs.append("a")
        a_running.set()
        await a_may_fail.wait()
        raise RuntimeError("worker A's handler failed")

    async def handler_b(event: WebhookEvent) -> None:
        runs.append("b")
        b_running.set()
        await b_may_finish.wait()

    workers = {
        name: LagoWebhooks(SETTINGS, dedupe=RedisDedupe(redis_url, prefix=prefix), handlers={"*": handler})
        for name, handler in (("a", handler_a), ("b", handler_b))
    }
    clients = {
        name: httpx.AsyncClient(
            transport=httpx.ASGITransport(app=Starlette(routes=[Route("/wh", worker, methods=["POST"])])),
            base_url="http://app",
        )
        for name, worker in workers.items()
    }
    answers: dict[str, httpx.Response] = {}

    async def attempt(name: str, worker: str) -> None:
        answers[name] = await clients[worker].post("/wh", content=BODY, headers=_headers("delivery-1"))
        if name == "first":
            a_answered.set()

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(attempt, "first", "a")
                await a_running.wait()
                await store.delete(prefix + "delivery-1")  # (A's claim lapsed)
                tasks.start_soon(attempt, "retry", "b")
                await b_running.wait()
                a_may_fail.set()
                await a_answered.wait()
                await attempt("next retry", "a")
                b_may_finish.set()
            await attempt("last retry", "a")
    finally:
        for client in clients.values():
            await client.aclose()
        for worker in workers.values():
            assert isinstance(worker._dedupe, RedisDedupe)
            await worker._dedupe.aclose()
    assert answers["first"].status_code == 500
    assert answers["next retry"].status_code == 409, answers["next retry"].text
    assert answers["retry"].json()["status"] == "processed"
    assert answers["last retry"].json()["status"] == "duplicate"
    assert runs == ["a", "b"]
