"""A call is counted against the billing period its event is billed in, also when it is checked after that period began.

The middleware dates a request's usage event at the request's start (``started = time.time()``, before the org is
resolved), while the gate decides the call on its own clock when it checks (after the org is resolved, after a cold
org's wait for Lago, or inside the app with ``require_quota``). A request that starts in one billing period and is
checked in the next is reserved against the new period's limit but billed by Lago in the old one.

A settable clock drives the emulator, the gate and the middleware's wall clock; no sleeps as synchronisation.
"""

from __future__ import annotations

import datetime as dt
import time
import types
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc
MARCH_END = dt.datetime(2026, 4, 1, tzinfo=UTC)  # org_1 (UTC customer, calendar billing) starts April here


def _event_time(event: dict[str, Any]) -> float:
    value = event.get("timestamp")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


async def test_a_request_begun_in_a_full_period_and_checked_in_the_next_is_not_billed_over_the_old_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """org_1 may make 2 calls per period and made both in March. A third request comes in at 23:59:59.5 on March 31;
    its org is resolved by an async resolver (a database or JWKS lookup) that returns at 00:00:00.5 on April 1, when
    the gate decides it on April's (rolled-over) snapshot: allowed. Its event is dated at the request's start, so
    Lago bills it in March: 3 calls billed in a period whose limit is 2 (and April's local count holds a call Lago
    never counts there). The call should be decided in the period it is billed in (refused: March is full), or its
    event dated in the period it was counted in (April)."""
    clock = Clock(MARCH_END - dt.timedelta(minutes=1))
    # (the middleware's wall clock, which dates events, is the test's clock too)
    monkeypatch.setattr(
        "lago_org_billing._middleware.time", types.SimpleNamespace(time=clock.time, monotonic=time.monotonic)
    )
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=2)
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)

    async def resolve_org(scope: Any) -> str:
        headers = dict(scope["headers"])
        if headers.get(b"x-slow") == b"1":
            clock.at = MARCH_END + dt.timedelta(seconds=0.5)  # the lookup returns after the boundary
        return "org_1"

    async def ok(request: Request) -> Response:
        return JSONResponse({})

    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        middleware = OrgBillingMiddleware(
            Starlette(routes=[Route("/v1/chat", ok)]), settings, quota=gate, client=lago, resolve_org=resolve_org
        )
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
                for _ in range(2):
                    assert (await http.get("/v1/chat")).status_code == 200
                clock.at = MARCH_END - dt.timedelta(seconds=0.5)
                third = await http.get("/v1/chat", headers={"x-slow": "1"})
                assert await middleware.pipeline.flush(5)
        finally:
            await middleware.aclose()
    billed_in_march = [event for event in fake.events if _event_time(event) < MARCH_END.timestamp()]
    assert len(billed_in_march) <= 2, (
        f"the third request was answered {third.status_code} and its event dated "
        f"{[e.get('timestamp') for e in fake.events][-1]}: Lago bills {len(billed_in_march)} calls in March, "
        "whose limit is 2"
    )
    assert third.status_code == 200  # counted in April (its snapshot rolled over): billed there, from its start
    assert _event_time(fake.events[-1]) == MARCH_END.timestamp()
