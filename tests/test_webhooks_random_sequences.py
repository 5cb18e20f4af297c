"""Seeded, model-checked sequences of Lago webhook deliveries against the receiver (``LagoWebhooks`` with its
``MemoryDedupe``, or two workers sharing one ``RedisDedupe`` through a relay that drops connections).

What the module promises (its docstrings), which is what every sequence is checked against:

* **Signatures.** A missing or wrong signature (another HMAC key, a tampered body, another RSA key, the algorithm the
  receiver does not take, a JWT of another Lago organization, a body longer than its JWT could carry) is answered 401
  and nothing runs. A body over ``max_body_size`` is answered 413; a signed body that is no Lago envelope, 400.
* **Replays.** ``X-Lago-Unique-Key`` is stable across Lago's retries of one delivery and each key is processed once; a
  key whose handlers failed is forgotten, so Lago's retry runs them again (handlers run at least once).
* **Answers.** 200 once processed, for a duplicate, and for a type nobody handles; 409 while the same key is being
  processed; 500 when a handler raised, or the quota state could not be dropped; 503 when Lago's public key could not
  be fetched. Anything but 200/201/202/204 makes Lago retry. An attempt Lago gives up on (its 30 s timeout) is a
  failed attempt.
* **Quota.** ``subscription.*`` and ``alert.triggered`` drop the cached state of the org the webhook names
  (``invalidate=``); plan and feature webhooks run ``invalidate_all``, a burst sharing runs, each webhook answered after
  a run that began after it arrived.
* **Redis.** With Redis the dedupe is shared by every worker; a dedupe Redis that fails is skipped (the webhook is
  processed without it: a delivery that comes again may run its handlers again).

The oracle, over every attempt of a sequence (see :func:`violations`):

1. every answer is the one documented for what was sent and what the callbacks did: a callback that raised, 500
   naming it; one that hung, no answer (Lago's timeout cancelled the attempt); 200 ``processed`` only with every
   effect of the webhook done by that attempt (the org's invalidation, each handler, or a fleet-wide run that began
   after it arrived); ``duplicate`` only once an attempt did them all; ``ignored`` only for a type without effects;
   409 only while another attempt of the same delivery runs (or an earlier attempt's claim, left in Redis by a call
   whose answer was lost, has not lapsed); 503 only to an attempt whose fetch of Lago's public key was refused;
2. no effect of a delivery runs in an attempt that arrived after an attempt of it was answered 2xx, and two attempts of
   one delivery never run effects at the same time, unless a Redis call of the dedupe failed for that delivery (the
   documented degradation);
3. once Lago has retried what it got no 2xx for (callbacks healthy again), every delivery's effects were done.

Lago is the emulator: its dispatcher makes each delivery (``emit``: the body and key Lago sends) and signs it
(``headers_for``), and sends a wave with its own retries (``deliver_pending``); the sequence also sends attempts of
its own (retries, duplicates, bursts of one delivery at once, deliveries out of order, forgeries). A callback that
hangs stands for one slower than Lago's timeout: it cancels its attempt, as the emulator's transport does when the
timeout fires (``httpx.ReadTimeout``). Nothing waits on a clock: every step is synchronised on events. With Redis,
worker 0's client is the one ``LAGO_REDIS_URL`` makes (it does not retry), worker 1's a redis-py client given as
``RedisDedupe(client=...)`` (it retries a command whose connection dropped).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import random
import socket
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import jwt
import pytest
import redis
import redis.asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

import _resp as resp
from _quota_app import REDIS_SERVER
from lago_org_billing import BillingSettings, LagoClient, _webhooks as webhooks_module
from lago_org_billing._webhooks import LagoWebhooks, MemoryDedupe, RedisDedupe, WebhookEvent, sign_hmac
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._webhooks import SUCCESS_STATUSES, WebhookDelivery, WebhookDispatcher

pytestmark = pytest.mark.anyio

PATH = "/webhooks/lago"
HMAC_KEY = "3f1c9a52-7d0e-4c6b-a1b2-random-sequences"
MAX_BODY = 3000

#: The attempt (one request to a worker) the code running now belongs to: set by :class:`Lane`, read by the callbacks.
CURRENT: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar("attempt", default=None)

#: Webhook types of the sequences: the object type, and the effects the receiver below has for it.
TYPES: dict[str, tuple[str, frozenset[str]]] = {
    "subscription.started": ("subscription", frozenset({"invalidate", "handler"})),
    "subscription.terminated": ("subscription", frozenset({"invalidate", "handler"})),
    "alert.triggered": ("triggered_alert", frozenset({"invalidate"})),
    "invoice.created": ("invoice", frozenset({"handler", "handler2"})),
    "customer.updated": ("customer", frozenset({"sync_handler"})),  # a plain function: run in a thread
    "plan.updated": ("plan", frozenset({"invalidate_all", "handler"})),
    "quote.approved": ("quote", frozenset()),  # nothing handles it: 200 "ignored"
}

#: The answer while Lago's public key cannot be fetched (Lago retries it).
UNAVAILABLE = (503, "public_key_unavailable")

#: Expected answers to what is not a good delivery, by receiver mode: (status, the answer's "status").
BAD_REQUESTS: dict[str, dict[str, tuple[int, str]]] = {
    "missing": {m: (401, "missing_signature") for m in ("hmac", "jwt", "both")},
    "wrong_key": {
        "hmac": (401, "invalid_signature"),
        "jwt": (401, "wrong_algorithm"),
        "both": (401, "invalid_signature"),
    },
    "wrong_algorithm": {"hmac": (401, "wrong_algorithm"), "jwt": (401, "wrong_algorithm")},
    "tampered": {m: (401, "invalid_signature") for m in ("hmac", "jwt", "both")},
    "other_rsa_key": {m: (401, "invalid_signature") for m in ("jwt", "both")},
    "other_organization": {m: (401, "wrong_organization") for m in ("jwt", "both")},
    "longer_than_its_jwt": {m: (401, "invalid_signature") for m in ("jwt", "both")},
    "oversize": {m: (413, "too_large") for m in ("hmac", "jwt", "both")},
    "not_a_webhook": {m: (400, "not_a_webhook") for m in ("hmac", "jwt", "both")},
}


# ------------------------------------------------------------------------------------------------ the model


@dataclass
class Effect:
    """One call of a callback (``invalidate``, ``invalidate_all``, a handler) and what it did."""

    kind: str
    outcome: str  # "ok", "fail" (raised), "hang" (never returned: its attempt was cancelled)
    start: int
    arg: str | None
    end: int | None = None  # (None: it hung)
    cancelled: int | None = None  # when the cancellation of a hung one landed


@dataclass
class Delivery:
    """One webhook Lago sends (its key and body are the emulator's), and the callbacks' plan for its attempts."""

    index: int
    sent: WebhookDelivery
    org: str | None
    #: per attempt reaching the receiver (the first ones; later ones all succeed): effect kind -> (outcome, yields)
    faults: list[dict[str, tuple[str, int]]]

    @property
    def key(self) -> str:
        return self.sent.unique_key

    @property
    def expected(self) -> frozenset[str]:
        return TYPES[self.sent.webhook_type][1]


@dataclass
class Attempt:
    """One request reaching a worker, as the receiver answered it."""

    number: int
    delivery: Delivery | None
    request: str  # "valid", or one of BAD_REQUESTS
    worker: int
    ordinal: int  # how many attempts of the delivery reached the receiver before this one
    start: int
    block: bool = False  # its first callback waits for ``unblock`` (a receiver slower than Lago's timeout)
    answered: int | None = None  # the tick of the response's start
    end: int | None = None
    status: int | None = None  # None: no answer (it was cancelled, Lago's timeout)
    code: str | None = None
    effects: list[Effect] = field(default_factory=list)
    key_fetches: list[int] = field(default_factory=list)  # the statuses of Lago's public key fetched meanwhile
    seen_by_lago: bool = True  # False: Lago had given up on it when it answered
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    blocked: anyio.Event = field(default_factory=anyio.Event)
    unblock: anyio.Event = field(default_factory=anyio.Event)
    settled: anyio.Event = field(default_factory=anyio.Event)  # blocked, or over

    def __str__(self) -> str:
        what = self.request if self.delivery is None else f"{self.request} d{self.delivery.index}"
        effects = ",".join(f"{e.kind}:{e.outcome}@{e.start}-{e.end}" for e in self.effects)
        return (
            f"#{self.number} {what} ({self.delivery.sent.webhook_type if self.delivery else '-'}) w{self.worker} "
            f"ord{self.ordinal} [{self.start}..{self.answered}..{self.end}] -> {self.status} {self.code} "
            f"{{{effects}}}{'' if self.seen_by_lago else ' (Lago gave up)'}"
        )


class Model:
    """Everything that happened: deliveries, attempts, effects, each stamped with a logical clock."""

    def __init__(self, seed: int, mode: str) -> None:
        self.seed = seed
        self.mode = mode
        self.rng = random.Random(seed)
        self.lock = threading.Lock()  # (sync handlers record from a worker thread)
        self.clock = 0
        self.deliveries: list[Delivery] = []
        self.by_key: dict[str, Delivery] = {}
        self.attempts: list[Attempt] = []
        self.ordinals: Counter[int] = Counter()
        self.sends: dict[str, tuple[str, Delivery | None, bool]] = {}
        self.by_send: dict[str, Attempt] = {}
        self.arrived: dict[str, anyio.Event] = {}
        self.healing = False  # every callback succeeds (Lago retrying, at the end, what it has no 2xx for)
        #: unique keys a Redis call of the dedupe failed for (a dropped connection), and when it first did
        self.disturbed: dict[str, int] = {}
        self.foreign: list[str] = []

    def tick(self) -> int:
        with self.lock:
            self.clock += 1
            return self.clock

    def add(self, sent: WebhookDelivery, org: str | None) -> Delivery:
        plan = random.Random(f"{self.seed}:{len(self.deliveries)}")
        faults = []
        for _ in range(4):
            table = {}
            for kind in ("invalidate", "invalidate_all", "handler", "handler2", "sync_handler"):
                outcomes = ("ok", "fail") if kind == "sync_handler" else ("ok", "fail", "hang")
                weights = (7, 2) if kind == "sync_handler" else (7, 2, 1)
                table[kind] = (plan.choices(outcomes, weights)[0], plan.randrange(4))
            faults.append(table)
        delivery = Delivery(len(self.deliveries), sent, org, faults)
        self.deliveries.append(delivery)
        self.by_key[sent.unique_key] = delivery
        return delivery

    def expect(self, request: str, delivery: Delivery | None, block: bool = False) -> str:
        """A send id for the next request (its header ``X-Model-Send``): what the lane records it as."""
        send_id = uuid.uuid4().hex
        self.sends[send_id] = (request, delivery, block)
        self.arrived[send_id] = anyio.Event()
        return send_id

    def arrive(self, worker: int, scope: Scope) -> Attempt:
        headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        send_id = headers.get("x-model-send")
        if send_id is not None:
            request, delivery, block = self.sends.pop(send_id)
        else:  # sent by the emulator's dispatcher
            request, block = "valid", False
            delivery = self.by_key.get(headers.get("x-lago-unique-key", ""))
            if delivery is None:
                self.foreign.append(str(headers))
        ordinal = 0
        if delivery is not None and request == "valid":
            ordinal = self.ordinals[delivery.index]
            self.ordinals[delivery.index] += 1
        attempt = Attempt(len(self.attempts), delivery, request, worker, ordinal, self.tick(), block=block)
        self.attempts.append(attempt)
        if send_id is not None:
            self.by_send[send_id] = attempt
            self.arrived.pop(send_id).set()
        return attempt

    def fault(self, attempt: Attempt, kind: str) -> tuple[str, int]:
        delivery = attempt.delivery
        if self.healing or delivery is None or attempt.ordinal >= len(delivery.faults):
            return "ok", 0
        return delivery.faults[attempt.ordinal][kind]

    def acked_by_lago(self, delivery: Delivery) -> bool:
        return any(
            a.delivery is delivery and a.request == "valid" and a.seen_by_lago and a.status in SUCCESS_STATUSES
            for a in self.attempts
        )


class Callbacks:
    """The receiver's ``invalidate=`` target and handlers: each call does what the plan of its attempt says."""

    def __init__(self, model: Model) -> None:
        self.model = model

    async def invalidate(self, org_id: str) -> None:
        await self._act("invalidate", org_id)

    async def invalidate_all(self) -> None:
        await self._act("invalidate_all", None)

    def handler(self, kind: str) -> Callable[[WebhookEvent], Any]:
        async def handle(event: WebhookEvent) -> None:
            await self._act(kind, event.org_id)

        return handle

    def sync_handler(self, event: WebhookEvent) -> None:
        attempt = CURRENT.get()  # (anyio copies the context into the worker thread)
        assert attempt is not None
        outcome, _ = self.model.fault(attempt, "sync_handler")
        effect = Effect("sync_handler", outcome, self.model.tick(), event.org_id)
        attempt.effects.append(effect)
        effect.end = self.model.tick()
        if outcome == "fail":
            raise RuntimeError("sync_handler failed (planned)")

    async def _act(self, kind: str, arg: str | None) -> None:
        attempt = CURRENT.get()
        assert attempt is not None
        outcome, yields = self.model.fault(attempt, kind)
        effect = Effect(kind, outcome, self.model.tick(), arg)
        attempt.effects.append(effect)
        if attempt.block and not attempt.blocked.is_set():  # Lago gives up on this attempt; the receiver goes on
            attempt.blocked.set()
            attempt.settled.set()
            await attempt.unblock.wait()
        for _ in range(yields):  # (lets concurrent attempts interleave)
            await anyio.lowlevel.checkpoint()
        if outcome == "hang":  # slower than Lago's timeout: the attempt is cancelled, as the emulator's transport does
            attempt.scope.cancel()
            try:
                await anyio.sleep_forever()
            finally:
                effect.cancelled = self.model.tick()
        effect.end = self.model.tick()
        if outcome == "fail":
            raise RuntimeError(f"{kind} failed (planned)")


class Lane:
    """One worker: the receiver mounted the documented way, recording each attempt. An attempt a hung callback
    cancelled ends as Lago's timeout does, in ``httpx.ReadTimeout`` (what ``TimedASGITransport`` raises)."""

    def __init__(self, model: Model, worker: int, receiver: LagoWebhooks) -> None:
        self.model = model
        self.worker = worker
        self.app = Starlette(routes=[Route(PATH, receiver, methods=["POST"])])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        attempt = self.model.arrive(self.worker, scope)
        body: list[bytes] = []

        async def recorded(message: Message) -> None:
            if message["type"] == "http.response.start":
                attempt.status = message["status"]
                attempt.answered = self.model.tick()
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))
            await send(message)

        token = CURRENT.set(attempt)
        try:
            with attempt.scope:
                await self.app(scope, receive, recorded)
        finally:
            CURRENT.reset(token)
            attempt.end = self.model.tick()
            attempt.settled.set()
        if body:
            attempt.code = json.loads(b"".join(body)).get("status")
        if attempt.scope.cancelled_caught:
            attempt.status = None
            raise httpx.ReadTimeout("the receiver did not answer within Lago's timeout")


