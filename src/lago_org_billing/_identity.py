"""Who a request is billed to: pluggable org and user resolvers.

A *resolver* is any callable taking the ASGI ``scope`` and returning an id (``str``), ``None`` (unresolved) or an
awaitable of either. Resolvers work on the scope, so they run before any ``Request`` exists; build one with
``Request(scope)`` when needed, it is cheap. Built-ins:

- :func:`from_state`: ``scope["state"][key]``, i.e. ``request.state.<key>`` set by the app's auth layer;
- :func:`from_user`: an attribute of ``scope["user"]`` (Starlette ``AuthenticationMiddleware``);
- :func:`from_jwt_claim`: a claim of a verified ``Authorization: Bearer`` JWT (one key, or the issuer's JWKS);
- :func:`from_header`: a request header. Opt-in only (``LAGO_ORG_HEADER``): any client can send any header, so pair it
  with ``membership_check`` unless a trusted proxy sets it;
- :func:`first_of`: the first resolver that finds an id.

Ids are cleaned the same way whatever the source: ``str`` (surrounding blanks stripped), ``int`` or ``UUID`` are
accepted (an ``int`` as its number, a ``UUID`` as its hex form, whatever ``str()`` of a subclass or enum member says);
empty values, values longer than 255 characters or with control characters count as unresolved. A value of another
type (``bytes``, a float, a bool, any other object) is a bug where it was set: it is said once at WARNING, and the
request is unresolved, never resolved by a later source (a header) instead; so is, in ``request.state`` or
``request.user``, a ``str`` or ``int`` that is there (not blank) but can never be an id.
"""

from __future__ import annotations

import base64
import collections.abc
import contextlib
import dataclasses
import datetime as dt
import inspect
import itertools
import logging
import math
import re
import uuid
import warnings
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio
from starlette.requests import HTTPConnection
from starlette.types import Scope

from ._errors import ConfigurationError, traceback_text
from ._settings import BillingSettings, header_as_sent, header_name_problem

if TYPE_CHECKING:
    import httpx

__all__ = [
    "SCOPE_KEY",
    "Identity",
    "Resolver",
    "billing_scope",
    "call_resolver",
    "default_identity",
    "default_org_resolver",
    "default_user_resolver",
    "first_of",
    "from_header",
    "from_jwt_claim",
    "from_state",
    "publish_identity",
    "from_user",
    "get_current_org",
    "get_current_user",
    "reset_warnings",
    "resolve_now",
]

logger = logging.getLogger("lago_org_billing.identity")

#: Key of the per-request billing dict in the ASGI scope: ``{"org_id", "user_id", "explicit_usage", ...}``.
#: It holds a dict (not values directly) so that scope copies made by other middleware share it.
SCOPE_KEY = "lago_org_billing"

MAX_ID_LENGTH = 255
#: Ints of this many digits or more are too long to be an id (MAX_ID_LENGTH).
_INT_BOUND = 10**MAX_ID_LENGTH

Resolver = Callable[[Scope], str | Awaitable[str | None] | None]
MembershipCheck = Callable[[Scope, str], bool | Awaitable[bool]]
_R = TypeVar("_R", bound=Callable[..., Any])

_JWT_CACHE_KEY = "lago_org_billing.jwt_claims"
#: Scope key set (to the header's name) when a bearer-token header came more than once with different values: the
#: middleware refuses such a request (400) whatever ``on_unresolved`` says. Unresolved and served, it was served
#: unbilled and ungated while the app's auth (Starlette's ``request.headers``, FastAPI's ``HTTPBearer``) accepted the
#: first value: any client could stop paying by adding a second ``Authorization`` header.
AMBIGUOUS_CREDENTIALS = "lago_org_billing.ambiguous_credentials"
#: Scope key of the ``(check, org)`` pairs whose membership check this request already waited out (see from_header).
_TIMED_OUT_KEY = "lago_org_billing.membership_timed_out"
_reported: set[tuple[str, str]] = set()


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    """The org (and user) a request is billed to; ``org_id=None`` means unresolved."""

    org_id: str | None
    user_id: str | None = None


def _first_time(key: tuple[str, str]) -> bool:
    """Whether ``key`` (what, and of whom) is to be said now: the first time only (remembered in ``_reported``)."""
    if key in _reported:
        return False
    _reported.add(key)
    return True


def reset_warnings() -> None:
    """Forget which resolver errors and token refusals were already logged (for tests)."""
    _reported.clear()
    _refusals_said.clear()


class _NotAnId(Exception):
    """Raised by :func:`from_state` and :func:`from_user` for a value that is there but can never be an id (said at
    WARNING where found): it stops a :func:`first_of` chain, as a resolver that raises does, and
    :func:`call_resolver` treats the request as unresolved without logging it again. A chain that went on would
    resolve a later source instead: the org a client names in its header, for a request the app's auth attributed to
    another (``request.state.org_id = b"org_a"``, read from Redis without ``decode_responses``)."""


def _not_an_id(value: object) -> bool:
    """Whether ``value`` is there but of a type that is never an id (``bytes``, a float, a bool, another object)."""
    return value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, uuid.UUID)))


def _there(value: object) -> bool:
    """Whether ``value``, of which :func:`_clean_id` made no id, is there all the same: of a type that is never an id
    (:func:`_not_an_id`), or a ``str`` or ``int`` that can never be one (over 255 characters, control characters, as in
    ``"acme\\u200b"`` pasted from a page). A blank ``str`` is no value, as ``None`` is."""
    return bool(value.strip()) if isinstance(value, str) else value is not None


def _said_not_an_id(source: str, value: object) -> None:
    """Say, once per source and type, that ``source`` holds ``value``, which is not an id."""
    if isinstance(value, (str, int)) and not isinstance(value, bool):  # of an id's type, but no id (see _there)
        if _first_time((source, "holds no id")):
            shown = (
                f"{value[:100]!r} ({len(value)} characters)"
                if isinstance(value, str)
                else "an int too long to be an id"
            )
            logger.warning(
                "%s holds %s, which cannot be an id (at most 255 characters, no control characters): the request is "
                "treated as unresolved (no later source, such as a header, is tried instead). Fix the value where it "
                "is set. Logged once per source.",
                source,
                shown,
            )
        return
    kind = type(value).__qualname__
    if _first_time((source, f"holds {kind}")):
        logger.warning(
            "%s holds a %s (%.100r), which is not an id: the request is treated as unresolved (no later source, such "
            "as a header, is tried instead). Set it to the id as a str (bytes need .decode(): redis-py returns bytes "
            "unless decode_responses=True), an int or a UUID. Logged once per source and type.",
            source,
            kind,
            value,
        )


def _checked_id(value: object, source: str, name: str = "") -> str | None:
    """``value`` found at ``source + name`` (``request.state.org_id``...) as an id string, or ``None`` when there is
    none; one there that can never be an id (a type that never is, a str of 300 characters: :func:`_there`) is said
    (:func:`_said_not_an_id`) and raises :class:`_NotAnId`."""
    ident = _clean_id(value)
    if ident is None and _there(value):
        source += name  # (made only then: a resolver runs per request)
        _said_not_an_id(source, value)
        raise _NotAnId(f"{source} holds a {type(value).__qualname__}, which is not an id (see the WARNING)")
    return ident


def _clean_id(value: object) -> str | None:
    """``value`` as an id string, or ``None`` when it cannot be one."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
    elif isinstance(value, int):
        # Its number, whatever str() of a subclass says: an enum member of ints is 'Tenant.ACME' (an IntEnum's too on
        # Python 3.10), an ORM's key type may print 'Org #7'. Bounded first: one of more digits than an id has was
        # the ValueError of str() over 4300 digits, a crash of the request.
        if not -_INT_BOUND < value < _INT_BOUND:
            return None
        value = int.__repr__(value)
    elif isinstance(value, uuid.UUID):
        value = uuid.UUID.__str__(value)  # (its hex form, not a subclass's own str(): 'urn:uuid:...')
    else:
        return None
    if not value or len(value) > MAX_ID_LENGTH or not value.isprintable():
        return None
    return value


def _resolver_name(resolver: object) -> str:
    return getattr(resolver, "__qualname__", None) or type(resolver).__qualname__


def describe_resolver(resolver: object) -> str:
    """Where a resolver looks for the id, in words for a log message: what a built-in reads
    (``request.state.org_id``, ``the X-Org-Id header``; a :func:`first_of`, each of its resolvers in turn), else the
    function's name (``tenant_of``)."""
    source = getattr(resolver, "_lago_source", None)
    return source if isinstance(source, str) else _resolver_name(resolver)


def _described(resolver: _R, source: str) -> _R:
    """Mark a built-in resolver with what :func:`describe_resolver` says of it."""
    setattr(resolver, "_lago_source", source)  # noqa: B010 - a plain attribute on a function object
    return resolver


async def call_resolver(resolver: Resolver, scope: Scope) -> str | None:
    """Run a sync or async resolver and clean what it returns.

    A resolver that raises does not fail the request: the error is logged at ERROR with its traceback (once per
    resolver and exception type, later ones at DEBUG) and the request is treated as unresolved, so it follows the
    middleware's unresolved-org policy. ``BaseException``\\s that are not ``Exception`` (cancellation) propagate.
    """
    value = resolve_now(resolver, scope)
    if value is None or isinstance(value, str):
        return value
    return await value


def resolve_now(resolver: Resolver, scope: Scope) -> str | Awaitable[str | None] | None:
    """:func:`call_resolver` without a coroutine when the resolver is synchronous (the hot path): the cleaned id,
    ``None``, or an awaitable of either when the resolver is async."""
    try:
        value = resolver(scope)
    except Exception as exc:
        _report(resolver, exc)
        return None
    if value is None or type(value) is str:
        return _clean_id(value)
    if inspect.isawaitable(value):
        return _Pending(_finish, value, resolver)
    return _clean_result(resolver, value)


