"""LagoWebhooks: JWT and HMAC verification, replays, dispatch, quota invalidation, emulator deliveries end to end."""

from __future__ import annotations

import base64
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from lago_org_billing import BillingSettings, ConfigurationError, LagoClient, _webhooks as webhooks_module
from lago_org_billing._identity import SCOPE_KEY
from lago_org_billing._webhooks import (
    DEFAULT_PROCESSING_TTL,
    LagoWebhooks,
    MemoryDedupe,
    RedisDedupe,
    WebhookEvent,
    org_from_subscription_id,
    resolve_org,
    sign_hmac,
)
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

HMAC_KEY = "0b6e5f3c-7c1d-4b1e-9d55-hmac-test-key"
LAGO_URL = "http://lago.test"
PATH = "/webhooks/lago"


@dataclass
class Keys:
    """An RSA key pair in PEM."""

    private: bytes
    public: bytes


def _keys() -> Keys:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return Keys(private, public)


@pytest.fixture(scope="module")
def keys() -> Keys:
    """Lago's signing key pair, generated for the test."""
    return _keys()


@pytest.fixture(scope="module")
def other_keys() -> Keys:
    """Another key pair (an attacker's, or Lago's next one)."""
    return _keys()


def ruby_base64(data: bytes) -> str:
    """Ruby's Base64.encode64: a newline every 60 characters (what Lago's public key endpoint returns)."""
    text = base64.b64encode(data).decode()
    return "".join(text[i : i + 60] + "\n" for i in range(0, len(text), 60))


