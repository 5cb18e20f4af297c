"""A user testing their own app with ``lago_org_billing.testing``'s fixtures.

* "Lago is slow" injected in process (``latency_ms``) answers ``httpx.ReadTimeout`` at the client's timeout, as the
  served emulator does, instead of holding the test for the whole latency;
* ``fake_lago_server`` stops at once, its thread gone, when a request is still held by an injected latency;
* ``lago_client`` works for tests that anyio does not run (pytest-asyncio's): it is not tied to ``anyio_backend``;
* moving the emulator's clock shows in its views (``fake_lago.subscriptions``) and webhooks, as Lago's clock jobs
  would, without having to send an API request first.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from lago_org_billing import BillingSettings, LagoClient, LagoUnavailableError
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

pytest_plugins = ["pytester"]

UTC = dt.timezone.utc


# --------------------------------------------------------------------------- in-process latency and timeouts


@pytest.mark.anyio
async def test_in_process_latency_beyond_the_read_timeout_is_a_read_timeout(fake_lago: Any) -> None:
    """A user testing "Lago is slow" in process: the request times out at httpx's read timeout (a served emulator
    gives the same ReadTimeout), not after the hour of injected latency (the guard fails the test if it waits)."""
    fake_lago.inject_fault(latency_ms=3_600_000, count=1)
    async with fake_lago.client(timeout=0.05) as client:
        with anyio.fail_after(30), pytest.raises(httpx.ReadTimeout):
            await client.get("/api/v1/plans")
        assert (await client.get("/api/v1/plans")).status_code == 200  # count=1: the next one is not slow


@pytest.mark.anyio
async def test_lago_client_gives_up_on_a_slow_in_process_lago(fake_lago: Any) -> None:
    """The package's own client against a slow emulator: its retries end at ``retry_deadline`` with a network error."""
    settings = BillingSettings(
        api_url=fake_lago.base_url, api_key=fake_lago.api_key, api_timeout=0.05, retry_deadline=0.2
    )
    fake_lago.inject_fault(latency_ms=3_600_000)
    async with LagoClient(settings, transport=fake_lago.transport()) as client:
        with anyio.fail_after(30), pytest.raises(LagoUnavailableError):
            await client.get_customer("org_1")


@pytest.mark.anyio
async def test_in_process_requests_without_a_timeout_still_wait_for_the_latency(fake_lago: Any) -> None:
    """``timeout=None`` keeps waiting (the latency is recorded, not slept: the module's ``_sleep`` is patched)."""
    from lago_org_billing.testing import _faults

    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    fake_lago.inject_fault(latency_ms=5_000, count=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_faults, "_sleep", record)
        async with fake_lago.client(timeout=None) as client:
            assert (await client.get("/api/v1/plans")).status_code == 200
    assert slept == [5.0]


# --------------------------------------------------------------------------- the served emulator's shutdown


