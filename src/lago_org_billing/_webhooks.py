"""Receive Lago's webhooks: verify the signature, drop replays, invalidate quota state, run your handlers.

::

    from lago_org_billing import LagoWebhooks

    webhooks = LagoWebhooks()  # settings from the environment, read on the first webhook

    @webhooks.on("invoice.created")
    async def invoice_created(event: WebhookEvent) -> None:
        await notify_finance(event.org_id, event.object["lago_id"])

    app = Starlette(routes=[Route("/webhooks/lago", webhooks, methods=["POST"])])

**Signatures.** Lago signs each webhook one of two ways, chosen per webhook endpoint in Lago
(``signature_algo``):

* ``jwt`` (Lago's default): the ``X-Lago-Signature`` header is an RS256 JWT ``{"data": <body>, "iss": <Lago URL>}``.
  The receiver fetches Lago's public key once (``GET /api/v1/webhooks/json_public_key``, so it needs
  ``LAGO_API_KEY``), caches it, and fetches it again at most once per ``key_refetch_interval`` when a signature
  does not verify (key rotation). ``iss`` must equal ``issuer`` (default: ``LAGO_API_URL``) and ``data`` the raw body.
* ``hmac``: set ``LAGO_WEBHOOK_HMAC_KEY`` (Lago: Developers > Webhooks > HMAC Signature Token). The header is
  base64(HMAC-SHA256(key, raw body)), compared in constant time.

The mode follows the configuration: with an HMAC key the receiver takes HMAC signatures, without one JWT signatures
only. With an HMAC key it takes JWT signatures too once it knows its organization (``LAGO_ORGANIZATION_ID``: Lago's JWT
key is shared by every organization of an instance) and can verify them (``LAGO_API_KEY`` or ``public_key=``): to
switch a Lago endpoint from JWT to HMAC without losing webhooks, deploy the key first, then switch the endpoint. A
missing or wrong signature is answered 401 and nothing runs. What can be refused without the
body is refused before reading it (no signature, the other algorithm, a token that is no RS256 JWT), and in JWT mode
a body is read no further than its token could carry (the token holds the body it signs): an unsigned body costs at
most ``max_body_size`` (HMAC mode, which needs the whole body to verify) or the length of the header sent with it.

**Large payloads: prefer HMAC.** A JWT webhook carries the whole payload *inside a header*. ASGI servers cap header
sizes (uvicorn with h11: about 16 KiB by default, ``--h11-max-incomplete-event-size``; proxies often 8 KiB), so a
big ``invoice.created`` (many fees) can be refused before this code runs, and Lago will keep failing it. An HMAC
signature is a 44-character header whatever the body size: Lago's own docs recommend it when payloads are large.

**Replays.** ``X-Lago-Unique-Key`` is stable across Lago's retries of one delivery; each key is processed once
(memory by default, Redis when ``LAGO_REDIS_URL`` or ``redis_url`` is set, shared by every worker). A key whose
handlers failed is forgotten, so Lago's retry runs them again: handlers must be idempotent (at-least-once). Lago
signs the body only (no timestamp, not the key), and a body can legitimately come again under a new key (a
subscription changed back): a signed delivery captured (logs of headers, a proxy) and re-sent under a new key runs
again. Handlers that keep state should not apply an old payload over newer state: key on the object's ``lago_id``
and its timestamps, or read the current state from Lago.

**Answers.** 200 once processed, for a duplicate, and for a webhook type nobody handles; 401 bad signature; 400
not a Lago webhook; 409 the same key is being processed right now (Lago retries later); 413 a body over
``max_body_size`` (logged, naming it); 500 a handler raised, or the
quota state could not be dropped (logged once a minute, not per webhook); 503 Lago's public key could not be fetched.
A type nothing handles is logged once (INFO), as is a quota-changing one reaching a receiver with no quota gate.
Anything but 200/201/202/204 makes Lago retry. Lago waits 30 s for an
answer: handlers slower than that fail the attempt (its retries are answered 409 while they run, then 200), so hand
long work to a queue. A dedupe Redis that does not answer within 2 s is skipped (the webhook processed without it).

**Quota.** ``subscription.*``, ``alert.triggered`` (usage alerts), ``subscription.usage_threshold_reached`` and
feature/entitlement changes invalidate the org's cached quota state at once, so a plan upgrade unblocks an org
without waiting for ``LAGO_USAGE_CACHE_TTL``. Lago gives up after 3 attempts (about 25 s) and delivery order is not
guaranteed, so a webhook can be lost: the gate's refreshes stay the safety net that bounds how stale quota state gets
(usage within ``LAGO_USAGE_CACHE_TTL``, the plan and its limits within ``LAGO_QUOTA_PLAN_TTL``, 5 min). Without Redis
each worker caches its own quota state and a webhook reaches one of them: the others only catch up that way, so set
``LAGO_REDIS_URL`` when serving with several workers. Plan and feature webhooks drop every org's state (with Redis, a
scan of the fleet's snapshots): a burst of them (a script editing plans) shares runs, one at a time, each webhook
answered after a run that began after it arrived.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import inspect
import json
import logging
import string
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, Literal, Protocol, TypeVar, overload, runtime_checkable
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
from cachetools import TTLCache
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from . import _checks as checks, _forks
from ._client import LagoClient, _Throttled
from ._errors import ConfigurationError, LagoIntegrationError, _bare, _without_tracebacks, traceback_text
from ._identity import SCOPE_KEY, pyjwt_depth_errors
from ._ids import ascii_digits, printable
from ._quota import QuotaGate
from ._quota_redis import (
    LoopConnections,
    RedisProblems,
    RedisUse,
    reconnecting_pool_options,
    renew_pool_after_fork,
    unreadable_redis_url,
)
from ._settings import BillingSettings, _check_unquoted

__all__ = [
    "INVALIDATING_TYPES",
    "ORG_WIDE_TYPES",
    "DedupeState",
    "LagoWebhooks",
    "MemoryDedupe",
    "RedisDedupe",
    "WebhookDedupe",
    "WebhookEvent",
    "org_from_subscription_id",
    "sign_hmac",
]

logger = logging.getLogger("lago_org_billing.webhooks")

#: Webhook types after which the org's cached quota state is dropped at once (so is it after any other
#: ``subscription.*`` type: see ``_invalidates``).
INVALIDATING_TYPES = frozenset(
    {
        "subscription.started",
        "subscription.updated",
        "subscription.terminated",
        "subscription.canceled",
        "subscription.incomplete",
        "subscription.trial_ended",
        "subscription.usage_threshold_reached",
        "alert.triggered",
    }
)


def _invalidates(webhook_type: str) -> bool:
    """Whether a webhook type drops its org's cached quota state: :data:`INVALIDATING_TYPES`, and every other
    ``subscription.*`` type (newer Lago adds some, e.g. ``subscription.activating``/``activation_failed``, whose
    subscription changed: one re-read of it costs less than a stale plan)."""
    return webhook_type in INVALIDATING_TYPES or webhook_type.startswith("subscription.")


#: Webhook types about the whole Lago organization (features, plans and their entitlements): every org's cached
#: quota state is dropped, when the quota gate offers ``invalidate_all``.
ORG_WIDE_TYPES = frozenset(
    {
        "feature.created",
        "feature.updated",
        "feature.deleted",
        "plan.updated",
        "plan.deleted",
    }
)

# Deliberately without quota effect (handlers still get them), as nothing the gate reads changes, or it catches up:
# * customer.*: the gate reads the org's subscription, not its customer. Lago refuses to change the external_id of a
#   customer that has subscriptions (Customers::UpdateService, "not editable if customer is attached to
#   subscriptions"), and a new time zone moves the billing period, which the next usage read brings (current_usage's
#   from/to, every LAGO_USAGE_CACHE_TTL);
# * wallet.*, wallet_transaction.*, invoice.*, credit_note.*, payment*, fee.*, dunning_campaign.*: the gate checks
#   usage against the plan's limits, not balances nor payments (a subscription Lago ends or holds for want of payment
#   comes as subscription.terminated/canceled/incomplete);
# * billable_metric.*, charge.*, event.error, events.errors: what Lago counts, read again at each usage refresh;
# * plan.created (no subscription on it yet), plan.updated_details (sent with each plan.updated).

DedupeState = Literal["new", "processing", "done"]
#: ``invalidate=``: ``async (org_id) -> None``, or a plain function (called as it is, in the event loop: keep it quick)
Invalidate = Callable[[str], Awaitable[None] | None]
HandlerResult = Awaitable[Any] | Any
Handler = Callable[["WebhookEvent"], HandlerResult]
_H = TypeVar("_H", bound=Handler)

_SUCCESS = 200
DEFAULT_MAX_BODY = 10 * 1024 * 1024
DEFAULT_DEDUPE_TTL = 7 * 24 * 3600.0
#: Seconds a delivery being processed stays claimed without renewal (renewed every third of it while its handlers
#: run): a worker that dies mid-handler frees it well within Lago's retries (about 3 s and 20 s later).
DEFAULT_PROCESSING_TTL = 15.0
#: Seconds without a public key fetch after one failed (webhooks meanwhile get 503, and Lago retries them).
_KEY_RETRY_AFTER = 2.0
#: Seconds a call to the dedupe's Redis may take (to connect, or to answer) before the webhook goes on without it:
#: redis-py before 8 waits for ever by default, and a Redis that stops answering without closing (paused, failing
#: over, a partition) then held every webhook past Lago's 30 s timeout, on each of its 3 attempts.
_REDIS_TIMEOUT = 2.0


@dataclasses.dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One verified Lago webhook, as handlers receive it.

    * **webhook_type** - ``"subscription.started"``, ``"invoice.created"``...
    * **object_type** - the key of the object in the payload (``"subscription"``, ``"invoice"``...).
    * **object** - that object (``{}`` when absent).
    * **org_id** - the org it concerns (the Lago customer ``external_id``), or ``None`` for org-less webhooks.
    * **unique_key** - ``X-Lago-Unique-Key`` (the same on Lago's retries of one delivery).
    * **payload** - the whole envelope.
    """

    webhook_type: str
    object_type: str | None
    object: Mapping[str, Any]
    org_id: str | None
    unique_key: str | None
    payload: Mapping[str, Any]


