"""Delivery and the spool as deployed: what Lago or a proxy in front of it may answer (an HTML 200, a 204, malformed
framing), a private CA in SSL_CERT_DIR, a spool disk that fails to write or read, and logs bounded while it does."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from _lifespan import serving_lifespan
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware, _spool
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._http1 import RawHTTPError, RawPoster
from lago_org_billing.testing._server import serve_in_thread
from test_delivery import events, make_client, make_fake, transaction_ids
from test_spool import park, rows

pytestmark = pytest.mark.anyio


# ------------------------------------------------------------------------------------------------ helpers


async def until(condition: Callable[[], bool], within: float = 15.0) -> None:
    """Wait until ``condition()`` holds (set by worker threads and real-time backoffs, so polled); fail the test
    after ``within`` seconds (a guard, not a measurement), naming the condition."""
    with anyio.move_on_after(within):
        while not condition():  # noqa: ASYNC110 - polled: some conditions change in worker threads
            await anyio.sleep(0.01)
        return
    try:
        what = inspect.getsource(condition).strip()
    except (OSError, TypeError):
        what = repr(condition)
    pytest.fail(f"still false after {within} s: {what}")


async def serve_answer(answer: bytes, task_status: anyio.abc.TaskStatus[int]) -> None:
    """A keep-alive HTTP/1.1 server on loopback answering every request (read whole) with the bytes ``answer``."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")

    async def handle(stream: anyio.abc.SocketStream) -> None:
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
                    await stream.send(answer)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return

    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(handle)


@contextlib.asynccontextmanager
async def raw_server(answer: bytes) -> AsyncIterator[str]:
    async with anyio.create_task_group() as tasks:
        port = await tasks.start(serve_answer, answer)
        yield f"http://127.0.0.1:{port}"
        tasks.cancel_scope.cancel()


