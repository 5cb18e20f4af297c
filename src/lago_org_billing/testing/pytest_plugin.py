"""pytest fixtures for testing code that talks to Lago, backed by the in-process Lago emulator.

Installed with the package (entry point ``pytest11: lago_org_billing``), so the fixtures are available
in any project with lago-org-billing installed:

* ``fake_lago`` - a fresh :class:`~lago_org_billing.testing.FakeLago` per test (API key
  ``"test-api-key"``), with fault injection (``fake_lago.inject_fault(...)``) and webhook delivery
  (``fake_lago.webhook_dispatcher``) attached.
* ``fake_lago_server`` - the **same** ``fake_lago``, also served over real HTTP by uvicorn on
  ``127.0.0.1`` and a free port, for sync clients and subprocesses. It is the FakeLago itself, with
  ``fake_lago_server.url`` set to ``http://127.0.0.1:<port>`` (the Lago base URL, without ``/api/v1``).
  Needs ``pip install 'lago-org-billing[testing]'``.
* ``lago_settings`` - :class:`~lago_org_billing.BillingSettings` pointing at the in-process fake, or at
  ``fake_lago_server.url`` in a test that uses ``fake_lago_server`` (an app made from them then reaches it over
  HTTP, and accepts its JWT webhooks, whose issuer is that URL).
* ``lago_client`` - an async :class:`~lago_org_billing.LagoClient` wired to ``fake_lago`` without any
  network (``fake_lago.transport()``); use it in ``anyio`` (asyncio or trio) or ``pytest-asyncio`` tests.

All are function-scoped: each test starts from an empty emulator, without faults or webhook settings (for one
emulator shared by a session, make your own ``FakeLago()`` in a session fixture, served over HTTP if you need it with
``with serve_in_thread(fake) as url:`` (from ``lago_org_billing.testing``), and ``reset()`` it between tests).
Move the
emulator's clock with ``fake_lago.clock = lambda: <aware datetime>``; what Lago's clock jobs would then do (a
subscription reaching its ``ending_at``...) shows in ``fake_lago.subscriptions`` and the webhooks sent next.

Nothing heavy is imported until a fixture is used: this module loads in every pytest run. A conftest may name it too
(``pytest_plugins = ["lago_org_billing.testing.pytest_plugin"]``, for runs with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``):
where the entry point has loaded it already, that is a no-op.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pluggy import Result

    from .._client import LagoClient
    from .._settings import BillingSettings

__all__ = ["fake_lago", "fake_lago_server", "lago_client", "lago_settings"]

API_KEY = "test-api-key"
#: The ``pytest11`` entry point's name (``-p no:lago_org_billing``) and this module's: pytest registers a plugin under
#: the name it was loaded by, and refuses the same module under the other one ("Plugin already registered under a
#: different name"), which stopped a run whose conftest names this module while the entry point loads it.
_NAMES = ("lago_org_billing", __name__)
_FIXTURES = frozenset(__all__)


def pytest_plugin_registered(plugin: object, plugin_name: str, manager: pytest.PytestPluginManager) -> None:
    """Once registered under one of its names, this plugin is not loaded again under the other one."""
    if plugin is not sys.modules[__name__]:
        return
    for name in _NAMES:
        if name != plugin_name and manager.get_plugin(name) is None and not manager.is_blocked(name):
            manager.set_blocked(name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Result[pytest.TestReport], None]:
    """A session (or module...) fixture of the user's asking for one of these function-scoped fixtures: pytest's
    ScopeMismatch says what is wrong; add what to do instead (in the report itself, so that xdist shows it too)."""
    outcome = yield
    if call.excinfo is None or call.when != "setup":  # (the common case: nothing more per test)
        return
    text = str(call.excinfo.value)
    if "ScopeMismatch" not in text or not any(f"function scoped fixture {name} " in text for name in _FIXTURES):
        return
    outcome.get_result().sections.append(("lago-org-billing", _SCOPE_HINT))


_SCOPE_HINT = (
    "fake_lago, fake_lago_server, lago_settings and lago_client are function-scoped: each test gets a fresh emulator. "
    "Ask for them from function-scoped fixtures, or keep one emulator for the session: `fake = FakeLago()` (from "
    "lago_org_billing.testing) in a session-scoped fixture of yours (served over HTTP with "
    "`with serve_in_thread(fake) as url:` from the same module), and `fake.reset()` in a function-scoped one (it "
    "forgets the data and faults, keeps the webhook endpoint and the clock)."
)


@pytest.fixture
def fake_lago() -> Any:
    """A fresh in-process Lago emulator (``FakeLago``) with API key ``test-api-key``."""
    from . import FakeLago
    from ._server import install_controls

    return install_controls(FakeLago(api_key=API_KEY))


@pytest.fixture
def fake_lago_server(fake_lago: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``fake_lago`` served over HTTP on 127.0.0.1; its base URL is ``fake_lago_server.url``.

    While it is served, ``127.0.0.1`` is added to ``NO_PROXY``/``no_proxy``: behind a proxy (``HTTPS_PROXY`` of a
    corporate network or CI) the clients of the test (httpx, requests, the package's own) sent its requests to the
    proxy, which cannot reach this machine's loopback."""
    from ._server import serve_in_thread

    # Both names get the user's exceptions: urllib, httpx and requests read ``no_proxy`` before ``NO_PROXY``, and a
    # ``no_proxy=127.0.0.1`` of ours beside a CI's ``NO_PROXY=localhost,.corp`` hid those for the test. Set with the
    # test's own ``monkeypatch``: with one of ours, a ``monkeypatch.setenv("NO_PROXY", ...)`` of the test (its
    # fixture set up first, so undone last) put our value back after the test, for every later test of the run.
    found = {name: os.environ.get(name) for name in ("NO_PROXY", "no_proxy")}
    with serve_in_thread(fake_lago) as url:
        for name, other in (("NO_PROXY", "no_proxy"), ("no_proxy", "NO_PROXY")):
            value = found[name] or found[other]
            monkeypatch.setenv(name, f"{value},127.0.0.1" if value else "127.0.0.1")
        fake_lago.url = url
        try:
            yield fake_lago
        finally:
            fake_lago.url = None


