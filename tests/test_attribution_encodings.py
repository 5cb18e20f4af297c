"""Token attribution from response bodies that are not plain JSON, through a real
Starlette app, the billing middleware (httpx.ASGITransport) and the Lago emulator, and through the recorder itself.

Covered here:

- ``Content-Encoding: br`` (brotli-asgi inside the billing middleware) and ``zstd`` bodies: read when a decoder module
  is importable (``brotli``/``brotlicffi``; ``compression.zstd``/``backports.zstd``/``zstandard``), JSON and event
  streams, in any chunks, several zstd frames; a bomb bounded as gzip's is (its pieces stay small, its reading stops
  at the inflation budget); without the module, the request is still billed (0 tokens) and one warning per process
  names the encoding and the fixes (the middleware order, the module to install). The decoder modules are not
  dependencies of the package: stand-ins with the same API are put in ``sys.modules`` here (the real modules are
  tested too where installed);
- gzip/deflate still read, and bounded after decompression (a JSON bomb keeps at most its ends in memory);
- Anthropic Messages ``usage.iterations`` of the advisor tool (``advisor_message``: the advisor model's sampling,
  not in the top-level counts) billed once, JSON and streamed; an iterations list that a gateway already rolled into
  the top-level counts is not added again;
- SSE streams split at every byte (multi-byte UTF-8 across chunks, ``\\r\\n``, comments, ``data:`` without a
  space), a usage repeated in an earlier and the last chunk (counted once), and the Responses API's
  ``response.completed``.
"""

from __future__ import annotations

import gzip
import json
import logging
import sys
import types
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from lago_org_billing import BillingSettings, OrgBillingMiddleware, _attribution
from lago_org_billing._attribution import AttributionConfig, Usage, UsageRecorder, json_usage, reset_warnings

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}
JSON = b"application/json"
SSE = b"text/event-stream"

OPENAI_CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "h\u00e9llo \u2713"}}],
    "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
}
ANTHROPIC_EVENTS = [
    ("message_start", {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x", "usage": {
        "input_tokens": 10, "output_tokens": 1}}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "delta": {"text": "h\u00e9llo \u2713 \U0001f600"}}),
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 7}}),
    ("message_stop", {"type": "message_stop"}),
]  # fmt: skip


def sse_stream(events: list[tuple[str, Any]], *, newline: bytes = b"\n", space: bool = True) -> bytes:
    out = b""
    for name, data in events:
        out += b": keep-alive" + newline + b"event: " + name.encode() + newline
        out += b"data:" + (b" " if space else b"") + json.dumps(data, ensure_ascii=False).encode() + newline + newline
    return out


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with no warning said, and the decoder modules looked up anew (a stand-in or none)."""
    reset_warnings()
    monkeypatch.setattr(_attribution, "_codecs", {}, raising=False)
    yield
    reset_warnings()


# -- stand-ins of the decoder modules (same API; deflate underneath) --------------------------------------------------


class _BrotliError(Exception):
    pass


class _FakeBrotliDecompressor:
    """``brotli.Decompressor`` (1.2): ``process(data, output_buffer_limit=)``, ``can_accept_more_data()``,
    ``is_finished()``; raw deflate underneath."""

    biggest = 0  # the largest piece returned (a bomb's pieces must stay bounded)

    def __init__(self) -> None:
        self._d = zlib.decompressobj(-zlib.MAX_WBITS)
        self._tail = b""
        self._full = False

    def process(self, data: bytes, output_buffer_limit: int | None = None) -> bytes:
        if data and not self.can_accept_more_data():
            raise _BrotliError("input given before the output was drained")
        if self._d.eof and data:
            raise _BrotliError("brotli: decoder failed")
        try:
            out = self._d.decompress(self._tail + bytes(data), output_buffer_limit or 0)
        except zlib.error as exc:
            raise _BrotliError("brotli: decoder failed") from exc
        self._tail = self._d.unconsumed_tail
        self._full = bool(output_buffer_limit) and len(out) >= (output_buffer_limit or 0)
        type(self).biggest = max(type(self).biggest, len(out))
        return out

    def can_accept_more_data(self) -> bool:
        return not self._tail and not self._full

    def is_finished(self) -> bool:
        return self._d.eof


def fake_brotli() -> types.ModuleType:
    module = types.ModuleType("brotli")
    module.error = _BrotliError  # type: ignore[attr-defined]
    module.Decompressor = _FakeBrotliDecompressor  # type: ignore[attr-defined]
    _FakeBrotliDecompressor.biggest = 0
    return module


def br(data: bytes) -> bytes:
    """What the stand-in decodes (raw deflate)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


