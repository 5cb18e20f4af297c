"""The Lago emulator (FakeLago) at the scale users run it, and the fidelity of what the package's client reads.

Scale: a migration reads and writes 20,000 user customers one by one, a load test sends a million events over
thousands of subscriptions. Each request must cost work bounded by what it is about (its customer, its subscription,
its page), not by the whole store: the store's lists are swapped for lists counting every element read, and a request
may read a handful of them, whatever the number of customers, subscriptions, events and invoices. No timing: the work
is counted. The behaviours the indexes must keep (ids with dots, deleted customers, terminated subscriptions, an
event's transaction id on two subscriptions, a replaced event, pagination order, a store whose events a test forgot)
are checked through the HTTP API.

Fidelity: the answers the package's client reads (customers, subscriptions, current usage, the 422 of an event batch,
the invoices list's pagination meta) against Lago's OpenAPI spec.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest

from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=timezone.utc)
T_NOW = int(NOW.timestamp())
API = "/api/v1"
HOLDINGS = ("customers", "subscriptions", "events", "invoices", "wallets", "applied_coupons", "credit_notes")


class Counted(list[Any]):
    """A list counting the elements read from it (iteration, reversed iteration, indexing, slicing, ``in``)."""

    reads = 0

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            self.reads += 1
            yield item

    def __reversed__(self) -> Iterator[Any]:
        for item in super().__reversed__():
            self.reads += 1
            yield item

    def __getitem__(self, index: Any) -> Any:
        found = super().__getitem__(index)
        self.reads += len(found) if isinstance(index, slice) else 1
        return found

    def __contains__(self, item: object) -> bool:
        self.reads += len(self)
        return super().__contains__(item)


def counting(fake: FakeLago) -> dict[str, Counted]:
    """The store's lists, made counting ones (once)."""
    lists = {name: getattr(fake.store, name) for name in HOLDINGS}
    for name, records in lists.items():
        if not isinstance(records, Counted):
            lists[name] = Counted(records)
            setattr(fake.store, name, lists[name])
    return lists


def reads(lists: dict[str, Counted]) -> dict[str, int]:
    return {name: counted.reads for name, counted in lists.items() if counted.reads}


def reset(lists: dict[str, Counted]) -> None:
    for counted in lists.values():
        counted.reads = 0


def event(tid: str, sub: str, *, ts: int = T_NOW, code: str = "api_call", **properties: Any) -> dict[str, Any]:
    return {
        "transaction_id": tid,
        "external_subscription_id": sub,
        "code": code,
        "timestamp": ts,
        "properties": properties,
    }


def populated(users: int) -> FakeLago:
    """``users`` user customers (ids with dots), each with an active subscription, an event, an invoice, a wallet,
    a coupon and a credit note; every third one also with a terminated subscription."""
    fake = FakeLago(api_key="k", clock=lambda: NOW)
    counting(fake)  # (before anything is stored: the indexes follow these lists from the start)
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="tokens")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.001"}}
    fake.add_plan("starter", amount_cents=1000, charges=[charge])
    fake.add_plan("pro", amount_cents=5000, charges=[charge])
    for u in range(users):
        user = f"user_{u:05d}"
        fake.add_customer(user, name=user, currency="USD")
        if u % 3 == 0:
            fake.add_subscription(user, "starter", external_id=f"old.{user}")
            fake.store.terminate_subscription(f"old.{user}", {"on_termination_invoice": "skip"})
        fake.add_subscription(user, "starter", external_id=f"sub.{user}")
        invoice = fake.add_invoice(user, fees_amount_cents=100)
        fake.add_wallet(user, credits_balance="1.0")
        fake.add_applied_coupon(user, "welcome", amount_cents=10, amount_currency="USD")
        fake.add_credit_note(invoice["lago_id"], credit_amount_cents=10)
    for start in range(0, users, 100):
        batch = [event(f"t.{u}", f"sub.user_{u:05d}", tokens=u) for u in range(start, min(start + 100, users))]
        fake.store.create_events({"events": batch})
    return fake


