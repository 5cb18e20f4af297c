"""Attribution of Gemini, Bedrock, Ollama (JSON and NDJSON) and Groq answers: responses that are not
an LLM's answer bill no tokens, the stream-without-usage warning is said for model streams only, and bodies that
merely mention a ``usage``-prefixed key are not parsed."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware, _attribution as attribution
from lago_org_billing._attribution import AttributionConfig, Usage, UsageRecorder, json_usage, reset_warnings

pytestmark = pytest.mark.anyio

JSON = b"application/json"
NDJSON = b"application/x-ndjson"
SSE = b"text/event-stream"
NO_USAGE_WARNING = "ended without a usage"


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


def record(content_type: bytes, chunks: list[bytes], config: AttributionConfig | None = None) -> Usage:
    recorder = UsageRecorder({"type": "http"}, config or AttributionConfig())
    recorder.response_start(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]}
    )
    for chunk in chunks:
        recorder.response_body(chunk)
    return recorder.result()


def lines(*documents: dict[str, Any]) -> list[bytes]:
    return [json.dumps(document).encode() + b"\n" for document in documents]


OLLAMA_DONE = {
    "model": "llama3.2",
    "created_at": "2023-12-12T14:13:43.416799Z",
    "response": "",
    "done": True,
    "done_reason": "stop",
    "total_duration": 5191566416,
    "prompt_eval_count": 26,
    "eval_count": 298,
}


# -- Ollama's counts only in Ollama's answers -----------------------------------------------------------------------

EVALUATIONS = [
    # A model-evaluation service: how many samples a model was evaluated on, not tokens.
    {"model": "fraud-classifier-v3", "eval_count": 500, "accuracy": 0.93, "status": "completed"},
    {"run_id": "r_42", "prompt_eval_count": 40, "eval_count": 500},
    {"model": "resnet50", "eval_count": 1200, "done": False},
]


@pytest.mark.parametrize("answer", EVALUATIONS, ids=["with-model", "no-model", "done-false"])
async def test_an_evaluation_api_answering_eval_count_bills_no_tokens(answer: dict[str, Any]) -> None:
    assert record(JSON, [json.dumps(answer).encode()]) == Usage()
    assert json_usage(json.dumps(answer).encode()) == Usage()


async def test_an_evaluation_api_is_billed_no_tokens_through_the_middleware(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    async def evaluate(request: Request) -> Response:
        return JSONResponse({"model": "fraud-classifier-v3", "prompt_eval_count": 64, "eval_count": 500})

    app = Starlette(routes=[Route("/v1/evaluations", evaluate, methods=["POST"])])
    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            response = await client.post("/v1/evaluations", headers={"X-Org-Id": "org_a", "X-User-Id": "ada"})
        assert response.status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    [event] = fake_lago.events
    assert "model" not in event["properties"]
    assert event["properties"]["total_tokens"] == 0


async def test_an_sse_event_with_eval_count_is_not_billed_as_ollama_tokens() -> None:
    stream = [b'data: {"model": "resnet50", "epoch": 3, "eval_count": 1200}\n\n']
    usage = record(SSE, stream)
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (0, 0, 0)


async def test_ollama_answers_are_still_billed() -> None:
    embed = {"model": "all-minilm", "embeddings": [[0.01]], "total_duration": 14143917, "prompt_eval_count": 8}
    assert record(JSON, [json.dumps(OLLAMA_DONE).encode()]) == Usage("llama3.2", 26, 298, 324, "json")
    assert json_usage(json.dumps(OLLAMA_DONE).encode()) == Usage("llama3.2", 26, 298, 324, "json")
    assert record(JSON, [json.dumps(embed).encode()]) == Usage("all-minilm", 8, 0, 8, "json")
    partial = {"model": "llama3.2", "created_at": "x", "response": "He", "done": False}
    assert record(NDJSON, lines(partial, partial, OLLAMA_DONE)) == Usage("llama3.2", 26, 298, 324, "sse")


# -- NDJSON: only the lines of a model's answer ---------------------------------------------------------------------


async def test_an_ndjson_export_of_usage_records_bills_no_tokens(caplog: pytest.LogCaptureFixture) -> None:
    """An admin endpoint exporting a usage report as NDJSON is not a stream of cumulative counts: it was billed the
    last record's tokens (and model) on every export."""
    records = [
        {"day": f"2026-03-0{day}", "model": "gpt-4o", "usage": {"input_tokens": 500 * day, "output_tokens": 70}}
        for day in range(1, 4)
    ]
    assert record(NDJSON, lines(*records)) == Usage()
    assert record(b"application/jsonl", lines(*records)) == Usage()
    evaluations = [{"model": "m", "eval_count": 7, "prompt_eval_count": 3}] * 3
    assert record(NDJSON, lines(*evaluations)) == Usage()
    assert not [r for r in caplog.records if NO_USAGE_WARNING in r.getMessage()]


async def test_an_ndjson_export_of_records_with_a_model_field_is_not_a_model_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A product catalogue exported as NDJSON (``"model": "Corolla"``) was billed as a model stream without usage,
    with a warning telling the operator to set stream_options.include_usage."""
    cars = [{"id": n, "make": "Toyota", "model": "Corolla", "year": 2020 + n} for n in range(3)]
    assert record(NDJSON, lines(*cars)) == Usage()
    assert not [r for r in caplog.records if NO_USAGE_WARNING in r.getMessage()]


# -- the stream-without-usage warning -------------------------------------------------------------------------------


async def test_a_progress_feed_naming_a_model_does_not_say_a_model_stream_lacked_usage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job-progress SSE feed (a fine-tuning or training job naming its model) is not an LLM's answer: telling the
    operator to set include_usage is misleading, and the once-per-process warning is then spent."""
    feed = [b'data: {"job": "ft-1", "model": "resnet50", "progress": %d}\n\n' % n for n in (10, 50, 100)]
    record(SSE, feed)
    assert not [r for r in caplog.records if NO_USAGE_WARNING in r.getMessage()]
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini", "choices": [{"delta": {}}]}
    record(SSE, [b"data: " + json.dumps(chunk).encode() + b"\n\n", b"data: [DONE]\n\n"])  # an LLM's: said
    assert len([r for r in caplog.records if NO_USAGE_WARNING in r.getMessage()]) == 1