class _ZstdError(Exception):
    pass


class _FakeZstdDecompressor:
    """``compression.zstd.ZstdDecompressor`` (backports.zstd): one frame; ``decompress(data, max_length)``, ``eof``,
    ``needs_input``, ``unused_data``; zstd's magic number and a gzip member underneath (a frame)."""

    biggest = 0

    def __init__(self) -> None:
        self._d = zlib.decompressobj(zlib.MAX_WBITS | 16)
        self._tail = b""
        self._magic = 0
        self.needs_input = True

    @property
    def eof(self) -> bool:
        return self._d.eof

    @property
    def unused_data(self) -> bytes:
        return self._d.unused_data

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        if self._d.eof:
            raise EOFError("Already at the end of a Zstandard frame.")
        data = self._tail + bytes(data)
        if self._magic < 4:  # a frame's magic number first
            taken = data[: 4 - self._magic]
            if taken != ZSTD_MAGIC[self._magic : self._magic + len(taken)]:
                raise _ZstdError("Unknown frame descriptor")
            self._magic += len(taken)
            data = data[len(taken) :]
        try:
            out = self._d.decompress(data, max_length if max_length >= 0 else 0)
        except zlib.error as exc:
            raise _ZstdError(str(exc)) from exc
        self._tail = self._d.unconsumed_tail
        self.needs_input = not self._tail and (max_length < 0 or len(out) < max_length)
        type(self).biggest = max(type(self).biggest, len(out))
        return out


def fake_zstd() -> types.ModuleType:
    module = types.ModuleType("backports.zstd")
    module.ZstdError = _ZstdError  # type: ignore[attr-defined]
    module.ZstdDecompressor = _FakeZstdDecompressor  # type: ignore[attr-defined]
    _FakeZstdDecompressor.biggest = 0
    return module


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def zst(data: bytes) -> bytes:
    """One frame, as the stand-in reads it (zstd's magic number, then a gzip member)."""
    return ZSTD_MAGIC + gzip.compress(data)


def without_modules(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


def with_brotli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "brotli", fake_brotli())


def with_zstd(monkeypatch: pytest.MonkeyPatch) -> None:
    without_modules(monkeypatch, "compression.zstd", "compression")
    monkeypatch.setitem(sys.modules, "backports.zstd", fake_zstd())


# -- helpers -----------------------------------------------------------------------------------------------------------


def record(chunks: list[bytes], content_type: bytes = JSON, encoding: bytes | None = None, **config: Any) -> Usage:
    headers = [(b"content-type", content_type)]
    if encoding is not None:
        headers.append((b"content-encoding", encoding))
    recorder = UsageRecorder({"type": "http"}, AttributionConfig(**config))
    recorder.response_start({"type": "http.response.start", "status": 200, "headers": headers})
    for chunk in chunks:
        recorder.response_body(chunk)
    return recorder.result()


def pieces_of(data: bytes, size: int) -> list[bytes]:
    return [data[at : at + size] for at in range(0, len(data), size)]


