"""Usage attribution from LLM provider answers over the inspection cap (AttributionConfig.max_body_bytes, 1 MiB by
default), billed through the middleware (httpx.ASGITransport, Lago emulator): image-generating answers
(OpenAI's Responses API image_generation tool, Gemini's image models) carry megabytes of base64 in the event or body
that also carries the usage. Each must be billed the tokens the provider reported, once."""

from __future__ import annotations

import json
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
from lago_org_billing._attribution import AttributionConfig, reset_warnings

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}
#: A generated PNG in base64, as the image_generation tool and Gemini's image models return it: over the default cap.
IMAGE = "iVBORw0KGgo" + "A" * 1_200_000


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


def sse(data: Any, event: str | None = None) -> bytes:
    head = b"" if event is None else b"event: " + event.encode() + b"\n"
    return head + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def stream_app(body: bytes, media_type: str, *, chunk: int = 65_536) -> Starlette:
    async def endpoint(request: Request) -> Response:
        if media_type == "application/json":
            return Response(body, media_type=media_type)

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(body), chunk):
                yield body[i : i + chunk]

        return StreamingResponse(pieces(), media_type=media_type)

    return Starlette(routes=[Route("/v1/x", endpoint, methods=["POST"])])


async def bill(app: ASGIApp, fake_lago: Any, settings: BillingSettings) -> tuple[httpx.Response, list[dict[str, Any]]]:
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            response = await client.post("/v1/x", headers=HEADERS)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return response, [event["properties"] for event in fake_lago.events]


def tokens(props: dict[str, Any]) -> tuple[Any, int, int, int]:
    return props.get("model"), props["input_tokens"], props["output_tokens"], props["total_tokens"]


# -- OpenAI Responses API ------------------------------------------------------------------------------------------


def response_object(ident: str, output: list[dict[str, Any]], usage: dict[str, Any] | None, **rest: Any) -> dict:
    """A Responses API response, its members in the order the API sends them (usage, then user and metadata)."""
    return {
        "id": ident,
        "object": "response",
        "created_at": 1756315657,
        "status": "completed" if usage is not None else "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": "gpt-5-2025-08-07",
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": "medium", "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [{"type": "image_generation"}],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": rest.get("metadata", {}),
    }


def usage_of(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def responses_stream(ident: str, output: list[dict[str, Any]], prompt: int, completion: int, **rest: Any) -> bytes:
    created = {"type": "response.created", "sequence_number": 0, "response": response_object(ident, [], None, **rest)}
    done = {
        "type": "response.completed",
        "sequence_number": 5,
        "response": response_object(ident, output, usage_of(prompt, completion), **rest),
    }
    return sse(created, "response.created") + sse(done, "response.completed")


TEXT_OUTPUT = [{"type": "message", "id": "msg_1", "role": "assistant", "content": [{"type": "output_text"}]}]
IMAGE_OUTPUT = [{"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": IMAGE}]


@pytest.mark.parametrize("image_first", [False, True], ids=["text-then-image", "image-then-text"])
async def test_a_relayed_responses_stream_with_an_image_response_bills_every_response(
    image_first: bool, fake_lago: Any, header_settings: BillingSettings
) -> None:
    """An agent endpoint relays two Responses API calls in one stream (each its own id, created then completed), one
    of them generating an image: its response.completed is over the cap and its usage is read from the event's last
    bytes. The module promises that responses under different ids add up; the image response's usage, read without
    its id, replaced the other response's instead (or was replaced by it), so one call was not billed at all."""
    text = responses_stream("resp_text", TEXT_OUTPUT, 100, 10)
    image = responses_stream("resp_image", IMAGE_OUTPUT, 2000, 1500)
    body = image + text if image_first else text + image
    assert len(image) > AttributionConfig().max_body_bytes
    response, [props] = await bill(stream_app(body, "text/event-stream"), fake_lago, header_settings)
    assert response.content == body
    assert tokens(props) == ("gpt-5-2025-08-07", 2100, 1510, 3610)


def chat_chunk(ident: str, delta: dict[str, Any], usage: dict[str, int] | None = None) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": 1756315657,
        "model": "gemini-2.5-flash-image",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None if usage is None else "stop"}],
    }
    if usage is not None:
        chunk["usage"] = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    return chunk


