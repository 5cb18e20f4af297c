"""The emulator's webhook sender checked against Lago's own algorithm, written again here from Lago's docs and sources
(lago-api ``Webhook#generate_headers``, ``Webhooks::SendHttpService``, ``LagoHttpClient::Client`` and Rails'
``to_json``) without the package's code: the bytes, signatures, headers and envelopes a plain receiver gets for seeded
random emulator activity (odd ids, unicode, HTML characters), and the attempts Lago makes for receivers that answer
non-2xx, hang, or fail after answering.

Real things: a plain Starlette receiver in process (and one served by uvicorn on 127.0.0.1), the emulator for Lago.
The JWT is checked with ``cryptography`` against the key ``GET /api/v1/webhooks/json_public_key`` serves, not with
PyJWT, which the sender uses.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import quote

import anyio
import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from _openapi import SPEC_PATH, fix_spec
from _pinned_clock import NOW, Clock
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread
from lago_org_billing.testing._webhooks import WebhookDelivery, WebhookDispatcher

pytestmark = pytest.mark.anyio

PATH = "/hooks/lago"
HMAC_KEY = "9b1f0c7e-5d43-4a8e-b0a1-per-lago"

# ------------------------------------------------------------------------------------------ Lago, written again

#: ``LagoHttpClient::Client::RESPONSE_SUCCESS_CODES``: any other answer, or none, is a failed attempt.
LAGO_SUCCESS = frozenset({200, 201, 202, 204})
#: ``LAGO_WEBHOOK_ATTEMPTS`` (default 3): attempts in all, the first included.
LAGO_ATTEMPTS = 3

# Ruby's JSON generator (``JSON.generate``, what ruby-jwt writes with) escapes the quote, the backslash and the control
# characters (lowercase hex), and writes everything else as raw UTF-8. ActiveSupport's encoder, which ``Hash#to_json``
# is in a Rails app, also writes ``<``, ``>``, ``&`` (escape_html_entities_in_json, on by default) and U+2028/U+2029
# as ``\\u`` escapes.
_JSON_GEM_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_RAILS_ESCAPES = {
    **_JSON_GEM_ESCAPES,
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def _ruby_string(text: str, escapes: dict[str, str] = _RAILS_ESCAPES) -> str:
    out = []
    for ch in text:
        if ch in escapes:
            out.append(escapes[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def lago_to_json(value: Any) -> str:
    """``payload.to_json`` in lago-api (a Rails app): compact, keys in order, the escapes above."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # (Ruby's Float#to_s for what the payloads hold: 0.0, 20.0, 1.5)
    if isinstance(value, str):
        return _ruby_string(value)
    if isinstance(value, list):
        return "[" + ",".join(lago_to_json(item) for item in value) + "]"
    assert isinstance(value, dict), value
    return "{" + ",".join(f"{_ruby_string(key)}:{lago_to_json(item)}" for key, item in value.items()) + "}"


