"""OrgBilling invalidates the gate after a write cancelled once Lago applied it, and not after a failed read.

* ``OrgBilling`` invalidates the gate around its writes "answered or not", but not when the write was cancelled (an
  ``anyio.move_on_after`` around ``change_plan``, a request's task group cancelled) once Lago had applied it: the
  invalidation in the ``finally`` was cancelled at its first await, and with the gate on Redis the fleet kept the
  org's old plan (an upgraded org still refused 429) until its next refresh.
* ``create_subscription`` (and ``subscribe_org_to_plan``) with a date read the customer's time zone inside the writes'
  invalidation: a failing read (Lago down, rate limited) dropped the org's gate state though nothing was written, and
  its requests, decided on their snapshot until then, waited for Lago and were refused 503 (``LAGO_FAIL_OPEN=false``).
"""

from __future__ import annotations

import datetime as dt
import uuid

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import Clock, chat, seed
from lago_org_billing import BillingSettings, LagoClient, LagoIntegrationError, OrgBilling, OrgBillingMiddleware
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "todays-changes-key"
#: org_1's calls (``seed``'s ``starter`` plan)
CALLS = 3
ORG = {"X-Org-Id": "org_1"}


def chat_app() -> Starlette:
    return Starlette(routes=[Route("/v1/chat", chat)])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    return seed(FakeLago(api_key=API_KEY, clock=clock.now), starter_calls=CALLS)


# ------------------------------------------------------------------------------ OrgBilling's invalidation


class CancelledOnceApplied(httpx.AsyncBaseTransport):
    """The emulator; the caller's cancel scope (``cutting``) cancelled once Lago applied ``POST /api/v1/subscriptions``,
    before its answer is read (a timeout of the caller's firing then)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.cutting: anyio.CancelScope | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.cutting is not None and request.method == "POST" and request.url.path == "/api/v1/subscriptions":
            self.cutting.cancel()
            await anyio.lowlevel.checkpoint()  # (the cancellation delivered here)
        return response


async def test_an_upgrade_cancelled_once_lago_applied_it_still_invalidates_the_fleet(
    fake: FakeLago, clock: Clock, redis: str | None
) -> None:
    """``change_plan`` to ``pro`` inside a cancel scope cancelled once Lago applied it (its answer never read): org_1,
    refused 429 on ``starter``, is served at its next request, in process and with the gate on Redis (there the
    invalidation of the fleet was cancelled in turn, and the org decided on its old snapshot)."""
    settings = BillingSettings(
        api_url=fake.base_url, api_key=API_KEY, org_header="X-Org-Id", max_retries=0, redis_url=redis
    )
    config = QuotaConfig(redis_prefix=f"inv:{uuid.uuid4().hex[:8]}:") if redis else QuotaConfig()
    cutting = CancelledOnceApplied(fake.transport())
    async with LagoClient(settings, transport=cutting) as lago:
        gate = QuotaGate(settings, lago, config=config, clock=clock.time)
        middleware = OrgBillingMiddleware(chat_app(), settings, client=lago, quota=gate)
        billing = OrgBilling(client=lago, middleware=middleware)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            before = [(await http.get("/v1/chat", headers=ORG)).status_code for _ in range(CALLS + 1)]
            with anyio.CancelScope() as scope:
                cutting.cutting = scope
                await billing.change_plan("org_1", "pro")
            cutting.cutting = None
            after = (await http.get("/v1/chat", headers=ORG)).status_code
        await middleware.aclose()
    assert scope.cancelled_caught
    assert before == [200] * CALLS + [429]
    assert [s["plan_code"] for s in fake.subscriptions if s["status"] == "active"] == ["pro"]  # (Lago applied it)
    assert after == 200


async def test_a_subscription_whose_customer_read_failed_leaves_the_gate_serving_on_its_snapshot(
    fake: FakeLago, clock: Clock
) -> None:
    """``create_subscription`` with a date reads the customer's time zone before it writes: that read failing (Lago's
    customer endpoints answer 503) writes nothing, and org_1, served on its snapshot before, is served on it after
    (``LAGO_FAIL_OPEN=false``: the gate's state dropped, it waited for a read of Lago failing in turn and answered
    503)."""
    settings = BillingSettings(
        api_url=fake.base_url, api_key=API_KEY, org_header="X-Org-Id", max_retries=0, fail_open=False
    )
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        middleware = OrgBillingMiddleware(chat_app(), settings, client=lago, quota=gate)
        billing = OrgBilling(client=lago, middleware=middleware)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            before = (await http.get("/v1/chat", headers=ORG)).status_code
            fake.inject_fault(503, path="/api/v1/customers")  # type: ignore[attr-defined]
            with pytest.raises(LagoIntegrationError):
                await billing.create_subscription("org_1", "pro", subscription_at=dt.date(2026, 4, 1))
            after = (await http.get("/v1/chat", headers=ORG)).status_code
            fake.faults.clear()  # type: ignore[attr-defined]
        await middleware.aclose()
    assert before == 200
    assert [s["plan_code"] for s in fake.subscriptions] == ["starter"]  # (nothing written)
    assert after == 200
