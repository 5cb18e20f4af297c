"""Security and resource bounds on client-controlled input: work or memory that grows without a fitting bound
with what a client, or an upstream the app relays, sends. Measured with ``tracemalloc`` and counts, never by timing.

1. An event-stream line held across response chunks (``UsageRecorder._feed_sse``) is grown with ``bytes +=``: each
   small chunk copies the whole line held so far, so a 1 MiB ``data:`` line relayed in small chunks costs O(n^2)
   bytes copied on the event loop (measured: 3.2 s for 1 MiB in 8-byte chunks, 6 ms in 64 KiB chunks).
2. The quota gate forgets old refresh failures (``QuotaGate._forget_old_failures``) by scanning every org it
   remembers as failing, after every failed (and every successful) refresh: a Lago outage met by many distinct org
   ids (a spoofable ``LAGO_ORG_HEADER`` flood, or simply many active orgs) costs O(n^2) on the event loop (measured:
   16,000 made-up orgs, 128 million entries scanned, 4.4 s instead of 1.7 s; up to 100,000 entries per scan).
3. An unknown ``Content-Encoding`` of a JSON or event-stream response is "said once" per distinct value, kept in a
   process-wide set that is never bounded: a relayed upstream that varies the header costs a set entry (of the
   header's size) and a WARNING per response.
"""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from _quota_app import Clock
from lago_org_billing import BillingSettings, _attribution
from lago_org_billing._attribution import AttributionConfig, UsageRecorder
from lago_org_billing._errors import LagoUnavailableError
from lago_org_billing._quota import QuotaConfig, QuotaGate

pytestmark = pytest.mark.anyio

SSE = b"text/event-stream"


def _stream_recorder(content_type: bytes = SSE) -> UsageRecorder:
    recorder = UsageRecorder({"type": "http"}, AttributionConfig())  # max_body_bytes: 1 MiB
    recorder.response_start(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]}
    )
    return recorder


# --------------------------------------------------------------------------- 1. a stream line held across chunks


@pytest.mark.parametrize("content_type", [SSE, b"application/x-ndjson"], ids=["sse", "ndjson"])
def test_a_stream_line_held_across_small_chunks_is_not_copied_whole_per_chunk(content_type: bytes) -> None:
    """An LLM proxy relays its upstream's stream as it comes (``StreamingResponse`` over ``aiter_raw()``): one long
    ``data:`` line (a streamed image's base64, a model's one-line answer, up to max_body_bytes, 1 MiB) can arrive in
    many small chunks. The recorder holds the line's start in ``_partial`` (bytes) and grows it with ``+=``, a new
    copy of everything held for every chunk: O(n^2) bytes copied on the request path (8-byte chunks of a 1 MiB line:
    ~60 GB memcpy, 3.2 s of a blocked event loop per response). Expected: appending a small chunk costs about its
    own size, not a copy of the 768 KiB already held (the peak memory over 64 such chunks grows by far less than the
    line held)."""
    recorder = _stream_recorder(content_type)
    held = 768 * 1024
    prefix = b"data: " if content_type == SSE else b'{"model": "m", "pad": "'
    piece = b"y" * 8
    tracemalloc.start()
    try:
        recorder.response_body(prefix + b"x" * held)  # a line begun, not ended: held for the next chunks
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(64):
            recorder.response_body(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    grown = peak - before
    assert grown < held // 3, (
        f"64 chunks of 8 bytes raised the peak by {grown:,} bytes: each chunk copied the {held:,}-byte line held"
    )


def test_a_stream_line_held_across_small_chunks_is_still_read_whole() -> None:
    """(The behaviour the fix keeps: a usage event whose line came a few bytes at a time is billed.)"""
    recorder = _stream_recorder()
    event = b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
    for index in range(0, len(event), 3):
        recorder.response_body(event[index : index + 3])
    assert recorder.result().total_tokens == 7


# ------------------------------------------------------------ 2. the quota gate's failing orgs, forgotten by scans


