"""Event JSON bytes, differential against ``json.dumps``.

An event reaches ``POST /api/v1/events/batch`` as bytes made two ways: ``event_payload``'s dict encoded by the
spool's one encoder (``dumps_event``), and, on the middleware's hot path, a ``%`` template
(``_middleware._EVENT_JSON``) filled with ``encode_basestring`` pieces. Seeded hostile values (quotes, backslashes,
control characters, ``</script>``, U+2028/U+2029, astral characters, lone surrogates, NUL; token counts at 0, 2**53,
2**63 - 1, huge, negative, bools, floats, Decimals; NaN and infinities; nested documents with non-string keys) go
through the real builders and through an ASGI app behind ``OrgBillingMiddleware`` against the in-process emulator.
Each check: the bytes are strict JSON (no NaN/Infinity, UTF-8), they parse to exactly what ``json.dumps`` of the
intended document parses to (keys, values and types: ``1`` is not ``1.0`` nor ``true``), values Lago cannot store
are refused (never a batch Lago answers 400 or 500 for all of its events), the emulator stored what was sent, and a
resend or a spool replay sends the same bytes (``transaction_id`` and ``timestamp`` included).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import re
import sqlite3
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from enum import IntEnum
from http import HTTPStatus
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from lago_org_billing import BillingSettings, InvalidRequestError, LagoClient, OrgBillingMiddleware
from lago_org_billing._attribution import MAX_MODEL_LENGTH, MAX_TOKENS, Usage, attribute_usage
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import MAX_ID_BYTES, event_payload, normalize_event
from lago_org_billing._ids import format_timestamp
from lago_org_billing._spool import dumps_event
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

API_KEY = "events-bytes-differential-key"
SEEDS = (20260, 31337, 4242)

# ----------------------------------------------------------------------------------------------- hostile values

#: Pieces of hostile text: what JSON must escape, what HTML/JS embedders trip on, what UTF-8 cannot carry, and the
#: template's own syntax.
PIECES = (
    "a",
    "Z9",
    '"',
    "\\",
    '\\"',
    "\\u0000",
    "/",
    "</script>",
    "<!--",
    "\u2028",
    "\u2029",
    "\U0001f600",
    "\U0010ffff",
    "\u00e9",
    "\u200d",
    "\ufeff",
    "%s",
    "%d",
    "%%",
    "{}",
    "'",
    " ",
    "\t",
    "\n",
    "\x01",
    "\x1f",
    "\x7f",
    "\x85",
    "\x00",
    "\ud800",
    "\udfff",
)
PRINTABLE = tuple(piece for piece in PIECES if piece.isprintable())

INTS: tuple[int, ...] = (0, 1, -1, 2**31, 2**53 - 1, 2**53, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), 2**64, 10**30)
FLOATS = (0.0, -0.0, 0.1, 1.5, 1e-7, 5e-324, 1.7976931348623157e308, 2.0**53, math.nan, math.inf, -math.inf)
DECIMALS = (
    Decimal("0.0042"),
    Decimal("1E+3"),
    Decimal("-0"),
    Decimal("-2.50"),
    Decimal("1E-30"),
    Decimal(2**63 - 1),
    Decimal("123456789012345678901234567890.123456789"),
    Decimal("NaN"),
    Decimal("-Infinity"),
    Decimal("sNaN"),
    Decimal("1E+200000"),  # 200,001 digits: past what Postgres' numeric (Lago's sums) holds
    Decimal("-1E-20000"),  # 20,000 digits after the point: past numeric's 16,383
    Decimal("9E+131071"),  # numeric's largest number of digits before the point: kept
    Decimal("1E-16383"),  # and after it
    Decimal("0E+200000"),  # zero: written "0", kept
)


class Tier(IntEnum):
    GOLD = 3


def text(rng: random.Random, pieces: tuple[str, ...] = PIECES, most: int = 6) -> str:
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, most)))


def scalar(rng: random.Random) -> Any:
    kind = rng.randrange(10)
    if kind < 3:
        return text(rng)
    if kind == 3:
        return rng.choice(INTS)
    if kind == 4:
        return rng.choice(FLOATS)
    if kind == 5:
        return rng.choice(DECIMALS)
    if kind == 6:
        return rng.choice((None, True, False, Tier.GOLD, HTTPStatus.OK))
    if kind == 7:
        return rng.choice((b"bytes", {1, 2}, dt.date(2026, 1, 1), object(), 10**5000, complex(1, 2)))
    if kind == 8:
        return rng.uniform(-1e6, 1e6)
    return rng.randrange(-(2**70), 2**70)


def key(rng: random.Random, top: bool) -> Any:
    if top or rng.random() < 0.7:
        return text(rng, most=3) if rng.random() < 0.95 else rng.choice((1, None, ("t",)))
    return rng.choice((0, -1, 2**63, 1.5, -0.0, math.nan, math.inf, True, None, ("t",), Decimal("1")))


def document(rng: random.Random, depth: int = 0) -> Any:
    if depth >= 3 or rng.random() < 0.55:
        return scalar(rng)
    if rng.random() < 0.5:
        items = [document(rng, depth + 1) for _ in range(rng.randint(0, 3))]
        return tuple(items) if rng.random() < 0.3 else items
    return {key(rng, False): document(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def properties(rng: random.Random) -> dict[Any, Any]:
    return {key(rng, True): document(rng) for _ in range(rng.randint(0, 4))}


# ------------------------------------------------------------------------------------------------------ oracle


class Refused(Exception):
    """The oracle's word: Lago cannot store this (or JSON cannot carry it), so the package must refuse it."""


