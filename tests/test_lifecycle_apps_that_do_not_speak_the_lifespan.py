"""An app that does not speak the ASGI lifespan (Django's ``ASGIHandler`` and asgiref's ``WsgiToAsgi`` raise on it,
many plain ASGI apps return) wrapped in the billing middleware: the server sends the lifespan, the middleware answers
it itself (delivery started on startup, flushed on shutdown). It let the app's refusal through instead: the server
served without a lifespan (uvicorn: "lifespan protocol appears unsupported"), the middleware started lazily, said it
"got no ASGI lifespan", and a SIGTERM lost what its memory held."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from lago_org_billing import BillingSettings, ConfigurationError, EventPipeline, LagoClient, OrgBillingMiddleware

pytestmark = pytest.mark.anyio


async def _django_like(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _returns_on_lifespan(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def _uvicorn_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
    """The lifespan as uvicorn runs it (``--lifespan auto``): startup sent, then either the app's answer or the app's
    call ending (raised: "unsupported"; returned) lets the server serve; shutdown sent at the end, the same way."""
    to_app, from_server = anyio.create_memory_object_stream[dict[str, Any]](10)
    seen: dict[str, Any] = {"sent": [], "error": None}
    answered, ended = anyio.Event(), anyio.Event()

    async def send(message: dict[str, Any]) -> None:
        seen["sent"].append(message["type"])
        answered.set()

    async def run() -> None:
        try:
            await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, from_server.receive, send)
        except Exception as exc:
            seen["error"] = exc
        finally:
            ended.set()
            answered.set()

    async with to_app, from_server, anyio.create_task_group() as tasks:
        tasks.start_soon(run)
        await to_app.send({"type": "lifespan.startup"})
        with anyio.fail_after(10):
            await answered.wait()
            if seen["sent"][-1:] == ["lifespan.startup.failed"]:  # (the server then waits for the call's end)
                await ended.wait()
        yield seen
        answered = anyio.Event()
        if not ended.is_set():
            await to_app.send({"type": "lifespan.shutdown"})
            with anyio.fail_after(10):
                await answered.wait()
        tasks.cancel_scope.cancel()


def _settings(fake_lago: Any, **changes: Any) -> BillingSettings:
    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    return BillingSettings(
        api_url=fake_lago.base_url,
        api_key=fake_lago.api_key,
        org_header="X-Org-Id",
        quota_mode="off",
        retry_backoff=0.001,
        **changes,
    )


@pytest.mark.parametrize("inner", [_django_like, _returns_on_lifespan], ids=["raises", "returns"])
async def test_the_middleware_answers_the_lifespan_of_an_app_that_does_not_and_flushes_on_shutdown(
    fake_lago: Any, inner: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(fake_lago)
    client = LagoClient(settings, transport=fake_lago.transport())
    # (nothing delivered before the shutdown: what it delivers is what a SIGTERM lost)
    pipeline = EventPipeline(client, flush_interval=3600.0, batch_size=100)
    middleware = OrgBillingMiddleware(inner, settings, pipeline=pipeline, quota=None)
    with caplog.at_level(logging.INFO, logger="lago_org_billing"):
        async with client, _uvicorn_lifespan(middleware) as seen:
            assert seen["sent"] == ["lifespan.startup.complete"], seen
            assert seen["error"] is None
            assert middleware._running
            transport = httpx.ASGITransport(app=middleware)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                for _ in range(3):
                    assert (await http.get("/x", headers={"X-Org-Id": "org_a"})).status_code == 200
            assert fake_lago.events == []
        assert seen["sent"] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert seen["error"] is None
    assert len(fake_lago.events) == 3
    assert pipeline.closed
    assert not any("got no ASGI lifespan" in record.getMessage() for record in caplog.records)
    assert any("does not support the ASGI lifespan" in record.getMessage() for record in caplog.records)


async def test_an_app_crashing_in_its_own_lifespan_startup_still_fails_it(fake_lago: Any) -> None:
    """Only an app that never read the lifespan is answered for: one that read its startup and then raised failed it."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        raise RuntimeError("the database is unreachable")
        yield  # pragma: no cover

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi")  # pragma: no cover

    settings = _settings(fake_lago)
    app = Starlette(routes=[Route("/hello", hello)], lifespan=lifespan)
    middleware = OrgBillingMiddleware(app, settings, transport=fake_lago.transport(), quota=None)
    async with _uvicorn_lifespan(middleware) as seen:
        assert seen["sent"] == ["lifespan.startup.failed"]
        assert isinstance(seen["error"], RuntimeError)
    assert not middleware._running


async def test_two_lifespans_in_a_row_of_an_app_that_does_not_speak_it(fake_lago: Any) -> None:
    """Served, stopped and served again: each lifespan answered, with a pipeline of its own."""
    settings = _settings(fake_lago)
    middleware = OrgBillingMiddleware(_django_like, settings, transport=fake_lago.transport(), quota=None)
    for round_ in range(2):
        async with _uvicorn_lifespan(middleware) as seen:
            transport = httpx.ASGITransport(app=middleware)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                assert (await http.get("/x", headers={"X-Org-Id": "org_a"})).status_code == 200
        assert seen["sent"] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert len(fake_lago.events) == round_ + 1


# --------------------------------------------------------------------------------------------------------------------
# LAGO_SPOOL_PATH naming a device, a FIFO or a socket (``/dev/null``, tried to keep no spool): SQLite opened it, and its
# "disk I/O error" was said as a full or failing volume ("free space on it (df -h /dev)"), the wrong cause and advice.


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(path))
    listening.close()  # (the file stays)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX files")
@pytest.mark.parametrize(("make", "kind"), [(_fifo, "a FIFO"), (_socket, "a socket")], ids=["fifo", "socket"])
def test_a_spool_path_that_is_no_file_is_refused_at_startup_saying_so(
    fake_lago: Any, tmp_path: Path, make: Callable[[Path], None], kind: str
) -> None:
    path = tmp_path / "spool.db"
    make(path)
    settings = _settings(fake_lago, spool_path=str(path))

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi")  # pragma: no cover

    app = Starlette(routes=[Route("/hello", hello)])
    app.add_middleware(OrgBillingMiddleware, settings=settings, transport=fake_lago.transport(), quota=None)
    with pytest.raises(ConfigurationError) as raised, TestClient(app):
        pass  # pragma: no cover
    message = str(raised.value)
    assert f"{path} cannot be used (it is {kind}, not a file)" in message, message
    assert "full or failing" not in message and "df -h" not in message
    assert "unset it to keep events in memory" in message
    assert os.listdir(tmp_path) == ["spool.db"]  # nothing made beside it (its lock, a journal)
