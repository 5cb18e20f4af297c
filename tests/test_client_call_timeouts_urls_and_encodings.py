"""Review of the async Lago client and its settings, as a demanding deployment meets them.

Covered: a Lago (or a proxy before it) that trickles its answer byte by byte, which httpx's per-read timeout never
cuts (a call with LAGO_API_TIMEOUT=1 ran for as long as the trickle lasted), on every call and on the event batch
through httpx; LAGO_API_URL with ``user:password@`` (httpx turned it into Basic auth in place of the API key: every
call but the event batches a 401 "Check LAGO_API_KEY"), with port 0 or a blank in its host (accepted, failing at each
call); gzip answers to the event batch on the raw HTTP/1.1 path, and bodies that claim gzip but are not (an httpx
``DecodingError``, no ``LagoIntegrationError``); ``Retry-After`` as an asctime or ``-0000`` HTTP date (read as the
machine's local time); the switch fields given as text in code (``fail_open="false"`` was fail-open).
"""

from __future__ import annotations

import email.utils
import gzip
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from lago_org_billing import (
    BillingSettings,
    ConfigurationError,
    LagoClient,
    LagoIntegrationError,
    LagoUnavailableError,
)

pytestmark = pytest.mark.anyio

BATCH = json.dumps(
    {
        "events": [
            {
                "transaction_id": "tx_1",
                "external_subscription_id": "org_1",
                "code": "api_call",
                "timestamp": "1767225600.000",
            }
        ]
    }
).encode()


async def _read_request(stream: anyio.abc.SocketStream) -> bool:
    """Read one request (head and Content-Length body); False when the client went away first."""
    buffer = b""
    try:
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive()
        head, _, body = buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return False
    return True


