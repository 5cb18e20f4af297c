"""Review of the day's fixes (argument checks, client page arguments, gate checks, raw-path endpoints cut at 1,024
characters): defects in the fixes themselves.

* Raw-path endpoints cut at 1,024 characters: the idempotent transaction id was made of the cut endpoint, so two
  different long paths sharing their first 1,023 characters and an idempotency key were one event (the second
  counted as a retry of the first, unbilled). The id is made of the whole path again; the event's endpoint stays cut.
* "Any real number" in the argument checks: a whole number that is not an ``int`` (numpy's ``int64``, any
  ``numbers.Integral``) was accepted by ``billing_routes(invoice_limit=...)`` and then kept as given, and the client's
  page arguments refused it: every ``GET /invoices`` without ``?limit`` answered 422 blaming the request body. The
  client's ``page``/``per_page`` take any whole number now, and the checked values are the ones kept.
* Gates, pipelines and clients checked for their methods: a class given for an instance (``quota=QuotaGate``,
  ``pipeline=EventPipeline``, ``QuotaGate(settings, LagoClient)``) has every method and passed, failing at the first
  request (or with a ``TypeError`` from the middleware's constructor); refused where written now, saying to build one.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import httpx
import pytest
from starlette.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from lago_org_billing import (
    BillingSettings,
    EventPipeline,
    LagoClient,
    OrgBilling,
    OrgBillingMiddleware,
    QuotaGate,
    billing_routes,
)
from lago_org_billing._errors import ConfigurationError
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "k"


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    """An app without Starlette routing: billed under its raw paths."""
    await PlainTextResponse("ok")(scope, receive, send)


@functools.total_ordering
class Whole:
    """A whole number that is not an ``int`` (as numpy's ``int64`` is): ``numbers.Integral``, with ``__index__``."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (int, Whole)) and self.value == int(other)

    def __lt__(self, other: object) -> bool:
        assert isinstance(other, (int, Whole))
        return self.value < int(other)

    def __hash__(self) -> int:
        return hash(self.value)

    def __bool__(self) -> bool:
        return bool(self.value)

    def __float__(self) -> float:
        return float(self.value)

    # arithmetic stays a Whole, as numpy's int64 stays an int64
    def __add__(self, other: object) -> Whole:
        return Whole(self.value + int(other))  # type: ignore[call-overload]

    __radd__ = __add__

    def __sub__(self, other: object) -> Whole:
        return Whole(self.value - int(other))  # type: ignore[call-overload]

    def __rsub__(self, other: object) -> Whole:
        return Whole(int(other) - self.value)  # type: ignore[call-overload]

    def __mul__(self, other: object) -> Whole:
        return Whole(self.value * int(other))  # type: ignore[call-overload]

    __rmul__ = __mul__

    def __floordiv__(self, other: object) -> Whole:
        return Whole(self.value // int(other))  # type: ignore[call-overload]

    def __repr__(self) -> str:
        return f"Whole({self.value})"

    def __str__(self) -> str:
        return str(self.value)


numbers.Integral.register(Whole)


# ------------------------------------------------------------------ idempotent ids of raw paths cut at 1,024


async def test_idempotent_requests_to_long_raw_paths_are_told_apart(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Two calls to different 1,100-character paths with the same idempotency key were one event (the second a
    "retry" of the first, unbilled): the id was made of the endpoint cut at 1,024 characters. A real retry (same path,
    same key) is still one event; the endpoints billed stay cut."""
    middleware = OrgBillingMiddleware(
        raw_app, header_settings, transport=fake_lago.transport(), idempotency_header="Idempotency-Key"
    )
    base = "/v1/files/" + "a" * 1_100
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            for path in (base + "/one", base + "/two", base + "/one"):
                answer = await client.post(path, headers={"X-Org-Id": "org_a", "Idempotency-Key": "key-1"})
                assert answer.status_code == 200
        assert await middleware.pipeline.flush(5)
        events = list(fake_lago.events)
        assert len({e["transaction_id"] for e in events}) == 2
        assert len(events) == 2
        assert middleware.stats.get("idempotent_retries") == 1  # (the third call: a retry of the first)
        assert all(len(e["properties"]["endpoint"]) == 1_024 for e in events)
    finally:
        await middleware.aclose()


# ------------------------------------------------------------------ whole numbers that are not ints


async def test_an_invoice_limit_given_as_a_whole_number_of_another_type_lists_invoices() -> None:
    """``billing_routes(invoice_limit=numpy.int64(2))`` was accepted, then every ``GET /invoices`` without ``?limit``
    answered 422 ("per_page must be an integer ... Pass an int") about the request body."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_customer("org_1")
    for day in range(1, 4):
        fake.add_invoice("org_1", issuing_date=f"2025-{day:02d}-01", total_amount_cents=day)
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=lambda request, org_id: True, invoice_limit=Whole(2))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router), base_url="http://app") as http:
            answer = await http.get("/organizations/org_1/invoices")
    assert answer.status_code == 200, answer.text
    assert [i["total_amount_cents"] for i in answer.json()["invoices"]] == [3, 2]
    assert answer.json()["meta"]["page"] == 1


