"""The quota gate on Lago versions without entitlements and without billing periods, checked again.

A "this Lago serves no entitlements" answer switches every org of the client to LAGO_PLAN_LIMITS alone for an hour:
it must not come from a one-off (a proxy's 404 during a deploy), nor from a Lago that served entitlements moments
ago; answers that say nothing of the kind (an org's ``subscription_not_found``, a key lacking a permission) never do.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

HTML_404 = (404, b"<html><body><h1>404 Not Found</h1></body></html>", "text/html")
ROUTE_UNKNOWN = (404, b'{"status":404,"error":"Not Found","code":"resource_not_found"}', "application/json")
FEATURE_UNAVAILABLE = (403, b'{"status":403,"error":"Forbidden","code":"feature_unavailable"}', "application/json")
SUBSCRIPTION_NOT_FOUND = (
    404,
    b'{"status":404,"error":"Not Found","code":"subscription_not_found"}',
    "application/json",
)
NO_PERMISSION = (
    403,
    b'{"status":403,"error":"Forbidden","code":"read_action_not_allowed_for_subscriptions"}',
    "application/json",
)


class EntitlementsLago(httpx.AsyncBaseTransport):
    """The emulator without entitlements embedded in subscriptions (Lago between the endpoint and the embedding);
    ``/subscriptions/{id}/entitlements`` answers the next queued answer instead, once each, else the emulator."""

    def __init__(self, fake: FakeLago) -> None:
        self.inner = fake.transport()
        self.queued: list[tuple[int, bytes, str]] = []
        self.asked: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith("/api/v1/subscriptions/") and path.endswith("/entitlements"):
            self.asked.append(path.split("/")[-2])
            if self.queued:
                status, body, content_type = self.queued.pop(0)
                return httpx.Response(status, content=body, headers={"content-type": content_type})
        response = await self.inner.handle_async_request(request)
        await response.aread()
        if response.status_code == 200 and path.startswith("/api/v1/subscriptions/") and request.method == "GET":
            body = response.json()
            if isinstance(body.get("subscription"), dict):
                body["subscription"].pop("entitlements", None)
                return httpx.Response(200, json=body)
        return httpx.Response(response.status_code, content=response.content, headers=response.headers)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """org_1 to org_4 on ``starter`` (entitlements: 5 calls)."""
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)
    for n in range(2, 5):
        fake.add_customer(f"org_{n}")
        fake.add_subscription(f"org_{n}", "starter")
    return fake


def client_on(transport: httpx.AsyncBaseTransport) -> LagoClient:
    return LagoClient(BillingSettings(api_url="http://lago.test", api_key="k", max_retries=0), transport=transport)


def gate_on(client: LagoClient, clock: Clock, **changes: Any) -> QuotaGate:
    return QuotaGate(client.settings.replace(**changes), client, config=QuotaConfig(), clock=clock.time)


async def allowed_in_a_row(gate: QuotaGate, org_id: str, tries: int) -> list[bool]:
    return [(await gate.check(org_id)).allowed for _ in range(tries)]


# ------------------------------------------------------------- "serves no entitlements": false positives


@pytest.mark.parametrize("answer", [HTML_404, ROUTE_UNKNOWN, FEATURE_UNAVAILABLE], ids=["html", "catch-all", "403"])
async def test_one_odd_answer_after_lago_served_entitlements_does_not_unblock_every_org(
    fake: FakeLago, clock: Clock, answer: tuple[int, bytes, str]
) -> None:
    """Lago served org_1's entitlements; then one answer for org_2 says it serves none (a proxy's 404 during a
    deploy, an old pod of a rolling upgrade): that answer is not believed, and org_3, read later, is limited by its
    entitlements (5 calls), not left unlimited for an hour (LAGO_PLAN_LIMITS is empty)."""
    lago = EntitlementsLago(fake)
    async with client_on(lago) as client:
        gate = gate_on(client, clock)
        assert await allowed_in_a_row(gate, "org_1", 6) == [True] * 5 + [False]
        lago.queued.append(answer)
        await gate.check("org_2")
        assert (await gate.get_org_plan_limits("org_2"))["source"] != "none" or gate.stats["refresh_errors"]
        assert await allowed_in_a_row(gate, "org_3", 6) == [True] * 5 + [False]
    assert "org_3" in lago.asked


async def test_a_proxy_404_at_start_does_not_switch_the_client_for_an_hour(fake: FakeLago, clock: Clock) -> None:
    """The very first answer is a proxy's HTML 404 (nothing known yet): that org's read may fall back, but the next
    org's read asks again and gets its entitlements: one non-Lago answer is not "this Lago has none"."""
    lago = EntitlementsLago(fake)
    lago.queued.append(HTML_404)
    async with client_on(lago) as client:
        gate = gate_on(client, clock)
        await gate.check("org_1")
        assert await allowed_in_a_row(gate, "org_2", 6) == [True] * 5 + [False]
    assert lago.asked[:2] == ["org_1", "org_2"]


