"""What the migration reads of Lago through the public client, and the emulator's routes for it.

* ``LagoClient.list_wallets``/``iter_wallets``, ``list_applied_coupons``/``iter_applied_coupons`` and
  ``list_credit_notes``/``iter_credit_notes``: pages (``Page``) and every item, filtered as Lago's API filters, each
  request valid against Lago's OpenAPI spec; the migration reads what users hold through them (not the client's
  private ``_iterate``);
* the page arguments of every list method (``page``, ``per_page``: strings, 0, negatives, bools, floats, a page size
  past the client's maximum) are refused with an ``InvalidRequestError`` naming the argument, before any request;
* the emulator: ``seed()`` takes ``wallets`` and ``applied_coupons``, and serves Lago's customer-scoped lists
  ``GET /customers/{external_customer_id}/wallets``, ``.../applied_coupons`` and ``.../credit_notes``
  (``404 customer_not_found`` for an unknown customer), answers valid against the spec.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from _openapi import assert_request_matches, assert_response_matches
from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._errors import InvalidRequestError
from lago_org_billing._migration import OrgMapping, run_migration
from lago_org_billing.testing import FakeLago, FakeLagoError

pytestmark = pytest.mark.anyio

API_KEY = "k"


class Recorder(httpx.AsyncBaseTransport):
    """Passes requests to the emulator and keeps each request."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        return await self.inner.handle_async_request(request)


@pytest.fixture
def fake() -> FakeLago:
    fake = FakeLago(api_key=API_KEY)
    fake.add_plan("starter", amount_cents=1_000)
    fake.add_customer("alice", name="Alice", currency="USD")
    fake.add_customer("bob", name="Bob", currency="USD")
    fake.add_subscription("alice", "starter", external_id="sub_alice")
    fake.add_subscription("bob", "starter", external_id="sub_bob")
    fake.add_wallet("alice", code="prepaid", credits_balance="25.0")
    fake.add_wallet("alice", code="old", balance_cents=700, status="terminated")
    fake.add_wallet("bob", code="bobs", credits_balance="3.0")
    fake.add_applied_coupon("alice", "startup", amount_cents=3_000, frequency="once", amount_cents_remaining=1_200)
    fake.add_applied_coupon("alice", "gone", amount_cents=100, status="terminated")
    fake.add_applied_coupon("bob", "launch", percentage_rate="10.0")
    invoice = fake.add_invoice("alice", total_amount_cents=4_200, currency="USD")
    fake.add_credit_note(invoice["lago_id"], credit_amount_cents=900)
    fake.add_credit_note(invoice["lago_id"], credit_amount_cents=100, credit_status="consumed", balance_amount_cents=0)
    return fake


@pytest.fixture
def recorder(fake: FakeLago) -> Recorder:
    return Recorder(fake.transport())


@pytest.fixture
async def client(fake: FakeLago, recorder: Recorder) -> AsyncIterator[LagoClient]:
    settings = BillingSettings(api_key=API_KEY, api_url=fake.base_url, retry_backoff=0.001)
    async with LagoClient(settings, transport=recorder) as client:
        yield client


# ------------------------------------------------------------------------------------- public list methods


async def test_wallets_coupons_and_credit_notes_are_listed_by_public_methods(
    client: LagoClient, recorder: Recorder
) -> None:
    """One page (a ``Page``) or every item, filtered as Lago filters; every request follows Lago's spec."""
    page = await client.list_wallets(external_customer_id="alice", per_page=1)
    assert len(page.items) == 1 and (page.current_page, page.next_page, page.total_count) == (1, 2, 2)
    second = await client.list_wallets(external_customer_id="alice", page=2, per_page=1)
    assert {page.items[0]["code"], second.items[0]["code"]} == {"prepaid", "old"}
    every = [w["code"] async for w in client.iter_wallets(external_customer_id="alice", per_page=1)]
    assert sorted(every) == ["old", "prepaid"]
    assert [w["code"] for w in (await client.list_wallets(external_customer_id="bob", currency="USD")).items] == [
        "bobs"
    ]

    coupons = await client.list_applied_coupons(external_customer_id="alice", status="active")
    assert [c["coupon_code"] for c in coupons.items] == ["startup"] and coupons.total_count == 1
    codes = await client.list_applied_coupons(coupon_code=["launch", "gone"])
    assert sorted(c["coupon_code"] for c in codes.items) == ["gone", "launch"]
    every = [c["coupon_code"] async for c in client.iter_applied_coupons(external_customer_id="alice", per_page=1)]
    assert sorted(every) == ["gone", "startup"]

    notes = await client.list_credit_notes(external_customer_id="alice", credit_status="available")
    assert [n["balance_amount_cents"] for n in notes.items] == [900]
    every = [n["credit_status"] async for n in client.iter_credit_notes(external_customer_id="alice", per_page=1)]
    assert sorted(every) == ["available", "consumed"]
    assert (await client.list_credit_notes(external_customer_id="bob")).items == []

    assert len(recorder.requests) == 13
    for request in recorder.requests:
        assert_request_matches(request)


