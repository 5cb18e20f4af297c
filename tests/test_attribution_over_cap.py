"""JSON bodies over max_body_bytes read from their ends (only a usage that is the document's own, the answer's model,
not a tool call's), and a metrics registry let go of freed with its collector."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence

import pytest

from lago_org_billing._attribution import AttributionConfig, Usage, UsageRecorder, reset_warnings

pytestmark = pytest.mark.anyio

JSON = b"application/json"
#: A cap small enough that the bodies below are over it (read through their first and last bytes).
CAPPED = AttributionConfig(max_body_bytes=1_000)


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


def record(
    chunks: Sequence[bytes], config: AttributionConfig = CAPPED, headers: Sequence[tuple[bytes, bytes]] = ()
) -> Usage:
    recorder = UsageRecorder({"type": "http"}, config)
    recorder.response_start(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", JSON), *headers]}
    )
    for chunk in chunks:
        recorder.response_body(chunk)
    return recorder.result()


def both(body: bytes) -> tuple[Usage, Usage]:
    """The usage of ``body`` read whole (under the default cap) and through its ends (over a 1,000-byte cap)."""
    assert len(body) > CAPPED.max_body_bytes
    return record([body], AttributionConfig()), record([body[:500], body[500:]])


# -- JSON bodies over the cap: only a usage of the top-level object is billed ------------------------------------


async def test_a_usage_nested_in_the_last_item_of_a_large_list_is_not_billed() -> None:
    """A large JSON answer that is not an LLM's (an app's own usage report: records each with a ``usage``) bills no
    tokens whatever its size: over the cap, the last record's usage (near the end) was billed as the request's."""
    records = [
        {"day": day, "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}} for day in range(60)
    ]
    body = json.dumps({"object": "list", "data": records}).encode()
    whole, ends = both(body)
    assert whole == Usage()
    assert ends == whole


async def test_a_model_inside_a_tool_call_near_the_end_is_not_the_answer_s_model() -> None:
    """An Anthropic message over the cap, ending with a tool_use block whose input names a model: billed under the
    message's own model (its top-level "model", among its first bytes), not the tool input's."""
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [
            {"type": "text", "text": "x" * 3_000},
            {"type": "tool_use", "id": "toolu_1", "name": "pick_model", "input": {"model": "gpt-4o", "n": 1}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }
    body = json.dumps(message).encode()
    whole, ends = both(body)
    assert whole == Usage("claude-sonnet-4-5", 10, 5, 15, "json")
    assert ends == whole
    packed = gzip.compress(body)  # compressed before the middleware saw it: inflated as it comes
    chunks = [packed[i : i + 100] for i in range(0, len(packed), 100)]
    assert record(chunks, headers=[(b"content-encoding", b"gzip")]) == whole


async def test_a_string_usage_after_the_usage_object_does_not_hide_it() -> None:
    """A Responses API answer over the cap whose metadata (after the usage) holds the word "usage" as a value: its
    usage object is still read."""
    response = {
        "id": "resp_1",
        "object": "response",
        "model": "gpt-4.1",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "y" * 3_000}]}],
        "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
        "metadata": {"kind": "usage"},
    }
    whole, ends = both(json.dumps(response).encode())
    assert whole == Usage("gpt-4.1", 3, 4, 7, "json")
    assert ends == whole


async def test_pretty_printed_crlf_bodies_over_the_cap_are_read() -> None:
    """Pretty-printed (CRLF, indented) embeddings over the cap: model and usage after the vectors, as whole."""
    embeddings = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": [0.25] * 40} for i in range(10)],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    body = json.dumps(embeddings, indent=2).replace("\n", "\r\n").encode()
    whole, ends = both(body)
    assert whole == Usage("text-embedding-3-small", 8, 0, 8, "json")
    assert ends == whole


async def test_no_body_after_a_large_content_length_is_not_reported_over_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A response declaring a Content-Length over the cap and sending no body (the answer to a HEAD request) bills
    nothing and says nothing: no warning that a body over max_body_bytes was not read."""
    assert record([], headers=[(b"content-length", b"5000")]) == Usage()
    assert "max_body_bytes" not in caplog.text


# -- metrics: a registry let go of is not held for ever ---------------------------------------------------------


def test_a_registry_let_go_of_is_freed_with_its_collector() -> None:
    """A CollectorRegistry given to register_metrics (one per test, per app factory...) is freed once nothing else
    holds it: the module kept every registry ever given, with its collector and whatever else was registered there,
    and visited them all each time an app was served again."""
    import gc
    import weakref

    prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
    from lago_org_billing import PipelineMetrics, _metrics

    metrics = PipelineMetrics()
    registry = prometheus_client.CollectorRegistry()
    assert metrics.register(registry)
    assert registry.get_sample_value("lago_billing_events_recorded_total") == 0
    gone = weakref.ref(registry)
    del registry
    gc.collect()
    assert gone() is None
    assert all(entry[0]() is not None for entry in _metrics._registered.values())
