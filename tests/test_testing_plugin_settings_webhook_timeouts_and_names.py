"""``lago_org_billing.testing`` as a user's own test suite uses it (the pytest plugin, faults, webhooks, serving).

* ``lago_settings`` in a test that also uses ``fake_lago_server`` points at the served emulator: an app built from
  those settings delivers its events there and accepts the emulator's JWT webhooks (it pointed at the in-process
  ``http://fake-lago``, which no socket reaches: the events were lost and every webhook refused 401, wrong issuer);
* webhooks delivered in process (``configure(app=...)``) to a handler that hangs give up at the dispatcher's
  per-attempt timeout and are retried, as Lago does (30 s, ``LAGO_WEBHOOK_TIMEOUT_SECONDS``), instead of holding the
  test for ever; the timeout is set with ``configure(timeout=...)`` or ``PUT /_emulator/webhooks``;
* a conftest naming the plugin module (``pytest_plugins = ["lago_org_billing.testing.pytest_plugin"]``, the way to
  list it under ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``) works where the entry point loads it too (the run used to stop
  at once: "Plugin already registered under a different name");
* a session-scoped user fixture asking for a function-scoped emulator fixture: pytest's ScopeMismatch comes with
  what to do instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from lago_org_billing import BillingSettings, InvalidRequestError, LagoWebhooks, OrgBillingMiddleware
from lago_org_billing.testing import FakeLago

pytest_plugins = ["pytester"]

AUTH = {"Authorization": "Bearer test-api-key"}


# --------------------------------------------------------------------------- lago_settings with the served emulator


def _create_app(settings: BillingSettings, fake: Any) -> Starlette:
    async def hello(request: Any) -> JSONResponse:
        return JSONResponse({"hello": "world"})

    app = Starlette(routes=[Route("/hello", hello)])
    webhooks = LagoWebhooks(settings, public_key=fake.rsa_public_key_pem, organization_id=fake.organization_id)
    app.add_route("/webhooks/lago", webhooks, methods=["POST"])
    app.add_middleware(OrgBillingMiddleware, settings=settings)
    return app


def test_lago_settings_point_at_the_served_emulator(fake_lago_server: Any, lago_settings: BillingSettings) -> None:
    """A user's app made from ``lago_settings`` in a ``fake_lago_server`` test: its event reaches the served
    emulator and the emulator's JWT webhooks (issuer: the served URL) are accepted."""
    assert lago_settings.api_url == fake_lago_server.url
    settings = dataclasses.replace(lago_settings, org_header="X-Org-Id")
    fake_lago_server.add_plan("starter")
    app = _create_app(settings, fake_lago_server)
    fake_lago_server.webhook_dispatcher.configure(app=app)
    with TestClient(app) as client:
        fake_lago_server.add_subscription("org_1", "starter")
        [delivery] = fake_lago_server.webhook_dispatcher.wait_delivered(1)
        assert (delivery.webhook_type, delivery.history) == ("subscription.started", [200])
        assert client.get("/hello", headers={"X-Org-Id": "org_1"}).status_code == 200
    [event] = fake_lago_server.events
    assert event["properties"]["org_id"] == "org_1"


@pytest.mark.anyio
async def test_lago_settings_stay_in_process_without_the_server(fake_lago: Any, lago_settings: BillingSettings) -> None:
    assert lago_settings.api_url == fake_lago.base_url


# --------------------------------------------------------------------------- webhooks to a slow handler


