"""The hand-written HTTP/1.1 client (RawPoster) for event batches, and LagoClient around it, against servers that
misbehave.

Attacked with scripted TCP servers on loopback that answer byte by byte as each test says: responses split at every
byte, chunked bodies (extensions, trailers, malformed framing), Content-Length mismatches and conflicts, bytes left
on a kept-alive connection after an answer (which must never become the next request's answer), cancellation in the
middle of a read, non-ASCII header bytes in an error answer, IPv6 literal hosts and base paths, and whether
``can_use_raw_poster`` takes the same proxy decision as httpx (mixed-case variables, NO_PROXY).
"""

from __future__ import annotations

import dataclasses
import json
import select
import socket
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from lago_org_billing import (
    BillingSettings,
    LagoAPIError,
    LagoClient,
    LagoIntegrationError,
    LagoRateLimitError,
    LagoUnavailableError,
    LagoValidationError,
)
from lago_org_billing._http1 import RawHTTPError, RawPoster, can_use_raw_poster

pytestmark = pytest.mark.anyio

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
FAIL = b'HTTP/1.1 500 Internal Server Error\r\nContent-Length: 35\r\n\r\n{"status":500,"error":"Internal e"}'


def batch(*ids: str) -> bytes:
    events = [
        {"transaction_id": i, "external_subscription_id": "org_1", "code": "api_call", "timestamp": "1767225600.000"}
        for i in ids
    ]
    return json.dumps({"events": events}).encode()


@dataclasses.dataclass
class Reply:
    data: bytes
    split: bool = False  # sent one byte at a time
    close: bool = False  # the connection is closed after it
    then: bytes = b""  # sent once the test says so (``Server.release``), after the reply: bytes nobody asked for


