"""Usage attribution from responses (streams): what the operator is told about dropped stream events, and
explicit attribution from a stream generator whose client left."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.routing import Route
from starlette.types import Message

from lago_org_billing import BillingSettings, OrgBillingMiddleware, attribute_usage
from lago_org_billing._attribution import Usage, reset_warnings
from test_attribution import SSE, record, sse
from test_middleware_scope_deep_copies import transport_scope

pytestmark = pytest.mark.anyio

#: A 1024x1024 partial image as the Responses API's image_generation tool streams it (``partial_images``): its
#: base64 is megabytes, over the default 1 MiB event cap; such an event has no usage by design.
PARTIAL_IMAGE = base64.b64encode(bytes(range(256)) * 6_000).decode()
RESPONSES_IMAGE_STREAM = sse(
    ("response.created", {"type": "response.created", "response": {"id": "resp_1", "model": "gpt-5", "usage": None}}),
    (
        "response.image_generation_call.partial_image",
        {
            "type": "response.image_generation_call.partial_image",
            "output_index": 0,
            "item_id": "ig_1",
            "partial_image_index": 0,
            "partial_image_b64": PARTIAL_IMAGE,
        },
    ),
    (
        "response.completed",
        {
            "type": "response.completed",
            "response": {
                "id": "resp_1",
                "model": "gpt-5",
                "output": [{"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": "iVBO"}],
                "usage": {"input_tokens": 2100, "output_tokens": 1500, "total_tokens": 3600},
                "user": None,
                "metadata": {},
            },
        },
    ),
)
#: A stream whose only usage sits at the start of an event over the cap, megabytes before its end: really not read.
USAGE_LOST_STREAM = sse(
    (
        None,
        {
            "type": "image_generation.completed",
            "usage": {"input_tokens": 50, "output_tokens": 4160, "total_tokens": 4210},
            "b64_json": PARTIAL_IMAGE,
        },
    )
)
CAP_WARNING = "over AttributionConfig.max_body_bytes"


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


def cap_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if CAP_WARNING in r.getMessage()]


async def test_an_oversized_stream_event_without_usage_does_not_say_the_tokens_were_billed_zero(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A partial image event (no usage by design) over the cap, then response.completed with the usage: the tokens
    are billed, and nothing says "its usage was not read (tokens billed 0). Raise max_body_bytes"."""
    assert len(PARTIAL_IMAGE) > 1_048_576
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.attribution"):
        usage = record([RESPONSES_IMAGE_STREAM], content_type=SSE)
    assert usage == Usage("gpt-5", 2100, 1500, 3600, "sse")
    assert cap_warnings(caplog) == []


async def test_a_stream_whose_usage_is_really_lost_over_the_cap_is_still_said_after_an_image_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The warning is said once per process: a partial image's event, whose tokens were billed all the same, must
    not use it up, or the stream that later really bills 0 tokens (its usage unread over the cap) is silent."""
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.attribution"):
        assert record([RESPONSES_IMAGE_STREAM], content_type=SSE).total_tokens == 3600
        caplog.clear()
        assert record([USAGE_LOST_STREAM], content_type=SSE).total_tokens == 0
    assert len(cap_warnings(caplog)) == 1


def _scope(path: str) -> dict[str, Any]:
    """An HTTP scope from a server implementing ASGI 2.4 (a send to a gone client raises OSError)."""
    return {
        **transport_scope(path),
        "headers": [(b"host", b"t"), (b"x-org-id", b"org_a"), (b"x-user-id", b"ada")],
        "client": ("127.0.0.1", 1234),
    }


async def test_usage_a_stream_generator_attributes_when_its_client_leaves_is_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """An LLM proxy relays a stream and attributes what it counted when the generator is closed (``finally``), as
    the README invites ("from a StreamingResponse's generator"). The client leaves after 3 chunks: the event must
    carry the proxy's model and counts (15 output tokens), not 0 tokens and no model."""
    closed = anyio.Event()

    async def proxy(request: Request) -> StreamingResponse:
        async def relay() -> AsyncIterator[bytes]:
            counted = 0
            try:
                for _ in range(10):
                    counted += 5
                    yield b'data: {"delta": "tok"}\n\n'
            finally:
                attribute_usage(request, model="m-proxy", input_tokens=100, output_tokens=counted)
                closed.set()

        return StreamingResponse(relay(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat", proxy, methods=["POST"])])
    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    bodies: list[Message] = []

    async def receive() -> Message:
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            bodies.append(message)
            if len(bodies) == 3:
                raise OSError("client went away")

    try:
        with pytest.raises(ClientDisconnect):
            await middleware(_scope("/v1/chat"), receive, send)
        with anyio.fail_after(5):
            await closed.wait()  # the generator's finally has run (the app's attribution is made)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    [props] = [event["properties"] for event in fake_lago.events]
    assert (props.get("model"), props["input_tokens"], props["output_tokens"], props["total_tokens"]) == (
        "m-proxy",
        100,
        15,
        115,
    )