def ruby_jwt_segment(claims: dict[str, str]) -> str:
    """A flat JSON object of strings as ruby-jwt encodes it into a token: ``JSON.generate``, then base64url unpadded."""
    text = (
        "{"
        + ",".join(
            f"{_ruby_string(k, _JSON_GEM_ESCAPES)}:{_ruby_string(v, _JSON_GEM_ESCAPES)}" for k, v in claims.items()
        )
        + "}"
    )
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def lago_hmac(key: str, body: bytes) -> str:
    """``Base64.strict_encode64(OpenSSL::HMAC.digest("sha-256", organization.hmac_key, payload.to_json))``."""
    return base64.b64encode(hmac.new(key.encode(), body, hashlib.sha256).digest()).decode()


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def lago_jwt_claims(token: str, public_pem: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of ``JWT.encode({data: payload.to_json, iss: LAGO_API_URL}, RsaPrivateKey, "RS256")``,
    its RS256 signature checked with the public key (raises when it does not verify)."""
    head, claims, signature = token.split(".")
    key = serialization.load_pem_public_key(public_pem)
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(_b64url(signature), f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return json.loads(_b64url(head)), json.loads(_b64url(claims))


def lago_history(answers: list[int | str]) -> list[int | str]:
    """What Lago records of a webhook's attempts, given what the receiver would answer each time: attempts until
    one succeeds, ``LAGO_ATTEMPTS`` at most."""
    history: list[int | str] = []
    for answer in answers[:LAGO_ATTEMPTS]:
        history.append(answer)
        if answer in LAGO_SUCCESS:
            break
    return history


@functools.lru_cache(maxsize=1)
def _webhook_schemas() -> tuple[Registry, dict[str, str]]:
    """The spec's webhook request bodies by ``webhook_type``, resolvable as ``urn:lago-spec#/webhooks/...``."""
    with SPEC_PATH.open("rb") as file:
        spec = yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    fix_spec(spec)
    registry: Registry = Registry().with_resource("urn:lago-spec", DRAFT202012.create_resource(spec))
    by_type = {}
    for name, item in spec["webhooks"].items():
        schema = item["post"]["requestBody"]["content"]["application/json"]["schema"]
        by_type[schema["properties"]["webhook_type"]["enum"][0]] = name
    return registry, by_type


def spec_errors(envelope: dict[str, Any]) -> list[str]:
    """Where a webhook body breaks the spec's schema for its ``webhook_type`` (none for a type the spec lacks)."""
    registry, by_type = _webhook_schemas()
    name = by_type.get(envelope["webhook_type"])
    if name is None:
        return []
    ref = f"urn:lago-spec#/webhooks/{name}/post/requestBody/content/application~1json/schema"
    validator = jsonschema.Draft202012Validator({"$ref": ref}, registry=registry)
    return [f"{envelope['webhook_type']} {list(e.path)}: {e.message[:160]}" for e in validator.iter_errors(envelope)]


# ------------------------------------------------------------------------------------------------- the receiver


@dataclass
class Hit:
    """One request as the receiver got it: raw headers (in order, names as sent) and raw body."""

    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str:
        values = [value for key, value in self.headers if key.lower() == name.lower()]
        assert len(values) == 1, (name, self.headers)
        return values[0]


@dataclass
class Receiver:
    """A plain webhook endpoint recording every request; ``answer(key, attempt)`` says what to do with it: a status,
    ``"hang"`` (never answers), ``"crash"`` (raises before answering), or ``"200+crash"`` / ``"200+hang"`` (answers
    200, then its background work raises / never ends)."""

    answer: Callable[[str, int], int | str] = lambda key, attempt: 200
    hits: list[Hit] = field(default_factory=list)
    background_runs: int = 0

    async def endpoint(self, request: Request) -> Response:
        body = await request.body()
        hit = Hit([(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]], body)
        self.hits.append(hit)
        key = hit.header("x-lago-unique-key")
        answer = self.answer(key, sum(h.header("x-lago-unique-key") == key for h in self.hits))
        if answer == "hang":
            await anyio.Event().wait()
        if answer == "crash":
            raise RuntimeError("receiver bug")
        if answer == "200+crash":
            return Response(status_code=200, background=BackgroundTask(self._fail_later))
        if answer == "200+hang":
            return Response(status_code=200, background=BackgroundTask(self._hang_later))
        assert isinstance(answer, int)
        return Response(status_code=answer)

    async def _fail_later(self) -> None:
        self.background_runs += 1
        raise RuntimeError("background work failed after the answer")

    async def _hang_later(self) -> None:
        self.background_runs += 1
        await anyio.Event().wait()

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route(PATH, self.endpoint, methods=["POST"])])

    def by_key(self) -> dict[str, list[Hit]]:
        grouped: dict[str, list[Hit]] = {}
        for hit in self.hits:
            grouped.setdefault(hit.header("x-lago-unique-key"), []).append(hit)
        return grouped


# --------------------------------------------------------------------------------------- seeded emulator activity

