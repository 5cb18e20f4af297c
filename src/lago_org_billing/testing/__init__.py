"""Test helpers: :class:`FakeLago`, an in-process emulator of Lago's REST API.

``FakeLago`` speaks ``/api/v1`` closely enough for ``lago-python-client`` and this package's own
client, keeps everything in memory and exposes the state for assertions::

    from lago_org_billing.testing import FakeLago

    fake = FakeLago(api_key="test-api-key")
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url) as client:
        ...
"""

from __future__ import annotations

from ._emulator import FakeLago, RequestRecord, WebhookDispatcher
from ._util import FakeLagoError

__all__ = ["FakeLago", "FakeLagoError", "RequestRecord", "WebhookDispatcher"]