class _Pending(collections.abc.Coroutine[Any, Any, "str | None"]):
    """The coroutine of an id that an async resolver is still working out (:func:`resolve_now`, :func:`first_of`).

    Unlike a plain coroutine, dropping it unawaited is quiet: it closes what it holds (the resolver's own coroutine),
    so giving up on an async resolver - ``get_current_org()`` only tries synchronous ones - leaves no "coroutine
    ... was never awaited" warning behind. Closing a coroutine that never started runs none of its code. It is a
    :class:`collections.abc.Coroutine`: awaited, or scheduled as a task (``asyncio.create_task``, ``start_soon``),
    though not a native one (``inspect.iscoroutine`` is false; ``asyncio.iscoroutine`` is true)."""

    __slots__ = ("_args", "_coro", "_held", "_then")

    def __init__(self, then: Callable[..., Coroutine[Any, Any, str | None]], held: Awaitable[Any], *args: Any) -> None:
        self._then = then
        self._args = args
        self._held: Awaitable[Any] | None = held
        self._coro: Coroutine[Any, Any, str | None] | None = None

    def _started(self) -> Coroutine[Any, Any, str | None]:
        if self._coro is None:
            held, self._held = self._held, None
            if held is None:
                raise RuntimeError("This resolver result was already awaited (or closed).")
            self._coro = self._then(held, *self._args)
        return self._coro

    def __await__(self) -> Generator[Any, None, str | None]:
        coro, self._coro = self._started(), None  # the awaiting frame holds it now: not closed when this one goes
        return coro.__await__()

    def send(self, value: Any) -> Any:
        return self._started().send(value)

    def throw(self, *args: Any) -> Any:
        if self._coro is None:  # thrown into before it started (a task cancelled at once): nothing of it ran
            self.close()
            error = args[1] if len(args) > 1 and args[1] is not None else args[0]
            raise error() if isinstance(error, type) else error
        return self._coro.throw(*args)

    def close(self) -> None:
        """Give up on the result: close the running coroutine, or what is held (a coroutine, another ``_Pending``)."""
        if self._coro is not None:
            self._coro.close()
            return
        held, self._held = self._held, None
        close = getattr(held, "close", None)
        if close is not None:
            close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - a finalizer must not raise; a custom awaitable's close() might
            pass


async def _finish(pending: Awaitable[Any], resolver: Resolver) -> str | None:
    try:
        value = await pending
    except Exception as exc:
        _report(resolver, exc)
        return None
    return _clean_result(resolver, value)


def _clean_result(resolver: object, value: object) -> str | None:
    """:func:`_clean_id` of what a resolver returned; a value of a type that is never an id (``bytes``, a tuple, a
    float...) is a bug in the resolver that would leave every request unresolved without a word: said once."""
    ident = _clean_id(value)
    if ident is None and value is not None and not isinstance(value, (str, int, uuid.UUID)):
        name, kind = _resolver_name(resolver), type(value).__qualname__
        if _first_time((name, f"returned {kind}")):
            logger.warning(
                "Identity resolver %s returned a %s (%.100r), which is not an id: the request is treated as "
                "unresolved. Return the id as a str (bytes need .decode()), an int or a UUID, or None when there is "
                "none. Logged once per resolver and type.",
                name,
                kind,
                value,
            )
    return ident


def _report(resolver: Resolver, exc: Exception) -> None:
    if type(exc) is _NotAnId:  # (said where the value was found)
        return
    key = (_resolver_name(resolver), type(exc).__qualname__)
    if _first_time(key):
        logger.error(  # the traceback as text, not the exception: its frames held the request's scope (its bearer
            # token) and a JWT-decoding resolver's signing key, which error trackers ship with a record's exception
            "Identity resolver %s raised %s; the request is treated as unresolved. Fix the resolver "
            "(this traceback is logged once per resolver and error type).\n%s",
            key[0],
            key[1],
            traceback_text(exc),
        )
    else:
        logger.debug("Identity resolver %s failed again: %r", key[0], exc)


def from_state(key: str = "org_id") -> Resolver:
    """Resolve from ``request.state.<key>`` (Starlette keeps ``request.state`` in ``scope["state"]``).

    A value there of a type that is never an id (``bytes``, a float, a bool, another object), or a ``str`` or ``int``
    that can never be one (over 255 characters, control characters; a blank one is no value), is said once at WARNING
    and leaves the request unresolved: a :func:`first_of` chain stops there, rather than resolving a later source
    (the client's header) for a request the app's auth attributed to an org."""
    if not isinstance(key, str) or not key:
        raise ConfigurationError(
            f"from_state(key) must be the name of the request.state attribute holding the id, such as 'org_id', "
            f"got {key!r}."
        )

    source = f"request.state.{key}"

    def resolve_from_state(scope: Scope) -> str | None:
        state = scope.get("state")
        if state is None:
            return None
        if type(state) is dict or isinstance(state, Mapping):
            value = state.get(key)
        else:
            value = getattr(state, key, None)
        return _checked_id(value, source)

    return _described(_clean_ids(resolve_from_state), source)


def from_user(attribute: str | Sequence[str] = "org_id") -> Resolver:
    """Resolve from ``scope["user"]`` set by Starlette's ``AuthenticationMiddleware``.

    ``attribute`` may be a sequence of names tried in order. Mapping users are read with ``user[attribute]``,
    other objects with ``getattr``. Users whose ``is_authenticated`` (attribute, method or mapping item) is false
    resolve to ``None``, as do attributes that are missing or raise ``NotImplementedError`` (``BaseUser.identity``).
    An attribute holding a value that can never be an id stops there, as with :func:`from_state`.
    """
    names = (attribute,) if isinstance(attribute, str) and attribute else _attribute_names(attribute)

    def resolve_from_user(scope: Scope) -> str | None:
        user = scope.get("user")
        if user is None:
            return None
        if isinstance(user, Mapping):
            flag = user.get("is_authenticated", True)
            if flag is not True and not (flag() if callable(flag) else flag):
                return None
            for name in names:
                value = _checked_id(user.get(name), "request.user.", name)
                if value is not None:
                    return value
            return None
        try:
            flag = getattr(user, "is_authenticated", True)
            # (a method, as in Django < 1.10 or Flask-Login < 0.3: the bound method itself is always true)
            if flag is not True and not (flag() if callable(flag) else flag):
                return None
        except NotImplementedError:
            pass
        for name in names:
            try:
                raw = getattr(user, name, None)
            except NotImplementedError:
                continue
            value = _checked_id(raw, "request.user.", name)
            if value is not None:
                return value
        return None

    return _described(_clean_ids(resolve_from_user), "request.user." + " or .".join(names))


def _header_value(scope: Scope, name: bytes) -> str | None:
    """The single value of a request header; absent, repeated with different values, or unreadable: ``None``."""
    found: bytes | None = None
    for key, value in scope.get("headers") or ():
        if key == name:  # ASGI servers give header names in lower case (Starlette's request.headers relies on it)
            if found is not None and value != found:
                return None  # ambiguous: two different values, trust neither
            found = value
    if found is None:
        return None
    try:
        return _decoded(found)
    except AttributeError:
        return None


def _decoded(raw: bytes) -> str:
    """A header value as the text the client meant: UTF-8 (what clients other than browsers send, and what ids are
    everywhere else: request.state, Lago, the migration's mapping files), else Latin-1 (a browser's ``fetch()``
    sends its ISO-8859-1 bytes). Read as Latin-1 only, a UTF-8 ``société`` was the id ``sociÃ©tÃ©``. ASCII reads
    the same either way."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _attribute_names(attribute: object) -> tuple[str, ...]:
    """``from_user``'s attribute names, checked: each a non-empty string, at least one."""
    names = tuple(attribute) if isinstance(attribute, (list, tuple)) else None
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ConfigurationError(
            f"from_user(attribute) must be the name of the user's attribute holding the id, such as 'org_id', or a "
            f"list of names tried in order, got {attribute!r}."
        )
    return names


