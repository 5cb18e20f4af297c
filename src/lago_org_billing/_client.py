"""The async Lago REST client: pooled ``httpx.AsyncClient``s, retries, Lago's error envelope.

A pool's connections belong to the event loop they were made on: the client keeps a pool for each loop that calls it
(``asyncio.run`` per job in a CLI or a Celery task, threads with loops of their own), made on the loop's first call.

A process forked from one holding a client (``os.fork()``, ``multiprocessing``'s ``fork``, ``gunicorn --preload``)
never uses the client's own pool it inherited: its connections are the parent's, on the parent's event loop. The
child's first call makes a pool of its own; the parent's is left as it is, never used nor closed (closing it from
the child would unregister its sockets from the event loop the child shares with its parent). A transport passed in
is the caller's: kept as it is.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import datetime
import decimal
import email.utils
import enum
import functools
import json
import logging
import math
import numbers
import os
import random
import ssl
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import httpx
from cachetools import TTLCache

from . import _checks as checks, _forks
from ._errors import (
    ClosedError,
    ConfigurationError,
    InvalidRequestError,
    LagoAPIError,
    LagoAuthenticationError,
    LagoIntegrationError,
    LagoNotFoundError,
    LagoRateLimitError,
    LagoUnavailableError,
    LagoValidationError,
    _without_tracebacks,
    no_such_route,
)
from ._events import MAX_BATCH_SIZE, normalize_event
from ._http1 import RawConnectError, RawHTTPError, RawPoster, can_use_raw_poster
from ._ids import ascii_digits, path_segment, validate_id
from ._settings import BillingSettings, redact_url
from ._version import __version__

__all__ = ["LagoClient", "Page"]

logger = logging.getLogger("lago_org_billing.client")

JSON = dict[str, Any]
_MAX_BACKOFF = 10.0


@dataclasses.dataclass(frozen=True)
class Page:
    """One page of a Lago list, with Lago's pagination ``meta``."""

    items: list[JSON]
    current_page: int
    next_page: int | None
    prev_page: int | None
    total_pages: int
    total_count: int

    @classmethod
    def from_body(cls, body: Mapping[str, Any], key: str) -> Page:
        """The page of ``body[key]`` (``null``: none). Page numbers and counts are taken as Lago may write them (``2``,
        ``"2"``, ``2.0``); ``meta`` missing or not an object is no pagination (one page). ``body[key]`` not a list is
        a :class:`LagoAPIError` naming it and what Lago sent."""
        raw = body.get("meta")
        meta: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        return cls(
            items=_list_of(body, key),
            current_page=_page_number(meta.get("current_page")) or 0,
            next_page=_page_number(meta.get("next_page")),
            prev_page=_page_number(meta.get("prev_page")),
            total_pages=_page_number(meta.get("total_pages")) or 0,
            total_count=_page_number(meta.get("total_count")) or 0,
        )


def _page_number(value: Any) -> Any:
    """A page number or count of Lago's pagination ``meta`` as an ``int`` when it is a whole number written as one
    (``2``, ``"2"``, ``2.0``); ``None`` as ``None``; anything else as it came (the listing then says it, rather than
    follow it)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and ascii_digits(value.strip()):
        return int(value.strip())
    return value


class _State(enum.Enum):
    OPEN = 1
    CLOSED = 2


class _NoLoop:
    """The key of the pool called through outside asyncio and trio (anyio runs on no other: never, in practice)."""


_NO_LOOP = _NoLoop()


def _running_loop() -> object:
    """The running event loop, as the key of its pool: asyncio's loop, or under trio the run's token (a trio run
    that has ended is known only once its token is collected: its pool is dropped then)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: trio (hypercorn -k trio), which is imported then
        trio = sys.modules.get("trio")
        if trio is not None:
            try:
                return trio.lowlevel.current_trio_token()
            except RuntimeError:  # pragma: no cover - anyio runs on asyncio or trio
                pass
    return _NO_LOOP


def _ended(loop: object) -> bool:
    """Whether ``loop`` (a key of :func:`_running_loop`) has ended: an asyncio loop closed (``asyncio.run`` closes
    its loop as it returns)."""
    is_closed = getattr(loop, "is_closed", None)
    return bool(is_closed is not None and is_closed())


