"""``OrgBilling.subscribe_org_to_plan`` for a new org reads the plan before it writes the org's customer: a plan Lago
lacks is refused with nothing written (the customer was created, then left with no subscription). An API key that may
not read plans still sets the org up (Lago's answer to the subscription decides, as before)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from lago_org_billing import BillingSettings, LagoClient, LagoNotFoundError, OrgBilling
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio


class PlansForbidden(httpx.AsyncBaseTransport):
    """The emulator, but ``GET /plans/...`` answered 403 as Lago does for a key without the plans permission."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(f"{request.method} {request.url.path}")
        if request.method == "GET" and request.url.path.startswith("/api/v1/plans/"):
            return httpx.Response(403, json={"status": 403, "error": "Forbidden", "code": "plans_read"})
        return await self.inner.handle_async_request(request)


def _lago() -> FakeLago:
    lago = FakeLago(api_key="k")
    lago.add_plan("starter", amount_cents=1000)
    return lago


async def test_a_plan_lago_lacks_is_refused_before_the_customer_is_written() -> None:
    """A typo in the plan code: Lago's ``plan_not_found``, and no customer left behind."""
    lago = _lago()
    settings = BillingSettings(api_url="http://lago.test", api_key="k")
    async with OrgBilling(client=LagoClient(settings, transport=lago.transport())) as billing:
        with pytest.raises(LagoNotFoundError) as info:
            await billing.subscribe_org_to_plan("org_a", "statrer", "Acme")
        assert info.value.code == "plan_not_found"
        assert await billing.get_customer("org_a") is None
        result = await billing.subscribe_org_to_plan("org_a", "starter", "Acme")
        assert result["subscription"]["plan_code"] == "starter"


async def test_a_key_that_may_not_read_plans_still_sets_an_org_up() -> None:
    """The plan read answered 403 is no refusal: the customer and subscription are made as before."""
    lago = _lago()
    edge = PlansForbidden(lago.transport())
    settings = BillingSettings(api_url="http://lago.test", api_key="k")
    async with OrgBilling(client=LagoClient(settings, transport=edge)) as billing:
        result: dict[str, Any] = await billing.subscribe_org_to_plan("org_a", "starter", "Acme")
    assert result["customer"]["external_id"] == "org_a"
    assert result["subscription"]["plan_code"] == "starter"
    assert "GET /api/v1/plans/starter" in edge.paths
