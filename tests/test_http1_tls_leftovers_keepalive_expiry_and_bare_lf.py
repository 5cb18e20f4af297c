"""The raw HTTP/1.1 event-batch poster (``_http1.RawPoster``) against what httpx (every other call of the same
``LagoClient``) does with the same server:

- Over TLS, bytes a server wrote after its answer in a TLS record of their own (an unrequested second answer) are
  held, not yet decrypted, in the TLS layer, not in the poster's buffer nor on the socket: they must keep the
  connection out of the pool, else the next batch takes them for its answer (a batch Lago failed counted delivered).
- A kept-alive connection idle past httpx's keep-alive expiry (5 s) is not reused: one a NAT or load balancer dropped
  silently would hold the next batch for the whole ``LAGO_API_TIMEOUT``, then fail it.
- An answer head whose lines end in a bare LF (which h11, under httpx, reads: RFC 9112 2.2 allows it) is read as
  httpx reads it, not as "no answer" (the batch Lago ingested sent again for ever).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from _limited_proxy import read_head
from lago_org_billing import BillingSettings, LagoAPIError, LagoClient
from test_delivery_tls_and_vacuum import tls_server

pytestmark = pytest.mark.anyio

#: The most plaintext one TLS record carries (RFC 8446 5.1): what OpenSSL puts in each record it writes.
_RECORD = 16384
_LAGO_500 = json.dumps({"status": 500, "error": "Internal Server Error"}).encode()


def batch(*ids: str) -> bytes:
    events = [
        {"transaction_id": i, "external_subscription_id": "org_1", "code": "api_call", "timestamp": "1767225600.000"}
        for i in ids
    ]
    return json.dumps({"events": events}).encode()


def answer(status: str, body: bytes, *, newline: str = "\r\n") -> bytes:
    head = newline.join(
        [f"HTTP/1.1 {status}", "Content-Type: application/json", f"Content-Length: {len(body)}", "", ""]
    )
    return head.encode("latin-1") + body


def answer_filling_one_record() -> bytes:
    """A 200 with a Lago JSON body, exactly one TLS record long (its end is the record's end)."""
    padding = _RECORD - len(answer("200 OK", b"{" + b" " * 10_000 + b"}")) + 10_000
    whole = answer("200 OK", b"{" + b" " * padding + b"}")
    assert len(whole) == _RECORD
    return whole


class ScriptedServer:
    """Reads whole requests on each connection (counted over all of them) and answers request ``n`` with
    ``script(connection, n)``: bytes to write in one send, or None to go silent on that connection (neither read nor
    answer nor close: a way to it a NAT or a load balancer dropped)."""

    def __init__(self, script: Any) -> None:
        self.script = script
        self.requests: list[tuple[int, bytes]] = []  # (connection number, body)
        self.connections = 0
        self.done = anyio.Event()

    async def __call__(self, stream: anyio.abc.ByteStream) -> None:
        number, self.connections = self.connections, self.connections + 1
        buffer = b""
        async with stream:
            while True:
                parts = await read_head(stream, buffer)
                if parts is None:
                    return
                head, buffer = parts
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                try:
                    while len(buffer) < length:
                        buffer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                body, buffer = buffer[:length], buffer[length:]
                reply = self.script(number, len(self.requests))
                self.requests.append((number, body))
                if reply is None:
                    await self.done.wait()
                    return
                await stream.send(reply)


async def tcp_server(handler: Any, tasks: anyio.abc.TaskGroup) -> str:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def run() -> None:
        async with listener:
            await listener.serve(handler)

    tasks.start_soon(run)
    return f"http://127.0.0.1:{port}"


def settings_for(url: str, **options: Any) -> BillingSettings:
    return BillingSettings(api_url=url, api_key="k", max_retries=0, **{"api_timeout": 5, **options})


# ------------------------------------------------------------------ 1. TLS: bytes after an answer, in a record


async def test_over_tls_an_answer_nobody_asked_for_is_never_the_next_batchs_answer(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An https LAGO_API_URL. The server answers the first batch, and in the same write (a TLS record of its own) a
    second, complete 200 nobody asked for; it fails the second batch (500). The second batch must end in that 500 (or
    anything but a success): the bytes left after the first answer are no answer to it, as over plain HTTP, where they
    are found in the poster's buffer. Over TLS they wait in the TLS layer (read from the socket with the first answer's
    record, not yet decrypted): the connection was pooled, and the 200 nobody asked for was taken as the second batch's
    answer, which Lago had failed: the pipeline deletes those events as delivered."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))
    nobody_asked = answer("200 OK", b'{"events":[]}')

    def script(connection: int, request: int) -> bytes:
        if request == 0:
            return answer_filling_one_record() + nobody_asked
        return answer("500 Internal Server Error", _LAGO_500)

    server = ScriptedServer(script)
    outcome: BaseException | None = None
    async with anyio.create_task_group() as tasks:
        url = await tls_server(tls_files, server, tasks)
        try:
            async with LagoClient(settings_for(url)) as lago:
                assert lago._raw is not None and lago._raw.tls
                await lago.send_event_batch_json(batch("tx_1"))
                try:
                    await lago.send_event_batch_json(batch("tx_2"))
                except LagoAPIError as exc:
                    outcome = exc
        finally:
            server.done.set()
            tasks.cancel_scope.cancel()
    assert isinstance(outcome, LagoAPIError), "the 200 nobody asked for was taken as the answer to the second batch"
    assert outcome.status == 500


# ------------------------------------------------------------------ 2. no keep-alive expiry


async def test_a_connection_idle_past_httpxs_keepalive_expiry_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch goes out after ten quiet minutes, its kept-alive connection silently dropped meanwhile by a NAT or a
    load balancer (Azure's 4-minute idle timeout, a stateful firewall): the server side never answers on it again. httpx
    (every other call of the client) gives up connections idle for 5 s (``keepalive_expiry``) and opens a new one; the
    raw poster reused it, and the batch hung the whole LAGO_API_TIMEOUT and failed (at shutdown, with the memory outbox
    and the default shutdown_timeout of 5 s under LAGO_API_TIMEOUT's 10 s, its events are lost).

    Ten minutes pass on the monotonic clock (every reader of it: asyncio's loop, anyio, httpcore), not in real time."""
    real = time.monotonic
    offset = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real() + offset[0])

    # the first connection of each client answers once, then the way to it is gone
    answered_on: dict[int, int] = {}

    def dropped_after_first(connection: int, request: int) -> bytes | None:
        answered_on[connection] = answered_on.get(connection, 0) + 1
        if connection in first_connections and answered_on[connection] > 1:
            return None
        return answer("200 OK", b'{"events":[]}')

    first_connections: set[int] = set()
    server = ScriptedServer(dropped_after_first)
    outcomes: dict[str, BaseException | None] = {}
    async with anyio.create_task_group() as tasks:
        url = await tcp_server(server, tasks)
        try:
            # httpx, as the client's other calls go: a fresh connection after the quiet period
            first_connections.add(server.connections)
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=1) as http:
                assert (await http.post("/api/v1/events/batch", content=batch("tx_0"))).status_code == 200
                offset[0] += 600
                try:
                    outcomes["httpx"] = None
                    (await http.post("/api/v1/events/batch", content=batch("tx_0"))).raise_for_status()
                except httpx.HTTPError as exc:
                    outcomes["httpx"] = exc
                finally:
                    offset[0] -= 600
            # the raw poster, through the client
            first_connections.add(server.connections)
            async with LagoClient(settings_for(url, api_timeout=1)) as lago:
                assert lago._raw is not None
                await lago.send_event_batch_json(batch("tx_1"))
                offset[0] += 600
                try:
                    outcomes["raw"] = None
                    await lago.send_event_batch_json(batch("tx_2"))
                except LagoAPIError as exc:
                    outcomes["raw"] = exc
                finally:
                    offset[0] -= 600
        finally:
            server.done.set()
            tasks.cancel_scope.cancel()
    assert outcomes == {"httpx": None, "raw": None}


# ------------------------------------------------------------------ 3. bare LF line ends


@pytest.mark.parametrize(
    "head_lines",
    [
        pytest.param("\n", id="every-line-ends-in-LF"),
        pytest.param("mixed", id="one-header-line-ends-in-LF"),
    ],
)
async def test_an_answer_whose_head_lines_end_in_a_bare_lf_is_read_as_httpx_reads_it(head_lines: str) -> None:
    """A server (a small proxy, an embedded gateway) ends its answer's head lines with a bare LF, which a recipient
    may take for a line end (RFC 9112 2.2) and h11 (under httpx) does: httpx reads the 200. The raw poster looked
    for CRLF CRLF only: no end of the head ("no answer" at LAGO_API_TIMEOUT), or a header running on into the next
    ("malformed Content-Length"): the batch Lago ingested was taken as failed and sent again, for ever, as every
    answer is framed so (delivery stuck while the outbox fills)."""
    if head_lines == "mixed":
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 13\nContent-Type: application/json\r\n\r\n" + b'{"events":[]}'
    else:
        reply = answer("200 OK", b'{"events":[]}', newline=head_lines)
    server = ScriptedServer(lambda connection, request: reply)
    failures: list[BaseException] = []
    async with anyio.create_task_group() as tasks:
        url = await tcp_server(server, tasks)
        try:
            async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=1) as http:
                response = await http.post("/api/v1/events/batch", content=batch("tx_0"))
                assert (response.status_code, response.content) == (200, b'{"events":[]}')
            async with LagoClient(settings_for(url, api_timeout=1)) as lago:
                assert lago._raw is not None
                for name in ("tx_1", "tx_2"):
                    try:
                        await lago.send_event_batch_json(batch(name))
                    except LagoAPIError as exc:
                        failures.append(exc)
        finally:
            server.done.set()
            tasks.cancel_scope.cancel()
    assert failures == []
    assert [body for _, body in server.requests][1:] == [batch("tx_1"), batch("tx_2")]  # each sent once
