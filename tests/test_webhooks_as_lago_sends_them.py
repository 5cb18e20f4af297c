"""The webhook receiver fed what Lago sends: every webhook of Lago's OpenAPI spec, its payload built from the spec's own
examples, signed as Lago signs it (HMAC over the raw body, and JWT through the emulator), with the quota effect each
type has and the org each one names; and an ``invalidate=`` that is a plain function (as handlers may be), in
``LagoWebhooks`` and in ``billing_routes``.

Real ASGI apps through ``httpx.ASGITransport``; Lago through the emulator (``FakeLago``) where it sends the webhooks.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount, Route

from _openapi import SPEC_PATH
from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._routes import billing_routes
from lago_org_billing._webhooks import LagoWebhooks, WebhookEvent, sign_hmac
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._webhooks import WebhookDispatcher

pytestmark = pytest.mark.anyio

HMAC_KEY = "3f0e8a8e-as-lago-sends-them"
LAGO_URL = "http://lago.as-sent"
PATH = "/webhooks/lago"
SETTINGS = BillingSettings(api_url=LAGO_URL, api_key="as-sent-api-key", max_retries=0, webhook_hmac_key=HMAC_KEY)

#: Types after which the org's quota state is dropped (or its usage marked due): its subscription, or its usage.
PER_ORG = {"alert.triggered"}  # (and every ``subscription.*``, below)
#: Types after which every org's is: plans and features (entitlements) are shared by every org on them.
ORG_WIDE = {"plan.updated", "plan.deleted", "feature.created", "feature.updated", "feature.deleted"}


# ------------------------------------------------------------------------------------ payloads from the spec


def _example(spec: dict[str, Any], schema: Any, depth: int = 0) -> Any:
    """A value of ``schema`` made of the spec's examples (objects field by field, arrays of one item)."""
    schemas = spec["components"]["schemas"]
    while isinstance(schema, dict) and "$ref" in schema:
        schema = schemas[schema["$ref"].rsplit("/", 1)[-1]]
    if not isinstance(schema, dict) or depth > 8:
        return None
    kind = schema.get("type")
    kind = next((k for k in kind if k != "null"), None) if isinstance(kind, list) else kind
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            value = _example(spec, part, depth + 1)
            if isinstance(value, dict):
                merged.update(value)
        return merged
    for key in ("oneOf", "anyOf"):
        if key in schema:
            branches = [branch for branch in schema[key] if branch.get("type") != "null"]
            return _example(spec, branches[0], depth + 1) if branches else None
    if kind == "object" or "properties" in schema:
        return {name: _example(spec, sub, depth + 1) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        return [_example(spec, schema.get("items", {}), depth + 1)]
    if "example" in schema:
        return schema["example"]
    return schema["enum"][0] if "enum" in schema else None


@functools.lru_cache(maxsize=1)
def spec_webhooks() -> dict[str, bytes]:
    """Every webhook of Lago's OpenAPI spec: its type -> its body as Lago sends it (compact JSON, UTF-8)."""
    with SPEC_PATH.open("rb") as file:
        spec = yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    bodies: dict[str, bytes] = {}
    for item in spec["webhooks"].values():
        payload = _example(spec, item["post"]["requestBody"]["content"]["application/json"]["schema"])
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        bodies[payload["webhook_type"]] = body
    return bodies


def hmac_headers(body: bytes, unique_key: str | None = None) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Lago-Signature": sign_hmac(body, HMAC_KEY),
        "X-Lago-Signature-Algorithm": "hmac",
        "X-Lago-Unique-Key": unique_key or str(uuid.uuid4()),
    }


def envelope(webhook_type: str, object_type: str, obj: dict[str, Any]) -> bytes:
    payload: dict[str, Any] = {"webhook_type": webhook_type, "object_type": object_type, "organization_id": "lago-org"}
    payload[object_type] = obj
    return json.dumps(payload, separators=(",", ":")).encode()


def app_for(receiver: LagoWebhooks) -> Starlette:
    return Starlette(routes=[Route(PATH, receiver, methods=["POST"])])


