"""Test helpers: :class:`FakeLago`, an in-process emulator of Lago's REST API.

``FakeLago`` speaks ``/api/v1`` closely enough for ``lago-python-client`` and this package's own
client, keeps everything in memory and exposes the state for assertions::

    from lago_org_billing.testing import FakeLago

    fake = FakeLago(api_key="test-api-key")
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url) as client:
        ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _lazy_exports

if TYPE_CHECKING:
    from ._emulator import FakeLago, RequestRecord, WebhookDispatcher
    from ._server import serve_in_thread
    from ._util import FakeLagoError

__all__ = ["FakeLago", "FakeLagoError", "RequestRecord", "WebhookDispatcher", "serve_in_thread"]

#: Imported at first use: the pytest plugin (``testing.pytest_plugin``) loads in every pytest run of a project with
#: this package installed, and imports nothing more until one of its fixtures is used.
_EXPORTS = {
    "FakeLago": "._emulator",
    "FakeLagoError": "._util",
    "RequestRecord": "._emulator",
    "WebhookDispatcher": "._emulator",
    "serve_in_thread": "._server",
}

if not TYPE_CHECKING:  # (type checkers see the names above: a misspelt one is their error, not Any)
    __getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, __all__)
