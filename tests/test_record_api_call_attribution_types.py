"""``OrgBilling.record_api_call`` (and its ``_nowait`` twin) take the call's attribution as the middleware writes it:
``endpoint`` and ``model`` as text, ``user_id`` as text (an integer or a UUID, as user ids often are, written as its
text). Anything else is refused before Lago is asked, saying which argument and what it takes."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from lago_org_billing import BillingSettings, EventPipeline, InvalidRequestError, LagoClient, OrgBilling
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "test-key"


def _settings(fake: FakeLago) -> BillingSettings:
    return BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("endpoint", 123),
        ("endpoint", ["/v1/chat"]),
        ("endpoint", b"/v1/chat"),
        ("model", 3.5),
        ("model", {"name": "gpt-4o"}),
        ("user_id", True),
        ("user_id", 4.0),
        ("user_id", ["u_1"]),
        ("user_id", b"u_1"),
    ],
)
async def test_attribution_that_is_not_text_is_refused_naming_the_argument(argument: str, value: Any) -> None:
    """A list, a number or bytes as the endpoint, model or user was stored as such in the event's properties: a
    property Lago's filters and groupings (text) never match, so the call was billed under no endpoint/model/user."""
    fake = FakeLago(api_key=API_KEY)
    async with LagoClient(_settings(fake), transport=fake.transport()) as lago:
        billing = OrgBilling(client=lago, pipeline=EventPipeline(lago))
        with pytest.raises(InvalidRequestError, match=rf"^{argument} must be text"):
            await billing.record_api_call("org_1", None, **{argument: value})
        with pytest.raises(InvalidRequestError, match=rf"^{argument} must be text"):
            billing.record_api_call_nowait("org_1", None, **{argument: value})
    assert fake.events == []


@pytest.mark.parametrize(
    ("given", "written"),
    [(42, "42"), (uuid.UUID(int=7), "00000000-0000-0000-0000-000000000007"), ("ada", "ada")],
)
async def test_an_integer_or_uuid_user_id_is_written_as_its_text(given: int | uuid.UUID | str, written: str) -> None:
    """A UUID user id raised "Event properties must be JSON-serialisable"; an integer one was sent as a JSON number
    where the middleware's events carry text. Both are written as the text the middleware writes."""
    fake = FakeLago(api_key=API_KEY)
    async with LagoClient(_settings(fake), transport=fake.transport()) as lago:
        billing = OrgBilling(client=lago)
        await billing.record_api_call("org_1", "tx_1", "/v1/chat", given, tokens=3, model="gpt-4o")
    [event] = fake.events
    assert event["properties"]["user_id"] == written
    assert event["properties"]["endpoint"] == "/v1/chat"
    assert event["properties"]["model"] == "gpt-4o"
