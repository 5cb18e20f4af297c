"""Server-sent-event attribution as LLM APIs and their clients produce it, in process and behind a real uvicorn
server on 127.0.0.1: long gzip'd streams, oversized final events (streamed image generation), streams cut short."""

from __future__ import annotations

import gzip
import io
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._attribution import AttributionConfig, UsageRecorder, reset_warnings
from lago_org_billing.testing._server import serve_in_thread

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Any:
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture
def settings(header_settings: BillingSettings) -> BillingSettings:
    """org_a subscribed; org and user from headers; no quota gate (these tests are about attribution)."""
    return header_settings


def sse(payload: Any, event: str | None = None) -> bytes:
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return head + b"data: " + data.encode() + b"\n\n"


def openai_chat_stream(tokens: int) -> list[bytes]:
    """An OpenAI chat.completions stream with ``stream_options.include_usage``: one chunk per token (each ~250
    bytes, as the API sends them), the usage in a last chunk with no choices, then ``[DONE]``."""
    base = {
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_eb9dce56a8",
    }
    delta = {**base, "choices": [{"index": 0, "delta": {"content": " word"}, "logprobs": None, "finish_reason": None}]}
    chunks = [sse({**delta, "usage": None}) for _ in range(tokens)]
    usage = {"prompt_tokens": 12, "completion_tokens": tokens, "total_tokens": 12 + tokens}
    chunks.append(sse({**base, "choices": [], "usage": usage}))
    chunks.append(sse("[DONE]"))
    return chunks


async def serve(app: ASGIApp, settings: BillingSettings, fake_lago: Any, path: str) -> httpx.Response:
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            response = await client.get(path, headers=HEADERS)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return response


class BufferingGzip:
    """Starlette's GZipMiddleware up to 0.45 (``starlette>=0.37`` is supported): it compresses event streams too,
    writing each chunk to a ``GzipFile`` without flushing, so the compressed stream comes out in a few large pieces
    (most of it when the stream ends)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        buffer = io.BytesIO()
        packer = gzip.GzipFile(mode="wb", fileobj=buffer, compresslevel=9)

        async def compressing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message["headers"] if k != b"content-length"]
                message = {**message, "headers": [*headers, (b"content-encoding", b"gzip")]}
            elif message["type"] == "http.response.body":
                packer.write(message.get("body", b""))
                if not message.get("more_body"):
                    packer.close()
                body = buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
                message = {**message, "body": body}
            await send(message)

        await self.app(scope, receive, compressing)


async def test_a_long_stream_gzipped_without_flushes_is_billed_its_tokens(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """A 6,000-token OpenAI stream (1.5 MB of events, none over max_body_bytes) compressed inside the billing
    middleware by a gzip middleware that does not flush: its last compressed piece inflates to more than
    max_body_bytes at once. The stream was given up on there (tokens billed 0, "stream chunk over
    max_body_bytes"), though SSE is documented to skip only a *line* over the cap."""
    chunks = openai_chat_stream(6_000)
    assert sum(map(len, chunks)) > AttributionConfig().max_body_bytes

    async def endpoint(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return StreamingResponse(events(), media_type="text/event-stream")

    app = BufferingGzip(Starlette(routes=[Route("/v1/chat/completions", endpoint)]))
    response = await serve(app, settings, fake_lago, "/v1/chat/completions")
    assert response.content == b"".join(chunks)  # (httpx inflated it)
    [event] = fake_lago.events
    properties = event["properties"]
    assert (properties["input_tokens"], properties["output_tokens"], properties["total_tokens"]) == (12, 6000, 6012)
    assert properties["model"] == "gpt-4o-2024-08-06"


# --------------------------------------------------------------------------------------------------------------------
# Behind a real uvicorn server (h11, ASGI spec 2.3: Starlette cancels a stream when its client goes away).


def anthropic_stream(newline: bytes = b"\n") -> bytes:
    """An Anthropic Messages stream: input (and cache reads) in message_start, cumulative output in message_delta."""
    events: list[tuple[str, Any]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_01",
                    "type": "message",
                    "role": "assistant",
                    "model": "claude-sonnet-4-5-20250929",
                    "content": [],
                    "usage": {"input_tokens": 25, "cache_read_input_tokens": 100, "output_tokens": 1},
                },
            },
        ),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Grüße 🌍"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 42}},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    out = b": stream opened" + newline
    for name, payload in events:
        out += b"event: " + name.encode() + newline + b"data:" + json.dumps(payload, ensure_ascii=False).encode()
        out += newline + newline
    return out