class LagoClient:
    """Async client for the parts of Lago's REST API that per-org billing needs.

    ::

        async with LagoClient(BillingSettings.from_env()) as lago:
            customer = await lago.get_customer("org_123")

    **Parameters:**

    * **settings** - *(optional)* :class:`BillingSettings`; read from the environment when omitted.
    * **transport** - *(optional)* an ``httpx.AsyncBaseTransport``, e.g. ``FakeLago().transport()`` in tests.
    * **limits** - *(optional)* ``httpx.Limits`` of the connection pool.

    Calls are retried on network errors, 5xx and 429 with exponential backoff and full jitter, within
    ``settings.retry_deadline`` seconds in total; a 429 waits as ``X-RateLimit-Reset``/``Retry-After`` say.
    4xx other than 429 are never retried. Writes a resend could apply twice once Lago applied them behind a lost
    answer (a DELETE, a subscription with ``plan_overrides``) are resent only when nothing reached Lago: a 429, or a
    connection never made (refused, DNS, connect timeout). Creates keyed by a unique ``code`` (plans, billable
    metrics, features) are resent, and a resend's ``value_already_exist`` read back as the object made.
    """

    def __init__(
        self,
        settings: BillingSettings | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: httpx.Limits | None = None,
    ) -> None:
        if settings is not None and not isinstance(settings, BillingSettings):
            raise ConfigurationError(
                f"LagoClient(settings) must be a BillingSettings (BillingSettings.from_env(), or "
                f"BillingSettings(api_key=...)), got {type(settings).__name__}."
            )
        if transport is not None:  # (the class: its methods called unbound at the first call, a TypeError)
            checks.built("LagoClient(transport=...)", transport, what="an httpx.AsyncBaseTransport")
        if transport is not None and not callable(getattr(transport, "handle_async_request", None)):
            raise ConfigurationError(
                f"LagoClient(transport=...) must be an httpx.AsyncBaseTransport (e.g. FakeLago().transport()), got "
                f"{type(transport).__name__}."
            )
        if limits is not None and not isinstance(limits, httpx.Limits):
            raise ConfigurationError(
                f"LagoClient(limits=...) must be an httpx.Limits, such as httpx.Limits(max_connections=100), got "
                f"{type(limits).__name__}."
            )
        self.settings = settings if settings is not None else BillingSettings.from_env()
        self.settings.require_api_key()
        # No local of this frame holds the key (a traceback of an error raised here, its locals shown by Sentry or
        # ``rich``, would show it): the headers are made where they are handed over, and kept out of any repr.
        base_url = self.settings.api_url
        if _has_userinfo(base_url):
            logger.warning(
                "LAGO_API_URL (%s) carries a user:password@ part, which is not sent: Lago authenticates every call "
                "with LAGO_API_KEY (Authorization: Bearer). Remove it from the URL.",
                redact_url(base_url),
            )
            # not sent, and not kept either: httpx logs each request's URL (INFO) and shows it in its errors' repr
            base_url = _without_userinfo(base_url)
        verify = _verification(base_url)
        # The event batch POST is the hot call: without an injected transport or a proxy it skips httpx.
        self._raw: RawPoster | None = None
        limits = limits or httpx.Limits(max_connections=50, max_keepalive_connections=20)
        if transport is None and can_use_raw_poster(base_url):
            # It keeps as many connections alive as the pool of the other calls (it kept 8: a pipeline sending 10
            # batches at once, Lago's own throughput recipe, opened a new connection, TLS handshake and all, for
            # about one batch in eight, and two in five at 16).
            keepalive = limits.max_keepalive_connections
            self._raw = RawPoster(
                base_url,
                _Headers.of(self.settings),
                timeout=self.settings.api_timeout,
                max_idle=keepalive if keepalive is not None else sys.maxsize,
            )
        self._own_pool = transport is None
        self._new_http = functools.partial(
            httpx.AsyncClient,
            verify=verify,
            base_url=base_url,
            headers=_Headers.of(self.settings),
            timeout=httpx.Timeout(self.settings.api_timeout),
            limits=limits,
            transport=transport,
            # no auth of httpx's own: it turns a user:password@ of the URL into Basic auth, replacing the API key
            auth=_KEY_ONLY,
        )
        # An injected transport's pool: the only one (the transport is the caller's, as is the event loop it serves).
        # This client's own: the first event loop to call takes ``_http`` (made here, so that a proxy variable httpx
        # cannot read is said as the client is made); every other loop gets a pool of its own in ``_pools``.
        self._http: httpx.AsyncClient | None = self._make_http()
        self._shared = None if self._own_pool else self._http
        self._pools: dict[int, tuple[weakref.ref[object], httpx.AsyncClient]] = {}  # id(loop) -> (loop, its pool)
        self._pools_lock = threading.Lock()  # (threads, each with a loop of its own, share the client)
        if self._own_pool:
            _forks.track(self)
        self._state = _State.OPEN
        self._entered = 0  # ``async with`` blocks open on this client: the outermost one's end closes it
        self._say = _Throttled(logger)  # retries: said at WARNING once a minute (an outage fails every call)
        # (external_subscription_id, transaction_id) of an event sent without a timestamp -> the timestamp it was sent
        # with: the caller's resend (after a LagoUnavailableError whose first attempt Lago had ingested) is then the
        # same event, not one more (Lago's ClickHouse store deduplicates on transaction_id *and* timestamp). Threads
        # share the client, and the cache is not thread-safe.
        self._first_timestamps: TTLCache[tuple[str, str], str] = TTLCache(maxsize=100_000, ttl=86_400)
        self._first_timestamps_lock = threading.Lock()

    async def __aenter__(self) -> LagoClient:
        if self._state is _State.CLOSED:
            raise ClosedError("Cannot reopen a LagoClient once it has been closed; create a new one.")
        self._entered += 1
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        # a block entered inside another (a helper given the app's client, written as the README shows) leaves the
        # client open to the outer one
        self._entered -= 1
        if self._entered <= 0:
            await self.aclose()

    async def close_idle_connections(self, *, pool: bool = False) -> None:
        """Close the idle keep-alive connections of the events' poster: they belong to the running event loop (one
        ending, e.g. background delivery started without a lifespan, leaves none for the next loop to trip on).
        ``pool=True`` closes the running loop's httpx pool too (this client's own, not an injected transport; the
        loop's next call makes a new one): only when nothing else uses it, as the loop ends."""
        if self._raw is not None:
            await self._raw.aclose()
        if pool and self._own_pool and self._state is not _State.CLOSED:
            loop = _running_loop()
            with self._pools_lock:
                entry = self._pools.pop(id(loop), None)
            if entry is not None and entry[0]() is loop:  # (else an ended loop's, whose id this one took: dropped)
                await entry[1].aclose()

    def _forked(self) -> None:
        """In a forked child: every pool is the parent's, left as it is (a pool of its own is made on its first call:
        none in a child that never calls Lago)."""
        _forks.left_by_parent.append((self._http, self._pools))
        self._http, self._pools = None, {}
        self._pools_lock = threading.Lock()  # (one a parent's thread held at the fork stays held in the child)
        self._first_timestamps_lock = threading.Lock()

    async def aclose(self) -> None:
        """Close the connection pool (the running event loop's: the pools of other loops, ended ones or other
        threads', are dropped, their connections left to the garbage collector, as they cannot be closed from this
        loop)."""
        self._state = _State.CLOSED
        if self._raw is not None:
            await self._raw.aclose()
        if self._shared is not None:
            await self._shared.aclose()
            return
        loop = _running_loop()
        with self._pools_lock:
            pools, self._pools = self._pools, {}
            unused, self._http = self._http, None
        for reference, pool in pools.values():
            if reference() is loop:
                await pool.aclose()
        if unused is not None:  # (no loop called: no connection)
            await unused.aclose()

    def _pool(self) -> httpx.AsyncClient:
        """The httpx client to call through: the injected transport's; else the running event loop's pool (an httpx
        pool's connections belong to the loop they were made on: another loop reusing one fails with "Event loop is
        closed" or "bound to a different event loop", or hangs)."""
        if self._shared is not None:
            return self._shared
        loop = _running_loop()
        entry = self._pools.get(id(loop))
        if entry is not None and entry[0]() is loop:
            return entry[1]
        return self._new_pool(loop)

    def _new_pool(self, loop: object) -> httpx.AsyncClient:
        """The pool of ``loop``, a loop that has none yet. The pools of loops that have ended are dropped, not closed:
        closing them needs their own loop (an asyncio transport closed on another schedules on its closed loop and
        raises). Their sockets are closed by the garbage collector."""
        with self._pools_lock:
            if self._state is _State.CLOSED:  # (closed by another thread meanwhile)
                raise ClosedError("This LagoClient is closed; create a new one.")
            for key, (reference, _) in list(self._pools.items()):
                other = reference()
                if other is None or _ended(other):
                    del self._pools[key]
            pool = self._http
            if pool is None:
                # in a forked child (the parent's pools are left as they are: an answer read on one of their
                # connections is the answer to the other process's request) or on a second loop: should this fail (an
                # https pool reads its CA bundle, which a process out of file descriptors cannot open), the next call
                # tries again
                try:
                    pool = self._make_http()
                except OSError as exc:  # (ssl.SSLError too): a connection never made, retried as one
                    raise httpx.ConnectError(f"no connection pool could be made ({type(exc).__name__}: {exc})") from exc
            self._http = None
            self._pools[id(loop)] = (weakref.ref(loop), pool)
        return pool

    def _make_http(self) -> httpx.AsyncClient:
        """A new httpx pool. A proxy variable httpx cannot read (it reads them as each pool is made) is a
        :class:`ConfigurationError` that says which, its password masked, raised outside the handler of httpx's
        error: the frames of that error held the proxy's URL and this client's headers."""
        try:
            return self._new_http()
        except (ValueError, httpx.InvalidURL) as exc:
            if not _proxy_variables():
                raise
            problem = f"{type(exc).__name__}: {exc}"
        raise _proxy_error(problem)

    @property
    def is_closed(self) -> bool:
        return self._state is _State.CLOSED

    # ------------------------------------------------------------------ health

    async def health(self, *, retry: bool = True) -> JSON:
        """``GET /health`` (outside ``/api/v1``): Lago's version and status. Raises when Lago is unhealthy.
        ``retry=False``: one attempt (a probe reports Lago as it is now)."""
        try:
            return dict(await self._request("GET", "/health", api=False, retry=retry))
        except LagoNotFoundError as exc:  # Lago always serves /health: its 404 of an unknown route, not a missing id
            raise exc._restated(
                LagoAPIError,
                f"Lago answered GET /health with 404 ({exc.code}): {redact_url(self.settings.api_url + '/health')} is "
                "not Lago's health check, so LAGO_API_URL is not Lago's base URL (a path Lago is not served under?).",
            ) from None

    # --------------------------------------------------------------- customers

    async def upsert_customer(self, customer: Mapping[str, Any]) -> JSON:
        """``POST /customers``: create or update the customer with ``customer["external_id"]``.

        Only the keys present are written. Beware: when ``metadata`` is present, Lago deletes every existing
        item missing from it (``OrgBilling.update_org_customer`` merges for you).
        """
        _mapping(customer, "customer", "{'external_id': 'org_1', 'name': 'Acme'}")
        path_segment(customer.get("external_id"), "customer external_id")
        external_id = str(customer["external_id"])
        lost: list[LagoAPIError] = []
        try:
            body = await self._request("POST", "/customers", json={"customer": dict(customer)}, lost=lost)
        except LagoValidationError as exc:
            # Resent after a lost answer: the first attempt's new metadata keys exist now, and Lago refuses them
            # (``{"key": ["value_already_exist"]}``). The customer read back is the answer when it is as asked.
            if not (lost and _only_existing_keys(exc.details)):
                raise
            try:
                found = await self.get_customer(external_id)
            except LagoIntegrationError as read:
                raise exc._restated(
                    LagoValidationError,
                    f"{exc.args[0]} This call's first attempt may have written customer {external_id!r} (its answer "
                    f"was lost), but it could not be read back ({type(read).__name__}: {read}): read it (GET "
                    f"/api/v1/customers/{external_id}) before writing it again.",
                ) from None
            differences = _differences(dict(customer), found)
            if differences:
                raise exc._restated(
                    LagoValidationError,
                    f"{exc.args[0]} This call's first attempt may have written customer {external_id!r} (its answer "
                    f"was lost), but Lago has other values than asked ({'; '.join(differences[:5])}): read it "
                    "before writing it again.",
                ) from None
            logger.info("Lago had written customer %r although its answer was lost; answered as written", external_id)
            return found
        return _unwrap(body, "customer")

    async def get_customer(self, external_id: str) -> JSON:
        """``GET /customers/{external_id}``. Raises :class:`LagoNotFoundError` when absent."""
        body = await self._request("GET", f"/customers/{path_segment(external_id, 'customer external_id')}")
        return _unwrap(body, "customer")

    async def update_customer(self, external_id: str, **fields: Any) -> JSON:
        """Update some fields of an existing customer (an upsert keyed by ``external_id``)."""
        return await self.upsert_customer({**fields, "external_id": external_id})

    async def list_customers(self, *, page: int = 1, per_page: int = 100, retry: bool = True, **filters: Any) -> Page:
        """``GET /customers`` (one page). ``filters`` are Lago's query parameters (``search_term``...); ``retry=False``:
        one attempt."""
        params = _params(filters, **_page_arguments(page, per_page))
        return Page.from_body(await self._request("GET", "/customers", params=params, retry=retry), "customers")

    def iter_customers(self, *, per_page: int = 100, **filters: Any) -> AsyncIterator[JSON]:
        """Every customer, page after page."""
        return self._iterate("/customers", "customers", _params(filters), _page_size(per_page))

    async def delete_customer(self, external_id: str) -> JSON:
        """``DELETE /customers/{external_id}`` (a soft delete; Lago terminates its subscriptions)."""
        path = f"/customers/{path_segment(external_id, 'customer external_id')}"
        return _unwrap(await self._request("DELETE", path), "customer")

    # ----------------------------------------------------------- subscriptions

    async def create_subscription(
        self,
        *,
        external_customer_id: str,
        plan_code: str,
        external_id: str,
        name: str | None = None,
        billing_time: str | None = None,
        subscription_at: str | None = None,
        ending_at: str | None = None,
        plan_overrides: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> JSON:
        """``POST /subscriptions``: create, or change the plan of, the subscription ``external_id``.

        Lago treats ``external_id`` as an idempotency key: the same plan returns the existing subscription; a
        more expensive plan upgrades at once; a cheaper one downgrades at the end of the period (the response
        is then the current subscription with ``next_plan_code``). An unknown customer is created by Lago.
        """
        path_segment(external_customer_id, "external_customer_id")
        path_segment(external_id, "subscription external_id")
        if billing_time is not None:
            check_billing_time(billing_time)
        subscription: JSON = {
            "external_customer_id": external_customer_id,
            "plan_code": plan_code,
            "external_id": external_id,
            **extra,
        }
        for key, value in (
            ("name", name),
            ("billing_time", billing_time),
            ("subscription_at", subscription_at),
            ("ending_at", ending_at),
            ("plan_overrides", plan_overrides),
        ):
            if value is not None:
                subscription[key] = value
        # Not resent with plan_overrides once sent: Lago compares the plan with the current subscription's, which is
        # then the override's own plan, so a resend after a lost answer would be an "upgrade" replacing what was just
        # made (resent after a 429 or a connection never made: nothing reached Lago).
        body = await self._request(
            "POST", "/subscriptions", json={"subscription": subscription}, retry=plan_overrides is None
        )
        return _unwrap(body, "subscription")

    async def get_subscription(self, external_id: str, *, status: str | None = None) -> JSON:
        """``GET /subscriptions/{external_id}`` (Lago's default ``status`` is ``active``)."""
        path = _subscription_path(external_id)
        wanted = _status(status, "status", _SUBSCRIPTION_STATUSES, _LOOKED_UP)
        params = {"status": wanted} if wanted else None
        return _unwrap(await self._request("GET", path, params=params), "subscription")

    async def get_current_subscription(self, external_id: str) -> JSON | None:
        """The subscription ``external_id`` that is active, else the one that has not started yet (``pending``);
        ``None`` when neither exists. Lago's catch-all 404 (``resource_not_found``: LAGO_API_URL is not where Lago is
        served) is raised: it says nothing of the subscription."""
        for status in (None, "pending"):
            try:
                return await self.get_subscription(external_id, status=status)
            except LagoNotFoundError as exc:
                if no_such_route(exc):
                    raise
        return None

    async def update_subscription(self, external_id: str, *, status: str | None = None, **fields: Any) -> JSON:
        """``PUT /subscriptions/{external_id}``: name, ending_at... (not the plan: see create_subscription). ``status``
        (``active``, ``pending`` or ``incomplete``) picks one of several subscriptions under the id.

        Only the fields given are sent. Lago's OpenAPI spec lists ``ending_at`` as required here (the server does
        not require it); ``ending_at=None`` states "renews automatically" explicitly."""
        path = _subscription_path(external_id)
        wanted = _status(
            status,
            "status",
            ("active", "pending", "incomplete"),
            "with several subscriptions under one external_id, Lago updates the active one for any other status",
        )
        if not fields:  # (Lago answers a bare 400 "param is missing or the value is empty: subscription")
            raise InvalidRequestError(
                "update_subscription() needs at least one field to change (name=..., ending_at=..., "
                "subscription_at=..., plan_overrides=...): nothing was sent."
            )
        params = {"status": wanted} if wanted else None
        body = await self._request("PUT", path, params=params, json={"subscription": fields})
        return _unwrap(body, "subscription")

    async def list_subscriptions(
        self,
        *,
        external_customer_id: str | None = None,
        plan_code: str | None = None,
        statuses: Sequence[str] | None = None,
        page: int = 1,
        per_page: int = 100,
    ) -> Page:
        """``GET /subscriptions``. Lago returns only ``active`` ones unless ``statuses`` says otherwise (``active``,
        ``pending``, ``terminated``, ``canceled``, ``incomplete``)."""
        paging = _page_arguments(page, per_page)
        params = _subscription_filters(external_customer_id, plan_code, statuses)
        params += [("page", str(paging["page"])), ("per_page", str(paging["per_page"]))]
        return Page.from_body(await self._request("GET", "/subscriptions", params=params), "subscriptions")

    def iter_subscriptions(
        self,
        *,
        external_customer_id: str | None = None,
        plan_code: str | None = None,
        statuses: Sequence[str] | None = None,
        per_page: int = 100,
    ) -> AsyncIterator[JSON]:
        """Every matching subscription, page after page."""
        size = _page_size(per_page)
        params = _subscription_filters(external_customer_id, plan_code, statuses)
        return self._iterate("/subscriptions", "subscriptions", params, size)

    async def terminate_subscription(
        self,
        external_id: str,
        *,
        status: str | None = None,
        on_termination_invoice: str | None = None,
        on_termination_credit_note: str | None = None,
    ) -> JSON:
        """``DELETE /subscriptions/{external_id}``: terminate the active one (``status="pending"`` cancels a
        pending one). ``on_termination_invoice`` is ``generate``/``skip``; ``on_termination_credit_note`` is
        ``credit``/``refund``/``offset``/``skip`` (pay-in-advance plans only)."""
        if on_termination_invoice not in (None, "generate", "skip"):
            raise InvalidRequestError("on_termination_invoice must be 'generate' or 'skip'.")
        if on_termination_credit_note not in (None, "credit", "refund", "offset", "skip"):
            raise InvalidRequestError("on_termination_credit_note must be 'credit', 'refund', 'offset' or 'skip'.")
        # Lago cancels the pending subscription for status "pending" only: for any other it terminates the active one
        wanted = _status(
            status,
            "status",
            ("active", "pending"),
            "Lago terminates the active subscription for any status but 'pending' (which cancels the pending one)",
        )
        path = _subscription_path(external_id)
        params = {
            key: value
            for key, value in (
                ("status", wanted),
                ("on_termination_invoice", on_termination_invoice),
                ("on_termination_credit_note", on_termination_credit_note),
            )
            if value is not None
        }
        return _unwrap(await self._request("DELETE", path, params=params or None), "subscription")

    async def get_subscription_entitlements(self, external_id: str, *, status: str | None = None) -> list[JSON]:
        """``GET /subscriptions/{external_id}/entitlements``: plan values with this subscription's overrides (of the
        active subscription, or the one with ``status``, e.g. ``pending``)."""
        path = f"{_subscription_path(external_id)}/entitlements"
        return _list_of(await self._request("GET", path, params=_subscription_status(status)), "entitlements")

    async def update_subscription_entitlements(
        self, external_id: str, entitlements: Mapping[str, Mapping[str, Any]], *, status: str | None = None
    ) -> list[JSON]:
        """``PATCH /subscriptions/{external_id}/entitlements``: per-subscription overrides (partial: the others are
        kept), ``{"feature_code": {"privilege_code": value}}``; of the active subscription, or the one with
        ``status``."""
        payload = _entitlements(entitlements)
        path = f"{_subscription_path(external_id)}/entitlements"
        body = await self._request("PATCH", path, params=_subscription_status(status), json={"entitlements": payload})
        return _list_of(body, "entitlements")

    async def remove_subscription_entitlement(
        self, external_id: str, feature_code: str, privilege_code: str | None = None, *, status: str | None = None
    ) -> JSON:
        """``DELETE /subscriptions/{external_id}/entitlements/{feature_code}`` (or ``.../privileges/{privilege_code}``):
        a feature of the plan (or one of its privileges) taken away from this subscription only."""
        path = f"{_subscription_path(external_id)}/entitlements/{path_segment(feature_code, 'feature code')}"
        if privilege_code is not None:
            path += f"/privileges/{path_segment(privilege_code, 'privilege code')}"
        return dict(await self._request("DELETE", path, params=_subscription_status(status)))

    async def list_features(self, *, page: int = 1, per_page: int = 100) -> Page:
        """``GET /features`` (one page): the features plans and subscriptions can be entitled to."""
        params = _params({}, **_page_arguments(page, per_page))
        return Page.from_body(await self._request("GET", "/features", params=params), "features")

    # ------------------------------------------------------------------ events

    async def create_event(self, event: Mapping[str, Any]) -> JSON:
        """``POST /events``. ``event`` needs ``transaction_id``, ``external_subscription_id`` and ``code``;
        a missing ``timestamp`` is fixed to now, as a millisecond string, before sending. A ``timestamp`` given is sent
        as given.

        An event sent again without a timestamp (same ``external_subscription_id`` and ``transaction_id``, within a
        day, through this client) is sent with the timestamp of its first sending: a resend after a
        :class:`LagoUnavailableError` whose first attempt Lago had ingested is then the same event, not one more (Lago's
        ClickHouse store deduplicates on ``transaction_id`` *and* ``timestamp``: a new "now" would bill it twice).

        An event this call's first attempt got into Lago, its answer lost (a 502, a timeout), is sent again as it was;
        Lago's answer that it has it then is this call's success: the event as sent, with ``"duplicate": True``.
        An event Lago had before this call raises :class:`LagoValidationError` (``is_duplicate_only``)."""
        payload = normalize_event(event)
        self._keep_first_timestamps([(event, payload)])
        lost: list[LagoAPIError] = []
        try:
            body = await self._request("POST", "/events", json={"event": payload}, lost=lost)
        except LagoValidationError as exc:
            if not (lost and exc.is_duplicate_only):
                raise
            _say_ingested_behind_lost_answer(1)
            return {**payload, "duplicate": True}
        answered: Any = body.get("event")
        # a 2xx is Lago taking the event: one answered without it (an older Lago's empty 200, a gateway's 202/204) is
        # the event as sent, not an error a caller would resend (with a new timestamp: billed twice on ClickHouse)
        return answered if isinstance(answered, dict) else dict(payload)

    async def create_events(self, events: Sequence[Mapping[str, Any]]) -> list[JSON]:
        """``POST /events/batch`` with 1 to 100 events. Lago is atomic: one invalid event rejects the batch
        with a :class:`LagoValidationError` whose ``details`` are keyed by index (see ``failed_indexes()``).

        A batch this call's first attempt got into Lago, its answer lost, is sent again as it was; Lago's answer that
        it has every event then is this call's success: the events as sent, each with ``"duplicate": True``.

        Timestamps are as for :meth:`create_event`: a missing one is now, or, for an event sent before without one
        (a caller's resend of the batch after a :class:`LagoUnavailableError`), the timestamp of its first sending; a
        ``timestamp`` given is sent as given."""
        if not events:
            raise InvalidRequestError("create_events needs at least one event.")
        if len(events) > MAX_BATCH_SIZE:
            raise InvalidRequestError(
                f"Lago takes at most {MAX_BATCH_SIZE} events per batch, got {len(events)}: split the list."
            )
        payload = [normalize_event(event) for event in events]
        self._keep_first_timestamps(zip(events, payload, strict=True))
        lost: list[LagoAPIError] = []
        try:
            body = await self._request("POST", "/events/batch", json={"events": payload}, lost=lost)
        except LagoValidationError as exc:
            duplicates = exc.failed_indexes()
            if exc.is_duplicate_only and lost and len(duplicates) >= len(payload):
                # every event in Lago, on a resend after a lost answer: this call's first attempt ingested the batch
                _say_ingested_behind_lost_answer(len(payload))
                return [{**item, "duplicate": True} for item in payload]
            if not exc.is_duplicate_only or len(duplicates) >= len(payload):
                raise
            # Some events are in Lago already (a resend): the batch is atomic, so the others were refused with them.
            others = [index for index in range(len(payload)) if index not in duplicates]
            raise exc._restated(
                _PartlyDuplicateBatch,
                f"Lago answered POST /api/v1/events/batch with 422: the events at indexes {sorted(duplicates)} are "
                f"already in Lago, and its batches are atomic, so the others {others} were not ingested: send those "
                "again, without the ones already in Lago (failed_indexes()).",
            ) from None
        echoed = body.get("events")
        # (a 2xx without the events echoed, an older Lago's empty 200: the events as sent, taken)
        return echoed if isinstance(echoed, list) else [dict(item) for item in payload]

    def _keep_first_timestamps(self, sent: Iterable[tuple[Mapping[str, Any], dict[str, Any]]]) -> None:
        """Each payload of an event without a timestamp: stamped with the timestamp of that event's first sending
        (remembered for a day), else remembered with the one it has (now)."""
        for event, payload in sent:
            if event.get("timestamp") is None:
                sub, tx = payload["external_subscription_id"], payload["transaction_id"]
                payload["timestamp"] = self._first_timestamp(sub, tx, payload["timestamp"])

    def _first_timestamp(self, subscription_id: str, transaction_id: str, timestamp: str | None) -> str | None:
        """The timestamp the event ``(subscription_id, transaction_id)`` was first sent with through this client (or
        queued, by ``OrgBilling``), remembered a day; ``timestamp`` when there is none yet, remembered as that one
        (``None``: only looked up). Threads share the client: under a lock."""
        key = (subscription_id, transaction_id)
        with self._first_timestamps_lock:
            first = self._first_timestamps.get(key)
            if first is None and timestamp is not None:
                self._first_timestamps[key] = timestamp
        return timestamp if first is None else first

    async def send_event_batch_json(self, body: bytes) -> None:
        """``POST /events/batch`` with a ready JSON body (``{"events": [...]}``), once, without retries.

        For senders that keep events as serialized text and run their own retry policy (the delivery pipeline):
        every attempt sends the same bytes. Errors are raised as by every other call.
        """
        if self._state is _State.CLOSED:
            raise ClosedError("This LagoClient is closed; create a new one.")
        url = "/api/v1/events/batch"
        timeout = self.settings.api_timeout
        if self._raw is not None:
            try:
                status, headers, content = await self._raw.post(url, body)
            except RawHTTPError as exc:
                raise LagoUnavailableError(
                    f"Lago did not answer POST {url} ({exc}).", method="POST", path=url
                ) from _without_tracebacks(exc)
            if 200 <= status < 300 and not any(name.lower() == "content-encoding" for name, _ in headers):
                self._check_batch_answer(status, content, url)
                return
            # As bytes (as read): httpx encodes str headers as ASCII, and a load balancer's header may not be. httpx
            # decodes a compressed body (a server may compress an answer to a request that did not ask it to).
            raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
            try:
                response = httpx.Response(status, headers=raw, content=content)
            except httpx.DecodingError as exc:
                raise _undecodable(status, url, exc) from exc
            if not 200 <= status < 300:
                raise _error_from_response(response, "POST", url)
            self._check_batch_answer(status, response.content, url)
            return
        try:
            with anyio.fail_after(timeout):  # (whole: httpx's timeout is per read)
                response = await self._pool().post(url, content=body, headers={"Content-Type": "application/json"})
        except httpx.DecodingError as exc:
            raise _undecodable(None, url, exc) from _without_tracebacks(exc)
        except (httpx.RequestError, TimeoutError) as exc:
            what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
                what += f", no answer within {timeout:.3g} s: LAGO_API_TIMEOUT"
            raise LagoUnavailableError(
                f"Lago did not answer POST {url} ({what}).", method="POST", path=url
            ) from _without_tracebacks(exc)
        if not 200 <= response.status_code < 300:  # a redirect is not delivery: nothing reached Lago
            raise _error_from_response(response, "POST", url)
        self._check_batch_answer(response.status_code, response.content, url)

    def _check_batch_answer(self, status: int, content: bytes, url: str) -> None:
        """A 2xx is Lago ingesting the batch only if its body is Lago's JSON (``{"events": [...]}``; an empty body is
        taken too). A page (an ``index.html`` a CDN serves for unknown paths, a captive portal, Lago's front end
        at LAGO_API_URL) ingested nothing: taken for delivery, the events would be deleted and lost.

        The body is sniffed, not parsed: Lago echoes every event of the batch, and parsing that (about 150 µs for
        100 events) on every batch would give back much of what the raw poster saves; a page or a plain text
        answer neither starts with ``{`` nor ends with ``}``."""
        text = content.strip()
        if text and (text[:1] != b"{" or text[-1:] != b"}"):
            raise LagoAPIError(
                f"POST {url} was answered {status} with a body that is not Lago's JSON ({text[:60]!r}): that is not "
                f"Lago's API. Check LAGO_API_URL ({redact_url(self.settings.api_url)}): it must be the URL of Lago's "
                "API (not its front end, nor a CDN or proxy page).",
                status=status,
                method="POST",
                path=url,
            )

    async def get_event(self, transaction_id: str) -> JSON:
        """``GET /events/{transaction_id}`` (the first match across subscriptions)."""
        if not isinstance(transaction_id, str) or not transaction_id or "/" in transaction_id:
            raise InvalidRequestError(f"transaction_id must be a non-empty string without '/': {transaction_id!r}.")
        if transaction_id in (".", ".."):  # dot segments (quote keeps dots): GET /events or /api/v1, not this event
            raise InvalidRequestError(
                f"transaction_id {transaction_id!r} cannot be read back: as a URL path segment it names the events "
                "list (or the API root), not one event. Use transaction ids with other characters."
            )
        try:
            path = f"/events/{quote(transaction_id, safe='')}"  # this route takes dots
        except UnicodeEncodeError:  # (no event has one: create_event refuses it)
            raise InvalidRequestError(f"transaction_id {transaction_id!r} {_SURROGATE}.") from None
        return _unwrap(await self._request("GET", path), "event")

    # ----------------------------------------------------- metrics, plans, features

    async def create_billable_metric(self, billable_metric: Mapping[str, Any]) -> JSON:
        """``POST /billable_metrics``. Resent after a lost answer: Lago keeps ``code`` unique, so a resend of one it
        made is answered ``value_already_exist``, and the metric Lago has under that code is then this call's answer
        when it is the one asked for (see :meth:`create_plan`)."""
        return await self._create_by_code("/billable_metrics", "billable_metric", billable_metric, "billable metric")

    async def get_billable_metric(self, code: str, *, retry: bool = True) -> JSON:
        """``GET /billable_metrics/{code}``; ``retry=False``: one attempt."""
        path = f"/billable_metrics/{path_segment(code, 'billable metric code')}"
        return _unwrap(await self._request("GET", path, retry=retry), "billable_metric")

    async def create_plan(self, plan: Mapping[str, Any]) -> JSON:
        """``POST /plans``. Resent after a lost answer (a 5xx, a timeout, a reset once sent) as other writes are: Lago
        keeps ``code`` unique, so a resend of a plan it made is answered ``422 code value_already_exist``; the plan
        under that code is then read back and returned when it has every value asked for. A plan with other values
        under the code, or a code taken before the call (no answer lost), raises :class:`LagoValidationError`."""
        return await self._create_by_code("/plans", "plan", plan, "plan")

    async def get_plan(self, code: str) -> JSON:
        """``GET /plans/{code}``."""
        return _unwrap(await self._request("GET", f"/plans/{path_segment(code, 'plan code')}"), "plan")

    async def create_feature(self, feature: Mapping[str, Any]) -> JSON:
        """``POST /features`` (entitlements). Resent after a lost answer, read back on ``value_already_exist`` (see
        :meth:`create_plan`)."""
        return await self._create_by_code("/features", "feature", feature, "feature")

    async def _create_by_code(self, path: str, key: str, item: Mapping[str, Any], what: str) -> JSON:
        """``POST {path}`` of ``{key: item}``, an object Lago keys by a unique ``code``: resent as safe writes are. A
        resend answered ``422 {"code": ["value_already_exist"]}`` after an attempt whose answer was lost is read back
        (``GET {path}/{code}``): the object Lago has is the answer when it matches ``item``; else the 422 stands,
        saying which values differ."""
        _mapping(item, key, "{'code': 'starter', 'name': 'Starter', ...}")
        lost: list[LagoAPIError] = []
        try:
            body = await self._request("POST", path, json={key: dict(item)}, lost=lost)
        except LagoValidationError as exc:
            code = item.get("code")
            if not (lost and exc.details == {"code": ["value_already_exist"]} and isinstance(code, str)):
                raise
            try:
                found = _unwrap(await self._request("GET", f"{path}/{path_segment(code, f'{what} code')}"), key)
            except LagoIntegrationError as read:
                raise exc._restated(
                    LagoValidationError,
                    f"{exc.args[0]} This call's first attempt may have made {what} {code!r} (its answer was lost), but "
                    f"it could not be read back ({type(read).__name__}: {read}): read it (GET /api/v1{path}/{code}) "
                    "before creating it again.",
                ) from None
            differences = _differences(item, found)
            if differences:
                raise exc._restated(
                    LagoValidationError,
                    f"Lago already has a {what} with code {code!r}, with other values than asked ("
                    f"{'; '.join(differences[:5])}): not this call's. Use another code, or update that {what}.",
                ) from None
            logger.info("Lago had made %s %r although its answer was lost; answered as made", what, code)
            return found
        return _unwrap(body, key)

    async def set_plan_entitlements(self, plan_code: str, entitlements: Mapping[str, Mapping[str, Any]]) -> list[JSON]:
        """``POST /plans/{code}/entitlements``: replace the plan's entitlements."""
        payload = _entitlements(entitlements)
        path = f"/plans/{path_segment(plan_code, 'plan code')}/entitlements"
        body = await self._request("POST", path, json={"entitlements": payload})
        return _list_of(body, "entitlements")

    # ------------------------------------------------------------------- usage

    async def get_current_usage(
        self,
        external_customer_id: str,
        external_subscription_id: str,
        *,
        apply_taxes: bool = False,
        billable_metric_code: str | None = None,
    ) -> JSON:
        """``GET /customers/{id}/current_usage``: usage of the current billing period.

        ``apply_taxes`` is false by default: with a tax provider, each call would also hit it (and may be
        throttled). ``billable_metric_code`` narrows the answer to that metric's charges.
        """
        path = f"/customers/{path_segment(external_customer_id, 'customer external_id')}/current_usage"
        params: dict[str, str] = {
            "external_subscription_id": validate_id(external_subscription_id, "external_subscription_id"),
            "apply_taxes": "true" if apply_taxes else "false",
        }
        if billable_metric_code:
            params["billable_metric_code"] = billable_metric_code
        return _unwrap(await self._request("GET", path, params=params), "customer_usage")

    # ---------------------------------------------------------------- invoices

    async def list_invoices(
        self, *, external_customer_id: str | None = None, page: int = 1, per_page: int = 100, **filters: Any
    ) -> Page:
        """``GET /invoices`` (one page), optionally for one customer."""
        paging = _page_arguments(page, per_page)
        params = _params({"external_customer_id": external_customer_id, **filters}, **paging)
        return Page.from_body(await self._request("GET", "/invoices", params=params), "invoices")

    def iter_invoices(
        self, *, external_customer_id: str | None = None, per_page: int = 100, **filters: Any
    ) -> AsyncIterator[JSON]:
        """Every matching invoice, page after page."""
        size = _page_size(per_page)
        params = _params({"external_customer_id": external_customer_id, **filters})
        return self._iterate("/invoices", "invoices", params, size)

    # --------------------------------------------- wallets, applied coupons, credit notes

    async def list_wallets(
        self, *, external_customer_id: str, page: int = 1, per_page: int = 100, **filters: Any
    ) -> Page:
        """``GET /wallets`` (one page): a customer's wallets of prepaid credits, active and terminated (Lago requires
        the customer: ``404 customer_not_found`` for one it does not know). ``filters``: ``currency``,
        ``billing_entity_codes=[...]``."""
        params = _params({**filters, "external_customer_id": _customer_filter(external_customer_id)})
        params += _params({}, **_page_arguments(page, per_page))
        return Page.from_body(await self._request("GET", "/wallets", params=params), "wallets")

    def iter_wallets(self, *, external_customer_id: str, per_page: int = 100, **filters: Any) -> AsyncIterator[JSON]:
        """Every wallet of the customer, page after page."""
        size = _page_size(per_page)
        params = _params({**filters, "external_customer_id": _customer_filter(external_customer_id)})
        return self._iterate("/wallets", "wallets", params, size)

    async def list_applied_coupons(
        self,
        *,
        external_customer_id: str | None = None,
        status: str | None = None,
        page: int = 1,
        per_page: int = 100,
        **filters: Any,
    ) -> Page:
        """``GET /applied_coupons`` (one page), optionally of one customer; ``status`` ``active`` or ``terminated``;
        ``filters``: ``coupon_code=[...]``."""
        status = _coupon_status(status)
        params = _params({"external_customer_id": external_customer_id, "status": status, **filters})
        params += _params({}, **_page_arguments(page, per_page))
        return Page.from_body(await self._request("GET", "/applied_coupons", params=params), "applied_coupons")

    def iter_applied_coupons(
        self, *, external_customer_id: str | None = None, status: str | None = None, per_page: int = 100, **filters: Any
    ) -> AsyncIterator[JSON]:
        """Every matching applied coupon, page after page."""
        size = _page_size(per_page)
        status = _coupon_status(status)
        params = _params({"external_customer_id": external_customer_id, "status": status, **filters})
        return self._iterate("/applied_coupons", "applied_coupons", params, size)

    async def list_credit_notes(
        self, *, external_customer_id: str | None = None, page: int = 1, per_page: int = 100, **filters: Any
    ) -> Page:
        """``GET /credit_notes`` (one page), optionally of one customer. ``filters`` are Lago's (``credit_status``,
        ``refund_status``, ``currency``, ``issuing_date_from``...)."""
        params = _params({"external_customer_id": external_customer_id, **filters})
        params += _params({}, **_page_arguments(page, per_page))
        return Page.from_body(await self._request("GET", "/credit_notes", params=params), "credit_notes")

    def iter_credit_notes(
        self, *, external_customer_id: str | None = None, per_page: int = 100, **filters: Any
    ) -> AsyncIterator[JSON]:
        """Every matching credit note, page after page."""
        size = _page_size(per_page)
        params = _params({"external_customer_id": external_customer_id, **filters})
        return self._iterate("/credit_notes", "credit_notes", params, size)

    # ---------------------------------------------------------------- webhooks

    async def get_webhook_public_key(self, *, retry: bool = True) -> bytes:
        """The PEM public key Lago signs JWT webhooks with (``GET /webhooks/json_public_key``)."""
        body = await self._request("GET", "/webhooks/json_public_key", retry=retry)
        webhook = body.get("webhook")
        encoded = webhook.get("public_key") if isinstance(webhook, Mapping) else None
        if not isinstance(encoded, str):
            raise _shape_error(body, "webhook", "an object with the key's base64 under 'public_key'")
        try:
            # (validate: b64decode would otherwise drop what is not base64, and decode a page's text into a bad key)
            return base64.b64decode("".join(encoded.split()), validate=True)
        except binascii.Error as exc:
            raise LagoAPIError(
                f"Lago answered GET /api/v1/webhooks/json_public_key with webhook.public_key {_shown(encoded)}, which "
                f"is not base64 ({exc}): not a key this client can read. Check LAGO_API_URL (a proxy or gateway "
                "answering instead of Lago?).",
                status=200,
                method="GET",
                path="/api/v1/webhooks/json_public_key",
            ) from None

    # ------------------------------------------------------------- machinery

    async def _iterate(self, path: str, key: str, params: list[tuple[str, str]], per_page: int) -> AsyncIterator[JSON]:
        """Each item of a list once, though it changes meanwhile. Lago pages by number, newest first: an item created
        during the listing moves every later one a place down (the first of the next page was handed out already:
        skipped, by ``lago_id``), and items removed (the caller deleting each one it is handed) move later ones up
        into pages already read: when ``total_count`` goes down, the listing reads again from the first page."""
        page_number = 1
        seen: set[object] = set()
        total: object = None
        while True:
            query = [*params, ("page", str(page_number)), ("per_page", str(per_page))]
            page = Page.from_body(await self._request("GET", path, params=query), key)
            count = page.total_count
            if page_number > 1 and type(total) is int and type(count) is int and count < total:
                total, page_number = count, 1  # (each restart on a smaller count: it ends)
                continue
            total = count
            for item in page.items:
                lago_id = item.get("lago_id") if isinstance(item, Mapping) else None
                if lago_id is not None and type(lago_id) is str:
                    if lago_id in seen:
                        continue
                    seen.add(lago_id)
                yield item
            if not page.next_page or not page.items:
                return
            if not isinstance(page.next_page, int) or page.next_page <= page_number:
                # (followed, a Lago or a caching proxy before it answering so would make the listing loop for ever)
                raise LagoAPIError(
                    f"Lago answered GET {path} page {page_number} with next_page {page.next_page!r}, not a later page: "
                    "the listing stops here rather than loop. A proxy or cache in front of Lago (LAGO_API_URL) may be "
                    "ignoring the page parameter.",
                    method="GET",
                    path=path,
                )
            page_number = page.next_page

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | list[tuple[str, str]] | None = None,
        json: Any = None,
        retry: bool = True,
        api: bool = True,
        lost: list[LagoAPIError] | None = None,
    ) -> JSON:
        """One call, retried as the class says. ``lost``: a list the failures of attempts Lago may have applied (an
        answer lost: a network error once the request was sent, a 5xx) are appended to, for a caller that reads a
        resend's ``value_already_exist`` as its own first attempt applied."""
        if self._state is _State.CLOSED:
            raise ClosedError("This LagoClient is closed; create a new one.")
        url = f"/api/v1{path}" if api else path
        settings = self.settings
        query = httpx.QueryParams(tuple(params) if isinstance(params, list) else params)
        _check_query(query, method, url)
        # encoded here, once (the bytes httpx's json= sends): a value JSON cannot carry is said before anything is sent
        content = None if json is None else _encoded(json, method, url)
        headers = _JSON_CONTENT if content is not None else None
        deadline = time.monotonic() + settings.retry_deadline
        attempt = 0
        while True:
            wait: float | None = None
            left = deadline - time.monotonic()
            # an attempt never runs past the call's deadline (api_timeout otherwise), whole: httpx's timeout is per
            # read, which an answer trickling in (a byte now and then) never reaches
            timeout = min(settings.api_timeout, max(left, 0.001))
            try:
                with anyio.fail_after(timeout):
                    response = await self._pool().request(
                        method, url, params=query, content=content, headers=headers, timeout=timeout
                    )
            except (httpx.RequestError, TimeoutError) as exc:  # network errors, and bodies that cannot be decoded
                what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if isinstance(exc, (httpx.TimeoutException, TimeoutError)):  # (they mostly have no message)
                    what += f", no answer within {timeout:.3g} s: LAGO_API_TIMEOUT, LAGO_RETRY_DEADLINE"
                error: LagoAPIError = LagoUnavailableError(
                    f"Lago did not answer {method} {url} ({what}). "
                    f"Check LAGO_API_URL ({redact_url(settings.api_url)}) and that Lago is up.",
                    method=method,
                    path=url,
                )
                error.__cause__ = _without_tracebacks(exc)
            else:
                if 200 <= response.status_code < 300:
                    return _json_body(response, method, url)
                error = _error_from_response(response, method, url)
                if not isinstance(error, (LagoRateLimitError, LagoUnavailableError)):
                    raise error
                if isinstance(error, (LagoRateLimitError, LagoUnavailableError)):  # (a 503's Retry-After)
                    wait = error.retry_after
            attempt += 1
            backoff = random.uniform(0, min(_MAX_BACKOFF, settings.retry_backoff * 2 ** (attempt - 1)))
            # after a 429, each call waits the reset plus a random part of the next second: the calls a burst had
            # throttled do not all hit Lago again at the reset instant (and a reset of 0 does not make a burst)
            wait = backoff if wait is None else max(wait + random.random(), backoff)
            # DELETE is retried only after a 429 (Lago did not process it): a terminate that went through behind a lost
            # answer would fail its retry with a 404
            # (a 429 always: Lago processed nothing, even of a call not otherwise retried; and a write never sent, its
            # connection not made (refused, DNS, connect timeout): nothing reached Lago. A read with retry=False is a
            # probe's one attempt, within LAGO_API_TIMEOUT: not resent, not even after a 429, whose wait can be the
            # whole retry deadline: a readiness probe, a webhook waiting on Lago's key, is told Lago throttles now)
            throttled = isinstance(error, LagoRateLimitError) and (retry or method != "GET")
            never_sent = method != "GET" and not _maybe_applied(error)
            retryable = throttled or never_sent or (retry and method != "DELETE")
            if not retryable:
                raise _not_resent(error) if method != "GET" and _maybe_applied(error) else error
            if attempt > settings.max_retries:
                raise error
            asked = getattr(error, "retry_after", None)
            if asked is not None:  # a wait Lago asked for, past the call's deadline or its caller's: said, at once
                callers = anyio.current_effective_deadline() - anyio.current_time()
                if time.monotonic() + wait > deadline or wait > callers:
                    raise _past_deadline(error, asked, deadline - time.monotonic(), callers, settings.retry_deadline)
            elif time.monotonic() + wait > deadline:
                raise error
            if lost is not None and _maybe_applied(error):
                lost.append(error)
            self._log_retry(method, url, error, attempt, wait)
            await anyio.sleep(wait)
            if self.is_closed:
                # closed by another task during the wait (an app's shutdown): said as such, not as whatever the pool
                # raises (an injected transport's, closed with the client, raised httpx's bare RuntimeError)
                raise ClosedError(
                    f"This LagoClient was closed while {method} {url} waited to be sent again (its last attempt: "
                    f"{error}); create a new one. The call was not sent again."
                ) from None

    def _log_retry(self, method: str, url: str, error: LagoAPIError, attempt: int, wait: float) -> None:
        """Say a retry: at WARNING (with what to check) at most once a minute, else at DEBUG. While Lago is down every
        call retries (each org's quota refresh...): a line per retry would flood the logs."""
        if isinstance(error, LagoRateLimitError):
            hint = "Lago throttles this API key (429): if this lasts, lower the rate of calls or ask Lago to raise it"
        else:
            hint = f"If this lasts, check that Lago is up at LAGO_API_URL ({redact_url(self.settings.api_url)})"
        self._say(
            "retry",
            "Lago %s %s failed (%s); retry %d/%d in %.2fs. %s",
            method,
            url,
            error.status or type(error.__cause__).__name__,
            attempt,
            self.settings.max_retries,
            wait,
            hint,
        )