class KeyFetches(httpx.AsyncBaseTransport):
    """The emulator's transport (the receivers' LagoClient), noting each fetch of Lago's public key on the attempt
    that made it."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        attempt = CURRENT.get()
        if attempt is not None and request.url.path.endswith("/json_public_key"):
            attempt.key_fetches.append(response.status_code)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class Balancer:
    """What the emulator's dispatcher sends to: one of the workers, as a load balancer picks."""

    def __init__(self, lanes: list[Lane], rng: random.Random) -> None:
        self.lanes = lanes
        self.rng = rng

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.lanes[self.rng.randrange(len(self.lanes))](scope, receive, send)


# ------------------------------------------------------------------------------------------------ the oracle


def _effects_done(attempt: Attempt, model: Model) -> list[str]:
    """What is missing for ``attempt`` to have done every effect of its delivery (empty: all done)."""
    delivery = attempt.delivery
    assert delivery is not None and attempt.answered is not None
    missing = []
    for kind in sorted(delivery.expected):
        if kind == "invalidate_all":  # a run that began after the attempt came, over before it was answered
            ok = any(
                e.kind == kind
                and e.outcome == "ok"
                and e.end is not None
                and attempt.start < e.start
                and e.end < attempt.answered
                for other in model.attempts
                for e in other.effects
            )
        else:
            ok = any(
                e.kind == kind
                and e.outcome == "ok"
                and e.end is not None
                and (kind != "invalidate" or e.arg == delivery.org)
                for e in attempt.effects
            )
        if not ok:
            missing.append(kind)
    return missing