def app_of(body: bytes, media_type: str, *, chunk: int = 7, encoding: str | None = None) -> Starlette:
    """An endpoint answering ``body`` (already encoded, as a compression middleware inside the billing one would)."""

    async def endpoint(request: Request) -> Response:
        async def parts() -> AsyncIterator[bytes]:
            for at in range(0, len(body), chunk):
                yield body[at : at + chunk]

        headers = {"content-encoding": encoding} if encoding else None
        return StreamingResponse(parts(), media_type=media_type, headers=headers)

    return Starlette(routes=[Route("/v1/x", endpoint, methods=["POST"])])


async def bill(app: ASGIApp, fake_lago: Any, settings: BillingSettings, times: int = 1) -> list[dict[str, Any]]:
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            for _ in range(times):
                async with client.stream("POST", "/v1/x", headers=HEADERS) as response:
                    assert response.status_code == 200
                    [_ async for _ in response.aiter_raw()]  # (raw: httpx may not decode the stand-ins' bodies)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return [event["properties"] for event in fake_lago.events]


def tokens(props: dict[str, Any]) -> tuple[Any, int, int, int]:
    return props.get("model"), props["input_tokens"], props["output_tokens"], props["total_tokens"]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "attribution" in r.name]


# -- brotli and zstd ---------------------------------------------------------------------------------------------------


async def test_brotli_bodies_are_read_when_a_brotli_module_is_importable(
    monkeypatch: pytest.MonkeyPatch, fake_lago: Any, header_settings: BillingSettings
) -> None:
    """brotli-asgi inside the billing middleware: a br-encoded JSON answer and a br-encoded SSE stream (sent in small
    chunks) are billed their tokens, not 0."""
    with_brotli(monkeypatch)
    body = br(json.dumps(OPENAI_CHAT).encode())
    assert record([body], encoding=b"br") == Usage("gpt-4o-mini", 100, 20, 120, "json")
    assert record(pieces_of(body, 3), encoding=b"BR") == Usage("gpt-4o-mini", 100, 20, 120, "json")
    stream = br(sse_stream(ANTHROPIC_EVENTS))
    assert record(pieces_of(stream, 5), SSE, b"br") == Usage("claude-x", 10, 7, 17, "sse")
    app = app_of(stream, "text/event-stream", chunk=11, encoding="br")
    [props] = await bill(app, fake_lago, header_settings)
    assert tokens(props) == ("claude-x", 10, 7, 17)