@runtime_checkable
class SupportsInvalidate(Protocol):
    """A quota gate (or anything) that can drop an org's cached quota state: ``async`` (the gate's), or a plain
    method, called as it is."""

    def invalidate(self, org_id: str) -> Awaitable[None] | None: ...


# --------------------------------------------------------------------------------------------- dedupe


class WebhookDedupe(Protocol):
    """Remembers which ``X-Lago-Unique-Key`` were processed.

    ``claim`` answers ``"new"`` (and marks the key as being processed), ``"processing"`` or ``"done"``;
    ``complete`` records success; ``release`` forgets a key whose processing failed, so a retry runs again. Each may
    be a plain method too (a store over a sync client), called as it is, in the event loop: keep it quick.
    """

    async def claim(self, key: str) -> DedupeState: ...

    async def complete(self, key: str) -> None: ...

    async def release(self, key: str) -> None: ...


class MemoryDedupe:
    """Per-process dedupe: keys kept ``ttl`` seconds (at most ``maxsize``, oldest dropped first).

    A key stays "processing" ``processing_ttl`` seconds after its last renewal (renewed while its handlers run), in
    case its processing was lost.
    """

    def __init__(
        self,
        *,
        ttl: float = DEFAULT_DEDUPE_TTL,
        maxsize: int = 100_000,
        processing_ttl: float = DEFAULT_PROCESSING_TTL,
    ) -> None:
        self._done: TTLCache[str, bool] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._processing: dict[str, float] = {}
        self.processing_ttl = processing_ttl

    async def claim(self, key: str) -> DedupeState:
        if key in self._done:
            return "done"
        now = time.monotonic()
        started = self._processing.get(key)
        if started is not None and now - started < self.processing_ttl:
            return "processing"
        self._processing[key] = now
        return "new"

    async def extend(self, key: str) -> None:
        """Renew the claim of a delivery still being processed."""
        if key in self._processing:
            self._processing[key] = time.monotonic()

    async def complete(self, key: str) -> None:
        self._processing.pop(key, None)
        self._done[key] = True

    async def release(self, key: str) -> None:
        self._processing.pop(key, None)

    def __len__(self) -> int:
        return len(self._done)


#: The webhook dedupe as :func:`redis_problem` names it.
_DEDUPE_USE = RedisUse(
    who="the webhooks' dedupe (RedisDedupe)",
    writes="a claim for each delivery",
    refused="the dedupe's",
    keys="dedupe key",
    prefix="lago_org_billing:webhook:",
    meanwhile="Meanwhile each webhook is processed without dedupe (a delivery Lago sends again runs its handlers "
    "again); Redis is asked again at each webhook.",
)


class RedisDedupe:
    """Dedupe shared by every worker through Redis (extra ``redis``): one key per webhook,
    ``<prefix><unique key>`` = ``processing:<the claim's own id>`` (expires after ``processing_ttl``) then ``done``
    (after ``ttl``).

    A client made from ``url`` gives up on a Redis call after ``timeout`` seconds (default 2; a ``socket_timeout``
    in the URL wins): the webhook is then processed without dedupe rather than held until Lago times out."""

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        prefix: str = "lago_org_billing:webhook:",
        ttl: float = DEFAULT_DEDUPE_TTL,
        processing_ttl: float = DEFAULT_PROCESSING_TTL,
        timeout: float | None = None,
    ) -> None:
        # for what it says of Redis (failovers, misconfigurations: :func:`redis_problem`), never the password
        self._problems = RedisProblems(_DEDUPE_USE, url, logger)
        if client is None:
            if not url:
                raise ConfigurationError("RedisDedupe needs a Redis URL (LAGO_REDIS_URL) or a client.")
            try:
                client = _redis_from_url(url, _REDIS_TIMEOUT if timeout is None else timeout)
            except ConfigurationError as exc:
                failure: ConfigurationError | None = exc
            else:
                failure = None
            if failure is not None:
                del url  # (a local a traceback would show: the URL with its password)
                raise _bare(failure)
            _forks.track(self)  # (its pool made here: a forked child makes its own, see _forked)
        self.redis = client
        self.prefix = prefix
        self.ttl = max(1, int(ttl))
        self.processing_ttl = max(1, int(processing_ttl))
        #: The claims this dedupe holds, by key (their values): ``release`` drops only its own. A claim that lapsed
        #: (its renewals lost longer than ``processing_ttl``) may have been taken by another worker since; dropping
        #: that one let Lago's next retry run the handlers beside the worker still running them.
        self._claims: dict[str, str] = {}
        #: The event loop the pool's connections were last used on (see ``_forget_other_loops``).
        self._loops = LoopConnections()

    def _forked(self) -> None:
        """In a forked child: a connection pool of its own (see ``renew_pool_after_fork``)."""
        renew_pool_after_fork(self.redis)

    async def claim(self, key: str) -> DedupeState:
        name = self.prefix + key
        redis = self.redis
        # The claim is this call's own (its value): a client that retries a command whose connection dropped
        # (redis-py's ``Redis(...)`` does, 3 times) sends the SET again after Redis ran it, which found the delivery
        # claimed: answered 409 "being processed" though nobody was, as were Lago's retries until the claim lapsed.
        mine = f"processing:{uuid.uuid4().hex}"
        for _ in range(2):  # the key may expire between SET NX and GET
            if await self._call(lambda: redis.set(name, mine, nx=True, ex=self.processing_ttl)):
                self._claims[key] = mine
                return "new"
            value = await self._call(lambda: redis.get(name), write=False)
            if value is not None:
                if value in (mine, mine.encode()):  # (the SET a retry sent again: Redis had run the first)
                    self._claims[key] = mine
                    return "new"
                return "done" if value in (b"done", "done") else "processing"
        return "processing"

    async def extend(self, key: str) -> None:
        """Renew the claim of a delivery still being processed."""
        await self._call(lambda: self.redis.eval(_EXTEND_CLAIM, 1, self.prefix + key, self.processing_ttl))

    async def complete(self, key: str) -> None:
        self._claims.pop(key, None)
        await self._call(lambda: self.redis.set(self.prefix + key, "done", ex=self.ttl))

    async def release(self, key: str) -> None:
        """Drop this dedupe's claim of ``key`` (not another worker's, nor a done mark); a key it holds no claim of
        is dropped whatever it holds (as before claims had their own values)."""
        mine = self._claims.pop(key, None)
        if mine is None:
            await self._call(lambda: self.redis.delete(self.prefix + key))
        else:
            await self._call(lambda: self.redis.eval(_RELEASE_CLAIM, 1, self.prefix + key, mine))

    async def _call(self, operation: Callable[[], Awaitable[Any]], write: bool = True) -> Any:
        """``operation()`` on Redis. A misconfiguration or a state only an operator ends (a replica's URL, a wrong
        password, an ACL, an OOM, TLS: :func:`redis_problem`) is said once, with what to change, until Redis answers
        again. After a failover (``READONLY`` from the old primary, once a write was taken) the pooled connections
        are dropped and the call made once more, on a new connection to the endpoint's new primary: without that,
        every webhook would run without dedupe for the life of the process."""
        await self._forget_other_loops()
        for attempt in range(2):
            try:
                result = await operation()
            except Exception as exc:
                _, again = await self._problems.failed(exc, self.redis)
                if attempt or not again:
                    raise
            else:
                self._problems.succeeded(write=write)
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def _forget_other_loops(self) -> None:
        """Drop the pool's idle connections when this call runs on another event loop than the last one: they belong
        to that loop. A receiver made once and served in a loop per request (Starlette's ``TestClient`` without
        ``with``) or per test (pytest's anyio or asyncio plugins, with a module's app) reused them on the next loop,
        where each failed ("attached to a different loop", "Event loop is closed"): that webhook went without
        dedupe (said as Redis being unavailable), and every delivery sent again ran its handlers again."""
        await self._loops.drop_others(self.redis, "the webhook dedupe", logger)

    async def aclose(self) -> None:
        await self._forget_other_loops()  # (closed from another loop than the last webhook's: "Event loop is closed")
        close = getattr(self.redis, "aclose", None)
        if close is not None:
            await close()


