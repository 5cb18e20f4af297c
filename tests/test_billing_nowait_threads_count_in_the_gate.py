"""``record_*_nowait`` called from threads (a sync endpoint, run in a thread pool) while the pipeline and the quota
gate run on the event loop's thread: every call is counted in the gate, none lost to a race between threads, and the
org's cached snapshot is kept."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from lago_org_billing import BillingSettings, EventPipeline, LagoClient, OrgBilling
from lago_org_billing._quota import QuotaGate
from lago_org_billing._snapshots import Snapshot
from lago_org_billing.testing import FakeLago

API_KEY = "test-api-key"


def cached_snapshot(now: float, calls_limit: int = 10**9) -> Snapshot:
    """A fresh snapshot of an active org, read at ``now``, its period around it."""
    return Snapshot(
        active=True,
        plan_code="starter",
        calls_limit=calls_limit,
        tokens_limit=10**12,
        period_start=now - 3600,
        period_end=now + 86400,
        requested_at=now,
        fetched_at=now,
        plan_fetched_at=now,
        refresh_at=now + 86400,
    )


def _cached_gate(settings: BillingSettings, client: LagoClient) -> QuotaGate:
    gate = QuotaGate(settings.replace(quota_mode="enforce"), client)
    now = time.time()
    gate.local.store_now("org_1", cached_snapshot(now), now)
    return gate


def calls_from_threads(
    billing: OrgBilling,
    loop_side: Callable[[], Awaitable[None]],
    started: threading.Event,
    recorded: threading.Event,
    threads_count: int,
    per_thread: int,
) -> list[BaseException]:
    """Run ``loop_side`` (the pipeline's event loop: it sets ``started``, then waits for ``recorded``) in a thread of
    its own while ``threads_count`` threads each record ``per_thread`` calls of 3 tokens at once; what they raised."""
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
    return errors


def test_calls_recorded_from_threads_are_all_counted_in_the_gate(busy_threads: None) -> None:
    threads_count, per_thread = 6, 1_500
    fake = FakeLago(api_key=API_KEY)
    settings = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url)
    client = LagoClient(settings, transport=fake.transport())
    pipeline = EventPipeline(client, memory_capacity=threads_count * per_thread + 1)
    gate = _cached_gate(settings, client)
    billing = OrgBilling(settings, client=client, pipeline=pipeline, quota=gate)
    started, recorded = threading.Event(), threading.Event()
    seen: list[Any] = []

    async def loop_side() -> None:
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            started.set()
            await anyio.to_thread.run_sync(recorded.wait)
            await pipeline.flush(30)
            state = gate.local._orgs["org_1"]  # (read on the loop's thread, after what the threads handed it)
            seen.extend([state.snapshot is not None, state.counts.calls, state.counts.tokens])
            await pipeline.aclose()

    errors = calls_from_threads(billing, loop_side, started, recorded, threads_count, per_thread)
    assert errors == []
    total = threads_count * per_thread
    # the snapshot kept (a race replaced the org's state with an empty one), every call and its tokens counted
    assert seen == [True, total, 3 * total]
    assert len(fake.events) == total
