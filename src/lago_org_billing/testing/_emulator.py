"""``FakeLago``: an in-process emulator of Lago's REST API (``/api/v1``) built on Starlette.

Usage::

    fake = FakeLago(api_key="test-api-key")
    fake.add_billable_metric("api_call")
    fake.add_plan("starter", charges=[{"billable_metric_code": "api_call", "properties": {"amount": "0.01"}}])
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url) as client:
        ...

**Parameters:**

* **api_key** - the bearer token every ``/api/v1`` request must carry (else ``401``).
* **event_store** - ``"postgres"`` (duplicate ``transaction_id`` rejected with ``422``) or ``"clickhouse"``
  (the latest copy replaces the previous one).
* **clock** - *(optional)* a callable returning the current UTC datetime; pins billing periods in tests.
* **clock_jobs** - when the time-driven changes happen. ``"lago"`` (the default), as Lago's clock jobs do them
  (``clock.rb``): period-end invoices and pending downgrades at the biller's first run after the boundary, hourly at
  minute 10 (UTC), the new subscription starting then (``started_at`` 00:10 for a UTC customer's month); a subscription
  whose ``ending_at`` falls on a day is terminated at the first run of the hourly job at minute 5 that day, possibly
  hours before ``ending_at``. ``"boundary"``: exactly at the boundary and at ``ending_at`` (idealised).
* **clock_job_delay** - *(optional)* seconds a clock job waits in Sidekiq's queue before it runs (``"lago"`` only):
  a downgrade is then seen that much later, though its dates stay the biller's run time.
* **organization_id** - *(optional)* the organization's UUID (the ``organization_id`` of its webhooks), kept by
  :meth:`FakeLago.reset`; it also seeds the ``lago_id`` of the objects. Give two emulators two ids to have two
  organizations; by default every emulator has the same one, so that two fed the same calls agree.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from os import PathLike, fspath
from pathlib import Path
from typing import Any, Protocol

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._errors import ConfigurationError
from ._faults import DroppedConnection
from ._state import EVENT_STORES, LagoStore
from ._util import JSON, UNAUTHORIZED, UTC, ApiError, FakeLagoError, TimedASGITransport

__all__ = ["FakeLago", "RequestRecord", "WebhookDispatcher"]

API_PREFIX = "/api/v1"
LAGO_VERSION = "v1.51.0"
NOT_FOUND_BODY: JSON = {"status": 404, "error": "Not Found", "code": "resource_not_found"}
BETA_HEADER = "X-Lago-Endpoint-Status"
#: The scope key holding the emulator's reset count when a request arrived: a request held (an injected latency) while
#: ``reset()`` ran belongs to the test that ended, and is not applied to the next one's state.
_EPOCH = "lago_org_billing.emulator_epoch"
HELD_ACROSS_RESET_BODY: JSON = {
    "status": 503,
    "error": "Service Unavailable",
    "code": "emulator_reset",
    "message": "the emulator was reset while this request was held (an injected latency): it was not applied; "
    "send it again if it belongs to the current test",
}
#: Lago's answer to a body Rails cannot read: not JSON, or JSON holding text that is not Unicode (a lone surrogate:
#: "\ud800" is valid JSON, but Rails refuses the parameter's encoding before any controller runs)
NOT_JSON_BODY: JSON = {"status": 400, "error": "BadRequest: the request body is not valid JSON"}
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class RequestRecord:
    """One request the emulator received under ``/api/v1``.

    ``query`` maps each parameter to its value (a list when repeated); ``body`` is the parsed JSON body
    (``None`` when empty, the raw text when not JSON); ``status`` is ``0`` when no response was sent.
    """

    method: str
    path: str
    query: Mapping[str, str | list[str]]
    status: int
    body: Any = None


class WebhookDispatcher(Protocol):
    """What ``fake.webhook_dispatcher`` must provide. ``emit`` must not block (queue the delivery).

    :meth:`FakeLago.reset` calls the dispatcher's ``clear()`` when it has one (forget the queue and the deliveries,
    keep the endpoint), else its ``reset()`` when it has one."""

    def emit(self, webhook_type: str, object_type: str, obj: Mapping[str, Any]) -> Any: ...

    def reset(self) -> None: ...


Middleware = Callable[[ASGIApp], ASGIApp]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _encode64(data: bytes) -> str:
    """Ruby ``Base64.encode64``: base64 with a newline every 60 characters and at the end."""
    text = base64.b64encode(data).decode("ascii")
    return "".join(text[i : i + 60] + "\n" for i in range(0, len(text), 60))


class FakeLago:
    """An in-memory Lago organization served as an ASGI app. See the module docstring."""

    base_url = "http://fake-lago"

    def __init__(
        self,
        api_key: str = "test-api-key",
        event_store: str = "postgres",
        clock: Callable[[], datetime] | None = None,
        *,
        batch_max_length: int = 100,
        organization_id: str | None = None,
        clock_jobs: str = "lago",
        clock_job_delay: float = 0.0,
    ) -> None:
        if event_store not in EVENT_STORES:
            raise FakeLagoError(f"event_store must be 'postgres' or 'clickhouse', got {event_store!r}")
        if organization_id is not None:
            try:
                organization_id = str(uuid.UUID(str(organization_id)))
            except ValueError:
                raise FakeLagoError(
                    f"organization_id must be a UUID like Lago's (e.g. {str(uuid.uuid4())!r}), got {organization_id!r}"
                ) from None
        self.api_key = api_key
        self.event_store = event_store
        self.clock: Callable[[], datetime] = clock or _utcnow
        self.batch_max_length = batch_max_length
        self.webhook_dispatcher: WebhookDispatcher | None = None
        self.emitted_webhooks: list[JSON] = []
        self.extra_routes: list[BaseRoute] = []
        self.middleware: list[Middleware] = []
        self.requests: list[RequestRecord] = []
        # Whether requests are recorded in ``requests``: not by an emulator served for good (the ``emulator`` command,
        # ``demo --serve``: see forget_requests), where nothing can read them; each record (a batch's events parsed
        # again) stayed for as long as it served, about 1 KB per event beside the events themselves.
        self._log_requests = True
        self._epoch = 0  # reset() count: see _EPOCH
        self._log_lock = threading.Lock()
        self._outbox: list[tuple[str, str, JSON]] = []
        self._key_lock = threading.Lock()
        self._rsa_private_key_pem: bytes | None = None
        self._rsa_public_key_pem: bytes | None = None
        self._app: Starlette | None = None
        self._app_key: tuple[int, ...] | None = None
        self._stack: ASGIApp | None = None
        self._stack_key: tuple[int, ...] | None = None
        try:
            self.store = LagoStore(
                event_store=event_store,
                clock=self._now,
                emit=self._queue_webhook,
                organization_id=organization_id,
                clock_jobs=clock_jobs,
                clock_job_delay=clock_job_delay,
            )
        except ConfigurationError as exc:
            raise FakeLagoError(str(exc)) from None
        # Test controls: fault injection (``inject_fault``, ``/_emulator/faults``) and signed webhook delivery.
        from ._faults import install_faults
        from ._webhooks import install_webhooks

        self.faults = install_faults(self)
        install_webhooks(self)

    # Plumbing --------------------------------------------------------------------------------

    def _now(self) -> datetime:
        return self.clock()

    def now(self) -> datetime:
        """The emulator's current time (from ``clock``)."""
        return self.store.now()

    @property
    def organization_id(self) -> str:
        return self.store.organization_id

    def _queue_webhook(self, webhook_type: str, object_type: str, obj: JSON) -> None:
        with self._log_lock:
            self._outbox.append((webhook_type, object_type, obj))

    def _flush_webhooks(self) -> None:
        with self._log_lock:
            pending, self._outbox = self._outbox, []
        for webhook_type, object_type, obj in pending:
            self._emit_webhook(webhook_type, object_type, obj)

    def _emit_webhook(self, webhook_type: str, object_type: str, obj: Mapping[str, Any]) -> None:
        """Record a webhook Lago would send and hand it to ``webhook_dispatcher`` when one is set."""
        envelope: JSON = {
            "webhook_type": webhook_type,
            "object_type": object_type,
            "organization_id": self.organization_id,
            object_type: obj,
        }
        with self._log_lock:
            self.emitted_webhooks.append(envelope)
        if self.webhook_dispatcher is not None:
            self.webhook_dispatcher.emit(webhook_type, object_type, obj)

    def _call(self, operation: Callable[[], JSON], *inputs: Any) -> JSON:
        """Run a store operation from Python, turning Lago errors into :class:`FakeLagoError`; ``inputs`` (what the
        helper was given) are first refused as the API refuses a body holding a lone surrogate."""
        _refuse_lone_surrogates(*inputs)
        try:
            return operation()
        except ApiError as exc:
            raise FakeLagoError(
                f"Lago would refuse this with {exc.status}: {json.dumps(exc.body)}", status=exc.status, body=exc.body
            ) from None
        finally:
            self._flush_webhooks()

    # Webhook signing keys ----------------------------------------------------------------------

    def _ensure_keys(self) -> tuple[bytes, bytes]:
        with self._key_lock:
            if self._rsa_private_key_pem is None or self._rsa_public_key_pem is None:
                try:
                    from cryptography.hazmat.primitives import serialization
                    from cryptography.hazmat.primitives.asymmetric import rsa
                except ImportError:
                    raise ConfigurationError(
                        "The emulator signs JWT webhooks (and serves GET /webhooks/public_key) with an RSA key, which "
                        "needs cryptography: pip install 'lago-org-billing[testing]', or configure its webhooks with "
                        "signature='hmac'."
                    ) from None

                key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                self._rsa_private_key_pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                self._rsa_public_key_pem = key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            return self._rsa_private_key_pem, self._rsa_public_key_pem

    @property
    def rsa_private_key_pem(self) -> bytes:
        """PEM (PKCS#8) of the RSA key signing JWT webhooks; generated on first access (2048 bits)."""
        return self._ensure_keys()[0]

    @property
    def rsa_public_key_pem(self) -> bytes:
        """PEM of the public half, served base64-encoded by ``GET /api/v1/webhooks/json_public_key``."""
        return self._ensure_keys()[1]

    def public_key_pem(self) -> bytes:
        """Same as :attr:`rsa_public_key_pem`."""
        return self.rsa_public_key_pem

    # ASGI --------------------------------------------------------------------------------------

    @property
    def app(self) -> Starlette:
        """The Starlette app (control routes, ``extra_routes``, then Lago's API), rebuilt when routes change."""
        key = tuple(id(r) for r in self.extra_routes)
        if self._app is None or self._app_key != key:
            self._app = self._build_app()
            self._app_key = key
        return self._app

    def add_middleware(self, factory: Middleware) -> None:
        """Wrap the app with ``factory(app) -> app``; the last added is the outermost."""
        self.middleware.append(factory)

    def _asgi_stack(self) -> ASGIApp:
        app = self.app
        key = (id(app), *(id(m) for m in self.middleware))
        if self._stack is None or self._stack_key != key:
            stack: ASGIApp = app
            for factory in self.middleware:
                stack = factory(stack)
            self._stack = stack
            self._stack_key = key
        return self._stack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stack = self._asgi_stack()
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(API_PREFIX):
            await stack(scope, receive, send)
            return
        path = scope["path"]
        if "//" in path or path.endswith("/"):  # Rails normalizes the path before routing: served as without them
            scope = {**scope, "path": _REPEATED_SLASHES.sub("/", path).rstrip("/") or "/"}
            raw_path = scope.get("raw_path")
            if isinstance(raw_path, bytes):  # (percent-escapes kept: an id with an escaped "/" stays one segment)
                scope["raw_path"] = re.sub(rb"/{2,}", b"/", raw_path).rstrip(b"/") or b"/"
        await self._logged(stack, scope, receive, send)

    async def _logged(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        epoch = scope[_EPOCH] = self._epoch
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            more = bool(message.get("more_body", False))
        raw = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return await receive()

        status = 0
        recorded = False

        async def capture(message: Message) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body") and not recorded:
                # Recorded before the answer's end goes out: a client that has read the answer finds its request in
                # ``requests``. (Recorded after it, a served emulator's thread could append it after the caller's next
                # step: missing from an assertion made at once, or landing after a test's requests.clear().)
                recorded = True
                self._record(scope, raw, status, epoch)
            await send(message)

        try:
            await app(scope, replay, capture)
        except DroppedConnection:
            status = 0  # (an injected drop starts a response in process only to abort it: nothing was answered)
            raise
        finally:
            if not recorded:
                self._record(scope, raw, status, epoch)

    def _record(self, scope: Scope, raw: bytes, status: int, epoch: int) -> None:
        if not self._log_requests:
            return
        query: dict[str, str | list[str]] = {}
        for key, value in httpx.QueryParams(scope.get("query_string", b"").decode("latin-1")).multi_items():
            existing = query.get(key)
            if existing is None:
                query[key] = value
            elif isinstance(existing, list):
                existing.append(value)
            else:
                query[key] = [existing, value]
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                body = raw.decode("utf-8", "replace")
        record = RequestRecord(str(scope["method"]), str(scope["path"]), query, status, body)
        with self._log_lock:
            if epoch == self._epoch:  # (a request that arrived before a reset is not the next test's)
                self.requests.append(record)

    def transport(self) -> httpx.ASGITransport:
        """An httpx transport sending requests to this emulator in process.

        It keeps the request's read timeout as a socket would: an emulator slower than that (an injected
        ``latency_ms``) raises ``httpx.ReadTimeout``, as the served emulator does, instead of holding the caller.
        """
        return TimedASGITransport(app=self)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` bound to the emulator and already carrying the API key."""
        headers = {"Authorization": f"Bearer {self.api_key}", **kwargs.pop("headers", {})}
        return httpx.AsyncClient(transport=self.transport(), base_url=self.base_url, headers=headers, **kwargs)

    # Read-only views ---------------------------------------------------------------------------

    def catch_up(self) -> None:
        """Apply what Lago's clock jobs would have done by :meth:`now` (subscriptions reaching their ``ending_at``,
        their start date or a downgrade date, with their webhooks and invoices). API requests, the views below and
        ``webhook_dispatcher.deliver_pending()`` do it first: call it after moving ``clock`` when none of them is
        next, e.g. to have a served emulator send the webhooks of a rollover."""
        try:
            self.store.refresh()
        finally:
            self._flush_webhooks()

    @property
    def customers(self) -> list[JSON]:
        """Live (not deleted) customers, serialized as the API returns them, in creation order."""
        self.catch_up()
        return self.store.serialized_customers()

    @property
    def subscriptions(self) -> list[JSON]:
        """Every subscription record (all statuses), in creation order, as of :meth:`now`."""
        self.catch_up()
        return self.store.serialized_subscriptions()

    @property
    def events(self) -> list[JSON]:
        """Stored events in ingestion order (a ClickHouse replacement keeps the first copy's position)."""
        return self.store.serialized_events()

    @property
    def invoices(self) -> list[JSON]:
        self.catch_up()
        return self.store.serialized_invoices()

    @property
    def write_requests(self) -> list[RequestRecord]:
        """The non-GET subset of :attr:`requests`."""
        with self._log_lock:
            return [r for r in self.requests if r.method not in ("GET", "HEAD")]

    def snapshot(self) -> str:
        """Deterministic canonical JSON of the whole Lago state (not the request or webhook logs), as of :meth:`now`."""
        self.catch_up()
        return self.store.snapshot()

    def reset(self) -> None:
        """Forget every object, event, request record, emitted webhook, webhook delivery and injected fault.

        The organization stays as Lago keeps it when its data goes: its API key, ``organization_id``, event store,
        clock, signing keys, and its webhook endpoint with its signing settings, so that an emulator kept for a
        session and reset between tests keeps delivering webhooks. To forget the endpoint too, call
        ``fake.webhook_dispatcher.reset()`` (or ``DELETE /_emulator/webhooks``). ``POST /_emulator/reset`` does the
        same as this method. A request still held then by an injected ``latency_ms`` is let go at once (its fault's
        status or drop, if it had one) and otherwise answered 503, not applied: it belongs to the test that ended, not
        to the next one (and a served emulator stopped next has no request left to wait for)."""
        with self.store.lock:  # (the endpoints check the epoch under this lock: see _endpoint)
            self._epoch += 1
            self.store.clear()
        self.faults.clear()
        dispatcher = self.webhook_dispatcher
        if dispatcher is not None:
            # (a dispatcher of the user's own may have only reset(): it then forgets what its reset() forgets; one
            # with emit() alone is left as it is)
            forget = getattr(dispatcher, "clear", None)
            if not callable(forget):
                forget = getattr(dispatcher, "reset", None)
            if callable(forget):
                forget()
        with self._log_lock:
            self.requests.clear()
            self.emitted_webhooks.clear()
            self._outbox.clear()

    def usage(self, external_customer_id: str, external_subscription_id: str, **params: Any) -> JSON:
        """The body ``GET /customers/{id}/current_usage`` would return (``{"customer_usage": {...}}``)."""
        group = params.pop("group", None) or {}
        if not isinstance(group, Mapping):  # (a dict() of it raised a bare ValueError or TypeError)
            raise FakeLagoError(
                f"group must be a mapping of event properties to values, such as {{'user_id': 'u1'}}, got {group!r}",
                status=400,
            )
        groups = dict(group)
        query = {"external_subscription_id": external_subscription_id, **params}
        return self._call(lambda: self.store.current_usage(external_customer_id, query, groups))

    def past_usage(self, external_customer_id: str, external_subscription_id: str, **params: Any) -> JSON:
        """The body ``GET /customers/{id}/past_usage`` would return (``{"usage_periods": [...], "meta": {...}}``): the
        subscription's invoiced periods, newest first. ``params``: ``billable_metric_code``, ``periods_count``,
        ``page``, ``per_page``. A period is invoiced when the biller runs after it ends (move ``clock`` past it: past
        00:10 for a UTC customer with the default ``clock_jobs``) or when the subscription is terminated or upgraded."""
        query = {"external_subscription_id": external_subscription_id, **{k: str(v) for k, v in params.items()}}
        return self._call(lambda: self.store.past_usage(external_customer_id, query))

    # Python seeding API ------------------------------------------------------------------------

    def add_billable_metric(
        self,
        code: str,
        name: str | None = None,
        aggregation_type: str = "count_agg",
        field_name: str | None = None,
        filters: Sequence[Mapping[str, Any]] | None = None,
        **fields: Any,
    ) -> JSON:
        """Create a billable metric (``POST /billable_metrics``) and return it."""
        params = {
            "code": code,
            "name": name or code,
            "aggregation_type": aggregation_type,
            "field_name": field_name,
            "filters": list(filters or []),
            **fields,
        }
        return self._call(lambda: self.store.create_metric({"billable_metric": params}), params)["billable_metric"]  # type: ignore[no-any-return]

    def add_feature(
        self,
        code: str,
        privileges: Sequence[Mapping[str, Any]] | None = None,
        name: str | None = None,
        description: str | None = None,
    ) -> JSON:
        """Create a feature (``POST /features``) and return it."""
        params = {"code": code, "name": name, "description": description, "privileges": list(privileges or [])}
        return self._call(lambda: self.store.create_feature({"feature": params}), params)["feature"]  # type: ignore[no-any-return]

    def add_plan(
        self,
        code: str,
        name: str | None = None,
        amount_cents: int = 0,
        interval: str = "monthly",
        charges: Sequence[Mapping[str, Any]] | None = None,
        entitlements: Mapping[str, Mapping[str, Any]] | None = None,
        **fields: Any,
    ) -> JSON:
        """Create a plan (``POST /plans``); charges may name their metric by ``billable_metric_code``."""
        params = {
            "code": code,
            "name": name or code,
            "amount_cents": amount_cents,
            "amount_currency": fields.pop("amount_currency", "USD"),
            "interval": interval,
            "charges": list(charges or []),
            # (not a mapping: given to the store as it is, which refuses it as Lago does, not a bare ValueError here)
            "entitlements": dict(entitlements or {})
            if isinstance(entitlements, (Mapping, type(None)))
            else entitlements,
            **fields,
        }
        return self._call(lambda: self.store.create_plan({"plan": params}), params)["plan"]  # type: ignore[no-any-return]

    def add_customer(self, external_id: str, **fields: Any) -> JSON:
        """Create or update a customer (``POST /customers``) and return it."""
        params = {"external_id": external_id, **fields}
        return self._call(lambda: self.store.upsert_customer({"customer": params}), params)["customer"]  # type: ignore[no-any-return]

    def add_subscription(
        self, external_customer_id: str, plan_code: str, external_id: str | None = None, **fields: Any
    ) -> JSON:
        """Create a subscription (``POST /subscriptions``); ``external_id`` defaults to the customer's id."""
        params = {
            "external_customer_id": external_customer_id,
            "plan_code": plan_code,
            "external_id": external_id or external_customer_id,
            **fields,
        }
        return self._call(lambda: self.store.create_subscription({"subscription": params}), params)["subscription"]  # type: ignore[no-any-return]

    def add_invoice(self, external_customer_id: str, **fields: Any) -> JSON:
        """Store an invoice for a customer (created if needed); ``fields`` override the defaults."""
        created = self._call(lambda: self.store.add_invoice(external_customer_id, fields), external_customer_id, fields)
        return created["invoice"]  # type: ignore[no-any-return]

    def add_wallet(self, external_customer_id: str, **fields: Any) -> JSON:
        """Store a wallet of prepaid credits for a customer (created if needed) and return it as ``GET /wallets``
        lists it. ``fields`` are WalletObject fields overriding the defaults (``status`` active, ``currency`` USD,
        ``rate_amount`` 1): ``credits_balance`` (``"25.0"``) or ``balance_cents`` gives the balance (the other is
        derived), ``recurring_transaction_rules`` (a list of partial rules: ``{"trigger": "interval", "interval":
        "monthly", "paid_credits": "10.0"}``) its automatic top-ups. Subscription invoices consume it, as Lago does
        (``prepaid_credit_amount_cents``, a ``wallet_transaction.created`` webhook); the emulator never tops it up."""
        created = self._call(lambda: self.store.add_wallet(external_customer_id, fields), external_customer_id, fields)
        return created["wallet"]  # type: ignore[no-any-return]

    def add_applied_coupon(self, external_customer_id: str, coupon_code: str, **fields: Any) -> JSON:
        """Store a coupon applied to a customer (created if needed) and return it as ``GET /applied_coupons`` lists
        it. ``fields`` are AppliedCouponObject fields: ``amount_cents`` (a fixed amount, in the customer's currency)
        or ``percentage_rate`` (``"10.0"``), ``frequency`` (``once``/``recurring``/``forever``, the default),
        ``frequency_duration``, ``status``... Subscription invoices deduct it before taxes, as Lago does
        (``coupons_amount_cents``), and terminate it once used up."""
        return self._call(  # type: ignore[no-any-return]
            lambda: self.store.add_applied_coupon(external_customer_id, coupon_code, fields),
            external_customer_id,
            coupon_code,
            fields,
        )["applied_coupon"]

    def add_credit_note(self, lago_invoice_id: str, **fields: Any) -> JSON:
        """Store a credit note of an invoice (see :meth:`add_invoice`) and return it as ``GET /credit_notes`` lists it.
        ``fields`` are CreditNoteObject fields: ``credit_amount_cents`` (what it credits the customer),
        ``balance_amount_cents`` (what is left of it: all by default), ``credit_status``, ``refund_amount_cents``...
        The customer's next subscription invoices consume its available credit (``credit_notes_amount_cents``)."""
        created = self._call(lambda: self.store.add_credit_note(lago_invoice_id, fields), lago_invoice_id, fields)
        return created["credit_note"]  # type: ignore[no-any-return]

    def seed(self, data: Mapping[str, Any]) -> None:
        """Load objects shaped like Lago's create inputs, in dependency order.

        Keys: ``billable_metrics``, ``features``, ``plans``, ``customers``, ``subscriptions``, ``invoices``,
        ``wallets`` (each with its ``external_customer_id``, else as :meth:`add_wallet` takes), ``applied_coupons``
        (each with its ``external_customer_id`` and ``coupon_code``, else as :meth:`add_applied_coupon` takes); credit
        notes, which need an invoice's ``lago_id``: :meth:`add_credit_note`.

        An entry Lago would refuse raises :class:`FakeLagoError` naming it first (``"invoices[2]: Lago would refuse
        this with 422: ..."``, with Lago's ``status`` and ``body``); the entries loaded before it stay.
        """
        if not isinstance(data, Mapping):
            raise FakeLagoError("seed data must be a JSON object with keys such as 'plans' and 'customers'")
        known = (
            "billable_metrics",
            "features",
            "plans",
            "customers",
            "subscriptions",
            "invoices",
            "wallets",
            "applied_coupons",
        )
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise FakeLagoError(f"unknown seed key(s) {unknown}; allowed: {list(known)}")
        for key in known:
            items = data.get(key) or []
            if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
                raise FakeLagoError(f"seed key {key!r} must be a list of objects")
        _refuse_lone_surrogates(data)  # (checked whole, before any of it is stored)
        for key in known:
            for index, item in enumerate(data.get(key) or []):
                try:
                    self._seed_one(key, item)
                except FakeLagoError as exc:  # (which entry: a seed file's author has to find it)
                    raise FakeLagoError(f"{key}[{index}]: {exc}", status=exc.status, body=exc.body) from None

    def _seed_one(self, key: str, item: Mapping[str, Any]) -> None:
        """Load one entry of ``seed()``'s ``key``."""
        store = self.store
        params = dict(item)
        if key == "billable_metrics":
            params.setdefault("name", params.get("code"))
            params.setdefault("aggregation_type", "count_agg")
            self._call(lambda: store.create_metric({"billable_metric": params}))
        elif key == "features":
            self._call(lambda: store.create_feature({"feature": params}))
        elif key == "plans":
            params.setdefault("name", params.get("code"))
            params.setdefault("interval", "monthly")
            params.setdefault("amount_cents", 0)
            params.setdefault("amount_currency", "USD")
            self._call(lambda: store.create_plan({"plan": params}))
        elif key == "customers":
            self._call(lambda: store.upsert_customer({"customer": params}))
        elif key == "subscriptions":
            params.setdefault("external_id", params.get("external_customer_id"))
            self._call(lambda: store.create_subscription({"subscription": params}))
        elif key == "invoices":
            customer_id = params.pop("external_customer_id", None)
            if not customer_id:
                raise FakeLagoError("each seeded invoice needs an 'external_customer_id'")
            self._call(lambda: store.add_invoice(str(customer_id), params))
        elif key == "wallets":
            customer_id = params.pop("external_customer_id", None)
            if not customer_id:
                raise FakeLagoError("each seeded wallet needs an 'external_customer_id'")
            self._call(lambda: store.add_wallet(str(customer_id), params))
        else:  # applied_coupons
            customer_id = params.pop("external_customer_id", None)
            coupon_code = params.pop("coupon_code", None)
            if not customer_id or not coupon_code:
                raise FakeLagoError("each seeded applied coupon needs an 'external_customer_id' and a 'coupon_code'")
            self._call(lambda: store.add_applied_coupon(str(customer_id), str(coupon_code), params))

    @classmethod
    def from_seed_file(cls, path: str | PathLike[str], **kwargs: Any) -> FakeLago:
        """A new emulator loaded with the JSON seed file at ``path`` (see :meth:`seed`)."""
        if not fspath(path):  # (Path("") is ".": "cannot read '.': Is a directory" hid the name that was missing)
            raise FakeLagoError(
                'the emulator seed file name is empty (an unset variable in --seed "$SEED_FILE"?): give the path of '
                "a JSON seed file"
            )
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise FakeLagoError(f"cannot read the emulator seed file {str(file)!r}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise FakeLagoError(f"the emulator seed file {str(file)!r} is not valid JSON: {exc}") from None
        fake = cls(**kwargs)
        try:
            fake.seed(data)
        except FakeLagoError as exc:
            raise FakeLagoError(f"seed file {str(file)!r}: {exc}", status=exc.status, body=exc.body) from None
        return fake

    # HTTP app ----------------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        parts = header.split()
        return len(parts) >= 2 and parts[1] == self.api_key

    def _endpoint(
        self, handler: Callable[[Request, Any], JSON | Response], *, auth: bool = True
    ) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            if auth and not self._authorized(request):
                return JSONResponse(UNAUTHORIZED, status_code=401)
            body: Any = None
            if request.method in ("POST", "PUT", "PATCH"):
                raw = await request.body()
                if raw.strip() and request.url.path.startswith(API_PREFIX) and not _json_content(request):
                    # Rails reads a body as JSON only when its Content-Type says so: Lago's controller then finds no
                    # root key (params.require: 400 "param is missing"), and nothing is stored
                    body = {}
                elif raw.strip():
                    try:
                        body = json.loads(raw)
                    except (ValueError, RecursionError):  # (nested thousands deep: Lago's parser refuses it too)
                        return JSONResponse(NOT_JSON_BODY, status_code=400)
                    # (a lone surrogate comes from a \u escape, bytes that are not ASCII, or a UTF-16/32 body, which
                    # json.loads tells by its NUL bytes: an ASCII body without them, the usual event batch, is not
                    # walked)
                    if (b"\\u" in raw or b"\x00" in raw or not raw.isascii()) and _holds_lone_surrogate(body):
                        return JSONResponse(NOT_JSON_BODY, status_code=400)
            try:
                epoch = request.scope.get(_EPOCH)
                if epoch is None:  # (the emulator's own controls: no lock held while they reset or flush)
                    result = handler(request, body)
                else:
                    with self.store.lock:  # (checked and applied at once: a reset() waits for the lock)
                        if epoch != self._epoch:  # held across a reset()
                            return JSONResponse(HELD_ACROSS_RESET_BODY, status_code=503)
                        result = handler(request, body)
            except ApiError as exc:
                return JSONResponse(exc.body, status_code=exc.status)
            finally:
                self._flush_webhooks()
            if isinstance(result, Response):
                return result
            return JSONResponse(result)

        return endpoint

    def _build_app(self) -> Starlette:
        store = self.store
        e = self._endpoint

        def query(request: Request) -> dict[str, str]:
            return dict(request.query_params)

        def multi(request: Request) -> dict[str, list[str]]:
            return {k: request.query_params.getlist(k) for k in request.query_params}

        def customer_id(request: Request) -> str:
            # Rails' default segment stops at ".": /customers/acme.com looks up "acme" (format "com").
            return str(request.path_params["external_id"]).split(".", 1)[0]

        def nested_customer_id(request: Request) -> str:
            # Lago's dot fix covers /customers/:id and /subscriptions/:id only: nested routes stop at "." (404)
            value = str(request.path_params["external_id"])
            if "." in value:
                raise ApiError(404, NOT_FOUND_BODY)
            return value

        def groups(request: Request) -> dict[str, list[Any]]:
            # lago-api UsageFilters.init_from_params: group = params[:group] || params[:filter_by_group] (the first
            # given wins whole, the other is not read), as nested params (group[k]=v, group[k][]=v) or a JSON object
            # ("JSON.parse(group) if group.is_a?(String)", as lago-python-client sends filter_by_group); each value is
            # kept as Array(v): any of them matches
            for name in ("group", "filter_by_group"):
                found = _group_param(request, name)
                if found is not None:
                    return found
            return {}

        def statuses(request: Request) -> list[str]:
            # Rails permits status: [] only: a scalar ?status=terminated is dropped (so only active ones are listed)
            return request.query_params.getlist("status[]")

        def health(request: Request, body: Any) -> JSON:
            return {"version": LAGO_VERSION, "github_url": "https://github.com/getlago/lago-api", "message": "Success"}

        def ready(request: Request, body: Any) -> JSON:
            # ApplicationController#ready (lago-api.md §1 "Health"); 503 "shutting down" is not emulated
            return {"status": "ok"}

        def reset(request: Request, body: Any) -> JSON:
            self.reset()
            return {"reset": True}

        def state(request: Request, body: Any) -> Response:
            return Response(self.snapshot(), media_type="application/json")

        def events_enriched(request: Request, body: Any) -> Response:
            # EventsController before_action :ensure_organization_uses_clickhouse (lago-api.md §4, "Detecting the
            # store"): 403 without the beta header. On ClickHouse, index_enriched calls set_beta_header! and lists
            # EventsQuery's page (the filters and pagination of /events) with V1::EventEnrichedSerializer
            if self.store.event_store != "clickhouse":
                raise ApiError(403, {"status": 403, "error": "Forbidden", "code": "endpoint_not_available"})
            return JSONResponse(store.list_events(query(request), enriched=True), headers={BETA_HEADER: "beta"})

        def public_key_json(request: Request, body: Any) -> JSON:
            return {"webhook": {"public_key": _encode64(self.rsa_public_key_pem)}}

        def public_key_text(request: Request, body: Any) -> Response:
            return PlainTextResponse(_encode64(self.rsa_public_key_pem))

        routes: list[BaseRoute] = [
            Route("/health", e(health, auth=False), methods=["GET"]),
            Route("/ready", e(ready, auth=False), methods=["GET"]),
            Route("/_emulator/reset", e(reset, auth=False), methods=["POST"]),
            Route("/_emulator/state", e(state, auth=False), methods=["GET"]),
            *self.extra_routes,
        ]
        api: list[tuple[str, Callable[[Request, Any], JSON | Response], list[str]]] = [
            ("/customers", lambda r, b: store.upsert_customer(b), ["POST"]),
            ("/customers", lambda r, b: store.list_customers(query(r), multi(r)), ["GET"]),
            (
                "/customers/{external_id}/current_usage",
                lambda r, b: store.current_usage(nested_customer_id(r), query(r), groups(r)),
                ["GET"],
            ),
            (
                "/customers/{external_id}/past_usage",
                lambda r, b: store.past_usage(nested_customer_id(r), query(r)),
                ["GET"],
            ),
            (
                "/customers/{external_id}/invoices",
                lambda r, b: store.list_invoices(query(r), multi(r), nested_customer_id(r)),
                ["GET"],
            ),
            (
                "/customers/{external_id}/subscriptions",
                lambda r, b: store.list_subscriptions(query(r), statuses(r), nested_customer_id(r), multi(r)),
                ["GET"],
            ),
            (
                "/customers/{external_id}/wallets",
                lambda r, b: store.list_wallets(query(r), nested_customer_id(r)),
                ["GET"],
            ),
            (
                "/customers/{external_id}/applied_coupons",
                lambda r, b: store.list_applied_coupons(query(r), multi(r), nested_customer_id(r)),
                ["GET"],
            ),
            (
                "/customers/{external_id}/credit_notes",
                lambda r, b: store.list_credit_notes(query(r), nested_customer_id(r)),
                ["GET"],
            ),
            ("/customers/{external_id}", lambda r, b: store.get_customer(customer_id(r)), ["GET"]),
            ("/customers/{external_id}", lambda r, b: store.delete_customer(customer_id(r)), ["DELETE"]),
            ("/subscriptions", lambda r, b: store.create_subscription(b), ["POST"]),
            ("/subscriptions", lambda r, b: store.list_subscriptions(query(r), statuses(r), None, multi(r)), ["GET"]),
            (
                "/subscriptions/{external_id}/entitlements",
                lambda r, b: store.get_sub_entitlements(nested_customer_id(r), _status(r)),
                ["GET"],
            ),
            (
                "/subscriptions/{external_id}/entitlements",
                lambda r, b: store.patch_sub_entitlements(nested_customer_id(r), _status(r), b),
                ["PATCH"],
            ),
            (
                "/subscriptions/{external_id}/entitlements/{feature_code}",
                lambda r, b: store.remove_sub_entitlement(
                    nested_customer_id(r), _status(r), r.path_params["feature_code"]
                ),
                ["DELETE"],
            ),
            (
                "/subscriptions/{external_id}/entitlements/{feature_code}/privileges/{privilege_code}",
                lambda r, b: store.remove_sub_entitlement_privilege(
                    nested_customer_id(r), _status(r), r.path_params["feature_code"], r.path_params["privilege_code"]
                ),
                ["DELETE"],
            ),
            (
                "/subscriptions/{external_id}",
                lambda r, b: store.get_subscription(r.path_params["external_id"], r.query_params.get("status")),
                ["GET"],
            ),
            (
                "/subscriptions/{external_id}",
                lambda r, b: store.update_subscription(r.path_params["external_id"], r.query_params.get("status"), b),
                ["PUT"],
            ),
            (
                "/subscriptions/{external_id}",
                lambda r, b: store.terminate_subscription(r.path_params["external_id"], query(r)),
                ["DELETE"],
            ),
            ("/events/batch", lambda r, b: store.create_events(b, max_length=self.batch_max_length), ["POST"]),
            ("/events", lambda r, b: store.create_event(b), ["POST"]),
            ("/events", lambda r, b: store.list_events(query(r)), ["GET"]),
            ("/events_enriched", events_enriched, ["GET"]),
            ("/events/{transaction_id}", lambda r, b: store.get_event(r.path_params["transaction_id"]), ["GET"]),
            ("/billable_metrics", lambda r, b: store.create_metric(b), ["POST"]),
            ("/billable_metrics", lambda r, b: store.list_metrics(query(r)), ["GET"]),
            ("/billable_metrics/{code}", lambda r, b: store.get_metric(r.path_params["code"]), ["GET"]),
            ("/billable_metrics/{code}", lambda r, b: store.update_metric(r.path_params["code"], b), ["PUT"]),
            ("/billable_metrics/{code}", lambda r, b: store.delete_metric(r.path_params["code"]), ["DELETE"]),
            ("/features", lambda r, b: store.create_feature(b), ["POST"]),
            ("/features", lambda r, b: store.list_features(query(r)), ["GET"]),
            ("/features/{code}", lambda r, b: store.get_feature(r.path_params["code"]), ["GET"]),
            ("/features/{code}", lambda r, b: store.update_feature(r.path_params["code"], b), ["PUT"]),
            ("/features/{code}", lambda r, b: store.delete_feature(r.path_params["code"]), ["DELETE"]),
            (
                "/features/{code}/privileges/{privilege_code}",
                lambda r, b: store.delete_feature_privilege(r.path_params["code"], r.path_params["privilege_code"]),
                ["DELETE"],
            ),
            ("/plans", lambda r, b: store.create_plan(b), ["POST"]),
            ("/plans", lambda r, b: store.list_plans(query(r)), ["GET"]),
            ("/plans/{code}", lambda r, b: store.get_plan(r.path_params["code"]), ["GET"]),
            ("/plans/{code}", lambda r, b: store.update_plan(r.path_params["code"], b), ["PUT"]),
            ("/plans/{code}", lambda r, b: store.delete_plan(r.path_params["code"]), ["DELETE"]),
            (
                "/plans/{code}/entitlements",
                lambda r, b: store.set_plan_entitlements(r.path_params["code"], b, merge=False),
                ["POST"],
            ),
            (
                "/plans/{code}/entitlements",
                lambda r, b: store.set_plan_entitlements(r.path_params["code"], b, merge=True),
                ["PATCH"],
            ),
            ("/plans/{code}/entitlements", lambda r, b: store.get_plan_entitlements(r.path_params["code"]), ["GET"]),
            (
                "/plans/{code}/entitlements/{feature_code}",
                lambda r, b: store.get_plan_entitlement(r.path_params["code"], r.path_params["feature_code"]),
                ["GET"],
            ),
            (
                "/plans/{code}/entitlements/{feature_code}",
                lambda r, b: store.delete_plan_entitlement(r.path_params["code"], r.path_params["feature_code"]),
                ["DELETE"],
            ),
            (
                "/plans/{code}/entitlements/{feature_code}/privileges/{privilege_code}",
                lambda r, b: store.delete_plan_entitlement_privilege(
                    r.path_params["code"], r.path_params["feature_code"], r.path_params["privilege_code"]
                ),
                ["DELETE"],
            ),
            ("/invoices", lambda r, b: store.list_invoices(query(r), multi(r)), ["GET"]),
            ("/wallets", lambda r, b: store.list_wallets(query(r)), ["GET"]),
            ("/applied_coupons", lambda r, b: store.list_applied_coupons(query(r), multi(r)), ["GET"]),
            ("/credit_notes", lambda r, b: store.list_credit_notes(query(r)), ["GET"]),
            ("/invoices/{lago_id}", lambda r, b: store.get_invoice(r.path_params["lago_id"]), ["GET"]),
            ("/invoices/{lago_id}", lambda r, b: store.update_invoice(r.path_params["lago_id"], b), ["PUT"]),
            ("/webhooks/json_public_key", public_key_json, ["GET"]),
            ("/webhooks/public_key", public_key_text, ["GET"]),
        ]
        routes.extend(Route(API_PREFIX + path, e(handler), methods=methods) for path, handler, methods in api)

        async def not_found_handler(request: Request, exc: Exception) -> Response:
            if isinstance(exc, HTTPException) and exc.status_code not in (404, 405):
                return JSONResponse({"status": exc.status_code, "error": str(exc.detail)}, status_code=exc.status_code)
            return JSONResponse(NOT_FOUND_BODY, status_code=404)

        return Starlette(routes=routes, exception_handlers={404: not_found_handler, 405: not_found_handler})


#: Rails' ``Mime[:json]`` and its synonyms: the media types whose bodies it parses as JSON.
_JSON_MEDIA_TYPES = frozenset({"application/json", "text/x-json", "application/jsonrequest"})
_REPEATED_SLASHES = re.compile("/{2,}")


def _json_content(request: Request) -> bool:
    """Whether the request says its body is JSON (``Content-Type``, parameters such as a charset aside)."""
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower() in _JSON_MEDIA_TYPES


def _group_param(request: Request, name: str) -> dict[str, list[Any]] | None:
    """``name`` (``group`` or ``filter_by_group``) as Rails reads it: nested params, else a JSON object; ``None``
    when absent."""
    prefix = name + "["
    nested: dict[str, list[Any]] | None = None
    for key, value in request.query_params.multi_items():
        if key.startswith(prefix) and key.endswith("]"):
            nested = {} if nested is None else nested
            field = key[len(prefix) : -1]
            if field.endswith("]["):  # group[k][]=v: one of several values
                nested.setdefault(field[:-2], []).append(value)
            else:  # group[k]=v: Rack keeps the last one
                nested[field] = [value]
    if nested is not None:
        return nested
    raw = request.query_params.get(name)
    return None if raw is None else _json_group(raw, name)


def _json_group(raw: str, name: str = "filter_by_group") -> dict[str, list[Any]]:
    """``group``/``filter_by_group`` given as a JSON object (``{"user_id": "u1"}`` or ``{"user_id": ["u1", "u2"]}``).

    Each value becomes Ruby's ``Array(v)``: a list stays, ``null`` is ``[]`` (matches nothing), anything else is
    one value. Anything but an object makes lago-api raise (``JSON::ParserError``, or ``transform_values`` on a
    non-Hash): a 500 there, answered here in Lago's 500 envelope with what to send instead."""
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict):
        message = f'{name} must be a JSON object such as {{"user_id": "u1"}} (or {name}[user_id]=u1), got {raw!r}'
        raise ApiError(500, {"status": 500, "errors": [{"message": message}], "data": {}})
    return {
        str(key): list(value) if isinstance(value, list) else [] if value is None else [value]
        for key, value in parsed.items()
    }


def _status(request: Request) -> str | None:
    return request.query_params.get("status") or request.query_params.get("subscription_status")


def _holds_lone_surrogate(value: Any) -> bool:
    """Whether ``value`` (parsed JSON, or what a Python helper was given) holds a lone surrogate in a string or a key.

    ``json.loads`` keeps a lone ``\\ud800`` escape (or raw UTF-8-encoded surrogate bytes) as a lone surrogate, which
    nothing can encode later (the response, a webhook body, a read). An escaped pair is one character, never
    matched. Walked without recursion (parsed JSON may be nested deeper than Python's recursion limit), each
    container once (a helper's input may hold itself)."""
    pending = [value]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return True
        elif isinstance(item, (Mapping, list, tuple)) and id(item) not in seen:  # (all alive: ids not reused)
            seen.add(id(item))
            if isinstance(item, Mapping):
                pending.extend(item.keys())
                pending.extend(item.values())
            else:
                pending.extend(item)
    return False


def _refuse_lone_surrogates(*values: Any) -> None:
    """Raise the :class:`FakeLagoError` the API's 400 would give when a Python helper's input holds a lone
    surrogate (what :func:`_holds_lone_surrogate` finds): stored, it would break every later serialization."""
    if any(_holds_lone_surrogate(value) for value in values):
        raise FakeLagoError(
            f"Lago would refuse this with 400: {json.dumps(NOT_JSON_BODY)} (a string holds a lone surrogate, "
            "which is not Unicode)",
            status=400,
            body=NOT_JSON_BODY,
        )
