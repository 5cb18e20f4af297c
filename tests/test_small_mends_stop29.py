"""Three small mends: lone surrogates refused by the emulator's Python APIs as its HTTP controls refuse them; a served
emulator stopping at once with an injected latency still held; and an idempotency store's Redis that stops answering
said (and marked down) when ``LAGO_API_TIMEOUT`` is below the store's own timeout and cancels the call first.

Redis is a real ``redis-server`` behind a relay that can stall (nothing passes either way: calls get no answer).
Nothing waits on a clock: a held latency is seen through the fault module's sleep hook, a stalled Redis call ends at
the middleware's bound (0.5 s: healthy calls through the relay answer in milliseconds, room for a loaded machine).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import _resp as resp
from _quota_app import REDIS_SERVER
from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._errors import InvalidRequestError
from lago_org_billing.testing import FakeLago, _faults
from lago_org_billing.testing._faults import FaultSpecError
from lago_org_billing.testing._server import serve_in_thread
from lago_org_billing.testing._webhooks import WebhookDispatcher, install_webhooks

LOGGER = "lago_org_billing.middleware"

# ------------------------------------------------------------------------------------ 1. lone surrogates, Python APIs


@pytest.mark.parametrize(
    "options",
    [
        {"status": 503, "body": "\ud800"},
        {"status": 503, "body": {"error": ["ok", "\udfff"]}},
        {"status": 503, "body": {"\ud800": 1}},
        {"status": 503, "path": "/api/v1/\ud800"},
    ],
    ids=["body", "nested-body", "body-key", "path"],
)
def test_inject_fault_refuses_a_lone_surrogate_as_the_route_does(options: dict[str, Any]) -> None:
    """``inject_fault`` refuses a lone surrogate in a fault's body or path (FaultSpecError, the route's 422): stored, it
    broke ``GET /_emulator/faults`` and every faulted answer."""
    fake = FakeLago()
    with pytest.raises(FaultSpecError, match="lone surrogate"):
        fake.inject_fault(**options)  # type: ignore[attr-defined]
    assert fake.faults.rules == []  # type: ignore[attr-defined]
    listing = _get(fake, "/_emulator/faults")
    assert listing == {"faults": []}


@pytest.mark.parametrize("field", ["hmac_key", "issuer", "url"])
def test_webhook_settings_refuse_a_lone_surrogate_as_the_route_does(field: str) -> None:
    """``WebhookDispatcher.configure()`` (and its constructor) refuse a lone surrogate in hmac_key, issuer or url
    (InvalidRequestError, the route's 422) and keep the settings they had: stored, it broke ``GET /_emulator/webhooks``
    and every signature."""
    fake = FakeLago()
    dispatcher = install_webhooks(fake, hmac_key="key-1", issuer="http://issuer")
    value = "http://hooks.test/\ud800" if field == "url" else "x\ud800"
    before = dispatcher.config_json()
    with pytest.raises(InvalidRequestError, match="surrogate"):
        dispatcher.configure(**{field: value})
    assert dispatcher.config_json() == before
    with pytest.raises(InvalidRequestError, match="surrogate"):
        WebhookDispatcher(fake, **{field: value})
    assert _get(fake, "/_emulator/webhooks")["webhooks"]["hmac_key"] == "key-1"


def _get(fake: FakeLago, path: str) -> Any:
    async def main() -> Any:
        async with httpx.AsyncClient(transport=fake.transport(), base_url="http://fake") as http:
            answer = await http.get(path)
        assert answer.status_code == 200, answer.text
        return answer.json()

    return anyio.run(main)


# ------------------------------------------------------------------- 2. served emulator, a latency held at shutdown


def test_serving_stops_at_once_with_a_latency_still_held(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A served emulator stopping while an injected latency holds a request lets that request go on at once (its
    rule's answer is sent), rather than waiting the graceful timeout and cancelling it with a traceback logged; the
    user's rules stay (the fake may be served again)."""
    held = threading.Event()
    real_sleep = _faults._sleep

    async def sleep(seconds: float) -> None:
        held.set()
        await real_sleep(seconds)

    monkeypatch.setattr(_faults, "_sleep", sleep)
    fake = FakeLago(api_key="k")
    answers: list[Any] = []
    caplog.set_level(logging.ERROR)
    with serve_in_thread(fake) as url:
        fake.inject_fault(status=503, latency_ms=60_000, path="/api/v1/customers")  # type: ignore[attr-defined]

        def call() -> None:
            try:
                with httpx.Client(base_url=url, timeout=30) as http:
                    answers.append(http.get("/api/v1/customers", headers={"Authorization": "Bearer k"}).status_code)
            except httpx.HTTPError as exc:
                answers.append(exc)

        client = threading.Thread(target=call, daemon=True)
        client.start()
        assert held.wait(10)
    client.join(30)
    assert answers == [503]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [rule.status for rule in fake.faults.rules] == [503]  # type: ignore[attr-defined]


# ----------------------------------------------------------- 3. idempotency store, LAGO_API_TIMEOUT under its own


pytest_anyio = pytest.mark.anyio
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


@contextlib.contextmanager
def said() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    package = logging.getLogger("lago_org_billing")
    level = package.level
    package.setLevel(logging.INFO)
    package.addHandler(handler)
    try:
        yield records
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


async def _ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


@contextlib.asynccontextmanager
async def billed(redis_url: str) -> AsyncIterator[tuple[OrgBillingMiddleware, resp.StallingRelay]]:
    relay = resp.StallingRelay(redis_url)
    lago = FakeLago(api_key="k")
    settings = BillingSettings(
        api_url=lago.base_url,
        api_key="k",
        org_header="X-Org-Id",
        quota_mode="off",
        redis_url=relay.url,
        api_timeout=0.5,  # (under the store's own 2 s Redis timeout: this bound cancels the call first)
    )
    app = Starlette(routes=[Route("/v1/chat", _ok, methods=["POST"])])
    middleware = OrgBillingMiddleware(app, settings, idempotency_header="Idempotency-Key", transport=lago.transport())
    try:
        yield middleware, relay
    finally:
        await middleware.aclose()
        relay.close()


async def _send(middleware: OrgBillingMiddleware, key: str) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
        answer = await http.post("/v1/chat", headers={"X-Org-Id": "org_1", "Idempotency-Key": key})
    assert answer.status_code == 200, answer.text


def _outages(records: list[logging.LogRecord]) -> tuple[int, int, list[str]]:
    warnings = sum(r.name == LOGGER and "unavailable for idempotency keys" in r.getMessage() for r in records)
    recoveries = sum(r.name == LOGGER and "shared again" in r.getMessage() for r in records)
    other = [
        r.getMessage()
        for r in records
        if r.levelno >= logging.WARNING
        and "unavailable for idempotency keys" not in r.getMessage()
        and "ASGI lifespan" not in r.getMessage()  # (no lifespan run here: said once, not this test's)
    ]
    return warnings, recoveries, other


@pytest_anyio
@needs_redis
async def test_a_redis_not_answering_within_lago_api_timeout_is_said_once_and_marked_down(redis_url: str) -> None:
    """With LAGO_API_TIMEOUT under the idempotency store's own Redis timeout, a Redis that stops answering is said
    (one WARNING per outage) and the store marked down when the middleware's bound cancels its call, as the store's own
    timeout would; its end is said too (INFO)."""
    async with billed(redis_url) as (middleware, relay):
        store = middleware._shared_first_seen
        assert store is not None
        with said() as records:
            await _send(middleware, "k-1")  # (Redis answering: a connection in the pool)
            assert not store.down
            relay.stalled = True
            await _send(middleware, "k-2")
            assert store.down
            await _send(middleware, "k-3")
            relay.stalled = False  # (the cancelled calls' connections were dropped: new ones pass)
            await _send(middleware, "k-4")
        assert not store.down
        assert _outages(records) == (1, 1, [])