def _failed_run_served(attempt: Attempt, model: Model) -> bool:
    """Whether a fleet-wide run that failed began after ``attempt`` came and ended before it was answered."""
    assert attempt.answered is not None
    return any(
        e.kind == "invalidate_all"
        and e.outcome == "fail"
        and e.end is not None
        and attempt.start < e.start
        and e.end < attempt.answered
        for other in model.attempts
        for e in other.effects
    )


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def violations(model: Model) -> list[str]:
    """Every way the attempts recorded break what the module promises (see the module docstring)."""
    found: list[str] = []
    key_failed = False  # a fetch of Lago's public key failed (a rotated key then is unknown: 503, not 401)
    for attempt in sorted(model.attempts, key=lambda a: a.start):
        delivery = attempt.delivery
        answer = (attempt.status, attempt.code)
        key_failed = key_failed or any(status != 200 for status in attempt.key_fetches)
        if attempt.request != "valid":
            expected = BAD_REQUESTS[attempt.request][model.mode]
            if (answer != expected and not (key_failed and answer == UNAVAILABLE)) or attempt.effects:
                found.append(f"{attempt}: expected {expected} and nothing run")
            continue
        assert delivery is not None
        if answer == UNAVAILABLE:
            if attempt.effects or all(status == 200 for status in attempt.key_fetches):
                found.append(f"{attempt}: answered 503, yet Lago's public key was not refused to it")
            continue
        failed = [e for e in attempt.effects if e.outcome == "fail"]
        hung = [e for e in attempt.effects if e.outcome == "hang"]
        if hung:
            if attempt.status is not None:
                found.append(f"{attempt}: a callback hung, yet it was answered")
            continue
        if attempt.status is None:
            found.append(f"{attempt}: no answer, yet no callback hung")
            continue
        if failed:
            code = "invalidation_failed" if failed[0].kind.startswith("invalidate") else "handler_failed"
            if answer != (500, code):
                found.append(f"{attempt}: {failed[0].kind} raised, expected (500, {code!r})")
        elif answer == (500, "invalidation_failed"):
            if not _failed_run_served(attempt, model):
                found.append(f"{attempt}: 500 invalidation_failed, yet no invalidation it waited on failed")
        elif answer == (200, "processed"):
            missing = _effects_done(attempt, model)
            if missing or not delivery.expected:
                found.append(f"{attempt}: answered processed without {missing or 'any effect to do'}")
        elif answer == (200, "ignored"):
            if delivery.expected:
                found.append(f"{attempt}: answered ignored, yet its type has effects {sorted(delivery.expected)}")
        elif answer == (200, "duplicate"):
            assert attempt.answered is not None
            done = [
                a
                for a in model.attempts
                if a.delivery is delivery
                and a is not attempt
                and a.code in ("processed", "ignored")
                and a.answered is not None
                and a.start < attempt.answered
            ]
            if attempt.effects or not done:
                found.append(f"{attempt}: answered duplicate, yet no attempt before it had done its effects")
        elif answer == (409, "in_progress"):
            others = [
                a
                for a in model.attempts
                if a.delivery is delivery
                and a is not attempt
                and a.request == "valid"
                and a.end is not None
                and attempt.end is not None
                and _overlap((a.start, a.end), (attempt.start, attempt.end))
            ]
            # (or a claim left behind by an earlier attempt whose Redis call failed: it lapses after processing_ttl)
            left_behind = model.disturbed.get(delivery.key, attempt.start) < attempt.start
            if attempt.effects or not (others or left_behind):
                found.append(f"{attempt}: answered 409, yet no other attempt of it was being processed")
        else:
            found.append(f"{attempt}: an answer the module does not document")
        if attempt.code in ("duplicate", "in_progress", "ignored") and attempt.effects:
            found.append(f"{attempt}: answered {attempt.code} after running effects")

    for delivery in model.deliveries:
        mine = [a for a in model.attempts if a.delivery is delivery and a.request == "valid"]
        if not model.acked_by_lago(delivery):
            found.append(f"d{delivery.index} ({delivery.sent.webhook_type}): Lago never got a 2xx for it")
        if delivery.expected and not any(a.code == "processed" for a in mine):
            found.append(f"d{delivery.index} ({delivery.sent.webhook_type}): its effects were never all done")
        if delivery.key in model.disturbed:
            continue  # (its dedupe's Redis failed: processed without dedupe, as documented)
        acks = [a.answered for a in mine if a.status in SUCCESS_STATUSES and a.answered is not None]
        if acks:
            for attempt in mine:
                if attempt.start > min(acks) and attempt.effects:
                    found.append(f"{attempt}: ran effects again after the delivery was answered 2xx at {min(acks)}")
        spans = [  # (from its first effect's start to its last one's end, or to the cancellation of a hung one)
            (a, (a.effects[0].start, max(e.end or e.cancelled or a.end or 0 for e in a.effects)))
            for a in mine
            if a.effects
        ]
        for i, (a, span) in enumerate(spans):
            for b, other in spans[i + 1 :]:
                if _overlap(span, other):
                    found.append(f"{a} and {b}: two attempts of one delivery ran effects at the same time")
    found.extend(f"a request the model did not send: {headers}" for headers in model.foreign)
    return found


