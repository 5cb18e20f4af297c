"""Seeded random values for every variable ``BillingSettings`` reads, from the environment and given in code.

Each variable has a model written from its documentation (README's Configuration table, the contract, the field
comments and the parsers' docstrings) that decides, for any text, the value it documents or a refusal. Values are
drawn from fixed seeds: each documented form (blanks around, case variants, durations with units, JSON limits nested
and huge), boundaries (0, negative, NaN, inf, 1e309, huge ints, empty, only blanks) and junk (unicode, control
characters, NUL, very long). The oracle: an accepted value is the model's; a refusal is a ``ConfigurationError``
naming the variable and saying what it accepts; never another exception, never a secret in a message. The same value
given in code (``BillingSettings(...)``, ``from_env`` overrides, a ``<NAME>_FILE`` secret file) is accepted or refused
alike. What a seed found is kept at the end as named cases.

Where the model reads "a number" it reads it as Python does (``float``/``int``: ``1_000`` and other scripts' digits
are the same number); everything else is written here from the documentation, not from the parsers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis.asyncio
import redis.asyncio.connection

from lago_org_billing import (
    BillingSettings,
    ConfigurationError,
    EventPipeline,
    LagoAPIError,
    LagoClient,
)
from lago_org_billing._limits import _LARGEST, _Unreadable, limits_from_entitlements, usage_totals
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._spool import SqliteOutbox
from lago_org_billing.testing import FakeLago

SEEDS = (1, 2, 3, 4, 5, 6, 7, 8)  # fixed: a failure names its seed and value, to be kept below as a named case
ROUNDS = 48  # values per variable and seed

# ------------------------------------------------------------------------------------------------- the models


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


@dataclass(frozen=True)
class Ok:
    """The variable is accepted, read as ``value``."""

    value: Any


@dataclass(frozen=True)
class No:
    """The variable is refused; the message matches ``hint`` (what it accepts). ``code``: the same value as code gives
    it (the text read, refused by the check after), to be refused in code too; ``ABSENT`` when the text is no value."""

    hint: str
    code: Any = ABSENT


Verdict = Ok | No
QUOTES = r"quotes"
EMPTY = r"set but empty"
REFERENCE = r"expand"
#: A value written whole in a pair of quotes: docker's ``--env-file`` and compose's lists keep them (README).
_WRAPPED = re.compile(r"\A(['\"]).*\1\Z", re.DOTALL)


def quoted(text: str) -> bool:
    return len(text) >= 2 and _WRAPPED.match(text) is not None


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


#: Durations as Go, systemd and Kubernetes write them (``10s``, ``500ms``, ``1m30s``, ``1h``; ``m`` is minutes), in
#: the spellings systemd.time(7) lists up to hours, any case.
UNITS = {
    **dict.fromkeys(("ms", "msec", "msecs", "millisecond", "milliseconds"), 0.001),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
}
_PART = re.compile(r"[ \t\n\r\f\v]*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)[ \t\n\r\f\v]*([A-Za-z]+)")


def duration(text: str) -> float | None:
    total, position = 0.0, 0
    while position < len(text):
        part = _PART.match(text, position)
        if part is None or part[2].lower() not in UNITS:
            return None
        total += float(part[1]) * UNITS[part[2].lower()]
        position = part.end()
    return total if position else None


def same(value: object, expected: object) -> bool:
    """``value == expected``; floats to their last bits but one (a duration's parts are summed with ``sum()``, which
    Python 3.12 made compensated: ``1.5h 2.3s`` may differ in the last bit from Python to Python)."""
    if isinstance(value, float) and isinstance(expected, float):
        return math.isclose(value, expected, rel_tol=1e-12)
    return value == expected


def same_settings(given: object, settings: BillingSettings) -> bool:
    """Settings alike field by field (see :func:`same`)."""
    return isinstance(given, BillingSettings) and all(
        same(getattr(given, f.name), getattr(settings, f.name)) for f in dataclasses.fields(settings)
    )


def m_seconds(raw: str) -> Verdict:
    """A number of seconds, or a duration with its unit; positive."""
    text = raw.strip()
    if quoted(text):
        return No(QUOTES)
    if not text:
        return No(EMPTY)
    value = number(text)
    if value is None:
        value = duration(text)
    if value is None:
        return No(r"number of seconds")
    if not (math.isfinite(value) and value > 0):
        return No(r"positive number", code=value)
    return Ok(value)


def m_whole(accepts: Callable[[int], bool], hint: str) -> Callable[[str], Verdict]:
    """A whole number (``3.0`` too: templating tools render every number as a float), in the documented range."""

    def model(raw: str) -> Verdict:
        text = raw.strip()
        if quoted(text):
            return No(QUOTES)
        if not text:
            return No(EMPTY)
        try:
            value = int(text)
        except ValueError:
            as_float = number(text)
            if as_float is None or not (math.isfinite(as_float) and as_float.is_integer()):
                return No(r"whole number")
            value = int(as_float)
        return Ok(value) if accepts(value) else No(hint, code=value)

    return model


#: The spellings of a switch: true/false, yes/no, on/off, 1/0, enabled/disabled (and their one-letter and verb forms).
TRUE = ("1", "true", "t", "yes", "y", "on", "enabled", "enable")
FALSE = ("0", "false", "f", "no", "n", "off", "disabled", "disable")


def m_switch(raw: str) -> Verdict:
    text = raw.strip()
    if quoted(text):
        return No(QUOTES)
    if not text:
        return No(EMPTY)
    if text.lower() in TRUE:
        return Ok(True)
    if text.lower() in FALSE:
        return Ok(False)
    return No(r"true or false")


def m_choice(*choices: str) -> Callable[[str], Verdict]:
    def model(raw: str) -> Verdict:
        text = raw.strip()
        if quoted(text):
            return No(QUOTES, code=text)
        value = text.lower()
        return Ok(value) if value in choices else No(re.escape(choices[0]), code=value)

    return model


#: ``$NAME`` or ``${NAME}`` that nothing expanded (docker ``--env-file``, systemd): never part of a Lago key or id.
_REFERENCE_ANYWHERE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_]\w*")


def m_api_key(raw: str) -> Verdict:
    """Lago's key (a UUID): alone, no ``Bearer``, no blank inside, printable ASCII."""
    text = raw.strip()
    if quoted(text):
        return No(QUOTES, code=text)
    if _REFERENCE_ANYWHERE.search(text):
        return No(REFERENCE, code=text)
    if re.match(r"(?i)(authorization\s*:\s*)?bearer\s", text):
        return No(r"Bearer", code=text)
    if any(char.isspace() for char in text) or not (text.isascii() and text.isprintable()):
        return No(r"key", code=text)
    return Ok(text)


def m_hmac_key(raw: str) -> Verdict:
    """Lago's HMAC key: its bytes may be anything; only blanks around are dropped; empty is unset (JWT mode)."""
    text = raw.strip()
    if quoted(text):
        return No(QUOTES, code=text)
    if re.fullmatch(r"\$\{[^}]*\}|\$[A-Za-z_]\w*", text):
        return No(REFERENCE, code=text)
    return Ok(text or None)


def m_organization_id(raw: str) -> Verdict:
    """Lago's organization id (a UUID), compared with each webhook's: any other text refuses every webhook, saying
    so, so the model takes any text but quotes and references; empty is unset."""
    text = raw.strip()
    if quoted(text):
        return No(QUOTES, code=text)
    if _REFERENCE_ANYWHERE.search(text):
        return No(REFERENCE, code=text)
    return Ok(text or None)


