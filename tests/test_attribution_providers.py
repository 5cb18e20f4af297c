"""Token and model attribution from the answers LLM APIs and gateways send, as they send them (fixtures written by
hand from each provider's API reference), billed through the middleware: JSON bodies, server-sent events and
newline-delimited JSON, plain and gzip'd. Each is billed its tokens once, or 0 without crashing."""

from __future__ import annotations

import json
import logging
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
from lago_org_billing._attribution import AttributionConfig, Usage, UsageRecorder, reset_warnings

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}
JSON = "application/json"
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


def sse(*events: tuple[str | None, Any]) -> list[bytes]:
    """One chunk per event, compact JSON as the APIs send it."""
    out = []
    for name, data in events:
        head = b"" if name is None else b"event: " + name.encode() + b"\n"
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        out.append(head + b"data: " + text.encode() + b"\n\n")
    return out


# -- OpenAI ---------------------------------------------------------------------------------------------------------

OPENAI_CHAT = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}
# An o-series answer: reasoning_tokens are a part of completion_tokens, cached_tokens a part of prompt_tokens.
OPENAI_REASONING = {
    **OPENAI_CHAT,
    "model": "o3-mini-2025-01-31",
    "usage": {
        "prompt_tokens": 1075,
        "completion_tokens": 1186,
        "total_tokens": 2261,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 1024, "audio_tokens": 0},
    },
}
_CHUNK = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1694268190,
    "model": "gpt-4o-mini-2024-07-18",
    "system_fingerprint": "fp_44709d6fcb",
}
OPENAI_STREAM = sse(
    (None, {**_CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None}),
    (None, {**_CHUNK, "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": None}], "usage": None}),
    (None, {**_CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}),
    (
        None,
        {
            **_CHUNK,
            "choices": [],
            "usage": {
                "prompt_tokens": 9,
                "completion_tokens": 12,
                "total_tokens": 21,
                "completion_tokens_details": {"reasoning_tokens": 4},
            },
        },
    ),
    (None, "[DONE]"),
)
_RESPONSE = {
    "id": "resp_67ccd2bed1ec8190",
    "object": "response",
    "created_at": 1741476542,
    "model": "gpt-4.1-2025-04-14",
}
RESPONSES_JSON = {
    **_RESPONSE,
    "status": "completed",
    "output": [{"type": "message", "id": "msg_1", "role": "assistant", "content": [{"type": "output_text"}]}],
    "usage": {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 123,
    },
    "user": None,
    "metadata": {},
}
_RESPONSES_OPEN = [
    ("response.created", {"type": "response.created", "sequence_number": 0, "response": {**_RESPONSE, "usage": None}}),
    ("response.in_progress", {"type": "response.in_progress", "response": {**_RESPONSE, "usage": None}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Hi"}),
]
RESPONSES_STREAM = sse(
    *_RESPONSES_OPEN,
    ("response.completed", {"type": "response.completed", "response": {**RESPONSES_JSON}}),
)
RESPONSES_INCOMPLETE = sse(
    *_RESPONSES_OPEN,
    (
        "response.incomplete",
        {
            "type": "response.incomplete",
            "response": {
                **_RESPONSE,
                "status": "incomplete",
                "incomplete_details": {"reason": "max_output_tokens"},
                "usage": {
                    "input_tokens": 20,
                    "output_tokens": 64,
                    "output_tokens_details": {"reasoning_tokens": 64},
                    "total_tokens": 84,
                },
            },
        },
    ),
)
RESPONSES_FAILED = sse(
    *_RESPONSES_OPEN,
    (
        "response.failed",
        {
            "type": "response.failed",
            "response": {**_RESPONSE, "status": "failed", "error": {"code": "server_error"}, "usage": None},
        },
    ),
)
EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.0023064255, -0.009327292, -0.0028842222]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}
# Azure OpenAI: a first chunk with the prompt's filter results, an empty model and no choices; filter results after.
AZURE_STREAM = sse(
    (None, {"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": [{}]}),
    (None, {**_CHUNK, "model": "gpt-4o-2024-11-20", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}),
    (
        None,
        {
            **_CHUNK,
            "model": "gpt-4o-2024-11-20",
            "choices": [],
            "usage": {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32},
        },
    ),
    (
        None,
        {"choices": [{"index": 0, "content_filter_offsets": {}, "content_filter_results": {}}], "model": "", "id": ""},
    ),
    (None, "[DONE]"),
)