@dataclass
class KeyServer:
    """A Lago stand-in serving ``/api/v1/webhooks/json_public_key``; counts fetches."""

    public: bytes
    status: int = 200
    fetches: int = 0

    def handler(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/webhooks/json_public_key"
        self.fetches += 1
        if self.status != 200:
            return httpx.Response(self.status, json={"status": self.status, "error": "Service Unavailable"})
        return httpx.Response(200, json={"webhook": {"public_key": ruby_base64(self.public)}})


SETTINGS = BillingSettings(api_url=LAGO_URL, api_key="secret-api-key", max_retries=0)


def key_client(server: KeyServer) -> LagoClient:
    """A LagoClient whose Lago is ``server``."""
    return LagoClient(SETTINGS, transport=httpx.MockTransport(server.handler))


@dataclass
class Calls:
    """What the receiver did: handler events and invalidated orgs."""

    events: list[WebhookEvent] = field(default_factory=list)
    invalidated: list[str] = field(default_factory=list)

    async def handler(self, event: WebhookEvent) -> None:
        self.events.append(event)

    async def invalidate(self, org_id: str) -> None:
        self.invalidated.append(org_id)


@pytest.fixture
def calls() -> Calls:
    """A recorder of handler calls and invalidations."""
    return Calls()


def app_for(webhooks: LagoWebhooks) -> Starlette:
    """The receiver mounted the documented way."""
    return Starlette(routes=[Route(PATH, webhooks, methods=["POST"])])


@pytest.fixture
async def post() -> AsyncIterator[Callable[..., Any]]:
    """``await post(webhooks, body, headers)``: one request to the receiver, in process."""
    clients: list[httpx.AsyncClient] = []

    async def send(webhooks: LagoWebhooks | ASGIApp, body: bytes, headers: dict[str, str]) -> httpx.Response:
        app = app_for(webhooks) if isinstance(webhooks, LagoWebhooks) else webhooks
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
        clients.append(client)
        return await client.post(PATH, content=body, headers=headers)

    yield send
    for client in clients:
        await client.aclose()


def envelope(webhook_type: str, object_type: str, obj: dict[str, Any]) -> bytes:
    """A Lago webhook body as Lago serializes it (compact JSON)."""
    payload = {
        "webhook_type": webhook_type,
        "object_type": object_type,
        "organization_id": "lago-org",
        object_type: obj,
    }
    return json.dumps(payload, separators=(",", ":")).encode()


SUB_STARTED = envelope(
    "subscription.started",
    "subscription",
    {"external_id": "org_acme", "external_customer_id": "org_acme", "plan_code": "pro", "status": "active"},
)


def hmac_headers(body: bytes, key: str = HMAC_KEY, unique_key: str | None = None) -> dict[str, str]:
    """Headers of an HMAC-signed delivery."""
    return {
        "Content-Type": "application/json",
        "X-Lago-Signature": sign_hmac(body, key),
        "X-Lago-Signature-Algorithm": "hmac",
        "X-Lago-Unique-Key": unique_key or str(uuid.uuid4()),
    }


def jwt_headers(body: bytes, private: bytes, issuer: str = LAGO_URL, unique_key: str | None = None) -> dict[str, str]:
    """Headers of a JWT-signed delivery."""
    token = jwt.encode({"data": body.decode(), "iss": issuer}, private, algorithm="RS256")
    return {
        "Content-Type": "application/json",
        "X-Lago-Signature": token,
        "X-Lago-Signature-Algorithm": "jwt",
        "X-Lago-Unique-Key": unique_key or str(uuid.uuid4()),
    }


def hmac_receiver(calls: Calls, **options: Any) -> LagoWebhooks:
    """A receiver in HMAC mode recording into ``calls``."""
    settings = SETTINGS.replace(webhook_hmac_key=HMAC_KEY)
    return LagoWebhooks(settings, invalidate=calls.invalidate, handlers={"*": calls.handler}, **options)


# ------------------------------------------------------------------------------------------------ HMAC


async def test_hmac_valid_webhook_is_dispatched(post: Any, calls: Calls) -> None:
    """A correctly signed HMAC webhook reaches the handler with its org, and invalidates the org's quota."""
    response = await post(hmac_receiver(calls), SUB_STARTED, hmac_headers(SUB_STARTED, unique_key="k-1"))
    assert response.status_code == 200
    assert response.json() == {
        "status": "processed",
        "unique_key": "k-1",
        "webhook_type": "subscription.started",
        "org_id": "org_acme",
    }
    [event] = calls.events
    assert (event.webhook_type, event.object_type, event.org_id, event.unique_key) == (
        "subscription.started",
        "subscription",
        "org_acme",
        "k-1",
    )
    assert event.object["plan_code"] == "pro"
    assert calls.invalidated == ["org_acme"]


@pytest.mark.parametrize(
    ("case", "headers"),
    [
        ("missing", {"X-Lago-Unique-Key": "k"}),
        ("wrong key", hmac_headers(SUB_STARTED, key="not-the-key")),
        ("tampered", hmac_headers(SUB_STARTED.replace(b'"pro"', b'"free"'))),
        ("garbage", {"X-Lago-Signature": "!!!", "X-Lago-Signature-Algorithm": "hmac"}),
        ("jwt sent to an hmac receiver", {"X-Lago-Signature": "a.b.c", "X-Lago-Signature-Algorithm": "jwt"}),
    ],
)
async def test_hmac_bad_signatures_are_401(post: Any, calls: Calls, case: str, headers: dict[str, str]) -> None:
    """Missing, wrong-key, tampered or wrong-algorithm signatures: 401 and nothing dispatched."""
    receiver = hmac_receiver(calls)
    response = await post(receiver, SUB_STARTED, headers)
    assert response.status_code == 401, case
    assert calls.events == [] and calls.invalidated == []
    assert receiver.stats["rejected"] == 1


async def test_wrong_algorithm_says_what_to_configure(post: Any, calls: Calls) -> None:
    """A JWT webhook sent to an HMAC receiver is refused with advice on the setting to change."""
    response = await post(
        hmac_receiver(calls), SUB_STARTED, {"X-Lago-Signature": "x", "X-Lago-Signature-Algorithm": "jwt"}
    )
    assert response.status_code == 401
    assert "LAGO_WEBHOOK_HMAC_KEY" in response.json()["detail"]


async def test_hmac_replay_is_a_noop(post: Any, calls: Calls) -> None:
    """The same X-Lago-Unique-Key twice: the second answer is 200 'duplicate' and nothing runs again."""
    receiver = hmac_receiver(calls)
    headers = hmac_headers(SUB_STARTED, unique_key="same")
    first = await post(receiver, SUB_STARTED, headers)
    second = await post(receiver, SUB_STARTED, headers)
    assert (first.status_code, first.json()["status"]) == (200, "processed")
    assert (second.status_code, second.json()["status"]) == (200, "duplicate")
    assert len(calls.events) == 1 and calls.invalidated == ["org_acme"]
    assert receiver.stats["duplicates"] == 1


async def test_a_delivery_without_unique_key_is_deduplicated_on_its_body(post: Any, calls: Calls) -> None:
    """Lago sends X-Lago-Unique-Key with every delivery; a signed delivery without it (an older Lago, or a captured
    one replayed with the header dropped, which no signature covers) is deduplicated on its body: it ran every
    time."""
    receiver = hmac_receiver(calls)
    headers = hmac_headers(SUB_STARTED)
    del headers["X-Lago-Unique-Key"]
    answers = [(await post(receiver, SUB_STARTED, headers)).json()["status"] for _ in range(3)]
    assert answers == ["processed", "duplicate", "duplicate"] and len(calls.events) == 1


async def test_handler_error_is_500_and_the_retry_runs_again(post: Any) -> None:
    """A failing handler answers 500 (Lago retries) and the key is not burnt: the retry runs the handler."""
    attempts: list[str] = []

    async def flaky(event: WebhookEvent) -> None:
        attempts.append(event.webhook_type)
        if len(attempts) == 1:
            raise RuntimeError("database down")

    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), handlers={"invoice.created": flaky})
    body = envelope("invoice.created", "invoice", {"lago_id": "inv_1", "customer": {"external_id": "org_acme"}})
    headers = hmac_headers(body, unique_key="retry-me")
    failed = await post(receiver, body, headers)
    assert failed.status_code == 500
    assert "database down" not in failed.text
    retried = await post(receiver, body, headers)
    assert (retried.status_code, retried.json()["status"]) == (200, "processed")
    assert attempts == ["invoice.created", "invoice.created"]
    assert (await post(receiver, body, headers)).json()["status"] == "duplicate"


