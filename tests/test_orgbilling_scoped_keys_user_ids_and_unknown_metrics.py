"""OrgBilling: what a user of the seed's API met with a scoped API key, integer user ids and a metric's usage.

- ``check_lago_health`` with an API key Lago takes but scopes by resource (Lago's API key permissions: ``403
  read_action_not_allowed_for_customers``, as a key for the middleware's events and quota reads can be) said Lago
  "refuses this API key" and unhealthy: ``lago-org-billing health`` (a readiness probe) failed on a working
  deployment. The key is taken (an unknown one is Lago's 401): healthy, with a warning naming the permission.
- ``create_org_customer`` / ``subscribe_org_to_plan`` with the creating user's id as an integer or a UUID (a database
  key: as ``record_api_call`` and the middleware's events take it) were refused with "value of 'created_by_user_id'
  must be a non-blank string", a key the caller never wrote; the id is kept as its text now.
- ``get_current_usage(org_id, billable_metric_code)`` for a metric the org's plan has no charge on relayed Lago's
  404 as "Check the id (...), or create the resource first", naming neither the metric nor the plan.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from lago_org_billing import InvalidRequestError, LagoClient, LagoNotFoundError, OrgBilling
from lago_org_billing._billing import customer_metadata

pytestmark = pytest.mark.anyio


@pytest.fixture
async def billing(fake_lago: Any, lago_client: LagoClient) -> AsyncIterator[OrgBilling]:
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.001"}}
    fake_lago.add_plan("starter", amount_cents=1000, charges=[charge])
    async with OrgBilling(client=lago_client) as service:
        yield service


async def test_health_with_a_key_that_may_not_read_customers_is_healthy_with_a_warning(
    fake_lago: Any, billing: OrgBilling
) -> None:
    forbidden = {"status": 403, "error": "Forbidden", "code": "read_action_not_allowed_for_customers"}
    fake_lago.inject_fault(403, path="/api/v1/customers", body=forbidden)
    health = await billing.check_lago_health()
    assert health["healthy"] is True and health["error"] is None
    assert any("read_action_not_allowed_for_customers" in warning for warning in health["warnings"])


async def test_health_with_a_403_that_is_no_permission_of_the_key_stays_unhealthy(
    fake_lago: Any, billing: OrgBilling
) -> None:
    """A 403 that says nothing of the key's permissions (a gateway's, Lago's ``feature_unavailable``) stays a key
    refused: only Lago's ``<mode>_action_not_allowed_for_<resource>`` says it knows the key."""
    fake_lago.inject_fault(403, path="/api/v1/customers", body={"status": 403, "error": "Forbidden"})
    health = await billing.check_lago_health()
    assert health["healthy"] is False and "refuses this API key" in health["error"]


@pytest.mark.parametrize("user_id", [42, uuid.UUID("7d1c1b2e-4a8e-4f55-9d7c-0d6a3a3f1c11")])
async def test_the_creating_user_may_be_an_integer_or_a_uuid(billing: OrgBilling, user_id: int | uuid.UUID) -> None:
    customer = await billing.create_org_customer("org_1", "Acme", user_id=user_id)
    assert customer_metadata(customer)["created_by_user_id"] == str(user_id)
    setup = await billing.subscribe_org_to_plan("org_2", "starter", "Beta", user_id=user_id)
    assert customer_metadata(setup["customer"])["created_by_user_id"] == str(user_id)
    assert setup["subscription"]["plan_code"] == "starter"


async def test_a_creating_user_of_another_type_is_refused_by_its_name_before_any_write(
    fake_lago: Any, billing: OrgBilling
) -> None:
    before = len(fake_lago.write_requests)
    with pytest.raises(InvalidRequestError, match=r"^user_id must be"):
        await billing.create_org_customer("org_1", "Acme", user_id=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match=r"^user_id must be"):
        await billing.subscribe_org_to_plan("org_1", "starter", "Acme", user_id=True)
    assert len(fake_lago.write_requests) == before


async def test_current_usage_of_a_metric_the_plan_does_not_charge_says_so(fake_lago: Any, billing: OrgBilling) -> None:
    fake_lago.add_billable_metric("storage_gb", aggregation_type="max_agg", field_name="gb")
    await billing.subscribe_org_to_plan("org_1", "starter", "Acme")
    assert await billing.get_current_usage("org_1", billable_metric_code="api_call") is not None
    with pytest.raises(LagoNotFoundError) as info:
        await billing.get_current_usage("org_1", billable_metric_code="storage_gb")
    assert info.value.code == "charge_not_found" and info.value.status == 404
    message = str(info.value)
    assert "'storage_gb'" in message and "no charge" in message and "org_1" in message
    # an org without a subscription is still None, whatever the metric
    assert await billing.get_current_usage("org_2", billable_metric_code="storage_gb") is None
