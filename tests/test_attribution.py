from __future__ import annotations

import gzip
import json
import logging
import random
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lago_org_billing._attribution import (
    AttributionConfig,
    Usage,
    UsageRecorder,
    _fast_json_usage,
    _json_fields,
    _merge,
    attribute_usage,
    reset_warnings,
)
from lago_org_billing._errors import LagoIntegrationError
from lago_org_billing._identity import SCOPE_KEY

pytestmark = pytest.mark.anyio

JSON = b"application/json"
SSE = b"text/event-stream"

OPENAI_CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {
        "prompt_tokens": 100,
        "completion_tokens": 20,
        "total_tokens": 120,
        "prompt_tokens_details": {"cached_tokens": 80},
        "completion_tokens_details": {"reasoning_tokens": 10},
    },
}
OPENAI_RESPONSES = {
    "id": "resp_1",
    "object": "response",
    "model": "gpt-4.1",
    "output": [],
    "usage": {
        "input_tokens": 50,
        "input_tokens_details": {"cached_tokens": 40},
        "output_tokens": 7,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 57,
    },
}
ANTHROPIC_MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "hi"}],
    "usage": {
        "input_tokens": 10,
        "cache_creation_input_tokens": 200,
        "cache_read_input_tokens": 3000,
        "output_tokens": 5,
    },
}


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    """Each test starts with no malformed value already reported."""
    reset_warnings()
    yield
    reset_warnings()


def start_message(content_type: bytes | None = JSON, headers: Sequence[tuple[bytes, bytes]] = ()) -> Message:
    raw = list(headers)
    if content_type is not None:
        raw.append((b"content-type", content_type))
    return {"type": "http.response.start", "status": 200, "headers": raw}


def record(
    chunks: Sequence[bytes],
    content_type: bytes | None = JSON,
    headers: Sequence[tuple[bytes, bytes]] = (),
    config: AttributionConfig | None = None,
    scope: Scope | None = None,
) -> Usage:
    recorder = UsageRecorder(scope if scope is not None else {"type": "http"}, config or AttributionConfig())
    recorder.response_start(start_message(content_type, headers))
    for chunk in chunks:
        recorder.response_body(chunk)
    return recorder.result()


def dumps(payload: Any) -> bytes:
    return json.dumps(payload).encode()


def sse(*events: tuple[str | None, Any], newline: bytes = b"\n") -> bytes:
    """Build an SSE stream: (event name or None, JSON payload or raw str)."""
    out = b""
    for name, data in events:
        if name is not None:
            out += b"event: " + name.encode() + newline
        text = data if isinstance(data, str) else json.dumps(data)
        out += b"data: " + text.encode() + newline + newline
    return out


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def openai_stream(include_usage: bool = True) -> bytes:
    base = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o"}
    events: list[tuple[str | None, Any]] = [
        (None, {**base, "choices": [{"delta": {"content": "Hel"}}], "usage": None}),
        (None, {**base, "choices": [{"delta": {"content": 'lo "usage": 99'}}], "usage": None}),
    ]
    if include_usage:
        usage = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
        events.append((None, {**base, "choices": [], "usage": usage}))
    events.append((None, "[DONE]"))
    return sse(*events)