def _hanging_app(calls: list[str]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await anyio.Event().wait()  # never answers

    return app


@pytest.mark.anyio
async def test_in_process_webhooks_to_a_hanging_handler_time_out_and_retry(fake_lago: Any) -> None:
    """Lago gives each attempt 30 s (``LAGO_WEBHOOK_TIMEOUT_SECONDS``) and tries 3 times: so does the in-process
    delivery, which used to wait for ever (a plain ``httpx.ASGITransport`` ignores timeouts)."""
    calls: list[str] = []
    dispatcher = fake_lago.webhook_dispatcher
    dispatcher.configure(app=_hanging_app(calls), signature="hmac", timeout=0.05)
    fake_lago.add_plan("p")
    fake_lago.add_subscription("org_1", "p")
    with anyio.fail_after(30):
        deliveries = await dispatcher.deliver_pending()
    assert [d.webhook_type for d in deliveries] == ["plan.created", "subscription.started"]
    assert len(calls) == 6
    for delivery in deliveries:
        assert delivery.state == "failed" and delivery.attempts == 3
        assert all(str(entry).startswith("ReadTimeout") for entry in delivery.history)


@pytest.mark.anyio
async def test_webhook_timeout_over_http_and_refused_values(fake_lago: Any) -> None:
    async with fake_lago.client() as client:
        response = await client.put("/_emulator/webhooks", json={"url": "http://127.0.0.1:9/h", "timeout": 2.5})
        assert response.status_code == 200 and response.json()["webhooks"]["timeout"] == 2.5
        for bad in (0, -1, "5", True):
            response = await client.put("/_emulator/webhooks", json={"timeout": bad})
            assert response.status_code == 422 and "timeout" in response.json()["message"], bad
        assert (await client.get("/_emulator/webhooks")).json()["webhooks"]["timeout"] == 2.5
    for bad_value in (0, math.inf, math.nan, -0.5):
        with pytest.raises(InvalidRequestError, match="timeout"):
            fake_lago.webhook_dispatcher.configure(timeout=bad_value)
    assert fake_lago.webhook_dispatcher.timeout == 2.5


def test_served_webhooks_to_a_hanging_in_process_handler_time_out() -> None:
    """Served, the background delivery gives up at the timeout too: ``wait_delivered`` sees the failure."""
    from lago_org_billing.testing._server import serve_in_thread

    fake = FakeLago()
    calls: list[str] = []
    with serve_in_thread(fake):
        fake.webhook_dispatcher.configure(app=_hanging_app(calls), signature="hmac", timeout=0.05, attempts=1)
        fake.add_plan("p")
        fake.add_subscription("org_1", "p")
        deliveries = fake.webhook_dispatcher.wait_delivered(2, timeout=20)
    assert [d.state for d in deliveries] == ["failed", "failed"] and len(calls) == 2


# --------------------------------------------------------------------------- naming the plugin in a conftest


def test_a_conftest_naming_the_plugin_module_works_beside_the_entry_point(
    pytester: pytest.Pytester, other_plugins_off: Callable[..., list[str]]
) -> None:
    pytester.makeconftest('pytest_plugins = ["lago_org_billing.testing.pytest_plugin"]\n')
    pytester.makepyfile(
        """
        def test_it(fake_lago, lago_settings):
            assert lago_settings.api_url == fake_lago.base_url
        """
    )
    off = other_plugins_off()
    result = pytester.runpytest_inprocess(*off, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result = pytester.runpytest_inprocess(
        *off, "-p", "no:cacheprovider", "-p", "lago_org_billing.testing.pytest_plugin"
    )
    result.assert_outcomes(passed=1)


def test_the_plugin_can_still_be_disabled_by_its_entry_point_name(
    pytester: pytest.Pytester, other_plugins_off: Callable[..., list[str]]
) -> None:
    pytester.makepyfile(
        """
        def test_it(fake_lago):
            pass
        """
    )
    result = pytester.runpytest_inprocess(*other_plugins_off(), "-p", "no:cacheprovider", "-p", "no:lago_org_billing")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'fake_lago' not found*"])


# --------------------------------------------------------------------------- scopes


def test_a_session_fixture_on_the_emulator_is_told_what_to_do(
    pytester: pytest.Pytester, other_plugins_off: Callable[..., list[str]]
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(scope="session")
        def seeded(fake_lago):
            return fake_lago

        def test_it(seeded):
            pass
        """
    )
    result = pytester.runpytest_inprocess(*other_plugins_off(), "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ScopeMismatch*fake_lago*", "*FakeLago()*reset()*"])
