"""Found by an audit of the delivery pipeline:

- A proxy's or a gateway's 422 page (HTML), or a gateway's own JSON 400 (``{"message": "Bad Request"}``), was taken
  for Lago's verdict on the events: every batch was split and every event dead-lettered with the proxy's text (a
  proxy's HTML 400 was already kept and retried). Only Lago's envelope (``{"status": <the answer's>, ...}``) blames
  events; any other answer keeps them, retried.
- ``submit()`` of a read-only mapping (``MappingProxyType``, ``ChainMap``) took it for a builder: the event was
  dead-lettered as one that could not be built, its content lost (not replayable).
- (Lago's own 422 still dead-letters its invalid events alone: ``test_delivery.py``'s poison event.)
- ``submit()`` of an event without a ``timestamp``: Lago stamped each copy it received, so on its ClickHouse store a
  resend after a lost answer was a second event, billed twice. The timestamp is fixed when the event is submitted.
"""

from __future__ import annotations

import collections
import types
from pathlib import Path
from typing import Any

import httpx
import pytest

from lago_org_billing._delivery import EventPipeline
from test_delivery import Edge, events, make_client, make_fake, run_pipeline, transaction_ids

pytestmark = pytest.mark.anyio

PAGE_422 = (422, b"<html><title>422 Unprocessable Entity</title><h1>Blocked</h1></html>", "text/html")
GATEWAY_400 = (400, b'{"message": "Bad Request"}', "application/json")
GATEWAY_422 = (422, b'{"message": "Unprocessable", "errors": ["blocked"]}', "application/json")


@pytest.mark.parametrize("answer", [PAGE_422, GATEWAY_400, GATEWAY_422], ids=["html-422", "json-400", "json-422"])
async def test_a_proxys_answer_dead_letters_no_event(answer: tuple[int, bytes, str]) -> None:
    status, body, content_type = answer
    fake = make_fake()

    def fault(request: httpx.Request, n: int) -> Any:  # the proxy answers the first 20 requests
        return httpx.Response(status, content=body, headers={"content-type": content_type}) if n <= 20 else None

    async with make_client(Edge(fake.transport(), fault), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, retry_backoff=0.001, max_backoff=0.01)
        assert await run_pipeline(pipeline, events(5), wait=30)
    assert pipeline.dead_letters() == []
    assert sorted(transaction_ids(fake)) == [f"tx{i}" for i in range(5)]


@pytest.mark.parametrize("spool", [False, True], ids=["memory", "spool"])
@pytest.mark.parametrize("wrap", [types.MappingProxyType, collections.ChainMap], ids=["mappingproxy", "chainmap"])
async def test_a_read_only_mapping_submitted_is_delivered(tmp_path: Path, spool: bool, wrap: Any) -> None:
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, spool_path=str(tmp_path / "spool.db") if spool else None)
        assert await run_pipeline(pipeline, [wrap(events(1)[0])], wait=30)
    assert transaction_ids(fake) == ["tx0"] and pipeline.dead_letters() == []


async def test_an_event_without_a_timestamp_is_billed_once_after_a_lost_answer() -> None:
    fake = make_fake("clickhouse")

    def fault(request: httpx.Request, n: int) -> Any:
        return "lose_response" if n == 1 else None  # Lago ingests the batch, its answer is lost

    event = {"transaction_id": "req-1", "external_subscription_id": "org_1", "code": "api_call", "properties": {}}
    async with make_client(Edge(fake.transport(), fault), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, retry_backoff=0.01, max_backoff=0.05)
        assert await run_pipeline(pipeline, [event], wait=30)
    assert transaction_ids(fake) == ["req-1"]  # (twice, 12 ms apart: billed twice)


async def test_a_builders_event_without_a_timestamp_is_stamped_once() -> None:
    fake = make_fake("clickhouse")

    def fault(request: httpx.Request, n: int) -> Any:
        return "lose_response" if n == 1 else None

    def build() -> dict[str, Any]:
        return {"transaction_id": "req-2", "external_subscription_id": "org_1", "code": "api_call", "properties": {}}

    async with make_client(Edge(fake.transport(), fault), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, retry_backoff=0.01, max_backoff=0.05)
        assert await run_pipeline(pipeline, [build], wait=30)  # type: ignore[list-item]
    assert transaction_ids(fake) == ["req-2"]