def from_header(
    name: str, *, membership_check: MembershipCheck | None = None, membership_timeout: float | None = 5.0
) -> Resolver:
    """Resolve from a request header (opt-in: a client can send any header value).

    The value is read as UTF-8 (else Latin-1, as browsers send it), and must be non-empty, at most 255 characters,
    without control characters, and not repeated with different values; anything else is ``None``.
    ``membership_check(scope, org_id)`` (sync or async) can confirm that the authenticated caller belongs to that
    org; when it returns false, raises, answers anything but ``True``, or (async) does not answer within
    ``membership_timeout`` seconds (5 by default; ``None`` waits without bound), the request is unresolved and
    follows the middleware's unresolved-org policy (a timeout is logged once at WARNING, later ones at DEBUG; a request
    is held by it once: the middleware's second look for the org, once the endpoint answered, does not wait again). A
    check doing I/O should be ``async``: a synchronous one blocks the event loop, and no timeout can stop it.
    Answers are not cached: cache in the check if the lookup is costly (revoking a member then waits out your TTL).
    """
    raw_name = _header_name("from_header()", name)
    if membership_check is not None and not callable(membership_check):
        raise ConfigurationError(
            f"from_header(membership_check=...) must be a function (scope, org_id) -> bool, sync or async, got "
            f"{membership_check!r}."
        )
    if membership_timeout is not None and (
        isinstance(membership_timeout, bool)
        or not isinstance(membership_timeout, (int, float))
        or not math.isfinite(membership_timeout)
        or membership_timeout <= 0
    ):
        raise ConfigurationError(
            f"from_header(membership_timeout=...) must be a positive number of seconds or None (no bound), "
            f"got {membership_timeout!r}."
        )

    def resolve_from_header(scope: Scope) -> str | None:
        value = _header_value(scope, raw_name)
        return _clean_id(_unjoined(value)) if value is not None else None

    source = f"the {name.strip()} header"
    if membership_check is None:
        return _described(_clean_ids(resolve_from_header), source)
    check = membership_check
    serial = next(_check_serials)  # (an int, not the check: a deep copy of the scope keeps the note it is part of)

    async def resolve_from_header_checked(scope: Scope) -> str | None:
        value = resolve_from_header(scope)
        if value is None:
            return None
        waited_out = scope.get(_TIMED_OUT_KEY)
        if isinstance(waited_out, set) and (serial, value) in waited_out:
            # This request already waited the whole timeout for this check and org: the middleware resolves again
            # once the endpoint answered (an org its auth set late), and waiting again held the request twice the
            # bound. A check that answered is asked again (a membership the endpoint granted counts).
            logger.debug("Membership check %s timed out earlier in this request (%r).", _resolver_name(check), value)
            return None
        allowed: object = check(scope, value)
        if inspect.isawaitable(allowed):
            if membership_timeout is None:
                allowed = await allowed
            else:
                with anyio.move_on_after(membership_timeout) as waited:
                    allowed = await allowed
                if waited.cancelled_caught:
                    _said_timeout(check, name, value, membership_timeout)
                    scope.setdefault(_TIMED_OUT_KEY, set()).add((serial, value))
                    return None
        if allowed is True:
            return value
        if allowed is not False:  # None (a forgotten return), a row, 1, numpy.bool_: only True admits
            said = (_resolver_name(check), f"answered {type(allowed).__qualname__}")
            if _first_time(said):
                logger.warning(
                    "Membership check %s answered %.100r, not True or False: org %r (header %s) is rejected, as is "
                    "every org it answers so. Return True for a member. Logged once per check and answer type.",
                    said[0],
                    allowed,
                    value,
                    name,
                )
        logger.debug("Header %s names org %r, which the membership check rejected.", name, value)
        return None

    return _described(
        _clean_ids(resolve_from_header_checked), f"{source} (checked by {_resolver_name(membership_check)})"
    )


#: A number for each checked header resolver (the key of its notes in a request's scope).
_check_serials = itertools.count()


def _said_timeout(check: object, header: str, org_id: str, timeout: float) -> None:
    said = (_resolver_name(check), "timed out")
    if _first_time(said):
        logger.warning(
            "Membership check %s did not answer within %s s for org %r (header %s): the request is treated as "
            "unresolved. Make the check faster (cache its answers) or raise from_header(membership_timeout=...). "
            "Logged once per check, later ones at DEBUG.",
            said[0],
            timeout,
            org_id,
            header,
        )
    else:
        logger.debug("Membership check %s timed out again, for org %r.", said[0], org_id)


def _header_name(caller: str, name: object) -> bytes:
    """``name`` as ASGI servers give it (lower case, latin-1), once checked to be a header name that can match."""
    variable = "LAGO_ORG_HEADER" if caller == "from_header()" else None
    example = "X-Org-Id" if caller == "from_header()" else "Authorization"
    header = name.strip() if isinstance(name, str) else ""
    # (as LAGO_ORG_HEADER refuses them: a header no client sends, every request unresolved)
    problem = header_name_problem(header)
    if problem == "token":
        raise ConfigurationError(
            f"{caller} needs an HTTP header name such as '{example}' (letters, digits and -, no ':' or blanks), "
            f"got {name!r}.",
            variable=variable,
        )
    if problem == "switch":
        raise ConfigurationError(
            f"{caller} needs the name of the request header that carries the "
            f"{'id' if caller == 'from_header()' else 'bearer token'} (such as '{example}'), not a switch nor None: "
            f"got {name!r}.",
            variable=variable,
        )
    if problem == "wsgi":
        raise ConfigurationError(
            f"{caller} needs the header's name as clients send it ({header_as_sent(header, example)}), not its "
            f"WSGI/CGI name: got {name!r}.",
            variable=variable,
        )
    return header.lower().encode("latin-1")


def _bearer_token(scope: Scope, header: bytes) -> str | None:
    value = _header_value(scope, header)
    if value is None:
        if len({value for key, value in scope.get("headers") or () if key == header}) > 1:
            scope[AMBIGUOUS_CREDENTIALS] = header.decode("latin-1")
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def from_jwt_claim(
    claim: str = "org_id",
    *,
    key: str | bytes | None = None,
    jwks_url: str | None = None,
    algorithms: Sequence[str] = ("HS256", "RS256"),
    audience: str | Sequence[str] | None = None,
    issuer: str | Sequence[str] | None = None,
    header: str = "authorization",
    leeway: float | dt.timedelta = 0,
    jwks_refresh_interval: float = 60.0,
    jwks_max_age: float = 3600.0,
    jwks_client: httpx.AsyncClient | None = None,
    require: Sequence[str] = (),
) -> Resolver:
    """Resolve from a claim of the ``Bearer`` JWT in ``header``, verified with PyJWT.

    The token is verified with exactly one of ``key`` (one fixed key) or ``jwks_url`` (the issuer's published key
    set, keys rotated by ``kid``: Auth0, Clerk, Cognito, Keycloak, Okta); passing both or neither is a
    :class:`ConfigurationError`.

    ``key`` is the HMAC secret, the PEM public key, or the issuer's X.509 certificate PEM (its public key is used); a
    public key or certificate as bare base64 DER (Keycloak's "Public key" / "Certificate", a JWKS ``x5c``) or as hex DER
    is loaded as the public key too, never taken as an HMAC secret; so are a PEM whose line breaks were written as
    ``\\n`` (env vars) and a JWK as JSON (one key of the issuer's ``jwks_uri``). It is loaded once, here, for each of
    ``algorithms``; those it cannot verify with are dropped (an HMAC algorithm with a public key is the classic
    algorithm-confusion attack; an RSA algorithm with an EC key can never verify). What could never verify a token is a
    :class:`ConfigurationError` saying what to pass: no algorithm left, a private key, ``algorithms`` given as a string
    or with an unknown name, ``none``, an empty ``audience`` or ``issuer`` (or list of them), a ``claim`` that is not a
    str, a ``leeway`` that is not seconds (or a ``timedelta``) >= 0, a ``require`` that is not a list of claim names.
    Expiry (``exp``), ``nbf``, ``audience`` and ``issuer`` (one, or a list of accepted ones) are checked when given; a
    missing, malformed, badly signed or expired token resolves to ``None``. A token without ``exp`` never expires:
    ``require=["exp"]`` (claim names, as PyJWT's ``options={"require": [...]}``; none by default) refuses tokens that
    lack any of the named claims, with ``key`` and ``jwks_url`` alike. A weak key is logged once at WARNING, here, with
    the fix, but still used (existing setups keep working): an HMAC secret shorter than RFC 7518 3.2 requires (32 bytes
    for HS256, 48 for HS384, 64 for HS512) or an RSA key under 2048 bits; PyJWT's own warning about it on each decode is
    silenced, so a ``-W error`` filter never turns it into a refused token. A ``claim`` with dots that no claim is named
    after reads a nested one (``"o.id"`` for ``{"o": {"id": ...}}``). The verified claims are cached in the scope (under
    an opaque id: never the key), so resolving the org and the user from the same token verifies it once.

    ``jwks_url`` is the https URL of the issuer's JWKS (its ``jwks_uri``, e.g.
    ``https://YOUR_DOMAIN/.well-known/jwks.json``; plain http is refused but on a loopback host, since whoever sits on
    the path could swap in a key of their own). The set is fetched asynchronously with httpx (with ``jwks_client`` when
    given, an ``httpx.AsyncClient`` of yours: proxies, CA bundle, tests), never blocking the event loop, on the first
    token, and its keys are cached by ``kid``. A token whose ``kid`` is not cached (the issuer rotated its keys) makes
    it be fetched again, at most once per ``jwks_refresh_interval`` seconds (60; at least 1, since anyone can send
    tokens with random kids) whatever the number of such tokens; the set is fetched again too when a token comes after
    ``jwks_max_age`` seconds (3600; at least the refresh interval), so retired keys stop verifying. Both are finite
    numbers, else a :class:`ConfigurationError`. Concurrent requests share one fetch in flight. A fetch never follows a
    redirect (not even with a ``jwks_client`` that follows them), and fails when its answer is not complete within 10 s
    or exceeds 1 MiB. A failed fetch (logged once until one succeeds) keeps the cached keys: tokens of a known ``kid``
    still verify. A token without ``kid`` verifies only when the set has exactly one usable key. Only public signature
    keys of ``algorithms`` are used: symmetric (``oct``) keys, private keys, ``use: enc`` keys, keys whose ``alg`` is
    not allowed, unknown kinds and RSA keys under 2048 bits (a WARNING on each fetch that has them) are skipped, and
    HMAC algorithms never apply (``algorithms`` of HMAC ones only is a :class:`ConfigurationError`; the default keeps
    ``RS256``). The resolver answers synchronously once the keys are cached (as cheap as ``key``), and returns an
    awaitable only when it must fetch (the billing middleware awaits it; ``get_current_org()`` does not, and sees the
    org the middleware resolved). Audience, issuer, leeway, nested claims and the per-request claims cache work as with
    ``key``.

    Needs PyJWT: ``pip install 'lago-org-billing[webhooks]'``.
    """
    try:
        import jwt
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError(
            "from_jwt_claim() needs PyJWT: pip install 'lago-org-billing[webhooks]'.", variable=None
        ) from exc
    if not isinstance(claim, str) or not claim:
        raise ConfigurationError(
            f"from_jwt_claim() needs a claim name (a non-empty str), e.g. 'org_id'; got {claim!r}."
        )
    _jwt_check_leeway(leeway)
    required = _jwt_required(require)
    if jwks_client is not None and jwks_url is None:
        raise ConfigurationError(
            "from_jwt_claim(jwks_client=...) is the client that fetches jwks_url=: pass jwks_url too (with key=, "
            "nothing is fetched: drop jwks_client)."
        )
    if (key is None) == (jwks_url is None):
        raise ConfigurationError(
            "from_jwt_claim() needs exactly one of key= (the HMAC secret or the issuer's public key) or jwks_url= "
            "(the https URL of the issuer's JWKS, its jwks_uri, e.g. https://YOUR_DOMAIN/.well-known/jwks.json); "
            f"got {'both' if key is not None else 'neither'}."
        )
    source = f"the {claim} claim of the Bearer token"
    if jwks_url is not None:
        jwks = _from_jwks(
            jwt,
            claim,
            jwks_url,
            algorithms,
            audience,
            issuer,
            header,
            leeway,
            jwks_refresh_interval,
            jwks_max_age,
            jwks_client,
            required,
        )
        return _described(jwks, source)
    if not key:
        raise ConfigurationError("from_jwt_claim() needs the key that verifies the tokens (HMAC secret or PEM).")
    allowed, verification_key = _jwt_verification(jwt, key, algorithms)
    decode: Callable[..., Any] = (
        _jwt_quiet_decode(jwt) if _jwt_check_key_strength(jwt, allowed, verification_key) else jwt.decode
    )
    options = {"require": list(required)} if required else None
    raw_header = _header_name("from_jwt_claim(header=...)", header)
    audiences = _jwt_accepted("audience", audience)
    audience_arg = audiences if audiences is None or isinstance(audiences, str) else list(audiences)
    issuer_arg = _jwt_accepted("issuer", issuer)  # a tuple for a list, as PyJWT accepts; hashable for the cache id
    # The claims are cached in the scope under an opaque id of these settings, never the settings themselves: the
    # scope is every middleware's, error reporter's and log line's to see, and the key may be the HMAC secret.
    if len(_jwt_cache_ids) >= 1_000:  # bounded (resolvers built per request): forgetting costs a verification
        _jwt_cache_ids.clear()
    # A key object is known by its id(), which Python gives to another object once it is freed: the entry holds the
    # object, so that no other key gets its id (and its verified claims) while the entry lives.
    cache_id, _ = _jwt_cache_ids.setdefault(
        (
            key if isinstance(key, (str, bytes)) else id(verification_key),
            tuple(allowed),
            audiences,
            issuer_arg,
            leeway,
            required,
        ),
        (object(), verification_key),
    )

    path = tuple(claim.split(".")) if "." in claim else None  # a nested claim, when no claim has the dotted name
    issuers = _jwt_issuers(issuer_arg)

    def resolve_from_jwt(scope: Scope) -> str | None:
        token = _bearer_token(scope, raw_header)
        if token is None:
            return None
        cache: dict[tuple[object, str], Mapping[str, Any] | None] = scope.setdefault(_JWT_CACHE_KEY, {})
        cache_key = (cache_id, token)
        if cache_key in cache:
            claims = cache[cache_key]
        else:
            try:
                with pyjwt_depth_errors(jwt):
                    claims = decode(
                        token,
                        verification_key,
                        algorithms=allowed,
                        options=options,
                        audience=audience_arg,
                        leeway=leeway,
                    )
                _jwt_check_issuer(jwt, claims, issuers)
            except jwt.PyJWTError as exc:
                _jwt_refused(jwt, exc)
                claims = None
            cache[cache_key] = claims
        return _claim_value(claims, claim, path)

    return _described(_clean_ids(resolve_from_jwt), source)


