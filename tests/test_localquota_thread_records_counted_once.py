"""Usage recorded from threads (``record_*_nowait`` in sync endpoints, run in a thread pool) while the gate and the
pipeline run on the event loop's thread: the gate's in-process records stay consistent, so that a read of Lago that
has every call drops them all (no phantom usage left, the org refused below its limit for the rest of the period)."""

from __future__ import annotations

import dataclasses
import threading
import time

import anyio

from lago_org_billing import BillingSettings, EventPipeline, LagoClient, OrgBilling
from lago_org_billing._quota import QuotaGate
from lago_org_billing._snapshots import ALLOWED
from lago_org_billing.testing import FakeLago
from test_billing_nowait_threads_count_in_the_gate import cached_snapshot, calls_from_threads

API_KEY = "test-api-key"


def test_calls_recorded_from_threads_leave_no_usage_once_lago_has_them_all(busy_threads: None) -> None:
    """6 threads record 1,500 calls each (3 tokens each); Lago is then read with all 9,000 calls and 27,000 tokens.
    The gate counts exactly that, within a limit of 9,010 calls: the settles raced on the per-second records (a
    read-modify-write of a dict, switched between threads), so the records dropped by the read held less than the
    totals they were added to. The difference stayed counted for the period: thousands of calls Lago never had,
    the org refused far below its limit."""
    threads_count, per_thread = 6, 1_500
    total = threads_count * per_thread
    fake = FakeLago(api_key=API_KEY)
    settings = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url)
    client = LagoClient(settings, transport=fake.transport())
    pipeline = EventPipeline(client, memory_capacity=total + 1)
    gate = QuotaGate(settings.replace(quota_mode="enforce"), client)
    now = time.time()
    snapshot = cached_snapshot(now, calls_limit=total + 10)
    gate.local.store_now("org_1", snapshot, now)
    billing = OrgBilling(settings, client=client, pipeline=pipeline, quota=gate)
    started, recorded = threading.Event(), threading.Event()
    seen: list[object] = []

    async def loop_side() -> None:
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            started.set()
            await anyio.to_thread.run_sync(recorded.wait)
            await pipeline.flush(30)
            # Lago read later, with every call and token: what was recorded here is all in it
            later = now + 600
            read = dataclasses.replace(
                snapshot, base_calls=total, base_tokens=3 * total, requested_at=later, fetched_at=later, version="v2"
            )
            gate.local.store_now("org_1", read, later)
            outcome = gate.local.reserve_now("org_1", later, "peek")
            seen.extend([outcome.code, outcome.calls, outcome.tokens])
            await pipeline.aclose()

    errors = calls_from_threads(billing, loop_side, started, recorded, threads_count, per_thread)
    assert errors == []
    assert seen == [ALLOWED, total, 3 * total]
