"""Fault injection for the Lago emulator: errors, latency, dropped connections and rate limits.

Rules are added through the Python API (``fake.inject_fault(...)``) or over HTTP::

    POST   /_emulator/faults  {"status": 503, "count": 2, "path": "/api/v1/events"}
    POST   /_emulator/faults  {"status": 503, "seconds": 5}
    POST   /_emulator/faults  {"latency_ms": 250, "count": 1}
    POST   /_emulator/faults  {"drop": true, "count": 1}
    POST   /_emulator/faults  {"rate_limit": {"limit": 10, "reset": 1}}
    GET    /_emulator/faults  lists the active rules
    DELETE /_emulator/faults  removes every rule

A rule applies to requests whose path starts with ``path`` (default ``/api/v1``), never to the emulator's own
``/_emulator/`` controls (reset, state, webhooks): even ``"path": "/"`` leaves them working. A ``path`` ending with
``/`` names a whole segment: ``/api/v1/customers/`` applies to ``/api/v1/customers`` and what lies under it (the
emulator serves ``/api/v1/customers/`` as ``/api/v1/customers``, as Rails does). It lasts for
``count`` requests, for ``seconds`` after it was added, or, with neither, until it is cleared.
Rules are tried in the order they were added: each matching rule adds its latency, and the
first one that answers (status, drop or an exceeded rate limit) ends the chain.

Clearing the rules (``DELETE /_emulator/faults``, ``clear_faults()``, ``fake.reset()``) ends the latencies being
waited at once: each request held then goes on as its rules decided when it arrived (their status, drop or 429, else
the emulator's answer: after ``reset()``, its 503 for a request of the test that ended). A served emulator stopped
next has nothing left to wait for.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import anyio
import anyio.from_thread
import anyio.lowlevel
import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._errors import InvalidRequestError

__all__ = [
    "CONTROL_PATH",
    "DroppedConnection",
    "FaultController",
    "FaultMiddleware",
    "FaultRule",
    "FaultSpecError",
    "RateLimit",
    "install_faults",
]

CONTROL_PATH = "/_emulator/faults"
DEFAULT_PATH = "/api/v1"
EMULATOR_PATHS = "/_emulator/"
#: The paths the emulator normalizes before the rules meet them (``FakeLago.__call__``: repeated and trailing slashes)
API_PATHS = "/api/v1"
_REPEATED_SLASHES = re.compile("/{2,}")

# Module-level so tests can record latency without waiting for it.
_sleep = anyio.sleep

_ALLOWED_KEYS = frozenset({"status", "count", "seconds", "path", "latency_ms", "drop", "rate_limit", "body"})


class FaultSpecError(InvalidRequestError):
    """A fault rule is malformed. The message names the field and what it accepts."""


class DroppedConnection(httpx.RemoteProtocolError):
    """Raised in process to simulate a connection that Lago closed without answering.

    It is an :class:`httpx.TransportError`, so ``httpx.AsyncClient(transport=fake.transport())``
    surfaces it exactly like a real dropped connection.
    """


@dataclass
class RateLimit:
    """A fixed window: the first ``limit`` requests in each ``reset``-second window pass."""

    limit: int
    reset: float
    window_start: float | None = None
    used: int = 0


@dataclass
class FaultRule:
    """One fault. ``remaining`` counts down when ``count`` was given; ``expires_at`` uses the monotonic clock."""

    status: int | None = None
    count: int | None = None
    seconds: float | None = None
    path: str = DEFAULT_PATH
    latency_ms: float = 0.0
    drop: bool = False
    rate_limit: RateLimit | None = None
    body: Any = None
    remaining: int | None = field(default=None, repr=False)
    expires_at: float | None = field(default=None, repr=False)

    def matches(self, path: str) -> bool:
        # A prefix ending with "/" names a whole segment: the path it names (which the emulator serves without the
        # slash, as Rails does, and which reaches the rules so: ``/api/v1/customers/`` as ``/api/v1/customers``) and
        # what lies under it, not its neighbours (``/api/v1/events/``: not ``/api/v1/events_enriched``). It met
        # only what lies under it: a rule for exactly the path a request was sent to never fired.
        if self.path.endswith("/"):
            return (path + "/").startswith(self.path)
        return path.startswith(self.path)

    def expired(self, now: float) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return True
        return self.expires_at is not None and now >= self.expires_at

    def to_json(self, now: float) -> dict[str, Any]:
        data: dict[str, Any] = {"path": self.path}
        if self.status is not None:
            data["status"] = self.status
        if self.count is not None:
            data["count"] = self.count
            data["remaining"] = self.remaining
        if self.seconds is not None:
            data["seconds"] = self.seconds
            data["expires_in"] = max(0.0, (self.expires_at or now) - now)
        if self.latency_ms:
            data["latency_ms"] = self.latency_ms
        if self.drop:
            data["drop"] = True
        if self.rate_limit is not None:
            data["rate_limit"] = {"limit": self.rate_limit.limit, "reset": self.rate_limit.reset}
        if self.body is not None:
            data["body"] = self.body
        return data


@dataclass(eq=False)
class _Hold:
    """A latency being waited: its cancel scope, with the event loop and thread it runs in (``clear()`` ends it from
    any thread)."""

    scope: anyio.CancelScope
    token: Any  # (anyio.lowlevel.EventLoopToken: anyio 4.11+; None before, when only its own thread can end it)
    thread: int


class _SupportsFaults(Protocol):
    def add_middleware(self, factory: Callable[[ASGIApp], ASGIApp]) -> Any: ...


def _number(spec: Mapping[str, Any], key: str, *, minimum: float, integer: bool = False) -> float | None:
    value = spec.get(key)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise FaultSpecError(f"fault field {key!r} must be {kind} >= {minimum:g}, got {value!r}")
    try:  # (an integer past a float's range would overflow later, in the clock arithmetic or the sleep)
        finite = math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite or value < minimum:
        raise FaultSpecError(f"fault field {key!r} must be {kind} >= {minimum:g}, got {value!r}")
    return value


def parse_rule(spec: Any) -> FaultRule:
    """Validate a fault specification (the JSON body of ``POST /_emulator/faults``)."""
    # For the HTTP route and the Python API (``inject_fault``) alike: stored, a lone surrogate in 'body' or 'path'
    # broke the listing and every faulted answer (nothing can encode it).
    if _holds_lone_surrogate(spec):
        raise FaultSpecError(
            "a fault holds a lone surrogate (a \\ud800-\\udfff character without its pair), which is not Unicode text"
        )
    if not isinstance(spec, Mapping):
        raise FaultSpecError('a fault must be a JSON object such as {"status": 503, "count": 2}')
    unknown = sorted(set(spec) - _ALLOWED_KEYS)
    if unknown:
        raise FaultSpecError(
            f"unknown fault field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(_ALLOWED_KEYS))}"
        )
    status = _number(spec, "status", minimum=100, integer=True)
    if status is not None and not 400 <= status <= 599:
        raise FaultSpecError(f"fault field 'status' must be an HTTP error status (400-599), got {status!r}")
    count = _number(spec, "count", minimum=1, integer=True)
    seconds = _number(spec, "seconds", minimum=0)
    if seconds == 0:  # expired as it is added: it could never apply
        raise FaultSpecError("fault field 'seconds' needs a window longer than 0 seconds (e.g. 1), got 0")
    if count is not None and seconds is not None:
        raise FaultSpecError("give either 'count' (number of requests) or 'seconds' (time window), not both")
    latency = _number(spec, "latency_ms", minimum=0) or 0.0
    drop = spec.get("drop", False)
    if not isinstance(drop, bool):
        raise FaultSpecError(f"fault field 'drop' must be true or false, got {drop!r}")
    path = spec.get("path", DEFAULT_PATH)
    if not isinstance(path, str) or not path.startswith("/"):
        raise FaultSpecError(f"fault field 'path' must be a path prefix starting with '/', got {path!r}")
    # Rules that could never apply, refused now rather than silently never firing: requests are matched by their
    # path alone (no query string, no fragment), and the emulator's own controls are never faulted.
    if "?" in path or "#" in path:
        raise FaultSpecError(
            f"fault field 'path' is matched against the request's path, without query string or fragment, got {path!r}"
        )
    if path.startswith(API_PATHS):  # (served as Rails routes it, without repeated slashes: so met by the rules)
        path = _REPEATED_SLASHES.sub("/", path)
    if path.startswith(EMULATOR_PATHS):
        raise FaultSpecError(
            f"fault field 'path' cannot be under {EMULATOR_PATHS!r} (the emulator's controls are never faulted), "
            f"got {path!r}"
        )
    rate_limit: RateLimit | None = None
    raw_limit = spec.get("rate_limit")
    if raw_limit is not None:
        if not isinstance(raw_limit, Mapping) or set(raw_limit) - {"limit", "reset"}:
            raise FaultSpecError(
                'fault field \'rate_limit\' must be {"limit": <requests per window>, "reset": <window seconds>}'
            )
        limit = _number(raw_limit, "limit", minimum=0, integer=True)
        reset = _number(raw_limit, "reset", minimum=0)
        if limit is None or reset is None:
            raise FaultSpecError("fault field 'rate_limit' needs both 'limit' and 'reset'")
        if reset == 0:  # a new window on every request: it could never answer 429
            raise FaultSpecError(
                f"fault field 'rate_limit' needs a 'reset' window longer than 0 seconds (e.g. 1), got {reset!r}"
            )
        rate_limit = RateLimit(limit=int(limit), reset=float(reset))
    if status is None and not drop and rate_limit is None and not latency:
        raise FaultSpecError(
            "a fault needs at least one of 'status', 'drop', 'latency_ms' or 'rate_limit', "
            'e.g. {"status": 503, "count": 2}'
        )
    if sum((status is not None, drop, rate_limit is not None)) > 1:
        raise FaultSpecError("'status', 'drop' and 'rate_limit' are exclusive: use one per fault")
    body = spec.get("body")
    if body is not None and status is None:
        raise FaultSpecError("fault field 'body' only goes with 'status'")
    if body is not None:
        try:  # (as the response will send it: refused now, not when a request meets the rule)
            json.dumps(body, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise FaultSpecError(f"fault field 'body' must be JSON (objects, lists, strings, numbers): {exc}") from None
    return FaultRule(
        status=None if status is None else int(status),
        count=None if count is None else int(count),
        seconds=seconds,
        path=path,
        latency_ms=float(latency),
        drop=drop,
        rate_limit=rate_limit,
        body=body,
    )


#: Lago's reason phrases where Python's have changed since (3.13: 413 "Content Too Large", 422 "Unprocessable
#: Content"), or differ before 3.13 (414 "Request-URI Too Long", 416 "Requested Range Not Satisfiable"): the error
#: bodies stay what Lago sends on every Python.
_LAGO_PHRASES = {
    413: "Payload Too Large",
    414: "URI Too Long",
    416: "Range Not Satisfiable",
    422: "Unprocessable Entity",
}


def error_body(status: int) -> dict[str, Any]:
    """The body Lago sends for ``status`` (see docs: error envelope)."""
    phrase = _LAGO_PHRASES.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
    if status == 500:
        return {"status": 500, "errors": [{"message": "Internal Server Error (injected fault)"}], "data": {}}
    body: dict[str, Any] = {"status": status, "error": phrase}
    codes = {
        403: "forbidden",
        404: "resource_not_found",
        405: "method_not_allowed",
        422: "validation_errors",
        429: "too_many_requests",
    }
    if status in codes:
        body["code"] = codes[status]
    if status == 422:
        body["error_details"] = {}
    if status == 400:
        body["error"] = "BadRequest: injected fault"
    return body


class FaultController:
    """Holds the fault rules of one emulator. Thread-safe: tests may add rules while a server thread runs."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = []
        self._generation = 0  # bumped by clear(): a request whose rules were taken before waits no latency
        self._holds: set[_Hold] = set()  # the latencies being waited, which clear() ends

    @property
    def rules(self) -> list[FaultRule]:
        """The active rules (expired ones are pruned)."""
        with self._lock:
            self._prune(self._clock())
            return list(self._rules)

    def add(self, rule: FaultRule) -> FaultRule:
        now = self._clock()
        rule.remaining = rule.count
        rule.expires_at = None if rule.seconds is None else now + rule.seconds
        if rule.rate_limit is not None:
            rule.rate_limit.window_start = None
            rule.rate_limit.used = 0
        with self._lock:
            self._rules.append(rule)
        return rule

    def inject(
        self,
        status: int | None = None,
        *,
        count: int | None = None,
        seconds: float | None = None,
        path: str = DEFAULT_PATH,
        latency_ms: float | None = None,
        drop: bool = False,
        rate_limit: Mapping[str, float] | None = None,
        body: Any = None,
    ) -> FaultRule:
        """Add a rule; same fields and validation as ``POST /_emulator/faults``."""
        spec: dict[str, Any] = {"path": path, "drop": drop}
        for key, value in (
            ("status", status),
            ("count", count),
            ("seconds", seconds),
            ("latency_ms", latency_ms),
            ("rate_limit", rate_limit),
            ("body", body),
        ):
            if value is not None:
                spec[key] = value
        return self.add(parse_rule(spec))

    def clear(self) -> None:
        """Remove every rule, and end the latencies being waited: the requests they hold go on at once, as their
        rules decided when they arrived (a held request kept a served emulator from stopping, which then cancelled it
        with an error logged)."""
        with self._lock:
            self._rules.clear()
        self._end_waits()

    def _end_waits(self) -> None:
        """End the latencies being waited, and those of requests whose rules are already taken, keeping the rules
        (what :meth:`clear` does to them; ``serve_in_thread`` as it stops: a held request kept the server from
        stopping for its graceful timeout, then was cancelled with a traceback logged)."""
        with self._lock:
            self._generation += 1
            holds = list(self._holds)
            self._holds.clear()
        for hold in holds:  # (outside the lock: the loop thread may be waiting for it)
            try:
                if hold.thread == threading.get_ident():
                    hold.scope.cancel()
                elif hold.token is not None:
                    anyio.from_thread.run_sync(hold.scope.cancel, token=hold.token)
            except RuntimeError:  # its event loop has ended (the request with it)
                pass

    async def _hold(self, seconds: float, generation: int) -> None:
        """Wait a rule's latency for a request whose rules were taken at ``generation``, unless :meth:`clear` ends
        it (or came in between)."""
        current_token = getattr(anyio.lowlevel, "current_token", None)  # (anyio 4.11+, the testing extra's)
        hold = _Hold(anyio.CancelScope(), current_token() if current_token else None, threading.get_ident())
        with self._lock:
            if generation != self._generation:
                return
            self._holds.add(hold)
        try:
            with hold.scope:
                await _sleep(seconds)
        finally:
            with self._lock:
                self._holds.discard(hold)

    def _prune(self, now: float) -> None:
        self._rules = [rule for rule in self._rules if not rule.expired(now)]

    def _take(self, path: str) -> tuple[list[FaultRule], dict[str, str] | None, bool, int]:
        """Claim the rules that apply to one request, counting it against their ``count`` and rate-limit windows.

        Returns the claimed rules in order (each adds its latency; the last one answers if it has a status or drops),
        the ``X-RateLimit-*`` headers of the last rate limit met (``None``: none) and whether that rate limit was
        exceeded, and the rules' generation (see :meth:`_hold`). An exceeded rate limit answers 429 and ends the chain
        there: the rules after it are not claimed, their ``count`` stays for the requests that reach them. Decided at
        once under the lock, so that concurrent requests never share one ``count``."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            claimed = []
            rate_headers: dict[str, str] | None = None
            limited = False
            for rule in self._rules:
                if not rule.matches(path):
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                claimed.append(rule)
                if rule.status is not None or rule.drop:
                    break
                if rule.rate_limit is not None:
                    allowed, rate_headers = self._count_rate(rule.rate_limit, now)
                    if not allowed:
                        limited = True
                        break
            return claimed, rate_headers, limited, self._generation

    def _count_rate(self, rate: RateLimit, now: float) -> tuple[bool, dict[str, str]]:
        """Count one request in the window (the lock held); return (allowed, X-RateLimit-* headers)."""
        if rate.window_start is None or now - rate.window_start >= rate.reset:
            rate.window_start = now
            rate.used = 0
        rate.used += 1
        reset_in = max(0, math.ceil(rate.window_start + rate.reset - now))
        headers = {
            "X-RateLimit-Limit": str(rate.limit),
            "X-RateLimit-Remaining": str(max(0, rate.limit - rate.used)),
            "X-RateLimit-Reset": str(reset_in),
        }
        return rate.used <= rate.limit, headers

    def middleware(self, app: ASGIApp) -> FaultMiddleware:
        """Factory for ``fake.add_middleware``."""
        return FaultMiddleware(app, self)

    # Control endpoints -------------------------------------------------------------------------

    async def _post(self, request: Request) -> Response:
        try:
            spec = json.loads(await request.body() or b"null")
        except (ValueError, RecursionError):  # (RecursionError: nested deeper than the decoder goes)
            return _unprocessable('the body must be JSON, e.g. {"status": 503, "count": 2}')
        try:
            rule = self.add(parse_rule(spec))
        except FaultSpecError as exc:
            return _unprocessable(str(exc))
        return JSONResponse({"fault": rule.to_json(self._clock())}, status_code=201)

    async def _get(self, request: Request) -> Response:
        now = self._clock()
        return JSONResponse({"faults": [rule.to_json(now) for rule in self.rules]})

    async def _delete(self, request: Request) -> Response:
        self.clear()
        return JSONResponse({"faults": []})

    def routes(self) -> list[Route]:
        """The ``/_emulator/faults`` control routes."""
        return [
            Route(CONTROL_PATH, self._post, methods=["POST"]),
            Route(CONTROL_PATH, self._get, methods=["GET"]),
            Route(CONTROL_PATH, self._delete, methods=["DELETE"]),
        ]


#: What the controls answer (their 422) for a body holding a lone surrogate, which the API refuses with Lago's 400
LONE_SURROGATE_MESSAGE = (
    "the body holds a lone surrogate (a \\ud800-\\udfff escape without its pair), which is not Unicode text"
)


def _holds_lone_surrogate(value: Any) -> bool:
    """The API routes' check (see ``_emulator._holds_lone_surrogate``), imported when called: that module imports
    this one."""
    from ._emulator import _holds_lone_surrogate as holds

    return holds(value)


def _unprocessable(message: str) -> Response:
    return JSONResponse(
        {"status": 422, "error": "Unprocessable Entity", "code": "invalid_fault", "message": message},
        status_code=422,
    )


class FaultMiddleware:
    """Pure ASGI middleware applying a :class:`FaultController`'s rules; also serves its control routes."""

    def __init__(self, app: ASGIApp, controller: FaultController) -> None:
        self.app = app
        self.controller = controller
        self.control = Router(routes=controller.routes())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == CONTROL_PATH:
            await self.control(scope, receive, send)
            return
        if path.startswith(EMULATOR_PATHS):  # the emulator's own controls (reset, state...) are never faulted
            await self.app(scope, receive, send)
            return
        rules, rate_headers, limited, generation = self.controller._take(path)
        for rule in rules:
            if rule.latency_ms:
                await self.controller._hold(rule.latency_ms / 1000, generation)
        last = rules[-1] if rules else None
        if last is not None and last.drop:
            await _drop(scope, receive, send)
            return
        if last is not None and last.status is not None:
            body = last.body if last.body is not None else error_body(last.status)
            await JSONResponse(body, status_code=last.status)(scope, receive, send)
            return
        if limited:
            await JSONResponse(error_body(429), status_code=429, headers=rate_headers)(scope, receive, send)
            return
        if not rate_headers:
            await self.app(scope, receive, send)
            return
        extra = [(k.lower().encode(), v.encode()) for k, v in rate_headers.items()]

        async def send_with_rate_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.extend(extra)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_rate_headers)


