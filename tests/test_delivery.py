"""The background delivery pipeline (memory outbox) against the Lago emulator and faults at the network edge."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from lago_org_billing._client import LagoClient
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._errors import ConfigurationError
from lago_org_billing._events import event_payload
from lago_org_billing._metrics import PipelineMetrics
from lago_org_billing._settings import BillingSettings
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._faults import install_faults

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"


def make_fake(event_store: str = "postgres") -> FakeLago:
    fake = FakeLago(api_key=API_KEY, event_store=event_store)
    install_faults(fake)
    return fake


def make_client(transport: httpx.AsyncBaseTransport, **settings: Any) -> LagoClient:
    options: dict[str, Any] = {"api_key": API_KEY, "api_url": FakeLago.base_url, "retry_backoff": 0.001}
    options.update(settings)
    return LagoClient(BillingSettings(**options), transport=transport)


def events(count: int, prefix: str = "tx", **extra: Any) -> list[dict[str, Any]]:
    return [
        event_payload(transaction_id=f"{prefix}{i}", external_subscription_id="org_1", code="api_call", **extra)
        for i in range(count)
    ]


def transaction_ids(fake: FakeLago) -> list[str]:
    return [event["transaction_id"] for event in fake.events]


class Edge(httpx.AsyncBaseTransport):
    """A transport in front of the emulator: records raw bodies, lets a test fail a request at will."""

    def __init__(self, inner: httpx.AsyncBaseTransport, fault: Callable[[httpx.Request, int], Any] | None = None):
        self.inner = inner
        self.fault = fault
        self.bodies: list[bytes] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        self.bodies.append(body)
        if self.fault is not None:
            outcome = self.fault(request, len(self.bodies))
            if isinstance(outcome, httpx.Response):
                return outcome
            if outcome == "lose_response":  # Lago ingests, the answer never comes back
                await self.inner.handle_async_request(request)
                raise httpx.ReadError("connection reset", request=request)
        return await self.inner.handle_async_request(request)


@pytest.fixture
async def fake() -> AsyncIterator[FakeLago]:
    yield make_fake()


async def run_pipeline(pipeline: EventPipeline, submitted: list[dict[str, Any]], *, wait: float = 20) -> bool:
    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.run)
        for event in submitted:
            pipeline.submit(event)
        delivered = await pipeline.flush(wait)
        await pipeline.aclose()
    return delivered


async def test_events_are_delivered_in_batches_of_at_most_100(fake: FakeLago) -> None:
    """250 events reach Lago once each, in POST /events/batch calls of at most 100."""
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0.01)
        assert await run_pipeline(pipeline, events(250))
    assert sorted(transaction_ids(fake)) == sorted(f"tx{i}" for i in range(250))
    batches = [r.body["events"] for r in fake.requests if r.path == "/api/v1/events/batch"]
    assert batches and all(1 <= len(batch) <= 100 for batch in batches)
    assert pipeline.stats["delivered"] == 250
    assert pipeline.stats["depth"] == 0


async def test_lago_down_then_back_delivers_every_event_once_byte_identical(fake: FakeLago) -> None:
    """503s and dropped connections for a while: every event lands once, each resend byte-identical."""
    fake.inject_fault(status=503, count=12, path="/api/v1/events")
    fake.inject_fault(drop=True, count=6, path="/api/v1/events")
    edge = Edge(fake.transport())
    async with make_client(edge, max_retries=1) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, retry_backoff=0.001, max_backoff=0.01)
        submitted = events(300)
        assert await run_pipeline(pipeline, submitted)
    assert sorted(transaction_ids(fake)) == sorted(e["transaction_id"] for e in submitted)
    stats = pipeline.stats
    assert stats["retries"] > 0 and stats["lago_errors_503"] > 0 and stats["delivered"] == 300
    # every attempt carried each event's exact bytes
    for event in submitted[::37]:
        encoded = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        carrying = [body for body in edge.bodies if f'"{event["transaction_id"]}"'.encode() in body]
        assert len(carrying) >= 1 and all(encoded in body for body in carrying)
    assert len(edge.bodies) > 3  # some attempts failed and were repeated


async def test_lost_response_is_counted_as_duplicate_postgres(fake: FakeLago) -> None:
    """Lago ingests a batch but the answer is lost: the resend's value_already_exist counts as delivered."""
    edge = Edge(fake.transport(), fault=lambda request, n: "lose_response" if n == 1 else None)
    async with make_client(edge) as client:
        pipeline = EventPipeline(client, flush_interval=0.01)
        assert await run_pipeline(pipeline, events(40))
    assert sorted(transaction_ids(fake)) == sorted(f"tx{i}" for i in range(40))
    assert pipeline.stats["duplicates"] == 40
    assert pipeline.stats["delivered"] == 40
    assert pipeline.dead_letters() == []
    assert "lago_errors_422" not in pipeline.stats  # a resend of what Lago has is no error to alert on