_ODD = ["a", "é", "Ωmega", "😀", "x&y", "<b>", "a>b", "a/b", "a b", "\u2028", "\u2029", '"q"', "back\\slash", "tab\t",
        "\n", "\x7f", "\x01", "ü&<>", "id.with.dots", "%20", "+plus", "日本語", "🇫🇷", "\u200b", "O'Brien"]  # fmt: skip


def _odd(rng: random.Random, prefix: str) -> str:
    return prefix + "".join(rng.choice(_ODD) for _ in range(rng.randint(1, 3)))


def _path(text: str) -> str:
    return quote(text, safe="")


async def _activity(fake: FakeLago, clock: Clock, rng: random.Random, steps: int) -> None:
    """Random API calls any of which may emit webhooks: customers created and updated, subscriptions started,
    renamed, upgraded, downgraded and terminated, usage, periods ending (invoices), invoices paid, plans and metrics
    changed. A call Lago would refuse is fine (it emits nothing); one the emulator fails on is not."""
    fake.add_billable_metric("calls", name=_odd(rng, "Calls "))
    fake.add_plan("basic", amount_cents=1000, trial_period=rng.choice([0, 2]), charges=[
        {"billable_metric_code": "calls", "charge_model": "standard", "properties": {"amount": "0.5"}},
    ])  # fmt: skip
    fake.add_plan("pro", amount_cents=5000, name=_odd(rng, "Pro "))
    customers: list[str] = []
    subscriptions: dict[str, str] = {}
    async with fake.client() as client:

        async def call(method: str, url: str, body: Any = None) -> None:
            response = await client.request(method, "/api/v1" + url, json=body)
            assert response.status_code < 500, (method, url, body, response.text)

        for _ in range(steps):
            step = rng.choice(["customer", "customer", "subscribe", "subscribe", "rename", "switch", "terminate",
                               "usage", "clock", "pay", "plan", "metric"])  # fmt: skip
            if step == "customer" or not customers:
                external_id = rng.choice(customers) if customers and rng.random() < 0.3 else _odd(rng, "cus-")
                if external_id not in customers:
                    customers.append(external_id)
                customer: dict[str, Any] = {"external_id": external_id, "name": _odd(rng, "N "), "email": "a&b@x.io"}
                customer["metadata"] = [{"key": _odd(rng, "k"), "value": _odd(rng, "v"), "display_in_invoice": True}]
                await call("POST", "/customers", {"customer": customer})
            elif step == "subscribe" or not subscriptions:
                external_id = _odd(rng, "sub-")
                subscriptions[external_id] = rng.choice(customers)
                body = {"external_customer_id": subscriptions[external_id], "external_id": external_id}
                body |= {"plan_code": rng.choice(["basic", "pro"]), "name": _odd(rng, "S ")}
                await call("POST", "/subscriptions", {"subscription": body})
            elif step == "rename":
                external_id = rng.choice(list(subscriptions))
                await call("PUT", f"/subscriptions/{_path(external_id)}", {"subscription": {"name": _odd(rng, "R ")}})
            elif step == "switch":
                external_id = rng.choice(list(subscriptions))
                body = {"external_customer_id": subscriptions[external_id], "external_id": external_id}
                await call(
                    "POST", "/subscriptions", {"subscription": body | {"plan_code": rng.choice(["basic", "pro"])}}
                )
            elif step == "terminate":
                await call("DELETE", f"/subscriptions/{_path(rng.choice(list(subscriptions)))}")
            elif step == "usage":
                event: dict[str, Any] = {"transaction_id": uuid.UUID(int=rng.getrandbits(128)).hex, "code": "calls"}
                event |= {
                    "external_subscription_id": rng.choice(list(subscriptions)),
                    "timestamp": clock.now.timestamp(),
                }
                await call("POST", "/events", {"event": event})
            elif step == "clock":
                clock.now += timedelta(days=rng.randint(1, 20), hours=rng.randint(0, 23))
                fake.catch_up()
            elif step == "pay":
                invoices = fake.invoices
                if invoices:
                    invoice = rng.choice(invoices)["lago_id"]
                    status = rng.choice(["succeeded", "failed", "pending"])
                    await call("PUT", f"/invoices/{invoice}", {"invoice": {"payment_status": status}})
            elif step == "plan":
                await call("PUT", "/plans/pro", {"plan": {"name": _odd(rng, "Pro "), "description": _odd(rng, "<p>")}})
            else:
                await call("PUT", "/billable_metrics/calls", {"billable_metric": {"name": _odd(rng, "Calls ")}})