@pytest.fixture
async def post() -> AsyncIterator[Callable[..., Any]]:
    clients: list[httpx.AsyncClient] = []

    async def send(receiver: LagoWebhooks, body: bytes, headers: dict[str, str]) -> httpx.Response:
        transport = httpx.ASGITransport(app=app_for(receiver), raise_app_exceptions=False)  # a crash: a 500, as Lago
        client = httpx.AsyncClient(transport=transport, base_url="http://app")
        clients.append(client)
        return await client.post(PATH, content=body, headers=headers)

    yield send
    for client in clients:
        await client.aclose()


class Recorder:
    """An ``invalidate=`` target that records what it was told, and a handler of every type."""

    def __init__(self) -> None:
        self.invalidated: list[tuple[str, str]] = []
        self.everyone: list[str] = []
        self.events: list[WebhookEvent] = []
        self.current = ""

    async def handler(self, event: WebhookEvent) -> None:
        self.events.append(event)

    async def invalidate(self, org_id: str) -> None:
        self.invalidated.append((self.current, org_id))

    async def invalidate_all(self) -> None:
        self.everyone.append(self.current)


# -------------------------------------------------------------------------- every type the spec describes


async def test_every_webhook_of_lagos_spec_has_its_quota_effect_on_the_org_it_names(post: Any) -> None:
    """Each webhook of Lago's spec, its body made of the spec's examples and HMAC-signed, is answered 200 (Lago stops
    retrying); ``subscription.*`` and ``alert.triggered`` drop the quota state of the org their object's
    ``external_customer_id`` names (not its subscription id, mapped or not by the template), plans and features
    every org's, and the rest (customers, invoices, wallets, fees, payments...: nothing the gate reads) nothing."""
    bodies = spec_webhooks()
    assert ORG_WIDE <= bodies.keys() and PER_ORG <= bodies.keys()
    per_org = PER_ORG | {t for t in bodies if t.startswith("subscription.")}
    assert {"subscription.started", "subscription.terminated", "subscription.trial_ended"} <= per_org
    rec = Recorder()
    receiver = LagoWebhooks(
        SETTINGS.replace(subscription_id_template="sub_{org_id}"), invalidate=rec, handlers={"*": rec.handler}
    )
    for webhook_type, body in bodies.items():
        rec.current = webhook_type
        response = await post(receiver, body, hmac_headers(body))
        assert response.status_code == 200, (webhook_type, response.text)
        assert response.json()["status"] == "processed", webhook_type
    expected = []
    for webhook_type in sorted(per_org):
        payload = json.loads(bodies[webhook_type])
        expected.append((webhook_type, payload[payload["object_type"]]["external_customer_id"]))
    assert sorted(rec.invalidated) == expected
    assert sorted(rec.everyone) == sorted(ORG_WIDE)
    orgs = {event.webhook_type: event.org_id for event in rec.events}
    assert orgs["event.error"] == "1234567890"  # (its event's external_subscription_id, "sub_1234567890", mapped)
    assert orgs["customer.updated"] == json.loads(bodies["customer.updated"])["customer"]["external_id"]
    assert orgs["plan.updated"] is None and orgs["events.errors"] is None