async def test_unknown_type_is_200_ignored(post: Any) -> None:
    """A verified webhook nobody handles is acknowledged (200) so that Lago stops retrying."""
    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY))
    body = envelope("credit_note.created", "credit_note", {"lago_id": "cn_1"})
    response = await post(receiver, body, hmac_headers(body))
    assert (response.status_code, response.json()["status"]) == (200, "ignored")
    assert receiver.stats["ignored"] == 1


async def test_not_a_webhook_is_400(post: Any) -> None:
    """A correctly signed body that is not a Lago envelope is a 400."""
    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY))
    for body in (b"[1, 2]", b"not json", b'{"object_type": "invoice"}'):
        assert (await post(receiver, body, hmac_headers(body))).status_code == 400


async def test_too_large_body_is_413(post: Any, calls: Calls) -> None:
    """Bodies over max_body_size are refused before verification."""
    response = await post(hmac_receiver(calls, max_body_size=100), SUB_STARTED, hmac_headers(SUB_STARTED))
    assert response.status_code == 413
    assert calls.events == []


async def test_only_post_is_accepted() -> None:
    """Served as a bare ASGI app, anything but POST is a 405 with Allow: POST."""
    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver), base_url="http://app") as client:
        response = await client.get("/")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


async def test_concurrent_duplicate_is_409(post: Any) -> None:
    """While a delivery is being processed, the same key again is answered 409 (Lago retries it later)."""
    entered = anyio.Event()
    release = anyio.Event()

    async def slow(event: WebhookEvent) -> None:
        entered.set()
        await release.wait()

    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), handlers={"invoice.created": slow})
    body = envelope("invoice.created", "invoice", {"lago_id": "inv_1"})
    headers = hmac_headers(body, unique_key="busy")
    results: dict[str, int] = {}

    async def first() -> None:
        results["first"] = (await post(receiver, body, headers)).status_code

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(first)
        await entered.wait()
        results["second"] = (await post(receiver, body, headers)).status_code
        release.set()
    assert results == {"first": 200, "second": 409}


async def test_handlers_by_decorator_mapping_sync_and_async(post: Any) -> None:
    """Handlers registered with on(), a mapping, sync or async, all run for their types only."""
    seen: list[str] = []

    def sync_handler(event: WebhookEvent) -> None:
        seen.append(f"sync:{event.webhook_type}")

    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), handlers={"invoice.created": [sync_handler]})

    @receiver.on("invoice.created", "invoice.voided")
    async def on_invoice(event: WebhookEvent) -> None:
        seen.append(f"async:{event.webhook_type}:{event.org_id}")

    created = envelope("invoice.created", "invoice", {"lago_id": "i", "customer": {"external_id": "org_b"}})
    voided = envelope("invoice.voided", "invoice", {"lago_id": "i", "customer": {"external_id": "org_b"}})
    other = envelope("customer.updated", "customer", {"external_id": "org_b"})
    for body in (created, voided, other):
        assert (await post(receiver, body, hmac_headers(body))).status_code == 200
    assert seen == ["sync:invoice.created", "async:invoice.created:org_b", "async:invoice.voided:org_b"]
    with pytest.raises(ConfigurationError):
        receiver.on()


# ------------------------------------------------------------------------------------------------- JWT


async def test_jwt_valid_webhook_with_fetched_key(post: Any, calls: Calls, keys: Keys) -> None:
    """RS256 JWT verified with the key from json_public_key (Ruby base64 with newlines), fetched once."""
    server = KeyServer(keys.public)
    receiver = LagoWebhooks(client=key_client(server), invalidate=calls.invalidate, handlers={"*": calls.handler})
    assert receiver.mode == "jwt"
    for _ in range(2):
        response = await post(receiver, SUB_STARTED, jwt_headers(SUB_STARTED, keys.private))
        assert response.status_code == 200, response.text
    assert server.fetches == 1
    assert calls.invalidated == ["org_acme", "org_acme"]


async def test_jwt_forged_with_another_key_is_401_after_one_refetch(
    post: Any, calls: Calls, keys: Keys, other_keys: Keys
) -> None:
    """A token signed by another key triggers one re-fetch (key rotation?), then 401; re-fetches are rate-limited."""
    server = KeyServer(keys.public)
    receiver = LagoWebhooks(client=key_client(server), handlers={"*": calls.handler}, key_refetch_interval=0)
    assert (await post(receiver, SUB_STARTED, jwt_headers(SUB_STARTED, keys.private))).status_code == 200
    receiver.key_refetch_interval = 3600
    receiver._key_fetched_at = None  # the first fetch is old: one re-fetch is allowed
    forged = await post(receiver, SUB_STARTED, jwt_headers(SUB_STARTED, other_keys.private))
    assert forged.status_code == 401
    assert server.fetches == 2
    again = await post(receiver, SUB_STARTED, jwt_headers(SUB_STARTED, other_keys.private))
    assert again.status_code == 401
    assert server.fetches == 2  # within key_refetch_interval: no new fetch
    assert len(calls.events) == 1