def _claim_value(claims: object, claim: str, path: Sequence[str] | None) -> str | None:
    """The id in ``claim`` of verified ``claims`` (``None`` when refused: not a mapping), or at its dotted ``path``
    when no claim has that name."""
    if not isinstance(claims, Mapping):
        return None
    value = claims.get(claim)
    if value is None and path is not None:
        value = claims
        for name in path:
            value = value.get(name) if isinstance(value, Mapping) else None
    return _clean_id(value)


def _from_jwks(
    jwt: Any,
    claim: str,
    jwks_url: object,
    algorithms: Sequence[str],
    audience: str | Sequence[str] | None,
    issuer: str | Sequence[str] | None,
    header: str,
    leeway: float | dt.timedelta,
    refresh_interval: object,
    max_age: object,
    client: object,
    required: tuple[str, ...] = (),
) -> Resolver:
    """:func:`from_jwt_claim` with ``jwks_url``: the token verified with the key of its ``kid`` in the issuer's JWKS
    (see :mod:`._jwks`). Synchronous once the keys are cached; a coroutine when the set must be fetched first."""
    import httpx

    from . import _jwks

    url = _jwks.check_url(jwks_url)
    interval, age = _jwks.check_intervals(refresh_interval, max_age)
    if client is not None and not isinstance(client, httpx.AsyncClient):
        raise ConfigurationError(
            f"from_jwt_claim(jwks_client=...) takes an httpx.AsyncClient (the JWKS is fetched asynchronously, never "
            f"blocking the event loop), got a {type(client).__qualname__}; pass httpx.AsyncClient(...) or None."
        )
    chosen, known, missing = _jwt_algorithms(jwt, algorithms)
    usable = {alg: known[alg] for alg in chosen if alg in known and not alg.startswith("HS")}
    if not usable:
        if any(not alg.startswith("HS") for alg in missing):
            raise ConfigurationError(
                f"from_jwt_claim(jwks_url=...): {missing} need cryptography: pip install 'lago-org-billing[webhooks]'."
            )
        raise ConfigurationError(
            f"from_jwt_claim(jwks_url=...) verifies with the issuer's public keys, which HMAC algorithms {chosen} "
            "cannot use (a secret published in a JWKS is no secret): pass the algorithm(s) your issuer signs with, "
            "e.g. algorithms=['RS256'], or key= the HMAC secret."
        )
    raw_header = _header_name("from_jwt_claim(header=...)", header)
    audiences = _jwt_accepted("audience", audience)
    audience_arg = audiences if audiences is None or isinstance(audiences, str) else list(audiences)
    issuer_arg = _jwt_accepted("issuer", issuer)
    issuers = _jwt_issuers(issuer_arg)
    path = tuple(claim.split(".")) if "." in claim else None

    # One key set per URL and client: the org and the user resolvers (or several apps) fetch it once.
    set_id = (url, None if client is None else id(client), tuple(usable), interval, age)
    keys = _jwks_sets.get(set_id)
    if keys is None:
        keys = _jwks_sets[set_id] = _jwks.JwksKeys(url, client, usable, interval, age)
    if len(_jwt_cache_ids) >= 1_000:  # (as with key=; the entry holds the key set, so its client keeps its id)
        _jwt_cache_ids.clear()
    cache_id, _ = _jwt_cache_ids.setdefault(
        (("jwks", *set_id), audiences, issuer_arg, leeway, required), (object(), keys)
    )
    options = {"require": list(required)} if required else None
    fetch = _jwks.FETCH
    one_alg = {alg: [alg] for alg in usable}

    def verify(token: str, found: tuple[Any, str] | None) -> Mapping[str, Any] | None:
        if found is None:
            return None
        try:
            # (its header read by the key set a few frames shallower: one nested to the limit gets through to here)
            with pyjwt_depth_errors(jwt):
                claims: Mapping[str, Any] = jwt.decode(
                    token,
                    found[0],
                    algorithms=one_alg[found[1]],
                    options=options,
                    audience=audience_arg,
                    leeway=leeway,
                )
            _jwt_check_issuer(jwt, claims, issuers)
        except jwt.PyJWTError as exc:
            _jwt_refused(jwt, exc, source="jwks_url")
            return None
        return claims

    def claim_of(claims: Mapping[str, Any] | None) -> str | None:
        return _claim_value(claims, claim, path)

    async def fetch_then_verify(
        token: str, cache: dict[tuple[object, str], Mapping[str, Any] | None], cache_key: tuple[object, str]
    ) -> str | None:
        await keys.refresh()
        claims = verify(token, keys.find(token, fetch=False))
        cache[cache_key] = claims
        return claim_of(claims)

    def resolve_from_jwks(scope: Scope) -> str | Awaitable[str | None] | None:
        token = _bearer_token(scope, raw_header)
        if token is None:
            return None
        cache: dict[tuple[object, str], Mapping[str, Any] | None] = scope.setdefault(_JWT_CACHE_KEY, {})
        cache_key = (cache_id, token)
        if cache_key in cache:
            claims = cache[cache_key]
        else:
            found = keys.find(token)
            if found is fetch:
                return fetch_then_verify(token, cache, cache_key)
            claims = verify(token, found)
            cache[cache_key] = claims
        return claim_of(claims)

    return _clean_ids(resolve_from_jwks)


#: The key sets of from_jwt_claim(jwks_url=...), by URL, client and settings, while a resolver uses them.
_jwks_sets: weakref.WeakValueDictionary[tuple[Any, ...], Any] = weakref.WeakValueDictionary()


@contextlib.contextmanager
def pyjwt_depth_errors(jwt: Any) -> Generator[None, None, None]:
    """Around PyJWT's ``decode``: a token whose header is JSON nested deeper than the parser goes is the
    ``DecodeError`` PyJWT 2.14 raises for it, for the caller's ``except jwt.PyJWTError`` (PyJWT 2.8-2.13, which the
    package allows, let the parser's ``RecursionError`` out)."""
    try:
        yield
    except RecursionError:
        raise jwt.DecodeError("Invalid header string: JSON nested too deeply") from None


