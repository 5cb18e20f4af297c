"""The quota gate against Lago versions older than the one the emulator speaks, and against Lago Cloud's shapes.

Entitlements came to Lago in 2025: first premium-only (``/subscriptions/{id}/entitlements`` answering a free
self-hosted licence ``403 feature_unavailable``), embedded in ``GET /subscriptions/{id}`` only from November 2025;
older versions route that path to their catch-all ``404 resource_not_found`` (or a proxy's HTML 404). A wrapping
transport at the network edge reshapes the emulator's answers as such a Lago sends them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from _quota_app import Clock, Drifting, Edit, seed
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


class OlderLago(Drifting):
    """The emulator, answering as an older Lago: ``entitlements`` answers ``/subscriptions/{id}/entitlements``
    instead of the emulator (status, body, content type), ``subscription`` / ``usage`` edit those objects."""

    def __init__(
        self,
        fake: FakeLago,
        *,
        entitlements: tuple[int, bytes, str] | None = None,
        subscription: Edit | None = None,
        usage: Edit | None = None,
    ) -> None:
        super().__init__(fake, subscription=subscription, usage=usage)
        self.entitlements = entitlements
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.paths.append(path)
        if (
            self.entitlements is not None
            and path.startswith("/api/v1/subscriptions/")
            and path.endswith("/entitlements")
        ):
            status, body, content_type = self.entitlements
            return httpx.Response(status, content=body, headers={"content-type": content_type})
        return await super().handle_async_request(request)


def no_embedded_entitlements(subscription: dict[str, Any]) -> None:
    subscription.pop("entitlements", None)


FEATURE_UNAVAILABLE = (403, b'{"status":403,"error":"Forbidden","code":"feature_unavailable"}', "application/json")
ROUTE_UNKNOWN = (404, b'{"status":404,"error":"Not Found","code":"resource_not_found"}', "application/json")
HTML_404 = (404, b"<html><body><h1>404 Not Found</h1></body></html>", "text/html")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """org_1 on ``starter``, whose entitlements (5 calls) a newer Lago would serve."""
    return seed(FakeLago(api_key="k", clock=clock.now), starter_calls=5)


@pytest.fixture
def clients() -> Callable[[httpx.AsyncBaseTransport], LagoClient]:
    """A LagoClient (use it as ``async with``) on the given transport, without retries."""

    def make(transport: httpx.AsyncBaseTransport) -> LagoClient:
        return LagoClient(BillingSettings(api_url="http://lago.test", api_key="k", max_retries=0), transport=transport)

    return make


def gate_on(client: LagoClient, clock: Clock, **changes: Any) -> QuotaGate:
    return QuotaGate(client.settings.replace(**changes), client, config=QuotaConfig(), clock=clock.time)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def allowed_in_a_row(gate: QuotaGate, org_id: str, tries: int) -> list[bool]:
    return [(await gate.check(org_id)).allowed for _ in range(tries)]


# ------------------------------------------------------------------------- Lago without entitlements


@pytest.mark.parametrize(
    "answer", [FEATURE_UNAVAILABLE, ROUTE_UNKNOWN, HTML_404], ids=["premium-only-403", "catch-all-404", "html-404"]
)
async def test_a_lago_without_entitlements_falls_back_to_plan_limits_and_says_why_once(
    fake: FakeLago, clock: Clock, clients: Any, caplog: pytest.LogCaptureFixture, answer: tuple[int, bytes, str]
) -> None:
    """No ``entitlements`` in the subscription and none served: LAGO_PLAN_LIMITS decide (2 calls, then 429), not
    LAGO_FAIL_OPEN letting every org through (or 503 for all); said once for the whole process, naming the answer."""
    fake.add_customer("org_2")
    fake.add_subscription("org_2", "starter")
    lago = OlderLago(fake, entitlements=answer, subscription=no_embedded_entitlements)
    async with clients(lago) as client:
        gate = gate_on(client, clock, plan_limits={"starter": {"max_api_calls": 2}})
        caplog.set_level(logging.WARNING, logger="lago_org_billing")
        assert await allowed_in_a_row(gate, "org_1", 3) == [True, True, False]
        assert await allowed_in_a_row(gate, "org_2", 3) == [True, True, False]
        assert (await gate.get_org_plan_limits("org_1"))["source"] == "plan_limits"
        assert gate.stats["fail_open"] == 0 and gate.stats["refresh_errors"] == 0
    said = [m for m in warnings_of(caplog) if "entitlements" in m and "LAGO_PLAN_LIMITS" in m]
    assert len(said) == 1, warnings_of(caplog)
    assert str(answer[0]) in said[0]


async def test_a_plan_left_unlimited_because_lago_has_no_entitlements_is_said_once_per_plan(
    fake: FakeLago, clock: Clock, clients: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """On such a Lago a plan missing from LAGO_PLAN_LIMITS has no limit: its orgs go through (nothing blocked by
    mistake), and the log names the plan, once, whatever the number of its orgs."""
    fake.add_customer("org_2")
    fake.add_subscription("org_2", "starter")
    lago = OlderLago(fake, entitlements=ROUTE_UNKNOWN, subscription=no_embedded_entitlements)
    async with clients(lago) as client:
        gate = gate_on(client, clock, plan_limits={"pro": {"max_api_calls": 2}})
        caplog.set_level(logging.WARNING, logger="lago_org_billing")
        assert await allowed_in_a_row(gate, "org_1", 7) == [True] * 7
        assert await allowed_in_a_row(gate, "org_2", 7) == [True] * 7
    said = [m for m in warnings_of(caplog) if "'starter'" in m and "unlimited" in m]
    assert len(said) == 1, warnings_of(caplog)


async def test_a_lago_serving_entitlements_is_not_told_it_has_none(
    fake: FakeLago, clock: Clock, clients: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Between the endpoint (2025) and the embedding (November 2025): the subscription has no ``entitlements``
    key, the endpoint serves them: they win over the table, and nothing is logged about a fallback."""
    lago = OlderLago(fake, subscription=no_embedded_entitlements)
    async with clients(lago) as client:
        gate = gate_on(client, clock, plan_limits={"starter": {"max_api_calls": 2}})
        caplog.set_level(logging.WARNING, logger="lago_org_billing")
        assert await allowed_in_a_row(gate, "org_1", 6) == [True] * 5 + [False]
        assert (await gate.get_org_plan_limits("org_1"))["source"] == "entitlements"
    assert any(p.endswith("/entitlements") for p in lago.paths)
    assert not [m for m in warnings_of(caplog) if "entitlements" in m]