class Server:
    """A TCP server on 127.0.0.1 answering request ``n`` (counted over all connections) with ``script(n)``."""

    def __init__(self, script: Callable[[int], Reply]) -> None:
        self.script = script
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection number, head, body)
        self.connections = 0
        self.release = anyio.Event()
        self.sent_then = anyio.Event()

    async def run(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        async with listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
            await listener.serve(self._handle)

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        number, self.connections = self.connections, self.connections + 1
        buffer = b""
        async with stream:
            while True:
                try:
                    while b"\r\n\r\n" not in buffer:
                        buffer += await stream.receive()
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    length = next(
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                    while len(buffer) < length:
                        buffer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                body, buffer = buffer[:length], buffer[length:]
                reply = self.script(len(self.requests))
                self.requests.append((number, head, body))
                if reply.split:
                    for index in range(len(reply.data)):
                        await stream.send(reply.data[index : index + 1])
                else:
                    await stream.send(reply.data)
                if reply.then:
                    await self.release.wait()
                    await stream.send(reply.then)
                    self.sent_then.set()
                if reply.close:
                    return


async def serve(tasks: anyio.abc.TaskGroup, script: Callable[[int], Reply]) -> tuple[Server, str]:
    server = Server(script)
    port = await tasks.start(server.run)
    return server, f"http://127.0.0.1:{port}"


def settings_for(url: str) -> BillingSettings:
    return BillingSettings(api_url=url, api_key="k", max_retries=0, api_timeout=5)


# ------------------------------------------------------------------ framing that must pass


async def test_an_answer_split_at_every_byte_with_chunk_extensions_and_trailers() -> None:
    """A chunked answer written one byte at a time, with chunk extensions and a trailer, is read whole; the connection
    is then reused for the next batch."""
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'3;name=value\r\n{"e\r\n8 ; x\r\nvents":[\r\n2\r\n]}\r\n0\r\nX-Trailer: t\r\n\r\n'
    )
    async with anyio.create_task_group() as tasks:
        server, url = await serve(tasks, lambda n: Reply(chunked, split=True))
        poster = RawPoster(url, {}, timeout=5)
        for _ in range(2):
            status, _, body = await poster.post("/x", b"{}")
            assert (status, body) == (200, b'{"events":[]}')
        await poster.aclose()
        tasks.cancel_scope.cancel()
    assert [number for number, _, _ in server.requests] == [0, 0]


async def test_a_cancelled_read_never_leaves_its_connection_for_the_next_request() -> None:
    """Cancelled while the answer's body is still coming, the connection is closed: the next request goes on a fresh
    one (its answer cannot be the rest of the cancelled one)."""
    half = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"
    async with anyio.create_task_group() as tasks:
        server, url = await serve(tasks, lambda n: Reply(half) if n == 0 else Reply(OK))
        poster = RawPoster(url, {}, timeout=5)
        with anyio.CancelScope() as scope:

            async def cancel_once_sent() -> None:
                while not server.requests:
                    await anyio.lowlevel.checkpoint()
                scope.cancel()

            tasks.start_soon(cancel_once_sent)
            await poster.post("/x", b"{}")
        assert scope.cancelled_caught and not poster._idle
        assert (await poster.post("/x", b"{}"))[0] == 200
        await poster.aclose()
        tasks.cancel_scope.cancel()
    assert [number for number, _, _ in server.requests] == [0, 1]


async def test_ipv6_literal_host_and_base_path() -> None:
    """``http://[::1]:port/lago``: connects to ::1, sends ``Host: [::1]:port`` and the path under the prefix."""
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = Server(lambda n: Reply(OK))

    async def run6(*, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="::1")
        async with listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
            await listener.serve(server._handle)

    async with anyio.create_task_group() as tasks:
        port = await tasks.start(run6)
        async with LagoClient(settings_for(f"http://[::1]:{port}/lago/api/v1")) as lago:
            assert lago._raw is not None
            await lago.send_event_batch_json(batch("tx_1"))
        tasks.cancel_scope.cancel()
    received = [head for _, head, _ in server.requests]
    assert received[0].startswith(b"POST /lago/api/v1/events/batch HTTP/1.1\r\n")
    assert f"\r\nHost: [::1]:{port}\r\n".encode() in received[0]


# ------------------------------------------------------------------ defects


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444/lago", b"xn--e1afmkfd.xn--p1ai"),
        ("https://b\u00fccher.example:8443", b"xn--bcher-kva.example:8443"),
    ],
)
def test_an_internationalized_host_is_sent_as_httpx_sends_it(url: str, host: bytes) -> None:
    """A Lago behind an internationalized domain name: the client is made (it raised UnicodeEncodeError, or sent the
    name's Latin-1 bytes as the Host), the batches' Host header and TLS name being the IDNA (xn--) form, as httpx's
    for every other call."""
    lago = LagoClient(settings_for(url))
    assert lago._raw is not None
    assert f"\r\nHost: {host.decode()}\r\n".encode() in b"\r\n" + lago._raw._head
    assert lago._raw.host == host.decode().split(":")[0]


async def test_bytes_left_after_an_answer_are_never_the_next_requests_answer() -> None:
    """A server that writes more than its Content-Length said (here a whole second 200) leaves bytes on the
    connection: reused, the next batch would read them as its answer and take a batch Lago refused (500) for
    delivered. The connection is dropped instead and the next batch gets its own answer."""
    async with anyio.create_task_group() as tasks:
        server, url = await serve(tasks, lambda n: Reply(OK + OK) if n == 0 else Reply(FAIL))
        async with LagoClient(settings_for(url)) as lago:
            await lago.send_event_batch_json(batch("tx_1"))
            with pytest.raises(LagoUnavailableError) as info:
                await lago.send_event_batch_json(batch("tx_2"))
        tasks.cancel_scope.cancel()
    assert info.value.status == 500
    assert len(server.requests) == 2