async def test_lost_response_replaces_itself_on_clickhouse() -> None:
    """On the ClickHouse store the byte-identical resend replaces the first copy: still one event each."""
    fake = make_fake("clickhouse")
    edge = Edge(fake.transport(), fault=lambda request, n: "lose_response" if n == 1 else None)
    async with make_client(edge) as client:
        pipeline = EventPipeline(client, flush_interval=0.01)
        assert await run_pipeline(pipeline, events(30))
    assert sorted(transaction_ids(fake)) == sorted(f"tx{i}" for i in range(30))


async def test_poison_event_is_dead_lettered_and_the_rest_delivered(fake: FakeLago) -> None:
    """A batch Lago rejects for one event: that one goes to the dead letters with Lago's reason, others land."""
    batch = events(20)
    batch.insert(7, event_payload(transaction_id="poison", external_subscription_id="org_1", code="api_call",
                                  precise_total_amount_cents="not-a-number"))  # fmt: skip
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0.01)
        assert await run_pipeline(pipeline, batch)
    assert sorted(transaction_ids(fake)) == sorted(f"tx{i}" for i in range(20))
    [letter] = pipeline.dead_letters()
    assert letter.event["transaction_id"] == "poison"
    assert letter.status == 422 and letter.code == "validation_errors"
    assert "value_is_invalid" in letter.reason
    assert pipeline.stats["dead_lettered"] == 1 and pipeline.stats["delivered"] == 20


async def test_batch_with_duplicates_and_a_poison_event(fake: FakeLago) -> None:
    """Duplicates inside a rejected batch count as delivered; only the invalid event is dead-lettered."""
    async with make_client(fake.transport()) as client:
        await client.create_events(events(5))  # already in Lago
        mixed = [
            *events(5),
            *events(5, prefix="new"),
            {**events(1, prefix="bad")[0], "precise_total_amount_cents": "x"},
        ]
        pipeline = EventPipeline(client, flush_interval=0.01)
        assert await run_pipeline(pipeline, mixed)
    assert sorted(transaction_ids(fake)) == sorted([*(f"tx{i}" for i in range(5)), *(f"new{i}" for i in range(5))])
    stats = pipeline.stats
    assert (stats["duplicates"], stats["delivered"], stats["dead_lettered"]) == (5, 10, 1)


async def test_422_of_an_unexpected_shape_does_not_stop_delivery(fake: FakeLago) -> None:
    """A 422 whose errors are not the usual lists of codes (objects where strings were expected, keys that are not
    indexes) is handled like any rejection: the event it names is dead-lettered, the others are delivered."""
    odd = {"0": {"transaction_id": [{"unexpected": True}]}, "note": ["x"]}

    def fault(request: httpx.Request, count: int) -> httpx.Response | None:
        if count == 1:
            return httpx.Response(422, json={"status": 422, "error": "Unprocessable Entity", "error_details": odd})
        return None

    async with make_client(Edge(fake.transport(), fault)) as client:
        pipeline = EventPipeline(client, flush_interval=0.01)
        assert await run_pipeline(pipeline, events(3))
    assert sorted(transaction_ids(fake)) == ["tx1", "tx2"]
    [letter] = pipeline.dead_letters()
    assert letter.event["transaction_id"] == "tx0" and "unexpected" in letter.reason


