"""Review: LLM usage attribution gaps in compressed bodies and streams, billed through OrgBillingMiddleware to the
Lago emulator (the event's tokens as delivered).

- gzip bodies made of several gzip members (valid gzip: a proxy or server compressing each chunk on its own), split
  over many small chunks, padded with zeros or followed by garbage; deflate (zlib and raw) in small chunks; the
  inspection cap and the inflation budget holding against a gzip bomb (many members of zeros).
- AWS Bedrock's binary event streams (``application/vnd.amazon.eventstream``): ConverseStream's ``metadata`` usage
  and InvokeModelWithResponseStream's base64 chunks, whose last one carries ``amazon-bedrock-invocationMetrics``
  (not added to the Anthropic events' own usage: no double billing); CRCs checked, frame sizes capped, the client's
  stream passed on unchanged and undelayed.
- Gemini's ``streamGenerateContent?alt=sse`` with several candidates (cumulative usage, not added up) and with
  several answers relayed in one stream (each its own ``responseId``: added up, not lost).
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._attribution import AttributionConfig, _Inflater, reset_warnings

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}
EVENTSTREAM = "application/vnd.amazon.eventstream"


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


def tokens(properties: dict[str, Any]) -> tuple[Any, ...]:
    return (
        properties["input_tokens"],
        properties["output_tokens"],
        properties["total_tokens"],
        properties.get("model"),
    )


def chunked_app(content_type: str, chunks: list[bytes], encoding: str | None = None) -> Starlette:
    """An app answering ``chunks`` as they are (already encoded when ``encoding`` is given)."""

    async def answer(request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        headers = {"content-encoding": encoding} if encoding else None
        return StreamingResponse(stream(), media_type=content_type, headers=headers)

    return Starlette(routes=[Route("/v1/answer", answer, methods=["POST"])])


async def bill(
    app: ASGIApp, fake_lago: Any, settings: BillingSettings, attribution: AttributionConfig | None = None
) -> tuple[bytes, list[dict[str, Any]]]:
    """The raw bytes the client got, and the properties of the events Lago received for this request."""
    before = len(fake_lago.events)
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport(), attribution=attribution)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            async with client.stream("POST", "/v1/answer", headers=HEADERS) as response:
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return raw, [event["properties"] for event in fake_lago.events[before:]]


def cut(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# -- gzip members, deflate, bombs ------------------------------------------------------------------------------------

OPENAI_JSON = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29},
    }
).encode()


def openai_stream(count: int) -> list[bytes]:
    base = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    events = [
        b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"content": "w"}}]}).encode() + b"\n\n"
        for _ in range(count)
    ]
    usage = {"prompt_tokens": 7, "completion_tokens": count, "total_tokens": 7 + count}
    events.append(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def members(chunks: list[bytes]) -> bytes:
    """Each chunk compressed as a gzip member of its own, concatenated (``cat a.gz b.gz``: valid gzip)."""
    return b"".join(gzip.compress(chunk, mtime=0) for chunk in chunks)


async def test_a_json_body_of_several_gzip_members_is_billed_its_tokens(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A gzip body made of two members (a proxy compressing each chunk on its own) was read up to its first member's
    end only: the JSON cut there, its usage lost (0 tokens). Every member is read, in any chunks."""
    body = members([OPENAI_JSON[:40], OPENAI_JSON[40:120], OPENAI_JSON[120:]])
    for size in (len(body), 7, 1):
        raw, [event] = await bill(chunked_app("application/json", cut(body, size), "gzip"), fake_lago, header_settings)
        assert raw == body  # passed on as it came
        assert tokens(event) == (19, 10, 29, "gpt-4o-2024-08-06"), size