def m_event_code(raw: str) -> Verdict:
    """A billable metric's code: not empty, printable (a line break or control character reaches Lago as part of the
    code, which no metric has: every event kept and never billed)."""
    text = raw.strip()
    if quoted(text):
        return No(QUOTES, code=text)
    if not text:
        return No(r"empty", code=text)
    if not text.isprintable():
        return No(r"code", code=text)
    return Ok(text)


#: What no id can take in a URL path (``_ids``: Rails splits at ``.``; ``/?#%\`` and control characters).
_NOT_IN_IDS = set("./?#%\\") | {chr(code) for code in range(0x20)} | {"\x7f"}


def m_template(raw: str) -> Verdict:
    """``{org_id}`` exactly once, plain, nothing else in braces (``{{``/``}}`` are literal braces), and around it what
    a subscription id can hold in a URL path."""
    text = raw.strip()
    hint = r"org_id|template"
    if quoted(text):
        return No(QUOTES, code=text)
    literal, placeholders, position = [], 0, 0
    while position < len(text):
        if text.startswith(("{{", "}}"), position):
            literal.append(text[position])
            position += 2
        elif text.startswith("{org_id}", position):
            placeholders += 1
            position += len("{org_id}")
        elif text[position] in "{}":
            return No(hint, code=text)
        else:
            literal.append(text[position])
            position += 1
    if placeholders != 1 or "${org_id}" in text or _NOT_IN_IDS & set(literal):
        return No(hint, code=text)
    return Ok(text)


