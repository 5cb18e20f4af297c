"""Review of usage attribution against the wire formats of today's LLM APIs (angle: usage shapes), through a real
Starlette app, the billing middleware (httpx.ASGITransport) and the Lago emulator; fixtures written by hand after the
providers' documented shapes.

Covered here (the rest of the shapes is covered by tests/test_attribution*.py):

- Anthropic's server-side compaction (beta ``compact-2026-01-12``): the summarizing call is reported only in
  ``usage.iterations`` (an entry of type ``compaction``, whose tokens "are not included in the top-level usage
  fields"), as JSON and streamed (``message_delta``'s cumulative ``iterations``): it must be billed too;
- Anthropic-compatible gateways whose ``message_delta`` repeats the input-side counts as ``0`` placeholders after
  ``message_start`` gave the real ones (cumulative counts never drop: the real ones are billed), while a real
  cumulative update (a non-zero one) still wins;
- an Anthropic stream failing mid-way with an ``error`` event (``overloaded_error``) after ``message_start``: what was
  counted is billed;
- a raw-deflate (``Content-Encoding: deflate`` without the zlib wrapper) event stream whose first body message is one
  byte: its usage was not read at all (billed 0).
"""

from __future__ import annotations

import json
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

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._attribution import AttributionConfig, UsageRecorder, json_usage, reset_warnings

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}
MODEL = "claude-opus-4-6"


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


def sse(data: Any, event: str | None = None) -> bytes:
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return head + b"data: " + text.encode() + b"\n\n"


def app_of(pieces: list[bytes], media_type: str, headers: dict[str, str] | None = None) -> Starlette:
    """An endpoint answering ``pieces`` as body messages, one by one."""

    async def endpoint(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

        return StreamingResponse(body(), media_type=media_type, headers=headers)

    return Starlette(routes=[Route("/v1/messages", endpoint, methods=["POST"])])


async def bill(app: ASGIApp, fake_lago: Any, settings: BillingSettings) -> tuple[httpx.Response, dict[str, Any]]:
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            response = await client.post("/v1/messages", headers=HEADERS)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    [event] = fake_lago.events
    return response, event["properties"]


def tokens(props: dict[str, Any]) -> tuple[Any, int, int, int]:
    return props.get("model"), props["input_tokens"], props["output_tokens"], props["total_tokens"]


def split(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


# -- Anthropic server-side compaction --------------------------------------------------------------------------------

# The summarizing call (its own sampling: 180,000 tokens read, 10,000 of them from the cache; 3,500 written) and the
# answer's (23,000 read; 1,000 written); the top-level counts are the answer's only.
COMPACTION = {"type": "compaction", "input_tokens": 170_000, "cache_creation_input_tokens": 0}
COMPACTION |= {"cache_read_input_tokens": 10_000, "output_tokens": 3_500}
ANSWER_ITERATION = {"type": "message", "input_tokens": 3_000, "cache_creation_input_tokens": 20_000}
ANSWER_ITERATION |= {"cache_read_input_tokens": 0, "output_tokens": 1_000}
TOP_LEVEL = {"input_tokens": 3_000, "cache_creation_input_tokens": 20_000, "cache_read_input_tokens": 0}
TOP_LEVEL |= {"output_tokens": 1_000}
# 180,000 + 23,000 read; 3,500 + 1,000 written
COMPACTED = (MODEL, 203_000, 4_500, 207_500)

COMPACTED_MESSAGE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": MODEL,
    "content": [
        {"type": "compaction", "content": "Summary of the conversation: ..."},
        {"type": "text", "text": "Based on our conversation so far..."},
    ],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "context_management": {"applied_edits": []},
    "usage": {
        **TOP_LEVEL,
        "cache_creation": {"ephemeral_5m_input_tokens": 20_000, "ephemeral_1h_input_tokens": 0},
        "iterations": [COMPACTION, ANSWER_ITERATION],
        "server_tool_use": None,
        "service_tier": "standard",
    },
}


def compacted_stream(*, pause_after_compaction: bool = False) -> bytes:
    start_usage = {"input_tokens": 3_000, "cache_creation_input_tokens": 20_000, "cache_read_input_tokens": 0}
    start_usage |= {"output_tokens": 1}
    delta_usage: dict[str, Any] = {**TOP_LEVEL, "iterations": [COMPACTION, ANSWER_ITERATION]}
    if pause_after_compaction:  # stop_reason "compaction": no answer yet, only the summarizing call
        start_usage = {"input_tokens": 0, "output_tokens": 0}
        delta_usage = {"input_tokens": 0, "output_tokens": 0, "iterations": [COMPACTION]}
    message = {"id": "msg_01", "type": "message", "role": "assistant", "model": MODEL, "content": []}
    return b"".join(
        [
            sse({"type": "message_start", "message": {**message, "usage": start_usage}}, "message_start"),
            sse(
                {"type": "content_block_start", "index": 0, "content_block": {"type": "compaction"}},
                "content_block_start",
            ),
            sse(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "compaction_delta", "content": "Sum."}},
                "content_block_delta",
            ),
            sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            sse({"type": "ping"}, "ping"),
            sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "compaction" if pause_after_compaction else "end_turn"},
                    "usage": delta_usage,
                },
                "message_delta",
            ),
            sse({"type": "message_stop"}, "message_stop"),
        ]
    )


