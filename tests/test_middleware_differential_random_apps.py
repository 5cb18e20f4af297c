"""Seeded differential tests: OrgBillingMiddleware around random raw ASGI apps is invisible, bills each request once.

Each seed makes a Lago emulator, random settings (``bill_server_errors``, ``bill_auth_failures``, ``on_unresolved``,
``LAGO_QUOTA_MODE`` off, monitor or enforce with a plan of a few calls, ``RateLimit-*`` headers on or off,
``max_body_bytes`` from 256 bytes to its default) and a sequence of requests, each to a random ASGI app written by hand
(no framework), or behind a Starlette router, whose behaviour is drawn at random: its status, headers (duplicates, odd
casing, ``Content-Length`` right, wrong, huge or absent, JSON / SSE / NDJSON / other content types with parameters,
gzip in one member or several, deflate wrapped or raw; as a list, a tuple, a generator, or none), its body in one or
many chunks (empty ones, ``bytearray`` and ``memoryview`` ones, cut before each line end, ``more_body`` false then
nothing, messages after the end), usage in the JSON body (closing it or not, past the cap or not), in its headers
(valid or malformed), in the last event of a stream or spread across its events (Anthropic's), in events over the cap
or about it, the ASGI extensions the scope advertises (trailers, ``pathsend``, ``zerocopysend``, early hints, server
push), the request body read in part, whole or not at all (several chunks), the client gone at a random point
(``http.disconnect``; a ``send`` raising a disconnect, or the server's refusal), the server cancelling the request, the
app raising or returning before its answer, after its start, mid-body, HEAD requests, CORS preflights, excluded paths,
a ``root_path``; the org in a header (or twice, or two different ones), in ``scope["state"]`` (an auth middleware
around), set by the app while it runs, or nowhere.

Each request is run twice by a hand-written ASGI driver that feeds ``receive`` deterministically and records every
message sent: on the app bare, and on the app wrapped (a fresh app of the same draw each time). The oracle:

* **invisible**: the wrapped run sends the bare run's messages (headers as pairs, bodies as bytes), calls ``receive``
  as often, and raises the same exception; the documented additions only: ``RateLimit-*`` / ``Retry-After`` headers
  appended to the answer of a request gated with the headers on, the gate's refusal (the app not called, or its answer
  to a preflight-shaped request replaced), the ``on_unresolved="reject"`` answer;
* **one event per billable request**, none otherwise: the answer's status (500 when the app failed before its first
  body byte and the client had not gone, or sent nothing), billed unless a 5xx (``bill_server_errors``), a 401/403
  (``bill_auth_failures``), the router's own 404/405/307, an excluded path, a CORS middleware's preflight answer, a
  request without an org, or one the gate refused; its endpoint (the raw path, or the route template), method, user,
  model and tokens read by a reference reader from the bytes the app sent up to the end of its answer;
* **the gate**: in enforce mode a request gated with an org is refused exactly when the calls billed so far reach the
  plan's limit (the gate decides on its own counts: one snapshot read at the first request, a TTL of an hour).

A failing seed prints the draw of the request that failed; replay it by its test id. A defect a seed found is kept
below as a named case.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import json
import random
import zlib
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lago_org_billing import AttributionConfig, BillingSettings, OrgBillingMiddleware
from lago_org_billing._quota import QuotaConfig

pytestmark = pytest.mark.anyio

ORG = "org_a"
ROUTE = "/v1/items/{item_id}"
EXTENSIONS = (
    "http.response.trailers",
    "http.response.pathsend",
    "http.response.zerocopysend",
    "http.response.early_hint",
    "http.response.push",
)
STATUSES = (200,) * 8 + (201, 202, 204, 206, 301, 302, 304, 307, 400, 401, 403, 404, 405, 409, 422, 429, 451)
SERVER_ERRORS = (500, 502, 503, 504)
REQUESTS = 120  # per seed
SEEDS = 20


class ClientDisconnected(OSError):
    """uvicorn's error when the app sends to a client that left (told apart by its name)."""


def _send_errors() -> list[Callable[[], BaseException]]:
    return [
        lambda: BrokenPipeError(32, "Broken pipe"),
        lambda: ConnectionResetError(104, "Connection reset by peer"),
        lambda: anyio.BrokenResourceError(),
        lambda: ClientDisconnected(),
        lambda: RuntimeError("Response content longer than Content-Length"),  # the server refusing it: no disconnect
    ]


class Cancelled(Exception):
    """The driver's record of a request cancelled by its server (hypercorn cancels the app when its client leaves; a
    server's shutdown, a timeout middleware): the cancellation itself is caught by the driver's cancel scope."""


def _cancel() -> BaseException:
    return Cancelled()  # (a marker in the draw: the driver cancels instead of raising it)


#: What a client gone away looks like to the middleware (``_client_went_away``): kept, not made a 500.
WENT_AWAY = (BrokenPipeError, ConnectionResetError, anyio.BrokenResourceError, ClientDisconnected, ClientDisconnect)


class AppFailed(RuntimeError):
    """The app's own failure."""


def _app_errors() -> list[Callable[[], BaseException]]:
    return [
        lambda: AppFailed("the app failed"),
        lambda: TimeoutError("the upstream timed out"),  # an OSError that is the app's failure, not the client's
        lambda: ClientDisconnect(),  # Starlette's: the request body's client left
    ]


# ------------------------------------------------------------------------------------------------- the random apps


@dataclasses.dataclass
class Body:
    """A body chunk as the app sends it: its bytes and its type (``bytes``, ``bytearray``, ``memoryview``)."""

    data: bytes
    kind: str = "bytes"

    def make(self) -> bytes | bytearray | memoryview:
        if self.kind == "bytearray":
            return bytearray(self.data)
        if self.kind == "memoryview":
            return memoryview(self.data)
        return self.data