_TOKEN = set(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")  # RFC 9110 tchar
_SWITCHES = {"1", "0", "true", "false", "yes", "no", "on", "off", "y", "n", "enabled", "disabled"}
#: What None reads as once made text (str(None), JSON's null): a header name nobody meant, refused as a switch is
#: (apart from _SWITCHES, which the generator draws from: the seeds keep drawing what they drew).
_NULLS = {"none", "null"}


def m_header(raw: str) -> Verdict:
    """A request header's name as clients send it (an RFC 9110 token), not a switch, ``None`` made text nor a WSGI
    ``HTTP_`` name; empty is unset (off)."""
    text = raw.strip()
    if quoted(text):
        return No(QUOTES, code=text)
    if not text:
        return Ok(None)
    if not set(text) <= _TOKEN or text.lower() in _SWITCHES | _NULLS or text[:5].upper() == "HTTP_":
        return No(r"header", code=text)
    return Ok(text)


def m_exclude_paths(raw: str) -> Verdict:
    """Comma-separated path prefixes (blanks around each, and empty entries, dropped): each starts with ``/``, is not
    ``/`` alone, holds no pattern (``*``, ``?``) nor a second prefix after a blank or ``;``."""
    text = raw.strip()
    if quoted(text):
        return No(QUOTES)
    prefixes = tuple(part.strip() for part in text.split(",") if part.strip())
    for prefix in prefixes:
        if (
            not prefix.startswith("/")
            or not prefix.strip("/")
            or "*" in prefix
            or "?" in prefix
            or re.search(r"[\s;]/", prefix)
        ):
            return No(r"'/'|prefix|every request|commas", code=prefixes)
    return Ok(prefixes)


def m_spool_path(raw: str) -> Verdict:
    """A file path, ``~`` expanded; not ``:memory:`` nor a directory (ending with ``/``), no ``${NAME}`` nor
    ``$NAME`` directory left unexpanded, no NUL (no file can be named so); empty is unset (memory)."""
    text = raw.strip()
    if quoted(text):
        return No(QUOTES, code=text)
    if not text:
        return Ok(None)
    if text == ":memory:":
        return No(r"memory", code=text)
    if re.search(r"\$\{\w+(:?[-=?+][^}]*)?\}", text) or any(
        re.fullmatch(r"\$[A-Za-z_]\w*", segment) for segment in text.split("/")
    ):
        return No(REFERENCE, code=text)
    if "\x00" in text:
        return No(r"file", code=text)
    if text.endswith("/"):  # a directory, where the spool's file is meant
        return No(r"names a directory", code=text)
    return Ok(os.path.expanduser(text))


def m_redis_url(raw: str) -> Verdict:
    """``redis://``/``rediss://`` (``//`` after the scheme, a port from 1 to 65535, a database number alone as the
    path) or ``unix:`` with a socket path. Empty is unset. Its query is redis-py's to read (the settings do not: see
    ``_webhooks._redis_from_url``)."""
    text = raw.strip()
    if quoted(text):
        return No(QUOTES, code=text)
    if not text:
        return Ok(None)
    refused = No(r"redis://", code=text)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return refused
    if parts.scheme in ("redis", "rediss"):
        if text[len(parts.scheme) : len(parts.scheme) + 3] != "://" or port == 0:
            return refused
        if not re.fullmatch(r"/?[0-9]*", parts.path):
            return refused
    elif parts.scheme != "unix" or not parts.path:
        return refused
    return Ok(text)


def m_api_url(raw: str) -> Verdict:
    """Lago's base URL: http(s) with its scheme and a host, no query nor fragment, a port from 1 to 65535, no blank
    nor control character; a trailing ``/api/v1`` (any case) and trailing slashes dropped; an endpoint's URL
    refused; a URL httpx can call."""
    text = raw.strip()
    hint = r"URL"
    if quoted(text):
        return No(QUOTES, code=text)
    url = text.rstrip("/?#")
    if not url:
        return No(EMPTY, code=text)
    if "://" not in url and not url.lower().startswith(("http:", "https:")):
        return No(hint, code=text)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return No(hint, code=text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment or port == 0:
        return No(hint, code=text)
    if any(char.isspace() or not char.isprintable() for char in url):
        return No(hint, code=text)
    if parts.path[-7:].lower() == "/api/v1":
        url = url[:-7].rstrip("/")
    elif re.search(r"(?i)/api/v1/", parts.path):
        return No(hint, code=text)
    try:
        httpx.URL(url)
    except httpx.InvalidURL:
        return No(hint, code=text)
    return Ok(url)


class _Twice(ValueError):
    pass


def _no_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({key for key, _ in pairs}) != len(pairs):
        raise _Twice
    return dict(pairs)


def m_plan_limits(raw: str) -> Verdict:
    """JSON: an object of plan codes, each an object of whole numbers >= 0 (``300.0`` and ``1e+06`` are whole); a key
    written twice in one object refused; empty is no limits."""
    hint = r"JSON|whole number|object"
    text = raw.strip()
    if quoted(text):
        return No(QUOTES)
    text = text.removeprefix("\ufeff")
    if not text.strip():
        return Ok({})
    try:
        limits = json.loads(text, object_pairs_hook=_no_twice)
    except (ValueError, RecursionError):  # (invalid JSON, a key twice, 4,300 digits and more, nested too deep)
        return No(hint)
    if not isinstance(limits, dict) or not all(isinstance(plan, dict) for plan in limits.values()):
        return No(hint, code=limits)
    read: dict[str, dict[str, int]] = {}
    for plan, table in limits.items():
        read[plan] = {}
        for name, value in table.items():
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                return No(hint, code=limits)
            read[plan][name] = value
    return Ok(read)


@dataclass(frozen=True)
class Variable:
    name: str
    field: str
    model: Callable[[str], Verdict]
    generate: Callable[[random.Random], str]
    #: Whether the value is a secret, never to be shown in a message.
    secret: bool = False


# ------------------------------------------------------------------------------------------------- generators

BLANKS = ("", "", " ", "  ", "\t", "\n", "\r\n", " \t ", "\u00a0", "\u2003", "\x1f")
JUNK_CHARS = (
    "\x00\x01\x07\x08\x0b\x0c\x1b\x7f\x85\u00a0\u200b\u2028\ufeff\u202e\ud800\udcff"
    "\u00e9\u00df\u0130\u0131\u017f\u212a\u4e2d\U0001f600\u0301" + string.printable
)


def blanks(rng: random.Random, text: str) -> str:
    return rng.choice(BLANKS) + text + rng.choice(BLANKS)


def case(rng: random.Random, text: str) -> str:
    return rng.choice((text, text.upper(), text.capitalize(), "".join(rng.choice((c, c.upper())) for c in text)))


def junk(rng: random.Random, around: str = "") -> str:
    """Unicode, control characters, NUL, very long; or ``around`` with such a character put inside."""
    kind = rng.randrange(6)
    if kind == 0:
        return "".join(rng.choices(JUNK_CHARS, k=rng.randint(0, 12)))
    if kind == 1:
        return rng.choice(JUNK_CHARS) * rng.randint(1_000, 20_000)
    if kind == 2:
        return "".join(rng.choices(JUNK_CHARS, k=rng.randint(2_000, 5_000)))
    if kind == 3 and around:
        at = rng.randint(0, len(around))
        return around[:at] + rng.choice(JUNK_CHARS) + around[at:]
    if kind == 4:
        return rng.choice(("", " ", "   ", "\t\n", "\x00", "''", '""', "'", '"', "${X}", "$X", "None", "null"))
    return "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 30)))


def one_of(rng: random.Random, *makers: Callable[[], str]) -> str:
    return rng.choice(makers)()


def numbers(rng: random.Random) -> str:
    value = rng.choice((rng.uniform(0.001, 5), rng.uniform(1, 1e6), float(rng.randint(1, 10**6))))
    return rng.choice(
        (
            repr(value),
            f"{value:.3f}",
            f"{value:e}",
            f"+{value:g}",
            str(int(value)) if value >= 1 else ".5",
            f"{int(value)}." if value >= 1 else "0.25",
        )
    )


def durations(rng: random.Random) -> str:
    parts = []
    for unit_seconds in sorted(set(UNITS.values()), reverse=True):
        if rng.random() < 0.5:
            unit = rng.choice([name for name, seconds in UNITS.items() if seconds == unit_seconds])
            amount = rng.choice((str(rng.randint(0, 90)), f"{rng.uniform(0, 90):.2f}", f".{rng.randint(1, 9)}"))
            parts.append(amount + rng.choice(("", "", " ")) + case(rng, unit))
    return rng.choice(("", " ")).join(parts) or "10s"


BOUNDARIES = (
    "0", "-0", "0.0", "-1", "-0.5", "1e-400", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e309", "-1e309",
    "9" * 400, "1" + "0" * 5000, "", " ", "   ", "\t", "0s", "0ms", "-5s", "5", "1_000", "٣", "1e3s", "10 s", "1.5.2",
    "1s1\u017f", "1hr\u017f", "1 m 30 s", "1d", "1w", "10us", "PT10S", "0x10", "1,5", "10sec ", "10 seconds",
)  # fmt: skip


def g_seconds(rng: random.Random) -> str:
    return blanks(
        rng,
        one_of(
            rng,
            lambda: numbers(rng),
            lambda: durations(rng),
            lambda: rng.choice(BOUNDARIES),
            lambda: junk(rng, numbers(rng)),
        ),
    )


def g_whole(low: int, high: int) -> Callable[[random.Random], str]:
    def generate(rng: random.Random) -> str:
        value = rng.randint(low - 2, high + 2)
        return blanks(
            rng,
            one_of(
                rng,
                lambda: str(value),
                lambda: f"+{value}",
                lambda: f"{value}.0",
                lambda: f"{value}e0",
                lambda: f"{value}.5",
                lambda: rng.choice(BOUNDARIES),
                lambda: str(rng.choice((10**30, -(10**30), 2**63, 2**64 + low))),
                lambda: junk(rng, str(value)),
            ),
        )

    return generate


def g_switch(rng: random.Random) -> str:
    return blanks(
        rng,
        one_of(
            rng,
            lambda: case(rng, rng.choice(TRUE + FALSE)),
            lambda: rng.choice(("2", "-1", "truee", "ye", "yes please", "0.0", "1.0", "nil", "null", "none", "")),
            lambda: junk(rng, rng.choice(TRUE + FALSE)),
        ),
    )


def g_choice(*choices: str) -> Callable[[random.Random], str]:
    def generate(rng: random.Random) -> str:
        return blanks(
            rng,
            one_of(
                rng,
                lambda: case(rng, rng.choice(choices)),
                lambda: rng.choice(choices) + rng.choice(("s", "d", "_", "-", ",")),
                lambda: junk(rng, rng.choice(choices)),
            ),
        )

    return generate


def uuid_like(rng: random.Random) -> str:
    return "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4, 4, 12))


def g_api_key(rng: random.Random) -> str:
    key = uuid_like(rng)
    return blanks(
        rng,
        one_of(
            rng,
            lambda: key,
            lambda: rng.choice(("Bearer ", "bearer ", "Authorization: Bearer ")) + key,
            lambda: f"{key} {uuid_like(rng)}",
            lambda: rng.choice(("\u201c", "\u2018", "\u200b", "\ufeff")) + key,
            lambda: rng.choice(("'", '"')) + key + rng.choice(("'", '"')),
            lambda: rng.choice(("${LAGO_KEY}", "$LAGO_KEY", f"{key}$Rest", f"pre${{X}}{key}")),
            lambda: junk(rng, key),
        ),
    )


def g_hmac_key(rng: random.Random) -> str:
    key = "".join(rng.choice(string.ascii_letters + string.digits + "$#%/+= '\"") for _ in range(rng.randint(8, 40)))
    return blanks(
        rng,
        one_of(
            rng,
            lambda: key,
            lambda: rng.choice(("'", '"')) + key + rng.choice(("'", '"')),
            lambda: rng.choice(("${HMAC}", "$HMAC", " ${HMAC:-x} ")),
            lambda: junk(rng, key),
        ),
    )


def g_text(*valid: Callable[[random.Random], str]) -> Callable[[random.Random], str]:
    def generate(rng: random.Random) -> str:
        made = rng.choice(valid)(rng)
        return blanks(
            rng,
            one_of(
                rng,
                lambda: made,
                lambda: rng.choice(("'", '"')) + made + rng.choice(("'", '"')),
                lambda: junk(rng, made),
            ),
        )

    return generate


def word(rng: random.Random, alphabet: str = string.ascii_letters + string.digits + "_-", high: int = 12) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, high)))


def event_codes(rng: random.Random) -> str:
    return rng.choice((word(rng), "api_call", f"{word(rng)} {word(rng)}", f"{word(rng)}\n{word(rng)}", "ÿ" + word(rng)))


def templates(rng: random.Random) -> str:
    around = string.ascii_letters + string.digits + "_-:"
    return rng.choice(
        (
            f"{word(rng, around)}{{org_id}}{word(rng, around)}",
            "{org_id}",
            f"sub_{{org_id}}{rng.choice(('', '{{x}}', '{{', '}}'))}",
            f"{word(rng, around)}{rng.choice('./?#%{}$ ')}{{org_id}}",
            rng.choice(("{org_id}{org_id}", "{}", "{0}", "{org}", "{org_id:d}", "{org_id!r}", "{ org_id}")),
            rng.choice(("sub_${org_id}", "{org_id", "org_id}", "{{org_id}}", "{{{org_id}}}", "{org_id[0]}")),
            rng.choice(("", "sub_", "{org_id.x}", "{org_id}\t_x", "x\x00{org_id}", "{org_id}é")),
        )
    )


