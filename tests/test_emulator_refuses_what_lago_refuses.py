"""The Lago emulator refuses what Lago refuses, with Lago's answer: bodies holding text that is not Unicode (a lone
surrogate, 400 as Rails answers invalid parameter encoding) and entitlement values Lago's ``validate_value`` refuses
(422 ``validation_errors``)."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lago_org_billing.testing import FakeLago, FakeLagoError
from lago_org_billing.testing._webhooks import install_webhooks

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"
NOT_JSON = {"status": 400, "error": "BadRequest: the request body is not valid JSON"}


def seeded() -> FakeLago:
    """An emulator with a metric, a feature (one privilege of each type), a plan and a subscribed customer."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call")
    fake.add_feature(
        "seats",
        privileges=[
            {"code": "max", "value_type": "integer"},
            {"code": "label", "value_type": "string"},
            {"code": "sso", "value_type": "boolean"},
            {"code": "idp", "value_type": "select", "config": {"select_options": ["google", "okta", "5"]}},
        ],
    )
    fake.add_plan("pro", entitlements={"seats": {"max": 10, "label": "ten"}})
    fake.add_customer("acme")
    fake.add_subscription("acme", "pro", external_id="sub")
    return fake


@pytest.fixture
def fake() -> FakeLago:
    """A seeded emulator."""
    return seeded()


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to the emulator in process."""
    async with fake.client() as client:
        yield client


def raw_post(client: httpx.AsyncClient, path: str, body: bytes) -> Any:
    return client.post(path, content=body, headers={"content-type": "application/json"})


# --------------------------------------------------------------------------------------- lone surrogates (400)

#: Bodies that are valid JSON holding a lone surrogate (as a JSON escape, raw UTF-8-encoded bytes, in a key, deep)
LONE_SURROGATE_BODIES: list[tuple[str, bytes]] = [
    ("/api/v1/customers", b'{"customer":{"external_id":"new","name":"\\ud800"}}'),
    ("/api/v1/customers", b'{"customer":{"external_id":"new","name":"a\\uDFFFb"}}'),
    ("/api/v1/customers", b'{"customer":{"external_id":"new","metadata":[{"key":"\\udc00","value":"v"}]}}'),
    ("/api/v1/customers", b'{"customer":{"external_id":"new","\\ud83d":"x"}}'),
    ("/api/v1/customers", b'{"customer":{"external_id":"new","name":"\xed\xa0\x80"}}'),
    ("/api/v1/customers", b'{"customer":{"external_id":"\\ude00\\ud83d"}}'),
    (
        "/api/v1/events",
        b'{"event":{"transaction_id":"t1","external_subscription_id":"sub","code":"api_call",'
        b'"properties":{"deep":[[{"k":"\\ud800"}]]}}}',
    ),
    (
        "/api/v1/plans",
        b'{"plan":{"code":"new","name":"\\ud800","interval":"monthly","amount_cents":0,"amount_currency":"USD"}}',
    ),
    ("/api/v1/features", b'{"feature":{"code":"new","privileges":[{"code":"\\ud800"}]}}'),
]


@pytest.mark.parametrize(("path", "body"), LONE_SURROGATE_BODIES)
async def test_a_body_holding_a_lone_surrogate_is_refused_as_lago_does(
    fake: FakeLago, client: httpx.AsyncClient, path: str, body: bytes
) -> None:
    """A JSON body holding a lone surrogate anywhere gets Lago's 400 and stores nothing; reads still serialize."""
    customers, events, plans = len(fake.customers), len(fake.events), len(fake.store.plans)
    webhooks = len(fake.emitted_webhooks)
    response = await raw_post(client, path, body)
    assert response.status_code == 400
    assert response.json() == NOT_JSON
    assert (len(fake.customers), len(fake.events), len(fake.store.plans)) == (customers, events, plans)
    assert len(fake.emitted_webhooks) == webhooks
    for read in ("/api/v1/customers", "/api/v1/features", "/api/v1/plans"):
        assert (await client.get(read)).status_code == 200