async def test_jwt_key_rotation_is_picked_up(post: Any, calls: Calls, keys: Keys, other_keys: Keys) -> None:
    """When Lago's key changes, the first webhook signed with the new key re-fetches it and is accepted."""
    server = KeyServer(keys.public)
    receiver = LagoWebhooks(client=key_client(server), handlers={"*": calls.handler}, key_refetch_interval=0)
    assert (await post(receiver, SUB_STARTED, jwt_headers(SUB_STARTED, keys.private))).status_code == 200
    server.public = other_keys.public
    rotated = await post(receiver, SUB_STARTED, jwt_headers(SUB_STARTED, other_keys.private))
    assert rotated.status_code == 200, rotated.text
    assert server.fetches == 2
    assert len(calls.events) == 2


@pytest.mark.parametrize("case", ["wrong issuer", "tampered body", "not a jwt", "hs256", "no data"])
async def test_jwt_invalid_is_401(post: Any, calls: Calls, keys: Keys, case: str) -> None:
    """Wrong iss, a body that differs from the signed data, malformed or HS256 tokens: 401, nothing dispatched."""
    server = KeyServer(keys.public)
    receiver = LagoWebhooks(client=key_client(server), handlers={"*": calls.handler})
    body = SUB_STARTED
    headers = jwt_headers(SUB_STARTED, keys.private)
    if case == "wrong issuer":
        headers = jwt_headers(SUB_STARTED, keys.private, issuer="https://evil.test")
    elif case == "tampered body":
        body = SUB_STARTED.replace(b'"pro"', b'"enterprise"')
    elif case == "not a jwt":
        headers["X-Lago-Signature"] = "definitely-not-a-jwt"
    elif case == "hs256":
        headers["X-Lago-Signature"] = jwt.encode({"data": body.decode(), "iss": LAGO_URL}, "k" * 32, algorithm="HS256")
    elif case == "no data":
        headers["X-Lago-Signature"] = jwt.encode({"iss": LAGO_URL}, keys.private, algorithm="RS256")
    response = await post(receiver, body, headers)
    assert response.status_code == 401, case
    assert calls.events == []


async def test_jwt_custom_issuer_and_trailing_slash(post: Any, calls: Calls, keys: Keys) -> None:
    """issuer= accepts the instance's LAGO_API_URL as Lago writes it (a trailing slash does not matter)."""
    receiver = LagoWebhooks(
        client=key_client(KeyServer(keys.public)), issuer="https://api.getlago.com", handlers={"*": calls.handler}
    )
    headers = jwt_headers(SUB_STARTED, keys.private, issuer="https://api.getlago.com/")
    assert (await post(receiver, SUB_STARTED, headers)).status_code == 200


async def test_jwt_static_public_key_needs_no_api_key(post: Any, calls: Calls, keys: Keys) -> None:
    """A persisted public key verifies without LAGO_API_KEY or any fetch."""
    settings = BillingSettings(api_url=LAGO_URL)
    receiver = LagoWebhooks(settings, public_key=keys.public.decode(), handlers={"*": calls.handler})
    assert (await post(receiver, SUB_STARTED, jwt_headers(SUB_STARTED, keys.private))).status_code == 200
    assert receiver.stats["key_fetches"] == 0