@dataclasses.dataclass
class Draw:
    """One request and the app answering it, as drawn."""

    index: int
    method: str
    path: str
    routing: str  # "raw" (the app alone), "route" (matched), "unmatched" (404), "slash" (307), "method" (405)
    identity: str  # "header", "state" (set around the middleware), "app" (set by the app while it runs), "none"
    org_headers: list[bytes]  # the X-Org-Id values sent (one; the same twice; two different ones: no org)
    root_path: str  # the scope's root_path ("uvicorn --root-path"), which its path starts with
    preflight: bool
    extensions: tuple[str, ...]
    request_chunks: list[bytes]
    disconnect_at: int | None  # the receive() call answered http.disconnect early
    reads: int  # receive() calls before the answer (-1: until the body ends)
    on_disconnect: str  # "raise", "return", "ignore"
    messages: list[Message]  # what the app sends, in order (bodies as Body)
    listen_at: int | None  # a receive() call before messages[listen_at] (a stream watching for its client)
    stop_at: int | None  # the app stops before messages[stop_at] (raising stop_with, or returning)
    stop_with: Callable[[], BaseException] | None
    send_error_at: int | None  # the driver's send raises on its n-th message (or the server cancels the request)
    send_error: Callable[[], BaseException] | None
    cancel_receive_at: int | None  # the server cancels the request at the n-th receive() call

    def show(self) -> str:
        """The draw, readable (a failing seed prints it)."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        fields["messages"] = [
            {
                k: (v.data, v.kind) if isinstance(v, Body) else ("generator", v.pairs) if isinstance(v, Pairs) else v
                for k, v in message.items()
            }
            for message in self.messages
        ]
        fields["stop_with"] = repr(self.stop_with()) if self.stop_with else None
        fields["send_error"] = repr(self.send_error()) if self.send_error else None
        return json.dumps(fields, default=repr, indent=1)[:6000]


class RandomApp:
    """A raw ASGI app playing a :class:`Draw`."""

    def __init__(self, draw: Draw) -> None:
        self.draw = draw
        self.calls = 0

    async def _disconnected(self) -> bool:
        """The client left: raise, or True to return at once (False: go on as if nothing happened)."""
        if self.draw.on_disconnect == "raise":
            raise ClientDisconnect()
        return self.draw.on_disconnect == "return"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.calls += 1
        draw = self.draw
        if draw.identity == "app":  # the app's auth (an endpoint dependency) sets the org while it runs
            scope["state"]["org_id"] = ORG
        read = 0
        while draw.reads < 0 or read < draw.reads:
            message = await receive()
            read += 1
            if message["type"] == "http.disconnect":
                if await self._disconnected():
                    return
                break
            if not message.get("more_body"):
                break
        for at, planned in enumerate(draw.messages):
            if at == draw.stop_at:
                if draw.stop_with is not None:
                    raise draw.stop_with()
                return
            if at == draw.listen_at:
                message = await receive()
                if message["type"] == "http.disconnect" and await self._disconnected():
                    return
            await send({k: v.make() if isinstance(v, Body) else copy.deepcopy(v) for k, v in planned.items()})
        if draw.stop_at == len(draw.messages) and draw.stop_with is not None:
            raise draw.stop_with()


class Pairs:
    """Response headers as an iterable that is not a list or tuple (ASGI: "Iterable[[byte string, byte string]]"): a
    generator of them each time the app sends its start."""

    def __init__(self, pairs: list[tuple[bytes, bytes]]) -> None:
        self.pairs = pairs

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return (pair for pair in self.pairs)


def _case(rng: random.Random, name: str) -> str:
    return rng.choice([name, name.upper(), name.title(), name.lower()])


def _chunks(rng: random.Random, data: bytes) -> list[Body]:
    """``data`` cut at random points (or before each line end: a server flushing each line before its end), with
    empty chunks here and there."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 5)))) if len(data) > 1 else []
    if rng.random() < 0.25:
        cuts = sorted({at for at in range(1, len(data)) if data[at : at + 1] in (b"\n", b"\r")})
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)] if data else []
    for _ in range(rng.randint(0, 2)):
        pieces.insert(rng.randint(0, len(pieces)), b"")
    if not pieces:
        pieces = [b""]
    return [Body(piece, rng.choice(["bytes", "bytes", "bytearray", "memoryview"])) for piece in pieces]


MODELS = ("gpt-4o-mini", "claude-sonnet-4", "llama3.1")


