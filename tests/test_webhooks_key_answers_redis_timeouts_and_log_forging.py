"""Review of the webhook receiver and the billing routes, attacked as Lago and as an attacker would.

* Lago's public key answered in a shape that is no base64 (a proxy, a broken Lago): a 503 Lago retries, with the
  reason in the log, not a 500 and a traceback with every webhook.
* The Redis dedupe made from ``LAGO_REDIS_URL``: a Redis that accepts connections and never answers (a paused
  container, a failover, a black-holed network) must not hold every webhook until Lago times out (30 s, 3 attempts,
  then the webhook is lost): it is processed without dedupe, as when Redis refuses connections.
* A refused signature is logged: text an attacker puts in a token (a JWT ``crit`` header) never forges log lines.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.routing import Route

from lago_org_billing import BillingSettings, ConfigurationError, LagoClient, _webhooks as webhooks_module
from lago_org_billing._webhooks import LagoWebhooks, RedisDedupe, sign_hmac

pytestmark = pytest.mark.anyio

LAGO_URL = "http://lago.test"
PATH = "/webhooks/lago"
HMAC_KEY = "5a0c7a3e-2f7b-4b43-9f0e-review-key"
SETTINGS = BillingSettings(api_url=LAGO_URL, api_key="review-api-key", max_retries=0)


def _private_key() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def private_key() -> bytes:
    """Lago's signing key (PEM), generated for the module."""
    return _private_key()