async def test_a_lone_surrogate_is_refused_before_a_configured_webhook_endpoint_gets_it() -> None:
    """With a webhook endpoint configured, a customer named with a lone surrogate gets 400 (it raised in process)."""
    received: list[bytes] = []

    async def endpoint(request: Request) -> Response:
        received.append(await request.body())
        return Response(status_code=200)

    fake = seeded()
    install_webhooks(fake, app=Starlette(routes=[Route("/webhooks/lago", endpoint, methods=["POST"])]))
    async with fake.client() as client:
        response = await raw_post(client, "/api/v1/customers", b'{"customer":{"external_id":"x","name":"\\ud800"}}')
        assert (response.status_code, response.json()) == (400, NOT_JSON)
        assert (await client.get("/api/v1/customers/x")).status_code == 404
        fine = await client.post("/api/v1/customers", json={"customer": {"external_id": "y", "name": "ok"}})
        assert fine.status_code == 200
    await fake.webhook_dispatcher.deliver_pending()  # type: ignore[union-attr]
    assert received and all(b'"x"' not in body for body in received)


async def test_a_surrogate_pair_is_one_character_and_accepted(client: httpx.AsyncClient) -> None:
    """An escaped surrogate pair (an emoji) is valid Unicode: stored and answered back, not refused."""
    response = await raw_post(client, "/api/v1/customers", b'{"customer":{"external_id":"e","name":"\\ud83d\\ude00"}}')
    assert response.status_code == 200
    assert response.json()["customer"]["name"] == "\U0001f600"
    assert (await client.get("/api/v1/customers/e")).json()["customer"]["name"] == "\U0001f600"


#: Python helper calls given a lone surrogate somewhere in their input
HELPER_CALLS: list[tuple[str, Callable[[FakeLago], Any]]] = [
    ("add_customer name", lambda f: f.add_customer("new", name="\ud800")),
    ("add_customer id", lambda f: f.add_customer("\udfff")),
    ("add_customer metadata key", lambda f: f.add_customer("new", metadata=[{"key": "\ud800", "value": "v"}])),
    ("add_billable_metric", lambda f: f.add_billable_metric("m", name="\ud800")),
    ("add_feature", lambda f: f.add_feature("f", privileges=[{"code": "p", "name": "\udc00"}])),
    ("add_plan", lambda f: f.add_plan("p2", description="\ud800")),
    ("add_plan entitlements", lambda f: f.add_plan("p2", entitlements={"seats": {"label": "\ud800"}})),
    ("add_subscription", lambda f: f.add_subscription("acme", "pro", external_id="s\ud800")),
    ("add_invoice", lambda f: f.add_invoice("acme", number="\ud800")),
    ("add_wallet", lambda f: f.add_wallet("acme", name="\ud800")),
    ("add_applied_coupon", lambda f: f.add_applied_coupon("acme", "c\ud800", amount_cents=100)),
    ("add_credit_note", lambda f: f.add_credit_note(f.add_invoice("acme")["lago_id"], reason="\ud800")),
    ("seed", lambda f: f.seed({"customers": [{"external_id": "new", "name": "\ud800"}]})),
    ("seed key", lambda f: f.seed({"customers": [{"external_id": "new", "\ud800": "x"}]})),
]


@pytest.mark.parametrize("call", [c for _, c in HELPER_CALLS], ids=[name for name, _ in HELPER_CALLS])
def test_a_python_helper_given_a_lone_surrogate_raises_fake_lago_error(call: Callable[[FakeLago], Any]) -> None:
    """The add_* helpers and seed raise FakeLagoError (400, Lago's body) for a lone surrogate and store nothing."""
    fake = seeded()
    customers, subscriptions, plans = len(fake.customers), len(fake.subscriptions), len(fake.store.plans)
    with pytest.raises(FakeLagoError) as caught:
        call(fake)
    assert (caught.value.status, caught.value.body) == (400, NOT_JSON)
    assert (len(fake.customers), len(fake.subscriptions), len(fake.store.plans)) == (customers, subscriptions, plans)
    json.dumps(fake.customers)  # (what is stored still serializes)


