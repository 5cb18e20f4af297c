"""Review of usage attribution with real LLM API answers passed through real Starlette apps and the billing
middleware (httpx.ASGITransport, Lago emulator): OpenAI chat completions and Responses API, Anthropic Messages,
Gemini, as JSON and as server-sent events re-chunked at every byte, gzip'd by an inner middleware, over the
inspection cap, answers to HEAD requests and 204/304s. The client gets exactly the bytes the app sent, and the
event exactly the tokens the provider reported."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._attribution import reset_warnings

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


def sse(data: Any, event: str | None = None, newline: bytes = b"\n") -> bytes:
    head = b"" if event is None else b"event: " + event.encode() + newline
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return head + b"data: " + text.encode() + newline + newline


def stream_app(
    body: bytes, media_type: str, *, chunk: int = 1, headers: dict[str, str] | None = None, path: str = "/v1/x"
) -> Starlette:
    async def endpoint(request: Request) -> Response:
        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(body), chunk):
                yield body[i : i + chunk]

        return StreamingResponse(pieces(), media_type=media_type, headers=headers)

    return Starlette(routes=[Route(path, endpoint, methods=["GET", "POST", "HEAD"])])


async def bill(
    app: ASGIApp, fake_lago: Any, settings: BillingSettings, method: str = "POST", path: str = "/v1/x"
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            response = await client.request(method, path, headers=HEADERS)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return response, [event["properties"] for event in fake_lago.events]


def tokens(props: dict[str, Any]) -> tuple[Any, int, int, int]:
    return props.get("model"), props["input_tokens"], props["output_tokens"], props["total_tokens"]


OPENAI_USAGE_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
}


async def test_a_stream_opening_with_a_byte_order_mark_split_from_its_first_line(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A stream that opens with a UTF-8 byte-order mark (which SSE ignores), its three bytes in separate chunks, its
    only event the usage: it was billed 0 (the mark was stripped only when it came whole in the first chunk, so the
    first line's field was not "data")."""
    body = b"\xef\xbb\xbf" + sse(OPENAI_USAGE_CHUNK) + sse("[DONE]")
    response, [props] = await bill(stream_app(body, "text/event-stream"), fake_lago, header_settings)
    assert response.content == body
    assert tokens(props) == ("gpt-4o-2024-08-06", 12, 3, 15)


ANTHROPIC = b"".join(
    [
        b": keep-alive\r\n\r\n",
        sse(
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4-5-20250929",
                    "content": [],
                    "usage": {
                        "input_tokens": 25,
                        "cache_creation_input_tokens": 10,
                        "cache_read_input_tokens": 100,
                        "output_tokens": 1,
                    },
                },
            },
            "message_start",
            b"\r\n",
        ),
        sse({"type": "ping"}, "ping", b"\r\n"),
        sse(
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": 'Grüße 🌍 "usage"'}}, None, b"\r\n"
        ),
        b":\r\n",
        sse(
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 42}},
            "message_delta",
            b"\r\n",
        ),
        sse({"type": "message_stop"}, "message_stop", b"\r\n"),
    ]
)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
async def test_anthropic_stream_rechunked(chunk: int, fake_lago: Any, header_settings: BillingSettings) -> None:
    """CRLF events, comments, a text with multibyte characters and a quoted "usage", split anywhere (between \\r
    and \\n, inside a character): cache writes and reads added to the input, output from message_delta."""
    response, [props] = await bill(stream_app(ANTHROPIC, "text/event-stream", chunk=chunk), fake_lago, header_settings)
    assert response.content == ANTHROPIC
    assert tokens(props) == ("claude-sonnet-4-5-20250929", 135, 42, 177)


def multi_data(payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, indent=1)
    return b"".join(b"data:" + line.encode() + b"\n" for line in text.split("\n")) + b"\n"


async def test_multi_data_lines(fake_lago: Any, header_settings: BillingSettings) -> None:
    """An event whose JSON spans several data fields (joined by newlines), after retry and id fields."""
    body = b"retry: 1000\nid: 1\n" + multi_data(OPENAI_USAGE_CHUNK) + b"data: [DONE]\n\n"
    response, [props] = await bill(stream_app(body, "text/event-stream; charset=utf-8"), fake_lago, header_settings)
    assert response.content == body
    assert tokens(props) == ("gpt-4o-2024-08-06", 12, 3, 15)


RESPONSES_JSON = {
    "id": "resp_1",
    "object": "response",
    "status": "completed",
    "model": "gpt-4.1-2025-04-14",
    "output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}],
    "usage": {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 30},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 20},
        "total_tokens": 123,
    },
    "user": None,
    "metadata": {},
}