RESPONSES_STREAM = b"".join(
    [
        sse(
            {"type": "response.created", "response": {"id": "resp_1", "model": "gpt-4.1", "usage": None}},
            "response.created",
        ),
        sse({"type": "response.output_text.delta", "delta": 'the "usage" is'}, "response.output_text.delta"),
        sse(
            {
                "type": "response.completed",
                "response": {
                    "id": "resp_1",
                    "model": "gpt-4.1-2025-04-14",
                    "usage": {
                        "input_tokens": 50,
                        "input_tokens_details": {"cached_tokens": 40},
                        "output_tokens": 7,
                        "output_tokens_details": {"reasoning_tokens": 3},
                        "total_tokens": 57,
                    },
                },
            },
            "response.completed",
        ),
    ]
)


def uvicorn_app(routes: list[Route], settings: BillingSettings, fake_lago: Any) -> OrgBillingMiddleware:
    return OrgBillingMiddleware(Starlette(routes=routes), settings=settings, transport=fake_lago.transport())


def billed(fake_lago: Any) -> dict[str, tuple[Any, ...]]:
    """endpoint -> (status, input, output, total, model) of each event; an endpoint billed twice fails."""
    out: dict[str, tuple[Any, ...]] = {}
    for event in fake_lago.events:
        p = event["properties"]
        assert p["endpoint"] not in out, f"{p['endpoint']} billed twice"
        out[p["endpoint"]] = (
            p["status_code"],
            p["input_tokens"],
            p["output_tokens"],
            p["total_tokens"],
            p.get("model"),
        )
    return out