# ------------------------------------------------------------------------------------------------------ checks


def dispatcher_of(fake: FakeLago) -> WebhookDispatcher:
    """The emulator's webhook sender, configured through its own settings only."""
    assert isinstance(fake.webhook_dispatcher, WebhookDispatcher)
    return fake.webhook_dispatcher


async def _public_pem(fake: FakeLago) -> bytes:
    async with fake.client() as client:
        response = await client.get("/api/v1/webhooks/json_public_key")
    assert response.status_code == 200
    return base64.b64decode("".join(response.json()["webhook"]["public_key"].split()))  # (Ruby encode64: newlines)


def check_signed_as_lago(hit: Hit, algo: str, issuer: str, public_pem: bytes) -> None:
    """The headers Lago's ``Webhook#generate_headers`` and ``LagoHttpClient`` send, the signature over the raw body."""
    assert hit.header("content-type") == "application/json"
    assert hit.header("x-lago-signature-algorithm") == algo
    assert str(uuid.UUID(hit.header("x-lago-unique-key"))) == hit.header("x-lago-unique-key")
    signature = hit.header("x-lago-signature")
    if algo == "hmac":
        assert hmac.compare_digest(signature, lago_hmac(HMAC_KEY, hit.body))
        return
    header, claims = lago_jwt_claims(signature, public_pem)
    assert header == {"alg": "RS256"}
    # No exp, no iat: Lago signs exactly these two claims, written by ruby-jwt.
    assert claims == {"data": hit.body.decode(), "iss": issuer}
    assert signature.split(".")[1] == ruby_jwt_segment(claims)


def check_envelope(body: bytes, organization_id: str) -> dict[str, Any]:
    """A body as Lago writes it (``payload.to_json``), holding Lago's envelope, valid against the spec."""
    payload = json.loads(body)
    assert body == lago_to_json(payload).encode(), body
    object_type = payload["object_type"]
    assert list(payload) == ["webhook_type", "object_type", "organization_id", object_type]
    assert payload["organization_id"] == organization_id
    assert isinstance(payload[object_type], dict)
    assert spec_errors(payload) == []
    return payload  # type: ignore[no-any-return]


