"""``batches_sent_total`` and the ``delivery_seconds`` histogram count the ``POST /events/batch`` calls made, as their
help says: not an attempt that made none (an event JSON cannot carry, a closed client), which counted a batch and a
near-zero duration while nothing reached Lago."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from lago_org_billing import EventPipeline, LagoClient

pytestmark = pytest.mark.anyio


def event(key: str, **properties: Any) -> dict[str, Any]:
    return {"transaction_id": key, "external_subscription_id": "sub_a", "code": "api_call", "properties": properties}


def posts(fake_lago: Any) -> int:
    return sum(1 for r in fake_lago.write_requests if r.path == "/api/v1/events/batch")


async def test_an_event_json_cannot_carry_is_no_batch_sent(lago_client: LagoClient, fake_lago: Any) -> None:
    pipeline = EventPipeline(lago_client, flush_interval=0.0)
    async with pipeline:
        pipeline.submit(event("t1"))
        pipeline.submit(event("t2", tags={"a", "b"}))  # (a set: no JSON)
        assert await pipeline.flush(5)
    stats = pipeline.stats
    assert stats["delivered"] == 1 and stats["dead_lettered"] == 1
    assert posts(fake_lago) == 1  # the valid event alone: the batch with both was never sent
    assert stats["batches_sent"] == 1
    assert pipeline.metrics.latency_count == 1 and sum(pipeline.metrics.latency_buckets) == 1


async def test_a_closed_client_sends_no_batch(
    lago_client: LagoClient, fake_lago: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    pipeline = EventPipeline(lago_client, flush_interval=0.0, retry_backoff=0.001, max_backoff=0.01, shutdown_timeout=0)
    async with pipeline:
        await lago_client.aclose()
        pipeline.submit(event("t1"))
        assert not await pipeline.flush(0.2)  # (retried meanwhile: the client stays closed)
        tried = [r for r in caplog.records if "is closed" in r.getMessage() or "is closed" in str(r.exc_info)]
        assert tried  # attempts were made, and failed before any request
        assert pipeline.stats["batches_sent"] == 0 and pipeline.metrics.latency_count == 0
    assert posts(fake_lago) == 0
