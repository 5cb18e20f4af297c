"""Writes in the right order, and resent when that is safe (review of ``_billing.py`` and ``_client.py``).

Covers:

* ``POST /setup`` of ``billing_routes()`` (``OrgBilling.subscribe_org_to_plan``) for an org whose subscription
  ``external_id`` another Lago customer holds: the org's customer was created (or completed) first and the
  subscription refused after, a stray customer left in Lago. The subscription id is read before anything is written
  now, and the error names the customer holding it and what to do; the 422 of the routes keeps its shape.
* ``create_plan``, ``create_billable_metric`` and ``create_feature`` after a lost answer (a proxy's 5xx, a read
  timeout, a reset after the body was sent): they were never resent, the call failed though Lago had made the object.
  Lago keeps ``code`` unique (a resend is answered ``422 code value_already_exist``), so they are resent, and on that
  422 the object is read back and returned when it is the one asked for; a different object under that code is still
  refused, and a code taken before the call (no answer lost) is refused at once, as before.
* Writes the client does not resend (a DELETE, a subscription with ``plan_overrides``) gave up on a connection never
  made (refused, DNS, connect timeout), where the request never left: they are resent then, and only then (never
  after a read timeout or a reset once the request was sent).

Faults are injected with pytest-httpx; the requests that get through are answered by the emulator (``FakeLago``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pytest_httpx import HTTPXMock

from lago_org_billing import (
    BillingSettings,
    LagoClient,
    LagoUnavailableError,
    LagoValidationError,
    OrgBilling,
)
from lago_org_billing._routes import billing_routes
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "wo-test-key"


def _settings(fake: FakeLago, **changes: Any) -> BillingSettings:
    values: dict[str, Any] = {
        "api_url": fake.base_url,
        "api_key": fake.api_key,
        "retry_backoff": 0.001,
        "max_retries": 3,
    }
    values.update(changes)
    return BillingSettings(**values)


def _fake() -> FakeLago:
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call")
    fake.add_plan("starter", name="Starter", amount_cents=1000)
    fake.add_plan("pro", name="Pro", amount_cents=5000)
    return fake


class _Edge:
    """The network between the client and Lago (a pytest-httpx callback): requests reach the emulator, except that
    the first ``count`` requests ``match`` picks meet ``how``: ``connect`` / ``dns`` / ``connect-timeout`` (never
    sent), ``early-502`` (a proxy refusing before Lago saw it), or, after Lago applied the request, ``502`` / ``504``
    (a proxy's page instead of the answer), ``read-timeout`` or ``reset``."""

    def __init__(self, fake: FakeLago, match: Callable[[httpx.Request], bool], how: str, count: int = 1) -> None:
        self.inner = fake.transport()
        self.match = match
        self.how = how
        self.left = count
        self.seen: list[tuple[str, str, bytes]] = []  # (method, path, body) of every request that left the client

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        self.seen.append((request.method, request.url.path, body))
        fault = self.left > 0 and self.match(request)
        if fault:
            self.left -= 1
            if self.how == "connect":
                raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
            if self.how == "dns":
                raise httpx.ConnectError("[Errno -2] Name or service not known", request=request)
            if self.how == "connect-timeout":
                raise httpx.ConnectTimeout("timed out connecting", request=request)
            if self.how == "early-502":
                return httpx.Response(502, text="<html>Bad Gateway</html>", headers={"content-type": "text/html"})
        response = await self.inner.handle_async_request(request)
        content = await response.aread()
        if fault:
            if self.how == "read-timeout":
                raise httpx.ReadTimeout("timed out reading the answer", request=request)
            if self.how == "reset":
                raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
            return httpx.Response(int(self.how), text="<html>Bad Gateway</html>", headers={"content-type": "text/html"})
        return httpx.Response(response.status_code, headers=response.headers, content=content)

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.seen if m == method and p == f"/api/v1{path}")


def _edge(httpx_mock: HTTPXMock, fake: FakeLago, match: Callable[[httpx.Request], bool], how: str) -> _Edge:
    edge = _Edge(fake, match, how)
    httpx_mock.add_callback(edge, is_reusable=True)
    return edge


def _is(method: str, path: str) -> Callable[[httpx.Request], bool]:
    return lambda request: request.method == method and request.url.path == f"/api/v1{path}"


# ------------------------------------------------------------------------ 1. a setup refused writes nothing


def _hold_org_id(fake: FakeLago) -> None:
    """A legacy user's active subscription under org_acme's subscription id (template ``{org_id}``)."""
    fake.add_customer("user_7", name="Legacy user")
    fake.add_subscription("user_7", "starter", external_id="org_acme")


def _admin(request: Any, org_id: str) -> bool:
    return request.headers.get("x-admin-of") == org_id