async def test_event_json_cannot_carry_is_dead_lettered(fake: FakeLago) -> None:
    """An event JSON cannot carry (NaN, a set) is dead-lettered without a call; its batch-mates are sent."""
    nan = {**events(1, prefix="nan")[0], "properties": {"tokens": float("nan")}}
    odd = {**events(1, prefix="set")[0], "properties": {"tags": {"a"}}}
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0.01)
        assert await run_pipeline(pipeline, [*events(3), nan, odd])
    assert sorted(transaction_ids(fake)) == ["tx0", "tx1", "tx2"]
    letters = pipeline.dead_letters()
    assert sorted(letter.event["transaction_id"] for letter in letters) == ["nan0", "set0"]
    assert all(letter.code == "invalid_event" for letter in letters)


async def test_429_pauses_delivery_for_the_reset_lago_sends(fake: FakeLago) -> None:
    """A 429 with X-RateLimit-Reset pauses the whole pipeline that long, then everything is delivered."""
    throttled = httpx.Response(
        429,
        headers={"X-RateLimit-Limit": "500", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "7"},
        json={"status": 429, "error": "Too Many Requests"},
    )
    edge = Edge(fake.transport(), fault=lambda request, n: throttled if n == 1 else None)
    pauses: list[float] = []

    async def record(seconds: float) -> None:
        pauses.append(seconds)
        pipeline._not_before = 0.0  # the time has passed
        await anyio.lowlevel.checkpoint()

    async with make_client(edge, max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.01)
        pipeline._sleep = record
        assert await run_pipeline(pipeline, events(50))
    assert sorted(transaction_ids(fake)) == sorted(f"tx{i}" for i in range(50))
    assert len(pauses) == 1 and 6.9 < pauses[0] <= 7.0
    stats = pipeline.stats
    assert stats["rate_limited"] == 1 and stats["lago_errors_429"] == 1