def test_a_seed_file_holding_a_lone_surrogate_raises_fake_lago_error(tmp_path: Path) -> None:
    """A seed file with a lone surrogate escape is refused as the API would refuse it, naming the file."""
    path = tmp_path / "seed.json"
    path.write_text('{"customers": [{"external_id": "acme", "name": "\\ud800"}]}', encoding="utf-8")
    with pytest.raises(FakeLagoError, match=r"seed\.json") as caught:
        FakeLago.from_seed_file(path)
    assert caught.value.status == 400


# ------------------------------------------------------------------------------------- privilege values (422)


def invalid(field: str, code: str = "value_is_invalid") -> dict[str, Any]:
    return {
        "status": 422,
        "error": "Unprocessable Entity",
        "code": "validation_errors",
        "error_details": {field: [code]},
    }


#: (privilege code, value) pairs Lago refuses, with the error_details field and code it answers
REFUSED: list[tuple[str, Any, str, str]] = [
    ("max", "--5", "max_privilege_value", "value_is_invalid"),
    ("max", "\u00b2", "max_privilege_value", "value_is_invalid"),
    ("max", "\u0663", "max_privilege_value", "value_is_invalid"),
    ("max", "007", "max_privilege_value", "value_is_invalid"),
    ("max", " 300", "max_privilege_value", "value_is_invalid"),
    ("max", "300 ", "max_privilege_value", "value_is_invalid"),
    ("max", "+5", "max_privilege_value", "value_is_invalid"),
    ("max", "-0", "max_privilege_value", "value_is_invalid"),
    ("max", "1_000", "max_privilege_value", "value_is_invalid"),
    ("max", "5\n", "max_privilege_value", "value_is_invalid"),
    ("max", "", "max_privilege_value", "value_is_invalid"),
    ("max", "9" * 5000, "max_privilege_value", "value_is_invalid"),
    ("max", 5.0, "max_privilege_value", "value_is_invalid"),
    ("max", True, "max_privilege_value", "value_is_invalid"),
    ("label", 5, "label_privilege_value", "value_is_invalid"),
    ("label", True, "label_privilege_value", "value_is_invalid"),
    ("label", 1.5, "label_privilege_value", "value_is_invalid"),
    ("label", ["a"], "label_privilege_value", "value_is_invalid"),
    ("label", "", "privilege.value", "value_is_mandatory"),
    ("label", " \t", "privilege.value", "value_is_mandatory"),
    ("label", None, "privilege.value", "value_is_mandatory"),
    ("max", None, "privilege.value", "value_is_mandatory"),
    ("sso", "yes", "sso_privilege_value", "value_is_invalid"),
    ("idp", "github", "idp_privilege_value", "value_not_in_select_options"),
    ("idp", 5, "idp_privilege_value", "value_not_in_select_options"),
]

#: (privilege code, value given, value answered) Lago accepts
ACCEPTED: list[tuple[str, Any, Any]] = [
    ("max", "5", 5),
    ("max", "-5", -5),
    ("max", "0", 0),
    ("max", -7, -7),
    ("max", "12345678901234567890", 12345678901234567890),
    ("label", "5", "5"),
    ("label", " x ", " x "),
    ("sso", "false", False),
    ("idp", "5", "5"),
]