def _say_ingested_behind_lost_answer(count: int) -> None:
    logger.info(
        "Lago had ingested %d event(s) of this call although its answer was lost: its resend was answered "
        "value_already_exist, taken as delivered",
        count,
    )


def _maybe_applied(error: LagoAPIError) -> bool:
    """Whether Lago may have applied the request that failed with ``error``: its answer lost (a 5xx, a timeout or a
    connection closed once it was sent), not a 429 (Lago processed nothing) nor a connection never made."""
    if isinstance(error, LagoRateLimitError):
        return False
    return not connection_never_made(error)


def connection_never_made(error: BaseException) -> bool:
    """Whether ``error`` (this client's) is a connection that could not be made (refused, DNS, a connect timeout, no
    connection free in the pool, a process out of file descriptors): nothing of the request was written, by httpx or
    the raw poster."""
    return isinstance(error.__cause__, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, RawConnectError))


def _only_existing_keys(details: Mapping[str, Any]) -> bool:
    """A 422 whose only complaint is metadata keys that exist already (``{"key": ["value_already_exist"]}``)."""
    return bool(details) and all(
        field.endswith("key") and set(codes if isinstance(codes, list) else [codes]) == {"value_already_exist"}
        for field, codes in details.items()
    )


def _differences(asked: Any, found: Any, where: str = "") -> list[str]:
    """How ``found`` (an object Lago has) differs from ``asked`` (the body of its create): each value asked that Lago
    has otherwise, as ``"name: asked X, Lago has Y"``. Keys Lago does not echo (write-only ones: ``tax_codes``...)
    and values asked as ``None`` (Lago's default) are not compared; numbers compare by value (``0`` and ``0.0``,
    ``"0.010"`` and ``"0.01"``); a list compares item by item, in any order."""
    if isinstance(asked, Mapping):
        if not isinstance(found, Mapping):
            return [f"{where or 'body'}: asked {_shown(asked)}, Lago has {_shown(found)}"]
        return [
            difference
            for name, value in asked.items()
            if value is not None and name in found
            for difference in _differences(value, found[name], f"{where}.{name}" if where else str(name))
        ]
    if isinstance(asked, (list, tuple)):
        if not isinstance(found, list) or len(found) != len(asked):
            return [f"{where}: asked {_shown(asked)}, Lago has {_shown(found)}"]
        left = list(found)
        for index, value in enumerate(asked):
            match = next((item for item in left if not _differences(value, item)), _NO_MATCH)
            if match is _NO_MATCH:
                return [f"{where}[{index}]: asked {_shown(value)}, Lago has none such"]
            left.remove(match)
        return []
    return [] if _same_value(asked, found) else [f"{where}: asked {_shown(asked)}, Lago has {_shown(found)}"]


