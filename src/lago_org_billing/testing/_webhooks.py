"""Outgoing webhooks from the Lago emulator, signed and retried like Lago's.

Lago posts ``{"webhook_type", "object_type", "organization_id", <object_type>: {...}}`` with the
headers ``X-Lago-Signature``, ``X-Lago-Signature-Algorithm`` (``jwt`` or ``hmac``) and
``X-Lago-Unique-Key`` (stable across the retries of one delivery). A delivery succeeds on 200, 201,
202 or 204 only, and is tried ``attempts`` times in all (Lago: 3), each attempt given up after ``timeout`` seconds
(Lago: 30, ``LAGO_WEBHOOK_TIMEOUT_SECONDS``), in process too.

In tests, nothing leaves until ``await dispatcher.deliver_pending()``. When the emulator is served
(uvicorn), a background task started on the ASGI lifespan delivers soon after each emit, and
``dispatcher.wait_delivered(n)`` lets a synchronous test wait for it without sleeping.

Control routes (never part of Lago's API)::

    PUT  /_emulator/webhooks          {"url": "...", "signature": "jwt"|"hmac", "hmac_key": "...", "issuer": "...",
                                       "attempts": 3, "timeout": 30}
    GET  /_emulator/webhooks          configuration, pending count and deliveries
    POST /_emulator/webhooks/deliver  sends everything pending, returns those deliveries
    POST /_emulator/webhooks/redeliver {"unique_key": "..."} sends one delivery again, same body and key
    DELETE /_emulator/webhooks        forgets the target, the queue and the delivery log

``fake.reset()`` (and ``POST /_emulator/reset``) forgets the queue and the delivery log but keeps the target.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import math
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import anyio
import anyio.from_thread
import anyio.lowlevel
import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._errors import ConfigurationError, InvalidRequestError, LagoIntegrationError
from ._faults import LONE_SURROGATE_MESSAGE, _holds_lone_surrogate

__all__ = [
    "CONTROL_PATH",
    "SUCCESS_STATUSES",
    "WebhookDelivery",
    "WebhookDispatcher",
    "WebhookMiddleware",
    "install_webhooks",
    "sign_hmac",
]

logger = logging.getLogger("lago_org_billing.testing")

CONTROL_PATH = "/_emulator/webhooks"
SUCCESS_STATUSES = frozenset({200, 201, 202, 204})
DEFAULT_APP_URL = "http://webhook-receiver/webhooks/lago"

SignatureAlgo = Literal["jwt", "hmac"]


class _FakeLike(Protocol):
    @property
    def rsa_private_key_pem(self) -> bytes: ...


@dataclass
class WebhookDelivery:
    """One webhook sent to the endpoint, with its retries."""

    unique_key: str
    webhook_type: str
    object_type: str
    payload: dict[str, Any]
    body: bytes
    attempts: int = 0
    status: int | None = None
    """HTTP status of the last attempt (``None``: not sent yet, or a network error)."""
    error: str | None = None
    state: Literal["pending", "succeeded", "failed"] = "pending"
    history: list[int | str] = field(default_factory=list)
    """Each attempt's status, or the network error's text."""
    headers: dict[str, str] = field(default_factory=dict)
    """Headers of the last attempt."""

    @property
    def succeeded(self) -> bool:
        return self.state == "succeeded"

    def to_json(self) -> dict[str, Any]:
        return {
            "unique_key": self.unique_key,
            "webhook_type": self.webhook_type,
            "object_type": self.object_type,
            "attempts": self.attempts,
            "status": self.status,
            "state": self.state,
            "error": self.error,
            "history": self.history,
            "payload": self.payload,
        }


# Lago sends ``payload.to_json``, and in a Rails app that is ActiveSupport's encoder: besides the JSON gem's escapes it
# writes ``<``, ``>`` and ``&`` as ``\u003c``, ``\u003e``, ``\u0026`` (``escape_html_entities_in_json``, on by default)
# and U+2028/U+2029 as ``\u2028``/``\u2029``. A receiver that verifies a body it parsed and wrote again, rather than the
# raw bytes, fails on those (an invoice's ``file_url`` has ``&`` in its query): it must fail here too. (The characters
# only occur inside strings, where the escape means the same character, so the whole text can be rewritten.)
_RAILS_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def _to_json(payload: Mapping[str, Any]) -> bytes:
    """Rails' ``payload.to_json``: compact, UTF-8, keys in order, with ActiveSupport's escapes."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, default=str)
    return text.translate(_RAILS_ESCAPES).encode()


