"""Whether Lago counts an org's calls is whether its ``current_usage`` answer has a charge on ``LAGO_EVENT_CODE``, not
whether it answered at all: read without ``billable_metric_code`` (a token metric of its own, limited too) or from a
Lago that ignores that filter (older versions), the answer lists the plan's other charges, or none, and a plan without
a charge on the metric was taken for 0 calls counted in Lago: the gate's own records were dropped as counted there at
each read, and the calls limit was never reached."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import httpx
import pytest

from _quota_app import Clock
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc
CALLS = {"code": "max_api_calls", "value_type": "integer"}
TOKENS = {"code": "max_tokens", "value_type": "integer"}


class FilterIgnored(httpx.AsyncBaseTransport):
    """The emulator as a Lago before ``current_usage``'s ``billable_metric_code``: the filter is not read, every
    charge of the plan is answered."""

    def __init__(self, fake: FakeLago) -> None:
        self.inner = fake.transport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/current_usage"):
            url = request.url.copy_remove_param("billable_metric_code")
            request = httpx.Request(request.method, url, headers=request.headers, content=request.content)
        return await self.inner.handle_async_request(request)


def lago(clock: Clock) -> FakeLago:
    """Metrics ``api_call`` (counted), ``api_tokens`` (summing ``total_tokens``) and ``storage``; feature
    ``api_quota``; ``org_1`` on ``tokens_only`` (2 calls, 1,000 tokens; a charge on ``api_tokens`` only),
    ``org_2`` on ``storage_only`` (a charge on ``storage`` only), ``org_3`` on ``free`` (no charge, no limit)."""
    fake = FakeLago(api_key="k", clock=clock.now)
    fake.add_billable_metric("api_call", aggregation_type="count_agg")
    fake.add_billable_metric("api_tokens", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_billable_metric("storage", aggregation_type="max_agg", field_name="gb")
    fake.add_feature("api_quota", privileges=[CALLS, TOKENS])

    def charge(metric: str) -> dict[str, object]:
        return {"billable_metric_code": metric, "charge_model": "standard", "properties": {"amount": "0"}}

    limits = {"api_quota": {"max_api_calls": 2, "max_tokens": 1_000}}
    fake.add_plan("tokens_only", charges=[charge("api_tokens")], entitlements=limits)
    fake.add_plan("storage_only", charges=[charge("storage")])
    fake.add_plan("free")
    for org_id, plan in (("org_1", "tokens_only"), ("org_2", "storage_only"), ("org_3", "free")):
        fake.add_customer(org_id)
        fake.add_subscription(org_id, plan, subscription_at="2026-03-01T00:00:00Z")
    return fake


@pytest.fixture
def clock() -> Clock:
    return Clock(dt.datetime(2026, 3, 10, 12, 0, tzinfo=UTC))


@pytest.fixture
async def client(clock: Clock) -> AsyncIterator[LagoClient]:
    fake = lago(clock)
    settings = BillingSettings(
        api_url="http://lago.test", api_key="k", max_retries=0, plan_limits={"storage_only": {"max_api_calls": 2}}
    )
    async with LagoClient(settings, transport=FilterIgnored(fake)) as lago_client:
        yield lago_client


async def calls_allowed(gate: QuotaGate, clock: Clock, org_id: str, tries: int) -> list[bool]:
    """One call at a time, each read from Lago afresh after ``settle_lag`` (its event long delivered: what Lago
    counts of it is in the read)."""
    allowed = []
    for _ in range(tries):
        decision = await gate.check(org_id)
        allowed.append(decision.allowed)
        if decision.allowed:
            gate.settle(org_id, decision, tokens=10, billed=True)
        clock.advance(gate.config.settle_lag + 60)
        await gate.invalidate(org_id)
    return allowed


async def test_a_token_metric_of_its_own_and_no_charge_on_the_calls_still_limits_the_calls(
    client: LagoClient, clock: Clock
) -> None:
    """``LAGO_QUOTA_TOKEN_METRIC=api_tokens``, both limits set: the usage is read unfiltered, and lists the
    ``api_tokens`` charge only. The calls, which Lago does not count, are the gate's own: the third is refused (all
    were served)."""
    gate = QuotaGate(client.settings, client, config=QuotaConfig(token_metric="api_tokens"), clock=clock.time)
    assert await calls_allowed(gate, clock, "org_1", 4) == [True, True, False, False]
    snapshot = await gate.snapshot("org_1")
    assert (snapshot.lago_counts_calls, snapshot.lago_counts_tokens) == (False, True)


async def test_a_lago_ignoring_the_metric_filter_and_a_plan_charging_other_metrics_still_limits_the_calls(
    client: LagoClient, clock: Clock
) -> None:
    """The defaults (``api_call`` the token metric too) on a Lago answering every charge of the plan whatever
    ``billable_metric_code`` says: a plan charging ``storage`` only counts none of the calls (``LAGO_PLAN_LIMITS``:
    2 a period)."""
    gate = QuotaGate(client.settings, client, config=QuotaConfig(), clock=clock.time)
    assert await calls_allowed(gate, clock, "org_2", 4) == [True, True, False, False]
    assert not (await gate.snapshot("org_2")).lago_counts_calls


async def test_the_usage_of_an_unlimited_org_whose_plan_has_no_charge_on_the_calls_is_not_a_made_up_zero(
    client: LagoClient, clock: Clock
) -> None:
    """``enforce_usage_limits`` of an org without limits reads its usage from Lago, each value ``None`` when it
    cannot be read: a plan without a charge on ``api_call`` counts no calls (it said 0 calls)."""
    gate = QuotaGate(client.settings.replace(plan_limits={}), client, config=QuotaConfig(), clock=clock.time)
    for org_id in ("org_3", "org_2"):
        answer = await gate.enforce_usage_limits(org_id)
        assert answer["allowed"], answer
        assert answer["usage"] == {"max_api_calls": None, "max_tokens": None}, answer