#: Python's limit on the digits of an int written as text (0: none, as before 3.10.7/3.11).
_DIGITS: int = getattr(sys, "get_int_max_str_digits", lambda: 0)()


def _no_text(value: str) -> bool:
    """A string Lago cannot store: a NUL (Postgres refuses it: a 500) or a lone surrogate (no UTF-8)."""
    return "\x00" in value or any("\ud800" <= char <= "\udfff" for char in value)


def intended(value: Any, top: bool = False) -> Any:
    """The document ``json.dumps`` should be given for ``value`` (finite Decimals as their plain text), or
    :class:`Refused`. Written from the rules (README, CHANGELOG), not from the code under test."""
    if isinstance(value, str):
        if _no_text(value):
            raise Refused
        return value
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if _DIGITS and abs(int(value)) >= 10**_DIGITS:  # (json.dumps cannot write it)
            raise Refused
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Refused
        return value
    if isinstance(value, Decimal):
        # finite, and a number Postgres' numeric (what Lago casts properties to, to sum them) holds: at most
        # 131,072 digits before the point and 16,383 after it
        if not value.is_finite() or (value and value.adjusted() >= 131_072) or value.as_tuple().exponent < -16_383:  # type: ignore[operator]
            raise Refused
        return f"{value:f}"
    if isinstance(value, (list, tuple)):
        return [intended(item) for item in value]
    if isinstance(value, dict):
        result: dict[Any, Any] = {}
        for name, item in value.items():
            if isinstance(name, str):
                if _no_text(name):
                    raise Refused
            elif top or not (name is None or isinstance(name, (int, float))):  # (bool is an int)
                raise Refused
            elif isinstance(name, float) and not math.isfinite(name):
                raise Refused
            result[name] = intended(item)
        return result
    raise Refused


def show(value: Any) -> str:
    """A failing draw, shortened (an int past Python's digit limit has no repr)."""
    try:
        return repr(value)[:2000]
    except ValueError:
        return f"<{type(value).__name__} past the digit limit>"


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict(raw: bytes | str) -> Any:
    """``json.loads`` refusing NaN/Infinity and bytes that are no UTF-8, each object as its pairs (duplicates
    kept: they must match ``json.dumps``'s too)."""
    data = raw.decode("utf-8") if isinstance(raw, bytes) else raw.encode("utf-8").decode("utf-8")
    return json.loads(data, parse_constant=_no_constants, object_pairs_hook=_Pairs)


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as the pairs it was written with."""


def canon(value: Any) -> Any:
    """A comparable form keeping JSON's types apart (``1``, ``1.0``, ``true``; ``-0.0`` and ``0.0``)."""
    if isinstance(value, _Pairs):
        return ("o", tuple(sorted(((name, canon(item)) for name, item in value), key=repr)))
    if isinstance(value, list):
        return ("l", tuple(canon(item) for item in value))
    if isinstance(value, bool) or value is None:
        return ("c", value)
    if isinstance(value, int):
        return ("i", value)
    if isinstance(value, float):
        return ("f", repr(value))
    assert isinstance(value, str)
    return ("s", value)