def json_app(payload: Any, *, gzip_min: int | None = None, stream: bool = False) -> ASGIApp:
    raw = json.dumps(payload).encode()

    async def endpoint(request: Request) -> Response:
        if stream:

            async def pieces() -> AsyncIterator[bytes]:
                for i in range(0, len(raw), 4096):
                    yield raw[i : i + 4096]

            return StreamingResponse(pieces(), media_type="application/json")
        return Response(raw, media_type="application/json")

    app: ASGIApp = Starlette(routes=[Route("/v1/x", endpoint, methods=["GET", "POST", "HEAD"])])
    if gzip_min is not None:
        app = GZipMiddleware(app, minimum_size=gzip_min)
    return app


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("gz", [None, 10])
async def test_responses_json(stream: bool, gz: int | None, fake_lago: Any, header_settings: BillingSettings) -> None:
    """The Responses API's JSON, whole or streamed in pieces, plain or gzip'd by Starlette's GZipMiddleware."""
    response, [props] = await bill(json_app(RESPONSES_JSON, gzip_min=gz, stream=stream), fake_lago, header_settings)
    assert response.json() == RESPONSES_JSON
    if gz:
        assert response.headers["content-encoding"] == "gzip"
    assert tokens(props) == ("gpt-4.1-2025-04-14", 36, 87, 123)


EMBED_BIG = {
    "object": "list",
    "data": [{"object": "embedding", "index": i, "embedding": [0.0123456789] * 1536} for i in range(100)],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 800, "total_tokens": 800},
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("gz", [None, 10])
async def test_embeddings_over_cap(
    stream: bool, gz: int | None, fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Embeddings over max_body_bytes (Content-Length or chunked, plain or gzip'd): the usage closing them."""
    response, [props] = await bill(json_app(EMBED_BIG, gzip_min=gz, stream=stream), fake_lago, header_settings)
    assert len(response.content) > 1_048_576
    assert tokens(props) == ("text-embedding-3-small", 800, 0, 800)


async def test_a_head_request_bills_what_the_endpoint_answered(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Starlette answers a HEAD with the GET endpoint's body (the server drops it): the endpoint ran, its tokens are
    billed once; the client gets the headers only."""
    response, [props] = await bill(json_app(RESPONSES_JSON), fake_lago, header_settings, method="HEAD")
    assert response.content == b""
    assert (props["method"], *tokens(props)) == ("HEAD", "gpt-4.1-2025-04-14", 36, 87, 123)


@pytest.mark.parametrize("status", [204, 304])
async def test_answers_without_a_body_bill_nothing_and_say_nothing(
    status: int, fake_lago: Any, header_settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """A 204, or a 304 keeping the JSON type and a Content-Length over the cap: no tokens, no warning."""

    async def endpoint(request: Request) -> Response:
        headers = {"content-type": "application/json", "content-length": "5000000", "etag": '"v1"'}
        return Response(status_code=status, headers=headers if status == 304 else None)

    app = Starlette(routes=[Route("/v1/x", endpoint, methods=["POST"])])
    response, [props] = await bill(app, fake_lago, header_settings)
    assert response.status_code == status
    assert (props["status_code"], *tokens(props)) == (status, None, 0, 0, 0)
    assert "attribution" not in {record.name.rsplit(".", 1)[-1] for record in caplog.records}


async def test_an_encoding_it_cannot_read_is_passed_on_and_bills_zero(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A stream encoded otherwise than gzip/deflate (here labelled br) is never parsed as garbage: passed on byte
    for byte, 0 tokens."""
    body = gzip.compress(ANTHROPIC)
    app = stream_app(body, "text/event-stream", chunk=5, headers={"content-encoding": "br"})
    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            async with client.stream("POST", "/v1/x", headers=HEADERS) as response:
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert raw == body
    [event] = fake_lago.events
    assert tokens(event["properties"]) == (None, 0, 0, 0)


def gemini_chunk(parts: list[dict[str, Any]], usage: dict[str, int], finish: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    return {
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": "gemini-2.5-flash-image",
        "responseId": "mKpXaOy3Ir6bz7IP",
    }


GEMINI_IMAGE_ARRAY = [
    gemini_chunk([{"text": "Here is your cat"}], {"promptTokenCount": 7, "totalTokenCount": 7}),
    gemini_chunk(
        [{"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgoAAAANSUhEUgAA" * 60_000}}],
        {"promptTokenCount": 7, "totalTokenCount": 7},
    ),
    gemini_chunk(
        [{"text": ""}], {"promptTokenCount": 7, "candidatesTokenCount": 1290, "totalTokenCount": 1297}, "STOP"
    ),
]


@pytest.mark.parametrize("gz", [None, 10])
async def test_a_gemini_array_stream_over_the_cap_is_billed_its_tokens(
    gz: int | None, fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Gemini's streamGenerateContent without alt=sse answers a JSON array of chunks, here of an image model (the
    image inline, megabytes of base64): over max_body_bytes it was billed 0 tokens ("over the cap" warning), since
    only a usage closing a top-level *object* was looked for among the body's last bytes."""
    body = ("[" + ",\r\n".join(json.dumps(chunk) for chunk in GEMINI_IMAGE_ARRAY) + "]").encode()
    assert len(body) > 1_048_576
    response, [props] = await bill(
        stream_app(body, "application/json", chunk=65_536)
        if gz is None
        else GZipMiddleware(stream_app(body, "application/json", chunk=65_536), minimum_size=gz),
        fake_lago,
        header_settings,
    )
    assert response.content == body
    assert tokens(props) == ("gemini-2.5-flash-image", 7, 1290, 1297)


async def test_a_list_of_records_over_the_cap_is_still_not_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """An admin endpoint listing stored Gemini answers (each its own responseId) is not an answer: not billed."""
    records = [
        {**gemini_chunk([{"text": "x" * 2000}], {"promptTokenCount": 7, "totalTokenCount": 9}), "responseId": f"r{i}"}
        for i in range(600)
    ]
    body = json.dumps(records).encode()
    assert len(body) > 1_048_576
    response, [props] = await bill(stream_app(body, "application/json", chunk=65_536), fake_lago, header_settings)
    assert response.content == body
    assert tokens(props) == (None, 0, 0, 0)


def openai_completion(ident: str, text: str, prompt: int, completion: int) -> bytes:
    """One streamed chat completion with include_usage: content chunks, the finish, the usage chunk (no choices)."""
    base = {"id": ident, "object": "chat.completion.chunk", "created": 1741570283, "model": "gpt-4o-2024-08-06"}
    out = [
        sse({**base, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}], "usage": None})
        for word in text.split()
    ]
    out.append(sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}))
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    out.append(sse({**base, "choices": [], "usage": usage}))
    return b"".join(out)


