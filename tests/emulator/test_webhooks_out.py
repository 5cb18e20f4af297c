"""Webhooks sent by the Lago emulator: envelope, JWT and HMAC signatures, retries, redelivery, control routes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread
from lago_org_billing.testing._webhooks import WebhookDispatcher, install_webhooks, sign_hmac

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Receiver:
    """A webhook endpoint recording what it gets; answers with ``statuses`` in turn, then 200."""

    statuses: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def endpoint(self, request: Request) -> Response:
        self.received.append((dict(request.headers), await request.body()))
        status = self.statuses.pop(0) if self.statuses else 200
        return Response(status_code=status)

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/webhooks/lago", self.endpoint, methods=["POST"])])


@pytest.fixture
def receiver() -> Receiver:
    """A recording webhook endpoint."""
    return Receiver()


@pytest.fixture
def fake() -> FakeLago:
    """A fresh FakeLago."""
    return FakeLago(api_key=API_KEY)


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to the fake in process."""
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url, headers=AUTH) as client:
        yield client


async def public_key(client: httpx.AsyncClient) -> bytes:
    """The PEM from GET /api/v1/webhooks/json_public_key (Ruby base64 with newlines)."""
    response = await client.get("/api/v1/webhooks/json_public_key")
    assert response.status_code == 200
    encoded = response.json()["webhook"]["public_key"]
    return base64.b64decode("".join(encoded.split()))


async def test_jwt_signature_verifies_with_the_public_key(
    fake: FakeLago, client: httpx.AsyncClient, receiver: Receiver
) -> None:
    """A customer created over the API is announced by a JWT-signed customer.created webhook."""
    install_webhooks(fake, app=receiver.app)
    response = await client.post("/api/v1/customers", json={"customer": {"external_id": "acme", "name": "Acme"}})
    assert response.status_code == 200
    delivered = await fake.webhook_dispatcher.deliver_pending()
    assert [d.webhook_type for d in delivered] == ["customer.created"]

    headers, body = receiver.received[0]
    assert headers["content-type"] == "application/json"
    assert headers["x-lago-signature-algorithm"] == "jwt"
    assert headers["x-lago-unique-key"] == delivered[0].unique_key
    claims = jwt.decode(
        headers["x-lago-signature"], await public_key(client), algorithms=["RS256"], issuer="http://fake-lago"
    )
    assert claims == {"data": body.decode(), "iss": "http://fake-lago"}  # no exp / iat, like Lago
    payload = json.loads(body)
    assert payload["webhook_type"] == "customer.created"
    assert payload["object_type"] == "customer"
    assert payload["customer"]["external_id"] == "acme"
    assert set(payload) == {"webhook_type", "object_type", "organization_id", "customer"}


async def test_jwt_signature_fails_with_another_key(fake: FakeLago, receiver: Receiver) -> None:
    """The signature is bound to the emulator's key: another RSA key does not verify it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    other_pem = other.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    dispatcher = install_webhooks(fake, app=receiver.app)
    fake._emit_webhook("customer.updated", "customer", {"external_id": "acme"})
    await dispatcher.deliver_pending()
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(receiver.received[0][0]["x-lago-signature"], other_pem, algorithms=["RS256"])


async def test_hmac_signature(fake: FakeLago, receiver: Receiver) -> None:
    """HMAC mode: base64 (standard, padded) HMAC-SHA256 of the raw body with the org's key."""
    dispatcher = install_webhooks(fake, app=receiver.app, signature="hmac", hmac_key="5ec2a1e4-hmac-key")
    fake._emit_webhook("subscription.started", "subscription", {"external_id": "sub_1", "plan_code": "pro"})
    await dispatcher.deliver_pending()
    headers, body = receiver.received[0]
    expected = base64.b64encode(hmac.new(b"5ec2a1e4-hmac-key", body, hashlib.sha256).digest()).decode()
    assert headers["x-lago-signature-algorithm"] == "hmac"
    assert hmac.compare_digest(headers["x-lago-signature"], expected)
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=", headers["x-lago-signature"])
    assert json.loads(body)["subscription"] == {"external_id": "sub_1", "plan_code": "pro"}


async def test_body_is_compact_json(fake: FakeLago, receiver: Receiver) -> None:
    """The body is compact UTF-8 JSON, like Ruby's to_json."""
    dispatcher = install_webhooks(fake, app=receiver.app, signature="hmac")
    fake._emit_webhook("customer.updated", "customer", {"external_id": "acme", "name": "Café Ωmega"})
    await dispatcher.deliver_pending()
    body = receiver.received[0][1]
    assert body == json.dumps(json.loads(body), separators=(",", ":"), ensure_ascii=False).encode()
    assert "Café Ωmega".encode() in body