def http_answer(status: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


NGINX_WELCOME = (
    b"<!DOCTYPE html><html><head><title>Welcome to nginx!</title></head><body><h1>Welcome to nginx!</h1></body></html>"
)


class HtmlOk(httpx.AsyncBaseTransport):
    """Something that is not Lago answering 200 with an HTML page (a CDN's SPA fallback, a captive portal...)."""

    def __init__(self) -> None:
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        return httpx.Response(200, headers={"content-type": "text/html"}, content=NGINX_WELCOME)


# ------------------------------------------------------------------------ 2xx answers that are not Lago's


@pytest.mark.parametrize("path", ["raw HTTP/1.1", "httpx"])
async def test_an_html_200_page_is_not_taken_for_delivery(path: str) -> None:
    """A 200 whose body is an HTML page is not Lago's answer (Lago always answers JSON ``{"events": [...]}``): a
    CDN serving a single-page app's ``index.html`` for unknown paths (CloudFront's 403/404 -> 200 rewrite), a captive
    portal, or a LAGO_API_URL pointing at Lago's front end. The events must be kept and retried, with an error naming
    LAGO_API_URL, not deleted as delivered (the generic client path already refuses a non-JSON 2xx body)."""
    answer = http_answer("200 OK", {"Content-Type": "text/html"}, NGINX_WELCOME)
    async with contextlib.AsyncExitStack() as stack:
        if path == "httpx":
            client = make_client(HtmlOk(), max_retries=0)
        else:
            url = await stack.enter_async_context(raw_server(answer))
            client = LagoClient(BillingSettings(api_url=url, api_key="k", max_retries=0, retry_backoff=0.001))
            assert client._raw is not None
        await stack.enter_async_context(client)
        pipeline = EventPipeline(client, flush_interval=0.0, max_backoff=0.05)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            for event in events(5):
                pipeline.submit(event)
            await until(lambda: pipeline.stats["batches_sent"] >= 2 or pipeline.stats["delivered"] > 0)
            delivered, waiting = pipeline.stats["delivered"], pipeline.outbox.unresolved()
            await pipeline.aclose(timeout=0)
    assert delivered == 0, "an HTML page was counted as Lago ingesting the batch: those events are lost"
    assert waiting == 5


# ----------------------------------------------------------------------------------- raw HTTP/1.1 framing


async def test_raw_poster_reads_a_204_without_a_body_as_an_answer() -> None:
    """RFC 9112 6.3: a 204 (or 304, 1xx) answer has no body, whatever its headers. The raw poster reads a kept-alive
    204 without Content-Length "to EOF", waits for the whole timeout, and reports "no answer": the pipeline then takes
    the batch (which the server took) for an outage and resends it forever."""
    async with raw_server(b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n") as url:
        poster = RawPoster(url, {}, timeout=2)
        try:
            status, _, body = await poster.post("/api/v1/events/batch", b'{"events":[]}')
        except RawHTTPError as exc:
            pytest.fail(f"a 204 was read as no answer: {exc}")
        finally:
            await poster.aclose()
    assert (status, body) == (204, b"")


def _subject_hash(name: Any) -> str:
    """OpenSSL's ``X509_NAME_hash`` of a name whose values are already canonical (lower case UTF8String): the
    file name (``<hash>.0``) a certificate needs in an ``SSL_CERT_DIR`` directory."""
    der = name.public_bytes()
    length = der[1]
    canonical = der[2:] if length < 0x80 else der[2 + (length & 0x7F) :]
    return f"{int.from_bytes(hashlib.sha1(canonical).digest()[:4], 'little'):08x}"


async def test_raw_poster_trusts_ssl_cert_dir_as_httpx_does(
    tls_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A self-hosted Lago behind an internal CA, trusted through ``SSL_CERT_DIR`` (which httpx honours): every
    LagoClient call (health, quota reads, ``lago-org-billing health``) works, but the raw poster only knows
    ``SSL_CERT_FILE``/certifi, so every event batch fails certificate verification, is taken for an outage and
    retried forever: nothing is ever billed while the health check is green."""
    from cryptography import x509

    cert_file, key_file = tls_files  # (self-signed: its own CA)
    pem = cert_file.read_bytes()
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / f"{_subject_hash(x509.load_pem_x509_certificate(pem).subject)}.0").write_bytes(pem)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(ca_dir))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b'{"events":[]}' if scope["path"].endswith("/batch") else b'{"customers":[],"meta":{}}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    with serve_in_thread(app, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file)) as url:
        async with LagoClient(BillingSettings(api_url=url, api_key="k", max_retries=0)) as lago:
            assert lago._raw is not None
            await lago.list_customers(per_page=1)  # httpx trusts SSL_CERT_DIR
            await lago.send_event_batch_json(b'{"events":[]}')  # the raw poster must too


# ----------------------------------------------------------------------------- the spool failing at runtime


@pytest.fixture
def fast_spool_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool's write retries back off 1 ms doubled up to 10 ms (not 0.1 s up to 1 s): the tests count attempts
    and ERROR lines (said at most once a minute, ``_LOG_EVERY``, unchanged), not the pauses between attempts."""
    monkeypatch.setattr(_spool, "_RETRY_FIRST", 0.001)
    monkeypatch.setattr(_spool, "_RETRY_MAX", 0.01)


async def _failed_commits(pipeline: EventPipeline, calls: list[int], count: int) -> None:
    """Until the spool has failed ``count`` writes: an event submitted whenever none waits for it (those a failed
    write took are sent from memory, leaving nothing to write)."""
    submitted = 0
    with anyio.fail_after(15):
        while len(calls) < count:
            if not pipeline.outbox.pending:  # type: ignore[attr-defined]
                pipeline.submit(events(1, prefix=f"kept{submitted}-")[0])
                submitted += 1
            await anyio.sleep(0.005)


def _failing_write(calls: list[int]) -> Callable[..., Any]:
    lock = threading.Lock()

    def write(self: Any, *args: Any) -> Any:
        with lock:
            calls.append(1)
        raise sqlite3.OperationalError("database or disk is full")

    return write


async def test_events_the_spool_could_not_write_are_not_silently_lost_at_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The spool's disk fills up (or its volume goes read-only) while Lago is up; at shutdown, every event is in Lago,
    in the spool or counted in ``lost_at_shutdown`` (the log says they "stay in the spool" only when they do): none
    vanishes silently."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.0)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await pipeline.commit()  # the spool is open and fine
            calls: list[int] = []
            monkeypatch.setattr(_spool._SpoolFile, "write", _failing_write(calls))
            for event in events(5):
                pipeline.submit(event)
            await until(lambda: len(calls) >= 1)  # the disk refused at least one group commit
            with caplog.at_level(logging.WARNING, logger="lago_org_billing"):
                await pipeline.aclose(timeout=1)
    monkeypatch.undo()
    in_lago, lost, spooled = len(transaction_ids(fake)), pipeline.stats["lost_at_shutdown"], rows(path)
    assert in_lago + lost + spooled == 5, (
        f"{5 - in_lago - lost - spooled} of 5 events vanished silently "
        f"(in Lago {in_lago}, counted lost {lost}, in the spool {spooled})"
    )
    if spooled == 0:
        assert not any("stay in the spool" in record.getMessage() for record in caplog.records)


async def test_a_failing_spool_disk_is_not_logged_at_error_every_commit_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fast_spool_retries: None
) -> None:
    """While the spool cannot be written (disk full), every group commit (each 50 ms) logs an ERROR line: 20 lines
    a second, 72,000 an hour, per worker, and each attempt re-encodes every pending event (up to 100,000) in a worker
    thread holding the GIL. Expected: said when it starts (then at a bounded rate), retried with a backoff."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.0)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await pipeline.commit()
            calls: list[int] = []
            monkeypatch.setattr(_spool._SpoolFile, "write", _failing_write(calls))
            with caplog.at_level(logging.ERROR, logger="lago_org_billing"):
                await _failed_commits(pipeline, calls, 8)
                errors = [r for r in caplog.records if "Could not write the event spool" in r.getMessage()]
            monkeypatch.undo()
            await pipeline.aclose(timeout=1)
    assert len(errors) <= 3, f"{len(errors)} ERROR lines for {len(calls)} failed commits of one outage"


async def test_a_spool_read_error_does_not_tear_down_the_apps_lifespan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error while the spool loads its next rows (``disk I/O error``, a malformed page, a busy NFS volume)
    is not caught (the commit path catches ``sqlite3.Error``, ``fill`` does not): it crashes the delivery task
    group, which the middleware runs in the same task group as the app's own lifespan. The app's lifespan is
    cancelled (its shutdown code runs: database pools closed...) while the server keeps serving requests, and the
    server is sent ``lifespan.shutdown.failed`` though nobody asked for a shutdown."""
    from starlette.applications import Starlette

    path = tmp_path / "spool.db"
    await park(path, events(50))  # a backlog on disk (left by an outage, or by the previous deploy)
    fake = make_fake()
    load = _spool._SpoolFile.load
    loads = 0

    def flaky_load(self: Any, *args: Any) -> Any:
        nonlocal loads
        loads += 1
        if loads == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return load(self, *args)

    monkeypatch.setattr(_spool._SpoolFile, "load", flaky_load)
    app_lifespan = {"state": "not started"}

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        app_lifespan["state"] = "running"
        try:
            yield
        finally:
            app_lifespan["state"] = "ended"

    client = make_client(fake.transport())
    pipeline = EventPipeline(client, spool_path=str(path), spool_window=10, flush_interval=0.0, max_backoff=0.05)
    settings = BillingSettings(api_key="test-api-key", api_url=fake.base_url, quota_mode="off")
    middleware = OrgBillingMiddleware(Starlette(lifespan=lifespan), settings=settings, pipeline=pipeline, quota=None)
    async with client, serving_lifespan(middleware) as sent:
        # the 10 rows of the first window are delivered, then the next load fails once
        await until(lambda: app_lifespan["state"] == "ended" or len(fake.events) == 50)
        state, server_told = app_lifespan["state"], list(sent)
    assert state == "running", "the app's own lifespan was ended by a billing spool read error"
    assert "lifespan.shutdown.failed" not in server_told
    assert sorted(transaction_ids(fake)) == sorted(e["transaction_id"] for e in events(50))


# ------------------------------------------------------------------------------------- dead-letter growth


class RejectAll(httpx.AsyncBaseTransport):
    """Lago answering 422 for every event of every batch (a billable metric's expression that fails on them all)."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        count = len(json.loads(await request.aread())["events"])
        details = {str(i): "expression_evaluation_failed: Variable: b not found" for i in range(count)}
        body = {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors", "error_details": details}
        return httpx.Response(422, json=body)


async def test_a_full_in_memory_dead_letter_list_does_not_log_an_error_per_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Once the in-memory dead letters hold 10,000 letters, every further one logs an ERROR ("forgetting the
    oldest"), one line per billed request for as long as Lago rejects them, although the rejections themselves are
    deliberately logged once per kind then every 100th ("a proxy answering 400 to every event must not write a line
    per event")."""
    async with make_client(RejectAll(), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.0)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            with caplog.at_level(logging.ERROR, logger="lago_org_billing"):
                for event in events(10_500):
                    pipeline.submit(event)
                assert await pipeline.flush(60)
            await pipeline.aclose()
    assert pipeline.stats["dead_lettered"] == 10_500
    evictions = [r for r in caplog.records if "dead-letter list is full" in r.getMessage()]
    assert len(evictions) <= 5, f"{len(evictions)} ERROR lines for 500 evicted letters"


# ------------------------------------------------------------------------------- added with the fixes above


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\n{}\r\n0\r\n\r\n",
    ],
    ids=["length-not-a-number", "length-negative", "chunk-size-not-hex", "chunk-size-0x"],
)
async def test_a_malformed_length_is_a_protocol_error_and_closes_the_connection(answer: bytes) -> None:
    """A Content-Length or chunk size that is not a number made ``RawPoster.post`` raise ``ValueError`` (not the
    ``RawHTTPError`` the client maps to "Lago did not answer") and left the socket open; a negative length was
    taken as it is. The body's end is unknown: the connection cannot be read further, so it is closed."""
    async with raw_server(answer) as url:
        poster = RawPoster(url, {}, timeout=2)
        opened: list[Any] = []
        connect = poster._connect

        async def recording_connect() -> Any:
            opened.append(await connect())
            return opened[-1]

        poster._connect = recording_connect  # type: ignore[method-assign]
        try:
            with pytest.raises(RawHTTPError, match="malformed"):
                await poster.post("/api/v1/events/batch", b'{"events":[]}')
        finally:
            await poster.aclose()
    assert len(opened) == 1 and not poster._idle
    with pytest.raises(anyio.ClosedResourceError):  # closed by post() itself, not left to the garbage collector
        await opened[0].stream.send(b"x")