_NO_MATCH = object()


def _same_value(asked: Any, found: Any) -> bool:
    if asked == found and type(asked) is type(found):
        return True
    if isinstance(asked, bool) or isinstance(found, bool):
        return asked == found and isinstance(asked, bool) and isinstance(found, bool)
    numbers_ = [_number(value) for value in (asked, found)]
    return None not in numbers_ and numbers_[0] == numbers_[1]


def _number(value: Any) -> decimal.Decimal | None:
    """``value`` as a finite number (a JSON number, or a decimal string as Lago keeps amounts), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, decimal.Decimal)):
        return None
    try:
        number = decimal.Decimal(value.strip() if isinstance(value, str) else value)
    except (decimal.InvalidOperation, ValueError):
        return None
    return number if number.is_finite() else None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _not_resent(error: LagoAPIError) -> LagoAPIError:
    """``error`` of a write the client does not send again (Lago may have applied it before its answer was lost),
    saying so: "retry later" alone invites the duplicate the client avoided."""
    error.args = (
        f"{error.args[0]} Not sent again: Lago may have applied it before its answer was lost, and a resend would "
        "apply it twice. Read back what Lago has (e.g. get_subscription) before sending it again.",
    )
    return error


def _past_deadline(
    error: LagoAPIError, asked: float, left: float, callers: float, retry_deadline: float
) -> LagoAPIError:
    """``error`` (a 429, or a 503 with Retry-After) not retried because the wait Lago asked for, ``asked`` seconds,
    ends past the call's deadline (``left`` seconds away) or its caller's (``callers`` seconds away), saying so."""
    if callers < left:
        whose = f"the {max(callers, 0.0):.3g} s left before this call's caller's own deadline (a cancel scope)"
    else:
        whose = f"the {max(left, 0.0):.3g} s left of this call's LAGO_RETRY_DEADLINE ({retry_deadline:g} s)"
    error.args = (
        f"{error.args[0]} Not retried: Lago asks to wait {asked:.0f} s, more than {whose}. Retry after that wait, or "
        "allow the call longer (LAGO_RETRY_DEADLINE, the caller's timeout).",
    )
    return error


class _PartlyDuplicateBatch(LagoValidationError):
    """A batch refused because some of its events are in Lago already: the others were not ingested, so it is not
    the harmless resend ``is_duplicate_only`` stands for."""

    @property
    def is_duplicate_only(self) -> bool:
        return False


#: httpx's own auth left out: the client's ``Authorization: Bearer <key>`` header is what every call sends.
_KEY_ONLY = httpx.Auth()


def _has_userinfo(url: str) -> bool:
    parts = urlsplit(url)
    return parts.username is not None or parts.password is not None


def _without_userinfo(url: str) -> str:
    """``url`` without its ``user:password@`` part."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


