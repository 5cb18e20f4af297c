"""Subscription dates read in the customer's time zone, partly duplicate batches, creators kept in
metadata and the customer-creation race: what Lago reads of a date as written, ISO date strings, DST days, text
Lago's database cannot store."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest

from lago_org_billing import InvalidRequestError, LagoClient, OrgBilling

pytestmark = pytest.mark.anyio

UTC = dt.timezone.utc


@pytest.fixture
async def billing(fake_lago: Any, lago_client: LagoClient) -> AsyncIterator[OrgBilling]:
    fake_lago.add_plan("starter", amount_cents=1000)
    async with OrgBilling(client=lago_client) as service:
        yield service


async def test_ending_at_tomorrow_as_a_date_is_accepted_for_a_customer_east_of_utc(
    fake_lago: Any, billing: OrgBilling
) -> None:
    """Lago checks ``ending_at.to_date > Time.current.to_date`` on the date *as written* (``DateTime.iso8601``). A
    Paris customer's ``ending_at=date(2026, 2, 21)`` sent as ``2026-02-20T23:00:00Z`` is written on the 20th, today
    for Lago: ``422 ending_at invalid_date`` for a fixed term ending tomorrow (and for any east-of-UTC zone, most of
    the day). Sent in the customer's offset it is written on the 21st, the same instant."""
    fake_lago.clock = lambda: dt.datetime(2026, 2, 20, 12, tzinfo=UTC)  # 13:00 in Paris
    await billing.create_org_customer("org_1", "Acme", timezone="Europe/Paris")
    subscription = await billing.create_subscription("org_1", "starter", ending_at=dt.date(2026, 2, 21))
    assert subscription["ending_at"] == "2026-02-20T23:00:00Z"  # 00:00 on the 21st in Paris


async def test_subscription_dates_as_written_keep_the_callers_day(fake_lago: Any, billing: OrgBilling) -> None:
    """A Tokyo customer starting on 1 March and ending on 2 March (dates): both are sent on their own day."""
    fake_lago.clock = lambda: dt.datetime(2026, 2, 20, 12, tzinfo=UTC)
    await billing.create_org_customer("org_1", "Acme", timezone="Asia/Tokyo")
    sent: list[Any] = []
    original = billing.client.create_subscription

    async def spy(**kwargs: Any) -> Any:
        sent.append(kwargs)
        return await original(**kwargs)

    billing.client.create_subscription = spy  # type: ignore[method-assign]
    subscription = await billing.create_subscription(
        "org_1", "starter", subscription_at=dt.date(2026, 3, 1), ending_at=dt.date(2026, 3, 2)
    )
    assert sent[0]["subscription_at"].startswith("2026-03-01T00:00:00")
    assert sent[0]["ending_at"].startswith("2026-03-02T00:00:00")
    assert subscription["subscription_at"] == "2026-02-28T15:00:00Z"
    assert subscription["ending_at"] == "2026-03-01T15:00:00Z"


@pytest.mark.parametrize(
    ("timezone", "start", "end"),
    [
        ("Asia/Tokyo", "2026-02-28T15:00:00Z", "2027-02-28T15:00:00Z"),
        ("America/New_York", "2026-03-01T05:00:00Z", "2027-03-01T05:00:00Z"),
    ],
)
async def test_an_iso_date_string_is_a_day_in_the_customers_time_zone_too(
    fake_lago: Any, billing: OrgBilling, timezone: str, start: str, end: str
) -> None:
    """``subscription_at="2026-03-01"`` (a date, written as ISO 8601, e.g. from a form or a config file) is the day
    ``date(2026, 3, 1)`` is: 00:00 in the customer's time zone. Passed on raw, Lago reads it as 00:00 UTC: a Tokyo
    subscription starting at 09:00 there (9 hours of usage outside it), a New York one on the evening of 28
    February (a one-day February period, its fee prorated, on an invoice of its own)."""
    fake_lago.clock = lambda: dt.datetime(2026, 2, 20, 12, tzinfo=UTC)
    await billing.create_org_customer("org_1", "Acme", timezone=timezone)
    subscription = await billing.create_subscription(
        "org_1", "starter", subscription_at="2026-03-01", ending_at="2027-03-01"
    )
    assert subscription["subscription_at"] == start
    assert subscription["ending_at"] == end


async def test_an_iso_datetime_string_is_still_sent_as_given(fake_lago: Any, billing: OrgBilling) -> None:
    """Only a bare date is a day: a string with a time is Lago's to read, sent unchanged (no customer read)."""
    fake_lago.clock = lambda: dt.datetime(2026, 2, 20, 12, tzinfo=UTC)
    await billing.create_org_customer("org_1", "Acme", timezone="Asia/Tokyo")
    subscription = await billing.create_subscription("org_1", "starter", subscription_at="2026-03-01T00:00:00Z")
    assert subscription["subscription_at"] == "2026-03-01T00:00:00Z"


