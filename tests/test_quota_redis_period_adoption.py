"""The tokens of a request are counted in the billing period its event is billed in, on both quota backends.

The middleware settles a request's call when its response is over and its tokens once its event is built (in the
delivery pipeline, later), with an unreserved decision of the call's period. Lago bills the event by its timestamp (the
request's start): when a new period began in between (an upgrade, a new subscription at once; the period's end, a
downgrade switched there; the gate reading the new one first), the tokens of a call checked before it are the old
period's, not the new one's. These run the real middleware, gate and emulator on one settable clock (the middleware
dates events on it too), in process and on a real redis-server.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from _quota_app import BIG, SMALL, Clock, small_and_big_lago
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware, _middleware
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc
ORG = "org_1"
MID_MONTH = dt.datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
MONTH_END = dt.datetime(2026, 3, 31, 23, 59, 50, tzinfo=UTC)
APRIL = dt.datetime(2026, 4, 1, tzinfo=UTC)
#: Lago's reads (subscription, entitlements, usage): what an outage fails
READ_PATHS = ("/api/v1/subscriptions", "/api/v1/customers")


class Setup:
    """The emulator, the gate and the middleware around an app whose one route runs ``during`` (what happens while
    the request is served: after its check, before its end) and answers ``tokens`` tokens."""

    def __init__(self, fake: FakeLago, clock: Clock, gate: QuotaGate, app: OrgBillingMiddleware) -> None:
        self.fake = fake
        self.clock = clock
        self.gate = gate
        self.app = app
        self.during: Callable[[], Awaitable[None]] | None = None
        self.tokens = 0

    async def request(self) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://app") as http:
            return await http.post("/v1/chat", headers={"X-Org-Id": ORG})

    async def delivered(self) -> None:
        """Every event built and sent (its tokens settled in the gate then), and the gate's writes to Redis done."""
        assert await self.app.pipeline.flush(5)
        flush = getattr(self.gate.backend, "flush", None)
        if flush is not None:
            await flush()

    async def webhooks(self) -> None:
        """The emulator's subscription webhooks reach the app (``LagoWebhooks`` invalidates the org on them)."""
        self.fake.usage(ORG, ORG)  # (Lago's clock jobs: a pending downgrade switched at the biller's run)
        for webhook in self.fake.emitted_webhooks:
            if webhook["webhook_type"].startswith("subscription."):
                await self.gate.invalidate(ORG, webhook_type=webhook["webhook_type"])
        self.fake.emitted_webhooks.clear()

    async def another_request_decided(self) -> None:
        """Another request of the org, checked and released (the gate reads the org's current period for it)."""
        decision = await self.gate.check(ORG)
        assert decision.allowed and decision.headers, decision.problem
        self.gate.settle(ORG, decision, tokens=0, billed=False)

    def usage_in_lago(self) -> tuple[int, int]:
        """The calls and tokens Lago counts in the org's current period."""
        charge = self.fake.usage(ORG, ORG, billable_metric_code="api_call")["customer_usage"]["charges_usage"][0]
        return int(charge["events_count"]), int(float(charge["units"]))


@contextlib.asynccontextmanager
async def setup(
    start: dt.datetime, redis_url: str | None, monkeypatch: pytest.MonkeyPatch, *, fail_open: bool = False
) -> AsyncIterator[Setup]:
    clock = Clock(start)
    # (events dated on it)
    monkeypatch.setattr(_middleware, "time", types.SimpleNamespace(time=clock.time, monotonic=time.monotonic))
    fake = small_and_big_lago(clock, ORG)
    fake.emitted_webhooks.clear()
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key="k",
        org_header="X-Org-Id",
        max_retries=0,
        fail_open=fail_open,
        redis_url=redis_url,
    )
    prefix = f"adoption:{uuid.uuid4().hex[:8]}:"
    async with LagoClient(settings, transport=fake.transport()) as client:
        gate = QuotaGate(settings, client, config=QuotaConfig(redis_prefix=prefix, jitter=0.0), clock=clock.time)
        holder: list[Setup] = []

        async def chat(request: Request) -> Response:
            (world,) = holder
            if world.during is not None:
                await world.during()
            tokens = world.tokens
            return JSONResponse(
                {"usage": {"prompt_tokens": 1, "completion_tokens": tokens - 1, "total_tokens": tokens}}
            )

        app = OrgBillingMiddleware(
            Starlette(routes=[Route("/v1/chat", chat, methods=["POST"])]), settings, quota=gate, client=client
        )
        world = Setup(fake, clock, gate, app)
        holder.append(world)
        try:
            yield world
        finally:
            await app.aclose()
            await gate.aclose()