#: The kinds of refused tokens already said at WARNING (the first of each kind; the next ones at DEBUG).
_refusals_said: set[str] = set()


def _jwt_refused(jwt: Any, exc: Exception, source: str = "key") -> None:
    """A bearer token refused. Expired or not yet valid ones are a client's normal traffic (DEBUG); the first refusal
    of each other kind may be this resolver's configuration (every token refused: every request unresolved, served
    unbilled with ``LAGO_ON_UNRESOLVED=allow``), so it is a WARNING saying what to check."""
    if isinstance(exc, (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError)):
        logger.debug("Bearer token rejected: %s", exc)
        return
    missing = getattr(exc, "claim", None) if isinstance(exc, jwt.MissingRequiredClaimError) else None
    if isinstance(exc, jwt.InvalidAudienceError) or missing == "aud":
        kind, hint = "audience", "pass from_jwt_claim(audience=...) the audience your issuer puts in its tokens"
    elif missing is not None:
        kind, hint = (
            f"missing {missing}",
            f"the token has no {missing!r} claim, which from_jwt_claim requires (require=..., or issuer=): have "
            "the issuer put it in its tokens, or drop that requirement",
        )
    elif isinstance(exc, jwt.InvalidIssuerError):
        kind, hint = "issuer", "check from_jwt_claim(issuer=...) against the tokens' iss claim"
    elif isinstance(exc, jwt.InvalidSignatureError) and source == "jwks_url":
        kind, hint = "key", "the signature does not match the JWKS key of its kid: forged, or from another issuer"
    elif isinstance(exc, jwt.InvalidSignatureError):
        kind, hint = "key", "check that from_jwt_claim(key=...) is the issuer's current key or secret"
    elif isinstance(exc, jwt.InvalidAlgorithmError):
        kind, hint = "algorithm", "check from_jwt_claim(algorithms=...) against the tokens' alg header"
    else:
        kind, hint = type(exc).__name__, "the token may be malformed, or not from the configured issuer"
    if kind in _refusals_said:
        logger.debug("Bearer token rejected: %s", exc)
        return
    _refusals_said.add(kind)
    logger.warning(
        "A bearer token was refused by from_jwt_claim (%s): %s. If every token is refused, no request resolves its "
        "org from them. Later refusals of this kind are logged at DEBUG.",
        exc,
        hint,
    )


def _jwt_check_leeway(leeway: object) -> None:
    """``leeway`` of :func:`from_jwt_claim`: seconds (or a ``timedelta``) >= 0. NaN would switch the ``exp`` and
    ``nbf`` checks off (every comparison with it is false), infinity too; a string fails every request."""
    if isinstance(leeway, dt.timedelta):
        seconds: object = leeway.total_seconds()
    else:
        seconds = leeway if isinstance(leeway, (int, float)) and not isinstance(leeway, bool) else None
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(
            f"from_jwt_claim(leeway=...) takes the clock skew to tolerate on exp/nbf, in seconds (a finite number "
            f">= 0, or a timedelta), got {leeway!r}; pass e.g. leeway=30, or 0 for none."
        )


#: Verification settings of :func:`from_jwt_claim` -> the opaque id its verified claims are cached under in a scope
#: (resolvers with equal settings share it: the org and the user read from one token verify it once).
_jwt_cache_ids: dict[tuple[Any, ...], tuple[object, Any]] = {}


def _jwt_accepted(option: str, value: object) -> str | tuple[str, ...] | None:
    """``audience`` / ``issuer`` of :func:`from_jwt_claim`: ``None``, one name, or a tuple of the accepted names.
    What no token can match (an empty list or name, bytes, names that are not strings) is a ConfigurationError:
    it would leave every request unresolved."""
    if value is None:
        return None
    names: tuple[object, ...] | None = None
    if isinstance(value, str):
        names = (value,)
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, bytearray, Mapping)):
        names = tuple(value)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ConfigurationError(
            f"from_jwt_claim({option}=...) takes the accepted {option} (a non-empty str) or a non-empty list of "
            f"them, got {value!r}: no token could match it, so every request would be unresolved. Pass "
            f"{option}=None to skip the check."
        )
    return value if isinstance(value, str) else tuple(str(name) for name in names)


