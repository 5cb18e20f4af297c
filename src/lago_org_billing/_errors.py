"""Every error the package raises derives from :class:`LagoIntegrationError`.

The tree::

    LagoIntegrationError
    ├── ClosedError                 a LagoClient or EventPipeline used once closed, or out of turn (a RuntimeError)
    ├── ConfigurationError          a setting is missing or malformed (names the variable)
    │   └── UnknownSettingError     a keyword naming no setting (also a TypeError)
    ├── InvalidRequestError         bad input caught before any call to Lago (also a ValueError)
    │   └── InvalidIdentifierError  an id Lago cannot take in a URL path
    └── LagoAPIError                Lago answered with an error (status, code, details)
        ├── LagoAuthenticationError 401 / 403: the API key is wrong or lacks a permission
        ├── LagoNotFoundError       404
        ├── LagoValidationError     422, with Lago's ``error_details``
        ├── LagoRateLimitError      429, with the wait Lago asked for
        └── LagoUnavailableError    network error or 5xx, after retries

Messages never contain the API key.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Mapping
from typing import Any

from starlette.exceptions import HTTPException

__all__ = [
    "ClosedError",
    "ConfigurationError",
    "InvalidIdentifierError",
    "InvalidRequestError",
    "LagoAPIError",
    "LagoAuthenticationError",
    "LagoIntegrationError",
    "LagoNotFoundError",
    "LagoRateLimitError",
    "LagoUnavailableError",
    "LagoValidationError",
    "QuotaExceededError",
    "UnknownSettingError",
    "is_duplicate_error",
    "no_such_route",
]


class LagoIntegrationError(Exception):
    """Base class of every error raised by lago-org-billing."""


class ClosedError(LagoIntegrationError, RuntimeError):
    """A ``LagoClient`` or an ``EventPipeline`` used out of turn: after it was closed, a pipeline flushed before it
    runs or run twice. Nothing was sent; the message says what to do (make a new one, run it first). Also a
    ``RuntimeError``, what these raised before."""


class ConfigurationError(LagoIntegrationError, ValueError):
    """A setting is missing or malformed. The message names the environment variable."""

    def __init__(self, message: str, *, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable


class UnknownSettingError(ConfigurationError, TypeError):
    """A keyword that names no setting (``BillingSettings.from_env(api_timout=3)``, ``settings.replace(...)``,
    ``QuotaConfig.from_env(...)``): the message names the setting meant. Also a ``TypeError``, what Python raises for
    an unexpected keyword argument (and what these raised before, from frames holding the whole environment)."""


class QuotaBackendError(LagoIntegrationError):
    """The quota gate's shared store (Redis) failed an operation that cannot be skipped, e.g. invalidating an org's
    cached state for the whole fleet. The message says what is left stale and what to check."""


class InvalidRequestError(LagoIntegrationError, ValueError):
    """The input cannot be sent to Lago as it is; nothing was sent."""


class InvalidIdentifierError(InvalidRequestError):
    """An id that Lago cannot address in a URL path (empty, padded, or with ``/``, ``.``, ``?``, ``#``...)."""


class LagoAPIError(LagoIntegrationError):
    """Lago answered with an error.

    * **status** - the HTTP status (``None`` when no response was received).
    * **code** - Lago's machine-readable ``code`` (``customer_not_found``, ``validation_errors``...).
    * **details** - Lago's ``error_details`` (``{"field": ["error_code"]}``; for batches keyed by index).
    * **error** - Lago's ``error`` text.
    * **lago_json** - whether the answer's body was a JSON object, as Lago's are (``False``: a proxy's or load
      balancer's page, or no body: its status is theirs, not Lago's verdict on the request).
    * **lago_envelope** - whether that object is Lago's error envelope (``{"status": <the answer's>, "error": ...}``):
      ``False`` for an API gateway's own JSON (``{"message": "Bad Request"}``), whose 400 or 422 blames no event.
    """

    lago_json: bool = True
    lago_envelope: bool = True

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
        error: str | None = None,
        method: str | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details: dict[str, Any] = dict(details or {})
        self.error = error
        self.method = method
        self.path = path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, details={self.details!r})"

    def _restated(self, cls: type[LagoAPIError], message: str) -> LagoAPIError:
        """The same answer of Lago's as a ``cls``, with a message saying what it means here."""
        return cls(
            message,
            status=self.status,
            code=self.code,
            details=self.details,
            error=self.error,
            method=self.method,
            path=self.path,
        )


class LagoAuthenticationError(LagoAPIError):
    """Lago refused the API key (401) or its permissions (403): check ``LAGO_API_KEY``."""


class LagoNotFoundError(LagoAPIError):
    """The Lago object does not exist (404)."""