async def test_an_event_stream_gzipped_member_by_member_is_billed_its_tokens(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A server (or proxy) that gzips each event as its own member: the usage in the last event was never read (0
    tokens, and "a stream ended without a usage" logged)."""
    events = openai_stream(30)
    chunks = [gzip.compress(event, mtime=0) for event in events]
    raw, [event] = await bill(chunked_app("text/event-stream", chunks, "gzip"), fake_lago, header_settings)
    assert raw == b"".join(chunks)
    assert tokens(event) == (7, 30, 37, "gpt-4o-mini")
    # the same members cut anywhere (a member's end mid-chunk, a header split over chunks), and padded with zeros
    body = b"".join(chunks) + b"\0" * 10
    raw, [event] = await bill(chunked_app("text/event-stream", cut(body, 5), "gzip"), fake_lago, header_settings)
    assert tokens(event) == (7, 30, 37, "gpt-4o-mini")


HANG_SCRIPT = """
import asyncio, gzip, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 31, 1 << 31))  # a runaway fails fast here, not the machine
import httpx
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing.testing import FakeLago

USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
BODY = json.dumps({"model": "m", "usage": USAGE, "pad": "a" * 200_000}).encode()
# one member inflating past 64 KiB, then more bytes in the same chunk (here a second, empty, member)
WIRE = gzip.compress(BODY, mtime=0) + gzip.compress(b"", mtime=0)

async def answer(request):
    return Response(WIRE, media_type="application/json", headers={"content-encoding": "gzip"})

async def main():
    lago = FakeLago(api_key="k")
    lago.add_plan("starter", amount_cents=0)
    lago.add_subscription("org_a", "starter", external_id="org_a")
    settings = BillingSettings(api_url=lago.base_url, api_key="k", org_header="X-Org-Id", quota_mode="off")
    app = OrgBillingMiddleware(Starlette(routes=[Route("/", answer)]), settings=settings, transport=lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            await client.get("/", headers={"X-Org-Id": "org_a"})
        assert await app.pipeline.flush(5)
    finally:
        await app.aclose()
    [event] = lago.events
    p = event["properties"]
    print(json.dumps([p["input_tokens"], p["output_tokens"], p["total_tokens"]]))

asyncio.run(main())
"""


def test_a_gzip_member_inflating_past_a_slice_then_more_bytes_does_not_hang_the_server() -> None:
    """A gzip body whose first member inflates past 64 KiB and is followed, in the same chunk, by more bytes (a second
    member, padding, junk) hung the event loop for good: zlib's stale ``unconsumed_tail`` at the member's end was fed
    back forever, its ``unused_data`` growing without bound (the whole server stuck, memory climbing). Run in a child
    process with a memory limit and a timeout: it must answer, billed its tokens."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", HANG_SCRIPT], capture_output=True, text=True, timeout=60, cwd=os.getcwd()
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the request never ended: the inflater looped forever")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [3, 4, 7]


