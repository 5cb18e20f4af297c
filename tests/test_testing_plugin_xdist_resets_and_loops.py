"""The emulator and the pytest plugin as a user's project uses them: in parallel, across loops, kept for a session.

Small user projects run by ``pytester`` in a subprocess (as ``pytest`` runs them):

* ``pytest -n 2`` (pytest-xdist): each worker's emulators are its own (free ports, no state seen by the other worker),
  served ones stop with no thread or socket left, ``-W error::ResourceWarning`` included;
* the fixtures in async tests of anyio's plugin (asyncio and trio) and of pytest-asyncio (strict and auto modes),
  and one emulator kept for the session (served in a thread) used by function-scoped event loops.

The defects found (each test failed before its fix):

* a webhook delivery still being sent when ``fake.reset()`` ran (a receiver that hangs, in the test that ended) held
  every webhook of the next tests for up to the attempt's timeout (30 s): reset now cancels it, served or in process;
* a request held by an injected latency when ``fake.reset()`` ran (its client gave up, the test ended) was applied
  afterwards to the next test's emulator (an event of one test visible to the next): it is now refused (503), and
  not recorded in the next test's ``fake.requests``;
* a served emulator stopped while a webhook was being sent logged uvicorn's ``ERROR Exception in 'lifespan'
  protocol`` (a ``CancelledError`` traceback) at every such teardown: the delivery is now stopped before the
  lifespan shutdown completes.
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

pytest_plugins = ["pytester"]

AUTH = {"Authorization": "Bearer test-api-key"}


async def _ok(request: Request) -> JSONResponse:
    return JSONResponse({})


RECEIVER = Starlette(routes=[Route("/{path:path}", _ok, methods=["POST"])])


def _emit_one(fake: Any) -> None:
    """Webhooks (plan, subscription started and terminated, invoice) emitted as an app's calls would emit them."""
    fake.add_plan("starter")
    fake.add_subscription("org_1", "starter")
    fake.store.terminate_subscription("org_1", {})
    fake.catch_up()


@pytest.fixture
def blackhole() -> Iterator[socket.socket]:
    """A webhook receiver that accepts connections and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


# --------------------------------------------------------------------------- reset and in-flight webhook deliveries


def test_reset_cancels_a_served_delivery_still_being_sent(blackhole: socket.socket) -> None:
    """An emulator kept for the session and reset between tests: the first test's receiver hangs; the next test's
    webhook is delivered at once, not after the hanging attempt's 30 s."""
    fake = FakeLago()
    with serve_in_thread(fake):
        port = blackhole.getsockname()[1]
        fake.webhook_dispatcher.configure(url=f"http://127.0.0.1:{port}/hook", signature="hmac")
        _emit_one(fake)
        connection, _ = blackhole.accept()  # the delivery is being sent (and will never be answered)
        with connection:
            fake.reset()  # the next test
            fake.webhook_dispatcher.configure(app=RECEIVER)
            _emit_one(fake)
            done = fake.webhook_dispatcher.wait_delivered(1, timeout=10)
            assert done and all(d.succeeded for d in done), [d.to_json() for d in done]


@pytest.mark.anyio
async def test_reset_cancels_an_in_process_delivery_still_being_sent() -> None:
    """In process: ``deliver_pending()`` running in one task returns once another task resets the emulator, instead
    of waiting out the attempt to a receiver that hangs."""
    entered = anyio.Event()

    async def hang(request: Request) -> JSONResponse:
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    fake = FakeLago()
    fake.webhook_dispatcher.configure(app=Starlette(routes=[Route("/webhooks/lago", hang, methods=["POST"])]))
    _emit_one(fake)
    sent: list[Any] = []

    async def deliver() -> None:
        sent.extend(await fake.webhook_dispatcher.deliver_pending())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(deliver)
            await entered.wait()
            fake.reset()
    assert sent == [] and fake.webhook_dispatcher.deliveries == []


# --------------------------------------------------------------------------- reset and requests held by a latency


def test_a_request_held_across_a_reset_is_not_applied_to_the_next_test() -> None:
    """A "Lago is slow" test on a session emulator: its request, held by the latency when the test ended and the
    emulator was reset, must not create its event in the next test's state."""
    from lago_org_billing.testing import _faults

    entered = threading.Event()
    release = threading.Event()

    async def held(seconds: float) -> None:  # the injected latency, ended by the test
        entered.set()
        await anyio.to_thread.run_sync(release.wait)

    fake = FakeLago()
    event = {"event": {"transaction_id": "tx_1", "external_subscription_id": "org_1", "code": "api_call"}}
    answers: list[int] = []
    with pytest.MonkeyPatch.context() as mp, serve_in_thread(fake) as url:
        mp.setattr(_faults, "_sleep", held)
        fake.inject_fault(latency_ms=60_000, count=1)

        def send() -> None:
            with httpx.Client(base_url=url, headers=AUTH) as client:
                answers.append(client.post("/api/v1/events", json=event).status_code)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            assert entered.wait(10)
            fake.reset()  # the next test starts
        finally:
            release.set()
            sender.join(10)
        assert fake.events == [] and fake.requests == []
        assert answers == [503]


# --------------------------------------------------------------------------- stopping while a webhook is sent