async def test_the_emulators_signed_deliveries_of_an_upgrade_unblock_the_org_once_each() -> None:
    """An org at its plan's limit upgraded in Lago: the emulator's JWT-signed ``subscription.terminated`` and
    ``subscription.started`` (each retried by Lago after a first attempt that failed) reach the receiver, the gate reads
    the new plan at once, and each delivery's handlers ran once although sent twice."""
    fake = FakeLago(api_key="as-sent-key")
    fake.add_billable_metric("api_call")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.01"}}
    fake.add_plan("starter", amount_cents=1000, charges=[charge])
    fake.add_plan("pro", amount_cents=5000, charges=[charge])
    fake.add_customer("org_a")
    fake.add_subscription("org_a", "starter")
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key=fake.api_key,
        max_retries=0,
        usage_cache_ttl=3600,
        plan_limits={"starter": {"max_api_calls": 1}, "pro": {"max_api_calls": 100}},
    )
    runs: list[str] = []
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig())
        dispatcher = fake.webhook_dispatcher
        assert isinstance(dispatcher, WebhookDispatcher)
        receiver = LagoWebhooks(client=lago, invalidate=gate, organization_id=dispatcher.organization_id)

        @receiver.on("subscription.terminated", "subscription.started")
        async def once(event: WebhookEvent) -> None:
            runs.append(event.unique_key or "")

        inner = app_for(receiver)
        first_attempts: set[str] = set()

        async def lost_answer(scope: Any, receive: Any, send: Any) -> None:
            """Lago's first attempt of each delivery processed, its answer lost (a 502 from a proxy): Lago retries."""
            key = dict(scope["headers"]).get(b"x-lago-unique-key", b"").decode()
            if key in first_attempts:
                await inner(scope, receive, send)
                return
            first_attempts.add(key)
            sent: list[Any] = []

            async def keep(message: Any) -> None:
                sent.append(message)

            await inner(scope, receive, keep)
            await send({"type": "http.response.start", "status": 502, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        dispatcher.configure(app=lost_answer, signature="jwt")
        async with anyio.create_task_group() as tg:
            await tg.start(gate.run)
            decision = await gate.check("org_a")
            gate.settle("org_a", decision, tokens=0, billed=True)
            assert not (await gate.check("org_a")).allowed
            await lago.create_subscription(external_customer_id="org_a", plan_code="pro", external_id="org_a")
            sent = await dispatcher.deliver_pending()  # (with the old subscription's invoice.created)
            deliveries = [d for d in sent if d.webhook_type.startswith("subscription.")]
            assert [(d.webhook_type, d.history) for d in deliveries] == [
                ("subscription.terminated", [502, 200]),
                ("subscription.started", [502, 200]),
            ]
            assert (await gate.check("org_a")).allowed
            tg.cancel_scope.cancel()
        await gate.aclose()
    assert sorted(runs) == sorted(d.unique_key for d in deliveries)
    assert receiver.stats["duplicates"] == len(sent)  # (every retry: its first attempt was processed)


# ------------------------------------------------------------------ invalidate= a plain function, as handlers


async def test_a_plain_function_as_invalidate_drops_the_org_and_lets_the_handlers_run(post: Any) -> None:
    """``invalidate=`` a plain function (a cache of one's own, ``def drop(org_id)``) was called, then awaited: its
    ``None`` raised a TypeError, so every subscription webhook was answered 500 (Lago retried it 3 times, then marked it
    failed), logged as the quota store failing, and the handlers of its type never ran. It is called, and awaited
    only when it returns an awaitable."""
    dropped: list[str] = []
    seen: list[str] = []

    def drop(org_id: str) -> None:
        dropped.append(org_id)

    receiver = LagoWebhooks(SETTINGS, invalidate=drop, handlers={"subscription.started": lambda e: seen.append("h")})
    body = envelope("subscription.started", "subscription", {"external_id": "acme", "external_customer_id": "acme"})
    response = await post(receiver, body, hmac_headers(body))
    assert (response.status_code, response.json()["status"]) == (200, "processed")
    assert dropped == ["acme"] and seen == ["h"]
    assert receiver.stats["failed"] == 0


async def test_an_invalidate_target_with_plain_methods_takes_plan_and_subscription_webhooks(post: Any) -> None:
    """An ``invalidate=`` object whose ``invalidate``/``invalidate_all`` are plain methods (a cache of one's own):
    ``subscription.updated`` and ``plan.updated`` reach them, answered 200, rather than a 500 Lago retries until it
    gives up."""

    class Cache:
        def __init__(self) -> None:
            self.orgs: list[str] = []
            self.everyone = 0

        def invalidate(self, org_id: str) -> None:
            self.orgs.append(org_id)

        def invalidate_all(self) -> None:
            self.everyone += 1

    cache = Cache()
    receiver = LagoWebhooks(SETTINGS, invalidate=cache)
    sub = envelope("subscription.updated", "subscription", {"external_id": "acme", "external_customer_id": "acme"})
    plan = envelope("plan.updated", "plan", {"code": "pro"})
    for body in (sub, plan):
        response = await post(receiver, body, hmac_headers(body))
        assert (response.status_code, response.json()["status"]) == (200, "processed"), response.text
    assert (cache.orgs, cache.everyone) == (["acme"], 1)


async def test_billing_routes_with_a_plain_invalidate_function_warn_of_no_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``billing_routes(invalidate=drop)`` with a plain function: a plan change dropped the org (the function ran) and
    then logged "Could not invalidate the quota state" with a TypeError traceback at every write, for a cache that was
    dropped. It is called as ``LagoWebhooks`` calls it now: nothing is logged."""
    fake = FakeLago(api_key="as-sent-routes")
    fake.add_billable_metric("api_call")
    fake.add_plan("starter", amount_cents=1000, charges=[])
    fake.add_plan("pro", amount_cents=5000, charges=[])
    fake.add_customer("org_acme")
    fake.add_subscription("org_acme", "starter")
    dropped: list[str] = []

    def drop(org_id: str) -> None:
        dropped.append(org_id)

    def admin(request: Request, org_id: str) -> bool:
        return org_id == "org_acme"

    settings = BillingSettings(api_url=fake.base_url, api_key=fake.api_key, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=admin, invalidate=drop)
        app = Starlette(routes=[Mount("/billing", app=router)])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            with caplog.at_level(logging.WARNING, logger="lago_org_billing"):
                response = await client.put("/billing/organizations/org_acme/subscription", json={"plan_code": "pro"})
    assert response.status_code == 200, response.text
    assert dropped == ["org_acme"]
    assert "Could not invalidate" not in caplog.text


# ------------------------------------------------------------------------------- a replayed signed delivery


async def test_a_replayed_old_subscription_started_does_not_reopen_a_terminated_org() -> None:
    """A captured signed ``subscription.started`` (HMAC signs the body only: no timestamp) replayed after the org's
    subscription ended: under its old ``X-Lago-Unique-Key`` it is a duplicate (200, nothing run); under a new one, or
    none, it runs again, and the gate, which reads Lago rather than the payload, keeps the org without a
    subscription."""
    fake = FakeLago(api_key="as-sent-replay")
    fake.add_billable_metric("api_call")
    fake.add_plan("pro", amount_cents=5000, charges=[])
    fake.add_customer("org_a")
    settings = BillingSettings(
        api_url=fake.base_url, api_key=fake.api_key, max_retries=0, plan_limits={"pro": {"max_api_calls": 100}}
    )
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig())
        receiver = LagoWebhooks(settings.replace(webhook_hmac_key=HMAC_KEY), invalidate=gate)
        dispatcher = fake.webhook_dispatcher
        assert isinstance(dispatcher, WebhookDispatcher)
        dispatcher.configure(app=app_for(receiver), signature="hmac", hmac_key=HMAC_KEY)
        async with anyio.create_task_group() as tg:
            await tg.start(gate.run)
            await lago.create_subscription(external_customer_id="org_a", plan_code="pro", external_id="org_a")
            [started] = [d for d in await dispatcher.deliver_pending() if d.webhook_type == "subscription.started"]
            assert (await gate.check("org_a")).allowed
            await lago.terminate_subscription("org_a")
            assert all(d.succeeded for d in await dispatcher.deliver_pending())
            blocked = await gate.check("org_a")
            assert (blocked.allowed, blocked.status) == (False, 402)
            transport = httpx.ASGITransport(app=app_for(receiver))
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
                same = await c.post(PATH, content=started.body, headers=dispatcher.headers_for(started))
                assert (same.status_code, same.json()["status"]) == (200, "duplicate")
                for key in (str(uuid.uuid4()), None):
                    headers = hmac_headers(started.body, key)
                    if key is None:
                        del headers["X-Lago-Unique-Key"]
                    again = await c.post(PATH, content=started.body, headers=headers)
                    assert (again.status_code, again.json()["status"]) == (200, "processed")
                    replayed = await gate.check("org_a")
                    assert (replayed.allowed, replayed.status) == (False, 402)
            tg.cancel_scope.cancel()
        await gate.aclose()


async def test_a_webhook_over_max_body_size_is_refused_with_a_warning_naming_the_setting(
    post: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A webhook larger than ``max_body_size`` (a large ``invoice.created``) is answered 413 and said in the log with
    the setting to raise: it was answered 413 without a word, Lago retried and gave up, and nothing here told why."""
    receiver = LagoWebhooks(SETTINGS, invalidate=Recorder(), max_body_size=200)
    body = envelope("invoice.created", "invoice", {"lago_id": "inv", "fees": [{"item": "x" * 40}] * 10})
    with caplog.at_level(logging.WARNING, logger="lago_org_billing"):
        response = await post(receiver, body, hmac_headers(body))
    assert response.status_code == 413
    said = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("answered 413" in message and "max_body_size (200 bytes)" in message for message in said), said