@pytest.mark.parametrize("image_first", [False, True], ids=["text-then-image", "image-then-text"])
async def test_a_relayed_chat_stream_whose_image_chunk_carries_its_usage_bills_both_completions(
    image_first: bool, fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Two chat completions relayed in one stream (each its own id), one of them an image in one chunk that carries
    its usage too (an OpenAI-compatible gateway's image model): that chunk is over the cap, its usage read from its
    last bytes, and its id from its first bytes, so the two completions add up as when read whole."""
    text = sse(chat_chunk("chatcmpl-text", {"role": "assistant", "content": "Drawing"})) + sse(
        chat_chunk("chatcmpl-text", {}, {"prompt_tokens": 100, "completion_tokens": 10})
    )
    url = "data:image/png;base64," + IMAGE
    image = sse(
        chat_chunk(
            "chatcmpl-image",
            {"role": "assistant", "images": [{"type": "image_url", "image_url": {"url": url}}]},
            {"prompt_tokens": 2000, "completion_tokens": 1500},
        )
    )
    body = image + text if image_first else text + image
    response, [props] = await bill(stream_app(body, "text/event-stream"), fake_lago, header_settings)
    assert response.content == body
    assert tokens(props) == ("gemini-2.5-flash-image", 2100, 1510, 3610)


@pytest.mark.parametrize(
    "metadata", [{"feature": "usage"}, {"usage": "internal-dashboard"}], ids=["usage-as-a-value", "usage-as-a-key"]
)
async def test_a_streamed_image_response_whose_metadata_names_usage_is_billed_its_tokens(
    metadata: dict[str, str], fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The Responses API sends ``metadata`` after ``usage``. A request whose metadata holds the word "usage" (a key,
    or a value such as {"feature": "usage"}) hid the usage of an image response over the cap: only the last
    ``"usage"`` of the event's tail was tried, it is not followed by an object, and the request was billed 0 tokens
    (a JSON body over the cap, the same answer not streamed, is billed its tokens)."""
    body = responses_stream("resp_image", IMAGE_OUTPUT, 2000, 1500, metadata=metadata)
    response, [props] = await bill(stream_app(body, "text/event-stream"), fake_lago, header_settings)
    assert response.content == body
    assert tokens(props) == ("gpt-5-2025-08-07", 2000, 1500, 3500)


async def test_a_responses_api_json_over_the_cap_with_long_metadata_is_billed_its_tokens(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A non-streamed Responses API answer with a generated image (over the cap) is read from its last 16 KiB, but
    only when at most 1,024 characters follow its usage object. The API sends ``user`` and ``metadata`` after it,
    and metadata may hold 16 pairs of up to 64 + 512 characters (about 9.5 KB): three long values and the request was
    billed 0 tokens."""
    metadata = {"trace": "t" * 400, "customer_note": "n" * 400, "session": "s" * 300}
    body = json.dumps(
        response_object("resp_image", IMAGE_OUTPUT, usage_of(2000, 1500), metadata=metadata),
        separators=(",", ":"),
    ).encode()
    assert len(body) > AttributionConfig().max_body_bytes
    response, [props] = await bill(stream_app(body, "application/json"), fake_lago, header_settings)
    assert response.content == body
    assert tokens(props) == ("gpt-5-2025-08-07", 2000, 1500, 3500)


# -- Google Gemini ---------------------------------------------------------------------------------------------------


def gemini_chunk(response_id: str, parts: list[dict[str, Any]], prompt: int, candidates: int) -> dict[str, Any]:
    return {
        "candidates": [{"content": {"parts": parts, "role": "model"}, "index": 0}],
        "usageMetadata": {
            "promptTokenCount": prompt,
            "candidatesTokenCount": candidates,
            "totalTokenCount": prompt + candidates,
        },
        "modelVersion": "gemini-2.5-flash-image",
        "responseId": response_id,
    }


@pytest.mark.parametrize("image_first", [False, True], ids=["text-then-image", "image-then-text"])
async def test_a_relayed_gemini_stream_whose_image_answer_opens_with_its_image_bills_both_answers(
    image_first: bool, fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A tool loop relaying two Gemini ``alt=sse`` answers (two responseIds) adds them up, as promised; but when an
    image model's answer opens with its image (a chunk over the cap, its usageMetadata read from its last bytes
    without its responseId), that answer's counts replaced the other answer's (or were replaced by them)."""
    text = sse(gemini_chunk("answer-A", [{"text": "Let me draw"}], 100, 5)) + sse(
        gemini_chunk("answer-A", [{"text": " that."}], 100, 20)
    )
    image = sse(gemini_chunk("answer-B", [{"inlineData": {"mimeType": "image/png", "data": IMAGE}}], 200, 1290))
    body = image + text if image_first else text + image
    response, [props] = await bill(stream_app(body, "text/event-stream"), fake_lago, header_settings)
    assert response.content == body
    assert tokens(props)[1:] == (300, 1310, 1610)