class _Headers(dict[str, str]):
    """The headers of every call, ``Authorization: Bearer <key>`` among them, shown with the key masked (the
    ``repr`` of the partial that makes the pools, a debugger's view)."""

    __slots__ = ()

    @classmethod
    def of(cls, settings: BillingSettings) -> _Headers:
        return cls(
            {
                "Authorization": f"Bearer {settings.require_api_key()}",
                "Accept": "application/json",
                "User-Agent": f"lago-org-billing/{__version__}",
            }
        )

    def __repr__(self) -> str:
        return repr({name: "[secure]" if name == "Authorization" else value for name, value in self.items()})


#: The proxy variables httpx reads (``urllib.request.getproxies``: any case).
_PROXY_VARIABLES = ("https_proxy", "http_proxy", "all_proxy")


def _proxy_variables() -> dict[str, str]:
    """The proxy variables set, by name as written in the environment."""
    return {name: value for name, value in os.environ.items() if name.lower() in _PROXY_VARIABLES and value}


def _proxy_error(problem: str) -> ConfigurationError:
    """The error of a proxy variable httpx cannot read, every password of them masked, in ``problem`` too."""
    variables = _proxy_variables()
    for value in variables.values():
        userinfo = value.rpartition("@")[0].partition("://")[2]
        password = userinfo.partition(":")[2] or userinfo  # (``scheme://token@host``: the token)
        if password:
            problem = problem.replace(password, "***")
    shown = ", ".join(f"{name}={redact_url(value)}" for name, value in sorted(variables.items()))
    return ConfigurationError(
        f"A proxy variable cannot be read ({problem}): {shown}. Fix it (http://[user:password@]host:port, the "
        "password percent-encoded) or unset it.",
        variable=min(variables, default=None),
    )


