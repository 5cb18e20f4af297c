"""LagoClient as a user calls it directly.

Covers: a client used from a second event loop (``asyncio.run`` per job, a thread with a loop of its own), which fails
every other call with a bare ``RuntimeError: Event loop is closed``; an event without ``timestamp`` that the caller
sends again after ``LagoUnavailableError`` (its first attempt ingested behind a lost answer), which Lago's ClickHouse
store bills twice since the resend carries a new timestamp; Lago's webhook public key answered in a shape the client
cannot read, raised as ``AttributeError`` / ``binascii.Error`` instead of a :class:`LagoAPIError`; a
client entered again (``async with``) inside its own block, closed by the inner block's end.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Any

import anyio
import httpx
import pytest
from pytest_httpx import HTTPXMock

from lago_org_billing import BillingSettings, LagoAPIError, LagoClient, LagoUnavailableError, _events
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

BASE = "http://lago.test"


def _settings(**changes: Any) -> BillingSettings:
    values: dict[str, Any] = {"api_key": "k", "api_url": BASE, "retry_backoff": 0.001}
    values.update(changes)
    return BillingSettings(**values)


# ------------------------------------------------------------------------------------------- event loops, threads


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # (the failing loops' sockets)
def test_a_client_called_again_from_a_new_event_loop_gets_its_answer(fake_lago_server: Any) -> None:
    """A sync program (a CLI, a Celery task, a Django view) keeping one LagoClient and running each call with
    ``asyncio.run``: the second loop reused the first loop's keep-alive connection and failed with a bare
    ``RuntimeError: Event loop is closed`` (every other call), not Lago's answer nor a LagoIntegrationError."""
    fake_lago_server.add_customer("org_1")
    client = LagoClient(
        BillingSettings(api_url=fake_lago_server.url, api_key=fake_lago_server.api_key, retry_backoff=0.001)
    )

    async def read() -> dict[str, Any]:
        return await client.get_customer("org_1")

    try:
        for _ in range(3):
            assert anyio.run(read)["external_id"] == "org_1"
    finally:
        try:
            anyio.run(client.aclose)
        except RuntimeError:  # (the failure under test, not this cleanup's)
            pass
        gc.collect()  # (sockets a failing loop left: said here, not in a later test)


def _read_from_two_loops_at_once(url: str, api_key: str) -> list[str]:
    """Thread A reads through the client on its loop and keeps that loop running; thread B then reads through the same
    client on a loop of its own. What B met (nothing, when it was answered)."""
    client = LagoClient(
        BillingSettings(api_url=url, api_key=api_key, retry_backoff=0.001, max_retries=0, api_timeout=2)
    )
    a_read, b_done = threading.Event(), threading.Event()
    failures: list[str] = []

    async def a() -> None:
        try:
            await client.get_customer("org_1")  # (a keep-alive connection of this loop, idle in the pool)
        finally:
            a_read.set()
        await anyio.to_thread.run_sync(b_done.wait, 10)  # (this loop runs on meanwhile)

    async def b() -> None:
        try:
            with anyio.fail_after(5):
                await client.get_customer("org_1")
        except Exception as exc:  # (what B met, said by the test)
            failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            b_done.set()

    first = threading.Thread(target=anyio.run, args=(a,))
    first.start()
    a_read.wait(10)
    second = threading.Thread(target=anyio.run, args=(b,))
    second.start()
    second.join(10)
    first.join(10)
    with contextlib.suppress(RuntimeError):
        anyio.run(client.aclose)
    return failures


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_client_shared_by_threads_with_loops_of_their_own_answers_each(fake_lago_server: Any) -> None:
    """Two threads, each with an event loop of its own, on one client (a thread pool of sync workers): the second
    thread's request took the first loop's idle connection and failed (``RuntimeError: ... is bound to a different
    event loop``) or hung until LAGO_API_TIMEOUT; with retries, each such call stalls a whole timeout."""
    fake_lago_server.add_customer("org_1")
    failures = _read_from_two_loops_at_once(fake_lago_server.url, fake_lago_server.api_key)
    gc.collect()  # (sockets of the threads' ended loops: said here, not at the session's end)
    assert failures == []


# ------------------------------------------------------------------------------------------------- event timestamps


class _LoseFirstThenDown(httpx.AsyncBaseTransport):
    """Lago (the emulator) ingests the first ``POST`` to ``path`` but its answer is lost (a proxy's 502); Lago is down
    for the next ``down`` requests (503, nothing applied); then it answers as it is."""

    def __init__(self, inner: httpx.AsyncBaseTransport, path: str, down: int) -> None:
        self.inner = inner
        self.path = path
        self.calls = 0
        self.down = down

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST" or request.url.path != self.path:
            return await self.inner.handle_async_request(request)
        self.calls += 1
        if self.calls == 1:
            response = await self.inner.handle_async_request(request)
            await response.aread()
            return httpx.Response(502, text="<html>Bad Gateway</html>", headers={"content-type": "text/html"})
        if self.calls <= 1 + self.down:
            return httpx.Response(503, json={"status": 503, "error": "Service Unavailable"})
        return await self.inner.handle_async_request(request)


