"""Usage attribution: a JSON body followed by more documents (a newline-delimited stream declared as JSON) is said on
the fast path as on the general one; a model header written in UTF-8 is billed as written, not as its Latin-1 reading.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence

import pytest

from lago_org_billing._attribution import Usage, UsageRecorder, json_usage, reset_warnings
from lago_org_billing._identity import SCOPE_KEY

#: Ollama's stream, relayed by an app as ``StreamingResponse(..., media_type="application/json")``: one JSON document
#: per line, the counts in the last one.
OLLAMA_LINES = (
    {"model": "llama3.2", "created_at": "2026-01-05T10:00:00Z", "response": "Hi", "done": False},
    {
        "model": "llama3.2",
        "created_at": "2026-01-05T10:00:01Z",
        "response": "",
        "done": True,
        "done_reason": "stop",
        "total_duration": 1_000_000,
        "prompt_eval_count": 26,
        "eval_count": 298,
    },
)
OPENAI_CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
}


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


def record(body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()) -> Usage:
    """The usage the middleware's recorder reads from a JSON response (its deferred reading when it can)."""
    recorder = UsageRecorder({"type": "http", SCOPE_KEY: {"org_id": "acme"}})
    recorder.response_start(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), *headers]}
    )
    recorder.response_body(body)
    found = recorder.deferred()
    return json_usage(found) if isinstance(found, bytes) else found


def unparseable_said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "could not be parsed as JSON" in r.getMessage()]


def test_json_documents_one_after_the_other_are_said_on_the_fast_path(caplog: pytest.LogCaptureFixture) -> None:
    """A body opening with ``{`` was read by the fast path, which billed 0 tokens silently when more followed the
    first document (json.loads refuses it: the general path, taken when the body opened with a blank or a usage
    header came, said so): an Ollama stream relayed as application/json went unbilled without a word."""
    body = b"".join(json.dumps(line).encode() + b"\n" for line in OLLAMA_LINES)
    caplog.set_level(logging.WARNING, logger="lago_org_billing.attribution")
    assert Usage() == record(body)
    said = unparseable_said(caplog)
    assert len(said) == 1
    assert "several JSON documents" in said[0]
    # the general path (a blank before the document) says it the same, once per process
    reset_warnings()
    caplog.clear()
    assert Usage() == record(b"\n" + body)
    assert len(unparseable_said(caplog)) == 1
    # once per process: another such body is not said again
    caplog.clear()
    assert Usage() == record(body)
    assert not unparseable_said(caplog)


def test_trailing_json_blanks_are_not_said(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lago_org_billing.attribution")
    assert Usage("gpt-4o-mini", 100, 20, 120, "json") == record(json.dumps(OPENAI_CHAT).encode() + b"\r\n \t\n")
    assert not unparseable_said(caplog)


@pytest.mark.parametrize("model", ["modèle-fr", "qwen3-中文", "ünï-çødé"])
def test_a_model_header_in_utf8_is_billed_as_written(model: str, caplog: pytest.LogCaptureFixture) -> None:
    """A model header's value in UTF-8 (a raw ASGI app, a proxy passing its upstream's header bytes on) was read as
    Latin-1: ``modèle-fr`` billed as ``modÃ¨le-fr``, a CJK name dropped as malformed (and the body's model billed)."""
    caplog.set_level(logging.WARNING, logger="lago_org_billing.attribution")
    usage = record(json.dumps(OPENAI_CHAT).encode(), headers=[(b"x-model", model.encode())])
    assert Usage(model, 100, 20, 120, "headers") == usage
    assert not caplog.records


def test_a_model_header_in_latin1_is_still_read() -> None:
    """What Starlette writes (``response.headers["X-Model"] = "modèle"`` is encoded as Latin-1) stays as read."""
    usage = record(json.dumps(OPENAI_CHAT).encode(), headers=[(b"x-model", "modèle".encode("latin-1"))])
    assert Usage("modèle", 100, 20, 120, "headers") == usage
