"""The billing dashboard (``GET .../dashboard`` of ``billing_routes()``) against the Lago emulator: the
percentage a person reads next to a usage bar, the size of the page for an org with many users, what a dashboard
provider of the wrong shape gets, and limits too long to print."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from lago_org_billing import BillingSettings, ConfigurationError, LagoClient, OrgBilling
from lago_org_billing._routes import billing_routes
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "audit-dash-key"
PATH = "/organizations/org_acme/dashboard"
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


def seeded(*, grouped: bool = False) -> FakeLago:
    """An org on plan ``starter`` (one api_call charge, grouped by user when ``grouped``)."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call", name="API calls")
    properties: dict[str, Any] = {"amount": "0.01"}
    if grouped:
        properties["pricing_group_keys"] = ["user_id"]
    fake.add_plan(
        "starter",
        name="Starter",
        amount_cents=1000,
        charges=[{"billable_metric_code": "api_call", "properties": properties}],
    )
    fake.add_customer("org_acme")
    fake.add_subscription("org_acme", "starter")
    return fake


def calls(fake: FakeLago, count: int, users: int = 1) -> None:
    """``count`` api_call events of the org, spread over ``users`` users."""
    for index in range(count):
        event = {"transaction_id": f"t{index}", "external_subscription_id": "org_acme", "code": "api_call"}
        fake.store.create_event({"event": {**event, "properties": {"user_id": f"user_{index % users}"}}})


@asynccontextmanager
async def dashboard(fake: FakeLago, **routes: Any) -> AsyncIterator[httpx.AsyncClient]:
    """``billing_routes()`` over the emulator, every caller allowed, ``max_api_calls`` 200 on ``starter``."""
    settings = BillingSettings(
        api_url=fake.base_url, api_key=API_KEY, max_retries=0, plan_limits={"starter": {"max_api_calls": 200}}
    )
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=lambda request, org_id: True, **routes)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://app") as client:
            yield client


# ------------------------------------------------------------------------------------------- the percentage


async def test_the_percentage_shown_says_100_only_once_the_limit_is_reached() -> None:
    """199 of 200 calls: the gate still serves the org (one call left), the JSON says ``exceeded: false``, but the
    page printed ``(100%)`` next to the bar (99.5 rounded to nearest, half to even). 100% must mean the limit is
    reached, as the bar's colour and ``exceeded`` say; below it the percentage is rounded down."""
    used = 199
    fake = seeded()
    calls(fake, used)
    async with dashboard(fake) as client:
        data = (await client.get(PATH, headers={"Accept": "application/json"})).json()
        page = (await client.get(PATH, headers=BROWSER)).text
    limit = next(limit for limit in data["limits"] if limit["name"] == "max_api_calls")
    assert (limit["used"], limit["limit"]) == (used, 200)
    shown = re.search(r'<div class="limit" data-limit="max_api_calls">.*?<span class="pct">\((\d+)%\)</span>', page)
    assert shown is not None, page
    assert limit["exceeded"] is False and limit["ratio"] < 1
    assert shown.group(1) == "99", f"{used} of 200 calls (one left) shown as {shown.group(1)}%"


async def test_a_ratio_just_under_the_limit_is_not_rounded_to_one() -> None:
    """99,999 of 100,000 tokens: ``ratio`` was ``round(0.99999, 4) == 1.0`` beside ``exceeded: false`` (a client
    reading the ratio takes the org for blocked)."""
    fake = seeded()
    limits = {"max_tokens": {"limit": 100_000, "used": 99_999}}
    async with dashboard(fake, limits_provider=lambda org_id: limits) as client:
        data = (await client.get(PATH, headers={"Accept": "application/json"})).json()
    (limit,) = data["limits"]
    assert limit["exceeded"] is False
    assert limit["ratio"] < 1, limit


# --------------------------------------------------------------------------------------- many users, one page


async def test_the_page_of_an_org_with_thousands_of_users_is_bounded() -> None:
    """An org with 5,000 users got a page with a row per user (and a JSON of them all), rendered on the event loop
    for every request (shared reads share the Lago read, not the rendering): 50,000 users made a 10 MB page and ~1 s
    of the worker's event loop per view, the billed API of every org stalled meanwhile. The tables show the top users
    and say how many more there are."""
    fake = seeded(grouped=True)
    calls(fake, 5_000, users=5_000)
    async with dashboard(fake) as client:
        response = await client.get(PATH, headers=BROWSER)
    assert response.status_code == 200
    section = response.text.split('<section id="by-user">', 1)[1].split("</section>", 1)[0]
    rows = section.count("<tr data-key=")
    assert rows == 200, f"{rows} rows in the by-user table, {len(response.text):,} characters of page"
    assert "and 4,800 more" in section, section[-500:]
    async with dashboard(fake) as client:  # the JSON answer lists them all
        assert len((await client.get(PATH, headers={"Accept": "application/json"})).json()["by_user"]) == 5_000


# ---------------------------------------------------------------------------------- providers of the wrong shape


@pytest.mark.parametrize(
    ("option", "provider"),
    [
        # a mapping of users, not the documented list of rows: every row was skipped, the page said "from the local
        # usage ledger" over empty tables, and nothing was logged
        ("breakdown_provider", lambda org_id: {"by_user": {"zoe": {"events": 7, "units": {"api_call": 7}}}}),
        # pairs, not a mapping: AttributeError "'list' object has no attribute 'items'" (a bare 500)
        ("limits_provider", lambda org_id: [("max_api_calls", 300)]),
    ],
)
async def test_a_dashboard_provider_of_the_wrong_shape_is_a_configuration_error(option: str, provider: Any) -> None:
    fake = seeded()
    async with dashboard(fake, **{option: provider}) as client:
        with pytest.raises(ConfigurationError, match=option):
            await client.get(PATH, headers={"Accept": "application/json"})


# ----------------------------------------------------------------------------------- limits too long to print


@pytest.mark.parametrize("accept", ["application/json", "text/html"])
async def test_a_limit_past_4300_digits_does_not_break_the_dashboard(accept: str) -> None:
    """A limit of ``"1e5000"`` (a provider's "unlimited", or units Lago summed past it) was read as a 5,001-digit
    int that neither ``json.dumps`` nor the page can print (Python's int-to-str digit limit): a 500 for the org
    until the value changed. ``"1e400"`` (past a float) answers; this should too."""
    fake = seeded()
    limits = {"max_api_calls": "1e5000"}
    async with dashboard(fake, limits_provider=lambda org_id: limits) as client:
        response = await client.get(PATH, headers={"Accept": accept})
    assert response.status_code == 200