@pytest.mark.parametrize("customer", ["none", "bare"], ids=["new-org", "org-with-a-bare-customer"])
async def test_setup_refused_for_a_held_subscription_id_writes_nothing(customer: str) -> None:
    """``POST /setup`` created the org's Lago customer (or completed its metadata), then Lago refused the
    subscription: a 422, and a customer left in Lago that nothing bills. The subscription id is read first: the same
    422 (its FastAPI-style detail and Lago's errors) and no write at all."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    fake = _fake()
    _hold_org_id(fake)
    if customer == "bare":  # (Lago makes a bare customer for a subscription of an unknown one)
        fake.add_customer("org_acme")
    before = fake.snapshot()
    settings = _settings(fake, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        app = Starlette(routes=[Mount("/billing", app=billing_routes(OrgBilling(client=lago), authorize=_admin))])
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.post(
                "/billing/organizations/org_acme/setup",
                json={"org_name": "Acme", "plan_code": "starter", "email": "billing@acme.test", "user_id": "u_1"},
                headers={"X-Admin-Of": "org_acme"},
            )
    assert response.status_code == 422, response.text
    assert response.json()["errors"] == {"external_id": ["value_already_exist"]}
    assert response.json()["detail"][0]["type"] == "value_already_exist"
    assert fake.write_requests == []
    assert fake.snapshot() == before


async def test_subscribe_org_to_plan_says_who_holds_the_id_before_writing(fake_lago: Any, lago_client: Any) -> None:
    """The error of the refused setup names the holder and the ways out (a LagoValidationError, as Lago's 422)."""
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_customer("user_7", name="Legacy user")
    fake_lago.add_subscription("user_7", "starter", external_id="org_1")
    async with OrgBilling(client=lago_client) as billing:
        with pytest.raises(LagoValidationError) as caught:
            await billing.subscribe_org_to_plan("org_1", "starter", "Acme", "billing@acme.test", user_id="u_1")
    message = str(caught.value)
    assert "'user_7'" in message and "terminate_subscription('org_1')" in message
    assert "LAGO_SUBSCRIPTION_ID_TEMPLATE" in message and "fix the fields" not in message
    assert "nothing was written" in message.lower()
    assert caught.value.details == {"external_id": ["value_already_exist"]}
    assert [c["external_id"] for c in fake_lago.customers] == ["user_7"]
    assert fake_lago.write_requests == []


async def test_setup_of_a_free_id_reads_the_subscription_once(fake_lago: Any, lago_client: Any) -> None:
    """The read that guards the setup is the one the subscribe made anyway: a setup reads the subscription id no
    more than before (the active, then the pending one), and the org is set up as before."""
    fake_lago.add_plan("starter", amount_cents=1000)
    async with OrgBilling(client=lago_client) as billing:
        result = await billing.subscribe_org_to_plan("org_1", "starter", "Acme", user_id="u_1")
    assert result["subscription"]["external_customer_id"] == "org_1"
    reads = [r for r in fake_lago.requests if r.method == "GET" and r.path == "/api/v1/subscriptions/org_1"]
    assert len(reads) == 2
    assert [(r.method, r.path) for r in fake_lago.write_requests] == [
        ("POST", "/api/v1/customers"),
        ("POST", "/api/v1/subscriptions"),
    ]


# -------------------------------------------------------------- 2. creates by code: resent, then read back

PLAN = {
    "name": "Team",
    "code": "team",
    "interval": "monthly",
    "amount_cents": 2500,
    "amount_currency": "USD",
    "pay_in_advance": False,
    "trial_period": 0,
    "charges": [
        {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.010"}},
    ],
}
METRIC = {"name": "Tokens", "code": "tokens", "aggregation_type": "sum_agg", "field_name": "total_tokens"}
FEATURE = {"code": "seats", "name": "Seats", "privileges": [{"code": "max", "value_type": "integer"}]}

CREATES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "plan": ("create_plan", "/plans", PLAN),
    "metric": ("create_billable_metric", "/billable_metrics", METRIC),
    "feature": ("create_feature", "/features", FEATURE),
}


def _stored(fake: FakeLago, kind: str) -> list[str]:
    state = json.loads(fake.snapshot())
    key = {"plan": "plans", "metric": "billable_metrics", "feature": "features"}[kind]
    return [item["code"] for item in state[key] if item.get("code") == CREATES[kind][2]["code"]]


@pytest.mark.parametrize("kind", list(CREATES))
@pytest.mark.parametrize("how", ["502", "504", "read-timeout", "reset"])
async def test_a_create_whose_answer_is_lost_returns_what_lago_made(httpx_mock: HTTPXMock, kind: str, how: str) -> None:
    """Lago made the object, its answer lost: the call raised "Not sent again", and a re-run by the caller met
    ``value_already_exist``. It is resent (the same bytes), and Lago's 422 to the resend is read back as made."""
    method, path, item = CREATES[kind]
    fake = _fake()
    edge = _edge(httpx_mock, fake, _is("POST", path), how)
    async with LagoClient(_settings(fake)) as lago:
        made = await getattr(lago, method)(item)
    assert made["code"] == item["code"] and made.get("lago_id")
    assert _stored(fake, kind) == [item["code"]]
    posts = [body for m, p, body in edge.seen if m == "POST" and p == f"/api/v1{path}"]
    assert len(posts) == 2 and posts[0] == posts[1]
    assert edge.count("GET", f"{path}/{item['code']}") == 1


@pytest.mark.parametrize("kind", list(CREATES))
async def test_a_create_refused_by_a_proxy_before_lago_is_resent(httpx_mock: HTTPXMock, kind: str) -> None:
    """A 502 of a proxy that never reached Lago: the resend makes the object (no read back needed)."""
    method, path, item = CREATES[kind]
    fake = _fake()
    edge = _edge(httpx_mock, fake, _is("POST", path), "early-502")
    async with LagoClient(_settings(fake)) as lago:
        made = await getattr(lago, method)(item)
    assert made["code"] == item["code"]
    assert _stored(fake, kind) == [item["code"]]
    assert edge.count("POST", path) == 2


async def test_another_object_under_the_code_is_still_refused(httpx_mock: HTTPXMock) -> None:
    """The resend's 422 after a lost answer is not taken blindly: a plan already under the code with other values
    (another deploy's) is not this call's, and is refused, saying so."""
    fake = _fake()
    fake.add_plan("team", name="Team", amount_cents=9900)
    _edge(httpx_mock, fake, _is("POST", "/plans"), "early-502")
    async with LagoClient(_settings(fake)) as lago:
        with pytest.raises(LagoValidationError) as caught:
            await lago.create_plan(PLAN)
    assert caught.value.details == {"code": ["value_already_exist"]}
    assert "amount_cents" in str(caught.value)
    assert [p["amount_cents"] for p in json.loads(fake.snapshot())["plans"] if p["code"] == "team"] == [9900]


async def test_a_code_taken_before_the_call_is_refused_at_once(httpx_mock: HTTPXMock) -> None:
    """No answer lost: Lago's 422 is the answer, as before (no read back, one request)."""
    fake = _fake()
    fake.add_plan("team", name="Team", amount_cents=2500)
    edge = _edge(httpx_mock, fake, lambda request: False, "502")
    async with LagoClient(_settings(fake)) as lago:
        with pytest.raises(LagoValidationError) as caught:
            await lago.create_plan(PLAN)
    assert caught.value.details == {"code": ["value_already_exist"]}
    assert [(m, p) for m, p, _ in edge.seen] == [("POST", "/api/v1/plans")]


# ------------------------------------------------------------ 3. writes not resent: resent when never sent


@pytest.mark.parametrize("how", ["connect", "dns", "connect-timeout"])
async def test_a_terminate_whose_connection_failed_is_resent(httpx_mock: HTTPXMock, how: str) -> None:
    """The DELETE never left (refused, DNS, connect timeout): resending it cannot apply it twice. It failed "retry
    later" (and OrgBilling's read back found the subscription still active)."""
    fake = _fake()
    fake.add_subscription("org_1", "starter", external_id="org_1")
    edge = _edge(httpx_mock, fake, _is("DELETE", "/subscriptions/org_1"), how)
    async with LagoClient(_settings(fake)) as lago:
        ended = await lago.terminate_subscription("org_1")
    assert ended["status"] == "terminated"
    assert [s["status"] for s in fake.subscriptions] == ["terminated"]
    assert edge.count("DELETE", "/subscriptions/org_1") == 2


async def test_a_subscription_with_plan_overrides_whose_connection_failed_is_resent(httpx_mock: HTTPXMock) -> None:
    fake = _fake()
    edge = _edge(httpx_mock, fake, _is("POST", "/subscriptions"), "connect")
    async with LagoClient(_settings(fake)) as lago:
        made = await lago.create_subscription(
            external_customer_id="org_1", plan_code="pro", external_id="org_1", plan_overrides={"amount_cents": 100}
        )
    assert made["status"] == "active"
    assert [(s["external_customer_id"], s["status"]) for s in fake.subscriptions] == [("org_1", "active")]
    assert edge.count("POST", "/subscriptions") == 2


@pytest.mark.parametrize("how", ["read-timeout", "reset", "502"])
async def test_a_delete_sent_is_still_not_resent(httpx_mock: HTTPXMock, how: str) -> None:
    """Once the request was sent, Lago may have applied it: still one attempt, and the error says why."""
    fake = _fake()
    fake.add_subscription("org_1", "starter", external_id="org_1")
    edge = _edge(httpx_mock, fake, _is("DELETE", "/subscriptions/org_1"), how)
    async with LagoClient(_settings(fake)) as lago:
        with pytest.raises(LagoUnavailableError, match="Not sent again"):
            await lago.terminate_subscription("org_1")
    assert edge.count("DELETE", "/subscriptions/org_1") == 1


async def test_a_read_probe_still_makes_one_attempt(httpx_mock: HTTPXMock) -> None:
    """``retry=False`` of a read is a probe's one attempt (Lago as it is now): a refused connection is not retried."""
    fake = _fake()
    edge = _edge(httpx_mock, fake, lambda request: True, "connect")
    async with LagoClient(_settings(fake)) as lago:
        with pytest.raises(LagoUnavailableError):
            await lago.list_customers(per_page=1, retry=False)
    assert len(edge.seen) == 1