async def test_a_malformed_answer_reaches_the_pipeline_as_lago_not_answering() -> None:
    """Through the client, a malformed length is an outage (``LagoUnavailableError``), like other protocol errors."""
    from lago_org_billing import LagoUnavailableError

    async with raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n\r\n{}") as url:
        async with LagoClient(BillingSettings(api_url=url, api_key="k", max_retries=0)) as client:
            with pytest.raises(LagoUnavailableError, match="Content-Length"):
                await client.send_event_batch_json(b'{"events":[]}')


@pytest.mark.parametrize("body", [b"", b'{"events":[]}', b' {"events": []}\n'])
async def test_an_empty_or_json_2xx_answer_is_still_delivery(body: bytes) -> None:
    """The check of finding 1 refuses pages, not Lago's answers: JSON (whitespace around it included), or nothing."""
    answer = http_answer("200 OK", {"Content-Type": "application/json"}, body)
    async with raw_server(answer) as url:
        async with LagoClient(BillingSettings(api_url=url, api_key="k", max_retries=0)) as client:
            await client.send_event_batch_json(b'{"events":[]}')


def _read_only(pipeline: EventPipeline, on: bool) -> None:
    """Make the spool's own connection refuse writes (``SQLITE_READONLY``, as a volume gone read-only), or not."""
    outbox = pipeline.outbox
    assert isinstance(outbox, _spool.SqliteOutbox) and outbox.file.conn is not None
    with outbox.file.lock:
        outbox.file.conn.execute(f"PRAGMA query_only={'ON' if on else 'OFF'}")