async def test_a_responses_api_stream_cut_before_its_usage_still_says_so(caplog: pytest.LogCaptureFixture) -> None:
    created = {"type": "response.created", "response": {"id": "r", "model": "gpt-4.1", "usage": None}}
    usage = record(SSE, [b"event: response.created\ndata: " + json.dumps(created).encode() + b"\n\n"])
    assert usage == Usage("gpt-4.1", 0, 0, 0, "sse")
    assert [r for r in caplog.records if NO_USAGE_WARNING in r.getMessage()]


async def test_an_ollama_stream_cut_before_its_last_line_says_so(caplog: pytest.LogCaptureFixture) -> None:
    partial = {"model": "llama3.2", "created_at": "x", "response": "He", "done": False}
    assert record(NDJSON, lines(partial, partial)) == Usage("llama3.2", 0, 0, 0, "sse")
    assert [r for r in caplog.records if NO_USAGE_WARNING in r.getMessage()]


# -- Gemini's JSON array: one answer's chunks, not a list of answers ------------------------------------------------


def gemini(response_id: str, prompt: int, candidates: int) -> dict[str, Any]:
    return {
        "candidates": [{"content": {"parts": [{"text": "x"}], "role": "model"}, "finishReason": "STOP"}],
        "usageMetadata": {
            "promptTokenCount": prompt,
            "candidatesTokenCount": candidates,
            "totalTokenCount": prompt + candidates,
        },
        "modelVersion": "gemini-2.5-flash",
        "responseId": response_id,
    }


async def test_a_json_list_of_stored_gemini_answers_bills_no_tokens() -> None:
    """A chat-history endpoint listing the Gemini answers it stored is not a streamed answer: every read of the
    history was billed the last stored answer's tokens again."""
    history = [gemini("a1", 10, 20), gemini("b2", 30, 40), gemini("c3", 50, 60)]
    assert record(JSON, [json.dumps(history).encode()]) == Usage()


async def test_gemini_streamed_as_a_json_array_is_still_billed_once() -> None:
    chunks = [gemini("same", 11, 4), gemini("same", 11, 9)]
    assert record(JSON, [json.dumps(chunks).encode()]) == Usage("gemini-2.5-flash", 11, 9, 20, "json")


# -- bodies that only mention a usage-prefixed key are not parsed ---------------------------------------------------


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the JSON documents the attribution parses (json.loads and the fast path's scanner)."""
    calls: list[str] = []
    real_loads, real_scan = json.loads, attribution._scan_json

    def loads(*args: Any, **kwargs: Any) -> Any:
        calls.append("loads")
        return real_loads(*args, **kwargs)

    def scan(text: str, index: int) -> tuple[Any, int]:
        if index == 0:
            calls.append("scan")
        return real_scan(text, index)

    monkeypatch.setattr(json, "loads", loads)
    monkeypatch.setattr(attribution, "_scan_json", scan)
    return calls


async def test_a_json_body_with_usage_prefixed_keys_is_not_parsed(parses: list[str]) -> None:
    """A SaaS API's answers with keys such as ``usage_limit`` or ``usageCount`` (no usage object) were parsed twice
    per response since ``"usage`` became the marker, instead of not at all."""
    body = json.dumps(
        {"plan": "pro", "usage_limit": 1000, "usageCount": 12, "items": [{"id": n} for n in range(50)]}
    ).encode()
    assert json_usage(body) == Usage()
    assert record(JSON, [body]) == Usage()
    assert parses == []


async def test_stream_events_with_usage_prefixed_keys_are_not_parsed(parses: list[str]) -> None:
    feed = [b'data: {"progress": %d, "usage_percent": %d}\n\n' % (n, n) for n in range(5)]
    assert record(SSE, feed) == Usage()
    assert parses == []


async def test_a_gemini_or_ollama_json_answer_is_parsed_once(parses: list[str]) -> None:
    assert json_usage(json.dumps(gemini("r", 11, 9)).encode()) == Usage("gemini-2.5-flash", 11, 9, 20, "json")
    assert len(parses) == 1
    assert json_usage(json.dumps(OLLAMA_DONE).encode()) == Usage("llama3.2", 26, 298, 324, "json")
    assert len(parses) == 2


# -- end to end: an NDJSON export through the middleware ------------------------------------------------------------


async def test_an_ndjson_export_through_the_middleware_bills_the_call_without_tokens(
    fake_lago: Any, header_settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    records = [{"org": "org_a", "model": "gpt-4o", "usage": {"prompt_tokens": 900, "completion_tokens": 100}}] * 4

    async def export(request: Request) -> Response:
        async def rows() -> AsyncIterator[bytes]:
            for row in lines(*records):
                yield row

        return StreamingResponse(rows(), media_type="application/x-ndjson")

    app = Starlette(routes=[Route("/admin/usage.ndjson", export)])
    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            response = await client.get("/admin/usage.ndjson", headers={"X-Org-Id": "org_a"})
        assert response.status_code == 200 and len(response.text.splitlines()) == 4
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    [event] = fake_lago.events
    assert event["properties"]["total_tokens"] == 0 and "model" not in event["properties"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
