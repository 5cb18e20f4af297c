"""The usage attribution parsers against a reference, on seeded random bodies.

- The fast JSON path (``_fast_json_counts``, ``json_usage_counts``, ``_fast_json_usage``, ``json_usage``) against
  ``json.loads`` of the body and the general rules (``_payload_usage``): every usage shape the module reads (OpenAI
  chat, completions, embeddings and Responses API; xAI's reasoning apart; Anthropic with cache counts and iterations;
  Cohere v1 and v2; Gemini and its array of chunks; Ollama; Bedrock Converse; gateways' mixed shapes), written with
  random blanks, key order, ``\\u`` escapes and escaped quotes, repeated keys (``json.loads`` keeps the last), every
  JSON number form, unicode, decoys (a "usage" inside a string, a key ending in it, records each with a usage) and
  broken documents. Whenever the fast path answers, it is the reference's answer; nothing raises.
- The recorder (``response_start``/``response_body``/``result`` or ``deferred``): the same JSON, SSE, NDJSON and AWS
  event-stream bodies, plain and gzip/deflate/br/zstd-encoded, cut at random offsets (inside multi-byte characters,
  inside ``\\r\\n``, inside ``data:``), read as in one piece and as the reference parse of the whole body; over
  ``max_body_bytes``, a usage within the kept ends read as whole, and never a usage the document does not have.
"""

from __future__ import annotations

import base64
import gzip
import importlib
import json
import random
import re
import zlib
from collections.abc import Iterator
from typing import Any

import pytest

from lago_org_billing import _attribution
from lago_org_billing._attribution import (
    AttributionConfig,
    Usage,
    UsageRecorder,
    _collect,
    _Counts,
    _fast_json_counts,
    _fast_json_usage,
    _merge,
    _payload_usage,
    _resolve_counts,
    json_usage,
    json_usage_counts,
    reset_warnings,
)
from test_attribution_gzip_members_bedrock_and_gemini_relays import frame

Billed = tuple["str | None", int, int, int]

#: The seeds every random test runs (each well under 2 s).
SEEDS = [1, 7, 42, 2026]


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    assert not _attribution._internal_logged, "an internal error was logged: a parser raised"
    reset_warnings()


# -- JSON written as servers write it ---------------------------------------------------------------------------


#: A member left out (see :func:`maybe`).
_MISSING: Any = object()


class Obj:
    """A JSON object as written: its members in order, a key repeated as a server may (``json.loads`` keeps the
    last)."""

    __slots__ = ("pairs",)

    def __init__(self, *pairs: tuple[str, Any]) -> None:
        self.pairs = [(key, value) for key, value in pairs if value is not _MISSING]

    def get(self, key: str) -> Any:
        found = None
        for name, value in self.pairs:
            if name == key:
                found = value
        return found


