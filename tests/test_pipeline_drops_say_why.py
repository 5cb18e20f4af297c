"""The ERROR a dropped event logs gives the advice for its cause: a full outbox (Lago slow or down: a spool or more
room) or a closed pipeline (events recorded after the app's shutdown: nothing about Lago or the spool)."""

from __future__ import annotations

import logging

import pytest

from lago_org_billing import BillingSettings, EventPipeline, LagoClient
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "test-key"


def _event(n: int) -> dict[str, object]:
    return {"transaction_id": f"tx_{n}", "external_subscription_id": "org_1", "code": "api_call", "properties": {}}


async def test_a_closed_pipeline_says_it_is_closed_not_that_lago_is_down(caplog: pytest.LogCaptureFixture) -> None:
    """An event submitted after aclose() was logged as "Lago is slow or down; set LAGO_SPOOL_PATH": advice for a
    full outbox, wrong for a pipeline closed by the app's shutdown (a spool would not have kept it)."""
    fake = FakeLago(api_key=API_KEY)
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as client:
        pipeline = EventPipeline(client)
        await pipeline.aclose()
        with caplog.at_level(logging.ERROR, logger="lago_org_billing"):
            assert pipeline.submit(_event(1)) is False
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "the pipeline is closed" in record.getMessage()
    assert "LAGO_SPOOL_PATH" not in record.getMessage()
    assert "Lago is slow or down" not in record.getMessage()
    assert pipeline.metrics.dropped == 1


async def test_a_full_outbox_says_lago_is_slow_and_how_to_make_room(caplog: pytest.LogCaptureFixture) -> None:
    """The full outbox's advice stays: a spool, or more room in memory."""
    fake = FakeLago(api_key=API_KEY)
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as client:
        pipeline = EventPipeline(client, memory_capacity=1)
        with caplog.at_level(logging.ERROR, logger="lago_org_billing"):
            assert pipeline.submit(_event(1)) is True
            assert pipeline.submit(_event(2)) is False
        await pipeline.aclose()
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR and "Dropping" in r.getMessage()]
    assert "the outbox is full (1 events)" in record.getMessage()
    assert "LAGO_SPOOL_PATH" in record.getMessage()