async def test_garbage_after_a_gzip_member_keeps_what_was_read(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Bytes after the last member that are not a gzip member (a server's trailing junk, which gzip tools warn about
    and ignore) do not lose the usage the members gave."""
    body = gzip.compress(OPENAI_JSON, mtime=0) + b"trailing junk"
    raw, [event] = await bill(chunked_app("application/json", cut(body, 9), "gzip"), fake_lago, header_settings)
    assert raw == body
    assert tokens(event) == (19, 10, 29, "gpt-4o-2024-08-06")


async def test_deflate_bodies_in_small_chunks_are_billed(fake_lago: Any, header_settings: BillingSettings) -> None:
    """HTTP's deflate (zlib-wrapped) and the raw deflate some servers send, a JSON body and an event stream each,
    cut in 3-byte chunks (already handled: a regression guard through the middleware)."""
    stream = b"".join(openai_stream(12))
    for wbits in (zlib.MAX_WBITS, -zlib.MAX_WBITS):
        for content_type, data, expected in (
            ("application/json", OPENAI_JSON, (19, 10, 29, "gpt-4o-2024-08-06")),
            ("text/event-stream", stream, (7, 12, 19, "gpt-4o-mini")),
        ):
            packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
            body = packer.compress(data) + packer.flush()
            raw, [event] = await bill(chunked_app(content_type, cut(body, 3), "deflate"), fake_lago, header_settings)
            assert raw == body
            assert tokens(event) == expected, (wbits, content_type)


ZEROS_MEMBER = gzip.compress(b"\0" * (16 << 20), compresslevel=9, mtime=0)  # 16 MiB of zeros in ~16 KB


async def test_a_gzip_bomb_of_many_members_is_given_up_within_the_cap(
    fake_lago: Any, header_settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """Members make a bomb easy (one small member of zeros repeated: 4 GiB here from 4 MB). The JSON body is not held
    past max_body_bytes, and inflation stops at the inflation budget (a multiple of max_body_bytes): the request is
    billed 0 tokens, said once, and answered whole."""
    bomb = ZEROS_MEMBER * 256 + gzip.compress(OPENAI_JSON, mtime=0)
    assert len(bomb) < 5_000_000
    config = AttributionConfig(max_body_bytes=65_536)
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.attribution"):
        raw, [event] = await bill(
            chunked_app("application/json", cut(bomb, 1 << 20), "gzip"), fake_lago, header_settings, config
        )
    assert raw == bomb
    assert tokens(event)[:3] == (0, 0, 0)
    assert "max_body_bytes" in caplog.text


def test_the_inflater_stops_at_its_budget_and_copies_linearly() -> None:
    """The inflater's work is bounded by its budget however the bomb is made (one member, or thousands), and a chunk
    of many tiny members is read in linear time (each member's end copied the rest of the chunk: quadratic)."""
    inflater = _Inflater(b"gzip", budget=1 << 20)
    out = 0
    with pytest.raises(OverflowError):
        for piece in inflater.pieces(ZEROS_MEMBER * 4):
            out += len(piece)
    assert out <= (1 << 20) + 65_536
    tiny = b"".join(gzip.compress(b"%d," % i, mtime=0) for i in range(60_000))  # 1.5 MB of 25-byte members
    inflated = b"".join(_Inflater(b"gzip", budget=1 << 30).pieces(tiny))
    assert inflated == b"".join(b"%d," % i for i in range(60_000))


# -- AWS Bedrock event streams ---------------------------------------------------------------------------------------


def header(name: str, value: str) -> bytes:
    raw = value.encode()
    return bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(raw)) + raw


def frame(event_type: str, payload: dict[str, Any] | bytes, message_type: str = "event") -> bytes:
    """One frame of application/vnd.amazon.eventstream: prelude (total length, headers length, their CRC32),
    headers, payload, message CRC32 (big-endian)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
    if message_type == "exception":
        headers = header(":exception-type", event_type) + header(":content-type", "application/json")
    else:
        headers = header(":event-type", event_type) + header(":content-type", "application/json")
    headers += header(":message-type", message_type)
    total = 12 + len(headers) + len(body) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + headers + body
    return message + struct.pack(">I", zlib.crc32(message))


def converse_stream(input_tokens: int, output_tokens: int, text: str = "Hello") -> list[bytes]:
    """ConverseStream's events as Bedrock sends them (each payload padded with "p")."""
    return [
        frame("messageStart", {"p": "abcdefgh", "role": "assistant"}),
        frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": text}, "p": "abcd"}),
        frame("contentBlockStop", {"contentBlockIndex": 0, "p": "abcdefghijk"}),
        frame("messageStop", {"p": "ab", "stopReason": "end_turn"}),
        frame(
            "metadata",
            {
                "metrics": {"latencyMs": 412},
                "p": "abcdefghijklmnopq",
                "usage": {
                    "inputTokens": input_tokens,
                    "outputTokens": output_tokens,
                    "totalTokens": input_tokens + output_tokens,
                },
            },
        ),
    ]


def invoke_chunk(inner: dict[str, Any]) -> bytes:
    """One InvokeModelWithResponseStream chunk: the model's own JSON event, base64 in "bytes"."""
    encoded = base64.b64encode(json.dumps(inner).encode()).decode()
    return frame("chunk", {"bytes": encoded, "p": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ"})


CLAUDE_INVOKE_STREAM = [
    invoke_chunk(
        {
            "type": "message_start",
            "message": {
                "id": "msg_bdrk_01",
                "type": "message",
                "role": "assistant",
                "model": "claude-3-5-sonnet-20241022",
                "content": [],
                "usage": {"input_tokens": 7, "cache_read_input_tokens": 14486, "output_tokens": 1},
            },
        }
    ),
    invoke_chunk({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    invoke_chunk({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
    invoke_chunk({"type": "content_block_stop", "index": 0}),
    invoke_chunk({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 126}}),
    invoke_chunk(
        {
            "type": "message_stop",
            "amazon-bedrock-invocationMetrics": {
                "inputTokenCount": 7,
                "outputTokenCount": 126,
                "invocationLatency": 4069,
                "firstByteLatency": 1117,
                "cacheReadInputTokenCount": 14486,
                "cacheWriteInputTokenCount": 0,
            },
        }
    ),
]
# Meta Llama: its counts only in its own keys and in the invocation metrics of its last chunk.
LLAMA_INVOKE_STREAM = [
    invoke_chunk({"generation": "Hello", "prompt_token_count": 11, "generation_token_count": 1, "stop_reason": None}),
    invoke_chunk(
        {
            "generation": "",
            "prompt_token_count": None,
            "generation_token_count": 24,
            "stop_reason": "stop",
            "amazon-bedrock-invocationMetrics": {
                "inputTokenCount": 11,
                "outputTokenCount": 24,
                "invocationLatency": 512,
                "firstByteLatency": 210,
            },
        }
    ),
]


@pytest.mark.parametrize("size", [0, 3, 100], ids=["frame-per-chunk", "3-byte-chunks", "100-byte-chunks"])
async def test_bedrock_event_streams_are_billed_their_tokens(
    fake_lago: Any, header_settings: BillingSettings, size: int
) -> None:
    """An API relaying Bedrock's ConverseStream or InvokeModelWithResponseStream (binary event streams) was billed 0
    tokens. The metadata event's usage and the invocation metrics of InvokeModel's last chunk are billed (the cache
    reads counted as input, as Anthropic's), the Anthropic events' own usage not added to them."""
    for stream, expected in (
        (converse_stream(25, 40), (25, 40, 65, None)),
        (CLAUDE_INVOKE_STREAM, (14493, 126, 14619, "claude-3-5-sonnet-20241022")),
        (LLAMA_INVOKE_STREAM, (11, 24, 35, None)),
    ):
        body = b"".join(stream)
        chunks = stream if size == 0 else cut(body, size)
        raw, [event] = await bill(chunked_app(EVENTSTREAM, chunks), fake_lago, header_settings)
        assert raw == body
        assert tokens(event) == expected


async def test_bedrock_streams_relayed_back_to_back_add_up_and_skip_exceptions(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Two Converse calls relayed in one stream (a tool loop) are both billed; an exception frame, a frame whose CRC
    does not match its bytes (a usage in it is not believed) and an unknown event are skipped, the stream read on."""
    bad = bytearray(frame("metadata", {"usage": {"inputTokens": 999_999, "outputTokens": 999_999}}))
    bad[-6] ^= 0x01  # a payload byte flipped: the message CRC no longer matches
    stream = [
        *converse_stream(25, 40),
        frame("throttlingException", {"message": "Too many requests"}, "exception"),
        bytes(bad),
        frame("somethingNew", {"usage": {"inputTokens": 5}, "p": "x"}),
        *converse_stream(100, 7, "tool result"),
    ]
    raw, [event] = await bill(chunked_app(EVENTSTREAM, cut(b"".join(stream), 11)), fake_lago, header_settings)
    assert raw == b"".join(stream)
    assert tokens(event) == (125, 47, 172, None)


async def test_bedrock_frames_over_the_cap_or_broken_never_hold_memory_nor_the_stream(
    fake_lago: Any, header_settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame over max_body_bytes is skipped without being held (said once), the frames after it still read; a
    prelude whose CRC does not match (not an event stream after all, or a corrupt one) stops the reading without
    breaking the response: every byte reaches the client."""
    big = frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "x" * 200_000}})
    stream = [*converse_stream(1, 1)[:2], big, *converse_stream(3, 4)[2:]]
    config = AttributionConfig(max_body_bytes=65_536)
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.attribution"):
        raw, [event] = await bill(
            chunked_app(EVENTSTREAM, cut(b"".join(stream), 4096)), fake_lago, header_settings, config
        )
    assert raw == b"".join(stream)
    assert tokens(event) == (3, 4, 7, None)
    assert "max_body_bytes" in caplog.text

    garbage = b"\x7f\xff\xff\xff" + b"\x00" * 8 + b"x" * 100  # claims 2 GiB, prelude CRC wrong
    stream = [garbage, *converse_stream(3, 4)]
    raw, [event] = await bill(chunked_app(EVENTSTREAM, stream), fake_lago, header_settings)
    assert raw == b"".join(stream)
    assert tokens(event)[:3] == (0, 0, 0)


async def test_bedrock_frames_reach_the_client_as_they_come(fake_lago: Any, header_settings: BillingSettings) -> None:
    """Each frame (and each piece of a frame) goes out before the app sends the next one: nothing is held back
    until a frame is whole."""
    body = b"".join(converse_stream(25, 40))
    pieces = cut(body, 13)
    received: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", EVENTSTREAM.encode())],
            }
        )
        for index, piece in enumerate(pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            assert b"".join(received) == b"".join(pieces[: index + 1])  # already out
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            received.append(message.get("body", b""))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/answer",
        "raw_path": b"/v1/answer",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"t"), (b"x-org-id", b"org_a"), (b"x-user-id", b"ada")],
        "client": ("127.0.0.1", 1234),
        "server": ("t", 80),
    }
    try:
        await middleware(scope, receive, send)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert b"".join(received) == body
    [event] = [e["properties"] for e in fake_lago.events]
    assert tokens(event) == (25, 40, 65, None)


