"""A batch the dispatcher has handed to a worker that is cancelled before it runs is not lost.

``asyncio.run()`` ending a loop cancels every task at once with ``Task.cancel()``: a worker whose receive of a batch was
already done (anyio's memory stream gives the item to a waiting receiver at once) but that had not resumed yet dropped
the batch with its CancelledError. An app without a lifespan (mounted in another; ``uvicorn --lifespan off``) runs its
delivery in such a loop: its events were neither delivered by the run's last chance nor released ("Billing delivery
stopped with 3 events in memory", seen once in a loaded run of tests/test_asgi_servers.py). The batch now goes back to
the outbox at the run's end, and the last chance delivers it."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "k"


def events(count: int) -> list[dict[str, Any]]:
    return [
        event_payload(transaction_id=f"tx{i}", external_subscription_id="org_1", code="api_call", timestamp=1767225600)
        for i in range(count)
    ]


async def test_a_batch_handed_to_a_worker_cancelled_before_it_runs_is_delivered_at_the_last_chance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker is cancelled as asyncio.run() does, right as the dispatcher hands it the batch, and the run ends:
    the three events are delivered by the run's last chance (none left in memory), once each."""
    fake = FakeLago(api_key=API_KEY)
    settings = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url, retry_backoff=0.001, max_retries=0)
    real_stream = anyio.create_memory_object_stream
    holder: dict[str, EventPipeline] = {}

    class CancellingSend:
        """The dispatcher's end of the stream: hands the batch over, then the run is cancelled at once (before the
        worker it went to has run)."""

        def __init__(self, send: Any) -> None:
            self._send = send

        async def send(self, item: Any) -> None:
            await self._send.send(item)
            # as asyncio.run() ends a loop: every task cancelled at once with Task.cancel(), the worker too (its
            # receive already done, not yet resumed), not through anyio's cancel scopes
            for task in workers:
                task.cancel()
            scope = holder["pipeline"]._scope
            assert scope is not None
            scope.cancel()

        async def __aenter__(self) -> CancellingSend:
            await self._send.__aenter__()
            return self

        async def __aexit__(self, *exc: Any) -> None:
            await self._send.__aexit__(*exc)

    class Streams:
        def __getitem__(self, item_type: Any) -> Any:
            def make(size: float = 0) -> Any:
                send, receive = real_stream[item_type](size)
                return CancellingSend(send), receive

            return make

    import lago_org_billing._delivery as delivery

    workers: list[asyncio.Task[Any]] = []
    real_worker = EventPipeline._worker

    async def worker(self: EventPipeline, receive: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        workers.append(task)
        await real_worker(self, receive)

    monkeypatch.setattr(EventPipeline, "_worker", worker)
    monkeypatch.setattr(delivery.anyio, "create_memory_object_stream", Streams())
    async with LagoClient(settings, transport=fake.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0.0, concurrency=1, shutdown_timeout=5)
        holder["pipeline"] = pipeline
        for event in events(3):
            assert pipeline.submit(event)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
        monkeypatch.undo()
        assert pipeline.outbox.unresolved() == 0
    assert sorted(e["transaction_id"] for e in fake.events) == ["tx0", "tx1", "tx2"]