async def test_an_older_lago_is_not_asked_for_entitlements_at_every_plan_read(
    fake: FakeLago, clock: Clock, clients: Any
) -> None:
    """Once Lago said it has no entitlements, the next plan reads (every LAGO_QUOTA_PLAN_TTL, per org) do not ask
    again for an hour: a second request per subscription read would double what the plan refreshes cost."""
    for n in range(2, 6):
        fake.add_customer(f"org_{n}")
        fake.add_subscription(f"org_{n}", "starter")
    lago = OlderLago(fake, entitlements=ROUTE_UNKNOWN, subscription=no_embedded_entitlements)
    async with clients(lago) as client:
        gate = gate_on(client, clock, plan_limits={"starter": {"max_api_calls": 2}})
        for n in range(1, 6):
            assert (await gate.check(f"org_{n}")).allowed
    assert sum(p.endswith("/entitlements") for p in lago.paths) == 1


# ---------------------------------------------------------------------------- older usage shapes


async def test_units_as_decimal_strings_and_charges_without_units_count(
    fake: FakeLago, clock: Clock, clients: Any
) -> None:
    """``units`` "12.0" (a decimal string, as Lago serializes it) counts 12 tokens; a charge of a metric without
    events and without ``units`` counts nothing and breaks nothing."""
    fake.add_customer("org_2")
    fake.add_subscription("org_2", "starter")

    def older_usage(usage: dict[str, Any]) -> None:
        for charge in usage.get("charges_usage") or []:
            charge["units"] = "12.0"
        usage.setdefault("charges_usage", []).append(
            {"events_count": 0, "billable_metric": {"code": "other_metric"}, "amount_cents": 0}
        )

    lago = OlderLago(fake, usage=older_usage)
    async with clients(lago) as client:
        gate = gate_on(client, clock, plan_limits={"starter": {"max_tokens": 12}})
        # (starter's entitlements: 5 calls; the table adds 12 tokens, of which Lago already counts 12)
        decision = await gate.check("org_1")
    assert not decision.allowed and decision.problem is not None
    assert decision.problem["limit_name"] == "max_tokens" and decision.problem["usage"] == 12