# -- Anthropic ------------------------------------------------------------------------------------------------------

ANTHROPIC_JSON = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "Hi!"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 12,
        "cache_creation_input_tokens": 1500,
        "cache_read_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 6,
        "service_tier": "standard",
    },
}
_MESSAGE_START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-sonnet-4-5-20250929",
        "stop_reason": None,
        "usage": {
            "input_tokens": 472,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 2000,
            "output_tokens": 1,
        },
    },
}
_ANTHROPIC_BODY = [
    ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ("ping", {"type": "ping"}),
    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
    ("content_block_stop", {"type": "content_block_stop", "index": 0}),
]
ANTHROPIC_STREAM = sse(
    ("message_start", _MESSAGE_START),
    *_ANTHROPIC_BODY,
    ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 89}}),
    ("message_stop", {"type": "message_stop"}),
)
# The current API repeats the cumulative input and cache counts in message_delta.
ANTHROPIC_STREAM_CUMULATIVE = sse(
    ("message_start", _MESSAGE_START),
    *_ANTHROPIC_BODY,
    (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {
                "input_tokens": 472,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 2000,
                "output_tokens": 89,
                "server_tool_use": {"web_search_requests": 1},
            },
        },
    ),
    ("message_stop", {"type": "message_stop"}),
)

# -- Google Gemini --------------------------------------------------------------------------------------------------