async def test_public_key_unavailable_is_503(
    post: Any, calls: Calls, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When Lago cannot give its public key, the answer is 503 (Lago retries) and nothing is dispatched. Requests
    right after a failed fetch do not call Lago again (each one did, with the client's retries)."""
    server = KeyServer(keys.public, status=503)
    receiver = LagoWebhooks(client=key_client(server), handlers={"*": calls.handler})
    response = await post(receiver, SUB_STARTED, jwt_headers(SUB_STARTED, keys.private))
    assert response.status_code == 503
    assert calls.events == [] and receiver.stats["key_fetches"] == 1
    server.status = 200
    for _ in range(5):
        assert (await post(receiver, SUB_STARTED, jwt_headers(SUB_STARTED, keys.private))).status_code == 503
    assert receiver.stats["key_fetches"] == 1
    monkeypatch.setattr(webhooks_module, "_KEY_RETRY_AFTER", 0.0)  # a moment later (Lago retries after seconds)
    assert (await post(receiver, SUB_STARTED, jwt_headers(SUB_STARTED, keys.private))).status_code == 200
    assert receiver.stats["key_fetches"] == 2


async def test_a_token_that_cannot_be_lagos_never_costs_a_call_to_lago(post: Any, calls: Calls, keys: Keys) -> None:
    """Garbage, or a JWT not signed RS256, is refused before the public key is fetched."""
    server = KeyServer(keys.public, status=503)
    receiver = LagoWebhooks(client=key_client(server), handlers={"*": calls.handler})
    hs256 = jwt.encode(
        {"data": SUB_STARTED.decode(), "iss": "x"}, "a-secret-long-enough-for-hs256-0123456789", algorithm="HS256"
    )
    for signature in ("x", "a.b.c", hs256):
        headers = {"X-Lago-Signature": signature, "X-Lago-Signature-Algorithm": "jwt"}
        assert (await post(receiver, SUB_STARTED, headers)).status_code == 401
    assert receiver.stats["key_fetches"] == 0 and calls.events == []


async def test_webhooks_of_another_lago_organization_are_refused(post: Any, calls: Calls, keys: Keys) -> None:
    """Lago signs JWT webhooks with its instance's key, shared by every organization on it: with
    organization_id (LAGO_ORGANIZATION_ID) a webhook another organization made Lago send is refused."""
    receiver = LagoWebhooks(
        client=key_client(KeyServer(keys.public)), handlers={"*": calls.handler}, organization_id="org-uuid-mine"
    )
    theirs = json.dumps({**json.loads(SUB_STARTED), "organization_id": "org-uuid-theirs"}).encode()
    response = await post(receiver, theirs, jwt_headers(theirs, keys.private))
    assert response.status_code == 401 and response.json()["status"] == "wrong_organization"
    mine = json.dumps({**json.loads(SUB_STARTED), "organization_id": "org-uuid-mine"}).encode()
    assert (await post(receiver, mine, jwt_headers(mine, keys.private))).status_code == 200
    assert [event.payload["organization_id"] for event in calls.events] == ["org-uuid-mine"]


# --------------------------------------------------------------------------------------- configuration


async def test_no_arguments_reads_the_environment(post: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Route(path, LagoWebhooks(), methods=["POST"]) works with settings from the environment."""
    receiver = LagoWebhooks()  # nothing read yet: the environment is set afterwards, before the first webhook
    monkeypatch.setenv("LAGO_WEBHOOK_HMAC_KEY", HMAC_KEY)
    monkeypatch.setenv("LAGO_SUBSCRIPTION_ID_TEMPLATE", "sub_{org_id}")
    seen: list[str | None] = []
    receiver.add_handler("alert.triggered", lambda event: seen.append(event.org_id))
    body = envelope("alert.triggered", "triggered_alert", {"external_subscription_id": "sub_org_z"})
    response = await post(receiver, body, hmac_headers(body))
    assert response.status_code == 200
    assert receiver.mode == "hmac"
    assert seen == ["org_z"]


async def test_jwt_mode_without_api_key_is_a_clear_error(post: Any) -> None:
    """No HMAC key and no API key: the first webhook raises a ConfigurationError naming both options."""
    receiver = LagoWebhooks()
    with pytest.raises(ConfigurationError, match=r"LAGO_API_KEY.*LAGO_WEBHOOK_HMAC_KEY"):
        await post(receiver, SUB_STARTED, {"X-Lago-Signature": "x"})


def test_resolve_org_from_payload_shapes() -> None:
    """The org comes from external_customer_id, an embedded customer, a customer object or the subscription id."""
    assert org_from_subscription_id("{org_id}", "org_1") == "org_1"
    assert org_from_subscription_id("sub_{org_id}_main", "sub_org_1_main") == "org_1"
    assert org_from_subscription_id("sub_{org_id}_main", "other") is None
    assert org_from_subscription_id("{{x}}-{org_id}", "{x}-org_2") == "org_2"

    def org(object_type: str, obj: dict[str, Any], template: str = "{org_id}") -> str | None:
        return resolve_org({"webhook_type": "x", "object_type": object_type, object_type: obj}, template)

    assert org("subscription", {"external_customer_id": "a", "external_id": "b"}) == "a"
    assert org("invoice", {"customer": {"external_id": "c"}}) == "c"
    assert org("customer", {"external_id": "d"}) == "d"
    assert org("triggered_alert", {"external_subscription_id": "s_e"}, "s_{org_id}") == "e"
    assert org("subscription", {"external_id": "s_f"}, "s_{org_id}") == "f"
    assert org("feature", {"code": "seats"}) is None
    assert resolve_org({"webhook_type": "x"}) is None


# ---------------------------------------------------------------------------------------- invalidation


async def test_feature_changes_invalidate_every_org_through_the_gate(post: Any) -> None:
    """feature.* webhooks (org-wide) call the gate's invalidate_all; alerts and thresholds invalidate the org."""

    class Gate:
        def __init__(self) -> None:
            self.orgs: list[str] = []
            self.all = 0

        async def invalidate(self, org_id: str) -> None:
            self.orgs.append(org_id)

        async def invalidate_all(self) -> None:
            self.all += 1

    gate = Gate()
    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), invalidate=gate)
    bodies = [
        envelope("feature.updated", "feature", {"code": "seats"}),
        envelope("alert.triggered", "triggered_alert", {"external_customer_id": "org_a"}),
        envelope("subscription.usage_threshold_reached", "subscription", {"external_customer_id": "org_b"}),
        envelope("subscription.terminated", "subscription", {"external_id": "org_c"}),
    ]
    for body in bodies:
        response = await post(receiver, body, hmac_headers(body))
        assert response.json()["status"] == "processed"
    assert gate.all == 1
    assert gate.orgs == ["org_a", "org_b", "org_c"]


async def test_gate_published_in_the_scope_is_used(post: Any) -> None:
    """Without invalidate=, the quota gate OrgBillingMiddleware puts in the scope is invalidated."""
    invalidated: list[str] = []

    class Gate:
        async def invalidate(self, org_id: str) -> None:
            invalidated.append(org_id)

    def publish(app: ASGIApp) -> ASGIApp:
        async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
            scope.setdefault(SCOPE_KEY, {})["quota"] = Gate()
            await app(scope, receive, send)

        return wrapper

    app = publish(app_for(LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY))))
    response = await post(app, SUB_STARTED, hmac_headers(SUB_STARTED))
    assert response.status_code == 200
    assert invalidated == ["org_acme"]