async def test_an_anthropic_answer_with_server_side_compaction_bills_the_summarizing_call(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Server-side compaction runs a second sampling (summarizing some 180,000 tokens) that Anthropic bills but
    reports only in ``usage.iterations``: the event billed the answer's 23,000 + 1,000 tokens alone."""
    body = json.dumps(COMPACTED_MESSAGE).encode()
    response, props = await bill(app_of([body], "application/json"), fake_lago, header_settings)
    assert response.content == body
    assert tokens(props) == COMPACTED
    usage = json_usage(body)  # (the deferred path's parser, the same rules)
    assert (usage.model, usage.input_tokens, usage.output_tokens, usage.total_tokens) == COMPACTED


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
async def test_a_streamed_compaction_is_billed_once_with_the_answer(
    chunk: int, fake_lago: Any, header_settings: BillingSettings
) -> None:
    body = compacted_stream()
    response, props = await bill(app_of(split(body, chunk), "text/event-stream"), fake_lago, header_settings)
    assert response.content == body
    assert tokens(props) == COMPACTED


async def test_a_stream_paused_after_compaction_bills_the_summarizing_call(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """``pause_after_compaction``: the answer stops after the summary (top-level counts 0), the call was made."""
    body = compacted_stream(pause_after_compaction=True)
    _, props = await bill(app_of([body], "text/event-stream"), fake_lago, header_settings)
    assert tokens(props) == (MODEL, 180_000, 3_500, 183_500)


def test_iterations_without_compaction_are_not_added_again() -> None:
    """A server-side tool loop's ``message`` iterations are already in the top-level counts: not added."""
    usage = {**TOP_LEVEL, "iterations": [ANSWER_ITERATION]}
    found = json_usage(json.dumps({"type": "message", "model": MODEL, "usage": usage}).encode())
    assert (found.model, found.input_tokens, found.output_tokens, found.total_tokens) == (MODEL, 23_000, 1_000, 24_000)


# -- Anthropic-compatible gateways: zero placeholders in message_delta ----------------------------------------------


def gateway_stream(delta_usage: dict[str, Any]) -> bytes:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_gw",
            "type": "message",
            "role": "assistant",
            "model": "glm-4.6",
            "content": [],
            "usage": {"input_tokens": 1_200, "cache_read_input_tokens": 800, "output_tokens": 1},
        },
    }
    return b"".join(
        [
            sse(start, "message_start"),
            sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
            sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": delta_usage}, "message_delta"),
            sse({"type": "message_stop"}, "message_stop"),
        ]
    )


async def test_zero_placeholders_in_a_gateway_s_message_delta_do_not_erase_the_input(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Gateways translating to Anthropic's stream send ``message_delta`` usage with ``"input_tokens": 0`` (and cache
    zeros) after ``message_start`` gave the real counts: the 2,000 input tokens were billed 0."""
    placeholders = {"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    body = gateway_stream({**placeholders, "output_tokens": 42})
    _, props = await bill(app_of(split(body, 5), "text/event-stream"), fake_lago, header_settings)
    assert tokens(props) == ("glm-4.6", 2_000, 42, 2_042)


def test_a_real_cumulative_update_of_the_input_still_wins() -> None:
    """A non-zero cumulative update (web search results read: more input) replaces message_start's counts."""
    body = gateway_stream({"input_tokens": 9_000, "cache_read_input_tokens": 800, "output_tokens": 42})
    recorder = UsageRecorder({"type": "http"}, AttributionConfig())
    recorder.response_start(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    recorder.response_body(body)
    usage = recorder.result()
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (9_800, 42, 9_842)


async def test_an_anthropic_stream_failing_mid_way_bills_what_was_counted(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    body = gateway_stream({"output_tokens": 42}).split(b"event: message_delta")[0] + sse(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error"
    )
    response, props = await bill(app_of([body], "text/event-stream"), fake_lago, header_settings)
    assert response.status_code == 200
    assert tokens(props) == ("glm-4.6", 2_000, 1, 2_001)


# -- compressed streams ---------------------------------------------------------------------------------------------

OPENAI_STREAM = b"".join(
    [
        sse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": "gpt-4o-2024-08-06",
                "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
                "usage": None,
            }
        ),
        sse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": "gpt-4o-2024-08-06",
                "choices": [],
                "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29},
            }
        ),
        sse("[DONE]"),
    ]
)


@pytest.mark.parametrize("first", [1, 2])
async def test_a_raw_deflate_stream_whose_first_message_is_one_byte_is_billed(
    first: int, fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Raw deflate (``Content-Encoding: deflate`` without the zlib wrapper, as some servers send it) is read, but
    only when the first body message held two bytes or more: zlib cannot tell a wrapper from one byte, the reader
    took it for zlib's, then gave up on the next byte (usage billed 0, "could not be decompressed")."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(OPENAI_STREAM) + compressor.flush()
    pieces = [deflated[:first], *split(deflated[first:], 16)]
    app = app_of(pieces, "text/event-stream", headers={"content-encoding": "deflate"})
    response, props = await bill(app, fake_lago, header_settings)
    assert response.content == OPENAI_STREAM  # (httpx inflated it)
    assert tokens(props) == ("gpt-4o-2024-08-06", 19, 10, 29)