@pytest.fixture(scope="module")
def big() -> FakeLago:
    """``populated(300)``, each index used once (an index is made at its first use, its one scan of the list)."""
    fake = populated(300)
    store, user, sub = fake.store, "user_00001", "sub.user_00001"
    store.get_event("t.1")
    store.list_events({"external_subscription_id": sub})
    store.list_subscriptions({"external_customer_id": user}, ["active"])
    store.list_subscriptions({}, ["active"], user)
    for lister in (store.list_invoices, store.list_applied_coupons):
        lister({"external_customer_id": user}, {})
    for reader in (store.list_wallets, store.list_credit_notes):
        reader({"external_customer_id": user})
    return fake


@pytest.fixture
async def client(big: FakeLago) -> Any:
    async with httpx.AsyncClient(
        transport=big.transport(), base_url=big.base_url, headers={"Authorization": "Bearer k"}
    ) as c:
        yield c


# Work per request --------------------------------------------------------------------------------

USER = "user_00150"
SUB = f"sub.{USER}"
ENDED = "user_00151"  # (whose subscription a test terminates)

READS: list[tuple[str, str, dict[str, Any], Any]] = [
    ("GET", f"/customers/{USER}", {}, None),
    ("GET", f"/subscriptions/{SUB}", {}, None),
    ("GET", f"/subscriptions/old.{USER}", {"status": "terminated"}, None),
    ("GET", f"/customers/{USER}/current_usage", {"external_subscription_id": SUB}, None),
    ("GET", f"/customers/{USER}/past_usage", {"external_subscription_id": SUB}, None),
    ("GET", "/events/t.150", {}, None),
    ("GET", "/events", {"external_subscription_id": SUB}, None),
    ("GET", "/subscriptions", {"external_customer_id": USER, "status[]": ["active", "terminated"]}, None),
    ("GET", f"/customers/{USER}/subscriptions", {}, None),
    ("GET", "/invoices", {"external_customer_id": USER}, None),
    ("GET", f"/customers/{USER}/invoices", {}, None),
    ("GET", "/wallets", {"external_customer_id": USER}, None),
    ("GET", "/applied_coupons", {"external_customer_id": USER}, None),
    ("GET", "/credit_notes", {"external_customer_id": USER}, None),
    ("GET", "/customers", {"external_id": USER}, None),
    ("GET", "/plans/starter", {}, None),
    ("POST", "/customers", {}, {"customer": {"external_id": USER, "currency": "USD", "name": "renamed"}}),
    ("POST", "/events", {}, {"event": event("single.1", SUB, tokens=1)}),
    ("POST", "/events/batch", {}, {"events": [event(f"batch.{n}", SUB, tokens=1) for n in range(3)]}),
]


@pytest.mark.parametrize(("method", "path", "params", "body"), READS, ids=[f"{m} {p}" for m, p, _, _ in READS])
async def test_a_request_reads_a_bounded_part_of_a_large_store(
    big: FakeLago, client: httpx.AsyncClient, method: str, path: str, params: dict[str, Any], body: Any
) -> None:
    """300 customers, 400 subscriptions, 300 events, invoices, wallets, coupons, credit notes: reading or writing one
    customer's, subscription's or event's data reads a handful of the store's records, not all of them (before:
    each looked its customer, its subscription, an event by transaction id, a customer's invoices or holdings up
    by scanning every one: 20,000 customers made a migration quadratic)."""
    lists = counting(big)
    reset(lists)
    response = await client.request(method, API + path, params=params, json=body)
    assert response.status_code < 300, response.text
    assert sum(reads(lists).values()) <= 12, reads(lists)