def headers(rng: random.Random) -> str:
    return rng.choice(
        (
            "X-" + word(rng, string.ascii_letters + string.digits + "-"),
            case(rng, "x-org-id"),
            case(rng, rng.choice(sorted(_SWITCHES))),
            "HTTP_X_ORG_ID",
            "http_x_user",
            "X Org",
            "X-Org:",
            "X-Örg",
            "X-Org-Id\x00",
            "",
            word(rng, "".join(sorted(_TOKEN)), 30),
        )
    )


def path_prefix(rng: random.Random) -> str:
    return "/" + "/".join(word(rng) for _ in range(rng.randint(1, 3))) + rng.choice(("", "", "/"))


def exclude_lists(rng: random.Random) -> str:
    entries = [rng.choice(BLANKS[:6]) + path_prefix(rng) + rng.choice(BLANKS[:6]) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:
        entries.insert(rng.randint(0, len(entries)), rng.choice(("", " ")))
    if rng.random() < 0.4:
        entries.insert(
            rng.randint(0, len(entries)),
            rng.choice(("health", "/", "//", "/*", "/a?b", "/a /b", "/a;/b", "/a\t/b", "*", "/v1/*/x", "/a b")),
        )
    return ",".join(entries)


def spool_paths(rng: random.Random) -> str:
    return rng.choice(
        (
            f"/var/lib/{word(rng)}/spool.db",
            f"{word(rng)}.db",
            f"~/{word(rng)}/spool.db",
            "~",
            ":memory:",
            " :memory: ",
            "${HOME}/spool.db",
            "$STATE_DIRECTORY/spool.db",
            "/data/$x-not-a-reference.db",
            f"/data/{word(rng)}\x00.db",
            f"/data/{word(rng)} {word(rng)}.db",
            f"/data/é{word(rng)}#1.db",
            "",
        )
    )


def redis_urls(rng: random.Random) -> str:
    host = rng.choice(("localhost", "redis", "10.0.0.5", "[::1]", "redis.internal", "", "red is", "redis_1"))
    password = "pw" + word(rng, string.ascii_letters + string.digits, 16)
    userinfo = rng.choice(("", "", f":{password}@", f"default:{password}@", f"{password}@"))
    port = rng.choice(("", "", ":6379", ":0", ":65535", ":65536", ":-1", ":abc", ":", ":٦٣٧٩", f":{rng.randint(1, 9)}"))
    path = rng.choice(("", "", "/", "/0", "/15", "/abc", "/0/1", "/-1", "/٣"))
    query = rng.choice(("", "", "?db=3", "?db=x", "?socket_timeout=5", "?socket_timeout=5s", f"?password={password}"))
    scheme = rng.choice(("redis://", "rediss://", "REDIS://", "redis:", "redis:/", "http://", "unix://", "unix:", ""))
    if scheme.startswith("unix"):
        return scheme + rng.choice(("/var/run/redis.sock", "", "/tmp/r.sock?db=1", "/tmp/r.sock?db=z"))
    return scheme + userinfo + host + port + path + query


def api_urls(rng: random.Random) -> str:
    host = rng.choice(
        ("lago", "localhost", "api.getlago.com", "10.0.0.7", "[::1]", "lago-api.svc.cluster.local", "", "la go",
         "lagö", "lago_中", "xn--lg-via", "a" * 70, "api.getlago.com.", "[::1", "例え.jp")
    )  # fmt: skip
    scheme = rng.choice(("http://", "https://", "HTTP://", "Https://", "", "ftp://", "ws://", "http:", "http:/", "//"))
    userinfo = rng.choice(("", "", "", f"user:pw{word(rng, string.ascii_letters, 16)}@"))
    port = rng.choice(("", "", ":3000", ":0", ":65535", ":65536", ":x", ":"))
    path = rng.choice(("", "", "/", "//", "/lago", "/api/v1", "/API/V1/", "/api/v1/events", "/lago/api/v1", "/?", "#"))
    extra = rng.choice(("", "", "", "?a=1", "#top", " ", "\n", "\t/x", "\x00"))
    return scheme + userinfo + host + port + path + extra


def limits_json(rng: random.Random) -> str:
    def value() -> Any:
        return rng.choice(
            (
                rng.randint(0, 10**6),
                10**30,
                2**53 - 1,
                2**64,
                float(rng.randint(0, 10**6)),
                1e6,
                1e300,
                -0.0,
                -1,
                300.5,
                "300",
                True,
                None,
                [1],
                {"x": 1},
            )
        )

    plans = {
        word(rng): {rng.choice(("max_api_calls", "max_tokens")): value() for _ in range(rng.randint(0, 2))}
        for _ in range(rng.randint(0, 3))
    }
    text = json.dumps(plans, indent=rng.choice((None, 2)))
    return rng.choice(
        (
            text,
            text.replace("1e+300", "1e309").replace("300.5", rng.choice(("NaN", "Infinity", "-Infinity", "1e309"))),
            "\ufeff" + text,
            text.replace("\n", "\r\n"),
            text.replace('"', "'"),
            '{"a": {"max_api_calls": 1}, "a": {}}',
            '{"a": {"max_api_calls": 1, "max_api_calls": 2}}',
            "[" * rng.choice((10, 100_000)) + "]" * 10,
            '{"a": {"max_api_calls": ' + "9" * rng.choice((20, 5_000)) + "}}",
            '{"a": {"max_api_calls": 1e3}}',
            '{"a": {"max_api_calls": 1.5e3}}',
            "{}",
            "[]",
            "null",
            "300",
            '{"a": 1}',
            '{"a": {"max_api_calls": 3}',
            "",
            "  ",
        )
    )


VARIABLES = (
    Variable("LAGO_API_KEY", "api_key", m_api_key, g_api_key, secret=True),
    Variable("LAGO_API_URL", "api_url", m_api_url, g_text(api_urls)),
    Variable("LAGO_API_TIMEOUT", "api_timeout", m_seconds, g_seconds),
    Variable("LAGO_MAX_RETRIES", "max_retries", m_whole(lambda n: 0 <= n <= 20, r"0 to 20"), g_whole(0, 20)),
    Variable("LAGO_RETRY_DEADLINE", "retry_deadline", m_seconds, g_seconds),
    Variable("LAGO_RETRY_BACKOFF", "retry_backoff", m_seconds, g_seconds),
    Variable("LAGO_EVENT_CODE", "event_code", m_event_code, g_text(event_codes)),
    Variable("LAGO_SUBSCRIPTION_ID_TEMPLATE", "subscription_id_template", m_template, g_text(templates)),
    Variable("LAGO_ORG_HEADER", "org_header", m_header, g_text(headers)),
    Variable("LAGO_USER_HEADER", "user_header", m_header, g_text(headers)),
    Variable("LAGO_EXCLUDE_PATHS", "exclude_paths", m_exclude_paths, g_text(exclude_lists)),
    Variable("LAGO_SPOOL_PATH", "spool_path", m_spool_path, g_text(spool_paths)),
    Variable("LAGO_REDIS_URL", "redis_url", m_redis_url, g_text(redis_urls)),
    Variable("LAGO_QUOTA_MODE", "quota_mode", m_choice("enforce", "monitor", "off"),
             g_choice("enforce", "monitor", "off")),
    Variable("LAGO_FAIL_OPEN", "fail_open", m_switch, g_switch),
    Variable("LAGO_USAGE_CACHE_TTL", "usage_cache_ttl", m_seconds, g_seconds),
    Variable("LAGO_PLAN_LIMITS", "plan_limits", m_plan_limits, g_text(limits_json)),
    Variable("LAGO_WEBHOOK_HMAC_KEY", "webhook_hmac_key", m_hmac_key, g_hmac_key, secret=True),
    Variable("LAGO_ORGANIZATION_ID", "organization_id", m_organization_id, g_text(uuid_like)),
    Variable("LAGO_METRICS", "metrics", m_switch, g_switch),
    Variable("LAGO_BILL_SERVER_ERRORS", "bill_server_errors", m_switch, g_switch),
    Variable("LAGO_BILL_AUTH_FAILURES", "bill_auth_failures", m_switch, g_switch),
    Variable("LAGO_ON_UNRESOLVED", "on_unresolved", m_choice("allow", "reject"), g_choice("allow", "reject")),
    Variable("LAGO_UNRESOLVED_STATUS", "unresolved_status", m_whole(lambda n: n in (401, 403), r"401 or 403"),
             g_whole(400, 404)),
)  # fmt: skip
BY_NAME = {variable.name: variable for variable in VARIABLES}

# ------------------------------------------------------------------------------------------------- the oracle

#: Present in every environment tried: no message may show them, whichever variable it is about.
BYSTANDER_KEY = "0f3c2a55-8d1e-4b7a-9c6e-2b5d7e9a1c44"
BYSTANDER_HMAC = "hmac-bystander-9q8w7e6r5t4y"


def env_of(variable: Variable, raw: str) -> dict[str, str]:
    environ = {"LAGO_API_KEY": BYSTANDER_KEY, "LAGO_WEBHOOK_HMAC_KEY": BYSTANDER_HMAC}
    environ[variable.name] = raw
    return environ


@functools.lru_cache(maxsize=64)
def secret_parts(secret: str) -> tuple[str, ...]:
    """The pieces of a secret no message may hold: its windows of 8 characters holding a digit and a letter (the
    words of a message, ``Authorization``, are no secret), none when it is only a reference to another variable."""
    text = secret.strip()
    if re.fullmatch(r"\$\{[^}]*\}|\$[A-Za-z_]\w*", text):
        return ()
    windows = (text[start : start + 8] for start in range(max(0, len(text) - 7)))
    return tuple(
        window
        for window in windows
        if any(char.isdigit() for char in window) and any(char.isalpha() for char in window)
    )


def read(environ: dict[str, str], **overrides: Any) -> BillingSettings | ConfigurationError:
    try:
        return BillingSettings.from_env(None, environ=environ, require_api_key=False, **overrides)
    except ConfigurationError as exc:
        return exc


def made(**fields: Any) -> BillingSettings | ConfigurationError:
    try:
        return BillingSettings(**fields)
    except ConfigurationError as exc:
        return exc


def assert_refusal(outcome: object, variable: Variable, hint: str, shown: str, secrets: tuple[str, ...]) -> None:
    assert isinstance(outcome, ConfigurationError), f"{shown}: accepted as {outcome!r}, the model refuses ({hint})"
    message = str(outcome)
    assert outcome.variable == variable.name and variable.name in message, f"{shown}: {message!r}"
    assert re.search(hint, message, re.IGNORECASE), f"{shown}: {message!r} does not say what is accepted ({hint})"
    for secret in secrets:
        for part in secret_parts(secret):
            assert part not in message, f"{shown}: the message shows a secret: {message!r}"


def check(variable: Variable, raw: str, shown: str) -> Verdict:
    """``raw`` read from the environment as the model says, and the same value given in code alike."""
    expected = variable.model(raw)
    secrets = (BYSTANDER_KEY, BYSTANDER_HMAC, raw) if variable.secret else (BYSTANDER_KEY, BYSTANDER_HMAC)
    secrets += tuple(re.findall(r"pw[A-Za-z0-9]{16}", raw))  # (the passwords of URLs: masked)
    outcome = read(env_of(variable, raw))
    if isinstance(expected, No):
        assert_refusal(outcome, variable, expected.hint, shown, secrets)
        if expected.code is not ABSENT:
            by_code = made(**{variable.field: expected.code})
            assert_refusal(by_code, variable, r".", f"{shown} given in code", secrets)
            overridden = read({}, **{variable.field: expected.code})
            assert_refusal(overridden, variable, r".", f"{shown} given as an override", secrets)
        return expected
    assert isinstance(outcome, BillingSettings), f"{shown}: refused ({outcome}), the model reads {expected.value!r}"
    value = getattr(outcome, variable.field)
    assert same(value, expected.value) and type(value) is type(expected.value), f"{shown}: read as {value!r}"
    for by_code in (made(**{variable.field: expected.value}), read({}, **{variable.field: expected.value})):
        assert isinstance(by_code, BillingSettings), f"{shown}: given in code, refused: {by_code}"
        assert same(getattr(by_code, variable.field), expected.value), f"{shown}: given in code, read otherwise"
    return expected


def draws(variable: Variable) -> Iterator[tuple[str, str]]:
    for seed in SEEDS:
        rng = random.Random(f"{variable.name}/{seed}")
        for round_ in range(ROUNDS):
            raw = variable.generate(rng)
            yield raw, f"seed {seed} round {round_}: {variable.name}={raw[:200]!r}" + ("..." if len(raw) > 200 else "")


# ------------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("variable", VARIABLES, ids=[variable.name for variable in VARIABLES])
def test_each_variable_reads_as_its_model_says_from_the_environment_and_from_code(variable: Variable) -> None:
    """Every variable ``from_env`` reads, over seeded values of each documented form, boundaries and junk: the
    model's value or a ``ConfigurationError`` naming it and saying what it takes (never another exception, never a
    secret shown); the same value given in code, or as a ``from_env`` override, accepted or refused alike."""
    verdicts = [check(variable, raw, shown) for raw, shown in draws(variable)]
    # (the generators reach both sides of every model: a model that refuses everything proves nothing)
    assert any(isinstance(verdict, Ok) for verdict in verdicts) and any(isinstance(v, No) for v in verdicts)


@pytest.mark.parametrize("variable", VARIABLES, ids=[variable.name for variable in VARIABLES])
def test_a_secret_file_reads_as_the_variable_itself(variable: Variable, tmp_path: Path) -> None:
    """``<NAME>_FILE`` (Docker and Kubernetes secrets) is read as ``<NAME>`` set to the file's text: the same values
    accepted, as the same settings, and the same refused (a blank file is refused for itself: not compared)."""
    for index, (raw, shown) in enumerate(draws(variable)):
        if index % 4 or not raw.strip() or "\r" in raw or raw.startswith("\ufeff"):
            continue  # (a quarter of the values; a file's line ends are read as \n, and its byte-order mark dropped)
        try:
            data = raw.encode()
        except UnicodeEncodeError:
            continue  # (a lone surrogate, which an environment may hold and no UTF-8 file)
        path = tmp_path / f"secret{index}"
        path.write_bytes(data)
        environ = env_of(variable, raw)
        direct = read(environ)
        del environ[variable.name]  # (a bystander key of the same name included: the file gives it)
        from_file = read({**environ, variable.name + "_FILE": str(path)})
        if isinstance(direct, ConfigurationError):
            assert isinstance(from_file, ConfigurationError), f"{shown}: refused set, accepted from a file"
            assert from_file.variable == variable.name, f"{shown}: {from_file}"
        else:
            assert isinstance(from_file, BillingSettings), f"{shown}: accepted set, refused from a file: {from_file}"
            assert getattr(from_file, variable.field) == getattr(direct, variable.field), shown


def accepted_value(variable: Variable, rng: random.Random) -> tuple[str, Any]:
    """A value of ``variable`` its model accepts (drawn until one comes), and what it reads as."""
    for _ in range(400):
        raw = variable.generate(rng)
        verdict = variable.model(raw)
        if isinstance(verdict, Ok):
            return raw, verdict.value
    raise AssertionError(f"no accepted value of {variable.name} in 400 draws")


def refused_value(variable: Variable, rng: random.Random) -> str:
    for _ in range(400):
        raw = variable.generate(rng)
        if isinstance(variable.model(raw), No):
            return raw
    raise AssertionError(f"no refused value of {variable.name} in 400 draws")


DEFAULTS = BillingSettings()


@pytest.mark.parametrize("seed", SEEDS)
def test_random_environments_read_each_variable_as_it_reads_alone(seed: int) -> None:
    """Several variables together (mode and fail-open, spool and Redis, the timeout and the deadline, ...): each
    read as alone, the others at their defaults, a deadline left unset following the timeout (at least 30 s, never
    shorter than LAGO_API_TIMEOUT); the same values given in code, or some as ``from_env`` overrides, give equal
    settings."""
    rng = random.Random(f"environment/{seed}")
    for _ in range(25):
        chosen = rng.sample(VARIABLES, rng.randint(1, len(VARIABLES)))
        environ: dict[str, str] = {}
        fields: dict[str, Any] = {}
        for variable in chosen:
            environ[variable.name], fields[variable.field] = accepted_value(variable, rng)
        shown = f"seed {seed}: {environ!r}"[:2000]
        settings = read(environ)
        assert isinstance(settings, BillingSettings), f"{shown}: {settings}"
        for variable in VARIABLES:
            value = getattr(settings, variable.field)
            if variable.field in fields:
                assert same(value, fields[variable.field]), f"{shown}: {variable.name} read as {value!r}"
            elif variable.field == "retry_deadline":
                assert value == max(30.0, settings.api_timeout), f"{shown}: default deadline {value!r}"
            else:
                assert value == getattr(DEFAULTS, variable.field), f"{shown}: {variable.name} unset, {value!r}"
        assert same_settings(made(**fields), settings), shown
        overridden = set(rng.sample(sorted(fields), rng.randint(0, len(fields))))
        rest = {name: raw for name, raw in environ.items() if BY_NAME[name].field not in overridden}
        assert same_settings(read(rest, **{field: fields[field] for field in overridden}), settings), shown


@pytest.mark.parametrize("seed", SEEDS)
def test_one_refused_variable_among_accepted_ones_is_the_one_named(seed: int) -> None:
    """A refused value among accepted ones: the error names that variable, not another (and refusals of several at
    once name one of them)."""
    rng = random.Random(f"refused/{seed}")
    for _ in range(25):
        chosen = rng.sample(VARIABLES, rng.randint(1, 8))
        environ = {variable.name: accepted_value(variable, rng)[0] for variable in chosen}
        wrong = rng.sample(chosen, rng.choice((1, 1, 1, 2, 3)) if len(chosen) > 3 else 1)
        for variable in wrong:
            environ[variable.name] = refused_value(variable, rng)
        outcome = read(environ)
        shown = f"seed {seed}: {environ!r}"[:2000]
        assert isinstance(outcome, ConfigurationError), f"{shown}: accepted"
        assert outcome.variable in {variable.name for variable in wrong}, f"{shown}: names {outcome.variable}"


@pytest.mark.anyio
@pytest.mark.parametrize("seed", SEEDS[:3])
async def test_accepted_settings_build_the_client_the_gate_and_the_pipeline(seed: int, tmp_path: Path) -> None:
    """What the settings accept is usable: a LagoClient is made for the URL, the quota gate for the mode, fail-open,
    Redis URL and limits (its own check of limit names aside), the event pipeline with a spool file when
    LAGO_SPOOL_PATH is set and in memory otherwise. Nothing is called."""
    rng = random.Random(f"usable/{seed}")
    fake = FakeLago(api_key=BYSTANDER_KEY)
    for round_ in range(6):
        environ = {"LAGO_API_KEY": BYSTANDER_KEY}
        for name in ("LAGO_API_URL", "LAGO_QUOTA_MODE", "LAGO_FAIL_OPEN", "LAGO_REDIS_URL", "LAGO_PLAN_LIMITS"):
            environ[name] = accepted_value(BY_NAME[name], rng)[0]
        if rng.random() < 0.5:
            environ["LAGO_SPOOL_PATH"] = str(tmp_path / f"{seed}-{round_}" / "spool.db")
        settings = BillingSettings.from_env(None, environ=environ)
        shown = f"seed {seed}: {environ!r}"[:2000]
        async with LagoClient(settings, transport=fake.transport()) as client:
            if settings.redis_url is not None and not redis_reads(settings.redis_url):
                continue  # (redis-py refuses its query: the gate says so, see the test of it below)
            try:
                gate = QuotaGate(settings, client, config=QuotaConfig())
            except ConfigurationError as exc:
                assert exc.variable == "LAGO_PLAN_LIMITS" and "no quota reads" in str(exc), f"{shown}: {exc}"
            else:
                assert gate.mode == settings.quota_mode, shown
                await gate.aclose()
            pipeline = EventPipeline(client, spool_path=settings.spool_path)
            assert isinstance(pipeline.outbox, SqliteOutbox) == (settings.spool_path is not None), shown


def redis_reads(url: str) -> bool:
    try:
        redis.asyncio.connection.parse_url(url)  # (the package's clients are redis.asyncio's)
    except ValueError:
        return False
    return True


def number_given_in_code(rng: random.Random) -> Any:
    return rng.choice(
        (
            rng.uniform(0.001, 1e6),
            rng.randint(1, 10**6),
            10 ** rng.randint(300, 5_000),
            -(10 ** rng.randint(300, 400)),
            0,
            -1,
            0.0,
            math.nan,
            math.inf,
            -math.inf,
            True,
            False,
            "10",
            "10s",
            None,
            Decimal("10"),
            Fraction(1, 2),
            [10],
        )
    )


@pytest.mark.parametrize("field", ["api_timeout", "retry_deadline", "retry_backoff", "usage_cache_ttl"])
def test_seconds_given_in_code_are_accepted_when_positive_numbers(field: str) -> None:
    """``BillingSettings(api_timeout=...)``: a positive finite int or float is taken as it is; anything else (zero,
    negative, NaN, infinity, an int too large for a float, a bool, text, None, a Decimal) is a ConfigurationError
    naming the variable."""
    variable = next(variable for variable in VARIABLES if variable.field == field)
    for seed in SEEDS:
        rng = random.Random(f"{field}/code/{seed}")
        for _ in range(ROUNDS):
            value = number_given_in_code(rng)
            positive = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and abs(value) < 2**1024
                and math.isfinite(value)
                and value > 0
            )
            outcome = made(**{field: value})
            shown = f"seed {seed}: {field}={value!r:.300}" if not isinstance(value, int) or value < 10**300 else field
            if positive:
                assert isinstance(outcome, BillingSettings) and getattr(outcome, field) == value, shown
            else:
                assert_refusal(outcome, variable, r"positive number", shown, ())