def _verification(api_url: str) -> ssl.SSLContext | bool:
    """How httpx verifies Lago's certificate: as it does by default (``SSL_CERT_FILE``, ``SSL_CERT_DIR``, else
    certifi's bundle) for an https ``LAGO_API_URL``, with a ``SSL_CERT_FILE`` that does not exist said as such (httpx
    raised a bare ``FileNotFoundError`` making the client); for http, where no certificate is ever checked, a context
    that reads neither variable, so that a stale one (a removed corporate CA bundle) cannot break a plain-http
    client."""
    if not api_url.lower().startswith("https:"):
        return ssl.create_default_context()
    cafile = os.environ.get("SSL_CERT_FILE")
    if cafile and not os.path.isfile(cafile):
        raise ConfigurationError(
            f"SSL_CERT_FILE names {cafile!r}, which is no file: Lago's certificate (LAGO_API_URL is https) cannot be "
            "verified with it. Point it at your CA bundle, or unset it (certifi's bundle is used then).",
            variable="SSL_CERT_FILE",
        )
    return True


def _undecodable(status: int | None, url: str, exc: httpx.DecodingError) -> LagoUnavailableError:
    """An answer whose body cannot be decoded as its ``Content-Encoding`` says (a proxy's page labelled gzip): what it
    says is unknown, as if no answer came."""
    answered = f"answered POST {url} with {status}" if status is not None else f"answered POST {url}"
    return LagoUnavailableError(
        f"Lago {answered} but its body could not be decoded ({exc}): a proxy or gateway in front of Lago "
        f"(LAGO_API_URL) may be mislabelling its Content-Encoding. Retry later.",
        status=status,
        method="POST",
        path=url,
    )


class _Answer(dict[str, Any]):
    """A 2xx answer's JSON object, with the call it answers (said by the errors of an answer not shaped as Lago's)."""

    method = ""
    path = ""
    status = 200

    @classmethod
    def of(cls, body: Mapping[str, Any], method: str, path: str, status: int) -> _Answer:
        answer = cls(body)
        answer.method, answer.path, answer.status = method, path, status
        return answer


def _shape_error(body: Mapping[str, Any], key: str, wanted: str) -> LagoAPIError:
    """The error of a 2xx answer whose ``key`` is not ``wanted`` (an object, a list), naming the call and what came."""
    method, path, status = (body.method, body.path, body.status) if isinstance(body, _Answer) else ("", "", 200)
    call = f"{method} {path}" if method else "a call"
    if not body:
        came = "no body" if isinstance(body, _Answer) else "an empty object"
    elif key in body:
        came = f"{key!r} {_shown(body[key])}"
    else:
        came = f"no {key!r} but {str(dict(body))[:200]}"
    return LagoAPIError(
        f"Lago answered {call} with {status} and {came}, where its API answers {wanted} under {key!r}: not an answer "
        "this client can read. Check LAGO_API_URL (a proxy or gateway answering instead of Lago?) and that this Lago "
        "version serves this call as documented.",
        status=status,
        method=method or None,
        path=path or None,
    )


def _unwrap(body: JSON, key: str) -> JSON:
    value = body.get(key)
    if not isinstance(value, dict):
        raise _shape_error(body, key, "an object")
    return value


def _list_of(body: Mapping[str, Any], key: str) -> list[JSON]:
    """``body[key]``, a list Lago documents (``null`` or absent: empty); anything else is a :class:`LagoAPIError`."""
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _shape_error(body, key, "a list")
    return list(value)


