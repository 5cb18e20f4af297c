"""Lago's 500 answer says what failed only in ``errors[].message`` (``{"status": 500, "errors": [{"message": ...,
"backtrace": [...]}], "data": {}}``, lago-api.md section 1): the error raised carries that message (it said only
"500 Internal Server Error"), on one line and shortened, without the backtrace."""

from __future__ import annotations

import pytest
from pytest_httpx import HTTPXMock

from lago_org_billing import BillingSettings, LagoClient, LagoUnavailableError
from lago_org_billing.testing import FakeLago
from test_client_faults import settings

pytestmark = pytest.mark.anyio


async def test_the_message_of_lagos_500_is_in_the_error(httpx_mock: HTTPXMock) -> None:
    body = {"status": 500, "errors": [{"message": "PG::NumericValueOutOfRange", "backtrace": ["app/x.rb:1"]}]}
    httpx_mock.add_response(status_code=500, json={**body, "data": {}})
    async with LagoClient(settings(max_retries=0)) as lago:
        with pytest.raises(LagoUnavailableError) as info:
            await lago.get_customer("org_1")
    text = str(info.value)
    assert "500 Internal Server Error: PG::NumericValueOutOfRange" in text, text
    assert "app/x.rb" not in text and "retry later" in text, text


async def test_several_long_or_multiline_messages_are_one_short_line(httpx_mock: HTTPXMock) -> None:
    messages = [{"message": "first\nfailure  here"}, {"message": "  "}, {"message": 7}, {"message": "x" * 1000}]
    httpx_mock.add_response(status_code=500, json={"status": 500, "errors": messages, "data": {}})
    async with LagoClient(settings(max_retries=0)) as lago:
        with pytest.raises(LagoUnavailableError) as info:
            await lago.get_customer("org_1")
    text = str(info.value)
    assert ": first failure here; xxx" in text and "\n" not in text.split(". Lago failed")[0], text
    assert len(text) < 600 and "...." in text, text


@pytest.mark.parametrize(
    "body", [{"status": 500, "errors": "boom"}, {"status": 500, "errors": [None, ["x"]]}, {"status": 500}, None]
)
async def test_other_500_bodies_say_what_they_did(httpx_mock: HTTPXMock, body: object) -> None:
    if body is None:
        httpx_mock.add_response(status_code=500, text="<html>proxy error</html>")
    else:
        httpx_mock.add_response(status_code=500, json=body)
    async with LagoClient(settings(max_retries=0)) as lago:
        with pytest.raises(LagoUnavailableError) as info:
            await lago.get_customer("org_1")
    assert "with 500 Internal Server Error. Lago failed or is down: retry later." in str(info.value), str(info.value)


async def test_the_emulators_500_reaches_the_caller_with_its_message() -> None:
    fake = FakeLago(api_key="k")
    fake.inject_fault(500, count=1)  # type: ignore[attr-defined]
    config = BillingSettings(api_url=fake.base_url, api_key="k", max_retries=0)
    async with LagoClient(config, transport=fake.transport()) as lago:
        with pytest.raises(LagoUnavailableError, match=r"500 Internal Server Error: Internal Server Error \(injected"):
            await lago.get_customer("org_1")