def _public_pem(private: bytes) -> bytes:
    key = serialization.load_pem_private_key(private, password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _body(webhook_type: str = "subscription.started", org: str = "org_acme") -> bytes:
    payload = {
        "webhook_type": webhook_type,
        "object_type": "subscription",
        "organization_id": "lago-org",
        "subscription": {"external_id": org, "external_customer_id": org, "plan_code": "pro", "status": "active"},
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def _jwt_headers(body: bytes, private: bytes, **header: Any) -> dict[str, str]:
    token = jwt.encode({"data": body.decode(), "iss": LAGO_URL}, private, algorithm="RS256", headers=header or None)
    return {
        "Content-Type": "application/json",
        "X-Lago-Signature": token,
        "X-Lago-Signature-Algorithm": "jwt",
        "X-Lago-Unique-Key": str(uuid.uuid4()),
    }


def _hmac_headers(body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Lago-Signature": sign_hmac(body, HMAC_KEY),
        "X-Lago-Signature-Algorithm": "hmac",
        "X-Lago-Unique-Key": str(uuid.uuid4()),
    }


class Invalidated:
    """Records the orgs whose quota state a receiver dropped."""

    def __init__(self) -> None:
        self.orgs: list[str] = []

    async def __call__(self, org_id: str) -> None:
        self.orgs.append(org_id)


async def _post(receiver: LagoWebhooks, body: bytes, headers: dict[str, str]) -> httpx.Response:
    app = Starlette(routes=[Route(PATH, receiver, methods=["POST"])])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a crash is observed as a 500
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return await client.post(PATH, content=body, headers=headers)


# ----------------------------------------------------------------------------------------- public key


@pytest.mark.parametrize(
    "public_key",
    [
        "YQ",  # base64 without its padding
        "%%%%",  # no base64 at all
        "cl\u00e9",  # not ASCII
    ],
)
async def test_a_public_key_answer_that_is_no_base64_is_a_503_not_a_500(
    private_key: bytes, public_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Lago (or a proxy before it) answering ``json_public_key`` with a value that is no base64: each webhook crashed
    the receiver (a 500 and a binascii/ValueError traceback), where every other unusable answer is a 503 whose log
    line says what is wrong with the key."""

    def lago(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"webhook": {"public_key": public_key}})

    async with LagoClient(SETTINGS, transport=httpx.MockTransport(lago)) as client:
        receiver = LagoWebhooks(SETTINGS, client=client, invalidate=Invalidated(), organization_id="lago-org")
        body = _body()
        with caplog.at_level(logging.WARNING, logger="lago_org_billing.webhooks"):
            response = await _post(receiver, body, _jwt_headers(body, private_key))
    assert response.status_code == 503, response.text
    assert response.json()["status"] == "public_key_unavailable"
    assert any("public key" in record.getMessage() for record in caplog.records)


# --------------------------------------------------------------------------------------------- redis


@pytest.fixture
def silent_redis() -> Iterator[str]:
    """A Redis URL whose server accepts connections (the kernel completes them) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


async def test_a_redis_that_never_answers_does_not_hold_the_webhook(
    silent_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dedupe's Redis client had no socket timeout: with a Redis that stops answering (no RST: a paused
    container, a failover, a partition) each webhook waited forever on its claim, past Lago's 30 s timeout, on each
    of its 3 attempts, so plan changes were lost. It is processed without dedupe, as when Redis refuses."""
    monkeypatch.setattr(webhooks_module, "_REDIS_TIMEOUT", 0.2, raising=False)  # (the default is a few seconds)
    invalidated = Invalidated()
    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY, redis_url=silent_redis), invalidate=invalidated)
    body = _body()
    try:
        with anyio.fail_after(15):  # (a bound so that the failure is a failure, not a hung suite)
            response = await _post(receiver, body, _hmac_headers(body))
    finally:
        with anyio.move_on_after(5):
            await receiver.aclose()
    assert (response.status_code, response.json()["status"]) == (200, "processed")
    assert invalidated.orgs == ["org_acme"]


async def test_the_dedupe_bounds_every_redis_call_whatever_the_redis_client_version(silent_redis: str) -> None:
    """The client is made with a socket timeout of its own (and a connect timeout): redis-py before 8 has none by
    default (``redis>=5.0.2`` is what the extra allows), so a silent Redis held each webhook for ever there (and 5 s
    per call with redis-py 8's default). ``RedisDedupe(url, timeout=...)`` sets it; a URL's ``socket_timeout``
    still wins."""
    default = RedisDedupe(silent_redis)
    given = RedisDedupe(silent_redis, timeout=0.5)
    from_url = RedisDedupe(silent_redis + "?socket_timeout=7")
    try:
        options = default.redis.connection_pool.connection_kwargs
        assert options["socket_timeout"] == options["socket_connect_timeout"] == webhooks_module._REDIS_TIMEOUT
        assert 0 < webhooks_module._REDIS_TIMEOUT <= 5  # (well within Lago's 30 s per attempt)
        assert given.redis.connection_pool.connection_kwargs["socket_timeout"] == 0.5
        assert from_url.redis.connection_pool.connection_kwargs["socket_timeout"] == 7
        with anyio.fail_after(15), pytest.raises(Exception):  # noqa: B017 - a redis timeout, whichever class
            await given.claim("k")
    finally:
        for dedupe in (default, given, from_url):
            with anyio.move_on_after(5):
                await dedupe.aclose()


# ------------------------------------------------------------------------------------------------ logs


async def test_a_refused_token_cannot_forge_log_lines(private_key: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """The reason a signature is refused is logged, and part of it is the attacker's (PyJWT's message names the
    token's ``crit`` extension): a line break in it wrote a line of the attacker's choosing into the log."""
    receiver = LagoWebhooks(
        SETTINGS, public_key=_public_pem(private_key), invalidate=Invalidated(), organization_id="lago-org"
    )
    forged = "x\n2030-01-01 00:00:00 CRITICAL payments: refund issued"
    body = _body()
    with caplog.at_level(logging.DEBUG, logger="lago_org_billing.webhooks"):
        response = await _post(receiver, body, _jwt_headers(body, _private_key(), crit=[forged]))
    assert response.status_code == 401
    messages = [record.getMessage() for record in caplog.records if record.name == "lago_org_billing.webhooks"]
    assert any("rejected" in message for message in messages)
    assert not any("\n" in message for message in messages), messages


def test_an_hmac_key_given_in_code_is_checked_as_the_variable_is() -> None:
    """``LagoWebhooks(hmac_key=os.environ[...])`` under ``docker run --env-file`` kept the quotes, and a key read from
    a secret file its line break: every webhook was a 401. Quotes are refused at once, blanks around it dropped."""
    with pytest.raises(ConfigurationError, match="LAGO_WEBHOOK_HMAC_KEY is wrapped in quotes"):
        LagoWebhooks(hmac_key='"0123-abcd"')
    with pytest.raises(ConfigurationError, match="as text"):
        LagoWebhooks(hmac_key=b"0123-abcd")  # type: ignore[arg-type]
    assert LagoWebhooks(hmac_key="0123-abcd\n")._hmac_key == "0123-abcd"
    assert LagoWebhooks(hmac_key='ab"c')._hmac_key == 'ab"c'  # (quotes inside are its own)