async def test_invalidation_failure_is_500(post: Any) -> None:
    """If the quota state cannot be invalidated, the webhook fails (500) so that Lago retries."""

    async def broken(org_id: str) -> None:
        raise ConnectionError("redis down")

    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), invalidate=broken)
    assert (await post(receiver, SUB_STARTED, hmac_headers(SUB_STARTED))).status_code == 500


# ------------------------------------------------------------------------------- the emulator's deliveries


@pytest.fixture
def fake() -> FakeLago:
    """A Lago emulator with a plan."""
    fake = FakeLago(api_key="test-api-key")
    fake.add_billable_metric("api_call")
    fake.add_plan("starter", amount_cents=1000)
    fake.add_plan("pro", amount_cents=5000)
    return fake


@pytest.mark.parametrize("signature", ["jwt", "hmac"])
async def test_emulator_deliveries_end_to_end(fake: FakeLago, calls: Calls, signature: str) -> None:
    """The emulator's own signed webhooks (both modes) are verified, dispatched with the org, and deduplicated."""
    settings = BillingSettings(api_url=fake.base_url, api_key=fake.api_key)
    async with LagoClient(settings, transport=fake.transport()) as client:
        options: dict[str, Any] = {"hmac_key": HMAC_KEY} if signature == "hmac" else {}
        receiver = LagoWebhooks(client=client, invalidate=calls.invalidate, handlers={"*": calls.handler}, **options)
        dispatcher = fake.webhook_dispatcher
        assert dispatcher is not None
        dispatcher.configure(app=app_for(receiver), signature=signature, hmac_key=HMAC_KEY)  # type: ignore[attr-defined]

        await client.upsert_customer({"external_id": "org_acme", "name": "Acme"})
        await client.create_subscription(external_customer_id="org_acme", plan_code="starter", external_id="org_acme")
        await client.create_subscription(external_customer_id="org_acme", plan_code="pro", external_id="org_acme")
        deliveries = await dispatcher.deliver_pending()  # type: ignore[attr-defined]

        assert [d.webhook_type for d in deliveries] == [
            "customer.created",
            "subscription.started",
            "subscription.terminated",
            "subscription.started",
            "invoice.created",  # the upgrade bills the replaced subscription at once
        ]
        assert all(d.state == "succeeded" and d.attempts == 1 for d in deliveries)
        assert [e.org_id for e in calls.events] == ["org_acme"] * 5
        assert calls.invalidated == ["org_acme"] * 3
        assert calls.events[-2].object["plan_code"] == "pro"

        again = await dispatcher.redeliver(deliveries[-1].unique_key)  # type: ignore[attr-defined]
        assert again.status == 200
        assert len(calls.events) == 5  # the replay ran nothing
        assert receiver.stats["duplicates"] == 1
        assert receiver.stats["key_fetches"] == (1 if signature == "jwt" else 0)


async def test_emulator_retries_after_a_handler_error(fake: FakeLago) -> None:
    """A handler failing once: the emulator's retry (same unique key) succeeds and the handler ran twice."""
    runs: list[str] = []

    async def flaky(event: WebhookEvent) -> None:
        runs.append(event.unique_key or "")
        if len(runs) == 1:
            raise RuntimeError("transient")

    receiver = LagoWebhooks(hmac_key=HMAC_KEY, settings=BillingSettings(), handlers={"customer.created": flaky})
    fake.webhook_dispatcher.configure(app=app_for(receiver), signature="hmac", hmac_key=HMAC_KEY)  # type: ignore[union-attr]
    fake.add_customer("org_acme")
    [delivery] = await fake.webhook_dispatcher.deliver_pending()  # type: ignore[union-attr]
    assert (delivery.state, delivery.history) == ("succeeded", [500, 200])
    assert runs == [delivery.unique_key, delivery.unique_key]


