"""Streamed usage read the same however the stream is framed and cut, and the providers' usage shapes as of 2026.

- SSE framing, property style: every provider stream the other attribution tests use (OpenAI chat with
  ``include_usage``, Azure, the Responses API's completed/incomplete/failed, Anthropic, Gemini's ``alt=sse``, Groq,
  Mistral, vLLM, xAI, Cohere v2, Anthropic's compaction) re-framed with LF, CRLF or lone CR line ends (all three
  valid SSE), ``data:`` with and without its space, comment lines (between events and inside one), a JSON spread over
  several data lines, a UTF-8 byte-order mark and multi-byte UTF-8 text, then cut at every byte boundary into two
  pieces (and into three around every byte): the counts are those of the stream in one piece. The same for Ollama's
  newline-delimited JSON and Bedrock's binary event streams; and through ``OrgBillingMiddleware`` with the emulator,
  which passes each piece on to the client as it comes (nothing held back).
- Shapes: the 2026 usage shapes the other tests do not pin (Anthropic's cumulative ``message_delta`` growing with a
  server-side tool loop or giving ``null`` input counts, the Responses API's ``response.failed`` with a usage, Gemini's
  thoughts, tool-use prompt and cached content in a stream, LiteLLM relaying Claude's stream, ConverseStream's cache
  counts, Ollama's ``/api/generate`` stream with a context).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._attribution import AttributionConfig, UsageRecorder, reset_warnings
from test_attribution_cohere import COHERE_V2_STREAM
from test_attribution_compaction_gateway_zeros_and_deflate import COMPACTED, compacted_stream
from test_attribution_gzip_members_bedrock_and_gemini_relays import (
    CLAUDE_INVOKE_STREAM,
    EVENTSTREAM,
    LLAMA_INVOKE_STREAM,
    converse_stream,
    frame,
)
from test_attribution_providers import NDJSON, OLLAMA_NDJSON, SHAPES, SSE
from test_attribution_reasoning_outside_the_completion import XAI_RESPONSES_STREAM, XAI_STREAM

pytestmark = pytest.mark.anyio

Billed = tuple["str | None", int, int, int]
HEADERS = [(b"x-org-id", b"org_a"), (b"x-user-id", b"ada")]


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


def record(content_type: str, pieces: list[bytes]) -> Billed:
    """The model and counts a recorder reads from a response body delivered in ``pieces``."""
    recorder = UsageRecorder({"type": "http"}, AttributionConfig())
    recorder.response_start(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type.encode())]}
    )
    for piece in pieces:
        recorder.response_body(piece)
    usage = recorder.result()
    return usage.model, usage.input_tokens, usage.output_tokens, usage.total_tokens


def events_of(stream: bytes) -> list[tuple[bytes | None, bytes]]:
    """The (event type, data) of each event of a stream the other tests write (LF or CRLF, one data line each)."""
    events: list[tuple[bytes | None, bytes]] = []
    for block in stream.replace(b"\r\n", b"\n").split(b"\n\n"):
        name: bytes | None = None
        data: list[bytes] = []
        for line in block.split(b"\n"):
            field, _, value = line.partition(b":")
            value = value[1:] if value[:1] == b" " else value
            if field == b"event":
                name = value
            elif field == b"data":
                data.append(value)
        if data:
            events.append((name, b"\n".join(data)))
    return events


#: Multi-byte UTF-8 (2, 3 and 4 bytes a character) put in every JSON event: some cut falls inside each character.
NOTE = "h\u00e9llo \u65e5\u672c \U0001f642"


def framed(
    events: list[tuple[bytes | None, bytes]],
    *,
    newline: bytes = b"\n",
    space: bool = True,
    comments: bool = False,
    multiline: bool = False,
    bom: bool = False,
) -> bytes:
    """The events written as an SSE server may write them (see the module docstring)."""
    colon = b": " if space else b":"
    out = [b"\xef\xbb\xbf"] if bom else []
    for name, data in events:
        if comments:
            out.append(b": keep-alive \xe2\x80\xa6" + newline)
        if name is not None:
            out.append(b"event" + colon + name + newline)
        try:
            payload = json.loads(data)
        except ValueError:  # [DONE]
            payload = None
        if isinstance(payload, dict):
            text = json.dumps({**payload, "x_note": NOTE}, ensure_ascii=False, indent=1 if multiline else None)
            data = text.encode()
        lines = data.split(b"\n")
        for index, line in enumerate(lines):
            out.append(b"data" + colon + line + newline)
            if comments and index == 0 and len(lines) > 1:  # a comment between an event's data lines
                out.append(b":" + newline)
        out.append(newline)
    return b"".join(out)


FRAMINGS: dict[str, dict[str, Any]] = {
    "lf": {},
    "crlf-no-space": {"newline": b"\r\n", "space": False},
    "cr-comments": {"newline": b"\r", "comments": True},
    "lf-multiline-bom": {"multiline": True, "bom": True, "comments": True},
    "crlf-all": {"newline": b"\r\n", "space": False, "comments": True, "multiline": True, "bom": True},
    "cr-all": {"newline": b"\r", "space": False, "comments": True, "multiline": True, "bom": True},
}
#: Every SSE stream of the other attribution tests, with what it bills.
STREAMS: dict[str, tuple[bytes, Billed]] = {
    **{name: (b"".join(chunks), billed) for name, (kind, chunks, billed) in SHAPES.items() if kind == SSE},
    "cohere-v2-stream": (b"".join(COHERE_V2_STREAM), (None, 3, 9, 12)),
    "xai-chat-stream": (b"".join(XAI_STREAM), ("grok-4-fast-reasoning", 279, 95, 374)),
    "xai-responses-stream": (b"".join(XAI_RESPONSES_STREAM), ("grok-4", 279, 95, 374)),
    "anthropic-compaction-stream": (compacted_stream(), COMPACTED),
}


def two_way(data: bytes) -> Iterator[tuple[int, list[bytes]]]:
    for at in range(1, len(data)):
        yield at, [data[:at], data[at:]]


@pytest.mark.parametrize("framing", list(FRAMINGS))
@pytest.mark.parametrize("name", list(STREAMS))
def test_an_sse_stream_cut_anywhere_bills_what_it_bills_whole(name: str, framing: str) -> None:
    """Each provider stream, however framed, bills its tokens whole and cut in two at every byte boundary."""
    original, billed = STREAMS[name]
    stream = framed(events_of(original), **FRAMINGS[framing])
    assert record(SSE, [original]) == billed
    assert record(SSE, [stream]) == billed
    wrong = [at for at, pieces in two_way(stream) if record(SSE, pieces) != billed]
    assert not wrong, f"cut at {wrong[:10]}"


@pytest.mark.parametrize("framing", ["crlf-all", "cr-all"])
@pytest.mark.parametrize(
    "name", ["anthropic-stream-cumulative", "openai-responses-stream", "gemini-sse", "openai-chat-stream"]
)
def test_an_sse_stream_cut_in_three_around_every_byte_bills_the_same(name: str, framing: str) -> None:
    """Three pieces, the middle one a single byte at every offset (a lone \\r, a byte of the BOM or of a character
    alone in a chunk), and the stream one byte a chunk: the same counts."""
    original, billed = STREAMS[name]
    stream = framed(events_of(original), **FRAMINGS[framing])
    wrong = [
        at
        for at in range(1, len(stream) - 1)
        if record(SSE, [stream[:at], stream[at : at + 1], stream[at + 1 :]]) != billed
    ]
    assert not wrong, f"middle byte at {wrong[:10]}"
    assert record(SSE, [stream[i : i + 1] for i in range(len(stream))]) == billed


def test_an_sse_stream_of_mixed_line_ends_and_fields_in_random_pieces_bills_the_same() -> None:
    """Line ends mixed line by line, ``retry:`` and ``id:`` fields, a ``data`` field without a colon (an empty data
    line), indentation varying: every stream, cut into 2 to 6 random pieces, bills its tokens (seeded)."""
    rng = random.Random(2026)
    for name, (original, billed) in STREAMS.items():
        lines: list[bytes] = [b"retry: 3000"]
        for event, data in events_of(original):
            lines += [b": ping", b"id: 7"] + ([b"event:" + event] if event is not None else [])
            lines.append(b"data")
            try:
                text = json.dumps(
                    {**json.loads(data), "x_note": NOTE}, ensure_ascii=False, indent=rng.choice([None, 1, 2])
                ).encode()
            except (ValueError, TypeError):
                text = data
            lines += [rng.choice([b"data:", b"data: "]) + line for line in text.split(b"\n")]
            lines.append(b"")
        out, previous = [b"\xef\xbb\xbf"], b""
        for line in lines:
            newline = rng.choice([b"\n", b"\r\n", b"\r"])
            if previous == b"\r" and not line and newline == b"\n":  # (\r then \n is one line end, \r\n)
                newline = b"\r\n"
            out.append(line + newline)
            previous = newline
        stream = b"".join(out)
        assert record(SSE, [stream]) == billed, name
        for _ in range(60):
            cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 5)))
            pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
            assert record(SSE, pieces) == billed, (name, cuts)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("bom", [False, True], ids=["", "bom"])
def test_ollama_ndjson_cut_anywhere_bills_what_it_bills_whole(newline: bytes, bom: bool) -> None:
    """Ollama's newline-delimited JSON, its text multi-byte UTF-8, any line end, a BOM: cut at every boundary."""
    documents = [json.loads(line) for line in b"".join(OLLAMA_NDJSON).splitlines()]
    documents[0]["message"]["content"] = NOTE
    stream = (b"\xef\xbb\xbf" if bom else b"") + b"".join(
        json.dumps(document, ensure_ascii=False).encode() + newline for document in documents
    )
    billed = SHAPES["ollama-ndjson"][2]
    assert record(NDJSON, [stream]) == billed
    wrong = [at for at, pieces in two_way(stream) if record(NDJSON, pieces) != billed]
    assert not wrong, f"cut at {wrong[:10]}"