SEEDS = [3, 17, 40, 96]


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_activity_reaches_a_plain_receiver_as_lago_sends_it(seed: int) -> None:
    """Every webhook of seeded random emulator activity arrives as Lago sends it: the body is Rails' ``to_json`` of
    the envelope the emulator emitted (``<``, ``>``, ``&``, U+2028/U+2029 escaped, other unicode raw), signed over
    those raw bytes (HMAC or RS256 JWT with only ``data`` and ``iss``), with Lago's headers; each attempt of a webhook
    carries the same body, signature and ``X-Lago-Unique-Key``, a key no other webhook has; attempts stop at the
    first 200/201/202/204 or after 3; a redelivery sends the same bytes and key again."""
    rng = random.Random(seed)
    algo: Literal["jwt", "hmac"] = "hmac" if seed % 2 else "jwt"
    answers: dict[str, list[int | str]] = {}
    pool: list[int | str] = [200, 200, 201, 202, 204, 203, 205, 206, 301, 302, 304, 400, 401, 404, 409, 422, 429, 500,
                             502, 503, "crash"]  # fmt: skip

    def answer(key: str, attempt: int) -> int | str:
        script = answers.setdefault(key, [rng.choice(pool) for _ in range(LAGO_ATTEMPTS)])
        return script[attempt - 1]

    receiver = Receiver(answer=answer)
    clock = Clock(NOW)
    fake = FakeLago(api_key="k", clock=clock)
    dispatcher = dispatcher_of(fake)
    dispatcher.configure(app=receiver.app, url=f"http://receiver.test{PATH}", signature=algo, hmac_key=HMAC_KEY)
    await _activity(fake, clock, rng, steps=18)
    public_pem = await _public_pem(fake)
    fake.catch_up()  # (what the clock jobs emit by now: deliver_pending() would catch up first)
    emitted = list(fake.emitted_webhooks)
    deliveries = await dispatcher.deliver_pending()

    assert len(deliveries) == len(emitted) > 0
    grouped = receiver.by_key()
    assert list(grouped) == [d.unique_key for d in deliveries]  # one key per webhook, in order
    for delivery, sent in zip(deliveries, emitted, strict=True):
        hits = grouped[delivery.unique_key]
        expected = lago_history(answers[delivery.unique_key])
        assert len(hits) == len(expected)
        assert [h if isinstance(h, int) else "crash" for h in delivery.history] == expected
        assert delivery.state == ("succeeded" if expected[-1] in LAGO_SUCCESS else "failed")
        for hit in hits:
            assert hit.body == hits[0].body and hit.header("x-lago-signature") == hits[0].header("x-lago-signature")
            check_signed_as_lago(hit, algo, dispatcher.issuer, public_pem)
        assert check_envelope(hits[0].body, fake.organization_id) == sent

    again = rng.choice(deliveries)
    before = len(receiver.hits)
    answers[again.unique_key] = [200] * 10
    await dispatcher.redeliver(again.unique_key)
    [redelivered] = receiver.hits[before:]
    assert redelivered.body == grouped[again.unique_key][0].body
    assert redelivered.header("x-lago-unique-key") == again.unique_key
    check_signed_as_lago(redelivered, algo, dispatcher.issuer, public_pem)


def _one_webhook(receiver: Receiver, *, timeout: float = 30.0) -> FakeLago:
    fake = FakeLago(api_key="k")
    dispatcher_of(fake).configure(app=receiver.app, url=f"http://receiver.test{PATH}", timeout=timeout)
    fake.add_customer("acme & co", name="<Acme>")
    return fake


async def _deliver(fake: FakeLago) -> WebhookDelivery:
    [delivery] = await dispatcher_of(fake).deliver_pending()
    return delivery


async def test_a_receiver_slower_than_the_timeout_fails_the_attempt_and_the_retry_keeps_key_and_bytes() -> None:
    """A receiver that does not answer within the timeout (Lago: ``Net::ReadTimeout``) is a failed attempt, retried
    with the same body, signature and key, up to 3 attempts in all."""
    receiver = Receiver(answer=lambda key, attempt: "hang" if attempt < 3 else 204)
    delivery = await _deliver(_one_webhook(receiver, timeout=0.3))
    assert (delivery.state, delivery.attempts) == ("succeeded", 3)
    assert [str(entry).split(":")[0] for entry in delivery.history] == ["ReadTimeout", "ReadTimeout", "204"]
    [(key, hits)] = receiver.by_key().items()
    assert key == delivery.unique_key and len(hits) == 3
    assert len({(h.body, h.header("x-lago-signature")) for h in hits}) == 1


async def test_an_answer_given_before_the_receivers_background_work_fails_is_the_attempts_result() -> None:
    """A receiver that answers 200 and then fails in its background work (Starlette's ``BackgroundTask``, FastAPI's
    ``BackgroundTasks``) has answered: Lago got its 200, marks the webhook succeeded and sends it once. The emulator
    counted the later exception as a failed attempt and sent it 3 times."""
    receiver = Receiver(answer=lambda key, attempt: "200+crash")
    delivery = await _deliver(_one_webhook(receiver))
    assert (delivery.state, delivery.history) == ("succeeded", [200])
    assert (len(receiver.hits), receiver.background_runs) == (1, 1)


