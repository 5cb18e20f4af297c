"""Review of the raw batch poster's broken writes and of the spool's start on a stray WAL or a read-only path.

* A server (a proxy before Lago, or Lago) that answers a request early, after reading its headers (a 413 Request
  Entity Too Large for a body over its limit, a 401 for a wrong key), then closes: writing the rest of the body fails,
  and the raw HTTP/1.1 poster gave up as "Lago did not answer", though the answer was already on the connection
  (httpx reads it). A large event was then retried as an outage (or split and struck as a 500) instead of being
  dead-lettered at once with the proxy's reason, and a wrong key was taken for an outage. The answer already sent is
  now read (bounded, within a short deadline) after a broken write; a large body is written while the connection is
  read, as anyio's asyncio stream closes the socket (and what it received) when a write fails. Real servers on
  127.0.0.1, plain and TLS; guards: no answer, a cut answer and a stuck server still end as before.
* ``spool.db`` deleted after a crash while its ``spool.db-wal`` (holding committed events) and ``-shm`` stayed: the
  next start made an empty database, and SQLite, finding a WAL without its database, reset it: those events were
  destroyed without a word. The start is now refused, nothing touched, saying to restore the database file or move
  the -wal away. An orphan slot file (``spool.db.1``) in that state is no longer adopted (which reset its -wal and
  deleted the files): left untouched, said at ERROR.
* A spool whose file or directory cannot be written at start (read-only): the advice "or unset it to keep events in
  memory" did not say that the events the file holds would then stay in it, undelivered. It now says how many (when
  the file can be read), or says so in general terms. (The process runs as root here, which every permission lets
  through: the refusal is injected as the ``PermissionError`` a read-only directory gives a non-root process.)
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import pytest

from _limited_proxy import read_head, serve_limited_proxy
from lago_org_billing import _spool
from lago_org_billing._client import LagoClient
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._errors import ConfigurationError, LagoAuthenticationError, LagoIntegrationError
from lago_org_billing._http1 import RawHTTPError, RawPoster
from lago_org_billing._settings import BillingSettings
from lago_org_billing._spool import SqliteOutbox
from test_delivery import API_KEY, events, make_fake, transaction_ids
from test_delivery_deployment import until
from test_delivery_tls_and_vacuum import tls_server
from test_spool import park, rows

pytestmark = pytest.mark.anyio

#: Far more than loopback's socket buffers take while the server reads nothing: writing it fails once the server closes.
_HUGE = 24 * 1024 * 1024
#: Bodies over this many bytes are answered 413 by the proxy below, as nginx's ``client_max_body_size`` (1 MiB).
_LIMIT = 1024 * 1024

_NGINX_413 = (
    b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 Request Entity "
    b"Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


def _answer(status: str, body: bytes, content_type: str = "text/html") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nServer: nginx\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1") + body


async def _early_answerer(answer: bytes, task_status: anyio.abc.TaskStatus[int]) -> None:
    """A server that reads a request's headers, writes ``answer`` and closes, the body unread (as a proxy refusing a
    body over its limit, or a server refusing a request by its headers)."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))

        async def handle(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                if await read_head(stream, b"") is not None:
                    await stream.send(answer)

        await listener.serve(handle)


@pytest.fixture
async def early() -> AsyncIterator[Callable[[bytes], Awaitable[str]]]:
    """Starts an early-answering server for an answer: its URL."""
    async with anyio.create_task_group() as tasks:

        async def start(answer: bytes) -> str:
            port = await tasks.start(_early_answerer, answer)
            return f"http://127.0.0.1:{port}"

        yield start
        tasks.cancel_scope.cancel()


async def test_a_413_answered_before_the_body_is_read_is_the_posters_answer(
    early: Callable[[bytes], Awaitable[str]],
) -> None:
    """The write of a 24 MB body fails (the server closed); the 413 it answered first is returned, not "no answer"."""
    url = await early(_answer("413 Request Entity Too Large", _NGINX_413))
    poster = RawPoster(url, {"Authorization": "Bearer k"}, timeout=10)
    try:
        status, headers, body = await poster.post("/api/v1/events/batch", b"{" + b" " * _HUGE + b"}")
    finally:
        await poster.aclose()
    assert status == 413
    assert ("Server", "nginx") in headers
    assert body == _NGINX_413
    assert not poster._idle  # (a connection whose request was cut short is never reused)


async def test_a_401_answered_before_the_body_is_read_is_the_key_error(
    early: Callable[[bytes], Awaitable[str]],
) -> None:
    """A server refusing the key by the headers alone, then closing: LagoAuthenticationError (check LAGO_API_KEY), not
    LagoUnavailableError (an outage, waited out for ever)."""
    lago_401 = b'{"status":401,"error":"Unauthorized"}'
    url = await early(_answer("401 Unauthorized", lago_401, "application/json"))
    async with LagoClient(BillingSettings(api_key=API_KEY, api_url=url, max_retries=0, api_timeout=10)) as client:
        assert client._raw is not None  # the production path: the raw poster, over a real socket
        with pytest.raises(LagoAuthenticationError) as info:
            await client.send_event_batch_json(b'{"events":[' + b" " * _HUGE + b"]}")
    assert info.value.status == 401


async def test_a_server_that_closes_without_answering_is_still_no_answer(
    early: Callable[[bytes], Awaitable[str]],
) -> None:
    """Nothing was answered before the close: the broken write is "no answer" (RawHTTPError), as before."""
    url = await early(b"")
    async with LagoClient(BillingSettings(api_key=API_KEY, api_url=url, max_retries=0, api_timeout=10)) as client:
        with pytest.raises(LagoIntegrationError) as info:
            await client.send_event_batch_json(b'{"events":[' + b" " * _HUGE + b"]}")
    assert "did not answer" in str(info.value)


async def test_a_cut_answer_before_a_close_is_no_answer(early: Callable[[bytes], Awaitable[str]]) -> None:
    """A status line and headers whose body the server never finished: no answer (not a 413 with half a body)."""
    url = await early(_answer("413 Request Entity Too Large", _NGINX_413)[:-20])
    poster = RawPoster(url, {}, timeout=10)
    try:
        with pytest.raises(RawHTTPError):
            await poster.post("/x", b"{" + b" " * _HUGE + b"}")
    finally:
        await poster.aclose()


async def test_a_large_body_a_server_stops_reading_is_still_no_answer_within_the_timeout() -> None:
    """The body written while the connection is read: a server that neither reads nor answers still ends in the
    poster's own timeout error (not an ExceptionGroup of the task reading meanwhile)."""
    stuck = anyio.Event()

    async def handle(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await read_head(stream, b"")
            await stuck.wait()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, handle)
        poster = RawPoster(f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}", {}, timeout=0.3)
        try:
            with pytest.raises(RawHTTPError, match="no answer within"):
                await poster.post("/x", b"{" + b" " * _HUGE + b"}")
        finally:
            stuck.set()
            await poster.aclose()
            tasks.cancel_scope.cancel()


async def _tls_early_answerer(stream: anyio.abc.ByteStream) -> None:
    async with stream:
        if await read_head(stream, b"") is not None:
            await stream.send(_answer("413 Request Entity Too Large", _NGINX_413))


async def _tls_echo_length(stream: anyio.abc.ByteStream) -> None:
    """Reads whole requests and answers each with its body's length (JSON), keeping the connection alive."""
    async with stream:
        buffer = b""
        while True:
            parts = await read_head(stream, buffer)
            if parts is None:
                return
            head, buffer = parts
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            while len(buffer) < length:
                buffer += await stream.receive()
            buffer = buffer[length:]
            body = f'{{"length":{length}}}'.encode()
            await stream.send(_answer("200 OK", body, "application/json").replace(b"Connection: close\r\n", b""))


async def test_over_tls_a_413_answered_early_is_read_and_large_bodies_still_go_through(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same over TLS (the answer read while the body is written, on a TLS stream); a large body a server reads
    whole is answered as ever, and its connection kept alive."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))
    async with anyio.create_task_group() as server:
        refusing = RawPoster(await tls_server(tls_files, _tls_early_answerer, server), {}, timeout=10)
        reading = RawPoster(await tls_server(tls_files, _tls_echo_length, server), {}, timeout=10)
        try:
            status, _, body = await refusing.post("/api/v1/events/batch", b"{" + b" " * _HUGE + b"}")
            assert (status, body) == (413, _NGINX_413)
            for size in (3 * 1024 * 1024, 100_000, 10):
                status, _, body = await reading.post("/api/v1/events/batch", b"{" + b" " * size + b"}")
                assert (status, body) == (200, f'{{"length":{size + 2}}}'.encode())
            assert len(reading._idle) == 1  # (one connection, kept alive throughout)
        finally:
            await refusing.aclose()
            await reading.aclose()
        server.cancel_scope.cancel()


async def _answer_413(stream: anyio.abc.SocketStream) -> None:
    await stream.send(_answer("413 Request Entity Too Large", _NGINX_413))


async def test_an_event_a_proxy_refuses_with_413_is_dead_lettered_with_the_proxys_reason_at_once(
    tmp_path: Path,
) -> None:
    """A 24 MB event spooled with 30 others, behind a proxy answering 413 early to bodies over 1 MiB: the others are
    delivered, and the big one is dead-lettered as the proxy's 413 (not struck as an outage, nor retried)."""
    fake = make_fake()
    path = tmp_path / "spool.db"
    async with anyio.create_task_group() as tasks:
        port = await tasks.start(serve_limited_proxy, fake, _LIMIT, _answer_413)
        settings = BillingSettings(
            api_key=API_KEY, api_url=f"http://127.0.0.1:{port}", retry_backoff=0.001, max_retries=0, api_timeout=10
        )
        async with LagoClient(settings) as client:
            assert client._raw is not None
            pipeline = EventPipeline(
                client, spool_path=str(path), flush_interval=0.0, max_backoff=0.005, max_attempts=3, concurrency=1
            )
            [huge] = events(1, prefix="huge", properties={"blob": "x" * _HUGE})
            small = events(30, prefix="small")
            for event in [huge, *small]:
                assert pipeline.submit(event)
            await tasks.start(pipeline.run)
            await until(lambda: pipeline.stats["delivered"] == 30 and pipeline.stats["dead_lettered"] == 1)
            assert await pipeline.flush(10), pipeline.stats
            await pipeline.aclose()
        tasks.cancel_scope.cancel()
    assert sorted(transaction_ids(fake)) == sorted(event["transaction_id"] for event in small)
    [letter] = pipeline.dead_letters()
    assert letter.event["transaction_id"] == "huge0"
    assert letter.status == 413, letter
    assert "Too Large" in letter.reason, letter.reason  # (the proxy's page title)
    assert rows(path) == 0


# ----------------------------------------------------------------------------- the spool: a WAL without its database


async def _spool_with_wal(tmp_path: Path, count: int) -> Path:
    """A spool as a crash leaves it: ``count`` committed events in its -wal file, not yet checkpointed into its
    database file (a copy of the three files of a spool open in this process). Returns its path."""
    live = tmp_path / "live" / "spool.db"
    outbox = SqliteOutbox(str(live))
    await outbox.open()
    for event in events(count, prefix="walled"):
        assert outbox.put(event)
    await outbox.commit()
    path = tmp_path / "spool.db"
    for suffix in ("", "-wal", "-shm"):
        shutil.copyfile(f"{live}{suffix}", f"{path}{suffix}")
    await outbox.close()
    return path


async def test_a_spool_whose_database_was_deleted_but_whose_wal_stayed_is_refused_untouched(tmp_path: Path) -> None:
    """spool.db deleted, spool.db-wal (events) and -shm left: the start is refused, and the -wal is untouched (its
    events recoverable once the database file is back)."""
    path = await _spool_with_wal(tmp_path, 7)
    kept = path.read_bytes()
    before = _wal(path)
    assert before
    path.unlink()
    outbox = SqliteOutbox(str(path))
    with pytest.raises(ConfigurationError) as info:
        await outbox.open()
    message = str(info.value)
    assert info.value.variable == "LAGO_SPOOL_PATH"
    assert f"{path}-wal" in message and "missing" in message, message
    assert "restore" in message.lower() and "mv " in message, message
    assert _wal(path) == before  # not reset
    assert not path.exists()  # no empty database made in its place
    # the database file restored: the events in the WAL are there
    path.write_bytes(kept)
    assert _count(path) == 7
    outbox = SqliteOutbox(str(path))
    await outbox.open()
    assert outbox.spool_depth() == 7
    await outbox.close()


async def test_an_empty_database_file_next_to_a_wal_is_refused_too(tmp_path: Path) -> None:
    """The database file made again empty (``touch``, or a start that made it before SQLite refused): same refusal."""
    path = await _spool_with_wal(tmp_path, 3)
    path.write_bytes(b"")
    before = _wal(path)
    with pytest.raises(ConfigurationError, match="-wal"):
        await SqliteOutbox(str(path)).open()
    assert _wal(path) == before


async def test_moving_the_wal_away_as_told_starts_an_empty_spool(tmp_path: Path) -> None:
    """The other way out the refusal gives: the -wal (and -shm) moved away, the spool starts empty."""
    path = await _spool_with_wal(tmp_path, 3)
    path.unlink()
    os.rename(f"{path}-wal", f"{path}.orphan-wal")
    os.rename(f"{path}-shm", f"{path}.orphan-shm")
    outbox = SqliteOutbox(str(path))
    await outbox.open()
    assert outbox.spool_depth() == 0
    await outbox.close()


async def test_an_empty_wal_left_without_its_database_is_no_reason_to_refuse(tmp_path: Path) -> None:
    """A -wal of 0 bytes holds nothing: the spool starts."""
    path = tmp_path / "spool.db"
    _empty_wal(path)
    outbox = SqliteOutbox(str(path))
    await outbox.open()
    assert outbox.spool_depth() == 0
    await outbox.close()


def _wal(path: Path) -> bytes:
    """The bytes of the -wal file of ``path``."""
    with open(f"{path}-wal", "rb") as wal:
        return wal.read()


def _empty_wal(path: Path) -> None:
    with open(f"{path}-wal", "wb"):
        pass


def _count(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        conn.close()


# ----------------------------------------------------------------------------- the spool: read-only at start


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool's lock file cannot be made nor opened for writing, as in a read-only directory (or one of another
    user's files) for a non-root process: the ``PermissionError`` such a process gets."""

    def refused(path: str) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(_spool, "_open_lock", refused)


async def test_a_read_only_spool_holding_events_says_they_would_stay_undelivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool.db"
    await park(path, events(12, prefix="kept"))
    assert rows(path) == 12
    _read_only(monkeypatch)
    with pytest.raises(ConfigurationError) as info:
        await SqliteOutbox(str(path)).open()
    message = str(info.value)
    assert "unset it" in message and "12 undelivered events" in message and "stay" in message, message
    assert rows(path) == 12


async def test_a_read_only_spool_that_cannot_be_read_says_so_in_general_terms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"not a database, or one this process may not read" * 100)
    _read_only(monkeypatch)
    with pytest.raises(ConfigurationError) as info:
        await SqliteOutbox(str(path)).open()
    message = str(info.value)
    assert "unset it" in message and "stay in it, undelivered" in message, message


async def test_a_read_only_directory_without_a_spool_gives_no_backlog_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing at the path: nothing would be left behind, and the advice does not pretend otherwise."""
    _read_only(monkeypatch)
    with pytest.raises(ConfigurationError) as info:
        await SqliteOutbox(str(tmp_path / "spool.db")).open()
    message = str(info.value)
    assert "unset it to keep events in memory" in message and "undelivered" not in message, message


async def test_an_empty_orphan_slot_file_next_to_its_wal_is_left_untouched_not_adopted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same left by a dead worker's slot (``spool.db.1`` emptied, its -wal kept): adopting it would reset the -wal
    (its events lost, and the files deleted); it is left where it is, said at ERROR, and the spool starts."""
    walled = await _spool_with_wal(tmp_path / "crashed", 4)
    orphan = tmp_path / "spool.db.1"
    for suffix in ("-wal", "-shm"):
        shutil.copyfile(f"{walled}{suffix}", f"{orphan}{suffix}")
    orphan.write_bytes(b"")
    before = _wal(orphan)
    outbox = SqliteOutbox(str(tmp_path / "spool.db"))
    await outbox.open()
    try:
        assert outbox.spool_depth() == 0
    finally:
        await outbox.close()
    assert _wal(orphan) == before and orphan.exists()
    assert any("spool.db.1-wal" in record.getMessage() for record in caplog.records if record.levelname == "ERROR")
    orphan.write_bytes(walled.read_bytes())  # restored: its events are read through its -wal
    assert _count(orphan) == 4