def gemini(text: str, usage: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    return {
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": "gemini-2.5-flash",
        "responseId": "mAitaLmkHPPlz7IPvtfUqQ4",
    }


# thoughtsTokenCount is not a part of candidatesTokenCount (totalTokenCount = prompt + candidates + thoughts) and is
# billed as output; promptTokenCount counts the cached content (cachedContentTokenCount is a part of it).
GEMINI_USAGE = {
    "promptTokenCount": 11,
    "candidatesTokenCount": 9,
    "totalTokenCount": 45,
    "thoughtsTokenCount": 25,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 11}],
}
GEMINI_JSON = gemini("Hello there", GEMINI_USAGE, "STOP")
GEMINI_CHUNKS = [
    gemini("Hello", {"promptTokenCount": 11, "totalTokenCount": 36, "thoughtsTokenCount": 25}),
    gemini(
        " there", {"promptTokenCount": 11, "candidatesTokenCount": 4, "totalTokenCount": 40, "thoughtsTokenCount": 25}
    ),
    gemini("", GEMINI_USAGE, "STOP"),
]
GEMINI_SSE = [b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n" for chunk in GEMINI_CHUNKS]  # alt=sse
# streamGenerateContent without alt=sse: one JSON array, its elements sent as they come.
GEMINI_ARRAY = [
    b"[" + json.dumps(GEMINI_CHUNKS[0]).encode(),
    b",\r\n" + json.dumps(GEMINI_CHUNKS[1]).encode(),
    b",\r\n" + json.dumps(GEMINI_CHUNKS[2]).encode() + b"]",
]

# -- AWS Bedrock Converse -------------------------------------------------------------------------------------------

# inputTokens does not count the cache reads and writes; totalTokens does.
BEDROCK_CONVERSE = {
    "output": {"message": {"role": "assistant", "content": [{"text": "Hello"}]}},
    "stopReason": "end_turn",
    "usage": {
        "inputTokens": 20,
        "outputTokens": 50,
        "totalTokens": 1570,
        "cacheReadInputTokens": 1200,
        "cacheWriteInputTokens": 300,
    },
    "metrics": {"latencyMs": 812},
}

# -- OpenAI-compatible servers --------------------------------------------------------------------------------------

_GROQ = {"id": "chatcmpl-bc4c", "object": "chat.completion.chunk", "created": 1, "model": "llama-3.3-70b-versatile"}
_GROQ_USAGE = {
    "queue_time": 0.090321431,
    "prompt_tokens": 38,
    "prompt_time": 0.003210785,
    "completion_tokens": 4,
    "completion_time": 0.027554055,
    "total_tokens": 42,
    "total_time": 0.03076484,
}
# Groq: the usage in x_groq of the last chunk, and (since stream_options is supported) at the top level too.
GROQ_STREAM = sse(
    (
        None,
        {**_GROQ, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "x_groq": {"id": "req_1"}},
    ),
    (None, {**_GROQ, "choices": [{"index": 0, "delta": {"content": "Hello"}}]}),
    (
        None,
        {
            **_GROQ,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "x_groq": {"id": "req_1", "usage": _GROQ_USAGE},
            "usage": _GROQ_USAGE,
        },
    ),
    (None, "[DONE]"),
)
GROQ_STREAM_X_GROQ_ONLY = sse(
    (None, {**_GROQ, "choices": [{"index": 0, "delta": {"content": "Hello"}}], "x_groq": {"id": "req_1"}}),
    (
        None,
        {
            **_GROQ,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "x_groq": {"id": "req_1", "usage": _GROQ_USAGE},
        },
    ),
    (None, "[DONE]"),
)
# Mistral and Together: the usage in the last chunk, next to its choices.
MISTRAL_STREAM = sse(
    (
        None,
        {
            "id": "m1",
            "object": "chat.completion.chunk",
            "model": "mistral-small-latest",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}],
        },
    ),
    (
        None,
        {
            "id": "m1",
            "object": "chat.completion.chunk",
            "model": "mistral-small-latest",
            "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "total_tokens": 18, "completion_tokens": 8},
        },
    ),
    (None, "[DONE]"),
)
# vLLM with stream_options.continuous_usage_stats: a cumulative usage in every chunk, and the final one.
VLLM_STREAM = sse(
    *[
        (
            None,
            {
                "id": "cmpl-1",
                "object": "chat.completion.chunk",
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "choices": [{"index": 0, "delta": {"content": "x"}}],
                "usage": {"prompt_tokens": 15, "total_tokens": 15 + n, "completion_tokens": n},
            },
        )
        for n in range(1, 6)
    ],
    (
        None,
        {
            "id": "cmpl-1",
            "object": "chat.completion.chunk",
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "choices": [],
            "usage": {"prompt_tokens": 15, "total_tokens": 20, "completion_tokens": 5},
        },
    ),
    (None, "[DONE]"),
)
# LiteLLM proxy answering for Claude in OpenAI's shape: prompt_tokens counts the cache already.
LITELLM_CLAUDE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "claude-3-7-sonnet-20250219",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 3205,
        "completion_tokens": 50,
        "total_tokens": 3255,
        "prompt_tokens_details": {"cached_tokens": 3200},
        "completion_tokens_details": {"reasoning_tokens": 20},
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 3200,
    },
}
# Ollama's own API: counts at the top level of the last (done) object.
OLLAMA_JSON = {
    "model": "llama3.2",
    "created_at": "2023-12-12T14:13:43.416799Z",
    "message": {"role": "assistant", "content": "Hello! How are you today?"},
    "done_reason": "stop",
    "done": True,
    "total_duration": 5191566416,
    "load_duration": 2154458,
    "prompt_eval_count": 26,
    "prompt_eval_duration": 383809000,
    "eval_count": 298,
    "eval_duration": 4799921000,
}
OLLAMA_NDJSON = [
    json.dumps(
        {
            "model": "llama3.2",
            "created_at": "2023-08-04T08:52:19.385406455-07:00",
            "message": {"role": "assistant", "content": "Hel"},
            "done": False,
        }
    ).encode()
    + b"\n",
    json.dumps(
        {
            "model": "llama3.2",
            "created_at": "2023-08-04T08:52:19.385406455-07:00",
            "message": {"role": "assistant", "content": "lo"},
            "done": False,
        }
    ).encode()
    + b"\n",
    json.dumps({**OLLAMA_JSON, "message": {"role": "assistant", "content": ""}}).encode() + b"\n",
]
OLLAMA_EMBED = {
    "model": "all-minilm",
    "embeddings": [[0.010071029, -0.0017594862]],
    "total_duration": 14143917,
    "load_duration": 1019500,
    "prompt_eval_count": 8,
}


def body(payload: Any) -> list[bytes]:
    return [json.dumps(payload).encode()]