#: Renew a claim (not a done mark): KEYS[1] the delivery, ARGV[1] the lease in seconds. (``processing``: as workers
#: of versions before the claim's own id wrote it, during a rolling deploy.)
_EXTEND_CLAIM = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, 10) == 'processing' then
  return redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 0
"""


#: Drop a claim if it is still the caller's: KEYS[1] the delivery, ARGV[1] the claim's value.
_RELEASE_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _on_asyncio() -> bool:
    """Whether the running event loop is asyncio's (the redis client's only one)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _redis_from_url(url: str, timeout: float) -> Any:
    """A redis client of ``url``; a :class:`ConfigurationError` (its traceback and chain bare: their frames held the
    URL) when the redis extra is missing or redis-py cannot read the URL (``?socket_timeout=2s``: the settings do
    not read the options of its query, redis-py refused it with a bare ``ValueError`` at each webhook)."""
    try:
        import redis.asyncio as redis_asyncio
    except ImportError as exc:
        raise ConfigurationError(
            "Webhook dedupe in Redis (LAGO_REDIS_URL) needs redis: pip install 'lago-org-billing[redis]'.",
            variable="LAGO_REDIS_URL",
        ) from _without_tracebacks(exc)
    try:
        # (options in the URL's query win over these: redis-py applies them last)
        return redis_asyncio.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, **reconnecting_pool_options(redis_asyncio)
        )
    except (ValueError, TypeError) as exc:  # (TypeError: redis-py converting a query option)
        failure = unreadable_redis_url(url, exc, "the webhooks' dedupe")
    del url
    raise failure


# ------------------------------------------------------------------------------------------ signatures


def sign_hmac(body: bytes, key: str) -> str:
    """Lago's HMAC signature of a body: base64 (standard, padded) of HMAC-SHA256(key, body)."""
    return base64.b64encode(hmac.new(key.encode(), body, hashlib.sha256).digest()).decode()


def _jwt() -> Any:
    try:
        import jwt
    except ImportError as exc:
        raise ConfigurationError(
            "Verifying JWT-signed Lago webhooks needs PyJWT: pip install 'lago-org-billing[webhooks]' "
            "(or switch the Lago webhook endpoint to HMAC and set LAGO_WEBHOOK_HMAC_KEY).",
            variable="LAGO_WEBHOOK_HMAC_KEY",
        ) from exc
    if not jwt.algorithms.has_crypto:
        raise ConfigurationError(
            "Verifying JWT-signed Lago webhooks (RS256) needs cryptography: pip install 'lago-org-billing[webhooks]'."
        )
    return jwt


def _load_public_key(pem: bytes) -> Any:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem)
    except ValueError as exc:
        raise LagoIntegrationError(f"Lago's webhook public key is not a PEM public key ({exc}).") from None
    if not isinstance(key, RSAPublicKey):  # (PyJWT would raise a TypeError with every webhook)
        raise LagoIntegrationError(
            f"Lago's webhook public key is an {type(key).__name__}, not an RSA key: Lago signs its webhooks RS256."
        )
    return key


def _pem(key: object) -> bytes:
    """A kept public key as PEM: as given, or base64-decoded when kept as Lago serves it (``GET
    /webhooks/public_key`` and ``json_public_key`` answer the PEM in base64, a newline every 60 characters)."""
    if not isinstance(key, (str, bytes, bytearray, memoryview)):
        called = " (a method: call it, or use FakeLago.rsa_public_key_pem)" if callable(key) else ""
        raise ConfigurationError(
            f"LagoWebhooks(public_key=...) takes Lago's webhook public key as PEM text or bytes (or their base64, as "
            f"GET /webhooks/public_key answers it), got {type(key).__name__}{called}."
        )
    raw = (key.encode() if isinstance(key, str) else bytes(key)).strip()
    # as written in an environment variable: in quotes (a Docker --env-file keeps them), on one line with \n escapes
    if len(raw) >= 2 and raw[:1] == raw[-1:] and raw[:1] in (b'"', b"'"):
        raw = raw[1:-1].strip()
    raw = raw.replace(b"\\r", b"").replace(b"\\n", b"\n")  # (neither PEM nor base64 has a backslash)
    if b"-----BEGIN" in raw:
        return raw
    try:
        return base64.b64decode(b"".join(raw.split()), validate=True)
    except ValueError:
        return raw


def _static_key(pem: bytes) -> Any:
    """The key of ``LagoWebhooks(public_key=...)``, checked when the receiver is made (not with every webhook);
    ``None`` when ``cryptography`` is missing (JWT mode then says so)."""
    try:
        return _load_public_key(pem)
    except ImportError:
        return None
    except LagoIntegrationError as exc:
        raise ConfigurationError(
            f"LagoWebhooks(public_key=...) is not Lago's webhook public key: {exc} Pass the PEM, or the base64 "
            "Lago serves (GET /api/v1/webhooks/json_public_key), or leave it out to fetch it with LAGO_API_KEY."
        ) from None


def _jwt_shape(token: str) -> str | None:
    """Why ``token`` cannot be a JWT Lago signed (not a JWT, or not RS256), read without verifying it; ``None`` when
    it may be one."""
    jwt = _jwt()
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        return f"The signature is not a valid RS256 JWT ({type(exc).__name__}: {exc})."
    except RecursionError:  # (a header nested deeper than json goes: PyJWT < 2.14 lets the parser's error out)
        return "The signature is not a valid RS256 JWT (its header is JSON nested too deeply)."
    if header.get("alg") != "RS256":
        return f"The JWT is signed with {header.get('alg')!r}; Lago signs RS256."
    return None


class _KeyUnavailable(Exception):
    """Lago's public key could not be fetched: answer 503 so that Lago retries."""


class _InvalidationFailed(LagoIntegrationError):
    """Dropping cached quota state (the quota gate's ``invalidate``/``invalidate_all``) failed: the webhook is answered
    500, and Lago sends it again."""

    @classmethod
    def of(cls, what: str, exc: Exception) -> _InvalidationFailed:
        """The error of ``exc``, raised ``from _without_tracebacks(exc)``: the frames under it (the gate's Redis
        client, redis-py's ``auth_args`` among them) held the Redis password as a local, which error trackers ship
        with the webhook's failure (logged with its traceback)."""
        return cls(
            f"Dropping the cached quota state of {what} failed ({type(exc).__name__}: {exc}); Lago will send the "
            "webhook again. Check the quota gate's store (its Redis: LAGO_REDIS_URL)."
        )


# ------------------------------------------------------------------------------------------- org ids


def org_from_subscription_id(template: str, external_id: str) -> str | None:
    """The org id of a subscription ``external_id`` under ``LAGO_SUBSCRIPTION_ID_TEMPLATE``, or ``None``."""
    prefix, suffix, seen = "", "", False
    for literal, field, _, _ in string.Formatter().parse(template):
        if seen:
            suffix += literal
        else:
            prefix += literal
        seen = seen or field is not None
    if not external_id.startswith(prefix) or not external_id.endswith(suffix):
        return None
    org_id = external_id[len(prefix) : len(external_id) - len(suffix)]
    return org_id or None