def _jwt_issuers(issuer: str | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """The accepted issuers of :func:`from_jwt_claim` (:func:`_jwt_accepted`'s answer) as a tuple, or ``None``."""
    return (issuer,) if isinstance(issuer, str) else issuer


def _jwt_check_issuer(jwt: Any, claims: Mapping[str, Any], issuers: tuple[str, ...] | None) -> None:
    """The ``iss`` of verified ``claims`` is one of ``issuers``, exactly (when any are configured); else the error PyJWT
    raises for it. Checked here, never by PyJWT: 2.8 compares one issuer only, and 2.10.0 (which the package allows)
    takes a string ``issuer=`` as a sequence, accepting any ``iss`` it contains (CVE-2024-53861: ``""`` or
    ``"https://auth.example"`` for ``"https://auth.example.com/"``), and raises ``TypeError`` for an ``iss`` that is
    not a string (an ERROR traceback per kind, not a refusal)."""
    if issuers is None:
        return
    if "iss" not in claims:
        raise jwt.MissingRequiredClaimError("iss")
    iss = claims["iss"]
    if not isinstance(iss, str) or iss not in issuers:
        raise jwt.InvalidIssuerError("Invalid issuer")


#: The curve each ECDSA algorithm signs with (RFC 7518 3.4, RFC 8812 3.2).
_JWT_CURVES = {
    "ES256": "secp256r1",
    "ES256K": "secp256k1",
    "ES384": "secp384r1",
    "ES512": "secp521r1",
    "ES521": "secp521r1",
}


def _jwt_verification(jwt: Any, key: Any, algorithms: Sequence[str]) -> tuple[list[str], Any]:
    """The algorithms of ``algorithms`` that ``key`` can verify, and the key to verify with: the HMAC secret as
    given, or the public key loaded once (a certificate's public key for an X.509 certificate PEM).

    Refuses, with a :class:`ConfigurationError` saying what to do: ``algorithms`` given as a string or holding an
    unknown name, ``none``, a private key, and a key that none of the algorithms can use (which would leave every
    request unresolved)."""
    algorithms, known, missing = _jwt_algorithms(jwt, algorithms)

    candidate = _jwt_key_object(key)
    allowed: list[str] = []
    verification_key: Any = candidate
    private = False
    public: list[str] = []
    for alg in algorithms:
        if alg in known:
            usable, is_private, prepared = _jwt_key_fits(known[alg], alg, candidate)
            private = private or is_private
            if usable and not isinstance(prepared, bytes):
                public.append(alg)
                verification_key = prepared
            elif usable:
                allowed.append(alg)  # (PyJWT prepares secrets itself: the candidate is passed as it is)
    if public:
        # A key that loads as a public key is never also an HMAC secret: the public text as a secret is the
        # algorithm-confusion attack (PyJWT < 2.1x takes a PEM flattened onto one line as both).
        allowed = public
    if private:
        raise ConfigurationError(
            "from_jwt_claim() was given a private key: pass the issuer's PUBLIC key (PEM '-----BEGIN PUBLIC KEY-----' "
            "or its certificate) - verifying needs only that, and the private key should stay with the issuer."
        )
    if not allowed:
        fits: list[str] = []
        kind = "a key PyJWT cannot load as an HMAC secret, a PEM public key or an X.509 certificate PEM"
        for alg, implementation in known.items():
            usable, _, prepared = _jwt_key_fits(implementation, alg, candidate)
            if usable and alg != "none":
                fits.append(alg)
                kind = _jwt_key_kind(prepared)
        if fits:
            hint = f"pass algorithms={fits} (or the one(s) of them your issuer signs with)."
        elif missing:
            hint = f"{missing} need cryptography: pip install 'lago-org-billing[webhooks]'."
        else:
            hint = "pass the HMAC secret, or the issuer's public key as a PEM or its X.509 certificate PEM."
        raise ConfigurationError(f"from_jwt_claim(): none of the algorithms {algorithms} fits the key, {kind}; {hint}")
    return allowed, verification_key


def _jwt_algorithms(jwt: Any, algorithms: Sequence[str]) -> tuple[list[str], dict[str, Any], list[str]]:
    """``algorithms`` of :func:`from_jwt_claim` checked: as a list, PyJWT's implementations by name, and those of
    them that need cryptography (not installed). Refuses a string, an unknown name, ``none``, or no algorithm."""
    if isinstance(algorithms, (str, bytes)) or not all(isinstance(alg, str) for alg in algorithms):
        raise ConfigurationError(
            f"from_jwt_claim(algorithms=...) takes a list of algorithm names such as ['RS256'], got {algorithms!r}."
        )
    chosen = list(algorithms)
    if not chosen:
        raise ConfigurationError("from_jwt_claim() needs at least one algorithm, such as ['RS256'].")
    if any(alg.lower() == "none" for alg in chosen):
        raise ConfigurationError("from_jwt_claim() refuses the 'none' algorithm: unsigned tokens prove nothing.")
    known: dict[str, Any] = jwt.algorithms.get_default_algorithms()
    needs_crypto = set(getattr(jwt.algorithms, "requires_cryptography", ()))
    unknown = [alg for alg in chosen if alg not in known and alg not in needs_crypto]
    if unknown:
        names = sorted(name for name in {*known, *needs_crypto} if name != "none")
        raise ConfigurationError(f"from_jwt_claim(): unknown JWT algorithm(s) {unknown}; PyJWT knows {names}.")
    missing = [alg for alg in chosen if alg not in known]  # known to PyJWT, but they need cryptography
    return chosen, known, missing


def _jwt_key_object(key: Any) -> Any:
    """``key``, or the public key of an X.509 certificate PEM (what Auth0, Keycloak or ADFS publish), which PyJWT
    does not load by itself, or of a bare base64 DER public key or certificate (see :func:`_jwt_bare_der_key`)."""
    raw = key.encode("latin-1", "replace") if isinstance(key, str) else key
    if isinstance(raw, bytes) and raw.lstrip().startswith(b"{"):
        jwk = _jwt_jwk_key(raw)
        if jwk is not None:
            return jwk
    if isinstance(raw, bytes) and b"-----BEGIN " in raw and b"\\n" in raw:
        # A PEM whose line breaks an env var or a JSON/YAML file kept as the two characters \n: unambiguous, and
        # unreadable as it is (and older PyJWTs take it as an HMAC secret: anyone with the public key signs)
        raw = raw.replace(b"\\r", b"").replace(b"\\n", b"\n")
        key = raw
    if not (isinstance(raw, bytes) and raw.lstrip().startswith(b"-----BEGIN CERTIFICATE-----")):
        bare = _jwt_bare_der_key(raw) if isinstance(raw, bytes) else None
        return key if bare is None else bare
    try:
        from cryptography import x509
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError(
            "from_jwt_claim() needs cryptography for a certificate key: pip install 'lago-org-billing[webhooks]'."
        ) from exc
    try:
        return x509.load_pem_x509_certificate(raw.strip()).public_key()
    except ValueError as exc:
        raise ConfigurationError(
            f"from_jwt_claim(): the key looks like a certificate PEM but is not one ({exc})."
        ) from exc


def _jwt_jwk_key(raw: bytes) -> Any:
    """The key of a JWK given as JSON (one key of the issuer's ``jwks_uri``, or a JWKS holding one key): its public
    key, or for a symmetric (``"kty": "oct"``) one the secret bytes of ``k``. PyJWT takes neither JSON as a key, and
    older versions take it as an HMAC *secret*: the JSON is public, so anyone could sign. ``None`` for JSON that is
    not a JWK (an HMAC secret may be anything)."""
    import json

    import jwt

    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # (not JSON; nested thousands deep: no JWK)
        return None
    if isinstance(data, dict) and isinstance(data.get("keys"), list):
        if len(data["keys"]) != 1:
            raise ConfigurationError(
                f"from_jwt_claim(key=...) got a JWKS with {len(data['keys'])} keys; it verifies with one key: pass "
                "the one whose kid your issuer signs with now (as its JWK JSON or a PEM)."
            )
        data = data["keys"][0]
    if not isinstance(data, dict) or "kty" not in data:
        return None
    try:
        return jwt.PyJWK(data).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise ConfigurationError(
            f"from_jwt_claim(key=...) got a JWK that PyJWT cannot load ({exc}); pass the issuer's public key as a "
            "PEM, or a JWK of its key (kty RSA, EC or OKP) from its jwks_uri."
        ) from exc


_BASE64_KEY = re.compile(rb"[A-Za-z0-9+/_\-\s]+={0,2}\s*")
_HEX_KEY = re.compile(rb"30(?:[0-9A-Fa-f:]|\s)+")


def _jwt_bare_der_key(raw: bytes) -> Any:
    """The key object of a public key, certificate (its public key) or private key given as bare base64 DER, without
    the PEM lines: how Keycloak shows a realm's "Public key" and "Certificate", and what a JWKS ``x5c`` holds; or
    that DER in hex (``xxd -p``, keystore and HSM exports). PyJWT loads none of them, and takes them as an HMAC
    *secret*: with HS256 allowed (the default), anyone who read the public key could sign tokens for any org.
    ``None`` for anything else (an HMAC secret, even in base64 or hex: random bytes are no DER key)."""
    text = raw.strip()
    if len(text) < 64:
        return None
    if _HEX_KEY.fullmatch(text):  # DER: a SEQUENCE, 0x30
        try:
            der = bytes.fromhex(b"".join(text.replace(b":", b"").split()).decode("ascii"))
        except ValueError:
            return None
    elif text.startswith(b"M") and _BASE64_KEY.fullmatch(text):  # (0x30 in base64)
        compact = b"".join(text.split()).rstrip(b"=").translate(bytes.maketrans(b"-_", b"+/"))  # (or base64url)
        try:
            der = base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
        except ValueError:
            return None
    else:
        return None
    if not _is_der_sequence(der):  # random bytes (a secret in base64): not even shaped like a key
        return None
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigurationError(
            "from_jwt_claim(): the key looks like a bare base64 public key or certificate, which needs cryptography: "
            "pip install 'lago-org-billing[webhooks]' (an HMAC secret must not be a public key)."
        ) from exc
    loaders: tuple[Callable[[bytes], Any], ...] = (
        serialization.load_der_public_key,
        lambda data: x509.load_der_x509_certificate(data).public_key(),
        lambda data: serialization.load_der_private_key(data, password=None),
    )
    for load in loaders:
        try:
            return load(der)
        except Exception:  # ValueError, or cryptography's UnsupportedAlgorithm: not a key of this kind
            continue
    return None


def _jwt_public_text(secret: bytes) -> bool:
    """Whether an HMAC secret is public key text that the PyJWT in use let through (older ones refuse only a
    well-formed PEM and ssh keys): PEM armour anywhere, or an OpenSSH public key."""
    return b"-----BEGIN " in secret or b"-----END " in secret or secret.lstrip().startswith((b"ssh-", b"ecdsa-sha2-"))


def _is_der_sequence(der: bytes) -> bool:
    """Whether ``der`` is exactly one DER SEQUENCE, as every key and certificate is."""
    if len(der) < 2 or der[0] != 0x30:
        return False
    if der[1] < 0x80:
        return len(der) == 2 + der[1]
    size = der[1] & 0x7F
    return 0 < size <= 4 and len(der) == 2 + size + int.from_bytes(der[2 : 2 + size], "big")


def _jwt_key_kind(prepared: Any) -> str:
    """What a loaded key is, for error messages."""
    if isinstance(prepared, bytes):
        return "an HMAC secret"
    curve = getattr(getattr(prepared, "curve", None), "name", None)
    name = type(prepared).__name__.removeprefix("_").replace("PublicKey", "")
    return f"a PEM {name}{f' ({curve})' if curve else ''} public key"


def _jwt_key_fits(implementation: Any, alg: str, key: Any) -> tuple[bool, bool, Any]:
    """``(usable, is_private, prepared)``: whether ``key`` loads for ``alg`` as an HMAC secret or as a public key of
    the type (and curve) ``alg`` verifies with; ``is_private`` when it loads as a private key."""
    try:
        prepared = implementation.prepare_key(key)
    except Exception:  # InvalidKeyError, or cryptography's errors for a key of another kind
        return False, False, None
    if isinstance(prepared, bytes):
        return alg.startswith("HS") and not _jwt_public_text(prepared), False, prepared
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(
        prepared, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)
    ):
        return False, True, None
    if alg.startswith(("RS", "PS")):
        usable = isinstance(prepared, rsa.RSAPublicKey)
    elif alg.startswith("ES"):
        usable = isinstance(prepared, ec.EllipticCurvePublicKey) and prepared.curve.name == _JWT_CURVES.get(alg)
    elif alg == "EdDSA":
        usable = isinstance(prepared, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
    else:  # an algorithm this check does not know: trust PyJWT's own check
        usable = True
    return usable, False, prepared


#: The shortest HMAC secret for each algorithm, in bytes: its hash's output size (RFC 7518 3.2).
_JWT_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}

#: The smallest RSA modulus that verifies a token, in bits (RFC 7518 3.3; NIST SP 800-131A).
_JWT_RSA_MIN_BITS = 2048


def _jwt_weakness(implementation: Any, alg: str, prepared: Any) -> str | None:
    """What makes ``prepared`` (an HMAC secret's bytes, or a loaded public key) too weak for ``alg``, or ``None``:
    a secret shorter than RFC 7518 3.2 requires, an RSA key under 2048 bits, or what PyJWT's own key-length check
    (2.11 and later) flags."""
    if isinstance(prepared, bytes):
        needed = _JWT_HMAC_MIN_BYTES.get(alg)
        if needed is not None and len(prepared) < needed:
            return (
                f"the HMAC secret is {len(prepared)} bytes, shorter than the {needed} bytes RFC 7518 3.2 requires "
                f"for {alg}"
            )
    else:
        size = getattr(prepared, "key_size", None)
        if alg.startswith(("RS", "PS")) and isinstance(size, int) and size < _JWT_RSA_MIN_BITS:
            return f"the RSA key is {size} bits, under the {_JWT_RSA_MIN_BITS} bits RFC 7518 3.3 requires for {alg}"
    check = getattr(implementation, "check_key_length", None)
    if check is not None:
        try:
            said = check(prepared)
        except Exception:  # (a check of another PyJWT version that does not take this key: no opinion)
            return None
        if isinstance(said, str) and said:
            return said
    return None


def _jwt_check_key_strength(jwt: Any, allowed: Sequence[str], verification_key: Any) -> bool:
    """Whether the ``key=`` of :func:`from_jwt_claim` is weak for one of ``allowed``: then said once at WARNING,
    here at configuration, with what to do (not refused: existing setups keep working)."""
    known: dict[str, Any] = jwt.algorithms.get_default_algorithms()
    weak: dict[str, list[str]] = {}
    for alg in allowed:
        try:
            prepared = known[alg].prepare_key(verification_key)
        except Exception:  # (it loaded in _jwt_verification; a key PyJWT prepares differently: no opinion)
            continue
        problem = _jwt_weakness(known[alg], alg, prepared)
        if problem is not None:
            weak.setdefault("rsa" if not isinstance(prepared, bytes) else "hmac", []).append(problem)
    if not weak:
        return False
    for kind, problems in weak.items():
        if not _first_time(("weak jwt key", f"{kind}: {'; '.join(problems)}")):
            continue
        if kind == "hmac":
            fix = (
                "a short secret can be guessed offline from a single token, and whoever guesses it signs tokens for "
                "any org. Use a random secret of at least 64 bytes (e.g. `openssl rand -base64 64`) at the issuer "
                "and in from_jwt_claim(key=...)"
            )
        else:
            fix = (
                "a key this small can be factored, and whoever does signs tokens for any org. Have the issuer sign "
                "with an RSA key of 2048 bits or more (or an EC key) and pass its public key to from_jwt_claim(key=...)"
            )
        logger.warning(
            "from_jwt_claim(key=...): %s: %s. Tokens are still verified with it. Logged once per key kind and size.",
            "; ".join(problems),
            fix,
        )
    return True


