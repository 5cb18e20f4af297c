"""Keeping cached plan/quota state fresh across a fleet (LAGO_REDIS_URL): Lago's webhooks reaching one worker,
and billing_routes' invalidations after writes."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import seed
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._webhooks import LagoWebhooks, MemoryDedupe
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


def limit_of(decision: Any) -> bytes:
    """The ``RateLimit-Limit`` the gate's decision gives the client (the org's calls limit)."""
    return dict(decision.headers)[b"ratelimit-limit"]


class HeldUsage(httpx.AsyncBaseTransport):
    """The emulator's transport; after ``hold()``, the next ``current_usage`` read is answered by Lago at once but
    handed back only when ``release`` is set: a refresh that has read the subscription and its entitlements (the plan)
    and waits for the usage."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.reached = anyio.Event()
        self.release = anyio.Event()
        self._armed = False

    def hold(self) -> None:
        self._armed = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self._armed and request.method == "GET" and request.url.path.endswith("/current_usage"):
            self._armed = False
            await response.aread()
            self.reached.set()
            await self.release.wait()
        return response


def receiver_app(receiver: LagoWebhooks) -> Starlette:
    return Starlette(routes=[Route("/webhooks/lago", receiver, methods=["POST"])])


async def test_plan_updated_webhook_on_one_worker_supersedes_another_workers_first_read_of_an_org(
    redis_url: str,
) -> None:
    """Two workers share Redis. Worker B reads a cold org's first snapshot (subscription and entitlements read: starter,
    2 calls) when the plan's entitlements are raised to 50 in Lago; Lago's signed ``plan.updated`` reaches worker A,
    answered 200. B then stores what it read before the change, with a fresh plan time: the whole fleet enforces the
    old limit until LAGO_QUOTA_PLAN_TTL, although the webhook was acknowledged."""
    fake = seed(FakeLago(api_key="k"), starter_calls=2)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, redis_url=redis_url)
    config = QuotaConfig(redis_prefix=f"audit:{uuid.uuid4().hex}:")
    held = HeldUsage(fake.transport())
    async with (
        LagoClient(settings, transport=fake.transport()) as lago_a,
        LagoClient(settings, transport=held) as lago_b,
    ):
        gate_a = QuotaGate(settings, lago_a, config=config)
        gate_b = QuotaGate(settings, lago_b, config=config)
        receiver = LagoWebhooks(client=lago_a, invalidate=gate_a, dedupe=MemoryDedupe())
        fake.webhook_dispatcher.configure(app=receiver_app(receiver))
        async with anyio.create_task_group() as tg:
            await tg.start(gate_a.run)
            await tg.start(gate_b.run)
            answered = anyio.Event()
            first: list[Any] = []

            async def request_on_worker_b() -> None:
                first.append(await gate_b.check("org_1"))  # cold: B reads the org from Lago
                answered.set()

            held.hold()
            tg.start_soon(request_on_worker_b)
            await held.reached.wait()  # B has read starter's entitlements (2 calls); its usage read goes on
            async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url) as admin:
                raised = await admin.patch(
                    "/api/v1/plans/starter/entitlements",
                    json={"entitlements": {"api_quota": {"max_api_calls": 50}}},
                    headers={"Authorization": "Bearer k"},
                )
                assert raised.status_code == 200, raised.text
            deliveries = await fake.webhook_dispatcher.deliver_pending()  # worker A gets plan.updated
            assert [(d.webhook_type, d.state) for d in deliveries] == [("plan.updated", "succeeded")]
            held.release.set()
            with anyio.fail_after(10):
                await answered.wait()
            gate_b.settle("org_1", first[0], tokens=0, billed=True)
            second = await gate_a.check("org_1")  # the org's 2nd call: within both limits
            gate_a.settle("org_1", second, tokens=0, billed=True)
            await gate_a.backend.flush()  # type: ignore[attr-defined]
            await gate_b.backend.flush()  # type: ignore[attr-defined]
            with anyio.fail_after(10):
                third = await gate_a.check("org_1")  # over starter's old 2 calls, within the new 50
            stored = await gate_a.backend.load("org_1")
            await gate_a.aclose()
            await gate_b.aclose()
            tg.cancel_scope.cancel()
    assert first[0].allowed and second.allowed
    assert third.allowed, (
        f"the org's 3rd call is refused ({dict(third.headers)}) on the limit plan.updated raised to 50; the fleet's "
        f"snapshot keeps calls_limit={stored.calls_limit if stored else None}, not marked to be read again"
    )


class AppliedThenHeld(httpx.AsyncBaseTransport):
    """The emulator's transport; the first ``POST /subscriptions`` is applied by Lago, and its answer held until the
    caller is cancelled (a request cut off once Lago made the change: its answer lost)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.applied = anyio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST" and request.url.path.endswith("/subscriptions") and not self.applied.is_set():
            await response.aread()
            self.applied.set()
            await anyio.sleep_forever()
        return response


async def test_plan_change_through_billing_routes_cut_off_after_lago_applied_it_still_invalidates_the_gate() -> None:
    """An org's admin upgrades starter (2 calls) to pro through ``PUT /billing/organizations/{org}/subscription``;
    Lago applies it, and the request is cancelled before Lago's answer arrives (a timeout middleware, the server
    cutting the request at shutdown). ``OrgBilling``'s own writes are shielded for exactly this ("a write cancelled
    once Lago applied it ... is an answer lost too"), but billing_routes' OrgBilling has no gate: its invalidation
    runs after the write and is never reached. The gate keeps deciding the upgraded org on starter (429 until the
    period's end) until its next refresh."""
    from lago_org_billing import billing_routes
    from lago_org_billing._billing import OrgBilling

    fake = seed(FakeLago(api_key="k"), starter_calls=2)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, usage_cache_ttl=3600)
    held = AppliedThenHeld(fake.transport())
    async with (
        LagoClient(settings, transport=fake.transport()) as lago,
        LagoClient(settings, transport=held) as routes_lago,
    ):
        gate = QuotaGate(settings, lago)
        router = billing_routes(OrgBilling(client=routes_lago), authorize=lambda request, org_id: True, invalidate=gate)
        app = Starlette()
        app.mount("/billing", router)
        async with anyio.create_task_group() as tg:
            await tg.start(gate.run)
            for _ in range(2):  # the org uses its starter calls
                decision = await gate.check("org_1")
                assert decision.allowed
                gate.settle("org_1", decision, tokens=0, billed=True)
            assert not (await gate.check("org_1")).allowed
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                with anyio.CancelScope() as request_scope:

                    async def cut_off_once_applied() -> None:
                        await held.applied.wait()
                        request_scope.cancel()

                    tg.start_soon(cut_off_once_applied)
                    await http.put("/billing/organizations/org_1/subscription", json={"plan_code": "pro"})
            now_in_lago = await lago.get_subscription("org_1")
            assert now_in_lago["plan_code"] == "pro"  # Lago made the upgrade
            with anyio.fail_after(10):
                after = await gate.check("org_1")
            await gate.aclose()
            tg.cancel_scope.cancel()
    assert after.allowed, f"the upgraded org is still refused on starter's limit: {dict(after.headers)}"
