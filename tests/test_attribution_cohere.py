"""Cohere's answers (written by hand from its API reference): the v2 Chat API's ``usage`` (``billed_units`` and
``tokens``) in a JSON body and in its stream's ``message-end`` event, and the ``meta.billed_units`` of the v1 Chat
API and of the Embed and Rerank APIs. Billed as Cohere bills them: its ``billed_units`` (its ``tokens`` count the
prompt template Cohere adds too), ``tokens`` only when no billed units are given. Lookalikes stay unbilled."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.types import ASGIApp

from lago_org_billing import BillingSettings
from lago_org_billing._attribution import AttributionConfig, Usage, reset_warnings
from test_attribution_providers import JSON, SSE, StreamingGzip, bill, body, record, shape_app, sse

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


COHERE_V2_CHAT = {
    "id": "c14c80c3-18eb-4519-9460-6c92edd8cfb4",
    "finish_reason": "COMPLETE",
    "message": {
        "role": "assistant",
        "content": [{"type": "text", "text": "LLMs stand for Large Language Models."}],
    },
    "usage": {
        "billed_units": {"input_tokens": 5, "output_tokens": 418},
        "tokens": {"input_tokens": 71, "output_tokens": 418},
    },
}
COHERE_V2_STREAM = sse(
    (
        "message-start",
        {
            "id": "29f14a5a-11de-4cae-9800-25e4747408ea",
            "type": "message-start",
            "delta": {
                "message": {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}
            },
        },
    ),
    (
        "content-start",
        {"type": "content-start", "index": 0, "delta": {"message": {"content": {"type": "text", "text": ""}}}},
    ),
    ("content-delta", {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": "Hello"}}}}),
    ("content-delta", {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": " there"}}}}),
    ("content-end", {"type": "content-end", "index": 0}),
    (
        "message-end",
        {
            "type": "message-end",
            "delta": {
                "finish_reason": "COMPLETE",
                "usage": {
                    "billed_units": {"input_tokens": 3, "output_tokens": 9},
                    "tokens": {"input_tokens": 69, "output_tokens": 9},
                },
            },
        },
    ),
)
COHERE_V1_CHAT = {
    "response_id": "0a5c1d4e-6d57-4b8c-b6f1-2b53e0b9e0f4",
    "text": "Hello!",
    "generation_id": "6e2f3a4b-9c8d-4e7f-a1b2-c3d4e5f6a7b8",
    "chat_history": [{"role": "USER", "message": "Hi"}, {"role": "CHATBOT", "message": "Hello!"}],
    "finish_reason": "COMPLETE",
    "meta": {
        "api_version": {"version": "1"},
        "billed_units": {"input_tokens": 17, "output_tokens": 23},
        "tokens": {"input_tokens": 83, "output_tokens": 23},
    },
}
COHERE_EMBED = {
    "id": "da6e531f-54c6-4a73-bf92-f60566d8d753",
    "embeddings": {"float": [[0.016296387, -0.008354187, -0.04699707]]},
    "texts": ["hello"],
    "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": 1}},
    "response_type": "embeddings_by_type",
}
COHERE_RERANK = {
    "results": [{"index": 3, "relevance_score": 0.999071}],
    "id": "07734bd2-2473-4f07-94e1-0d9f0e6843cf",
    "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
}
# v2 chat from a deployment that sends only the processed tokens (a private deployment, a compatible server)
COHERE_TOKENS_ONLY = {**COHERE_V2_CHAT, "usage": {"tokens": {"input_tokens": 71, "output_tokens": 418}}}

SHAPES: dict[str, tuple[str, list[bytes], tuple[str | None, int, int, int]]] = {
    "cohere-v2-chat": (JSON, body(COHERE_V2_CHAT), (None, 5, 418, 423)),
    "cohere-v2-chat-stream": (SSE, COHERE_V2_STREAM, (None, 3, 9, 12)),
    "cohere-v1-chat": (JSON, body(COHERE_V1_CHAT), (None, 17, 23, 40)),
    "cohere-embed": (JSON, body(COHERE_EMBED), (None, 1, 0, 1)),
    "cohere-rerank": (JSON, body(COHERE_RERANK), (None, 0, 0, 0)),
    "cohere-tokens-only": (JSON, body(COHERE_TOKENS_ONLY), (None, 71, 418, 489)),
}


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("name", list(SHAPES))
async def test_each_cohere_shape_is_billed_its_billed_units_once(
    name: str, gzipped: bool, fake_lago: Any, header_settings: BillingSettings
) -> None:
    content_type, chunks, (model, input_tokens, output_tokens, total_tokens) = SHAPES[name]
    app: ASGIApp = shape_app(content_type, chunks)
    if gzipped:
        app = StreamingGzip(app)
    response, events = await bill(app, fake_lago, header_settings)
    assert response.status_code == 200
    assert response.content == b"".join(chunks)
    [props] = events
    billed = (props.get("model"), props["input_tokens"], props["output_tokens"], props["total_tokens"])
    assert billed == (model, input_tokens, output_tokens, total_tokens)


def test_the_cohere_stream_split_anywhere_bills_the_same() -> None:
    data = b"".join(COHERE_V2_STREAM)
    chunks = [data[i : i + 1] for i in range(len(data))]
    assert record(b"text/event-stream", chunks) == Usage(None, 3, 9, 12, "sse")


def test_an_embedding_over_the_body_cap_is_billed_its_billed_units() -> None:
    """Many texts embedded: megabytes of vectors, then ``meta`` (and ``response_type``) closing the body."""
    big = {**COHERE_EMBED, "embeddings": {"float": [[0.25] * 1000] * 60}, "texts": ["hello"] * 60}
    big["meta"] = {"api_version": {"version": "2"}, "billed_units": {"input_tokens": 60}}
    config = AttributionConfig(max_body_bytes=10_000)
    data = json.dumps(big).encode()
    assert len(data) > 100_000
    assert record(b"application/json", [data[i : i + 4096] for i in range(0, len(data), 4096)], config) == Usage(
        None, 60, 0, 60, "json"
    )


@pytest.mark.parametrize(
    "payload",
    [
        # a pagination "meta" (most REST APIs): not billed units
        {"data": [{"id": 1}], "meta": {"total": 40, "page": 1}},
        # billed units nested in a record, not the answer's own
        {"records": [{"meta": {"billed_units": {"input_tokens": 5, "output_tokens": 7}}}]},
        # a "usage" whose "tokens" is a count, not Cohere's object
        {"usage": {"tokens": 12}},
        # billed units that are not token counts
        {"meta": {"billed_units": {"input_tokens": "five", "output_tokens": -3}}},
    ],
    ids=["pagination-meta", "nested-meta", "usage-tokens-number", "malformed-units"],
)
def test_lookalikes_bill_no_tokens(payload: dict[str, Any]) -> None:
    usage = record(b"application/json", body(payload))
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (0, 0, 0)