async def test_emulator_rate_limit_is_honoured() -> None:
    """The emulator's X-RateLimit window (on a hand-driven clock): the pipeline waits for each reset."""
    now = [0.0]
    fake = FakeLago(api_key=API_KEY)
    install_faults(fake, clock=lambda: now[0])
    fake.inject_fault(rate_limit={"limit": 2, "reset": 3}, path="/api/v1/events")
    pauses: list[float] = []

    async def elapse(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds
        pipeline._not_before = 0.0
        await anyio.lowlevel.checkpoint()

    async with make_client(fake.transport(), max_retries=0) as client:
        pipeline = EventPipeline(client, batch_size=10, flush_interval=0.0, concurrency=1)
        pipeline._sleep = elapse
        assert await run_pipeline(pipeline, events(60))
    assert sorted(transaction_ids(fake)) == sorted(f"tx{i}" for i in range(60))
    assert pipeline.stats["rate_limited"] >= 2
    # each pause is what X-RateLimit-Reset said (3 s, or the whole seconds left of the window)
    assert pauses and 2.9 < pauses[0] <= 3 and all(0.9 < pause <= 3 for pause in pauses)


async def test_event_that_makes_lago_fail_with_500_is_isolated(fake: FakeLago) -> None:
    """A 500 caused by one event: the batch is split, the culprit dead-lettered, the rest delivered."""

    def fault(request: httpx.Request, n: int) -> Any:
        if b'"crash"' in request.content:
            return httpx.Response(500, json={"status": 500, "errors": [{"message": "boom"}], "data": {}})
        return None

    poisoned = [*events(10), event_payload(transaction_id="crash", external_subscription_id="org_1", code="api_call")]
    async with make_client(Edge(fake.transport(), fault), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, max_attempts=2, retry_backoff=0.001, max_backoff=0.01)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            for event in poisoned:
                pipeline.submit(event)
            # strikes need healthy intervals: keep healthy traffic flowing while the culprit is isolated
            for round_ in range(200):
                if pipeline.stats["dead_lettered"]:
                    break
                pipeline.submit(event_payload(transaction_id=f"ok{round_}", external_subscription_id="org_1",
                                              code="api_call"))  # fmt: skip
                await pipeline.flush(0.05)
            assert await pipeline.flush(10)
            await pipeline.aclose()
    [letter] = pipeline.dead_letters()
    assert letter.event["transaction_id"] == "crash" and letter.status == 500
    assert "crash" not in transaction_ids(fake)
    assert {f"tx{i}" for i in range(10)} <= set(transaction_ids(fake))


async def test_event_lago_fails_on_does_not_hold_back_a_quiet_pipeline(fake: FakeLago) -> None:
    """Low traffic: one event Lago answers 500 for, batched with five others and nothing after. The others are
    delivered (the batch is split), and the culprit, failing again once they got through, is dead-lettered; no
    traffic is needed to get there."""

    def fault(request: httpx.Request, n: int) -> Any:
        if b'"crash"' in request.content:
            return httpx.Response(500, json={"status": 500, "error": "Internal Server Error"})
        return None

    batch = [event_payload(transaction_id="crash", external_subscription_id="org_1", code="api_call"), *events(5)]
    async with make_client(Edge(fake.transport(), fault), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, max_attempts=2, retry_backoff=0.001, max_backoff=0.01)
        assert await run_pipeline(pipeline, batch, wait=5)
    assert sorted(transaction_ids(fake)) == [f"tx{i}" for i in range(5)]
    [letter] = pipeline.dead_letters()
    assert letter.event["transaction_id"] == "crash" and letter.status == 500


async def test_intermittent_500s_dead_letter_no_innocent_event(fake: FakeLago) -> None:
    """Lago answers every other request with a 500 (overloaded, no event at fault): batches are split and retried,
    and as strikes go only to events failing alone, none of the 60 ends up a dead letter; all are delivered."""

    def fault(request: httpx.Request, n: int) -> Any:
        return httpx.Response(500, json={"status": 500, "error": "Internal Server Error"}) if n % 2 else None

    async with make_client(Edge(fake.transport(), fault), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, max_attempts=3, retry_backoff=0.001, max_backoff=0.01)
        assert await run_pipeline(pipeline, events(60), wait=10)
    assert len(transaction_ids(fake)) == 60 and pipeline.dead_letters() == []


@pytest.mark.parametrize("status", [405, 408, 409])
async def test_answers_that_blame_no_event_keep_every_event(fake: FakeLago, status: int) -> None:
    """A 405 (wrong URL), 408 (timeout) or 409 says nothing about the events: none is dead-lettered, all are
    delivered once Lago answers properly."""

    def fault(request: httpx.Request, n: int) -> Any:
        return httpx.Response(status, json={"status": status, "error": "x"}) if n <= 3 else None

    async with make_client(Edge(fake.transport(), fault), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, retry_backoff=0.001, max_backoff=0.01)
        assert await run_pipeline(pipeline, events(5), wait=5)
    assert sorted(transaction_ids(fake)) == [f"tx{i}" for i in range(5)]
    assert pipeline.dead_letters() == [] and pipeline.stats[f"lago_errors_{status}"] == 3


@pytest.mark.parametrize("reset", ["1774000000", "inf", "0"])
async def test_429_wait_is_kept_within_bounds(fake: FakeLago, reset: str) -> None:
    """A 429 whose reset is an epoch timestamp or infinite pauses delivery for max_backoff, not for years; a zero
    reset waits retry_backoff rather than spinning."""
    pauses: list[float] = []

    def fault(request: httpx.Request, n: int) -> Any:
        if n == 1:
            return httpx.Response(429, headers={"x-ratelimit-reset": reset}, json={"status": 429, "error": "x"})
        return None

    async with make_client(Edge(fake.transport(), fault), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, retry_backoff=0.001, max_backoff=0.05)
        pause = pipeline._pause

        def observed(seconds: float) -> None:  # the pause asked for (what the sleeps add up to, whatever the clock)
            pauses.append(seconds)
            pause(seconds)

        pipeline._pause = observed  # type: ignore[method-assign]
        assert await run_pipeline(pipeline, events(3), wait=5)
    assert len(transaction_ids(fake)) == 3
    assert pauses and 0.001 * 0.5 <= max(pauses) <= 0.05


class Held(httpx.AsyncBaseTransport):
    """The emulator behind a gate: requests wait until ``opened`` is set (``entered`` is set as the first arrives)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.opened = anyio.Event()
        self.entered = anyio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.entered.set()
        await self.opened.wait()
        return await self.inner.handle_async_request(request)


async def test_concurrent_flushes_all_return(fake: FakeLago) -> None:
    """Two flush() calls waiting at once both return when the events are delivered."""
    held = Held(fake.transport())
    async with make_client(held) as client:
        pipeline = EventPipeline(client, flush_interval=0.01)
        results: list[bool] = []
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            for event in events(50):
                pipeline.submit(event)

            async def flush() -> None:
                results.append(await pipeline.flush())  # no timeout: a flush nobody wakes would wait forever

            with anyio.fail_after(30):  # a guard against that hang, far above the milliseconds this takes
                async with anyio.create_task_group() as flushes:
                    flushes.start_soon(flush)
                    flushes.start_soon(flush)
                    # both flushes wait, the batch is held at Lago's door (not wait_all_tasks_blocked(): the
                    # pipeline's timers keep waking its tasks, so "all blocked" may take seconds to be seen)
                    await held.entered.wait()
                    while pipeline._flushing < 2:
                        await anyio.lowlevel.checkpoint()
                    held.opened.set()
            await pipeline.aclose()
    assert results == [True, True]


async def test_memory_events_survive_a_cancelled_run_for_the_next(fake: FakeLago) -> None:
    """The run is cancelled (its event loop ends, a lifespan task group is torn down) with a batch at Lago's door and
    more waiting: nothing is dropped, and the next run() delivers all of it."""
    held = Held(fake.transport())
    async with make_client(held) as client:
        # The cancelled run's last chance (what memory holds, sent within shutdown_timeout) waits at the held door
        # too: it gives up after shutdown_timeout, which is what runs here (0.2 s, not the default 5 s of waiting).
        pipeline = EventPipeline(client, flush_interval=0.01, batch_size=2, concurrency=1, shutdown_timeout=0.2)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            for event in events(5):
                pipeline.submit(event)
            with anyio.fail_after(10):  # a guard: a batch is taken at once, then held at Lago's door
                await held.entered.wait()
            assert pipeline.outbox.in_flight
            tasks.cancel_scope.cancel()
        assert pipeline.stats["lost_at_shutdown"] == 0 and pipeline.outbox.unresolved() == 5
        held.opened.set()
        assert await run_pipeline(pipeline, [])
    assert sorted(transaction_ids(fake)) == [f"tx{i}" for i in range(5)]


async def test_outage_does_not_dead_letter_anything(fake: FakeLago) -> None:
    """However long Lago answers 500 to everything, no event is dead-lettered (no healthy interval)."""
    fake.inject_fault(status=500, count=40, path="/api/v1/events")
    async with make_client(fake.transport(), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, max_attempts=2, retry_backoff=0.001, max_backoff=0.005)
        assert await run_pipeline(pipeline, events(30))
    assert pipeline.dead_letters() == []
    assert sorted(transaction_ids(fake)) == sorted(f"tx{i}" for i in range(30))


async def test_wrong_api_key_keeps_events_and_retries() -> None:
    """401 is a configuration error, not the events' fault: they are kept, nothing is dead-lettered."""
    fake = make_fake()
    async with make_client(fake.transport(), api_key="wrong") as client:
        pipeline = EventPipeline(client, flush_interval=0.01, retry_backoff=0.001, max_backoff=0.005)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            for event in events(5):
                pipeline.submit(event)
            assert not await pipeline.flush(0.2)
            assert pipeline.stats["lago_errors_401"] >= 1 and pipeline.stats["depth"] == 5
            await pipeline.aclose(timeout=0)
    assert pipeline.dead_letters() == []
    assert pipeline.stats["lost_at_shutdown"] == 5


async def test_full_memory_outbox_counts_drops_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    """Beyond memory_capacity events are refused: counted in `dropped`, one ERROR per burst, never raised."""
    async with make_client(make_fake().transport()) as client:
        pipeline = EventPipeline(client, memory_capacity=5)
        with caplog.at_level(logging.ERROR, logger="lago_org_billing.delivery"):
            for event in events(9):
                pipeline.submit(event)
        assert pipeline.stats["dropped"] == 4 and pipeline.stats["recorded"] == 9
        assert len([r for r in caplog.records if "Dropping billing event" in r.message]) == 1
        await pipeline.aclose()
    assert pipeline.stats["lost_at_shutdown"] == 5


async def test_submit_after_close_is_counted_as_dropped(fake: FakeLago) -> None:
    """A closed pipeline refuses events visibly (dropped), and aclose twice is harmless."""
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client)
        async with pipeline:
            pipeline.submit(events(1)[0])
        await pipeline.aclose()
        pipeline.submit(events(1, prefix="late")[0])
    assert pipeline.stats["dropped"] == 1 and transaction_ids(fake) == ["tx0"]