class Raw:
    """A JSON token written as it is: a number in another form (``1e2``, ``7.0``, ``-0``), ``NaN``, 5,000 digits."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


_NAMED_ESCAPES = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class Rng(random.Random):
    """The random source of the generators; ``realistic``: members as the providers send them (Gemini's prompt and
    total counts in each chunk, Cohere's billed units, Ollama's ``done``), for the heuristics that read answers over
    the cap by their known layout; ``valid``: how often a count is a valid one."""

    realistic = False
    valid = 0.8


class Writer:
    """Writes a value as some JSON encoder may: blanks anywhere JSON allows them, characters escaped or not, numbers
    in any JSON form (``numbers``; else as Python writes integers); keys escaped as strings are (``keys``; else
    written plain, as every encoder does: the module finds its keys written out)."""

    def __init__(
        self,
        rng: random.Random,
        *,
        blanks: float = 0.3,
        escapes: float = 0.1,
        lines: bool = True,
        numbers: bool = True,
        keys: bool = True,
    ) -> None:
        self.rng = rng
        self.blanks = blanks
        self.escapes = escapes
        self.numbers = numbers
        self.keys = keys
        self.spaces = [" ", "  ", "\t", "\n", "\r\n", " \n\t "] if lines else [" ", "  ", "\t"]

    def blank(self) -> str:
        return self.rng.choice(self.spaces) if self.rng.random() < self.blanks else ""

    def string(self, text: str) -> str:
        rng, out = self.rng, ['"']
        for char in text:
            escaped = rng.random() < self.escapes
            if char == '"':
                out.append(rng.choice(['\\"', "\\u0022"]) if escaped else '\\"')
            elif char == "\\":
                out.append(rng.choice(["\\\\", "\\u005c", "\\u005C"]) if escaped else "\\\\")
            elif char < " ":
                out.append(_NAMED_ESCAPES.get(char, f"\\u{ord(char):04x}") if not escaped else f"\\u{ord(char):04X}")
            elif char == "/" and escaped:
                out.append("\\/")
            elif escaped:
                code = ord(char)
                if code > 0xFFFF:  # a surrogate pair, as ensure_ascii writes it
                    code -= 0x10000
                    out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
                else:
                    out.append(rng.choice([f"\\u{code:04x}", f"\\u{code:04X}"]))
            else:
                out.append(char)
        out.append('"')
        return "".join(out)

    def write(self, value: Any) -> str:
        if isinstance(value, Obj):
            if not value.pairs:
                return "{" + self.blank() + "}"
            members = [
                self.blank()
                + (self.string(key) if self.keys else json.dumps(key, ensure_ascii=False))
                + self.blank()
                + ":"
                + self.blank()
                + self.write(item)
                + self.blank()
                for key, item in value.pairs
            ]
            return "{" + ",".join(members) + "}"
        if isinstance(value, list):
            if not value:
                return "[" + self.blank() + "]"
            return "[" + ",".join(self.blank() + self.write(item) + self.blank() for item in value) + "]"
        if isinstance(value, str):
            return self.string(value)
        if isinstance(value, Raw):
            return value.text
        if value is None or isinstance(value, bool):
            return json.dumps(value)
        if isinstance(value, int):
            return self.number(value)
        if isinstance(value, float):
            return repr(value)
        raise TypeError(value)

    def number(self, value: int) -> str:
        """An integer, now and then in a form ``json.loads`` reads as a float (the reference decides)."""
        rng = self.rng
        if not self.numbers:
            return str(value)
        if rng.random() < 0.9:
            return "-0" if value == 0 and rng.random() < 0.3 else str(value)
        return rng.choice([f"{value}.0", f"{value}e0", f"{value}E+0", f"{value * 10}e-1", f"{value}.000"])

    def document(self, value: Any) -> bytes:
        return (self.blank() + self.write(value) + self.blank()).encode("utf-8", "surrogatepass")


def plain(value: Any) -> Any:
    """What ``json.loads`` makes of a written value (a repeated key: its last value)."""
    if isinstance(value, Obj):
        return {key: plain(item) for key, item in value.pairs}
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, Raw):
        return json.loads(value.text)
    return value


# -- the usage shapes ------------------------------------------------------------------------------------------

#: Text as answers hold it: multi-byte UTF-8 (2, 3, 4 bytes), quotes, backslashes, control characters, decoys.
TEXTS = [
    "Hello!",
    "h\u00e9llo \u65e5\u672c \U0001f642",
    'say "usage": {"total_tokens": 9}',
    '{"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}',
    "C:\\path\\",
    "line\nbreak\r\n\ttab",
    '"model":"decoy"',
    "\u2028\u2029\x7f",
    "",
    '\\"usage\\"',
    "data: {}\n\n",
    'eval_count" "billed_units" "usageMetadata"',
]
MODELS = ["gpt-4o-2024-08-06", "claude-sonnet-4-5", "gemini-2.5-flash", "llama3.2", "command-r-plus", "grok-4"]


def text(rng: random.Random) -> str:
    return "".join(rng.choice(TEXTS) for _ in range(rng.randint(0, 2)))


def model(rng: random.Random) -> Any:
    """A model as answers give it; now and then one the rules drop (blank, too long, not a string, not printable)."""
    if rng.random() < 0.85:
        return rng.choice(MODELS)
    return rng.choice(["", " ", " gpt-4o ", "m" * 300, 5, None, ["gpt"], "\u3000gpt", "gpt\n", "mod\u00e8le"])


def count(rng: random.Random) -> Any:
    """A token count: mostly a valid one, else malformed (the rules count those as missing) or in another form."""
    if rng.random() < getattr(rng, "valid", 0.8):
        return rng.choice([0, 1, 7, 12, rng.randint(0, 5_000), rng.randint(0, 10**9), 10**9])
    return rng.choice(
        [
            -1,
            10**9 + 1,
            Raw("1e2"),
            Raw("7.0"),
            Raw("-0"),
            Raw("-0.0"),
            2.5,
            "7",
            "7.0",
            " 12 ",
            True,
            False,
            None,
            [],
            Obj(),
            Raw("1" + "0" * 30),
            Raw("NaN"),
            Raw("-Infinity"),
        ]
    )


def usage_of(counts: dict[str, Any]) -> Obj:
    """A usage object of ``counts`` (missing ones left out)."""
    return Obj(*counts.items())


def maybe(rng: random.Random, value: Any, missing: float = 0.15) -> Any:
    return _MISSING if rng.random() < missing else value


def openai_usage(rng: random.Random) -> Obj:
    prompt, completion = count(rng), count(rng)
    total: Any = prompt + completion if type(prompt) is int and type(completion) is int else count(rng)
    reasoning = count(rng)
    if rng.random() < 0.2 and type(total) is int and type(reasoning) is int:
        total += reasoning  # xAI's: reasoning counted apart from the completion
    elif rng.random() < 0.1:
        total = count(rng)
    counts = {
        "prompt_tokens": maybe(rng, prompt, 0.05),
        "completion_tokens": maybe(rng, completion, 0.1),
        "total_tokens": maybe(rng, total, 0.1),
        "prompt_tokens_details": maybe(rng, Obj(("cached_tokens", count(rng)), ("audio_tokens", 0)), 0.5),
        "completion_tokens_details": maybe(rng, Obj(("reasoning_tokens", reasoning), ("audio_tokens", 0)), 0.5),
    }
    if rng.random() < 0.15:  # LiteLLM relaying Claude: the cache counts next to prompt_tokens (which has them)
        counts["cache_creation_input_tokens"] = count(rng)
        counts["cache_read_input_tokens"] = count(rng)
    return usage_of(counts)


def responses_usage(rng: random.Random) -> Obj:
    given, made, reasoning = count(rng), count(rng), count(rng)
    total: Any = given + made if type(given) is int and type(made) is int else count(rng)
    if rng.random() < 0.2 and type(total) is int and type(reasoning) is int:
        total += reasoning
    return usage_of(
        {
            "input_tokens": maybe(rng, given, 0.05),
            "input_tokens_details": maybe(rng, Obj(("cached_tokens", count(rng))), 0.3),
            "output_tokens": maybe(rng, made, 0.05),
            "output_tokens_details": maybe(rng, Obj(("reasoning_tokens", reasoning)), 0.3),
            "total_tokens": maybe(rng, total, 0.2),
        },
    )


def anthropic_usage(rng: random.Random, *, iterations: bool = True) -> Obj:
    counts: dict[str, Any] = {
        "input_tokens": maybe(rng, count(rng), 0.05),
        "cache_creation_input_tokens": maybe(rng, count(rng), 0.4),
        "cache_read_input_tokens": maybe(rng, count(rng), 0.4),
        "output_tokens": maybe(rng, count(rng), 0.05),
        "service_tier": maybe(rng, "standard", 0.5),
        "server_tool_use": maybe(rng, Obj(("web_search_requests", 1)), 0.8),
    }
    if iterations and rng.random() < 0.2:
        entries = [
            Obj(
                ("type", rng.choice(["message", "compaction", "advisor_message"])),
                *usage_of(
                    {
                        "input_tokens": count(rng),
                        "output_tokens": count(rng),
                        "cache_read_input_tokens": maybe(rng, count(rng), 0.6),
                    },
                ).pairs,
            )
            for _ in range(rng.randint(0, 3))
        ]
        counts["iterations"] = entries if rng.random() < 0.9 else rng.choice([Obj(), 0, None])
    return usage_of(counts)


def gemini_usage(rng: random.Random) -> Obj:
    prompt, candidates, thoughts = count(rng), count(rng), maybe(rng, count(rng), 0.5)
    total: Any = count(rng)
    if all(type(value) is int for value in (prompt, candidates)):
        total = prompt + candidates + (thoughts if type(thoughts) is int else 0)
    real = getattr(rng, "realistic", False)  # (Gemini gives its prompt and total counts in every chunk)
    return usage_of(
        {
            "promptTokenCount": prompt if real else maybe(rng, prompt, 0.1),
            "candidatesTokenCount": maybe(rng, candidates, 0.2),
            "totalTokenCount": total if real else maybe(rng, total, 0.1),
            "thoughtsTokenCount": thoughts,
            "cachedContentTokenCount": maybe(rng, count(rng), 0.7),
            "toolUsePromptTokenCount": maybe(rng, count(rng), 0.8),
            "promptTokensDetails": maybe(rng, [Obj(("modality", "TEXT"), ("tokenCount", count(rng)))], 0.5),
        },
    )


def bedrock_usage(rng: random.Random) -> Obj:
    given, made = count(rng), count(rng)
    reads, writes = maybe(rng, count(rng), 0.5), maybe(rng, count(rng), 0.6)
    total: Any = count(rng)
    if type(given) is int and type(made) is int:
        total = given + made + sum(value for value in (reads, writes) if type(value) is int)
    return usage_of(
        {
            "inputTokens": maybe(rng, given, 0.05),
            "outputTokens": maybe(rng, made, 0.05),
            "totalTokens": maybe(rng, total, 0.1),
            "cacheReadInputTokens": reads,
            "cacheWriteInputTokens": writes,
        },
    )


def cohere_units(rng: random.Random) -> Obj:
    return usage_of({"input_tokens": maybe(rng, count(rng), 0.1), "output_tokens": maybe(rng, count(rng), 0.2)})


def cohere_usage(rng: random.Random) -> Obj:
    billed = cohere_units(rng) if rng.random() < 0.85 else Obj(("search_units", 1))
    return usage_of({"billed_units": maybe(rng, billed, 0.1), "tokens": maybe(rng, cohere_units(rng), 0.3)})


def decoy(rng: random.Random) -> tuple[str, Any]:
    """A member that is not the answer's usage: the word in a string, a key holding it, records each with a usage,
    a key ending in an escaped quote and "usage"."""
    return rng.choice(
        [
            ("metadata", Obj(("kind", "usage"))),
            ("usage_limit", count(rng)),
            ("usageCount", 3),
            ("note", text(rng) or 'the "usage": {"total_tokens": 5}'),
            ("data", [Obj(("day", 1), ("usage", openai_usage(rng))), Obj(("usage", anthropic_usage(rng)))]),
            ('say "usage', Obj(("total_tokens", 99))),
            ("tool", Obj(("input", Obj(("model", "decoy-model"), ("usage", openai_usage(rng)))))),
            ("x_meta", Obj(("usageMetadata", gemini_usage(rng))) if rng.random() < 0.5 else Obj()),
            ("eval_count", 5),
            ("billed_units", Obj(("input_tokens", 3))),
        ]
    )


def choices(rng: random.Random) -> list[Any]:
    message = Obj(("role", "assistant"), ("content", text(rng)), ("refusal", None))
    return [Obj(("index", 0), ("message", message), ("logprobs", None), ("finish_reason", "stop"))]


def openai_chat(rng: random.Random) -> Any:
    return Obj(
        ("id", f"chatcmpl-{rng.randrange(10**6)}"),
        ("object", "chat.completion"),
        ("created", 1741569952),
        ("model", model(rng)),
        ("choices", choices(rng)),
        ("usage", openai_usage(rng)),
        ("service_tier", "default"),
        ("system_fingerprint", "fp_6ec83003ad"),
    )


def openai_completion(rng: random.Random) -> Any:
    return Obj(
        ("id", "cmpl-1"),
        ("object", "text_completion"),
        ("model", model(rng)),
        ("choices", [Obj(("text", text(rng)), ("index", 0), ("finish_reason", "length"))]),
        ("usage", openai_usage(rng)),
    )


def openai_embeddings(rng: random.Random) -> Any:
    vectors = [Obj(("object", "embedding"), ("index", i), ("embedding", [0.25, -0.5, 1e-3])) for i in range(2)]
    prompt = count(rng)
    usage = Obj(("prompt_tokens", prompt), ("total_tokens", prompt if rng.random() < 0.9 else count(rng)))
    return Obj(("object", "list"), ("data", vectors), ("model", model(rng)), ("usage", usage))


def openai_responses(rng: random.Random) -> Any:
    output = [Obj(("type", "message"), ("content", [Obj(("type", "output_text"), ("text", text(rng)))]))]
    return Obj(
        ("id", f"resp_{rng.randrange(10**6)}"),
        ("object", "response"),
        ("status", "completed"),
        ("model", model(rng)),
        ("output", output),
        ("usage", responses_usage(rng)),
        ("user", None),
        ("metadata", Obj()),
    )


def anthropic_message(rng: random.Random) -> Any:
    return Obj(
        ("id", "msg_01"),
        ("type", "message"),
        ("role", "assistant"),
        ("model", model(rng)),
        ("content", [Obj(("type", "text"), ("text", text(rng)))]),
        ("stop_reason", "end_turn"),
        ("stop_sequence", None),
        ("usage", anthropic_usage(rng)),
    )


def cohere_v2(rng: random.Random) -> Any:
    message = Obj(("role", "assistant"), ("content", [Obj(("type", "text"), ("text", text(rng)))]))
    return Obj(("id", "c2"), ("finish_reason", "COMPLETE"), ("message", message), ("usage", cohere_usage(rng)))


def cohere_v1(rng: random.Random) -> Any:
    usage = cohere_usage(rng)
    if getattr(rng, "realistic", False) and usage.get("billed_units") is None:  # (Cohere's meta always has them)
        usage.pairs.insert(0, ("billed_units", cohere_units(rng)))
    meta = Obj(("api_version", Obj(("version", "1"))), *usage.pairs)
    return Obj(("text", text(rng)), ("generation_id", "g1"), ("meta", meta), ("response_type", "chat"))


def gemini(rng: random.Random, response_id: str | None = None, version: Any = _MISSING) -> Any:
    candidate = Obj(("content", Obj(("parts", [Obj(("text", text(rng)))]), ("role", "model"))), ("index", 0))
    return Obj(
        ("candidates", [candidate]),
        ("usageMetadata", gemini_usage(rng)),
        ("modelVersion", model(rng) if version is _MISSING else version),
        ("responseId", response_id if response_id is not None else f"r{rng.randrange(100)}"),
    )


def gemini_array(rng: random.Random) -> Any:
    """Gemini's streamed answer as one JSON array (streamGenerateContent without alt=sse), now and then with a chunk
    of another answer in it (a list of stored answers: not billed)."""
    ident, version = f"r{rng.randrange(3)}", model(rng)
    chunks = [gemini(rng, ident, version) for _ in range(rng.randint(1, 3))]
    if not getattr(rng, "realistic", False) and rng.random() < 0.1:
        chunks[rng.randrange(len(chunks))].pairs[-1] = ("responseId", "other")
    return chunks


def ollama(rng: random.Random) -> Any:
    head: list[tuple[str, Any]] = [("model", model(rng)), ("created_at", "2025-01-01T00:00:00Z")]
    if rng.random() < 0.3:  # /api/embed
        head.append(("embeddings", [[0.1, 0.2]]))
    else:
        head += [("message", Obj(("role", "assistant"), ("content", text(rng)))), ("done_reason", "stop")]
        head.append(("done", True if getattr(rng, "realistic", False) else rng.choice([True, True, False, "true"])))
    if rng.random() < 0.3:
        head.append(("context", [1, 2, 3]))
    return Obj(
        *head,
        ("total_duration", 5_043_500_667),
        ("load_duration", 5_025_959),
        ("prompt_eval_count", maybe(rng, count(rng), 0.1)),
        ("prompt_eval_duration", 325_953_000),
        ("eval_count", maybe(rng, count(rng), 0.1)),
        ("eval_duration", 4_709_213_000),
    )


def bedrock_converse(rng: random.Random) -> Any:
    message = Obj(("role", "assistant"), ("content", [Obj(("text", text(rng)))]))
    return Obj(
        ("output", Obj(("message", message))),
        ("stopReason", "end_turn"),
        ("usage", bedrock_usage(rng)),
        ("metrics", Obj(("latencyMs", 412))),
    )


def mixed(rng: random.Random) -> Any:
    """A gateway's or an app's mix of shapes under one ``usage``: the reference's rules decide."""
    pools = [openai_usage(rng), responses_usage(rng), anthropic_usage(rng), gemini_usage(rng), bedrock_usage(rng)]
    pools.append(cohere_usage(rng))
    pairs: list[tuple[str, Any]] = []
    for pool in rng.sample(pools, 2):
        pairs += rng.sample(pool.pairs, min(len(pool.pairs), rng.randint(1, 3)))
    return Obj(("model", model(rng)), ("usage", Obj(*pairs)))