async def test_zstd_bodies_are_read_when_a_zstd_module_is_importable(
    monkeypatch: pytest.MonkeyPatch, fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A zstd-encoded JSON answer and stream are billed their tokens, in any chunks, and a body of several frames
    (a compressor flushing each chunk as a frame of its own) is read to its last frame."""
    with_zstd(monkeypatch)
    body = json.dumps(OPENAI_CHAT).encode()
    assert record([zst(body)], encoding=b"zstd") == Usage("gpt-4o-mini", 100, 20, 120, "json")
    framed = b"".join(zst(part) for part in pieces_of(body, 40))
    assert record(pieces_of(framed, 9), encoding=b"zstd") == Usage("gpt-4o-mini", 100, 20, 120, "json")
    stream = sse_stream(ANTHROPIC_EVENTS)
    framed = b"".join(zst(part) for part in pieces_of(stream, 50))
    assert record(pieces_of(framed, 13), SSE, b"zstd") == Usage("claude-x", 10, 7, 17, "sse")
    app = app_of(framed, "text/event-stream", chunk=11, encoding="zstd")
    [props] = await bill(app, fake_lago, header_settings)
    assert tokens(props) == ("claude-x", 10, 7, 17)


async def test_without_a_decoder_module_the_request_is_billed_and_the_fix_is_said_once(
    monkeypatch: pytest.MonkeyPatch,
    fake_lago: Any,
    header_settings: BillingSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No brotli module: each br-encoded answer is still billed (0 tokens), and one warning (per encoding, per
    process) names the encoding and both fixes: the billing middleware inside the compression one, or installing
    the module that reads it."""
    without_modules(
        monkeypatch, "brotli", "brotlicffi", "compression.zstd", "compression", "backports.zstd", "zstandard"
    )
    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    body = br(json.dumps(OPENAI_CHAT).encode())
    events = await bill(app_of(body, "application/json", encoding="br"), fake_lago, header_settings, times=3)
    assert [tokens(props)[1:] for props in events] == [(0, 0, 0)] * 3
    for _ in range(2):
        assert record([gzip.compress(b"{}")], encoding=b"zstd").total_tokens == 0
    said = warnings_of(caplog)
    assert len(said) == 2, said
    br_warning, zstd_warning = said
    assert "br-encoded" in br_warning and "pip install" in br_warning and "brotli" in br_warning
    assert "zstd-encoded" in zstd_warning and "pip install" in zstd_warning and "zstandard" in zstd_warning
    for warning in said:
        assert "OrgBillingMiddleware" in warning and "billed 0" in warning


def test_an_old_brotli_without_bounded_output_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """brotli before 1.2 cannot bound what one call outputs (a bomb of a few hundred bytes inflates to gigabytes in
    one call): it is not used, and the warning says which version to install."""

    class OldDecompressor:
        def process(self, data: bytes) -> bytes:
            raise AssertionError("an unbounded decompressor must not be used")

    module = types.ModuleType("brotli")
    module.error = _BrotliError  # type: ignore[attr-defined]
    module.Decompressor = OldDecompressor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "brotli", module)
    without_modules(monkeypatch, "brotlicffi")
    warned: list[str] = []
    monkeypatch.setattr(_attribution.logger, "warning", lambda message, *args: warned.append(message % args))
    assert record([br(json.dumps(OPENAI_CHAT).encode())], encoding=b"br") == Usage()
    [warning] = warned
    assert "brotli>=1.2" in warning


