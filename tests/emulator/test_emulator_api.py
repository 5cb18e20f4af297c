"""FakeLago HTTP surface: auth, errors, customers, metrics, plans, features, invoices, keys, state."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from lago_org_billing.testing import FakeLago, FakeLagoError

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def fake() -> FakeLago:
    """An emulator with a pinned clock."""
    return FakeLago(api_key="k", clock=lambda: NOW)


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[httpx.AsyncClient]:
    """A raw httpx client authenticated against ``fake``."""
    async with httpx.AsyncClient(
        transport=fake.transport(), base_url=fake.base_url, headers={"Authorization": "Bearer k"}
    ) as c:
        yield c


def seeded(fake: FakeLago) -> FakeLago:
    fake.add_billable_metric("api_call")
    fake.add_plan("starter", amount_cents=1000, charges=[{"billable_metric_code": "api_call"}])
    return fake


# Transport, auth, errors ------------------------------------------------------------------------


async def test_health_needs_no_auth(fake: FakeLago) -> None:
    """GET /health answers Lago's health body without a key."""
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url) as c:
        r = await c.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["message"] == "Success"
    assert set(body) == {"version", "github_url", "message"}


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer", "k"])
async def test_missing_or_wrong_key_is_401(fake: FakeLago, header: str | None) -> None:
    """A missing or unknown API key gets Lago's exact 401 body."""
    headers = {"Authorization": header} if header is not None else {}
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url, headers=headers) as c:
        r = await c.get("/api/v1/customers")
    assert r.status_code == 401
    assert r.json() == {"status": 401, "error": "Unauthorized"}


async def test_unknown_route_is_resource_not_found(client: httpx.AsyncClient) -> None:
    """Unknown routes and wrong methods get 404 resource_not_found."""
    for method, path in [("GET", "/api/v1/nothing"), ("PATCH", "/api/v1/customers"), ("GET", "/nope")]:
        r = await client.request(method, path)
        assert r.status_code == 404
        assert r.json() == {"status": 404, "error": "Not Found", "code": "resource_not_found"}


@pytest.mark.parametrize(
    ("path", "root"),
    [
        ("/api/v1/customers", "customer"),
        ("/api/v1/subscriptions", "subscription"),
        ("/api/v1/events", "event"),
        ("/api/v1/events/batch", "events"),
        ("/api/v1/plans", "plan"),
        ("/api/v1/billable_metrics", "billable_metric"),
        ("/api/v1/features", "feature"),
    ],
)
async def test_missing_root_key_is_400(client: httpx.AsyncClient, path: str, root: str) -> None:
    """A body without its root key gets Lago's BadRequest message."""
    r = await client.post(path, json={"external_id": "x"})
    assert r.status_code == 400
    assert r.json() == {"status": 400, "error": f"BadRequest: param is missing or the value is empty: {root}"}


