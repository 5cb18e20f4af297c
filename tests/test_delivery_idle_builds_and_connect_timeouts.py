"""Review of event delivery: idle pipelines, batch sizes and connections of a self-hosted Lago, connect timeouts.

* ``EventPipeline(flush_interval=0)`` ("send at once", a value it takes) with the memory outbox: the task building
  lazily submitted events slept ``flush_interval`` between two builds, 0, so it woke at every turn of the event loop
  and took a whole CPU core while the app was idle.
* A self-hosted Lago taking fewer events per batch than the pipeline sends (``LAGO_EVENTS_BATCH_MAX_LENGTH``): each
  batch was split in halves until Lago took them, 15 calls refused for every batch of 100 against a maximum of 7, for
  good, and nothing said but the count of 422 answers.
* The raw poster kept 8 connections alive: a pipeline sending 10 batches at once opened a new one (with TLS, a
  handshake) for about one batch in eight.
* The raw HTTP/1.1 poster (the event batches' path) raised a connection not made within LAGO_API_TIMEOUT (a host
  dropping SYNs: a firewall, a full accept queue) as "no answer", unlike httpx's ``ConnectTimeout``: nothing of the
  batch was written, yet a batch of 1 MiB or more was split and its event struck as too large for the way to Lago
  (dead-lettered at once with ``max_attempts=1``), though Lago never saw a byte of it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from lago_org_billing._client import LagoClient, connection_never_made
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._errors import LagoUnavailableError
from lago_org_billing._settings import BillingSettings
from lago_org_billing.testing import FakeLago
from test_delivery import API_KEY, events, make_client
from test_delivery_deployment import until

pytestmark = pytest.mark.anyio


async def test_an_idle_pipeline_sending_at_once_does_not_wake_at_every_turn_of_the_loop() -> None:
    """With ``flush_interval=0`` and nothing to send, the pipeline's tasks wait: 500 turns of the event loop (a few
    milliseconds) do not run its build of waiting events hundreds of times."""
    fake = FakeLago(api_key=API_KEY)
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0)
        builds = 0
        build_pending = pipeline.outbox.build_pending  # type: ignore[attr-defined]

        def counted() -> None:
            nonlocal builds
            builds += 1
            build_pending()

        pipeline.outbox.build_pending = counted  # type: ignore[attr-defined]
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            for _ in range(500):
                await anyio.lowlevel.checkpoint()
            # it used to build at every turn: some 500 times
            assert builds < 50, f"the build task woke {builds} times in 500 turns of an idle loop"
            # events are still sent at once, and built
            assert pipeline.lane(lambda n: events(1, prefix=f"lane{n}-")[0])(1)
            assert pipeline.submit(events(1, prefix="sub")[0])
            assert await pipeline.flush(10)
            await pipeline.aclose()
    assert sorted(e["transaction_id"] for e in fake.events) == ["lane1-0", "sub0"]


@pytest.fixture
def syn_dropping_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose accept queue is full (one connection, never accepted): the kernel drops the SYNs of
    new connections, which are never made (as behind a firewall dropping them)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    filler = socket.socket()
    filler.settimeout(5)
    filler.connect(("127.0.0.1", port))
    try:
        yield port
    finally:
        filler.close()
        server.close()


def _raw_client(port: int, **settings: Any) -> LagoClient:
    options: dict[str, Any] = {
        "api_key": API_KEY,
        "api_url": f"http://127.0.0.1:{port}",
        "api_timeout": 0.3,
        "retry_backoff": 0.001,
    }
    options.update(settings)
    client = LagoClient(BillingSettings(**options))
    assert client._raw is not None  # the raw poster sends the batches (no proxy applies to 127.0.0.1 here)
    return client


async def test_a_batch_whose_connection_is_not_made_in_time_is_known_unsent(
    syn_dropping_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The raw poster's connect timeout is a connection never made, as httpx's ConnectTimeout is."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with _raw_client(syn_dropping_port) as client:
        with pytest.raises(LagoUnavailableError) as caught:
            await client.send_event_batch_json(b'{"events":[]}')
    assert connection_never_made(caught.value), caught.value
    assert "no connection within 0.3 s" in str(caught.value)


async def test_a_large_event_is_not_struck_when_no_connection_could_be_made(
    syn_dropping_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1.2 MB event, Lago unreachable (its connections time out): no byte of it was sent, so it is not taken for
    too large for the way to Lago. With ``max_attempts=1`` it used to be dead-lettered at its first attempt."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    big = events(1, prefix="big", properties={"blob": "x" * 1_200_000})[0]
    async with _raw_client(syn_dropping_port) as client:
        pipeline = EventPipeline(client, flush_interval=0, max_attempts=1, retry_backoff=0.001, max_backoff=0.01)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            assert pipeline.submit(big)
            # two attempts, each a connect timeout (or the event dead-lettered at the first)
            await until(lambda: pipeline.stats["batches_sent"] >= 2 or pipeline.stats["dead_lettered"] > 0, 30)
            assert pipeline.dead_letters() == []
            assert pipeline.stats["dead_lettered"] == 0 and pipeline.stats["depth"] == 1
            await pipeline.aclose(0)


async def _serve_counting(connections: list[int], task_status: anyio.abc.TaskStatus[int]) -> None:
    """A keep-alive HTTP/1.1 server on 127.0.0.1 answering requests 200 ``{"events":[]}`` ten at a time, once ten are
    waiting (the pipeline's ten batches in flight together); ``connections[0]`` counts the connections made to it."""
    answer = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{"events":[]}'
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    waiting: list[anyio.Event] = []

    async def handle(stream: anyio.abc.SocketStream) -> None:
        connections[0] += 1
        async with stream:
            buffer = b""
            try:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        buffer += await stream.receive()
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            length = int(value)
                    while len(buffer) < length:
                        buffer += await stream.receive()
                    buffer = buffer[length:]
                    turn = anyio.Event()
                    waiting.append(turn)
                    if len(waiting) == 10:
                        for each in waiting:
                            each.set()
                        waiting.clear()
                    await turn.wait()
                    await stream.send(answer)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return

    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(handle)


async def test_ten_batches_at_once_reuse_their_ten_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline sending 10 batches at once (Lago's documented "10 parallel connections x 100 events"), in rounds:
    the raw poster keeps the 10 connections alive between rounds, as the pool of the client's other calls would (20),
    instead of 8 (a new connection, with TLS its handshake, for about one batch in eight)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    connections = [0]
    async with anyio.create_task_group() as server:
        port = await server.start(_serve_counting, connections)
        async with _raw_client(port, api_timeout=10) as client:
            pipeline = EventPipeline(client, concurrency=10, flush_interval=0.01)
            async with anyio.create_task_group() as tg:
                await tg.start(pipeline.run)
                for round_ in range(10):
                    for event in events(2000, prefix=f"r{round_}-"):
                        assert pipeline.submit(event)
                    assert await pipeline.flush(30)
                await pipeline.aclose()
        server.cancel_scope.cancel()
    assert pipeline.stats["delivered"] == 20_000 and pipeline.stats["batches_sent"] == 200
    assert connections[0] <= 10, f"{connections[0]} connections made for 200 batches, 10 at a time"


async def test_batches_shrink_to_what_a_self_hosted_lago_takes(caplog: pytest.LogCaptureFixture) -> None:
    """A self-hosted Lago with LAGO_EVENTS_BATCH_MAX_LENGTH=7 refuses batches of 100 as ``too_many_events``: the
    pipeline says so and sends smaller batches from then on, instead of splitting every batch of 100 in halves
    until Lago takes them (15 refused calls for each, counted as 422 errors, and no line logged)."""
    fake = FakeLago(api_key=API_KEY, batch_max_length=7)
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, concurrency=1)
        async with anyio.create_task_group() as tg:
            await tg.start(pipeline.run)
            for event in events(2000):
                assert pipeline.submit(event)
            with caplog.at_level("WARNING", logger="lago_org_billing.delivery"):
                assert await pipeline.flush(30)
            await pipeline.aclose()
    assert sorted(e["transaction_id"] for e in fake.events) == sorted(f"tx{i}" for i in range(2000))
    assert pipeline.dead_letters() == [] and pipeline.stats["delivered"] == 2000
    refused = [r for r in fake.requests if r.path == "/api/v1/events/batch" and r.status == 422]
    assert len(refused) <= 5, f"{len(refused)} batches refused as too_many_events"
    assert pipeline.batch_size <= 7
    said = [r.getMessage() for r in caplog.records if "LAGO_EVENTS_BATCH_MAX_LENGTH" in r.getMessage()]
    assert said and "batch_size" in said[0]
