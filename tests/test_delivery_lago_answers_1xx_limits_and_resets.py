"""Event delivery against Lago's answers as they reach the raw HTTP/1.1 poster through the proxies in front of it.

A framing proxy on 127.0.0.1 passes each ``POST /events/batch`` to the Lago emulator (Postgres store: a resend of an
ingested event is a 422 ``value_already_exist``) and writes Lago's answer back framed as a test says: interim 1xx
answers first, folded headers, odd header case, ``Content-Length`` with leading zeros, repeated or as a list of
equal values, chunked with extensions and trailers. Every event must end in Lago exactly once, counted delivered once:
an answer read wrong must never lose an event nor count it twice, and an answer that cannot be read is an unknown
outcome (the batch sent again, byte for byte, Lago deduplicating it).

Also: Lago's 429 headers in every shape a proxy may give them (``X-RateLimit-Reset`` in seconds or as an epoch,
``Retry-After`` in seconds or as an HTTP date, negative, huge, NaN, absent, a date no clock can hold) pause delivery
within ``[retry_backoff, max_backoff]`` and lose nothing; a self-hosted Lago whose ``LAGO_EVENTS_BATCH_MAX_LENGTH`` is
under the pipeline's batch size; a 422 naming some events of a batch, over the wire.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from _limited_proxy import parse_head, read_body, read_head
from lago_org_billing._client import LagoClient
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload
from lago_org_billing._http1 import RawPoster
from lago_org_billing._settings import BillingSettings
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"

#: Writes Lago's answer (status, reason, JSON body) to request ``n`` (counted from 0) as bytes on the wire, and
#: whether the connection is closed after it.
Frame = Callable[[int, int, str, bytes], tuple[bytes, bool]]


def plain(n: int, status: int, reason: str, body: bytes) -> tuple[bytes, bool]:
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode("latin-1") + body, False


def chunked(body: bytes) -> bytes:
    """``body`` in two chunks, the first with a chunk extension (a quoted ``;`` and ``\\r`` free), then a trailer."""
    half = len(body) // 2
    return (
        f'{half:x};name="a;b"\r\n'.encode() + body[:half] + b"\r\n"
        + f"{len(body) - half:X} ; x=1\r\n".encode() + body[half:] + b"\r\n"
        + b"0\r\nX-Checksum: abc\r\nX-Other:  2\r\n\r\n"
    )  # fmt: skip


def framed(head: str) -> Frame:
    """A frame writing ``HTTP/1.1 <status> <reason>\\r\\n`` + ``head`` (``{n}`` replaced by the body's length) and the
    body (chunked when ``head`` says so)."""

    def frame(n: int, status: int, reason: str, content: bytes) -> tuple[bytes, bool]:
        text = f"HTTP/1.1 {status} {reason}\r\n" + head.replace("{n}", str(len(content)))
        wire = chunked(content) if "chunked" in head.lower() else content
        return text.encode("latin-1") + wire, "close" in head.lower()

    return frame


class FramingProxy:
    """A keep-alive HTTP/1.1 proxy on 127.0.0.1 before the Lago emulator, writing each answer with ``frame``."""

    def __init__(self, fake: FakeLago, frame: Frame) -> None:
        self.fake = fake
        self.frame = frame
        self.requests = 0
        self.connections = 0
        self.bodies: list[bytes] = []

    async def run(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        async with httpx.AsyncClient(transport=self.fake.transport(), base_url=FakeLago.base_url) as lago:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            async with listener:
                task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))

                async def handle(stream: anyio.abc.SocketStream) -> None:
                    await self._connection(stream, lago)

                await listener.serve(handle)

    async def _connection(self, stream: anyio.abc.SocketStream, lago: httpx.AsyncClient) -> None:
        self.connections += 1
        buffer = b""
        async with stream:
            while True:
                parts = await read_head(stream, buffer)
                if parts is None:
                    return
                method, target, headers, length = parse_head(parts[0])
                read = await read_body(stream, parts[1], length)
                if read is None:
                    return
                body, buffer = read
                self.bodies.append(body)
                answer = await lago.request(method, target, content=body, headers=headers)
                number, self.requests = self.requests, self.requests + 1
                wire, close = self.frame(number, answer.status_code, answer.reason_phrase, answer.content)
                try:
                    await stream.send(wire)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
                if close:
                    return


def events(count: int, prefix: str = "tx") -> list[dict[str, Any]]:
    return [
        event_payload(
            transaction_id=f"{prefix}{i}", external_subscription_id="org_1", code="api_call", timestamp=1767225600 + i
        )
        for i in range(count)
    ]


def stored(fake: FakeLago) -> list[str]:
    return sorted(event["transaction_id"] for event in fake.events)


@pytest.fixture
async def proxied() -> AsyncIterator[Callable[[FakeLago, Frame], Any]]:
    """Starts a framing proxy before an emulator: ``(proxy, client)`` (the client on the raw poster, through it)."""
    async with anyio.create_task_group() as tasks:
        clients: list[LagoClient] = []

        async def start(fake: FakeLago, frame: Frame) -> tuple[FramingProxy, LagoClient]:
            proxy = FramingProxy(fake, frame)
            port = await tasks.start(proxy.run)
            settings = BillingSettings(
                api_key=API_KEY, api_url=f"http://127.0.0.1:{port}", retry_backoff=0.001, max_retries=0, api_timeout=5
            )
            client = LagoClient(settings)
            assert client._raw is not None  # (the raw HTTP/1.1 poster carries the batches)
            clients.append(client)
            return proxy, client

        yield start
        for client in clients:
            await client.aclose()
        tasks.cancel_scope.cancel()


def pipeline_for(client: LagoClient, **options: Any) -> EventPipeline:
    settings: dict[str, Any] = {"flush_interval": 0.0, "retry_backoff": 0.001, "max_backoff": 0.01, "concurrency": 1}
    settings.update(options)
    return EventPipeline(client, **settings)


async def deliver(pipeline: EventPipeline, submitted: list[dict[str, Any]], wait: float = 10) -> bool:
    async with anyio.create_task_group() as tasks:
        await tasks.start(pipeline.run)
        for event in submitted:
            assert pipeline.submit(event)
        delivered = await pipeline.flush(wait)
        await pipeline.aclose(0)
    return delivered


# ------------------------------------------------------------------ answers that must be read as they are


READABLE = {
    "103-early-hints-then-answer": "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    "100-then-103-then-answer": "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
}

FRAMINGS = {
    "odd-case-and-leading-zeros": "CONTENT-type: application/json\r\ncontent-LENGTH: 000{n}\r\n\r\n",
    "two-equal-lengths": "Content-Length: {n}\r\nContent-Length: {n}\r\n\r\n",
    "equal-lengths-as-a-list": "Content-Length: {n}, {n}\r\n\r\n",
    "length-folded-onto-a-second-line": "Content-Type: application/json\r\nContent-Length:\r\n {n}\r\n\r\n",
    "other-header-folded": "X-Served-By: edge-1,\r\n\tedge-2\r\nContent-Length: {n}\r\n\r\n",
    "chunked-folded-onto-a-second-line": "Transfer-Encoding:\r\n  chunked\r\n\r\n",
    "chunked-with-extensions-and-trailers": "transfer-encoding: Chunked\r\n\r\n",
    "close-delimited": "Content-Type: application/json\r\nConnection: close\r\n\r\n",
}


@pytest.mark.parametrize("head", list(FRAMINGS.values()), ids=list(FRAMINGS))
async def test_every_framing_a_proxy_may_write_is_read_as_lago_s_answer(proxied: Any, head: str) -> None:
    """Each framing of Lago's answers (to the first sends, to the resends) is read as the answer it is: every event
    lands once and is counted delivered once, with one request per batch (no answer taken for "no answer", which
    resent the batch after Lago had ingested it, for ever when every answer is framed so)."""
    fake = FakeLago(api_key=API_KEY)
    _, client = await proxied(fake, framed(head))
    pipeline = pipeline_for(client, batch_size=10)
    submitted = events(30)
    assert await deliver(pipeline, submitted, wait=5)
    assert stored(fake) == sorted(e["transaction_id"] for e in submitted)
    stats = pipeline.stats
    assert (stats["delivered"], stats["duplicates"], stats["dead_lettered"]) == (30, 0, 0)
    assert stats["batches_sent"] == 3


@pytest.mark.parametrize("interim", list(READABLE.values()), ids=list(READABLE))
async def test_interim_answers_before_lago_s_answer_are_skipped(proxied: Any, interim: str) -> None:
    """100 Continue and 103 Early Hints (a CDN's preload hints) before the real answer are not taken as the answer:
    the 200 after them is (no resend), and a 422 after them still dead-letters the invalid event alone."""

    def frame(n: int, status: int, reason: str, body: bytes) -> tuple[bytes, bool]:
        wire, close = plain(n, status, reason, body)
        return interim.encode("latin-1") + wire, close

    fake = FakeLago(api_key=API_KEY)
    _, client = await proxied(fake, frame)
    poison = {**events(1, "bad")[0], "precise_total_amount_cents": "not-a-number"}
    pipeline = pipeline_for(client)
    assert await deliver(pipeline, [*events(5), poison])
    assert stored(fake) == [f"tx{i}" for i in range(5)]
    [letter] = pipeline.dead_letters()
    assert letter.event["transaction_id"] == "bad0" and letter.status == 422
    assert "value_is_invalid" in letter.reason
    assert pipeline.stats["duplicates"] == 0


async def test_a_422_naming_some_events_over_the_wire(proxied: Any) -> None:
    """Lago's atomic 422 for a batch holding events it has, an invalid one and new ones, read off the wire (chunked,
    an interim 103 first): those it has count delivered (duplicates), the invalid one is dead-lettered with Lago's
    reason and code, the new ones are sent again and land."""
    fake = FakeLago(api_key=API_KEY)

    def frame(n: int, status: int, reason: str, body: bytes) -> tuple[bytes, bool]:
        head = f"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 {status} {reason}\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head.encode() + chunked(body), False

    _, client = await proxied(fake, frame)
    seed = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url)
    async with LagoClient(seed, transport=fake.transport()) as direct:
        await direct.create_events(events(3))  # already in Lago
    mixed = [*events(3), {**events(1, "bad")[0], "precise_total_amount_cents": "x"}, *events(4, "new")]
    pipeline = pipeline_for(client)
    assert await deliver(pipeline, mixed)
    assert stored(fake) == sorted([*(f"tx{i}" for i in range(3)), *(f"new{i}" for i in range(4))])
    stats = pipeline.stats
    assert (stats["delivered"], stats["duplicates"], stats["dead_lettered"]) == (7, 3, 1)
    [letter] = pipeline.dead_letters()
    assert (letter.event["transaction_id"], letter.status, letter.code) == ("bad0", 422, "validation_errors")
    assert json.loads(letter.reason) == {"precise_total_amount_cents": ["value_is_invalid"]}


# ------------------------------------------------------------------ answers that cannot be read: unknown outcome


UNREADABLE = {
    "conflicting-lengths": "Content-Length: {n}\r\nContent-Length: 1{n}\r\n\r\n",
    "conflicting-lengths-as-a-list": "Content-Length: {n}, 1{n}\r\n\r\n",
    "length-not-a-number": "Content-Length: 0x{n}\r\n\r\n",
    "length-signed": "Content-Length: +{n}\r\n\r\n",
    "whitespace-before-the-first-header": "\tX-Junk: 1\r\nContent-Length: {n}\r\n\r\n",
    # (int() refuses 4,301 digits and more: a ValueError, logged as an unexpected error with a traceback per resend)
    "length-of-5000-digits": "Content-Length: " + "9" * 5000 + "\r\n\r\n",
}


@pytest.mark.parametrize("head", list(UNREADABLE.values()), ids=list(UNREADABLE))
async def test_an_unreadable_answer_is_an_unknown_outcome_resent_and_deduplicated(
    proxied: Any, head: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Lago ingests the batch but its answer cannot be read (the body's end unknown): the batch is sent again, the same
    bytes on a new connection (the first is never reused), and Lago's duplicates count as delivered: once each. It is
    a protocol error, not an "unexpected error" logged with a traceback."""
    unreadable = framed(head)

    def frame(n: int, status: int, reason: str, body: bytes) -> tuple[bytes, bool]:
        return unreadable(n, status, reason, body) if n == 0 else plain(n, status, reason, body)

    fake = FakeLago(api_key=API_KEY)
    proxy, client = await proxied(fake, frame)
    pipeline = pipeline_for(client)
    submitted = events(8)
    assert await deliver(pipeline, submitted)
    assert stored(fake) == sorted(e["transaction_id"] for e in submitted)
    stats = pipeline.stats
    assert (stats["delivered"], stats["duplicates"], stats["dead_lettered"]) == (8, 8, 0)
    assert proxy.bodies[0] == proxy.bodies[1] and proxy.connections == 2
    assert "Unexpected error" not in caplog.text


async def test_a_204_or_304_with_a_length_has_no_body_and_the_connection_goes_on() -> None:
    """A 204 (or 304) saying ``Content-Length: 5`` has no body (RFC 9112 6.3): the next answer on the kept-alive
    connection is read as the next request's, not taken five bytes into it."""
    answers = [
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n",
        b'HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n{"events":[]}',
    ]
    connections: list[int] = []

    async def serve(*, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))

            async def handle(stream: anyio.abc.SocketStream) -> None:
                connections.append(1)
                buffer, sent = b"", 0
                async with stream:
                    while sent < len(answers):
                        parts = await read_head(stream, buffer)
                        if parts is None:
                            return
                        head, buffer = parts
                        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                        while len(buffer) < length:
                            buffer += await stream.receive()
                        buffer = buffer[length:]
                        await stream.send(answers[sent])
                        sent += 1

            await listener.serve(handle)

    async with anyio.create_task_group() as tasks:
        port = await tasks.start(serve)
        poster = RawPoster(f"http://127.0.0.1:{port}", {}, timeout=5)
        statuses = [(await poster.post("/x", b"{}"))[0::2] for _ in answers]
        await poster.aclose()
        tasks.cancel_scope.cancel()
    assert statuses == [(204, b""), (304, b""), (200, b'{"events":[]}')]
    assert len(connections) == 1


