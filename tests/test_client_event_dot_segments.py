"""``LagoClient.get_event`` with a transaction id that is a dot segment.

``quote`` keeps dots, and httpx normalizes ``/events/.`` to ``/events`` and ``/events/..`` to ``/api/v1``: a caller's
transaction id chose which Lago path was read (every tenant's event list). Such ids are refused before any request.
"""

from __future__ import annotations

import pytest

from lago_org_billing import BillingSettings, InvalidRequestError, LagoClient, LagoNotFoundError
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("transaction_id", [".", ".."])
async def test_a_dot_segment_transaction_id_is_refused_before_any_request(transaction_id: str) -> None:
    fake = FakeLago(api_key="k")
    async with LagoClient(
        BillingSettings(api_key="k", api_url="http://lago.test"), transport=fake.transport()
    ) as client:
        with pytest.raises(InvalidRequestError, match="cannot be read back"):
            await client.get_event(transaction_id)
    assert fake.requests == []


async def test_transaction_ids_with_dots_are_still_read() -> None:
    fake = FakeLago(api_key="k")
    fake.add_customer("acme")
    async with LagoClient(
        BillingSettings(api_key="k", api_url="http://lago.test"), transport=fake.transport()
    ) as client:
        with pytest.raises(LagoNotFoundError):
            await client.get_event("tx.1")
    assert [(request.method, request.path, request.status) for request in fake.requests] == [
        ("GET", "/api/v1/events/tx.1", 404)
    ]