async def test_client_page_arguments_take_whole_numbers_of_other_types(fake_lago: Any, lago_client: Any) -> None:
    """The argument checks take any whole number (``numbers.Integral``: numpy's) since today; the client's page
    arguments, checked the same day, still refused them."""
    fake_lago.add_customer("c1")
    fake_lago.add_customer("c2")
    page = await lago_client.list_customers(page=Whole(1), per_page=Whole(1))
    assert len(page.items) == 1 and page.next_page == 2
    assert len([c async for c in lago_client.iter_customers(per_page=Whole(1))]) == 2
    billing = OrgBilling(client=lago_client)
    assert await billing.get_invoices("c1", limit=Whole(2)) == []


async def test_a_pipeline_sized_with_whole_numbers_of_another_type_delivers(
    tmp_path: Any, fake_lago: Any, lago_client: Any
) -> None:
    """``EventPipeline`` checked its counts as whole numbers of any type, then kept them as given: a spool window (or a
    batch size) in numpy's int64 reached SQLite's ``LIMIT ?``, which cannot bind it, and the spool never loaded its
    rows for delivery (read errors, retried forever)."""
    sizes: dict[str, Any] = {
        "batch_size": Whole(10),
        "concurrency": Whole(2),
        "memory_capacity": Whole(1_000),
        "max_attempts": Whole(3),
        "spool_window": Whole(40),
    }
    spool = str(tmp_path / "spool.db")
    writer = EventPipeline(lago_client, spool_path=spool, **sizes)
    for i in range(25):  # a backlog in the file, loaded for delivery by the next pipeline
        event = {"transaction_id": f"t{i}", "external_subscription_id": "s", "code": "c", "properties": {}}
        assert writer.submit(event) is not False
    await writer.commit()
    await writer.aclose()
    pipeline = EventPipeline(lago_client, spool_path=spool, **sizes)
    async with pipeline:
        assert await pipeline.flush(5)
    assert sorted(e["transaction_id"] for e in fake_lago.events) == sorted(f"t{i}" for i in range(25))


# ------------------------------------------------------------------ classes given for instances


def _settings() -> BillingSettings:
    return BillingSettings(api_url="http://127.0.0.1:9", api_key=API_KEY, org_header="X-Org-Id")


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: OrgBillingMiddleware(raw_app, _settings(), quota=QuotaGate), "quota"),
        (lambda: OrgBillingMiddleware(raw_app, _settings(), pipeline=EventPipeline), "pipeline"),
        (lambda: OrgBilling(settings=_settings(), quota=QuotaGate), "quota"),
        (lambda: OrgBilling(settings=_settings(), pipeline=EventPipeline), "pipeline"),
        (lambda: QuotaGate(_settings(), LagoClient), "client"),
    ],
    ids=["middleware-quota", "middleware-pipeline", "billing-quota", "billing-pipeline", "gate-client"],
)
def test_a_class_given_for_an_instance_is_refused_where_written(make: Any, argument: str) -> None:
    """A class has every method its instances have: the method checks passed it, and it failed at the first request
    (the gate's ``run`` called unbound), or with a ``TypeError`` in the middleware's constructor."""
    with pytest.raises(ConfigurationError, match=argument) as caught:
        make()
    assert "(...)" in str(caught.value)  # says to build one