# -- Gemini alt=sse: several candidates, several answers -------------------------------------------------------------


def gemini_chunk(response_id: str, candidates: list[dict[str, Any]], usage: dict[str, Any]) -> bytes:
    chunk = {"candidates": candidates, "usageMetadata": usage, "modelVersion": "gemini-2.5-flash"}
    chunk["responseId"] = response_id
    return b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n"


def candidate(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": index}
    if finish:
        out["finishReason"] = finish
    return out


def gemini_answer(response_id: str, prompt: int, outputs: list[int]) -> list[bytes]:
    """One streamed answer with two candidates (candidateCount=2), its cumulative usageMetadata on every chunk."""
    return [
        gemini_chunk(
            response_id,
            [candidate(step % 2, "word", "STOP" if step == len(outputs) - 1 else None)],
            {"promptTokenCount": prompt, "candidatesTokenCount": out, "totalTokenCount": prompt + out},
        )
        for step, out in enumerate(outputs)
    ]


async def test_gemini_sse_with_several_candidates_bills_the_last_cumulative_usage(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """candidateCount=2: chunks of both candidates, each with the answer's cumulative usage: billed once (already
    handled: a regression guard), not added up."""
    stream = gemini_answer("resp-A", 12, [3, 6, 9, 14])
    raw, [event] = await bill(chunked_app("text/event-stream", stream), fake_lago, header_settings)
    assert raw == b"".join(stream)
    assert tokens(event) == (12, 14, 26, "gemini-2.5-flash")


async def test_gemini_answers_relayed_in_one_stream_are_all_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """An agent relaying two streamGenerateContent answers in one stream (a function call, then the answer after its
    result): each has its own responseId and its own cumulative usage. Only the last answer's usage was billed: the
    first call's tokens were lost."""
    stream = [*gemini_answer("resp-A", 12, [3, 6, 9]), *gemini_answer("resp-B", 40, [5, 11])]
    raw, [event] = await bill(chunked_app("text/event-stream", stream), fake_lago, header_settings)
    assert raw == b"".join(stream)
    assert tokens(event) == (52, 20, 72, "gemini-2.5-flash")