# ------------------------------------------------------------------------------------------------ Lago's side


def _private_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(autouse=True)
def _key_fetched_again_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed fetch of Lago's public key is tried again at the next webhook, not 2 s later: a whole sequence takes
    less than that (so a 503 comes only from a fetch refused to that very attempt)."""
    monkeypatch.setattr(webhooks_module, "_KEY_RETRY_AFTER", 0.0)


@pytest.fixture(scope="module")
def other_rsa_key() -> bytes:
    """An RSA key that is not Lago's (a forger's)."""
    return _private_pem()


class Lago:
    """Lago's side: the emulator makes and signs the deliveries and sends waves of them with its retries; the sequence
    sends attempts of its own through :meth:`send`."""

    def __init__(self, model: Model, fake: FakeLago, lanes: list[Lane], other_rsa_key: bytes) -> None:
        self.model = model
        self.fake = fake
        self.lanes = lanes
        self.other_rsa_key = other_rsa_key
        dispatcher = fake.webhook_dispatcher
        assert isinstance(dispatcher, WebhookDispatcher)
        self.dispatcher = dispatcher
        self.clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=lane), base_url="http://webhook-receiver")
            for lane in lanes
        ]

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()

    def emit(self, rng: random.Random, webhook_type: str | None = None) -> Delivery:
        webhook_type = webhook_type or rng.choice(sorted(TYPES))
        object_type = TYPES[webhook_type][0]
        org = f"org_{rng.randrange(4)}"
        obj: dict[str, Any] = {"lago_id": str(uuid.UUID(int=rng.getrandbits(128)))}
        if object_type == "subscription":
            obj.update(external_id=org, external_customer_id=org, plan_code="pro", status="active")
        elif object_type == "triggered_alert":
            obj.update(external_customer_id=org, external_subscription_id=org, alert_type="current_usage_amount")
        elif object_type == "invoice":
            obj.update(customer={"external_id": org}, total_amount_cents=1000)
        elif object_type == "customer":
            obj.update(external_id=org, name="Acme")
        else:  # (a plan, a quote: no org)
            obj.update(code="pro")
        sent = self.dispatcher.emit(webhook_type, object_type, obj)
        assert sent is not None
        return self.model.add(sent, org if TYPES[webhook_type][1] & {"invalidate"} else None)

    def _algorithm(self, rng: random.Random) -> str:
        return {"hmac": "hmac", "jwt": "jwt"}.get(self.model.mode) or rng.choice(("hmac", "jwt"))

    def _sign(self, body: bytes, algorithm: str, private: bytes | None = None) -> str:
        if algorithm == "hmac":
            return sign_hmac(body, HMAC_KEY)
        token: str = jwt.encode(
            {"data": body.decode(), "iss": self.fake.base_url},
            private or self.fake.rsa_private_key_pem,
            algorithm="RS256",
        )
        return token

    def request(self, delivery: Delivery, request: str, rng: random.Random) -> tuple[bytes, dict[str, str]]:
        """The body and headers of an attempt of ``delivery`` (``request`` "valid"), or of a bad request made of it."""
        body, key = delivery.sent.body, delivery.key
        algorithm = self._algorithm(rng)
        private: bytes | None = None
        signed = body
        if request == "wrong_algorithm":
            algorithm = "jwt" if self.model.mode == "hmac" else "hmac"
        elif request == "wrong_key":
            algorithm = "hmac"
        elif request in ("other_rsa_key", "other_organization", "longer_than_its_jwt"):
            algorithm = "jwt"
        if request == "tampered":  # another org, the same length
            body = body.replace(b'"org_', b'"grp_') if b'"org_' in body else body.replace(b'"pro"', b'"max"')
        elif request == "other_rsa_key":
            private = self.other_rsa_key
        elif request == "other_organization":
            payload = json.loads(body)
            payload["organization_id"] = str(uuid.uuid4())
            body = signed = json.dumps(payload, separators=(",", ":")).encode()
        elif request == "oversize":
            payload = json.loads(body)
            payload[payload["object_type"]]["padding"] = "x" * MAX_BODY
            body = signed = json.dumps(payload, separators=(",", ":")).encode()
            key = str(uuid.uuid4())
        elif request == "not_a_webhook":
            body = signed = json.dumps({"lago_id": delivery.key}).encode()
            key = str(uuid.uuid4())
        headers = {
            "Content-Type": "application/json",
            "X-Lago-Signature": self._sign(signed, algorithm, private),
            "X-Lago-Signature-Algorithm": algorithm,
            "X-Lago-Unique-Key": key,
        }
        if request == "wrong_key":
            headers["X-Lago-Signature"] = sign_hmac(body, "another-organizations-key")
        elif request == "missing":
            del headers["X-Lago-Signature"]
        elif request == "longer_than_its_jwt":
            body = body + b" " * (len(headers["X-Lago-Signature"]) + 1 - len(body))
        return body, headers

    async def send(
        self,
        delivery: Delivery,
        worker: int,
        rng: random.Random,
        request: str = "valid",
        block: bool = False,
        send_id: str | None = None,
    ) -> Attempt:
        """One attempt to ``worker``; a timeout (the receiver cancelled) is a failed attempt, as Lago counts it."""
        body, headers = self.request(delivery, request, rng)
        if send_id is None:
            send_id = self.model.expect(request, delivery if request == "valid" else None, block)
        headers["X-Model-Send"] = send_id
        with contextlib.suppress(httpx.ReadTimeout):
            await self.clients[worker].post(PATH, content=body, headers=headers)
        return self.model.by_send[send_id]

    async def late(self, delivery: Delivery, rng: random.Random) -> None:
        """An attempt Lago gives up on while the receiver goes on (uvicorn does not cancel it): Lago's retries
        meanwhile, then the late attempt finishes (Lago never sees its answer), then Lago's next retry."""
        workers = len(self.lanes)
        send_id = self.model.expect("valid", delivery, block=True)
        arrived = self.model.arrived[send_id]
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(functools.partial(self.send, send_id=send_id), delivery, rng.randrange(workers), rng)
            await arrived.wait()
            attempt = self.model.by_send[send_id]
            await attempt.settled.wait()
            attempt.seen_by_lago = False
            if attempt.blocked.is_set():
                for _ in range(rng.randint(1, 2)):
                    await self.send(delivery, rng.randrange(workers), rng)
                attempt.unblock.set()
        await self.send(delivery, rng.randrange(workers), rng)