async def test_requests_never_wait_on_lago(fake: FakeLago) -> None:
    """submit() returns while Lago hangs: delivery happens later, in the background."""
    release = anyio.Event()

    class Hanging(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            await release.wait()
            return await fake.transport().handle_async_request(request)

    async with make_client(Hanging()) as client:
        pipeline = EventPipeline(client, flush_interval=0.0)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            for event in events(10):
                pipeline.submit(event)  # sync: would deadlock here if it waited on the hanging transport
            assert pipeline.stats["depth"] == 10
            release.set()
            assert await pipeline.flush(10)
            await pipeline.aclose()
    assert len(fake.events) == 10


async def test_prometheus_metrics_export() -> None:
    """The counters are exported through a Prometheus registry at scrape time."""
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    metrics = PipelineMetrics()
    assert metrics.register(registry)
    fake = make_fake()
    fake.inject_fault(status=503, count=1, path="/api/v1/events")
    async with make_client(fake.transport(), max_retries=0) as client:
        pipeline = EventPipeline(client, metrics=metrics, flush_interval=0.0, retry_backoff=0.001)
        assert await run_pipeline(pipeline, events(3))
    text = prometheus_client.generate_latest(registry).decode()
    assert "lago_billing_events_recorded_total 3.0" in text
    assert "lago_billing_events_delivered_total 3.0" in text
    assert 'lago_billing_lago_errors_total{status="503"} 1.0' in text
    assert "lago_billing_queue_depth 0.0" in text
    assert "lago_billing_delivery_seconds_count" in text


def test_constructor_validates_its_options() -> None:
    """A batch larger than Lago's limit, or any bad option, is refused at construction (a ConfigurationError: the
    base of every error the package raises is LagoIntegrationError)."""
    client = make_client(make_fake().transport())
    with pytest.raises(ConfigurationError, match="batch_size"):
        EventPipeline(client, batch_size=101)
    for options in ({"batch_size": 0}, {"concurrency": 0}, {"flush_interval": -1}):
        with pytest.raises(ConfigurationError):
            EventPipeline(client, **options)


# -- lanes: events submitted as facts and built in batches ------------------------------------------------------------


def build_from_facts(facts: tuple[int, str]) -> dict[str, Any] | str:
    """Facts (n, kind) -> the event as JSON text, as a dict, or a failure."""
    n, kind = facts
    if kind == "broken":
        raise RuntimeError(f"cannot build {n}")
    if kind == "junk":
        return 42  # type: ignore[return-value]
    event = event_payload(transaction_id=f"lane{n}", external_subscription_id="org_1", code="api_call")
    return json.dumps(event) if kind == "text" else event


@pytest.mark.parametrize("spool", [False, True])
async def test_lane_events_are_built_later_and_delivered(
    fake: FakeLago, tmp_path: Any, spool: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Facts go through the lane; the builder runs once per event, off submit; text and dict results both
    land, a failing builder (raising, or returning something else) sends its event to the dead letters with the
    reason. Memory outbox and spool."""
    calls: list[int] = []

    def build(facts: tuple[int, str]) -> dict[str, Any] | str:
        calls.append(facts[0])
        return build_from_facts(facts)

    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, spool_path=str(tmp_path / "spool.db") if spool else None)
        submit = pipeline.lane(build)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            for n in range(150):
                submit((n, "broken" if n == 7 else "junk" if n == 9 else "text" if n % 2 else "dict"))
            assert calls == [] or spool  # the memory outbox builds nothing on submit
            assert await pipeline.flush(20)
            letters = pipeline.dead_letters()
            await pipeline.aclose()
    assert sorted(calls) == list(range(150))
    assert sorted(transaction_ids(fake)) == sorted(f"lane{n}" for n in range(150) if n not in (7, 9))
    reasons = " | ".join(letter.reason for letter in letters)
    assert len(letters) == 2 and "cannot build 7" in reasons and "returned int, not a dict" in reasons
    assert "JSON" not in reasons  # a local build failure, said as such (not blamed on Lago or on JSON)
    logged = [record.getMessage() for record in caplog.records if "dead letters" in record.getMessage()]
    assert logged and all("Lago" not in line for line in logged)  # logged as local failures
    assert pipeline.stats["recorded"] == 150 and pipeline.stats["delivered"] == 148
    assert pipeline.stats["dead_lettered"] == 2


async def test_lane_counts_against_the_capacity_and_drops_visibly(caplog: pytest.LogCaptureFixture) -> None:
    """Facts waiting in a lane count like events: beyond memory_capacity they are dropped, counted, logged once."""
    async with make_client(make_fake().transport()) as client:
        pipeline = EventPipeline(client, memory_capacity=5)
        submit = pipeline.lane(build_from_facts)
        pipeline.submit(events(1)[0])
        with caplog.at_level(logging.ERROR, logger="lago_org_billing.delivery"):
            for n in range(8):
                submit((n, "text"))
        assert pipeline.stats["dropped"] == 4 and pipeline.stats["recorded"] == 9
        assert pipeline.stats["depth"] == 5
        assert len([r for r in caplog.records if "Dropping billing event" in r.message]) == 1
        await pipeline.aclose()
    assert pipeline.stats["lost_at_shutdown"] == 5


def test_memory_outbox_lane_order_and_counts() -> None:
    """Lane facts are available, unresolved and discarded like events; each lane stays in submission order."""
    from lago_org_billing._spool import MemoryOutbox

    ready: list[int] = []
    outbox = MemoryOutbox(capacity=100)
    outbox.on_ready = lambda: ready.append(1)
    first, second = outbox.lane(build_from_facts), outbox.lane(build_from_facts)
    assert first((0, "text")) and ready == [1]  # empty -> non-empty: the dispatcher is woken once
    assert second((1, "dict")) and first((2, "text")) and ready == [1]
    assert outbox.available() == 3 and outbox.unresolved() == 3
    ids = [json.loads(item.encoded())["transaction_id"] for item in outbox.take(10)]
    assert ids == ["lane0", "lane2", "lane1"]
    assert outbox.available() == 0 and outbox.unresolved() == 3  # in flight now
    assert first((3, "text"))
    assert outbox.discard() == 4 and outbox.available() == 0


# ------------------------------------------------------------------------------------------- steady failures, logged


@pytest.mark.parametrize("status", [500, 429, 400])
async def test_a_steady_failure_is_logged_once_not_per_answer(
    fake: FakeLago, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Lago (or a proxy) answering 500 to 60 batches in a row is said (it was silent: events piled up unseen); 429s
    and 400s are said when they start, not once per answer or per event (one line per 429, and per dead-lettered
    event for a gateway answering 400 to everything). Every call is timed, failed ones too."""
    import logging

    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    fake.inject_fault(status=status, count=60, path="/api/v1/events")
    async with make_client(fake.transport(), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.0, retry_backoff=0.001, max_backoff=0.002, max_attempts=1_000)
        assert await run_pipeline(pipeline, events(30))
    said = [r for r in caplog.records if r.levelno >= logging.WARNING and str(status) in r.getMessage()]
    assert 1 <= len(said) <= 4, [r.getMessage() for r in said]
    calls = pipeline.stats["batches_sent"]
    assert calls > 50 and pipeline.metrics.latency_count == calls
    if status == 400:
        assert pipeline.stats["dead_lettered"] == 30  # one line for them all (and the 100th, 200th...)
    else:
        assert pipeline.stats["delivered"] == 30