def wrapped(rng: random.Random) -> Any:
    """Usage one level down, where the rules look for it in a stream event (``message``, ``response``, ``x_groq``,
    ``delta``): a JSON body's top-level usage only counts."""
    key = rng.choice(["message", "response", "x_groq", "delta"])
    return Obj(("type", "message_delta"), (key, Obj(("model", model(rng)), ("id", "x"), ("usage", openai_usage(rng)))))


def not_an_answer(rng: random.Random) -> Any:
    return rng.choice(
        [
            [Obj(("usage", openai_usage(rng)))],
            Obj(("model", "Model T"), ("price", 5)),
            "usage",
            7,
            None,
            Obj(("usage", rng.choice([None, [], 5, "usage", Obj()]))),
        ]
    )


SHAPES = {
    "openai-chat": openai_chat,
    "openai-completion": openai_completion,
    "openai-embeddings": openai_embeddings,
    "openai-responses": openai_responses,
    "anthropic": anthropic_message,
    "cohere-v2": cohere_v2,
    "cohere-v1": cohere_v1,
    "gemini": gemini,
    "gemini-array": gemini_array,
    "ollama": ollama,
    "bedrock-converse": bedrock_converse,
    "mixed": mixed,
    "wrapped": wrapped,
    "not-an-answer": not_an_answer,
}


_COUNT_KEY = re.compile(r"(?i)tokens?(count)?$")


def mangle(rng: random.Random, value: Any, *, layout: bool = False, decoys: bool = True) -> Any:
    """Members repeated (another value: the last one is read), decoys added (``decoys``), at any depth of the
    top-level object and its usage; unless ``layout`` (the provider's members in its order, decoys beside its usage
    object, not in it): members reordered and dropped too."""
    if not isinstance(value, Obj):
        return value
    pairs = list(value.pairs)
    if not layout and rng.random() < 0.3:
        rng.shuffle(pairs)
    if not layout and pairs and rng.random() < 0.1:
        del pairs[rng.randrange(len(pairs))]
    for key, item in list(pairs):
        if isinstance(item, Obj) and rng.random() < 0.3:
            inner = decoys and not (layout and key in ("usage", "usageMetadata", "meta"))
            pairs[pairs.index((key, item))] = (key, mangle(rng, item, layout=layout, decoys=inner))
    # a repeated key (with layout: the answer's usage and model, a count: what the reading over the cap looks for)
    repeatable = [key for key, _ in pairs if not layout or key in ("usage", "model") or _COUNT_KEY.search(key)]
    if repeatable and rng.random() < 0.15:
        key = rng.choice(repeatable)
        other = {"model": model(rng), "usage": openai_usage(rng)}.get(key, count(rng))
        pairs.insert(rng.randint(0, len(pairs)), (key, other))
    for _ in range(rng.choice([0, 0, 0, 1, 2]) if decoys else 0):
        pairs.insert(rng.randint(0, len(pairs)), decoy(rng))
    return Obj(*pairs)