async def test_creating_and_ending_subscriptions_reads_a_bounded_part_of_the_store(big: FakeLago) -> None:
    """A migration's writes: a new customer's subscription, an upgrade, a termination (with its invoice) cost a
    bounded number of reads, not one per subscription or invoice of the organization."""
    lists = counting(big)
    if True:
        async with httpx.AsyncClient(
            transport=big.transport(), base_url=big.base_url, headers={"Authorization": "Bearer k"}
        ) as client:
            org_sub = {"external_customer_id": "org_1", "external_id": "org.sub.1"}
            steps: list[tuple[str, str, dict[str, Any], Any]] = [
                ("POST", "/subscriptions", {}, {"subscription": {**org_sub, "plan_code": "starter"}}),
                ("POST", "/subscriptions", {}, {"subscription": {**org_sub, "plan_code": "pro"}}),
                ("PUT", "/subscriptions/org.sub.1", {}, {"subscription": {"name": "Org 1"}}),
                ("DELETE", "/subscriptions/org.sub.1", {}, None),
                # a user of its own: the module's store is shared, and USER's subscription ended here was a 404 to the
                # reads above when this test ran first (another order, pytest-randomly's)
                ("DELETE", f"/subscriptions/sub.{ENDED}", {}, None),
                ("GET", f"/customers/{ENDED}", {}, None),
            ]
            for method, path, params, body in steps:
                reset(lists)
                response = await client.request(method, API + path, params=params, json=body)
                assert response.status_code < 300, (path, response.text)
                assert sum(reads(lists).values()) <= 20, (method, path, reads(lists))


@pytest.mark.parametrize(
    ("path", "serializer", "params"),
    [
        ("/customers", "_serialize_customer", {}),
        ("/subscriptions", "_serialize_sub", {"status[]": ["active", "terminated"]}),
        ("/invoices", "_serialize_invoice", {}),
        ("/credit_notes", "_serialize_credit_note", {}),
    ],
)
async def test_a_page_serializes_its_own_records_only(
    big: FakeLago, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, path: str, serializer: str,
    params: dict[str, Any],
) -> None:  # fmt: skip
    """Paging through 20,000 customers 100 at a time serialized all 20,000 for each page (quadratic): a page now
    serializes its records alone (an invoice or credit note embeds its customer: one per record of the page)."""
    calls: list[Any] = []
    original = getattr(big.store, serializer)

    def counted(record: Any, **kwargs: Any) -> Any:
        calls.append(record)
        return original(record, **kwargs)

    monkeypatch.setattr(big.store, serializer, counted)
    body = (await client.get(API + path, params={**params, "page": 2, "per_page": 7})).json()
    assert body["meta"]["current_page"] == 2 and body["meta"]["total_count"] >= 300
    assert len(calls) == 7


def test_seeding_subscriptions_looks_at_each_once_not_at_all_of_them_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each new subscription made the next request re-examine every subscription for a due transition (the clock
    jobs' candidates): seeding 20,000 was quadratic. Now the subscriptions examined are the new and the changed."""
    fake = FakeLago(api_key="k", clock=lambda: NOW)
    fake.add_plan("starter", amount_cents=1000)
    examined: list[str] = []
    original = fake.store._may_transition

    def counted(sub: dict[str, Any]) -> bool:
        examined.append(sub["external_id"])
        return original(sub)

    monkeypatch.setattr(fake.store, "_may_transition", counted)
    for n in range(200):  # (one in 20 with an ending_at: a candidate for good)
        ending = {"ending_at": "2026-06-01T00:00:00Z"} if n % 20 == 0 else {}
        fake.add_subscription(f"c_{n}", "starter", external_id=f"s.{n}", **ending)
    assert len(examined) <= 10 * 200  # (before: 20,100, every subscription again after each new one)


# What the indexes keep ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def small(event_store: str = "postgres") -> tuple[FakeLago, Clock]:
    clock = Clock()
    fake = FakeLago(api_key="k", clock=clock, event_store=event_store)
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="tokens")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "1"}}
    fake.add_plan("starter", amount_cents=1000, charges=[charge])
    fake.add_plan("pro", amount_cents=5000, charges=[charge])
    return fake, clock


def api(fake: FakeLago) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url, headers={"Authorization": "Bearer k"})