@pytest.mark.parametrize(
    ("timezone", "day", "midnight"),
    [
        # 00:00 does not exist on these days (clocks jump from 00:00 to 01:00): the day starts at 01:00 local
        ("America/Santiago", dt.date(2026, 9, 6), "2026-09-06T04:00:00Z"),
        ("Atlantic/Azores", dt.date(2026, 3, 29), "2026-03-29T01:00:00Z"),  # (UTC-1 to UTC+0)
    ],
)
async def test_a_date_on_a_dst_day_without_midnight_starts_with_that_day(
    fake_lago: Any, billing: OrgBilling, timezone: str, day: dt.date, midnight: str
) -> None:
    fake_lago.clock = lambda: dt.datetime(2026, 2, 20, 12, tzinfo=UTC)
    await billing.create_org_customer("org_1", "Acme", timezone=timezone)
    subscription = await billing.create_subscription("org_1", "starter", subscription_at=day)
    assert subscription["subscription_at"] == midnight


@pytest.mark.parametrize("user_id", ["u\x00_1", "u_\ud800"])
async def test_a_creator_id_lago_cannot_store_is_refused_before_any_call(
    fake_lago: Any, billing: OrgBilling, user_id: str
) -> None:
    """The creating user's id is no longer checked as a URL id (emails are fine), but it is still text Lago must
    store: a NUL (Postgres text has none: Lago answers 500, retried as an outage, and ``POST /setup`` answers 5xx
    instead of naming the field) or a lone surrogate (no UTF-8: a UnicodeEncodeError from the JSON encoder) is an
    InvalidRequestError, before the customer is written."""
    with pytest.raises(InvalidRequestError, match="created_by_user_id"):
        await billing.subscribe_org_to_plan("org_1", "starter", "Acme", user_id=user_id)
    assert fake_lago.customers == []
    with pytest.raises(InvalidRequestError, match="created_by_user_id"):
        await billing.create_org_customer("org_2", "Acme", user_id=user_id)
    assert fake_lago.customers == []


@pytest.mark.parametrize("name", ["Ac\x00me", "Acme \ud83d"])
async def test_an_org_name_lago_cannot_store_is_refused_before_any_call(
    fake_lago: Any, billing: OrgBilling, name: str
) -> None:
    """The same for the org's name (``POST /setup``'s ``org_name``): an InvalidRequestError naming it, no call."""
    with pytest.raises(InvalidRequestError, match="org_name"):
        await billing.subscribe_org_to_plan("org_1", "starter", name)
    assert fake_lago.customers == []


async def test_an_email_lago_cannot_store_is_refused_before_any_call(fake_lago: Any, billing: OrgBilling) -> None:
    with pytest.raises(InvalidRequestError, match="email"):
        await billing.subscribe_org_to_plan("org_1", "starter", "Acme", "billing\x00@acme.test")
    assert fake_lago.customers == []


def test_jwt_claims_verified_with_a_freed_key_object_are_not_reused_for_another_key() -> None:
    """``key=`` given as a key object (``load_pem_public_key(...)``, as an app loading its issuers' keys per request
    or trying them in turn does): the claims cache id was the object's ``id()``, which Python gives to another object
    once the first is freed. A resolver built with another key that got that address then took the claims verified
    with the first key from the scope: a token the second key never signed resolved to its org (or, the other way
    round, a good token cached as refused stayed unresolved)."""
    import gc

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from lago_org_billing._identity import from_jwt_claim

    signer = ec.generate_private_key(ec.SECP256R1())
    other_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    token = jwt.encode({"org_id": "acme"}, signer, algorithm="ES256")
    scope: dict[str, Any] = {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}
    first_key = serialization.load_pem_public_key(
        signer.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    first = from_jwt_claim(key=first_key, algorithms=["ES256"])  # type: ignore[arg-type]
    assert first(scope) == "acme"
    address = id(first_key)
    del first, first_key
    gc.collect()
    held = []
    other_key = serialization.load_pem_public_key(other_pem)
    for _ in range(10_000):  # (CPython hands the freed address out again within a few objects)
        if id(other_key) == address:
            break
        held.append(other_key)
        other_key = serialization.load_pem_public_key(other_pem)
    second = from_jwt_claim(key=other_key, algorithms=["ES256"])  # type: ignore[arg-type]
    assert second(scope) is None  # signed by the first key, not by this one
