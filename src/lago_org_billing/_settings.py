"""Settings, read from the application's environment and ``.env`` (read as python-dotenv reads it)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import re
import string
import sys
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar
from urllib.parse import SplitResult, urlsplit

from ._errors import ConfigurationError, UnknownSettingError, _bare
from ._ids import _FORBIDDEN

if sys.version_info >= (3, 11):  # (at run time too: typing.get_type_hints of replace and from_env)
    from typing import Unpack
elif TYPE_CHECKING:  # (type checkers always have typing_extensions; it is no dependency)
    from typing_extensions import Unpack

__all__ = ["BillingSettings", "OnUnresolved", "QuotaMode", "SettingsFields"]

QuotaMode = Literal["enforce", "monitor", "off"]
_QUOTA_MODES = ("enforce", "monitor", "off")
OnUnresolved = Literal["allow", "reject"]
_T = TypeVar("_T")


class _DefaultDeadline(float):
    """``LAGO_RETRY_DEADLINE`` left at its default: at least 30 s, and never shorter than ``LAGO_API_TIMEOUT`` (a
    deadline set explicitly is the user's: kept, it caps each attempt).

    Only the signature's default: ``__post_init__`` stores a plain ``float`` (serialisers such as ``orjson`` and
    ``yaml.safe_dump`` refuse a subclass) and remembers, outside the fields, that the deadline follows the timeout
    (``_default_deadline``, which :meth:`BillingSettings.replace`, copies and pickling keep)."""

    __slots__ = ()


_RETRY_DEADLINE = 30.0
#: Values that say "on"/"off": a header variable set to one of them was meant as a switch, not a header's name.
_SWITCH_WORDS = frozenset({"1", "0", "true", "false", "yes", "no", "on", "off", "y", "n", "enabled", "disabled"})
#: What ``None`` reads as once made text (``str(None)`` of a setting read in code, JSON's ``null`` in a templated
#: manifest): as a header's name, one no client sends, so every request went unresolved.
_NULL_WORDS = frozenset({"none", "null"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class BillingSettings:
    """Everything the package needs to talk to Lago and to bill requests.

    Build it from the environment with :meth:`from_env`, or directly in code::

        settings = BillingSettings(api_url="https://api.getlago.com", api_key=os.environ["LAGO_API_KEY"])

    Each field maps to the environment variable named in its comment. Secrets never appear in ``repr``: the API key
    and HMAC key are left out, the password of a URL is masked.
    """

    def __repr__(self) -> str:
        shown = (
            f"{field.name}={redact_url(value) if field.name in _URL_FIELDS and value else repr(value)}"
            for field in dataclasses.fields(self)
            if field.repr
            for value in (getattr(self, field.name),)
        )
        return f"BillingSettings({', '.join(shown)})"

    #: ``LAGO_API_KEY``: Lago API key (Developers > API keys).
    api_key: str = dataclasses.field(default="", repr=False)
    #: ``LAGO_API_URL``: Lago base URL, without ``/api/v1``.
    api_url: str = "http://localhost:3000"
    #: ``LAGO_API_TIMEOUT``: seconds allowed for each call to Lago.
    api_timeout: float = 10.0
    #: ``LAGO_MAX_RETRIES``: retries of an idempotent call on network errors, 5xx and 429.
    max_retries: int = 3
    #: ``LAGO_RETRY_DEADLINE``: total seconds one call may spend, retries and waits included.
    retry_deadline: float = _DefaultDeadline(_RETRY_DEADLINE)
    #: ``LAGO_RETRY_BACKOFF``: first backoff in seconds (doubles each retry, full jitter, capped at 10 s).
    retry_backoff: float = 0.25
    #: ``LAGO_EVENT_CODE``: billable metric code of the per-request event.
    event_code: str = "api_call"
    #: ``LAGO_SUBSCRIPTION_ID_TEMPLATE``: how an org id maps to its Lago subscription ``external_id``.
    subscription_id_template: str = "{org_id}"
    #: ``LAGO_ORG_HEADER``: opt-in, resolve the org from this request header (clients can spoof it).
    org_header: str | None = None
    #: ``LAGO_USER_HEADER``: opt-in, resolve the user from this request header.
    user_header: str | None = None
    #: ``LAGO_EXCLUDE_PATHS``: path prefixes never billed nor gated.
    exclude_paths: tuple[str, ...] = ()
    #: ``LAGO_SPOOL_PATH``: SQLite file of the durable event spool (unset: in memory).
    spool_path: str | None = None
    #: ``LAGO_REDIS_URL``: Redis for shared quota counters, snapshots and webhook dedupe.
    redis_url: str | None = None
    #: ``LAGO_QUOTA_MODE``: ``enforce``, ``monitor`` or ``off``.
    quota_mode: QuotaMode = "enforce"
    #: ``LAGO_FAIL_OPEN``: allow requests when Lago cannot be asked.
    fail_open: bool = True
    #: ``LAGO_USAGE_CACHE_TTL``: seconds a usage snapshot is trusted.
    usage_cache_ttl: float = 30.0
    #: ``LAGO_PLAN_LIMITS``: fallback limits per plan code, ``{"starter": {"max_api_calls": 300}}``.
    plan_limits: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)
    #: ``LAGO_WEBHOOK_HMAC_KEY``: HMAC key of Lago webhooks (unset: JWT mode).
    webhook_hmac_key: str | None = dataclasses.field(default=None, repr=False)
    #: ``LAGO_ORGANIZATION_ID``: webhooks of other Lago organizations are refused (see ``LagoWebhooks``).
    organization_id: str | None = None
    #: ``LAGO_METRICS``: export the middleware's metrics to Prometheus' default registry (extra ``metrics``).
    metrics: bool = False
    #: ``LAGO_BILL_SERVER_ERRORS``: bill responses with status >= 500 and requests the app crashed on.
    bill_server_errors: bool = False
    #: ``LAGO_BILL_AUTH_FAILURES``: bill the app's 401 and 403 answers (its auth refused the caller: with
    #: ``LAGO_ORG_HEADER``, anyone naming an org would run up its bill).
    bill_auth_failures: bool = False
    #: ``LAGO_ON_UNRESOLVED``: a request whose org cannot be resolved is served unbilled (``allow``) or
    #: answered ``LAGO_UNRESOLVED_STATUS`` with a JSON problem body (``reject``).
    on_unresolved: OnUnresolved = "allow"
    #: ``LAGO_UNRESOLVED_STATUS``: 401 or 403, the answer of ``LAGO_ON_UNRESOLVED=reject``.
    unresolved_status: int = 401

    def __post_init__(self) -> None:
        _check_types(self)
        object.__setattr__(self, "api_url", _parse_url("LAGO_API_URL", self.api_url))
        _check_given_text(self)
        _check_api_key(self)
        if isinstance(self.webhook_hmac_key, str):  # (a key read from a secret file keeps its line break)
            object.__setattr__(self, "webhook_hmac_key", self.webhook_hmac_key.strip() or None)
        _positive("LAGO_API_TIMEOUT", self.api_timeout)
        default_deadline = isinstance(self.retry_deadline, _DefaultDeadline)
        object.__setattr__(self, "_default_deadline", default_deadline)  # (not a field: not compared nor shown)
        if default_deadline:  # a call gets its whole LAGO_API_TIMEOUT at least
            object.__setattr__(self, "retry_deadline", float(max(_RETRY_DEADLINE, self.api_timeout)))
        _positive("LAGO_RETRY_DEADLINE", self.retry_deadline)
        _positive("LAGO_RETRY_BACKOFF", self.retry_backoff)
        _positive("LAGO_USAGE_CACHE_TTL", self.usage_cache_ttl)
        for variable, switch in (
            ("LAGO_FAIL_OPEN", self.fail_open),
            ("LAGO_METRICS", self.metrics),
            ("LAGO_BILL_SERVER_ERRORS", self.bill_server_errors),
            ("LAGO_BILL_AUTH_FAILURES", self.bill_auth_failures),
        ):
            if not isinstance(switch, bool):  # ("false", a non-empty string, is true)
                raise ConfigurationError(
                    f"{variable} must be True or False, got {_shown(switch)} (from_env reads the text forms: "
                    "true/false, yes/no, on/off, 1/0).",
                    variable=variable,
                )
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or not 0 <= self.max_retries <= 20
        ):
            raise ConfigurationError(
                f"LAGO_MAX_RETRIES must be a whole number from 0 to 20, got {_shown(self.max_retries)}.",
                variable="LAGO_MAX_RETRIES",
            )
        # (stripped as from_env reads it: a blank that ``docker run --env-file`` kept, read by the app itself)
        object.__setattr__(self, "event_code", self.event_code.strip())
        if not self.event_code:
            raise ConfigurationError("LAGO_EVENT_CODE must not be empty.", variable="LAGO_EVENT_CODE")
        if not self.event_code.isprintable():  # (sent as the events' code, which no metric has: kept, never billed)
            raise ConfigurationError(
                "LAGO_EVENT_CODE must be the code of a billable metric, with no line break nor control character "
                f"inside, got {self.event_code!r}.",
                variable="LAGO_EVENT_CODE",
            )
        _check_template(self.subscription_id_template)
        if isinstance(self.redis_url, str):  # (a Kubernetes secret's line break, kept by code reading it itself)
            object.__setattr__(self, "redis_url", self.redis_url.strip() or None)
        if self.redis_url is not None and not _redis_url_ok(self.redis_url):
            raise ConfigurationError(
                f"LAGO_REDIS_URL must be a redis://, rediss:// or unix:// URL such as redis://localhost:6379/0 (a port "
                f"from 1 to 65535, a database number alone after the host; unix:///path/to/redis.sock?db=0), got "
                f"{redact_url(self.redis_url)}.",
                variable="LAGO_REDIS_URL",
            )
        if self.quota_mode not in _QUOTA_MODES:
            raise ConfigurationError(
                f"LAGO_QUOTA_MODE must be one of {', '.join(_QUOTA_MODES)}; got {self.quota_mode!r}.",
                variable="LAGO_QUOTA_MODE",
            )
        if self.on_unresolved not in ("allow", "reject"):
            raise ConfigurationError(
                f"LAGO_ON_UNRESOLVED must be 'allow' or 'reject', got {self.on_unresolved!r}.",
                variable="LAGO_ON_UNRESOLVED",
            )
        status = self.unresolved_status  # (an int: 401.0 went out as the status, which h11 refuses to send)
        if isinstance(status, bool) or not isinstance(status, int) or status not in (401, 403):
            raise ConfigurationError(
                f"LAGO_UNRESOLVED_STATUS must be 401 or 403 (an int), got {_shown(status)}.",
                variable="LAGO_UNRESOLVED_STATUS",
            )
        for variable, header in (("LAGO_ORG_HEADER", self.org_header), ("LAGO_USER_HEADER", self.user_header)):
            if header is None:
                continue
            kind = header_name_problem(header)
            if kind == "token":
                raise ConfigurationError(
                    f"{variable} must be an HTTP header name such as X-Org-Id (letters, digits and -), got {header!r}.",
                    variable=variable,
                )
            if kind == "switch":
                raise ConfigurationError(
                    f"{variable} is the name of the request header that carries the id (such as X-Org-Id or "
                    f"X-User-Id), not a switch nor None: got {header!r}. Unset it to leave header resolution off.",
                    variable=variable,
                )
            if kind == "wsgi":
                raise ConfigurationError(
                    f"{variable} is the header's name as clients send it ({header_as_sent(header, 'X-Org-Id')}), "
                    f"not its WSGI/CGI name: got {header!r}.",
                    variable=variable,
                )
        object.__setattr__(self, "plan_limits", _check_plan_limits(self.plan_limits))
        if self.spool_path is not None:
            object.__setattr__(self, "spool_path", _spool_path(self.spool_path))

    def subscription_id_for(self, org_id: str) -> str:
        """The Lago subscription ``external_id`` of an org (``LAGO_SUBSCRIPTION_ID_TEMPLATE``)."""
        return self.subscription_id_template.format(org_id=org_id)

    def require_api_key(self) -> str:
        """The API key, or a :class:`ConfigurationError` saying how to set it."""
        if not self.api_key:
            raise ConfigurationError(
                "LAGO_API_KEY is not set: set it in the environment or .env (Lago: Developers > API keys), "
                "or pass BillingSettings(api_key=...).",
                variable="LAGO_API_KEY",
            )
        return self.api_key

    def replace(self, **changes: Unpack[SettingsFields]) -> BillingSettings:
        """A copy with some fields changed (validated again); a ``retry_deadline`` left at its default still follows
        ``api_timeout`` (``dataclasses.replace`` would keep the deadline computed from the old timeout: use this)."""
        if "retry_deadline" not in changes and getattr(self, "_default_deadline", False):
            changes["retry_deadline"] = _DefaultDeadline(_RETRY_DEADLINE)
        try:
            changed = dataclasses.replace(self, **changes)
        except ConfigurationError as exc:
            failure = exc
        else:
            if hasattr(self, "_env_file"):
                object.__setattr__(changed, "_env_file", env_file_of(self))
            return changed
        # (raised bare: dataclasses.replace's frame held every field, the API key and the HMAC key among them)
        del changes
        raise _bare(failure)

    __replace__ = replace  # ``copy.replace`` (Python 3.13)

    @classmethod
    def from_env(
        cls,
        env_file: str | Path | None = ".env",
        *,
        environ: Mapping[str, str] | None = None,
        require_api_key: bool = True,
        **overrides: Unpack[SettingsFields],
    ) -> BillingSettings:
        """Read settings from ``environ`` (default ``os.environ``) and ``env_file`` (skipped when absent).

        Environment variables win over the file, and ``overrides`` win over both. A missing
        ``LAGO_API_KEY`` is a :class:`ConfigurationError` unless ``require_api_key=False``.

        The file is read as python-dotenv's ``load_dotenv`` reads it, ``${VAR}`` and ``${VAR:-default}`` expanded
        (from the environment, else the lines above). Each variable can also be given as ``<name>_FILE``, the path
        of a file holding its value (Docker and Kubernetes secrets: ``LAGO_API_KEY_FILE=/run/secrets/lago_api_key``).
        """
        try:
            return cls._from_env(env_file, environ, require_api_key, overrides)
        except ConfigurationError as exc:
            failure = exc
        del environ, overrides  # (locals a traceback would show: the environment, its secrets included)
        raise _bare(failure)

    @classmethod
    def _from_env(
        cls,
        env_file: str | Path | None,
        environ: Mapping[str, str] | None,
        require_api_key: bool,
        overrides: Mapping[str, Any],
    ) -> BillingSettings:
        if env_file is not None and not os.path.isfile(env_file):
            env_file = None
        source = os.environ if environ is None else environ
        file_values = _read_env_file(env_file, source) if env_file is not None else {}

        def get(name: str, parse: Callable[[str, str], _T], field: str) -> None:
            if field in overrides:
                return
            raw = _secret_file(name, source, file_values, env_file)
            if raw is None:
                raw = source[name] if name in source else file_values.get(name)
                if raw is not None:
                    _check_raw(name, raw, env_file if name not in source else None)
            if raw is not None:
                values[field] = parse(name, raw)

        values: dict[str, Any] = {}
        get("LAGO_API_KEY", _str, "api_key")
        get("LAGO_API_URL", _str, "api_url")
        get("LAGO_API_TIMEOUT", _seconds, "api_timeout")
        get("LAGO_MAX_RETRIES", _int, "max_retries")
        get("LAGO_RETRY_DEADLINE", _seconds, "retry_deadline")
        get("LAGO_RETRY_BACKOFF", _seconds, "retry_backoff")
        get("LAGO_EVENT_CODE", _str, "event_code")
        get("LAGO_SUBSCRIPTION_ID_TEMPLATE", _str, "subscription_id_template")
        get("LAGO_ORG_HEADER", _optional_str, "org_header")
        get("LAGO_USER_HEADER", _optional_str, "user_header")
        get("LAGO_EXCLUDE_PATHS", _csv, "exclude_paths")
        get("LAGO_SPOOL_PATH", _optional_str, "spool_path")
        get("LAGO_REDIS_URL", _optional_str, "redis_url")
        get("LAGO_QUOTA_MODE", _lower, "quota_mode")
        get("LAGO_FAIL_OPEN", _bool, "fail_open")
        get("LAGO_USAGE_CACHE_TTL", _seconds, "usage_cache_ttl")
        get("LAGO_PLAN_LIMITS", _json_object, "plan_limits")
        get("LAGO_WEBHOOK_HMAC_KEY", _optional_str, "webhook_hmac_key")
        get("LAGO_ORGANIZATION_ID", _optional_str, "organization_id")
        get("LAGO_METRICS", _bool, "metrics")
        get("LAGO_BILL_SERVER_ERRORS", _bool, "bill_server_errors")
        get("LAGO_BILL_AUTH_FAILURES", _bool, "bill_auth_failures")
        get("LAGO_ON_UNRESOLVED", _lower, "on_unresolved")
        get("LAGO_UNRESOLVED_STATUS", _int, "unresolved_status")
        values.update(overrides)
        settings = cls(**values)
        object.__setattr__(settings, "_env_file", env_file)  # (read by the gate's QuotaConfig too: see env_file_of)
        if require_api_key:
            settings.require_api_key()
        return settings


class SettingsFields(TypedDict, total=False):
    """The fields of :class:`BillingSettings` as keywords, for :meth:`~BillingSettings.replace` and the overrides of
    :meth:`~BillingSettings.from_env`: a type checker sees a misspelt one (``replace(api_timout=3)``) or a value of the
    wrong type, which ``**changes: Any`` let through (kept in step with the fields by the tests)."""

    api_key: str
    api_url: str
    api_timeout: float
    max_retries: int
    retry_deadline: float
    retry_backoff: float
    event_code: str
    subscription_id_template: str
    org_header: str | None
    user_header: str | None
    exclude_paths: tuple[str, ...]
    spool_path: str | None
    redis_url: str | None
    quota_mode: QuotaMode
    fail_open: bool
    usage_cache_ttl: float
    plan_limits: Mapping[str, Mapping[str, int]]
    webhook_hmac_key: str | None
    organization_id: str | None
    metrics: bool
    bill_server_errors: bool
    bill_auth_failures: bool
    on_unresolved: OnUnresolved
    unresolved_status: int


def env_file_of(settings: BillingSettings) -> str | os.PathLike[str] | None:
    """The ``.env`` file :meth:`BillingSettings.from_env` read ``settings`` from (``None``: none), for the other
    variables of that file (``LAGO_QUOTA_*``); ``.env`` for settings made in code, as ``QuotaConfig.from_env()``."""
    found: str | os.PathLike[str] | None = getattr(settings, "_env_file", ".env")
    return found


def _secret_file(
    name: str, source: Mapping[str, str], file_values: Mapping[str, str], env_file: str | os.PathLike[str] | None
) -> str | None:
    """The content of the file ``<name>_FILE`` names (Docker and Kubernetes secrets: ``LAGO_API_KEY_FILE=/run/secrets/
    lago_api_key``), or ``None`` when that variable is unset or empty. The environment wins over the ``.env`` file, as
    for the variables themselves; ``<name>`` and ``<name>_FILE`` both set at the same place are refused (which one was
    meant?). The content is read as the variable's value (a trailing line break dropped with the blanks around it)."""
    variable = f"{name}_FILE"
    if source.get(variable, "").strip():
        path, here, where = source[variable], name in source, "the environment"
    elif (
        name not in source
        and variable in file_values
        and (isinstance(file_values[variable], _Unusable) or file_values[variable].strip())
    ):
        path = file_values[variable]
        _check_raw(variable, path, env_file)
        here, where = name in file_values, os.fspath(env_file or ".env")
    else:
        return None
    path = path.strip()
    if here:
        raise ConfigurationError(
            f"{name} and {variable} are both set in {where}: keep one ({variable} names a file holding the value, "
            "such as a Docker secret).",
            variable=name,
        )
    try:
        with open(path, encoding="utf-8") as file:
            content = file.read().removeprefix("\ufeff")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.reason if isinstance(exc, UnicodeDecodeError) else exc.strerror or str(exc)
        raise ConfigurationError(
            f"{variable} names {path!r}, which cannot be read as text ({reason}): give the path of a UTF-8 file "
            f"readable by the user the app runs as (such as /run/secrets/...), or unset {variable} and set {name}.",
            variable=variable,
        ) from None
    if not content.strip():
        raise ConfigurationError(
            f"{variable} names {path!r}, which is empty: write the value of {name} in it.", variable=variable
        )
    return content.strip()