SHAPES: dict[str, tuple[str, list[bytes], tuple[str | None, int, int, int]]] = {
    # name: (content type, body chunks, (model, input, output, total) billed)
    "openai-chat": (JSON, body(OPENAI_CHAT), ("gpt-4o-2024-08-06", 19, 10, 29)),
    "openai-reasoning": (JSON, body(OPENAI_REASONING), ("o3-mini-2025-01-31", 1075, 1186, 2261)),
    "openai-chat-stream": (SSE, OPENAI_STREAM, ("gpt-4o-mini-2024-07-18", 9, 12, 21)),
    "openai-responses": (JSON, body(RESPONSES_JSON), ("gpt-4.1-2025-04-14", 36, 87, 123)),
    "openai-responses-stream": (SSE, RESPONSES_STREAM, ("gpt-4.1-2025-04-14", 36, 87, 123)),
    "openai-responses-incomplete": (SSE, RESPONSES_INCOMPLETE, ("gpt-4.1-2025-04-14", 20, 64, 84)),
    "openai-responses-failed": (SSE, RESPONSES_FAILED, ("gpt-4.1-2025-04-14", 0, 0, 0)),
    "openai-embeddings": (JSON, body(EMBEDDINGS), ("text-embedding-3-small", 8, 0, 8)),
    "azure-openai-stream": (SSE, AZURE_STREAM, ("gpt-4o-2024-11-20", 30, 2, 32)),
    "anthropic": (JSON, body(ANTHROPIC_JSON), ("claude-sonnet-4-5-20250929", 4512, 6, 4518)),
    "anthropic-stream": (SSE, ANTHROPIC_STREAM, ("claude-sonnet-4-5-20250929", 2472, 89, 2561)),
    "anthropic-stream-cumulative": (SSE, ANTHROPIC_STREAM_CUMULATIVE, ("claude-sonnet-4-5-20250929", 2472, 89, 2561)),
    "gemini": (JSON, body(GEMINI_JSON), ("gemini-2.5-flash", 11, 34, 45)),
    "gemini-sse": (SSE, GEMINI_SSE, ("gemini-2.5-flash", 11, 34, 45)),
    "gemini-json-array": (JSON, GEMINI_ARRAY, ("gemini-2.5-flash", 11, 34, 45)),
    "bedrock-converse": (JSON, body(BEDROCK_CONVERSE), (None, 1520, 50, 1570)),
    "groq-stream": (SSE, GROQ_STREAM, ("llama-3.3-70b-versatile", 38, 4, 42)),
    "groq-stream-x-groq-only": (SSE, GROQ_STREAM_X_GROQ_ONLY, ("llama-3.3-70b-versatile", 38, 4, 42)),
    "mistral-stream": (SSE, MISTRAL_STREAM, ("mistral-small-latest", 10, 8, 18)),
    "vllm-continuous-usage": (SSE, VLLM_STREAM, ("meta-llama/Llama-3.1-8B-Instruct", 15, 5, 20)),
    "litellm-claude": (JSON, body(LITELLM_CLAUDE), ("claude-3-7-sonnet-20250219", 3205, 50, 3255)),
    "ollama": (JSON, body(OLLAMA_JSON), ("llama3.2", 26, 298, 324)),
    "ollama-ndjson": (NDJSON, OLLAMA_NDJSON, ("llama3.2", 26, 298, 324)),
    "ollama-embed": (JSON, body(OLLAMA_EMBED), ("all-minilm", 8, 0, 8)),
}