async def test_proxy_404s_twice_in_a_row_on_a_lago_never_seen_serving_do_switch(fake: FakeLago, clock: Clock) -> None:
    """Two non-Lago 404s in a row and no entitlements ever served: this is a Lago without them behind a proxy; the
    third org is not asked again (the hour's memory), LAGO_PLAN_LIMITS decide."""
    lago = EntitlementsLago(fake)
    lago.queued += [HTML_404, HTML_404]
    async with client_on(lago) as client:
        gate = gate_on(client, clock, plan_limits={"starter": {"max_api_calls": 2}})
        for org in ("org_1", "org_2", "org_3"):
            assert await allowed_in_a_row(gate, org, 3) == [True, True, False]
    assert lago.asked == ["org_1", "org_2"]


@pytest.mark.parametrize("answer", [SUBSCRIPTION_NOT_FOUND, NO_PERMISSION], ids=["subscription-gone", "no-permission"])
async def test_answers_about_one_subscription_or_the_key_never_switch_the_client(
    fake: FakeLago, clock: Clock, answer: tuple[int, bytes, str]
) -> None:
    """``subscription_not_found`` (the subscription ended between the two reads) or a key lacking the read
    permission (403 ``read_action_not_allowed_for_...``, not ``feature_unavailable``) say nothing of entitlements:
    the next org is asked and limited by its own."""
    lago = EntitlementsLago(fake)
    lago.queued.append(answer)
    async with client_on(lago) as client:
        gate = gate_on(client, clock)
        await gate.check("org_1")
        assert await allowed_in_a_row(gate, "org_2", 6) == [True] * 5 + [False]
    assert lago.asked[:2] == ["org_1", "org_2"]


# ------------------------------------------------------------------------------ no billing period from Lago


@pytest.mark.parametrize(
    ("now", "interval", "start", "end"),
    [
        ("2026-12-31T23:59:59", "monthly", "2026-12-01", "2027-01-01"),
        ("2026-03-10T12:00:00", "", "2026-03-01", "2026-04-01"),
        ("2026-11-10T12:00:00", "quarterly", "2026-10-01", "2027-01-01"),
        ("2026-03-11T12:00:00", "weekly", "2026-03-09", "2026-03-16"),
        ("2026-03-10T12:00:00", "yearly", "2026-01-01", "2027-01-01"),
    ],
)
def test_a_period_lago_does_not_give_is_the_calendar_one_not_a_ttl(
    now: str, interval: str, start: str, end: str
) -> None:
    """No ``current_billing_period_*`` (nor usage bounds): the calendar period of the plan's interval, stable across
    reads (the counter key), not ``[now, now + TTL)`` rolled over (usage back to 0) at every refresh."""
    import datetime as dt

    from lago_org_billing._periods import _calendar_period

    def ts(text: str) -> float:
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.timezone.utc).timestamp()

    assert _calendar_period(ts(now), interval) == (ts(start), ts(end))