#: The routes taking privilege values: (method, path, body builder)
ROUTES: list[tuple[str, str, Callable[[str, Any], dict[str, Any]]]] = [
    ("POST", "/api/v1/plans/pro/entitlements", lambda p, v: {"entitlements": {"seats": {p: v}}}),
    ("PATCH", "/api/v1/plans/pro/entitlements", lambda p, v: {"entitlements": {"seats": {p: v}}}),
    ("PATCH", "/api/v1/subscriptions/sub/entitlements", lambda p, v: {"entitlements": {"seats": {p: v}}}),
    (
        "POST",
        "/api/v1/plans",
        lambda p, v: {
            "plan": {
                "code": "new",
                "name": "new",
                "interval": "monthly",
                "amount_cents": 0,
                "amount_currency": "USD",
                "entitlements": {"seats": {p: v}},
            }
        },
    ),
]


#: Every refused value on the three entitlement routes, one of each answer on plan creation (the same check)
REFUSED_CALLS = [(route, *case) for route in ROUTES[:3] for case in REFUSED] + [
    (ROUTES[3], *case) for case in REFUSED if case[0] in ("max", "idp") and case[1] in ("--5", "github", None)
]


@pytest.mark.parametrize(
    ("route", "privilege", "value", "field", "code"),
    REFUSED_CALLS,
    ids=[f"{route[0]} {route[1]} {privilege}={value!r}"[:80] for route, privilege, value, _, _ in REFUSED_CALLS],
)
async def test_a_privilege_value_lago_refuses_gets_its_422(
    client: httpx.AsyncClient,
    route: tuple[str, str, Callable[[str, Any], dict[str, Any]]],
    privilege: str,
    value: Any,
    field: str,
    code: str,
) -> None:
    """A privilege value Lago's validate_value refuses is answered 422 validation_errors (never a 500 or a 200)."""
    method, path, build = route
    before = (await client.get("/api/v1/plans/pro/entitlements")).json()
    response = await client.request(method, path, json=build(privilege, value))
    assert response.status_code == 422, response.text
    assert response.json() == invalid(field, code)
    assert (await client.get("/api/v1/plans/pro/entitlements")).json() == before


@pytest.mark.parametrize("route", ROUTES[:3], ids=[f"{m} {p}" for m, p, _ in ROUTES[:3]])
@pytest.mark.parametrize(("privilege", "value", "answered"), ACCEPTED)
async def test_a_privilege_value_lago_accepts_is_stored_as_its_type(
    client: httpx.AsyncClient,
    route: tuple[str, str, Callable[[str, Any], dict[str, Any]]],
    privilege: str,
    value: Any,
    answered: Any,
) -> None:
    """A privilege value Lago accepts is stored and answered cast to the privilege's type."""
    method, path, build = route
    response = await client.request(method, path, json=build(privilege, value))
    assert response.status_code == 200, response.text
    listed = (await client.get("/api/v1/subscriptions/sub/entitlements")).json()["entitlements"]
    values = {p["code"]: p["value"] for e in listed for p in e["privileges"]}
    assert values[privilege] == answered


def test_the_python_helpers_refuse_a_privilege_value_as_the_api_does() -> None:
    """add_plan with an integer privilege valued "--5" raises FakeLagoError (422), not ValueError."""
    fake = seeded()
    with pytest.raises(FakeLagoError) as caught:
        fake.add_plan("p2", entitlements={"seats": {"max": "--5"}})
    assert (caught.value.status, caught.value.body) == (422, invalid("max_privilege_value"))


async def test_a_privilege_created_without_value_type_is_a_string_one(client: httpx.AsyncClient) -> None:
    """A privilege given no value_type is a string privilege, as Lago's default (``attribute :value_type, default:
    "string"``; the spec: "Default: string"): a number is refused for it, its text is kept as text."""
    created = await client.post("/api/v1/features", json={"feature": {"code": "tier", "privileges": [{"code": "t"}]}})
    assert created.status_code == 200
    assert created.json()["feature"]["privileges"][0]["value_type"] == "string"
    refused = await client.post("/api/v1/plans/pro/entitlements", json={"entitlements": {"tier": {"t": 5}}})
    assert (refused.status_code, refused.json()) == (422, invalid("t_privilege_value"))
    kept = await client.post("/api/v1/plans/pro/entitlements", json={"entitlements": {"tier": {"t": "5"}}})
    assert kept.status_code == 200
    assert kept.json()["entitlements"][0]["privileges"][0]["value"] == "5"