async def test_a_deleted_customer_and_its_successor_keep_their_answers() -> None:
    """A customer deleted and made again under the same external id: lookups find the new one; the invoices and
    credit notes listed by external id are both's (as before); its subscriptions by ``external_customer_id`` too,
    the nested list the live customer's only."""
    fake, _ = small()
    fake.add_subscription("acme", "starter", external_id="acme.main")
    first = fake.add_invoice("acme", fees_amount_cents=100)
    fake.add_credit_note(first["lago_id"], credit_amount_cents=10)
    async with api(fake) as client:
        old_id = (await client.get(f"{API}/customers/acme")).json()["customer"]["lago_id"]
        assert (await client.delete(f"{API}/customers/acme")).status_code == 200
        assert (await client.get(f"{API}/customers/acme")).status_code == 404
        assert (await client.get(f"{API}/customers/acme/invoices")).status_code == 404
        fake.add_subscription("acme", "pro", external_id="acme.main")
        second = fake.add_invoice("acme", fees_amount_cents=200)
        new = (await client.get(f"{API}/customers/acme")).json()["customer"]
        assert new["lago_id"] != old_id
        listed = (await client.get(f"{API}/invoices", params={"external_customer_id": "acme"})).json()["invoices"]
        assert {i["lago_id"] for i in listed} >= {first["lago_id"], second["lago_id"]}
        notes = (await client.get(f"{API}/credit_notes", params={"external_customer_id": "acme"})).json()
        assert [n["lago_invoice_id"] for n in notes["credit_notes"]] == [first["lago_id"]]
        params: dict[str, Any] = {"external_customer_id": "acme", "status[]": ["active", "terminated"]}
        subs = (await client.get(f"{API}/subscriptions", params=params)).json()["subscriptions"]
        assert sorted((s["lago_customer_id"] == old_id, s["status"]) for s in subs) == [
            (False, "active"),
            (True, "terminated"),
        ]
        nested = await client.get(f"{API}/customers/acme/subscriptions", params={"status[]": ["active", "terminated"]})
        assert [s["lago_customer_id"] for s in nested.json()["subscriptions"]] == [new["lago_id"]]
        terminated = (await client.get(f"{API}/subscriptions/acme.main", params={"status": "terminated"})).json()
        assert terminated["subscription"]["lago_customer_id"] == old_id
        assert (await client.get(f"{API}/subscriptions/acme.main")).json()["subscription"]["plan_code"] == "pro"


async def test_events_by_transaction_id_and_subscription_keep_their_answers() -> None:
    """Postgres: one transaction id on two subscriptions, ``GET /events/{id}`` the first stored; usage and the
    event list per subscription their own events. ClickHouse: an event sent again replaces the first in place."""
    fake, _ = small()
    fake.add_subscription("a", "starter", external_id="a.sub")
    fake.add_subscription("b", "starter", external_id="b.sub")
    async with api(fake) as client:
        for sub, tokens in (("a.sub", 3), ("b.sub", 5)):
            assert (await client.post(f"{API}/events", json={"event": event("tx.1", sub, tokens=tokens)})).is_success
        got = (await client.get(f"{API}/events/tx.1")).json()["event"]
        assert (got["external_subscription_id"], got["properties"]) == ("a.sub", {"tokens": 3})
        listed = (await client.get(f"{API}/events", params={"external_subscription_id": "b.sub"})).json()
        assert [e["properties"]["tokens"] for e in listed["events"]] == [5]
        usage = await client.get(f"{API}/customers/b/current_usage", params={"external_subscription_id": "b.sub"})
        assert usage.json()["customer_usage"]["charges_usage"][0]["units"] == "5.0"
    fake, _ = small("clickhouse")
    fake.add_subscription("a", "starter", external_id="a.sub")
    async with api(fake) as client:
        for tokens in (3, 7):
            batch = {"events": [event("tx.1", "a.sub", tokens=tokens), event(f"tx.{tokens}", "a.sub", tokens=1)]}
            assert (await client.post(f"{API}/events/batch", json=batch)).is_success
        assert (await client.get(f"{API}/events/tx.1")).json()["event"]["properties"] == {"tokens": "7"}
        usage = await client.get(f"{API}/customers/a/current_usage", params={"external_subscription_id": "a.sub"})
        assert usage.json()["customer_usage"]["charges_usage"][0]["units"] == "9.0"


