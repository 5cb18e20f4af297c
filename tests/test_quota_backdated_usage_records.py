"""Usage an app records itself (``OrgBilling.record_usage``/``record_api_call``, and their ``_nowait`` twins) with a
``timestamp`` of a billing period that has ended is billed by Lago in that period: the quota gate does not count it
in the current one. (A nightly job recording yesterday's calls just after the month turned.)"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from _quota_app import Clock, metric_and_feature
from lago_org_billing import BillingSettings, EventPipeline, LagoClient, OrgBilling
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc
ORG = "org_1"
LIMITS = {"max_api_calls": 5, "max_tokens": 1_000}
APRIL_FIRST = dt.datetime(2026, 4, 1, 0, 5, tzinfo=UTC)
MARCH_LAST = dt.datetime(2026, 3, 31, 23, 30, tzinfo=UTC)


@pytest.mark.parametrize("nowait", [False, True], ids=["awaited", "nowait"])
async def test_calls_recorded_with_a_timestamp_of_the_ended_period_are_not_counted_in_this_one(
    redis: str | None, nowait: bool
) -> None:
    """Three calls of March recorded on April 1st counted in April's gate: the org was refused (or told it had 2
    calls left) on April's usage it never had, until the gate's next read of Lago. Calls dated now still count."""
    clock = Clock(APRIL_FIRST)
    fake = FakeLago(api_key="k", clock=clock.now)
    fake.add_plan("pro", amount_cents=1_000, charges=[metric_and_feature(fake)], entitlements={"api_quota": LIMITS})
    fake.add_customer(ORG)
    fake.add_subscription(ORG, "pro", subscription_at="2026-01-01T00:00:00Z")
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0, redis_url=redis)
    prefix = f"backdated:{uuid.uuid4().hex[:8]}:"
    async with LagoClient(settings, transport=fake.transport()) as client:
        gate = QuotaGate(settings, client, config=QuotaConfig(redis_prefix=prefix, jitter=0.0), clock=clock.time)
        pipeline = EventPipeline(client)
        billing = OrgBilling(client=client, quota=gate, pipeline=pipeline)
        try:
            assert (await gate.enforce_usage_limits(ORG))["usage"] == {"max_api_calls": 0, "max_tokens": 0}
            for n in range(3):  # March's, recorded now
                if nowait:
                    billing.record_api_call_nowait(ORG, f"tx_march_{n}", tokens=100, timestamp=MARCH_LAST)
                else:
                    await billing.record_api_call(ORG, f"tx_march_{n}", tokens=100, timestamp=MARCH_LAST)
            await billing.record_api_call(ORG, "tx_april", tokens=7, timestamp=clock.time())  # April's
            flush = getattr(gate.backend, "flush", None)
            if flush is not None:
                await flush()
            assert (await gate.enforce_usage_limits(ORG))["usage"] == {"max_api_calls": 1, "max_tokens": 7}
            decision = await gate.check(ORG)
            assert decision.allowed
            assert dict(decision.headers)[b"ratelimit-remaining"] == b"3"  # (5, less April's one and this one)
            gate.settle(ORG, decision, tokens=0, billed=False)
        finally:
            await pipeline.aclose()
            await gate.aclose()