def test_stopping_while_a_webhook_is_sent_logs_no_lifespan_error(
    blackhole: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeLago()
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        with serve_in_thread(fake):
            port = blackhole.getsockname()[1]
            fake.webhook_dispatcher.configure(url=f"http://127.0.0.1:{port}/hook", signature="hmac")
            _emit_one(fake)
            connection, _ = blackhole.accept()
        connection.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert not [t for t in threading.enumerate() if t.name.startswith("fake-lago-")]


# --------------------------------------------------------------------------- user projects run by pytest


_SESSION_CONFTEST = """
import socket, threading
import pytest
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

PORTS = []

@pytest.fixture(scope="session")
def session_fake():
    fake = FakeLago()
    with serve_in_thread(fake) as url:
        fake.url = url
        PORTS.append(int(url.rsplit(":", 1)[1]))
        yield fake

@pytest.fixture
def shared(session_fake):
    session_fake.reset()
    return session_fake

def pytest_sessionfinish(session):
    left = [t.name for t in threading.enumerate() if t.name.startswith("fake-lago-")]
    assert not left, left
    for port in PORTS:  # nothing listens there any more
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, port
"""

_XDIST_TESTS = """
import os
import httpx, pytest

AUTH = {"Authorization": "Bearer test-api-key"}

@pytest.mark.parametrize("i", range(4))
def test_served_per_test(fake_lago_server, lago_settings, i):
    assert fake_lago_server.customers == [] and fake_lago_server.requests == []
    assert lago_settings.api_url == fake_lago_server.url
    with httpx.Client(base_url=fake_lago_server.url, headers=AUTH) as client:
        assert client.post("/api/v1/customers", json={"customer": {"external_id": f"c{i}"}}).status_code == 200
    assert [c["external_id"] for c in fake_lago_server.customers] == [f"c{i}"]
    print("worker", os.environ["PYTEST_XDIST_WORKER"], fake_lago_server.url)

@pytest.mark.parametrize("i", range(4))
def test_session_emulator(shared, i):
    assert shared.customers == [] and shared.faults.rules == []
    shared.add_customer(f"s{i}")
    shared.inject_fault(status=503)
    if i == 1:
        raise AssertionError("a test failing midway")
"""


def test_xdist_workers_each_have_their_own_emulators(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist")
    pytester.makeconftest(_SESSION_CONFTEST)
    pytester.makepyfile(_XDIST_TESTS)
    # Only the plugins this run is about: others installed beside them (pytest-benchmark warns when xdist is active,
    # an error under -W error) must not decide its outcome.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = pytester.runpytest_subprocess(
        *("-p", "xdist.plugin", "-p", "lago_org_billing.testing.pytest_plugin", "-p", "anyio"),
        *("-n", "2", "-p", "no:cacheprovider", "-W", "error", "-W", "error::ResourceWarning", "-rA"),
    )
    result.assert_outcomes(passed=7, failed=1)
    urls = {line.split()[-1] for line in result.outlines if line.startswith("worker gw")}
    assert len(urls) == 4  # a port of its own for each served emulator


_ASYNC_TESTS = """
import anyio, httpx, pytest
from lago_org_billing import BillingSettings, LagoClient

{marker}

@pytest.mark.parametrize("i", range(2))
async def test_fixtures(fake_lago, lago_client, i):
    fake_lago.add_plan("starter")
    await lago_client.create_subscription(external_customer_id=f"o{{i}}", plan_code="starter", external_id=f"o{{i}}")
    assert [c["external_id"] for c in fake_lago.customers] == [f"o{{i}}"]

@pytest.mark.parametrize("i", range(2))
async def test_session_emulator_on_this_tests_loop(shared, i):
    assert shared.customers == []
    shared.add_plan("starter")
    async with LagoClient(BillingSettings(api_url=shared.url, api_key=shared.api_key)) as client:
        await client.create_subscription(external_customer_id="o", plan_code="starter", external_id="o")
    answers = []
    async with shared.client() as client:  # in process too, from several tasks at once
        async def get():
            answers.append((await client.get("/api/v1/customers/o")).status_code)
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(get)
    assert answers == [200] * 5

async def test_served_fixture(fake_lago_server, lago_settings):
    fake_lago_server.add_plan("starter")
    async with LagoClient(lago_settings) as client:
        await client.create_subscription(external_customer_id="o", plan_code="starter", external_id="o")
    assert len(fake_lago_server.customers) == 1
"""


def test_anyio_tests_on_asyncio_and_trio(
    pytester: pytest.Pytester, other_plugins_off: Callable[..., list[str]]
) -> None:
    pytester.makeconftest(
        _SESSION_CONFTEST
        + '\n@pytest.fixture(params=["asyncio", "trio"])\ndef anyio_backend(request):\n    return request.param\n'
    )
    pytester.makepyfile(_ASYNC_TESTS.format(marker="pytestmark = pytest.mark.anyio"))
    result = pytester.runpytest_subprocess(
        *other_plugins_off(), "-p", "no:cacheprovider", "-W", "error", "-W", "error::ResourceWarning"
    )
    result.assert_outcomes(passed=10)


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_pytest_asyncio_tests(
    pytester: pytest.Pytester, mode: str, other_plugins_off: Callable[..., list[str]]
) -> None:
    if importlib.util.find_spec("pytest_asyncio") is None:
        pytest.skip("pytest-asyncio is not installed")
    pytester.makeconftest(_SESSION_CONFTEST)
    pytester.makeini(f"[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n")
    marker = "pytestmark = pytest.mark.asyncio" if mode == "strict" else ""
    pytester.makepyfile(_ASYNC_TESTS.format(marker=marker))
    result = pytester.runpytest_subprocess(
        *other_plugins_off("asyncio"), "-p", "no:cacheprovider", "-W", "error", "-W", "error::ResourceWarning"
    )
    result.assert_outcomes(passed=5)
