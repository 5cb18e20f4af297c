"""The billing dashboard (``GET .../dashboard`` of ``billing_routes()``): amounts of a currency of four decimals
(the Chilean unidad de fomento, ``CLF``, which Lago takes) shown in its units, and the page of an org with no active
subscription."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._dashboard import render_html, subunits_per_unit
from lago_org_billing._migration import _amount
from lago_org_billing._routes import billing_routes
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "dash-clf-key"
#: An org id with markup (the page escapes it).
ORG = 'org_<b>&"gone'
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@asynccontextmanager
async def dashboard(fake: FakeLago) -> AsyncIterator[httpx.AsyncClient]:
    """``billing_routes()`` over the emulator, every caller allowed."""
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=lambda request, org_id: True)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://app") as client:
            yield client


# ---------------------------------------------------------------------------------------- four decimals: CLF


def test_a_unidad_de_fomento_has_ten_thousand_subunits() -> None:
    """Lago counts ``amount_cents`` in the Money gem's ``subunit_to_unit``, 10,000 for CLF since Money 6.6 (ISO 4217:
    4 decimals; ``Money.new(243, "CLF").to_f == 0.0243``): the dashboard divided them by 100."""
    assert subunits_per_unit("CLF") == 10_000
    data: dict[str, Any] = {
        "org_id": "org_cl",
        "plan": {"code": "uf", "name": "UF"},
        "amount": {"amount_cents": 15_000, "currency": "CLF"},  # Lago's answer for 1.5 UF
        "metrics": [{"code": "api_call", "name": "API calls", "units": 3, "events": 3, "amount_cents": 15_000}],
        "by_user": [{"user_id": "ana", "events": 3, "amount_cents": 15_000, "units": {"api_call": 3}}],
    }
    page = render_html(data)
    assert '<dd id="amount" data-cents="15000">1.5000 CLF</dd>' in page, page
    assert "150.00 CLF" not in page


async def test_the_dashboard_of_an_org_billed_in_clf_shows_its_amounts_in_uf() -> None:
    """An org billed 0.5 UF a call, 3 calls: Lago's usage is 15,000 subunits (1.5 UF); the page said 1.50 CLF (the
    emulator billed in hundredths, as the dashboard read them: a test suite agreeing with itself)."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call", name="API calls")
    fake.add_plan(
        "uf",
        name="UF plan",
        amount_cents=10_000,
        amount_currency="CLF",
        charges=[{"billable_metric_code": "api_call", "properties": {"amount": "0.5"}}],
    )
    fake.add_customer("org_cl", currency="CLF")
    fake.add_subscription("org_cl", "uf")
    for index in range(3):
        event = {"transaction_id": f"t{index}", "external_subscription_id": "org_cl", "code": "api_call"}
        fake.store.create_event({"event": event})
    async with dashboard(fake) as client:
        data = (await client.get("/organizations/org_cl/dashboard", headers={"Accept": "application/json"})).json()
        page = (await client.get("/organizations/org_cl/dashboard", headers=BROWSER)).text
    assert data["amount"] == {"amount_cents": 15_000, "total_amount_cents": 15_000, "currency": "CLF"}, data
    assert '<dd id="amount" data-cents="15000">1.5000 CLF</dd>' in page, page


# ------------------------------------------------------------------------------------ no active subscription


@pytest.mark.parametrize("ended", [False, True])
async def test_the_page_of_an_org_without_a_subscription_says_so_and_nothing_else(ended: bool) -> None:
    """An org never subscribed, or whose subscription was terminated: the 404 page was the dashboard over empty data,
    "Plan ()", "No limits are configured for this plan" and, per breakdown, "group the charge by user_id in Lago
    (pricing_group_keys) or give a ledger": an operator's remedy shown to the org's admin, about a plan it has not."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call", name="API calls")
    fake.add_plan("starter", charges=[{"billable_metric_code": "api_call", "properties": {"amount": "0.01"}}])
    fake.add_customer(ORG)
    if ended:
        fake.add_subscription(ORG, "starter")
    async with dashboard(fake) as client:
        if ended:
            ending = await client.delete(f"/organizations/{quote(ORG)}/subscription")
            assert ending.status_code == 200, ending.text
        response = await client.get(f"/organizations/{quote(ORG)}/dashboard", headers=BROWSER)
        as_json = await client.get(f"/organizations/{quote(ORG)}/dashboard", headers={"Accept": "application/json"})
    assert response.status_code == 404 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert '<h1>Billing for <span id="org-id">org_&lt;b&gt;&amp;&quot;gone</span></h1>' in page, page
    assert '<dd id="status">no active subscription</dd>' in page, page
    for misleading in ("()", "No limits are configured", "pricing_group_keys", "No breakdown", "Usage so far"):
        assert misleading not in page, (misleading, page)
    assert as_json.status_code == 404 and as_json.json()["code"] == "subscription_not_found"


@pytest.mark.parametrize(
    ("cents", "currency", "shown"),
    [(62, "MRO", "12.4 MRO"), (62, "MGA", "12.4 MGA"), (15000, "CLF", "1.5000 CLF"), (2500, "USD", "25.00 USD")],
)
def test_the_migration_report_shows_amounts_with_the_currency_s_decimals(cents: int, currency: str, shown: str) -> None:
    # Five khoums make an ouguiya: 62 of Lago's subunits are 12.4 MRO (printed "12 MRO" with the decimals counted
    # from the digits of 5)
    assert _amount(cents, currency) == shown