def _jwt_quiet_decode(jwt: Any) -> Callable[..., Any]:
    """``jwt.decode`` without PyJWT's ``InsecureKeyLengthWarning``, for a key already said to be weak (at build time,
    by :func:`_jwt_check_key_strength`): PyJWT >= 2.11 issues it on every decode, and under ``-W error`` (or a test
    suite's ``filterwarnings = error``) it was raised out of the resolver, leaving every genuine token unresolved. The
    filter is set around each decode of a weak key only; other keys decode as they did."""
    category = getattr(getattr(jwt, "warnings", None), "InsecureKeyLengthWarning", None)
    decode: Callable[..., Any] = jwt.decode
    if category is None:  # (PyJWT < 2.11 does not warn)
        return decode

    def decode_quietly(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category)
            return decode(*args, **kwargs)

    return decode_quietly


def _jwt_required(require: object) -> tuple[str, ...]:
    """``require`` of :func:`from_jwt_claim`: the names of the claims a token must carry (a list, as PyJWT's
    ``options={"require": [...]}``). A string is refused: PyJWT would read ``"exp"`` as the claims ``e``, ``x``, ``p``
    and refuse every token."""
    names: tuple[object, ...] | None = None
    if isinstance(require, Iterable) and not isinstance(require, (str, bytes, bytearray, Mapping)):
        names = tuple(require)
    if names is None or not all(isinstance(name, str) and name.strip() == name and name for name in names):
        raise ConfigurationError(
            f"from_jwt_claim(require=...) takes a list of claim names every token must carry, such as "
            f"require=['exp'] (tokens without an expiry are refused), got {require!r}; pass () to require none."
        )
    return tuple(dict.fromkeys(str(name) for name in names))


def first_of(*resolvers: Resolver) -> Resolver:
    """The first id found by ``resolvers``, tried in order.

    Stays synchronous while the resolvers it tries are; turns into an awaitable from the first one that returns
    an awaitable. An exception in any resolver propagates (to :func:`call_resolver`), rather than silently falling
    through to a later, possibly weaker, source such as a header; so does a resolver returning a value of a type that
    is never an id (``bytes``...): said once at WARNING, the chain stops there, unresolved.
    """
    chain = tuple(resolvers)
    if not all(callable(resolver) for resolver in chain):  # (none: every request unresolved, as documented)
        raise ConfigurationError(
            "first_of(...) takes resolvers, functions (scope) -> str | None such as from_state() or "
            f"from_header('X-Org-Id'), got {chain!r}."
        )

    async def resume(
        pending: Awaitable[str | None], source: Resolver, rest: tuple[Resolver, ...], scope: Scope
    ) -> str | None:
        first: object = await pending
        value = _clean_result(source, first)
        if value is not None or _not_an_id(first):
            return value
        for resolver in rest:
            result = resolver(scope)
            if result is not None and type(result) is not str and inspect.isawaitable(result):
                result = await result
            value = _clean_result(resolver, result)
            if value is not None or _not_an_id(result):  # (no id there, of a type never one: stop, see above)
                return value
        return None

    clean = tuple(_returns_clean_ids(resolver) for resolver in chain)

    def resolve_first_of(scope: Scope) -> str | Awaitable[str | None] | None:
        for index, resolver in enumerate(chain):
            result = resolver(scope)
            if result is None:
                continue
            if type(result) is str and clean[index]:
                return result
            if type(result) is not str and inspect.isawaitable(result):
                return _Pending(resume, result, resolver, chain[index + 1 :], scope)
            value = _clean_result(resolver, result)
            if value is not None or _not_an_id(result):  # (no id there, of a type never one: stop, see above)
                return value
        return None

    return _described(_clean_ids(resolve_first_of), ", then ".join(describe_resolver(r) for r in chain) or "nowhere")


def _clean_ids(resolver: _R) -> _R:
    """Mark a built-in resolver whose string results are already cleaned ids (saves re-checking them)."""
    setattr(resolver, "_lago_clean_ids", True)  # noqa: B010 - a plain attribute on a function object
    return resolver


def _returns_clean_ids(resolver: object) -> bool:
    return getattr(resolver, "_lago_clean_ids", False) is True


def default_org_resolver(settings: BillingSettings) -> Resolver:
    """``request.state.org_id``, then ``scope["user"].org_id``, then ``LAGO_ORG_HEADER`` when set."""
    resolvers = [from_state("org_id"), from_user("org_id")]
    if settings.org_header:
        resolvers.append(
            _described(from_header(settings.org_header), f"the {settings.org_header} header (LAGO_ORG_HEADER)")
        )
        return first_of(*resolvers)
    return _described(
        first_of(*resolvers), "request.state.org_id, then request.user.org_id (LAGO_ORG_HEADER is not set)"
    )


def default_user_resolver(settings: BillingSettings) -> Resolver:
    """``request.state.user_id``, then the user's ``identity``/``user_id``/``id``/``sub``/``username`` (Starlette's
    ``SimpleUser`` has an ``identity`` only from 1.7), then ``LAGO_USER_HEADER``."""
    resolvers = [from_state("user_id"), from_user(("identity", "user_id", "id", "sub", "username"))]
    if settings.user_header:
        resolvers.append(from_header(settings.user_header))
    return first_of(*resolvers)


#: The default resolvers' reads of ``request.state`` and ``scope["user"]`` (see :func:`late_user`).
_STATE_ORG = from_state("org_id")
_STATE_USER = from_state("user_id")
_USER_ORG = from_user("org_id")
_USER_ID = from_user(("identity", "user_id", "id", "sub", "username"))


def default_identity(settings: BillingSettings) -> Callable[[Scope], tuple[str | None, str | None] | None]:
    """The default org and user resolvers in one pass over the scope (the middleware's hot path).

    Returns ``(org_id, user_id)`` exactly as :func:`default_org_resolver` and :func:`default_user_resolver`
    would (the user only when there is an org), or ``None`` when the scope has an authenticated ``user`` or an
    unusual ``state``: the middleware then runs the resolvers themselves.
    """
    org_header = settings.org_header.strip().lower().encode("latin-1") if settings.org_header else None
    user_header = settings.user_header.strip().lower().encode("latin-1") if settings.user_header else None
    same_header = org_header is not None and org_header == user_header

    def resolve_identity(scope: Scope) -> tuple[str | None, str | None] | None:
        if scope.get("user") is not None:
            return None
        state = scope.get("state")
        org = user = None
        no_user = False
        if state:
            if type(state) is not dict:
                return None
            raw = state.get("org_id")
            if raw is not None:
                try:
                    org = _checked_id(raw, "request.state.org_id")
                except _NotAnId:  # unresolved, as from_state() leaves it (not the header's)
                    return None, None
            raw = state.get("user_id")
            if raw is not None:
                try:
                    user = _checked_id(raw, "request.state.user_id")
                except _NotAnId:  # no user, as from_state() finds (not the header's)
                    no_user = True
        if (org is None and org_header is not None) or (user is None and user_header is not None):
            headers = scope["headers"]
            try:  # no name repeated (the usual case): a dict of them, built in C, answers both
                found = dict(headers) if type(headers) is list else None
            except (TypeError, ValueError):  # not pairs: the loop below says nothing matches
                found = None
            if found is not None and len(found) == len(headers):
                org_raw = found.get(org_header)
                user_raw = found.get(user_header)
            else:  # one pass for both
                org_raw, user_raw = _two_headers(headers, org_header, user_header)
            if same_header:
                user_raw = org_raw
            # (without an org header org_raw is None: no header is named None)
            if org is None and org_raw is not None:
                org = _header_ids.get(org_raw) if type(org_raw) is bytes else None
                if org is None:
                    org = _header_id(org_raw)
            if user is None and user_raw is not None:
                user = _header_ids.get(user_raw) if type(user_raw) is bytes else None
                if user is None:
                    user = _header_id(user_raw)
        if org is None:
            return None, None
        return (org, None) if no_user else (org, user)

    return resolve_identity


def _two_headers(headers: Iterable[tuple[Any, Any]], first: bytes | None, second: bytes | None) -> tuple[Any, Any]:
    """The values of two request headers, in one pass; ``None`` for one absent, or repeated with different values
    (ambiguous: trusted neither)."""
    first_raw = second_raw = None
    first_bad = second_bad = False
    for key, value in headers:
        if key == first:
            first_bad = first_bad or (first_raw is not None and value != first_raw)
            first_raw = value
        elif key == second:
            second_bad = second_bad or (second_raw is not None and value != second_raw)
            second_raw = value
    return (None if first_bad else first_raw), (None if second_bad else second_raw)