# ------------------------------------------------------------------ 429: how long delivery pauses


RATE_LIMITS = {
    "reset-seconds": ({"X-RateLimit-Limit": "500", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "0.03"}, 0.03),
    "reset-negative": ({"X-RateLimit-Reset": "-5"}, 0.001),
    "reset-nan": ({"X-RateLimit-Reset": "nan"}, 0.001),
    "reset-a-day": ({"X-RateLimit-Reset": "86400"}, 0.05),
    "reset-epoch-milliseconds": ({"X-RateLimit-Reset": "1774000000000"}, 0.05),
    "reset-unreadable-retry-after-seconds": ({"X-RateLimit-Reset": "soon", "Retry-After": "0.02"}, 0.02),
    "retry-after-date-past": ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.001),
    "retry-after-date-far": ({"Retry-After": "Fri, 31 Dec 9998 23:59:59 GMT"}, 0.05),
    "retry-after-date-no-clock-holds": ({"Retry-After": "Fri, 09 Jan 9999999999 00:00:00 GMT"}, None),
    "no-header": ({}, None),
}


@pytest.mark.parametrize(("headers", "expected"), list(RATE_LIMITS.values()), ids=list(RATE_LIMITS))
async def test_a_429_pauses_delivery_within_bounds_and_loses_nothing(
    proxied: Any, headers: dict[str, str], expected: float | None
) -> None:
    """Three 429s (Lago's headers as given, or as a proxy mangles them) pause the whole pipeline for the wait they
    say, kept within [retry_backoff, max_backoff] (never days for an epoch or a far date, never 0 for a past one or
    a negative: no busy loop); headers that say nothing usable get the usual backoff. Then every event lands once."""
    body = json.dumps({"status": 429, "error": "Too Many Requests"}).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())

    def frame(n: int, status: int, reason: str, content: bytes) -> tuple[bytes, bool]:
        if n < 3:  # (Lago did ingest these batches; the proxy's answer stands for Lago's throttling)
            head = f"HTTP/1.1 429 Too Many Requests\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
            return head.encode() + body, False
        return plain(n, status, reason, content)

    fake = FakeLago(api_key=API_KEY)
    _, client = await proxied(fake, frame)
    pipeline = pipeline_for(client, max_backoff=0.05)
    pauses: list[float] = []
    pause = pipeline._pause

    def observed(seconds: float) -> None:  # (what the sleeps add up to, whatever the clock)
        pauses.append(seconds)
        pause(seconds)

    pipeline._pause = observed  # type: ignore[method-assign]
    submitted = events(5)
    assert await deliver(pipeline, submitted)
    assert stored(fake) == sorted(e["transaction_id"] for e in submitted)
    assert pipeline.stats["delivered"] == 5 and pipeline.stats["batches_sent"] == 4
    assert len(pauses) >= 3 and all(0.001 * 0.5 <= wait <= 0.05 for wait in pauses)
    if expected is not None:
        assert len(pauses) == 3 and all(abs(wait - expected) < 0.005 for wait in pauses), pauses


