"""Billing and gating evasion by a hostile client, through real Starlette apps and the Lago emulator.

Covered: an OPTIONS request shaped like a CORS preflight (``Origin`` and ``Access-Control-Request-Method``) sent to
a route that answers OPTIONS with data, when no Starlette ``CORSMiddleware`` inside the billing middleware answers
preflights itself (served unbilled, past the quota gate and past ``on_unresolved="reject"``), while real preflights
answered by a CORS middleware further in (under a ``Mount``) stay unbilled; the raw path an app without Starlette
routing is billed under (a ``%00`` in it made an event Lago's database refuses, and its length was the client's
choice, kept in every waiting event); Ollama answers over ``max_body_bytes`` (a ``/api/embed`` of many inputs, a
``/api/generate`` with a long ``context``: its counts close the body, and were billed 0).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._attribution import AttributionConfig
from lago_org_billing._events import event_payload

pytestmark = pytest.mark.anyio

ORG = {"X-Org-Id": "org_a"}
PREFLIGHT = {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


async def data(request: Request) -> Response:
    return JSONResponse({"secret": "the answer", "model": "gpt-4o-mini", "usage": USAGE})


def options_app() -> Starlette:
    """An API whose route takes OPTIONS (a catch-all proxy route often lists every method), no CORS middleware."""
    return Starlette(routes=[Route("/v1/answer", data, methods=["GET", "POST", "OPTIONS"])])


async def events_of(fake_lago: Any, middleware: OrgBillingMiddleware) -> list[dict[str, Any]]:
    assert await middleware.pipeline.flush(5)
    return list(fake_lago.events)


async def test_a_preflight_shaped_options_call_answered_with_data_is_billed(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Origin + Access-Control-Request-Method on an OPTIONS call made the middleware pass it on unbilled, ungated:
    with no CORS middleware inside to answer it, the endpoint served its data for free."""
    middleware = OrgBillingMiddleware(options_app(), header_settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            answer = await client.options("/v1/answer", headers={**ORG, **PREFLIGHT})
            assert answer.status_code == 200 and answer.json()["secret"] == "the answer"
        events = await events_of(fake_lago, middleware)
        assert [(e["properties"]["method"], e["properties"]["total_tokens"]) for e in events] == [("OPTIONS", 18)]
        assert middleware.stats["billed"] == 1 and middleware.stats["preflight"] == 0
        assert middleware.stats["requests"] == 1
    finally:
        await middleware.aclose()


async def test_a_preflight_shaped_options_call_is_gated_and_rejected_like_any_call(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """An org over its quota got the data through the preflight shape (the gate never asked), and so did a caller
    without an org under on_unresolved="reject"."""
    strict = header_settings.replace(quota_mode="enforce", plan_limits={"starter": {"max_api_calls": 1}})
    middleware = OrgBillingMiddleware(options_app(), strict, transport=fake_lago.transport())
    rejecting = OrgBillingMiddleware(
        options_app(), header_settings, on_unresolved="reject", transport=fake_lago.transport()
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            assert (await client.get("/v1/answer", headers=ORG)).status_code == 200  # the one call allowed
            over = await client.options("/v1/answer", headers={**ORG, **PREFLIGHT})
            assert over.status_code == 429, over.text
            assert "the answer" not in over.text
        assert middleware.stats["blocked"] == 1
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=rejecting), base_url="http://t") as client:
            anonymous = await client.options("/v1/answer", headers=PREFLIGHT)
            assert anonymous.status_code == 401, anonymous.text
            assert "the answer" not in anonymous.text
        assert rejecting.stats["unresolved"] == 1
        assert [e["properties"]["method"] for e in await events_of(fake_lago, middleware)] == ["GET"]
    finally:
        await middleware.aclose()
        await rejecting.aclose()


async def test_real_preflights_answered_by_a_cors_middleware_under_a_mount_stay_unbilled(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A CORS middleware the billing one cannot see (inside a Mount) answers the browser's preflights: neither billed,
    gated, nor rejected for want of credentials; the API calls under it are billed."""
    api = CORSMiddleware(options_app(), allow_origins=["https://app.example"], allow_methods=["*"], allow_headers=["*"])
    app = Starlette(routes=[Mount("/api", app=api)])
    strict = header_settings.replace(quota_mode="enforce", plan_limits={"starter": {"max_api_calls": 1}})
    middleware = OrgBillingMiddleware(app, strict, on_unresolved="reject", transport=fake_lago.transport())
    browser = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            for _ in range(3):
                answer = await client.options("/api/v1/answer", headers=browser)
                assert answer.status_code == 200, answer.text
                assert answer.headers["access-control-allow-origin"] == "https://app.example"
            assert (await client.post("/api/v1/answer", headers=ORG)).status_code == 200
            preflight = await client.options("/api/v1/answer", headers={**ORG, **browser})  # over quota: still a
            assert preflight.status_code == 200 and "access-control-allow-methods" in preflight.headers  # preflight
        events = await events_of(fake_lago, middleware)
        assert [e["properties"]["method"] for e in events] == ["POST"]
        assert middleware.stats["preflight"] == 4 and middleware.stats["requests"] == 1
        assert middleware.stats["unresolved"] == middleware.stats["blocked"] == 0
    finally:
        await middleware.aclose()


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app without Starlette routing (its endpoint is billed as the raw path)."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps({"model": "m", "usage": USAGE}).encode()})


async def test_raw_paths_billed_as_endpoints_are_values_lago_stores_and_bounded(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """``GET /%00`` put a NUL in the event's endpoint (Lago's database refuses it with a 500: the batch it is in fails
    and the call ends in the dead letters, unbilled). A path over 1,024 characters is cut there, ending with "…": the
    16 KB paths a client may send, held by each of 100,000 events waiting for Lago, would hold 1.6 GB."""
    middleware = OrgBillingMiddleware(raw_app, header_settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            for path in ("/v1/a%00b", "/v1/%00", "/v1/plain", "/v1/" + "y" * 16_000, "/v1/" + "z" * 1020):
                assert (await client.get(path, headers=ORG)).status_code == 200
        events = await events_of(fake_lago, middleware)
        endpoints = [e["properties"]["endpoint"] for e in events]
        assert len(endpoints) == 5 and endpoints[2] == "/v1/plain"
        assert endpoints[3] == "/v1/" + "y" * 1019 + "\u2026" and len(endpoints[3]) == 1024
        assert endpoints[4] == "/v1/" + "z" * 1020  # (1,024 characters: whole)
        for event in events:  # (raises for what Lago cannot store)
            event_payload(
                transaction_id="t", external_subscription_id="org_a", code="c", properties=event["properties"]
            )
        assert endpoints[:2] == ["/v1/ab", "/v1/"]
        assert [e["properties"]["total_tokens"] for e in events] == [18] * 5
    finally:
        await middleware.aclose()


# Ollama's own API: its counts close the answer, after the vectors of an embedding or a generation's context.
VECTORS = [[0.0123456789] * 64 for _ in range(40)]  # ~35 KB of vectors: over the 4 KiB cap used here
CONTEXT = list(range(100_000, 106_000))


async def ollama_embed(request: Request) -> Response:
    return JSONResponse(
        {
            "model": "all-minilm",
            "embeddings": VECTORS,
            "total_duration": 14143917,
            "load_duration": 1019500,
            "prompt_eval_count": 321,
        }
    )


async def ollama_generate(request: Request) -> Response:
    last = {
        "model": "llama3.2",
        "created_at": "2025-01-01T00:00:00Z",
        "response": "",
        "done": True,
        "done_reason": "stop",
        "context": CONTEXT,
        "total_duration": 10706818083,
        "load_duration": 6338219291,
        "prompt_eval_count": 26,
        "prompt_eval_duration": 130079000,
        "eval_count": 259,
        "eval_duration": 4232710000,
    }
    if request.query_params.get("stream") == "false":
        return JSONResponse({**last, "response": "Hi"})

    async def lines() -> AsyncIterator[bytes]:
        for word in ("Hi", " there"):
            line = {"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z", "response": word, "done": False}
            yield json.dumps(line).encode() + b"\n"
        text = json.dumps(last).encode() + b"\n"
        if request.query_params.get("split"):  # the last line in pieces, as a server flushes it
            for at in range(0, len(text), 1000):
                yield text[at : at + 1000]
        else:
            yield text

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/embed", ("all-minilm", 321, 0, 321)),
        ("/api/generate?stream=false", ("llama3.2", 26, 259, 285)),
        ("/api/generate", ("llama3.2", 26, 259, 285)),
        ("/api/generate?split=1", ("llama3.2", 26, 259, 285)),
    ],
)
async def test_ollama_answers_over_the_cap_are_billed_their_counts(
    fake_lago: Any, header_settings: BillingSettings, path: str, expected: tuple[str, int, int, int]
) -> None:
    """A client embedding many inputs at once, or generating with a long context, made Ollama's answer longer than
    max_body_bytes: its counts, which close it, were not read (billed 0 tokens, and not counted by the gate)."""
    app = Starlette(routes=[Route("/api/embed", ollama_embed), Route("/api/generate", ollama_generate)])
    middleware = OrgBillingMiddleware(
        app, header_settings, attribution=AttributionConfig(max_body_bytes=4096), transport=fake_lago.transport()
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            answer = await client.get(path, headers=ORG)
            assert answer.status_code == 200 and len(answer.content) > 4096
        [event] = await events_of(fake_lago, middleware)
        properties = event["properties"]
        assert (
            properties.get("model"),
            properties["input_tokens"],
            properties["output_tokens"],
            properties["total_tokens"],
        ) == expected
    finally:
        await middleware.aclose()