def _param_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _params(filters: Mapping[str, Any], **fixed: Any) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    for key, value in {**filters, **fixed}.items():
        if value is None:
            continue
        if isinstance(value, (bytes, bytearray, memoryview)):  # (its str(), "b'...'", is a value Lago matches to none)
            raise InvalidRequestError(f"The {key!r} filter is {_shown(value)}, bytes: pass text (a str).")
        if isinstance(value, Iterable) and not isinstance(value, (str, Mapping)):
            # a set, a dict's keys, a generator: the items, as of a list (their str() was sent as one value, "{'a'}",
            # which Lago matches to nothing: the page came back empty, silently)
            value = list(value)
            if any(item is None for item in value):
                raise InvalidRequestError(
                    f"The {key!r} filter holds None ({value!r}): Lago would read it as an empty value and match "
                    f"nothing. Leave None out of the list."
                )
            params.extend((f"{key}[]", _param_text(item)) for item in value)
        elif isinstance(value, Mapping):  # Lago's metadata filters: metadata[key]=value ("": the key absent)
            params.extend((f"{key}[{_bracketed(key, name)}]", _param_text(item)) for name, item in value.items())
        else:
            params.append((key, _param_text(value)))
    return params


#: The largest ``per_page`` the client asks of Lago. Lago sets none, but one page is one SQL query answered within
#: ``settings.timeout``: a page of millions times out and is retried as an outage. Iterate (``iter_*``) instead.
MAX_PER_PAGE = 1_000
#: The largest ``page``: Lago's SQL offset, ``(page - 1) * per_page``, is a bigint (past it, a 500 retried as outage).
MAX_PAGE = 2**31 - 1


def _whole(value: object, name: str, maximum: int, why: str = "") -> int:
    """``value`` as an ``int``: any whole number (numpy's ``int64``, as the package's argument checks take), not a
    bool, a float or a string."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequestError(
            f"{name} must be an integer from 1 to {maximum}, got {value!r} ({type(value).__name__}): Lago reads "
            f"{name} with Ruby's to_i, so anything else lists another page than the one meant. Pass an int."
        )
    whole = int(value)
    if not 1 <= whole <= maximum:
        raise InvalidRequestError(f"{name} must be an integer from 1 to {maximum}, got {whole}{why}.")
    return whole


def _page_size(per_page: object) -> int:
    """``per_page`` if Lago can take it as meant, else an :class:`InvalidRequestError` naming it."""
    why = f" (Lago sets no maximum; the client asks at most {MAX_PER_PAGE} a page: use an iter_* method for more)"
    return _whole(per_page, "per_page", MAX_PER_PAGE, why)


def _page_arguments(page: object, per_page: object) -> dict[str, int]:
    """The ``page`` and ``per_page`` query parameters of one page of a Lago list, checked before any request."""
    return {"page": _whole(page, "page", MAX_PAGE), "per_page": _page_size(per_page)}


def _customer_filter(external_customer_id: object) -> str:
    """A customer's ``external_customer_id`` as a list filter Lago requires (``GET /wallets``)."""
    if not isinstance(external_customer_id, str) or not external_customer_id:
        raise InvalidRequestError(
            f"external_customer_id must be the customer's id, a non-empty string, got {external_customer_id!r}: "
            "Lago lists wallets of one customer only."
        )
    return external_customer_id


#: The statuses of Lago's subscriptions (``Subscription::STATUSES``; the spec's enums leave ``incomplete`` out).
_SUBSCRIPTION_STATUSES = ("active", "pending", "terminated", "canceled", "incomplete")
_LOOKED_UP = "Lago looks the subscription up by its status, so another answers 404, as if the id were wrong"


def _listed(values: Sequence[str]) -> str:
    return ", ".join(repr(value) for value in values)


def _status(value: object, name: str, allowed: Sequence[str], why: str) -> str | None:
    """A subscription's ``status`` query parameter: ``None`` or ``""`` (Lago's default, the active one) as ``None``; one
    of ``allowed`` as itself; anything else an :class:`InvalidRequestError` naming it, what Lago takes and ``why``
    (what Lago would do with it instead)."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value in allowed:
        return value
    raise InvalidRequestError(f"{name} must be one of {_listed(allowed)} (None: the active one), got {value!r}: {why}.")


def _subscription_status(status: object) -> dict[str, str] | None:
    """The ``subscription_status`` query parameter of the subscription entitlement calls."""
    wanted = _status(status, "status", _SUBSCRIPTION_STATUSES, _LOOKED_UP)
    return {"subscription_status": wanted} if wanted else None


def _coupon_status(status: object) -> str | None:
    """The ``status`` filter of the applied coupon lists (``""``: none, as ``None``)."""
    if status is None or status == "":
        return None
    if isinstance(status, str) and status in ("active", "terminated"):
        return status
    raise InvalidRequestError(
        f"status must be 'active' or 'terminated' (None: both), got {status!r}: Lago ignores a status its applied "
        "coupons do not have, and lists them all."
    )


def _mapping(value: object, name: str, example: str) -> Mapping[str, Any]:
    """``value`` if it is a mapping (a JSON object), else an :class:`InvalidRequestError` naming it."""
    if not isinstance(value, Mapping):
        raise InvalidRequestError(
            f"{name} must be a mapping such as {example}, got {type(value).__name__} ({_shown(value)}): nothing was "
            "sent."
        )
    return value


def _entitlements(value: object) -> dict[str, Any]:
    """The ``entitlements`` of a plan or a subscription, ``{"feature_code": {"privilege_code": value}}``, checked: a
    list (the shape Lago answers with) or a feature mapped to a bare value is not what Lago takes."""
    example = "{'api_quota': {'max_api_calls': 300}}"
    entitlements = _mapping(value, "entitlements", example)
    for feature, privileges in entitlements.items():
        if not isinstance(privileges, Mapping):
            raise InvalidRequestError(
                f"entitlements[{feature!r}] must be a mapping of the feature's privilege codes to their values, such "
                f"as {example}, got {_shown(privileges)}: nothing was sent."
            )
    return dict(entitlements)


def _bracketed(key: str, name: object) -> str:
    """``name``, a key of the ``key`` filter (``metadata[name]=value``), if Rack reads it back as one key: a bracket in
    it (or none at all) makes another parameter of it (``metadata[a][b]`` is nested, ``metadata[]`` a list)."""
    text = str(name)
    if not text or "[" in text or "]" in text:
        raise InvalidRequestError(
            f"{key} filter key {name!r} cannot be sent: Lago reads {key}[key]=value, where an empty key or one "
            f"holding '[' or ']' names another parameter ({key}[a][b] is a nested one). Use keys without brackets."
        )
    return text


_SURROGATE = (
    "holds a lone surrogate (such as '\\ud800', from JSON decoded by a client): no UTF-8 text, which cannot be sent"
)


def _utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_query(query: httpx.QueryParams, method: str, url: str) -> None:
    """A query parameter holding a lone surrogate is an :class:`InvalidRequestError` naming it (httpx raised a
    ``UnicodeEncodeError`` naming none)."""
    for name, value in query.multi_items():
        if not (_utf8(name) and _utf8(value)):
            raise InvalidRequestError(
                f"{method} {url} was not sent: its query parameter {name} {value!r} {_SURROGATE}."
            )


#: The header of a JSON body (httpx's ``json=`` sets the same)
_JSON_CONTENT = {"Content-Type": "application/json"}


def _encoded(body: Any, method: str, url: str) -> bytes:
    """``body`` as the JSON bytes httpx's ``json=`` sends (the same separators, no NaN). A value JSON cannot carry (a
    ``datetime``, a ``Decimal``, NaN, bytes, a lone surrogate...) is an :class:`InvalidRequestError` saying where it
    is in the body and what to pass instead, raised before anything is sent: httpx raised a ``TypeError`` or
    ``ValueError`` naming no field."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError, RecursionError) as exc:  # (UnicodeEncodeError is a ValueError)
        problem = _unencodable(body, "", set(), 0) or f"its body is no JSON ({type(exc).__name__}: {exc})"
    raise InvalidRequestError(f"{method} {url} was not sent: {problem}.")