async def test_emulator_jwt_with_a_wrong_issuer_fails_every_attempt(fake: FakeLago) -> None:
    """Signed by Lago but for another issuer: every attempt is refused (401) and the delivery fails."""
    settings = BillingSettings(api_url=fake.base_url, api_key=fake.api_key)
    async with LagoClient(settings, transport=fake.transport()) as client:
        receiver = LagoWebhooks(client=client)
        fake.webhook_dispatcher.configure(app=app_for(receiver), issuer="https://elsewhere.test")  # type: ignore[union-attr]
        fake.add_customer("org_acme")
        [delivery] = await fake.webhook_dispatcher.deliver_pending()  # type: ignore[union-attr]
    assert (delivery.state, delivery.history) == ("failed", [401, 401, 401])
    assert receiver.stats["rejected"] == 3


async def test_plan_change_webhook_unblocks_a_blocked_org() -> None:
    """Blocked at its plan's limit, an org upgraded in Lago is allowed at the next request once the
    subscription webhooks arrive, although the usage cache TTL (1 h here) has not expired."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from lago_org_billing import OrgBillingMiddleware
    from lago_org_billing._quota import QuotaConfig, QuotaGate

    async def chat(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    fake = FakeLago(api_key="test-api-key")
    fake.add_billable_metric("api_call")
    fake.add_plan("starter", amount_cents=1000)
    fake.add_plan("pro", amount_cents=5000)
    fake.add_customer("org_acme")
    fake.add_subscription("org_acme", "starter")
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key=fake.api_key,
        org_header="X-Org-Id",
        max_retries=0,
        usage_cache_ttl=3600,
        plan_limits={"starter": {"max_api_calls": 3}, "pro": {"max_api_calls": 100}},
    )
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig())
        app = Starlette(routes=[Route("/v1/chat", chat)])
        middleware = OrgBillingMiddleware(app, settings, quota=gate, client=lago)
        receiver = LagoWebhooks(client=lago, invalidate=gate)
        dispatcher = fake.webhook_dispatcher
        dispatcher.configure(app=app_for(receiver))  # type: ignore[union-attr]
        org = {"X-Org-Id": "org_acme"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            statuses = [(await http.get("/v1/chat", headers=org)).status_code for _ in range(4)]
            assert statuses == [200, 200, 200, 429]

            await lago.create_subscription(external_customer_id="org_acme", plan_code="pro", external_id="org_acme")
            assert (await http.get("/v1/chat", headers=org)).status_code == 429  # the cached plan is still starter

            deliveries = await dispatcher.deliver_pending()  # type: ignore[union-attr]
            assert [d.webhook_type for d in deliveries] == [
                "subscription.terminated",
                "subscription.started",
                "invoice.created",
            ]
            assert all(d.state == "succeeded" for d in deliveries)
            allowed = await http.get("/v1/chat", headers=org)
            assert allowed.status_code == 200
            assert receiver.stats["invalidations"] == 2
        await middleware.aclose()


# ------------------------------------------------------------------------------------------------ Redis


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_redis_dedupe_is_shared_between_receivers(post: Any, redis_url: str) -> None:
    """Two receivers (two workers) sharing Redis process one delivery once; a failed one can be retried."""
    prefix = f"test:{uuid.uuid4().hex}:"
    runs: list[str] = []

    async def handler(event: WebhookEvent) -> None:
        runs.append(event.webhook_type)

    receivers = [
        LagoWebhooks(
            SETTINGS.replace(webhook_hmac_key=HMAC_KEY),
            dedupe=RedisDedupe(redis_url, prefix=prefix),
            handlers={"*": handler},
        )
        for _ in range(2)
    ]
    headers = hmac_headers(SUB_STARTED, unique_key="shared")
    assert (await post(receivers[0], SUB_STARTED, headers)).json()["status"] == "processed"
    assert (await post(receivers[1], SUB_STARTED, headers)).json()["status"] == "duplicate"
    assert runs == ["subscription.started"]

    dedupe = RedisDedupe(redis_url, prefix=prefix)
    assert await dedupe.claim("other") == "new"
    assert await dedupe.claim("other") == "processing"
    await dedupe.release("other")
    assert await dedupe.claim("other") == "new"
    await dedupe.complete("other")
    assert await dedupe.claim("other") == "done"
    await dedupe.extend("other")  # renews a claim only: a done delivery stays done
    assert await dedupe.claim("other") == "done"
    assert await dedupe.claim("claimed") == "new"
    await dedupe.extend("claimed")
    assert 0 < await dedupe.redis.ttl(prefix + "claimed") <= dedupe.processing_ttl < 20  # within Lago's retries
    for receiver in receivers:
        assert isinstance(receiver._dedupe, RedisDedupe)
        await receiver._dedupe.aclose()
    await dedupe.aclose()


async def test_a_failing_handler_s_exception_is_logged_as_raised(post: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Run under the claim renewal, its cause was wiped (``raise ... from None``)."""

    async def failing(event: WebhookEvent) -> None:
        try:
            {}["missing"]
        except KeyError as exc:
            raise RuntimeError("handler broke") from exc

    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), handlers={"*": failing})
    response = await post(receiver, SUB_STARTED, hmac_headers(SUB_STARTED, unique_key="k-fail"))
    assert response.status_code == 500
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert isinstance(record.exc_info[1].__cause__, KeyError)