@pytest.mark.parametrize(("field", "allowed"), [("max_retries", range(21)), ("unresolved_status", (401, 403))])
def test_whole_numbers_given_in_code_are_ints(field: str, allowed: Any) -> None:
    """``max_retries`` and ``unresolved_status`` given in code are ints in their range; a float (401.0: the status an
    ASGI server then refuses to send), a bool, text or None is refused, as any int out of range."""
    variable = next(variable for variable in VARIABLES if variable.field == field)
    for seed in SEEDS:
        rng = random.Random(f"{field}/code/{seed}")
        for _ in range(ROUNDS):
            value = rng.choice(
                (
                    rng.choice(list(allowed)),
                    float(rng.choice(list(allowed))),
                    rng.randint(-5, 500),
                    10**30,
                    -(10**5_000),
                    True,
                    str(rng.choice(list(allowed))),
                    None,
                    Decimal(rng.choice(list(allowed))),
                )
            )
            outcome = made(**{field: value})
            shown = f"seed {seed}: {field}={value!r:.100}" if value != -(10**5_000) else f"{field}=-(10**5000)"
            if type(value) is int and value in allowed:
                assert isinstance(outcome, BillingSettings) and getattr(outcome, field) == value, shown
            else:
                assert_refusal(outcome, variable, r"whole number|401 or 403", shown, ())