def sign_hmac(body: bytes, key: str) -> str:
    """Lago's HMAC signature: base64 (standard, padded) of HMAC-SHA256(key, raw body)."""
    return base64.b64encode(hmac.new(key.encode(), body, hashlib.sha256).digest()).decode()


def _sign_jwt(body: bytes, private_key_pem: bytes, issuer: str) -> str:
    try:
        import jwt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            "signing webhooks with JWT needs PyJWT: pip install 'lago-org-billing[testing]' "
            "(or configure the emulator's webhooks with signature='hmac')"
        ) from exc
    # Written as ruby-jwt writes Lago's (RS256 being deterministic, the very token Lago would send with this key): a
    # header of ``alg`` alone, and the claims as raw UTF-8, where PyJWT's defaults add ``typ`` and write each non-ASCII
    # character as a \u escape, a token up to twice Lago's, past a receiver server's header limit where Lago's fits.
    token: str = jwt.encode(
        {"data": body.decode(), "iss": issuer},
        _private_key(private_key_pem),
        algorithm="RS256",
        headers={"typ": None},
        json_encoder=_Utf8Encoder,
    )
    return token


class _Utf8Encoder(json.JSONEncoder):
    """JSON as Ruby's ``JSON.generate`` writes it: non-ASCII characters as they are."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**{**options, "ensure_ascii": False})


@functools.lru_cache(maxsize=8)
def _private_key(pem: bytes) -> Any:
    """The signing key, loaded once per PEM: loading checks the RSA key, about 0.1 s, which PyJWT given the PEM did
    again for every attempt (a test sending 50 JWT webhooks spent 5 s on it)."""
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(pem, password=None)


class WebhookDispatcher:
    """Queues, signs and delivers the emulator's webhooks.

    * ``url`` - the receiver's URL. With ``app``, requests go in process to that ASGI app (``url``
      then only sets the path and host, default ``http://webhook-receiver/webhooks/lago``);
      without ``app`` they go over HTTP.
    * ``signature`` - ``"jwt"`` (Lago's default; RS256 with ``fake.rsa_private_key_pem``) or
      ``"hmac"`` (``hmac_key``, a random UUID when not given, like Lago's per-organization key).
    * ``attempts`` - tries per delivery, in all.
    * ``timeout`` - seconds an attempt may take (Lago: 30); a receiver slower than that, in process too, is a failed
      attempt (``ReadTimeout``), retried like Lago's. The attempt ends with the answer: what an in-process receiver
      does after it (background tasks) neither times it out nor fails it, as over HTTP.

    Like Lago, nothing is queued while no endpoint (``url`` or ``app``) is configured.
    """

    def __init__(
        self,
        fake: _FakeLike,
        url: str | None = None,
        app: ASGIApp | None = None,
        signature: SignatureAlgo = "jwt",
        hmac_key: str | None = None,
        issuer: str = "http://fake-lago",
        attempts: int = 3,
        timeout: float = 30.0,
    ) -> None:
        self.fake = fake
        self.url = url
        self.app = app
        self.signature: SignatureAlgo = signature
        self.hmac_key = hmac_key or str(uuid.uuid4())
        self.issuer = issuer
        self.attempts = attempts
        self.timeout = timeout
        self.organization_id = str(getattr(fake, "organization_id", None) or uuid.uuid4())
        self.deliveries: list[WebhookDelivery] = []
        self._pending: list[WebhookDelivery] = []
        self._generation = 0  # bumped by reset() and clear(): a delivery run taken before stops sending
        # Delivery runs going on (deliver_pending), each with its cancel scope, generation and thread: reset() and
        # clear() cancel those of older generations (an attempt to a receiver that hangs would hold the next ones).
        self._runs: list[tuple[anyio.CancelScope, int, int]] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wake: anyio.Event | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._loop_thread: int | None = None
        self._validate()

    def _validate(self) -> None:
        # As ``PUT /_emulator/webhooks`` refuses them, for ``configure()`` and the constructor too: a stored lone
        # surrogate broke ``config_json()`` (the GET listing) and every signature (nothing can encode it).
        if _holds_lone_surrogate((self.hmac_key, self.issuer, self.url)):
            raise InvalidRequestError(
                "webhook url, hmac_key and issuer must be Unicode text: one holds a lone surrogate "
                "(a \\ud800-\\udfff character without its pair)"
            )
        if self.signature not in ("jwt", "hmac"):
            raise InvalidRequestError(f"webhook signature must be 'jwt' or 'hmac', got {self.signature!r}")
        if (
            isinstance(self.attempts, bool)
            or not isinstance(self.attempts, int)
            or not 1 <= self.attempts <= _MAX_ATTEMPTS
        ):
            raise InvalidRequestError(
                f"webhook attempts must be an integer from 1 to {_MAX_ATTEMPTS} (Lago: 3), got {self.attempts!r}"
            )
        if not isinstance(self.hmac_key, str) or not self.hmac_key:
            raise InvalidRequestError(
                "webhook hmac_key must be a non-empty string (Lago signs with its organization's key)"
            )
        if (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, (int, float))
            or not math.isfinite(self.timeout)
            or self.timeout <= 0
        ):
            raise InvalidRequestError(
                f"webhook timeout must be a number of seconds greater than 0 (Lago: 30), got {self.timeout!r}"
            )
        if self.url is not None:
            _check_url(self.url)

    @property
    def enabled(self) -> bool:
        """Whether an endpoint is configured (otherwise emits are dropped, as in Lago)."""
        return self.url is not None or self.app is not None

    @property
    def pending(self) -> list[WebhookDelivery]:
        with self._lock:
            return list(self._pending)

    def configure(
        self,
        *,
        url: str | None = None,
        app: ASGIApp | None = None,
        signature: SignatureAlgo | None = None,
        hmac_key: str | None = None,
        issuer: str | None = None,
        attempts: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Change the endpoint, signing or delivery settings; only the given arguments change (none when one of them
        is refused)."""
        before = (self.url, self.app, self.signature, self.hmac_key, self.issuer, self.attempts, self.timeout)
        try:
            self._configure(
                url=url,
                app=app,
                signature=signature,
                hmac_key=hmac_key,
                issuer=issuer,
                attempts=attempts,
                timeout=timeout,
            )
        except InvalidRequestError:
            self.url, self.app, self.signature, self.hmac_key, self.issuer, self.attempts, self.timeout = before
            raise

    def _configure(
        self,
        *,
        url: str | None,
        app: ASGIApp | None,
        signature: SignatureAlgo | None,
        hmac_key: str | None,
        issuer: str | None,
        attempts: int | None,
        timeout: float | None,
    ) -> None:
        if url is not None:
            self.url = url
        if app is not None:
            self.app = app
        if signature is not None:
            self.signature = signature
        if hmac_key is not None:
            self.hmac_key = hmac_key
        if issuer is not None:
            self.issuer = issuer
        if attempts is not None:
            self.attempts = attempts
        if timeout is not None:
            self.timeout = timeout
        self._validate()

    def reset(self) -> None:
        """Forget the endpoint, the queue and the delivery log (``DELETE /_emulator/webhooks``): nothing is queued
        until an endpoint is configured again. The signing settings stay."""
        with self._lock:
            self.url = None
            self.app = None
        self.clear()

    def clear(self) -> None:
        """Forget the queue and the delivery log, keep the endpoint and the signing settings (what
        ``FakeLago.reset()`` does: Lago keeps an organization's webhook endpoints when its data goes). What a delivery
        run had already taken from the queue is not sent either, and the attempt being sent is cancelled (a receiver
        that hangs would hold the next test's webhooks for the attempt's ``timeout``), in the served emulator's
        background delivery and in a ``deliver_pending()`` running in this thread's event loop."""
        with self._lock:
            self._pending.clear()
            self.deliveries.clear()
            self._generation += 1
            generation = self._generation
            runs = [run for run in self._runs if run[1] < generation]
            self._changed.notify_all()
        for scope, _, thread in runs:  # (outside the lock: the loop thread may be waiting for it)
            try:
                if thread == threading.get_ident():
                    scope.cancel()
                elif thread == self._loop_thread and self._token is not None:
                    anyio.from_thread.run_sync(scope.cancel, token=self._token)
            except RuntimeError:  # its loop has stopped, or is not running now (a run left over by a test)
                pass
            # (else, or then, the run stops before its next delivery: see _current)

    # Queueing ------------------------------------------------------------------------------------

    def envelope(self, webhook_type: str, object_type: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "webhook_type": webhook_type,
            "object_type": object_type,
            "organization_id": self.organization_id,
            object_type: dict(obj),
        }

    def emit(self, webhook_type: str, object_type: str, obj: Mapping[str, Any]) -> WebhookDelivery | None:
        """Queue one webhook; returns ``None`` when no endpoint is configured."""
        if not self.enabled:
            return None
        payload = self.envelope(webhook_type, object_type, obj)
        body = _to_json(payload)
        delivery = WebhookDelivery(
            unique_key=str(uuid.uuid4()),
            webhook_type=webhook_type,
            object_type=object_type,
            payload=payload,
            body=body,
        )
        with self._lock:
            self._pending.append(delivery)
            self.deliveries.append(delivery)
        self._notify_worker()
        return delivery

    def headers_for(self, delivery: WebhookDelivery) -> dict[str, str]:
        """The headers Lago sends with this delivery (signature computed now)."""
        if self.signature == "hmac":
            signature = sign_hmac(delivery.body, self.hmac_key)
        else:
            signature = _sign_jwt(delivery.body, self.fake.rsa_private_key_pem, self.issuer)
        return {
            "Content-Type": "application/json",
            "X-Lago-Signature": signature,
            "X-Lago-Signature-Algorithm": self.signature,
            "X-Lago-Unique-Key": delivery.unique_key,
        }

    # Delivery ------------------------------------------------------------------------------------

    def _client(self) -> tuple[httpx.AsyncClient, str]:
        if self.app is not None:
            transport: httpx.AsyncBaseTransport = _InProcessReceiver(self.app)
            return httpx.AsyncClient(transport=transport, timeout=self.timeout), self.url or DEFAULT_APP_URL
        if self.url is None:
            raise ConfigurationError(
                "no webhook endpoint: configure one with WebhookDispatcher(url=...) or PUT /_emulator/webhooks"
            )
        return httpx.AsyncClient(timeout=self.timeout), self.url

    async def _attempt(self, client: httpx.AsyncClient, url: str, delivery: WebhookDelivery) -> bool:
        headers = self.headers_for(delivery)
        delivery.headers = headers
        delivery.attempts += 1
        try:
            response = await client.post(url, content=delivery.body, headers=headers)
        except Exception as exc:  # network errors, and exceptions raised by an in-process receiver
            delivery.status = None
            delivery.error = f"{type(exc).__name__}: {exc}"
            delivery.history.append(delivery.error)
            return False
        delivery.status = response.status_code
        delivery.history.append(response.status_code)
        ok = response.status_code in SUCCESS_STATUSES
        delivery.error = None if ok else f"HTTP {response.status_code}"
        return ok

    def _current(self, generation: int | None) -> bool:
        with self._lock:
            return generation is None or generation == self._generation

    async def _send(self, delivery: WebhookDelivery, tries: int, generation: int | None = None) -> WebhookDelivery:
        client, url = self._client()
        async with client:
            ok = False
            for _ in range(tries):
                ok = await self._attempt(client, url, delivery)
                if ok or not self._current(generation):  # (no retry of a delivery a reset forgot)
                    break
        with self._lock:
            delivery.state = "succeeded" if ok else "failed"
            self._changed.notify_all()
        return delivery

    async def deliver_pending(self) -> list[WebhookDelivery]:
        """Send everything queued (each up to ``attempts`` times); returns those deliveries.

        The emulator first catches up with its clock (``fake.catch_up()``): what Lago's clock jobs would have emitted
        by now (a subscription reaching its ``ending_at``...) is sent too. A :meth:`reset` or :meth:`clear` meanwhile
        (``fake.reset()`` from the next test) ends the run: the rest is not sent, nor returned."""
        catch_up = getattr(self.fake, "catch_up", None)
        if callable(catch_up):
            catch_up()
        sent: list[WebhookDelivery] = []
        with anyio.CancelScope() as scope:
            with self._lock:
                batch, self._pending = self._pending, []
                generation = self._generation
                run = (scope, generation, threading.get_ident())
                self._runs.append(run)
            try:
                for delivery in batch:
                    if not self._current(generation):
                        break
                    sent.append(await self._send(delivery, self.attempts, generation))
            finally:
                with self._lock:
                    self._runs.remove(run)
        return sent

    async def redeliver(self, unique_key: str) -> WebhookDelivery:
        """Send a delivery again with the same body and ``X-Lago-Unique-Key`` (one attempt)."""
        for delivery in self.deliveries:
            if delivery.unique_key == unique_key:
                return await self._send(delivery, 1)
        raise InvalidRequestError(f"no webhook delivery has unique_key {unique_key!r}; see dispatcher.deliveries")

    def find(self, webhook_type: str | None = None) -> list[WebhookDelivery]:
        """Deliveries so far, optionally of one ``webhook_type``."""
        with self._lock:
            return [d for d in self.deliveries if webhook_type is None or d.webhook_type == webhook_type]

    def wait_delivered(self, count: int = 1, *, timeout: float = 10.0) -> list[WebhookDelivery]:
        """Block (in a thread other than the server's) until ``count`` deliveries have finished.

        Raises :class:`LagoIntegrationError` after ``timeout`` seconds.
        """
        with self._changed:
            done = self._changed.wait_for(
                lambda: sum(d.state != "pending" for d in self.deliveries) >= count, timeout=timeout
            )
            finished = [d for d in self.deliveries if d.state != "pending"]
        if not done:
            raise LagoIntegrationError(
                f"only {len(finished)} of {count} webhook deliveries finished within {timeout} s; "
                "is the emulator served (background delivery) and a webhook URL configured?"
            )
        return finished

    # Background mode -----------------------------------------------------------------------------

    async def run_background(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver soon after each emit, until cancelled (started by the ASGI lifespan when served)."""
        self._token = anyio.lowlevel.current_token()
        self._loop_thread = threading.get_ident()
        self._wake = anyio.Event()
        task_status.started()
        try:
            while True:
                if not self.pending:
                    await self._wake.wait()
                self._wake = anyio.Event()
                await self.deliver_pending()
        finally:
            self._token = None
            self._wake = None
            self._loop_thread = None

    def _notify_worker(self) -> None:
        token = self._token
        if token is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._set_wake()
        else:
            try:
                anyio.from_thread.run_sync(self._set_wake, token=token)
            except RuntimeError:  # the loop has just stopped
                pass

    def _set_wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # Control routes ------------------------------------------------------------------------------

    def config_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "in_process_app": self.app is not None,
            "signature": self.signature,
            "hmac_key": self.hmac_key,
            "issuer": self.issuer,
            "attempts": self.attempts,
            "timeout": self.timeout,
            "organization_id": self.organization_id,
        }

    async def _put(self, request: Request) -> Response:
        try:
            spec = json.loads(await request.body() or b"null")
        except (ValueError, RecursionError):  # (RecursionError: nested deeper than the decoder goes)
            spec = None
        if _holds_lone_surrogate(spec):  # (stored, it broke GET /_emulator/webhooks and every signature: 500s)
            return _unprocessable(LONE_SURROGATE_MESSAGE)
        if not isinstance(spec, dict):
            return _unprocessable('the body must be a JSON object such as {"url": "http://127.0.0.1:8000/hooks"}')
        unknown = sorted(set(spec) - {"url", "signature", "hmac_key", "issuer", "attempts", "timeout"})
        if unknown:
            return _unprocessable(f"unknown field(s) {', '.join(map(repr, unknown))}")
        for key in ("url", "hmac_key", "issuer"):
            if key in spec and not isinstance(spec[key], str):
                return _unprocessable(f"{key!r} must be a string")
        if "url" in spec and not spec["url"].startswith(("http://", "https://")):
            return _unprocessable(f"'url' must be an http(s) URL, got {spec['url']!r}")
        previous = (self.url, self.signature, self.hmac_key, self.issuer, self.attempts, self.timeout)
        try:
            self.configure(
                url=spec.get("url"),
                signature=spec.get("signature"),
                hmac_key=spec.get("hmac_key"),
                issuer=spec.get("issuer"),
                attempts=spec.get("attempts"),
                timeout=spec.get("timeout"),
            )
        except InvalidRequestError as exc:
            self.url, self.signature, self.hmac_key, self.issuer, self.attempts, self.timeout = previous
            return _unprocessable(str(exc))
        return JSONResponse({"webhooks": self.config_json()})

    async def _get(self, request: Request) -> Response:
        return JSONResponse(
            {
                "webhooks": self.config_json(),
                "pending": len(self.pending),
                "deliveries": [d.to_json() for d in self.find()],
            }
        )

    async def _delete(self, request: Request) -> Response:
        self.reset()
        return JSONResponse({"webhooks": self.config_json()})

    async def _deliver(self, request: Request) -> Response:
        if not self.enabled:
            return _unprocessable('no webhook URL configured: PUT /_emulator/webhooks {"url": ...} first')
        delivered = await self.deliver_pending()
        return JSONResponse({"deliveries": [d.to_json() for d in delivered]})

    async def _redeliver(self, request: Request) -> Response:
        try:
            spec = json.loads(await request.body() or b"null")
        except (ValueError, RecursionError):
            spec = None
        if _holds_lone_surrogate(spec):
            return _unprocessable(LONE_SURROGATE_MESSAGE)
        key = spec.get("unique_key") if isinstance(spec, dict) else None
        if not isinstance(key, str):
            return _unprocessable('the body must be {"unique_key": "<X-Lago-Unique-Key of a delivery>"}')
        try:
            delivery = await self.redeliver(key)
        except InvalidRequestError as exc:
            return JSONResponse({"status": 404, "error": "Not Found", "message": str(exc)}, status_code=404)
        return JSONResponse({"delivery": delivery.to_json()})

    def routes(self) -> list[Route]:
        return [
            Route(CONTROL_PATH, self._put, methods=["PUT"]),
            Route(CONTROL_PATH, self._get, methods=["GET"]),
            Route(CONTROL_PATH, self._delete, methods=["DELETE"]),
            Route(CONTROL_PATH + "/deliver", self._deliver, methods=["POST"]),
            Route(CONTROL_PATH + "/redeliver", self._redeliver, methods=["POST"]),
        ]


def _unprocessable(message: str) -> Response:
    return JSONResponse(
        {"status": 422, "error": "Unprocessable Entity", "code": "invalid_webhook_settings", "message": message},
        status_code=422,
    )


class WebhookMiddleware:
    """Serves ``/_emulator/webhooks*`` and runs background delivery for the life of a served app."""

    def __init__(self, app: ASGIApp, dispatcher: WebhookDispatcher) -> None:
        self.app = app
        self.dispatcher = dispatcher
        self.control = Router(routes=dispatcher.routes())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] == "http" and scope["path"].startswith(CONTROL_PATH):
            await self.control(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app's lifespan with background delivery beside it. Delivery stops (an attempt being sent is
        cancelled) before the app is told to shut down: once the server has its ``lifespan.shutdown.complete`` it
        cancels whatever still runs, and a delivery cancelled then was logged as ``Exception in 'lifespan'
        protocol``."""
        stop = anyio.CancelScope()
        stopped = anyio.Event()

        async def background(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            try:
                with stop:
                    await self.dispatcher.run_background(task_status=task_status)
            finally:
                stopped.set()

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                stop.cancel()
                await stopped.wait()
            return message

        async with anyio.create_task_group() as tg:
            await tg.start(background)
            try:
                await self.app(scope, lifespan_receive, send)
            finally:
                stop.cancel()


class _InProcessReceiver(httpx.AsyncBaseTransport):
    """Sends an attempt to a receiver app in process, and ends it as over a socket: with the receiver's answer.

    ``httpx.ASGITransport`` returns once the app call ends, with the work the app does after its response (Starlette's
    ``BackgroundTask``, FastAPI's ``BackgroundTasks``) and ignoring timeouts. Over HTTP Lago has the status as soon as
    the response is sent, so here too: the attempt's timeout runs until the response is complete (a receiver slower
    than that is a ``ReadTimeout``), and an exception the app raises after answering is logged, as a server would,
    not a failed attempt that Lago would never have retried. Work still running ``timeout`` seconds after the answer
    is cancelled: the delivery run has to end, and Lago would not have waited for it either."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {}).get("read")
        limit = math.inf if timeout is None else float(timeout)
        status: int | None = None
        headers: list[tuple[bytes, bytes]] = []
        body: list[bytes] = []
        answered = False
        receiver = self.app
        response: httpx.Response | None = None
        with anyio.CancelScope(deadline=anyio.current_time() + limit) as deadline:

            async def app(scope: Scope, receive: Receive, send: Send) -> None:
                async def watch(message: Message) -> None:
                    nonlocal status, headers, answered
                    await send(message)
                    if message["type"] == "http.response.start":
                        status = int(message["status"])
                        headers = list(message.get("headers", []))
                    elif message["type"] == "http.response.body":
                        body.append(message.get("body", b""))
                        if not message.get("more_body", False):
                            answered = True
                            deadline.deadline = anyio.current_time() + limit

                try:
                    await receiver(scope, receive, watch)
                except Exception:
                    # (after a failure answer, such as the 500 Starlette sends before re-raising, the exception stays
                    # the attempt's error: failed either way, and it says more than the status)
                    if not answered or status not in SUCCESS_STATUSES:
                        raise
                    logger.warning(
                        "The webhook receiver raised after answering %s to %s: Lago has that answer, the delivery "
                        "stands",
                        status,
                        request.url,
                        exc_info=True,
                    )

            response = await httpx.ASGITransport(app=app).handle_async_request(request)
        if response is not None:
            return response
        if answered and status is not None:  # (cut while working after its answer)
            return httpx.Response(status, headers=headers, content=b"".join(body))
        raise httpx.ReadTimeout(f"{request.url} did not answer within the read timeout ({limit:g} s)", request=request)


class _SupportsWebhooks(_FakeLike, Protocol):
    def add_middleware(self, factory: Callable[[ASGIApp], ASGIApp]) -> Any: ...


def install_webhooks(fake: _SupportsWebhooks, **options: Any) -> WebhookDispatcher:
    """Attach a :class:`WebhookDispatcher` to a FakeLago (``fake.webhook_dispatcher``) with its routes.

    ``options`` go to :class:`WebhookDispatcher`. Idempotent: a second call reconfigures and returns
    the same dispatcher.
    """
    existing = getattr(fake, "webhook_dispatcher", None)
    if isinstance(existing, WebhookDispatcher):
        existing.configure(**options)
        return existing
    dispatcher = WebhookDispatcher(fake, **options)

    def middleware(app: ASGIApp) -> ASGIApp:
        return WebhookMiddleware(app, dispatcher)

    fake.add_middleware(middleware)
    setattr(fake, "webhook_dispatcher", dispatcher)  # noqa: B010
    return dispatcher


#: Tries per delivery at most (Lago makes 3): more is no test's, and a typo of a huge count retries for ever.
_MAX_ATTEMPTS = 100


def _check_url(url: object) -> None:
    """Refuse a webhook URL no delivery could be sent to, when it is configured rather than at each delivery."""
    problem = None
    if not isinstance(url, str) or not url or any(ch.isspace() for ch in url):
        problem = "it is empty or holds blanks"
    else:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError) as exc:
            problem = str(exc)
        else:
            if parsed.scheme not in ("http", "https") or not parsed.host:
                problem = "it needs http:// or https:// and a host"
    if problem is not None:
        raise InvalidRequestError(f"webhook url {url!r} cannot be delivered to: {problem}")