class StreamingGzip:
    """Compresses a response as a streaming server does: each chunk deflated and flushed at once (gzip framing)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        packer = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | 16)

        async def compressing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message["headers"] if k != b"content-length"]
                message = {**message, "headers": [*headers, (b"content-encoding", b"gzip")]}
            elif message["type"] == "http.response.body":
                data = packer.compress(message.get("body", b""))
                data += packer.flush(zlib.Z_FINISH if not message.get("more_body") else zlib.Z_SYNC_FLUSH)
                message = {**message, "body": data}
            await send(message)

        await self.app(scope, receive, compressing)


def shape_app(content_type: str, chunks: list[bytes]) -> Starlette:
    async def answer(request: Request) -> Response:
        if len(chunks) == 1 and content_type == JSON:
            return Response(chunks[0], media_type=content_type)

        async def stream() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return StreamingResponse(stream(), media_type=content_type)

    return Starlette(routes=[Route("/v1/answer", answer, methods=["POST"])])


async def bill(app: ASGIApp, fake_lago: Any, settings: BillingSettings) -> tuple[httpx.Response, list[dict[str, Any]]]:
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            response = await client.post("/v1/answer", headers=HEADERS)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return response, [event["properties"] for event in fake_lago.events]


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("name", list(SHAPES))
async def test_each_provider_shape_is_billed_its_tokens_and_model_once(
    name: str, gzipped: bool, fake_lago: Any, header_settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    content_type, chunks, (model, input_tokens, output_tokens, total_tokens) = SHAPES[name]
    app: ASGIApp = shape_app(content_type, chunks)
    if gzipped:
        app = StreamingGzip(app)
    response, events = await bill(app, fake_lago, header_settings)
    assert response.status_code == 200
    assert response.content == b"".join(chunks)  # (httpx inflates): passed on unchanged
    [props] = events
    billed = (props.get("model"), props["input_tokens"], props["output_tokens"], props["total_tokens"])
    assert billed == (model, input_tokens, output_tokens, total_tokens)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("name", [name for name, shape in SHAPES.items() if shape[0] != JSON or len(shape[1]) > 1])
async def test_streamed_shapes_byte_by_byte(name: str) -> None:
    """Streams split anywhere (a proxy re-chunking them) bill the same."""
    content_type, chunks, (model, input_tokens, output_tokens, total_tokens) = SHAPES[name]
    recorder = UsageRecorder({"type": "http"}, AttributionConfig())
    recorder.response_start(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type.encode())]}
    )
    data = b"".join(chunks)
    for i in range(len(data)):
        recorder.response_body(data[i : i + 1])
    usage = recorder.result()
    assert (usage.model, usage.input_tokens, usage.output_tokens, usage.total_tokens) == (
        model,
        input_tokens,
        output_tokens,
        total_tokens,
    )


def record(content_type: bytes, chunks: list[bytes], config: AttributionConfig | None = None) -> Usage:
    recorder = UsageRecorder({"type": "http"}, config or AttributionConfig())
    recorder.response_start(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]}
    )
    for chunk in chunks:
        recorder.response_body(chunk)
    return recorder.result()


async def test_a_json_array_of_records_with_usage_is_not_billed_as_tokens() -> None:
    """Reading Gemini's array stream must not make any JSON list of records bill tokens (an admin endpoint listing
    usage per day is not an LLM answer)."""
    records = [{"day": "2026-03-01", "usage": {"input_tokens": 5, "output_tokens": 7}, "model": "gpt-4o"}] * 3
    assert record(b"application/json", body(records)) == Usage()


async def test_a_gemini_image_answer_over_the_json_cap_is_billed_its_tokens() -> None:
    """gemini-2.5-flash-image answers the image inline in base64 (megabytes), its usageMetadata after it."""
    answer = {
        "candidates": [
            {
                "content": {
                    "parts": [{"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo" * 20_000}}],
                    "role": "model",
                },
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 1290, "totalTokenCount": 1297},
        "modelVersion": "gemini-2.5-flash-image",
        "responseId": "abc",
    }
    usage = record(b"application/json", body(answer), AttributionConfig(max_body_bytes=50_000))
    assert usage == Usage("gemini-2.5-flash-image", 7, 1290, 1297, "json")


async def test_a_streamed_gemini_image_whose_last_event_is_over_the_cap_is_billed_its_tokens() -> None:
    """The last event of a streamed image generation carries the image (over the cap) and then its usageMetadata."""
    last = gemini("", {"promptTokenCount": 7, "candidatesTokenCount": 1290, "totalTokenCount": 1297}, "STOP")
    last["candidates"][0]["content"]["parts"] = [{"inlineData": {"mimeType": "image/png", "data": "iVBORw0K" * 20_000}}]
    stream = [
        b"data: " + json.dumps(GEMINI_CHUNKS[0]).encode() + b"\r\n\r\n",
        b"data: " + json.dumps(last).encode() + b"\r\n\r\n",
    ]
    usage = record(b"text/event-stream", stream, AttributionConfig(max_body_bytes=50_000))
    assert usage == Usage("gemini-2.5-flash", 7, 1290, 1297, "sse")


async def test_gemini_counts_it_leaves_out_and_cached_content() -> None:
    """Gemini's JSON leaves zero counts out (no candidatesTokenCount when only thoughts came); cachedContentTokenCount
    is a part of promptTokenCount (not added); toolUsePromptTokenCount is input."""
    usage = {
        "promptTokenCount": 1000,
        "cachedContentTokenCount": 800,
        "toolUsePromptTokenCount": 50,
        "thoughtsTokenCount": 100,
        "totalTokenCount": 1150,
    }
    assert record(b"application/json", body(gemini("", usage, "MAX_TOKENS"))) == Usage(
        "gemini-2.5-flash", 1050, 100, 1150, "json"
    )


async def test_malformed_gemini_and_bedrock_counts_bill_zero_and_are_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = gemini("x", {"promptTokenCount": "many", "candidatesTokenCount": -3, "totalTokenCount": 1.5})
    for _ in range(2):
        assert record(b"application/json", body(bad)) == Usage("gemini-2.5-flash", 0, 0, 0, "json")
    bedrock = {**BEDROCK_CONVERSE, "usage": {"inputTokens": True, "outputTokens": 5, "totalTokens": None}}
    assert record(b"application/json", body(bedrock)) == Usage(None, 0, 5, 5, "json")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4  # promptTokenCount, candidatesTokenCount, total_tokens, inputTokens: once each
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_ollama_with_its_prompt_cached_bills_the_output_it_counted() -> None:
    """Ollama leaves prompt_eval_count out when the whole prompt came from its cache."""
    answer = {key: value for key, value in OLLAMA_JSON.items() if key != "prompt_eval_count"}
    assert record(b"application/json", body(answer)) == Usage("llama3.2", 0, 298, 298, "json")
    assert record(b"application/x-ndjson; charset=utf-8", [json.dumps(answer).encode()]) == Usage(
        "llama3.2", 0, 298, 298, "sse"
    )


@pytest.mark.parametrize("chunk", [7_000, 10**6])
async def test_an_ndjson_line_over_the_cap_is_said_once_and_the_next_lines_still_count(
    chunk: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A line over the cap is dropped; the next lines still count. Said (tokens billed 0) only when the stream gave
    no usage at all: a dropped line whose stream's usage came later lost nothing."""
    from lago_org_billing import _attribution

    huge = json.dumps({"model": "llama3.2", "response": "x" * 60_000, "done": False}).encode() + b"\n"
    stream = huge + b"".join(OLLAMA_NDJSON)
    chunks = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
    usage = record(b"application/x-ndjson", chunks, AttributionConfig(max_body_bytes=50_000))
    assert usage == Usage("llama3.2", 26, 298, 324, "sse")
    assert not [r for r in caplog.records if "max_body_bytes" in r.getMessage()]
    _attribution._said_once.clear()
    alone = [huge[i : i + chunk] for i in range(0, len(huge), chunk)]
    assert record(b"application/x-ndjson", alone, AttributionConfig(max_body_bytes=50_000)).total_tokens == 0
    assert [r for r in caplog.records if "max_body_bytes" in r.getMessage()]