def resolve_org(payload: Mapping[str, Any], subscription_id_template: str = "{org_id}") -> str | None:
    """The org a webhook concerns: ``external_customer_id``, the embedded ``customer.external_id``, a customer
    object's ``external_id``, else the org behind ``external_subscription_id`` (through the template); else the same
    read in the object's nested ``invoice``, ``subscription``, ``wallet``, ``payment`` or ``event`` (Lago names the
    org only there in ``invoice.payment_dispute_lost``, ``wallet_transaction.*``, ``payment_receipt.*`` and
    ``event.error``)."""
    object_type = payload.get("object_type")
    if not isinstance(object_type, str):
        return None
    obj = payload.get(object_type)
    if not isinstance(obj, Mapping):
        return None
    org_id = _org_of(object_type, obj, subscription_id_template)
    if org_id is not None:
        return org_id
    for key in _NESTED_OWNERS:
        nested = obj.get(key)
        if key != object_type and isinstance(nested, Mapping):
            org_id = _org_of(key, nested, subscription_id_template)
            if org_id is not None:
                return org_id
    return None


#: Objects Lago nests in a webhook's object that name its customer or subscription.
_NESTED_OWNERS = ("invoice", "subscription", "wallet", "payment", "event")


def _org_of(object_type: str, obj: Mapping[str, Any], subscription_id_template: str) -> str | None:
    """The org named directly by one object (of type ``object_type``), or ``None``."""
    for key in ("external_customer_id", "customer_external_id"):
        value = obj.get(key)
        if isinstance(value, str) and value:
            return value
    customer = obj.get("customer")
    if isinstance(customer, Mapping) and isinstance(customer.get("external_id"), str) and customer["external_id"]:
        return str(customer["external_id"])
    if object_type == "customer" and isinstance(obj.get("external_id"), str) and obj["external_id"]:
        return str(obj["external_id"])
    subscription_id = obj.get("external_subscription_id") or obj.get("subscription_external_id")
    if subscription_id is None and object_type == "subscription":
        subscription_id = obj.get("external_id")
    if isinstance(subscription_id, str) and subscription_id:
        return org_from_subscription_id(subscription_id_template, subscription_id)
    return None


# ---------------------------------------------------------------------------------------------- app


@dataclasses.dataclass
class _Config:
    settings: BillingSettings
    mode: Literal["jwt", "hmac"]
    hmac_key: bytes | None = dataclasses.field(repr=False)  # (error trackers record frames' locals by their repr)
    issuers: tuple[str, ...]
    organization_id: str | None
    #: HMAC mode that takes the JWT webhooks of its own organization too (see ``_takes_jwt_too``)
    jwt_too: bool = False


#: What a webhook handler is, for the messages refusing one.
_HANDLER = "a function (event: WebhookEvent), sync or async"


def check_invalidate(name: str, invalidate: object) -> None:
    """Refuse an ``invalidate=`` (of ``LagoWebhooks`` or ``billing_routes``) that cannot be called with an org id:
    a name (``"quota"``), a function of another shape (``lambda: None``), a gate class given for its instance. Each
    raised at every invalidation (a webhook answered 500 until Lago gave up, a plan change's quota state kept)."""
    what = "a function (org_id) or an object with invalidate(org_id), such as the quota gate"
    if checks.double(invalidate):
        return
    checks.built(name, invalidate, what=what)
    if isinstance(invalidate, SupportsInvalidate):  # (an object with ``invalidate``: what is called, as it is used)
        checks.function(f"{name}.invalidate", invalidate.invalidate, what=what, arguments=1)
        return
    checks.function(name, invalidate, what=what, arguments=1)


def _check_webhook_arguments(
    settings: object,
    client: object,
    invalidate: object,
    handlers: object,
    issuer: object,
    key_refetch_interval: object,
    max_body_size: object,
    organization_id: object,
    dedupe: object = None,
    redis_url: object = None,
) -> None:
    """Refuse an argument of ``LagoWebhooks(...)`` that cannot work, where it was written (each failed deep inside
    or later, at the first webhook: an answer Lago retries, then gives up on)."""
    name = "LagoWebhooks"
    if settings is not None:
        checks.instance(f"{name}(settings)", settings, BillingSettings, what="a BillingSettings")
    if client is not None:
        checks.instance(f"{name}(client=...)", client, LagoClient, what="a LagoClient")
    if invalidate is not None:
        check_invalidate(f"{name}(invalidate=...)", invalidate)
    if handlers is not None:
        ok = isinstance(handlers, Mapping) and all(
            isinstance(key, str)
            and (callable(value) or (isinstance(value, (list, tuple, set, frozenset)) and all(map(callable, value))))
            for key, value in handlers.items()
        )
        if not ok:
            raise ConfigurationError(
                f"{name}(handlers=...) must map webhook types to handlers, such as {{'invoice.created': on_invoice}} "
                f"(a function, or a list of them), got {handlers!r}."
            )
        # each called with the event: a handler of another shape answered every webhook 500, until Lago gave up
        for key, value in handlers.items() if isinstance(handlers, Mapping) else ():
            for handler in [value] if callable(value) else value:
                checks.function(f"{name}(handlers=...)[{key!r}]", handler, what=_HANDLER, arguments=1)
    issuers = [issuer] if isinstance(issuer, str) else issuer if isinstance(issuer, (list, tuple)) else None
    if issuer is not None and (  # (a blank one matches no token's iss: every JWT webhook refused, 401)
        issuers is None or not all(isinstance(one, str) and one.strip("/ ") for one in issuers)
    ):
        raise ConfigurationError(
            f"{name}(issuer=...) must be a non-blank string such as 'https://api.getlago.com' (Lago's API URL) or a "
            f"list of them, got {issuer!r}."
        )
    if dedupe is not None and not checks.double(dedupe):
        checks.built(f"{name}(dedupe=...)", dedupe, what="a WebhookDedupe (MemoryDedupe(), RedisDedupe(url))")
        missing = [method for method in ("claim", "complete", "release") if not callable(getattr(dedupe, method, None))]
        if missing:  # (each webhook's claim failed, logged as Redis unavailable, and ran without dedupe)
            raise ConfigurationError(
                f"{name}(dedupe=...) must be a WebhookDedupe (MemoryDedupe(), RedisDedupe(url)) with claim(key), "
                f"complete(key) and release(key), got {type(dedupe).__name__}, which lacks {', '.join(missing)}."
            )
    if redis_url is not None:  # (not shown: it may hold a password; "" is LAGO_REDIS_URL's, as before)
        checks.text(f"{name}(redis_url=...)", redis_url, example="redis://localhost:6379/0", empty=True)
    checks.number(f"{name}(key_refetch_interval=...)", key_refetch_interval, inclusive=True)
    checks.whole(f"{name}(max_body_size=...)", max_body_size)
    if organization_id is not None:
        checks.text(f"{name}(organization_id=...)", organization_id, example="1a901a90-1a90-1a90-1a90-1a901a901a90")


