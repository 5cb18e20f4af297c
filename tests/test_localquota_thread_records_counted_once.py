"""Usage recorded from threads (``record_*_nowait`` in sync endpoints, run in a thread pool) while the gate and the
pipeline run on the event loop's thread: the gate's in-process records stay consistent, so that a read of Lago that
has every call drops them all (no phantom usage left, the org refused below its limit for the rest of the period)."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections.abc import Iterator

import anyio
import pytest

from lago_org_billing import BillingSettings, EventPipeline, LagoClient, OrgBilling
from lago_org_billing._quota import QuotaGate
from lago_org_billing._snapshots import ALLOWED, Snapshot
from lago_org_billing.testing import FakeLago

API_KEY = "test-api-key"


@pytest.fixture
def busy_threads() -> Iterator[None]:
    """Threads switch as often as the interpreter allows (as under a loaded thread pool)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


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
    snapshot = Snapshot(
        active=True,
        plan_code="starter",
        calls_limit=total + 10,
        tokens_limit=10**12,
        period_start=now - 3600,
        period_end=now + 86400,
        requested_at=now,
        fetched_at=now,
        plan_fetched_at=now,
        refresh_at=now + 86400,
    )
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

    loop_thread = threading.Thread(target=anyio.run, args=(loop_side,))
    loop_thread.start()
    errors: list[BaseException] = []
    try:
        assert started.wait(10)
        barrier = threading.Barrier(threads_count)

        def work(worker: int) -> None:
            barrier.wait()
            for i in range(per_thread):
                try:
                    billing.record_api_call_nowait("org_1", f"req_{worker}_{i}", "/v1/chat", "u_1", tokens=3)
                except BaseException as exc:  # each failure is what this test counts
                    errors.append(exc)

        workers = [threading.Thread(target=work, args=(n,)) for n in range(threads_count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        recorded.set()
        loop_thread.join(60)
    assert errors == []
    assert seen == [ALLOWED, total, 3 * total]