def as_dumped(document: Any) -> Any:
    """What ``json.dumps`` of the intended document parses to."""
    return canon(strict(json.dumps(document, allow_nan=False, ensure_ascii=False)))


def field(event: _Pairs, name: str) -> Any:
    [value] = [item for key_, item in event if key_ == name]
    return value


def plain(value: Any) -> Any:
    """Parsed pairs as dicts (the last of duplicate keys, as ``json.loads`` keeps)."""
    if isinstance(value, _Pairs):
        return {name: plain(item) for name, item in value}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def event_spans(body: bytes) -> Iterator[tuple[str, Any]]:
    """Each event of a ``POST /events/batch`` body as its exact JSON text and its parsed pairs."""
    data = body.decode("utf-8")
    head = '{"events":['
    assert data.startswith(head) and data.endswith("]}"), data[:80]
    decoder = json.JSONDecoder(parse_constant=_no_constants, object_pairs_hook=_Pairs)
    position = len(head)
    while data[position] != "]":
        parsed, end = decoder.raw_decode(data, position)
        yield data[position:end], parsed
        assert data[end] in ",]", data[end : end + 20]
        position = end + 1 if data[end] == "," else end
    assert position == len(data) - 2
    strict(body)  # the whole body too


def storable(event: Any) -> None:
    """An event that the package's own checks take as it is (what Lago can store), and whose transaction id and
    timestamp are the fixed strings a resend repeats."""
    parsed = plain(event)
    assert normalize_event(parsed) == parsed
    assert re.fullmatch(r"\d{1,11}\.\d{3}|100000000000\.000", parsed["timestamp"]), parsed["timestamp"]


# ------------------------------------------------------------------------------------- event_payload, direct

IDS: dict[str, Any] = {"transaction_id": "tx_1", "external_subscription_id": "org_a", "code": "api_call"}


@pytest.mark.parametrize("seed", SEEDS)
def test_event_payload_properties_are_json_dumps_of_the_intended_document_or_refused(seed: int) -> None:
    """Properties of every shape: accepted exactly when the oracle says Lago can store them (an InvalidRequestError
    otherwise, never another exception), and then encoded to bytes that parse to json.dumps of the intended
    document, types and duplicate keys included."""
    rng = random.Random(seed)
    accepted = refused = 0
    for _ in range(400):
        props = properties(rng)
        try:
            expected = as_dumped(intended(props, top=True))
        except Refused:
            expected = None
        try:
            payload = event_payload(**IDS, properties=props, timestamp=1_772_323_200.5)
        except InvalidRequestError:
            assert expected is None, f"refused, though Lago can store it: {show(props)}"
            refused += 1
            continue
        assert expected is not None, f"accepted, though Lago cannot store it: {show(props)}"
        encoded = dumps_event(payload).encode()
        assert dumps_event(payload).encode() == encoded  # (one encoding: a resend's bytes)
        parsed = strict(encoded)
        assert canon(field(parsed, "properties")) == expected, show(props)
        assert plain(parsed) | {"properties": None} == {**IDS, "timestamp": "1772323200.500", "properties": None}
        storable(parsed)
        accepted += 1
    assert accepted > 50 and refused > 50  # (the draws reach both sides)


def test_a_decimal_past_what_lago_can_sum_is_refused_not_written_out_digit_by_digit() -> None:
    """``Decimal("1E+99999999")`` (12 characters, e.g. a client's number parsed with ``parse_float=Decimal`` in an
    ``event_properties`` hook) was written out as a 100 MB string of digits: a second of the pipeline's event loop
    per event, a 100 MB event in the spool and a batch no proxy lets through, for a number Lago cannot sum
    (``properties->>'field'`` cast to Postgres' numeric: 131,072 digits before the point, 16,383 after)."""
    for huge in (Decimal("1E+99999999"), Decimal("-1E-99999999"), Decimal("1E+131072"), Decimal("1E-16384")):
        with pytest.raises(InvalidRequestError, match="numeric"):
            event_payload(**IDS, properties={"cost": huge})
        with pytest.raises(InvalidRequestError, match="numeric"):
            event_payload(**IDS, properties={"lines": [{"cost": huge}]})
    kept = event_payload(**IDS, properties={"big": Decimal("9E+131071"), "small": Decimal("1E-16383")})
    assert len(kept["properties"]["big"]) == 131_072 and kept["properties"]["small"] == "0." + "0" * 16_382 + "1"
    assert event_payload(**IDS, properties={"none": Decimal("0E+200000")})["properties"] == {"none": "0"}