def _server_cycle(send: Any, depth: int = 0) -> Any:
    """The uvicorn request cycle behind ``send`` (bound method ``cycle.send``), if any.

    Middleware in between (the emulator's request log, for one) wraps ``send`` in closures, so look
    through a few levels of closure cells too.
    """
    cycle = getattr(send, "__self__", None)
    if cycle is not None and callable(getattr(getattr(cycle, "transport", None), "close", None)):
        return cycle
    if depth >= 4:
        return None
    for cell in getattr(send, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:  # empty cell
            continue
        if callable(content):
            found = _server_cycle(content, depth + 1)
            if found is not None:
                return found
    return None


async def _drop(scope: Scope, receive: Receive, send: Send) -> None:
    """End the request without an HTTP response.

    Under uvicorn, close the request's socket: the client sees "server disconnected without sending
    a response". Otherwise start a response and raise :class:`DroppedConnection`: in process,
    ``httpx.ASGITransport`` hands that transport error to the caller as is, and a server aborts the
    connection in the middle of the response.
    """
    cycle = _server_cycle(send)
    if cycle is not None:
        cycle.transport.close()
        # Let the event loop deliver connection_lost so uvicorn does not try to answer with a 500.
        for _ in range(10):
            if getattr(cycle, "disconnected", True):
                break
            await anyio.lowlevel.checkpoint()
        return
    await send({"type": "http.response.start", "status": 502, "headers": [(b"content-length", b"1")]})
    raise DroppedConnection("Server disconnected without sending a response (injected fault).")


def install_faults(fake: _SupportsFaults, *, clock: Callable[[], float] | None = None) -> FaultController:
    """Add fault injection to a FakeLago: middleware, ``/_emulator/faults`` and ``fake.inject_fault``.

    ``clock`` is a monotonic clock in seconds (default :func:`time.monotonic`), used by ``seconds``
    windows and rate limits; tests pass a hand-driven one. Idempotent: a second call
    returns the same controller (switching to ``clock`` if given).
    """
    existing = getattr(fake, "faults", None)
    if isinstance(existing, FaultController):
        if clock is not None:
            existing._clock = clock
        return existing
    controller = FaultController(clock=clock or time.monotonic)
    fake.add_middleware(controller.middleware)
    # FakeLago is open for these attributes; setattr keeps mypy quiet about the Protocol.
    setattr(fake, "faults", controller)  # noqa: B010
    setattr(fake, "inject_fault", controller.inject)  # noqa: B010
    setattr(fake, "clear_faults", controller.clear)  # noqa: B010
    return controller