#: Text fields whose blanks around ``from_env`` drops: given in code with blanks (a secret file's line break, a
#: value that ``docker run --env-file`` kept with its trailing blank, read by the app itself), they are dropped too,
#: or the value refused; never kept. (Not spool paths and path prefixes: a file's or a path's name may end so.)
TRIMMED_IN_CODE = {
    "api_key": m_api_key,
    "webhook_hmac_key": m_hmac_key,
    "organization_id": m_organization_id,
    "api_url": m_api_url,
    "redis_url": m_redis_url,
    "event_code": m_event_code,
    "subscription_id_template": m_template,
    "org_header": m_header,
    "user_header": m_header,
    "quota_mode": m_choice("enforce", "monitor", "off"),
    "on_unresolved": m_choice("allow", "reject"),
}


@pytest.mark.parametrize("field", sorted(TRIMMED_IN_CODE))
def test_text_given_in_code_with_blanks_around_is_never_kept_with_them(field: str) -> None:
    """A text value given in code with blanks or a line break around is read without them, or refused: kept, it was
    an event code no metric has (events never billed) or an organization id no webhook carries (each refused)."""
    variable = next(variable for variable in VARIABLES if variable.field == field)
    for seed in SEEDS:
        rng = random.Random(f"{field}/blanks/{seed}")
        for _ in range(ROUNDS // 4):
            _, value = accepted_value(variable, rng)
            if not isinstance(value, str) or not value:
                continue
            padded = rng.choice((" ", "\n", "\t", "\r\n", " \n")) + value + rng.choice(("", " ", "\n", "\r\n"))
            outcome = made(**{field: padded})
            shown = f"seed {seed}: {field}={padded!r}"
            if isinstance(outcome, BillingSettings):
                assert getattr(outcome, field) == value, f"{shown}: kept as {getattr(outcome, field)!r}"
            else:
                assert outcome.variable == variable.name, f"{shown}: {outcome}"


# ----------------------------------------------------------------------------------- _limits: Lago's numbers


def lago_number(rng: random.Random) -> Any:
    return rng.choice(
        (
            rng.randint(0, 10**6),
            str(rng.randint(0, 10**6)),
            f"{rng.randint(0, 10**6)}.0",
            10**30,
            "1e400",
            "1e1000000",
            "-1",
            -5,
            1.5,
            "1.5",
            "NaN",
            "sNaN",
            "Infinity",
            "-0",
            math.nan,
            math.inf,
            True,
            None,
            "",
            " 12 ",
            "abc",
            "١٢",
            [1],
            {"a": 1},
            "9" * 5_000,
        )
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_lagos_limits_and_counts_are_whole_numbers_or_said_unreadable(seed: int) -> None:
    """Entitlement values and usage counts of any shape (huge, negative, NaN, text, nested, a bool, 5,000 digits):
    a limit is a whole number from 0 to 2**53 - 1, None (unlimited) or left out; a count is one from 0 to 2**53 - 1
    or an error of the package's saying it cannot be read; never another exception."""
    rng = random.Random(f"limits/{seed}")
    config = QuotaConfig()
    for _ in range(ROUNDS):
        values = [lago_number(rng) for _ in range(3)]
        entitlements = [
            {
                "code": config.feature_code,
                "privileges": [
                    {"code": config.calls_privilege, "value": values[0]},
                    {"code": config.tokens_privilege, "override_value": values[1], "plan_value": values[2]},
                    None,
                ],
            }
        ]
        limits = limits_from_entitlements(entitlements, config)
        for limit in limits.values():
            assert limit is None or (type(limit) is int and 0 <= limit <= _LARGEST), (values, limits)
        usage = {
            "charges_usage": [
                {"billable_metric": {"code": "api_call"}, "events_count": values[0]},
                {"billable_metric": {"code": "tokens", "aggregation_type": "sum_agg"}, "units": values[1]},
            ]
        }
        try:
            calls, tokens = usage_totals(usage, "api_call", "tokens")
        except _Unreadable as exc:
            assert isinstance(exc, LagoAPIError) and exc.kind in ("events_count", "units"), exc
        else:
            assert type(calls) is int and 0 <= calls <= _LARGEST, (values, calls)
            assert tokens is None or (type(tokens) is int and 0 <= tokens <= _LARGEST), (values, tokens)


# ------------------------------------------------------------------------------- what the seeds found, named


def test_a_huge_int_given_in_code_for_seconds_is_a_configuration_error() -> None:
    """``BillingSettings(api_timeout=10**400)`` raised ``OverflowError: int too large to convert to float``, not a
    ConfigurationError naming LAGO_API_TIMEOUT (from the environment the same number is infinity, refused)."""
    for field, variable in (("api_timeout", "LAGO_API_TIMEOUT"), ("usage_cache_ttl", "LAGO_USAGE_CACHE_TTL")):
        with pytest.raises(ConfigurationError, match="positive number") as info:
            BillingSettings(**{field: 10**400})
        assert info.value.variable == variable
    with pytest.raises(ConfigurationError, match="LAGO_API_TIMEOUT"):
        BillingSettings.from_env(None, environ={}, require_api_key=False, api_timeout=10**400)


def test_an_int_of_thousands_of_digits_given_in_code_is_a_configuration_error() -> None:
    """``BillingSettings(max_retries=10**5000)`` (or such a limit, or switch) raised Python's own ``ValueError:
    Exceeds the limit (4300 digits) for integer string conversion`` while its error message was written."""
    huge = 10**5_000
    for fields, variable in (
        ({"max_retries": huge}, "LAGO_MAX_RETRIES"),
        ({"unresolved_status": -huge}, "LAGO_UNRESOLVED_STATUS"),
        ({"fail_open": huge}, "LAGO_FAIL_OPEN"),
        ({"retry_backoff": -huge}, "LAGO_RETRY_BACKOFF"),
        ({"plan_limits": {"starter": {"max_api_calls": -huge}}}, "LAGO_PLAN_LIMITS"),
        ({"plan_limits": {"starter": huge}}, "LAGO_PLAN_LIMITS"),
    ):
        outcome = made(**fields)
        assert isinstance(outcome, ConfigurationError) and outcome.variable == variable, (variable, outcome)
        assert "bits" in str(outcome)


def test_an_unresolved_status_given_as_a_float_is_refused() -> None:
    """``unresolved_status=401.0`` (a number from a YAML or JSON config) was accepted: the reject answer then went out
    with status 401.0, which h11 (uvicorn, hypercorn) refuses to send, and its body said ``"status":401.0``."""
    with pytest.raises(ConfigurationError, match="401 or 403") as info:
        BillingSettings(unresolved_status=401.0)  # type: ignore[arg-type]
    assert info.value.variable == "LAGO_UNRESOLVED_STATUS"
    assert type(read({"LAGO_UNRESOLVED_STATUS": "403.0"}).unresolved_status) is int  # type: ignore[union-attr]


@pytest.mark.parametrize("url", ["http://lago_\u4e2d:3000", "https://a_\u00e9.example", "http://" + "a" * 70 + "\xe9"])
def test_an_api_url_httpx_cannot_call_is_refused(url: str) -> None:
    """A host httpx cannot encode (an invalid IDNA name: a non-ASCII host with ``_``) was accepted; every
    ``LagoClient`` made then raised ``httpx.InvalidURL``, not a ConfigurationError naming LAGO_API_URL."""
    with pytest.raises(httpx.InvalidURL):
        httpx.URL(url)
    for outcome in (read({"LAGO_API_URL": url}), made(api_url=url)):
        assert isinstance(outcome, ConfigurationError) and outcome.variable == "LAGO_API_URL", outcome
        assert "URL" in str(outcome)


def test_a_spool_path_with_a_nul_is_refused(tmp_path: Path) -> None:
    """A NUL in ``LAGO_SPOOL_PATH`` (a ``.env`` or code) was accepted; the pipeline then failed to start with a bare
    ``ValueError: embedded null byte``."""
    path = f"{tmp_path}/spool\x00.db"
    for outcome in (read({"LAGO_SPOOL_PATH": path}), made(spool_path=path), made(spool_path=path.encode())):
        assert isinstance(outcome, ConfigurationError) and outcome.variable == "LAGO_SPOOL_PATH", outcome
    assert made(spool_path=f"{tmp_path}/spool.db")


def test_an_event_code_with_a_control_character_is_refused() -> None:
    """``LAGO_EVENT_CODE`` with a line break, a NUL or another control character inside was accepted and sent to
    Lago as the events' code, which no billable metric has: every event kept and never billed."""
    for code in ("api\ncall", "api_call\x00", "api\x1bcall", "api\u2028call"):
        for outcome in (read({"LAGO_EVENT_CODE": code}), made(event_code=code)):
            assert isinstance(outcome, ConfigurationError) and outcome.variable == "LAGO_EVENT_CODE", outcome
    assert made(event_code="api call é").event_code == "api call é"  # (blanks inside and letters of any script: kept)


def test_an_event_code_and_organization_id_given_in_code_lose_their_blanks() -> None:
    """``BillingSettings(event_code=os.environ["METRIC"])`` under ``docker run --env-file`` (which keeps a trailing
    blank), or ``organization_id=Path(secret).read_text()`` (its line break): kept as they were, every event went
    under a code no metric has, and every webhook was refused as from another organization."""
    assert made(event_code=" api_call\n").event_code == "api_call"  # type: ignore[union-attr]
    settings = made(organization_id="1a901a90-1a90-1a90-1a90-1a901a901a90\n")
    assert settings.organization_id == "1a901a90-1a90-1a90-1a90-1a901a901a90"  # type: ignore[union-attr]


def test_an_api_key_with_a_reference_inside_is_refused_without_showing_it() -> None:
    """``LAGO_API_KEY=abc$Secretpart123`` was refused quoting ``'$Secretpart123'``: most of what was set, a secret.
    A reference that is the whole value (``${LAGO_KEY}``, no secret) is still shown."""
    for key in ("abc$Secretpart123", "5b1e6c1a-${LAGO_SUFFIX}-3f0c9c3d2b11"):
        outcome = read({"LAGO_API_KEY": key})
        assert isinstance(outcome, ConfigurationError) and outcome.variable == "LAGO_API_KEY", outcome
        assert "Secretpart" not in str(outcome) and "LAGO_SUFFIX" not in str(outcome), str(outcome)
        assert "expand" in str(outcome)
    assert "${LAGO_KEY}" in str(read({"LAGO_API_KEY": "${LAGO_KEY}"}))


def test_a_duration_read_with_a_letter_only_its_check_folds_is_refused() -> None:
    """``LAGO_API_TIMEOUT=1s1`` and a long s (U+017F, which a case-insensitive check takes for ``s``) was read as 1
    second, the second part dropped; ``1`` and a long s was read as 0 (refused as no positive number, saying nothing
    of the unit)."""
    for value in ("1s1\u017f", "1hr\u017f", "1\u017f"):
        outcome = read({"LAGO_API_TIMEOUT": value})
        assert isinstance(outcome, ConfigurationError) and "number of seconds" in str(outcome), (value, outcome)


@pytest.mark.parametrize("url", ["redis://redis:6379/0?db=x", "redis://:pw@redis/0?socket_timeout=5s"])
def test_a_redis_url_whose_query_redis_py_cannot_read_fails_the_gate_with_a_configuration_error(url: str) -> None:
    """Found by the seeds: ``LAGO_REDIS_URL=redis://redis:6379/0?socket_timeout=5s`` is accepted by the settings (its
    query is redis-py's), and the quota gate made with it raised redis-py's own ``ValueError: Invalid value for
    'socket_timeout' in connection URL.`` (the app's startup failure), naming no variable."""
    settings = BillingSettings(api_key=BYSTANDER_KEY, redis_url=url)
    client = LagoClient(settings, transport=FakeLago(api_key=BYSTANDER_KEY).transport())
    with pytest.raises(ConfigurationError) as info:
        QuotaGate(settings, client, config=QuotaConfig())
    assert info.value.variable == "LAGO_REDIS_URL" and "pw" not in str(info.value)


def test_the_middleware_takes_its_own_unresolved_status_as_the_settings_do() -> None:
    """``OrgBillingMiddleware(unresolved_status=...)`` is checked as ``LAGO_UNRESOLVED_STATUS`` is: ``401.0`` was taken
    and went out as the reject answer's status, which h11 (uvicorn) refuses to send; an ``HTTPStatus`` is its number."""
    import http

    from starlette.applications import Starlette

    from lago_org_billing import OrgBillingMiddleware

    settings = BillingSettings(api_key=BYSTANDER_KEY, on_unresolved="reject")
    for bad in (401.0, True, "403", Decimal(403)):
        with pytest.raises(ConfigurationError, match="unresolved_status must be 401 or 403"):
            OrgBillingMiddleware(Starlette(), settings=settings, unresolved_status=bad)
    middleware = OrgBillingMiddleware(Starlette(), settings=settings, unresolved_status=http.HTTPStatus.FORBIDDEN)
    assert type(middleware.unresolved_status) is int and middleware.unresolved_status == 403


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://api/v1", "http://api/v1"),
        ("http://API/V1/", "http://API/V1"),
        ("http://api:3000/api/v1", "http://api:3000"),
        ("https://lago.example.com/api/v1/", "https://lago.example.com"),
    ],
)
def test_a_host_named_api_is_not_taken_for_the_api_v1_suffix(value: str, expected: str) -> None:
    """Found by the seeds: ``LAGO_API_URL=http://api/v1`` (a host named ``api``, a base path ``/v1``) was read as
    ``http:``, the ``/api/v1`` suffix looked for in the whole URL rather than its path: every call failed, while
    ``BillingSettings(api_url="http:")`` is refused. The suffix is dropped from the path only."""
    settings = BillingSettings.from_env(None, environ={"LAGO_API_URL": value}, require_api_key=False)
    assert settings.api_url == expected
