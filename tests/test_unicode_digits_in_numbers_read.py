"""Numbers read from text take ASCII digits only. ``str.isdigit()`` is true of ``"²"`` (and of other characters
``int()`` refuses), which a Latin-1 header byte or a setting can hold: a ``Content-Length: ²`` made the webhook
receiver and billing_routes() answer 500 (a ``ValueError``), a ``LAGO_QUOTA_STATUS=²`` raised a ``ValueError``
instead of a ``ConfigurationError``. The emulator reads ``per_page`` as Ruby does (``/^\\d/`` and ``to_i``: ASCII
digits): ``per_page=²`` gave a 500 where Lago answers its default page of 25."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from lago_org_billing import BillingSettings, ConfigurationError, LagoWebhooks
from lago_org_billing._client import _page_number
from lago_org_billing._quota import QuotaConfig
from lago_org_billing._routes import _capped_body
from lago_org_billing._webhooks import sign_hmac
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

KEY = "3f0e8a8e-1111-2222-3333-444455556666"
NOT_ASCII_DIGITS = ["\u00b2", "\u00b9", "\u0663"]  # superscript two and one, Arabic-Indic three


def _request(body: bytes, headers: list[tuple[bytes, bytes]]) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/wh", "headers": headers, "query_string": b""}
    messages: list[dict[str, Any]] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return Request(scope, receive)


@pytest.mark.parametrize("length", NOT_ASCII_DIGITS)
async def test_a_webhook_with_a_content_length_of_no_ascii_digit_is_answered(length: str) -> None:
    receiver = LagoWebhooks(BillingSettings(api_url="http://lago.test", api_key="k", webhook_hmac_key=KEY))
    body = json.dumps({"webhook_type": "invoice.created", "object_type": "invoice", "invoice": {}}).encode()
    headers = [
        (b"x-lago-signature", sign_hmac(body, KEY).encode()),
        (b"x-lago-signature-algorithm", b"hmac"),
        (b"x-lago-unique-key", str(uuid.uuid4()).encode()),
        (b"content-length", length.encode("utf-8")),
    ]
    response = await receiver.handle(_request(body, headers))  # (raised ValueError: a 500)
    assert response.status_code == 200, response.body


@pytest.mark.parametrize("length", NOT_ASCII_DIGITS)
async def test_a_billing_route_body_with_a_content_length_of_no_ascii_digit_is_read(length: str) -> None:
    request = _request(b'{"units": 1}', [(b"content-length", length.encode("utf-8"))])
    assert await _capped_body(request, 1_000) == b'{"units": 1}'  # (raised ValueError: a 500)


@pytest.mark.parametrize(
    "variable", ["LAGO_QUOTA_STATUS", "LAGO_QUOTA_NO_SUBSCRIPTION_STATUS", "LAGO_QUOTA_REFRESH_CONCURRENCY"]
)
@pytest.mark.parametrize("value", NOT_ASCII_DIGITS)
def test_a_quota_setting_of_no_ascii_digit_is_a_configuration_error(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        QuotaConfig.from_env({variable: value})
    assert info.value.variable == variable and value in str(info.value), str(info.value)


@pytest.mark.parametrize("value", NOT_ASCII_DIGITS)
def test_a_page_count_of_no_ascii_digit_is_kept_as_it_came(value: str) -> None:
    assert _page_number(value) == value  # (int("²") raised; "٣" became 3)
    assert _page_number(" 12 ") == 12


@pytest.mark.parametrize("per_page", [*NOT_ASCII_DIGITS, "\u00a07"])
async def test_the_emulator_reads_per_page_as_ruby_does(per_page: str) -> None:
    fake = FakeLago(api_key="k")
    for number in range(30):
        fake.add_customer(f"c{number}")
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url) as client:
        answer = await client.get(
            "/api/v1/customers", params={"per_page": per_page}, headers={"Authorization": "Bearer k"}
        )
    assert answer.status_code == 200, answer.text  # (a 500: "Perhaps you called .per(0)?")
    assert len(answer.json()["customers"]) == 25 and answer.json()["meta"]["total_pages"] == 2