def test_a_brotli_or_zstd_bomb_is_read_in_bounded_pieces_and_given_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A br or zstd body of a few KiB inflating to 100 MB: never more than a slice of it in memory at a time, the
    reading given up at the inflation budget (said once), and 0 tokens: the request is not blocked or crashed."""
    with_brotli(monkeypatch)
    with_zstd(monkeypatch)
    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    blob = b'{"usage": {"prompt_tokens": 5, "completion_tokens": 5}, "pad": "' + b" " * 100_000_000 + b'"}'
    for encoding, packed, decompressor in ((b"br", br(blob), _FakeBrotliDecompressor),
                                           (b"zstd", zst(blob), _FakeZstdDecompressor)):  # fmt: skip
        assert len(packed) < 200_000
        assert record([packed], encoding=encoding, max_body_bytes=10_000) == Usage()
        assert record(pieces_of(packed, 50_000), SSE, encoding, max_body_bytes=10_000) == Usage()
        assert decompressor.biggest <= 1 << 17
    assert any("inflated past" in warning for warning in warnings_of(caplog))


def test_a_corrupt_brotli_or_zstd_body_bills_zero_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with_brotli(monkeypatch)
    with_zstd(monkeypatch)
    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    body = json.dumps(OPENAI_CHAT).encode()
    assert record([body], encoding=b"br") == Usage()
    assert record([body], SSE, b"zstd") == Usage()
    assert any("could not be decompressed" in warning for warning in warnings_of(caplog))


@pytest.mark.parametrize("name", ["brotli", "brotlicffi"])
def test_real_brotli_modules(name: str) -> None:
    """The real modules, where installed (they are not dependencies): a body and a bomb."""
    module = pytest.importorskip(name)
    if not hasattr(module, "Decompressor"):
        pytest.skip("not a brotli binding")
    body = json.dumps(OPENAI_CHAT).encode()
    packed = module.compress(body)
    assert record(pieces_of(packed, 4), encoding=b"br") == Usage("gpt-4o-mini", 100, 20, 120, "json")
    bomb = module.compress(b"\x00" * 50_000_000)
    assert record([bomb], SSE, b"br", max_body_bytes=10_000) == Usage()


@pytest.mark.parametrize("name", ["compression.zstd", "backports.zstd", "zstandard"])
def test_real_zstd_modules(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module = pytest.importorskip(name)
    for other in ("compression.zstd", "backports.zstd", "zstandard"):
        if other != name:
            monkeypatch.setitem(sys.modules, other, None)
    if name != "compression.zstd":
        monkeypatch.setitem(sys.modules, "compression", None)
    body = json.dumps(OPENAI_CHAT).encode()
    packed = module.compress(body)
    assert record(pieces_of(packed, 4), encoding=b"zstd") == Usage("gpt-4o-mini", 100, 20, 120, "json")
    frames = b"".join(module.compress(part) for part in pieces_of(body, 30))
    assert record(pieces_of(frames, 7), encoding=b"zstd") == Usage("gpt-4o-mini", 100, 20, 120, "json")
    bomb = module.compress(b"\x00" * 50_000_000)
    assert record([bomb], SSE, b"zstd", max_body_bytes=10_000) == Usage()


# -- gzip and deflate: still read, bounded after decompression --------------------------------------------------------


def test_gzip_and_deflate_still_read_and_a_json_bomb_keeps_only_its_ends() -> None:
    body = json.dumps(OPENAI_CHAT).encode()
    assert record(pieces_of(gzip.compress(body), 3), encoding=b"gzip").total_tokens == 120
    assert record([zlib.compress(body)], encoding=b"deflate").total_tokens == 120
    # 50 MB of blanks in a 50 KB gzip body, its usage at the end: past the cap, its ends only are kept (the usage read)
    blob = b'{"model": "m", "pad": "' + b" " * 50_000_000 + b'", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
    recorder = UsageRecorder({"type": "http"}, AttributionConfig(max_body_bytes=1_000_000))
    recorder.response_start(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", JSON), (b"content-encoding", b"gzip")],
        }
    )
    recorder.response_body(gzip.compress(blob))
    assert recorder.result() == Usage("m", 1, 2, 3, "json")
    assert sum(len(chunk) for chunk in recorder._chunks) == 0


# -- Anthropic's advisor tool -----------------------------------------------------------------------------------------

ADVISOR_USAGE = {
    "input_tokens": 100,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 50,
    "output_tokens": 60,
    "iterations": [
        {"type": "message", "input_tokens": 40, "cache_read_input_tokens": 50, "output_tokens": 20},
        {"type": "advisor_message", "model": "claude-opus-4-6", "input_tokens": 823, "cache_read_input_tokens": 0,
         "cache_creation_input_tokens": 0, "output_tokens": 531},
        {"type": "message", "input_tokens": 60, "output_tokens": 40},
    ],
}  # fmt: skip
ADVISOR_MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-6",
    "content": [{"type": "text", "text": "done"}],
    "usage": ADVISOR_USAGE,
}


async def test_advisor_iterations_are_billed_once(fake_lago: Any, header_settings: BillingSettings) -> None:
    """The advisor tool's sub-inference is reported only as an ``advisor_message`` entry of ``usage.iterations``
    (the top-level counts are the executor's: its ``message`` entries): it is billed too, once; the executor's
    entries are not added again."""
    expected = ("claude-sonnet-4-6", 150 + 823, 60 + 531, 150 + 823 + 60 + 531)
    assert (u := json_usage(json.dumps(ADVISOR_MESSAGE).encode())) and (u.model, u.input_tokens, u.output_tokens,
                                                                       u.total_tokens) == expected  # fmt: skip
    app = app_of(json.dumps(ADVISOR_MESSAGE).encode(), "application/json")
    [props] = await bill(app, fake_lago, header_settings)
    assert tokens(props) == expected


def test_streamed_advisor_iterations_are_billed_once() -> None:
    """Streamed: ``message_delta`` carries the cumulative usage with its iterations (sent twice here: counted once)."""
    start = {"type": "message_start", "message": {"id": "msg_1", "model": "claude-sonnet-4-6", "usage": {
        "input_tokens": 40, "cache_read_input_tokens": 50, "output_tokens": 1}}}  # fmt: skip
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": ADVISOR_USAGE}
    stream = sse_stream([("message_start", start), ("message_delta", delta), ("message_delta", delta)])
    assert record(pieces_of(stream, 17), SSE) == Usage("claude-sonnet-4-6", 973, 591, 1564, "sse")


def test_iterations_a_gateway_already_rolled_into_the_top_level_are_not_added_again() -> None:
    """A relay that sums every iteration into the top-level counts (they equal the sum of all entries): adding the
    advisor's or the compaction's again would bill them twice."""
    rolled = {
        "input_tokens": 100 + 823 + 7,
        "output_tokens": 60 + 531 + 3,
        "iterations": [
            {"type": "compaction", "input_tokens": 7, "output_tokens": 3},
            {"type": "message", "input_tokens": 100, "output_tokens": 60},
            {"type": "advisor_message", "input_tokens": 823, "output_tokens": 531},
        ],
    }
    body = json.dumps({"id": "msg_1", "type": "message", "model": "claude-sonnet-4-6", "usage": rolled}).encode()
    assert json_usage(body) == Usage("claude-sonnet-4-6", 930, 594, 1524, "json")


def test_compaction_iterations_are_still_added() -> None:
    usage = {
        "input_tokens": 100,
        "output_tokens": 60,
        "iterations": [
            {"type": "compaction", "input_tokens": 7000, "output_tokens": 300},
            {"type": "message", "input_tokens": 100, "output_tokens": 60},
        ],
    }
    body = json.dumps({"id": "msg_1", "type": "message", "model": "claude-sonnet-4-6", "usage": usage}).encode()
    assert json_usage(body) == Usage("claude-sonnet-4-6", 7100, 360, 7460, "json")


# -- SSE at odd boundaries ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("newline", "space"), [(b"\n", True), (b"\r\n", False), (b"\r", True)])
def test_sse_split_at_every_byte(newline: bytes, space: bool) -> None:
    """Comments, ``\\r\\n`` or ``\\r`` line ends, ``data:`` without a space, multi-byte UTF-8 cut between chunks: the
    same usage at every split."""
    stream = sse_stream(ANTHROPIC_EVENTS, newline=newline, space=space)
    for at in range(1, len(stream)):
        assert record([stream[:at], stream[at:]], SSE) == Usage("claude-x", 10, 7, 17, "sse"), at


def test_usage_in_an_earlier_chunk_and_the_last_is_counted_once() -> None:
    chunk = {"id": "c1", "model": "gpt-4o", "choices": [{"delta": {"content": "a"}}]}
    events = [
        ("x", {**chunk, "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}),
        ("x", {**chunk, "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}),
        ("x", {**chunk, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}),
    ]
    stream = sse_stream(events) + b"data: [DONE]\n\n"
    assert record(pieces_of(stream, 10), SSE) == Usage("gpt-4o", 5, 4, 9, "sse")


def test_responses_api_stream_reads_response_completed() -> None:
    response = {"id": "resp_1", "object": "response", "model": "gpt-4.1", "output": []}
    events = [
        ("response.created", {"type": "response.created", "response": {**response, "usage": None}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "h\u00e9"}),
        ("response.completed", {"type": "response.completed", "response": {**response, "usage": {
            "input_tokens": 50, "output_tokens": 7, "total_tokens": 57}}}),
    ]  # fmt: skip
    assert record(pieces_of(sse_stream(events), 6), SSE) == Usage("gpt-4.1", 50, 7, 57, "sse")