async def test_bytes_arriving_on_an_idle_connection_are_never_the_next_requests_answer() -> None:
    """Bytes the server writes on a kept-alive connection after its answer (nobody asked for them) would be read as
    the answer to the next request written there: a connection with something to read is not reused."""
    async with anyio.create_task_group() as tasks:
        server, url = await serve(tasks, lambda n: Reply(OK, then=OK) if n == 0 else Reply(FAIL))
        poster = RawPoster(url, {}, timeout=5)
        assert (await poster.post("/x", b"{}"))[0] == 200
        server.release.set()  # (the answer is read: what comes now waits on the idle connection)
        await server.sent_then.wait()
        raw = poster._idle[0].stream.extra(anyio.abc.SocketAttribute.raw_socket)
        readable, _, _ = await anyio.to_thread.run_sync(select.select, [raw.fileno()], [], [], 5)
        assert readable  # (the stray answer has reached the client's socket)
        assert (await poster.post("/x", b"{}"))[0] == 500
        await poster.aclose()
        tasks.cancel_scope.cancel()


async def test_conflicting_content_lengths_are_refused() -> None:
    """Two Content-Length headers that disagree leave the body's end unknown (RFC 9112 6.3): an error, never the
    last one believed (the rest of the body would be the next request's answer)."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}" + b" " * 38
    async with anyio.create_task_group() as tasks:
        _, url = await serve(tasks, lambda n: Reply(answer))
        poster = RawPoster(url, {}, timeout=5)
        with pytest.raises(RawHTTPError, match="Content-Length"):
            await poster.post("/x", b"{}")
        assert not poster._idle
        tasks.cancel_scope.cancel()


async def test_a_chunk_not_followed_by_crlf_is_refused() -> None:
    """A chunk whose size is wrong (its data not followed by CRLF) is a framing error, not a body cut anywhere."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n"
    async with anyio.create_task_group() as tasks:
        _, url = await serve(tasks, lambda n: Reply(answer))
        poster = RawPoster(url, {}, timeout=5)
        with pytest.raises(RawHTTPError, match="chunk"):
            await poster.post("/x", b"{}")
        assert not poster._idle
        tasks.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (
            b"HTTP/1.1 503 Service Unavailable\r\nServer: caf\xe9\r\nContent-Length: 0\r\n\r\n",
            LagoUnavailableError,
        ),
        (
            b"HTTP/1.1 429 Too Many Requests\r\nX-Note: \xff\xfe\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n",
            LagoRateLimitError,
        ),
    ],
)
async def test_error_answers_with_non_ascii_header_bytes_are_lago_errors(answer: bytes, error: Any) -> None:
    """An error answer with a non-ASCII byte in a header (a load balancer's Server header, a cookie) is mapped like
    any other (httpx takes such bytes), not a UnicodeEncodeError the delivery pipeline does not expect."""
    async with anyio.create_task_group() as tasks:
        _, url = await serve(tasks, lambda n: Reply(answer))
        async with LagoClient(settings_for(url)) as lago:
            with pytest.raises(LagoIntegrationError) as info:
                await lago.send_event_batch_json(batch("tx_1"))
        tasks.cancel_scope.cancel()
    assert isinstance(info.value, error)
    if error is LagoRateLimitError:
        assert info.value.retry_after == 7