def test_a_precise_amount_with_a_vast_exponent_is_refused_not_written_out() -> None:
    """``precise_total_amount_cents="1e-99999999"`` (under 10**25, so it passed) went out as a 100 MB string; Lago's
    ``decimal(40, 15)`` column keeps 15 digits after the point. Refused past numeric's 16,383."""
    with pytest.raises(InvalidRequestError, match="precise_total_amount_cents"):
        normalize_event({**IDS, "precise_total_amount_cents": "1e-99999999"})
    sent = normalize_event({**IDS, "precise_total_amount_cents": "1e-20"})["precise_total_amount_cents"]
    assert sent == "0." + "0" * 19 + "1"


@pytest.mark.parametrize("seed", SEEDS)
def test_event_ids_and_timestamps_are_kept_exactly_or_refused(seed: int) -> None:
    """Hostile ids and timestamps: refused with an InvalidRequestError, or sent as the very strings given (parsed
    back from the bytes), with a timestamp of Unix seconds and three decimals within 0 .. 10**11."""
    rng = random.Random(seed)
    stamps: tuple[Any, ...] = (  # (not -0.0: format_timestamp writes "-0.000", said in the report on _ids.py)
        0,
        0.0,
        1.0005,
        1_772_323_200.123_456,
        99_999_999_999.999,
        10**11,
        10**11 + 1,
        -1,
        math.nan,
        math.inf,
        True,
        "1772323200.5",
        " 12 ",
        "1e3",
        "nan",
        Decimal("1772323200.0005"),
        Decimal("-0.0001"),
        dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc),
        dt.datetime(2026, 3, 1),
        dt.date(2026, 3, 1),
        b"1",
        None,
    )
    for _ in range(300):
        ids: dict[str, Any] = {
            name: text(rng, most=4) if rng.random() < 0.9 else rng.choice((1, None, "x" * 1025)) for name in IDS
        }
        stamp = rng.choice(stamps)
        try:
            payload = event_payload(**ids, timestamp=stamp)
        except InvalidRequestError:
            continue
        parsed = strict(dumps_event(payload).encode())
        for name, value in ids.items():
            assert field(parsed, name) == value
            assert not _no_text(value) and len(value.encode()) <= MAX_ID_BYTES and value.strip()
        stamp_text = field(parsed, "timestamp")
        assert re.fullmatch(r"\d{1,11}\.\d{3}|100000000000\.000", stamp_text), (stamp, stamp_text)
        if stamp is not None and not isinstance(stamp, dt.datetime):
            assert abs(Decimal(stamp_text) - Decimal(str(stamp).strip())) <= Decimal("0.0005")
        storable(parsed)


# ----------------------------------------------------------------------------------- the middleware's builders


async def _noop_app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called
    raise AssertionError


def _facts(rng: random.Random, endpoint_pieces: tuple[str, ...]) -> tuple[Any, ...]:
    started = rng.choice((1_772_323_200.0, 1_772_323_200.0005, 1_772_323_200.9995, rng.uniform(0, 99_999_999_999)))
    duration = rng.choice((0.0, 1e-7, 0.0005, 0.0015, 12.3456789, rng.uniform(0, 3600), -1.0))
    counts = [rng.choice((0, 1, 2**31, MAX_TOKENS, rng.randrange(MAX_TOKENS))) for _ in range(3)]
    usage = Usage(
        None if rng.random() < 0.3 else text(rng, PRINTABLE, 8)[:MAX_MODEL_LENGTH] or "m",
        input_tokens=counts[0],
        output_tokens=counts[1],
        total_tokens=counts[2],
    )
    return (
        "/" + text(rng, endpoint_pieces, 8),
        # (a method with a NUL is none a server passes on: h11 and httptools take a token only)
        rng.choice(("GET", "POST", "M-SEARCH", text(rng, endpoint_pieces, 3) or "PROPFIND")),
        rng.choice((200, 201, 299, 400, 404, 418, 422, HTTPStatus.OK, HTTPStatus.CREATED, HTTPStatus.IM_A_TEAPOT)),
        started,
        started + duration,
        None,
        text(rng, PRINTABLE, 5).strip() or "org",
        None if rng.random() < 0.4 else text(rng, PRINTABLE, 5).strip() or "user",
        usage,
        None,
        None,
    )