def check_setting_names(owner: str, given: Mapping[str, object], known: Collection[str]) -> None:
    """An :class:`UnknownSettingError` naming the first of ``given``'s keywords that is no field of ``owner`` (and the
    field meant, when one is close): a misspelt keyword (``replace(api_timout=3)``) was a bare ``TypeError`` raised
    through frames holding every field and the whole environment as locals (see :func:`_bare`)."""
    for name in given:
        if name in known:
            continue
        close = difflib.get_close_matches(name, list(known), n=1)
        meant = f"did you mean {close[0]!r}?" if close else f"its settings are {', '.join(known)}."
        raise UnknownSettingError(f"{owner} has no setting {name!r}: {meant}")


def _guarded_init(init: Callable[..., None]) -> Callable[..., None]:
    """The dataclass' ``__init__``, whose frame has every field as a local: a :class:`ConfigurationError` of its
    checks (a keyword that names no field included) is raised again from here, bare (:func:`_bare`), with no field
    left among this frame's locals."""

    @functools.wraps(init)
    def __init__(self: BillingSettings, **fields: Any) -> None:
        try:
            check_setting_names("BillingSettings", fields, _FIELD_NAMES)
            init(self, **fields)
            return
        except ConfigurationError as exc:
            failure = exc
        del fields
        raise _bare(failure)

    return __init__