# ------------------------------------------------------------------ batch limits


async def test_a_self_hosted_batch_limit_under_the_batch_size_delivers_everything() -> None:
    """A self-hosted Lago with LAGO_EVENTS_BATCH_MAX_LENGTH=7 answers 422 ``too_many_events`` (naming no event) to
    the pipeline's batches of 100: they are split until Lago takes them, and no event is dead-lettered."""
    fake = FakeLago(api_key=API_KEY, batch_max_length=7)
    settings = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url, retry_backoff=0.001, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as client:
        pipeline = pipeline_for(client, flush_interval=0.01)
        submitted = events(250)
        assert await deliver(pipeline, submitted)
    assert stored(fake) == sorted(e["transaction_id"] for e in submitted)
    assert pipeline.dead_letters() == [] and pipeline.stats["delivered"] == 250
    sizes = [len(r.body["events"]) for r in fake.requests if r.path == "/api/v1/events/batch" and r.status == 200]
    assert sizes and max(sizes) <= 7


async def test_batches_of_large_events_with_long_ids_stay_within_lago_s_count_limit() -> None:
    """Events with the longest ids the package takes (1,024 bytes) and 20 kB of properties: every batch holds at most
    100 events (Lago's only documented batch limit), each arrives whole, once."""
    fake = FakeLago(api_key=API_KEY)
    big = [
        event_payload(
            transaction_id=f"{i:04d}" + "t" * 1020,
            external_subscription_id="org_1",
            code="api_call",
            timestamp=1767225600,
            properties={"blob": "x" * 20_000, "n": i},
        )
        for i in range(230)
    ]
    settings = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url, retry_backoff=0.001, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as client:
        pipeline = pipeline_for(client, flush_interval=0.01, concurrency=2)
        assert await deliver(pipeline, big, wait=30)
    assert stored(fake) == sorted(e["transaction_id"] for e in big)
    batches = [r.body["events"] for r in fake.requests if r.path == "/api/v1/events/batch"]
    assert all(1 <= len(batch) <= 100 for batch in batches)
    assert all(event["properties"]["blob"] == "x" * 20_000 for event in fake.events)