@pytest.mark.parametrize(
    ("name", "frames", "billed"),
    [
        ("converse-stream", converse_stream(30, 40), (None, 30, 40, 70)),
        ("invoke-claude", CLAUDE_INVOKE_STREAM, ("claude-3-5-sonnet-20241022", 14493, 126, 14619)),
        ("invoke-llama", LLAMA_INVOKE_STREAM, (None, 11, 24, 35)),
    ],
)
def test_a_bedrock_event_stream_cut_anywhere_bills_what_it_bills_whole(
    name: str, frames: list[bytes], billed: Billed
) -> None:
    """AWS Bedrock's binary frames cut at every byte boundary (inside a prelude, a header, a payload, a CRC)."""
    stream = b"".join(frames)
    assert record(EVENTSTREAM, [stream]) == billed
    wrong = [at for at, pieces in two_way(stream) if record(EVENTSTREAM, pieces) != billed]
    assert not wrong, f"cut at {wrong[:10]}"


def http_scope() -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/messages",
        "raw_path": b"/v1/messages",
        "query_string": b"",
        "root_path": "",
        "headers": list(HEADERS),
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }


async def test_through_the_middleware_a_stream_cut_anywhere_is_billed_once_and_passed_on_as_it_comes(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Anthropic's cumulative stream with every framing oddity (CRLF, ``data:`` without space, comments, multi-line
    data, BOM, multi-byte text) sent by the app in two pieces cut at every byte boundary (and in three around every
    CR LF pair) through OrgBillingMiddleware: each request is one event with the stream's counts, and each piece
    reaches the client unchanged before the app sends the next one."""
    original, billed = STREAMS["anthropic-stream-cumulative"]
    stream = framed(events_of(original), **FRAMINGS["crlf-all"])
    cuts: list[list[bytes]] = [pieces for _, pieces in two_way(stream)]
    at = stream.find(b"\r\n")
    while at >= 0:
        cuts.append([stream[: at + 1], stream[at + 1 : at + 2], stream[at + 2 :]])  # \r | \n | rest
        at = stream.find(b"\r\n", at + 2)
    outer: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        pieces = scope["state"]["pieces"]
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for index, piece in enumerate(pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": index < len(pieces) - 1})
            assert outer[-1]["body"] == piece  # on its way to the client already, unchanged

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        outer.append(message)

    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    try:
        for pieces in cuts:
            outer.clear()
            await middleware({**http_scope(), "state": {"pieces": pieces}}, receive, send)
            assert b"".join(m.get("body", b"") for m in outer if m["type"] == "http.response.body") == stream
        assert await middleware.pipeline.flush(30)
    finally:
        await middleware.aclose()
    found = [event["properties"] for event in fake_lago.events]
    assert len(found) == len(cuts)
    wrong = [
        index
        for index, props in enumerate(found)
        if (props.get("model"), props["input_tokens"], props["output_tokens"], props["total_tokens"]) != billed
    ]
    assert not wrong


# -- usage shapes as of 2026 ------------------------------------------------------------------------------------------


def sse(*events: tuple[str | None, Any]) -> bytes:
    return b"".join(
        (b"" if name is None else b"event: " + name.encode() + b"\n")
        + b"data: "
        + json.dumps(data, separators=(",", ":")).encode()
        + b"\n\n"
        for name, data in events
    )


_MESSAGE_START = {
    "type": "message_start",
    "message": {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-opus-4-6",
        "content": [],
        "usage": {
            "input_tokens": 472,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 2000,
            "output_tokens": 1,
        },
    },
}
# Server-side tools (web search) read their results as input during the answer: message_delta's cumulative input
# is larger than message_start's. Its last value is billed.
ANTHROPIC_SERVER_TOOL_LOOP = sse(
    ("message_start", _MESSAGE_START),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {
                "input_tokens": 5210,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 2000,
                "output_tokens": 300,
                "server_tool_use": {"web_search_requests": 2},
            },
        },
    ),
    ("message_stop", {"type": "message_stop"}),
)
# The SDKs type message_delta's input counts as optional: null leaves message_start's.
ANTHROPIC_NULL_INPUTS = sse(
    ("message_start", _MESSAGE_START),
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {
                "input_tokens": None,
                "cache_creation_input_tokens": None,
                "cache_read_input_tokens": None,
                "output_tokens": 300,
            },
        },
    ),
)
_RESPONSE = {"id": "resp_01", "object": "response", "created_at": 1767225600, "model": "gpt-5.2-2025-12-11"}
# A response that failed after sampling: its usage is given (billed), as response.incomplete's.
RESPONSES_FAILED_WITH_USAGE = sse(
    (
        "response.created",
        {"type": "response.created", "response": {**_RESPONSE, "status": "in_progress", "usage": None}},
    ),
    (
        "response.failed",
        {
            "type": "response.failed",
            "sequence_number": 9,
            "response": {
                **_RESPONSE,
                "status": "failed",
                "error": {"code": "server_error", "message": "The model failed."},
                "usage": {
                    "input_tokens": 100,
                    "input_tokens_details": {"cached_tokens": 50},
                    "output_tokens": 20,
                    "output_tokens_details": {"reasoning_tokens": 15},
                    "total_tokens": 120,
                },
            },
        },
    ),
)


def _gemini(usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "candidates": [{"content": {"parts": [{"text": "x"}], "role": "model"}, "index": 0}],
        "usageMetadata": usage,
        "modelVersion": "gemini-2.5-pro",
        "responseId": "r-01",
    }


# Gemini's stream: cachedContentTokenCount a part of the prompt; toolUsePromptTokenCount and thoughtsTokenCount not
# (totalTokenCount = prompt + tool use + candidates + thoughts); Vertex AI adds trafficType.
GEMINI_STREAM = sse(
    (
        None,
        _gemini(
            {
                "promptTokenCount": 1000,
                "cachedContentTokenCount": 800,
                "toolUsePromptTokenCount": 50,
                "thoughtsTokenCount": 50,
                "totalTokenCount": 1100,
            }
        ),
    ),
    (
        None,
        _gemini(
            {
                "promptTokenCount": 1000,
                "cachedContentTokenCount": 800,
                "toolUsePromptTokenCount": 50,
                "candidatesTokenCount": 30,
                "thoughtsTokenCount": 70,
                "totalTokenCount": 1150,
                "trafficType": "ON_DEMAND",
            }
        ),
    ),
)
_LITELLM_CHUNK = {"id": "chatcmpl-01", "object": "chat.completion.chunk", "model": "claude-sonnet-4-5"}
# LiteLLM proxy relaying Claude's stream in OpenAI's shape: prompt_tokens counts the cache already.
LITELLM_CLAUDE_STREAM = sse(
    (None, {**_LITELLM_CHUNK, "choices": [{"index": 0, "delta": {"content": "Hi"}}]}),
    (
        None,
        {
            **_LITELLM_CHUNK,
            "choices": [],
            "usage": {
                "prompt_tokens": 3205,
                "completion_tokens": 50,
                "total_tokens": 3255,
                "prompt_tokens_details": {"cached_tokens": 3200},
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 3200,
            },
        },
    ),
    (None, "[DONE]"),
)
# ConverseStream's metadata with prompt caching: inputTokens without the cache reads and writes (totalTokens with).
CONVERSE_STREAM_CACHED = b"".join(
    [
        *converse_stream(0, 0)[:-1],
        frame(
            "metadata",
            {
                "metrics": {"latencyMs": 300},
                "usage": {
                    "inputTokens": 20,
                    "outputTokens": 50,
                    "totalTokens": 1570,
                    "cacheReadInputTokens": 1200,
                    "cacheWriteInputTokens": 300,
                    "cacheDetails": [{"inputTokens": 300, "ttl": "5m"}],
                },
            },
        ),
    ]
)
# Ollama's /api/generate stream: its last line carries the context (token ids) and the counts, thinking included.
OLLAMA_GENERATE = b"".join(
    json.dumps(line).encode() + b"\n"
    for line in (
        {"model": "qwen3", "created_at": "2026-01-01T00:00:00Z", "response": "", "thinking": "Hm", "done": False},
        {"model": "qwen3", "created_at": "2026-01-01T00:00:01Z", "response": "Hi", "done": False},
        {
            "model": "qwen3",
            "created_at": "2026-01-01T00:00:02Z",
            "response": "",
            "done": True,
            "done_reason": "stop",
            "context": [151644, 872, 198],
            "total_duration": 4_935_886_791,
            "load_duration": 534_986_708,
            "prompt_eval_count": 26,
            "prompt_eval_duration": 107_345_000,
            "eval_count": 290,
            "eval_duration": 4_289_432_000,
        },
    )
)

SHAPES_2026: dict[str, tuple[str, bytes, Billed]] = {
    "anthropic-server-tool-loop": (SSE, ANTHROPIC_SERVER_TOOL_LOOP, ("claude-opus-4-6", 7210, 300, 7510)),
    "anthropic-null-inputs": (SSE, ANTHROPIC_NULL_INPUTS, ("claude-opus-4-6", 2472, 300, 2772)),
    "responses-failed-with-usage": (SSE, RESPONSES_FAILED_WITH_USAGE, ("gpt-5.2-2025-12-11", 100, 20, 120)),
    "gemini-stream-thoughts-tools-cache": (SSE, GEMINI_STREAM, ("gemini-2.5-pro", 1050, 100, 1150)),
    "litellm-claude-stream": (SSE, LITELLM_CLAUDE_STREAM, ("claude-sonnet-4-5", 3205, 50, 3255)),
    "converse-stream-cached": (EVENTSTREAM, CONVERSE_STREAM_CACHED, (None, 1520, 50, 1570)),
    "ollama-generate": (NDJSON, OLLAMA_GENERATE, ("qwen3", 26, 290, 316)),
}


@pytest.mark.parametrize("name", list(SHAPES_2026))
async def test_a_2026_usage_shape_is_billed_its_tokens_once(
    name: str, fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Each shape through the middleware (one event, its tokens), and cut at every byte boundary (the same)."""
    content_type, stream, billed = SHAPES_2026[name]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type.encode())]}
        )
        await send({"type": "http.response.body", "body": stream})

    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            response = await client.post("/v1/answer", headers=dict((k.decode(), v.decode()) for k, v in HEADERS))
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert response.content == stream
    [props] = [event["properties"] for event in fake_lago.events]
    assert (props.get("model"), props["input_tokens"], props["output_tokens"], props["total_tokens"]) == billed
    wrong = [at for at, pieces in two_way(stream) if record(content_type, pieces) != billed]
    assert not wrong, f"cut at {wrong[:10]}"
