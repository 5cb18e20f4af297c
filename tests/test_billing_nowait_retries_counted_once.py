"""``record_usage_nowait``/``record_api_call_nowait`` called again for the same event (a caller's own retry: a job run
twice, the same ``transaction_id``) is counted once in the quota gate, as Lago keeps it once: it was counted at each
call, refusing the org below its limit until the next read of Lago. A different event (another id, or the same id
with another timestamp, which Lago's ClickHouse store keeps as another event) is counted."""

from __future__ import annotations

import time

import anyio
import pytest

from lago_org_billing import BillingSettings, EventPipeline, LagoClient, OrgBilling
from lago_org_billing.testing import FakeLago
from test_billing_nowait_threads_count_in_the_gate import _cached_gate

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"


async def test_the_same_event_recorded_again_is_counted_once() -> None:
    """Three calls for one event, two for another (same id, its own timestamp), one with a generated id: 3 calls."""
    fake = FakeLago(api_key=API_KEY)
    settings = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url)
    client = LagoClient(settings, transport=fake.transport())
    pipeline = EventPipeline(client)
    gate = _cached_gate(settings, client)
    billing = OrgBilling(settings, client=client, pipeline=pipeline, quota=gate)
    async with anyio.create_task_group() as tasks:
        await tasks.start(pipeline.run)
        for _ in range(3):
            billing.record_api_call_nowait("org_1", transaction_id="job-7", tokens=5)
        stamp = time.time() - 60
        for _ in range(2):
            billing.record_usage_nowait(
                "org_1", settings.event_code, transaction_id="job-7", properties={"total_tokens": 5}, timestamp=stamp
            )
        billing.record_api_call_nowait("org_1", tokens=5)
        await pipeline.flush(30)
        await pipeline.aclose()
    counts = gate.local._orgs["org_1"].counts
    assert (counts.calls, counts.tokens) == (3, 15)
    assert sorted(e["transaction_id"] for e in fake.events).count("job-7") >= 1
