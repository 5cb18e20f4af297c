"""The emulator takes the time zones and currencies Lago takes, and refuses the others with Lago's 422.

It took any IANA time zone (about 600: ``America/Toronto``, ``US/Pacific``...) and any three capital letters as a
currency (``ABC``), where Lago takes 138 zones (lago-api's ``TimezoneValidator``: UTC and the zones of Rails'
``ActiveSupport::TimeZone::MAPPING``) and its ISO 4217 list: a test suite passed that production would fail
(``422 {"timezone": ["invalid_timezone"]}``). The lists are checked against Lago's OpenAPI spec (test data)."""

from __future__ import annotations

import functools
import zoneinfo
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from lago_org_billing._dashboard import _DECIMALS, subunits_per_unit
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._accepted import CURRENCIES, TIMEZONES

pytestmark = pytest.mark.anyio

SPEC_PATH = Path(__file__).parent / "data" / "lago-openapi.yaml"


@functools.lru_cache(maxsize=1)
def _schemas() -> dict[str, Any]:
    with open(SPEC_PATH, encoding="utf-8") as file:
        return yaml.safe_load(file)["components"]["schemas"]  # type: ignore[no-any-return]


def _enum(*names: str) -> set[str]:
    return {value for name in names for value in _schemas()[name]["enum"] if value is not None}


def test_the_zones_are_the_specs_with_rails_name_for_its_gmt_plus_12() -> None:
    assert TIMEZONES == (_enum("Timezone", "TimezoneOrNull") - {"GMT+12"}) | {"Etc/GMT+12"}
    # every one a zone the emulator can bill in (both spellings of the renamed ones: Europe/Kyiv and Europe/Kiev)
    missing = sorted(name for name in TIMEZONES if name not in zoneinfo.available_timezones() and name != "UTC")
    assert missing == []


def test_the_currencies_are_the_specs() -> None:
    assert CURRENCIES == _enum("Currency", "CurrencyOrNull")
    # the dashboard shows each in its own decimals (the Money gem's subunits: MRO's ouguiya has 5 khoums)
    assert all(subunits_per_unit(code) in _DECIMALS for code in CURRENCIES)
    assert subunits_per_unit("MRO") == 5 and subunits_per_unit("JPY") == 1 and subunits_per_unit("USD") == 100


async def _post(fake: FakeLago, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url) as client:
        return await client.post(path, json=body, headers={"Authorization": "Bearer k"})


@pytest.mark.parametrize("zone", ["America/Toronto", "US/Pacific", "Etc/GMT+5", "Asia/Ho_Chi_Minh", "GMT+12", ["UTC"]])
async def test_a_customer_zone_lago_does_not_take_is_refused(zone: object) -> None:
    answer = await _post(
        FakeLago(api_key="k"), "/api/v1/customers", {"customer": {"external_id": "acme", "timezone": zone}}
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["error_details"] == {"timezone": ["invalid_timezone"]}


@pytest.mark.parametrize("zone", ["UTC", "Europe/Kyiv", "Europe/Kiev", "Etc/GMT+12", "Pacific/Chatham", None])
async def test_a_customer_zone_lago_takes_is_kept(zone: str | None) -> None:
    answer = await _post(
        FakeLago(api_key="k"), "/api/v1/customers", {"customer": {"external_id": "acme", "timezone": zone}}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["customer"]["timezone"] == zone


@pytest.mark.parametrize("code", ["ABC", "QQQ", "KWD", "usd"])
async def test_a_currency_lago_does_not_take_is_refused(code: str) -> None:
    fake = FakeLago(api_key="k")
    answer = await _post(fake, "/api/v1/customers", {"customer": {"external_id": "acme", "currency": code}})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error_details"] == {"currency": ["value_is_invalid"]}
    plan = {"code": "p", "name": "p", "interval": "monthly", "amount_cents": 100, "amount_currency": code}
    answer = await _post(fake, "/api/v1/plans", {"plan": plan})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error_details"] == {"amount_currency": ["value_is_invalid"]}


@pytest.mark.parametrize("code", ["USD", "GHS", "CLF", "MRO"])
async def test_a_currency_lago_takes_is_kept(code: str) -> None:
    fake = FakeLago(api_key="k")
    answer = await _post(fake, "/api/v1/customers", {"customer": {"external_id": "acme", "currency": code}})
    assert answer.status_code == 200 and answer.json()["customer"]["currency"] == code, answer.text
    plan = {"code": "p", "name": "p", "interval": "monthly", "amount_cents": 100, "amount_currency": code}
    answer = await _post(fake, "/api/v1/plans", {"plan": plan})
    assert answer.status_code == 200 and answer.json()["plan"]["amount_currency"] == code, answer.text
