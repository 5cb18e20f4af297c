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


async def _proxy_connection(
    stream: anyio.abc.SocketStream, lago: httpx.AsyncClient, limit: int, refuse: Refuse
) -> None:
    buffer = b""
    async with stream:
        while True:
            parts = await read_head(stream, buffer)
            if parts is None:
                return
            head, buffer = parts
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length"))
            if length > limit:
                await refuse(stream)
                return
            while len(buffer) < length:
                try:
                    buffer += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
            body, buffer = buffer[:length], buffer[length:]
            headers = {name: value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
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
