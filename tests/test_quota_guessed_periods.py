"""The period guessed when Lago gives none (``_calendar_period``): an older Lago serving no
``current_billing_period_*``, a plan with no charge on the metric (Lago counts nothing: every count is the gate's own,
kept under the period's key), so the guessed period is what resets the org's usage."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import pytest

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc


class OldLago(httpx.AsyncBaseTransport):
    """The emulator as an older Lago: subscriptions without entitlements and without the given
    ``current_billing_period_*`` fields (``drop``)."""

    def __init__(self, fake: FakeLago, drop: tuple[str, ...]) -> None:
        self.inner = fake.transport()
        self.drop = ("entitlements", *drop)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        path = request.url.path
        if response.status_code == 200 and path.startswith("/api/v1/subscriptions/") and request.method == "GET":
            body = response.json()
            if isinstance(body.get("subscription"), dict):
                for key in self.drop:
                    body["subscription"].pop(key, None)
                return httpx.Response(200, json=body)
        return httpx.Response(response.status_code, content=response.content, headers=response.headers)


def lago_with(clock: Clock, **subscription: Any) -> FakeLago:
    """``org_1`` on ``nocharge`` (no charge on ``api_call``: Lago counts none of its calls), subscribed with
    ``subscription``'s fields."""
    fake = seed(FakeLago(api_key="k", clock=clock.now))
    fake.add_plan("nocharge", amount_cents=100)
    fake.add_customer("org_2")
    fake.add_subscription("org_2", "nocharge", **subscription)
    return fake


async def allowed(gate: QuotaGate, tries: int) -> list[bool]:
    return [(await gate.check("org_2")).allowed for _ in range(tries)]


async def settle_refreshes(gate: QuotaGate) -> None:
    while gate._refreshing:
        for event in list(gate._refreshing.values()):
            await event.wait()


DROPS = {
    "none": ("current_billing_period_started_at", "current_billing_period_ending_at"),
    "no-end": ("current_billing_period_ending_at",),
    "no-start": ("current_billing_period_started_at",),
}


@pytest.mark.parametrize("drop", list(DROPS), ids=list(DROPS))
async def test_anniversary_plan_usage_is_not_reset_at_the_calendar_boundary(drop: str) -> None:
    """An anniversary subscription (Jan 25 to Feb 25) on a Lago giving no (or half a) billing period: the gate's
    count, the only one, goes on past Feb 1 (the calendar guess's end) until Feb 25, not back to 0 mid-period; the
    reset time given to clients is Feb 25."""
    clock = Clock(dt.datetime(2026, 1, 28, 12, 0, tzinfo=UTC))
    fake = lago_with(clock, billing_time="anniversary", subscription_at="2026-01-25T00:00:00Z")
    async with LagoClient(
        BillingSettings(api_url="http://lago.test", api_key="k", max_retries=0),
        transport=OldLago(fake, DROPS[drop]),
    ) as client:
        settings = client.settings.replace(plan_limits={"nocharge": {"max_api_calls": 3}})
        gate = QuotaGate(settings, client, config=QuotaConfig(), clock=clock.time)
        assert await allowed(gate, 4) == [True, True, True, False]
        assert (await gate.snapshot("org_2")).period_end == dt.datetime(2026, 2, 25, tzinfo=UTC).timestamp()
        clock.at = dt.datetime(2026, 2, 2, 12, 0, tzinfo=UTC)  # after the calendar month, within the anniversary one
        await settle_refreshes(gate)
        assert await allowed(gate, 2) == [False, False]
        clock.at = dt.datetime(2026, 2, 25, 0, 10, tzinfo=UTC)  # the real boundary: a new period
        await allowed(gate, 1)
        await settle_refreshes(gate)
        assert await allowed(gate, 4) == [True, True, False, False]


async def test_calendar_plan_without_period_keeps_its_count_across_plan_rereads() -> None:
    """Only the end given (no start): the period's start (its counter key) is not ``now`` of each subscription read,
    which made the gate's own count (Lago counts nothing) go back to 0 at every plan re-read."""
    clock = Clock(dt.datetime(2026, 3, 10, 12, 0, tzinfo=UTC))
    fake = lago_with(clock)
    async with LagoClient(
        BillingSettings(api_url="http://lago.test", api_key="k", max_retries=0),
        transport=OldLago(fake, DROPS["no-start"]),
    ) as client:
        settings = client.settings.replace(plan_limits={"nocharge": {"max_api_calls": 3}})
        config = QuotaConfig()
        gate = QuotaGate(settings, client, config=config, clock=clock.time)
        assert await allowed(gate, 4) == [True, True, True, False]
        for _ in range(3):  # past plan_ttl each time: the subscription is read again
            clock.advance(config.plan_ttl + gate.ttl + 1)
            assert await allowed(gate, 1) == [False]  # (on the snapshot kept; its refresh reads the plan again)
            await settle_refreshes(gate)
            assert await allowed(gate, 2) == [False, False]


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("now", "interval", "anchor", "start", "end"),
    [
        ("2026-01-28T12:00:00", "monthly", "2026-01-25T09:30:00", "2026-01-25", "2026-02-25"),
        ("2026-02-24T23:59:59", "monthly", "2026-01-25T00:00:00", "2026-01-25", "2026-02-25"),
        ("2026-02-25T00:00:00", "monthly", "2026-01-25T00:00:00", "2026-02-25", "2026-03-25"),
        ("2026-02-10T00:00:00", "monthly", "2025-01-31T00:00:00", "2026-01-31", "2026-02-28"),
        ("2026-03-10T00:00:00", "monthly", "2025-01-31T00:00:00", "2026-02-28", "2026-03-31"),
        ("2026-03-10T00:00:00", "quarterly", "2025-11-15T00:00:00", "2026-02-15", "2026-05-15"),
        ("2026-03-10T00:00:00", "semiannual", "2025-11-15T00:00:00", "2025-11-15", "2026-05-15"),
        ("2026-03-10T00:00:00", "yearly", "2024-06-01T00:00:00", "2025-06-01", "2026-06-01"),
        ("2026-03-10T00:00:00", "weekly", "2026-01-01T00:00:00", "2026-03-05", "2026-03-12"),
        ("2026-03-10T00:00:00", "", "2026-01-20T00:00:00", "2026-02-20", "2026-03-20"),
        ("2026-03-10T00:00:00", "monthly", "2026-04-01T00:00:00", "2026-03-01", "2026-04-01"),
        ("2026-03-10T12:00:00", "quarterly", None, "2026-01-01", "2026-04-01"),
        ("2026-12-31T23:59:59", "semiannual", None, "2026-07-01", "2027-01-01"),
    ],
)
def test_anniversary_period_guessed_from_the_subscription_date(
    now: str, interval: str, anchor: str | None, start: str, end: str
) -> None:
    """The guessed period of an anniversary subscription repeats from its ``subscription_at`` day (Lago's
    ``DatesService``: day 31 on a short month's last day, then back to 31); a subscription date after now (not
    expected) falls back to the calendar period."""
    from lago_org_billing._periods import _calendar_period

    assert _calendar_period(ts(now), interval, None if anchor is None else ts(anchor)) == (ts(start), ts(end))