@pytest.fixture
def lago_settings(request: pytest.FixtureRequest, fake_lago: Any) -> BillingSettings:
    """``BillingSettings`` pointing at the in-process ``fake_lago``, or at the served one in a test that uses
    ``fake_lago_server`` (``http://fake-lago`` is no host: an app delivering there over HTTP would lose its events,
    and refuse the served emulator's JWT webhooks, which name ``fake_lago_server.url`` as issuer)."""
    from .._settings import BillingSettings

    api_url = fake_lago.base_url
    if "fake_lago_server" in request.fixturenames:
        api_url = request.getfixturevalue("fake_lago_server").url
    return BillingSettings(api_url=api_url, api_key=fake_lago.api_key)


@pytest.fixture
def lago_client(lago_settings: BillingSettings, fake_lago: Any) -> Iterator[LagoClient]:
    """An async ``LagoClient`` talking to ``fake_lago`` in process (no network), for anyio and pytest-asyncio tests."""
    from .._client import LagoClient

    # A plain fixture: an async one belongs to one runner (anyio's makes pytest-asyncio tests run again as [trio],
    # pytest-asyncio's strict mode refuses anyio's). The in-process transport holds no connection, so the client
    # needs no event loop to be made or closed.
    client = LagoClient(lago_settings, transport=fake_lago.transport())
    try:
        yield client
    finally:
        _close_without_loop(client)


def _close_without_loop(client: LagoClient) -> None:
    closing = client.aclose()
    try:
        closing.send(None)
    except StopIteration:
        return
    closing.close()  # it waited for I/O: there is none in process, and no loop here to wait with