async def test_an_event_json_cannot_encode_for_its_depth_does_not_hold_back_its_batch() -> None:
    """An event submitted with properties nested 100,000 deep (json's RecursionError, not a ValueError) is
    dead-lettered as not serialisable; the events batched with it are delivered. (It was an "unexpected error": the
    whole batch was retried as it was, for ever, none of its events delivered, an ERROR with a traceback each time.)"""
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    fake = FakeLago(api_key=API_KEY)
    settings = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url, retry_backoff=0.001, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as client:
        pipeline = pipeline_for(client)
        nested = {"transaction_id": "deep", "external_subscription_id": "org_1", "code": "api_call",
                  "timestamp": "1767225600.000", "properties": {"tree": deep}}  # fmt: skip
        assert await deliver(pipeline, [*events(2), nested, *events(2, "after")], wait=5)
    assert stored(fake) == ["after0", "after1", "tx0", "tx1"]
    [letter] = pipeline.dead_letters()
    assert letter.event["transaction_id"] == "deep" and letter.code == "invalid_event"
    assert "not JSON-serialisable" in letter.reason


def test_a_retry_after_date_no_clock_holds_is_no_wait_and_no_error() -> None:
    """A ``Retry-After`` date past ``datetime``'s range is a wait nobody can say: none (the usual backoff), the
    ``X-RateLimit-Reset`` beside it still read. (It raised ``OverflowError``: the 429 became an "unexpected error",
    an ERROR with a traceback per batch, not counted as a rate limit.)"""
    from lago_org_billing._client import _retry_after

    far = "Fri, 09 Jan 9999999999 00:00:00 GMT"
    assert _retry_after(httpx.Headers({"Retry-After": far})) is None
    assert _retry_after(httpx.Headers({"Retry-After": far, "X-RateLimit-Reset": "3"})) == 3.0