# ------------------------------------------------------------------------------------------- seeded differentials


def ruby_to_i(text: str) -> int:
    """Ruby ``String#to_i``: blanks skipped, a sign, then digits with single underscores between them; 0 if none."""
    i = 0
    while i < len(text) and text[i] in " \t\n\v\f\r":
        i += 1
    sign = -1 if text[i : i + 1] == "-" else 1
    i += text[i : i + 1] in ("-", "+")
    digits = ""
    while i < len(text):
        if text[i] in "0123456789":
            digits += text[i]
        elif not (text[i] == "_" and digits and text[i + 1 : i + 2] in tuple("0123456789")):
            break
        i += 1
    return sign * int(digits or "0")


def random_text(rng: random.Random, alphabet: str, longest: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_integer_privilege_text_is_kept_exactly_when_ruby_writes_it_back(seed: int) -> None:
    """Random text for an integer privilege is accepted exactly when ``value.to_i.to_s == value`` in Ruby."""
    rng = random.Random(seed)
    fake = seeded()
    async with fake.client() as client:
        for _ in range(60):
            text = random_text(rng, "0123456789-+_ \t\n\u00b2\u0663a", 5)
            response = await client.patch(
                "/api/v1/plans/pro/entitlements", json={"entitlements": {"seats": {"max": text}}}
            )
            if str(ruby_to_i(text)) == text:
                assert response.status_code == 200, text
            else:
                assert (response.status_code, response.json()) == (422, invalid("max_privilege_value")), repr(text)


def random_document(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value whose strings mix ASCII, other characters, surrogate pairs and (rarely) lone ones."""
    alphabet = "ab\u00e9\u4e2d\U0001f600" + ("\ud800\udfff" if rng.random() < 0.1 else "")
    kind = rng.randrange(4 if depth < 3 else 2)
    if kind == 0:
        return random_text(rng, alphabet, 3)
    if kind == 1:
        return rng.choice([1, 2.5, True, None])
    if kind == 2:
        return [random_document(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {random_text(rng, alphabet, 3): random_document(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_random_body_is_refused_as_not_json_exactly_when_it_holds_a_lone_surrogate(seed: int) -> None:
    """A random customer body, escaped or sent as raw bytes, gets the not-JSON 400 exactly when it holds a lone
    surrogate; whatever is accepted reads back."""
    rng = random.Random(seed)
    fake = seeded()
    async with fake.client() as client:
        for n in range(40):
            extra = random_document(rng)
            body = {"customer": {"external_id": f"c{n}", "metadata_extra": extra, "name": random_document(rng)}}
            if rng.random() < 0.5:
                raw = json.dumps(body).encode()  # (escapes every character that is not ASCII, surrogates too)
            else:
                raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
            response = await raw_post(client, "/api/v1/customers", raw)
            # (what the server reads: two escaped halves side by side are one character, raw surrogate bytes never)
            if encodable(json.loads(raw)):
                assert response.json() != NOT_JSON, raw
            else:
                assert (response.status_code, response.json()) == (400, NOT_JSON), raw
            assert (await client.get("/api/v1/customers")).status_code == 200


def test_a_helper_given_an_object_holding_itself_is_not_walked_for_ever() -> None:
    """The lone-surrogate check of a helper's input visits each container once: one holding itself ends."""
    fake = seeded()
    looped: dict[str, Any] = {"name": "\ud800"}
    looped["self"] = looped
    with pytest.raises(FakeLagoError):
        fake.add_invoice("acme", extra=looped)