# ------------------------------------------------------------------------------------------------ Redis, dropping


class DroppingRelay(resp.Relay):
    """A TCP relay in front of a redis-server that drops the connection carrying a dedupe call the plan names
    (``drops``: (call, unique key, occurrence) -> "before" (the call never reaches Redis) or "after" (Redis runs it,
    its answer is lost)). Calls: ``claim`` (SET NX), ``get``, ``complete`` (SET done), ``release`` (DEL)."""

    def __init__(self, target: str, prefix: str, model: Model) -> None:
        self.prefix = prefix.encode()
        self.model = model
        self.drops: dict[tuple[str, str, int], str] = {}
        self.seen: Counter[tuple[str, str]] = Counter()
        self.active = True
        super().__init__(target)

    def link(self, client: socket.socket, upstream: socket.socket) -> None:
        drop_answer = threading.Event()
        threading.Thread(target=self._requests, args=(client, upstream, drop_answer), daemon=True).start()
        threading.Thread(target=self._answers, args=(client, upstream, drop_answer), daemon=True).start()

    def _decide(self, args: list[bytes]) -> str | None:
        name = args[0].upper()
        call = {b"GET": "get", b"DEL": "release"}.get(name)
        if name == b"SET":
            call = "claim" if b"NX" in (arg.upper() for arg in args) else "complete"
        if call is None or len(args) < 2 or not args[1].startswith(self.prefix):
            return None
        key = args[1][len(self.prefix) :].decode()
        with self.lock:
            self.seen[call, key] += 1
            mode = self.drops.get((call, key, self.seen[call, key])) if self.active else None
            if mode is not None:
                self.model.disturbed.setdefault(key, self.model.tick())
        return mode

    def _requests(self, client: socket.socket, upstream: socket.socket, drop_answer: threading.Event) -> None:
        buffer = b""
        try:
            while data := client.recv(65536):
                buffer += data
                while (parsed := resp.command(buffer)) is not None:
                    args, size = parsed
                    command, buffer = buffer[:size], buffer[size:]
                    mode = self._decide(args)
                    if mode == "before":
                        _cut(client, upstream)
                        return
                    if mode == "after":
                        drop_answer.set()
                    upstream.sendall(command)
        except OSError:
            pass
        _cut(client, upstream)

    def _answers(self, client: socket.socket, upstream: socket.socket, drop_answer: threading.Event) -> None:
        try:
            while data := upstream.recv(65536):
                if drop_answer.is_set():  # (one call at a time on a connection: this is that call's answer)
                    break
                client.sendall(data)
        except OSError:
            pass
        _cut(client, upstream)


