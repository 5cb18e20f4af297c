"""A proxy on 127.0.0.1 in front of the Lago emulator that refuses request bodies over a size limit (as nginx's
``client_max_body_size`` or a proxy that will not buffer them does) and passes every other request on, keep-alive.

``refuse(stream)`` is what it does instead of reading an oversized body: reset the connection without answering, or
answer 413 at once; the connection is closed after it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import httpx

from lago_org_billing.testing import FakeLago

Refuse = Callable[[anyio.abc.SocketStream], Awaitable[None]]


async def read_head(stream: anyio.abc.ByteStream, buffer: bytes) -> tuple[bytes, bytes] | None:
    """A request's head (up to the blank line) and what came after it, reading ``stream`` on from ``buffer``; None
    when the client went away first."""
    while b"\r\n\r\n" not in buffer:
        try:
            buffer += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return None
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


def parse_head(head: bytes) -> tuple[str, str, dict[str, str], int]:
    """A request head's method, target, headers (names as sent) and ``Content-Length`` (0 without one)."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {name.strip(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    length = next((int(value) for name, value in headers.items() if name.lower() == "content-length"), 0)
    return method, target, headers, length


async def read_body(stream: anyio.abc.ByteStream, buffer: bytes, length: int) -> tuple[bytes, bytes] | None:
    """A body of ``length`` bytes and what came after it, reading ``stream`` on from ``buffer``; None when the
    client went away first."""
    while len(buffer) < length:
        try:
            buffer += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return None
    return buffer[:length], buffer[length:]


async def _proxy_connection(
    stream: anyio.abc.SocketStream, lago: httpx.AsyncClient, limit: int, refuse: Refuse
) -> None:
    buffer = b""
    async with stream:
        while True:
            parts = await read_head(stream, buffer)
            if parts is None:
                return
            method, target, headers, length = parse_head(parts[0])
            if length > limit:
                await refuse(stream)
                return
            read = await read_body(stream, parts[1], length)
            if read is None:
                return
            body, buffer = read
            answer = await lago.request(method, target, content=body, headers=headers)
            await stream.send(
                f"HTTP/1.1 {answer.status_code} {answer.reason_phrase}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(answer.content)}\r\n\r\n".encode("latin-1")
                + answer.content
            )


async def serve_limited_proxy(
    fake: FakeLago, limit: int, refuse: Refuse, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Serve the proxy until cancelled; ``task_status.started(port)`` once it listens."""
    async with httpx.AsyncClient(transport=fake.transport(), base_url=FakeLago.base_url) as lago:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener:
            task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))

            async def handle(stream: anyio.abc.SocketStream) -> None:
                await _proxy_connection(stream, lago, limit, refuse)

            await listener.serve(handle)