async def test_an_agent_stream_of_two_openai_completions_bills_both(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """An endpoint running a tool loop relays the chunks of each upstream chat completion (a tool call, then the
    answer), each completion with its id and its own usage chunk: only the last completion's tokens were billed
    (usage taken as cumulative over the whole stream), while Anthropic's messages in one stream are added up."""
    body = openai_completion("chatcmpl-A", "calling tool", 100, 20) + openai_completion(
        "chatcmpl-B", "the answer", 150, 30
    )
    body += sse("[DONE]")
    response, [props] = await bill(stream_app(body, "text/event-stream", chunk=97), fake_lago, header_settings)
    assert response.content == body
    assert tokens(props) == ("gpt-4o-2024-08-06", 250, 50, 300)


def responses_stream(ident: str, prompt: int, completion: int) -> bytes:
    created = {"type": "response.created", "response": {"id": ident, "model": "gpt-4.1", "usage": None}}
    usage = {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion}
    done = {"type": "response.completed", "response": {"id": ident, "model": "gpt-4.1", "usage": usage}}
    return sse(created, "response.created") + sse(done, "response.completed")


async def test_two_responses_in_one_stream_bill_both(fake_lago: Any, header_settings: BillingSettings) -> None:
    body = responses_stream("resp_1", 40, 5) + responses_stream("resp_2", 60, 9)
    response, [props] = await bill(stream_app(body, "text/event-stream", chunk=33), fake_lago, header_settings)
    assert response.content == body
    assert tokens(props) == ("gpt-4.1", 100, 14, 114)


async def test_continuous_usage_of_one_completion_is_not_added_up(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """vLLM's continuous_usage_stats: every chunk of one completion (one id) carries the usage so far: the last
    wins, nothing is added up."""
    base = {"id": "cmpl-1", "object": "chat.completion.chunk", "model": "meta-llama/Llama-3.1-8B-Instruct"}
    body = b"".join(
        sse(
            {
                **base,
                "choices": [{"index": 0, "delta": {"content": "w"}}],
                "usage": {"prompt_tokens": 15, "completion_tokens": n, "total_tokens": 15 + n},
            }
        )
        for n in range(1, 6)
    )
    response, [props] = await bill(stream_app(body, "text/event-stream", chunk=50), fake_lago, header_settings)
    assert response.content == body
    assert tokens(props) == ("meta-llama/Llama-3.1-8B-Instruct", 15, 5, 20)


async def test_a_gzipped_answer_with_an_upper_case_media_type_is_read(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Media types are case-insensitive: a gzip'd "Application/JSON" answer (a hand-written header, a Java upstream
    relayed) was billed 0, its type compared case-sensitively only when compressed (plain, it was read)."""
    raw = json.dumps(RESPONSES_JSON).encode()
    body = gzip.compress(raw)

    async def endpoint(request: Request) -> Response:
        return Response(body, headers={"content-type": "Application/JSON", "content-encoding": "gzip"})

    app = Starlette(routes=[Route("/v1/x", endpoint, methods=["POST"])])
    response, [props] = await bill(app, fake_lago, header_settings)
    assert response.content == raw  # (httpx inflated it)
    assert tokens(props) == ("gpt-4.1-2025-04-14", 36, 87, 123)
