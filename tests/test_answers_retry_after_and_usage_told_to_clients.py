"""What the gate tells a refused client: when to come back (``Retry-After``) and how much it has used.

* Lago answering the gate's reads 429 pauses every refresh of the process until Lago's reset (up to a minute, or a
  TTL). A cold org refused meanwhile (``LAGO_FAIL_OPEN=false``: 503), or an org blocked on a plan to be read again
  (``plan.updated``), was asked back after ``failure_backoff`` (5 s): a client honouring it was refused again and again
  until the pause was over, Lago never asked meanwhile. It is now asked back once the gate asks Lago again.
* A fail-open reservation that finds a snapshot another worker stored meanwhile, over the limit, is refused and its
  call released; the answer still counted that call: an org at its limit of 2 was told it had used 3.
"""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from _quota_app import Clock, chat, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware
from lago_org_billing._errors import LagoUnavailableError
from lago_org_billing._quota import PROBLEM_UNAVAILABLE, QuotaConfig, QuotaGate
from lago_org_billing._quota_local import LocalBackend
from lago_org_billing._snapshots import Mode, Outcome, Snapshot
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

#: Seconds Lago asks the gate to wait in its 429 (within the longest pause the gate keeps: a minute at the default TTL)
RESET = 40


class Throttling(httpx.AsyncBaseTransport):
    """The emulator, its subscription reads answered 429 with ``Retry-After`` while ``on`` (Lago's rate limit)."""

    def __init__(self, fake: FakeLago) -> None:
        self.inner = fake.transport()
        self.on = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.on and request.url.path.startswith("/api/v1/subscriptions/"):
            return httpx.Response(
                429, headers={"Retry-After": str(RESET)}, json={"status": 429, "error": "Too Many Requests"}
            )
        return await self.inner.handle_async_request(request)


async def test_a_503_while_lago_throttles_asks_the_client_back_once_the_gate_reads_lago_again() -> None:
    clock = Clock()
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=3)
    settings = BillingSettings(
        api_url=fake.base_url, api_key="k", org_header="X-Org-Id", max_retries=0, fail_open=False
    )
    throttling = Throttling(fake)
    throttling.on = True
    async with LagoClient(settings, transport=throttling) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        middleware = OrgBillingMiddleware(
            Starlette(routes=[Route("/v1/chat", chat)]), settings, quota=gate, client=lago
        )
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            refused = await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
            throttling.on = False  # Lago answers again; the gate waits out the reset it was given
            retry = int(refused.headers["retry-after"])
            clock.advance(retry)  # (a client honouring Retry-After)
            again = await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
        await middleware.aclose()
    assert refused.status_code == 503
    assert json.loads(refused.content)["type"] == PROBLEM_UNAVAILABLE
    assert RESET <= retry <= RESET + 2  # (was 5: failure_backoff, refused again at each of 8 returns)
    assert again.status_code == 200, (again.status_code, again.text)


async def test_a_block_on_a_plan_to_read_again_while_lago_throttles_asks_the_client_back_after_the_pause() -> None:
    clock = Clock()
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=2)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    throttling = Throttling(fake)
    async with LagoClient(settings, transport=throttling) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(cold_timeout=0.5), clock=clock.time)
        for _ in range(2):
            decision = await gate.check("org_1")
            assert decision.allowed
            gate.settle("org_1", decision, tokens=0, billed=True)
        assert not (await gate.check("org_1")).allowed
        fake.store.plans["starter"]["entitlements"]["api_quota"]["max_api_calls"] = 50
        await gate.invalidate_all()  # plan.updated: the block is to be decided on the new plan
        throttling.on = True
        blocked = await gate.check("org_1")
        throttling.on = False
        retry = int(dict(blocked.headers)[b"retry-after"])
        clock.advance(retry)
        allowed = await gate.check("org_1")
        await gate.aclose()
    assert (blocked.allowed, blocked.status) == (False, 429)
    assert RESET <= retry <= RESET + 2  # (was 5: the plan could not be read before the pause's end)
    assert blocked.problem is not None and blocked.problem["retry_after"] == retry
    assert allowed.allowed  # read again then: the new plan's limit


class AppearingBackend(LocalBackend):
    """Another worker stores the org's snapshot (at its limit) between the check's reservation and the fail-open one
    (with Redis, two round trips apart)."""

    def __init__(self, config: QuotaConfig, late: Snapshot) -> None:
        super().__init__(config)
        self.late = late

    async def reserve(self, org_id: str, now: float, mode: Mode, known: Snapshot | None) -> Outcome:
        if mode == "blind":
            self.store_now(org_id, self.late, now)
        return self.reserve_now(org_id, now, mode)


class Down:
    """The gate's Lago client, its subscription reads failing (Lago down)."""

    def __init__(self, inner: LagoClient) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def get_subscription(self, external_id: str, **params: object) -> object:
        raise LagoUnavailableError("Lago is down")


async def test_a_fail_open_reservation_refused_on_a_snapshot_come_meanwhile_tells_the_usage_it_has() -> None:
    clock = Clock()
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=2)
    now = clock.time()
    at_limit = Snapshot(
        active=True,
        plan_code="starter",
        calls_limit=2,
        period_start=now - 86400,
        period_end=now + 86400,
        base_calls=2,
        requested_at=now,
        fetched_at=now,
        plan_fetched_at=now,
        refresh_at=now + 30,
        version="other-worker",
    )
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        config = QuotaConfig(cold_timeout=0.05)
        backend = AppearingBackend(config, at_limit)
        gate = QuotaGate(settings, lago, backend=backend, config=config, clock=clock.time)
        gate.client = Down(lago)  # type: ignore[assignment]
        decision = await gate.check("org_1")
        await gate.aclose()
    assert (decision.allowed, decision.status) == (False, 429)
    assert decision.problem is not None
    assert decision.problem["usage"] == 2  # (was 3: the released call counted)
    assert "has used 2 of the 2 API calls" in decision.problem["detail"]
    assert dict(decision.headers)[b"ratelimit-remaining"] == b"0"
    assert backend._orgs["org_1"].counts.calls == 0  # (released: nothing in flight)