def stream_app(chunks: list[bytes], explicit: dict[str, Any] | None = None) -> Starlette:
    async def answer(request: Request) -> Response:
        if explicit is not None:
            from lago_org_billing import attribute_usage

            attribute_usage(request, **explicit)

        async def stream() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return StreamingResponse(stream(), media_type=SSE)

    return Starlette(routes=[Route("/v1/answer", answer, methods=["POST"])])


async def test_an_openai_stream_without_include_usage_bills_zero_and_says_why_once(
    fake_lago: Any, header_settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """Without stream_options.include_usage, OpenAI's chunks carry no usage at all: the call was billed 0 tokens
    without a word, request after request."""
    without_usage = [chunk for chunk in OPENAI_STREAM if b'"choices":[]' not in chunk]
    _, events = await bill(stream_app(without_usage), fake_lago, header_settings)
    assert [(p["model"], p["total_tokens"]) for p in events] == [("gpt-4o-mini-2024-07-18", 0)]
    said = [r.getMessage() for r in caplog.records if "include_usage" in r.getMessage()]
    assert len(said) == 1 and "billed 0" in said[0]
    await bill(stream_app(without_usage), fake_lago, header_settings)
    assert len([r for r in caplog.records if "include_usage" in r.getMessage()]) == 1  # once


async def test_a_stream_without_usage_whose_tokens_are_attributed_otherwise_says_nothing(
    fake_lago: Any, header_settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    without_usage = [chunk for chunk in OPENAI_STREAM if b'"choices":[]' not in chunk]
    app = stream_app(without_usage, explicit={"input_tokens": 9, "output_tokens": 12})
    _, events = await bill(app, fake_lago, header_settings)
    assert [(p["model"], p["total_tokens"]) for p in events] == [("gpt-4o-mini-2024-07-18", 21)]
    assert not [r for r in caplog.records if "include_usage" in r.getMessage()]
    _, events = await bill(stream_app(OPENAI_STREAM), fake_lago, header_settings)  # with its usage: nothing to say
    assert not [r for r in caplog.records if "include_usage" in r.getMessage()]
