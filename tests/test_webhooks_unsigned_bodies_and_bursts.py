"""The webhook receiver as an attacker and as Lago's retrying sender see it.

Covers: how much of an unsigned body the receiver reads before it refuses the request (JWT mode: no more than
the signature header could carry; a signature that cannot be Lago's, or names the other algorithm, before any
byte of the body), that Lago's own large JWT webhooks (raw UTF-8, as Ruby's ``to_json`` writes them) still pass,
and what Lago's retries of one delivery see (same key: processed once; a retry while the first attempt runs: 409
then a duplicate).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.routing import Route

from lago_org_billing import BillingSettings
from lago_org_billing._webhooks import LagoWebhooks, WebhookEvent, sign_hmac

pytestmark = pytest.mark.anyio

LAGO_URL = "http://lago.test"
PATH = "/webhooks/lago"
HMAC_KEY = "5b1e7a9c-review-webhooks5-hmac-key"
SETTINGS = BillingSettings(api_url=LAGO_URL, max_retries=0)
CHUNK = 16 * 1024
CHUNKS = 256  # 4 MiB: what an attacker streams with a signature it made up


@pytest.fixture(scope="module")
def private_pem() -> bytes:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def public_pem(private_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(private_pem, password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class Recorder:
    def __init__(self) -> None:
        self.events: list[WebhookEvent] = []
        self.invalidated: list[str] = []

    async def handler(self, event: WebhookEvent) -> None:
        self.events.append(event)

    async def invalidate(self, org_id: str) -> None:
        self.invalidated.append(org_id)


def jwt_receiver(public_pem: bytes, rec: Recorder) -> LagoWebhooks:
    """A JWT receiver with Lago's public key kept (no fetch)."""
    return LagoWebhooks(SETTINGS, public_key=public_pem, invalidate=rec.invalidate, handlers={"*": rec.handler})


def hmac_receiver(rec: Recorder) -> LagoWebhooks:
    return LagoWebhooks(
        SETTINGS.replace(webhook_hmac_key=HMAC_KEY), invalidate=rec.invalidate, handlers={"*": rec.handler}
    )


class Stream:
    """A request body streamed in chunks (no Content-Length): counts the chunks the receiver pulled."""

    def __init__(self, chunks: int = CHUNKS) -> None:
        self.chunks = chunks
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield b"x" * CHUNK


async def post(receiver: LagoWebhooks, content: Any, headers: dict[str, str]) -> httpx.Response:
    app = Starlette(routes=[Route(PATH, receiver, methods=["POST"])])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
        return await client.post(PATH, content=content, headers=headers)


def envelope(webhook_type: str, obj: dict[str, Any], object_type: str = "subscription") -> bytes:
    payload = {
        "webhook_type": webhook_type,
        "object_type": object_type,
        "organization_id": "lago-org",
        object_type: obj,
    }
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


