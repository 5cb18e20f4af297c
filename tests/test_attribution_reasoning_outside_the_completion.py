"""Usage attribution of OpenAI-compatible answers whose ``reasoning_tokens`` are *not* a part of their
``completion_tokens`` / ``output_tokens`` (xAI's Grok, and gateways relaying Gemini's thoughts in OpenAI's shape): their
``total_tokens`` counts prompt + completion + reasoning, and the reasoning is billed as output (what the provider
bills). OpenAI's own shape (reasoning a subset, total = prompt + completion) must bill as before. JSON bodies and
server-sent-event streams, through the middleware and the recorder, plain and split byte by byte."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._attribution import UsageRecorder, json_usage, reset_warnings

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}
JSON = "application/json"
SSE = "text/event-stream"


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


def sse(*events: Any) -> list[bytes]:
    return [
        b"data: " + (e if isinstance(e, str) else json.dumps(e, separators=(",", ":"))).encode() + b"\n\n"
        for e in events
    ]


# xAI's chat completion (its API reference's example): 32 + 9 + 94 = 135, reasoning billed as output.
XAI_USAGE = {
    "prompt_tokens": 32,
    "completion_tokens": 9,
    "total_tokens": 135,
    "prompt_tokens_details": {"text_tokens": 32, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": 6},
    "completion_tokens_details": {
        "reasoning_tokens": 94,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
    "num_sources_used": 0,
}
XAI_CHAT = {
    "id": "0daf962f-a275-4a3c-839a-047854645532",
    "object": "chat.completion",
    "created": 1739301120,
    "model": "grok-3-mini-beta",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "9"}, "finish_reason": "stop"}],
    "usage": XAI_USAGE,
    "system_fingerprint": "fp_ebf2d8a5c2",
}
_XAI_CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "grok-4-fast-reasoning"}
XAI_STREAM = sse(
    {**_XAI_CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]},
    {**_XAI_CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {
        **_XAI_CHUNK,
        "choices": [],
        "usage": {
            "prompt_tokens": 279,
            "completion_tokens": 6,
            "total_tokens": 374,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 89},
        },
    },
    "[DONE]",
)
# xAI's Responses API: output_tokens leaves the reasoning out there too.
XAI_RESPONSE = {
    "id": "resp_x1",
    "object": "response",
    "model": "grok-4",
    "status": "completed",
    "output": [],
    "usage": {
        "input_tokens": 279,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 89},
        "total_tokens": 374,
    },
}
XAI_RESPONSES_STREAM = sse(
    {"type": "response.created", "response": {**XAI_RESPONSE, "status": "in_progress", "usage": None}},
    {"type": "response.output_text.delta", "item_id": "m1", "delta": "Hi"},
    {"type": "response.completed", "response": XAI_RESPONSE},
)
# A gateway relaying Gemini in OpenAI's shape: the thoughts only as reasoning_tokens, completion_tokens without them
# (an answer of thoughts alone: 0, or the key left out).
GEMINI_RELAYED = {
    "id": "g1",
    "object": "chat.completion",
    "model": "gemini-2.5-flash",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "length"}],
    "usage": {
        "completion_tokens": 0,
        "prompt_tokens": 21,
        "total_tokens": 81,
        "completion_tokens_details": {"reasoning_tokens": 60},
    },
}
GEMINI_RELAYED_NO_COMPLETION = {
    **GEMINI_RELAYED,
    "usage": {"prompt_tokens": 21, "total_tokens": 81, "completion_tokens_details": {"reasoning_tokens": 60}},
}
# OpenAI's own: reasoning a subset of completion_tokens (total = prompt + completion): unchanged.
OPENAI_O3 = {
    **XAI_CHAT,
    "model": "o3-mini",
    "usage": {
        "prompt_tokens": 1075,
        "completion_tokens": 1186,
        "total_tokens": 2261,
        "prompt_tokens_details": {"cached_tokens": 1024},
        "completion_tokens_details": {"reasoning_tokens": 1024},
    },
}
# A total that reasoning does not explain is not guessed at: billed as given.
ODD_TOTAL = {**XAI_CHAT, "usage": {**XAI_USAGE, "total_tokens": 140}}

SHAPES: dict[str, tuple[str, list[bytes], tuple[str, int, int, int]]] = {
    "xai-chat": (JSON, [json.dumps(XAI_CHAT).encode()], ("grok-3-mini-beta", 32, 103, 135)),
    "xai-chat-stream": (SSE, XAI_STREAM, ("grok-4-fast-reasoning", 279, 95, 374)),
    "xai-responses": (JSON, [json.dumps(XAI_RESPONSE).encode()], ("grok-4", 279, 95, 374)),
    "xai-responses-stream": (SSE, XAI_RESPONSES_STREAM, ("grok-4", 279, 95, 374)),
    "gemini-relayed": (JSON, [json.dumps(GEMINI_RELAYED).encode()], ("gemini-2.5-flash", 21, 60, 81)),
    "gemini-relayed-no-completion": (
        JSON,
        [json.dumps(GEMINI_RELAYED_NO_COMPLETION).encode()],
        ("gemini-2.5-flash", 21, 60, 81),
    ),
    "openai-o3-unchanged": (JSON, [json.dumps(OPENAI_O3).encode()], ("o3-mini", 1075, 1186, 2261)),
    "odd-total-unchanged": (JSON, [json.dumps(ODD_TOTAL).encode()], ("grok-3-mini-beta", 32, 9, 140)),
}


def shape_app(content_type: str, chunks: list[bytes]) -> Starlette:
    async def answer(request: Request) -> Response:
        if content_type == JSON:
            return Response(b"".join(chunks), media_type=content_type)

        async def stream() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return StreamingResponse(stream(), media_type=content_type)

    return Starlette(routes=[Route("/v1/answer", answer, methods=["POST"])])


@pytest.mark.parametrize("name", list(SHAPES))
async def test_reasoning_left_out_of_the_completion_is_billed_as_output(
    name: str, fake_lago: Any, header_settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    content_type, chunks, expected = SHAPES[name]
    middleware = OrgBillingMiddleware(
        shape_app(content_type, chunks), settings=header_settings, transport=fake_lago.transport()
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            response = await client.post("/v1/answer", headers=HEADERS)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert response.status_code == 200
    assert response.content == b"".join(chunks)
    [props] = [event["properties"] for event in fake_lago.events]
    assert (props.get("model"), props["input_tokens"], props["output_tokens"], props["total_tokens"]) == expected
    assert not [r for r in caplog.records if r.name == "lago_org_billing.attribution" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_same_split_byte_by_byte_and_through_json_usage(name: str) -> None:
    content_type, chunks, expected = SHAPES[name]
    recorder = UsageRecorder({"type": "http"})
    recorder.response_start(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type.encode())]}
    )
    data = b"".join(chunks)
    for i in range(len(data)):
        recorder.response_body(data[i : i + 1])
    usage = recorder.result()
    assert (usage.model, usage.input_tokens, usage.output_tokens, usage.total_tokens) == expected
    if content_type == JSON:
        usage = json_usage(data)
        assert (usage.model, usage.input_tokens, usage.output_tokens, usage.total_tokens) == expected


def test_a_tool_loop_of_two_grok_calls_in_one_stream_bills_both_reasonings() -> None:
    """Two completions relayed in one stream add up, each with its reasoning (the total recomputed keeps them)."""
    second = [chunk.replace(b'"id":"c1"', b'"id":"c2"') for chunk in XAI_STREAM]
    recorder = UsageRecorder({"type": "http"})
    recorder.response_start(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    for chunk in [*XAI_STREAM[:-1], *second]:
        recorder.response_body(chunk)
    usage = recorder.result()
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (558, 190, 748)


def test_a_later_usage_without_reasoning_drops_the_earlier_one() -> None:
    """Cumulative usages of one completion: the last one's fields win, a reasoning count it no longer gives too."""
    recorder = UsageRecorder({"type": "http"})
    recorder.response_start(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    early = {
        **_XAI_CHUNK,
        "choices": [],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 1,
            "total_tokens": 16,
            "completion_tokens_details": {"reasoning_tokens": 5},
        },
    }
    late = {**_XAI_CHUNK, "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16}}
    for chunk in sse(early, late):
        recorder.response_body(chunk)
    usage = recorder.result()
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (10, 6, 16)
