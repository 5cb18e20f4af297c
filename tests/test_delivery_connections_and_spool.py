"""The background path (spool -> batch -> the raw HTTP/1.1 poster -> Lago), against real servers'
behaviours on loopback and the SQLite spool as deployments leave it."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._http1 import RawPoster, _Connection
from lago_org_billing._spool import SqliteOutbox
from test_delivery import events

pytestmark = pytest.mark.anyio

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{"events":[]}'

Handler = Callable[[anyio.abc.SocketStream], Awaitable[None]]


async def read_request(stream: anyio.abc.SocketStream, buffer: bytes = b"") -> tuple[bytes, bytes]:
    """One request's body (Content-Length framed), and what was read past it."""
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
    return buffer[:length], buffer[length:]


async def serve(handler: Handler, tasks: anyio.abc.TaskGroup) -> str:
    """Serve ``handler`` (one call per connection) on 127.0.0.1 in ``tasks``; the base URL."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def run() -> None:
        async with listener:
            await listener.serve(handler)

    tasks.start_soon(run)
    return f"http://127.0.0.1:{port}"


def recording(poster: RawPoster) -> list[_Connection]:
    """Keep every connection the poster opens (so that only the poster's own closing can close them, not GC)."""
    opened: list[_Connection] = []
    connect = poster._connect

    async def kept() -> _Connection:
        connection = await connect()
        opened.append(connection)
        return connection

    poster._connect = kept  # type: ignore[method-assign]
    return opened


# ------------------------------------------------------------------------------------------------ raw poster


async def test_a_batch_cut_off_at_the_shutdown_deadline_closes_its_connection() -> None:
    """Lago holds a batch past the shutdown deadline: the connection it was sent on
    is closed then (it was left open, to Lago, until the garbage collector found it and warned "unclosed transport":
    a ResourceWarning, an error under ``-W error``)."""
    received = anyio.Event()
    closed = anyio.Event()

    async def never_answers(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await read_request(stream)
            received.set()
            try:
                while True:
                    await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                closed.set()

    async with anyio.create_task_group() as server:
        url = await serve(never_answers, server)
        async with LagoClient(BillingSettings(api_url=url, api_key="k", api_timeout=60)) as client:
            assert client._raw is not None
            opened = recording(client._raw)
            pipeline = EventPipeline(client, flush_interval=0.0)
            async with anyio.create_task_group() as tasks:
                await tasks.start(pipeline.run)
                for event in events(3):
                    pipeline.submit(event)
                with anyio.fail_after(10):
                    await received.wait()
                await pipeline.aclose(timeout=0)
            assert pipeline.stats["lost_at_shutdown"] == 3  # (memory outbox: said lost, as documented)
            with anyio.move_on_after(5):
                await closed.wait()
            assert closed.is_set(), "the cut-off batch's connection to Lago was left open"
            assert len(opened) == 1
        server.cancel_scope.cancel()


async def test_a_408_a_server_sent_as_it_closed_an_idle_connection_is_not_the_batchs_answer() -> None:
    """Some servers answer ``408 Request Timeout`` + ``Connection: close`` as they close an idle keep-alive connection
    (RFC 9110 15.5.9). The next batch sent on that pooled connection read the stale 408 as its own answer: reported
    failed (the pipeline backs off, warns) though it never reached the server. It is sent again on a new connection,
    once, as for a connection closed silently."""
    bodies: list[bytes] = []
    idle_answered = anyio.Event()

    async def times_out_when_idle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                body, _ = await read_request(stream)
            except anyio.EndOfStream:
                return
            bodies.append(body)
            await stream.send(OK)
            if len(bodies) == 1:  # the first connection idles out
                await stream.send(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                idle_answered.set()

    async with anyio.create_task_group() as server:
        url = await serve(times_out_when_idle, server)
        poster = RawPoster(url, {}, timeout=5)
        assert (await poster.post("/api/v1/events/batch", b"first"))[0] == 200
        with anyio.fail_after(5):
            await idle_answered.wait()
        status, _, body = await poster.post("/api/v1/events/batch", b"second")
        await poster.aclose()
        server.cancel_scope.cancel()
    assert (status, body) == (200, b'{"events":[]}')
    assert bodies == [b"first", b"second"]


async def test_answers_in_tiny_pieces_with_interim_chunked_and_close_framing() -> None:
    """A 100 Continue, a chunked answer with extensions and trailers, then a Connection: close answer, each written a
    byte at a time: read whole, the kept-alive connection reused, the closed one not."""
    answers = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'3;x=1\r\n{"a\r\n4\r\n":1}\r\n0\r\nX-Trailer: t\r\n\r\n',
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
    ]
    connections = 0

    async def tiny(stream: anyio.abc.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            buffer = b""
            for answer in answers[connections - 1 :]:
                try:
                    _, buffer = await read_request(stream, buffer)
                except anyio.EndOfStream:
                    return
                for index in range(len(answer)):
                    await stream.send(answer[index : index + 1])
                if b"close" in answer:
                    return

    async with anyio.create_task_group() as server:
        url = await serve(tiny, server)
        poster = RawPoster(url, {}, timeout=5)
        first = await poster.post("/x", b"{}")
        second = await poster.post("/x", b"{}")
        assert len(poster._idle) == 0  # (the close answer's connection is not pooled)
        await poster.aclose()
        server.cancel_scope.cancel()
    assert first[0] == 200 and first[2] == b'{"a":1}'
    assert second == (200, [("Connection", "close"), ("Content-Length", "2")], b"{}")
    assert connections == 1


# ------------------------------------------------------------------------------------------------ the spool


def spool_bytes(path: str) -> int:
    return sum(os.path.getsize(path + suffix) for suffix in ("", "-wal") if os.path.exists(path + suffix))


def padded(index: int) -> dict[str, Any]:
    return {
        "transaction_id": f"tx{index}",
        "external_subscription_id": "org_1",
        "code": "api_call",
        "timestamp": "1767225600.000",
        "properties": {"pad": "x" * 400},
    }


async def test_a_drained_backlog_is_given_back_to_the_volume_while_traffic_goes_on(tmp_path: Path) -> None:
    """After an outage's backlog (23 MB here) is delivered, the file shrinks, also while requests keep coming. It
    shrank only when a commit found the events table empty, which under steady traffic (a few events a commit
    window, delivered within the next) never happens: busy deployments, those with the largest backlogs, kept them
    on disk for good."""
    path = str(tmp_path / "spool.db")
    outbox = SqliteOutbox(path, window=100_000)
    await outbox.open()
    for index in range(20_000):
        outbox.put(padded(index))
    await outbox.commit()
    high_water = spool_bytes(path)
    assert high_water > 16 << 20
    await outbox.fill()
    following = 20_000
    for _ in range(40):  # a commit window at a time: what was sent is resolved, one new event comes
        outbox.resolve(outbox.take(1_000))
        outbox.put(padded(following))
        following += 1
        await outbox.commit()
        await outbox.fill()
    assert outbox.unresolved() == 1 and outbox.available() == 1
    assert spool_bytes(path) < 2 << 20, f"still {spool_bytes(path)} bytes of {high_water} after the drain"
    # the rows left are intact and in order: the next one is delivered, and a restart has nothing else to send
    [item] = outbox.take(1)
    assert '"tx20039"' in item.encoded()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        [(row_id, body)] = conn.execute("SELECT id, body FROM events").fetchall()
    assert row_id == item.id and body == item.encoded()
    outbox.resolve([item])
    await outbox.close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0


async def test_a_corrupt_orphan_slot_file_does_not_keep_every_worker_from_starting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A slot file left by another worker that SQLite cannot read (torn by a failing disk, or a stray file named
    like one) made every process's spool fail to open: each tries to adopt it, so no worker could start, and the
    error named LAGO_SPOOL_PATH and advised changing it. The unreadable orphan is left where it is, named in an
    ERROR; the valid orphans are adopted and the process works."""
    path = tmp_path / "spool.db"
    (tmp_path / "spool.db.1").write_bytes(b"this is not a database, " * 200)
    valid = SqliteOutbox(str(path) + ".2")  # a valid orphan with one event (as a dead worker leaves it)
    await valid.open()
    valid.put(padded(7))
    await valid.close()
    outbox = SqliteOutbox(str(path))
    with caplog.at_level(logging.ERROR, logger="lago_org_billing.delivery"):
        await outbox.open()
    try:
        assert outbox.path == str(path) and outbox.adopted == 1 and outbox.unresolved() == 1
        assert (tmp_path / "spool.db.1").exists() and not (tmp_path / "spool.db.2").exists()
        assert any("spool.db.1" in record.getMessage() for record in caplog.records if record.levelno == logging.ERROR)
    finally:
        await outbox.close()


async def test_a_spool_open_cut_short_by_the_event_loop_ending_keeps_its_slot(tmp_path: Path) -> None:
    """Without a lifespan the background starts with a request and is cancelled natively when that event loop ends,
    possibly while the spool opens in its worker thread (a native cancellation goes through anyio's shield). The
    thread went on and locked slot 0; the next run opened the spool again and, slot 0 being locked by this very
    process, took slot 1: the events in slot 0 (the backlog of the previous process) were stranded for the process's
    life, never delivered nor adopted, and the first connection and lock leaked."""
    import asyncio

    path = tmp_path / "spool.db"
    previous = SqliteOutbox(str(path))  # what the previous process left
    await previous.open()
    previous.put(padded(1))
    await previous.close()

    outbox = SqliteOutbox(str(path))
    inside, go_on = threading.Event(), threading.Event()
    adopt = outbox.file._adopt_orphans

    def held(my_slot: int) -> int:
        inside.set()
        go_on.wait(10)
        return adopt(my_slot)

    outbox.file._adopt_orphans = held  # type: ignore[method-assign]
    task = asyncio.ensure_future(outbox.open())
    await anyio.to_thread.run_sync(inside.wait, 10)
    task.cancel()  # natively, as asyncio does to the tasks left when its loop ends
    with pytest.raises(asyncio.CancelledError):
        await task
    go_on.set()
    outbox.file._adopt_orphans = adopt  # type: ignore[method-assign]
    await outbox.open()  # the next run
    try:
        assert outbox.path == str(path), "the spool's own slot was taken by the cut-short opening"
        assert outbox.unresolved() == 1 and not (tmp_path / "spool.db.1").exists()
    finally:
        await outbox.close()