async def test_usage_without_period_bounds_keeps_the_subscriptions_period(
    fake: FakeLago, clock: Clock, clients: Any
) -> None:
    """current_usage without ``from_datetime``/``to_datetime``: the period is the subscription's
    ``current_billing_period_*`` (Retry-After to its end), not a made-up one."""

    def no_bounds(usage: dict[str, Any]) -> None:
        usage.pop("from_datetime", None)
        usage.pop("to_datetime", None)

    lago = OlderLago(fake, usage=no_bounds)
    async with clients(lago) as client:
        gate = gate_on(client, clock)
        assert await allowed_in_a_row(gate, "org_1", 6) == [True] * 5 + [False]
        blocked = await gate.check("org_1")
    assert blocked.problem is not None and blocked.problem["period_end"] == "2026-04-01T00:00:00Z"


async def test_a_subscription_without_billing_period_takes_the_usage_period(
    fake: FakeLago, clock: Clock, clients: Any
) -> None:
    """A subscription without ``current_billing_period_*`` (older Lago): the usage's bounds are the period."""

    def older_subscription(subscription: dict[str, Any]) -> None:
        subscription.pop("current_billing_period_started_at", None)
        subscription.pop("current_billing_period_ending_at", None)
        (subscription.get("plan") or {}).pop("interval", None)

    lago = OlderLago(fake, subscription=older_subscription)
    async with clients(lago) as client:
        gate = gate_on(client, clock)
        assert await allowed_in_a_row(gate, "org_1", 6) == [True] * 5 + [False]
        blocked = await gate.check("org_1")
    assert blocked.problem is not None and blocked.problem["period_end"] == "2026-04-01T00:00:00Z"


async def test_no_billing_period_anywhere_keeps_counting_across_refreshes(
    fake: FakeLago, clock: Clock, clients: Any
) -> None:
    """A plan without a charge on the metric (Lago counts nothing: the gate's own records are the count) on a Lago
    whose subscription has no ``current_billing_period_*``: refreshes, and plan re-reads, keep the org blocked."""
    fake.add_plan("bare", amount_cents=100, entitlements={"api_quota": {"max_api_calls": 3}})
    fake.add_customer("org_2")
    fake.add_subscription("org_2", "bare")

    def older_subscription(subscription: dict[str, Any]) -> None:
        subscription.pop("current_billing_period_started_at", None)
        subscription.pop("current_billing_period_ending_at", None)

    lago = OlderLago(fake, subscription=older_subscription)
    async with clients(lago) as client:
        gate = gate_on(client, clock, usage_cache_ttl=30)
        for _ in range(3):
            decision = await gate.check("org_2")
            assert decision.allowed
            gate.settle("org_2", decision, tokens=1, billed=True)
        assert not (await gate.check("org_2")).allowed
        for _ in range(30):  # 15 minutes: usage refreshes and plan re-reads (LAGO_QUOTA_PLAN_TTL 300 s)
            clock.advance(30)
            await gate.snapshot("org_2")
            assert not (await gate.check("org_2")).allowed