async def test_retries_keep_the_unique_key(fake: FakeLago, receiver: Receiver) -> None:
    """Failed attempts are retried (3 in all); every attempt carries the same X-Lago-Unique-Key."""
    receiver.statuses = [500, 302]
    dispatcher = install_webhooks(fake, app=receiver.app)
    fake._emit_webhook("invoice.created", "invoice", {"lago_id": "inv_1"})
    [delivery] = await dispatcher.deliver_pending()
    assert delivery.state == "succeeded"
    assert delivery.attempts == 3
    assert delivery.history == [500, 302, 200]
    keys = {headers["x-lago-unique-key"] for headers, _ in receiver.received}
    assert keys == {delivery.unique_key}
    assert len({body for _, body in receiver.received}) == 1


@pytest.mark.parametrize("status", [201, 202, 204])
async def test_other_success_statuses(fake: FakeLago, receiver: Receiver, status: int) -> None:
    """201, 202 and 204 count as success, like Lago."""
    receiver.statuses = [status]
    dispatcher = install_webhooks(fake, app=receiver.app)
    fake._emit_webhook("customer.updated", "customer", {"external_id": "acme"})
    [delivery] = await dispatcher.deliver_pending()
    assert (delivery.state, delivery.attempts) == ("succeeded", 1)


async def test_gives_up_after_attempts(fake: FakeLago, receiver: Receiver) -> None:
    """A receiver that keeps failing gets exactly ``attempts`` tries, then the delivery is failed."""
    receiver.statuses = [503] * 10
    dispatcher = install_webhooks(fake, app=receiver.app, attempts=2)
    fake._emit_webhook("customer.updated", "customer", {"external_id": "acme"})
    [delivery] = await dispatcher.deliver_pending()
    assert (delivery.state, delivery.attempts, delivery.status) == ("failed", 2, 503)
    assert len(receiver.received) == 2
    assert await dispatcher.deliver_pending() == []


async def test_receiver_exception_is_a_failed_attempt(fake: FakeLago) -> None:
    """An exception in an in-process receiver counts as a failed attempt, not a crash."""

    async def broken(request: Request) -> Response:
        raise RuntimeError("receiver bug")

    app = Starlette(routes=[Route("/webhooks/lago", broken, methods=["POST"])])
    dispatcher = install_webhooks(fake, app=app)
    fake._emit_webhook("customer.updated", "customer", {"external_id": "acme"})
    [delivery] = await dispatcher.deliver_pending()
    assert delivery.state == "failed"
    assert delivery.attempts == 3
    assert delivery.error is not None and "receiver bug" in delivery.error


async def test_redeliver_sends_the_same_body_and_key(fake: FakeLago, receiver: Receiver) -> None:
    """redeliver() re-sends one delivery byte for byte, to exercise receivers' dedupe."""
    dispatcher = install_webhooks(fake, app=receiver.app, signature="hmac")
    fake._emit_webhook("customer.updated", "customer", {"external_id": "acme"})
    [delivery] = await dispatcher.deliver_pending()
    again = await dispatcher.redeliver(delivery.unique_key)
    assert again is delivery
    assert delivery.attempts == 2
    (h1, b1), (h2, b2) = receiver.received
    assert b1 == b2
    assert h1["x-lago-unique-key"] == h2["x-lago-unique-key"] == delivery.unique_key
    assert h1["x-lago-signature"] == h2["x-lago-signature"]


async def test_nothing_is_queued_without_an_endpoint(fake: FakeLago) -> None:
    """Like Lago, webhooks emitted while no endpoint is configured are never delivered later."""
    dispatcher = install_webhooks(fake)
    fake._emit_webhook("customer.updated", "customer", {"external_id": "acme"})
    assert dispatcher.pending == []
    assert dispatcher.deliveries == []
    assert len(fake.emitted_webhooks) == 1


def test_hmac_helper_matches_lago_doc_recipe() -> None:
    """sign_hmac is Base64.strict_encode64(HMAC-SHA256(key, body))."""
    body = b'{"webhook_type":"customer.created"}'
    digest = hmac.new(b"key", body, hashlib.sha256).digest()
    assert sign_hmac(body, "key") == base64.b64encode(digest).decode()


def test_bad_settings_are_refused(fake: FakeLago) -> None:
    """An unknown signature algorithm or a zero attempt count is an error that says what is allowed."""
    from lago_org_billing._errors import LagoIntegrationError

    with pytest.raises(LagoIntegrationError, match="'jwt' or 'hmac'"):
        WebhookDispatcher(fake, signature="rsa")  # type: ignore[arg-type]
    with pytest.raises(LagoIntegrationError, match="attempts"):
        WebhookDispatcher(fake, attempts=0)