async def _serve(
    tasks: anyio.abc.TaskGroup, handler: Callable[[anyio.abc.SocketStream], Awaitable[None]]
) -> tuple[str, list[int]]:
    """A TCP server on 127.0.0.1 running ``handler`` for each connection; its URL and a count of connections."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    connections: list[int] = []

    async def handle(stream: anyio.abc.SocketStream) -> None:
        connections.append(1)
        async with stream:
            await handler(stream)

    async def run() -> None:
        async with listener:
            await listener.serve(handle)

    tasks.start_soon(run)
    return f"http://127.0.0.1:{port}", connections


async def _trickle(stream: anyio.abc.SocketStream) -> None:
    """A 200 that promises a large JSON body and sends it a byte every 20 ms, for as long as the client listens: every
    read gets data long before any read timeout."""
    if not await _read_request(stream):
        return
    try:
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n")
        while True:
            await stream.send(b" ")
            await anyio.sleep(0.02)  # (the fault itself: a slow sender, not synchronisation)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return


@pytest.mark.parametrize("path", ["call", "batch-through-httpx", "batch-raw"])
async def test_an_answer_trickling_in_is_cut_at_lago_api_timeout(path: str) -> None:
    """LAGO_API_TIMEOUT is "seconds per Lago call", and LAGO_RETRY_DEADLINE the whole call's: httpx's timeout is per
    read, so a Lago (or a proxy, a stalled upstream) sending its answer a byte at a time held the call for as long as
    it cared to (minutes with api_timeout=1). It is a LagoUnavailableError after LAGO_API_TIMEOUT, on every call and
    on the event batch whether it goes through httpx (a proxy, an injected transport) or the raw path."""
    async with anyio.create_task_group() as tasks:
        url, _ = await _serve(tasks, _trickle)
        settings = BillingSettings(api_url=url, api_key="k", api_timeout=0.5, retry_deadline=0.5, max_retries=0)
        transport = httpx.AsyncHTTPTransport() if path == "batch-through-httpx" else None
        async with LagoClient(settings, transport=transport) as lago:
            with anyio.fail_after(15):  # (the trickle never ends: without a cut, the test fails here)
                with pytest.raises(LagoUnavailableError, match="LAGO_API_TIMEOUT") as info:
                    if path == "call":
                        await lago.list_customers()
                    else:
                        await lago.send_event_batch_json(BATCH)
        tasks.cancel_scope.cancel()
    assert info.value.status is None


async def test_an_injected_transport_that_never_answers_is_cut_too() -> None:
    """A transport passed in that never answers (no socket for httpx's timeouts to watch) ends at LAGO_API_TIMEOUT,
    retried within LAGO_RETRY_DEADLINE, rather than hanging the caller."""
    calls: list[httpx.Request] = []

    class Silent(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            calls.append(request)
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

    settings = BillingSettings(api_url="http://lago.test", api_key="k", api_timeout=0.2, max_retries=0)
    async with LagoClient(settings, transport=Silent()) as lago:
        with anyio.fail_after(15):
            with pytest.raises(LagoUnavailableError, match="no answer within"):
                await lago.get_customer("org_1")
            with pytest.raises(LagoUnavailableError):
                await lago.send_event_batch_json(BATCH)
    assert len(calls) == 2


async def test_userinfo_in_lago_api_url_never_replaces_the_api_key(
    fake_lago_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``LAGO_API_URL=http://user:secret@lago:3000``: httpx turned the userinfo into ``Authorization: Basic``, in
    place of the Bearer API key, on every call but the event batches (the raw path sends the key): every read a 401
    "Check LAGO_API_KEY" with a right key, while events went through. Lago takes only the Bearer key: it is what
    every call sends, and a warning says the userinfo is not sent (its password masked)."""
    fake_lago_server.add_plan("starter", amount_cents=0)
    fake_lago_server.add_subscription("org_1", "starter", external_id="org_1")
    url = fake_lago_server.url.replace("http://", "http://someone:hunter2secret@")
    settings = BillingSettings(api_url=url, api_key=fake_lago_server.api_key, max_retries=0)
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.client"):
        async with LagoClient(settings) as lago:
            assert (await lago.get_customer("org_1"))["external_id"] == "org_1"
            await lago.send_event_batch_json(BATCH)
    assert [event["transaction_id"] for event in fake_lago_server.events] == ["tx_1"]
    said = [record.getMessage() for record in caplog.records if "LAGO_API_URL" in record.getMessage()]
    assert said and "LAGO_API_KEY" in said[0]
    assert "hunter2secret" not in caplog.text


@pytest.mark.parametrize(
    "url",
    [
        "http://lago.test:0",
        "https://lago.test:0/api/v1",
        "http://lago .test",
        "http://lago\t.test:3000",
        "http://lago\n:3000",
    ],
)
def test_lago_api_url_with_port_0_a_blank_or_a_line_break_inside_is_refused(url: str) -> None:
    """Port 0 (httpx dials port 0, the raw path port 80) and a host with a blank (a typo; sent as ``lago%20.test``)
    were accepted, each call then failing to connect; a tab or line break inside (a folded YAML value) was accepted
    too, and every ``LagoClient`` made raised httpx's ``InvalidURL`` (no LagoIntegrationError). Refused at once,
    naming LAGO_API_URL."""
    with pytest.raises(ConfigurationError, match="LAGO_API_URL") as info:
        BillingSettings.from_env(None, environ={"LAGO_API_KEY": "k", "LAGO_API_URL": url})
    assert info.value.variable == "LAGO_API_URL"


def _answer(data: bytes) -> Callable[[anyio.abc.SocketStream], Awaitable[None]]:
    async def handler(stream: anyio.abc.SocketStream) -> None:
        while await _read_request(stream):
            await stream.send(data)

    return handler


def _http(status: str, body: bytes, *headers: str) -> bytes:
    head = "".join(f"{header}\r\n" for header in headers)
    return f"HTTP/1.1 {status}\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


async def test_a_gzip_answer_to_an_event_batch_on_the_raw_path_is_lagos_answer() -> None:
    """A server or proxy may compress an answer to a request without Accept-Encoding (RFC 9110 12.5.3): the raw path
    read Lago's gzip 200 as "not Lago's JSON" (the batch, ingested, sent again and again)."""
    body = gzip.compress(b'{"events":[{"transaction_id":"tx_1"}]}')
    answer = _http("200 OK", body, "Content-Type: application/json", "Content-Encoding: gzip")
    async with anyio.create_task_group() as tasks:
        url, _ = await _serve(tasks, _answer(answer))
        async with LagoClient(BillingSettings(api_url=url, api_key="k", max_retries=0)) as lago:
            assert lago._raw is not None
            await lago.send_event_batch_json(BATCH)
        tasks.cancel_scope.cancel()


@pytest.mark.parametrize("status", ["200 OK", "502 Bad Gateway"])
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "httpx"])
async def test_a_body_claiming_gzip_that_is_not_is_a_lago_error(status: str, raw: bool) -> None:
    """An answer saying ``Content-Encoding: gzip`` over a plain body (a proxy's page, a misconfigured gateway) raised
    httpx's ``DecodingError`` out of ``send_event_batch_json``: no LagoIntegrationError, so callers catching those
    (and the delivery pipeline's error mapping) missed it. It is a LagoUnavailableError, as on every other call."""
    answer = _http(status, b'{"status": 502}', "Content-Type: application/json", "Content-Encoding: gzip")
    async with anyio.create_task_group() as tasks:
        url, _ = await _serve(tasks, _answer(answer))
        transport = None if raw else httpx.AsyncHTTPTransport()
        async with LagoClient(BillingSettings(api_url=url, api_key="k", max_retries=0), transport=transport) as lago:
            assert (lago._raw is not None) is raw
            with pytest.raises(LagoIntegrationError) as info:
                await lago.send_event_batch_json(BATCH)
            with pytest.raises(LagoIntegrationError):
                await lago.list_customers()
        tasks.cancel_scope.cancel()
    assert isinstance(info.value, LagoUnavailableError), repr(info.value)
    assert "decod" in str(info.value)


