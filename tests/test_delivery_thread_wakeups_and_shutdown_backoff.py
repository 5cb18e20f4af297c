"""The non-blocking recording paths (``OrgBilling.record_*_nowait``) and the memory-outbox delivery they feed:
an event recorded from a sync endpoint's thread while the dispatcher goes idle, and a shutdown while delivery is
paused after an outage."""

from __future__ import annotations

import sys
import threading
from typing import Any

import anyio
import httpx
import pytest

from lago_org_billing import BillingSettings, EventPipeline, LagoClient, OrgBilling
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._faults import install_faults

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"


def make_fake() -> FakeLago:
    fake = FakeLago(api_key=API_KEY)
    install_faults(fake)
    return fake


def make_client(transport: httpx.AsyncBaseTransport, **settings: Any) -> LagoClient:
    options: dict[str, Any] = {"api_key": API_KEY, "api_url": FakeLago.base_url}
    options.update(settings)
    return LagoClient(BillingSettings(**options), transport=transport)


class _ThreadLandsAsTheDispatcherGoesIdle(EventPipeline):
    """An EventPipeline whose dispatcher, having found the outbox empty, is overtaken by a sync endpoint's thread
    exactly between that check and the moment it stores the event it then waits on (``wakeup = self._wakeup =
    anyio.Event()``): the interleaving a loaded thread pool produces by itself (see the report: with threads switching
    often it happens within seconds). The thread's call is real: ``record_usage_nowait`` from another thread."""

    record_from_thread: Any = None  # armed by the test: the call the thread makes

    @property
    def _wakeup(self) -> anyio.Event | None:
        return self.__dict__.get("_wakeup_event")

    @_wakeup.setter
    def _wakeup(self, event: anyio.Event | None) -> None:
        record, caller = self.record_from_thread, sys._getframe(1).f_code.co_name
        if record is not None and caller == "_dispatcher" and self.outbox.available() == 0:
            self.record_from_thread = None
            thread = threading.Thread(target=record)
            thread.start()
            thread.join()
        self.__dict__["_wakeup_event"] = event


async def test_an_event_recorded_from_a_thread_as_the_dispatcher_goes_idle_is_delivered_without_another_event() -> None:
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        pipeline = _ThreadLandsAsTheDispatcherGoesIdle(client, flush_interval=0.01)
        billing = OrgBilling(client.settings, client=client, pipeline=pipeline)
        delivered = anyio.Event()
        resolve = pipeline.outbox.resolve

        def resolved(items: list[Any]) -> None:
            resolve(items)
            delivered.set()

        pipeline.outbox.resolve = resolved  # type: ignore[method-assign]
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            # a sync endpoint (run in a thread pool) records a call
            pipeline.record_from_thread = lambda: billing.record_usage_nowait("org_1", "api_call", "tx_from_thread")
            billing.record_usage_nowait("org_1", "api_call", "tx_on_loop")  # wakes the idle dispatcher: it loops
            with anyio.move_on_after(3):  # flush_interval is 0.01 s
                while not fake.events or len(fake.events) < 2:
                    delivered = anyio.Event()
                    await delivered.wait()
            sent_while_running = sorted(event["transaction_id"] for event in fake.events)
            # an event recorded on the loop's thread afterwards does not wake it either (the outbox is not empty)
            billing.record_usage_nowait("org_1", "api_call", "tx_later")
            with anyio.move_on_after(1):
                delivered = anyio.Event()
                await delivered.wait()
            sent_later = sorted(event["transaction_id"] for event in fake.events)
            await pipeline.aclose()
    assert pipeline.record_from_thread is None  # (the thread did land in the window)
    assert sent_while_running == ["tx_from_thread", "tx_on_loop"], (
        "the event recorded from the thread waited in memory: the dispatcher sleeps with no timeout, woken by nobody"
    )
    assert sent_later == ["tx_from_thread", "tx_later", "tx_on_loop"]


async def test_a_shutdown_while_delivery_waits_out_a_backoff_still_tries_lago_once() -> None:
    """Lago failed (503) a moment ago, the pipeline pauses before its next try (up to ``max_backoff``, 60 s, after a
    long outage); Lago is back, and the app shuts down: the shutdown tries once within its deadline instead of
    sleeping through it and losing every event held in memory."""
    fake = make_fake()
    fake.faults.inject(503, count=1, path="/api/v1/events")  # type: ignore[attr-defined]
    async with make_client(fake.transport()) as client:
        # a pause of 4-8 s after one failure: what a default pipeline reaches after some 15 s of outage (30-60 s
        # after a minute)
        pipeline = EventPipeline(client, flush_interval=0.01, retry_backoff=8, shutdown_timeout=1)
        billing = OrgBilling(client.settings, client=client, pipeline=pipeline)
        failed = anyio.Event()
        post = client.send_event_batch_json

        async def observed(body: bytes) -> None:
            try:
                await post(body)
            except Exception:
                failed.set()
                raise

        client.send_event_batch_json = observed  # type: ignore[method-assign]
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            billing.record_usage_nowait("org_1", "api_call", "tx_1")
            with anyio.fail_after(5):
                await failed.wait()  # the 503: delivery now pauses for 4-8 s; Lago answers again from now on
            with anyio.fail_after(3):
                await pipeline.aclose()  # deadline: shutdown_timeout, 1 s
    assert [event["transaction_id"] for event in fake.events] == ["tx_1"], (
        f"shutdown made no attempt within its deadline: lost_at_shutdown={pipeline.stats['lost_at_shutdown']}"
    )
    assert pipeline.stats["lost_at_shutdown"] == 0