def _unencodable(value: Any, where: str, parents: set[int], depth: int) -> str | None:
    """Where in ``value`` (a request body, at ``where``) the first value JSON cannot carry is, and what to pass
    instead; ``None`` when none is found (nested too deeply to look)."""
    at = where or "the body"
    if value is None or isinstance(value, (bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{at} is {value!r}, which JSON cannot carry: pass a finite number"
    if isinstance(value, str):
        return None if _utf8(value) else f"{at} {_shown(value)} {_SURROGATE}"
    if depth > 100:
        return None
    if isinstance(value, (dict, list, tuple)):
        if id(value) in parents:
            return f"{at} contains itself, which JSON cannot carry"
        parents.add(id(value))
        try:
            if isinstance(value, dict):
                for key, item in value.items():
                    name = f"{where}.{key}" if where else str(key)
                    if not isinstance(key, (str, int, float, bool)) and key is not None:
                        return f"{at} has the key {_shown(key)} ({type(key).__name__}): JSON keys are strings"
                    if isinstance(key, str) and not _utf8(key):
                        return f"{at} has a key {_shown(key)} that {_SURROGATE}"
                    problem = _unencodable(item, name, parents, depth + 1)
                    if problem:
                        return problem
            else:
                for index, item in enumerate(value):
                    problem = _unencodable(item, f"{where}[{index}]", parents, depth + 1)
                    if problem:
                        return problem
        finally:
            parents.discard(id(value))
        return None
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        hint = "pass an ISO 8601 string, e.g. value.isoformat() (of a datetime with its offset: Lago reads none as UTC)"
    elif isinstance(value, decimal.Decimal):
        hint = "pass it as a string (str(value)) or a number"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        hint = "pass text (a str)"
    elif isinstance(value, (set, frozenset)):
        hint = "pass a list"
    elif isinstance(value, Mapping):
        hint = "pass a dict"
    else:
        hint = "JSON carries strings, numbers, booleans, None, lists and dicts"
    return f"{at} is {_shown(value)} ({type(value).__name__}), which JSON cannot carry: {hint}"


def _subscription_filters(
    external_customer_id: str | None, plan_code: str | None, statuses: Sequence[str] | None
) -> list[tuple[str, str]]:
    if isinstance(statuses, str):
        raise InvalidRequestError("statuses must be a list such as ['active', 'pending'], not a string.")
    statuses = None if statuses is None else list(statuses)  # (a generator: read once, here, and sent as read)
    for status in statuses or ():
        if not isinstance(status, str) or status not in _SUBSCRIPTION_STATUSES:
            raise InvalidRequestError(
                f"statuses must name Lago's subscription statuses ({_listed(_SUBSCRIPTION_STATUSES)}), got {status!r}: "
                "Lago ignores a list naming one it does not have, and lists other subscriptions than those asked."
            )
    return _params({"external_customer_id": external_customer_id, "plan_code": plan_code, "status": statuses})


def _json_body(response: httpx.Response, method: str, url: str) -> JSON:
    if not response.content:
        return _Answer.of({}, method, url, response.status_code)
    try:
        body = response.json()
    except (ValueError, RecursionError):  # (RecursionError: nested thousands deep, nothing Lago writes)
        raise LagoAPIError(
            f"Lago answered {method} {url} with {response.status_code} but the body is not JSON "
            f"({response.content[:60]!r}): that is not Lago's API. Check LAGO_API_URL: it must be the URL of Lago's "
            "API (not its front end, nor a CDN or proxy page).",
            status=response.status_code,
            method=method,
            path=url,
        ) from None
    if not isinstance(body, dict):
        raise LagoAPIError(
            f"Lago answered {method} {url} with {response.status_code} and a JSON {type(body).__name__} "
            f"({_shown(body)}), not the object its API answers: not an answer this client can read. Check "
            "LAGO_API_URL (a proxy or gateway answering instead of Lago?) and that this Lago version serves this call "
            "as documented.",
            status=response.status_code,
            method=method,
            path=url,
        )
    return _Answer.of(body, method, url, response.status_code)


def _error_from_response(response: httpx.Response, method: str, url: str) -> LagoAPIError:
    parsed = _body_object(response)
    error = _lago_error(response, method, url, parsed)
    error.lago_json = parsed is not None
    error.lago_envelope = parsed is not None and parsed.get("status") == response.status_code
    return error


def _body_object(response: httpx.Response) -> dict[str, Any] | None:
    """The answer's body as a JSON object (Lago's answers are), else ``None`` (a proxy's page, no body)."""
    try:
        body = response.json()
    except (ValueError, RecursionError):  # (a proxy's page; a body nested thousands deep)
        return None
    return body if isinstance(body, dict) else None


def _lago_error(response: httpx.Response, method: str, url: str, parsed: dict[str, Any] | None) -> LagoAPIError:
    """The error for Lago's (or a proxy's) answer ``response``, whose body is ``parsed`` (:func:`_body_object`)."""
    status = response.status_code
    body = parsed or {}
    code = body.get("code") if isinstance(body.get("code"), str) else None
    details = body.get("error_details") if isinstance(body.get("error_details"), dict) else {}
    error_text = body.get("error") if isinstance(body.get("error"), str) else None
    if error_text is None and isinstance(body.get("message"), str):  # /health: {"message": "Unhealthy", "details"}
        error_text = body["message"] + (f" ({body['details']})" if isinstance(body.get("details"), str) else "")
    error_text = error_text or response.reason_phrase
    summary = f"Lago answered {method} {url} with {status} {error_text}"
    if code:
        summary += f" ({code})"
    if details:
        summary += f": {_short(details)}"
    elif messages := _error_messages(body):  # Lago's 500: {"status": 500, "errors": [{"message", "backtrace"}]}
        summary += f": {messages}"
    kwargs: dict[str, Any] = {
        "status": status,
        "code": code,
        "details": details,
        "error": error_text,
        "method": method,
        "path": url,
    }
    if status in (401, 403):
        hint = " Check LAGO_API_KEY." if status == 401 else _forbidden_hint(code)
        return LagoAuthenticationError(summary + "." + hint, **kwargs)
    if status == 404:
        if code is None:  # not Lago's JSON 404 (a proxy's page, a wrong base path): no resource is known missing
            return LagoAPIError(
                f"{summary}, not Lago's answer for a missing resource: check LAGO_API_URL ({url} is not a Lago API "
                "path there).",
                **kwargs,
            )
        if code == "resource_not_found":  # Lago's catch-all route: no such path, not a missing id
            # (still a LagoNotFoundError: callers read it as "this Lago has no such endpoint", e.g. one before
            # entitlements; OrgBilling never reads it as "this org has no customer / subscription")
            return LagoNotFoundError(
                f"{summary}: Lago serves no such route. Check LAGO_API_URL (is Lago served under the path it names?), "
                "or that this Lago version has this endpoint.",
                **kwargs,
            )
        return LagoNotFoundError(
            summary + ". Check the id (Lago's ids are case-sensitive), or create the resource first.", **kwargs
        )
    if status == 400 and parsed is None:
        return LagoAPIError(
            f"{summary}, not Lago's answer (its body is not Lago's JSON: a proxy's or load balancer's page). Check "
            "LAGO_API_URL (http:// to an https port?) and what stands between this app and Lago.",
            **kwargs,
        )
    if status == 405 and code == "no_active_subscription":
        return LagoAPIError(
            summary + ". The customer has no active subscription (none yet, not started yet, or terminated): "
            "subscribe it first.",
            **kwargs,
        )
    if status == 422:
        if LagoValidationError(summary, **kwargs).is_duplicate_only:  # e.g. a retry after a lost answer: ingested
            return LagoValidationError(
                summary + ". The event is already in Lago (a resend of one it ingested): nothing to fix, and a new "
                "transaction_id would bill it twice.",
                **kwargs,
            )
        return LagoValidationError(
            summary + ". Lago refused the values sent: fix the fields its error details name.", **kwargs
        )
    if status == 429:
        return LagoRateLimitError(
            summary + ". Lago's rate limit: retry later, or ask Lago to raise it.",
            retry_after=_retry_after(response.headers),
            **kwargs,
        )
    if status == 503 and "retry-after" in response.headers:  # (maintenance: how long Lago, or its proxy, expects)
        wait = _retry_after(response.headers, ("retry-after",))
        if wait is not None:
            return LagoUnavailableError(
                f"{summary}. Lago is unavailable and asks to retry in {wait:.0f} s (Retry-After).",
                retry_after=wait,
                **kwargs,
            )
    if status >= 500:
        return LagoUnavailableError(summary + ". Lago failed or is down: retry later.", **kwargs)
    if status < 400:  # a redirect (a load balancer sending http to https, a wrong path): Lago was not reached
        where = response.headers.get("location")
        hint = f" to {where}" if where else ""
        # not a LagoNotFoundError: callers read that as "this org has no customer / subscription"
        return LagoAPIError(f"{summary}: redirected{hint}; set LAGO_API_URL to the URL Lago answers at.", **kwargs)
    return LagoAPIError(summary + ".", **kwargs)


def _forbidden_hint(code: str | None) -> str:
    """What to do about Lago's 403, by its ``code``: only ``<read|write>_action_not_allowed_for_<resource>`` is about
    the API key's permissions; the others are features this Lago (its licence, plan or setup) does not serve."""
    if code == "feature_unavailable":
        return (
            " This Lago does not include the feature (premium: a Lago Cloud plan or a self-hosted licence that has "
            "it); the API key is not the problem."
        )
    if code in ("endpoint_not_available", "projected_usage_not_enabled"):
        return " This Lago organization does not serve this endpoint as set up; the API key is not the problem."
    if code and "_action_not_allowed_for_" in code:
        mode, _, resource = code.partition("_action_not_allowed_for_")
        return f" The API key lacks the {mode} permission on {resource}: grant it to the key in Lago (API keys)."
    return " The API key lacks a permission."


def _subscription_path(external_id: str) -> str:
    """``/subscriptions/{external_id}``, the id checked and escaped as one path segment."""
    return f"/subscriptions/{path_segment(external_id, 'subscription external_id')}"


#: A reset "in seconds" beyond this (2001 as a Unix time; no rate-limit window lasts 31 years) is a Unix time
_EPOCH_RESET = 1e9


def _retry_after(headers: httpx.Headers, names: tuple[str, ...] = ("x-ratelimit-reset", "retry-after")) -> float | None:
    """Seconds to wait, from ``X-RateLimit-Reset`` (Lago: seconds until the window resets) or ``Retry-After``
    (seconds or an HTTP date)."""
    for name in names:
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            seconds = float(raw)
        except ValueError:
            pass
        else:
            if seconds > _EPOCH_RESET:  # a proxy's (GitHub-style) Unix time of the reset, not seconds to wait
                seconds -= time.time()
            return max(0.0, seconds)
        try:
            when = email.utils.parsedate_to_datetime(raw)
            if when.tzinfo is None:  # asctime's form and "-0000": HTTP dates are GMT (RFC 9110 5.6.7), not local time
                when = when.replace(tzinfo=datetime.timezone.utc)
            at = when.timestamp()
        except (TypeError, ValueError, OverflowError):  # (a year past datetime's range: not a date to wait for)
            continue
        return max(0.0, at - time.time())
    return None


def _error_messages(body: Mapping[str, Any]) -> str:
    """The messages of Lago's 500 answer (``{"status": 500, "errors": [{"message": ..., "backtrace": [...]}]}``, its
    only diagnosis; the backtraces left out), shortened; ``""`` for any other body."""
    errors = body.get("errors")
    if not isinstance(errors, list):
        return ""
    found = [item["message"] for item in errors[:5] if isinstance(item, dict) and isinstance(item.get("message"), str)]
    return _clipped("; ".join(" ".join(message.split()) for message in found if message.strip()))  # (one line)


def _short(details: Mapping[str, Any]) -> str:
    return _clipped(str(dict(details)))


def check_billing_time(billing_time: object) -> None:
    """Raise :class:`InvalidRequestError` for a subscription ``billing_time`` Lago does not take."""
    if billing_time not in ("calendar", "anniversary"):
        raise InvalidRequestError(f"billing_time must be 'calendar' or 'anniversary', got {billing_time!r}.")


def _clipped(text: str) -> str:
    """``text`` in 300 characters at most (an error message's part: Lago's details, its 500's messages)."""
    return text if len(text) <= 300 else text[:297] + "..."


class _Throttled:
    """Logs a problem that can repeat with every request at ``level`` at most once per ``interval`` seconds for each
    kind, with how many were logged at DEBUG since (a scanner posting junk, Redis down for an hour)."""

    def __init__(self, log: logging.Logger = logger, *, level: int = logging.WARNING, interval: float = 60.0) -> None:
        self.log = log
        self.level = level
        self.interval = interval
        self._said: dict[str, tuple[float, int]] = {}  # kind -> (when last said at WARNING, how many since)

    def __call__(self, kind: str, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        said = self._said.get(kind)
        if said is not None and now - said[0] < self.interval:
            self._said[kind] = (said[0], said[1] + 1)
            self.log.debug(message, *args, exc_info=exc_info)
            return
        if len(self._said) >= 100:  # (kinds are a fixed few; bounded all the same)
            self._said.clear()
        self._said[kind] = (now, 0)
        since = f"{said[1]} more since the last such warning; " if said is not None and said[1] else ""
        self.log.log(
            self.level,
            f"{message} ({since}more within {self.interval:g} s are logged at DEBUG)",
            *args,
            exc_info=exc_info,
        )