def _json_body(rng: random.Random, cap: int) -> bytes:
    """An OpenAI- or Anthropic-shaped answer, its usage closing it or first; with vectors (an embedding's) that may
    take it over the cap (``max_body_bytes``): then only a usage closing it is read."""
    model = rng.choice(MODELS)
    prompt, completion = rng.randint(0, 500), rng.randint(0, 500)
    if rng.random() < 0.6:
        usage: dict[str, int] = {"prompt_tokens": prompt, "completion_tokens": completion}
        usage["total_tokens"] = prompt + completion
    else:
        usage = {"input_tokens": prompt, "output_tokens": completion}
    document: dict[str, Any] = {"id": "c1", "model": model, "usage": usage}
    if cap < 1_000_000 and rng.random() < 0.5:
        document = {"object": "list", "data": [{"embedding": [0.25] * rng.randint(1, cap // 2)}], **document}
    if rng.random() < 0.3:
        document = {"usage": usage, **{k: v for k, v in document.items() if k != "usage"}}  # the usage first
    return json.dumps(document, separators=(",", ":") if rng.random() < 0.5 else (", ", ": ")).encode()


def _sse_body(rng: random.Random, cap: int) -> bytes:
    """An OpenAI chat stream (usage in its last chunk) or an Anthropic one (input in message_start, output in the
    message_deltas), with random line ends; under a small cap (``max_body_bytes``), OpenAI chunks over it (skipped,
    but for a usage closing one: an image generation's last event)."""
    model = rng.choice(MODELS)
    events: list[str] = []

    def padded(chunk: dict[str, Any]) -> str:
        """The chunk's JSON, its content made long enough to take it well over the cap, or about to it."""
        text = json.dumps(chunk)
        roll = rng.random()
        if cap > 1_000_000 or roll < 0.5:
            return text
        extra = cap + rng.randint(1, cap) if roll < 0.7 else cap - 1 - len(text) + rng.randint(-5, 3)
        chunk["choices"][0]["delta"]["content"] += "x" * max(extra, 0)
        return json.dumps(chunk)

    if rng.random() < 0.5:
        for word in ("Hel", "lo", "!")[: rng.randint(0, 3)]:
            chunk: dict[str, Any] = {"id": "c1", "model": model, "choices": [{"delta": {"content": word}}]}
            if rng.random() < 0.5:
                chunk["usage"] = None
            events.append(f"data: {padded(chunk)}")
        usage = {"prompt_tokens": rng.randint(1, 400), "completion_tokens": rng.randint(1, 400)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        last = {"id": "c1", "model": model, "choices": [{"delta": {"content": ""}}], "usage": usage}
        events.append(f"data: {padded(last)}")
        events.append("data: [DONE]")
    else:
        start: dict[str, Any] = {"type": "message_start", "message": {"model": model, "usage": {}}}
        start["message"]["usage"]["input_tokens"] = rng.randint(1, 400)
        start["message"]["usage"]["output_tokens"] = 1
        events.append(f"event: message_start\ndata: {json.dumps(start)}")
        output = 1
        for _ in range(rng.randint(1, 3)):
            events.append('event: content_block_delta\ndata: {"type": "content_block_delta", "delta": {"text": "x"}}')
            output += rng.randint(1, 50)
            delta = {"type": "message_delta", "usage": {"output_tokens": output}}
            events.append(f"event: message_delta\ndata: {json.dumps(delta)}")
        events.append('event: message_stop\ndata: {"type": "message_stop"}')
    end = rng.choice(["\n", "\n", "\r\n", "\r"])
    text = "".join(event.replace("\n", end) + end + end for event in events)
    if rng.random() < 0.1:
        text = ": keep-alive" + end + text
    data = text.encode()
    if rng.random() < 0.1:
        data = b"\xef\xbb\xbf" + data
    return data


def _ndjson_body(rng: random.Random) -> bytes:
    """Ollama's stream: a line per chunk, its counts in the last (``done``)."""
    model = rng.choice(MODELS)
    lines = [{"model": model, "response": word, "done": False} for word in ("Hel", "lo")[: rng.randint(0, 2)]]
    last = {"model": model, "response": "", "done": True, "total_duration": 1234}
    last.update(prompt_eval_count=rng.randint(1, 400), eval_count=rng.randint(1, 400))
    return b"".join(json.dumps(line).encode() + rng.choice([b"\n", b"\r\n"]) for line in [*lines, last])


def _encoded(rng: random.Random, body: bytes) -> tuple[bytes, bytes]:
    """``body`` compressed: its ``Content-Encoding`` and bytes (gzip in one member or several, padded with zeros;
    zlib-wrapped or raw deflate; identity)."""
    roll = rng.random()
    if roll < 0.4:
        return rng.choice([b"gzip", b"x-gzip", b"GZIP"]), gzip.compress(body)
    if roll < 0.55:  # a proxy compressing each part on its own: gzip members one after the other
        half = len(body) // 2
        return b"gzip", gzip.compress(body[:half]) + gzip.compress(body[half:]) + b"\x00" * rng.randint(0, 3)
    if roll < 0.75:
        return b"deflate", zlib.compress(body)
    if roll < 0.9:
        raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return b"deflate", raw.compress(body) + raw.flush()
    return b"identity", body


def _decoded(encoding: bytes, data: bytes) -> bytes:
    """What a reader gets of ``data`` (maybe cut off) sent with ``encoding``."""
    encoding = encoding.strip().lower()
    if encoding in (b"gzip", b"x-gzip"):
        out = b""
        while data:
            decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
            try:
                out += decoder.decompress(data)
            except zlib.error:
                break
            data = decoder.unused_data.lstrip(b"\x00")
        return out
    if encoding == b"deflate":
        try:
            return zlib.decompressobj().decompress(data)
        except zlib.error:
            try:
                return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data)
            except zlib.error:
                return b""
    return data


def _token_value(rng: random.Random) -> bytes:
    """A token count as a header gives it: plain, or padded, with a decimal point, malformed."""
    number = rng.randint(0, 300)
    return rng.choice(
        [str(number)] * 6 + [f" {number} ", f"{number}.0", f"0{number}", "abc", "-3", "1e3", "12345678901", ""]
    ).encode()


def draw_request(
    rng: random.Random, index: int, *, excluded_prefix: str, quota_first: bool, cap: int = 1_048_576
) -> Draw:
    """A random request and app."""
    extensions = tuple(name for name in EXTENSIONS if rng.random() < 0.35)
    routing = "raw" if rng.random() < 0.7 else rng.choice(["route"] * 5 + ["unmatched", "slash", "method"])
    method = rng.choice(["GET", "GET", "POST", "POST", "PUT", "HEAD"])
    if routing == "method":
        method = "DELETE"
    preflight = routing == "raw" and rng.random() < 0.08
    if preflight:
        method = "OPTIONS"
    identity = rng.choice(["header", "header", "header", "state", "app", "none"])
    if quota_first:
        identity = "header"  # the gate's one read of Lago: before any event was sent
    if preflight and identity == "app":
        identity = "header"
    org_headers: list[bytes] = []
    if identity == "header":
        org_headers = [ORG.encode()] * (2 if rng.random() < 0.1 else 1)
    elif identity == "none" and rng.random() < 0.2:
        org_headers = [ORG.encode(), b"org_b"]  # two different orgs: ambiguous, trusted neither
    root_path = "/api" if rng.random() < 0.2 else ""
    path = {
        "raw": f"/v1/r{index}",
        "route": f"/v1/items/{index}",
        "unmatched": f"/v1/other/{index}",
        "slash": f"/v1/items/{index}/",
        "method": f"/v1/items/{index}",
    }[routing]
    if routing == "raw" and rng.random() < 0.06:
        path = f"{excluded_prefix}/r{index}"
    path = root_path + path

    status = rng.choice(SERVER_ERRORS) if rng.random() < 0.12 else rng.choice(STATUSES)
    headers: list[tuple[bytes, bytes]] = []
    kind = rng.choice(
        (
            "json",
            "json",
            "json_gzip",
            "sse",
            "sse",
            "sse_gzip",
            "ndjson",
            "headers",
            "text",
            "empty",
            "file",
            "zerocopy",
        )
    )
    if kind == "file" and "http.response.pathsend" not in extensions:
        kind = "text"
    if kind == "zerocopy" and "http.response.zerocopysend" not in extensions:
        kind = "json"
    body = b""
    if kind in ("json", "json_gzip"):
        body = _json_body(rng, cap)
        content_type = rng.choice(
            ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/vnd.x+json"]
        )
    elif kind in ("sse", "sse_gzip"):
        body = _sse_body(rng, cap)
        content_type = rng.choice(["text/event-stream", "text/event-stream; charset=utf-8", "Text/Event-Stream"])
    elif kind == "ndjson":
        body = _ndjson_body(rng)
        content_type = rng.choice(["application/x-ndjson", "application/x-ndjson; charset=utf-8", "application/jsonl"])
    elif kind == "headers":
        body = rng.choice([b"ok", b'{"model": "m", "result": 1}'])
        content_type = rng.choice(["text/plain", "application/json"])
        names = [("x-tokens-used", 0), ("x-total-tokens", 0), ("x-input-tokens", 1), ("x-output-tokens", 2)]
        for name, _ in rng.sample(names, rng.randint(1, len(names))):
            for _ in range(rng.choice([1, 1, 2])):  # a name repeated: the first value is read
                headers.append((_case(rng, name).encode(), _token_value(rng)))
        if rng.random() < 0.5:
            headers.append((_case(rng, "x-model").encode(), rng.choice(MODELS).encode()))
    elif kind == "text":
        body = b"plain text " * rng.randint(0, 5)
        content_type = rng.choice(["text/plain; charset=utf-8", "application/octet-stream", "text/html"])
    else:
        content_type = rng.choice(["application/json", "text/plain"])
    if kind in ("json_gzip", "sse_gzip"):  # compressed by a middleware inside the billing one
        encoding, body = _encoded(rng, body)
        headers.append((_case(rng, "content-encoding").encode(), encoding))
    if kind != "empty" or rng.random() < 0.5:
        headers.append((_case(rng, "content-type").encode(), content_type.encode()))
    length = rng.random()
    if length < 0.4:
        headers.append((_case(rng, "content-length").encode(), str(len(body)).encode()))
    elif length < 0.5:
        wrong = rng.choice([str(len(body) + 7), "99999999", "abc", "2000000", f"{len(body)}, {len(body)}", "-1"])
        headers.append((_case(rng, "content-length").encode(), wrong.encode()))
    for _ in range(rng.randint(0, 2)):
        headers.append((_case(rng, "x-request-id").encode(), str(rng.randint(0, 9)).encode()))
    if preflight and rng.random() < 0.6:  # a CORS middleware's preflight answer (further in)
        headers.append((_case(rng, "access-control-allow-methods").encode(), b"GET, POST"))
    rng.shuffle(headers)
    trailers = "http.response.trailers" in extensions and rng.random() < 0.5

    messages: list[Message] = []
    if "http.response.early_hint" in extensions and rng.random() < 0.5:
        messages.append({"type": "http.response.early_hint", "links": [b'</style.css>; rel="preload"; as="style"']})
    start: Message = {"type": "http.response.start", "status": status, "headers": headers}
    if trailers:
        start["trailers"] = True
    shape = rng.random()
    if shape < 0.1:
        start["headers"] = tuple(headers)
    elif shape < 0.2:
        start["headers"] = Pairs(headers)  # any iterable, as ASGI allows (a generator)
    elif shape < 0.25 and not headers:
        del start["headers"]  # (optional: none)
    messages.append(start)
    if "http.response.push" in extensions and rng.random() < 0.3:
        messages.append({"type": "http.response.push", "path": "/style.css", "headers": []})
    if kind == "file":
        messages.append({"type": "http.response.pathsend", "path": "/srv/files/report.pdf"})
    elif kind == "zerocopy":
        pieces = rng.randint(1, 2)
        for piece in range(pieces):
            last = piece == pieces - 1
            zerocopy: Message = {"type": "http.response.zerocopysend", "file": 7, "count": 10}
            if not last or rng.random() < 0.5:
                zerocopy["more_body"] = not last
            messages.append(zerocopy)
    else:
        chunks = _chunks(rng, body)
        ending = rng.random()
        for at, chunk in enumerate(chunks):
            message: Message = {"type": "http.response.body", "body": chunk}
            last = at == len(chunks) - 1
            if not last or ending < 0.3:
                message["more_body"] = True
            elif ending < 0.5:
                message["more_body"] = False
            messages.append(message)  # (the last one without more_body, or with it false, ends the answer)
        if ending < 0.3:  # all of it with more_body, then an empty message ends it
            messages.append(
                {"type": "http.response.body"}
                if rng.random() < 0.5
                else {"type": "http.response.body", "body": b"", "more_body": False}
            )
    if trailers:
        messages.append(
            {"type": "http.response.trailers", "headers": [(b"x-checksum", b"abc")], "more_trailers": False}
        )
    elif rng.random() < 0.05:  # after the end (a server ignores it, or refuses it): not the client's answer
        if rng.random() < 0.5:
            late = b'{"model": "late", "usage": {"prompt_tokens": 1000, "completion_tokens": 1, "total_tokens": 1001}}'
            messages.append({"type": "http.response.body", "body": Body(late)})
        else:  # an error middleware's answer to a background task failing after the response
            messages.append(
                {"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]}
            )
            messages.append({"type": "http.response.body", "body": Body(b"Internal Server Error")})

    stop_at: int | None = None
    stop_with: Callable[[], BaseException] | None = None
    if rng.random() < 0.3:
        stop_at = rng.randint(0, len(messages))
        stop_with = rng.choice([*_app_errors(), None])
    listen_at = rng.randrange(len(messages)) if rng.random() < 0.2 else None
    request_chunks = [rng.choice([b"", b"{", b'"q": 1', b"}"]) for _ in range(rng.randint(0, 3))]
    send_error_at = send_error = None
    if not preflight and rng.random() < 0.12:
        send_error_at = rng.randint(0, len(messages))
        send_error = rng.choice([*_send_errors(), _cancel])
    cancel_receive_at = rng.randint(0, 2) if rng.random() < 0.04 else None
    return Draw(
        index=index,
        method=method,
        path=path,
        routing=routing,
        identity=identity,
        org_headers=org_headers,
        root_path=root_path,
        preflight=preflight,
        extensions=extensions,
        request_chunks=request_chunks,
        disconnect_at=rng.randint(0, 4) if rng.random() < 0.2 else None,
        reads=rng.choice([0, 0, 1, 2, -1, -1]),
        on_disconnect=rng.choice(["raise", "return", "ignore"]),
        messages=messages,
        listen_at=listen_at,
        stop_at=stop_at,
        stop_with=stop_with,
        send_error_at=send_error_at,
        send_error=send_error,
        cancel_receive_at=cancel_receive_at,
    )


def app_for(draw: Draw) -> tuple[ASGIApp, RandomApp]:
    """A fresh app playing ``draw`` (the app alone, or behind a Starlette router), and the raw app it runs."""
    raw = RandomApp(draw)
    if draw.routing == "raw":
        return raw, raw
    return Starlette(routes=[Route(ROUTE, raw, methods=["GET", "POST", "PUT"])]), raw


# ------------------------------------------------------------------------------------------------------ the driver


@dataclasses.dataclass
class Trace:
    """What an app did with one request: every message it sent (tried: the last may have raised), the receive()
    calls, the exception it raised."""

    sent: list[Message]
    receives: int
    error: BaseException | None
    calls: int


def normalized(message: Message) -> Message:
    out = dict(message)
    if out["type"] == "http.response.start" or "headers" in out:  # (a start's are optional: none, [])
        out["headers"] = [(bytes(name), bytes(value)) for name, value in out.get("headers", [])]
    if "body" in out:
        out["body"] = bytes(out["body"])
    return out


async def drive(app: tuple[ASGIApp, RandomApp], draw: Draw, state: dict[str, Any]) -> Trace:
    """Run one request through ``app``: the request body in chunks (http.disconnect once they are read, or early),
    every message sent recorded, the send raising when the draw says so."""
    headers = [(b"host", b"testserver"), (b"x-user-id", f"u{draw.index}".encode())]
    headers += [(b"x-org-id", value) for value in draw.org_headers]
    if draw.preflight:
        headers += [(b"origin", b"https://app.example"), (b"access-control-request-method", b"POST")]
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": draw.method,
        "scheme": "http",
        "path": draw.path,
        "raw_path": draw.path.encode(),
        "query_string": b"",
        "root_path": draw.root_path,
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
        "state": state,
        "extensions": {name: {} for name in draw.extensions},
    }
    sent: list[Message] = []
    receives = 0
    cancelled = anyio.CancelScope()

    async def receive() -> Message:
        nonlocal receives
        at = receives
        receives += 1
        if at == draw.cancel_receive_at:
            cancelled.cancel()
            await anyio.lowlevel.checkpoint()
        if draw.disconnect_at is not None and at >= draw.disconnect_at:
            return {"type": "http.disconnect"}
        if at < len(draw.request_chunks):
            return {
                "type": "http.request",
                "body": draw.request_chunks[at],
                "more_body": at < len(draw.request_chunks) - 1,
            }
        if at == 0:
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(normalized(message))
        if draw.send_error_at is not None and len(sent) - 1 == draw.send_error_at:
            assert draw.send_error is not None
            if draw.send_error is _cancel:
                cancelled.cancel()
                await anyio.lowlevel.checkpoint()
            raise draw.send_error()

    error: BaseException | None = None
    made, raw = app
    try:
        with cancelled:
            await made(scope, receive, send)
    except Exception as exc:
        error = exc
    if cancelled.cancelled_caught:
        assert error is None
        error = Cancelled()
    return Trace(sent, receives, error, raw.calls)


# ------------------------------------------------------------------------------------------------------ the oracle


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def answer_of(trace: Trace) -> tuple[Message | None, list[Message], bool, bool]:
    """The answer's start, the messages of its body read for usage (up to its end), whether it ended and whether a
    body byte (or a file) went out."""
    start: Message | None = None
    body: list[Message] = []
    ended = sent = False
    for message in trace.sent:
        kind = message["type"]
        if kind == "http.response.start" and start is None:
            start = message
        elif start is not None and not ended:
            if kind == "http.response.body":
                body.append(message)
                if not message.get("more_body"):
                    ended = True
                if message.get("body"):
                    sent = True
            elif kind == "http.response.pathsend":
                ended = sent = True
            elif kind == "http.response.zerocopysend":
                sent = True
                if not message.get("more_body"):
                    ended = True
    return start, body, ended, sent


def expected_status(trace: Trace) -> int:
    """The status billed: the app's, or 500 when it sent none, or failed before its first body byte (not because its
    client went away): before its end, or at an end without a byte nor a declared length (an empty stream closed for
    it, as Starlette's BaseHTTPMiddleware closes a failed app's)."""
    start, _, ended, sent = answer_of(trace)
    if start is None:
        return 500
    if trace.error is not None and not sent and not went_away(trace.error):
        length = any(name.lower() == b"content-length" for name, _ in start.get("headers") or ())
        if not ended or not length:
            return 500
    return int(start["status"])


def went_away(error: BaseException) -> bool:
    return isinstance(error, WENT_AWAY) and not isinstance(error, TimeoutError)


#: A usage object closes a JSON body over the cap when at most this many characters follow it (``_attribution``'s
#: ``_CLOSING``: OpenAI's ``service_tier`` and ``system_fingerprint``...).
CLOSING = 12_288


def _sse_events(data: bytes) -> list[bytes]:
    """The data of an event stream's events, as the SSE standard reads them (a stream cut off: its last line read as
    it is, its pending event dispatched)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    events: list[bytes] = []
    pending: list[bytes] = []
    for line in lines:
        if not line:
            if pending:
                events.append(b"\n".join(pending))
                pending.clear()
        elif line.startswith(b"data:"):
            value = line[5:]
            pending.append(value[1:] if value[:1] == b" " else value)
    if pending:
        events.append(b"\n".join(pending))
    return events


def _closing_usage(text: str) -> tuple[Any, int] | None:
    """The value of the last ``"usage"`` member in ``text`` and how many characters follow it."""
    at = text.rfind('"usage"')
    if at < 0:
        return None
    rest = text[at + 7 :].lstrip(" \t")
    if rest[:1] != ":":
        return None
    rest = rest[1:].lstrip(" \t")
    try:
        value, end = json.JSONDecoder().raw_decode(rest)
    except ValueError:
        return None
    return value, len(rest) - end


def _token_header(value: bytes) -> int | None:
    """A header's token count as documented: a whole number from 0 to 10**9 (blanks around, ``.0`` after, taken);
    anything else is missing."""
    text = value.strip()
    whole, dot, zeros = text.partition(b".")
    if dot and (not zeros or zeros.strip(b"0")):
        return None
    if not (0 < len(whole) <= 10 and whole.isdigit()):
        return None
    number = int(whole)
    return number if number <= 10**9 else None


Counts = tuple[str | None, int, int, int]
NONE: Counts = (None, 0, 0, 0)


def expected_usage(trace: Trace, cap: int) -> Counts:
    """Model, input, output and total tokens a reader should find in what the app sent (the shapes it draws), with
    ``max_body_bytes`` = ``cap``."""
    start, body, _, _ = answer_of(trace)
    if start is None:
        return NONE
    headers = start["headers"]
    found = _header_usage(headers)
    if found is not None:
        return found
    content_type = (_header(headers, b"content-type") or [b""])[-1].split(b";")[0].strip().lower()
    data = b"".join(message.get("body", b"") for message in body)
    for encoding in _header(headers, b"content-encoding"):
        data = _decoded(encoding, data)
    if content_type == b"application/json" or content_type.endswith(b"+json"):
        over = len(data) > cap
        for value in _header(headers, b"content-length"):  # (the last one read)
            try:
                over = over or int(value) > cap
            except ValueError:
                pass
        return _json_usage(data, over)
    if content_type == b"text/event-stream":
        return _sse_usage(data, cap)
    if content_type in (b"application/x-ndjson", b"application/jsonl"):
        return _ndjson_usage(data)
    return NONE


def _header_usage(headers: list[tuple[bytes, bytes]]) -> Counts | None:
    """The usage the answer's headers give (``None``: none): per field the first name present, its first value
    (malformed: missing)."""
    values: dict[str, int] = {}
    for field, names in (
        ("total", (b"x-tokens-used", b"x-total-tokens")),
        ("input", (b"x-input-tokens",)),
        ("output", (b"x-output-tokens",)),
    ):
        for name in names:
            found = _header(headers, name)
            if found:
                number = _token_header(found[0])
                if number is not None:
                    values[field] = number
                break
    model = _header(headers, b"x-model")
    if not values and not model:
        return None
    total = values.get("total", values.get("input", 0) + values.get("output", 0))
    return model[0].decode() if model else None, values.get("input", 0), values.get("output", 0), total


def _json_usage(data: bytes, over: bool) -> Counts:
    """A JSON body's usage (``over`` the cap: only its ends are kept, its usage read if it closes the body)."""
    try:
        document = json.loads(data)
    except ValueError:
        return NONE
    usage = document.get("usage") if isinstance(document, dict) else None
    if not isinstance(usage, dict):
        return NONE
    if over:
        closing = _closing_usage(data.decode())
        if closing is None or closing[1] > CLOSING:
            return NONE
    counts: dict[str, int] = usage
    prompt = counts.get("prompt_tokens", counts.get("input_tokens", 0))
    completion = counts.get("completion_tokens", counts.get("output_tokens", 0))
    return document.get("model"), prompt, completion, counts.get("total_tokens", prompt + completion)


def _sse_usage(data: bytes, cap: int) -> Counts:
    """An OpenAI or Anthropic stream's usage: the last values of each count (an event over the cap skipped, but for a
    usage closing it)."""
    model: str | None = None
    prompt = completion = 0
    total: int | None = None
    for event in _sse_events(data):
        if len(event) + event.count(b"\n") + 1 > cap:
            closing = _closing_usage(event[-65_536:].decode("utf-8", "replace"))
            if closing is not None and isinstance(closing[0], dict) and "prompt_tokens" in closing[0]:
                usage = closing[0]
                prompt, completion, total = usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]
            continue
        try:
            document = json.loads(event)
        except ValueError:
            continue
        if not isinstance(document, dict):
            continue
        if isinstance(document.get("usage"), dict) and "prompt_tokens" in document["usage"]:
            usage = document["usage"]
            model, prompt, completion = document["model"], usage["prompt_tokens"], usage["completion_tokens"]
            total = usage["total_tokens"]
        elif document.get("type") == "message_start":
            model = document["message"]["model"]
            prompt = document["message"]["usage"]["input_tokens"]
            completion = document["message"]["usage"]["output_tokens"]
        elif document.get("type") == "message_delta":
            completion = document["usage"]["output_tokens"]
        elif model is None and isinstance(document.get("model"), str):
            model = document["model"]
    return model, prompt, completion, prompt + completion if total is None else total


def _ndjson_usage(data: bytes) -> Counts:
    """Ollama's stream's usage: the counts of its last line (``done``), the model of its first."""
    model: str | None = None
    prompt = completion = 0
    for line in data.replace(b"\r", b"\n").split(b"\n"):  # (the last one read as it is: a stream cut off)
        try:
            document = json.loads(line)
        except ValueError:
            continue
        model = model or document["model"]
        if document["done"] is True:
            prompt, completion = document["prompt_eval_count"], document["eval_count"]
    return model, prompt, completion, prompt + completion


def cors_answer(trace: Trace) -> bool:
    start, _, _, _ = answer_of(trace)
    return start is not None and bool(_header(start["headers"], b"access-control-allow-methods"))


@dataclasses.dataclass
class Config:
    """A seed's settings."""

    bill_server_errors: bool
    bill_auth_failures: bool
    on_unresolved: str
    quota_mode: str
    limit: int
    quota_headers: bool
    cap: int  # AttributionConfig.max_body_bytes

    @staticmethod
    def draw(rng: random.Random) -> Config:
        return Config(
            bill_server_errors=rng.random() < 0.5,
            bill_auth_failures=rng.random() < 0.3,
            on_unresolved=rng.choice(["allow", "allow", "reject"]),
            quota_mode=rng.choice(["off", "monitor", "enforce", "enforce"]),
            limit=rng.choice([2, 3, 5, 10, 20, 40]),
            quota_headers=rng.random() < 0.7,
            cap=rng.choice([1_048_576, 1_048_576, 256, 1_000, 4_096]),
        )


EXCLUDED = "/health"


def billable(config: Config, draw: Draw, bare: Trace, status: int) -> bool:
    """Whether the request is billed (with an org), as the middleware's docstring and README say."""
    if draw.preflight and cors_answer(bare):
        return False  # a CORS middleware's preflight answer, no API call
    if status >= 500:  # (a router's own answer too, when cut before its body by a cancellation: "crashed")
        return config.bill_server_errors
    if draw.routing in ("unmatched", "slash", "method"):
        return False  # the router's own 404, 307, 405
    if status in (401, 403):
        return config.bill_auth_failures
    return True


def check_request(
    config: Config, draw: Draw, bare: Trace, wrapped: Trace, events: list[dict[str, Any]], billed_so_far: int
) -> bool:
    """Check one request's wrapped run against its bare run and the events; whether it was billed (one event)."""
    excluded = draw.path.startswith((EXCLUDED + "/", draw.root_path + EXCLUDED + "/"))
    mine = [event for event in events if event["properties"].get("user_id") == f"u{draw.index}"]
    org_known_before = draw.identity in ("header", "state")
    gated = config.quota_mode != "off" and org_known_before and not excluded
    refused = gated and config.quota_mode == "enforce" and billed_so_far >= config.limit
    rejected = config.on_unresolved == "reject" and not org_known_before and not excluded and not draw.preflight
    if rejected or (refused and not draw.preflight):
        # the middleware's own answer: the app never ran, nothing billed
        assert wrapped.calls == 0 and wrapped.receives == 0, "the app ran"
        start = wrapped.sent[0]
        assert start["type"] == "http.response.start"
        assert start["status"] == (401 if rejected else 429), start
        assert _header(start["headers"], b"content-type") == [b"application/problem+json"]
        if wrapped.error is None:
            assert wrapped.sent[-1]["type"] == "http.response.body" and not wrapped.sent[-1].get("more_body")
        else:  # (the client left while it went out)
            assert draw.send_error is not None and type(wrapped.error) is type(draw.send_error()), wrapped.error
        assert mine == []
        return False
    assert wrapped.calls == bare.calls
    assert wrapped.receives == bare.receives
    replaced = False
    if draw.preflight and not excluded and not cors_answer(bare) and answer_of(bare)[0] is not None:
        # an endpoint's answer to a request in a preflight's shape: the gate's refusal, or the rejection of a request
        # without an org, goes out in its place
        replaced = refused or (config.on_unresolved == "reject" and draw.identity == "none")
    if replaced:
        start = next(message for message in wrapped.sent if message["type"] == "http.response.start")
        assert start["status"] == (429 if refused else 401), start
        assert type(wrapped.error) is type(bare.error)
        assert mine == []
        return False
    # invisible: the same messages, RateLimit-* headers appended to a gated request's start (when on)
    assert len(wrapped.sent) == len(bare.sent), (wrapped.sent, bare.sent)
    starts = 0
    for ours, theirs in zip(wrapped.sent, bare.sent, strict=True):
        if ours["type"] == "http.response.start" and theirs["type"] == "http.response.start":
            starts += 1
            added = ours["headers"][len(theirs["headers"]) :]
            assert ours["headers"][: len(theirs["headers"])] == theirs["headers"]
            assert {k: v for k, v in ours.items() if k != "headers"} == {
                k: v for k, v in theirs.items() if k != "headers"
            }
            names = {name for name, _ in added}
            assert names <= {b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset", b"retry-after"}, added
            if not (gated and config.quota_headers) or refused or starts > 1:  # (a second: after the end)
                assert added == [], added
            else:
                assert b"ratelimit-remaining" in names, added
        else:
            assert ours == theirs
    assert type(wrapped.error) is type(bare.error) and str(wrapped.error) == str(bare.error)
    # the event
    if refused:  # (a preflight answered by a CORS middleware: passed on, nothing billed)
        assert mine == []
        return False
    status = expected_status(bare)
    has_org = draw.identity in ("header", "state") or (draw.identity == "app" and bare.calls > 0)
    if excluded or not has_org or not billable(config, draw, bare, status):
        assert mine == [], (status, mine)
        return False
    assert len(mine) == 1, (status, mine)
    props = mine[0]["properties"]
    model, prompt, completion, total = expected_usage(bare, config.cap)
    expected = {
        "org_id": ORG,
        # (a 404 of an app without Starlette routing: "<unmatched>", one value however many paths are probed)
        "endpoint": ROUTE
        if draw.routing in ("route", "method")  # (a 405's route matched its path: a 5xx of it is billed so)
        else "<unmatched>"
        if status == 404 or draw.routing != "raw"
        else draw.path,
        "method": draw.method,
        "status_code": status,
        "model": model,
        "input_tokens": prompt,
        "output_tokens": completion,
        "total_tokens": total,
    }
    assert {key: props.get(key) for key in expected} == expected, (props, expected)
    return True


def settings_for(fake_lago: Any, config: Config) -> BillingSettings:
    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription(ORG, "starter", external_id=ORG)
    return BillingSettings(
        api_url=fake_lago.base_url,
        api_key=fake_lago.api_key,
        org_header="X-Org-Id",
        user_header="X-User-Id",
        exclude_paths=(EXCLUDED,),
        quota_mode=config.quota_mode,  # type: ignore[arg-type]
        plan_limits={"starter": {"max_api_calls": config.limit}},
        usage_cache_ttl=3600,  # the gate decides on its own counts after its first read of Lago
        retry_backoff=0.001,
    )


async def run_seed(fake_lago: Any, seed: int, requests: int = REQUESTS) -> None:
    rng = random.Random(seed)
    config = Config.draw(rng)
    settings = settings_for(fake_lago, config)
    middleware = OrgBillingMiddleware(
        _Dispatch(),
        settings=settings,
        transport=fake_lago.transport(),
        on_unresolved=config.on_unresolved,  # type: ignore[arg-type]
        bill_server_errors=config.bill_server_errors,
        bill_auth_failures=config.bill_auth_failures,
        quota_config=QuotaConfig(headers=config.quota_headers) if config.quota_mode != "off" else None,
        attribution=AttributionConfig(max_body_bytes=config.cap),
    )
    dispatch = middleware.app
    assert isinstance(dispatch, _Dispatch)
    draws: list[Draw] = []
    traces: list[tuple[Trace, Trace]] = []
    try:
        for index in range(requests):
            first = index == 0 and config.quota_mode != "off"
            draw = draw_request(rng, index, excluded_prefix=EXCLUDED, quota_first=first, cap=config.cap)
            draws.append(draw)
            state: dict[str, Any] = {"org_id": ORG} if draw.identity == "state" else {}
            bare = await drive(app_for(draw), draw, dict(state))
            made = app_for(draw)
            dispatch.app = made[0]
            wrapped = await drive((middleware, made[1]), draw, dict(state))
            traces.append((bare, wrapped))
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    events = fake_lago.events
    billed = 0
    for draw, (bare, wrapped) in zip(draws, traces, strict=True):
        try:
            if check_request(config, draw, bare, wrapped, events, billed):
                billed += 1
        except AssertionError as exc:
            raise AssertionError(
                f"seed {seed} {config}, request {draw.index}:\n{draw.show()}\nbare: {bare}\nwrapped: {wrapped}"
            ) from exc
    assert len(events) == billed
    assert len({event["transaction_id"] for event in events}) == billed
    assert middleware.stats["billed"] == billed
    excluded = [draw for draw in draws if draw.path.startswith((EXCLUDED + "/", draw.root_path + EXCLUDED + "/"))]
    assert middleware.stats["excluded"] == len(excluded)


class _Dispatch:
    """The app inside the middleware: the current request's app (the middleware is built once per seed)."""

    def __init__(self) -> None:
        self.app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.app is not None
        await self.app(scope, receive, send)


@pytest.mark.parametrize("seed", range(SEEDS))
async def test_random_apps_wrapped_and_bare(fake_lago: Any, seed: int) -> None:
    """The billing middleware around random raw ASGI apps sends what the bare app sends (but its documented
    additions), raises what it raises, and bills each billable request exactly once with its status, endpoint, model
    and tokens (none for the others)."""
    await run_seed(fake_lago, seed)


# ------------------------------------------------------------------------------------------ defects the seeds found


def _generator_headers_app(status: int, headers: list[tuple[bytes, bytes]]) -> ASGIApp:
    """A raw ASGI app answering ``status`` with ``headers`` given as a generator (ASGI: any iterable of pairs)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": (pair for pair in headers)})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


async def _answer(app: ASGIApp, method: str, headers: list[tuple[bytes, bytes]], scheme: str = "http") -> Message:
    """The ``http.response.start`` that ``app`` sends for one request (headers as pairs)."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(normalized(message))

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": "/v1/chat",
        "raw_path": b"/v1/chat",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "state": {},
    }
    await app(scope, receive, send)
    return sent[0]


async def test_generator_headers_of_an_answer_to_a_preflight_shaped_request_reach_the_client(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The headers of an answer to a request in a CORS preflight's shape (OPTIONS with Origin and
    Access-Control-Request-Method, no Starlette CORSMiddleware inside) reach the client whatever iterable holds them.

    Seed 2, request 55: a raw app (a CORS handler further in) answered with its headers as a generator, as ASGI allows
    (any iterable of pairs). The middleware's preflight watcher looked for ``Access-Control-Allow-Methods`` with
    ``any()`` on that generator, consuming it, before the generic watcher listed what was left: the client got the
    answer without the headers up to that one (``Access-Control-Allow-Methods`` itself: the browser's preflight
    failed), or without any header at all when it had none (an endpoint's answer: its Content-Type lost, its usage
    headers unread)."""
    preflight = [
        (b"x-org-id", b"org_a"),
        (b"origin", b"https://app.example"),
        (b"access-control-request-method", b"POST"),
    ]
    cors = [(b"access-control-allow-origin", b"*"), (b"access-control-allow-methods", b"POST"), (b"vary", b"origin")]
    endpoint = [(b"content-type", b"application/json"), (b"x-tokens-used", b"42")]
    middleware = OrgBillingMiddleware(_Dispatch(), settings=header_settings, transport=fake_lago.transport())
    dispatch = middleware.app
    assert isinstance(dispatch, _Dispatch)
    try:
        for headers in (cors, endpoint):
            dispatch.app = _generator_headers_app(200, headers)
            bare = await _answer(dispatch.app, "OPTIONS", preflight)
            wrapped = await _answer(middleware, "OPTIONS", preflight)
            assert bare["headers"] == headers
            assert wrapped["headers"] == headers
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    # the CORS answer passed on unbilled, the endpoint's billed with its tokens
    assert [event["properties"]["total_tokens"] for event in fake_lago.events] == [42]
    assert middleware.stats["preflight"] == 1


async def test_generator_headers_of_a_307_reach_the_client_with_an_https_redirect_middleware_inside(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """An endpoint's 307 in an app with Starlette's ``HTTPSRedirectMiddleware`` keeps its headers (its ``Location``)
    whatever iterable holds them.

    With that middleware inside, the watcher notes a 307's ``Location`` (to tell the middleware's redirect from an
    endpoint's) by iterating its headers: a generator (ASGI allows any iterable) was consumed there, and the generic
    watcher then listed nothing: the client got a 307 without ``Location`` nor any other header."""
    from starlette.middleware.httpsredirect import HTTPSRedirectMiddleware

    headers = [(b"location", b"https://testserver/v2/chat"), (b"content-type", b"application/json")]
    app = HTTPSRedirectMiddleware(_generator_headers_app(307, headers))
    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    try:
        wrapped = await _answer(middleware, "GET", [(b"x-org-id", b"org_a")], scheme="https")
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert (wrapped["status"], wrapped["headers"]) == (307, headers)
    assert [event["properties"]["status_code"] for event in fake_lago.events] == [307]  # an endpoint's: billed


@pytest.mark.parametrize("cut", [None, "before its line end", "in its last bytes"])
async def test_a_stream_event_at_the_cap_is_read_alike_however_the_stream_is_cut(
    fake_lago: Any, header_settings: BillingSettings, cut: str | None
) -> None:
    """A server-sent event whose data is within ``max_body_bytes`` is read whole (its model, its usage) however the
    stream is cut into chunks.

    Seed 10, request 70 (cap 1,000): an OpenAI chunk whose data was a few bytes under the cap came in a chunk without
    its line end (a server flushing each line before its newline, or a stream cut there). The reader held the line so
    far and dropped it as over the cap when it passed the cap, ``data: `` included, while a line arriving whole is
    measured by its data: the same event read whole in one chunking, dropped in the other, read then only for a usage
    closing it (its model lost, and every count of an event whose usage does not close it: Anthropic's
    ``message_start``)."""
    cap = 256
    usage = {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    chunk: dict[str, Any] = {
        "id": "c1",
        "model": "gpt-4o-mini",
        "choices": [{"delta": {"content": ""}}],
        "usage": usage,
    }
    chunk["choices"][0]["delta"]["content"] = "x" * (cap - 1 - len(json.dumps(chunk)))
    data = json.dumps(chunk).encode()
    assert len(data) + 1 == cap  # (its data and line end: at the cap, not over)
    stream = b"data: " + data + b"\n\ndata: [DONE]\n\n"
    at = {None: len(stream), "before its line end": len(data) + 6, "in its last bytes": len(data) + 3}[cut]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": stream[:at], "more_body": True})
        await send({"type": "http.response.body", "body": stream[at:]})

    middleware = OrgBillingMiddleware(
        app,
        settings=header_settings,
        transport=fake_lago.transport(),
        attribution=AttributionConfig(max_body_bytes=cap),
    )
    try:
        await _answer(middleware, "POST", [(b"x-org-id", b"org_a")])
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    [event] = fake_lago.events
    assert (event["properties"].get("model"), event["properties"]["total_tokens"]) == ("gpt-4o-mini", 11)