async def test_a_delivery_s_claim_is_renewed_while_its_handler_runs(post: Any, keys: Keys) -> None:
    """The claim lasts a short lease, renewed while the handlers run: a worker that dies mid-handler (its claim
    was kept 120 s, past Lago's last retry) frees the delivery for Lago's retries, a live one keeps it."""

    class Watched(MemoryDedupe):
        def __init__(self) -> None:
            super().__init__(processing_ttl=0.3)
            self.renewed = anyio.Event()

        async def extend(self, key: str) -> None:
            await super().extend(key)
            self.renewed.set()

    dedupe = Watched()

    async def slow(event: WebhookEvent) -> None:
        await dedupe.renewed.wait()  # returns only once the claim was renewed during the handler

    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), handlers={"*": slow}, dedupe=dedupe)
    with anyio.fail_after(10):
        response = await post(receiver, SUB_STARTED, hmac_headers(SUB_STARTED, unique_key="k1"))
    assert response.json()["status"] == "processed" and await dedupe.claim("k1") == "done"
    assert DEFAULT_PROCESSING_TTL < 20  # Lago retries about 3 s and 20 s after a failed attempt


async def test_redis_url_setting_selects_redis_dedupe(post: Any, redis_url: str) -> None:
    """With LAGO_REDIS_URL (settings.redis_url), the default dedupe is Redis."""
    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY, redis_url=redis_url))
    assert isinstance(receiver._dedupe, RedisDedupe)
    body = envelope("invoice.created", "invoice", {"lago_id": uuid.uuid4().hex})
    headers = hmac_headers(body)
    assert (await post(receiver, body, headers)).json()["status"] == "ignored"
    assert (await post(receiver, body, headers)).json()["status"] == "duplicate"
    await receiver._dedupe.aclose()


async def test_unreachable_redis_degrades_to_processing(post: Any, calls: Calls) -> None:
    """With Redis down, webhooks are still processed (at-least-once) rather than lost."""
    dedupe = RedisDedupe(f"redis://127.0.0.1:{_free_port()}/0")
    receiver = hmac_receiver(calls, dedupe=dedupe)
    response = await post(receiver, SUB_STARTED, hmac_headers(SUB_STARTED))
    assert (response.status_code, response.json()["status"]) == (200, "processed")
    assert calls.invalidated == ["org_acme"]
    await dedupe.aclose()


async def test_memory_dedupe_forgets_stuck_processing() -> None:
    """A key stuck 'processing' (a hung handler) can be claimed again after processing_ttl."""
    dedupe = MemoryDedupe(processing_ttl=0)
    assert await dedupe.claim("k") == "new"
    assert await dedupe.claim("k") == "new"
    await dedupe.complete("k")
    assert await dedupe.claim("k") == "done"
    assert len(dedupe) == 1


def test_the_served_emulator_signs_jwt_webhooks_as_its_url(
    fake_lago_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Route(path, LagoWebhooks(), methods=["POST"])`` expects LAGO_API_URL as the JWT issuer, as Lago signs with its
    own URL: the emulator served over HTTP signs with the URL it is served at (it signed "http://fake-lago", and
    every default delivery was refused 401)."""
    from lago_org_billing import LagoWebhooks
    from lago_org_billing.testing._server import serve_in_thread

    fake = fake_lago_server
    monkeypatch.setenv("LAGO_API_URL", fake.url)
    monkeypatch.setenv("LAGO_API_KEY", fake.api_key)
    app = Starlette(routes=[Route("/webhooks/lago", LagoWebhooks(), methods=["POST"])])
    with serve_in_thread(app) as url:
        fake.webhook_dispatcher.configure(url=f"{url}/webhooks/lago")  # default signature: jwt, like Lago
        fake.add_customer("org_acme")
        [delivery] = fake.webhook_dispatcher.wait_delivered(1)
    assert delivery.state == "succeeded", delivery.history


def test_the_emulator_served_again_signs_with_its_new_url() -> None:
    """Served a second time (another port), the emulator names its new URL; and its issuer is put back when serving
    ends (it kept the first URL: every webhook refused again)."""
    from lago_org_billing.testing._server import install_controls, serve_in_thread

    fake = install_controls(FakeLago(api_key="k"))
    for _ in range(2):
        with serve_in_thread(fake) as url:
            assert fake.webhook_dispatcher.issuer == url
        assert fake.webhook_dispatcher.issuer == fake.base_url


async def test_the_receiver_is_also_a_request_endpoint(calls: Calls) -> None:
    """Called with a request (as a ``request -> response`` endpoint), it answers as it does as an ASGI app."""
    from starlette.requests import Request

    receiver = hmac_receiver(calls)
    body = SUB_STARTED
    headers = [(name.lower().encode(), value.encode()) for name, value in hmac_headers(body).items()]
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request(
        {"type": "http", "method": "POST", "path": PATH, "headers": headers, "query_string": b""}, receive
    )
    response = await receiver(request)
    assert response.status_code == 200 and calls.invalidated == ["org_acme"]