def document(rng: random.Random) -> Any:
    value = rng.choice(list(SHAPES.values()))(rng)
    if isinstance(value, list):
        return [mangle(rng, item) if rng.random() < 0.2 else item for item in value]
    return mangle(rng, value) if rng.random() < 0.7 else value


def broken(rng: random.Random, body: bytes) -> bytes:
    """``body`` made invalid (or not: the reference decides), as a cut-off or corrupted answer may be."""
    kind = rng.randrange(9)
    at = rng.randrange(len(body) + 1)
    if kind == 0:
        return body[:at]
    if kind == 1:
        return body[:at] + bytes([rng.randrange(256)]) + body[at:]
    if kind == 2:
        return body[:at] + body[at + 1 :]
    if kind == 3:
        return body + rng.choice([b"x", b"}", b", {}", b"\x00", b"\n\n{}", b"\xef\xbb\xbf"])
    if kind == 4:
        return rng.choice([b"\xef\xbb\xbf", b" ", b"\r\n", b"\x0c", b"\xa0"]) + body
    if kind == 5:  # a string holding invalid UTF-8, or a lone surrogate written raw (surrogatepass decodes it)
        return body.replace(b'"', b'"\xff', 1) if rng.random() < 0.5 else body.replace(b'"', b'"\xed\xa0\x80', 1)
    if kind == 6:  # nested too deep for the scanner
        return b'{"usage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    if kind == 7:  # a number longer than Python reads (4,300 digits)
        return body.replace(b'"usage"', b'"n": ' + b"1" * 5_000 + b', "usage"', 1)
    return body.replace(b"}", b"", 1)


def random_body(rng: random.Random) -> bytes:
    writer = Writer(rng, blanks=rng.choice([0.0, 0.0, 0.3, 1.0]), escapes=rng.choice([0.0, 0.0, 0.05, 0.5]))
    body = writer.document(document(rng))
    return broken(rng, body) if rng.random() < 0.12 else body


# -- the reference ---------------------------------------------------------------------------------------------

#: The keys whose writing out lets a JSON body be parsed at all (the module's documented gate: a body without them
#: has no usage to parse; the same in both paths).
_GATE = (b'"usage"', b'"usageMetadata"', b'eval_count"', b'"billed_units"')


def reference_usage(body: bytes) -> Usage:
    """``json.loads`` of the whole body, then the general rules."""
    if not any(key in body for key in _GATE):
        return Usage()
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return Usage()
    return _payload_usage(payload)


def billed(usage: Usage) -> Billed:
    return usage.model, usage.input_tokens, usage.output_tokens, usage.total_tokens


def check_fast_path(body: bytes) -> bool:
    """Every entry of the fast path gives the reference's answer, or none (``None``); whether it answered."""
    expected = reference_usage(body)
    found = _fast_json_counts(body)
    if isinstance(found, tuple):
        assert found == billed(expected), body
    elif found is not None:
        assert found == expected, body
    else:
        assert body[:1] != b"{", body
    fast = _fast_json_usage(body)
    assert fast is None or fast == expected, body
    assert json_usage(body) == expected, body
    assert json_usage_counts(body) == billed(expected), body
    return found is not None


# -- 1. the fast JSON path ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_the_fast_json_path_answers_as_json_loads_and_the_general_rules(seed: int) -> None:
    """Random bodies of every usage shape, written every way JSON allows and broken now and then: the fast path's
    answer (when it gives one) is the reference's, and json_usage/json_usage_counts always are."""
    rng = random.Random(seed)
    answered = 0
    for _ in range(1_500):
        answered += check_fast_path(random_body(rng))
    assert answered > 600  # (the common shapes do take the fast path)


# -- 2. the recorder: bodies cut anywhere, encoded, over the cap ---------------------------------------------------

JSON_TYPE = b"application/json"
SSE_TYPE = b"text/event-stream"
NDJSON_TYPE = b"application/x-ndjson"
EVENTS_TYPE = b"application/vnd.amazon.eventstream"
BOM = b"\xef\xbb\xbf"
DEFAULT = AttributionConfig()


def _usable(name: str) -> bool:
    """Whether ``name`` (brotli, zstandard) can encode bodies here, and the module read them (brotli 1.2 or later)."""
    try:
        module = importlib.import_module(name)
        if name == "brotli":
            module.Decompressor().process(b"", output_buffer_limit=1)  # (TypeError before 1.2: not read)
    except Exception:
        return False
    return True


#: The encodings a body is sent in: gzip and deflate always, br and zstd with their module (not dependencies).
ENCODINGS = ["gzip", "deflate"] + (["br"] if _usable("brotli") else []) + (["zstd"] if _usable("zstandard") else [])


@pytest.fixture(autouse=True)
def _real_codecs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The br and zstd modules looked up afresh (another test may have left a stand-in in the cache)."""
    monkeypatch.setattr(_attribution, "_codecs", {})


def encode(rng: random.Random, data: bytes, encoding: str, pieces: list[bytes]) -> bytes:
    """``data`` encoded as a compression middleware may send it: one stream, or one member (frame) per piece (a
    proxy compressing each chunk on its own), raw deflate now and then."""
    apart = len(pieces) > 1 and rng.random() < 0.4
    if encoding == "gzip":
        if apart:
            return b"".join(gzip.compress(piece, mtime=0) for piece in pieces)
        return gzip.compress(data, compresslevel=rng.choice([1, 6, 9]), mtime=0)
    if encoding == "deflate":
        packer = zlib.compressobj(wbits=rng.choice([zlib.MAX_WBITS, -zlib.MAX_WBITS]))
        out = b"".join(packer.compress(piece) + packer.flush(zlib.Z_SYNC_FLUSH) for piece in pieces)
        return out + packer.flush()
    if encoding == "br":
        import brotli

        return bytes(brotli.compress(data))
    import zstandard

    packer = zstandard.ZstdCompressor()
    if apart:
        return b"".join(packer.compress(piece) for piece in pieces)
    return bytes(packer.compress(data))


def cut(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` in random pieces, cut now and then where it hurts: inside a multi-byte character, between ``\\r`` and
    ``\\n``, inside a ``data:`` field name or the byte-order mark; or one byte a piece."""
    if len(data) < 2:
        return [data]
    if len(data) < 3_000 and rng.random() < 0.05:
        return [data[at : at + 1] for at in range(len(data))]
    tender = [match.start() for match in re.finditer(rb"[\x80-\xbf]|(?<=\r)\n", data[:200_000])]
    tender += [match.start() + k for match in re.finditer(rb"data:", data[:200_000]) for k in range(1, 6)]
    points: set[int] = set()
    for _ in range(rng.randint(1, 10)):
        points.add(rng.choice(tender) if tender and rng.random() < 0.6 else rng.randrange(1, len(data)))
    ordered = sorted(point for point in points if 0 < point < len(data))
    return [data[a:b] for a, b in zip([0, *ordered], [*ordered, len(data)], strict=True)]


def recorded(
    content_type: bytes,
    pieces: list[bytes],
    config: AttributionConfig = DEFAULT,
    *,
    encoding: str | None = None,
    length: int | None = None,
    deferred: bool = False,
) -> Usage:
    """The usage a recorder reads from a body delivered in ``pieces`` (``deferred``: the middleware's way, the JSON
    body read by json_usage later)."""
    headers = [(b"content-type", content_type)]
    if encoding is not None:
        headers.append((b"content-encoding", encoding.encode()))
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    recorder = UsageRecorder({"type": "http"}, config)
    recorder.response_start({"type": "http.response.start", "status": 200, "headers": headers})
    for piece in pieces:
        recorder.response_body(piece)
    if deferred:
        found = recorder.deferred()
        return json_usage(found) if isinstance(found, bytes) else found
    return recorder.result()


