"""Under trio (``hypercorn -k trio``, anyio's trio backend), the paths a user reaches outside the middleware's
running background work.

1. A :class:`QuotaGate` whose work is not running (its seed helpers called from a script or a job, a webhook's
   ``invalidate(refresh=True)`` in an app that did not start it): a refresh was started with
   ``asyncio.get_running_loop().create_task(...)``, so every cold check and seed helper raised ``RuntimeError: no
   running event loop`` under trio (it works under asyncio). Now the refresh runs as a trio system task, and
   ``aclose()`` ends the ones still running, as it does asyncio's.

Counts and answers only, no sleeps as synchronisation.
"""

from __future__ import annotations

import anyio
import pytest

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._quota import QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

BACKENDS = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])


# ------------------------------------------------------------------- 1. a gate whose work is not running


@BACKENDS
async def test_seed_helpers_and_checks_of_a_gate_not_running(anyio_backend: str) -> None:
    """The seed helpers and a cold check on a gate never started: under trio each raised ``RuntimeError`` from
    ``asyncio.get_running_loop()``. Now they read Lago as under asyncio: limit 3, the check reserves one."""
    clock = Clock()
    lago = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=3)
    settings = BillingSettings(api_url=lago.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=lago.transport()) as client:
        gate = QuotaGate(settings, client, clock=clock.time)
        try:
            assert await gate.check_org_has_active_subscription("org_1") is True
            assert (await gate.get_org_plan_limits("org_1"))["max_api_calls"] == 3
            decision = await gate.check("org_1")  # (read as the helpers read it: no cold wait left unanswered)
            assert decision.allowed and decision.reserved
            status = await gate.enforce_usage_limits("org_1")
            assert status["usage"]["max_api_calls"] == 1 and status["remaining"]["max_api_calls"] == 2
        finally:
            await gate.aclose()


@BACKENDS
async def test_a_webhook_refresh_on_a_gate_not_running_reads_lago_and_aclose_ends_one_in_flight(
    anyio_backend: str,
) -> None:
    """``invalidate(refresh=True)`` (what a webhook receiver calls) on a gate not running starts a refresh: under trio
    it raised. It now reads Lago; one still waiting for Lago when the gate closes is ended by ``aclose()`` (which
    returns: nothing left running, nothing left marked as refreshing)."""
    clock = Clock()
    lago = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=3)
    settings = BillingSettings(api_url=lago.base_url, api_key="k", max_retries=0)
    async with LagoClient(settings, transport=lago.transport()) as client:
        gate = QuotaGate(settings, client, clock=clock.time)
        await gate.invalidate("org_1", refresh=True)
        event = gate._refreshing["org_1"]
        await event.wait()
        assert gate.check_now("org_1") is not None  # (the snapshot it read: decided without I/O)

        # a refresh held in Lago's answer: aclose() ends it
        entered = anyio.Event()
        release = anyio.Event()
        fetch = gate.fetch

        async def held_fetch(org_id: str, previous: object = None) -> object:
            entered.set()
            await release.wait()
            return await fetch(org_id, previous)  # type: ignore[arg-type]

        gate.fetch = held_fetch  # type: ignore[method-assign]
        await gate.invalidate("org_1", refresh=True)
        await entered.wait()
        with anyio.fail_after(10):  # (a bound only: it returns at once)
            await gate.aclose()
        assert not gate._refreshing
        assert not gate._loose and not getattr(gate, "_loose_trio", {})
        assert not release.is_set()