async def test_background_work_longer_than_the_timeout_does_not_undo_the_answer() -> None:
    """The timeout is for the answer: background work that runs on after a 200 (here it never ends) does not turn
    the attempt into a timeout and a retry. The emulator waited for the whole app call, timed it out and sent the
    webhook 3 times; the background work is now cut after another ``timeout`` so that delivery still ends."""
    receiver = Receiver(answer=lambda key, attempt: "200+hang")
    delivery = await _deliver(_one_webhook(receiver, timeout=0.3))
    assert (delivery.state, delivery.history) == ("succeeded", [200])
    assert (len(receiver.hits), receiver.background_runs) == (1, 1)


async def test_an_exception_before_any_answer_is_still_a_failed_attempt_naming_it() -> None:
    """A receiver that raises before answering (a server would answer 500) is a failed attempt, retried, the
    exception named in the delivery's error."""
    receiver = Receiver(answer=lambda key, attempt: "crash" if attempt == 1 else 200)
    delivery = await _deliver(_one_webhook(receiver))
    assert delivery.state == "succeeded" and delivery.attempts == 2
    assert "receiver bug" in str(delivery.history[0])


async def test_the_jwt_is_the_token_ruby_jwt_writes() -> None:
    """The JWT is written as ruby-jwt writes Lago's: a header of ``alg`` alone and the claims as raw UTF-8 JSON, so
    that (RS256 being deterministic) the token is the very one Lago would send with that key. PyJWT's defaults
    added ``"typ":"JWT"`` and wrote every non-ASCII character as a ``\\u`` escape: a token up to twice Lago's for
    non-Latin text, past a receiver server's header limit (h11: 16 KiB) where Lago's fits."""
    receiver = Receiver()
    fake = FakeLago(api_key="k")
    dispatcher = dispatcher_of(fake)
    dispatcher.configure(app=receiver.app, url=f"http://receiver.test{PATH}", signature="jwt")
    fake.add_customer("顧客-1", name="株式会社サンプル 😀 Ωmega", firstname="Zoë")
    await _deliver(fake)
    [hit] = receiver.hits
    token = hit.header("x-lago-signature")
    head, claims, _ = token.split(".")
    assert head == ruby_jwt_segment({"alg": "RS256"})
    assert claims == ruby_jwt_segment({"data": hit.body.decode(), "iss": dispatcher.issuer})
    check_signed_as_lago(hit, "jwt", dispatcher.issuer, await _public_pem(fake))


def test_over_http_the_receiver_gets_lagos_bytes_and_headers() -> None:
    """Served on 127.0.0.1 (uvicorn), a plain receiver gets the same bytes, a Content-Length that matches them, and
    Lago's headers; a 3xx is not followed (Net::HTTP does not follow redirects) but is a failed attempt."""
    receiver = Receiver(answer=lambda key, attempt: 302 if attempt == 1 else 200)
    fake = FakeLago(api_key="k")
    dispatcher = dispatcher_of(fake)
    with serve_in_thread(receiver.app) as url:
        dispatcher.configure(url=url + PATH, signature="jwt")
        fake.add_customer("cus-é&<x>", name="\u2028Ωmega\u2029")
        [delivery] = anyio.run(dispatcher.deliver_pending)
    public_pem = anyio.run(_public_pem, fake)
    assert (delivery.state, delivery.history) == ("succeeded", [302, 200])
    first, second = receiver.hits
    assert first.body == second.body and int(first.header("content-length")) == len(first.body)
    assert b"cus-\xc3\xa9\\u0026\\u003cx\\u003e" in first.body and b"\\u2028" in first.body
    check_signed_as_lago(second, "jwt", dispatcher.issuer, public_pem)
    check_envelope(second.body, fake.organization_id)