def test_streams_through_uvicorn_reach_the_client_unchanged_and_are_billed_once(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """OpenAI chat (include_usage), OpenAI Responses and Anthropic streams, in bytes cut mid-line and mid-UTF-8 with
    \\r\\n and \\r line endings, or as str chunks, with ``text/event-stream; charset=utf-8``: every byte reaches
    the client, each request is one event with the stream's final usage and model."""
    anthropic_crlf = anthropic_stream(b"\r\n")
    anthropic_cr = anthropic_stream(b"\r")
    openai = b"".join(openai_chat_stream(3))

    def cut(data: bytes) -> list[bytes]:
        return [data[i : i + 7] for i in range(0, len(data), 7)]  # mid-line, mid-"\r\n", mid-UTF-8

    def streaming(chunks: list[bytes] | list[str], media_type: str = "text/event-stream; charset=utf-8") -> Any:
        async def endpoint(request: Request) -> Response:
            async def body() -> AsyncIterator[Any]:
                for chunk in chunks:
                    yield chunk

            return StreamingResponse(body(), media_type=media_type)

        return endpoint

    routes = [
        Route("/openai", streaming(cut(openai))),
        Route("/responses", streaming([RESPONSES_STREAM.decode()], "text/event-stream")),
        Route("/anthropic-crlf", streaming(cut(anthropic_crlf))),
        Route("/anthropic-cr", streaming([anthropic_cr.decode()])),
    ]
    middleware = uvicorn_app(routes, settings, fake_lago)
    with serve_in_thread(middleware) as url, httpx.Client(base_url=url, headers=HEADERS) as client:
        assert client.get("/openai").content == openai
        assert client.get("/responses").content == RESPONSES_STREAM
        assert client.get("/anthropic-crlf").content == anthropic_crlf
        assert client.get("/anthropic-cr").content == anthropic_cr
    assert billed(fake_lago) == {
        "/openai": (200, 12, 3, 15, "gpt-4o-2024-08-06"),
        "/responses": (200, 50, 7, 57, "gpt-4.1-2025-04-14"),
        "/anthropic-crlf": (200, 125, 42, 167, "claude-sonnet-4-5-20250929"),
        "/anthropic-cr": (200, 125, 42, 167, "claude-sonnet-4-5-20250929"),
    }


def test_uvicorn_streams_cut_off_or_failing_midway_are_billed_once_with_what_was_counted(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """The first event reaches the client before the stream goes on (the endpoint waits for the client to have it:
    a buffering middleware would deadlock until the wait gives up, and the client would see "gave up"); a client
    leaving after message_start, and a stream whose upstream fails after it, are each billed once with the input
    tokens counted and the one output token message_start reports."""
    start = anthropic_stream().split(b"event: content_block_start")[0]
    rest = anthropic_stream()[len(start) :]
    client_has_first = threading.Event()

    async def ordered(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield start
            seen = await anyio.to_thread.run_sync(client_has_first.wait, 10)
            yield rest if seen else b"data: gave up waiting\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    async def abandoned(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield start
            await anyio.sleep_forever()  # the upstream is still generating when the client goes away

        return StreamingResponse(body(), media_type="text/event-stream")

    async def failing(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield start
            raise RuntimeError("upstream connection reset")

        return StreamingResponse(body(), media_type="text/event-stream")

    routes = [Route("/ordered", ordered), Route("/abandoned", abandoned), Route("/failing", failing)]
    middleware = uvicorn_app(routes, settings, fake_lago)
    with serve_in_thread(middleware) as url, httpx.Client(base_url=url, headers=HEADERS) as client:
        with client.stream("GET", "/ordered") as response:
            chunks = response.iter_raw()
            first = next(chunks)
            client_has_first.set()
            assert first + b"".join(chunks) == anthropic_stream()
        with client.stream("GET", "/abandoned") as response:
            assert next(response.iter_raw()) == start
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/failing")
    input_and_first = (200, 125, 1, 126, "claude-sonnet-4-5-20250929")
    assert billed(fake_lago) == {
        "/ordered": (200, 125, 42, 167, "claude-sonnet-4-5-20250929"),
        "/abandoned": input_and_first,
        "/failing": input_and_first,
    }


# --------------------------------------------------------------------------------------------------------------------
# Stream events over max_body_bytes whose usage comes at their end: image generation.

IMAGE = "iVBORw0KGgo" + "A" * 2_200_000  # a 1024x1024 PNG in base64: 1.5 to 3 MB
IMAGES_API_STREAM = sse(
    {"type": "image_generation.partial_image", "b64_json": IMAGE[:300_000], "partial_image_index": 0},
    "image_generation.partial_image",
) + sse(
    {
        "type": "image_generation.completed",
        "b64_json": IMAGE,
        "created_at": 1752000000,
        "size": "1024x1024",
        "quality": "high",
        "background": "opaque",
        "output_format": "png",
        "usage": {
            "input_tokens": 50,
            "input_tokens_details": {"image_tokens": 40, "text_tokens": 10},
            "output_tokens": 4160,
            "total_tokens": 4210,
        },
    },
    "image_generation.completed",
)
RESPONSES_IMAGE_STREAM = sse(
    {"type": "response.created", "response": {"id": "resp_2", "model": "gpt-4.1", "usage": None}}, "response.created"
) + sse(
    {
        "type": "response.completed",
        "response": {
            "id": "resp_2",
            "object": "response",
            "model": "gpt-4.1-2025-04-14",
            "output": [{"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": IMAGE}],
            "usage": {"input_tokens": 2100, "output_tokens": 1500, "total_tokens": 3600},
            "user": None,
            "metadata": {},
        },
    },
    "response.completed",
)


def recorded(chunks: list[bytes]) -> tuple[int, int, int, str | None]:
    recorder = UsageRecorder({"type": "http"})
    recorder.response_start(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    for chunk in chunks:
        recorder.response_body(chunk)
    usage = recorder.result()
    return usage.input_tokens, usage.output_tokens, usage.total_tokens, usage.model


@pytest.mark.parametrize("chunk_size", [65_536, 16_384, 10_000_000], ids=["64KiB", "16KiB", "one-chunk"])
def test_image_generation_streams_bill_the_usage_of_their_oversized_last_event(chunk_size: int) -> None:
    """Streamed image generation (Images API ``stream=true``, the Responses API image_generation tool) puts the
    usage in the event that carries the whole image in base64, 1.5 to 3 MB: over the default max_body_bytes
    (1 MiB), the event was dropped whole and the request billed 0 tokens (the costliest tokens an LLM API sells).
    Its data are still not kept, but a usage object closing it is read from its last bytes."""
    for stream, expected in (
        (IMAGES_API_STREAM, (50, 4160, 4210, None)),
        (RESPONSES_IMAGE_STREAM, (2100, 1500, 3600, "gpt-4.1")),
    ):
        assert len(stream) > AttributionConfig().max_body_bytes
        chunks = [stream[i : i + chunk_size] for i in range(0, len(stream), chunk_size)]
        assert recorded(chunks)[:3] == expected[:3]


def test_a_responses_api_stream_cut_before_it_completed_keeps_its_model() -> None:
    """The Responses API names the model in ``response.created`` (its usage still null) and gives the usage only in
    ``response.completed``. A stream cut before (the client left, the upstream failed) or whose last event is
    dropped (over the cap, above) was billed without a model, though the stream had named it."""
    cut = RESPONSES_STREAM.split(b"event: response.completed")[0]
    assert recorded([cut]) == (0, 0, 0, "gpt-4.1")
    assert recorded([RESPONSES_IMAGE_STREAM]) == (2100, 1500, 3600, "gpt-4.1")