async def test_the_tokens_of_a_call_checked_before_an_upgrade_are_not_counted_in_the_new_period(
    redis: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request checked before the org's upgrade, whose event is built once the gate read the new period, has its
    tokens billed in the old period (its event's date), not counted in the new one.

    An upgrade in Lago starts a new subscription and period at once. The request began on the small plan; while it
    ran, the org was upgraded (the webhook reached the gate) and another request had the new period read. Its call
    was dropped from the new period's count when the response ended (checked before it began), but its 400 tokens,
    settled when its event was built, were counted there: the org, upgraded and with nothing used in the new period,
    was refused as over its 300 tokens, a sure block asking it back at the period's end."""
    async with setup(MID_MONTH, redis, monkeypatch) as w:

        async def upgraded_meanwhile() -> None:
            w.clock.advance(2)
            w.fake.add_subscription(ORG, "big", external_id=ORG)  # an upgrade: a new period from now on
            await w.webhooks()
            await w.another_request_decided()

        w.during, w.tokens = upgraded_meanwhile, 400
        assert (await w.request()).status_code == 200
        await w.delivered()
        assert w.usage_in_lago() == (0, 0)  # (billed to the old subscription, by its date)
        w.during, w.tokens = None, 10
        answer = await w.request()
        assert answer.status_code == 200, answer.text
        assert answer.headers["ratelimit-limit"] == str(BIG["max_api_calls"])
        await w.delivered()
        assert (await w.gate.enforce_usage_limits(ORG))["usage"] == {"max_api_calls": 1, "max_tokens": 10}


async def test_the_tokens_of_a_call_let_through_before_the_period_end_are_not_counted_in_the_next_one(
    redis: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request let through without a snapshot (``LAGO_FAIL_OPEN``, Lago's reads failing) just before the billing
    period's end, whose event is built once the gate read the next period, has its tokens billed in the period that
    ended, not counted in the next one (random sequences, seed 61).

    Lago's reads failed until after midnight; the request, checked at 23:59:50, ran past it, and another request had
    April read meanwhile. Its call was not counted in April (reserved before it), but its tokens, settled when its
    event was built with the empty period of a call decided without a snapshot, were: the org was refused on
    April's first request as over its token limit, with nothing used in April."""
    async with setup(MONTH_END, redis, monkeypatch, fail_open=True) as w:
        for path in READ_PATHS:
            w.fake.faults.inject(503, path=path)

        async def lago_back_after_midnight() -> None:
            w.clock.advance((APRIL - MONTH_END).total_seconds() + 30)  # (past the gate's backoff too)
            w.fake.faults.clear()
            await w.another_request_decided()

        w.during, w.tokens = lago_back_after_midnight, 200
        blind = await w.request()
        assert blind.status_code == 200 and "ratelimit-limit" not in blind.headers  # (decided without a snapshot)
        await w.delivered()
        assert w.usage_in_lago() == (0, 0)  # (billed in March, by its date)
        w.during, w.tokens = None, 10
        answer = await w.request()
        assert answer.status_code == 200, answer.text
        await w.delivered()
        assert (await w.gate.enforce_usage_limits(ORG))["usage"] == {"max_api_calls": 1, "max_tokens": 10}


async def test_the_tokens_of_a_call_in_flight_across_a_downgrades_switch_are_not_counted_after_it(
    redis: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request checked before the period's end, on a plan downgraded there, whose event is built once the gate
    read the next period (on the lower plan), has its tokens billed in the period that ended, not counted in the next.

    A downgrade takes effect at the period's end: Lago's biller, at its first run after the boundary (00:10),
    terminates the subscription and starts the new one, and their webhooks drop the org's snapshot. The new
    subscription's period, read with no snapshot of the old one left, was taken as one begun within the old counter's
    (as an upgrade's), whose calls' settles count in it: the request's 200 tokens, settled when its event was built,
    refused the org over the small plan's 150 with nothing used in the new period."""
    async with setup(MONTH_END, redis, monkeypatch) as w:
        w.fake.add_subscription(ORG, "big", external_id=ORG)  # an upgrade, at once
        w.fake.add_subscription(ORG, "small", external_id=ORG)  # then a downgrade: at the period's end
        await w.webhooks()
        await w.another_request_decided()

        async def switched_after_midnight() -> None:
            w.clock.advance((APRIL - MONTH_END).total_seconds() + 11 * 60)  # (past the biller's run at 00:10)
            await w.webhooks()  # (the switch: the old subscription terminated, the new one started)
            await w.another_request_decided()

        w.during, w.tokens = switched_after_midnight, 200
        assert (await w.request()).status_code == 200
        await w.delivered()
        assert w.usage_in_lago() == (0, 0)
        w.during, w.tokens = None, 10
        answer = await w.request()
        assert answer.status_code == 200, answer.text
        assert answer.headers["ratelimit-limit"] == str(SMALL["max_api_calls"])
        await w.delivered()
        assert (await w.gate.enforce_usage_limits(ORG))["usage"] == {"max_api_calls": 1, "max_tokens": 10}


async def test_the_tokens_of_a_call_checked_in_the_new_period_on_the_old_snapshot_count_there(
    redis: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tokens of a request checked after an upgrade began, on the snapshot of before it (the webhook not come
    yet), are counted in the new period once read: its event, dated after the upgrade, is billed there."""
    async with setup(MID_MONTH, redis, monkeypatch) as w:
        await w.another_request_decided()
        w.clock.advance(2)
        w.fake.add_subscription(ORG, "big", external_id=ORG)  # an upgrade; its webhook still on its way

        async def told_meanwhile() -> None:
            w.clock.advance(1)
            await w.webhooks()
            await w.another_request_decided()

        w.during, w.tokens = told_meanwhile, 120
        assert (await w.request()).status_code == 200
        await w.delivered()
        assert w.usage_in_lago() == (1, 120)
        # (counted here since the read, which Lago had not had the event for: the call and its tokens, once)
        assert (await w.gate.enforce_usage_limits(ORG))["usage"] == {"max_api_calls": 1, "max_tokens": 120}
