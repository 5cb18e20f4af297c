"""``billing_routes()``: the seed's org billing endpoints as a Starlette ``Router`` (Starlette or FastAPI).

::

    async def may_manage(request: Request, org_id: str) -> bool:
        return org_id in request.state.user.admin_of      # your rule: who may manage this org's billing

    app.mount("/api/v1/billing/org", billing_routes(authorize=may_manage))

Routes, under ``/organizations/{org_id}``:

=========================  ==========================================================================
``POST /setup``            customer + subscription: ``{"org_name", "plan_code", "email"?, "user_id"?,
                           "billing_time"?}``
``GET /subscription``      the active subscription
``PUT /subscription``      upgrade/downgrade: ``{"plan_code"}`` (a cheaper plan applies at period end; the
                           current plan cancels a pending downgrade)
``DELETE /subscription``   terminate (``?on_termination_invoice=skip`` only with ``allow_skip_invoice``)
``POST /usage/record``     one usage event: ``{"event_code"?, "transaction_id"?, "properties"?,
                           "timestamp"?, "user_id"?, "model"?, "endpoint"?, "tokens"?, ...}``
``GET /usage/current``     current period usage (``?billable_metric_code=``)
``GET /invoices``          latest invoices (``?limit=1..100``, default 10; ``?page=`` for older ones) and
                           ``meta`` (``page``, ``next_page``, ``total_pages``, ``total_count``)
``GET /dashboard``         JSON, or an HTML page when a browser asks (``Accept: text/html`` or ``?format=html``)
=========================  ==========================================================================

Every route first calls ``authorize(request, org_id)`` (sync or async). The default denies everything (403), so
mounting the routes never opens an org's billing by accident. Errors are JSON ``{"detail": ...}``: 422 for invalid
input (``detail`` is a list of ``{"loc", "msg", "type"}``, as FastAPI does), 404 when the org has no customer or
no active subscription, 429 (with ``Retry-After``) / 503 when Lago throttles or is down, 502 when Lago refuses
our API key. Nothing in an answer contains the API key. A 429 / 503 of ``POST /usage/record`` also says the event's
``transaction_id`` and ``timestamp``: Lago may hold the event (an answer lost), so retry with both (a duplicate is a
200, not a second charge). ``authorize`` (and a ``plans`` callable) must return ``True`` to allow: anything else
denies (a truthy non-bool is logged once), and so does one that raises (logged with its traceback; an
``HTTPException`` it raises, a 401 asking to log in, is answered as is). ``POST /usage/record`` refuses property
values (and token counts) Lago could not sum into a bill: negative, NaN, infinite, or past 2**53 - 1 (a digit string
stays an id), and an ``event_code`` the org's plan has no charge for (Lago would keep the event and never bill it). A
405 is JSON too, its ``Allow`` naming every method of the path. On Lago's ClickHouse event store an event sent again
with the ``transaction_id`` and ``timestamp`` of an earlier one replaces it: there, let only your backend, not org
admins, reach ``POST /usage/record``.

Requests of the same read of the same org (``GET``/``HEAD`` with the same query) in flight together share one read of
Lago: a dashboard polled from many tabs does not spend the Lago organization's rate limit, which every tenant and the
quota gate share. Nothing is kept once the read ends, and a write through these routes makes the org's later reads
read Lago afresh.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import threading
import uuid
from collections.abc import Awaitable, Callable, Collection, Container, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar, cast

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, Router, request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from . import _checks as checks
from ._billing import OrgBilling, _api_call_properties
from ._client import JSON, LagoClient, Page, _Throttled
from ._dashboard import (
    CSP,
    BreakdownProvider,
    LimitsProvider,
    dashboard_data,
    render_html,
    render_no_subscription_html,
    wants_html,
)
from ._errors import (
    ConfigurationError,
    InvalidIdentifierError,
    InvalidRequestError,
    LagoAPIError,
    LagoAuthenticationError,
    LagoIntegrationError,
    LagoNotFoundError,
    LagoRateLimitError,
    LagoUnavailableError,
    LagoValidationError,
    no_such_route,
    traceback_text,
)
from ._gate import QuotaGateProtocol
from ._ids import ascii_digits, format_timestamp, parse_time, validate_id
from ._quota import QuotaConfig
from ._settings import BillingSettings
from ._webhooks import Invalidate, SupportsInvalidate, _called, _scope_gate, check_invalidate

__all__ = ["Authorize", "BillingRouter", "billing_routes", "deny_all"]

logger = logging.getLogger("lago_org_billing.routes")

#: ``authorize(request, org_id)``: may the caller manage this org's billing?
Authorize = Callable[[Request, str], bool | Awaitable[bool]]

NO_AUTHORIZE_DETAIL = (
    "Forbidden: these billing routes have no authorization rule, so every request is denied. Pass "
    "billing_routes(authorize=...) a function (request, org_id) -> bool saying whether the caller may manage "
    "this org's billing."
)


def deny_all(request: Request, org_id: str) -> bool:
    """The default authorization: nobody may manage any org until you say who can."""
    return False


class _Invalid(Exception):
    """Input that fails validation: a list of FastAPI-style errors."""

    def __init__(self, *errors: dict[str, Any]) -> None:
        super().__init__(errors)
        self.errors = list(errors)


#: The largest number a property of ``POST /usage/record`` may carry (as for token counts): Lago sums properties
#: into ``decimal(30, 10)`` units and ``bigint`` cents, which overflow long before a float does.
_MAX_PROPERTY = 2**53 - 1


def _property_error(value: Any) -> tuple[str, str] | None:
    """Why Lago must not sum ``value`` (it sums numeric strings too), as ``(msg, type)``, else ``None``: a negative
    number lowers the org's bill; NaN, an infinity or a number past :data:`_MAX_PROPERTY` breaks the period's usage
    (Lago's sum or its amounts fail, so the period cannot be priced). A plain digit string is also an id (a unique
    count of 20-digit ids), so only one written with an exponent (``"1e400"``) is bounded."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        number = Decimal(value) if math.isfinite(value) else Decimal("NaN")
    elif isinstance(value, str):
        text = value.strip()
        try:
            number = Decimal(text)
        except (InvalidOperation, ValueError):
            return None
        if number.is_finite() and number >= 0 and "e" not in text.lower():
            return None
    else:
        return None
    if not number.is_finite():
        return "Must be a finite number (NaN and infinities cannot be summed).", "finite_number"
    if number < 0:
        return "Must not be negative.", "greater_than_equal"
    if number > _MAX_PROPERTY:
        return f"At most {_MAX_PROPERTY} (2**53 - 1): Lago could not sum it.", "less_than_equal"
    return None