class _RubyJSON(json.JSONEncoder):
    """Ruby's ``to_json``: non-ASCII written as UTF-8, not ``\\u`` escapes (the shortest token for a body)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**{**options, "ensure_ascii": False})


def lago_token(body: bytes, private_pem: bytes) -> str:
    return jwt.encode({"data": body.decode(), "iss": LAGO_URL}, private_pem, algorithm="RS256", json_encoder=_RubyJSON)


# ------------------------------------------------------------------------------- unsigned bodies, JWT mode


async def test_a_made_up_signature_costs_no_body_read_in_jwt_mode(public_pem: bytes) -> None:
    """A signature that cannot be Lago's (not a JWT, or not RS256) is refused before any byte of the body is read:
    it read the whole 4 MiB first (up to max_body_size, 10 MiB by default, per request)."""
    hs256 = jwt.encode({"data": "x", "iss": LAGO_URL}, "a-secret-long-enough-for-hs256-0123456789", algorithm="HS256")
    for signature in ("x", "a.b.c", hs256):
        rec = Recorder()
        stream = Stream()
        response = await post(jwt_receiver(public_pem, rec), stream, {"X-Lago-Signature": signature})
        assert response.status_code == 401, signature
        assert stream.pulled <= 1, (signature, stream.pulled)
        assert rec.events == []


async def test_an_unsigned_body_is_read_no_further_than_its_jwt_could_carry(
    private_pem: bytes, public_pem: bytes
) -> None:
    """A well-formed RS256 token (forged, or a real one captured) streamed with a 4 MiB body: a JWT carries the
    body it signs in its ``data`` claim, so a body longer than the token is not the one it signs. Refused (401)
    after a chunk or two, not after reading the whole body; and at once when Content-Length says so."""
    token = lago_token(envelope("subscription.started", {"external_customer_id": "org_a"}), private_pem)
    rec = Recorder()
    receiver = jwt_receiver(public_pem, rec)
    stream = Stream()
    response = await post(receiver, stream, {"X-Lago-Signature": token, "X-Lago-Signature-Algorithm": "jwt"})
    assert response.status_code == 401
    assert response.json()["status"] == "invalid_signature"
    assert stream.pulled <= 2, stream.pulled
    assert receiver.stats["rejected"] == 1

    declared = Stream()
    headers = {"X-Lago-Signature": token, "Content-Length": str(CHUNK * CHUNKS)}
    assert (await post(receiver, declared, headers)).status_code == 401
    assert declared.pulled == 0
    assert rec.events == [] and rec.invalidated == []


async def test_wrong_algorithm_is_refused_before_the_body_is_read() -> None:
    """A receiver in HMAC mode told the request is JWT-signed refuses it (with its advice) without reading it."""
    rec = Recorder()
    stream = Stream()
    response = await post(
        hmac_receiver(rec), stream, {"X-Lago-Signature": "a.b.c", "X-Lago-Signature-Algorithm": "jwt"}
    )
    assert response.status_code == 401
    assert "LAGO_WEBHOOK_HMAC_KEY" in response.json()["detail"]
    assert stream.pulled <= 1


async def test_lagos_large_jwt_webhooks_still_verify(private_pem: bytes, public_pem: bytes) -> None:
    """The bound is never tighter than Lago's own tokens: a large invoice webhook written as Ruby writes it (raw
    UTF-8, quotes and backslashes in names) verifies, whether or not a Content-Length is sent."""
    fees = [{"lago_id": str(uuid.uuid4()), "item": {"name": 'Überweisung "Pro" \\ 東京'}} for _ in range(400)]
    body = envelope("invoice.created", {"lago_id": "inv_1", "external_customer_id": "org_a", "fees": fees}, "invoice")
    token = lago_token(body, private_pem)
    assert len(body) > 30_000
    rec = Recorder()
    receiver = jwt_receiver(public_pem, rec)

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    for content in (body, chunked()):
        headers = {
            "X-Lago-Signature": token,
            "X-Lago-Signature-Algorithm": "jwt",
            "X-Lago-Unique-Key": str(uuid.uuid4()),
        }
        response = await post(receiver, content, headers)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "processed"
    assert [event.object["lago_id"] for event in rec.events] == ["inv_1", "inv_1"]


# ------------------------------------------------------------------------------------ Lago's retries


async def test_lagos_retry_during_its_first_attempt_is_409_then_a_duplicate() -> None:
    """Lago's first attempt still running (its 30 s timeout passed) when the retry comes: 409, which Lago retries;
    once the first attempt is done, 200 duplicate. The handler ran once."""
    started = anyio.Event()
    release = anyio.Event()
    runs: list[str] = []

    async def slow(event: WebhookEvent) -> None:
        runs.append(event.unique_key or "")
        started.set()
        await release.wait()

    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), handlers={"invoice.created": slow})
    body = envelope("invoice.created", {"lago_id": "inv_1", "external_customer_id": "org_a"}, "invoice")
    headers = {"X-Lago-Signature": sign_hmac(body, HMAC_KEY), "X-Lago-Unique-Key": "delivery-1"}
    answers: list[httpx.Response] = []

    async def first() -> None:
        answers.append(await post(receiver, body, headers))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(first)
        await started.wait()
        retry = await post(receiver, body, headers)
        assert (retry.status_code, retry.json()["status"]) == (409, "in_progress")
        release.set()
    assert answers[0].status_code == 200 and answers[0].json()["status"] == "processed"
    again = await post(receiver, body, headers)
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    assert runs == ["delivery-1"]


# ------------------------------------------------------------------------------ org-wide invalidations


class SlowFleetGate:
    """A quota gate whose ``invalidate_all`` (fleet-wide: a SCAN of every org's snapshot in Redis) takes a while;
    records when each run started and ended, relative to the webhooks' arrivals."""

    def __init__(self, fail_first: bool = False) -> None:
        self.log: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self.proceed = anyio.Event()
        self.fail_first = fail_first

    async def invalidate(self, org_id: str) -> None:
        self.log.append(f"org {org_id}")

    async def invalidate_all(self) -> None:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        runs = sum(1 for line in self.log if line == "start")
        self.log.append("start")
        try:
            await self.proceed.wait()
            if self.fail_first and runs == 0:
                raise ConnectionError("redis down")
        finally:
            self.running -= 1
            self.log.append("end")


def plan_updated(code: str) -> bytes:
    return envelope("plan.updated", {"lago_id": str(uuid.uuid4()), "code": code}, "plan")


async def burst(receiver: LagoWebhooks, gate: SlowFleetGate, count: int) -> list[httpx.Response]:
    """``count`` plan.updated webhooks at once (Lago's workers deliver concurrently), then the gate proceeds."""
    answers: list[httpx.Response] = []

    async def one(index: int) -> None:
        body = plan_updated(f"plan_{index}")
        headers = {"X-Lago-Signature": sign_hmac(body, HMAC_KEY), "X-Lago-Unique-Key": str(uuid.uuid4())}
        gate.log.append(f"arrived {index}")
        answers.append(await post(receiver, body, headers))

    async with anyio.create_task_group() as tasks:
        for index in range(count):
            tasks.start_soon(one, index)
        await anyio.wait_all_tasks_blocked()
        gate.proceed.set()
    return answers


async def test_a_burst_of_plan_webhooks_runs_the_fleet_wide_invalidation_twice_not_once_each() -> None:
    """A script editing 20 plans makes Lago send 20 plan.updated webhooks at once: each ran the gate's fleet-wide
    invalidation (with Redis, a SCAN over every org's snapshot), 20 at a time. Coalesced: the first runs, and those
    arriving meanwhile share one run that starts after them. Every webhook is answered 200 after a run that began
    after it arrived (none is told its change is in effect by a run that may predate it)."""
    gate = SlowFleetGate()
    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), invalidate=gate)
    answers = await burst(receiver, gate, 20)
    assert [a.status_code for a in answers] == [200] * 20
    assert {a.json()["status"] for a in answers} == {"processed"}
    assert gate.log.count("start") <= 2, gate.log
    assert gate.most_at_once == 1
    # the last run started after the last webhook arrived
    last_arrival = max(i for i, line in enumerate(gate.log) if line.startswith("arrived"))
    last_start = max(i for i, line in enumerate(gate.log) if line == "start")
    assert last_start > last_arrival
    assert receiver.stats["invalidations"] == 20