def anthropic_events(
    input_tokens: int = 25, cache_read: int = 100, output: int = 42, model: str = "claude-haiku"
) -> list[tuple[str | None, Any]]:
    return [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "model": model,
                    "usage": {"input_tokens": input_tokens, "cache_read_input_tokens": cache_read, "output_tokens": 1},
                },
            },
        ),
        ("content_block_start", {"type": "content_block_start", "index": 0}),
        ("ping", {"type": "ping"}),
        ("content_block_delta", {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": output}},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]


# -- JSON bodies --------------------------------------------------------------------------------------------------


async def test_openai_chat_json_does_not_add_cached_or_reasoning_subsets() -> None:
    """OpenAI chat usage is taken as is: cached and reasoning tokens are subsets, not extra."""
    usage = record([dumps(OPENAI_CHAT)])
    assert Usage("gpt-4o-mini", 100, 20, 120, "json") == usage


async def test_openai_responses_api_json() -> None:
    """Responses API input/output/total tokens, cached details not added."""
    assert Usage("gpt-4.1", 50, 7, 57, "json") == record([dumps(OPENAI_RESPONSES)])


async def test_anthropic_json_adds_cache_tokens_to_input() -> None:
    """Anthropic cache creation and cache read tokens are extra input tokens; total is computed."""
    assert Usage("claude-sonnet-4-5", 3210, 5, 3215, "json") == record([dumps(ANTHROPIC_MESSAGE)])


async def test_json_body_in_several_chunks_and_json_variants() -> None:
    """Chunks are joined; charset parameters and +json media types are read."""
    body = dumps(OPENAI_CHAT)
    assert 120 == record([body[:7], body[7:30], body[30:]]).total_tokens
    assert 120 == record([body], content_type=b"application/json; charset=utf-8").total_tokens
    assert 120 == record([body], content_type=b"application/vnd.api+json").total_tokens
    assert 120 == record([body], content_type=b"Application/JSON").total_tokens


async def test_json_without_usage_is_not_attributed() -> None:
    """A top-level "model" without "usage" (e.g. a car model) is not an LLM model."""
    assert Usage() == record([dumps({"model": "Model T", "price": 5})])
    assert Usage() == record([b"[1, 2, 3]"])
    assert Usage() == record([b""])


async def test_invalid_json_is_ignored() -> None:
    """A broken JSON body yields no usage and no error."""
    assert Usage() == record([b'{"usage": {"prompt_tokens": 1'])


def _general_usage(body: bytes) -> Usage:
    """What the general path (json.loads and the full rules) makes of a body."""
    fields, source = _json_fields(body)
    return _merge((("explicit", {}), ("headers", {}), (source or "json", fields)))


def _random_body(rng: random.Random) -> bytes:
    """A valid JSON body shaped like (or unlike) an LLM reply: keys in any order, nested lookalikes, tricky strings."""
    tricky = ["x", "", " gpt ", "{", "[", "}", "]", '"usage":{"total_tokens":9}}', '"model":"y"', "é😀", "a\\", "\t"]

    def text() -> str:
        return "".join(rng.choice(tricky) for _ in range(rng.randint(0, 3)))

    def count() -> Any:
        return rng.choice([0, 1, 12, 10**9, 10**9 + 1, -1, None, 2.0, "7", True])

    def usage() -> Any:
        keys = ["prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens"]
        keys += ["cache_creation_input_tokens", "cache_read_input_tokens", "details"]
        value = {key: count() for key in rng.sample(keys, rng.randint(0, 4))}
        return value if rng.random() < 0.9 else rng.choice([None, [], 5, "usage"])

    def nested() -> Any:
        return rng.choice(
            [
                {"model": text(), "usage": usage()},
                [{"message": {"content": text()}}, {"usage": usage()}],
                {"text": text()},
                [text(), 1, None],
            ]
        )

    members: list[tuple[str, Any]] = [("id", text())]
    if rng.random() < 0.8:
        members.append(("model", rng.choice([text(), "gpt-4o", " ", None, 3, "m" * 300])))
    for key in rng.sample(["choices", "content", "message", "response", "meta"], rng.randint(0, 3)):
        members.append((key, nested()))
    rng.shuffle(members)
    if rng.random() < 0.9:
        at = len(members) if rng.random() < 0.8 else rng.randint(0, len(members))
        members.insert(at, ("usage", usage()))
    if rng.random() < 0.1:  # a repeated key: json.loads keeps the last one
        repeated = (rng.choice(["usage", "model"]), rng.choice([usage(), text()]))
        members.insert(rng.randint(0, len(members)), repeated)
    pairs = [f"{json.dumps(key)}:{json.dumps(value, ensure_ascii=rng.random() < 0.5)}" for key, value in members]
    blank = rng.choice(["", " ", "\n  ", "\t"])
    return ("{" + blank + ("," + blank).join(pairs) + blank + "}" + rng.choice(["", "\n"])).encode()


def test_fast_json_path_agrees_with_the_general_path() -> None:
    """Whenever the fast path answers (reading only ``usage`` and ``model``), json.loads and the full rules give
    the same usage; on 5,000 random valid bodies, and it does answer for the common shapes."""
    rng = random.Random(20261125)
    answered = 0
    for _ in range(5000):
        body = _random_body(rng)
        fast = _fast_json_usage(body)
        if fast is not None:
            answered += 1
            assert fast == _general_usage(body), body
    assert answered > 250
    for reply in (OPENAI_CHAT, ANTHROPIC_MESSAGE):
        body = JSONResponse(reply).body
        assert _fast_json_usage(body) == _general_usage(body) != Usage()


async def test_other_content_types_are_not_inspected() -> None:
    """Only JSON and SSE bodies are read."""
    body = dumps(OPENAI_CHAT)
    assert Usage() == record([body], content_type=b"text/plain")
    assert Usage() == record([body], content_type=b"text/html; charset=utf-8")
    assert Usage() == record([body], content_type=None)


async def test_compressed_bodies() -> None:
    """A body compressed by a middleware inside this one (GZipMiddleware added first) is read when gzip or deflate
    (zlib-wrapped as HTTP says, or raw as some servers send it), in any chunks; other encodings are not."""
    body = dumps(OPENAI_CHAT)
    packed = gzip.compress(body)
    gzipped = [(b"content-encoding", b"gzip")]
    assert 120 == record([packed], headers=gzipped).total_tokens
    assert 120 == record([packed[:7], packed[7:20], packed[20:]], headers=gzipped).total_tokens
    assert 120 == record([packed], headers=[(b"Content-Encoding", b"X-GZIP")]).total_tokens
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for deflated in (zlib.compress(body), raw.compress(body) + raw.flush()):
        assert 120 == record([deflated], headers=[(b"content-encoding", b"deflate")]).total_tokens
    assert Usage() == record([body], headers=[(b"Content-Encoding", b"br")])
    assert Usage() == record([gzip.compress(packed)], headers=[(b"content-encoding", b"gzip, gzip")])
    assert 120 == record([body], headers=[(b"content-encoding", b"identity")]).total_tokens


def test_raw_deflate_is_inflated_to_its_last_byte() -> None:
    """Raw deflate has no trailer: zlib can hold output after taking all the input, which is asked for too (a body
    of 65,537 bytes came back as 65,536, and a usage in that tail was lost)."""
    from lago_org_billing._attribution import _Inflater

    data = b"a" * 65_537
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    assert b"".join(_Inflater(b"deflate").pieces(packer.compress(data) + packer.flush())) == data


async def test_compressed_streams_are_read_as_they_pass() -> None:
    """A gzip event stream, flushed chunk by chunk, is decompressed and parsed as it goes; a stream cut off
    mid-way keeps what was counted."""
    stream = sse(*anthropic_events())
    packer = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
    chunks = [packer.compress(stream[i : i + 40]) + packer.flush(zlib.Z_SYNC_FLUSH) for i in range(0, len(stream), 40)]
    chunks.append(packer.flush())
    assert Usage("claude-haiku", 125, 42, 167, "sse") == record(chunks, SSE, headers=[(b"content-encoding", b"gzip")])
    cut = record(chunks[: len(chunks) // 2], SSE, headers=[(b"content-encoding", b"gzip")])
    assert cut.input_tokens == 125 and cut.output_tokens < 42


def test_a_compressed_stream_chunk_is_inflated_within_the_cap() -> None:
    """A small gzip stream chunk that inflates to 20 MB is read in 64 KiB slices up to max_body_bytes, then given up
    on (its usage not read, said once): memory stays far below what it inflates to (it was held whole)."""
    import tracemalloc

    packer = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
    bomb = packer.compress(b"data: " + b"x" * 20_000_000 + b"\n\n") + packer.flush()
    assert len(bomb) < 100_000
    recorder = UsageRecorder({"type": "http"}, AttributionConfig(max_body_bytes=65_536))
    recorder.response_start(start_message(SSE, [(b"content-encoding", b"gzip")]))
    tracemalloc.start()
    try:
        recorder.response_body(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000 and recorder.result() == Usage()


async def test_compressed_bodies_are_capped_after_decompression(caplog: pytest.LogCaptureFixture) -> None:
    """max_body_bytes bounds the decompressed JSON too: a small body that inflates over it is not read (and not
    held in memory), and says so; a corrupt one bills 0 tokens and says so."""
    body = dumps({"usage": {"prompt_tokens": 5, "completion_tokens": 5}, "pad": " " * 50_000})
    packed = gzip.compress(body)
    gzipped = [(b"content-encoding", b"gzip")]
    assert len(packed) < 1_000
    assert 10 == record([packed], headers=gzipped, config=AttributionConfig(max_body_bytes=len(body))).total_tokens
    assert Usage() == record([packed], headers=gzipped, config=AttributionConfig(max_body_bytes=len(body) - 1))
    assert Usage() == record([b"\x1f\x8b not gzip"], headers=gzipped)
    assert Usage() == record([b"\x1f\x8b not gzip"], SSE, headers=gzipped)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert "over AttributionConfig.max_body_bytes" in warnings[0] and "could not be decompressed" in warnings[1]


async def test_json_size_cap() -> None:
    """Bodies over max_body_bytes are not buffered, by content-length or while streaming: only their ends are kept,
    and a usage object closing the body is read there (the usage of OpenAI's answers closes them)."""
    body = dumps(OPENAI_CHAT)
    exact = AttributionConfig(max_body_bytes=len(body))
    small = AttributionConfig(max_body_bytes=len(body) - 1)
    assert 120 == record([body], config=exact).total_tokens
    assert Usage("gpt-4o-mini", 100, 20, 120, "json") == record([body[:10], body[10:]], config=small)
    length = [(b"content-length", str(len(body)).encode())]
    assert Usage("gpt-4o-mini", 100, 20, 120, "json") == record([body], headers=length, config=small)


async def test_inspect_body_false_skips_bodies_but_keeps_headers() -> None:
    """With inspect_body=False only headers are used."""
    config = AttributionConfig(inspect_body=False)
    usage = record([dumps(OPENAI_CHAT)], headers=[(b"x-tokens-used", b"9")], config=config)
    assert Usage(None, 0, 0, 9, "headers") == usage


# -- headers ------------------------------------------------------------------------------------------------------


async def test_usage_from_headers() -> None:
    """Token and model headers are read case-insensitively; total defaults to input + output."""
    headers = [(b"X-Input-Tokens", b"30"), (b"x-output-tokens", b" 12 "), (b"X-Model", b"local-llama")]
    assert Usage("local-llama", 30, 12, 42, "headers") == record([], content_type=None, headers=headers)


async def test_header_order_in_config_decides() -> None:
    """The first configured header name wins, whatever order the response sends them in."""
    headers = [(b"x-total-tokens", b"5"), (b"x-tokens-used", b"7"), (b"x-completion-tokens", b"3")]
    assert Usage(None, 0, 3, 7, "headers") == record([], headers=headers)


async def test_custom_header_names() -> None:
    """Header names come from the config."""
    config = AttributionConfig(
        total_tokens_headers=("X-Cost-Units",), model_headers=("X-LLM",), input_tokens_headers=()
    )
    headers = [(b"x-cost-units", b"77"), (b"x-llm", b"m1"), (b"x-input-tokens", b"5")]
    assert Usage("m1", 0, 0, 77, "headers") == record([], headers=headers, config=config)
    with pytest.raises(LagoIntegrationError, match="tuple of names"):  # the base of every error the package raises
        AttributionConfig(model_headers="x-model")  # type: ignore[arg-type]


# -- explicit and priority ----------------------------------------------------------------------------------------


def billing_scope() -> dict[str, Any]:
    return {"type": "http", SCOPE_KEY: {"org_id": "acme"}}


async def test_attribute_usage_replaces_fields_and_wins() -> None:
    """Later calls replace the fields they pass; explicit values beat headers and body."""
    scope = billing_scope()
    attribute_usage(scope, model="first", input_tokens=1)
    attribute_usage(Request(scope), model="gpt-x", output_tokens=4)
    attribute_usage(scope, input_tokens=3)
    usage = record([dumps(OPENAI_CHAT)], headers=[(b"x-model", b"header-model")], scope=scope)
    assert Usage("gpt-x", 3, 4, 7, "explicit") == usage


async def test_merge_fills_missing_fields_from_lower_sources() -> None:
    """Per field: explicit model, header input, body output; total recomputed to stay consistent."""
    scope = billing_scope()
    attribute_usage(scope, model="explicit-model")
    headers = [(b"x-input-tokens", b"1000")]
    usage = record([dumps(OPENAI_CHAT)], headers=headers, scope=scope)
    assert Usage("explicit-model", 1000, 20, 1020, "explicit") == usage


async def test_merge_keeps_a_higher_total() -> None:
    """A total from a higher source than the token counts is kept."""
    usage = record([dumps(ANTHROPIC_MESSAGE)], headers=[(b"x-tokens-used", b"1")])
    assert Usage("claude-sonnet-4-5", 3210, 5, 1, "headers") == usage
    scope = billing_scope()
    attribute_usage(scope, total_tokens=500)
    assert Usage("gpt-4o-mini", 100, 20, 500, "explicit") == record([dumps(OPENAI_CHAT)], scope=scope)


async def test_attribute_usage_outside_the_middleware_is_a_no_op(caplog: pytest.LogCaptureFixture) -> None:
    """Without the billing middleware nothing happens and nothing raises."""
    scope: dict[str, Any] = {"type": "http"}
    with caplog.at_level(logging.DEBUG, logger="lago_org_billing.attribution"):
        attribute_usage(scope, input_tokens=5)
        attribute_usage(Request(scope), model="m")
        attribute_usage(object(), model="m")
    assert SCOPE_KEY not in scope
    assert any("outside the billing middleware" in r.getMessage() for r in caplog.records)


# -- SSE ----------------------------------------------------------------------------------------------------------


async def test_openai_stream_usage_from_final_chunk() -> None:
    """The final usage chunk is read; [DONE] and content mentioning usage are harmless."""
    assert Usage("gpt-4o", 11, 2, 13, "sse") == record([openai_stream()], content_type=SSE)


async def test_openai_stream_byte_by_byte_and_crlf() -> None:
    """Lines split anywhere across chunks, with \\r\\n or \\r line ends, parse the same."""
    stream = openai_stream()
    expected = Usage("gpt-4o", 11, 2, 13, "sse")
    assert expected == record(byte_by_byte(stream), content_type=SSE)
    crlf = stream.replace(b"\n", b"\r\n")
    assert expected == record(byte_by_byte(crlf), content_type=SSE)
    assert expected == record([crlf[:5], crlf[5:]], content_type=SSE)
    assert expected == record(byte_by_byte(stream.replace(b"\n", b"\r")), content_type=SSE)


async def test_openai_stream_without_usage_reports_the_model_only() -> None:
    """Without stream_options.include_usage there is a model but no tokens."""
    assert Usage("gpt-4o", 0, 0, 0, "sse") == record([openai_stream(include_usage=False)], content_type=SSE)


async def test_a_blank_model_in_an_early_chunk_does_not_hide_the_real_one() -> None:
    """Azure OpenAI streams open with a chunk whose model is "": the model of the later chunks is still read."""
    usage = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
    first = (None, {"model": "", "choices": [], "prompt_filter_results": []})
    chunk = (None, {"model": "gpt-4o-2024-08-06", "choices": [{"delta": {"content": "Hi"}}], "usage": None})
    assert Usage("gpt-4o-2024-08-06", 0, 0, 0, "sse") == record([sse(first, chunk)], content_type=SSE)
    last = (None, {"choices": [], "usage": usage})  # the usage chunk without a model
    assert Usage("gpt-4o-2024-08-06", 11, 2, 13, "sse") == record([sse(first, chunk, last)], content_type=SSE)
    invalid = (None, {"model": 42, "choices": []})  # nor does an invalid one
    assert Usage("gpt-4o-2024-08-06", 11, 2, 13, "sse") == record([sse(invalid, chunk, last)], content_type=SSE)


async def test_one_unreadable_stream_event_does_not_stop_the_reading() -> None:
    """An event too deeply nested for json.loads is skipped; the usage after it still counts."""
    deep = "[" * 100_000 + "]" * 100_000
    stream = sse((None, '{"model": "m", "x": ' + deep + "}")) + openai_stream()
    assert Usage("gpt-4o", 11, 2, 13, "sse") == record([stream], content_type=SSE)
    assert Usage("gpt-4o", 11, 2, 13, "sse") == record([stream], content_type=SSE)  # the next stream too


async def test_a_byte_order_mark_opening_a_stream_is_ignored() -> None:
    stream = b"\xef\xbb\xbf" + openai_stream()
    assert Usage("gpt-4o", 11, 2, 13, "sse") == record([stream], content_type=SSE)
    assert Usage("gpt-4o", 11, 2, 13, "sse") == record([stream[:3], stream[3:]], content_type=SSE)


async def test_a_deeply_nested_json_body_is_unparseable_not_an_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = b'{"usage": {"prompt_tokens": 1}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert Usage() == record([body])
    assert Usage() == _general_usage(body)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_only_json_blanks_may_follow_a_json_body() -> None:
    """A form feed after the document makes json.loads refuse it: the fast path agrees (0 tokens either way)."""
    body = dumps({"model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}) + b"\x0c"
    assert record([body]) == _general_usage(body) == Usage()
    assert record([body[:-1] + b" \r\n\t"]) == Usage("m", 3, 4, 7, "json")


async def test_cache_fields_next_to_prompt_tokens_are_not_added_again() -> None:
    """Proxies give Claude's usage in OpenAI's shape, prompt_tokens already counting the cache, with Anthropic's
    cache fields beside it: they were added to the input a second time (6410 input for 3205 read)."""
    usage = {"prompt_tokens": 3205, "completion_tokens": 5, "total_tokens": 3210, "cache_read_input_tokens": 3200}
    body = dumps({"model": "claude", "usage": usage})
    assert record([body]) == _general_usage(body) == Usage("claude", 3205, 5, 3210, "json")
    stream = sse((None, {"model": "claude", "choices": [], "usage": usage}))
    assert record([stream], content_type=SSE) == Usage("claude", 3205, 5, 3210, "sse")
    anthropic = {"input_tokens": 5, "output_tokens": 5, "cache_read_input_tokens": 3200}  # Anthropic's own: added
    assert record([dumps({"model": "claude", "usage": anthropic})]) == Usage("claude", 3205, 5, 3210, "json")


async def test_a_later_usage_update_without_a_total_drops_the_stale_one() -> None:
    first = (None, {"model": "m", "usage": {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12}})
    later = (None, {"model": "m", "usage": {"prompt_tokens": 11, "completion_tokens": 5}})
    assert record([sse(first, later)], content_type=SSE) == Usage("m", 11, 5, 16, "sse")


async def test_anthropic_stream_merges_message_start_and_delta() -> None:
    """Input (with cache reads) from message_start, cumulative output from message_delta."""
    stream = sse(*anthropic_events())
    expected = Usage("claude-haiku", 125, 42, 167, "sse")
    assert expected == record([stream], content_type=SSE)
    assert expected == record(byte_by_byte(stream.replace(b"\n", b"\r\n")), content_type=SSE)


async def test_anthropic_stream_with_several_messages_adds_them_up() -> None:
    """A new message_start starts another message whose usage is added."""
    stream = sse(*anthropic_events(10, 0, 5, "m1"), *anthropic_events(20, 0, 7, "m2"))
    assert Usage("m2", 30, 12, 42, "sse") == record([stream], content_type=SSE)


async def test_responses_api_stream() -> None:
    """response.completed carries the usage under "response"."""
    stream = sse(
        ("response.created", {"type": "response.created", "response": {"model": "gpt-4.1", "usage": None}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi"}),
        (
            "response.completed",
            {
                "type": "response.completed",
                "response": {"model": "gpt-4.1", "usage": {"input_tokens": 8, "output_tokens": 2, "total_tokens": 10}},
            },
        ),
    )
    assert Usage("gpt-4.1", 8, 2, 10, "sse") == record(byte_by_byte(stream), content_type=SSE)


async def test_stream_cut_off_keeps_what_was_counted() -> None:
    """A stream cut mid-way reports the usage seen so far; a truncated last line is ignored."""
    stream = sse(*anthropic_events())
    cut = stream.index(b"event: message_delta")
    usage = record([stream[:cut]], content_type=SSE)
    assert Usage("claude-haiku", 125, 1, 126, "sse") == usage
    truncated = stream[: cut + 60]
    assert Usage("claude-haiku", 125, 1, 126, "sse") == record(byte_by_byte(truncated), content_type=SSE)
    openai = openai_stream()
    assert Usage("gpt-4o", 0, 0, 0, "sse") == record([openai[:150]], content_type=SSE)


async def test_stream_without_final_blank_line_still_counts() -> None:
    """A last complete data line, or a last unterminated but complete line, is still read."""
    final = b'data: {"model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}'
    assert Usage("m", 3, 4, 7, "sse") == record([final + b"\n"], content_type=SSE)
    assert Usage("m", 3, 4, 7, "sse") == record([final], content_type=SSE)


async def test_sse_multiline_data_comments_and_no_space() -> None:
    """Multi-line data fields are joined; comments are skipped; 'data:' without a space works."""
    stream = b': keep-alive\n\ndata:{"model": "m",\ndata: "usage": {"input_tokens": 4, "output_tokens": 6}}\n\n'
    assert Usage("m", 4, 6, 10, "sse") == record(byte_by_byte(stream), content_type=SSE)
    assert Usage("m", 4, 6, 10, "sse") == record(byte_by_byte(stream.replace(b"\n", b"\r\n")), content_type=SSE)


async def test_sse_oversized_line_is_skipped() -> None:
    """A line longer than the cap is dropped (and its event), later events still count."""
    config = AttributionConfig(max_body_bytes=200)
    big = b"data: " + b'{"pad": "' + b"x" * 500 + b'", "usage": {"input_tokens": 999}}\n\n'
    good = sse((None, {"model": "m", "usage": {"input_tokens": 1, "output_tokens": 2}}))
    for chunks in ([big + good], byte_by_byte(big + good), [big[:300], big[300:] + good]):
        assert Usage("m", 1, 2, 3, "sse") == record(chunks, content_type=SSE, config=config)


async def test_sse_oversized_comment_line_drops_only_itself() -> None:
    """An oversized comment before an event's data line is dropped alone, however the bytes are chunked (its event
    was dropped too when the line's end came in another chunk)."""
    config = AttributionConfig(max_body_bytes=200)
    stream = b": " + b"p" * 500 + b"\n" + sse((None, {"model": "m", "usage": {"input_tokens": 3, "output_tokens": 4}}))
    for split in range(1, len(stream)):
        chunks = [stream[:split], stream[split:]]
        assert Usage("m", 3, 4, 7, "sse") == record(chunks, content_type=SSE, config=config), split


async def test_sse_event_of_many_lines_over_the_cap_is_not_kept(caplog: pytest.LogCaptureFixture) -> None:
    """An event whose data lines add up past the cap (each line under it) is dropped as it grows, not kept whole in
    memory until its blank line, and said once when no usage came from anywhere else; the next event still counts."""
    from lago_org_billing import _attribution

    _attribution._said_once.clear()
    config = AttributionConfig(max_body_bytes=1_000)
    recorder = UsageRecorder({"type": "http"}, config)
    recorder.response_start(start_message(SSE))
    for _ in range(1_000):  # 1,000 lines of 100 bytes in one event: 100 KB against a 1 KB cap
        recorder.response_body(b"data: " + b"x" * 100 + b"\n")
        assert sum(len(line) for line in recorder._data_lines) <= 1_000
    recorder.response_body(b'data: {"usage": {"input_tokens": 999}}\n\n')  # still the same (dropped) event
    recorder.response_body(sse((None, {"model": "m", "usage": {"input_tokens": 1, "output_tokens": 2}})))
    assert recorder.result() == Usage("m", 1, 2, 3, "sse")
    # (not said: the stream's usage came after it; a stream whose only event is dropped is)
    assert "over AttributionConfig.max_body_bytes" not in caplog.text
    alone = UsageRecorder({"type": "http"}, config)
    alone.response_start(start_message(SSE))
    for _ in range(1_000):
        alone.response_body(b"data: " + b"x" * 100 + b"\n")
    alone.response_body(b'data: {"usage": {"input_tokens": 999}}\n\n')
    assert alone.result().total_tokens == 0
    assert "over AttributionConfig.max_body_bytes" in caplog.text


async def test_bodies_whose_usage_is_not_read_are_said_once(caplog: pytest.LogCaptureFixture) -> None:
    """A JSON body over the cap, compressed before the middleware saw it, or not parseable bills 0 tokens: a warning
    says so (once) and how to fix it, instead of nothing."""
    from lago_org_billing import _attribution

    _attribution._said_once.clear()
    body = dumps({"usage": {"prompt_tokens": 5, "completion_tokens": 5}, "pad": "x" * 14_000})
    for _ in range(2):
        assert record([body], config=AttributionConfig(max_body_bytes=1_000)).total_tokens == 0
        assert record([b"\x1f\x9d..."], headers=[(b"content-encoding", b"compress")]).total_tokens == 0
        assert record([b'{"usage": {"prompt_tokens": 5}, "name": "caf\xe9"}']).total_tokens == 0  # Latin-1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3
    # (an encoding no module reads: br and zstd are read when brotli / zstandard are installed)
    assert "over AttributionConfig.max_body_bytes" in warnings[0] and "compress-encoded" in warnings[1]
    assert "could not be parsed" in warnings[2]


async def test_result_is_final_and_idempotent() -> None:
    """result() can be called twice; chunks after it are ignored."""
    recorder = UsageRecorder({"type": "http"}, AttributionConfig())
    recorder.response_start(start_message(SSE))
    recorder.response_body(sse(*anthropic_events()[:1]))
    first = recorder.result()
    recorder.response_body(sse(*anthropic_events()[1:]))
    assert first is recorder.result()
    assert 1 == first.output_tokens


async def test_response_body_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    """An internal error while reading the stream is logged once and attribution falls back."""
    recorder = UsageRecorder({"type": "http"}, AttributionConfig())
    recorder.response_start(start_message(SSE, [(b"x-tokens-used", b"4")]))
    with caplog.at_level(logging.ERROR, logger="lago_org_billing.attribution"):
        recorder.response_body("not bytes")  # type: ignore[arg-type]
        recorder.response_body("not bytes")  # type: ignore[arg-type]
    assert Usage(None, 0, 0, 4, "headers") == recorder.result()
    assert 1 == len(caplog.records)


# -- malformed values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["-1", "true", "1.5", '"abc"', '"-3"', '"1e3"', "1000000001", "NaN", "Infinity", "null", "[3]", '{"n": 1}']
)
async def test_malformed_body_values_become_zero(bad: str) -> None:
    """Bools, negatives, fractions, non-digit strings, huge values, containers: dropped, never raised."""
    body = b'{"model": "m", "usage": {"prompt_tokens": %s, "completion_tokens": 5}}' % bad.encode()
    assert Usage("m", 0, 5, 5, "json") == record([body])


async def test_whole_floats_and_limits_are_accepted() -> None:
    """5.0 is 5, a digit string is its number, and 10**9 is still valid."""
    body = dumps({"model": "m", "usage": {"prompt_tokens": 5.0, "completion_tokens": 10**9}})
    assert Usage("m", 5, 10**9, 10**9 + 5, "json") == record([body])
    body = dumps({"model": "m", "usage": {"prompt_tokens": " 12 ", "completion_tokens": 0}})
    assert Usage("m", 12, 0, 12, "json") == record([body])


async def test_malformed_values_are_logged_once_per_source_and_field(caplog: pytest.LogCaptureFixture) -> None:
    """Repeated malformed values log one warning per (source, field)."""
    body = dumps({"model": "m", "usage": {"prompt_tokens": -1, "completion_tokens": "x"}})
    headers = [(b"x-input-tokens", b"-3"), (b"x-model", b"bad\x01model")]
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.attribution"):
        for _ in range(3):
            scope = billing_scope()
            attribute_usage(scope, input_tokens=-5, model=42)  # type: ignore[arg-type]
            usage = record([body], headers=headers, scope=scope)
            assert Usage("m", 0, 0, 0, "json") == usage
    logged = sorted((r.args[1], r.args[0]) for r in caplog.records if isinstance(r.args, tuple))
    assert [
        ("explicit", "input_tokens"),
        ("explicit", "model"),
        ("headers", "input_tokens"),
        ("headers", "model"),
        ("json", "input_tokens"),
        ("json", "output_tokens"),
    ] == logged
    assert 6 == len(caplog.records)


async def test_malformed_explicit_value_falls_back_to_lower_source() -> None:
    """A malformed explicit count counts as missing, so the body's value is used."""
    scope = billing_scope()
    attribute_usage(scope, input_tokens=-1)
    assert 100 == record([dumps(OPENAI_CHAT)], scope=scope).input_tokens


# -- end to end ---------------------------------------------------------------------------------------------------


class RecordingMiddleware:
    """Minimal stand-in for the billing middleware: feeds a UsageRecorder, keeps results."""

    def __init__(self, app: ASGIApp, results: list[Usage], config: AttributionConfig | None = None) -> None:
        self.app = app
        self.results = results
        self.config = config or AttributionConfig()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[SCOPE_KEY] = {"org_id": "acme"}
        recorder = UsageRecorder(scope, self.config)

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                recorder.response_start(message)
            elif message["type"] == "http.response.body":
                recorder.response_body(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.results.append(recorder.result())


def make_app(results: list[Usage]) -> ASGIApp:
    async def chat(request: Request) -> JSONResponse:
        return JSONResponse(OPENAI_CHAT)

    async def explicit(request: Request) -> JSONResponse:
        attribute_usage(request, model="own-model", input_tokens=7, output_tokens=8)
        return JSONResponse({"ok": True})

    async def headers(request: Request) -> Response:
        return Response("ok", headers={"X-Tokens-Used": "33", "X-Model": "hdr"})

    async def stream(request: Request) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            for name, data in anthropic_events():
                yield sse((name, data))

        return StreamingResponse(events(), media_type="text/event-stream")

    async def stream_explicit(request: Request) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            yield b"data: hello\n\n"
            attribute_usage(request, output_tokens=99)  # counted at the end of the stream
            yield b"data: bye\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(
        routes=[
            Route("/chat", chat),
            Route("/explicit", explicit),
            Route("/headers", headers),
            Route("/stream", stream),
            Route("/stream-explicit", stream_explicit),
        ]
    )
    return RecordingMiddleware(app, results)


async def test_end_to_end_through_starlette() -> None:
    """JSON body, explicit call, headers and an SSE stream, each through a real app; the client gets every byte."""
    results: list[Usage] = []
    transport = httpx.ASGITransport(app=make_app(results))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        chat = await client.get("/chat")
        await client.get("/explicit")
        await client.get("/headers")
        stream = await client.get("/stream")
        await client.get("/stream-explicit")
    assert OPENAI_CHAT == chat.json()
    assert sse(*anthropic_events()) == stream.content
    assert [
        Usage("gpt-4o-mini", 100, 20, 120, "json"),
        Usage("own-model", 7, 8, 15, "explicit"),
        Usage("hdr", 0, 0, 33, "headers"),
        Usage("claude-haiku", 125, 42, 167, "sse"),
        Usage(None, 0, 99, 99, "explicit"),
    ] == results


async def test_end_to_end_client_disconnect_mid_stream() -> None:
    """A client that goes away mid-stream still yields a usage result with what was counted."""
    results: list[Usage] = []
    app = make_app(results)
    sent: list[bytes] = []
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/stream",
        "raw_path": b"/stream",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
    }
    disconnected = anyio.Event()

    async def receive() -> Message:
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            sent.append(message.get("body", b""))
            if len(sent) == 3:  # message_start, content_block_start, ping: then the client leaves
                disconnected.set()
                raise OSError("client went away")

    with pytest.raises(ClientDisconnect):
        await app(scope, receive, send)
    assert [Usage("claude-haiku", 125, 1, 126, "sse")] == results
