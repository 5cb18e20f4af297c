"""Driving an ASGI app's lifespan in a test as a server does, and waiting for the billing background work to fail."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel


@contextlib.asynccontextmanager
async def serving_lifespan(app: Any) -> AsyncIterator[list[str]]:
    """``app``'s lifespan started (``lifespan.startup`` sent, its answer awaited) for the ``async with`` block, and
    shut down at its end (awaited). Yields the types of the messages the app sends the server, as they come."""
    to_app, from_server = anyio.create_memory_object_stream[dict[str, Any]](10)
    sent: list[str] = []
    answered = anyio.Event()

    async def send(message: Any) -> None:
        sent.append(message["type"])
        if message["type"].startswith("lifespan.startup."):
            answered.set()

    async with to_app, from_server, anyio.create_task_group() as tasks:
        tasks.start_soon(app, {"type": "lifespan", "asgi": {"version": "3.0"}}, from_server.receive, send)
        await to_app.send({"type": "lifespan.startup"})
        await answered.wait()
        yield sent
        await to_app.send({"type": "lifespan.shutdown"})


async def background_failed(middleware: Any) -> None:
    """Until the middleware's background work has failed once (``stats["background_errors"]``, set by its task)."""
    with anyio.fail_after(5):
        while not middleware.stats.get("background_errors"):
            await anyio.lowlevel.checkpoint()
