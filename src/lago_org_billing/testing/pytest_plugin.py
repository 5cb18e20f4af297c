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
* ``lago_settings`` - :class:`~lago_org_billing.BillingSettings` pointing at the in-process fake.
* ``lago_client`` - an async :class:`~lago_org_billing.LagoClient` wired to ``fake_lago`` without any
  network (``fake_lago.transport()``); use it in ``anyio`` (asyncio or trio) or ``pytest-asyncio`` tests.

All are function-scoped: each test starts from an empty emulator, without faults or webhook settings. Move the
emulator's clock with ``fake_lago.clock = lambda: <aware datetime>``; what Lago's clock jobs would then do (a
subscription reaching its ``ending_at``...) shows in ``fake_lago.subscriptions`` and the webhooks sent next.

Nothing heavy is imported until a fixture is used: this module loads in every pytest run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .._client import LagoClient
    from .._settings import BillingSettings

__all__ = ["fake_lago", "fake_lago_server", "lago_client", "lago_settings"]

API_KEY = "test-api-key"


@pytest.fixture
def fake_lago() -> Any:
    """A fresh in-process Lago emulator (``FakeLago``) with API key ``test-api-key``."""
    from . import FakeLago
    from ._server import install_controls

    return install_controls(FakeLago(api_key=API_KEY))


@pytest.fixture
def fake_lago_server(fake_lago: Any) -> Iterator[Any]:
    """``fake_lago`` served over HTTP on 127.0.0.1; its base URL is ``fake_lago_server.url``."""
    from ._server import serve_in_thread

    with serve_in_thread(fake_lago) as url:
        fake_lago.url = url
        try:
            yield fake_lago
        finally:
            fake_lago.url = None


@pytest.fixture
def lago_settings(fake_lago: Any) -> BillingSettings:
    """``BillingSettings`` pointing at the in-process ``fake_lago``."""
    from .._settings import BillingSettings

    return BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key)


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