setattr(BillingSettings, "__init__", _guarded_init(BillingSettings.__init__))  # noqa: B010 - (mypy: the dataclass')
_FIELD_NAMES = tuple(field.name for field in dataclasses.fields(BillingSettings) if field.init)


def _str(name: str, raw: str) -> str:
    return raw.strip()


def _optional_str(name: str, raw: str) -> str | None:
    return raw.strip() or None


def _lower(name: str, raw: str) -> str:
    return raw.strip().lower()


def _csv(name: str, raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _empty(name: str, expected: str) -> ConfigurationError:
    """The error of a variable set to nothing (``- LAGO_FAIL_OPEN=${LAGO_FAIL_OPEN}`` in compose, the host's unset)."""
    return ConfigurationError(
        f"{name} is set but empty: unset it to use the default, or set {expected}.",
        variable=name,
    )


def _seconds(name: str, raw: str) -> float:
    """A number of seconds, or a duration with its units as Go, systemd and Kubernetes write them: ``10s``,
    ``500ms``, ``1m30s``, ``1h`` (``m`` is minutes)."""
    text = raw.strip()
    if not text:
        raise _empty(name, "a number of seconds such as 10")
    try:
        return float(text)
    except ValueError:
        pass
    if _DURATION.fullmatch(text):
        return sum(float(number) * _UNITS[unit.lower()] for number, unit in _DURATION_PART.findall(text))
    raise ConfigurationError(
        f"{name} must be a number of seconds such as 10 (or a duration with its unit: 10s, 500ms, 1m30s), got {raw!r}.",
        variable=name,
    )


def _int(name: str, raw: str) -> int:
    text = raw.strip()
    if not text:
        raise _empty(name, "a whole number")
    try:
        return int(text)
    except ValueError:
        pass
    try:  # ``3.0``: a templating tool that renders every number as a float
        number = float(text)
    except ValueError:
        number = math.nan
    if number.is_integer():
        return int(number)
    raise ConfigurationError(f"{name} must be a whole number, got {raw!r}.", variable=name)


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    if not value:
        raise _empty(name, "true or false")
    raise ConfigurationError(f"{name} must be true or false (yes/no, on/off, 1/0), got {raw!r}.", variable=name)


_TRUE = frozenset({"1", "true", "t", "yes", "y", "on", "enabled", "enable"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off", "disabled", "disable"})
#: Seconds per duration unit (lower case).
_UNITS = {
    **dict.fromkeys(("ms", "msec", "msecs", "millisecond", "milliseconds"), 0.001),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
}
# (the same units in both, ASCII only: a case-insensitive check also takes the long s, U+017F, for ``s``, and a part
# the check took and the sum skipped was dropped: ``1s1`` and a long s was 1 second)
_UNIT_NAMES = "|".join(sorted(_UNITS, key=len, reverse=True))
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(" + _UNIT_NAMES + ")", re.IGNORECASE | re.ASCII)
_DURATION = re.compile(r"(?:\s*(?:\d+(?:\.\d*)?|\.\d+)\s*(?:" + _UNIT_NAMES + r"))+\s*", re.IGNORECASE | re.ASCII)

#: The expected shape of ``LAGO_PLAN_LIMITS``.
_PLAN_LIMITS_EXAMPLE = '{"starter": {"max_api_calls": 300, "max_tokens": 100000}}'


class _DuplicateKey(ValueError):
    """A JSON object with a key written twice (``json`` keeps the last silently)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return value


def _json_object(name: str, raw: str) -> Any:
    raw = raw.strip().removeprefix("\ufeff")  # (``$(cat limits.json)`` of a file saved with a byte-order mark)
    if not raw.strip():
        return {}
    shape = f"a JSON object of limits per plan code, such as {_PLAN_LIMITS_EXAMPLE}"
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        hint = " (JSON takes double quotes, not single ones)" if "'" in raw else ""
        raise ConfigurationError(
            f"{name} is not valid JSON: {exc.msg}{hint} at line {exc.lineno}, column {exc.colno}:\n"
            f"{_excerpt(raw, exc.pos)}\nExpected {shape}.",
            variable=name,
        ) from None
    except _DuplicateKey as exc:
        raise ConfigurationError(
            f"{name} has {exc.args[0]!r} twice in one object (the second would replace the first): write it once. "
            f"Expected {shape}.",
            variable=name,
        ) from None
    except (ValueError, RecursionError) as exc:  # a number of more than 4300 digits; objects nested thousands deep
        raise ConfigurationError(f"{name} cannot be read ({exc}). Expected {shape}.", variable=name) from None


def _excerpt(text: str, position: int) -> str:
    """The line of ``text`` holding ``position`` (some 60 characters around it) and a caret under it."""
    start = text.rfind("\n", 0, position) + 1
    end = text.find("\n", position)
    line = text[start : len(text) if end < 0 else end]
    column = position - start
    left = max(0, column - 40)
    shown = line[left : column + 20]
    prefix = "..." if left else ""
    suffix = "..." if column + 20 < len(line) else ""
    return f"    {prefix}{shown}{suffix}\n    {' ' * (len(prefix) + column - left)}^"


def _check_raw(name: str, raw: str, env_file: str | os.PathLike[str] | None) -> None:
    """Refuse a value as written that would be read wrong: wrapped in quotes (:func:`_check_unquoted`) or, read
    unquoted from the ``env_file`` (None: from the environment, where docker keeps it literally), ending with an
    inline comment, which python-dotenv and compose drop and starlette's ``.env`` reader keeps (a value quoted in the
    file, a :class:`_Quoted` of :func:`_read_env_file`, is its content: `` #`` included)."""
    if isinstance(raw, _Unusable):
        raise ConfigurationError(f"{name} in {os.fspath(env_file or '.env')} {raw.problem}", variable=name)
    _check_unquoted(name, raw)
    if env_file is not None and not isinstance(raw, _Quoted) and _INLINE_COMMENT.search(raw):
        raise ConfigurationError(
            f"{name} in {env_file} ends with an inline comment (' # ...'), which is read here as part of its value: "
            "put the comment on a line of its own.",
            variable=name,
        )


class _Quoted(str):
    """A value written in quotes in a ``.env`` file, as :func:`_read_env_file` reads it (escapes decoded): its
    content, `` #`` included, is the value."""

    __slots__ = ()


def _read_env_file(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables of a ``.env`` file, read as python-dotenv's ``load_dotenv`` reads it: a leading byte-order mark
    dropped, ``export`` lines, values in single or double quotes (over several lines too; ``\\`` and the quote escaped
    inside, and in double quotes ``\\n`` and the like), a blank value before an inline comment (``KEY= # later``), the
    last line of a variable winning, ``${VAR}`` and ``${VAR:-default}`` expanded from ``environ`` (default
    ``os.environ``), else from the lines above (``:-`` takes the default for a variable unset or empty, as compose and
    the shell do). Quoted and expanded values are :class:`_Quoted`; an unquoted value keeps an inline comment for
    :func:`_check_raw` to refuse (python-dotenv drops it, starlette kept it). A ``LAGO_*`` line python-dotenv cannot
    read (a quote not closed, text after the closing quote, ``LAGO_X: value``) and a reference to a variable set
    nowhere are an :class:`_Unusable` value, which :func:`_check_raw` refuses saying why (python-dotenv skips such a
    line, and expands such a reference to nothing); other lines it cannot read are skipped, as python-dotenv skips
    them."""
    try:
        with open(path, encoding="utf-8") as file:  # (universal newlines: CRLF files read as LF)
            text = file.read().removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(
            f"{os.fspath(path)} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8 (PowerShell 5's "
            "'>' writes UTF-16: use Set-Content -Encoding utf8, or an editor's 'UTF-8').",
        ) from None
    except OSError as exc:  # (a file of root's, mode 600, in an image run as another user)
        raise ConfigurationError(
            f"{os.fspath(path)} cannot be read ({exc.strerror or exc}): make it readable by the user the app runs as, "
            "or remove it and set the LAGO_* variables in the environment.",
        ) from None
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    position = 0
    while position < len(text):
        binding = _DOTENV_BINDING.match(text, position)
        if binding is None:  # a comment, or a line python-dotenv cannot read either
            end = text.find("\n", position)
            unread = _UNREAD_LINE.match(text, position, len(text) if end < 0 else end)
            if unread is not None and unread["after"].strip() and not unread["after"].lstrip().startswith("#"):
                values[unread["name"]] = _Unusable(_line_problem(text, position, _NOT_A_BINDING.format(unread["name"])))
            position = len(text) if end < 0 else end + 1
            continue
        position = binding.end()
        key = binding["key"] or binding["quoted_key"]
        at = binding.start("key" if binding["key"] else "quoted_key") - (0 if binding["key"] else 1)
        if (name := _LAGO_NAME.match(key)) is not None and name.end() != len(key):  # ``export LAGO_X:=value``
            values[name.group()] = _Unusable(_line_problem(text, at, _NOT_A_BINDING.format(name.group())))
            continue
        if binding["single"] is not None:
            value: str = _Quoted(_SINGLE_ESCAPES.sub(_unescape, binding["single"]))
        elif binding["double"] is not None:
            value = _Quoted(_DOUBLE_ESCAPES.sub(_unescape, binding["double"]))
        elif binding["blank"] is not None or (binding["comment"] is not None and binding["equal"] != "="):
            value = ""  # ``KEY=``, or ``KEY= # comment`` (``KEY=#x`` is ``#x``)
        else:
            value = (binding["plain"] or binding["comment"] or "").strip()
            if value[:1] in ("'", '"'):  # quoted alternatives failed: the quote is never closed
                values[key] = _Unusable(_line_problem(text, at, _UNCLOSED.format(quote=value[0])))
                continue
        if binding["rest"].strip() and not binding["rest"].lstrip().startswith("#"):
            # text after a closing quote (``KEY="a"b``, or a quote not closed on its line that the next quote closed):
            # python-dotenv skips the line; read again from the next line, for the lines that follow to be read
            start = binding.start("single" if binding["single"] is not None else "double") - 1
            values[key] = _Unusable(_line_problem(text, at, _UNCLOSED.format(quote=text[start])))
            line_end = text.find("\n", start)
            position = len(text) if line_end < 0 else line_end + 1
            continue
        if "${" in value and not (not isinstance(value, _Quoted) and _INLINE_COMMENT.search(value)):
            value = _expanded(value, environ, values)  # (a value with an inline comment is refused as written)
        values[key] = value
    return values


class _Unusable(str):
    """A ``.env`` value :func:`_check_raw` refuses (the text is empty, never the value: it may be a secret); ``problem``
    says why, after the variable's name and the file's."""

    def __new__(cls, problem: str) -> _Unusable:
        unusable = super().__new__(cls, "")
        unusable.problem = problem
        return unusable

    problem: str


#: A line that starts with the name of a ``LAGO_*`` variable (a bare name: from the environment, as compose reads it).
_UNREAD_LINE = re.compile(r"[^\S\n]*(?:export[^\S\n]+)?(?P<name>LAGO_\w+)(?P<after>[^\n]*)")
_LAGO_NAME = re.compile(r"LAGO_\w+")
_NOT_A_BINDING = "is not written as NAME=value, which python-dotenv skips: write it {0}=value (no ':' nor blank)."
_UNCLOSED = (
    "has a quote ({quote}) that is not closed, or text after its closing quote: python-dotenv skips such a line. Write "
    "the value in a pair of quotes with nothing after the closing one but a comment."
)
#: ``${VAR}`` and ``${VAR:-default}``, as python-dotenv expands them.
_REFERENCE = re.compile(r"\$\{(?P<name>[^}:]*)(?::-(?P<default>[^}]*))?\}")


def _line_problem(text: str, position: int, problem: str) -> str:
    return f"(line {text.count(chr(10), 0, position) + 1}) {problem}"


def _expanded(value: str, environ: Mapping[str, str], above: Mapping[str, str]) -> str:
    """``value`` with its references expanded (the environment first, then the lines above), a :class:`_Quoted` (its
    content is the value); an :class:`_Unusable` naming the variables set nowhere."""
    missing: list[str] = []

    def resolve(reference: re.Match[str]) -> str:
        name, default = reference["name"], reference["default"]
        found = environ.get(name)
        if found is None:
            earlier = above.get(name)
            found = None if isinstance(earlier, _Unusable) else earlier
        if default is not None and not found:
            return default
        if found is None:
            missing.append(name)
            return ""
        return found

    result = _REFERENCE.sub(resolve, value)
    if missing:
        names = ", ".join(dict.fromkeys(missing))
        template = (
            " (the subscription id template's placeholder is {org_id}, without '$')" if "org_id" in missing else ""
        )
        return _Unusable(
            f"refers to {names}, set neither in the environment nor above it in the file{template}: set it, or give "
            f"the reference a default (${{{missing[0]}:-default}}; ${{{missing[0]}:-}} for none)."
        )
    return _Quoted(result)


def _unescape(match: re.Match[str]) -> str:
    return _ESCAPES.get(match.group()[1], match.group()[1])


def _check_unquoted(name: str, raw: str) -> None:
    """Refuse a value wrapped whole in quotes: ``docker run --env-file`` and compose's ``environment:`` lists keep
    them as part of the value (a ``.env`` file read here drops them)."""
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        raise ConfigurationError(
            f"{name} is wrapped in quotes ({value[0]}...{value[0]}), which are kept as part of its value here (as "
            "`docker run --env-file` and compose `environment:` lists keep them): remove the quotes.",
            variable=name,
        )


#: Fields whose value is never meant wrapped in quotes (Lago's keys and ids are UUIDs; a header name, a metric code,
#: the template of an id, a file path): refused given in code too (``os.environ[...]`` read by the app itself under
#: ``docker run --env-file``, which keeps them), as :meth:`BillingSettings.from_env` refuses them.
_UNQUOTED_FIELDS = {
    "api_key": "LAGO_API_KEY",
    "webhook_hmac_key": "LAGO_WEBHOOK_HMAC_KEY",
    "organization_id": "LAGO_ORGANIZATION_ID",
    "org_header": "LAGO_ORG_HEADER",
    "user_header": "LAGO_USER_HEADER",
    "event_code": "LAGO_EVENT_CODE",
    "subscription_id_template": "LAGO_SUBSCRIPTION_ID_TEMPLATE",
    "spool_path": "LAGO_SPOOL_PATH",
}


#: The text fields (``None``: unset, where the field allows it) and an example of each.
_TEXT_FIELDS = {
    "api_url": ("LAGO_API_URL", False, "https://api.getlago.com"),
    "event_code": ("LAGO_EVENT_CODE", False, "api_call"),
    "subscription_id_template": ("LAGO_SUBSCRIPTION_ID_TEMPLATE", False, "{org_id}"),
    "org_header": ("LAGO_ORG_HEADER", True, "X-Org-Id"),
    "user_header": ("LAGO_USER_HEADER", True, "X-User-Id"),
    "redis_url": ("LAGO_REDIS_URL", True, "redis://localhost:6379/0"),
    "organization_id": ("LAGO_ORGANIZATION_ID", True, "1a901a90-1a90-1a90-1a90-1a901a901a90"),
    "quota_mode": ("LAGO_QUOTA_MODE", False, "enforce"),
    "on_unresolved": ("LAGO_ON_UNRESOLVED", False, "allow"),
}


def _check_types(settings: BillingSettings) -> None:
    """Refuse a field of the wrong type given in code (``None`` for a missing setting, bytes, a number), which failed
    deep inside (``AttributeError: 'NoneType' object has no attribute 'strip'``) or later, at the first request; and
    read ``exclude_paths`` as the tuple of prefixes it stands for (:func:`excluded_prefixes`)."""
    for field, (variable, optional, example) in _TEXT_FIELDS.items():
        value = getattr(settings, field)
        if value is None and optional:
            continue
        if not isinstance(value, str):
            hint = " (decode bytes with .decode())" if isinstance(value, (bytes, bytearray)) else ""
            unset = " or None (unset)" if optional else ""
            raise ConfigurationError(
                f"{variable} (BillingSettings.{field}) must be a string such as {example!r}{unset}, got "
                f"{type(value).__name__}{hint}.",
                variable=variable,
            )
    object.__setattr__(settings, "exclude_paths", excluded_prefixes(settings.exclude_paths))
    if settings.organization_id is not None:  # as from_env reads it: blank is unset, and blanks around (a secret
        # file's line break, read by the app itself) are no part of the id (kept, every webhook refused as another's)
        object.__setattr__(settings, "organization_id", settings.organization_id.strip() or None)


def excluded_prefixes(paths: object) -> tuple[str, ...]:
    """``exclude_paths`` given in code (a tuple, list or set of path prefixes) as the tuple the middleware matches,
    blanks around each entry removed as ``from_env`` removes them (``'/health '``, a line break read from a file,
    matched nothing); :class:`ConfigurationError` naming the entry that is no prefix."""
    shape = "a tuple of path prefixes such as ('/health', '/metrics')"
    if isinstance(paths, (str, bytes)) or not isinstance(paths, (tuple, list, frozenset, set)):
        raise ConfigurationError(
            f"LAGO_EXCLUDE_PATHS (BillingSettings.exclude_paths) must be {shape}, got {paths!r} "
            "(from_env reads the comma-separated text form).",
            variable="LAGO_EXCLUDE_PATHS",
        )
    prefixes: list[str] = []
    for given in paths:
        if not isinstance(given, str):
            raise ConfigurationError(
                f"LAGO_EXCLUDE_PATHS (BillingSettings.exclude_paths) must be {shape}: entry {given!r} is a "
                f"{type(given).__name__}.",
                variable="LAGO_EXCLUDE_PATHS",
            )
        prefix = given.strip()
        problem = None
        if not prefix.startswith("/"):
            problem = "must start with '/'"
        elif not prefix.strip("/"):
            problem = "would exclude every request (to bill nothing, leave the middleware out)"
        elif "*" in prefix or "?" in prefix:
            problem = "is a path prefix, not a pattern ('/health' covers '/health' and '/health/...')"
        elif _SEVERAL_PREFIXES.search(prefix):
            problem = "holds several prefixes: separate them with commas ('/health,/metrics')"
        if problem:
            raise ConfigurationError(f"LAGO_EXCLUDE_PATHS entry {given!r} {problem}.", variable="LAGO_EXCLUDE_PATHS")
        prefixes.append(prefix)
    return tuple(prefixes)


def _check_given_text(settings: BillingSettings) -> None:
    """Refuse a secret that is not text (bytes read from a file: an error at the first call or webhook otherwise) and
    a value wrapped whole in quotes. Never shows a secret."""
    for field, variable in _UNQUOTED_FIELDS.items():
        value = getattr(settings, field)
        if field in ("api_key", "webhook_hmac_key") and value is not None and not isinstance(value, str):
            raise ConfigurationError(
                f"{variable} must be text (a str), got {type(value).__name__}: decode it (value.decode()) or read "
                "the secret's file as text.",
                variable=variable,
            )
        if isinstance(value, str):
            _check_unquoted(variable, value)
            reference = _UNEXPANDED[field].search(value) if field in _UNEXPANDED else None
            if reference is not None:
                shown = repr(reference.group().strip("/"))
                if field == "api_key" and reference.group() != value.strip():  # (the rest of what was set: a secret)
                    shown = "a $NAME or ${NAME}"
                raise ConfigurationError(
                    f"{variable} holds {shown}, a reference to another variable that nothing "
                    "expanded (docker run --env-file, systemd's EnvironmentFile and Kubernetes pass it as written): "
                    "set the value itself, or expand it where the variable is set (a .env read by from_env expands "
                    "${NAME}).",
                    variable=variable,
                )


def _check_api_key(settings: BillingSettings) -> None:
    """Strip the API key (a key read from a secret file keeps its line break) and refuse one that cannot be a key:
    pasted with ``Bearer`` (sent as ``Bearer Bearer ...``: every call a 401), or two values run together. The key
    itself is never shown."""
    key = settings.api_key.strip() if isinstance(settings.api_key, str) else settings.api_key
    object.__setattr__(settings, "api_key", key)
    if not isinstance(key, str) or not key:
        return
    problem = api_key_problem(key)
    if problem:
        raise ConfigurationError(f"LAGO_API_KEY {problem}.", variable="LAGO_API_KEY")


def api_key_problem(key: str) -> str | None:
    """Why ``key`` (stripped) cannot be an API key a client sends as ``Authorization: Bearer <key>``, or ``None``."""
    if _BEARER.match(key):
        return "starts with 'Bearer': set it to the key alone (the client sends 'Authorization: Bearer <key>')"
    if any(char.isspace() for char in key):
        return "has a blank or a line break inside: set it to the key alone (Lago: Developers > API keys)"
    if not (key.isascii() and key.isprintable()):  # (httpx could not send it: UnicodeEncodeError at first use)
        return (
            "has a character no Lago key has (a typographic quote, an invisible or control character, pasted with "
            "it): type or copy the key again alone (Lago: Developers > API keys)"
        )
    return None


def _spool_path(value: object) -> str:
    """``~`` expanded (``.env``, docker and systemd leave it as it is: a directory named ``~`` was made); a
    ``pathlib.Path`` given in code read as its string."""
    if not isinstance(value, (str, bytes, os.PathLike)):
        raise ConfigurationError(
            f"LAGO_SPOOL_PATH must be a file path (a str or a pathlib.Path), got {type(value).__name__}.",
            variable="LAGO_SPOOL_PATH",
        )
    path = os.fsdecode(value)
    if "\x00" in path:  # (a NUL in a .env or in code: the spool then failed to start, ``ValueError: embedded null``)
        raise ConfigurationError(
            "LAGO_SPOOL_PATH has a NUL character, which no file's name can hold: set the spool file's path.",
            variable="LAGO_SPOOL_PATH",
        )
    if path.strip() == ":memory:":
        raise ConfigurationError(
            "LAGO_SPOOL_PATH is the SQLite file of the durable spool, not SQLite's ':memory:' (a file of that name "
            "would be made): unset it to keep events in memory.",
            variable="LAGO_SPOOL_PATH",
        )
    if _names_a_directory(path):
        raise ConfigurationError(
            f"LAGO_SPOOL_PATH={path!r} ends with {path[-1]!r}: it names a directory, and the spool is a SQLite file "
            "(SQLite would make a file of the directory's name). Name the spool's file in it, e.g. DIR/spool.db.",
            variable="LAGO_SPOOL_PATH",
        )
    return os.path.expanduser(path)


def _names_a_directory(path: str) -> bool:
    """Whether a spool's path ends with a separator (``/var/lib/app/billing/``): a directory, where a file is meant."""
    return path.endswith(("/", os.sep))


#: A ``$NAME`` or ``${NAME}`` left unexpanded, where no value of the field has one: anywhere in a Lago key or id
#: (UUIDs), the whole HMAC key (whose bytes may be anything), a directory of the spool's path (``${HOME}/spool.db``).
_UNEXPANDED = {
    "api_key": re.compile(r"\$\{[^}]*\}|\$[A-Za-z_]\w*"),
    "organization_id": re.compile(r"\$\{[^}]*\}|\$[A-Za-z_]\w*"),
    "webhook_hmac_key": re.compile(r"\A\s*(?:\$\{[^}]*\}|\$[A-Za-z_]\w*)\s*\Z"),
    "spool_path": re.compile(r"\$\{\w+(?::?[-=?+][^}]*)?\}|(?:\A|/)\$[A-Za-z_]\w*(?=/|\Z)"),
}
#: ``Bearer <key>`` or ``Authorization: Bearer <key>``, as Lago's curl examples show it.
_BEARER = re.compile(r"(?i)(authorization\s*:\s*)?bearer\s")
#: One ``.env`` binding, as python-dotenv's parser reads it (blank lines before it skipped).
_DOTENV_BINDING = re.compile(
    r"""\s*(?:export[^\S\n]+)?
    (?:'(?P<quoted_key>[^'\n]+)'|(?P<key>[^=\#\s'][^=\#\s]*))[^\S\n]*
    (?P<equal>=[^\S\n]*)
    (?:'(?P<single>(?:\\.|[^'\\])*)'|"(?P<double>(?:\\.|[^"\\])*)"|(?P<comment>\#[^\n]*)|(?P<blank>(?=\n|\Z))
       |(?P<plain>[^\n]*))
    (?P<rest>[^\n]*)(?:\n|\Z)""",
    re.VERBOSE | re.DOTALL,
)
#: What python-dotenv decodes in a single-quoted value, and in a double-quoted one.
_SINGLE_ESCAPES = re.compile(r"\\[\\']")
_DOUBLE_ESCAPES = re.compile(r"\\[\\'\"abfnrtv]")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
#: `` # comment`` after a value, which python-dotenv and compose drop and starlette's ``.env`` reader keeps.
_INLINE_COMMENT = re.compile(r"\s#")
#: Exclusions separated by blanks or semicolons instead of commas: ``/health /metrics``.
_SEVERAL_PREFIXES = re.compile(r"[\s;]+/")

#: Where an endpoint's path starts in a URL copied from Lago's API reference (``/api/v1/events``).
_ENDPOINT_PATH = re.compile("(?i)/api/v1/")

#: An HTTP field name (RFC 9110 token).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_name_problem(header: str) -> Literal["token", "switch", "wsgi"] | None:
    """Why ``header`` names no request header a client sends (``None``: it may), for each setting or argument naming
    one to say in its own words: ``"token"``, no HTTP field name (RFC 9110 token); ``"switch"``, a switch word or
    ``None`` made text (``LAGO_ORG_HEADER=true``, ``str(None)``: every request unresolved, each retry billed again);
    ``"wsgi"``, a WSGI/CGI name (Django's ``HTTP_X_ORG_ID``)."""
    if not _HEADER_NAME.fullmatch(header):
        return "token"
    if header.lower() in _SWITCH_WORDS or header.lower() in _NULL_WORDS:
        return "switch"
    if header[:5].upper() == "HTTP_":
        return "wsgi"
    return None


def header_as_sent(wsgi_name: str, example: str) -> str:
    """The header a WSGI/CGI name stands for, as clients send it (``HTTP_X_ORG_ID``: ``X-Org-Id``; ``example`` for
    ``HTTP_`` alone)."""
    return "-".join(part.capitalize() for part in wsgi_name[5:].split("_")) or example


def _split_url(url: str) -> SplitResult | None:
    """``url`` split, or ``None`` when Python cannot read it (an unbalanced IPv6 bracket) or its port is no number
    from 0 to 65535."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number from 0 to 65535
    except ValueError:
        return None
    return parts


def _redis_url_ok(url: str) -> bool:
    """A URL redis-py reads as it was meant: ``//`` after the scheme (``redis:6379`` is Redis on localhost, database
    6379), a database number alone as the path (``/abc`` was database 0, silently), a socket path after ``unix:``."""
    parts = _split_url(url)
    if parts is None or parts.scheme not in ("redis", "rediss", "unix") or parts.port == 0:
        return False
    if parts.scheme == "unix":
        return bool(parts.path)
    return url[len(parts.scheme) : len(parts.scheme) + 3] == "://" and _REDIS_DATABASE.fullmatch(parts.path) is not None


#: The path of a redis:// URL: none, ``/`` or ``/<database number>``.
_REDIS_DATABASE = re.compile(r"/?[0-9]*")


def _parse_url(name: str, value: str) -> str:
    url = value.strip().rstrip("/?#")  # (an empty query or fragment is none: httpx would call ``host/?/api/v1/...``)
    if not url:  # (``LAGO_API_URL=``; compose's ``${LAGO_API_URL}`` of a host where it is unset)
        raise ConfigurationError(
            f"{name} is set but empty: unset it to use the default (http://localhost:3000), or set Lago's URL such as "
            "https://api.getlago.com.",
            variable=name,
        )
    if "://" not in url and not url.lower().startswith(("http:", "https:")):  # (``lago:3000`` splits as scheme lago)
        raise ConfigurationError(
            f"{name} must be a URL with its scheme, got {redact_url(value)}: write {masked_url('http://' + url)!r} or "
            f"{masked_url('https://' + url)!r}.",
            variable=name,
        )
    parts = _split_url(url)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigurationError(
            f"{name} must be an http(s) URL such as https://api.getlago.com, got {redact_url(value)}.", variable=name
        )
    # Port 0 (no server there), a blank or a control character inside (a line break of a folded YAML value: Python
    # drops tabs and line breaks from URLs it splits, httpx refuses them with its own InvalidURL at each client made)
    if parts.port == 0 or any(char.isspace() or not char.isprintable() for char in url):
        raise ConfigurationError(
            f"{name} must be Lago's URL with no blank or line break inside and a port from 1 to 65535, such as "
            f"http://lago:3000, got {redact_url(value)}.",
            variable=name,
        )
    # (the path's end, not the URL's: ``http://api/v1``, a host named api, was cut to ``http:``)
    if parts.path[-len("/api/v1") :].lower() == "/api/v1":  # the Lago docs show URLs with /api/v1; we add it ourselves
        url = url[: -len("/api/v1")].rstrip("/")  # (and ``${HOST}/`` + ``/api/v1`` leaves ``//api/v1``)
    elif endpoint := _ENDPOINT_PATH.search(parts.path):  # an endpoint's URL, copied from Lago's API reference
        base = url[: len(url) - len(parts.path) + endpoint.start()]
        raise ConfigurationError(
            f"{name} is Lago's base URL, without /api/v1 and what follows: got {redact_url(value)}, use "
            f"{redact_url(base)}.",
            variable=name,
        )
    import httpx  # (here: importing the package imports no httpx)

    try:  # what httpx refuses (a host that is no IDNA name, such as lago_中): each LagoClient made raised InvalidURL
        httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigurationError(
            f"{name} must be a URL httpx can call ({exc}), got {redact_url(value)}.", variable=name
        ) from None
    return url


def _positive(name: str, value: float) -> None:
    try:
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an int past the floats (``10**400`` given in code: from the environment, infinity)
        number = False
    if not number or value <= 0:
        raise ConfigurationError(f"{name} must be a positive number, got {_shown(value)}.", variable=name)


def _shown(value: object) -> str:
    """``repr(value)`` for a message; an int of more than 4,300 digits (which Python refuses to print) by its size."""
    try:
        return repr(value)
    except ValueError:
        return f"an int of {value.bit_length()} bits" if isinstance(value, int) else f"a {type(value).__name__}"


_URL_FIELDS = ("api_url", "redis_url")


def redact_url(url: str) -> str:
    """``url`` as it may be shown (logs, errors, ``repr``): quoted, with its password (``user:***@``, and a
    ``password=`` query parameter) masked."""
    return repr(masked_url(url))


def masked_url(url: str) -> str:
    """``url`` with its password masked, as :func:`redact_url` shows it, unquoted (a JSON value, a report's field)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL Python can read (an unbalanced IPv6 bracket): shown as a placeholder
        return "<unparseable URL>"
    netloc, query = parts.netloc, parts.query
    if "@" not in netloc and "@" in url:  # a password with '/', '?' or '#' unescaped, a slash short: read loosely
        return _masked_loosely(url)
    if "@" in netloc:  # user:password@, or a lone password (redis://secret@host): masked either way
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    if "password=" in query:
        query = "&".join("password=***" if item.startswith("password=") else item for item in query.split("&"))
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing to mask: as it was written (unix:///path keeps its slashes)
    return parts._replace(netloc=netloc, query=query).geturl()


def _masked_loosely(url: str) -> str:
    """``url``, which holds an ``@`` that Python does not read as the end of a ``user:password@`` part (a password with
    an unescaped ``/``, ``?`` or ``#``: the URL's host part ends there; ``redis:/u:p@host``, a slash short), with
    everything between the scheme and its last ``@`` taken for the user and password, the password masked: a URL
    shown because it is refused is often one of these."""
    head, _, rest = url.rpartition("@")
    start = head.find("://")
    start = start + 3 if start >= 0 else head.find(":") + 1  # (after ``scheme:``; none: from the start)
    userinfo = head[start:]
    user, colon, _ = userinfo.partition(":")
    rest = _PASSWORD_PARAMETER.sub(r"\1***", rest)
    return f"{head[:start]}{user}:***@{rest}" if colon else f"{head[:start]}***@{rest}"


#: A ``password=`` query parameter's value.
_PASSWORD_PARAMETER = re.compile(r"(?i)(\bpassword=)[^&#]*")


def _check_template(template: str) -> None:
    name = "LAGO_SUBSCRIPTION_ID_TEMPLATE"
    try:
        parts = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(template)]
    except ValueError as exc:
        raise ConfigurationError(f"{name} is not a valid template ({exc}): {template!r}.", variable=name) from None
    if "${org_id}" in template:  # (a JavaScript template string, or a shell's: the ids would be ``sub_$acme``)
        raise ConfigurationError(
            f"{name} takes the placeholder {{org_id}} without '$' before it (such as sub_{{org_id}}), got "
            f"{template!r}.",
            variable=name,
        )
    fields = [field for field, _, _ in parts if field is not None]
    if any(spec or conversion for field, spec, conversion in parts if field is not None):
        raise ConfigurationError(
            f"{name} takes the plain placeholder {{org_id}}, without a format spec or conversion ({{org_id:d}}, "
            f"{{org_id!r}}): got {template!r}.",
            variable=name,
        )
    if fields != ["org_id"]:
        raise ConfigurationError(
            f"{name} must contain the placeholder {{org_id}} exactly once and no other, got {template!r}.",
            variable=name,
        )
    literal = "".join(text for text, _, _, _ in string.Formatter().parse(template))
    bad = _FORBIDDEN.search(literal)
    sample = template.format(org_id="x")  # (an org id has no blank at either end: only the template's can be)
    if bad or sample != sample.strip():
        shown = repr(bad.group()) if bad else "leading or trailing blanks"
        raise ConfigurationError(
            f"{name} {template!r} has {shown}, which no Lago subscription id can take in a URL path: every org's "
            "subscription would be out of reach (each request a 402). Use letters, digits, '-', '_' or ':' around "
            "{org_id}.",
            variable=name,
        )


def _check_plan_limits(limits: object) -> Mapping[str, Mapping[str, int]]:
    """``limits`` checked; whole numbers written as floats (``300.0``, Helm's ``1e+06``) are read as ints."""
    name = "LAGO_PLAN_LIMITS"
    example = '{"starter": {"max_api_calls": 300, "max_tokens": 100000}}'
    if not isinstance(limits, Mapping):
        raise ConfigurationError(f"{name} must be a JSON object such as {example}.", variable=name)
    converted = False
    for plan, plan_limits in limits.items():
        if not isinstance(plan, str):  # (given in code: Lago's plan codes are strings, an int one matched no plan)
            raise ConfigurationError(
                f"{name} maps plan codes (strings, as Lago's) to their limits: key {_shown(plan)} is a "
                f"{type(plan).__name__}, which no plan's code matches. Expected such as {example}.",
                variable=name,
            )
        if not isinstance(plan_limits, Mapping):
            raise ConfigurationError(
                f"{name} maps each plan code to an object of its limits: {name}[{plan!r}] is "
                f"{_shown(plan_limits)}, not an object of limits. Expected such as {example}.",
                variable=name,
            )
        for limit, value in plan_limits.items():
            if not isinstance(limit, str):  # (the limits' names are strings: QuotaConfig's, Lago's metric codes)
                raise ConfigurationError(
                    f"{name}[{plan!r}] maps limit names (strings such as 'max_api_calls') to whole numbers: key "
                    f"{_shown(limit)} is a {type(limit).__name__}, which no limit's name matches.",
                    variable=name,
                )
            if isinstance(value, float) and value.is_integer():
                converted = True
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(
                    f"{name}[{plan!r}][{limit!r}] must be a whole number >= 0, got {_shown(value)}.", variable=name
                )
    if not converted:
        return limits
    return {plan: {limit: int(value) for limit, value in plan_limits.items()} for plan, plan_limits in limits.items()}