async def test_error_mapping_is_the_same_as_through_httpx() -> None:
    """429 (X-RateLimit-Reset), 5xx and 422 value_already_exist map to the same errors over the raw path as over
    httpx (which LagoClient uses when a transport is injected)."""
    duplicate = json.dumps(
        {
            "status": 422,
            "error": "Unprocessable Entity",
            "code": "validation_errors",
            "error_details": {"0": {"transaction_id": ["value_already_exist"]}},
        }
    ).encode()
    answers = [
        b"HTTP/1.1 429 Too Many Requests\r\nX-RateLimit-Reset: 3\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 422 Unprocessable Entity\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(duplicate)).encode()
        + b"\r\n\r\n"
        + duplicate,
    ]
    raw_errors: list[LagoAPIError] = []
    async with anyio.create_task_group() as tasks:
        _, url = await serve(tasks, lambda n: Reply(answers[n]))
        async with LagoClient(settings_for(url)) as lago:
            assert lago._raw is not None
            for _ in answers:
                with pytest.raises(LagoAPIError) as info:
                    await lago.send_event_batch_json(batch("tx_1"))
                raw_errors.append(info.value)
        tasks.cancel_scope.cancel()

    def through_httpx(request: httpx.Request) -> httpx.Response:
        head, _, body = answers[len(seen)].partition(b"\r\n\r\n")
        seen.append(request)
        lines = head.decode().split("\r\n")
        headers = [(name, value) for name, _, value in (line.partition(": ") for line in lines[1:])]
        return httpx.Response(int(lines[0].split()[1]), headers=headers, content=body)

    seen: list[httpx.Request] = []
    httpx_errors: list[LagoAPIError] = []
    async with LagoClient(settings_for("http://lago.test"), transport=httpx.MockTransport(through_httpx)) as lago:
        assert lago._raw is None
        for _ in answers:
            with pytest.raises(LagoAPIError) as info:
                await lago.send_event_batch_json(batch("tx_1"))
            httpx_errors.append(info.value)
    for raw, via_httpx in zip(raw_errors, httpx_errors, strict=True):
        assert type(raw) is type(via_httpx)
        assert (raw.status, raw.code, str(raw)) == (via_httpx.status, via_httpx.code, str(via_httpx))
    assert isinstance(raw_errors[0], LagoRateLimitError) and raw_errors[0].retry_after == 3
    assert isinstance(raw_errors[2], LagoValidationError) and raw_errors[2].is_duplicate_only


def httpx_goes_direct(url: str) -> bool:
    """What httpx itself decides for ``url`` with the environment's proxy settings."""
    client = httpx.AsyncClient(trust_env=True)
    return client._transport_for_url(httpx.URL(url)) is client._transport


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"HTTPS_PROXY": "http://proxy.internal:3128"},
        {"Https_Proxy": "http://proxy.internal:3128"},  # getproxies() reads every case
        {"ALL_PROXY": "http://proxy.internal:3128"},
        {"HTTP_PROXY": "http://proxy.internal:3128"},  # for http:// only: https goes direct
        {"HTTPS_PROXY": "http://proxy.internal:3128", "NO_PROXY": "lago.internal"},
        {"HTTPS_PROXY": "http://proxy.internal:3128", "no_proxy": "*"},
        {"HTTPS_PROXY": "http://proxy.internal:3128", "NO_PROXY": "other.internal"},
        {"HTTPS_PROXY": "http://proxy.internal:3128", "https_proxy": ""},  # the lower-case one wins (urllib)
    ],
)
def test_raw_path_takes_the_proxy_decision_httpx_takes(
    environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The raw path is used exactly when httpx would connect directly: never bypassing a proxy httpx would use
    (a proxy variable in any case), and not given up for a host NO_PROXY exempts."""
    import os

    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    url = "https://lago.internal"
    assert can_use_raw_poster(url) == httpx_goes_direct(url)


async def test_a_tls_connection_is_still_reused(tls_files: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over TLS (SSL_CERT_FILE trusting a self-signed certificate) the idle check does not take the TLS records a
    server may send after the handshake for bytes nobody asked for: batches share one kept-alive connection."""
    from lago_org_billing.testing._server import serve_in_thread

    clients: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        clients.append(scope["client"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    cert_file, key_file = tls_files
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    with serve_in_thread(app, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file)) as url:
        poster = RawPoster(url, {}, timeout=5)
        for _ in range(3):
            assert (await poster.post("/x", b"{}"))[0] == 200
        await poster.aclose()
    assert len(clients) == 3 and len(set(map(tuple, clients))) == 1