@pytest.mark.parametrize("seed", SEEDS)
async def test_the_template_event_is_json_dumps_of_the_event_payload_one(seed: int, fake_lago: FakeLago) -> None:
    """The hot path's ``%`` template against ``event_payload`` + ``json.dumps`` for the same facts: the same
    document (key by key, type by type: ``200``, not ``200.0``; ``12.346``, the same float), byte-stable, strict
    JSON, storable; a lone surrogate (which no UTF-8 carries) makes both unencodable (dead-lettered), never a body
    Lago would refuse whole."""
    settings = BillingSettings(api_url=fake_lago.base_url, api_key=API_KEY, quota_mode="off")
    middleware = OrgBillingMiddleware(_noop_app, settings=settings, transport=fake_lago.transport())
    rng = random.Random(seed)
    endpoint_pieces = tuple(piece for piece in PIECES if piece != "\x00")  # (_raw_endpoint drops NULs: checked e2e)
    try:
        for _ in range(300):
            facts = _facts(rng, endpoint_pieces)
            template = middleware._build_event(facts)
            assert isinstance(template, str)
            transaction_id = json.loads(template)["transaction_id"]
            endpoint, method, status, started, ended, _, org_id, user_id, usage = facts[:9]
            props: dict[str, Any] = {
                "org_id": org_id,
                "endpoint": endpoint,
                "method": method,
                "status_code": status,
                "duration_ms": round(max(ended - started, 0.0) * 1000, 3),
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "total_tokens": usage.total_tokens,
            }
            if user_id is not None:
                props["user_id"] = user_id
            if usage.model is not None:
                props["model"] = usage.model
            intended_event = {
                "transaction_id": transaction_id,
                "external_subscription_id": settings.subscription_id_for(org_id),
                "code": settings.event_code,
                "timestamp": format_timestamp(started),
                "properties": props,
            }
            if _no_text(endpoint) or _no_text(method):
                with pytest.raises(UnicodeEncodeError):
                    dumps_event(template)
                with pytest.raises(InvalidRequestError):
                    event_payload(**intended_event)
                continue
            raw = dumps_event(template).encode()
            assert canon(strict(raw)) == as_dumped(intended_event), (facts, template)
            assert canon(strict(dumps_event(event_payload(**intended_event)))) == as_dumped(intended_event)
            storable(strict(raw))
    finally:
        await middleware.aclose()


# --------------------------------------------------------------------------------------- end to end, emulator


class Capture(httpx.AsyncBaseTransport):
    """The emulator's transport, keeping every ``POST /events/batch`` body; answers 500 without asking the emulator
    while ``failing`` is above 0 (counted down), as a Lago whose database failed. ``failed`` is set once that many
    500s were answered."""

    def __init__(self, fake: FakeLago, failing: int = 0) -> None:
        self.inner = fake.transport()
        self.bodies: list[bytes] = []
        self.failing = failing
        self.failed = anyio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events/batch"):
            self.bodies.append(await request.aread())
            if self.failing > 0:
                self.failing -= 1
                if self.failing == 0:
                    self.failed.set()
                return httpx.Response(500, json={"status": 500, "error": "Internal Server Error"}, request=request)
        return await self.inner.handle_async_request(request)


def _lago() -> FakeLago:
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call")
    return fake


def _settings(fake: FakeLago, **kwargs: Any) -> BillingSettings:
    return BillingSettings(api_url=fake.base_url, api_key=API_KEY, quota_mode="off", retry_backoff=0.001, **kwargs)