async def test_a_spool_that_cannot_be_written_for_a_while_loses_nothing_and_encodes_each_event_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fast_spool_retries: None
) -> None:
    """While the spool refuses writes (a full or read-only volume), Lago being up, the events it could not write are
    sent to Lago from memory, each encoded once, instead of waiting there for the volume until memory is full and new
    ones are dropped; the write is retried with a backoff meanwhile, and once the volume takes writes again the next
    events are written and delivered as usual, and the recovery is said. Nothing is left in the file."""
    path = tmp_path / "spool.db"
    encoded: list[str] = []
    dumps = _spool.dumps_event

    def counting_dumps(event: Any) -> str:
        if type(event) is not str:
            encoded.append(event["transaction_id"])
        return dumps(event)

    attempts: list[int] = []
    write = _spool._SpoolFile.write

    def counting_write(self: Any, *args: Any) -> Any:
        attempts.append(1)
        return write(self, *args)

    monkeypatch.setattr(_spool, "dumps_event", counting_dumps)
    monkeypatch.setattr(_spool._SpoolFile, "write", counting_write)
    fake = make_fake()
    submitted = events(5)
    later = events(3, prefix="later")
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.0)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await pipeline.commit()
            with caplog.at_level(logging.WARNING, logger="lago_org_billing"):
                _read_only(pipeline, True)
                for event in submitted:
                    pipeline.submit(event)
                await until(lambda: len(transaction_ids(fake)) == 5)  # delivered though never written
                assert rows(path) == 0 and pipeline.outbox.unresolved() == 0
                _read_only(pipeline, False)
                for event in later:
                    pipeline.submit(event)
                assert await pipeline.flush(15)
            await pipeline.aclose()
    expected = submitted + later
    assert sorted(transaction_ids(fake)) == sorted(e["transaction_id"] for e in expected)
    assert len(transaction_ids(fake)) == len(expected)
    assert sorted(encoded) == sorted(e["transaction_id"] for e in expected), "events encoded more than once"
    assert rows(path) == 0
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [m for level, m in messages if level == logging.ERROR and "Could not write the event spool" in m][:1]
    assert any("sent to Lago from memory" in m for level, m in messages if level == logging.WARNING)