async def test_events_a_test_forgot_are_forgotten_by_the_lookups_too() -> None:
    """A test emptying ``store.events`` (and its dedup index) to forget what it read, then sending more, even more
    than before: ``GET /events/{id}`` and current usage read the events stored now."""
    fake, _ = small()
    fake.add_subscription("a", "starter", external_id="a.sub")
    async with api(fake) as client:
        batch = {"events": [event(f"tx.{n}", "a.sub", tokens=1) for n in range(3)]}
        assert (await client.post(f"{API}/events/batch", json=batch)).is_success
        assert (await client.get(f"{API}/events/tx.2")).is_success
        fake.store.events.clear()
        fake.store._event_index.clear()
        batch = {"events": [event(f"new.{n}", "a.sub", tokens=10) for n in range(5)]}
        assert (await client.post(f"{API}/events/batch", json=batch)).is_success
        assert (await client.get(f"{API}/events/tx.2")).status_code == 404
        assert (await client.get(f"{API}/events/new.4")).json()["event"]["properties"] == {"tokens": 10}
        usage = await client.get(f"{API}/customers/a/current_usage", params={"external_subscription_id": "a.sub"})
        assert usage.json()["customer_usage"]["charges_usage"][0]["units"] == "50.0"


@pytest.mark.parametrize(
    ("path", "key", "params"),
    [
        ("/customers", "customers", {}),
        ("/subscriptions", "subscriptions", {"status[]": ["active", "terminated"]}),
        ("/invoices", "invoices", {}),
        ("/credit_notes", "credit_notes", {}),
    ],
)
async def test_pages_keep_their_order_and_meta(big: FakeLago, path: str, key: str, params: dict[str, Any]) -> None:
    """Paged 23 at a time, the records come in the order of the whole list, each once; the meta says where."""
    async with api(big) as client:
        whole = (await client.get(API + path, params={**params, "per_page": 1000})).json()
        paged: list[Any] = []
        page: int | None = 1
        while page is not None:
            body = (await client.get(API + path, params={**params, "page": page, "per_page": 23})).json()
            assert body["meta"]["current_page"] == page and body["meta"]["total_count"] == whole["meta"]["total_count"]
            paged += body[key]
            page = body["meta"]["next_page"]
    assert [r["lago_id"] for r in paged] == [r["lago_id"] for r in whole[key]]
    assert body["meta"]["total_pages"] == -(-whole["meta"]["total_count"] // 23)


async def test_a_plans_active_subscriptions_count_follows_starts_upgrades_overrides_and_ends() -> None:
    """``active_subscriptions_count`` (kept per plan now, not counted over every subscription for each plan shown,
    which ``GET /subscriptions/{id}`` does): pending ones do not count until they start, an upgrade moves one, an
    override plan takes its subscription off its parent's count, a termination and a deleted customer end one."""
    fake, clock = small()

    async def counts() -> tuple[int, int]:
        async with api(fake) as client:
            plans = [(await client.get(f"{API}/plans/{code}")).json()["plan"] for code in ("starter", "pro")]
        return plans[0]["active_subscriptions_count"], plans[1]["active_subscriptions_count"]

    fake.add_subscription("a", "starter", external_id="a.sub")
    fake.add_subscription("b", "starter", external_id="b.sub")
    fake.add_subscription("c", "starter", external_id="c.sub", subscription_at="2026-03-20T00:00:00Z")
    assert await counts() == (2, 0)
    clock.now = datetime(2026, 3, 21, tzinfo=timezone.utc)
    assert await counts() == (3, 0)
    fake.add_subscription("a", "pro", external_id="a.sub")  # (an upgrade: at once)
    assert await counts() == (2, 1)
    fake.store.update_subscription("b.sub", None, {"subscription": {"plan_overrides": {"amount_cents": 1}}})
    sub = fake.store.get_subscription("b.sub", None)["subscription"]
    assert sub["plan"]["active_subscriptions_count"] == 1 and await counts() == (1, 1)
    fake.store.terminate_subscription("a.sub", {})
    fake.store.delete_customer("c")
    assert await counts() == (0, 0)