@pytest.fixture
def advancing_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """``now`` of an event without a timestamp moves on by a millisecond at each call (time passes between a call and
    the caller's retry of it)."""
    real = _events.format_timestamp
    ticks = iter(range(1, 1000))

    def format_timestamp(value: Any = None) -> str:
        return real(value) if value is not None else f"1767225600.{next(ticks):03d}"

    monkeypatch.setattr(_events, "format_timestamp", format_timestamp)


@pytest.mark.usefixtures("advancing_clock")
async def test_an_untimed_event_the_caller_sends_again_after_an_outage_is_billed_once() -> None:
    """The first attempt was ingested behind a lost answer, the resends met an outage: ``LagoUnavailableError``
    ("retry later"). The caller retries the same event later, as told: the client stamped it with a new "now", and
    Lago's ClickHouse store (deduplicating on transaction_id *and* timestamp) kept both: billed twice."""
    fake = FakeLago(event_store="clickhouse")
    fake.add_plan("starter")
    fake.add_subscription("org_1", "starter", external_id="org_1")
    flaky = _LoseFirstThenDown(fake.transport(), "/api/v1/events", down=3)
    event = {"transaction_id": "tx_1", "external_subscription_id": "org_1", "code": "api_call", "properties": {}}
    async with LagoClient(_settings(api_url=fake.base_url, api_key=fake.api_key), transport=flaky) as lago:
        with pytest.raises(LagoUnavailableError):
            await lago.create_event(event)
        await lago.create_event(event)  # Lago is back: the caller's retry
    assert [stored["transaction_id"] for stored in fake.events] == ["tx_1"]


@pytest.mark.usefixtures("advancing_clock")
async def test_an_untimed_batch_the_caller_sends_again_after_an_outage_is_billed_once() -> None:
    """As for one event, with ``create_events``."""
    fake = FakeLago(event_store="clickhouse")
    fake.add_plan("starter")
    fake.add_subscription("org_1", "starter", external_id="org_1")
    flaky = _LoseFirstThenDown(fake.transport(), "/api/v1/events/batch", down=3)
    events = [{"transaction_id": f"tx_{i}", "external_subscription_id": "org_1", "code": "api_call"} for i in range(2)]
    async with LagoClient(_settings(api_url=fake.base_url, api_key=fake.api_key), transport=flaky) as lago:
        with pytest.raises(LagoUnavailableError):
            await lago.create_events(events)
        await lago.create_events(events)
    assert sorted(stored["transaction_id"] for stored in fake.events) == ["tx_0", "tx_1"]


# ------------------------------------------------------------------------------------------ webhook public key


@pytest.mark.parametrize(
    "body",
    [
        {"webhook": "LS0tLS1CRUdJTi"},  # (a gateway's flattening of the object)
        {"webhook": {"public_key": "not base64!!"}},
        {"webhook": {"public_key": "abc"}},  # (a truncated key)
    ],
    ids=["webhook-not-an-object", "not-base64", "truncated"],
)
async def test_a_webhook_public_key_answer_the_client_cannot_read_is_a_lago_api_error(
    httpx_mock: HTTPXMock, body: dict[str, Any]
) -> None:
    """Every other answer not shaped as Lago's is a LagoAPIError naming the call and LAGO_API_URL; this one raised
    ``AttributeError: 'str' object has no attribute 'get'`` or ``binascii.Error: Incorrect padding``, which a caller
    catching LagoIntegrationError (as the README's error tree says to) does not catch."""
    httpx_mock.add_response(url=f"{BASE}/api/v1/webhooks/json_public_key", json=body)
    async with LagoClient(_settings()) as lago:
        with pytest.raises(LagoAPIError):
            await lago.get_webhook_public_key()


# ------------------------------------------------------------------------------------------------- async with


@pytest.mark.httpx_mock(assert_all_responses_were_requested=False)  # (the failure under test: one failure said)
async def test_a_client_entered_again_is_not_closed_under_its_outer_block(httpx_mock: HTTPXMock) -> None:
    """``async with lago:`` inside ``async with LagoClient(...) as lago:`` (a helper given the app's client, written
    the way the README shows) was taken, and its end closed the client: every later call of the outer block raised
    "This LagoClient is closed; create a new one". Entered twice, a client either stays open until its outermost
    block ends or refuses the second entry at once (as httpx's own client does), never closes under its user."""
    httpx_mock.add_response(url=f"{BASE}/api/v1/customers/org_1", json={"customer": {"external_id": "org_1"}})
    async with LagoClient(_settings()) as lago:
        with contextlib.suppress(RuntimeError):  # (a refused second entry, said where it is made)
            async with lago:
                pass
        assert (await lago.get_customer("org_1"))["external_id"] == "org_1"