def _cut(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


# ------------------------------------------------------------------------------------------------ the sequences


@dataclass
class World:
    """A sequence's receivers and Lago (see :func:`world`)."""

    model: Model
    lago: Lago
    relay: DroppingRelay | None = None
    store: Any = None  # a direct client of the dedupe's Redis (not through the relay)
    prefix: str = ""


@contextlib.asynccontextmanager
async def world(seed: int, mode: str, other_rsa_key: bytes, redis_url: str | None = None) -> AsyncIterator[World]:
    """The receiver's workers (one with a memory dedupe, or two sharing Redis through a dropping relay), the
    emulator configured to send to them, and the model recording it all."""
    model = Model(seed, mode)
    fake = FakeLago(api_key="k")
    settings = BillingSettings(api_url=fake.base_url, api_key=fake.api_key, max_retries=0)
    if mode in ("hmac", "both"):
        settings = settings.replace(webhook_hmac_key=HMAC_KEY)
    callbacks = Callbacks(model)
    handlers: dict[str, Any] = {
        "subscription.started": callbacks.handler("handler"),
        "subscription.terminated": callbacks.handler("handler"),
        "invoice.created": [callbacks.handler("handler"), callbacks.handler("handler2")],
        "customer.updated": callbacks.sync_handler,
        "plan.updated": callbacks.handler("handler"),
    }
    relay = None
    prefix = f"seq-{uuid.uuid4().hex[:8]}:"
    dedupes: list[Any] = []
    if redis_url is None:
        dedupes = [MemoryDedupe()]
    else:  # worker 0 as LAGO_REDIS_URL makes it; worker 1 given a client of its own (redis-py's, which retries)
        relay = DroppingRelay(redis_url, prefix, model)
        own = redis.asyncio.Redis(host="127.0.0.1", port=relay.listener.getsockname()[1], socket_timeout=2)
        dedupes = [RedisDedupe(relay.url, prefix=prefix), RedisDedupe(client=own, prefix=prefix)]
    async with LagoClient(settings, transport=KeyFetches(fake.transport())) as client:
        options: dict[str, Any] = {}
        if mode in ("jwt", "both"):  # (Lago's public key fetched from the emulator; its organization known)
            options = {"client": client, "organization_id": fake.organization_id}
        receivers = [
            LagoWebhooks(
                settings,
                invalidate=callbacks,
                handlers=handlers,
                dedupe=dedupe,
                max_body_size=MAX_BODY,
                **options,
            )
            for dedupe in dedupes
        ]
        lanes = [Lane(model, worker, receiver) for worker, receiver in enumerate(receivers)]
        dispatcher = fake.webhook_dispatcher
        assert isinstance(dispatcher, WebhookDispatcher)
        dispatcher.configure(
            app=Balancer(lanes, random.Random(seed)),
            signature="hmac" if mode == "hmac" else "jwt",
            hmac_key=HMAC_KEY,
            issuer=fake.base_url,
            attempts=3,
            timeout=60,
        )
        lago = Lago(model, fake, lanes, other_rsa_key)
        store = redis.Redis.from_url(redis_url) if redis_url else None
        try:
            yield World(model, lago, relay, store, prefix)
        finally:
            await lago.aclose()
            for dedupe in dedupes:
                if isinstance(dedupe, RedisDedupe):
                    await dedupe.aclose()
            if relay is not None:
                relay.close()
            if store is not None:
                store.close()


async def run_sequence(w: World, steps: int = 30) -> None:
    """A random sequence of ``steps`` (the seed's), then Lago retrying until it has a 2xx for every delivery."""
    model, lago = w.model, w.lago
    rng = model.rng
    workers = len(lago.lanes)
    bad = sorted(request for request, modes in BAD_REQUESTS.items() if model.mode in modes)
    for _ in range(rng.randint(3, 5)):
        lago.emit(rng)
    outage = rng.randint(0, 2)
    if model.mode != "hmac" and outage:  # the first fetches of Lago's public key fail: 503, and Lago retries
        lago.fake.inject_fault(503, count=outage, path="/api/v1/webhooks")  # type: ignore[attr-defined]
    if w.relay is not None:  # some dedupe calls of some deliveries lose their connection
        for delivery in model.deliveries:
            plan_drops(w.relay, delivery, rng)
    for _ in range(steps):
        step = rng.choices(
            ("emit", "lago", "send", "burst", "mix", "plans", "late", "replay", "bad"), (2, 2, 5, 2, 2, 1, 1, 2, 2)
        )[0]
        deliveries = model.deliveries
        if step == "emit":
            for _ in range(rng.randint(1, 3)):
                delivery = lago.emit(rng)
                if w.relay is not None:
                    plan_drops(w.relay, delivery, rng)
        elif step == "lago":  # a wave: Lago's own attempts, in order, each retried up to 3 times
            await lago.dispatcher.deliver_pending()
        elif step in ("send", "replay"):
            candidates = [d for d in deliveries if model.acked_by_lago(d) == (step == "replay")] or deliveries
            await lago.send(rng.choice(candidates), rng.randrange(workers), rng)
        elif step == "burst":  # attempts of one delivery at once (Lago's retry meeting its slow first attempt)
            delivery = rng.choice(deliveries)
            async with anyio.create_task_group() as tasks:
                for _ in range(rng.randint(2, 4)):
                    tasks.start_soon(lago.send, delivery, rng.randrange(workers), rng)
        elif step == "mix":  # several deliveries at once, in any order, forgeries among them
            chosen = rng.sample(deliveries, min(len(deliveries), rng.randint(2, 4)))
            async with anyio.create_task_group() as tasks:
                for delivery in chosen:
                    request = "valid" if rng.random() < 0.75 else rng.choice(bad)
                    tasks.start_soon(lago.send, delivery, rng.randrange(workers), rng, request)
        elif step == "plans":  # a script editing plans: plan.updated webhooks at once, sharing fleet-wide runs
            plans = [lago.emit(rng, "plan.updated") for _ in range(rng.randint(2, 4))]
            if w.relay is not None:
                for delivery in plans:
                    plan_drops(w.relay, delivery, rng)
            async with anyio.create_task_group() as tasks:
                for delivery in plans:
                    tasks.start_soon(lago.send, delivery, rng.randrange(workers), rng)
        elif step == "late":
            # (not a delivery whose dedupe calls drop: its retries, processed without dedupe, would run beside the
            # blocked attempt, and a plan.updated one would wait on the fleet-wide run it holds)
            dropping = {key for _, key, _ in w.relay.drops} if w.relay is not None else set()
            candidates = [d for d in deliveries if d.sent.webhook_type != "customer.updated" and d.key not in dropping]
            if candidates:
                await lago.late(rng.choice(candidates), rng)
        else:
            await lago.send(rng.choice(deliveries), rng.randrange(workers), rng, request=rng.choice(bad))
    await heal(w)


def plan_drops(relay: DroppingRelay, delivery: Delivery, rng: random.Random) -> None:
    if rng.random() < 0.35:
        call = rng.choice(("claim", "claim", "get", "complete", "release"))
        relay.drops[call, delivery.key, rng.randint(1, 2)] = rng.choice(("before", "after"))


async def heal(w: World) -> None:
    """Callbacks healthy and Redis reliable again: Lago retries each delivery it has no 2xx for. A claim left behind
    by a dropped Redis call expires (``processing_ttl``): done here at once, as the time it stands for."""
    model, lago = w.model, w.lago
    model.healing = True
    if w.relay is not None:
        w.relay.active = False
    await lago.dispatcher.deliver_pending()
    for delivery in model.deliveries:
        for _ in range(3):
            if model.acked_by_lago(delivery):
                break
            attempt = await lago.send(delivery, model.rng.randrange(len(lago.lanes)), model.rng)
            if attempt.status == 409 and delivery.key in model.disturbed and w.store is not None:
                if (w.store.get(w.prefix + delivery.key) or b"").startswith(b"processing"):
                    w.store.delete(w.prefix + delivery.key)


def _report(model: Model, found: list[str]) -> str:
    lines = [f"seed {model.seed} ({model.mode}): {len(found)} violation(s)", *found[:20], "attempts:"]
    lines += [f"  {attempt}" for attempt in model.attempts]
    if model.disturbed:
        lines.append(f"dedupe Redis calls dropped for (key: tick): {model.disturbed}")
    return "\n".join(lines)


def _check(model: Model) -> None:
    found = violations(model)
    assert not found, _report(model, found)
    assert len(model.attempts) > 20 and model.deliveries  # (the sequence did something)


@pytest.mark.parametrize("mode", ["hmac", "jwt", "both"])
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
async def test_random_sequences_keep_the_receivers_promises(seed: int, mode: str, other_rsa_key: bytes) -> None:
    """Seeded sequences of deliveries to one worker (memory dedupe), in each signature mode: duplicates, Lago's
    retries after 5xx and timeouts, concurrent attempts of one delivery, deliveries out of order, forgeries, bodies
    over the cap, unknown types, callbacks that fail, hang or succeed: every answer is the documented one, no effect
    repeats once a delivery was answered 2xx, and every delivery's effects are done in the end."""
    async with world(seed, mode, other_rsa_key) as w:
        with anyio.fail_after(60):  # (a bound: a hang of the receiver is a failure, not a stuck suite)
            await run_sequence(w)
        _check(w.model)


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)")
@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15, 16])
async def test_random_sequences_on_two_workers_sharing_redis_that_drops_connections(
    seed: int, other_rsa_key: bytes, redis_url: str
) -> None:
    """The same sequences on two workers sharing one Redis dedupe, whose connection drops (before a call reaches
    Redis, or after it ran and before its answer) at points the seed picks: the promises hold, a delivery whose
    dedupe call failed being processed without dedupe (the documented degradation: it may run again)."""
    mode = ("hmac", "jwt", "both")[seed % 3]
    async with world(seed, mode, other_rsa_key, redis_url) as w:
        with anyio.fail_after(60):
            await run_sequence(w)
        _check(w.model)