class LagoValidationError(LagoAPIError):
    """Lago rejected the input (422); ``details`` says which field and why."""

    @property
    def is_duplicate_only(self) -> bool:
        """True when every error is ``value_already_exist`` on ``transaction_id``.

        That is what Lago's Postgres event store answers when events were already ingested, e.g. a retry of a
        batch whose first attempt succeeded but whose response was lost. For a batch, the details name only the
        indexes refused, so this cannot tell whether every event of it is in Lago: compare :meth:`failed_indexes`
        with the batch (:meth:`LagoClient.create_events` raises with this False when some events were not).
        """
        if not self.details:
            return False
        found = False
        for key, value in self.details.items():
            if isinstance(value, Mapping):  # batch: {"<index>": {"transaction_id": [...]}}
                if not is_duplicate_error(value):
                    return False
                found = True
            elif key == "transaction_id" and _already_exist(value):
                found = True
            else:
                return False
        return found

    def failed_indexes(self) -> dict[int, Any]:
        """For a batch rejection, the errors keyed by the index of the event in the batch."""
        return {int(key): value for key, value in self.details.items() if isinstance(key, str) and key.isdecimal()}


def _without_tracebacks(exc: BaseException) -> BaseException:
    """``exc``, to be kept as the cause of the package's error (its type and message say what failed), with the
    tracebacks of its whole chain (causes and contexts) dropped: the frames of httpx, httpcore, anyio and the raw
    poster under a network error held the request as it was written (``Authorization: Bearer <key>``, a proxy's
    ``Proxy-Authorization``) as locals, which error trackers (Sentry's ``include_local_variables``, on by default),
    ``rich`` and ``loguru`` tracebacks ship."""
    for current in _chain(exc):
        current.__traceback__ = None
    return exc


def _chain(exc: BaseException, *, groups: bool = False) -> Iterator[BaseException]:
    """``exc`` and each exception of its chain (causes and contexts; with ``groups``, an exception group's members
    too), each once."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or any(current is known for known in seen):
            continue
        seen.append(current)
        yield current
        todo += [current.__cause__, current.__context__]
        if groups:
            todo += getattr(current, "exceptions", ())


def _bare(error: ConfigurationError) -> ConfigurationError:
    """``error``, to be raised again, without its traceback nor those of its chain, and without the context it was
    raised ``from None`` over: the frames it went through held secrets as locals (the API key, the HMAC key, URLs
    with their passwords, the whole environment of ``from_env``), which error trackers (Sentry's
    ``include_local_variables``, on by default), ``rich`` and ``loguru`` tracebacks ship; its message says what is
    wrong."""
    if error.__suppress_context__:
        error.__context__ = None
    _without_tracebacks(error)
    return error


def _already_exist(codes: Any) -> bool:
    """``["value_already_exist"]``, whatever else Lago might put in such a list (unhashable objects...)."""
    return isinstance(codes, list) and bool(codes) and all(code == "value_already_exist" for code in codes)


def no_such_route(exc: LagoNotFoundError) -> bool:
    """Lago's catch-all 404 (``resource_not_found``): the path is not one of Lago's (a LAGO_API_URL under a path Lago
    is not served at), so nothing is known missing."""
    return exc.code == "resource_not_found"


def is_duplicate_error(error: Any) -> bool:
    """One event's errors in a 422 (``{"transaction_id": ["value_already_exist"]}``): it is already in Lago."""
    return isinstance(error, Mapping) and set(error) == {"transaction_id"} and _already_exist(error["transaction_id"])


class LagoRateLimitError(LagoAPIError):
    """Lago throttled the call (429). ``retry_after`` is the wait in seconds Lago asked for, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class LagoUnavailableError(LagoAPIError):
    """Lago could not be reached or kept failing (network error, timeout or 5xx) after retries. ``retry_after`` is
    the wait in seconds a 503 asked for (``Retry-After``), if any."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class QuotaExceededError(LagoIntegrationError, HTTPException):
    """Raised by :func:`require_quota` when the gate refuses the request: the org is over its plan limits, has no
    active subscription, or (``LAGO_FAIL_OPEN=false``) its usage cannot be read from Lago. ``OrgBillingMiddleware``
    answers it with the gate's answer, status, headers and problem body (``decision.response()``).
    It is also an ``HTTPException`` of that status and headers, so an app without the middleware answers it too."""

    def __init__(self, org_id: str, decision: Any) -> None:
        problem = getattr(decision, "problem", None) or {}
        message = problem.get("detail") or f"Organization {org_id!r} is over its quota."
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in decision.headers}
        HTTPException.__init__(self, decision.status or 429, message, headers)
        LagoIntegrationError.__init__(self, message)
        self.org_id = org_id
        self.decision = decision

    def __str__(self) -> str:
        return str(self.detail)


def traceback_text(exc: BaseException) -> str:
    """``exc``, its traceback and chain as a log handler writes them (files, lines, messages), for a log record that
    does not carry the exception: error trackers (Sentry's logging integration, ``include_local_variables`` on by
    default), ``rich`` and ``loguru`` ship the locals of the frames of a record's exception, and those of these
    failures held secrets (redis-py's ``auth_args``: the Redis password; an app's ``authorize`` decoding a JWT: the
    bearer token and the app's signing key)."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