def test_served_emulator_stops_with_a_request_held_by_latency() -> None:
    """A "Lago is slow" test over HTTP: the client times out and the test ends; the server must not wait for the
    held request (it used to hold teardown 10 s, then leave the server thread running)."""
    fake = FakeLago()
    with serve_in_thread(fake, timeout=30) as url:
        fake.faults.inject(latency_ms=3_600_000, count=1)
        with httpx.Client(base_url=url, timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
            client.get("/api/v1/plans")
        name = "fake-lago-127.0.0.1:0"
        assert [t for t in threading.enumerate() if t.name == name]
    assert not [t for t in threading.enumerate() if t.name == name and t.is_alive()]


# --------------------------------------------------------------------------- lago_client outside anyio


def test_lago_client_fixture_serves_tests_that_anyio_does_not_run(
    pytester: pytest.Pytester, other_plugins_off: Callable[..., list[str]]
) -> None:
    """pytest-asyncio users (its strict mode warns, then errors, on an async ``@pytest.fixture``; and an
    ``anyio_backend`` dependency runs their asyncio test once more as ``[trio]``). A stand-in runner here: one
    test, run once, with a client that works on the runner's loop."""
    pytester.makeconftest(
        """
        import asyncio, inspect, pytest

        @pytest.hookimpl(tryfirst=True)
        def pytest_pyfunc_call(pyfuncitem):
            if pyfuncitem.get_closest_marker("own_loop") is None:
                return None
            names = pyfuncitem._fixtureinfo.argnames
            asyncio.run(pyfuncitem.obj(**{name: pyfuncitem.funcargs[name] for name in names}))
            return True

        def pytest_configure(config):
            config.addinivalue_line("markers", "own_loop: run by this conftest")
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.own_loop
        async def test_it(fake_lago, lago_client):
            fake_lago.add_plan("starter")
            await lago_client.create_subscription(
                external_customer_id="org_1", plan_code="starter", external_id="org_1"
            )
            assert fake_lago.customers[0]["external_id"] == "org_1"
        """
    )
    result = pytester.runpytest_inprocess(*other_plugins_off(), "-W", "error", "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=1)
    assert "[trio]" not in result.stdout.str()


@pytest.mark.anyio
async def test_lago_client_fixture_still_serves_anyio_tests(fake_lago: Any, lago_client: LagoClient) -> None:
    fake_lago.add_plan("starter")
    await lago_client.create_subscription(external_customer_id="org_1", plan_code="starter", external_id="org_1")
    assert [s["external_id"] for s in fake_lago.subscriptions] == ["org_1"]


# --------------------------------------------------------------------------- moving the clock


def test_moving_the_clock_shows_in_the_views_and_webhooks(fake_lago: Any) -> None:
    """A subscription ending on the 20th: once the clock is past it, ``fake_lago.subscriptions`` says terminated and
    ``subscription.terminated`` is on its way to the app, without an API request in between (Lago's clock job)."""
    now = [dt.datetime(2026, 3, 15, tzinfo=UTC)]
    fake_lago.clock = lambda: now[0]
    fake_lago.webhook_dispatcher.configure(url="http://127.0.0.1:9/hooks")
    fake_lago.add_plan("p", amount_cents=100)
    fake_lago.add_subscription("org_1", "p", ending_at="2026-03-20T00:00:00Z")
    fake_lago.add_subscription("org_2", "p", subscription_at="2026-03-25T00:00:00Z")
    assert [s["status"] for s in fake_lago.subscriptions] == ["active", "pending"]

    now[0] = dt.datetime(2026, 4, 2, tzinfo=UTC)
    assert [s["status"] for s in fake_lago.subscriptions] == ["terminated", "active"]
    types = [d.webhook_type for d in fake_lago.webhook_dispatcher.pending]
    assert types.count("subscription.terminated") == 1 and types.count("subscription.started") == 2
    # org_1's termination invoice, and org_2's March, invoiced as its period ended on 1 April (Lago's biller job)
    assert [i["invoice_type"] for i in fake_lago.invoices] == ["subscription", "subscription"]


@pytest.mark.anyio
async def test_delivering_webhooks_catches_up_with_the_clock(fake_lago: Any) -> None:
    """``deliver_pending()`` right after moving the clock sends what Lago's clock job would have emitted."""
    received: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        received.append(httpx.Response(200, content=body).json()["webhook_type"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    now = [dt.datetime(2026, 3, 15, tzinfo=UTC)]
    fake_lago.clock = lambda: now[0]
    fake_lago.add_plan("p")
    fake_lago.add_subscription("org_1", "p", ending_at="2026-03-20T00:00:00Z")
    fake_lago.webhook_dispatcher.configure(app=app, signature="hmac")
    now[0] = dt.datetime(2026, 3, 21, tzinfo=UTC)
    await fake_lago.webhook_dispatcher.deliver_pending()
    assert "subscription.terminated" in received