def _unjoined(text: str) -> str | None:
    """A header value that a proxy may have joined from repeated headers (RFC 9110 lets it join them with commas:
    ``org_a, org_b``): one id repeated is that id, different ones are ambiguous (``None``, as repeated headers with
    different values are), never the id ``"org_a, org_b"`` billed as a customer of its own. An id cannot be passed
    in a header with a comma in it."""
    if "," not in text:
        return text
    parts = {part.strip() for part in text.split(",")}
    parts.discard("")
    if len(parts) == 1:
        return parts.pop()
    if not _joined_said:
        _joined_said.append(True)
        logger.warning(
            "An identity header holds several comma-separated values (%r: a proxy joins repeated headers this way); "
            "the request is treated as unresolved. Send the header once (ids with commas cannot be sent in headers).",
            text[:100],
        )
    return None


_joined_said: list[bool] = []


def _header_id(value: Any) -> str | None:
    """A header value as an id (see :func:`_clean_id`); valid ones are remembered (the active orgs and users repeat),
    when the value is no longer than an id: one padded with blanks that :func:`_clean_id` strips (``\\xa0``, which
    servers pass on) would keep kilobytes per entry, each distinct padding its own entry."""
    try:
        ident = _clean_id(_unjoined(_decoded(value)))
    except AttributeError:
        return None
    if ident is not None and type(value) is bytes and len(value) <= MAX_ID_LENGTH:
        if len(_header_ids) >= 10_000:  # bounded: a cache of the active ids, not a registry
            _header_ids.clear()
        _header_ids[value] = ident
    return ident


#: Header value -> the id it is (valid ids only).
_header_ids: dict[bytes, str] = {}


def _scope_of(request_or_scope: Any) -> MutableMapping[str, Any] | None:
    scope = getattr(request_or_scope, "scope", request_or_scope)
    return scope if isinstance(scope, MutableMapping) else None


def billing_scope(request_or_scope: Any) -> dict[str, Any] | None:
    """The per-request billing dict (``scope[SCOPE_KEY]``), or ``None`` outside the billing middleware."""
    scope = _scope_of(request_or_scope)
    if scope is None:
        return None
    data = scope.get(SCOPE_KEY)
    return data if isinstance(data, dict) else None


@overload
def get_current_org(request_or_scope: HTTPConnection) -> str | None: ...
@overload
def get_current_org(request_or_scope: MutableMapping[str, Any]) -> str | None: ...
# (the implementation's annotation is what FastAPI reads: an HTTPConnection, so that Depends(get_current_org) gets the
# request, not a query parameter the client fills in; a scope works all the same)
def get_current_org(request_or_scope: HTTPConnection) -> str | None:  # type: ignore[misc]
    """The org the current request is billed to (``Request`` or scope); ``None`` if unresolved, and for a WebSocket
    (the middleware passes WebSocket sessions on unbilled and ungated). A FastAPI dependency too:
    ``org: str | None = Depends(get_current_org)``.

    An org the middleware could not resolve before the app ran (auth in an endpoint dependency sets
    ``request.state.org_id`` later) is looked for again, with the middleware's resolvers when they are synchronous."""
    return _current(request_or_scope, "org_id")


@overload
def get_current_user(request_or_scope: HTTPConnection) -> str | None: ...
@overload
def get_current_user(request_or_scope: MutableMapping[str, Any]) -> str | None: ...
def get_current_user(request_or_scope: HTTPConnection) -> str | None:  # type: ignore[misc]  # (see get_current_org)
    """The user the current request is attributed to; ``None`` if unresolved or outside the middleware. A FastAPI
    dependency too: ``Depends(get_current_user)``."""
    return _current(request_or_scope, "user_id")


def _current(request_or_scope: Any, key: str) -> str | None:
    scope = _scope_of(request_or_scope)
    if scope is None:
        return None
    data = scope.get(SCOPE_KEY)
    if not isinstance(data, dict):
        return None
    if data.get("org_id") is None and data.get("resolve_now") is not None:
        org_id, user_id = data["resolve_now"](scope)
        if org_id is not None:
            publish_identity(scope, data, org_id, user_id)  # (the middleware resolves again when the app answers)
    elif data.get("org_id") is not None and getattr(data.get("middleware"), "_identify", None) is not None:
        # The default resolvers: the middleware bills an org (or user) the app's auth set since (see late_identity)
        user = data.get("user_id")
        user = user if isinstance(user, str) else None
        late = late_identity(scope.get("state"), data["org_id"], user)
        was = late if late is not None else (data["org_id"], user)
        late = late_user(scope, *was) or late  # (an auth middleware inside the billing one: request.user, then)
        if late is not None:
            # request.state.billing_org_id / billing_user_id say so too from now on, as when no org was found before
            # the app ran (the billing dict keeps that one: the middleware compares them once the app is done)
            _publish_in_state(scope, *late)
            return late[0] if key == "org_id" else late[1]
    value = data.get(key)
    return value if isinstance(value, str) else None


def late_identity(state: object, org_id: str | None, user_id: str | None) -> tuple[str | None, str | None] | None:
    """The identity of a request whose ``request.state`` the app's auth set while it ran (a FastAPI dependency), over
    the one the default resolvers found before it ran (``org_id`` and ``user_id``, from ``request.user`` or the
    headers), as the resolvers' order says (state first; a header is the client's claim):

    * ``request.state.org_id`` names another org than ``org_id``: that org, with the state's user when it has one;
    * it names none, or ``org_id``: that same org, with ``request.state.user_id`` when that is another user than
      ``user_id`` (an org from the header, the user from the app's auth: the authenticated user is billed).

    ``None`` when the state changes neither (or there is no org); ``(None, None)``, unresolved, when
    ``request.state.org_id`` holds a value that is never an id (``bytes``...: said once at WARNING): the app's auth
    named an org there, and it is not the one found before (the client's header) that is billed for it."""
    if type(state) is not dict:
        return None
    try:
        late = _checked_id(state.get("org_id"), "request.state.org_id")
    except _NotAnId:
        return None, None
    if late is not None and late != org_id:
        return late, _clean_id(state.get("user_id")) or user_id
    late_user = _clean_id(state.get("user_id"))
    if org_id is None or late_user is None or late_user == user_id:
        return None
    return org_id, late_user


def late_user(scope: Scope, org_id: str | None, user_id: str | None) -> tuple[str | None, str | None] | None:
    """The identity of a request whose ``scope["user"]`` an authentication middleware inside the billing one set while
    the app ran (Starlette's ``AuthenticationMiddleware`` added after ``OrgBillingMiddleware``), over the one found
    before it ran from the headers, as the resolvers' order says (``request.user`` before a header, the client's
    claim; ``request.state``, read first, before both):

    * the user's ``org_id`` names another org than ``org_id``: that org, with the user's id (else ``user_id``);
    * it names none, or ``org_id``: that org, with the user's id when it is another than ``user_id``.

    ``None`` when it changes neither, or ``request.state`` names them (see :func:`late_identity`); ``(None, None)``,
    unresolved, when the org there is a value that is never an id (see :func:`from_user`)."""
    if org_id is None or scope.get("user") is None:
        return None
    try:
        late = _USER_ORG(scope) if _STATE_ORG(scope) is None else None
    except _NotAnId:  # (said by the resolver) unresolved, as the resolvers leave such a request
        return None, None
    try:
        late_id = _USER_ID(scope) if _STATE_USER(scope) is None else None
    except _NotAnId:  # (said by the resolver) no user, as the resolvers find none
        late_id = None
    if not isinstance(late, str):
        late = None
    if not isinstance(late_id, str):
        late_id = None
    if late is not None and late != org_id:
        return late, late_id or user_id
    if late_id is None or late_id == user_id:
        return None
    return org_id, late_id


def publish_identity(scope: Scope, billing: dict[str, Any], org_id: str | None, user_id: str | None) -> None:
    """Make the identity visible to the app: ``get_current_org(request)`` and ``request.state.billing_org_id`` /
    ``billing_user_id``. Never ``request.state.org_id``: that is your auth layer's, and an org taken from a header
    (``LAGO_ORG_HEADER``) put there would pass for an authenticated one.

    A ``scope["state"]`` that is not a dict (a Starlette ``State`` object, as up to 0.37, or another object set by
    an auth middleware) gets attributes; one that takes neither items nor attributes (a read-only mapping) is left
    as it is, and the identity is published in the billing dict only. Never raises."""
    billing["org_id"] = org_id
    billing["user_id"] = user_id
    _publish_in_state(scope, org_id, user_id)


def _publish_in_state(scope: Scope, org_id: str | None, user_id: str | None) -> None:
    """``request.state.billing_org_id`` / ``billing_user_id`` (see :func:`publish_identity`)."""
    state = scope.get("state")
    if type(state) is dict:  # the usual case (Starlette keeps request.state in a plain dict)
        state["billing_org_id"] = org_id
        state["billing_user_id"] = user_id
    elif state is None:
        scope["state"] = {"billing_org_id": org_id, "billing_user_id": user_id}
    else:
        _publish_in_state_object(state, org_id, user_id)


def _publish_in_state_object(state: object, org_id: str | None, user_id: str | None) -> None:
    """:func:`publish_identity` into a ``scope["state"]`` that is not a dict: as items if it is a mapping (how
    :func:`from_state` reads it), else as attributes; when it takes neither, it is skipped (logged once)."""
    try:
        if isinstance(state, Mapping):
            state["billing_org_id"] = org_id  # type: ignore[index]
            state["billing_user_id"] = user_id  # type: ignore[index]
        else:
            setattr(state, "billing_org_id", org_id)  # noqa: B010 - names kept alike for the mapping case
            setattr(state, "billing_user_id", user_id)  # noqa: B010
    except Exception as exc:
        key = ("publish_identity", type(state).__qualname__)
        if _first_time(key):
            logger.info(
                "scope['state'] is a %s that takes neither items nor attributes (%r): request.state.billing_org_id "
                "is not set; get_current_org(request) still tells the org. Logged once per state type.",
                key[1],
                exc,
            )