async def test_control_routes(fake: FakeLago, client: httpx.AsyncClient, receiver: Receiver) -> None:
    """PUT configures, POST deliver flushes (over real HTTP to the receiver), GET lists the deliveries."""
    install_webhooks(fake)
    bad = await client.put("/_emulator/webhooks", json={"url": "http://x", "signature": "md5"})
    assert bad.status_code == 422
    assert "'jwt' or 'hmac'" in bad.json()["message"]
    assert (await client.put("/_emulator/webhooks", json={"url": 5})).status_code == 422

    with serve_in_thread(receiver.app) as receiver_url:
        settings = {"url": f"{receiver_url}/webhooks/lago", "signature": "hmac", "hmac_key": "k"}
        configured = await client.put("/_emulator/webhooks", json=settings)
        assert configured.status_code == 200
        assert configured.json()["webhooks"]["signature"] == "hmac"
        await client.post("/api/v1/customers", json={"customer": {"external_id": "acme"}})
        assert (await client.get("/_emulator/webhooks")).json()["pending"] == 1
        flushed = await client.post("/_emulator/webhooks/deliver")
    assert flushed.status_code == 200
    [sent] = flushed.json()["deliveries"]
    assert (sent["webhook_type"], sent["state"], sent["attempts"]) == ("customer.created", "succeeded", 1)
    headers, body = receiver.received[0]
    assert headers["x-lago-signature"] == sign_hmac(body, "k")

    listed = (await client.get("/_emulator/webhooks")).json()
    assert listed["pending"] == 0
    assert [d["unique_key"] for d in listed["deliveries"]] == [headers["x-lago-unique-key"]]
    assert (await client.delete("/_emulator/webhooks")).json()["webhooks"]["url"] is None
    assert (await client.post("/_emulator/webhooks/deliver")).status_code == 422


def test_background_delivery_when_served(fake: FakeLago, receiver: Receiver) -> None:
    """Served by uvicorn, webhooks go out from a background task soon after the API call."""
    dispatcher = install_webhooks(fake)
    with serve_in_thread(receiver.app) as receiver_url, serve_in_thread(fake) as url:
        httpx.put(f"{url}/_emulator/webhooks", json={"url": f"{receiver_url}/webhooks/lago"}).raise_for_status()
        created = httpx.post(f"{url}/api/v1/customers", headers=AUTH, json={"customer": {"external_id": "acme"}})
        assert created.status_code == 200
        [delivery] = dispatcher.wait_delivered(1, timeout=10)
    assert delivery.state == "succeeded"
    assert delivery.webhook_type == "customer.created"
    assert len(receiver.received) == 1


def test_wait_delivered_times_out_with_advice(fake: FakeLago) -> None:
    """Waiting for deliveries that never happen ends with an error, not a hang."""
    from lago_org_billing._errors import LagoIntegrationError

    dispatcher = install_webhooks(fake)
    with pytest.raises(LagoIntegrationError, match="webhook URL configured"):
        dispatcher.wait_delivered(1, timeout=0.01)


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"url": "http://[::1"}, "url"),
        ({"url": "http://a b/hooks"}, "url"),
        ({"url": "ftp://receiver.test/hooks"}, "url"),
        ({"url": "receiver.test/hooks"}, "url"),
        ({"signature": "hmac", "hmac_key": ""}, "hmac_key"),
        ({"attempts": 100_000_000_000}, "attempts"),
    ],
    ids=["unclosed-ipv6", "space", "ftp", "no-scheme", "empty-hmac-key", "attempts-huge"],
)
async def test_a_webhook_endpoint_no_delivery_could_use_is_refused_when_configured(
    fake: FakeLago, client: httpx.AsyncClient, settings: dict[str, object], says: str
) -> None:
    """A URL no request can go to, an empty HMAC key (Lago never signs with one) or a retry count no test could wait
    for were accepted, and each delivery then failed or retried with no word at setup time. They are a 422 naming the
    setting, and the endpoint configured before stays as it was."""
    install_webhooks(fake)
    before = await client.put("/_emulator/webhooks", json={"url": "http://receiver.test/hooks", "attempts": 2})
    assert before.status_code == 200
    refused = await client.put("/_emulator/webhooks", json=settings)
    assert refused.status_code == 422, refused.text
    assert says in refused.json()["message"]
    kept = (await client.get("/_emulator/webhooks")).json()["webhooks"]
    assert (kept["url"], kept["attempts"]) == ("http://receiver.test/hooks", 2)