#: The plans the routes offer: codes, or ``(request, org_id, plan_code) -> bool`` (sync or async).
PlanFilter = Collection[str] | Callable[[Request, str, str], "bool | Awaitable[bool]"]
#: Headers of every answer about an org's billing.
_PRIVATE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
#: Headers of the HTML dashboard: it loads and runs nothing, and no other site frames it (``X-Frame-Options`` for the
#: browsers and web views that ignore CSP's ``frame-ancestors``).
_HTML = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY"}


def _error(loc: tuple[str | int, ...], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": kind}


class _Body:
    """Field access on a JSON object body, collecting every validation error before failing."""

    def __init__(self, data: Mapping[str, Any], allowed: set[str]) -> None:
        self.data = data
        self.errors: list[dict[str, Any]] = [
            _error(("body", key), f"Unknown field {key!r}; allowed: {', '.join(sorted(allowed))}.", "extra_forbidden")
            for key in data
            if key not in allowed
        ]

    def string(self, name: str, *, required: bool = False, max_length: int = 255, is_id: bool = False) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                self.errors.append(_error(("body", name), "Field required.", "missing"))
            return None
        if not isinstance(value, str) or not value.strip():
            self.errors.append(_error(("body", name), "Must be a non-empty string.", "string_type"))
            return None
        if len(value) > max_length:
            self.errors.append(_error(("body", name), f"At most {max_length} characters.", "string_too_long"))
            return None
        if is_id:
            try:
                validate_id(value, name)
            except InvalidRequestError as exc:
                self.errors.append(_error(("body", name), str(exc), "value_error"))
                return None
        return value

    def choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        value = self.data.get(name)
        if value is None:
            return None
        if value not in choices:
            self.errors.append(_error(("body", name), f"Must be one of {', '.join(choices)}.", "enum"))
            return None
        return str(value)

    def count(self, name: str) -> int | None:
        value = self.data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.errors.append(_error(("body", name), "Must be a whole number >= 0.", "int_type"))
            return None
        # (bounded here for every event code: one other than LAGO_EVENT_CODE carries the count in its properties as
        # given, where Lago could not sum a number past it, as _property_error says of the properties themselves)
        if value > _MAX_PROPERTY:
            message = f"At most {_MAX_PROPERTY} (2**53 - 1): Lago could not sum it."
            self.errors.append(_error(("body", name), message, "less_than_equal"))
            return None
        return value

    def mapping(self, name: str) -> dict[str, Any] | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.errors.append(_error(("body", name), "Must be a JSON object.", "dict_type"))
            return None
        return dict(value)

    def check(self) -> None:
        if self.errors:
            raise _Invalid(*self.errors)


class _Refused(Exception):
    """An answer other than 422 to a request the routes do not take (415, 413)."""

    def __init__(self, status: int, detail: str, code: str) -> None:
        super().__init__(detail)
        self.status, self.detail, self.code = status, detail, code


async def _json_object(router: BillingRouter, request: Request, allowed: set[str]) -> _Body:
    # JSON only, even empty: a form or text/plain POST is a "simple" request a third-party page can send with the
    # admin's cookie and no CORS preflight (cross-site request forgery, as in FastAPI's CVE-2021-32677)
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise _Refused(415, "The body must be JSON (Content-Type: application/json).", "unsupported_media_type")
    raw = await _capped_body(request, router.max_body_size)
    if not raw.strip():
        return _Body({}, allowed)
    try:
        data = json.loads(raw)
        json.dumps(data, ensure_ascii=False).encode()  # (a lone surrogate from a "\ud800" escape is no text)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, RecursionError):
            detail = "nested too deeply"
        elif isinstance(exc, (json.JSONDecodeError, UnicodeError)):  # (and a lone surrogate, below)
            detail = str(exc)
        else:  # (int()'s digit limit: its message says to call sys.set_int_max_str_digits)
            detail = "a number of more than 4,300 digits"
        raise _Invalid(_error(("body",), f"The body is not valid JSON text ({detail}).", "json_invalid")) from None
    if not isinstance(data, Mapping):
        raise _Invalid(_error(("body",), "The body must be a JSON object.", "dict_type"))
    return _Body(data, allowed)


async def _capped_body(request: Request, max_size: int) -> bytes:
    too_large = _Refused(413, f"The body is over {max_size} bytes.", "body_too_large")
    length = request.headers.get("content-length", "")
    if ascii_digits(length) and int(length) > max_size:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_size:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


#: The last ``?page=`` of invoices asked of Lago: its SQL offset, ``(page - 1) * per_page``, is a bigint (a page past
#: it fails there, a 500 retried as an outage); a 32-bit page count is far past any history.
_MAX_PAGE = 2**31 - 1


def _query_int(request: Request, name: str, maximum: int, default: int) -> int:
    """A whole-number query parameter from 1 to ``maximum`` (ASCII digits only: ``int()`` takes "²" and fails on
    more than 4,300 digits), else a 422."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    digits = raw.lstrip("0")  # (leading zeros count in int()'s digit limit too)
    value = int(digits or "0") if ascii_digits(raw) and len(digits) <= len(str(maximum)) else 0
    if not 1 <= value <= maximum:
        raise _Invalid(_error(("query", name), f"Must be a whole number from 1 to {maximum}.", "int_range"))
    return value


def _check_after_start(org_id: str, timestamp: object, subscription: JSON) -> None:
    """Refuse an event dated before the org's subscription started (``started_at``): Lago stores it (a 200) and never
    bills it, as an event of a code the plan has no charge for."""
    try:
        sent = Decimal(format_timestamp(cast("Any", timestamp)))
    except InvalidRequestError:
        return  # (no time at all: said as before, where the event is made)
    started = parse_time(subscription.get("started_at"))
    if started is not None and sent < Decimal(started.timestamp()).quantize(Decimal("0.001"), rounding="ROUND_FLOOR"):
        raise _Invalid(
            _error(
                ("body",),  # (as the other refusals made once the subscription is read)
                f"The timestamp {timestamp!r} is before org {org_id!r}'s subscription started "
                f"({subscription.get('started_at')}): Lago would store the event and never bill it. Send the time the "
                "usage happened (on or after the start), or none for now.",
                "value_error",
            )
        )


def _check_billed(event_code: str, subscription: Mapping[str, Any]) -> None:
    """A 422 when the subscription's plan (as Lago includes it) has no charge for ``event_code``: Lago stores such an
    event (200) and never bills it, nor shows it in the current usage."""
    plan = subscription.get("plan")
    charges = plan.get("charges") if isinstance(plan, Mapping) else None
    if not isinstance(charges, list):  # (an answer without its plan: nothing to tell by)
        return
    billed = sorted(
        {str(c["billable_metric_code"]) for c in charges if isinstance(c, Mapping) and c.get("billable_metric_code")}
    )
    if event_code not in billed:
        raise _Invalid(
            _error(
                ("body", "event_code"),
                f"Plan {subscription.get('plan_code')!r} has no charge for {event_code!r}: Lago would keep the event "
                f"and never bill it. Codes it bills: {', '.join(billed) or 'none'}.",
                "not_billed",
            )
        )


def _not_found(detail: str, code: str) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=404)


class _AnyMethod:
    """An endpoint as an ASGI app, so that its ``Route`` takes every method (``Route`` gives a function endpoint
    ``methods=["GET"]``) and the endpoint answers the 405 of its path, with every method of it in ``Allow``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


_T = TypeVar("_T")


class _Flight:
    """One read of Lago in flight: its answer (or error) once ``finished``; ``done`` is set when it ends, finished
    or not (its request cancelled: a waiting one reads instead)."""

    __slots__ = ("done", "error", "finished", "result")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.finished = False
        self.result: Any = None
        self.error: Exception | None = None


class _SharedReads:
    """The routes' reads of Lago in flight, keyed by what they read (always with the org's id): a request asking for
    the same read of the same org while one is in flight waits for it and takes its answer (or its error) instead of
    asking Lago again. Lago Cloud's rate limit is per Lago organization, shared by every tenant and by the quota gate:
    without this, one org's admin polling its dashboard from many tabs (or a script) spent it for everyone. Nothing is
    kept once a read ends, and a write through the routes makes the org's next reads read Lago afresh (``forget``)."""

    def __init__(self) -> None:
        self._flights: dict[tuple[Any, ...], _Flight] = {}

    async def read(self, key: tuple[Any, ...], fetch: Callable[[], Awaitable[_T]]) -> _T:
        # (per thread: a router served by event loops in several threads shares no Event between them; per process:
        # a child forked while a read was in flight never waits for that read, which only the parent ends)
        key = (os.getpid(), threading.get_ident(), *key)
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.finished:
                if flight.error is not None:
                    raise flight.error
                return cast("_T", flight.result)
            # (its request went away before Lago answered: read again, maybe as the one reading)
        flight = self._flights[key] = _Flight()
        try:
            flight.result = await fetch()
        except Exception as exc:
            flight.error = exc
            flight.finished = True
            raise
        else:
            flight.finished = True
            return cast("_T", flight.result)
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

    def forget(self, org_id: str) -> None:
        """Reads of ``org_id`` asked from now on read Lago afresh (a write just changed what they read); those waiting
        for a read in flight still take its answer."""
        for key in [key for key in self._flights if key[3] == org_id]:
            del self._flights[key]


def _plan_codes(plans: Any) -> list[object] | None:
    """The codes of ``plans=`` given as a collection, read once (``None``: a string, or not iterable: ``5``)."""
    if isinstance(plans, (str, bytes)):
        return None
    try:
        return list(plans)
    except TypeError:
        return None


class BillingRouter(Router):
    """The Router ``billing_routes()`` returns; ``billing`` is its :class:`OrgBilling` (created on first use
    when not given) and ``aclose()`` closes the Lago client it created."""

    def __init__(
        self,
        billing: OrgBilling | None,
        *,
        settings: BillingSettings | None,
        client: LagoClient | None,
        authorize: Authorize,
        invalidate: Invalidate | SupportsInvalidate | None,
        limits_provider: LimitsProvider | None,
        breakdown_provider: BreakdownProvider | None,
        invoice_limit: int,
        allow_skip_invoice: bool = False,
        plans: PlanFilter | None = None,
        max_body_size: int = 65_536,
    ) -> None:
        name = "billing_routes"
        for argument, value, cls, what in (
            ("billing", billing, OrgBilling, "an OrgBilling"),
            ("settings", settings, BillingSettings, "a BillingSettings"),
            ("client", client, LagoClient, "a LagoClient"),
        ):
            if value is not None:
                checks.instance(f"{name}({argument}=...)", value, cls, what=what)
        checks.function(
            f"{name}(authorize=...)", authorize, what="a function (request, org_id) -> bool, sync or async", arguments=2
        )
        shape = "a collection of plan codes such as {'starter', 'pro'}, or a function (request, org_id, plan_code)"
        if plans is not None and callable(plans):
            checks.function(f"{name}(plans=...)", plans, what=f"{shape} -> bool", arguments=3)
        elif plans is not None:
            codes = _plan_codes(plans)
            if codes is None or not all(isinstance(code, str) for code in codes):
                raise ConfigurationError(f"{name}(plans=...) must be {shape} -> bool, got {checks._shown(plans)}.")
            if not isinstance(cast(object, plans), Container):  # (an iterator, a generator: used up by the check)
                plans = frozenset(cast("list[str]", codes))
            # (a collection is kept as given: codes added to it later, at startup, are offered too)
        for argument, function in (
            ("limits_provider", limits_provider),
            ("breakdown_provider", breakdown_provider),
        ):
            if function is not None:
                checks.function(
                    f"{name}({argument}=...)",
                    function,
                    what="a function (org_id) -> mapping, sync or async (see billing_routes' documentation)",
                    arguments=1,
                )
        if invalidate is not None:
            check_invalidate(f"{name}(invalidate=...)", invalidate)
        # (kept as checked: an int, whatever whole number was given, e.g. numpy's, which Lago's page sizes refuse)
        invoice_limit = checks.whole(f"{name}(invoice_limit=...)", invoice_limit, maximum=100)
        max_body_size = checks.whole(f"{name}(max_body_size=...)", max_body_size)
        checks.flag(f"{name}(allow_skip_invoice=...)", allow_skip_invoice)
        self._billing = billing
        self.allow_skip_invoice = allow_skip_invoice
        self.plans = plans
        self.max_body_size = max_body_size
        self._settings = settings
        self._client = client
        self._owned: OrgBilling | None = None
        self._say = _Throttled(logger, level=logging.ERROR)  # Lago errors repeat with every request: once a minute
        self.authorize = authorize
        self._said_not_bool: set[str] = set()
        self.invalidate = invalidate
        self.limits_provider = limits_provider
        self.breakdown_provider = breakdown_provider
        self.invoice_limit = invoice_limit
        self._reads = _SharedReads()
        prefix = "/organizations/{org_id}"
        endpoint = self._endpoint
        # one Route per path, dispatching on the method: a 405 then lists every method of the path in Allow (three
        # Routes of /subscription answered a PATCH "Allow: GET, HEAD"), as JSON in a Starlette app too
        super().__init__(
            routes=[
                Route(prefix + "/setup", endpoint({"POST": self.setup}), name="billing_setup"),
                Route(
                    prefix + "/subscription",
                    endpoint({"GET": self.get_subscription, "PUT": self.change_plan, "DELETE": self.terminate}),
                    name="billing_subscription",
                ),
                Route(prefix + "/usage/record", endpoint({"POST": self.record_usage}), name="billing_usage_record"),
                Route(prefix + "/usage/current", endpoint({"GET": self.current_usage}), name="billing_usage_current"),
                Route(prefix + "/invoices", endpoint({"GET": self.invoices}), name="billing_invoices"),
                Route(prefix + "/dashboard", endpoint({"GET": self.dashboard}), name="billing_dashboard"),
            ]
        )

    @property
    def billing(self) -> OrgBilling:
        """The :class:`OrgBilling` the routes use (from the environment on first use when not given)."""
        if self._billing is None:
            if self._client is not None:
                self._billing = OrgBilling(self._settings, client=self._client)
            else:
                self._billing = self._owned = OrgBilling(self._settings)
        return self._billing

    async def aclose(self) -> None:
        """Close the Lago client these routes created (none when ``billing`` or ``client`` was given)."""
        if self._owned is not None:
            await self._owned.aclose()

    # ------------------------------------------------------------------------------------------ plumbing

    def _endpoint(self, handlers: Mapping[str, Callable[[Request, str], Awaitable[Response]]]) -> _AnyMethod:
        if "GET" in handlers:
            handlers = {**handlers, "HEAD": handlers["GET"]}
        allow = ", ".join(handlers)

        async def endpoint(request: Request) -> Response:
            handler = handlers.get(request.method)
            if handler is None:  # (before authorize, as a Route's own 405 was: it tells only the routes' shape)
                return JSONResponse(
                    {"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": allow, **_PRIVATE}
                )
            org_id = str(request.path_params["org_id"])
            try:
                allowed = self.authorize(request, org_id)
                if inspect.isawaitable(allowed):
                    allowed = await allowed
            except HTTPException:
                raise  # the app's own answer (a 401 asking to log in)
            except Exception as exc:  # (no session on the request: a scanner, a logged-out tab) fail closed, not a 500
                # its traceback as text, not the exception: the locals of its frames (the callback's, PyJWT's...) held
                # the caller's bearer token or cookie and the app's JWT signing key, which error trackers ship. The
                # path quoted and cut (as in every line of these routes): whoever sends it writes it, terminal escapes
                # and 8 KiB of it included, and no session is needed to get here
                self._say(
                    "authorize",
                    "billing_routes(authorize=...) raised on %s %.200r: the caller was denied (403). Make it return "
                    "False (or raise an HTTPException) when it cannot tell.\n%s",
                    request.method,
                    request.url.path,
                    traceback_text(exc),
                )
                allowed = False
            if allowed is not True:
                self._not_bool("authorize", allowed, "the caller was denied (403)")
                detail = NO_AUTHORIZE_DETAIL if self.authorize is deny_all else "You may not manage this org's billing."
                return JSONResponse({"detail": detail}, status_code=403, headers=_PRIVATE)
            where: tuple[str, ...] = ("path", "org_id")
            try:
                validate_id(org_id, "org_id")
                where = ("body",)  # (what the billing layer refuses next is the body's: the message names the field)
                try:
                    response = await handler(request, org_id)
                finally:
                    if request.method not in ("GET", "HEAD"):  # a write (done, failed or cut): read Lago afresh
                        self._reads.forget(org_id)
            except _Invalid as exc:
                response = JSONResponse({"detail": exc.errors}, status_code=422)
            except _Refused as exc:
                response = JSONResponse({"detail": exc.detail, "code": exc.code}, status_code=exc.status)
            except InvalidRequestError as exc:
                response = JSONResponse({"detail": [_error(where, str(exc), "value_error")]}, 422)
            except LagoIntegrationError as exc:
                response = _lago_error(exc, request, self._say)
            # an org's billing data: never kept by a browser or a cache along the way (a shared computer's back
            # button after logout, a proxy caching by URL when auth is a cookie)
            response.headers.update(_PRIVATE)
            return response

        return _AnyMethod(request_response(endpoint))

    def _not_bool(self, option: str, value: object, outcome: str) -> None:
        """Say once (in the log, never to the client) that a callback answered a truthy non-bool (a membership row,
        1), which denies: fail closed, but the operator learns why."""
        if value is False or value is None or option in self._said_not_bool:
            return
        self._said_not_bool.add(option)
        logger.warning(
            "billing_routes(%s=...) returned a %s, not True: %s. Return a bool: only True allows.",
            option,
            type(value).__name__,
            outcome,
        )

    async def _check_plan(self, request: Request, org_id: str, plan_code: str) -> None:
        """A plan the routes offer (``plans=``), or a 422 before Lago is asked: an org's admin must not pick a plan
        kept for others (a $0 internal plan, another customer's negotiated price) to lower its own bill."""
        plans = self.plans
        if plans is None:
            return
        if callable(plans):
            try:
                offered = plans(request, org_id, plan_code)
                if inspect.isawaitable(offered):
                    offered = await offered
            except HTTPException:
                raise
            except Exception as exc:  # fail closed: a plan nobody could check is not offered
                self._say(
                    "plans",
                    "billing_routes(plans=...) raised for plan %r: it was refused (422). Make it return a bool.\n%s",
                    plan_code,
                    traceback_text(exc),  # (as for authorize: not the exception, whose frames held the caller's token)
                )
                offered = None
        else:
            offered = plan_code in plans
        if offered is not True:
            self._not_bool("plans", offered, f"plan {plan_code!r} was refused (422)")
            raise _Invalid(_error(("body", "plan_code"), f"Plan {plan_code!r} is not offered here.", "not_offered"))

    def _held_elsewhere(self, request: Request, org_id: str, exc: InvalidRequestError, what: str) -> Response:
        """The answer when the subscription under the org's id is another Lago customer's (a legacy user's, named
        like the org): a 404, as ``GET /subscription`` answers then. The billing layer's message names that customer
        (its external id: an email, a user id) and the operator's remedies: for the server log, never for the org's
        admin."""
        self._say("held elsewhere", "%s %.200r was answered 404: %s", request.method, request.url.path, exc)
        return _not_found(f"Org {org_id!r} has no active subscription {what}.", "subscription_not_found")

    def _gate(self, request: Request) -> SupportsInvalidate | None:
        """The quota gate: ``invalidate=`` when it is one (not a plain ``async (org_id)`` function), else that of the
        ``OrgBillingMiddleware`` this request went through, if any."""
        if isinstance(self.invalidate, SupportsInvalidate):
            return self.invalidate
        return _scope_gate(request.scope)

    async def _invalidate(self, request: Request, org_id: str) -> None:
        target = self.invalidate if self.invalidate is not None else _scope_gate(request.scope)
        if target is None:
            return
        invalidate = target.invalidate if isinstance(target, SupportsInvalidate) else target
        try:
            await _called(invalidate, org_id)  # (a plain function too, as LagoWebhooks takes it)
        except Exception as exc:  # the webhook or the cache TTL catches up
            # (its traceback as text, not the exception: the frames of the gate's Redis client held its password)
            logger.warning("Could not invalidate the quota state of org %s\n%s", org_id, traceback_text(exc))

    async def _written(self, request: Request, org_id: str, write: Awaitable[_T]) -> _T:
        """``write`` (a setup, plan change or termination), the org's quota state invalidated when Lago may have
        applied it without answering (a 5xx, a timeout, a connection lost once the call was sent): the gate then
        decided on the old plan until its TTL (an org that had just upgraded, refused at its old limit), unless the
        caller retried; and when the request is cancelled meanwhile (a timeout middleware, a server's shutdown), maybe
        once Lago applied it. An invalidation too many costs one refresh."""
        try:
            return await write
        except LagoUnavailableError:
            await self._invalidate(request, org_id)
            raise
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True), anyio.move_on_after(_INVALIDATE_WHEN_CANCELLED):
                await self._invalidate(request, org_id)
            raise

    # ------------------------------------------------------------------------------------------- routes

    async def setup(self, request: Request, org_id: str) -> Response:
        body = await _json_object(self, request, {"org_name", "name", "plan_code", "email", "user_id", "billing_time"})
        org_name = body.string("org_name" if "org_name" in body.data or "name" not in body.data else "name")
        if org_name is None and not any(e["loc"][-1] in ("org_name", "name") for e in body.errors):
            body.errors.append(_error(("body", "org_name"), "Field required.", "missing"))
        plan_code = body.string("plan_code", required=True, is_id=True)
        email = body.string("email")
        if email is not None and ("@" not in email or email != email.strip()):
            body.errors.append(_error(("body", "email"), "Not an email address.", "value_error"))
        user_id = body.string("user_id", max_length=100)  # kept in metadata (Lago: 100 characters), never a path
        billing_time = body.choice("billing_time", ("calendar", "anniversary"))
        body.check()
        assert org_name is not None and plan_code is not None
        await self._check_plan(request, org_id, plan_code)
        try:
            result = await self._written(
                request,
                org_id,
                self.billing.subscribe_org_to_plan(
                    org_id, plan_code, org_name, email, user_id, billing_time=billing_time or "calendar"
                ),
            )
        except LagoNotFoundError as exc:
            if exc.code == "plan_not_found":
                raise _Invalid(_error(("body", "plan_code"), f"Lago has no plan {plan_code!r}.", "not_found")) from None
            raise
        await self._invalidate(request, org_id)
        return JSONResponse(result)

    async def get_subscription(self, request: Request, org_id: str) -> Response:
        subscription = await self._reads.read(("subscription", org_id), lambda: self.billing.get_subscription(org_id))
        if subscription is None:
            return _not_found(f"Org {org_id!r} has no active subscription.", "subscription_not_found")
        return JSONResponse({"subscription": subscription})

    async def change_plan(self, request: Request, org_id: str) -> Response:
        body = await _json_object(self, request, {"plan_code"})
        plan_code = body.string("plan_code", required=True, is_id=True)
        body.check()
        assert plan_code is not None
        try:
            await self._check_plan(request, org_id, plan_code)
        except _Invalid as exc:
            # not offered, but maybe the org's own plan (a grandfathered price, one an operator gave it): never one
            # kept for others, and going back to it is how a downgrade its admin scheduled is cancelled (refused, the
            # org lost at the period's end a plan its admin can never pick again). Told by the read the change is
            # made from (one read of Lago on this path), anything else refused as before, nothing written
            refused: _Invalid | None = exc
        else:
            refused = None
        try:
            change = self.billing._change_plan(org_id, plan_code, own_only=refused is not None)
            found = await self._written(request, org_id, change)
        except InvalidRequestError as exc:
            if isinstance(exc, InvalidIdentifierError):
                raise
            return self._held_elsewhere(request, org_id, exc, "to change")
        except LagoNotFoundError as exc:
            if exc.code == "plan_not_found":
                raise _Invalid(_error(("body", "plan_code"), f"Lago has no plan {plan_code!r}.", "not_found")) from None
            if exc.code == "subscription_not_found":
                return _not_found(f"Org {org_id!r} has no active subscription to change.", "subscription_not_found")
            raise
        if found is None:  # (own_only: not the org's plan)
            assert refused is not None
            raise refused
        subscription = found
        scheduled = subscription.get("next_plan_code") == plan_code and subscription.get("plan_code") != plan_code
        await self._invalidate(request, org_id)
        return JSONResponse(
            {
                "subscription": subscription,
                "effective": "period_end" if scheduled else "now",
                "effective_date": subscription.get("downgrade_plan_date") if scheduled else None,
            }
        )

    async def terminate(self, request: Request, org_id: str) -> Response:
        invoice = request.query_params.get("on_termination_invoice")
        if invoice not in (None, "generate", "skip"):
            raise _Invalid(_error(("query", "on_termination_invoice"), "Must be generate or skip.", "enum"))
        if invoice == "skip" and not self.allow_skip_invoice:  # the org's own admin would end the period unbilled
            detail = (
                "Ending a subscription without its invoice is not allowed here: the period's usage would not be "
                "billed (billing_routes(allow_skip_invoice=True) allows it, for operators' routes)."
            )
            return JSONResponse({"detail": detail, "code": "skip_invoice_not_allowed"}, status_code=403)
        try:
            ended = self.billing.terminate_subscription(org_id, on_termination_invoice=invoice)
            subscription = await self._written(request, org_id, ended)
        except InvalidRequestError as exc:
            if isinstance(exc, InvalidIdentifierError):
                raise
            return self._held_elsewhere(request, org_id, exc, "to terminate")
        except LagoNotFoundError as exc:
            if no_such_route(exc):  # (LAGO_API_URL is wrong: see _lago_error)
                raise
            return _not_found(f"Org {org_id!r} has no active subscription to terminate.", "subscription_not_found")
        await self._invalidate(request, org_id)
        return JSONResponse({"subscription": subscription})

    async def record_usage(self, request: Request, org_id: str) -> Response:
        fields = {"event_code", "transaction_id", "properties", "timestamp", "user_id", "model", "endpoint"}
        body = await _json_object(self, request, fields | {"tokens", "input_tokens", "output_tokens"})
        event_code = body.string("event_code", is_id=True)
        transaction_id = body.string("transaction_id")
        properties = body.mapping("properties") or {}
        for key, value in properties.items():  # an org's admin must not lower (or break) its own bill
            refused = _property_error(value)
            if refused is not None:
                body.errors.append(_error(("body", "properties", key), *refused))
        if "operation_type" in properties:  # nor remove the seats/projects the app counted (unique_count_agg)
            body.errors.append(
                _error(
                    ("body", "properties", "operation_type"),
                    "Not accepted here: a 'remove' takes items out of a unique-count metric, which would let an org's "
                    "admin lower its own bill. Record removals from your backend (OrgBilling.record_usage).",
                    "extra_forbidden",
                )
            )
        user_id = body.string("user_id")
        model = body.string("model")
        endpoint_name = body.string("endpoint", max_length=2048)
        counts = {name: body.count(name) for name in ("tokens", "input_tokens", "output_tokens")}
        timestamp = body.data.get("timestamp")
        if timestamp is not None and (isinstance(timestamp, bool) or not isinstance(timestamp, (int, float, str))):
            body.errors.append(_error(("body", "timestamp"), "Must be Unix seconds (number or string).", "value_error"))
        body.check()
        if event_code is None or event_code == self.billing.settings.event_code:
            try:
                properties = _api_call_properties(
                    endpoint_name,
                    user_id,
                    counts["tokens"] or 0,
                    model,
                    counts["input_tokens"],
                    counts["output_tokens"],
                    properties,
                )
            except InvalidRequestError as exc:  # (a count over 2**53 - 1)
                raise _Invalid(_error(("body",), str(exc), "value_error")) from None
        else:
            for key, value in (("user_id", user_id), ("model", model), ("endpoint", endpoint_name), *counts.items()):
                if value is not None:
                    properties[key] = value
        # Lago accepts events for any subscription id and never bills unknown ones: refuse them here instead.
        subscription = await self.billing.get_subscription(org_id)
        if subscription is None:
            return _not_found(
                f"Org {org_id!r} has no active subscription: its usage would never be billed.", "subscription_not_found"
            )
        if event_code is not None and event_code != self.billing.settings.event_code:
            _check_billed(event_code, subscription)  # (nor events of a code its plan has no charge for: a typo)
        if timestamp is not None:
            _check_after_start(org_id, timestamp, subscription)  # (nor events of before it: never billed either)
        # counted by the gate at once, as the middleware counts its requests (else only at its next snapshot of Lago)
        quota = self.billing.quota
        if quota is None:
            gate = self._gate(request)
            quota = cast("QuotaGateProtocol", gate) if callable(getattr(gate, "settle", None)) else None
        if transaction_id is None:  # made here with its timestamp, so that a lost answer can say both (below)
            transaction_id = f"tx_{uuid.uuid4().hex}"
            timestamp = format_timestamp() if timestamp is None else timestamp
        try:
            event = await self.billing._record_usage(
                org_id,
                event_code or self.billing.settings.event_code,
                transaction_id,
                properties,
                timestamp,
                quota=quota,
            )
        except InvalidRequestError as exc:
            raise _Invalid(_error(("body",), str(exc), "value_error")) from None
        except (LagoUnavailableError, LagoRateLimitError) as exc:
            # Lago may hold the event (its answer lost): a retry under this transaction_id and timestamp is then a
            # duplicate, not a second charge (Lago's ClickHouse store deduplicates on both)
            sent = self.billing.client._first_timestamp(self.billing.subscription_id(org_id), transaction_id, None)
            stamp = format_timestamp(timestamp) if timestamp is not None else sent
            return _lago_error(exc, request, self._say, {"transaction_id": transaction_id, "timestamp": stamp})
        duplicate = bool(event.pop("duplicate", False))
        if duplicate:  # (a retry: the rare path) the event Lago bills, not this retry's body
            event = await self._held_event(event)
        return JSONResponse({"event": event, "duplicate": duplicate}, status_code=200 if duplicate else 201)

    async def _held_event(self, sent: JSON) -> JSON:
        """The event Lago holds under ``sent``'s transaction_id and subscription (as a 201 answers it, but for its
        ``timestamp``: the Unix seconds this retry sent, its deduplication key), else ``sent`` (Lago not answering,
        an id its path cannot take): an answer about a retry is never an error."""
        transaction_id = str(sent["transaction_id"])
        if transaction_id in (".", ".."):  # a dot segment (percent-encoding keeps dots): GET /events, GET /api/v1
            return sent
        try:
            held = await self.billing.client.get_event(transaction_id)
        except LagoIntegrationError:
            return sent
        # (GET /events/{id} is the first match across the account: never another org's event)
        if held.get("external_subscription_id") != sent.get("external_subscription_id"):
            return sent
        return {**held, "timestamp": sent.get("timestamp")}

    async def current_usage(self, request: Request, org_id: str) -> Response:
        metric = request.query_params.get("billable_metric_code") or None
        if metric is not None:
            try:
                validate_id(metric, "billable_metric_code")
            except InvalidRequestError as exc:
                raise _Invalid(_error(("query", "billable_metric_code"), str(exc), "value_error")) from None
        try:
            usage = await self._reads.read(
                ("usage", org_id, metric), lambda: self.billing.get_current_usage(org_id, billable_metric_code=metric)
            )
        except LagoNotFoundError as exc:
            if exc.code == "charge_not_found":
                return _not_found(f"The plan has no charge for metric {metric!r}.", "charge_not_found")
            raise
        if usage is None:
            return _not_found(f"Org {org_id!r} has no active subscription.", "subscription_not_found")
        return JSONResponse({"usage": usage})

    async def invoices(self, request: Request, org_id: str) -> Response:
        limit = _query_int(request, "limit", 100, self.invoice_limit)
        page = _query_int(request, "page", _MAX_PAGE, 1)

        async def fetch() -> Page | None:
            if await self.billing.get_customer(org_id) is None:
                return None
            # one page of Lago's list, newest first: ?page= reaches the history past the latest `limit`
            return await self.billing.client.list_invoices(external_customer_id=org_id, page=page, per_page=limit)

        found = await self._reads.read(("invoices", org_id, limit, page), fetch)
        if found is None:
            return _not_found(f"Org {org_id!r} has no billing account (call /setup first).", "customer_not_found")
        meta = {"page": page, "next_page": found.next_page, "total_pages": found.total_pages}
        return JSONResponse({"invoices": found.items[:limit], "meta": {**meta, "total_count": found.total_count}})

    async def dashboard(self, request: Request, org_id: str) -> Response:
        fmt = request.query_params.get("format")
        if fmt not in (None, "html", "json"):
            raise _Invalid(_error(("query", "format"), "Must be html or json.", "enum"))
        html = wants_html(request.headers.get("accept", ""), fmt)
        found = getattr(self._gate(request), "config", None)  # the names of the limits the gate enforces
        config = found if isinstance(found, QuotaConfig) else None
        data = await self._reads.read(
            ("dashboard", org_id, id(config)),  # (HTML or JSON: the same data)
            lambda: dashboard_data(
                self.billing,
                org_id,
                limits_provider=self.limits_provider,
                breakdown_provider=self.breakdown_provider,
                config=config,
            ),
        )
        headers = {"Vary": "Accept"}  # (no-store: every answer of these routes, see _endpoint)
        if data is None:
            detail = f"Org {org_id!r} has no active subscription."
            if html:
                page = render_no_subscription_html(org_id)
                return HTMLResponse(page, status_code=404, headers={**headers, **_HTML})
            return JSONResponse({"detail": detail, "code": "subscription_not_found"}, status_code=404, headers=headers)
        if html:
            return HTMLResponse(render_html(data), headers={**headers, **_HTML})
        return JSONResponse(data, headers=headers)


