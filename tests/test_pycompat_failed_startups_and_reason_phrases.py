"""What the package does is the same on every Python it supports (``requires-python >= 3.10``), where the standard
library changed between 3.10 and 3.13.

* From Python 3.12, ``asyncio.wait_for`` awaits a coroutine in the caller's task (3.10 and 3.11 ran it as a task of
  its own, a few loop turns later). hypercorn's asyncio worker waits for the lifespan startup with it, then looks
  whether the lifespan call has ended, to exit when the app's own startup failed: behind the billing middleware, whose
  task group (anyio's) yields at least once as it ends, the call had not, and hypercorn served the app without its
  startup (``tests/test_servers_failed_startups_and_exits_without_lifespan.py`` failed on 3.12 and 3.13 only).
* Python 3.13 renamed four reason phrases of ``http.HTTPStatus`` after RFC 9110 (413, 414, 416, 422). The emulator's
  injected faults kept Lago's for 413 and 422 only: a 414 or 416 fault's ``error`` read ``"Request-URI Too Long"`` and
  ``"Requested Range Not Satisfiable"`` on 3.10 to 3.12, ``"URI Too Long"`` and ``"Range Not Satisfiable"`` on 3.13.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


class _ServerSaysStartupFailed(Exception):
    """What a server's ``send`` raises for ``lifespan.startup.failed`` (hypercorn's ``LifespanFailureError``)."""


async def _chat(request: Any) -> JSONResponse:
    return JSONResponse({})


def _billed(app: Any, fake_lago: FakeLago) -> Any:
    settings = BillingSettings(api_url=fake_lago.base_url, api_key="k", org_header="X-Org-Id")
    return OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())


def _failing_starlette_app() -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        raise RuntimeError("the app's own startup failed")
        yield  # pragma: no cover

    return Starlette(routes=[Route("/chat", _chat)], lifespan=lifespan)


async def test_a_failed_startup_has_ended_the_lifespan_call_when_the_server_is_told() -> None:
    """A server that waits for the startup's answer in its own task (hypercorn's worker from Python 3.12) and raises
    from ``send`` (hypercorn): when it is told that the startup failed, the lifespan call has ended with its error."""
    fake_lago = FakeLago(api_key="k")
    told, startup = anyio.Event(), {"type": "lifespan.startup"}
    ended: list[BaseException | None] = []
    received: list[str] = []

    async def receive() -> dict[str, Any]:
        if received:
            await anyio.sleep_forever()
        received.append(startup["type"])
        return startup

    async def send(message: Any) -> None:
        if message["type"] == "lifespan.startup.failed":
            told.set()
            raise _ServerSaysStartupFailed(message.get("message", ""))

    async def call() -> None:
        try:
            await _billed(_failing_starlette_app(), fake_lago)({"type": "lifespan"}, receive, send)
        except BaseException as exc:
            ended.append(exc)
            if not isinstance(exc, Exception):
                raise
        else:  # pragma: no cover - an app returning from a failed startup (what is looked at is that it ended)
            ended.append(None)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(call)
        await told.wait()
        assert ended, "told of the failed startup while the lifespan call still ran (hypercorn serves on then)"
        assert isinstance(ended[0], _ServerSaysStartupFailed)


@pytest.mark.parametrize("middlewares", [1, 2])
async def test_a_server_whose_send_does_not_raise_still_gets_the_apps_error(middlewares: int) -> None:
    """uvicorn's ``send`` (and Starlette's TestClient's) takes ``lifespan.startup.failed`` without raising: it is told
    once, and the lifespan call raises the app's own startup error, as without the billing middleware. Two billing
    middlewares (an app mounted in another, each with its own): the outer one tells the server once the inner one
    has, and the app's error still comes out."""
    fake_lago = FakeLago(api_key="k")
    sent: list[str] = []
    received: list[str] = []

    async def receive() -> dict[str, Any]:
        if received:
            await anyio.sleep_forever()
        received.append("lifespan.startup")
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        sent.append(message["type"])

    app = _failing_starlette_app()
    for _ in range(middlewares):
        app = _billed(app, fake_lago)
    with pytest.raises(RuntimeError, match="the app's own startup failed"):
        await app({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.failed"]


async def test_an_app_going_on_after_its_failed_startup_still_has_the_server_told() -> None:
    """An app that sends ``lifespan.startup.failed``, swallows what ``send`` raises and waits for the next lifespan
    message (as Quart's lifespan loop does): the server is told as it asks, not left waiting for a startup answer."""
    fake_lago = FakeLago(api_key="k")
    told = anyio.Event()
    sent: list[str] = []
    received: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                with contextlib.suppress(Exception):
                    await send({"type": "lifespan.startup.failed", "message": "no database"})

    async def receive() -> dict[str, Any]:
        if received:
            await anyio.sleep_forever()
        received.append("lifespan.startup")
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        sent.append(message["type"])
        told.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(_billed(app, fake_lago), {"type": "lifespan"}, receive, send)
        with anyio.fail_after(10):  # (a hang guard: told at the app's next receive)
            await told.wait()
        tasks.cancel_scope.cancel()
    assert sent == ["lifespan.startup.failed"]


#: Lago's (Rails') reason phrases of the statuses whose Python phrases changed in 3.13.
LAGO_PHRASES = {
    413: "Payload Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Entity",
}


@pytest.mark.parametrize(("status", "phrase"), sorted(LAGO_PHRASES.items()))
async def test_an_injected_fault_has_lagos_reason_phrase_on_every_python(status: int, phrase: str) -> None:
    fake = FakeLago(api_key="k")
    fake.faults.inject(status, count=1, path="/api/v1/customers")
    async with fake.client() as client:
        response = await client.get("/api/v1/customers")
    assert response.status_code == status
    assert response.json()["error"] == phrase