class _DownLago:
    """A Lago that fails every read (an outage: 503s), as the gate's refreshes see it."""

    async def get_subscription(self, external_id: str, *, status: str | None = None) -> dict[str, Any]:
        raise LagoUnavailableError("Lago answered 503")

    async def get_current_usage(self, customer: str, subscription: str, **params: Any) -> dict[str, Any]:
        raise LagoUnavailableError("Lago answered 503")


class _CountingDict(dict):  # type: ignore[type-arg]
    """A dict that counts the entries any iteration over it visits."""

    visited = 0

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for item in iterator:
            _CountingDict.visited += 1
            yield item

    def __iter__(self) -> Iterator[Any]:
        return self._counted(super().__iter__())

    def keys(self) -> Any:
        return self._counted(iter(super().keys()))

    def values(self) -> Any:
        return self._counted(iter(super().values()))

    def items(self) -> Any:
        return self._counted(iter(super().items()))


async def test_refresh_failures_of_many_orgs_cost_linear_bookkeeping() -> None:
    """During a Lago outage each failed refresh records its org in ``_refresh_failing`` and first calls
    ``_forget_old_failures``, which scans *every* org recorded (up to max_orgs, 100,000) to drop those older than a
    minute; a successful refresh scans them again. With many distinct orgs failing within that minute (a flood of
    made-up ids in a spoofable LAGO_ORG_HEADER while Lago is down, which the README says is shed at 10,000 queued
    refreshes; or a large deployment's own orgs), the n-th failure scans n-1 entries: O(n^2) on the event loop
    (16,000 orgs: 128 million entries, 4.4 s instead of 1.7 s). Expected: forgetting old failures costs amortized
    O(1) per failure (they are recorded in time order: drop from the oldest end until one is recent)."""
    clock = Clock()
    settings = BillingSettings(api_url="http://lago.invalid", api_key="k")
    gate = QuotaGate(settings, _DownLago(), config=QuotaConfig(), clock=clock.time)  # type: ignore[arg-type]
    gate._refresh_failing = _CountingDict()
    _CountingDict.visited = 0
    orgs = 400
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(gate.run)
            for index in range(orgs):
                await gate.check(f"made-up-{index}")  # cold: waits for its refresh, which fails at once
            group.cancel_scope.cancel()
    finally:
        await gate.aclose()
    assert gate.stats["refresh_errors"] == orgs
    assert _CountingDict.visited <= 4 * orgs, (
        f"{orgs} failed refreshes visited {_CountingDict.visited:,} failing-org entries (n^2/2: each failure scans "
        "every org failing within the last minute)"
    )


# ------------------------------------------------------------------- 3. unknown content encodings, said "once" each


def test_distinct_unknown_content_encodings_are_not_remembered_and_logged_without_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A proxy relays its upstream's bytes as they are (``aiter_raw()``), Content-Encoding included. A JSON or
    event-stream response whose encoding the recorder cannot read is said once "per encoding": the key
    ``encoding:<the header's value>`` goes into the process-wide ``_said_once`` set, which nothing bounds, and a
    WARNING is logged for each new value. An upstream that varies the header (``x-gzip-1``, ``x-gzip-2``... up to
    the server's header limit, kilobytes each) makes every response add an entry of that size, held for the process's
    life, and a WARNING line. Expected: the set stays bounded (unknown encodings said under one key, or the set
    capped) and the warnings are not one per response."""
    _attribution.reset_warnings()
    caplog.set_level(logging.WARNING, logger="lago_org_billing")
    responses = 500
    try:
        for index in range(responses):
            recorder = UsageRecorder({"type": "http"}, AttributionConfig())
            encoding = b"x-enc-%d-" % index + b"p" * 1000
            recorder.response_start(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-encoding", encoding)],
                }
            )
            recorder.response_body(b"\x00\x01 not json")
            recorder.result()
        remembered = len(_attribution._said_once)
        held = sum(len(key) for key in _attribution._said_once)
    finally:
        _attribution.reset_warnings()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "-encoded" in r.getMessage()]
    assert remembered <= 64 and len(warnings) <= 64, (
        f"{responses} responses with distinct unknown encodings: {remembered} keys ({held:,} bytes) remembered for "
        f"the process's life, {len(warnings)} WARNINGs"
    )