class LagoWebhooks:
    """An ASGI endpoint receiving Lago's webhooks. See the module docstring for the behaviour.

    ::

        Route("/webhooks/lago", LagoWebhooks(), methods=["POST"])          # Starlette
        app.add_route("/webhooks/lago", LagoWebhooks(), methods=["POST"])   # FastAPI too

    **Parameters:**

    * **settings** - *(optional)* :class:`BillingSettings`; read from the environment on the first webhook when
      omitted (``LAGO_WEBHOOK_HMAC_KEY``, ``LAGO_API_URL``, ``LAGO_API_KEY`` for JWT, ``LAGO_REDIS_URL``).
    * **client** - *(optional)* the :class:`LagoClient` that fetches the JWT public key (one is created otherwise).
    * **invalidate** - *(optional)* ``async (org_id) -> None``, or an object with ``async invalidate(org_id)``
      (and optionally ``async invalidate_all()``), e.g. the quota gate (``gate.invalidate`` stands for the gate); a
      plain function (or method) is called as it is, in the event loop. Without it, the gate that
      ``OrgBillingMiddleware`` publishes in the request scope is used, when the route sits behind it.
    * **handlers** - *(optional)* ``{"invoice.created": handler or [handlers]}``; ``"*"`` gets every type.
      Handlers take a :class:`WebhookEvent` and may be sync (run in a thread) or async. More with :meth:`on`.
    * **dedupe** - *(optional)* a :class:`WebhookDedupe`; default :class:`RedisDedupe` when a Redis URL is
      configured, else :class:`MemoryDedupe`.
    * **issuer** - *(optional)* the expected JWT ``iss`` (or several); default ``settings.api_url``.
    * **redis_url** - *(optional)* overrides ``LAGO_REDIS_URL`` for the dedupe.
    * **hmac_key** - *(optional)* overrides ``LAGO_WEBHOOK_HMAC_KEY``.
    * **public_key** - *(optional)* Lago's public key, if you keep it (no fetch until a signature fails): PEM, or
      base64 as Lago serves it; one that is no public key is a :class:`ConfigurationError` here.
    * **organization_id** - *(optional)* your Lago organization's id (``LAGO_ORGANIZATION_ID``): webhooks whose
      envelope names another organization are refused (401). Set it in JWT mode: Lago signs JWT webhooks with its
      instance's key, the same for every organization on that instance (Lago Cloud), so anyone with an account
      there could send you signed webhooks. It is the ``organization_id`` of the webhooks Lago sends you, and the
      ``lago_organization_id`` of ``GET /api/v1/webhook_endpoints``. HMAC keys are per organization. With an HMAC
      key, it lets the receiver take this organization's JWT webhooks too (while an endpoint is switched to HMAC).
    * **key_refetch_interval** - minimum seconds between two fetches of the public key (default 10: a forged token
      just before Lago rotates its key delays the new key that long, within Lago's retries of about 3 and 20 s).
    * **max_body_size** - larger bodies are answered 413 (default 10 MiB). In JWT mode a body longer than its
      token is refused (401) once that many bytes are read.
    """

    def __init__(
        self,
        settings: BillingSettings | None = None,
        *,
        client: LagoClient | None = None,
        invalidate: Invalidate | SupportsInvalidate | None = None,
        handlers: Mapping[str, Handler | Sequence[Handler]] | None = None,
        dedupe: WebhookDedupe | None = None,
        issuer: str | Sequence[str] | None = None,
        redis_url: str | None = None,
        hmac_key: str | None = None,
        public_key: bytes | str | None = None,
        key_refetch_interval: float = 10.0,
        max_body_size: int = DEFAULT_MAX_BODY,
        organization_id: str | None = None,
    ) -> None:
        try:
            _check_webhook_arguments(
                settings, client, invalidate, handlers, issuer, key_refetch_interval, max_body_size, organization_id,
                dedupe, redis_url,
            )  # fmt: skip
            self._settings = settings
            self._organization_id = organization_id
            self._client = client
            self._invalidate = _gate_of(invalidate)
            self._handlers: dict[str, list[Handler]] = {}
            for webhook_type, value in (handlers or {}).items():
                for handler in [value] if callable(value) else list(value):
                    self.add_handler(webhook_type, handler)
            self._dedupe = dedupe
            self._owns_dedupe = False  # made here (from redis_url= or LAGO_REDIS_URL): closed by aclose()
            self._issuer = (issuer,) if isinstance(issuer, str) else tuple(issuer) if issuer is not None else None
            self._redis_url = redis_url
            self._hmac_key = _given_hmac_key(hmac_key)
            self._public_pem = _pem(public_key) if public_key is not None else None
            self._public_key: Any = _static_key(self._public_pem) if self._public_pem is not None else None
            self._key_fetched_at: float | None = None
            self._refetch_failed = False  # the last re-fetch of a rotated key failed (Lago did not answer)
            self._key_lock: anyio.Lock | None = None
            self.key_refetch_interval = key_refetch_interval
            self.max_body_size = max_body_size
            self._config: _Config | None = None
            self._org_wide: dict[int, _Coalesced] = {}  # by quota gate: its invalidate_all's runs, shared
            # problems that repeat with every webhook: said once a minute, not per request
            self._say = _Throttled(logger)
            # the quota gate's store failing (Redis down): each webhook fails the same way, Lago retries each 3 times
            self._alarm = _Throttled(logger, level=logging.ERROR)
            # what is no problem of this side's, and can come with every request (anyone can open a delivery and
            # leave before its body): at INFO, once a minute
            self._note = _Throttled(logger, level=logging.INFO)
            self._said_once: set[str] = set()  # what is said once per webhook type (see _once)
            #: Counters: ``received``, ``processed``, ``duplicates``, ``rejected`` (bad signature), ``incomplete``
            #: (the sender gone before its body came), ``failed``, ``ignored`` (no handler), ``invalidations``,
            #: ``key_fetches``.
            self.stats: dict[str, int] = dict.fromkeys(
                (
                    "received",
                    "processed",
                    "duplicates",
                    "rejected",
                    "incomplete",
                    "failed",
                    "ignored",
                    "invalidations",
                    "key_fetches",
                ),
                0,
            )
            if settings is not None:
                self._configure()
            return
        except ConfigurationError as exc:
            failure = exc
        # (raised bare, these locals gone: its frames held the HMAC key and the Redis URL with its password)
        del hmac_key, redis_url, public_key, settings
        raise _bare(failure)

    # ----------------------------------------------------------------------------------- registration

    def on(self, *webhook_types: str) -> Callable[[_H], _H]:
        """Decorator registering a handler for one or more webhook types (``"*"``: every type)::

        @webhooks.on("invoice.created", "invoice.voided")
        async def on_invoice(event: WebhookEvent) -> None: ...
        """
        if not webhook_types:
            raise ConfigurationError('webhooks.on() needs at least one webhook type, e.g. on("invoice.created").')

        def register(handler: _H) -> _H:
            for webhook_type in webhook_types:
                self.add_handler(webhook_type, handler)
            return handler

        return register

    def add_handler(self, webhook_type: str, handler: Handler) -> None:
        """Register ``handler`` for ``webhook_type`` (after those already registered)."""
        if not isinstance(webhook_type, str) or not webhook_type:
            raise ConfigurationError(f"A webhook type must be a non-empty string, got {webhook_type!r}.")
        checks.function(f"The handler of {webhook_type!r}", handler, what=_HANDLER, arguments=1)
        self._handlers.setdefault(webhook_type, []).append(handler)

    # --------------------------------------------------------------------------------- configuration

    @property
    def settings(self) -> BillingSettings:
        """The settings in use (read from the environment now if they were not given)."""
        return self._configure().settings

    @property
    def mode(self) -> Literal["jwt", "hmac"]:
        """``"hmac"`` when an HMAC key is configured, else ``"jwt"``."""
        return self._configure().mode

    def _configure(self) -> _Config:
        if self._config is not None:
            return self._config
        try:
            self._config = self._configured()
            return self._config
        except ConfigurationError as exc:
            failure = exc
        # (raised bare: the frames it went through held the HMAC key and the Redis URL with its password)
        raise _bare(failure)

    def _configured(self) -> _Config:
        settings = self._settings
        if settings is None:
            settings = self._client.settings if self._client is not None else None
        if settings is None:
            settings = BillingSettings.from_env(require_api_key=False)
        hmac_key = self._hmac_key if self._hmac_key is not None else settings.webhook_hmac_key
        mode: Literal["jwt", "hmac"] = "hmac" if hmac_key else "jwt"
        if mode == "jwt":
            _jwt()
            if self._client is None and self._public_pem is None and not settings.api_key:
                raise ConfigurationError(
                    "LagoWebhooks verifies JWT signatures with Lago's public key, fetched with LAGO_API_KEY, which "
                    "is not set. Set LAGO_API_KEY, or pass LagoWebhooks(public_key=...), or switch the Lago webhook "
                    "endpoint to HMAC and set LAGO_WEBHOOK_HMAC_KEY.",
                    variable="LAGO_API_KEY",
                )
        if self._dedupe is None:
            redis_url = self._redis_url or settings.redis_url
            self._dedupe = RedisDedupe(redis_url) if redis_url else MemoryDedupe()
            self._owns_dedupe = True
        issuers = self._issuer or (settings.api_url,)
        organization_id = self._organization_id or settings.organization_id
        if mode == "jwt" and organization_id is None:
            logger.warning(
                "LagoWebhooks verifies JWT signatures, made with the Lago instance's key, which every organization on "
                "that instance shares (Lago Cloud): set LAGO_ORGANIZATION_ID (the organization_id of your Lago "
                "webhooks) so that webhooks other organizations send here are refused, or use HMAC signatures."
            )
        return _Config(
            settings=settings,
            mode=mode,
            hmac_key=hmac_key.encode() if hmac_key else None,
            issuers=tuple(_issuer_key(issuer) for issuer in issuers),
            organization_id=organization_id,
            jwt_too=mode == "hmac" and self._takes_jwt_too(settings, organization_id),
        )

    def _takes_jwt_too(self, settings: BillingSettings, organization_id: str | None) -> bool:
        """Whether a receiver with an HMAC key takes JWT webhooks as well: when it knows its Lago organization (the
        instance's JWT key is shared by every organization on it, the HMAC key is not) and can verify them (Lago's
        public key given, or fetched with LAGO_API_KEY; PyJWT installed). Switching a Lago endpoint from JWT to HMAC
        then loses no webhook: the key deployed first, Lago's JWT webhooks until the switch are taken too."""
        if organization_id is None:
            return False
        if self._client is None and self._public_pem is None and not settings.api_key:
            return False
        try:
            _jwt()
        except ConfigurationError:
            return False
        return True

    def _memory_dedupe_instead(self) -> MemoryDedupe:
        """The dedupe made from ``LAGO_REDIS_URL`` served under trio (``hypercorn -k trio``), where the redis client
        cannot run (it runs only under asyncio): every claim would fail and each delivery run without dedupe. It is
        kept in the process instead (never connected: nothing to close), said once."""
        library = "trio" if "trio" in sys.modules else "this event loop"
        logger.error(
            "LAGO_REDIS_URL is set but the redis client (redis.asyncio) runs only under asyncio, not %s: webhook "
            "deliveries are deduplicated in each process (a delivery Lago sends again to another worker runs its "
            "handlers again). Run the server on asyncio (uvicorn, hypercorn -k asyncio), or unset LAGO_REDIS_URL.",
            library,
        )
        return MemoryDedupe()

    async def aclose(self) -> None:
        """Close the Redis connection this receiver created (from ``redis_url=`` or ``LAGO_REDIS_URL``)."""
        if self._owns_dedupe and isinstance(self._dedupe, RedisDedupe):
            await self._dedupe.aclose()

    # ------------------------------------------------------------------------------------------- ASGI

    @overload
    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]: ...
    @overload
    def __call__(self, request: Request) -> Coroutine[Any, Any, Response]: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        """An ASGI app (what ``Route``/``add_route`` and ``Mount`` run it as), or an endpoint ``request ->
        response`` (so that it type-checks where Starlette's ``add_route`` expects one)."""
        if len(args) + len(kwargs) == 1:
            return self.handle(*args, **kwargs)
        return self._asgi(*args, **kwargs)

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # served on its own: nothing to start
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":  # pragma: no cover - websockets are not routed here
            return
        request = Request(scope, receive)
        if request.method != "POST":
            response: Response = _answer(405, "method_not_allowed", "Lago webhooks are POSTed.")
            response.headers["Allow"] = "POST"
        else:
            response = await self.handle(request)
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        """Process one webhook request and return the answer (for frameworks that want an endpoint function)."""
        config = self._configure()
        self.stats["received"] += 1
        signature = request.headers.get("x-lago-signature", "").strip()
        algorithm = request.headers.get("x-lago-signature-algorithm", "").strip().lower()
        # Everything that refuses a request without its body, before reading it (an unsigned body costs nothing)
        if not signature:
            return self._reject("missing_signature", "X-Lago-Signature is missing.")
        scheme = config.mode
        if config.jwt_too and (algorithm == "jwt" or (not algorithm and signature.count(".") == 2)):
            scheme = "jwt"  # (an HMAC signature is base64: no dot)
        if algorithm and algorithm != scheme:
            hint = (
                "set LAGO_WEBHOOK_HMAC_KEY or switch the endpoint to JWT"
                if algorithm == "hmac"
                else "unset LAGO_WEBHOOK_HMAC_KEY or switch the endpoint to HMAC (or set LAGO_ORGANIZATION_ID, with "
                "LAGO_API_KEY, to take both while switching)"
            )
            return self._reject(
                "wrong_algorithm", f"Signed with {algorithm!r}, but this receiver verifies {config.mode}: {hint}."
            )
        limit = self.max_body_size
        if scheme == "jwt":
            problem = _jwt_shape(signature)
            if problem is not None:
                return self._reject("invalid_signature", problem)
            # The token carries the body it signs (its ``data`` claim, base64url inside the token): a body longer
            # than the token is not that one, and is read no further than that (16 KiB or so, not max_body_size).
            limit = min(limit, len(signature))
        try:
            body = await self._read_body(request, limit)
        except _BodyCut:
            # (no signature to blame: the body never came whole; Lago sends the webhook again)
            self.stats["incomplete"] += 1
            self._note(
                "incomplete",
                "Lago webhook not read: its sender disconnected before its body came (Lago sends it again; counted "
                "in stats['incomplete'])",
            )
            return _answer(400, "incomplete_body", "The connection closed before the body was received.")
        if body is None:
            if limit < self.max_body_size:
                return self._reject(
                    "invalid_signature",
                    "The body is longer than its JWT signature could carry: it is not the body signed.",
                )
            # (said: Lago retries, then marks the webhook failed, and nothing on this side told why)
            self._say(
                "too_large",
                "Lago webhook refused (answered 413): its body is larger than max_body_size (%d bytes). A large "
                "invoice.created can be: raise LagoWebhooks(max_body_size=...)",
                self.max_body_size,
            )
            return _answer(413, "too_large", f"The body is larger than {self.max_body_size} bytes.")
        try:
            problem = await self._verify(config, scheme, signature, body)
        except _KeyUnavailable as exc:
            self._say(
                "key",
                "Webhook not verified (answered 503, Lago sends it again), Lago's public key is unavailable: %s. Check "
                "that Lago answers at LAGO_API_URL with LAGO_API_KEY, or pass LagoWebhooks(public_key=...)",
                exc,
            )
            return _answer(503, "public_key_unavailable", "Lago's public key could not be fetched; retry later.")
        if problem is not None:
            return self._reject("invalid_signature", problem)

        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):  # (RecursionError: nested deeper than the parser goes)
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("webhook_type"), str):
            return _answer(400, "not_a_webhook", "The body is not a Lago webhook envelope (no webhook_type).")
        if config.organization_id is not None and payload.get("organization_id") != config.organization_id:
            return self._reject(
                "wrong_organization",
                f"The webhook is from Lago organization {payload.get('organization_id')!r}, not "
                f"{config.organization_id!r} (LAGO_ORGANIZATION_ID).",
            )
        event = self._event(config, payload, request.headers.get("x-lago-unique-key"))
        return await self._process(event, request.scope, _dedupe_token(event.unique_key, body))

    async def _read_body(self, request: Request, limit: int) -> bytes | None:
        """The body, or ``None`` once it is over ``limit`` bytes (read no further)."""
        declared = request.headers.get("content-length")
        if declared is not None and ascii_digits(declared) and int(declared) > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
        except ClientDisconnect:  # (cut off: not the body signed, nor a bad signature)
            raise _BodyCut from None
        return b"".join(chunks)

    def _reject(self, code: str, detail: str) -> Response:
        self.stats["rejected"] += 1
        # (the detail may quote what the sender wrote, e.g. a token's "crit" header: no line of its choosing in the log)
        self._say(code, "Lago webhook rejected (%s, answered 401): %s", code, printable(detail))
        return _answer(401, code, detail)

    # ------------------------------------------------------------------------------------- verifying

    async def _verify(self, config: _Config, scheme: Literal["jwt", "hmac"], signature: str, body: bytes) -> str | None:
        """``None`` when the signature (of ``scheme``) is good, else why not."""
        if scheme == "hmac":
            assert config.hmac_key is not None
            expected = base64.b64encode(hmac.new(config.hmac_key, body, hashlib.sha256).digest())
            if hmac.compare_digest(expected, signature.encode("utf-8", "replace")):
                return None
            return "The HMAC signature does not match the body (check LAGO_WEBHOOK_HMAC_KEY)."
        return await self._verify_jwt(config, signature, body)

    async def _verify_jwt(self, config: _Config, token: str, body: bytes) -> str | None:
        jwt = _jwt()
        problem = _jwt_shape(token)  # before anything costs a call to Lago: a token that cannot be Lago's is refused
        if problem is not None:
            return problem
        key = await self._current_key()
        try:
            claims = self._decode(jwt, token, key)
        except jwt.InvalidSignatureError:
            fresh = await self._refetch_key(key)
            if fresh is None:
                return "The JWT signature does not verify with Lago's public key."
            try:
                claims = self._decode(jwt, token, fresh)
            except jwt.PyJWTError as exc:
                return f"The JWT does not verify with Lago's current public key ({type(exc).__name__})."
        except jwt.PyJWTError as exc:
            return f"The signature is not a valid RS256 JWT ({type(exc).__name__}: {exc})."
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or _issuer_key(issuer) not in config.issuers:
            return f"The JWT issuer {issuer!r} is not the expected {' or '.join(config.issuers)} (see issuer=)."
        data = claims.get("data")
        if not isinstance(data, str) or not hmac.compare_digest(data.encode(), body):
            return "The JWT data claim is not the request body."
        return None

    @staticmethod
    def _decode(jwt: Any, token: str, key: Any) -> dict[str, Any]:
        # (its header parsed in _jwt_shape, a few frames shallower: one nested to the limit gets through to here)
        with pyjwt_depth_errors(jwt):
            claims: dict[str, Any] = jwt.decode(token, key, algorithms=["RS256"], options={"require": ["iss", "data"]})
        return claims

    def _lock(self) -> anyio.Lock:
        if self._key_lock is None:
            self._key_lock = anyio.Lock()
        return self._key_lock

    async def _current_key(self) -> Any:
        if self._public_key is not None:
            return self._public_key
        async with self._lock():
            if self._public_key is None:
                if self._public_pem is not None:
                    self._public_key = _load_public_key(self._public_pem)
                else:
                    # No key yet after a fetch: that fetch failed. Not every request makes a call to Lago while it
                    # fails (Lago retries its webhooks).
                    fetched = self._key_fetched_at
                    if fetched is not None and time.monotonic() - fetched < _KEY_RETRY_AFTER:
                        raise _KeyUnavailable("the last fetch failed moments ago")
                    self._public_key = await self._fetch_key()
            return self._public_key

    async def _refetch_key(self, stale: Any) -> Any | None:
        """A new key after a signature failure, or ``None`` (same key, or fetched too recently). Raises
        :class:`_KeyUnavailable` when Lago could not be asked (a rotated key is then not known: 503, Lago sends the
        webhook again, rather than a 401 that blames the signature)."""
        async with self._lock():
            if self._public_key is not stale:  # another request refreshed it meanwhile
                return self._public_key
            fetched = self._key_fetched_at
            if fetched is not None and time.monotonic() - fetched < self.key_refetch_interval:
                if self._refetch_failed:
                    raise _KeyUnavailable("the last fetch failed moments ago")
                return None
            if self._client is None and not self._configure().settings.api_key:
                return None  # a static public_key and no way to fetch another one
            try:
                fresh = await self._fetch_key()
            except _KeyUnavailable as exc:
                logger.warning("Could not re-fetch Lago's webhook public key: %s", exc)
                self._refetch_failed = True
                raise
            self._refetch_failed = False
            if _same_key(fresh, stale):
                self._public_key = stale
                return None
            logger.info("Lago's webhook public key changed; using the new one")
            self._public_key = fresh
            return fresh

    async def _fetch_key(self) -> Any:
        self._key_fetched_at = time.monotonic()
        self.stats["key_fetches"] += 1
        try:
            if self._client is not None:
                pem = await self._client.get_webhook_public_key(retry=False)  # a webhook waits on it: Lago retries it
            else:  # a client of its own for this rare call, closed at once: a receiver has no shutdown to close it on
                async with LagoClient(self._configure().settings) as client:
                    pem = await client.get_webhook_public_key(retry=False)
        except LagoIntegrationError as exc:
            raise _KeyUnavailable(str(exc)) from exc
        except ValueError as exc:  # (its base64 does not decode: a proxy's answer, a truncated key)
            raise _KeyUnavailable(f"Lago's webhook public key is not base64 ({exc}).") from exc
        try:
            return _load_public_key(pem)
        except LagoIntegrationError as exc:
            raise _KeyUnavailable(str(exc)) from exc

    # ------------------------------------------------------------------------------------ dispatching

    def _event(self, config: _Config, payload: dict[str, Any], unique_key: str | None) -> WebhookEvent:
        object_type = payload.get("object_type")
        obj = payload.get(object_type) if isinstance(object_type, str) else None
        return WebhookEvent(
            webhook_type=payload["webhook_type"],
            object_type=object_type if isinstance(object_type, str) else None,
            object=obj if isinstance(obj, Mapping) else {},
            org_id=resolve_org(payload, config.settings.subscription_id_template),
            unique_key=unique_key.strip() or None if unique_key else None,
            payload=payload,
        )

    async def _process(self, event: WebhookEvent, scope: Scope, token: str) -> Response:
        dedupe = self._dedupe
        if self._owns_dedupe and isinstance(dedupe, RedisDedupe) and not _on_asyncio():
            dedupe = self._dedupe = self._memory_dedupe_instead()
        key = event.unique_key
        shown = None if key is None else printable(key)  # (the header is not signed: no line of its choosing logged)
        claimed = False
        if dedupe is not None:
            try:
                # (a plain method's answer is no awaitable: awaited, it raised a TypeError, taken for Redis being
                # down, and every delivery ran without dedupe, Lago's retries and resends running handlers again)
                state = await _called(dedupe.claim, token)
            except Exception as exc:  # Redis down: process anyway (at-least-once) rather than lose the webhook
                self._say(
                    "dedupe",
                    "Webhook dedupe unavailable (check Redis, LAGO_REDIS_URL): processing %s without it, so a delivery "
                    "Lago sends again may run its handlers twice\n%s",
                    shown,
                    traceback_text(exc),  # (not the exception: its frames' locals held the Redis password)
                )
                state = "new"
                dedupe = None
            if state == "done":
                self.stats["duplicates"] += 1
                return _answer(_SUCCESS, "duplicate", "Already processed.", unique_key=key)
            if state == "processing":
                return _answer(409, "in_progress", "This delivery is being processed; retry later.", unique_key=key)
            claimed = dedupe is not None
        try:
            handled = await self._dispatch_claimed(event, scope, dedupe if claimed else None, token)
        except BaseException as exc:
            if claimed and dedupe is not None:
                with anyio.CancelScope(shield=True):
                    await self._quietly(_called(dedupe.release, token))
            if not isinstance(exc, Exception):
                raise
            self.stats["failed"] += 1
            if isinstance(exc, _InvalidationFailed):  # (one outage fails every webhook alike: no traceback each)
                self._alarm("invalidation", "Lago webhook %s (%s) answered 500: %s", event.webhook_type, shown, exc)
                return _answer(
                    500,
                    "invalidation_failed",
                    "Cached quota state could not be dropped; Lago will retry.",
                    unique_key=key,
                )
            logger.exception("Handling the Lago webhook %s (%s) failed; Lago will retry it", event.webhook_type, shown)
            return _answer(500, "handler_failed", "A handler failed; Lago will retry.", unique_key=key)
        if claimed and dedupe is not None:
            await self._quietly(_called(dedupe.complete, token))
        self.stats["processed" if handled else "ignored"] += 1
        status = "processed" if handled else "ignored"
        return _answer(_SUCCESS, status, None, unique_key=key, webhook_type=event.webhook_type, org_id=event.org_id)

    async def _dispatch_claimed(
        self, event: WebhookEvent, scope: Scope, dedupe: WebhookDedupe | None, key: str | None
    ) -> bool:
        """``_dispatch``, renewing the delivery's claim while the handlers run (a dead worker's claim expires)."""
        extend = getattr(dedupe, "extend", None)
        if extend is None or key is None:
            return await self._dispatch(event, scope)
        period = max(0.1, float(getattr(dedupe, "processing_ttl", DEFAULT_PROCESSING_TTL)) / 3)

        async def keep_claim() -> None:
            while True:
                await anyio.sleep(period)
                await self._quietly(_called(extend, key))

        handled: list[bool] = []
        failure: list[Exception] = []
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(keep_claim)
            try:
                handled.append(await self._dispatch(event, scope))
            except Exception as exc:  # raised as it is, below (not in the task group's exception group)
                failure.append(exc)
            finally:
                tasks.cancel_scope.cancel()
        if failure:
            raise failure[0]
        return handled[0]

    async def _dispatch(self, event: WebhookEvent, scope: Scope) -> bool:
        handled = False
        target = self._invalidate if self._invalidate is not None else _scope_gate(scope)
        if target is None and _invalidates(event.webhook_type):
            self._once(
                event.webhook_type,
                "Lago webhook %s changes an org's quota state, but this receiver has no quota gate to tell: pass "
                "LagoWebhooks(invalidate=gate) (the QuotaGate, sharing LAGO_REDIS_URL with the app's workers), or "
                "serve it behind OrgBillingMiddleware; cached plans catch up within LAGO_QUOTA_PLAN_TTL meanwhile "
                "(said once)",
                event.webhook_type,
            )
        if _invalidates(event.webhook_type) and event.org_id is not None and target is not None:
            try:
                if isinstance(target, QuotaGate):  # the type decides: usage alerts mark the snapshot due, not drop it
                    await target.invalidate(event.org_id, webhook_type=event.webhook_type)
                else:  # (a gate of another kind, or a plain function: the org id only)
                    await _called(target.invalidate if isinstance(target, SupportsInvalidate) else target, event.org_id)
            except Exception as exc:
                raise _InvalidationFailed.of(f"org {event.org_id!r}", exc) from _without_tracebacks(exc)
            self.stats["invalidations"] += 1
            handled = True
        elif event.webhook_type in ORG_WIDE_TYPES and target is not None:
            invalidate_all = getattr(target, "invalidate_all", None)
            if invalidate_all is not None:
                # fleet-wide (Redis: a SCAN of every org's snapshot): a burst of plan/feature webhooks shares runs
                coalesced = self._org_wide.get(id(target))
                if coalesced is None or coalesced.target is not target:
                    coalesced = self._org_wide[id(target)] = _Coalesced(target)
                try:
                    await coalesced.run(lambda: _called(invalidate_all))
                except Exception as exc:
                    raise _InvalidationFailed.of("every org", exc) from _without_tracebacks(exc)
                self.stats["invalidations"] += 1
                handled = True
            else:
                self._once(
                    event.webhook_type,
                    "Lago webhook %s changes every org's limits, but invalidate= has no invalidate_all(): cached plans "
                    "catch up within LAGO_QUOTA_PLAN_TTL (pass the QuotaGate as invalidate= to apply it at once; said "
                    "once)",
                    event.webhook_type,
                )
        for handler in [*self._handlers.get(event.webhook_type, ()), *self._handlers.get("*", ())]:
            if _is_async(handler):
                await handler(event)
            else:
                result = await anyio.to_thread.run_sync(handler, event)
                if inspect.isawaitable(result):
                    await result
            handled = True
        if not handled:
            self._once(
                event.webhook_type,
                "Lago webhook type %r is answered 200 and ignored: no handler for it (LagoWebhooks.on(%r)) and no "
                "quota effect. Filter the endpoint's event_types in Lago if it is not wanted (said once per type)",
                event.webhook_type,
                event.webhook_type,
            )
        return handled

    def _once(self, webhook_type: str, message: str, *args: object) -> None:
        """Log ``message`` at INFO the first time for ``webhook_type`` (a few dozen types: bounded all the same)."""
        if webhook_type in self._said_once or len(self._said_once) >= _MAX_TYPES_SAID:
            return
        self._said_once.add(webhook_type)
        logger.info(message, *args)

    async def _quietly(self, operation: Awaitable[None]) -> None:
        try:
            await operation
        except Exception as exc:
            self._say(
                "dedupe_store", "Webhook dedupe store failed (check Redis, LAGO_REDIS_URL)\n%s", traceback_text(exc)
            )