def every_way(
    rng: random.Random, content_type: bytes, data: bytes, config: AttributionConfig = DEFAULT, *, tries: int = 3
) -> Iterator[tuple[str, Usage]]:
    """The usage read from ``data`` in one piece, in random pieces, deferred, and encoded in random pieces (within
    the inflation budget); with what was done."""
    yield "whole", recorded(content_type, [data], config)
    for _ in range(tries):
        pieces = cut(rng, data)
        yield (
            f"cut {[len(piece) for piece in pieces]}",
            recorded(content_type, pieces, config, deferred=rng.random() < 0.5),
        )
    if len(data) * 2 < config.max_body_bytes * 64:  # (a bomb's budget: 64 times the cap a chunk)
        encoding = rng.choice(ENCODINGS)
        packed = encode(rng, data, encoding, cut(rng, data))
        pieces = cut(rng, packed)
        yield (
            f"{encoding} {[len(piece) for piece in pieces]}",
            recorded(
                content_type, pieces, config, encoding=encoding, length=len(packed) if rng.random() < 0.3 else None
            ),
        )


@pytest.mark.parametrize("seed", SEEDS)
def test_json_bodies_under_the_cap_read_the_same_however_cut_and_encoded(seed: int) -> None:
    """A JSON body of any shape (broken now and then) under the cap, in one piece, cut at random offsets, read later
    (deferred), gzip/deflate/br/zstd-encoded and cut: the reference's usage, each time."""
    rng = random.Random(seed)
    for _ in range(120):
        body = random_body(rng)
        expected = reference_usage(body)
        for how, usage in every_way(rng, JSON_TYPE, body):
            assert usage == expected, (how, body)


#: The member that holds the counts, in each shape an answer over the cap is read from its ends.
CLOSING_KEYS = ("usage", "usageMetadata", "meta", "total_duration")
#: The shapes whose usage closes the document (nothing, or a few small members, after it).
CLOSED_SHAPES = [
    openai_chat,
    openai_completion,
    openai_embeddings,
    openai_responses,
    anthropic_message,
    cohere_v1,
    cohere_v2,
    gemini,
    ollama,
    bedrock_converse,
]