async def test_a_failed_shared_invalidation_fails_every_webhook_that_waited_on_it() -> None:
    """The shared run failing (Redis down) fails each webhook it served with a 500, so that Lago retries each; a
    later webhook runs it afresh."""
    gate = SlowFleetGate(fail_first=True)
    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), invalidate=gate)
    answers = await burst(receiver, gate, 1)
    assert [a.status_code for a in answers] == [500]
    body = plan_updated("again")
    headers = {"X-Lago-Signature": sign_hmac(body, HMAC_KEY), "X-Lago-Unique-Key": str(uuid.uuid4())}
    assert (await post(receiver, body, headers)).status_code == 200
    assert gate.log.count("start") == 2


async def test_a_cancelled_caller_leaves_the_shared_run_to_those_still_waiting() -> None:
    """The caller making a shared run is cancelled (its request gone): the run is not taken as done, and a caller
    still waiting on it makes it, instead of returning as though the invalidation had run."""
    from lago_org_billing._webhooks import _Coalesced

    coalesced = _Coalesced(object())
    steps = [anyio.Event() for _ in range(3)]
    makers: list[str] = []
    scopes: dict[str, anyio.CancelScope] = {}
    returned: list[str] = []

    async def operation() -> None:
        makers.append(anyio.get_current_task().name or "")
        await steps[len(makers) - 1].wait()

    async def caller(name: str) -> None:
        with anyio.CancelScope() as scope:
            scopes[name] = scope
            await coalesced.run(operation)
            returned.append(name)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(caller, "a", name="a")
        await anyio.wait_all_tasks_blocked()
        tasks.start_soon(caller, "b", name="b")
        tasks.start_soon(caller, "c", name="c")
        await anyio.wait_all_tasks_blocked()
        steps[0].set()  # the first run ends; b or c makes the second one
        await anyio.wait_all_tasks_blocked()
        assert makers[0] == "a" and len(makers) == 2
        scopes[makers[1]].cancel()
        await anyio.wait_all_tasks_blocked()
        assert len(makers) == 3 and makers[2] != makers[1]  # the other one makes the run again
        steps[2].set()
    assert sorted(returned) == sorted(["a", makers[2]])