class _Run:
    """One run of a :class:`_Coalesced` operation, and the callers waiting on it."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: Exception | None = None


class _Coalesced:
    """An operation (a gate's ``invalidate_all``) run for its callers one run at a time: a caller arriving during a
    run waits for the next one, which starts after it arrived and serves every caller arriving meanwhile. So each
    caller returns after a run that began after it came (what it was called for is taken into account), and a burst
    of N callers makes two runs, not N at once. A run's error is raised to every caller it served."""

    def __init__(self, target: object) -> None:
        self.target = target  # (kept: the id it is filed under is not reused while it lives)
        self._pending: _Run | None = None  # the next run, that callers arriving now join
        self._busy: anyio.Event | None = None  # set when the run in progress ends

    async def run(self, operation: Callable[[], Awaitable[object]]) -> None:
        run = self._pending
        if run is None:
            run = self._pending = _Run()
        while not run.done.is_set():
            busy = self._busy
            if busy is not None:
                await busy.wait()
                continue
            if self._pending is run:  # callers arriving from now on wait for the run after this one
                self._pending = None
            self._busy = anyio.Event()
            try:  # (this caller cancelled: the run is not done, and another caller waiting on it makes it)
                await operation()
            except Exception as exc:
                run.error = exc
                run.done.set()
            else:
                run.done.set()
            finally:
                ended, self._busy = self._busy, None
                ended.set()
        if run.error is not None:
            raise run.error


#: Webhook types whose notes (ignored, no gate) are said once each; Lago has about a hundred.
_MAX_TYPES_SAID = 512

#: The longest ``X-Lago-Unique-Key`` kept as it is in the dedupe store (Lago's are UUIDs, 36 characters).
_MAX_KEPT_KEY = 128


def _dedupe_token(unique_key: str | None, body: bytes) -> str:
    """What a delivery is deduplicated on: ``X-Lago-Unique-Key``, which Lago sends with every delivery (the same on
    its retries); one without it (an older Lago, or a captured delivery replayed with the header dropped) on its
    signed body. The header is not signed: a longer key than Lago's is kept as its digest, so that the store (whose
    cap counts entries, and Redis for a week) holds some bytes per delivery, not what a header can carry."""
    if unique_key is None:
        return "sha256:" + hashlib.sha256(body).hexdigest()
    if len(unique_key) <= _MAX_KEPT_KEY:
        return unique_key
    return "key-sha256:" + hashlib.sha256(unique_key.encode("utf-8", "surrogatepass")).hexdigest()


def _gate_of(invalidate: Invalidate | SupportsInvalidate | None) -> Invalidate | SupportsInvalidate | None:
    """``invalidate=``, or the quota gate itself when it is the gate's own ``invalidate`` method
    (``invalidate=gate.invalidate``: "an async function of the org id", the natural way to write it). Called with the
    org id only, it dropped the org's snapshot on a usage webhook (``alert.triggered``) instead of marking it due (its
    next request, with Lago's API down, got the fail policy), and ``plan.updated``/``feature.*`` found no
    ``invalidate_all``: every org kept its old limits up to ``LAGO_QUOTA_PLAN_TTL``."""
    gate = getattr(invalidate, "__self__", None)
    if inspect.ismethod(invalidate) and isinstance(gate, QuotaGate) and invalidate.__name__ == "invalidate":
        return gate
    return invalidate


def _scope_gate(scope: Scope) -> SupportsInvalidate | None:
    """The quota gate ``OrgBillingMiddleware`` published in the scope, if this route sits behind one."""
    billing = scope.get(SCOPE_KEY)
    gate = billing.get("quota") if isinstance(billing, Mapping) else None
    return gate if isinstance(gate, SupportsInvalidate) else None


async def _called(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``'s answer, awaited when it is an awaitable: a function given by the user may be sync or
    async (``invalidate=`` and its ``invalidate_all``, a cache of one's own dropped inline, as handlers may be: awaited
    as async, its ``None`` raised a TypeError once it had run, every such webhook answered 500 until Lago gave up, its
    handlers never run; the dashboard's providers)."""
    result = function(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def _is_async(handler: Handler) -> bool:
    call = handler if inspect.isfunction(handler) or inspect.ismethod(handler) else type(handler).__call__
    return inspect.iscoroutinefunction(call)


def _same_key(a: Any, b: Any) -> bool:
    try:
        return bool(a.public_numbers() == b.public_numbers())
    except AttributeError:  # pragma: no cover - not an RSA key
        return a is b


def _given_hmac_key(key: object) -> str | None:
    """``LagoWebhooks(hmac_key=...)``, checked as ``LAGO_WEBHOOK_HMAC_KEY`` is: text, without the quotes a Docker
    ``--env-file`` keeps or the line break a secret file ends with (either made every webhook a 401)."""
    if key is None:
        return None
    if not isinstance(key, str):
        raise ConfigurationError(
            f"LagoWebhooks(hmac_key=...) takes the webhook HMAC key of Lago as text, got {type(key).__name__}.",
            variable="LAGO_WEBHOOK_HMAC_KEY",
        )
    _check_unquoted("LAGO_WEBHOOK_HMAC_KEY", key)
    return key.strip() or None


class _BodyCut(Exception):
    """The sender disconnected before the webhook's body was read whole."""


def _answer(status: int, code: str, detail: str | None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"status": code}
    if detail is not None:
        body["detail"] = detail
    body.update({key: value for key, value in extra.items() if value is not None})
    return JSONResponse(body, status_code=status)


def _issuer_key(url: str) -> str:
    """A JWT issuer (a Lago API URL) as compared: scheme and host in lower case, without a ``user:password@`` (never
    shown in an answer or a log) nor the scheme's default port, nor a trailing ``/``. ``LAGO_API_URL`` written
    ``HTTPS://API.getlago.com:443/`` is the Lago whose ``iss`` is ``https://api.getlago.com``."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:  # (not a URL: compared as written)
        return url.rstrip("/")
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return url.rstrip("/")
    scheme = parts.scheme.lower()
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != (443 if scheme == "https" else 80):
        host += f":{port}"
    return f"{scheme}://{host}{parts.path.rstrip('/')}"
