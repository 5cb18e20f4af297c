"""Audit of the Lago emulator (``lago_org_billing.testing``) against how Lago's Rails server reads requests.

* Rails parses a request body as JSON only when its ``Content-Type`` says JSON (``ActionDispatch::Request#POST``:
  ``parse_formatted_parameters`` yields to Rack's form parsing when ``content_mime_type`` is nil or not JSON). A JSON
  body sent without ``Content-Type: application/json`` reaches Lago's controller without its root key, and
  ``params.require(:event)`` answers ``400 BadRequest: param is missing...``: nothing is stored. The emulator parses
  every body as JSON whatever its type, so a client that forgets the header passes its tests and loses its usage
  events in production.
* Rails normalizes the path before routing (``RouteSet#call``: ``Journey::Router::Utils.normalize_path`` squeezes
  repeated ``/`` and drops a trailing one), so ``POST /api/v1/events/`` and ``GET /api/v1//customers/x`` are served
  as without the extra slash. The emulator (Starlette's ``redirect_slashes``) answers a bodiless ``307`` for the
  first, which httpx does not follow (nothing stored), and ``404 resource_not_found`` for the second.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"

EVENT = {"event": {"transaction_id": "tx_1", "external_subscription_id": "acme", "code": "api_call"}}


@pytest.fixture
def fake() -> FakeLago:
    """An emulator with a metric, a plan and a subscribed customer ``acme``."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call")
    fake.add_plan("starter")
    fake.add_subscription("acme", "starter")
    return fake


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to the emulator in process."""
    async with fake.client() as client:
        yield client


# ------------------------------------------------------------------------ bodies Rails does not read as JSON (400)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-content-type"),  # requests.post(url, data=json.dumps(...)), httpx content=...
        pytest.param({"Content-Type": "text/plain"}, id="text-plain"),  # aiohttp data=<str>
        pytest.param({"Content-Type": "application/x-www-form-urlencoded"}, id="form"),  # curl -d
    ],
)
async def test_a_json_body_without_a_json_content_type_is_refused_as_lago_refuses_it(
    fake: FakeLago, client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    """Lago reads the body as form data (or not at all): no ``event`` parameter, a 400, no event stored."""
    response = await client.post("/api/v1/events", content=json.dumps(EVENT).encode(), headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["status"] == 400
    assert response.json()["error"].startswith("BadRequest: ")
    assert fake.events == []


async def test_a_subscription_created_without_a_json_content_type_is_refused(
    fake: FakeLago, client: httpx.AsyncClient
) -> None:
    """Same for any write: ``POST /subscriptions`` without the header creates nothing in Lago."""
    body = {"subscription": {"external_customer_id": "new_org", "plan_code": "starter", "external_id": "new_org"}}
    response = await client.post("/api/v1/subscriptions", content=json.dumps(body).encode())
    assert response.status_code == 400, response.text
    assert [s["external_id"] for s in fake.subscriptions] == ["acme"]


async def test_a_json_content_type_with_a_charset_is_still_read(fake: FakeLago, client: httpx.AsyncClient) -> None:
    """(The fix must keep ``application/json; charset=utf-8``, which Rails maps to JSON.)"""
    response = await client.post(
        "/api/v1/events",
        content=json.dumps(EVENT).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200, response.text
    assert len(fake.events) == 1


# ------------------------------------------------------------------------ paths Rails normalizes before routing


async def test_an_event_posted_with_a_trailing_slash_is_ingested_as_lago_ingests_it(
    fake: FakeLago, client: httpx.AsyncClient
) -> None:
    """``POST /api/v1/events/`` is ``POST /api/v1/events`` for Rails: 200 and the event stored, not a 307."""
    response = await client.post("/api/v1/events/", json=EVENT)
    assert response.status_code == 200, (response.status_code, response.headers.get("location"), response.text)
    assert [e["transaction_id"] for e in fake.events] == ["tx_1"]


async def test_a_read_with_a_trailing_slash_is_answered_as_without(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/customers/acme/")
    assert response.status_code == 200, (response.status_code, response.headers.get("location"))
    assert response.json()["customer"]["external_id"] == "acme"


async def test_a_doubled_slash_in_the_path_is_squeezed_as_rails_squeezes_it(client: httpx.AsyncClient) -> None:
    """A base URL ending in ``/`` joined with ``/customers/...`` gives ``/api/v1//customers/...``: Lago serves it."""
    response = await client.get("/api/v1//customers/acme")
    assert response.status_code == 200, response.text
    assert response.json()["customer"]["external_id"] == "acme"
    response = await client.post("/api/v1//events", json=EVENT)
    assert response.status_code == 200, response.text
