"""The pytest plugin and the emulator's fixtures as users' own test suites use them.

* a served emulator (``fake_lago_server``, ``serve_in_thread``) leaves the host process's logging alone: a user's
  ``pytest --log-file`` keeps recording after the first test that used it (uvicorn's ``dictConfig`` used to close
  every handler, and a ``"w"`` file handler stays silent once closed);
* ``serve_in_thread`` on a port already taken is one clear error, without uvicorn's tracebacks on stderr;
* fault rules: a request answered 429 by a rate limit leaves the ``count`` of the rules after it untouched ("the
  first one that answers ends the chain"); a rate limit with a zero-second window (it could never limit) and a
  ``body`` that is not JSON are refused when injected (422 over HTTP), not when a request hits them;
* per-test isolation of the fixtures, sync and async tests alike: a fault or a clock left set by one test is not
  seen by the next.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest

from lago_org_billing import LagoIntegrationError
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._faults import FaultSpecError
from lago_org_billing.testing._server import EmulatorServerError, serve_in_thread

pytest_plugins = ["pytester"]

AUTH = {"Authorization": "Bearer test-api-key"}


# --------------------------------------------------------------------------- the host process's logging


def test_a_served_emulator_leaves_the_users_log_file_recording(
    pytester: pytest.Pytester, other_plugins_off: Callable[..., list[str]]
) -> None:
    """``pytest --log-file run.log``: what the suite logs after a test that used ``fake_lago_server`` is still in the
    file (uvicorn configured logging with ``dictConfig``, which closed pytest's file handler for good)."""
    pytester.makepyfile(
        """
        import logging

        log = logging.getLogger("myapp")

        def test_before():
            log.warning("logged-before-the-server")

        def test_served(fake_lago_server):
            log.warning("logged-while-served")

        def test_after():
            log.warning("logged-after-the-server")
        """
    )
    result = pytester.runpytest_subprocess(
        *other_plugins_off(), "-p", "no:cacheprovider", "--log-file=run.log", "--log-file-level=INFO"
    )
    result.assert_outcomes(passed=3)
    logged = (pytester.path / "run.log").read_text()
    for message in ("logged-before-the-server", "logged-while-served", "logged-after-the-server"):
        assert message in logged


def test_serving_on_a_taken_port_is_one_clear_error(capfd: pytest.CaptureFixture[str]) -> None:
    """A port in use: an ``EmulatorServerError`` naming it, and no uvicorn traceback on stderr."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(EmulatorServerError) as caught, serve_in_thread(FakeLago(), port=port):
            pass  # pragma: no cover - not served
    assert f"127.0.0.1:{port}" in str(caught.value) and "in use" in str(caught.value)
    assert isinstance(caught.value, LagoIntegrationError)
    assert "Traceback" not in capfd.readouterr().err


# --------------------------------------------------------------------------- fault rules


@pytest.mark.anyio
async def test_a_rate_limited_request_leaves_later_rules_counts(fake_lago: Any) -> None:
    """A rate limit answering 429 ends the chain: the ``count=1`` 503 after it is still there for the next request
    (the 429 used to consume it without anyone seeing it)."""
    fake_lago.inject_fault(rate_limit={"limit": 0, "reset": 60}, count=1)
    fake_lago.inject_fault(status=503, count=1)
    async with fake_lago.client(headers=AUTH) as client:
        statuses = [(await client.get("/api/v1/plans")).status_code for _ in range(3)]
    assert statuses == [429, 503, 200]


@pytest.mark.anyio
async def test_a_rate_limit_that_can_never_limit_is_refused(fake_lago: Any) -> None:
    """``"reset": 0`` opens a new window on every request: the rule would never answer 429; say so at once."""
    async with fake_lago.client(headers=AUTH) as client:
        response = await client.post("/_emulator/faults", json={"rate_limit": {"limit": 1, "reset": 0}})
        assert response.status_code == 422
        assert "reset" in response.json()["message"]
        assert (await client.get("/_emulator/faults")).json() == {"faults": []}
    with pytest.raises(FaultSpecError, match="reset"):
        fake_lago.inject_fault(rate_limit={"limit": 1, "reset": 0})


@pytest.mark.anyio
async def test_a_fault_body_that_is_not_json_is_refused_when_injected(fake_lago: Any) -> None:
    """``inject_fault(status=503, body=...)`` with something JSON cannot carry: a ``FaultSpecError`` naming
    ``body`` there, not a ``TypeError`` out of the emulator when a request hits the rule."""
    with pytest.raises(FaultSpecError, match="body"):
        fake_lago.inject_fault(status=503, body={"when": object()})
    assert fake_lago.faults.rules == []
    async with fake_lago.client(headers=AUTH) as client:
        assert (await client.get("/api/v1/plans")).status_code == 200


# --------------------------------------------------------------------------- isolation between tests


def test_faults_and_clock_left_set_do_not_leak_into_the_next_test(
    pytester: pytest.Pytester, other_plugins_off: Callable[..., list[str]]
) -> None:
    """A sync test and an async (anyio) one each leave a fault, a webhook target and a moved clock behind; the
    tests after them, in process and served, start from a clean emulator."""
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def anyio_backend():
            return "asyncio"
        """
    )
    pytester.makepyfile(
        """
        import datetime as dt
        import httpx
        import pytest

        FUTURE = dt.datetime(2031, 1, 1, tzinfo=dt.timezone.utc)

        def test_sync_leaves_things_set(fake_lago_server):
            with httpx.Client(base_url=fake_lago_server.url) as client:
                assert client.post("/_emulator/faults", json={"status": 503}).status_code == 201
                assert client.put("/_emulator/webhooks", json={"url": "http://127.0.0.1:9/h"}).status_code == 200
            fake_lago_server.clock = lambda: FUTURE

        @pytest.mark.anyio
        async def test_async_leaves_things_set(fake_lago, lago_client):
            fake_lago.inject_fault(drop=True)
            fake_lago.clock = lambda: FUTURE

        def test_served_starts_clean(fake_lago_server):
            with httpx.Client(base_url=fake_lago_server.url, headers={"Authorization": "Bearer test-api-key"}) as c:
                assert c.get("/_emulator/faults").json() == {"faults": []}
                assert c.get("/_emulator/webhooks").json()["webhooks"]["url"] is None
                assert c.get("/api/v1/plans").status_code == 200
            assert fake_lago_server.now() < FUTURE

        @pytest.mark.anyio
        async def test_in_process_starts_clean(fake_lago, lago_client):
            assert fake_lago.faults.rules == [] and fake_lago.now() < FUTURE
            assert (await lago_client.health())["message"] == "Success"
        """
    )
    result = pytester.runpytest_inprocess(*other_plugins_off(), "-W", "error", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