async def test_list_wallets_needs_a_customer(client: LagoClient, recorder: Recorder) -> None:
    """Lago requires ``external_customer_id`` on ``GET /wallets``: none, or an empty one, is refused before any
    request (not sent for Lago's 404 customer_not_found)."""
    for value in (None, "", 5):
        with pytest.raises(InvalidRequestError, match="external_customer_id"):
            await client.list_wallets(external_customer_id=value)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="external_customer_id"):
            client.iter_wallets(external_customer_id=value)  # type: ignore[arg-type]
    assert recorder.requests == []


async def test_the_migration_reads_holdings_through_the_public_methods(
    client: LagoClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dry run reads wallets, applied coupons and credit notes through ``iter_wallets``,
    ``iter_applied_coupons`` and ``iter_credit_notes`` (filtered by the user), and still reports them."""
    called: list[tuple[str, dict[str, Any]]] = []
    for name in ("iter_wallets", "iter_applied_coupons", "iter_credit_notes"):
        original = getattr(LagoClient, name)

        def spy(self: LagoClient, *args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            called.append((_name, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(LagoClient, name, spy)
    org = OrgMapping(org_id="acme", org_name="Acme", email=None, users=("alice", "bob"))
    run = await run_migration(client, [org], mode="dry-run")
    [acme] = run.orgs
    kinds = sorted({(u.kind, u.user_id) for u in acme.unmoved})
    assert ("wallets", "alice") in kinds and ("coupons", "alice") in kinds and ("credit_notes", "alice") in kinds
    assert ("wallets", "bob") in kinds and ("coupons", "bob") in kinds
    assert {name for name, _ in called} == {"iter_wallets", "iter_applied_coupons", "iter_credit_notes"}
    assert {kwargs.get("external_customer_id") for _, kwargs in called} == {"alice", "bob"}


# -------------------------------------------------------------------------------------- page arguments

BAD_PAGES: list[tuple[Any, str]] = [("2", "integer"), (0, "1"), (-1, "1"), (True, "integer"), (1.0, "integer")]
BAD_SIZES: list[tuple[Any, str]] = [*BAD_PAGES, (10**6, "1000"), (None, "integer")]

PAGED: dict[str, Callable[[LagoClient, dict[str, Any]], Any]] = {
    "list_customers": lambda c, kw: c.list_customers(**kw),
    "list_subscriptions": lambda c, kw: c.list_subscriptions(**kw),
    "list_features": lambda c, kw: c.list_features(**kw),
    "list_invoices": lambda c, kw: c.list_invoices(**kw),
    "list_wallets": lambda c, kw: c.list_wallets(external_customer_id="alice", **kw),
    "list_applied_coupons": lambda c, kw: c.list_applied_coupons(**kw),
    "list_credit_notes": lambda c, kw: c.list_credit_notes(**kw),
}
ITERATED: dict[str, Callable[[LagoClient, dict[str, Any]], Any]] = {
    "iter_customers": lambda c, kw: c.iter_customers(**kw),
    "iter_subscriptions": lambda c, kw: c.iter_subscriptions(**kw),
    "iter_invoices": lambda c, kw: c.iter_invoices(**kw),
    "iter_wallets": lambda c, kw: c.iter_wallets(external_customer_id="alice", **kw),
    "iter_applied_coupons": lambda c, kw: c.iter_applied_coupons(**kw),
    "iter_credit_notes": lambda c, kw: c.iter_credit_notes(**kw),
}


@pytest.mark.parametrize("method", sorted(PAGED))
async def test_bad_page_arguments_of_list_methods_are_refused_before_any_request(
    client: LagoClient, recorder: Recorder, method: str
) -> None:
    """``page``/``per_page`` that Lago would misread (Ruby's ``to_i``: ``"2abc"`` is 2, ``-1`` the default page
    size, ``0`` a 500 retried as an outage, ``True`` the text ``true``) are refused, naming the argument."""
    call = PAGED[method]
    for name, cases in (("page", BAD_PAGES), ("per_page", BAD_SIZES)):
        for value, hint in cases:
            with pytest.raises(InvalidRequestError) as info:
                await call(client, {name: value})
            message = str(info.value)
            assert f"{name} " in message and hint in message, (name, value, message)
    assert recorder.requests == []
    page = await call(client, {"page": 1, "per_page": 1000})  # (the bounds themselves are taken)
    assert page.current_page in (0, 1)


@pytest.mark.parametrize("method", sorted(ITERATED))
async def test_bad_page_sizes_of_iterators_are_refused_when_called(
    client: LagoClient, recorder: Recorder, method: str
) -> None:
    """An iterator refuses a bad ``per_page`` as it is created, before any request."""
    for value, hint in BAD_SIZES:
        with pytest.raises(InvalidRequestError, match=f"per_page .*{hint}"):
            ITERATED[method](client, {"per_page": value})
    assert recorder.requests == []


# -------------------------------------------------------------------------------------------- emulator


async def test_seed_takes_wallets_and_applied_coupons() -> None:
    """``seed()`` loads wallets and applied coupons after the customers (as ``add_wallet``/``add_applied_coupon``),
    and says what is wrong with a bad one."""
    fake = FakeLago(api_key=API_KEY)
    fake.seed(
        {
            "customers": [{"external_id": "alice", "currency": "EUR"}],
            "wallets": [
                {"external_customer_id": "alice", "code": "prepaid", "currency": "EUR", "credits_balance": "5"}
            ],
            "applied_coupons": [
                {"external_customer_id": "alice", "coupon_code": "startup", "amount_cents": 500, "frequency": "once"}
            ],
        }
    )
    async with fake.client() as http:
        wallets = await http.get("/api/v1/wallets", params={"external_customer_id": "alice"})
        coupons = await http.get("/api/v1/applied_coupons", params={"external_customer_id": "alice"})
    [wallet] = wallets.json()["wallets"]
    assert (wallet["code"], wallet["balance_cents"], wallet["currency"]) == ("prepaid", 500, "EUR")
    [coupon] = coupons.json()["applied_coupons"]
    assert (coupon["coupon_code"], coupon["amount_cents_remaining"], coupon["amount_currency"]) == (
        "startup",
        500,
        "EUR",
    )
    with pytest.raises(FakeLagoError, match="external_customer_id"):
        FakeLago().seed({"wallets": [{"code": "w"}]})
    with pytest.raises(FakeLagoError, match="coupon_code"):
        FakeLago().seed({"applied_coupons": [{"external_customer_id": "a", "amount_cents": 1}]})
    with pytest.raises(FakeLagoError, match="must be a list"):
        FakeLago().seed({"wallets": {"code": "w"}})


async def test_the_emulator_serves_the_customer_scoped_lists(fake: FakeLago) -> None:
    """``GET /customers/{id}/wallets``, ``/applied_coupons`` and ``/credit_notes`` answer as the flat lists do for
    that customer (filters, pages), valid against the spec; an unknown customer is Lago's 404 customer_not_found."""
    async with fake.client() as http:
        wallets = await http.get("/api/v1/customers/alice/wallets", params={"per_page": 1})
        coupons = await http.get("/api/v1/customers/alice/applied_coupons", params={"status": "active"})
        notes = await http.get("/api/v1/customers/alice/credit_notes", params={"credit_status": "available"})
        bobs = await http.get("/api/v1/customers/bob/credit_notes")
        missing = [
            await http.get(f"/api/v1/customers/nobody/{name}")
            for name in ("wallets", "applied_coupons", "credit_notes")
        ]
    for response in (wallets, coupons, notes, bobs):
        assert response.status_code == 200, response.text
        assert_response_matches(response)
    assert len(wallets.json()["wallets"]) == 1 and wallets.json()["meta"]["total_count"] == 2
    assert [c["coupon_code"] for c in coupons.json()["applied_coupons"]] == ["startup"]
    assert [n["balance_amount_cents"] for n in notes.json()["credit_notes"]] == [900]
    assert bobs.json()["credit_notes"] == []
    for response in missing:
        assert (response.status_code, response.json()["code"]) == (404, "customer_not_found")