def padding(rng: random.Random) -> Any:
    """What makes an answer large: vectors, an image's base64, a context's token ids, a long text."""
    size = rng.choice([50, 400, 3_000, 20_000, 40_000])
    return rng.choice(
        [
            [[0.015625, -0.5] * 4 for _ in range(size // 80 + 1)],
            "iVBORw0KGgo" * (size // 11 + 1),
            list(range(size // 6 + 1)),
            TEXTS[1] * (size // 16 + 1),
        ]
    )


def padded(rng: random.Random, value: Any, *, before_usage: bool) -> Any:
    """``value`` with a large member: before its counts (kept: they close the document), or anywhere."""
    if isinstance(value, list):  # Gemini's chunks: the first one's text made large
        value[0].pairs.insert(0, ("pad", padding(rng)))
        return value
    keys = [key for key, _ in value.pairs]
    end = next((keys.index(key) for key in CLOSING_KEYS if key in keys), len(keys))
    start = 1 if "total_duration" in keys else 0  # (Ollama's model is its first member, its only one read)
    value.pairs.insert(rng.randint(start, end) if before_usage else rng.randint(0, len(keys)), ("pad", padding(rng)))
    return value


def over_the_cap(rng: random.Random, body: bytes) -> AttributionConfig:
    return AttributionConfig(max_body_bytes=rng.randint(min(64, len(body) - 1), len(body) - 1))


@pytest.mark.parametrize("seed", SEEDS)
def test_json_bodies_over_the_cap_read_the_usage_closing_them_as_whole(seed: int) -> None:
    """An answer over max_body_bytes whose counts close it (and its model among its first members or before its
    counts), of every shape read so, written every way, cut anywhere, encoded: the usage read whole."""
    rng = Rng(seed)
    rng.realistic, rng.valid = True, 1.0
    for _ in range(40):
        shape = rng.choice([*CLOSED_SHAPES, gemini_array])
        # (Ollama's counts are read over the cap as Ollama writes them: integers)
        writer = Writer(rng, blanks=rng.choice([0.0, 0.3, 1.0]), escapes=0.0, numbers=shape is not ollama)
        body = writer.document(padded(rng, shape(rng), before_usage=True))
        config = over_the_cap(rng, body)
        expected = reference_usage(body)
        for how, usage in every_way(rng, JSON_TYPE, body, config, tries=2):
            assert usage == expected, (how, config.max_body_bytes, body[:300], body[-600:])
        assert recorded(JSON_TYPE, cut(rng, body), config, length=len(body)) == expected


@pytest.mark.parametrize("seed", SEEDS)
def test_json_bodies_over_the_cap_never_read_a_usage_the_document_does_not_have(seed: int) -> None:
    """Any answer over the cap, its members in its provider's order but dropped, repeated, malformed, with decoys
    anywhere (usages nested in records and tool inputs, the word in strings, a key ending in an escaped quote and
    "usage"), its large member anywhere: the usage read whole, or none; the same however cut and encoded."""
    rng = Rng(seed)
    rng.realistic = True
    for _ in range(60):
        value = rng.choice([*CLOSED_SHAPES, gemini_array, mixed, wrapped])(rng)
        if isinstance(value, list):
            value = [mangle(rng, item, layout=True) for item in value]
        else:
            value = mangle(rng, value, layout=True)
        writer = Writer(rng, blanks=rng.choice([0.0, 0.3, 1.0]), escapes=rng.choice([0.0, 0.05]), keys=False)
        body = writer.document(padded(rng, value, before_usage=False))
        config = over_the_cap(rng, body)
        expected = reference_usage(body)
        # (over the cap the body is not kept: whether it names a usage key is not known, its document is read by the
        # rules; the usage of json.loads and the rules is the reference all the same)
        allowed = [expected, _payload_usage(plain(value)), Usage()]
        # A model repeated (json.loads keeps the last): any of them, as its first bytes or last ones show it
        models = {usage.model for usage in allowed} | {
            item.strip()
            for chunk in (value if isinstance(value, list) else [value])
            for key, item in chunk.pairs
            if key in ("model", "modelVersion") and isinstance(item, str)
        }
        results = dict(every_way(rng, JSON_TYPE, body, config, tries=2))
        first = results["whole"]
        assert all(usage == first for usage in results.values()), (results, body[-600:])
        assert billed(first)[1:] in [billed(usage)[1:] for usage in allowed], (first, expected, body[-700:])
        assert first.model in models, (first, expected, body[:300], body[-700:])


# -- streams: SSE, newline-delimited JSON, AWS event streams -----------------------------------------------------

#: A stream's events: (event type or None, the data: a value written as JSON, or text such as "[DONE]").
Events = list[tuple["str | None", Any]]


def openai_chat_stream(rng: Rng) -> Events:
    """Chat completion chunks (``include_usage``: the last one with the usage, the others with ``"usage": null``),
    Groq's ``x_groq``, Azure's blank first model; now and then two completions (a tool loop relayed)."""
    events: Events = []
    for call in range(rng.choice([1, 1, 2])):
        ident, name = f"chatcmpl-{call}{rng.randrange(1000)}", model(rng)
        head = [("id", ident), ("object", "chat.completion.chunk"), ("created", 1741569952)]
        if rng.random() < 0.2:
            events.append((None, Obj(*head, ("model", ""), ("choices", []), ("prompt_filter_results", []))))
        for index in range(rng.randint(1, 4)):
            delta = Obj(("role", "assistant"), ("content", text(rng))) if index == 0 else Obj(("content", text(rng)))
            choice = Obj(("index", 0), ("delta", delta), ("finish_reason", None))
            events.append((None, Obj(*head, ("model", name), ("choices", [choice]), ("usage", None))))
        usage = openai_usage(rng)
        if rng.random() < 0.2:  # Groq's
            events.append(
                (None, Obj(*head, ("model", name), ("choices", []), ("x_groq", Obj(("id", "req_1"), ("usage", usage)))))
            )
        else:
            events.append((None, Obj(*head, ("model", name), ("choices", []), ("usage", usage))))
    events.append((None, "[DONE]"))
    return events


def responses_stream(rng: Rng) -> Events:
    """The Responses API's events: ``response.created`` (its model, no usage yet), text deltas, and
    ``response.completed`` (or ``incomplete``) with the usage."""
    ident, name = f"resp_{rng.randrange(1000)}", model(rng)
    created = Obj(("id", ident), ("object", "response"), ("status", "in_progress"), ("model", name), ("usage", None))
    events: Events = [
        ("response.created", Obj(("type", "response.created"), ("sequence_number", 0), ("response", created)))
    ]
    for number in range(rng.randint(1, 4)):
        delta = Obj(("type", "response.output_text.delta"), ("sequence_number", number + 1), ("delta", text(rng)))
        events.append(("response.output_text.delta", delta))
    status = rng.choice(["completed", "completed", "incomplete"])
    done = Obj(
        ("id", ident), ("object", "response"), ("status", status), ("model", name), ("usage", responses_usage(rng))
    )
    events.append((f"response.{status}", Obj(("type", f"response.{status}"), ("response", done))))
    return events


def anthropic_stream(rng: Rng, calls: int = 0) -> Events:
    """Messages API events: ``message_start`` (input counts), deltas, ``ping``, ``message_delta`` (cumulative
    output counts, gateways' zero placeholders), ``message_stop``; now and then two messages (a tool loop)."""
    events: Events = []
    for call in range(calls or rng.choice([1, 1, 2])):
        start_usage = anthropic_usage(rng, iterations=False)
        message = Obj(
            ("id", f"msg_{call}"),
            ("type", "message"),
            ("role", "assistant"),
            ("model", model(rng)),
            ("content", []),
            ("usage", start_usage),
        )
        events.append(("message_start", Obj(("type", "message_start"), ("message", message))))
        events.append(("ping", Obj(("type", "ping"))))
        for _ in range(rng.randint(1, 3)):
            delta = Obj(
                ("type", "content_block_delta"),
                ("index", 0),
                ("delta", Obj(("type", "text_delta"), ("text", text(rng)))),
            )
            events.append(("content_block_delta", delta))
        final = Obj(("output_tokens", count(rng)))
        if rng.random() < 0.3:  # a gateway translating to Anthropic's stream: zeros for what message_start gave
            final = Obj(
                ("input_tokens", 0), ("cache_creation_input_tokens", 0), ("cache_read_input_tokens", 0), *final.pairs
            )
        delta = Obj(("type", "message_delta"), ("delta", Obj(("stop_reason", "end_turn"))), ("usage", final))
        events.append(("message_delta", delta))
        events.append(("message_stop", Obj(("type", "message_stop"))))
    return events


def gemini_stream(rng: Rng) -> Events:
    """Gemini's ``alt=sse`` chunks of one answer, each with its cumulative usage."""
    ident, version = f"r{rng.randrange(100)}", model(rng)
    return [(None, gemini(rng, ident, version)) for _ in range(rng.randint(1, 4))]


def cohere_stream(rng: Rng) -> Events:
    """Cohere's v2 Chat stream: its usage in ``message-end``'s delta."""
    events: Events = [
        (
            "message-start",
            Obj(("type", "message-start"), ("id", "c1"), ("delta", Obj(("message", Obj(("role", "assistant")))))),
        )
    ]
    for _ in range(rng.randint(1, 3)):
        events.append(
            (
                "content-delta",
                Obj(
                    ("type", "content-delta"),
                    ("index", 0),
                    ("delta", Obj(("message", Obj(("content", Obj(("text", text(rng)))))))),
                ),
            )
        )
    end = Obj(("type", "message-end"), ("delta", Obj(("finish_reason", "COMPLETE"), ("usage", cohere_usage(rng)))))
    events.append(("message-end", end))
    return events


def image_event(rng: Rng) -> tuple[str, Any]:
    """An event whose data are large: a streamed image's base64, the usage after it (the Images API's
    ``image_generation.completed``); or a large output item without a usage."""
    image = "iVBORw0KGgo" * rng.choice([100, 1_000, 3_000])
    if rng.random() < 0.5:
        return "response.output_item.done", Obj(
            ("type", "response.output_item.done"), ("item", Obj(("type", "image_generation_call"), ("result", image)))
        )
    usage = Obj(
        ("total_tokens", 0),
        ("input_tokens", count(rng)),
        ("output_tokens", count(rng)),
        ("input_tokens_details", Obj(("text_tokens", 10), ("image_tokens", 0))),
    )
    if all(type(usage.get(key)) is int for key in ("input_tokens", "output_tokens")):
        usage.pairs[0] = ("total_tokens", usage.get("input_tokens") + usage.get("output_tokens"))
    return "image_generation.completed", Obj(
        ("type", "image_generation.completed"), ("b64_json", image), ("created_at", 1), ("usage", usage)
    )


SSE_STREAMS = [openai_chat_stream, responses_stream, anthropic_stream, gemini_stream, cohere_stream]


def sse_stream(rng: Rng, events: Events, *, lines: bool = True) -> bytes:
    """``events`` written as an SSE server may: LF, CRLF or CR line ends (mixed now and then), ``data:`` with or
    without its space, comments, ``id:``/``retry:``/``event:`` fields, JSON spread over several data lines (``lines``:
    its blanks may be line ends), a byte-order mark, the last blank line (or line end) missing."""
    writer = Writer(rng, blanks=rng.choice([0.0, 0.2]), escapes=rng.choice([0.0, 0.05]), keys=False, lines=lines)
    newlines = [rng.choice([b"\n", b"\r\n", b"\r"])] if rng.random() < 0.7 else [b"\n", b"\r\n", b"\r"]
    space = rng.choice([b" ", b""])
    written_lines: list[bytes] = []
    for name, data in events:
        if rng.random() < 0.15:
            written_lines.append(rng.choice([b": ping", b":", b"id: 7", b"retry: 3000"]))
        if name is not None and rng.random() < 0.9:
            written_lines.append(b"event:" + space + name.encode())
        written = data.encode() if isinstance(data, str) else writer.write(data).encode("utf-8", "surrogatepass")
        written_lines += [b"data:" + space + part for part in re.split(rb"\r\n|\r|\n", written)]
        written_lines.append(b"")
    out, previous = [BOM] if rng.random() < 0.2 else [], b""
    for line in written_lines:
        newline = rng.choice(newlines)
        if previous == b"\r" and not line and newline == b"\n":  # (\r then \n is one line end)
            newline = b"\r"
        out.append(line + newline)
        previous = newline
    stream = b"".join(out)
    if rng.random() < 0.15:  # cut before its last blank line, or its last line end
        stream = stream.rstrip(b"\r\n") + (b"\n" if rng.random() < 0.5 else b"")
    return stream


def sse_data(stream: bytes) -> list[list[bytes]]:
    """The data lines of each event of a stream, by the SSE rules (a byte-order mark dropped; lines ending with CRLF,
    LF or CR; comments skipped; one space after the colon dropped; a blank line ends an event; what is left at the
    end is an event too, as the module documents)."""
    if stream.startswith(BOM):
        stream = stream[3:]
    events, data = [], []
    for line in [*re.split(rb"\r\n|\r|\n", stream), b""]:
        if not line:
            if data:
                events.append(data)
            data = []
            continue
        field, _, value = line.partition(b":")
        if field == b"data":
            data.append(value[1:] if value[:1] == b" " else value)
    return events


def sse_reference(stream: bytes) -> Usage:
    """The stream parsed whole (:func:`sse_data`), each event's data lines joined by LF, read by json.loads and the
    rules."""
    counts = _Counts()
    for data in sse_data(stream):
        try:
            _collect(json.loads(b"\n".join(data)), counts)
        except ValueError:
            pass
    return _merge((("explicit", {}), ("headers", {}), ("sse", _resolve_counts(counts, "sse", model_needs_usage=False))))


@pytest.mark.parametrize("seed", SEEDS)
def test_sse_streams_read_as_their_reference_parse_however_cut_and_encoded(seed: int) -> None:
    """Every provider's SSE stream, framed every way SSE allows, cut at random offsets (inside characters, CRLF,
    ``data:``, the byte-order mark), gzip/deflate/br/zstd-encoded: the usage of the stream parsed whole."""
    rng = Rng(seed)
    for _ in range(40):
        events = rng.choice(SSE_STREAMS)(rng)
        stream = sse_stream(rng, events)
        expected = sse_reference(stream)
        for how, usage in every_way(rng, SSE_TYPE, stream):
            assert usage == expected, (how, stream)


@pytest.mark.parametrize("seed", SEEDS)
def test_sse_events_over_the_cap_are_dropped_but_a_usage_closing_them_is_read(seed: int) -> None:
    """A stream with events larger than the cap (an image's base64, its usage after it): those are dropped, a usage
    closing one is read, the others count as whole; the same however cut. No other usage is read."""
    rng = Rng(seed)
    for _ in range(30):
        events = rng.choice(SSE_STREAMS)(rng)
        big = [image_event(rng) for _ in range(rng.randint(1, 2))]
        for item in big:
            events.insert(rng.randint(0, len(events)), item)
        stream = sse_stream(rng, events)
        expected = sse_reference(stream)
        # the cap: over the large events, under the others (an event is over it by its data and their line ends)
        events_data = sse_data(stream)
        sizes = [sum(len(line) + 1 for line in data) for data in events_data]
        small = max(
            (size for size, data in zip(sizes, events_data, strict=True) if b"iVBORw0KGgo" not in b"".join(data)),
            default=0,
        )
        config = AttributionConfig(max_body_bytes=rng.randint(small, small + 100))
        assert any(size > config.max_body_bytes for size in sizes)
        results = dict(every_way(rng, SSE_TYPE, stream, config))
        assert all(usage == expected for usage in results.values()), (results, expected, stream[:3000])


def ollama_lines(rng: Rng) -> tuple[list[Any], Any]:
    """Ollama's /api/chat or /api/generate stream (its last line with the counts, a generation's ``context``
    before them), now and then records that are not its answer (an export's); and its last line."""
    name = model(rng)
    lines: list[Any] = []
    for _ in range(rng.randint(0, 3)):
        lines.append(
            Obj(
                ("model", name),
                ("created_at", "2025-01-01T00:00:00Z"),
                ("message", Obj(("role", "assistant"), ("content", text(rng)))),
                ("done", False),
            )
        )
        if rng.random() < 0.2:
            lines.append(
                rng.choice(
                    [
                        Obj(("id", 1), ("usage", openai_usage(rng))),
                        Obj(("status", "done"), ("eval_count", 5)),
                        Obj(("done", True), ("eval_count", 9)),
                    ]
                )
            )
    last = Obj(
        ("model", name),
        ("created_at", "2025-01-01T00:00:00Z"),
        ("message", Obj(("role", "assistant"), ("content", ""))),
        ("done_reason", "stop"),
        ("done", True),
        *([("context", list(range(rng.choice([3, 300, 3_000]))))] if rng.random() < 0.5 else []),
        ("total_duration", 5_043_500_667),
        ("load_duration", 5_025_959),
        ("prompt_eval_count", count(rng)),
        ("prompt_eval_duration", 325_953_000),
        ("eval_count", count(rng)),
        ("eval_duration", 4_709_213_000),
    )
    lines.append(last)
    return lines, last


def ndjson_stream(rng: Rng, documents: list[Any], *, numbers: bool = True) -> bytes:
    """``documents`` one a line, as a server may write them (any line end, blank lines, a byte-order mark, the last
    line end missing); ``numbers``: in any JSON form (else as Ollama writes them, integers)."""
    blanks, escapes = rng.choice([0.0, 0.3]), rng.choice([0.0, 0.05])
    writer = Writer(rng, blanks=blanks, escapes=escapes, lines=False, keys=False, numbers=numbers)
    newline = rng.choice([b"\n", b"\r\n", b"\r"])
    out = [BOM] if rng.random() < 0.2 else []
    for document in documents:
        out.append(writer.write(document).encode("utf-8", "surrogatepass") + newline)
        if rng.random() < 0.1:
            out.append(newline)  # a blank line
    stream = b"".join(out)
    return stream.rstrip(b"\r\n") if rng.random() < 0.2 else stream


def ndjson_reference(stream: bytes) -> Usage:
    """Each line parsed whole by json.loads, Ollama's own (a string model, a "done") read by the rules."""
    counts = _Counts()
    for line in re.split(rb"\r\n|\r|\n", stream.removeprefix(BOM)):
        try:
            payload = json.loads(line)
        except ValueError:
            continue
        if isinstance(payload, dict) and type(payload.get("model")) is str and "done" in payload:
            counts.answer = True
            _collect(payload, counts)
    return _merge((("explicit", {}), ("headers", {}), ("sse", _resolve_counts(counts, "sse", model_needs_usage=False))))


@pytest.mark.parametrize("seed", SEEDS)
def test_ndjson_streams_read_as_their_reference_parse_however_cut_encoded_and_capped(seed: int) -> None:
    """Ollama's newline-delimited JSON, any line end, a byte-order mark, records that are not its answer, cut at
    random offsets and encoded: the usage of its lines parsed whole; with a cap under its last line (a long
    context), its counts read from that line's end all the same (written as Ollama writes them)."""
    rng = Rng(seed)
    for _ in range(40):
        documents, last = ollama_lines(rng)
        stream = ndjson_stream(rng, documents)
        expected = ndjson_reference(stream)
        for how, usage in every_way(rng, NDJSON_TYPE, stream):
            assert usage == expected, (how, stream)
        if last.get("context") is None or not all(
            type(last.get(key)) is int for key in ("prompt_eval_count", "eval_count")
        ):
            continue
        stream = ndjson_stream(rng, documents, numbers=False)
        expected = ndjson_reference(stream)
        lines = stream.removeprefix(BOM).splitlines()
        # (a cap of 400 bytes at least: a line over it cut before its model ends, with the model its first member,
        # was dropped with its counts)
        low = max((len(line) + 1 for line in lines[:-1]), default=400)
        if max(low, 400) >= len(lines[-1]):
            continue
        config = AttributionConfig(max_body_bytes=rng.randint(max(low, 400), len(lines[-1]) - 1))
        for how, usage in every_way(rng, NDJSON_TYPE, stream, config):
            assert usage == expected, (how, config.max_body_bytes, stream[-400:])


def converse_frames(rng: Rng) -> tuple[list[bytes], Billed | None]:
    """ConverseStream's frames, one or two calls (a tool loop relayed), each ending with its ``metadata`` usage;
    what it bills when its counts are valid."""
    writer = Writer(rng, blanks=rng.choice([0.0, 0.3]), escapes=rng.choice([0.0, 0.05]), keys=False)
    frames: list[bytes] = []
    calls: list[Obj] = []
    for _ in range(rng.choice([1, 1, 2])):
        frames.append(frame("messageStart", writer.write(Obj(("p", "abcd"), ("role", "assistant"))).encode()))
        for _ in range(rng.randint(1, 3)):
            delta = Obj(("contentBlockIndex", 0), ("delta", Obj(("text", text(rng)))), ("p", "ab"))
            frames.append(frame("contentBlockDelta", writer.write(delta).encode("utf-8", "surrogatepass")))
        frames.append(frame("messageStop", writer.write(Obj(("p", "ab"), ("stopReason", "end_turn"))).encode()))
        usage = bedrock_usage(rng)
        calls.append(usage)
        frames.append(
            frame("metadata", writer.write(Obj(("metrics", Obj(("latencyMs", 412))), ("usage", usage))).encode())
        )
    if rng.random() < 0.2:  # a frame whose message CRC does not match: skipped
        broken_frame = bytearray(frame("metadata", b'{"usage":{"inputTokens":5000,"outputTokens":5000}}'))
        broken_frame[-1] ^= 0xFF
        frames.insert(rng.randrange(len(frames) + 1), bytes(broken_frame))
    if rng.random() < 0.2:
        frames.insert(
            rng.randrange(len(frames) + 1), frame("throttlingException", b'{"message":"slow down"}', "exception")
        )
    keys = ("inputTokens", "cacheReadInputTokens", "cacheWriteInputTokens", "outputTokens", "totalTokens")
    if not all(
        type(call.get(key)) is int and 0 <= call.get(key) <= 10**9
        for call in calls
        for key in keys
        if call.get(key) is not None
    ) or any(call.get("inputTokens") is None for call in calls):
        return frames, None  # (malformed counts, or no input count as Bedrock always gives: what one piece bills)
    inputs = sum(sum(call.get(key) or 0 for key in keys[:3]) for call in calls)
    outputs = sum(call.get("outputTokens") or 0 for call in calls)
    total = (
        calls[0].get("totalTokens") if len(calls) == 1 and calls[0].get("totalTokens") is not None else inputs + outputs
    )
    return frames, (None, inputs, outputs, total)


def invoke_frames(rng: Rng) -> tuple[list[bytes], Billed | None]:
    """InvokeModelWithResponseStream's chunks of Claude's events (base64), the last with Bedrock's invocation
    metrics (which replace the counts the events gave); what it bills."""
    events = [event for event in anthropic_stream(rng, calls=1) if event[0] != "ping"]
    given, made = rng.randint(0, 5_000), rng.randint(0, 5_000)
    metrics = Obj(
        ("inputTokenCount", given), ("outputTokenCount", made), ("invocationLatency", 500), ("firstByteLatency", 100)
    )
    frames = []
    writer = Writer(rng, blanks=rng.choice([0.0, 0.3]), escapes=rng.choice([0.0, 0.05]), keys=False)
    for index, (_, event) in enumerate(events):
        if index == len(events) - 1:
            event = Obj(*event.pairs, ("amazon-bedrock-invocationMetrics", metrics))
        encoded = base64.b64encode(writer.write(event).encode("utf-8", "surrogatepass")).decode()
        frames.append(frame("chunk", writer.write(Obj(("bytes", encoded), ("p", "abcdefgh"))).encode()))
    name = events[0][1].get("message").get("model")
    name = (
        name.strip()
        if isinstance(name, str) and name.strip() and name.strip().isprintable() and len(name.strip()) <= 255
        else None
    )
    return frames, (name, given, made, given + made)


@pytest.mark.parametrize("seed", SEEDS)
def test_aws_event_streams_read_the_same_however_cut_and_encoded(seed: int) -> None:
    """Bedrock's ConverseStream and InvokeModelWithResponseStream frames (a corrupt frame, an exception among them),
    cut at random offsets (inside a prelude, a header, a CRC) and encoded: what one piece bills, each time; and
    what their counts make when valid."""
    rng = Rng(seed)
    for _ in range(40):
        frames, truth = rng.choice([converse_frames, invoke_frames])(rng)
        stream = b"".join(frames)
        whole = recorded(EVENTS_TYPE, [stream])
        if truth is not None:
            assert billed(whole) == truth, stream
        for how, usage in every_way(rng, EVENTS_TYPE, stream):
            assert usage == whole, how


# -- named regression cases (found by the seeds above) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "billed_whole"),
    [
        # Cohere's billed units next to a top-level count (a gateway's): the units are billed, as the rules say
        pytest.param(
            b'{"model":"command-r-plus","usage":{"billed_units":{"input_tokens":3},"output_tokens":12}}',
            ("command-r-plus", 3, 0, 3),
            id="cohere-units-beside-output_tokens",
        ),
        pytest.param(
            b'{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":0,"total_tokens":1,'
            b'"tokens":{"input_tokens":40,"output_tokens":2}}}',
            ("m", 40, 2, 42),
            id="cohere-tokens-beside-openai-counts",
        ),
        # No input count, Bedrock's or Gemini's camelCase counts beside an output_tokens: those are read
        pytest.param(
            b'{"model":"m","usage":{"output_tokens":3,"inputTokens":10,"outputTokens":4,"totalTokens":14}}',
            ("m", 10, 4, 14),
            id="bedrock-counts-beside-output_tokens",
        ),
        pytest.param(
            b'{"model":"m","usage":{"completion_tokens":3,"promptTokenCount":5,"candidatesTokenCount":2,'
            b'"totalTokenCount":7}}',
            ("m", 5, 2, 7),
            id="gemini-counts-beside-completion_tokens",
        ),
        pytest.param(
            b'{"model":"m","usage":{"prompt_tokens":null,"output_tokens":3,"inputTokens":10}}',
            ("m", 10, 0, 10),
            id="null-prompt_tokens-beside-inputTokens",
        ),
    ],
)
def test_the_fast_path_leaves_cohere_units_and_camel_case_counts_to_the_rules(
    body: bytes, billed_whole: Billed
) -> None:
    """A usage with Cohere's units, or without an input count beside Bedrock's or Gemini's counts, is billed by the
    general rules: the fast path billed its top-level counts alone (``(m, 0, 3, 3)`` for Bedrock's 10 input, 4
    output tokens), while json.loads and the rules bill the units, the camelCase counts."""
    assert billed(reference_usage(body)) == billed_whole
    assert check_fast_path(body) is True
    assert billed(recorded(JSON_TYPE, [body])) == billed_whole


def test_a_key_ending_in_an_escaped_quote_and_usage_is_not_the_usage_over_the_cap() -> None:
    """A JSON answer over the cap closing with a member whose key ends with ``\\"usage`` (a phrase's counts: ``"the
    word \\"usage": {...}``): that member is not a usage. The text from its escaped quote on reads as a member
    "usage" closing the document: its total of 99 was billed, instead of the answer's usage before it (or of none)."""
    capped = AttributionConfig(max_body_bytes=1_000)
    usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    phrase = {"total_tokens": 99}
    answer = json.dumps({"model": "gpt-4o", "data": ["x" * 3_000], "usage": usage, 'the word "usage': phrase})
    body = answer.encode()
    assert body.endswith(b'"usage": {"total_tokens": 99}}')
    assert billed(reference_usage(body)) == ("gpt-4o", 7, 5, 12)
    assert recorded(JSON_TYPE, [body], capped) == reference_usage(body)
    report = json.dumps({"model": "gpt-4o", "data": ["x" * 3_000], 'the word "usage': phrase}).encode()
    assert reference_usage(report) == Usage()
    assert recorded(JSON_TYPE, [report], capped) == Usage()
    # the same in a stream event over the cap: its usage read from its last bytes, not the phrase's counts
    event = {"type": "image_generation.completed", "b64_json": "x" * 3_000, "usage": usage, 'the word "usage': phrase}
    stream = b"data: " + json.dumps(event).encode() + b"\n\n"
    assert recorded(SSE_TYPE, [stream], capped) == sse_reference(stream) == Usage(None, 7, 5, 12, "sse")


def test_a_pretty_printed_sse_event_over_the_cap_has_its_closing_usage_read() -> None:
    """An SSE event over the cap whose JSON is spread over several data lines (an app pretty-printing its events,
    sse-starlette writing one ``data:`` line per line): its usage, closing it over several lines, is read as one on
    a single line is. Only the line that went over the cap was looked at: its usage, on the lines after, was not."""
    event = {"type": "image_generation.completed", "b64_json": "iVBORw0KGgo" * 200, "created_at": 1}
    event["usage"] = {"input_tokens": 10, "output_tokens": 20, "total_tokens": 30}
    capped = AttributionConfig(max_body_bytes=1_000)
    for text in (json.dumps(event), json.dumps(event, indent=2)):
        lines = b"".join(b"data: " + line.encode() + b"\n" for line in text.split("\n"))
        stream = b"event: image_generation.completed\n" + lines + b"\n"
        assert sse_reference(stream) == Usage(None, 10, 20, 30, "sse")
        for pieces in ([stream], [stream[:50], stream[50:]], [stream[: len(stream) // 2], stream[len(stream) // 2 :]]):
            assert recorded(SSE_TYPE, pieces, capped) == Usage(None, 10, 20, 30, "sse"), text[:40]
        assert recorded(SSE_TYPE, [stream[:-1]], capped) == Usage(None, 10, 20, 30, "sse")  # (cut before its end)
