"""Events submitted to a running pipeline from another thread (a sync endpoint's ``record_usage_nowait``, run in
a thread pool) are delivered without waiting for traffic on the loop's own thread, on asyncio and on trio."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import httpx
import pytest

from lago_org_billing._client import LagoClient
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload
from lago_org_billing._settings import BillingSettings
from lago_org_billing.testing import FakeLago

API_KEY = "test-api-key"


class Noticing(httpx.AsyncBaseTransport):
    """The emulator's transport, telling a waiting thread when an event batch reached it."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.batch = threading.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path.endswith("/events/batch"):
            self.batch.set()
        return response


def _serve(pipeline: EventPipeline, backend: str, started: threading.Event, stop: threading.Event) -> None:
    async def main() -> None:
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            started.set()
            await anyio.to_thread.run_sync(stop.wait)  # (the loop stays idle meanwhile: nothing else wakes it)
            await pipeline.aclose()

    anyio.run(main, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_event_submitted_from_another_thread_is_delivered_with_the_loop_idle(backend: str) -> None:
    pytest.importorskip(backend)
    fake = FakeLago(api_key=API_KEY)
    transport = Noticing(fake.transport())
    client = LagoClient(BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url), transport=transport)
    pipeline = EventPipeline(client, flush_interval=0.01)
    started, stop = threading.Event(), threading.Event()
    loop_thread = threading.Thread(target=_serve, args=(pipeline, backend, started, stop))
    loop_thread.start()
    try:
        assert started.wait(10)
        event: Any = event_payload(transaction_id="from-a-thread", external_subscription_id="org_1", code="api_call")
        assert pipeline.submit(event)  # this thread is not the loop's
        # The dispatcher, idle with nothing to send, is woken: the event goes out within its flush interval (a
        # 10 s bound on failure only). It used to wait for an event submitted on the loop's thread, or the shutdown.
        delivered = transport.batch.wait(10)
    finally:
        stop.set()
        loop_thread.join(30)
    assert delivered, "the event submitted from another thread waited for the shutdown"
    assert [stored["transaction_id"] for stored in fake.events] == ["from-a-thread"]
