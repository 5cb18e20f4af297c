"""``FakeLago.add_plan(entitlements=...)`` given a list or a string (a plan's entitlements come back from Lago as a
list), and ``FakeLago.usage(group=...)`` given a string or a list, raised a bare ``ValueError``/``TypeError`` from
``dict()``; every other wrong argument of the helpers is a ``FakeLagoError`` (a ``LagoIntegrationError``), as Lago's
answer to the same request would be. Found by an audit of what users' test suites rely on."""

from __future__ import annotations

import pytest

from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._util import FakeLagoError


@pytest.mark.parametrize("entitlements", [["api_quota"], "api_quota", 3])
def test_plan_entitlements_that_are_no_mapping_are_refused_as_lago_would(entitlements: object) -> None:
    fake = FakeLago(api_key="k")
    with pytest.raises(FakeLagoError, match="400"):
        fake.add_plan("p", entitlements=entitlements)  # type: ignore[arg-type]
    assert fake.store.plans == {}


@pytest.mark.parametrize("group", ["user_id", [1], [("user_id", "u1")]])
def test_a_usage_group_that_is_no_mapping_is_said(group: object) -> None:
    fake = FakeLago(api_key="k")
    fake.add_plan("p")
    fake.add_subscription("org_1", "p")
    with pytest.raises(FakeLagoError, match="group must be a mapping"):
        fake.usage("org_1", "org_1", group=group)
    assert fake.usage("org_1", "org_1", group={"user_id": "u1"})["customer_usage"]["total_amount_cents"] == 0