def _request(rng: random.Random, index: int) -> dict[str, Any]:
    """One hostile request: its raw path (the endpoint of an app without Starlette routing), method, identity (from
    the app's auth: ``request.state``), answer (status, and a JSON body with a model and token counts written as
    text: any JSON number), explicit usage, and the hook's properties."""
    counts = ("0", "7", "9007199254740992", "9223372036854775807", "1" + "0" * 400, "-1", "true", "1.5", "12.0",
              "1e3", '"12"', "null", "1000000000", "1000000001")  # fmt: skip
    explicit: dict[str, Any] | None = None
    if rng.random() < 0.3:
        explicit = {
            "model": rng.choice((None, text(rng, PIECES, 4), "gpt-4o")),
            **{
                name: rng.choice((None, 0, 5, 2**53, 2**63 - 1, -3, True, 2.0, 2.5, Decimal(3), "4", math.nan))
                for name in ("input_tokens", "output_tokens", "total_tokens")
            },
        }
    model = rng.choice((None, "gpt-4o", text(rng, PIECES, 5)))
    # (the model in ASCII JSON: a lone surrogate as its \ud800 escape, as a provider may send it)
    body = f'{{"model":{json.dumps(model)},"usage":{{"prompt_tokens":{rng.choice(counts)},'
    body += f'"completion_tokens":{rng.choice(counts)}}}}}'
    return {
        "path": f"/r{index}/" + text(rng, PIECES, 6),
        "method": rng.choice(("GET", "POST", "DELETE")),
        # (the org names its request: a 404's endpoint is "<unmatched>", a lone surrogate's event is not sent)
        "org_id": rng.choice(("org_a", text(rng, PRINTABLE, 5), "\U0001f600" * 20, " pad")) + f"~{index}",
        "user_id": rng.choice((None, "u1", text(rng, PIECES, 4))),
        "status": rng.choice((200, 201, 202, 299, 400, 404, 418, 500, HTTPStatus.OK, HTTPStatus.ACCEPTED)),
        "body": body.encode(),
        "explicit": explicit,
        "extra": properties(rng),
    }


def _app(requests: list[dict[str, Any]]) -> Callable[..., Any]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        spec = requests[int(scope["path"][2:].split("/", 1)[0])]
        if spec["explicit"] is not None:
            attribute_usage(scope, **spec["explicit"])
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(spec["body"])).encode())]
        await send({"type": "http.response.start", "status": spec["status"], "headers": headers})
        await send({"type": "http.response.body", "body": spec["body"]})

    return app


async def _serve(middleware: OrgBillingMiddleware, spec: dict[str, Any]) -> None:
    state: dict[str, Any] = {"org_id": spec["org_id"]}
    if spec["user_id"] is not None:
        state["user_id"] = spec["user_id"]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": spec["method"],
        "scheme": "http",
        "path": spec["path"],
        "raw_path": spec["path"].encode("utf-8", "surrogatepass"),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"t")],
        "client": ("127.0.0.1", 50000),
        "server": ("t", 80),
        "state": state,
    }
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:  # (the app reads no body: never asked twice)
            raise AssertionError("receive called after the body")
        received = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    await middleware(scope, receive, send)


def _by_request(capture: Capture) -> dict[int, list[tuple[str, _Pairs]]]:
    """The events sent, by the request their org names (``...~<index>``), each as its exact text."""
    sent: dict[int, list[tuple[str, _Pairs]]] = {}
    for body in capture.bodies:
        for raw, event in event_spans(body):
            index = int(plain(event)["properties"]["org_id"].rsplit("~", 1)[1])
            sent.setdefault(index, []).append((raw, event))
    return sent


def _without_timing(event: _Pairs) -> Any:
    """An event's document without what differs between two runs of one request (its id, time and duration)."""
    document = plain(event)
    document.pop("transaction_id")
    document.pop("timestamp")
    document["properties"].pop("duration_ms")
    return document


