"""The pure ASGI middleware: resolve identity -> gate -> call app -> attribute usage -> enqueue one event.

Background delivery (``_delivery.EventPipeline``) runs in anyio tasks owned by the middleware: started on the
ASGI lifespan startup and flushed on shutdown, or started lazily on the first request when the server sends no
lifespan. Requests never wait on Lago.

What is billed: every request with an org, whatever its answer, except 5xx (unless ``bill_server_errors``), the app's
401 and 403 and the refusals of a Starlette ``AuthenticationMiddleware`` inside (its ``on_error`` answer, 400 by
default) (unless ``bill_auth_failures``: its auth refused the caller, who may have named any org; not counted
against the quota either, ``stats["unbilled_auth_failures"]``) and the routing's own answers, which no endpoint
produced: a Starlette (FastAPI) router's 404 for a path no route matches, at the top or under a ``Mount``/``Host``,
its ``redirect_slashes`` 307 (``/v1/chat/`` -> ``/v1/chat``: the call the client then makes is the one billed), its
405 for a method the route does not take, and a redirect a Starlette middleware inside this one answers before
routing (``HTTPSRedirectMiddleware``, in the app or around it, or around a mounted app). Those are not counted against
the quota either (``stats["unrouted"]``). Endpoints' own 404s and redirects, a mounted app's (``StaticFiles``), and the
404 of an app without Starlette routing, are billed. The endpoint of an answer no route produced is ``<unmatched>``
(the raw path only for an app without Starlette routing).

Two stages live in modules of their own: ``_endpoints`` (the route template an event is billed under, and which
answers are the routing's own) and ``_idempotency`` (``SharedFirstSeen``: idempotency keys' first timestamps in Redis).
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import functools
import hashlib
import hmac
import inspect
import itertools
import json
import logging
import multiprocessing.util
import os
import sys
import time
import types
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from json.encoder import encode_basestring as _json_str
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import anyio
import httpx
from cachetools import TTLCache
from starlette.applications import Starlette
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.routing import Host, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import _checks as checks
from ._attribution import _MODE_NONE, AttributionConfig, Usage, UsageCounts, UsageRecorder, json_usage_counts
from ._client import LagoClient
from ._delivery import EventPipeline, close_idle_quietly, running_here
from ._endpoints import (
    _MAX_CACHED_PATH,
    _MAX_RAW_ENDPOINT,
    _dot_segments,
    _inner_routing,
    _template,
    _unrouted,
    _whole_raw_endpoint,
)
from ._errors import ConfigurationError, InvalidRequestError, LagoIntegrationError, QuotaExceededError
from ._events import _check_id, event_payload
from ._gate import QuotaDecision, QuotaGateProtocol
from ._idempotency import SharedFirstSeen
from ._identity import (
    AMBIGUOUS_CREDENTIALS,
    SCOPE_KEY,
    Identity,
    Resolver,
    default_identity,
    default_org_resolver,
    default_user_resolver,
    describe_resolver,
    late_identity,
    late_user,
    publish_identity as _publish,
    resolve_now,
)
from ._metrics import mirror_renewed, register_metrics
from ._periods import before_period
from ._quota import QuotaConfig, QuotaGate, _Decision
from ._settings import BillingSettings, excluded_prefixes, header_as_sent, header_name_problem

__all__ = ["OrgBillingMiddleware"]

logger = logging.getLogger("lago_org_billing.middleware")

_M = TypeVar("_M")

#: Extra event properties computed per request.
PropertiesHook = Callable[[Scope, Identity], Mapping[str, Any]]


class _Billing(dict[str, Any]):
    """The per-request billing dict (``scope[SCOPE_KEY]``), one per request whatever copies of the scope are made: a
    middleware between this one and the app that deep-copies the scope (hypercorn's ``ProxyFixMiddleware``) hands the
    app this dict, not a copy, so that what the app writes in it (``attribute_usage()``'s tokens, ``require_quota()``'s
    reserved call and org) reaches the middleware (a copy's were lost: tokens not billed, a call never settled).

    The copy keeps its own ``state`` though (``request.state``), where the app's auth (a FastAPI dependency) sets the
    org, and Starlette's router writes the matched route in it: so that the middleware finds both when the request
    ends, the copies made while the request is billed are remembered (their ``copy.deepcopy`` memos, see
    :func:`_scope_copies`) and let go when the request ends; none is remembered once it ended (a copy made then, by
    a middleware around this one logging the scope, would be kept in a cycle with the billing dict)."""

    __slots__ = ()

    def __copy__(self) -> _Billing:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Billing:
        copies = self.get(_COPIES, _UNSEEN)
        if copies is _UNSEEN:  # the first copy: wanted by a request billed (its route) or waiting for its org
            if "waiting" not in self and self.get("middleware") is None:
                return self  # (an excluded path, a preflight: nothing to find)
            copies = self[_COPIES] = _Copies()
        if isinstance(copies, _Copies) and len(copies.memos) < _MAX_COPIES and all(m is not memo for m in copies.memos):
            copies.memos.append(memo)  # (None: the request has ended, nothing more is looked for)
        return self


class _Copies:
    """The memos of the ``copy.deepcopy`` calls that copied a request's scope (original ids -> copies), kept in its
    billing dict (under ``_COPIES``) until the request ends. Not a list: a logging middleware dumping the scope as
    JSON (``default=str``) prints this short line, not the copies."""

    __slots__ = ("memos",)

    def __init__(self) -> None:
        self.memos: list[dict[int, Any]] = []

    def __repr__(self) -> str:
        return f"<{len(self.memos)} deep copies of the scope>"

    def __copy__(self) -> _Copies:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Copies:
        return self


#: The billing dict's key for the deep copies made of the scope (see _Billing), and its value before any (None: the
#: request is over, none remembered any more).
_COPIES = "scope_copies"
_UNSEEN = object()
#: Deep copies of one request's scope remembered at most (a proxy or two; a middleware copying it in a loop would
#: otherwise keep every copy until the request ends).
_MAX_COPIES = 8


def _scope_copies(billing: dict[str, Any], *, release: bool = False) -> list[Scope]:
    """The deep copies made of the request's scope that the app may have run with, the latest first (each holds its
    own ``request.state``); ``release``: forgotten now, and none remembered from now on (the copies refer to the
    billing dict, which referred to them: freed by reference counting, not left to the cyclic collector)."""
    copies = billing.get(_COPIES)
    if release and _COPIES in billing:
        billing[_COPIES] = None
    if not isinstance(copies, _Copies):
        return []
    found: dict[int, Scope] = {}
    for memo in reversed(copies.memos):
        for value in reversed(tuple(memo.values())):  # (a snapshot: a copy still made in a thread)
            if type(value) is dict and value.get(SCOPE_KEY) is billing:
                found.setdefault(id(value), value)
    return list(found.values())


def _app_scope(scope: Scope, copies: list[Scope]) -> Scope:
    """The scope the app's routing ran on, to read its route and state from: the scope itself when a route of its
    own was matched on it, else the first of its deep copies that a router went further on (hypercorn's
    ``ProxyFixMiddleware`` between them: Starlette's router writes ``scope["route"]`` there; a later one is a
    sub-call's, an endpoint dispatching a copy of its scope to another router), else the scope."""
    route, router, endpoint = scope.get("route"), scope.get("router"), scope.get("endpoint")
    if endpoint is not None and not isinstance(route, (Mount, Host)):  # (an endpoint's sub-call on a copy: its own)
        return scope
    for copied in reversed(copies):  # (the first copy made first)
        if copied.get("route") is not route or copied.get("router") is not router:
            if "method" in copied and "path" in copied:  # (not a copy left half made by a failing deepcopy)
                return copied
    return scope


class OrgBillingMiddleware:
    """Bill every HTTP request to the caller's organization in Lago.

    ::

        app.add_middleware(OrgBillingMiddleware)  # settings from the environment (LAGO_*)

    **Parameters:**

    * **settings** - *(optional)* :class:`BillingSettings`; read from the environment when omitted.
    * **resolve_org** / **resolve_user** - *(optional)* resolvers ``(scope) -> str | None`` (sync or async).
      Defaults: ``request.state.org_id``, then ``request.user.org_id``, then ``LAGO_ORG_HEADER`` when set.
    * **on_unresolved** - ``"allow"`` (serve the request unbilled, the default) or ``"reject"`` (answer
      ``unresolved_status``, 401 or 403, with a JSON body). Either way it is counted in ``stats["unresolved"]``.
      Default: the settings' (``LAGO_ON_UNRESOLVED``, ``LAGO_UNRESOLVED_STATUS``).
    * **bill_server_errors** - bill responses with status >= 500 (and requests the app crashed on). Default: the
      settings' ``LAGO_BILL_SERVER_ERRORS``, false (the customer got nothing).
    * **bill_auth_failures** - bill the app's 401 and 403 answers, and the 4xx answered before a Starlette
      ``AuthenticationMiddleware`` inside this one let the request through (its ``on_error`` refusal of bad
      credentials: a 400 by default). Default: the settings' ``LAGO_BILL_AUTH_FAILURES``, false: its auth refused the
      caller, and with the org from a header anyone could name another org and run up its bill. Not billed, they are
      not counted against the quota either (``stats["unbilled_auth_failures"]``). The middleware's own answers
      (``on_unresolved="reject"``, the gate's) are never billed.
    * **attribution** - *(optional)* :class:`AttributionConfig` (token/model headers, body inspection).
    * **idempotency_header** - *(opt-in)* a request header (e.g. ``"Idempotency-Key"``) whose value makes the
      event stable across client retries: requests of one org to one route with the same key are billed once (one
      ``transaction_id``; the first one's timestamp, remembered for a day, so that Lago's ClickHouse store, which
      deduplicates on both, keeps one too). The first timestamp is shared in Redis with ``LAGO_REDIS_URL`` (retries
      reaching other workers or replicas); without it, it is remembered in this process only. The client chooses
      the key: enable it only when your API honours it itself (a repeated key replays the first answer instead of
      doing the work again), or clients get repeated work billed once. Default ``None``: every request is billed.
    * **event_properties** - *(optional)* ``(scope, identity) -> mapping`` of extra event properties, a plain
      (synchronous) function called when the response is over, in the request's context (its context variables).
      If it raises or gives values an event cannot carry, the event is sent without them (logged, counted in
      ``stats["event_properties_errors"]``): the request is billed all the same.
    * **quota** - ``"auto"`` (default: a ``QuotaGate`` from the settings unless ``LAGO_QUOTA_MODE=off``),
      ``None`` (no gating) or a gate object (see ``_gate.QuotaGateProtocol``). Checked before the app runs:
      an org over its plan limits is answered 429/402 without reaching the app.
    * **quota_config** - *(optional)* the ``QuotaConfig`` of the ``"auto"`` gate (limits' names, statuses, headers...);
      read from the ``LAGO_QUOTA_*`` variables when omitted.
    * **client** / **transport** / **pipeline** - *(optional)* injected pieces (tests, sharing a client).
    * **metrics_registry** - *(optional)* a ``prometheus_client`` registry to export this middleware's metrics to
      (see ``_metrics``); with ``LAGO_METRICS=true`` they go to the default registry without it.
    """

    #: Seconds before the background work starts again after an error stopped it (doubling each time, to 60).
    restart_delay: float = 1.0

    def __init__(
        self,
        app: ASGIApp,
        settings: BillingSettings | None = None,
        *,
        resolve_org: Resolver | None = None,
        resolve_user: Resolver | None = None,
        on_unresolved: Literal["allow", "reject"] | None = None,
        unresolved_status: int | None = None,
        bill_server_errors: bool | None = None,
        bill_auth_failures: bool | None = None,
        attribution: AttributionConfig | None = None,
        idempotency_header: str | None = None,
        event_properties: PropertiesHook | None = None,
        quota: QuotaGateProtocol | Literal["auto"] | None = "auto",
        quota_config: QuotaConfig | None = None,
        client: LagoClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        pipeline: EventPipeline | None = None,
        shutdown_timeout: float = 5.0,
        metrics_registry: Any = None,
    ) -> None:
        self.app = app
        self._running = False
        #: A configuration error kept for the lifespan to report (see below); the middleware then serves nothing.
        self._config_error: Exception | None = None
        self._lazy_task: asyncio.Task[None] | None = None
        self._lazy_done: anyio.Event | None = None  # the lazy start's end, on trio
        self._lazy_error: ConfigurationError | None = None
        self._lazy_started: anyio.Event | None = None
        self._stopping = False  # (its shutdown has begun: see _shared_with_others)
        self._pipeline_scope: anyio.CancelScope | None = None  # (its part in running the pipeline: _run_pipeline)
        self._warned_lazy = False
        self._said_unresolved = False  # (the first request served without an org: see _unresolved_said)
        self._said_reattributed = False  # (the first one billed to another org than the one gated: _reattributed)
        #: Requests running the app or recording their event; the shutdown waits for them (see _requests_recorded).
        self._in_flight = 0
        self._all_recorded: anyio.Event | None = None
        try:
            _check_arguments(
                app, settings, resolve_org, resolve_user, bill_server_errors, bill_auth_failures, attribution,
                idempotency_header, event_properties, quota, quota_config, client, transport, pipeline,
                shutdown_timeout, metrics_registry,
            )  # fmt: skip
            if settings is None:  # a client (or a pipeline's) given: its settings, as OrgBilling and LagoWebhooks take
                given = client if client is not None else pipeline.client if pipeline is not None else None
                given_settings = getattr(given, "settings", None)
                settings = given_settings if isinstance(given_settings, BillingSettings) else BillingSettings.from_env()
            self.settings = settings
            if on_unresolved is None:
                on_unresolved = "reject" if self.settings.on_unresolved == "reject" else "allow"
            if on_unresolved not in ("allow", "reject"):
                raise ConfigurationError(f"on_unresolved must be 'allow' or 'reject', got {on_unresolved!r}.")
            if unresolved_status is None:
                unresolved_status = self.settings.unresolved_status
            if (  # (an int: 401.0 went out as the status, which h11 refuses to send)
                isinstance(unresolved_status, bool)
                or not isinstance(unresolved_status, int)
                or unresolved_status not in (401, 403)
            ):
                raise ConfigurationError(  # (shown by its size past 4,300 digits: its repr raises ValueError)
                    f"unresolved_status must be 401 or 403 (an int), got {checks._shown(unresolved_status)}."
                )
            unresolved_status = int(unresolved_status)  # (HTTPStatus.FORBIDDEN: its plain number)
            self.resolve_org = resolve_org or default_org_resolver(self.settings)
            self.resolve_user = resolve_user or default_user_resolver(self.settings)
            self._sync_resolvers = not (_is_async(self.resolve_org) or _is_async(self.resolve_user))
            # Both resolvers left to their defaults: resolved in one pass (same result, a fraction of the cost).
            self._identify = default_identity(self.settings) if resolve_org is None and resolve_user is None else None
            self._heads: dict[tuple[str, str, str], str] = {}
            self._cors: CORSMiddleware | Literal[False] | None = None  # the app's, inside this one (see _outward)
            self._authentication: bool | None = None  # a Starlette AuthenticationMiddleware inside (see _auth_failure)
            # a Starlette app (router) inside, behind middlewares (see _unrouted); an HTTPSRedirectMiddleware before it
            self._routing_inside, self._https_redirect = _inner_routing(app)
            # (its redirect told from an endpoint's by the answer's Location: a watcher noting it, only then)
            self._watcher = _RedirectWatcher if self._https_redirect else _ResponseWatcher
            self.on_unresolved = on_unresolved
            self.unresolved_status = unresolved_status
            if bill_server_errors is None:
                bill_server_errors = self.settings.bill_server_errors
            self.bill_server_errors = bill_server_errors
            if bill_auth_failures is None:
                bill_auth_failures = self.settings.bill_auth_failures
            self.bill_auth_failures = bill_auth_failures
            self.attribution = attribution or AttributionConfig()
            self.idempotency_header = idempotency_header.lower().encode("latin-1") if idempotency_header else None
            if event_properties is not None and _is_async(event_properties):
                raise ConfigurationError(
                    "event_properties must be a plain function returning a mapping, not an async one: it runs on the "
                    "request's path when its response is over."
                )
            self.event_properties = event_properties
            # idempotent transaction id -> the timestamp of its first event (a retry's event is the same event)
            self._first_seen: TTLCache[str, float] = TTLCache(maxsize=100_000, ttl=86_400)
            self._shared_first_seen: SharedFirstSeen | None = None
            if self.idempotency_header is not None and self.settings.redis_url:
                self._shared_first_seen = SharedFirstSeen(self.settings.redis_url)
            self.exclude_paths = self.settings.exclude_paths
            self.shutdown_timeout = shutdown_timeout
            self._owned_client: LagoClient | None = None
            self._transport = transport
            self._given_client = client
            self._owns_pipeline = pipeline is None
            self._owns_quota = quota == "auto"
            if pipeline is None:
                pipeline = self._new_pipeline()
            else:
                _GIVEN_PIPELINE.add(self)  # (maybe shared with another app's middleware: see _shutdown)
            self._use_pipeline(pipeline)
            if quota_config is not None and quota != "auto":
                raise ConfigurationError(
                    "quota_config configures the automatic gate (quota='auto'): give a gate of yours its config."
                )
            self._quota_config = quota_config
            if quota == "auto":
                quota = _default_quota(self.settings, self.pipeline.client, quota_config)
            self.quota: QuotaGateProtocol | None = quota
            self._check_now: Callable[[str], QuotaDecision | None] | None = getattr(quota, "check_now", None)
            self.stats: dict[str, int] = {
                "requests": 0,
                "billed": 0,
                "blocked": 0,
                "unresolved": 0,
                "excluded": 0,
                "preflight": 0,
                "unbilled_errors": 0,
                "unrouted": 0,
                "ungated": 0,
            }
            if self.settings.metrics or metrics_registry is not None:
                register_metrics(self, metrics_registry)
        except (LagoIntegrationError, ValueError) as exc:
            if not _built_by_starlette():
                raise
            # Built inside a running app: Starlette builds ``app.add_middleware(...)`` middleware on the app's first
            # ASGI call, the lifespan startup. Raised there, servers take the error for "lifespan unsupported" (uvicorn
            # then serves, and fails every request with it): the lifespan reports it as a startup failure instead, so
            # the server stops with the message.
            self._config_error = exc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # The request path, inline (no extra coroutine): identity, gate, the app, then hand over the event.
        # One billing middleware per request: the outermost claims it. One around it that waits for the org (its
        # app resolves it) or excludes the path leaves the claim free (None): an inner one takes the request over,
        # and whichever decides its fate first with an org (billed, blocked) is its "biller" (see _claim).
        billing = scope.get(SCOPE_KEY)
        took_over = False
        if billing is None or not isinstance(billing, dict):  # (a _Billing: shared by deep copies of the scope)
            billing = scope[SCOPE_KEY] = _Billing(middleware=self)
        else:
            owner = billing.get("middleware", self)
            if owner is not None and owner is not self:
                self._nested()
                await self.app(scope, receive, send)
                return
            took_over = owner is None
            billing["middleware"] = self
        if not self._running:
            await self._start_lazily()
        quota = self.quota
        if quota is not None:  # lets LagoWebhooks() / billing_routes() reach this gate to invalidate it (on excluded
            billing["quota"] = quota  # paths too: they usually are; require_quota() asks the middlewares, not this)
        root_path: str = scope.get("root_path", "")
        if self._exclude_paths and self._is_excluded(scope["path"], root_path):
            self.stats["excluded"] += 1
            billing["middleware"] = None  # not this one's: an inner billing middleware may bill it
            await self.app(scope, receive, send)
            return
        preflight = False
        if scope["method"] == "OPTIONS" and _is_preflight(scope["headers"]):
            # A browser's CORS preflight: sent on its own before a cross-origin call, without credentials or the
            # custom headers' values. Not an API call (billed, it would double the browser's calls), and a 401/429
            # answer without the CORS middleware's headers would fail the real call in the browser.
            if self._preflights_answered_inside():  # a CORSMiddleware inside answers it: the app never sees it
                self.stats["preflight"] += 1
                billing["middleware"] = None  # as an excluded path: an inner billing middleware passes it on too
                await self.app(scope, receive, send)
                return
            # Else whoever answers it is told by its answer (see _PreflightWatcher): a CORS middleware further in (under
            # a Mount, not Starlette's), not billed; an endpoint taking OPTIONS (a client's call in a preflight's
            # shape), an API call like any other: gated, billed, rejected without an org (its answer replaced then).
            preflight = True
        else:
            self.stats["requests"] += 1
        started = time.time()  # the event's timestamp (the wall clock, as Lago bills it)
        began = time.monotonic()  # its duration's start (a wall clock stepped meanwhile does not stretch it)
        identity = self._identify(scope) if self._identify is not None else None
        if identity is None:
            identity = await self._resolve(scope)
        org_id, user_id = identity
        had_user = "user" in scope  # (else one an auth middleware inside this one sets is read when the app is done)
        state = scope.get("state")
        if type(state) is dict:  # publish_identity(), inline for the usual state (a plain dict): the hot path
            billing["org_id"] = org_id
            billing["user_id"] = user_id
            state["billing_org_id"] = org_id
            state["billing_user_id"] = user_id
        else:
            _publish(scope, billing, org_id, user_id)
        if org_id is None:
            answer: ASGIApp | None = None
            if not preflight:
                if AMBIGUOUS_CREDENTIALS in scope:  # (the bearer token sent twice: see its docstring)
                    self.stats["ambiguous_credentials"] = self.stats.get("ambiguous_credentials", 0) + 1
                    answer = self._outward(_ambiguous_answer(scope[AMBIGUOUS_CREDENTIALS]))
                elif self.on_unresolved == "reject":
                    answer = self._rejection()
            if answer is not None:
                self.stats["unresolved"] += 1
                billing[_COPIES] = None  # (the request is over: see _Billing)
                await answer(scope, receive, send)
                return
            await self._call_unresolved(scope, receive, send, started, began, root_path, preflight)
            return
        if took_over and not self._claim(billing):  # (the one waiting around it bills nothing, gates nothing)
            await self.app(scope, receive, send)  # pragma: no cover - an org found before the app is found first
            return

        decision: QuotaDecision | None = None
        watcher = (
            self._watcher(scope, self.attribution, send) if not preflight else _PreflightWatcher(scope, self, send)
        )
        watcher.began = began
        if quota is not None:
            decision = self._check_now(org_id) if self._check_now is not None else None
            if decision is None:
                checked = quota.check(org_id)  # (a plain check() may answer at once: see QuotaGateProtocol)
                decision = checked if isinstance(checked, QuotaDecision) else await checked
            if not decision.allowed:
                if not preflight:
                    self.stats["blocked"] += 1
                    billing[_COPIES] = None  # (the request is over: see _Billing)
                    await self._outward(decision.response(), expose=True)(scope, receive, send)
                    return
                assert isinstance(watcher, _PreflightWatcher)  # the gate's answer, unless a CORS middleware's
                watcher.on_start = watcher.replaced_unless_cors(
                    self._outward(decision.response(), expose=True), scope, receive
                )
            else:
                watcher.extra_headers = decision.headers
                # for require_quota() after the app's auth, when that auth sets another org than this one: it gates the
                # request again as that org, and needs the watcher for the answer's headers (see _gate_again). Taken
                # out when the request ends (the watcher refers to the billing dict: no reference cycle left).
                billing["gated"] = watcher
        self._in_flight += 1
        try:
            await self.app(scope, receive, watcher)
        except QuotaExceededError as exc:
            refusal: QuotaDecision = exc.decision
            if billing.get("gated", watcher) is not None or billing.get("decision") is not refusal:
                watcher.crashed(exc)  # (not the refusal of a request gated again: an app's own use of the error)
                raise
            # require_quota() refused the org the app's auth set, and nothing in the app answered its error: the
            # gate's answer (when something did, the watcher put the gate's answer in its place: see _gate_again)
            if watcher.send is not _discard:
                watcher.on_start = None
                await self._outward(refusal.response(), expose=True)(scope, receive, send)
        except BaseException as exc:  # (a cancellation, KeyboardInterrupt... cut it too: see crashed)
            watcher.crashed(exc)
            raise
        finally:
            try:
                # (and the cycle billing dict -> watcher -> billing dict broken; None: require_quota() gated it again)
                gated_again = billing.pop("gated", watcher) is None
                # (None from now on: a deep copy of the scope made once the request is over is not remembered)
                copies = billing.setdefault(_COPIES, None)
                if gated_again:  # as the org the app's auth set: that org's decision, or its refusal
                    scope, org_id, user_id, decision = self._gated_again_end(scope, billing, org_id, user_id, decision)
                elif copies is not None:  # the app ran on deep copies of the scope: its route and state there
                    scope, org_id, user_id, decision = self._read_copies(scope, billing, org_id, user_id, decision)
                elif self._identify is not None:
                    # the default resolvers: an org or user the app's auth set while it ran wins
                    state = scope.get("state")
                    # (the usual state has neither: found absent at once; one set before the app ran is the same)
                    late = None
                    if type(state) is dict and ("org_id" in state or "user_id" in state):
                        if state.get("org_id") not in (None, org_id) or state.get("user_id") not in (None, user_id):
                            late = self._authenticated_late(state, org_id, user_id, decision)
                    if not had_user and "user" in scope:
                        # AuthenticationMiddleware inside this one: request.user is set while the app runs, and wins
                        # over the headers (the client's claim), as the resolvers' order says (after request.state)
                        was_org, was_user, was_decision = late if late is not None else (org_id, user_id, decision)
                        if was_org is not None:
                            found = late_user(scope, was_org, was_user)
                            late = self._late(found, was_org, was_user, was_decision) or late
                    if late is not None:
                        org_id, user_id, decision = late
                if org_id is None:  # the app's auth set an org that is no id (bytes...): unbilled, said (see _late)
                    self.stats["unresolved"] += 1
                    if preflight:  # (a call in a preflight's shape: counted as _preflight_unbilled counts one)
                        self.stats["requests"] += 1
                elif preflight and self._preflight_unbilled(org_id, decision, watcher):
                    pass
                elif gated_again and decision is not None and not decision.allowed:
                    self.stats["blocked"] += 1  # the gate's answer went out: nothing billed (nor counted)
                elif self._shared_first_seen is None:
                    self._record(scope, org_id, user_id, watcher, started, root_path, decision)
                else:
                    await self._share_and_record(scope, org_id, user_id, watcher, started, root_path, decision)
            finally:
                self._in_flight -= 1
                if self._all_recorded is not None and not self._in_flight:
                    self._all_recorded.set()

    def _preflights_answered_inside(self) -> bool:
        """Whether a Starlette ``CORSMiddleware`` is among the middlewares inside this one (down to the app's router):
        it answers every CORS preflight itself (OPTIONS with ``Origin`` and ``Access-Control-Request-Method``, as
        :func:`_is_preflight` tells them), so none reaches an endpoint."""
        cors = self._cors
        if cors is None:
            found = _inner_cors(self.app)
            if found is None:  # a Starlette app not built yet, declaring none: none in it
                return False
            cors = self._cors = found
        return cors is not False

    def _preflight_unbilled(self, org_id: str, decision: QuotaDecision | None, watcher: _ResponseWatcher) -> bool:
        """The end of a request in a CORS preflight's shape that no Starlette ``CORSMiddleware`` inside answered:
        whether it is left unbilled (a CORS middleware's preflight answer, or the gate's answer that replaced an
        endpoint's); else it was an API call, billed as one."""
        if getattr(watcher, "cors", False):
            self.stats["preflight"] += 1
            if decision is not None and decision.allowed and self.quota is not None:
                self.quota.settle(org_id, decision, tokens=0, billed=False)  # its reserved call released
            return True
        self.stats["requests"] += 1
        if decision is not None and not decision.allowed:
            self.stats["blocked"] += 1
            return True
        return False

    def _read_copies(
        self,
        scope: Scope,
        billing: dict[str, Any],
        org_id: str,
        user_id: str | None,
        decision: QuotaDecision | None,
    ) -> tuple[Scope, str | None, str | None, QuotaDecision | None]:
        """The end of a request whose scope was deep-copied inside this middleware (see _Billing): the copy the app
        ran on (its route, its state: what the request is billed as) and, with the default resolvers, the org or user
        the app's auth set in a copy's state (an org that is no id: ``None``, see :meth:`_late`). The copies are let
        go by the outermost billing middleware (none waits around)."""
        copies = _scope_copies(billing, release="waiting" not in billing)
        app_scope = _app_scope(scope, copies)
        if self._identify is not None:
            for copied in (scope, *copies):
                late = self._authenticated_late(copied.get("state"), org_id, user_id, decision)
                if late is not None:
                    return app_scope, *late
        return app_scope, org_id, user_id, decision

    @property
    def exclude_paths(self) -> tuple[str, ...]:
        """Path prefixes never billed nor gated (``LAGO_EXCLUDE_PATHS``), by whole segments: ``/billing`` covers
        ``/billing`` and ``/billing/...``, not ``/billing-export``."""
        return self._exclude_paths

    @exclude_paths.setter
    def exclude_paths(self, prefixes: tuple[str, ...]) -> None:
        # (checked as BillingSettings checks them: a prefix set here that is none was silently never matched)
        self._exclude_paths = excluded_prefixes(prefixes)
        stripped = [prefix.rstrip("/") for prefix in self._exclude_paths]
        self._excluded_exact = frozenset(stripped)
        self._excluded_under = tuple(prefix + "/" for prefix in stripped)

    def _is_excluded(self, path: str, root_path: str) -> bool:
        """Whether the path is excluded, as the app sees it (served under a ``root_path``, e.g. ``uvicorn
        --root-path /api``, the scope's path starts with it) or as the client asked it."""
        if path in self._excluded_exact or path.startswith(self._excluded_under):
            return not _dot_segments(path)
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :] or "/"
            return (path in self._excluded_exact or path.startswith(self._excluded_under)) and not _dot_segments(path)
        return False

    # ---------------------------------------------------------------- lifespan

    def _new_pipeline(self) -> EventPipeline:
        client = self._given_client
        if client is None:
            client = self._owned_client = LagoClient(self.settings, transport=self._transport)
        return EventPipeline(client, spool_path=self.settings.spool_path, shutdown_timeout=self.shutdown_timeout)

    def _use_pipeline(self, pipeline: EventPipeline) -> None:
        self.pipeline = pipeline
        self._submit: Callable[[_Facts], object] = (
            pipeline.lane(self._build_event)
            if hasattr(pipeline, "lane")
            else lambda facts: pipeline.submit(functools.partial(self._build_event, facts))
        )

    def _renew(self) -> None:
        """Before background work starts again after a shutdown (a second ``with TestClient(app)``, an app served
        again): the pipeline, client and gate this middleware made are made anew; given ones must be open."""
        self._stopping = False
        if not getattr(self.pipeline, "closed", False):
            return
        if not self._owns_pipeline:
            raise ConfigurationError(
                "The EventPipeline given to OrgBillingMiddleware(pipeline=...) is closed: give it an open one."
            )
        self._use_pipeline(self._new_pipeline())
        if self._owns_quota and self.quota is not None:
            self.quota = _default_quota(self.settings, self.pipeline.client, self._quota_config)
            self._check_now = getattr(self.quota, "check_now", None)
        mirror_renewed(self)  # multiprocess metrics: the new pipeline and gate counted even if gone before a sync

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        background_scope, background_ended = anyio.CancelScope(), anyio.Event()
        startup_failed: list[Message] = []  # the app's lifespan.startup.failed, not yet told to the server

        async def background(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
            try:
                with background_scope:
                    await self._background(task_status=task_status)
            finally:
                background_ended.set()

        async def send_wrapper(message: Message) -> None:
            # Flushed whether the app's own shutdown succeeded or not: its failure is no reason to lose the events.
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self._shutdown()
            elif message["type"] == "lifespan.startup.failed":
                # The app's own startup failed: its background is stopped, and the server hears of it only once the
                # task group has ended, so that the lifespan call ends with it. hypercorn looks whether the call has
                # ended as soon as it is told; from Python 3.12 its ``asyncio.wait_for`` no longer yields in between,
                # and anyio's task group yields at least once as it ends: a call still ending its task group was taken
                # for a server to run, the app serving without its startup. Raised to the app as hypercorn's own send
                # raises there (LifespanFailureError), so that its call ends.
                self._running = False
                background_scope.cancel()
                await background_ended.wait()
                startup_failed.append(message)
                raise _StartupFailed("the app's lifespan startup failed: told to the server as its lifespan call ends")
            await send(message)

        received = False

        async def receive_wrapper() -> Message:
            nonlocal received
            received = True
            if startup_failed:  # (an app going on after its failed startup, the error above swallowed: told now)
                await send(startup_failed.pop())
            return await receive()

        if self._config_error is not None:
            await self._startup_failed(receive, send, self._config_error)
        self._renew()
        started = False
        app_error: Exception | None = None
        try:
            async with anyio.create_task_group() as tasks:
                await tasks.start(background)
                started = self._running = True
                try:
                    try:
                        await self.app(scope, receive_wrapper, send_wrapper)
                    except Exception as exc:
                        if received:
                            raise
                        unsupported: Exception | None = exc
                    else:
                        unsupported = None
                    if not received:
                        # The app does not speak the lifespan (Django's ASGIHandler and asgiref's WsgiToAsgi raise
                        # on it, many plain ASGI apps return): it ended without reading the startup. The server
                        # then served without one (uvicorn: "lifespan protocol appears unsupported"), this
                        # middleware started lazily on the first request, said it "got no ASGI lifespan", and a
                        # SIGTERM lost what its memory held. The middleware got the lifespan: it answers it itself.
                        await self._own_lifespan(receive, send, unsupported)
                except Exception as exc:  # raised as it is after the task group, not wrapped in an ExceptionGroup
                    app_error = exc
                finally:
                    self._running = False
                    tasks.cancel_scope.cancel()
        except Exception as exc:
            if started:
                raise
            await self._startup_failed(receive, send, _start_error(exc))
        if isinstance(app_error, _StartupFailed):  # the app's own error, if it raised one as it told the failure
            app_error = app_error.__context__ if isinstance(app_error.__context__, Exception) else None
        if startup_failed:
            # Told now, the app's error raised with it: hypercorn raises LifespanFailureError from this send (the call
            # ends with it, the app's error its context; so does the send of an OrgBillingMiddleware around this one,
            # which gets the app's error back that way); uvicorn takes it and gets the app's error.
            try:
                if app_error is not None:
                    raise app_error
            finally:
                await send(startup_failed.pop())
        if app_error is not None:
            raise app_error

    async def _own_lifespan(self, receive: Receive, send: Send, unsupported: Exception | None) -> None:
        """The lifespan of an app that does not speak it, answered by this middleware: its background work (running
        already) serves until the server's shutdown, which delivers what is pending, as with an app that speaks it."""
        logger.info(
            "The app inside OrgBillingMiddleware does not support the ASGI lifespan (%s): the middleware answers it "
            "itself, its delivery flushed on the server's shutdown.",
            "it returned without reading it" if unsupported is None else f"{type(unsupported).__name__}: {unsupported}",
        )
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
        if message["type"] == "lifespan.shutdown":
            try:
                await self._shutdown()
            except Exception as exc:  # (said to the server as an app's failed shutdown is, then raised)
                await send({"type": "lifespan.shutdown.failed", "message": f"{type(exc).__name__}: {exc}"})
                raise
            await send({"type": "lifespan.shutdown.complete"})

    async def _background(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The pipeline's and the gate's background work. An error that stops them once started is logged and
        counted, not raised: it would end the app's own lifespan, which shares their task group (the app's shutdown
        code run while the server serves on). One before they started is raised (the startup fails)."""
        started = False
        delay = self.restart_delay
        while True:
            try:
                async with anyio.create_task_group() as tasks:
                    await tasks.start(self._run_pipeline)
                    if self.quota is not None:
                        await tasks.start(self.quota.run)
                    if not started:
                        started = True
                        task_status.started()
                return  # (ended: closed)
            except Exception:
                if not started:
                    raise
                self.stats["background_errors"] = self.stats.get("background_errors", 0) + 1
                logger.exception(
                    "The billing background work stopped on an error; it starts again in %.0f s (events wait in the "
                    "outbox meanwhile). Please report this error.",
                    delay,
                )
            await anyio.sleep(delay)  # started again here, in the same task group (the lifespan's, or the lazy one)
            delay = min(delay * 2, 60.0)

    async def _run_pipeline(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The pipeline's work (``pipeline.run``). A pipeline given to this middleware may run already, on this thread:
        shared with the billing middleware of another app (mounted beside this one, or served by another server on
        the same loop), or run by the application itself. Run again, it refused ("already running"), and every
        request of this app failed with that: that run is followed instead, and the pipeline run here if it stops
        without being closed."""
        pipeline = self.pipeline
        with anyio.CancelScope() as self._pipeline_scope:  # (cancelled by _shutdown when others still serve)
            stopped = running_here(pipeline)
            if stopped is None:
                await pipeline.run(task_status=task_status)
                return
            task_status.started()
            while stopped is not None:
                await stopped.wait()
                stopped = running_here(pipeline)  # (another follower may have run it again meanwhile)
            if not getattr(pipeline, "closed", False):
                await pipeline.run()

    async def _startup_failed(self, receive: Receive, send: Send, error: Exception) -> None:
        """Answer the lifespan startup with the error (uvicorn logs the message and exits; a test client raises it)."""
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.failed", "message": f"{type(error).__name__}: {error}"})
        raise error

    async def _start_lazily(self) -> None:
        """The server sent no lifespan: run the background work in a task of the running loop (the first request
        waits for it to start, once). If it cannot start, that request fails with the reason (a later one tries
        again); if its loop ends (a test client without ``with``), the next request starts it on its own loop."""
        if self._config_error is not None:
            raise self._config_error
        if self._lazy_started is not None:  # another request is starting it: wait for that, never start a second
            await self._lazy_started.wait()
            if self._running:
                return
            raise self._lazy_error or ConfigurationError("OrgBillingMiddleware's background delivery is not running.")
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # trio (hypercorn -k trio): a system task, cancelled as trio.run() ends
            loop = None
        self._renew()
        started = self._lazy_started = anyio.Event()
        failure: list[BaseException] = []
        if loop is None:
            self._spawn_on_trio(started, failure)
        else:
            task = loop.create_task(self._run_detached(started, failure), name="lago-org-billing")
            task.add_done_callback(self._lazy_ended)
            self._lazy_task = task
        await started.wait()
        if failure:
            error = _start_error(failure[0])
            self._lazy_error = error  # for the requests that waited on this start (a later one tries again)
            raise error
        _said_at_exit(self)
        if not self._warned_lazy:  # (_run_detached marked it running)
            self._warned_lazy = True
            logger.warning(
                "OrgBillingMiddleware got no ASGI lifespan (is its app mounted in another? Starlette does not pass the "
                "lifespan on to mounted apps): its delivery started with the first request, and has no shutdown to "
                "flush on. What it holds in memory is delivered when the event loop ends, but a server exiting on "
                "SIGTERM (uvicorn) does not wait for that: add the middleware to the outermost app, call its "
                "aclose() from that app's lifespan, or set LAGO_SPOOL_PATH. Logged once."
            )

    async def _run_detached(self, started: anyio.Event, failure: list[BaseException]) -> None:
        try:
            async with anyio.create_task_group() as tasks:
                await tasks.start(self._background)
                # running now, whatever becomes of the request that started it (cancelled while waiting for this)
                self._lazy_error = None
                self._running = True
                started.set()
        except Exception as exc:  # kept for the waiting request (once started, _background logs what stops it)
            if started.is_set():  # pragma: no cover - _background raises only before it started
                logger.exception("The billing background work stopped: events are no longer delivered")
            else:
                failure.append(exc)
        finally:
            if not started.is_set():  # failed or cancelled before it started: the waiting request must not hang
                if not failure:
                    failure.append(RuntimeError("cancelled before it started"))
                started.set()
            with anyio.CancelScope(shield=True):  # connections belong to this loop, which may be ending
                # (delivery's last chance, just ended, settled the tokens of the events it built after the gate's work
                # ended with it: written now, not left in memory when the loop, and maybe the process, ends)
                if isinstance(self.quota, QuotaGate):
                    await self.quota._loop_ended()
                if self._shared_first_seen is not None:
                    await self._shared_first_seen.aclose()
                if self._owned_client is not None:
                    await close_idle_quietly(self._owned_client, pool=True)

    def _spawn_on_trio(self, started: anyio.Event, failure: list[BaseException]) -> None:
        import trio

        done = self._lazy_done = anyio.Event()

        async def run() -> None:  # (a system task must not raise: _run_detached keeps its errors for the request)
            try:
                await self._run_detached(started, failure)
            finally:
                done.set()
                if self._lazy_done is done:  # as _lazy_ended: the next request starts it again
                    self._lazy_done = None
                    self._lazy_started = None
                    self._running = False

        trio.lowlevel.spawn_system_task(run, name="lago-org-billing")

    def _lazy_ended(self, task: asyncio.Task[None]) -> None:
        if self._lazy_task is task:  # its loop is gone, or it failed: the next request starts it again
            self._lazy_task = None
            self._lazy_started = None
            self._running = False

    async def aclose(self) -> None:
        """Deliver what is pending (within ``shutdown_timeout``) and stop background work started without a
        lifespan. Servers with a lifespan do this on shutdown by themselves."""
        if (
            self._config_error is None
            and not self._running
            and self._lazy_task is None
            and self._lazy_done is None
            and not getattr(self.pipeline, "closed", True)
            and getattr(self.pipeline, "stats", {}).get("depth", 0) > 0
        ):
            # Started lazily on a loop that has ended since (a test client without ``with``, a loop per request): its
            # spool holds what it did not deliver. Closed as it is, that was left for the next start, whose new gate
            # did not count it (an org over its limit served again): run now to deliver it, then closed.
            await self._start_lazily()
        await self._shutdown()
        task = self._lazy_task
        if task is not None:
            await task
            # (a finished task returns at once, before its done callback ran: the callback, finding another task or
            # none, then left _lazy_started set, and every later request met a "not running" pipeline)
            self._lazy_ended(task)
        if self._lazy_done is not None:
            await self._lazy_done.wait()
        self._running = False

    async def _shutdown(self) -> None:
        if self._config_error is not None:
            return
        self._stopping = True
        spent = await self._requests_recorded()
        # the whole shutdown within shutdown_timeout (the server's kill grace period is sized on it), delivery given
        # half of it at least
        timeout = max(self.shutdown_timeout - spent, self.shutdown_timeout / 2)
        if self._shared_with_others():
            # A pipeline given to the middlewares of several apps, another still serving: closed here, it dropped that
            # app's every event from now on ("the pipeline is closed"). Delivered now; the last one to stop closes it
            # (its run, if it was this one's, goes on in the other's task: see _run_pipeline).
            await self.pipeline.flush(timeout)
            if self._pipeline_scope is not None:
                self._pipeline_scope.cancel()  # this one's part in its run ends (the others run it on)
        else:
            await self.pipeline.aclose(timeout)
        # The gate after delivery: the events delivery builds as it closes (those of the requests of its last
        # flush_interval) settle their tokens in the gate, whose writer, still running, writes them to the fleet's
        # counts. Closed first, the gate kept them in this process only: every org's last tokens under-counted by the
        # other workers until its next refresh.
        if self.quota is not None:
            await self.quota.aclose()
        if self._owned_client is not None:
            await self._owned_client.aclose()
        if self._shared_first_seen is not None:
            await self._shared_first_seen.aclose()

    def _shared_with_others(self) -> bool:
        """Whether this middleware's pipeline was given to another billing middleware too that serves on (started,
        not shutting down)."""
        if self._owns_pipeline:
            return False
        return any(
            other is not self and other.pipeline is self.pipeline and other._running and not other._stopping
            for other in list(_GIVEN_PIPELINE)
        )

    async def _requests_recorded(self) -> float:
        """Wait (at most half of ``shutdown_timeout``, 5 s at most) for the requests still running to record their
        events before the pipeline closes; the seconds it took. A server past its graceful-shutdown timeout cancels
        them and sends the lifespan shutdown without waiting for them to end (uvicorn), and a stream cut so records
        its event a few loop turns later (its app's task groups end first): into a closed pipeline, that event was
        dropped. One still running past the wait is not waited for: delivery keeps the rest of the time."""
        if self._in_flight <= 0:
            return 0.0
        began = anyio.current_time()
        wait = min(self.shutdown_timeout / 2, _REQUESTS_WAIT_MAX)
        recorded = self._all_recorded = anyio.Event()
        try:
            with anyio.move_on_after(wait):
                await recorded.wait()
        finally:
            self._all_recorded = None
        if self._in_flight > 0:
            self.stats["unfinished_at_shutdown"] = self.stats.get("unfinished_at_shutdown", 0) + self._in_flight
            logger.warning(
                "Shutdown: %d requests still running after %.1f s: billing delivery closes now, and their events, "
                "recorded when they end, are dropped. Give the server a graceful-shutdown timeout (uvicorn "
                "--timeout-graceful-shutdown) so that it ends them first.",
                self._in_flight,
                wait,
            )
        return anyio.current_time() - began

    # -------------------------------------------------------------------- http

    def _resolve_now(self, scope: Scope) -> tuple[str | None, str | None]:
        """:meth:`_resolve` with synchronous resolvers only (an async one counts as unresolved here)."""
        org = resolve_now(self.resolve_org, scope)
        if not (org is None or isinstance(org, str)):
            _discard_awaitable(org)
            return None, None
        user = resolve_now(self.resolve_user, scope) if org is not None else None
        if not (user is None or isinstance(user, str)):
            _discard_awaitable(user)
            user = None
        return org, user

    async def _resolve(self, scope: Scope) -> tuple[str | None, str | None]:
        """The configured resolvers (sync or async): ``(org_id, user_id)``, the user only when there is an org."""
        org = resolve_now(self.resolve_org, scope)
        org_id = org if org is None or isinstance(org, str) else await org
        user_id = None
        if org_id is not None:
            user = resolve_now(self.resolve_user, scope)
            user_id = user if user is None or isinstance(user, str) else await user
        return org_id, user_id

    async def _resolve_late(self, scope: Scope, billing: dict[str, Any]) -> tuple[str | None, str | None]:
        """:meth:`_resolve` once the app ran: on the scope, then on the deep copies of it the app ran with (their
        ``request.state``, where its auth set the org: hypercorn's ``ProxyFixMiddleware`` between them)."""
        identity = await self._resolve(scope)
        if identity[0] is None and _COPIES in billing:
            for copied in _scope_copies(billing):
                identity = await self._resolve(copied)
                if identity[0] is not None:
                    break
        return identity

    async def _call_unresolved(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        started: float,
        began: float,
        root_path: str,
        preflight: bool = False,
    ) -> None:
        """No org before the app ran: serve it, and look again once the endpoint has answered, since auth done
        in endpoint dependencies (FastAPI ``Depends``) sets ``request.state`` only then. The quota is checked only
        if the app calls :func:`require_quota` once it knows the org (its over-quota error is answered here).
        ``preflight``: a request in a CORS preflight's shape, let through under ``on_unresolved="reject"`` (a
        browser's has no credentials) unless it is answered by an endpoint without an org (then rejected)."""
        identity: tuple[str | None, str | None] = (None, None)
        answered = blocked = False
        billing = scope[SCOPE_KEY]
        billing["middleware"] = None  # an inner billing middleware that knows the org takes the request over
        # the billing middlewares waiting for the org, innermost first: require_quota() asks them in turn
        waiting: list[OrgBillingMiddleware] = billing.setdefault("waiting", [])
        outermost = not waiting  # (lets go of the deep copies of the scope at the end: see _Billing)
        waiting.insert(0, self)
        if self._sync_resolvers:  # for get_current_org(): this one's resolvers, then those of one around it
            outer: Callable[[Scope], tuple[str | None, str | None]] | None = billing.get("resolve_now")

            def resolve_now(scope: Scope) -> tuple[str | None, str | None]:
                found = self._resolve_now(scope)
                return found if found[0] is not None or outer is None else outer(scope)

            billing["resolve_now"] = resolve_now

        async def resolve_late() -> Callable[[Send], Awaitable[None]] | None:
            nonlocal identity, answered, blocked
            answered = True
            if preflight and getattr(watcher, "cors", False):  # a CORS middleware's answer to a preflight: no API call
                return None
            if billing.get("biller") not in (None, self):  # an inner billing middleware has it
                return None
            decision = billing.get("decision")
            if decision is not None and not decision.allowed:
                # require_quota() refused it and the app answered its error (an exception handler): the gate's
                # answer goes out instead, whatever the app made of it
                blocked = True
                self._claim(billing)
                response = self._outward(decision.response(), expose=True)
                return lambda send: response(scope, receive, send)
            identity = await self._resolve_late(scope, billing)
            if identity[0] is not None:
                self._claim(billing)
            elif preflight and self.on_unresolved == "reject" and billing.get("decision_org") is None:
                rejection = self._rejection()  # an endpoint's answer in a preflight's shape: rejected as any call
                return lambda send: rejection(scope, receive, send)
            _publish(scope, billing, *identity)
            if decision is not None and billing.get("decision_org") == identity[0]:
                watcher.extra_headers = decision.headers  # require_quota()'s RateLimit-* headers
            return None

        watcher = (
            self._watcher(scope, self.attribution, send) if not preflight else _PreflightWatcher(scope, self, send)
        )
        watcher.on_start = resolve_late
        watcher.began = began
        self._in_flight += 1
        try:
            await self.app(scope, receive, watcher)
        except QuotaExceededError as exc:
            if not answered:  # straight from require_quota(): answer it here
                blocked = True
                self._claim(billing)
                await self._outward(exc.decision.response(), expose=True)(scope, receive, send)
            elif not blocked:  # pragma: no cover - raised after the app answered something else
                raise
        except BaseException as exc:  # (a cancellation, KeyboardInterrupt... cut it too: see crashed)
            watcher.crashed(exc)
            raise
        finally:
            try:
                if billing.get("biller") not in (None, self):  # an inner billing middleware billed (or blocked) it
                    self.stats["handed_over"] = self.stats.get("handed_over", 0) + 1
                elif preflight and self._preflight_unresolved_end(billing, watcher):
                    pass
                else:
                    await self._settle_unresolved(
                        scope, billing, watcher, identity, answered, blocked, started, root_path
                    )
            finally:
                if outermost:  # the copies let go, none remembered from now on (see _Billing)
                    billing[_COPIES] = None
                self._in_flight -= 1
                if self._all_recorded is not None and not self._in_flight:
                    self._all_recorded.set()

    def _preflight_unresolved_end(self, billing: dict[str, Any], watcher: _ResponseWatcher) -> bool:
        """:meth:`_preflight_unbilled` for one without an org before the app ran: True (nothing more to settle) when a
        CORS middleware answered it; else it is counted as a request and settled as any other."""
        if not getattr(watcher, "cors", False):
            self.stats["requests"] += 1
            return False
        self.stats["preflight"] += 1
        decision = billing.get("decision")
        if decision is not None and decision.allowed and self.quota is not None:  # (a require_quota() inside)
            self.quota.settle(billing["decision_org"], decision, tokens=0, billed=False)
        return True

    def _claim(self, billing: dict[str, Any]) -> bool:
        """Become the request's biller, unless another billing middleware is already (nested ones, innermost first:
        the others bill nothing). require_quota() then asks this one only (its resolvers, its gate)."""
        biller = billing.setdefault("biller", self)
        if biller is self and "waiting" in billing:
            billing["waiting"] = [waiting for waiting in billing["waiting"] if waiting is self]
        return biller is self

    async def _settle_unresolved(
        self,
        scope: Scope,
        billing: dict[str, Any],
        watcher: _ResponseWatcher,
        identity: tuple[str | None, str | None],
        answered: bool,
        blocked: bool,
        started: float,
        root_path: str,
    ) -> None:
        """The end of :meth:`_call_unresolved`: the org as the app left it known, and its event (settled and recorded
        even when the request is cancelled meanwhile; the cancellation goes on after)."""
        cancelled: BaseException | None = None
        if not answered and not blocked:  # the app failed before answering: its auth may have run by now
            try:
                identity = await self._resolve_late(scope, billing)
            except Exception:  # never hide the app's own error behind a resolver's
                logger.exception("Resolving the org of a failed request")
            except BaseException as exc:  # cancelled: what require_quota() knew is settled below all the same
                cancelled = exc
        if identity[0] is None and billing.get("decision_org") is not None:
            identity = (billing["decision_org"], None)  # require_quota() reserved a call for it
        if isinstance(billing.get(_COPIES), _Copies):  # the copy the app ran on: its route (see _Billing)
            scope = _app_scope(scope, _scope_copies(billing))
        org_id, user_id = identity
        decision = billing.get("decision") if billing.get("decision_org") == org_id else None
        if decision is None and billing.get("decision") is not None and self.quota is not None and not blocked:
            # require_quota() reserved a call for another org than the one the app left (it changed
            # request.state.org_id after): released, or that org would be charged a call it is not billed for
            self.quota.settle(billing["decision_org"], billing["decision"], tokens=0, billed=False)
        if org_id is not None and not self._claim(billing):  # an inner billing middleware has it, after all
            self.stats["handed_over"] = self.stats.get("handed_over", 0) + 1
        elif blocked:
            self.stats["blocked"] += 1
        elif org_id is None:
            self.stats["unresolved"] += 1
            if (
                not self._said_unresolved
                and self.on_unresolved == "allow"
                and self._billable(scope, watcher, root_path)
            ):
                self._unresolved_said(scope)
        else:  # resolved only after the app ran: billed (and counted), gated only through require_quota()
            if decision is None and self.quota is not None and self._billable(scope, watcher, root_path):
                self._ungated(org_id)  # (an answer not billed was not ungated either)
            decision = decision or QuotaDecision()
            if self._shared_first_seen is None or cancelled is not None:
                self._record(scope, org_id, user_id, watcher, started, root_path, decision)
            else:
                await self._share_and_record(scope, org_id, user_id, watcher, started, root_path, decision)
        if cancelled is not None:
            raise cancelled

    def _authenticated_late(
        self, state: object, org_id: str, user_id: str | None, decision: QuotaDecision | None
    ) -> tuple[str | None, str | None, QuotaDecision | None] | None:
        """The identity to bill when the app set ``request.state.org_id`` to another org, or ``request.state.user_id``
        to another user, while it ran (see :func:`late_identity`); ``None`` when it set neither. A user alone keeps
        the org and its decision (gated as it is billed). Another org: the call reserved for the one found before
        is released, and the request counted ``reattributed`` (it was gated as that other org)."""
        return self._late(late_identity(state, org_id, user_id), org_id, user_id, decision)

    def _late(
        self,
        found: tuple[str | None, str | None] | None,
        org_id: str,
        user_id: str | None,
        decision: QuotaDecision | None,
    ) -> tuple[str | None, str | None, QuotaDecision | None] | None:
        """:meth:`_authenticated_late` for the identity ``found`` after the app ran (``None``: none). An org of
        ``None``: the app's auth set one that is no id (``bytes``...): unresolved, its call released, nothing billed
        (not the org found before, the client's header)."""
        if found is None:
            return None
        late, late_user = found
        if late is None:
            if decision is not None and self.quota is not None:
                self.quota.settle(org_id, decision, tokens=0, billed=False)
            return None, None, None
        if late == org_id:  # the user only (the org from the header or request.user): nothing to move
            return org_id, late_user, decision
        if decision is not None and self.quota is not None:
            self.quota.settle(org_id, decision, tokens=0, billed=False)
        self._reattributed(org_id, late)
        if self.quota is None:
            return late, late_user, None
        # counted for it all the same (the call, then its tokens), as a request whose org came after the app ran; not
        # counted ungated though: it had an org before the app ran, and was gated (as that one: "reattributed")
        return late, late_user, QuotaDecision()

    def _reattributed(self, org_id: str, late: str, *, gated_again: bool = False) -> None:
        """Count a request gated as ``org_id`` before the app ran and billed to ``late``, the org the app's auth set;
        say it once, unless :func:`require_quota` gated it again as ``late`` (the quota was checked for the org billed:
        nothing to fix; said for the first request that was not, on a route without it)."""
        self.stats["reattributed"] = self.stats.get("reattributed", 0) + 1
        if gated_again or self._said_reattributed:
            return
        self._said_reattributed = True
        logger.warning(
            "A request resolved to org %r before the app ran was billed to org %r, which the app set in "
            "request.state.org_id while it ran (auth in an endpoint dependency?): its quota was checked for the "
            "other org only, so a caller over its own limit naming an org with quota left (LAGO_ORG_HEADER) is "
            "served. Add Depends(require_quota) after your auth: it gates such a request again as the org your auth "
            "set (refused 429/402 over its limit). Or resolve the org before the app (an auth middleware), or let "
            "only your auth name it (leave LAGO_ORG_HEADER unset). "
            "Counted in stats['reattributed']; logged once.",
            org_id,
            late,
        )

    def _gated_again_end(
        self, scope: Scope, billing: dict[str, Any], org_id: str, user_id: str | None, decision: QuotaDecision | None
    ) -> tuple[Scope, str | None, str | None, QuotaDecision | None]:
        """The end of a request gated before the app ran as ``org_id`` (its ``decision``) that :func:`require_quota`
        gated again as the org the app's auth set (see :meth:`_gate_again`): the scope the app ran on, and the identity
        and decision it is billed with, as :meth:`_read_copies` and :meth:`_authenticated_late` find them; the calls
        reserved for the orgs it is not billed to released (exactly one counted, for the org billed). A refusal is
        returned as the decision (nothing billed: the gate's answer went out)."""
        app_scope, found = scope, late_identity(scope.get("state"), org_id, user_id)
        if billing.get(_COPIES) is not None:  # (the copies the app ran on: its route and state there, see _Billing)
            copies = _scope_copies(billing, release="waiting" not in billing)
            app_scope = _app_scope(scope, copies)
            for copied in copies:
                if found is not None:
                    break
                found = late_identity(copied.get("state"), org_id, user_id)
        late, late_user = found if found is not None else (org_id, user_id)
        again: QuotaDecision = billing["decision"]
        again_org: str = billing["decision_org"]
        quota = self.quota
        assert quota is not None  # (it gated the request)
        if not again.allowed or late != org_id:  # the header org's call released: it is not billed
            if decision is not None:
                quota.settle(org_id, decision, tokens=0, billed=False)
        if not again.allowed:  # refused (nothing reserved)
            return app_scope, again_org, late_user, again
        if late == again_org:  # the org gated again is the one billed: its call
            self._reattributed(org_id, late, gated_again=True)
            return app_scope, late, late_user, again
        # the app set yet another org after require_quota() (or the header's again): the call reserved for the org
        # gated again released, the request billed as if it had not been
        quota.settle(again_org, again, tokens=0, billed=False)
        if late == org_id:
            return app_scope, org_id, late_user, decision
        if late is None:  # and then an org that is no id (bytes...): unbilled, its calls released (see _late)
            return app_scope, None, None, None
        self._reattributed(org_id, late)
        return app_scope, late, late_user, QuotaDecision()

    async def _gate_again(
        self, scope: Scope, billing: dict[str, Any], watcher: _ResponseWatcher
    ) -> QuotaDecision | None:
        """:func:`require_quota` in a request this middleware gated before the app ran (``billing["gated"]``: its
        watcher), once the app's auth has set ``request.state.org_id``: when that is another org than the one gated
        (the client's header named it), the request is gated again as the org the auth set, with this middleware's
        gate. Allowed: that org's call is reserved, and its ``RateLimit-*`` headers go out instead; the end of the
        request (:meth:`_gated_again_end`) bills it with that decision and releases the other org's call. Refused:
        :class:`QuotaExceededError`, and the gate's answer replaces whatever the app answers (its exception handlers
        turn the error into their own 429). ``None``: the org gated is the one the auth set (the decision made
        before the app ran stands), or the middleware bills the org found before the app ran whatever the app sets
        (resolvers of your own)."""
        org_id, user_id = billing.get("org_id"), billing.get("user_id")
        quota = self.quota
        if quota is None or self._identify is None or not isinstance(org_id, str):
            return None
        found = late_identity(scope.get("state"), org_id, user_id if isinstance(user_id, str) else None)
        if found is None or found[0] == org_id:
            return None
        late, late_user = found
        if late is None:  # an org that is no id (bytes...): the decision made before stands, nothing is billed (_late)
            return None
        checked = quota.check(late)
        decision = checked if isinstance(checked, QuotaDecision) else await checked
        billing["gated"] = None  # gated again: settled so when the request ends
        billing["decision"], billing["decision_org"] = decision, late
        _publish(scope, billing, late, late_user)
        if decision.allowed:
            watcher.extra_headers = decision.headers
            return decision
        response = self._outward(decision.response(), expose=True)

        async def refuse() -> Callable[[Send], Awaitable[None]]:
            return lambda send: response(scope, _disconnected, send)

        watcher.on_start = refuse
        raise QuotaExceededError(late, decision)

    def _unresolved_said(self, scope: Scope) -> None:
        """Say, once per middleware, that a request was served unbilled for want of an org (else silent: a misspelt
        or missing header went unnoticed), where the middleware looked and what to do; later ones are only counted
        (``stats["unresolved"]``, ``requests_unresolved_total``)."""
        self._said_unresolved = True
        logger.warning(
            "A request to %.200r was served unbilled and ungated: no org was found in %s. Later ones are only counted "
            "(stats['unresolved'], the requests_unresolved_total metric). If it should have been billed, check what "
            "the client sends (a header left out or misspelt?) and where your auth sets the org; to answer such "
            "requests 401 instead, set LAGO_ON_UNRESOLVED=reject; paths that are never billed (health checks, docs) "
            "go in LAGO_EXCLUDE_PATHS. Logged once.",
            scope.get("path", ""),
            describe_resolver(self.resolve_org),
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> OrgBillingMiddleware:
        """Itself: a middleware that deep-copies the scope (hypercorn's ``ProxyFixMiddleware``) copies the request's
        billing dict, which holds this middleware (its tasks, client, locks cannot be copied: every request failed)."""
        return self

    def _nested(self) -> None:
        self.stats["nested"] = self.stats.get("nested", 0) + 1
        if self.stats["nested"] == 1:
            logger.warning(
                "An OrgBillingMiddleware got a request another one (around it) already bills: it passes it on "
                "unbilled and ungated, so that the request is billed once. Keep one billing middleware per app "
                "(wrapping the app for OrgBilling(pipeline=...) replaces app.add_middleware). Logged once."
            )

    def _billable(self, scope: Scope, watcher: _ResponseWatcher, root_path: str) -> bool:
        """Whether an answer is billed (what :meth:`_record` and the idempotency check decide on; no answer: a 500)."""
        status = watcher.status
        if status is None or status >= 500:
            return self.bill_server_errors
        if status >= 400 and self._auth_failure(scope, status):  # (the middleware's own 401/403: never here)
            return self.bill_auth_failures
        return status < 300 or not self._unrouted(scope, status, root_path, watcher)

    def _auth_failure(self, scope: Scope, status: int) -> bool:
        """Whether a 4xx is the app's auth refusing the caller: a 401 or 403, or any 4xx answered before a Starlette
        ``AuthenticationMiddleware`` inside this one let the request through (no ``scope["auth"]``, which it sets on
        every request it passes on, anonymous ones included): its ``on_error`` answer to bad credentials, a 400 by
        default (or the answer of a middleware before it). The caller was never authenticated: with the org from a
        header, it may have named any org."""
        if status == 401 or status == 403:
            return True
        if "auth" in scope or status >= 500:
            return False
        inside = self._authentication
        if inside is None:
            inside = _inner_authentication(self.app)
            if inside is None:  # a Starlette app not built yet (built by its first call): looked for next time
                return False
            self._authentication = inside
        return inside

    def _unrouted(self, scope: Scope, status: int, root_path: str, watcher: _ResponseWatcher) -> bool:
        """:func:`_unrouted`, knowing what is inside this middleware: a Starlette app behind middlewares of their own
        (one of them answered before its routing ran: nothing in the scope shows it), an ``HTTPSRedirectMiddleware``
        (its redirect of an ``http`` request, whatever app it wraps)."""
        if self._https_redirect and status == 307 and scope.get("scheme") in ("http", "ws"):
            # its answer, not an endpoint's (behind a proxy fix that made the request https on a copy of the scope)
            if _https_redirect_of(scope, getattr(watcher, "location", None)):
                return True
        # (the Starlette app found inside does not decide: a middleware answering before it leaves no trace in the
        # scope, and endpoints' own 404s and redirects are billed; a proxy fix's copy is read: see _app_scope)
        return _unrouted(scope, status, root_path)

    def _ungated(self, org_id: str) -> None:
        self.stats["ungated"] += 1
        if self.stats["ungated"] == 1:
            logger.warning(
                "A request billed to org %s had no org before the app ran (auth in an endpoint dependency?): its "
                "quota could not be checked. Resolve the org before the app (LAGO_ORG_HEADER, an auth middleware "
                "setting request.state.org_id or scope['user']), or add require_quota as a dependency after your "
                "auth: Depends(require_quota). Counted in stats['ungated']; logged once.",
                org_id,
            )

    def _record(
        self,
        scope: Scope,
        org_id: str,
        user_id: str | None,
        watcher: _ResponseWatcher,
        started: float,
        root_path: str,
        decision: QuotaDecision | None,
        idempotent: tuple[str, str, bool] | None = None,
    ) -> str | None:
        """Hand the request's event to the pipeline, to be built there; the idempotent transaction id of a first
        event that was dropped (the outbox full), forgotten so that a retry of it counts as the first.

        Only what the request knows is captured here; reading the body's usage, building and encoding the event
        (and counting its tokens against the quota) happen when the pipeline batches it, many events in one go,
        off the request's path. ``idempotent``: the endpoint and transaction id of a request with an idempotency
        key and whether it is a retry, when Redis was asked (:meth:`_share_first_seen`)."""
        status = watcher.status if watcher.status is not None else 500
        if status >= 300 and not self._billable(scope, watcher, root_path):  # (a 2xx: the first comparison only)
            if decision is not None and self.quota is not None:
                self.quota.settle(org_id, decision, tokens=0, billed=False)  # its reserved call released
            if status >= 500:
                self.stats["unbilled_errors"] += 1
            elif status >= 400 and self._auth_failure(scope, status):
                self.stats["unbilled_auth_failures"] = self.stats.get("unbilled_auth_failures", 0) + 1
            else:
                self.stats["unrouted"] += 1
            return None
        method = scope["method"]
        if len(method) > _MAX_METHOD:  # (a client's token: h11 takes any, up to its 16 KiB request line)
            method = method[: _MAX_METHOD - 1] + "\u2026"
        transaction_id: str | None = None
        retry = False
        if idempotent is not None:
            endpoint, transaction_id, retry = idempotent
        else:
            route = scope.get("route")
            if type(route) is Route and "fastapi" not in scope and scope.get("root_path", "") == root_path:
                endpoint = route.path  # (the usual: a Starlette route, not mounted; as _template finds it, at once)
            else:
                endpoint = _template(scope, status, root_path, self._routing_inside)
            key = self._idempotency_key(scope) if self.idempotency_header is not None else None
            if key is not None:  # (in this process's memory; with Redis, _share_first_seen asked the fleet)
                # (the method whole, as _share_first_seen reads it: cut, two methods sharing their first 63 characters
                # were one call and its retry, the second never billed)
                transaction_id = self._idempotent_id(key, org_id, scope["method"], endpoint, scope["path"])
                retry = transaction_id in self._first_seen
                if not retry:
                    self._first_seen[transaction_id] = started
        # its timestamp: a retry's is its first event's, taken now (a first one's is its own start). Read from this
        # memory when the pipeline built the event (within its flush_interval), it was lost when the memory had
        # forgotten it meanwhile (the key's day over, or 100,000 newer keys): the retry, counted as one (its quota
        # call released), was then sent with its own timestamp, billed again on Lago's ClickHouse store.
        timestamp = started if transaction_id is None else self._first_seen.get(transaction_id, started)
        # Keep only what the event needs, as plain values (the JSON body at most): the request's objects are freed
        # at once, and the waiting event costs the memory (and the garbage collector) next to nothing.
        facts: _Facts = (
            endpoint,
            method,
            status,
            timestamp,
            # its end: the start moved on by the monotonic time it took (a step of the wall clock meanwhile, by NTP
            # or a VM resumed, would make it days long, or none); a retry's, its own duration after its first's start
            timestamp + ((watcher.ended or time.monotonic()) - watcher.began),
            transaction_id,
            org_id,
            user_id,
            # the watcher lets go of the request's objects. A response cut off (the client left a stream): its usage
            # is read when the event is built, so what a stream's generator attributes as it is closed (its finally,
            # run once the disconnect has left the middleware) is billed
            watcher.deferred() if watcher.ended else watcher.cut_off(),
            # what its tokens are settled with (see _build_event): the period of this package's gate's decision (a
            # str, shared: the decision itself is not kept alive while the event waits), else the empty decision
            None if decision is None or retry else decision.period if type(decision) is _Decision else _TOKENS_ONLY,
            self._extra_properties(scope, org_id, user_id) if self.event_properties is not None else None,
        )
        accepted = self._submit(facts) is not False  # (False: dropped, the outbox full; logged and counted there)
        if decision is not None and self.quota is not None:
            # The call is settled now (released if its event was dropped, or if it is the retry of a request
            # already counted: Lago keeps one event of the two); its tokens, known once the event is built, are
            # added then (a retry's are not).
            self.quota.settle(org_id, decision, tokens=0, billed=accepted and not retry)
        if accepted:
            self.stats["billed"] += 1
            if retry:
                self.stats["idempotent_retries"] = self.stats.get("idempotent_retries", 0) + 1
        elif transaction_id is not None and not retry and self._first_seen.get(transaction_id) == started:
            del self._first_seen[transaction_id]  # never sent: a retry of it is the first event after all
            return transaction_id
        return None

    def _build_event(self, facts: _Facts) -> dict[str, Any] | str:
        """The event of one request, or its JSON text (called once, by the pipeline). An error here is logged with
        its traceback and the request goes to the dead letters: never silently lost."""
        endpoint, method, status, started, ended, idempotent_id, org_id, user_id, usage, gated, extra = facts
        try:
            if type(usage) is bytes:  # (the usual: a JSON body's counts, read without a Usage made)
                model, input_tokens, output_tokens, total_tokens = json_usage_counts(usage)
            else:
                if isinstance(usage, UsageRecorder):  # a response cut off: read now (see _record)
                    usage = usage.result()
                assert isinstance(usage, Usage)
                model, input_tokens, output_tokens, total_tokens = (
                    usage.model,
                    usage.input_tokens,
                    usage.output_tokens,
                    usage.total_tokens,
                )
            duration = max(ended - started, 0.0)  # (measured on the monotonic clock: see _record)
            # a retry's event is its first one's: same id and timestamp (its own duration), taken by _record
            transaction_id = _request_id() if idempotent_id is None else idempotent_id
            if type(gated) is str and idempotent_id is None and before_period(gated, int(started)):
                # begun in one billing period, checked in the next (a slow resolver or a cold org's wait across the
                # boundary): counted against the new period's limit, so billed there, from its first millisecond. (Not
                # an idempotent request's: its retries are sent with the first timestamp remembered, in Redis too.)
                started = float(gated)
            if extra is not None:
                counts = (model, input_tokens, output_tokens, total_tokens)
                event: dict[str, Any] | str = self._hooked_event(
                    facts, counts, extra, transaction_id, started, duration
                )
            else:  # known keys and plain values: the JSON text directly, no dict (2-3x faster than json)
                head = self._heads.get((org_id, endpoint, method))
                if head is None:
                    head = self._head(org_id, endpoint, method)
                event = _EVENT_JSON % (
                    transaction_id,
                    started,
                    head,
                    status,
                    duration * 1000,
                    input_tokens,
                    output_tokens,
                    total_tokens,
                    "" if user_id is None else _user_texts.get(user_id) or _user_json(user_id),
                    "" if model is None else ',"model":' + _json_str(model),
                )
        except Exception:
            count = self.stats["event_errors"] = self.stats.get("event_errors", 0) + 1
            # With its traceback for the first, then every 100th (as its dead letters are said): a cause that lasts
            # fails every request alike (an org id a client sends that makes a subscription id too long for Lago),
            # and must not write a traceback per request. The others at DEBUG; all are counted.
            (logger.exception if count == 1 or count % 100 == 0 else logger.debug)(
                "Could not build the usage event of %.20r %.200r (%d so far, counted in stats['event_errors']); it "
                "goes to the dead letters with the reason",
                method,
                endpoint,
                count,
                exc_info=True,
            )
            raise
        if gated is not None and total_tokens and self.quota is not None:
            # In the period the call was checked in (Lago bills the event there, by its timestamp; none once that
            # period is over): this package's gate gets an unreserved decision of that period, another gate the empty
            # one its protocol says.
            tokens_only = _tokens_only(gated, int(started)) if isinstance(gated, str) else gated
            self.quota.settle(org_id, tokens_only, tokens=total_tokens, billed=False)
        return event

    def _head(self, org_id: str, endpoint: str, method: str) -> str:
        """The JSON of what all events of one org, endpoint and method share (cached: a few per route and org)."""
        subscription_id = self.settings.subscription_id_for(org_id)
        _check_id("external_subscription_id", subscription_id)  # (as event_payload checks it: a cache miss only)
        head = (
            f'"external_subscription_id":{_json_str(subscription_id)},'
            f'"code":{_json_str(self.settings.event_code)},"properties":{{"org_id":{_json_str(org_id)},'
            f'"endpoint":{_json_str(endpoint)},"method":{_json_str(method)}'
        )
        if len(endpoint) <= _MAX_CACHED_PATH and len(method) <= _MAX_METHOD:  # (long raw paths, methods: not kept)
            if len(self._heads) >= 10_000:  # bounded: a cache of the active combinations, not a registry
                self._heads.clear()
            self._heads[(org_id, endpoint, method)] = head
        return head

    def _extra_properties(self, scope: Scope, org_id: str, user_id: str | None) -> Mapping[str, Any] | None:
        """The ``event_properties`` hook's properties for a request, asked on its path (in its context); ``None``,
        logged and counted, when the hook fails: the request is billed without them."""
        assert self.event_properties is not None
        try:
            extra: Any = self.event_properties(scope, Identity(org_id, user_id))
            if inspect.isawaitable(extra):
                if inspect.iscoroutine(extra):
                    extra.close()
                raise TypeError("it returned an awaitable: it must be a plain function returning a mapping")
            if not isinstance(extra, Mapping):
                raise TypeError(f"it returned a {type(extra).__name__}, not a mapping")
            return extra
        except Exception:
            self._properties_failed("The event_properties hook failed: the request is billed without its properties")
            return None

    def _properties_failed(self, message: str) -> None:
        count = self.stats["event_properties_errors"] = self.stats.get("event_properties_errors", 0) + 1
        if count == 1 or count % 1000 == 0:  # with its traceback, and not once per request of a broken hook
            logger.exception("%s (%d so far)", message, count)

    def _hooked_event(
        self,
        facts: _Facts,
        counts: UsageCounts,
        extra: Mapping[str, Any],
        transaction_id: str,
        timestamp: float,
        duration: float,
    ) -> dict[str, Any]:
        """The event as a dict, with the properties of the ``event_properties`` hook (checked like any event; an
        event they would make invalid is sent without them)."""
        endpoint, method, status = facts[:3]
        org_id, user_id = facts[6:8]
        model, input_tokens, output_tokens, total_tokens = counts
        properties: dict[str, Any] = {
            "org_id": org_id,
            "endpoint": endpoint,
            "method": method,
            "status_code": status,
            "duration_ms": round(duration * 1000, 3),
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": total_tokens,
        }
        if user_id is not None:
            properties["user_id"] = user_id
        if model is not None:
            properties["model"] = model
        event = functools.partial(
            event_payload,
            transaction_id=transaction_id,
            external_subscription_id=self.settings.subscription_id_for(org_id),
            code=self.settings.event_code,
            timestamp=timestamp,
        )
        try:
            return event(properties={**properties, **extra})
        except InvalidRequestError:
            self._properties_failed(
                "The event_properties hook gave properties an event cannot carry: sent without them"
            )
            return event(properties=properties)

    def _idempotency_key(self, scope: Scope) -> str | None:
        if self.idempotency_header is not None:
            for name, value in scope["headers"]:
                if name == self.idempotency_header and value:
                    key: str = value.decode("latin-1")  # whole: keys differing past any cut are different requests
                    return key
        return None

    async def _share_and_record(
        self,
        scope: Scope,
        org_id: str,
        user_id: str | None,
        watcher: _ResponseWatcher,
        started: float,
        root_path: str,
        decision: QuotaDecision | None,
    ) -> None:
        """:meth:`_record`, after the first timestamp of an idempotency key was asked of Redis: recorded even if the
        task is cancelled meanwhile (a native cancel goes through anyio's shield)."""
        idempotent: tuple[str, str, bool] | None = None
        try:
            idempotent = await self._share_first_seen(scope, org_id, watcher, root_path, started)
        finally:
            forgotten = self._record(scope, org_id, user_id, watcher, started, root_path, decision, idempotent)
        if forgotten is not None and self._shared_first_seen is not None:  # its retry is the first event, fleet-wide
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.api_timeout) as bound:
                await self._shared_first_seen.forget(forgotten, started)
            if bound.cancelled_caught:  # (under the store's own timeout: its outage, said as that one would say it)
                self._shared_first_seen.timed_out(self.settings.api_timeout)

    async def _share_first_seen(
        self, scope: Scope, org_id: str, watcher: _ResponseWatcher, root_path: str, started: float
    ) -> tuple[str, str, bool] | None:
        """The endpoint and transaction id of an idempotent request, and whether a request with it was seen before
        (by any worker or replica, through Redis: the retry of a request already counted). The first timestamp goes
        into this process's memory, where the event's build reads it. Bounded and shielded (a client gone does not
        cut it); Redis unavailable: this process's memory only (said once). ``None``: no key, or not billed."""
        assert self._shared_first_seen is not None
        key = self._idempotency_key(scope)
        if key is None:
            return None
        if not self._billable(scope, watcher, root_path):
            return None  # not billed: no event, no first timestamp
        status = watcher.status if watcher.status is not None else 500
        endpoint = _template(scope, status, root_path, self._routing_inside)
        transaction_id = self._idempotent_id(key, org_id, scope["method"], endpoint, scope["path"])
        local = self._first_seen.get(transaction_id)
        candidate = started if local is None else local
        first: float | None = None
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.api_timeout) as bound:
            first = await self._shared_first_seen.first(transaction_id, candidate)
        if bound.cancelled_caught:  # (LAGO_API_TIMEOUT under the store's own timeout: a Redis not answering, said)
            self._shared_first_seen.timed_out(self.settings.api_timeout)
        self._first_seen[transaction_id] = candidate if first is None else first
        return endpoint, transaction_id, local is not None or (first is not None and first != candidate)

    def _idempotent_id(self, key: str, org_id: str, method: str, endpoint: str, path: object = None) -> str:
        """The transaction id of (org, method, route, key): one reading only (JSON), and keyed by the Lago API key
        (a secret), so that nobody can compute it ahead and record an event under it first (``usage/record``).
        ``path``: the request's; a raw path billed cut (:func:`_raw_endpoint`) is read whole here, so that two
        different long paths with one key are two calls, not a call and its retry (as before paths were cut)."""
        if len(endpoint) == _MAX_RAW_ENDPOINT and endpoint[-1] == "\u2026" and path is not None:
            endpoint = _whole_raw_endpoint(endpoint, path)
        message = json.dumps([org_id, method, endpoint, key], ensure_ascii=True).encode()
        digest = hmac.new((self.settings.api_key or "").encode(), message, hashlib.sha256).hexdigest()
        return f"idem_{digest[:32]}"

    def _rejection(self) -> ASGIApp:
        """The answer to a request without an org under ``on_unresolved="reject"``."""
        response = JSONResponse(
            {
                "type": "about:blank",
                "title": "Organization required",
                "status": self.unresolved_status,
                "detail": "This request could not be attributed to an organization.",
            },
            status_code=self.unresolved_status,
            media_type="application/problem+json",
            # RFC 9110: a 401 carries a challenge (clients and proxies that follow it retry with credentials)
            headers={"WWW-Authenticate": "Bearer"} if self.unresolved_status == 401 else None,
        )
        return self._outward(response)

    def _outward(self, response: ASGIApp, *, expose: bool = False) -> ASGIApp:
        """An answer of this middleware's own (the gate's 429/402, the unresolved 401/403), sent through the app's
        ``CORSMiddleware`` when that one is inside this one (added before it): a browser gets it with the CORS headers
        of the app's own answers, not a CORS error that hides its status and ``Retry-After`` from the page."""
        cors = self._cors
        if cors is None:
            found = _inner_cors(self.app)
            if found is None:  # a Starlette app whose middleware stack is not built yet: looked for next time
                return response
            cors = self._cors = found
        if cors is False:
            return response
        outward = copy.copy(cors)
        outward.app = response
        if expose:  # the gate's answer: the page may read its Retry-After and RateLimit-* (that answer only)
            outward.simple_headers = _exposing(cors.simple_headers, response)
        return outward


def _with_gate_headers(
    headers: Iterable[tuple[bytes, bytes]], gate: tuple[tuple[bytes, bytes], ...]
) -> list[tuple[bytes, bytes]]:
    """An answer's headers with the gate's ``RateLimit-*`` (and ``Retry-After``) added, unless the app set its own (a
    gateway passing its upstream's on, a limiter of its own): those are kept, not joined by a second value of each
    field (RFC 9110 reads repeated fields as one list, ``100, 5``: neither readable). The three ``RateLimit-*`` fields
    describe one limit together: none of the gate's is added next to any of the app's."""
    for name, _ in headers:
        if name and name[0] in (114, 82):  # (b"r", b"R": the first byte of a field of the gate's)
            break
    else:  # (the usual: no field of the app's starts so: 0.1 µs)
        return [*headers, *gate]
    own = {_GATE_FIELDS.get(name.lower()) for name, _ in headers}
    return [*headers, *(pair for pair in gate if _GATE_FIELDS[pair[0]] not in own)]


#: The fields the gate adds to an answer (lowercase, as ASGI names them), by what they describe.
_GATE_FIELDS = {
    b"ratelimit-limit": "ratelimit",
    b"ratelimit-remaining": "ratelimit",
    b"ratelimit-reset": "ratelimit",
    b"retry-after": "retry-after",
}

#: The JSON text of a request's event (``json.loads`` gives the document ``event_payload`` builds): transaction id,
#: timestamp, the org/endpoint head, status, duration, tokens, and
#: the optional user and model. Timestamp and duration are written with millisecond digits (fixed at creation).
_EVENT_JSON = (
    '{"transaction_id":"%s","timestamp":"%.3f",%s,"status_code":%d,"duration_ms":%.3f,'
    '"input_tokens":%d,"output_tokens":%d,"total_tokens":%d%s%s}}'
)

_user_texts: dict[str, str] = {}


def _ambiguous_answer(header: str) -> JSONResponse:
    """The 400 answer to a request whose bearer-token header came twice with different values (RFC 9110 5.3: a
    singleton field): which one the app's auth reads is not known, so neither is the org to bill."""
    return JSONResponse(
        {
            "type": "about:blank",
            "title": "Ambiguous credentials",
            "status": 400,
            "detail": f"The {header} header was sent more than once with different values: send it once.",
        },
        status_code=400,
        media_type="application/problem+json",
    )


class _StartupFailed(Exception):
    """Raised to an app from its ``lifespan.startup.failed`` send: the server is told once its lifespan call ends."""


#: The middlewares whose delivery started lazily (no lifespan) in this process: what their memory still holds when the
#: process exits is said (see _lost_at_exit).
_lazily_started: weakref.WeakSet[OrgBillingMiddleware] = weakref.WeakSet()
_exit_hook_pid: int | None = None


def _said_at_exit(middleware: OrgBillingMiddleware) -> None:
    """Have the events ``middleware`` still holds in memory said when this process exits (once hooked per process)."""
    global _exit_hook_pid
    _lazily_started.add(middleware)
    if _exit_hook_pid != os.getpid():
        _exit_hook_pid = os.getpid()
        atexit.register(_lost_at_exit)
        # (a multiprocessing worker, granian's, ends with os._exit: its finalizers run, not atexit)
        multiprocessing.util.Finalize(None, _lost_at_exit, exitpriority=10)


def _lost_at_exit() -> None:
    """At the process's exit: the events a lazily started delivery still held in memory, its run never ended (a server
    that ends neither a lifespan nor the event loop's tasks: granian), are lost; said with their count, not silently."""
    for middleware in list(_lazily_started):
        pipeline = getattr(middleware, "pipeline", None)
        if pipeline is None or not pipeline._running or pipeline.outbox.durable:
            continue
        held = pipeline.outbox.unresolved()
        if held:
            pipeline.metrics.lost_at_shutdown += held
            logger.error(
                "%d billing events were lost: still in memory when the process exited, the server having ended "
                "neither an ASGI lifespan (none was sent) nor the event loop's tasks, they were neither delivered nor "
                "written anywhere. Add OrgBillingMiddleware to the outermost app (its lifespan shutdown flushes "
                "them), call its aclose() from your app's lifespan, or set LAGO_SPOOL_PATH.",
                held,
            )
    _lazily_started.clear()


#: The longest HTTP method billed as sent (longer ones, a client's token, are cut: kept in every waiting event).
_MAX_METHOD = 64

#: The decision passed to ``settle`` to add a request's tokens after its call was settled.
_TOKENS_ONLY = QuotaDecision()


@functools.lru_cache(maxsize=64)
def _tokens_only(period: str, second: int | None = None) -> _Decision:
    """The decision a request's tokens are settled with in this package's gate: none reserved, of ``period``, its event
    dated in ``second`` (Lago bills it by that date: the tokens of a call checked before a period begun since are
    not that period's). Cached: the requests of a second, per period of the orgs in flight."""
    return _Decision(reserved=False, period=period, bucket=second)


def _user_json(user_id: str) -> str:
    """``,"user_id":"..."`` (cached: the active users repeat)."""
    text = _user_texts.get(user_id)
    if text is None:
        if len(_user_texts) >= 10_000:
            _user_texts.clear()
        text = _user_texts[user_id] = ',"user_id":' + _json_str(user_id)
    return text


#: What a request's event needs, captured when its response is over: endpoint, method, status, start and end
#: times (a retry's: its first event's start, and that moved on by its own duration), the idempotent transaction id
#: (with an idempotency key), org, user, usage (or the JSON body to read it from), whether the quota gate counts its
#: tokens, and the ``event_properties`` hook's properties (with a hook only). A tuple of plain values: one small
#: allocation on the request path, which the garbage collector stops tracking.
_Facts = tuple[
    str,
    str,
    int,
    float,
    float,
    "str | None",
    str,
    "str | None",
    "bytes | Usage | UsageRecorder",  # (a recorder: a response cut off, read when the event is built)
    "str | QuotaDecision | None",  # its gate decision's period, or _TOKENS_ONLY (None: not gated, or a retry)
    "Mapping[str, Any] | None",
]


#: The messages of the ASGI extensions handing a file to the server (``http.response.pathsend``, and the zero-copy
#: send's ``http.response.zerocopysend``; ``http.response.zerocopy``, a name ASGI does not define, kept as before).
_FILE_SENDS = frozenset(("http.response.pathsend", "http.response.zerocopysend", "http.response.zerocopy"))


class _ResponseWatcher(UsageRecorder):
    """The ``send`` the app gets: notes the status, shows the response to its usage recording, adds headers."""

    __slots__ = ("began", "ended", "extra_headers", "head", "on_start", "send", "sent")

    def __init__(self, scope: Scope, config: AttributionConfig, send: Send) -> None:
        # UsageRecorder.__init__, inline (one per request: a call less); keep the two in step
        self._scope: Scope | None = scope
        self._billing = None
        self._config = config
        self._mode = _MODE_NONE
        self._headers = None
        self._chunks = []
        self._size = 0
        self._counts = None
        self._result = None
        self._inflater = None
        self.send: Send | None = send
        self.status = 500  # when the app fails before answering
        self.began = 0.0  # (time.monotonic()) when the request came in: set by the middleware
        self.ended = 0.0  # (time.monotonic()) when the response's last body message went out (0: not yet)
        self.sent = False  # a body byte went out (before the last message: a stream)
        self.head: Any = None  # the headers of the answer's start
        self.extra_headers: tuple[tuple[bytes, bytes], ...] = ()
        #: Called when the app starts its answer; may return a replacement answer (``send -> None``) to send instead.
        self.on_start: Callable[[], Awaitable[Callable[[Send], Awaitable[None]] | None]] | None = None

    def __call__(self, message: Message) -> Awaitable[None]:
        # Not a coroutine: it returns the server's own awaitable, so a message costs no extra coroutine.
        send = self.send
        assert send is not None, "the response is over"
        if self.ended:  # over: what the app sends now (trailers; an error middleware's answer to a failing background
            return send(message)  # task, which the server refuses or ignores) is not the answer the client got
        kind = message["type"]
        if kind == "http.response.body":
            if self._mode:  # something to read (a JSON or SSE body)
                self.response_body(message.get("body", b""))
            if not message.get("more_body"):  # the response is over (background tasks may run on: not billed time)
                self.ended = time.monotonic()
                if not self.sent and message.get("body"):
                    self.sent = True
            elif not self.sent and message.get("body"):
                self.sent = True
        elif kind == "http.response.start":
            if self.sent:  # a second answer once a stream's first bytes went out: refused, the stream is the answer
                return send(message)
            headers = message.get("headers")
            if type(headers) is not list and headers is not None and type(headers) is not tuple:
                message = {**message, "headers": list(headers)}  # any iterable (a generator): read here and sent on
            self.response_start(message)  # never raises
            self.head = message.get("headers")
            if self.on_start is not None:  # (which may set the headers to add)
                return self._start_then_send(self.on_start, send, message)
            if self.extra_headers:
                message = {**message, "headers": _with_gate_headers(message.get("headers", ()), self.extra_headers)}
        elif kind in _FILE_SENDS:
            # a file the server sends itself (ASGI extensions; FileResponse under granian): the body as it goes out
            if kind == "http.response.pathsend" or not message.get("more_body"):
                self.ended = time.monotonic()
            self.sent = True
        return send(message)

    async def _start_then_send(
        self,
        on_start: Callable[[], Awaitable[Callable[[Send], Awaitable[None]] | None]],
        send: Send,
        message: Message,
    ) -> None:
        replacement = await on_start()
        if replacement is None:
            if self.extra_headers:
                message = {**message, "headers": _with_gate_headers(message.get("headers", ()), self.extra_headers)}
            await send(message)
        else:  # the app's answer is dropped, message by message, and the replacement goes out
            self.send = _discard
            await replacement(send)

    def crashed(self, error: BaseException) -> None:
        """The app raised, or was cancelled (a timeout, a server's shutdown). A response it cut off before its first
        body byte (a stream whose generator failed at once: the 200 went out, nothing else) is a server error, billed
        as such (or not: ``bill_server_errors``); one cut off later is billed with what was counted, as one the client
        cut off (a broken connection).

        One "ended" without a byte nor a declared length is such a stream too: Starlette's ``BaseHTTPMiddleware``
        closes the stream of an app that failed (an empty last message) before it raises the app's error. (An empty
        answer declares its length, ``Content-Length: 0``: served, then a background task failed.)

        Nor is an answer a middleware outside this one sent in place of the app's (:func:`_answered_outside`: the 413
        of ``FastAPI(max_body_size=...)``): billed as the app answered, the routing's own 404 not at all (it was
        billed as a 500, ``<unmatched>`` for a path no route matches, under ``bill_server_errors``)."""
        if self.sent or _client_went_away(error) or _answered_outside(error):
            return
        if not self.ended or not any(name.lower() == b"content-length" for name, _ in self.head or ()):
            self.status = 500

    def cut_off(self) -> _ResponseWatcher:
        """This watcher, let go of the request, for its usage to be read when the event is built (a response cut off:
        what the app attributes while it is closed comes after the middleware is done)."""
        self.detach()
        return self

    def detach(self) -> None:
        if self._scope is not None:  # (UsageRecorder.detach, inline: once per request)
            self._billing = self._scope.get(SCOPE_KEY)
            self._scope = None
        self.send = self.on_start = None


class _RedirectWatcher(_ResponseWatcher):
    """A :class:`_ResponseWatcher` that notes the ``Location`` of a 307 (an ``HTTPSRedirectMiddleware`` is inside)."""

    __slots__ = ("location",)

    def __init__(self, scope: Scope, config: AttributionConfig, send: Send) -> None:
        _ResponseWatcher.__init__(self, scope, config, send)
        self.location: bytes | None = None

    def __call__(self, message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start" and message.get("status") == 307:
            message = _listed(message)  # (a generator of headers read here was sent on empty)
            for name, value in message.get("headers") or ():
                if name.lower() == b"location":
                    self.location = value
        return _ResponseWatcher.__call__(self, message)


class _PreflightWatcher(_RedirectWatcher):
    """The watcher of a request in a CORS preflight's shape that no Starlette ``CORSMiddleware`` inside answers: notes
    whether its answer is a CORS preflight answer (``Access-Control-Allow-Methods``, which only those carry: a CORS
    middleware further in answered it) or an endpoint's (an API call)."""

    __slots__ = ("cors",)

    def __init__(self, scope: Scope, middleware: OrgBillingMiddleware, send: Send) -> None:
        _RedirectWatcher.__init__(self, scope, middleware.attribution, send)
        self.cors = False

    def __call__(self, message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start" and not self.sent and not self.ended:
            message = _listed(message)  # (a generator of headers read here was sent on without what any() consumed)
            self.cors = any(name.lower() == b"access-control-allow-methods" for name, _ in message.get("headers") or ())
        return _RedirectWatcher.__call__(self, message)

    def replaced_unless_cors(
        self, response: ASGIApp, scope: Scope, receive: Receive
    ) -> Callable[[], Awaitable[Callable[[Send], Awaitable[None]] | None]]:
        """An ``on_start`` sending ``response`` instead of the app's answer, unless that is a CORS preflight answer."""

        async def on_start() -> Callable[[Send], Awaitable[None]] | None:
            if self.cors:
                return None
            return lambda send: response(scope, receive, send)

        return on_start


def _listed(message: Message) -> Message:
    """An ``http.response.start`` whose headers are any iterable but a list or tuple (ASGI allows any: a generator),
    with them in a list: read once, where the watcher looks at them, and sent on whole (as
    :meth:`_ResponseWatcher.__call__` does inline)."""
    headers = message.get("headers")
    if type(headers) is not list and headers is not None and type(headers) is not tuple:
        return {**message, "headers": list(headers)}
    return message


def _https_redirect_of(scope: Scope, location: bytes | None) -> bool:
    """Whether a 307's ``Location`` is what an ``HTTPSRedirectMiddleware`` answers: the request's own URL over https
    (the host may differ: a proxy fix's ``X-Forwarded-Host``), not an endpoint's redirect elsewhere."""
    if location is None:
        return True  # (not seen: taken for it, as before)
    # its Location as Starlette writes it: the path's '?', '#', '\\' escaped (recent Starlette; 1.7 and before: as they
    # are), path and query quoted (a space, a non-ASCII name, a raw '{' or '|' in the query are percent-encoded there,
    # not in the scope)
    target = location.decode("latin-1")
    if not target.startswith(("https://", "wss://")):
        return False
    raw = scope["path"]
    query = scope.get("query_string", b"").decode("utf-8", "replace")
    for path in {raw.replace("?", "%3F").replace("#", "%23").replace("\\", "%5C"), raw}:
        if target.endswith(quote(f"{path}?{query}" if query else path, safe=":/%#?=@[]!$&'()*+,;")):
            return True
    return False


#: What a server's send raises when the client went away. Not any OSError: an upstream's timeout or refused
#: connection (TimeoutError, ConnectionRefusedError) is the app's failure.
_DISCONNECTED = (
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)


def _client_went_away(error: BaseException) -> bool:
    """Whether an error the app raised means its client disconnected (rather than the app failing)."""
    if isinstance(error, ClientDisconnect):  # reading the request, or Starlette's wrap of a stream's OSError, whose
        cause = error.__cause__ or error.__context__  # own may be an upstream's (ASGI 2.4 servers)
        return cause is None or _client_went_away(cause)
    return isinstance(error, _DISCONNECTED) or type(error).__name__ == "ClientDisconnected"  # (uvicorn's)


def _answered_outside(error: BaseException) -> bool:
    """Whether an error raised through the app is a middleware outside this one saying it answered in the app's place:
    Starlette's ``RequestBodyLimitMiddleware`` (which ``FastAPI(max_body_size=...)`` puts outside the app's own
    middlewares) sends its 413 to a request whose ``Content-Length`` is over the limit instead of the answer the app
    starts (the endpoint's, the router's 404), and raises this from that send. The app did not fail."""
    return type(_sole(error)).__name__ == "_RequestBodyLimitResponseSent"  # (Starlette's, private: by its name)


def _sole(error: BaseException) -> BaseException:
    """``error`` out of the (Base)ExceptionGroups of one exception wrapping it (a task group's)."""
    while len(getattr(error, "exceptions", ())) == 1:
        error = error.exceptions[0]  # type: ignore[attr-defined]
    return error


def _is_preflight(headers: Any) -> bool:
    """Whether an OPTIONS request's headers make it a CORS preflight (``Origin`` and
    ``Access-Control-Request-Method``, as the Fetch standard sends it and Starlette's ``CORSMiddleware`` tells it:
    by the names as the scope holds them, lower case in ASGI; one it would not answer is no preflight here either)."""
    names = {name for name, _ in headers}
    return b"origin" in names and b"access-control-request-method" in names


def _inner_middleware(app: Any, kind: type[_M]) -> _M | Any | Literal[False] | None:
    """The middleware of class ``kind`` among those an app is wrapped in, down to its router (a Starlette app's built
    stack included): the instance, or the ``Middleware`` entry declaring it in a Starlette app whose stack is not
    built yet (its first call, which an app served without a lifespan has not had before a request reached it);
    False when there is none; None when that unbuilt app declares none."""
    for _ in range(64):
        if isinstance(app, kind):
            return app
        if isinstance(app, Starlette):
            if app.middleware_stack is None:
                declared: Any
                for declared in app.user_middleware:
                    if isinstance(declared.cls, type) and issubclass(declared.cls, kind):
                        return declared
                return None
            app = app.middleware_stack
        else:
            app = getattr(app, "app", None)
            if app is None:
                return False
    return False


def _inner_cors(app: Any) -> CORSMiddleware | Literal[False] | None:
    """The ``CORSMiddleware`` among the middlewares an app is wrapped in (:func:`_inner_middleware`); one an unbuilt
    Starlette app declares is made as its build will make it (the app stays unbuilt until called)."""
    found = _inner_middleware(app, CORSMiddleware)
    if found is None or found is False or isinstance(found, CORSMiddleware):
        return found
    made: CORSMiddleware = found.cls(app, *found.args, **found.kwargs)
    return made


def _inner_authentication(app: Any) -> bool | None:
    """Whether a Starlette ``AuthenticationMiddleware`` is among the middlewares an app is wrapped in (see
    :func:`_inner_middleware`: None when a Starlette app's stack is not built yet and declares none)."""
    found = _inner_middleware(app, AuthenticationMiddleware)
    return found if found is None or found is False else True


#: Response headers a browser lets a page read without ``Access-Control-Expose-Headers`` (the Fetch standard's).
_SAFELISTED = frozenset(
    ("cache-control", "content-language", "content-length", "content-type", "expires", "last-modified", "pragma")
)


def _exposing(simple_headers: dict[str, str], response: Any) -> dict[str, str]:
    """A CORS middleware's headers for its simple answers, with the headers of ``response`` (the gate's
    ``Retry-After``, ``RateLimit-*``) added to ``Access-Control-Expose-Headers``."""
    exposed = simple_headers.get("Access-Control-Expose-Headers", "")
    known = {name.strip().lower() for name in exposed.split(",")}
    names = [exposed] if exposed else []
    for raw, _ in getattr(response, "raw_headers", ()):
        name = raw.decode("latin-1").lower()
        if name not in known and name not in _SAFELISTED:
            known.add(name)
            names.append(name)
    if len(names) == (1 if exposed else 0):
        return simple_headers
    return {**simple_headers, "Access-Control-Expose-Headers": ", ".join(names)}


def _check_arguments(
    app: object,
    settings: object,
    resolve_org: object,
    resolve_user: object,
    bill_server_errors: object,
    bill_auth_failures: object,
    attribution: object,
    idempotency_header: object,
    event_properties: object,
    quota: object,
    quota_config: object,
    client: object,
    transport: object,
    pipeline: object,
    shutdown_timeout: object,
    metrics_registry: object,
) -> None:
    """Refuse an argument of ``OrgBillingMiddleware(...)`` that cannot work, where it was written: each failed later,
    at the first request (a 500, ``'str' object is not callable``) or in the background, or meant something else
    (``bill_server_errors="false"``, a non-empty string, is true)."""
    name = "OrgBillingMiddleware"
    checks.function(f"{name}(app=...)", app, what="the ASGI app it wraps (app.add_middleware() passes it)")
    if settings is not None:
        checks.instance(
            f"{name}(settings=...)", settings, BillingSettings, what="a BillingSettings (BillingSettings.from_env())"
        )
    for argument, resolver in (("resolve_org", resolve_org), ("resolve_user", resolve_user)):
        if resolver is not None:
            example = "from_header('X-Org-Id')" if argument == "resolve_org" else "from_header('X-User-Id')"
            checks.function(
                f"{name}({argument}=...)",
                resolver,
                what=f"a function (scope) -> str | None, sync or async, such as {example} (a header's name goes "
                "in LAGO_ORG_HEADER / LAGO_USER_HEADER)",
                arguments=1,  # (the scope: ``lambda: "org"`` raised at every request, each served unbilled)
            )
    if bill_server_errors is not None:
        checks.flag(f"{name}(bill_server_errors=...)", bill_server_errors)
    if bill_auth_failures is not None:
        checks.flag(f"{name}(bill_auth_failures=...)", bill_auth_failures)
    if attribution is not None:
        checks.instance(f"{name}(attribution=...)", attribution, AttributionConfig, what="an AttributionConfig")
    if idempotency_header is not None:
        header = checks.text(f"{name}(idempotency_header=...)", idempotency_header, example="Idempotency-Key")
        # (as LAGO_ORG_HEADER refuses them: a header no client sends, idempotency silently off, each retry billed
        # again)
        problem = header_name_problem(header)
        if problem == "token":
            raise ConfigurationError(
                f"{name}(idempotency_header=...) must be an HTTP header name such as 'Idempotency-Key' (letters, "
                f"digits and -), got {header!r}."
            )
        if problem == "switch":
            raise ConfigurationError(
                f"{name}(idempotency_header=...) is the name of the request header that carries the client's "
                f"idempotency key (such as 'Idempotency-Key'), not a switch nor None: got {header!r}. Give None "
                "to bill every request."
            )
        if problem == "wsgi":
            raise ConfigurationError(
                f"{name}(idempotency_header=...) is the header's name as clients send it "
                f"({header_as_sent(header, 'Idempotency-Key')}), not its WSGI/CGI name: got {header!r}."
            )
    if event_properties is not None:
        checks.function(
            f"{name}(event_properties=...)",
            event_properties,
            what="a function (scope, identity) -> mapping, not an async one (it runs when the response is over)",
            arguments=2,
            synchronous=True,
        )
    if quota is not None and quota != "auto" and not checks.double(quota):
        checks.built(f"{name}(quota=...)", quota, what="'auto', None or a gate object (QuotaGate(settings, client))")
        # what the middleware calls of its gate (``_gate.QuotaGateProtocol``): each missing one failed only at the
        # first request (``run``: "could not start its background delivery"), or when its response was over
        missing = [method for method in _GATE_METHODS if not callable(getattr(quota, method, None))]
        if missing:
            raise ConfigurationError(
                f"{name}(quota=...) must be 'auto' (a QuotaGate from the settings), None (no gating; or "
                f"LAGO_QUOTA_MODE=off) or a gate object with the methods of QuotaGateProtocol (async run(*, "
                f"task_status), async check(org_id), settle(org_id, decision, *, tokens, billed), async aclose()): "
                f"got {type(quota).__name__}, which lacks {', '.join(missing)}."
            )
        # each as the middleware calls it: a ``check`` that takes no org raised at every request, an ``async settle``
        # was never awaited (no call counted, no reservation released)
        for method, shape, arguments, keywords, synchronous in _GATE_CALLS:
            checks.function(
                f"{name}(quota=...).{method}",
                getattr(quota, method),
                what=f"the gate's {shape} (QuotaGateProtocol)",
                arguments=arguments,
                keywords=keywords,
                synchronous=synchronous,
            )
    if quota_config is not None:
        checks.instance(f"{name}(quota_config=...)", quota_config, QuotaConfig, what="a QuotaConfig")
    if client is not None:
        checks.client(f"{name}(client=...)", client)
    if pipeline is not None:
        checks.built(f"{name}(pipeline=...)", pipeline, what="an EventPipeline (EventPipeline(client))")
    if client is not None and pipeline is not None and getattr(pipeline, "client", None) is not client:
        # (the pipeline sends with its own client, and the automatic gate asks that one: the given one went unused,
        # its key, URL and transport with it; the pipeline's own client given again is used all the same)
        raise ConfigurationError(
            f"{name}(client=...) is the client the middleware makes its pipeline with; with pipeline= given it "
            "makes none and the client would go unused (the pipeline sends with its own, the gate asks that one): "
            "give the client to your EventPipeline(client) and leave client= out."
        )
    if transport is not None and (client is not None or pipeline is not None):  # (then never used: no word said)
        given = "client=" if client is not None else "pipeline="
        raise ConfigurationError(
            f"{name}(transport=...) is the transport of the client the middleware makes; with {given} given it "
            "makes none and the transport would go unused: give it to your LagoClient(settings, transport=...)."
        )
    if pipeline is not None and not (
        callable(getattr(pipeline, "lane", None)) or callable(getattr(pipeline, "submit", None))
    ):
        raise ConfigurationError(f"{name}(pipeline=...) must be an EventPipeline, got {type(pipeline).__name__}.")
    checks.number(f"{name}(shutdown_timeout=...)", shutdown_timeout, inclusive=True)
    if metrics_registry is not None:  # (the class: its register() called unbound, a TypeError)
        checks.built(f"{name}(metrics_registry=...)", metrics_registry, what="a CollectorRegistry (or None)")
    if metrics_registry is not None and not callable(getattr(metrics_registry, "register", None)):
        raise ConfigurationError(
            f"{name}(metrics_registry=...) must be a prometheus_client CollectorRegistry (or None: with "
            f"LAGO_METRICS=true, the default registry), got {metrics_registry!r}."
        )


#: What the middleware calls of a gate given as ``quota=`` (``_gate.QuotaGateProtocol``; ``check_now`` is optional).
_GATE_METHODS = ("run", "check", "settle", "aclose")

#: How the middleware calls them: (method, its shape, positional arguments, keywords, must be a plain function).
_GATE_CALLS: tuple[tuple[str, str, int, tuple[str, ...], bool], ...] = (
    ("run", "async run(*, task_status)", 0, ("task_status",), False),
    ("check", "async check(org_id)", 1, (), False),
    ("settle", "settle(org_id, decision, *, tokens, billed)", 2, ("tokens", "billed"), True),
)


def _is_async(function: Any) -> bool:
    """An ``async def`` function, or an object whose ``__call__`` is one."""
    call = getattr(function, "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(call)


def _discard_awaitable(pending: Any) -> None:
    if inspect.iscoroutine(pending):
        pending.close()


async def _discard(message: Message) -> None:
    """The ``send`` of an answer that was replaced."""


async def _disconnected() -> Message:
    """The ``receive`` of the gate's answer sent in place of the app's (:meth:`OrgBillingMiddleware._gate_again`):
    a response reads nothing."""
    return {"type": "http.disconnect"}


def _start_error(exc: BaseException) -> ConfigurationError:
    """The error to report when the background work could not start: its real cause, out of its task groups."""
    exc = _sole(exc)
    reason = str(exc) if isinstance(exc, LagoIntegrationError) else f"{type(exc).__name__}: {exc}"
    error = ConfigurationError(
        f"OrgBillingMiddleware could not start its background delivery: {reason}",
        variable=getattr(exc, "variable", None),
    )
    error.__cause__ = exc
    return error


def _built_by_starlette() -> bool:
    """Whether Starlette (or FastAPI) is building the middleware stack, on the app's first ASGI call: an error raised
    there would reach the server as a failing lifespan."""
    frame: types.FrameType | None = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return False
        if frame.f_code.co_name == "build_middleware_stack":
            return True
        frame = frame.f_back
    return False


def _default_quota(
    settings: BillingSettings, client: LagoClient, config: QuotaConfig | None
) -> QuotaGateProtocol | None:
    if settings.quota_mode == "off":
        return None
    from ._quota import QuotaGate

    return QuotaGate(settings, client, config=config)


class _RequestIds:
    """Unique event ids without a syscall per request: a random per-process prefix (renewed after ``fork``) and a
    counter. 96 random bits make a collision between processes, or with an earlier run, practically impossible."""

    def __init__(self) -> None:
        self.renew()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix = f"req_{os.urandom(12).hex()}_"
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


_request_id = _RequestIds()

#: The billing middlewares given their pipeline (``pipeline=``), which other apps' middlewares may share: the last of
#: them to shut down closes it (see ``OrgBillingMiddleware._shutdown``). Weakly held.
_GIVEN_PIPELINE: weakref.WeakSet[OrgBillingMiddleware] = weakref.WeakSet()


#: Seconds the shutdown waits at most for the requests in flight to record their events (cancelled ones do within a
#: few loop turns), and never more than half of ``shutdown_timeout``.
_REQUESTS_WAIT_MAX = 5.0