async def test_events_a_failing_spool_sends_from_memory_count_against_its_capacity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lago down and the spool failing: the events sent from memory wait there for Lago, and count against the
    outbox's capacity as the ones waiting for the file do (memory stays bounded: the next ones are refused, counted)."""
    from test_spool import Down

    path = tmp_path / "spool.db"
    async with make_client(Down(), max_retries=0) as client:
        pipeline = EventPipeline(
            client, spool_path=str(path), flush_interval=0.0, retry_backoff=0.001, max_backoff=0.05
        )
        outbox = pipeline.outbox
        assert isinstance(outbox, _spool.SqliteOutbox)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await pipeline.commit()
            outbox.capacity = 4
            calls: list[int] = []
            monkeypatch.setattr(_spool._SpoolFile, "write", _failing_write(calls))
            accepted = [pipeline.submit(event) is not False for event in events(3)]
            await until(lambda: len(outbox._unwritten) == 3)  # sent from memory, Lago down: waiting there
            accepted += [pipeline.submit(event) is not False for event in events(3, prefix="more")]
            assert accepted == [True] * 4 + [False] * 2
            assert outbox.unresolved() == 4
            await pipeline.aclose(timeout=0.1)
    monkeypatch.undo()


async def test_a_spool_that_cannot_be_written_at_shutdown_sends_its_waiting_events_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At shutdown, events waiting for a spool that cannot be written are sent to a Lago that is up (each once)
    instead of waiting out the shutdown timeout for a write that does not come."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.0)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await pipeline.commit()
            calls: list[int] = []
            monkeypatch.setattr(_spool._SpoolFile, "write", _failing_write(calls))
            for event in events(5):
                pipeline.submit(event)
            await until(lambda: len(calls) >= 1)
            await pipeline.aclose(timeout=10)
    assert transaction_ids(fake) == [e["transaction_id"] for e in events(5)]
    assert pipeline.stats["lost_at_shutdown"] == 0 and pipeline.stats["delivered"] == 5


@pytest.mark.parametrize("disk_at_close", ["still failing", "writable again"])
async def test_what_a_failing_spool_holds_at_shutdown_is_said_truthfully(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, disk_at_close: str
) -> None:
    """Lago down and the spool failing at shutdown: the events are written by the last commit if the volume takes it
    (and said to stay in the spool), else counted in ``lost_at_shutdown`` with an ERROR saying so."""
    from test_spool import Down

    path = tmp_path / "spool.db"
    async with make_client(Down(), max_retries=0) as client:
        pipeline = EventPipeline(
            client, spool_path=str(path), flush_interval=0.0, retry_backoff=0.001, max_backoff=0.05
        )
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            await pipeline.commit()
            calls: list[int] = []
            monkeypatch.setattr(_spool._SpoolFile, "write", _failing_write(calls))
            for event in events(5):
                pipeline.submit(event)
            # written by no commit: sent from memory (Lago down: they wait there)
            await until(lambda: len(calls) >= 1 and len(pipeline.outbox._unwritten) == 5)  # type: ignore[attr-defined]
            with caplog.at_level(logging.WARNING, logger="lago_org_billing"):
                assert not await pipeline.flush(0.1)
                if disk_at_close == "writable again":
                    monkeypatch.undo()
                await pipeline.aclose(timeout=0.1)
    monkeypatch.undo()
    messages = [r.getMessage() for r in caplog.records]
    if disk_at_close == "writable again":
        assert rows(path) == 5 and pipeline.stats["lost_at_shutdown"] == 0
        assert any("5 billing events not delivered" in m and "stay in the spool" in m for m in messages)
    else:
        assert rows(path) == 0 and pipeline.stats["lost_at_shutdown"] == 5
        assert any("5 billing events were neither delivered nor written" in m for m in messages)
        assert not any("stay in the spool" in m for m in messages)