@pytest.fixture
def new_york() -> Iterator[None]:
    """The machine's local time zone is UTC-5 (or -4): what ``time.mktime`` and naive ``timestamp()`` read."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is POSIX only")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TZ", "America/New_York")
        time.tzset()
        try:
            yield
        finally:
            patch.undo()
            time.tzset()


@pytest.mark.parametrize("form", ["asctime", "minus-zero"])
async def test_retry_after_in_every_http_date_form_is_gmt(
    monkeypatch: pytest.MonkeyPatch, new_york: None, form: str
) -> None:
    """RFC 9110 has recipients take the asctime form of an HTTP date (``Sun Nov  6 08:49:37 1994``), always GMT; and
    ``-0000`` is UTC. Both were read as the machine's local time: 5 hours off in New York, so a 429 asking 3 s raised
    at once (a wait beyond LAGO_RETRY_DEADLINE), and east of UTC it retried at once."""
    import lago_org_billing._client as client_module

    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(client_module.anyio, "sleep", sleep)
    monkeypatch.setattr(client_module.random, "uniform", lambda low, high: low)
    monkeypatch.setattr(client_module.random, "random", lambda: 0.0)
    when = time.time() + 30
    if form == "asctime":
        retry_after = time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(when))
    else:
        retry_after = email.utils.formatdate(when)  # ("..., 21 Oct 2015 07:28:00 -0000")
        assert retry_after.endswith(" -0000")
    answers = iter(
        [
            httpx.Response(429, headers={"Retry-After": retry_after}, json={"status": 429, "error": "Too Many"}),
            httpx.Response(200, json={"customer": {"external_id": "org_1"}}),
        ]
    )
    transport = httpx.MockTransport(lambda request: next(answers))
    settings = BillingSettings(api_url="http://lago.test", api_key="k", retry_deadline=120)
    async with LagoClient(settings, transport=transport) as lago:
        await lago.get_customer("org_1")
    assert len(waits) == 1 and 20 <= waits[0] <= 31, waits


@pytest.mark.parametrize("field", ["fail_open", "metrics", "bill_server_errors"])
@pytest.mark.parametrize("value", ["false", "true", "0", 1, None])
def test_switches_given_as_text_in_code_are_refused(field: str, value: object) -> None:
    """``BillingSettings(fail_open="false")`` (a value read from the app's own config as text) was taken as true: the
    gate let everyone through when Lago was down, where "closed" was written. The switches take True or False."""
    variable = f"LAGO_{field.upper()}"
    with pytest.raises(ConfigurationError, match=variable) as info:
        BillingSettings(**{field: value})  # type: ignore[arg-type]
    assert info.value.variable == variable
    with pytest.raises(ConfigurationError, match=variable):
        BillingSettings.from_env(None, environ={}, require_api_key=False, **{field: value})
    assert getattr(BillingSettings(**{field: True}), field) is True  # type: ignore[arg-type]


@pytest.mark.parametrize("ahead", [30, 0])
def test_an_epoch_style_rate_limit_reset_is_read_as_the_time_of_the_reset(ahead: int) -> None:
    """A proxy's ``X-RateLimit-Reset`` giving the reset's Unix time (GitHub's style) is not 56 years to wait."""
    from lago_org_billing._client import _retry_after

    reset = int(time.time()) + ahead
    wait = _retry_after(httpx.Headers({"x-ratelimit-reset": str(reset)}))
    assert wait is not None and wait <= ahead + 1
    assert _retry_after(httpx.Headers({"x-ratelimit-reset": "30"})) == 30.0  # Lago's: seconds until the reset