# ------------------------------------------------------------------------------------------------ named cases


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)")
@pytest.mark.parametrize("client", ["given", "from_url"])
async def test_a_claim_whose_answer_a_dropped_connection_lost_is_processed_not_answered_409(
    client: str, redis_url: str, other_rsa_key: bytes
) -> None:
    """A delivery whose claim (SET NX) Redis ran, its answer lost with the connection, is processed, not answered 409.

    Found by the Redis sequences (seed 11 above, and a dozen of seeds 11 to 60). The sequence: worker 1's
    ``RedisDedupe(client=redis.asyncio.Redis(...))`` claims a delivery, Redis runs the SET NX, the connection drops
    before its answer; redis-py retries a command whose connection dropped (3 times by default) and sent the SET again,
    which found the delivery's own claim: answered 409 "being processed" though nobody was, and so was every retry of
    Lago until the claim lapsed (``processing_ttl``, 15 s), so that a delivery meeting this on Lago's last attempt was
    lost. The claim is the call's own now, and a SET sent again that finds it takes it. (A client made from
    ``LAGO_REDIS_URL`` does not retry: the claim fails, and the delivery is processed without dedupe, as documented.)"""
    async with world(11, "hmac", other_rsa_key, redis_url) as w:
        assert w.relay is not None
        worker = 1 if client == "given" else 0  # (worker 1's client is redis-py's own, which retries)
        w.model.healing = True  # (callbacks that succeed: only the connection drops)
        delivery = w.lago.emit(random.Random(0), "subscription.started")
        w.relay.drops["claim", delivery.key, 1] = "after"
        first = await w.lago.send(delivery, worker, w.model.rng)
        assert (first.status, first.code) == (200, "processed")
        assert [(e.kind, e.arg) for e in first.effects] == [("invalidate", delivery.org), ("handler", delivery.org)]
        again = await w.lago.send(delivery, worker, w.model.rng)
        expected = "duplicate" if client == "given" else "in_progress"  # (without dedupe: its claim lapses later)
        assert (again.code, again.effects) == (expected, [])
        assert not violations(w.model)