async def test_a_429_whose_retry_after_no_clock_holds_is_counted_a_rate_limit(proxied: Any) -> None:
    """Such a 429 is a rate limit like any other: counted in ``rate_limited``, then every event lands once."""
    body = json.dumps({"status": 429, "error": "Too Many Requests"}).encode()

    def frame(n: int, status: int, reason: str, content: bytes) -> tuple[bytes, bool]:
        if n == 0:
            head = (
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: Fri, 09 Jan 9999999999 00:00:00 GMT\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            return head.encode() + body, False
        return plain(n, status, reason, content)

    fake = FakeLago(api_key=API_KEY)
    _, client = await proxied(fake, frame)
    pipeline = pipeline_for(client, max_backoff=0.05)
    submitted = events(3)
    assert await deliver(pipeline, submitted)
    assert stored(fake) == sorted(e["transaction_id"] for e in submitted)
    assert pipeline.stats["rate_limited"] == 1 and pipeline.stats["delivered"] == 3


def test_an_error_body_nested_too_deep_for_json_is_no_body() -> None:
    """A proxy's error body nested thousands deep reads as no JSON body (``RecursionError``, not only
    ``ValueError``): the status decides, no "unexpected error"."""
    from lago_org_billing._client import _body_object

    deep = b"[" * 100_000 + b"]" * 100_000
    assert _body_object(httpx.Response(502, content=deep, headers={"Content-Type": "application/json"})) is None


async def test_an_event_nested_too_deep_is_dead_lettered_by_the_spool_and_the_rest_spooled(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """With the SQLite spool, the event nested too deep for JSON is dead-lettered when it is written (its letter
    keeps its outer levels), and the events around it are written and delivered. (Every commit failed on it: nothing
    more was ever written to the spool, the events held in memory only.)"""
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    nested = {"transaction_id": "deep", "external_subscription_id": "org_1", "code": "api_call",
              "timestamp": "1767225600.000", "properties": {"tree": deep}}  # fmt: skip
    fake = FakeLago(api_key=API_KEY)
    settings = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url, retry_backoff=0.001, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as client:
        pipeline = pipeline_for(client, spool_path=str(tmp_path / "spool.db"))
        assert await deliver(pipeline, [*events(2), nested, *events(2, "after")], wait=10)
        [letter] = pipeline.dead_letters()
    assert stored(fake) == ["after0", "after1", "tx0", "tx1"]
    assert letter.code == "invalid_event" and "not JSON-serialisable" in letter.reason
    assert "Could not write the event spool" not in caplog.text