async def test_invalid_json_is_400(client: httpx.AsyncClient) -> None:
    """A body that is not JSON is a 400."""
    r = await client.post("/api/v1/customers", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400


# Customers --------------------------------------------------------------------------------------


async def test_customer_upsert_get_and_partial_update(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """POST creates then updates only the keys present; GET returns the same object."""
    r = await client.post(
        "/api/v1/customers", json={"customer": {"external_id": "org_1", "name": "Acme", "email": "a@x"}}
    )
    assert r.status_code == 200
    created = r.json()["customer"]
    assert created["external_id"] == "org_1"
    assert created["name"] == "Acme"
    assert created["applicable_timezone"] == "UTC"
    assert created["metadata"] == []
    r = await client.post("/api/v1/customers", json={"customer": {"external_id": "org_1", "currency": "EUR"}})
    updated = r.json()["customer"]
    assert updated["lago_id"] == created["lago_id"]
    assert (updated["name"], updated["email"], updated["currency"]) == ("Acme", "a@x", "EUR")
    r = await client.get("/api/v1/customers/org_1")
    assert r.json()["customer"] == updated
    assert [w["webhook_type"] for w in fake.emitted_webhooks] == ["customer.created", "customer.updated"]


async def test_customer_validation_errors(client: httpx.AsyncClient) -> None:
    """Missing external_id and a bad currency give 422 validation_errors."""
    r = await client.post("/api/v1/customers", json={"customer": {"name": "x"}})
    assert r.status_code == 422
    assert r.json() == {
        "status": 422,
        "error": "Unprocessable Entity",
        "code": "validation_errors",
        "error_details": {"external_id": ["value_is_mandatory"]},
    }
    r = await client.post("/api/v1/customers", json={"customer": {"external_id": "a", "currency": "euros"}})
    assert r.json()["error_details"] == {"currency": ["value_is_invalid"]}
    # Lago checks time zones against the IANA names and names against 255 characters (the emulator took both)
    r = await client.post("/api/v1/customers", json={"customer": {"external_id": "a", "timezone": "Mars/Olympus"}})
    assert r.json()["error_details"] == {"timezone": ["invalid_timezone"]}
    r = await client.post("/api/v1/customers", json={"customer": {"external_id": "a", "name": "n" * 256}})
    assert r.json()["error_details"] == {"name": ["value_is_too_long"]}
    r = await client.post("/api/v1/customers", json={"customer": {"external_id": "a", "timezone": "Asia/Tokyo"}})
    assert r.status_code == 200 and r.json()["customer"]["applicable_timezone"] == "Asia/Tokyo"


async def test_customer_not_found_and_soft_delete(client: httpx.AsyncClient) -> None:
    """Unknown customers are 404 customer_not_found; a deleted external_id can be reused."""
    r = await client.get("/api/v1/customers/ghost")
    assert r.status_code == 404
    assert r.json()["code"] == "customer_not_found"
    first = (await client.post("/api/v1/customers", json={"customer": {"external_id": "c1"}})).json()["customer"]
    r = await client.delete("/api/v1/customers/c1")
    assert r.status_code == 200
    assert r.json()["customer"]["lago_id"] == first["lago_id"]
    assert (await client.get("/api/v1/customers/c1")).status_code == 404
    assert (await client.delete("/api/v1/customers/c1")).status_code == 404
    again = (await client.post("/api/v1/customers", json={"customer": {"external_id": "c1"}})).json()["customer"]
    assert again["lago_id"] != first["lago_id"]


async def test_customer_path_with_dot_splits_like_rails(client: httpx.AsyncClient) -> None:
    """/customers/acme.com looks up "acme" like Rails; nested routes with a dot do not match."""
    await client.post("/api/v1/customers", json={"customer": {"external_id": "acme.com"}})
    assert (await client.get("/api/v1/customers/acme.com")).json()["code"] == "customer_not_found"
    r = await client.get("/api/v1/customers/acme.com/current_usage", params={"external_subscription_id": "s"})
    assert r.json()["code"] == "resource_not_found"


async def test_customer_metadata_limits(client: httpx.AsyncClient) -> None:
    """At most 5 items, key <= 20 chars, value <= 100 chars; refused calls change nothing."""

    def items(n: int) -> list[dict[str, Any]]:
        return [{"key": f"k{i}", "value": "v"} for i in range(n)]

    r = await client.post("/api/v1/customers", json={"customer": {"external_id": "m", "metadata": items(5)}})
    assert r.status_code == 200
    assert len(r.json()["customer"]["metadata"]) == 5
    r = await client.post("/api/v1/customers", json={"customer": {"external_id": "m", "metadata": items(6)}})
    assert r.status_code == 422
    assert r.json()["error_details"] == {"metadata": ["invalid_count"]}
    long_key = [{"key": "k" * 21, "value": "v"}]
    r = await client.post("/api/v1/customers", json={"customer": {"external_id": "m", "metadata": long_key}})
    assert r.json()["error_details"] == {"key": ["value_is_too_long"]}
    long_value = [{"key": "k", "value": "v" * 101}]
    r = await client.post("/api/v1/customers", json={"customer": {"external_id": "m", "metadata": long_value}})
    assert r.json()["error_details"] == {"value": ["value_is_too_long"]}
    ok = [{"key": "k" * 20, "value": "v" * 100}]
    r = await client.post("/api/v1/customers", json={"customer": {"external_id": "n", "metadata": ok}})
    assert r.status_code == 200
    assert len((await client.get("/api/v1/customers/m")).json()["customer"]["metadata"]) == 5


async def test_customer_metadata_update_semantics(client: httpx.AsyncClient) -> None:
    """Items with id are updated, without id created, absent ones deleted; a re-sent key without id is 422."""
    body = {
        "customer": {"external_id": "m", "metadata": [{"key": "plan", "value": "a"}, {"key": "tier", "value": "1"}]}
    }
    meta = (await client.post("/api/v1/customers", json=body)).json()["customer"]["metadata"]
    plan_item = next(m for m in meta if m["key"] == "plan")
    assert set(plan_item) == {"lago_id", "key", "value", "display_in_invoice", "created_at"}
    update = [{"id": plan_item["lago_id"], "key": "plan", "value": "b"}, {"key": "region", "value": "eu"}]
    r = await client.post("/api/v1/customers", json={"customer": {"external_id": "m", "metadata": update}})
    meta = r.json()["customer"]["metadata"]
    assert {m["key"]: m["value"] for m in meta} == {"plan": "b", "region": "eu"}
    assert next(m for m in meta if m["key"] == "plan")["lago_id"] == plan_item["lago_id"]
    r = await client.post(
        "/api/v1/customers", json={"customer": {"external_id": "m", "metadata": [{"key": "plan", "value": "c"}]}}
    )
    assert r.status_code == 422
    assert r.json()["error_details"] == {"key": ["value_already_exist"]}
    r = await client.post("/api/v1/customers", json={"customer": {"external_id": "m", "name": "kept"}})
    assert len(r.json()["customer"]["metadata"]) == 2
    r = await client.post("/api/v1/customers", json={"customer": {"external_id": "m", "metadata": []}})
    assert r.json()["customer"]["metadata"] == []


async def test_customer_list_pagination_and_filters(client: httpx.AsyncClient) -> None:
    """GET /customers paginates with Lago's meta and filters by external_id and search_term."""
    r = await client.get("/api/v1/customers")
    assert r.json() == {
        "customers": [],
        "meta": {"current_page": 0, "next_page": None, "prev_page": None, "total_pages": 0, "total_count": 0},
    }
    for i in range(5):
        await client.post("/api/v1/customers", json={"customer": {"external_id": f"c{i}", "name": f"Name {i}"}})
    r = await client.get("/api/v1/customers", params={"page": 2, "per_page": 2})
    body = r.json()
    assert len(body["customers"]) == 2
    assert body["meta"] == {"current_page": 2, "next_page": 3, "prev_page": 1, "total_pages": 3, "total_count": 5}
    last = (await client.get("/api/v1/customers", params={"page": 3, "per_page": 2})).json()["meta"]
    assert (last["next_page"], last["prev_page"]) == (None, 2)
    r = await client.get("/api/v1/customers", params={"external_id": "c3"})
    assert [c["external_id"] for c in r.json()["customers"]] == ["c3"]
    r = await client.get("/api/v1/customers", params={"search_term": "name 4"})
    assert [c["external_id"] for c in r.json()["customers"]] == ["c4"]


# Billable metrics, plans, features, entitlements ------------------------------------------------


async def test_billable_metric_crud(client: httpx.AsyncClient) -> None:
    """Create, read and list billable metrics; duplicates and bad input are 422."""
    payload = {
        "billable_metric": {
            "name": "Tokens",
            "code": "tokens",
            "aggregation_type": "sum_agg",
            "field_name": "tokens",
            "filters": [{"key": "model", "values": ["a", "b"]}],
        }
    }
    r = await client.post("/api/v1/billable_metrics", json=payload)
    assert r.status_code == 200
    metric = r.json()["billable_metric"]
    assert (metric["aggregation_type"], metric["field_name"], metric["recurring"]) == ("sum_agg", "tokens", False)
    assert metric["filters"] == [{"key": "model", "values": ["a", "b"]}]
    assert (await client.get("/api/v1/billable_metrics/tokens")).json()["billable_metric"]["lago_id"] == metric[
        "lago_id"
    ]
    assert (await client.get("/api/v1/billable_metrics/nope")).json()["code"] == "billable_metric_not_found"
    r = await client.post("/api/v1/billable_metrics", json=payload)
    assert r.json()["error_details"] == {"code": ["value_already_exist"]}
    bad = {"billable_metric": {"name": "x", "code": "x", "aggregation_type": "sum_agg"}}
    assert (await client.post("/api/v1/billable_metrics", json=bad)).json()["error_details"] == {
        "field_name": ["value_is_mandatory"]
    }
    listing = (await client.get("/api/v1/billable_metrics")).json()
    assert listing["meta"]["total_count"] == 1


async def test_plan_crud_with_charges(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """Plans take charges by billable_metric_id or code; unknown plan is 404 plan_not_found."""
    metric = fake.add_billable_metric("api_call")
    payload = {
        "plan": {
            "name": "Pro",
            "code": "pro",
            "interval": "monthly",
            "amount_cents": 5000,
            "amount_currency": "EUR",
            "charges": [
                {"billable_metric_id": metric["lago_id"], "charge_model": "standard", "properties": {"amount": "0.5"}},
                {
                    "billable_metric_code": "api_call",
                    "charge_model": "package",
                    "properties": {"amount": "1", "package_size": 10},
                },
            ],
        }
    }
    r = await client.post("/api/v1/plans", json=payload)
    assert r.status_code == 200
    plan = r.json()["plan"]
    assert [c["charge_model"] for c in plan["charges"]] == ["standard", "package"]
    assert plan["charges"][0]["lago_billable_metric_id"] == metric["lago_id"]
    assert plan["charges"][0]["billable_metric_code"] == "api_call"
    assert "metadata" not in plan
    assert (await client.get("/api/v1/plans/pro")).json()["plan"]["lago_id"] == plan["lago_id"]
    assert (await client.get("/api/v1/plans/nope")).json()["code"] == "plan_not_found"
    assert (await client.get("/api/v1/plans")).json()["meta"]["total_count"] == 1
    bad = {"plan": {"name": "x", "code": "x", "interval": "daily", "amount_cents": 0, "amount_currency": "USD"}}
    assert (await client.post("/api/v1/plans", json=bad)).json()["error_details"] == {"interval": ["value_is_invalid"]}


async def test_features_and_plan_entitlements(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """Features are created and listed; plan entitlements are replaced by POST and merged by PATCH."""
    r = await client.post(
        "/api/v1/features",
        json={
            "feature": {
                "code": "seats",
                "name": "Seats",
                "privileges": [{"code": "max", "value_type": "integer"}, {"code": "root", "value_type": "boolean"}],
            }
        },
    )
    assert r.status_code == 200
    assert [p["code"] for p in r.json()["feature"]["privileges"]] == ["max", "root"]
    assert (await client.get("/api/v1/features/seats")).json()["feature"]["code"] == "seats"
    assert (await client.get("/api/v1/features/nope")).json()["code"] == "feature_not_found"
    assert (await client.get("/api/v1/features")).json()["meta"]["total_count"] == 1
    fake.add_feature("sso")
    fake.add_plan("pro")
    r = await client.post(
        "/api/v1/plans/pro/entitlements", json={"entitlements": {"seats": {"max": 20, "root": False}}}
    )
    ents = r.json()["entitlements"]
    assert ents[0]["code"] == "seats"
    assert {p["code"]: p["value"] for p in ents[0]["privileges"]} == {"max": 20, "root": False}
    r = await client.patch("/api/v1/plans/pro/entitlements", json={"entitlements": {"sso": {}, "seats": {"max": 25}}})
    ents = {e["code"]: e for e in r.json()["entitlements"]}
    assert set(ents) == {"seats", "sso"}
    assert {p["code"]: p["value"] for p in ents["seats"]["privileges"]} == {"max": 25, "root": False}
    r = await client.post("/api/v1/plans/pro/entitlements", json={"entitlements": {"sso": {}}})
    assert [e["code"] for e in r.json()["entitlements"]] == ["sso"]
    r = await client.post("/api/v1/plans/pro/entitlements", json={"entitlements": {"seats": {"max": "lots"}}})
    assert r.status_code == 422
    r = await client.post("/api/v1/plans/pro/entitlements", json={"entitlements": {"ghost": {}}})
    assert r.json()["code"] == "feature_not_found"
    assert (await client.get("/api/v1/plans/pro/entitlements")).json()["entitlements"][0]["code"] == "sso"


async def test_subscription_entitlements_override(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """Subscription entitlements show plan value, override and the effective value."""
    fake.add_feature("seats", privileges=[{"code": "max", "value_type": "integer"}])
    fake.add_plan("pro", entitlements={"seats": {"max": 10}})
    fake.add_subscription("org", "pro", external_id="sub")
    r = await client.get("/api/v1/subscriptions/sub/entitlements")
    privilege = r.json()["entitlements"][0]["privileges"][0]
    assert (privilege["value"], privilege["plan_value"], privilege["override_value"]) == (10, 10, None)
    r = await client.patch("/api/v1/subscriptions/sub/entitlements", json={"entitlements": {"seats": {"max": 15}}})
    entitlement = r.json()["entitlements"][0]
    assert entitlement["overrides"] == {"max": 15}
    privilege = entitlement["privileges"][0]
    assert (privilege["value"], privilege["plan_value"], privilege["override_value"]) == (15, 10, 15)
    sub = (await client.get("/api/v1/subscriptions/sub")).json()["subscription"]
    assert sub["entitlements"][0]["privileges"][0]["value"] == 15
    assert (await client.get("/api/v1/subscriptions/ghost/entitlements")).json()["code"] == "subscription_not_found"


# Invoices and webhook keys ----------------------------------------------------------------------


async def test_invoices_list_and_get(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """Invoices added from Python are listed per customer with pagination and fetched by lago_id."""
    first = fake.add_invoice("org_a", total_amount_cents=1200, fees_amount_cents=1200)
    fake.add_invoice("org_a", status="draft")
    fake.add_invoice("org_b")
    r = await client.get("/api/v1/invoices", params={"external_customer_id": "org_a", "per_page": 1})
    body = r.json()
    assert body["meta"] == {"current_page": 1, "next_page": 2, "prev_page": None, "total_pages": 2, "total_count": 2}
    assert body["invoices"][0]["customer"]["external_id"] == "org_a"
    r = await client.get(f"/api/v1/invoices/{first['lago_id']}")
    invoice = r.json()["invoice"]
    assert (invoice["total_amount_cents"], invoice["status"]) == (1200, "finalized")
    assert (await client.get("/api/v1/invoices/nope")).json()["code"] == "invoice_not_found"
    r = await client.get("/api/v1/customers/org_b/invoices")
    assert r.json()["meta"]["total_count"] == 1
    assert (await client.get("/api/v1/customers/ghost/invoices")).json()["code"] == "customer_not_found"


async def test_webhook_public_key_endpoints(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """Both public key endpoints serve Base64.encode64 of the PEM (60-char lines)."""
    r = await client.get("/api/v1/webhooks/json_public_key")
    encoded = r.json()["webhook"]["public_key"]
    lines = encoded.split("\n")
    assert encoded.endswith("\n")
    assert all(len(line) == 60 for line in lines[:-2])
    assert base64.b64decode(encoded) == fake.rsa_public_key_pem == fake.public_key_pem()
    assert fake.rsa_public_key_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert b"PRIVATE KEY" in fake.rsa_private_key_pem
    r = await client.get("/api/v1/webhooks/public_key")
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == encoded


# State, logs, seeding, middleware ---------------------------------------------------------------


async def test_request_log_and_write_requests(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """Every /api/v1 request is recorded with its status, query and parsed body."""
    await client.post("/api/v1/customers", json={"customer": {"external_id": "a"}})
    await client.get("/api/v1/customers", params={"page": 1, "status[]": ["x", "y"]})
    await client.get("/health")
    assert [(r.method, r.path, r.status) for r in fake.requests] == [
        ("POST", "/api/v1/customers", 200),
        ("GET", "/api/v1/customers", 200),
    ]
    assert fake.requests[0].body == {"customer": {"external_id": "a"}}
    assert fake.requests[1].query == {"page": "1", "status[]": ["x", "y"]}
    assert [r.method for r in fake.write_requests] == ["POST"]


async def test_snapshot_is_deterministic(client: httpx.AsyncClient) -> None:
    """Reads leave the snapshot byte-identical; two emulators fed the same calls agree."""
    fakes = [seeded(FakeLago(api_key="k", clock=lambda: NOW)) for _ in range(2)]
    for fake in fakes:
        fake.add_subscription("org", "starter")
    assert fakes[0].snapshot() == fakes[1].snapshot()
    fake = fakes[0]
    before = fake.snapshot()
    async with fake.client() as c:
        await c.get("/api/v1/customers")
        await c.get("/api/v1/customers/org/current_usage", params={"external_subscription_id": "org"})
        await c.get("/api/v1/subscriptions/org")
    assert fake.snapshot() == before
    async with fake.client() as c:
        await c.post("/api/v1/customers", json={"customer": {"external_id": "org", "name": "changed"}})
    assert fake.snapshot() != before
    assert json.loads(before)["customers"][0]["external_id"] == "org"


async def test_control_routes_reset_and_state(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """GET /_emulator/state returns the snapshot; POST /_emulator/reset clears everything without auth."""
    seeded(fake)
    await client.post("/api/v1/customers", json={"customer": {"external_id": "a"}})
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url) as anonymous:
        state = await anonymous.get("/_emulator/state")
        assert state.json() == json.loads(fake.snapshot())
        assert (await anonymous.post("/_emulator/reset")).status_code == 200
    assert fake.customers == []
    assert fake.requests == []
    assert fake.emitted_webhooks == []
    assert (await client.get("/api/v1/plans/starter")).status_code == 404


async def test_seed_and_seed_file(tmp_path: Path) -> None:
    """seed() and from_seed_file() load objects shaped like Lago create inputs; bad files fail clearly."""
    data = {
        "billable_metrics": [{"code": "api_call", "aggregation_type": "count_agg"}],
        "features": [{"code": "seats", "privileges": [{"code": "max", "value_type": "integer"}]}],
        "plans": [
            {
                "code": "starter",
                "charges": [{"billable_metric_code": "api_call", "properties": {"amount": "1"}}],
                "entitlements": {"seats": {"max": 3}},
            }
        ],
        "customers": [{"external_id": "org", "name": "Org"}],
        "subscriptions": [{"external_customer_id": "org", "plan_code": "starter"}],
        "invoices": [{"external_customer_id": "org", "total_amount_cents": 10}],
    }
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(data))
    fake = FakeLago.from_seed_file(path, api_key="k")
    assert [c["name"] for c in fake.customers] == ["Org"]
    assert [(s["external_id"], s["status"]) for s in fake.subscriptions] == [("org", "active")]
    assert len(fake.invoices) == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(FakeLagoError, match="not valid JSON"):
        FakeLago.from_seed_file(bad)
    with pytest.raises(FakeLagoError, match="cannot read"):
        FakeLago.from_seed_file(tmp_path / "missing.json")
    bad.write_text(json.dumps({"plans": [{"code": "p", "charges": [{"billable_metric_code": "ghost"}]}]}))
    with pytest.raises(FakeLagoError, match="billable_metric_not_found"):
        FakeLago.from_seed_file(bad)
    with pytest.raises(FakeLagoError, match="unknown seed key"):
        FakeLago().seed({"coupons": []})  # (Lago's coupon definitions: not seeded)


async def test_middleware_wraps_app_and_requests_are_still_logged(fake: FakeLago) -> None:
    """add_middleware wraps the app; a middleware answering itself is still recorded."""
    seen: list[str] = []

    def factory(app: Any) -> Any:
        async def middleware(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                seen.append(scope["path"])
                if scope["path"] == "/api/v1/events":
                    await send({"type": "http.response.start", "status": 503, "headers": []})
                    await send({"type": "http.response.body", "body": b""})
                    return
            await app(scope, receive, send)

        return middleware

    fake.add_middleware(factory)
    async with fake.client() as c:
        assert (await c.post("/api/v1/events", json={"event": {}})).status_code == 503
        assert (await c.get("/api/v1/customers")).status_code == 200
    assert seen == ["/api/v1/events", "/api/v1/customers"]
    assert [r.status for r in fake.requests] == [503, 200]


async def test_webhook_dispatcher_receives_emitted_webhooks(fake: FakeLago) -> None:
    """With a dispatcher set, emitted webhooks go to it and are still recorded."""
    calls: list[tuple[str, str, Any]] = []

    class Dispatcher:
        def emit(self, webhook_type: str, object_type: str, obj: Any) -> None:
            calls.append((webhook_type, object_type, obj))

    fake.webhook_dispatcher = Dispatcher()
    customer = fake.add_customer("org")
    assert calls == [("customer.created", "customer", customer)]
    envelope = fake.emitted_webhooks[0]
    assert envelope["organization_id"] == fake.organization_id
    assert envelope["customer"] == customer


async def test_list_filters_lago_documents_are_applied(client: httpx.AsyncClient, fake: FakeLago) -> None:
    """Customers by metadata, invoices by currency, issuing date and amount: the emulator listed everything."""
    gold = [{"key": "tier", "value": "gold", "display_in_invoice": False}]
    await client.post("/api/v1/customers", json={"customer": {"external_id": "fa", "metadata": gold}})
    await client.post("/api/v1/customers", json={"customer": {"external_id": "fb"}})
    r = await client.get("/api/v1/customers", params={"metadata[tier]": "gold"})
    assert [c["external_id"] for c in r.json()["customers"]] == ["fa"]
    fake.add_invoice("fa", currency="EUR", issuing_date="2026-01-05", total_amount_cents=100)
    fake.add_invoice("fb", currency="USD", issuing_date="2026-02-05", total_amount_cents=900)
    for params, expected in (
        ({"currency": "EUR"}, ["EUR"]),
        ({"issuing_date_from": "2026-02-01"}, ["USD"]),
        ({"issuing_date_to": "2026-01-31"}, ["EUR"]),
        ({"amount_from": "500"}, ["USD"]),
        ({"amount_to": "500"}, ["EUR"]),
    ):
        r = await client.get("/api/v1/invoices", params=params)
        assert [i["currency"] for i in r.json()["invoices"]] == expected, params