@pytest.mark.parametrize("seed", SEEDS)
async def test_end_to_end_the_template_and_the_json_path_send_the_same_events(seed: int) -> None:
    """The same hostile requests through two middlewares: one without a hook (the template), one whose
    ``event_properties`` hook returns hostile properties (``event_payload`` + ``json.dumps``). Every batch is
    strict JSON of storable events; each request is billed by both or neither, with the same document (the hook's
    properties on top when Lago can store them, else without them, counted); the emulator stored what was sent.
    A path's NUL is dropped (its lone surrogate, no UTF-8, dead-letters the event on both paths)."""
    rng = random.Random(seed)
    requests = [_request(rng, index) for index in range(40)]
    sent: list[dict[int, list[tuple[str, _Pairs]]]] = []
    fakes: list[FakeLago] = []
    stats: list[dict[str, Any]] = []
    dead: list[set[int]] = []
    for hooked in (False, True):
        fake = _lago()
        capture = Capture(fake)
        hook = (lambda scope, identity: requests[int(scope["path"][2:].split("/", 1)[0])]["extra"]) if hooked else None
        middleware = OrgBillingMiddleware(
            _app(requests), settings=_settings(fake), transport=capture, event_properties=hook
        )
        try:
            for spec in requests:
                await _serve(middleware, spec)
            assert await middleware.pipeline.flush(10)
            letters = middleware.pipeline.dead_letters()
        finally:
            await middleware.aclose()
        by_request = _by_request(capture)
        surrogates = {  # (billed: not a 5xx; under its path: not a 404's "<unmatched>")
            index
            for index, spec in enumerate(requests)
            if _no_text(spec["path"].replace("\x00", "")) and spec["status"] != 404 and spec["status"] < 500
        }
        assert not surrogates & by_request.keys()  # (no UTF-8: never in a body)
        assert len(letters) == len(surrogates), [letter.reason for letter in letters]
        assert all("surrogate" in letter.reason for letter in letters), [letter.reason for letter in letters]
        dead.append(surrogates)
        sent.append(by_request)
        fakes.append(fake)
        stats.append(dict(middleware.stats))
    plain_sent, hooked_sent = sent
    assert plain_sent.keys() == hooked_sent.keys()
    assert plain_sent, "no request was billed: the draws test nothing"
    for index, [(raw, event)] in plain_sent.items():
        spec = requests[index]
        [(hooked_raw, hooked_event)] = hooked_sent[index]
        document = _without_timing(event)
        try:
            extra = intended(spec["extra"], top=True)
        except Refused:
            extra = {}
        expected = json.loads(json.dumps({**document, "properties": {**document["properties"], **extra}}))
        assert canon(strict(json.dumps(_without_timing(hooked_event)))) == canon(strict(json.dumps(expected))), spec
        for text_, parsed in ((raw, event), (hooked_raw, hooked_event)):
            storable(parsed)
            props = plain(parsed)["properties"]
            assert props["endpoint"] in (spec["path"].replace("\x00", ""), "<unmatched>")
            assert props["org_id"] == spec["org_id"].strip() and props.get("user_id") == _user(spec["user_id"])
            assert type(props["status_code"]) is int and type(props["duration_ms"]) is float
            assert props["duration_ms"] >= 0
            assert all(type(props[name]) is int and props[name] >= 0 for name in ("input_tokens", "total_tokens"))
            assert "\x00" not in text_ and not _no_text(text_)
    # (counted: each refused hook's properties, and each event refused whole, a lone surrogate in its path)
    refused_hooks = sum(1 for index in hooked_sent if _refused(requests[index]["extra"]))
    assert stats[1].get("event_properties_errors", 0) == refused_hooks + len(dead[1])
    for fake, by_request in zip(fakes, sent, strict=True):
        stored = {event["transaction_id"]: event for event in fake.events}
        assert len(stored) == len(by_request)
        for [(_, event)] in by_request.values():
            document = plain(event)
            mine = stored[document["transaction_id"]]
            assert mine["properties"] == document["properties"]
            assert mine["external_subscription_id"] == document["external_subscription_id"]
            assert mine["code"] == document["code"]
            assert dt.datetime.fromisoformat(mine["timestamp"].replace("Z", "+00:00")).timestamp() == float(
                document["timestamp"]
            )


def _user(user_id: str | None) -> str | None:
    """The user billed for ``request.state.user_id``: an id is printable text (a NUL, a lone surrogate, U+2028 make
    none: the request is billed without a user), without the blanks around it."""
    user_id = None if user_id is None else user_id.strip()
    return user_id if user_id and user_id.isprintable() and len(user_id) <= 255 else None


def _refused(extra: Any) -> bool:
    try:
        intended(extra, top=True)
    except Refused:
        return True
    return False