#: Seconds a cancelled write's invalidation may take (shielded from the cancellation: bounded).
_INVALIDATE_WHEN_CANCELLED = 5.0


def _lago_error(
    exc: LagoIntegrationError, request: Request, say: _Throttled, extra: Mapping[str, Any] | None = None
) -> JSONResponse:
    """Map errors to answers; messages come from codes, never from settings (no API key, no Lago URL). ``extra``
    adds fields to the 429 and 503 answers."""
    if isinstance(exc, LagoNotFoundError) and no_such_route(exc):
        # Lago's catch-all route: LAGO_API_URL is not where Lago is served (not "this org has nothing")
        say(
            "no route",
            "Lago has no route for %s %.200r (check LAGO_API_URL): %s",
            request.method,
            request.url.path,
            exc,
        )
        return JSONResponse({"detail": "The billing service is misconfigured."}, status_code=502)
    if isinstance(exc, LagoNotFoundError):
        return JSONResponse({"detail": "Not found in Lago.", "code": exc.code}, status_code=404)
    if isinstance(exc, LagoValidationError):  # a detail list, as every 422 of these routes (Lago's own kept in errors)
        return JSONResponse(
            {"detail": _lago_field_errors(exc), "code": exc.code, "errors": exc.details}, status_code=422
        )
    if isinstance(exc, LagoRateLimitError):
        # (a wait read as infinite, a proxy's "inf" or "1e999": no whole number of seconds, said as the default)
        asked = exc.retry_after
        wait = max(1, math.ceil(asked)) if asked is not None and math.isfinite(asked) else 1
        return JSONResponse(
            {"detail": "Lago is throttling requests; retry later.", **(extra or {})},
            status_code=429,
            headers={"Retry-After": str(wait)},
        )
    if isinstance(exc, LagoUnavailableError):
        return JSONResponse(
            {"detail": "Lago is unavailable; retry later.", **(extra or {})},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, LagoAuthenticationError):
        say("auth", "Lago refused the API key for %s %.200r: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "The billing service is misconfigured."}, status_code=502)
    if isinstance(exc, LagoAPIError):
        say(f"status {exc.status}", "Lago error on %s %.200r: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "Lago answered with an error.", "code": exc.code}, status_code=502)
    if isinstance(exc, ConfigurationError):
        raise exc  # a deployment error: loud, with its message in the server log
    raise exc


def _lago_field_errors(exc: LagoValidationError) -> list[dict[str, Any]]:
    """Lago's ``error_details`` (``{"external_id": ["value_already_exist"]}``) as FastAPI-style errors, one per
    reason; a 422 without details is one error on the body."""
    errors: list[dict[str, Any]] = []
    for field, reasons in (exc.details or {}).items():
        for reason in reasons if isinstance(reasons, list) else [reasons]:
            kind = reason if isinstance(reason, str) else "invalid"
            errors.append(_error(("body", str(field)), f"Lago refused {field}: {reason}.", kind))
    return errors or [_error(("body",), "Lago rejected the request.", exc.code or "validation_errors")]


def billing_routes(
    billing: OrgBilling | None = None,
    *,
    authorize: Authorize = deny_all,
    settings: BillingSettings | None = None,
    client: LagoClient | None = None,
    invalidate: Invalidate | SupportsInvalidate | None = None,
    limits_provider: LimitsProvider | None = None,
    breakdown_provider: BreakdownProvider | None = None,
    invoice_limit: int = 10,
    allow_skip_invoice: bool = False,
    plans: PlanFilter | None = None,
    max_body_size: int = 65_536,
) -> BillingRouter:
    """The org billing endpoints (see the module docstring) as a Router to mount.

    **Parameters:**

    * **billing** - *(optional)* the :class:`OrgBilling` to use; else one is built from ``settings``/``client``,
      or from the environment on the first request.
    * **authorize** - ``(request, org_id) -> bool`` (sync or async): may the caller manage this org? Default: deny.
    * **invalidate** - *(optional)* ``async (org_id)`` (or a plain function) or the quota gate, called after a plan
      change, a setup or a termination so that the org's quota state is refreshed at once, also when it answers 503
      (Lago may have applied it, its answer lost) (default: the gate ``OrgBillingMiddleware`` published in the
      scope, if any). A gate (given or found) also counts the usage ``POST /usage/record`` records at once, and
      names the limits the dashboard shows (its ``QuotaConfig``).
    * **limits_provider** - *(optional)* ``(org_id) -> {"max_api_calls": 300, ...}`` for the dashboard (default:
      ``LAGO_PLAN_LIMITS`` of the org's plan).
    * **breakdown_provider** - *(optional)* a local ledger ``(org_id) -> {"by_user": [...], "by_model": [...]}``
      (default: Lago's grouped usage).
    * **invoice_limit** - invoices listed when ``?limit`` is absent.
    * **allow_skip_invoice** - let ``DELETE /subscription?on_termination_invoice=skip`` end a subscription without
      the invoice of its period. Default False (403): the org's own admin would leave the period's usage unbilled;
      allow it only on routes your operators use.
    * **plans** - the plan codes ``setup`` and ``PUT /subscription`` accept (a collection), or ``(request, org_id,
      plan_code) -> bool`` (sync or async). Default ``None``: any plan of the Lago account, which lets an org's
      admin pick one kept for others (a $0 internal plan) when ``authorize`` lets org admins in: set it then. The
      org's own plan is taken by ``PUT /subscription`` even when not offered: back to it cancels a scheduled
      downgrade.
    * **max_body_size** - bytes a request body may have (413 beyond; 64 KiB by default).
    """
    return BillingRouter(
        billing,
        settings=settings,
        client=client,
        authorize=authorize,
        invalidate=invalidate,
        limits_provider=limits_provider,
        breakdown_provider=breakdown_provider,
        invoice_limit=invoice_limit,
        allow_skip_invoice=allow_skip_invoice,
        plans=plans,
        max_body_size=max_body_size,
    )
