"""The in-process quota gate, against the emulator: one org whose usage reads keep failing while the others are read
(warned once), and the seed's enforce_usage_limits for an org without limits (Lago's usage, not 0)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> Clock:
    """One settable clock for the gate and the emulator."""
    return Clock()


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    """A LagoClient on the emulator, without retries (failures are immediate)."""
    settings = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        yield lago


def make_gate(client: LagoClient, clock: Clock, **changes: Any) -> QuotaGate:
    return QuotaGate(client.settings.replace(**changes), client, config=QuotaConfig(), clock=clock.time)


async def wait_refreshed(gate: QuotaGate) -> None:
    for event in list(gate._refreshing.values()):
        await event.wait()


# ----------------------------------------------------------------------------------- one org's reads keep failing


@pytest.fixture
def fake(clock: Clock) -> FakeLago:
    """org_1 and org_2 on starter (1,000 calls)."""
    lago = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=1_000)
    lago.add_customer("org_2")
    lago.add_subscription("org_2", "starter")
    return lago


async def test_one_orgs_failing_usage_read_is_warned_once_while_other_orgs_refresh(
    client: LagoClient, fake: FakeLago, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Lago fails one org's current_usage every time (a 500 of one customer's charge, or a heavy customer's usage
    read timing out), while every other org's refresh works. The WARNING promises "further failures are logged at
    DEBUG until Lago answers again", but any other org's successful refresh re-arms it (and logs "Lago answers
    again" at INFO), so the same failure is warned at every refresh of the failing org: one WARNING + one INFO per
    TTL (per failure_backoff under traffic) per failing org, for as long as it lasts."""
    caplog.set_level(logging.INFO, logger="lago_org_billing.quota")
    gate = make_gate(client, clock)
    assert (await gate.check("org_1")).allowed
    assert (await gate.check("org_2")).allowed
    fake.inject_fault(status=500, path="/api/v1/customers/org_2/current_usage")
    for _ in range(10):  # ten TTLs: each org's snapshot is due, org_1's refresh works, org_2's fails
        clock.advance(31)
        await gate.check("org_1")
        await wait_refreshed(gate)
        await gate.check("org_2")
        await wait_refreshed(gate)
    assert gate.stats["refresh_errors"] == 10
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING and "Could not refresh" in r.getMessage()]
    assert len(warned) == 1, f"{len(warned)} WARNINGs for one org's persistent failure"
    # (at most one "answers again" per WARNING said: org_2 served on LAGO_FAIL_OPEN once its snapshot is too old is
    # said once too, and ended by org_1's next read)
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    again = [r for r in caplog.records if r.getMessage().startswith("Lago answers again")]
    assert len(again) <= len(said) <= 2, f"{len(again)} 'Lago answers again' lines while org_2 never recovered"


# ------------------------------------------------------------------------------------- seed helper on an unlimited org


async def test_enforce_usage_limits_reports_lagos_usage_for_an_unlimited_org(
    client: LagoClient, fake: FakeLago, clock: Clock
) -> None:
    """The seed's enforce_usage_limits(org) says where the org stands, usage included. For an org whose plan has no
    limit the gate never reads current_usage (a cost saving of the request path), so the helper reports Lago's
    7 calls and 70 tokens as 0 and 0: a dashboard or billing page built on it shows an unlimited org as unused."""
    fake.add_customer("org_3")
    fake.add_subscription("org_3", "legacy")  # (no entitlements, not in LAGO_PLAN_LIMITS: unlimited)
    clock.advance(60)
    for n in range(7):
        await client.create_event(
            {"transaction_id": f"t{n}", "external_subscription_id": "org_3", "code": "api_call",
             "timestamp": clock.time() - 30, "properties": {"total_tokens": 10}}
        )  # fmt: skip
    gate = make_gate(client, clock)
    status = await gate.enforce_usage_limits("org_3")
    assert status["limits"] == {"max_api_calls": None, "max_tokens": None}
    assert status["usage"] == {"max_api_calls": 7, "max_tokens": 70}