async def test_a_resend_and_a_spool_replay_send_the_same_bytes(tmp_path: Path) -> None:
    """Hostile requests billed into a SQLite spool while Lago answers 500 (the batch sent again and again), the
    process stopped, a new one replaying the spool (one more 500, then delivered): every attempt of an event carries
    the very bytes the spool stored for it, its transaction id and timestamp included (Lago's ClickHouse store
    deduplicates on both), and the emulator stores each event once, as sent."""
    rng = random.Random(7)
    requests = [_request(rng, index) for index in range(12)]
    for spec in requests:  # (billed, under a path UTF-8 carries: every request has its event in the spool)
        spec["status"], spec["path"] = 200, spec["path"].encode("utf-8", "replace").decode()
    path = str(tmp_path / "spool.db")
    fake = _lago()
    down = Capture(fake, failing=3)
    hook = lambda scope, identity: requests[int(scope["path"][2:].split("/", 1)[0])]["extra"]  # noqa: E731
    options: dict[str, Any] = {"spool_path": path, "retry_backoff": 0.001, "max_backoff": 0.01, "flush_interval": 0.01}
    async with LagoClient(_settings(fake), transport=down) as client:
        pipeline = EventPipeline(client, **options)
        async with anyio.create_task_group() as group:
            await group.start(pipeline.run)
            middleware = OrgBillingMiddleware(
                _app(requests), settings=_settings(fake), pipeline=pipeline, event_properties=hook
            )
            for index, spec in enumerate(requests):
                if index == 6:  # (half with the hook: both encodings)
                    middleware.event_properties = None
                await _serve(middleware, spec)
            await pipeline.commit()
            with anyio.fail_after(10):
                await down.failed.wait()
            await pipeline.aclose(timeout=0)
            await middleware.aclose()
    connection = sqlite3.connect(path)
    try:
        stored = {json.loads(body)["transaction_id"]: body for (body,) in connection.execute("SELECT body FROM events")}
    finally:
        connection.close()
    assert len(stored) == len(requests) and fake.events == []
    up = Capture(fake, failing=1)
    async with LagoClient(_settings(fake), transport=up) as client:
        pipeline = EventPipeline(client, **options)
        async with anyio.create_task_group() as group:
            await group.start(pipeline.run)
            assert await pipeline.flush(10)
            await pipeline.aclose()
    attempts: dict[str, set[str]] = {}
    for body in down.bodies + up.bodies:
        for raw, event in event_spans(body):
            attempts.setdefault(plain(event)["transaction_id"], set()).add(raw)
            storable(event)
    assert attempts == {transaction_id: {body} for transaction_id, body in stored.items()}
    assert len(down.bodies) >= 3 and len(up.bodies) >= 2
    kept = {event["transaction_id"]: event for event in fake.events}
    assert kept.keys() == stored.keys() and len(fake.events) == len(stored)
    for transaction_id, body in stored.items():
        sent = json.loads(body)
        assert kept[transaction_id]["properties"] == sent["properties"]
        stamp = dt.datetime.fromisoformat(kept[transaction_id]["timestamp"].replace("Z", "+00:00"))
        assert stamp.timestamp() == float(sent["timestamp"])


async def test_the_template_refuses_a_subscription_id_event_payload_refuses() -> None:
    """An org id of 255 four-byte characters (printable: a valid org id) under ``{org_id}-main`` makes an
    ``external_subscription_id`` of 1,025 bytes: with an ``event_properties`` hook, ``event_payload`` refuses it (the
    event dead-lettered, said; tests/test_events_checks_cost_and_types.py); without one, the ``%`` template sends it,
    for a subscription no Lago path can name (255 characters at most)."""
    fake = _lago()
    capture = Capture(fake)
    settings = _settings(fake, subscription_id_template="{org_id}-main")
    spec = {"org_id": "\U0001f600" * 255, "user_id": None, "method": "GET", "path": "/r0/", "status": 200}
    requests = [{**spec, "body": b"{}", "explicit": None}]
    middleware = OrgBillingMiddleware(_app(requests), settings=settings, transport=capture)
    try:
        await _serve(middleware, requests[0])
        assert await middleware.pipeline.flush(5)
        letters = middleware.pipeline.dead_letters()
    finally:
        await middleware.aclose()
    sent = [event for body in capture.bodies for _, event in event_spans(body)]
    assert sent == [] and len(letters) == 1 and "1024 bytes" in letters[0].reason
