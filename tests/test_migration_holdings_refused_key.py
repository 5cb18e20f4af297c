"""A 401 while the migration reads what a user holds (wallets, coupons, invoices, credit notes) is the API key
refused: the run stops as on any other 401, not a warning that the key "may not read" that list (a 403's)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._migration import MigrationOptions, OrgMapping, run_migration
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "k"
ACME = OrgMapping(org_id="acme", org_name="Acme", email=None, users=("alice",))


@pytest.fixture
def fake() -> FakeLago:
    fake = FakeLago(api_key=API_KEY)
    fake.add_plan("pro", amount_cents=5_000)
    fake.add_customer("alice", name="Alice")
    fake.add_subscription("alice", "pro", external_id="sub_alice")
    return fake


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[LagoClient]:
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=fake.transport()) as client:
        yield client


@pytest.mark.parametrize("path", ["/api/v1/invoices", "/api/v1/credit_notes", "/api/v1/wallets"])
async def test_a_401_reading_holdings_is_not_taken_for_a_403(fake: FakeLago, client: LagoClient, path: str) -> None:
    """The 401 was reported as "Lago refused GET /invoices (403): this API key may not read them" and, for a list
    only reported or accepted, the org went on as planned."""
    fake.inject_fault(status=401, path=path, count=1)
    run = await run_migration(client, [ACME], mode="dry-run", options=MigrationOptions(accept_unmoved="all"))
    texts = [*run.orgs[0].warnings, *run.orgs[0].errors]
    assert not any("(403" in text for text in texts), texts
    assert run.aborted is not None and "401" in str(run.aborted) and "LAGO_API_KEY" in str(run.aborted)
    assert run.orgs[0].status == "failed"
