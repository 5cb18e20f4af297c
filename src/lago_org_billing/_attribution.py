"""What a request consumed: model and LLM tokens, read from the endpoint, the response headers or the body.

Sources, highest priority first, merged field by field (a field a higher source leaves out is filled from the
next one):

1. ``attribute_usage(request, model=..., input_tokens=..., ...)`` called by the endpoint;
2. response headers (:class:`AttributionConfig`, e.g. ``X-Tokens-Used``, ``X-Model``);
3. the response body: a JSON body (OpenAI chat/completions/embeddings, OpenAI Responses API, Anthropic Messages,
   Google Gemini's ``usageMetadata`` and its streamed JSON array, AWS Bedrock Converse, Ollama's own API, Cohere's
   v2 Chat ``usage`` and the ``meta`` of its v1 Chat, Embed and Rerank APIs) or a server-sent-event stream (OpenAI
   chunks with a final ``usage``, Groq's ``x_groq``, Responses API ``response.completed``, Anthropic
   ``message_start`` + ``message_delta``, Gemini's ``alt=sse``, Cohere's ``message-end``) or a
   newline-delimited JSON one (Ollama's), or an AWS Bedrock binary event stream
   (``application/vnd.amazon.eventstream``: ConverseStream's ``metadata`` usage; InvokeModelWithResponseStream's base64
   chunks, the model's own events, whose ``amazon-bedrock-invocationMetrics`` replace the counts those gave). The
   stream is read on the side while it passes through: nothing is held back from the client, only the current partial
   line (or frame) is kept. A body compressed by a middleware inside the billing one is decompressed as it is read:
   gzip and deflate always, br and zstd when a module reading them is importable (``brotli`` 1.2 or later or
   ``brotlicffi``; ``compression.zstd``, ``backports.zstd`` or ``zstandard``: not dependencies); other encodings are
   not read (0 tokens, said once per encoding with the fix). A stream from a model that ends without any usage
   (OpenAI's without ``stream_options.include_usage``) bills 0 tokens, said once. Ollama's top-level
   ``eval_count``s are read only in its answers (a string ``model`` and ``"done": true``, or ``embeddings``), and
   of newline-delimited JSON only its lines (a ``model`` and ``done``): an export's records, an evaluation
   service's counts are not tokens. A JSON array is read only as Gemini's chunks of one answer (one ``responseId``).

Token rules, to neither under- nor double-bill:

- OpenAI ``prompt_tokens_details.cached_tokens`` / ``input_tokens_details.cached_tokens`` and
  ``completion_tokens_details.reasoning_tokens`` are *subsets* of the prompt/completion counts: never added. Where
  the total shows they are not (``total_tokens`` = prompt + completion + reasoning: xAI's Grok, gateways relaying
  Gemini's thoughts in OpenAI's shape), the reasoning tokens are added to the output (what those providers bill).
- Anthropic ``cache_creation_input_tokens`` and ``cache_read_input_tokens`` are *not* included in its
  ``input_tokens``: they are added to ``input_tokens`` (every token the model read is an input token; bill cache
  reads at a discount in Lago if wanted, the split is not kept). Next to a ``prompt_tokens`` (the OpenAI shape
  proxies such as LiteLLM give Claude's usage), which counts them already, they are not added. So ``input_tokens``
  means the same for every provider: what OpenAI's ``prompt_tokens`` counts (cached tokens included), what a customer
  billed per token reads as "the tokens the model read".
- Anthropic's server-side compaction runs a summarizing call of its own, and its advisor tool a sub-inference on the
  advisor model, billed by Anthropic but reported only in ``usage.iterations`` (entries of type ``compaction``,
  ``advisor_message``, not counted in the top-level fields): added (their reads to the input, as above; their output
  to the output). The ``message`` entries (the executor's samplings, a server-side tool loop's) are in the top-level
  counts already: not added; nor is any entry when the top-level counts are the sum of them all (a gateway's).
- Cohere's ``billed_units`` are billed (what Cohere bills; its ``tokens`` count the prompt template it adds too);
  its ``tokens`` only when no billed units give a token count.
- Gemini's ``thoughtsTokenCount`` is *not* a part of ``candidatesTokenCount``: added to the output (its
  ``cachedContentTokenCount`` is a part of ``promptTokenCount``: not added). Bedrock's ``cacheReadInputTokens`` and
  ``cacheWriteInputTokens`` are not a part of its ``inputTokens``: added to the input, as Anthropic's.
- A usage update without ``total_tokens`` drops an earlier total (it no longer matches the new counts).
- Streams: usage values are cumulative, the last value of each field wins (Anthropic's ``message_delta`` updates
  ``output_tokens`` while ``message_start`` gave the input; a ``0`` in a ``message_delta`` after a count, which
  gateways translating to Anthropic's stream send for the counts they leave to ``message_start``, is not a count: a
  cumulative count never drops). A stream with several messages (a new
  ``message_start``; an OpenAI chat chunk or Responses API response with a usage under another ``id`` than the last
  usage read, a Gemini chunk under another ``responseId``, another Bedrock call's final usage: a tool loop relaying
  each call) adds them up. A stream cut off by the client keeps what was counted so
  far.
- ``total_tokens`` is ``input_tokens + output_tokens`` unless the source that gave the tokens gives a total too.

Malformed values (bools, negatives, fractions, non-numeric strings, more than 10**9) never break a request: they
count as missing (so 0 unless a lower source has the field) and are logged once per source and field.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import logging
import math
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, Protocol

from starlette.types import Message, Scope

from . import _checks as checks
from ._errors import ConfigurationError
from ._identity import SCOPE_KEY
from ._settings import _HEADER_NAME

__all__ = [
    "AttributionConfig",
    "MAX_TOKENS",
    "Usage",
    "UsageRecorder",
    "attribute_usage",
    "json_usage",
    "reset_warnings",
]

logger = logging.getLogger("lago_org_billing.attribution")

#: Token counts above this are treated as malformed.
MAX_TOKENS = 10**9
MAX_MODEL_LENGTH = 255
_TOKEN_FIELDS = ("input_tokens", "output_tokens", "total_tokens")
_EXPLICIT_KEY = "explicit_usage"
_warned: set[tuple[str, str]] = set()


@dataclasses.dataclass(slots=True)
class Usage:
    """Model and token counts of one request; ``source`` is the highest source that gave any of them."""

    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    source: str | None = None  # "explicit" | "headers" | "json" | "sse" | None


# Kinds of the response headers the recorder reads besides the usage headers (sentinels, compared with ``is``).
_CONTENT_TYPE = object()
_CONTENT_LENGTH = object()
_CONTENT_ENCODING = object()


@dataclasses.dataclass(frozen=True, slots=True)
class AttributionConfig:
    """Where usage is looked for. Header names are case-insensitive; the first one present in each tuple wins."""

    total_tokens_headers: tuple[str, ...] = ("x-tokens-used", "x-total-tokens")
    input_tokens_headers: tuple[str, ...] = ("x-input-tokens", "x-prompt-tokens")
    output_tokens_headers: tuple[str, ...] = ("x-output-tokens", "x-completion-tokens")
    model_headers: tuple[str, ...] = ("x-model",)
    #: Read JSON and SSE response bodies. ``False`` skips all body work.
    inspect_body: bool = True
    #: JSON bodies are buffered up to this many bytes (after decompression); past it only their first and last 16 KiB
    #: are kept, and a usage object closing the body is read there (OpenAI's embeddings of many inputs: megabytes of
    #: vectors, then the model and the usage). SSE is parsed as it streams (compressed or not, however long); one
    #: event longer than this is skipped, except for a usage object closing it. A compressed body (gzip: any number
    #: of members; deflate; br, zstd: any number of frames) is inflated up to 64 times this (a JSON body whole; a
    #: stream chunk by chunk): a bomb costs bounded time, its usage not read past that.
    max_body_bytes: int = 1_048_576
    # Precomputed: raw lower-case header name -> (field, rank within its tuple), and the response headers the
    # recorder reads (those, and the content headers).
    _header_map: dict[bytes, tuple[str, int]] = dataclasses.field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )
    _response_names: dict[bytes, Any] = dataclasses.field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )
    _cap_digits: int = dataclasses.field(init=False, repr=False, compare=False, hash=False, default=0)

    def __post_init__(self) -> None:
        mapping: dict[bytes, tuple[str, int]] = {}
        for field, names in (
            ("model", self.model_headers),
            ("input_tokens", self.input_tokens_headers),
            ("output_tokens", self.output_tokens_headers),
            ("total_tokens", self.total_tokens_headers),
        ):
            checked: object = names
            if isinstance(checked, str):
                raise ConfigurationError(f"AttributionConfig.{field}_headers must be a tuple of names, not a string.")
            if not isinstance(checked, (tuple, list)) or not all(isinstance(name, str) and name for name in names):
                raise ConfigurationError(
                    f"AttributionConfig.{field}_headers must be a tuple of header names such as ('x-{field}',) "
                    f"(() for none), got {checked!r}."
                )
            for rank, name in enumerate(names):
                # (a name with a blank, ':' or a control character inside is one no response carries: its usage
                # silently never read; one outside Latin-1 failed with a bare UnicodeEncodeError)
                if not _HEADER_NAME.fullmatch(name.strip()):
                    raise ConfigurationError(
                        f"AttributionConfig.{field}_headers must hold HTTP header names such as 'x-{field}' "
                        f"(letters, digits and -, no ':' or blanks inside), got {name!r}."
                    )
                mapping.setdefault(name.strip().lower().encode("latin-1"), (field, rank))
        object.__setattr__(self, "_header_map", mapping)
        checks.flag("AttributionConfig.inspect_body", self.inspect_body)
        checks.whole("AttributionConfig.max_body_bytes", self.max_body_bytes, minimum=0)
        response_names: dict[bytes, Any] = {
            **mapping,
            b"content-type": _CONTENT_TYPE,
            b"content-length": _CONTENT_LENGTH,
            b"content-encoding": _CONTENT_ENCODING,
        }
        object.__setattr__(self, "_response_names", response_names)
        object.__setattr__(self, "_cap_digits", len(str(self.max_body_bytes)))


_DEFAULT_CONFIG = AttributionConfig()


def reset_warnings() -> None:
    """Forget which malformed values and internal errors were already logged (for tests)."""
    _warned.clear()
    _internal_logged.clear()
    _said_once.clear()


def _malformed(source: str, field: str, value: object) -> None:
    if (source, field) in _warned:
        return
    _warned.add((source, field))
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    logger.warning(
        "Ignoring malformed %s from %s: %s (token counts must be whole numbers from 0 to %d, models short "
        "printable strings). Logged once per source and field.",
        field,
        source,
        shown,
        MAX_TOKENS,
    )


def _tokens(value: object, source: str, field: str) -> int | None:
    """A valid token count, or ``None`` when missing or malformed (malformed ones are logged once)."""
    if value is None:
        return None
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            number = int(value)
    elif isinstance(value, (str, bytes)):
        text = value.strip()
        if 0 < len(text) <= 10 and text.isdigit() and text.isascii():
            number = int(text)
        else:  # a whole number written with a decimal point ("1500.0": str(float) in the app), as JSON's 1500.0
            whole, dot, zeros = (text.decode("latin-1") if isinstance(text, bytes) else text).partition(".")
            if dot and zeros and not zeros.strip("0") and 0 < len(whole) <= 10 and whole.isdigit() and whole.isascii():
                number = int(whole)
    if number is None or not 0 <= number <= MAX_TOKENS:
        _malformed(source, field, value)
        return None
    return number


def _model(value: object, source: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):  # a header's: UTF-8 as written (a proxy passing its upstream's bytes on), else
        raw = value  # Latin-1, as Starlette encodes ``response.headers["X-Model"] = "modèle"`` (not valid UTF-8)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            value = raw.decode("latin-1")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if len(text) <= MAX_MODEL_LENGTH and text.isprintable():
            return text
    _malformed(source, "model", value)
    return None


def _scope_of(request_or_scope: Any) -> MutableMapping[str, Any] | None:
    scope = getattr(request_or_scope, "scope", request_or_scope)
    return scope if isinstance(scope, MutableMapping) else None


class HasScope(Protocol):
    """A request object carrying its ASGI ``scope``: Starlette's and FastAPI's ``Request`` and ``WebSocket``, or
    another ASGI framework's."""

    @property
    def scope(self) -> object: ...


def attribute_usage(
    request_or_scope: HasScope | Mapping[str, Any],
    *,
    model: str | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    total_tokens: int | None = None,
) -> None:
    """Tell the billing middleware what this request consumed; these values win over headers and body.

    Call it from the endpoint with its ``Request`` (or scope), any number of times: each call *replaces* the
    fields it passes (``None`` leaves a field as it was), it does not add. Omit ``total_tokens`` to bill
    ``input_tokens + output_tokens``. Values are checked when the event is built: malformed ones are logged and
    ignored, never raised. Outside the billing middleware (e.g. unit tests of the app) this does nothing.
    """
    scope = _scope_of(request_or_scope)
    if scope is None:  # (``request.state``, a response, ``None``: typed ``Any``, no type checker said it either)
        _warn_once(
            f"attribute_usage:{type(request_or_scope).__qualname__}",
            "attribute_usage() was given a %s, which is neither a request nor an ASGI scope: the usage it names is "
            "not billed (the request's tokens come from its headers or body instead). Pass the endpoint's Request. "
            "Logged once.",
            type(request_or_scope).__name__,
        )
        return
    data = scope.get(SCOPE_KEY)
    if not isinstance(data, dict):
        logger.debug("attribute_usage() called outside the billing middleware; ignored.")
        return
    usage = data.get(_EXPLICIT_KEY)
    if not isinstance(usage, dict):
        usage = data[_EXPLICIT_KEY] = {}
    for field, value in (
        ("model", model),
        ("input_tokens", input_tokens),
        ("output_tokens", output_tokens),
        ("total_tokens", total_tokens),
    ):
        if value is not None:
            usage[field] = value


class _Counts:
    """Raw usage values seen in a body, last value per key (streams report cumulative counts)."""

    __slots__ = ("answer", "done", "dropped", "latest", "model", "usage_id")

    def __init__(self) -> None:
        self.model: Any = None
        # A stream event over the cap was dropped without a usage read from its end: said (tokens billed 0) when the
        # stream ends without any (a partial image's event has none, and its stream's usage comes later)
        self.dropped = False
        # The id of the completion (chat chunks' "id", the Responses API's response's) whose usage was last read.
        self.usage_id: object = None
        # Whether a model came with an LLM's answer (a chat chunk's choices, the Responses API's response, Ollama's
        # line), not with any event naming a model (a job's progress): only those say a stream lacked its usage.
        self.answer = False
        self.latest: dict[str, Any] = {}
        # Usage of earlier messages of a multi-message stream, already resolved.
        self.done: list[dict[str, Any]] = []


class _EventCounts(_Counts):
    """The counts of an event stream (AWS Bedrock's): its frames are read, not lines."""

    __slots__ = ()


def _usage_container(payload: Mapping[str, Any]) -> Mapping[str, Any]:
    """The object holding ``usage``: the payload, or its ``message`` (Anthropic) / ``response`` (Responses API) /
    ``x_groq`` (Groq's streams, before they gave it at the top level too) / ``delta`` (Cohere's ``message-end``)."""
    if isinstance(payload.get("usage"), Mapping):
        return payload
    for key in ("message", "response", "x_groq", "delta"):
        inner = payload.get(key)
        if isinstance(inner, Mapping) and isinstance(inner.get("usage"), Mapping):
            return inner
    return payload


def _collect(payload: object, counts: _Counts) -> None:
    """Merge the model and usage of one JSON document (a body or one stream event) into ``counts``."""
    if not isinstance(payload, Mapping):
        return
    container = _usage_container(payload)
    if payload.get("type") == "message_start" and counts.latest:
        counts.done.append(counts.latest)
        counts.latest = {}
    model = container.get("model")
    answer = "choices" in container  # an OpenAI-style completion (or chunk)
    if model is None and "usage" not in payload:  # the Responses API's response.created: a model, no usage yet
        inner = payload.get("response")
        if isinstance(inner, Mapping):
            model = inner.get("model")
            answer = True
    usage = container.get("usage")
    if isinstance(usage, Mapping) and (answer or container is payload.get("response")) and container.get("id"):
        # An OpenAI-style completion (or the Responses API's response) with its id: a usage of another one than
        # the last usage read is another completion of the stream (a tool loop relaying each call): added up.
        _completion_of(counts, container.get("id"))
    if not isinstance(usage, Mapping):
        usage = payload.get("usageMetadata")  # Google Gemini (and Vertex AI), its model in modelVersion
        if isinstance(usage, Mapping):
            if model is None:
                model = payload.get("modelVersion")
            ident = payload.get("responseId")  # its usage is cumulative per answer: another answer's adds up
            if ident is not None:
                _completion_of(counts, ident)
        elif ("eval_count" in payload or "prompt_eval_count" in payload) and _ollama(payload):
            # Ollama's own API: counts at the top level of its last line (done) or of its embeddings; elsewhere an
            # "eval_count" is not tokens (a model-evaluation service's samples)
            usage = {"prompt_tokens": payload.get("prompt_eval_count"), "completion_tokens": payload.get("eval_count")}
        elif isinstance(payload.get("meta"), Mapping):  # Cohere's v1 Chat API, its Embed and Rerank APIs
            usage = _cohere_units(payload["meta"])
    elif "billed_units" in usage or "tokens" in usage:  # Cohere's v2 Chat API
        usage = _cohere_units(usage) or usage
    if isinstance(usage, Mapping):
        if "totalTokenCount" in usage or "promptTokenCount" in usage:  # Gemini's: each one whole, zeros left out
            for key in _GEMINI_KEYS:
                counts.latest.pop(key, None)
        latest = counts.latest
        if payload.get("type") == "message_delta":  # Anthropic's cumulative counts (zero placeholders: not counts)
            for key in _USAGE_KEYS:
                value = usage.get(key)
                if value is not None and not (value == 0 and key in _ANTHROPIC_KEYS and latest.get(key)):
                    latest[key] = value
        else:
            for key in _USAGE_KEYS:
                if key in usage and usage[key] is not None:
                    latest[key] = usage[key]
        iterations = usage.get("iterations")
        if type(iterations) is list:  # Anthropic's per-sampling counts: its compaction and advisor calls are apart
            latest[_ITERATIONS] = [item for item in iterations if isinstance(item, Mapping)]
        if _OUTPUT_DETAILS[0] in usage or _OUTPUT_DETAILS[1] in usage or "completion_tokens" in usage:
            # An OpenAI-style output count: its reasoning, kept to tell whether the total counts it apart (xAI's)
            details = usage.get(_OUTPUT_DETAILS[0], usage.get(_OUTPUT_DETAILS[1]))
            reasoning = details.get("reasoning_tokens") if isinstance(details, Mapping) else None
            if reasoning is None:
                counts.latest.pop(_REASONING, None)
            else:
                counts.latest[_REASONING] = reasoning
        elif "output_tokens" in usage:  # (an Anthropic delta: no reasoning apart)
            counts.latest.pop(_REASONING, None)
        if all(usage.get(key) is None for key in _TOTAL_KEYS):  # counts updated without a total: an earlier one is
            for key in _TOTAL_KEYS:  # stale
                counts.latest.pop(key, None)
    if model is not None:
        # A valid model wins over an earlier one only with usage (the final chunk's); a blank or invalid one (Azure
        # streams open with "model": "") is kept only while nothing better is known, so the real one still comes.
        if _good_model(model):
            if isinstance(usage, Mapping) or not _good_model(counts.model):
                counts.model = model
        elif counts.model is None:
            counts.model = model  # reported (and dropped) when the usage is read, unless a valid one follows
        if answer:
            counts.answer = True


def _completion_of(counts: _Counts, ident: object) -> None:
    """A usage of the completion ``ident`` is read next: one of another completion than the last usage read starts
    another message of the stream (what was counted is done, added up with what follows)."""
    if counts.latest and counts.usage_id is not None and ident != counts.usage_id:
        counts.done.append(counts.latest)
        counts.latest = {}
    counts.usage_id = ident


def _cohere_units(usage: Mapping[str, Any]) -> dict[str, Any] | None:
    """The token counts of Cohere's ``usage`` (or ``meta``): its ``billed_units``, what Cohere bills (its ``tokens``
    count the prompt template Cohere adds too); ``tokens`` only when no billed units give a token count. ``None``
    when neither is Cohere's object of counts."""
    for key in ("billed_units", "tokens"):
        units = usage.get(key)
        if isinstance(units, Mapping) and ("input_tokens" in units or "output_tokens" in units):
            return {"input_tokens": units.get("input_tokens"), "output_tokens": units.get("output_tokens")}
    if isinstance(usage.get("billed_units"), Mapping):  # a rerank's search units, a classification's: no tokens
        return {}
    return None


def _ollama(payload: Mapping[str, Any]) -> bool:
    """Whether ``payload`` is an answer of Ollama's own API with its counts: its model, and ``"done": true`` (a
    generation's last line, or whole answer) or ``embeddings``."""
    return type(payload.get("model")) is str and (payload.get("done") is True or "embeddings" in payload)


def _good_model(value: object) -> bool:
    """A model name ``_model`` keeps as it is (the fast check)."""
    return type(value) is str and 0 < len(value) <= MAX_MODEL_LENGTH and value.isprintable() and not value.isspace()


#: The usage keys read: OpenAI's and Anthropic's, Google Gemini's ``usageMetadata``, AWS Bedrock Converse's.
_GEMINI_KEYS = ("promptTokenCount", "toolUsePromptTokenCount", "candidatesTokenCount", "thoughtsTokenCount")
_BEDROCK_KEYS = ("inputTokens", "cacheReadInputTokens", "cacheWriteInputTokens", "outputTokens")
_TOTAL_KEYS = ("total_tokens", "totalTokenCount", "totalTokens")
_USAGE_KEYS = (
    "prompt_tokens",
    "completion_tokens",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    *_GEMINI_KEYS,
    *_BEDROCK_KEYS,
    *_TOTAL_KEYS,
)


#: Anthropic's counts. In a ``message_delta`` they are cumulative: a ``0`` after a count (what gateways translating
#: to Anthropic's stream send for the counts they leave to ``message_start``) is a placeholder, not a count.
_ANTHROPIC_KEYS = frozenset(("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens"))
#: The raw counts' key for the entries of Anthropic's ``usage.iterations``.
_ITERATIONS = "\x00iterations"
#: What an Anthropic iteration read (every token read is an input token) and wrote.
_ITERATION_INPUTS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
_ITERATION_OUTPUTS = ("output_tokens",)

#: Where OpenAI-style usages detail their output (chat completions', the Responses API's), and the key under which
#: their ``reasoning_tokens`` are kept in the raw counts.
_OUTPUT_DETAILS = ("completion_tokens_details", "output_tokens_details")
_REASONING = "\x00reasoning_tokens"


def _sum(raw: Mapping[str, Any], keys: tuple[str, ...], source: str) -> int | None:
    """The sum of the valid counts ``raw`` has under ``keys``; ``None`` when it has none."""
    total: int | None = None
    for key in keys:
        number = _tokens(raw.get(key), source, key)
        if number is not None:
            total = number if total is None else total + number
    return total


def _resolve_camel(raw: Mapping[str, Any], source: str) -> dict[str, int] | None:
    """Token fields from Gemini's ``usageMetadata`` or Bedrock's ``usage``; ``None`` when ``raw`` is neither.

    Gemini: ``promptTokenCount`` counts the cached content (``cachedContentTokenCount`` is a part of it, not added);
    ``thoughtsTokenCount`` is *not* a part of ``candidatesTokenCount`` and is billed as output: added to it (as
    ``totalTokenCount`` does), and so is ``toolUsePromptTokenCount`` to the input. Zero counts are left out of its
    JSON. Bedrock: ``inputTokens`` does not count the cache reads and writes, ``totalTokens`` does: they are added
    to the input (as Anthropic's)."""
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    if "promptTokenCount" in raw or "candidatesTokenCount" in raw or "totalTokenCount" in raw:
        inputs, outputs, total_key = _GEMINI_KEYS[:2], _GEMINI_KEYS[2:], "totalTokenCount"
    elif "inputTokens" in raw or "outputTokens" in raw or "totalTokens" in raw:
        inputs, outputs, total_key = _BEDROCK_KEYS[:3], _BEDROCK_KEYS[3:], "totalTokens"
    else:
        return None
    out: dict[str, int] = {}
    for field, keys in (("input_tokens", inputs), ("output_tokens", outputs)):
        number = _sum(raw, keys, source)
        if number is not None:
            out[field] = number
    total_tokens = _tokens(raw.get(total_key), source, "total_tokens")
    if total_tokens is not None:
        out["total_tokens"] = total_tokens
    return out


def _resolve_raw(raw: Mapping[str, Any], source: str) -> dict[str, int]:
    """Token fields from one provider usage object (see the module docstring for the rules)."""
    out: dict[str, int] = {}
    openai_shape = "prompt_tokens" in raw  # its prompt count includes cached tokens, whatever else is there
    if not openai_shape and "input_tokens" not in raw:
        camel = _resolve_camel(raw, source)
        if camel is not None:
            return camel
    input_tokens = _tokens(raw["prompt_tokens"] if openai_shape else raw.get("input_tokens"), source, "input_tokens")
    if input_tokens is not None:
        if not openai_shape:
            for extra in ("cache_creation_input_tokens", "cache_read_input_tokens"):
                added = _tokens(raw.get(extra), source, extra)
                if added is not None:
                    input_tokens += added
        out["input_tokens"] = input_tokens
    output_tokens = _tokens(raw.get("completion_tokens", raw.get("output_tokens")), source, "output_tokens")
    if output_tokens is not None:
        out["output_tokens"] = output_tokens
    total_tokens = _tokens(raw.get("total_tokens"), source, "total_tokens")
    if total_tokens is not None:
        out["total_tokens"] = total_tokens
        reasoning = raw.get(_REASONING)
        if reasoning and input_tokens is not None:
            # OpenAI's reasoning is a part of its completion (total = prompt + completion); xAI's, and Gemini's thoughts
            # relayed in OpenAI's shape, are not (total = prompt + completion + reasoning): billed as output too
            reasoning = _tokens(reasoning, source, "reasoning_tokens")
            shown = output_tokens or 0
            if reasoning and input_tokens + shown + reasoning == total_tokens:
                out["output_tokens"] = shown + reasoning
    iterations = raw.get(_ITERATIONS)
    if iterations and not openai_shape:
        _add_iterations(out, iterations, source)
    return out


def _add_iterations(out: dict[str, int], iterations: list[Mapping[str, Any]], source: str) -> None:
    """Add the samplings Anthropic reports only in ``usage.iterations`` to ``out``: the top-level counts are those of
    the ``message`` entries (the executor's own samplings, a server-side tool loop's), not of the others, billed all
    the same: a ``compaction`` (server-side compaction's summarizing call, whose tokens "are not included in the
    top-level usage fields"), an ``advisor_message`` (the advisor tool's sub-inference, on the advisor model). Those
    are added, once; unless the top-level counts are already the sum of every entry (a gateway rolling them in)."""
    extra = [entry for entry in iterations if entry.get("type") != "message"]
    if not extra:
        return
    sums: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}
    added: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}
    for entry in iterations:
        for field, keys in (("input_tokens", _ITERATION_INPUTS), ("output_tokens", _ITERATION_OUTPUTS)):
            number = _sum(entry, keys, source) or 0
            sums[field] += number
            if entry.get("type") != "message":
                added[field] += number
    if sums["input_tokens"] == out.get("input_tokens", 0) and sums["output_tokens"] == out.get("output_tokens", 0):
        return  # every entry is in the top-level counts already
    for field, number in added.items():
        if number:
            out[field] = out.get(field, 0) + number
            if "total_tokens" in out:
                out["total_tokens"] += number


def _resolve_counts(counts: _Counts, source: str, *, model_needs_usage: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    parts = [*counts.done, counts.latest] if counts.latest else counts.done
    resolved = [_resolve_raw(raw, source) for raw in parts]
    if resolved:
        if len(resolved) == 1:
            fields.update(resolved[0])
        else:
            for field in ("input_tokens", "output_tokens"):
                values = [part[field] for part in resolved if field in part]
                if values:
                    fields[field] = sum(values)
            # Per-message totals cannot be trusted to cover every message: recompute.
    model = _model(counts.model, source)
    if model is not None and (fields or counts.done or counts.latest or not model_needs_usage):
        fields["model"] = model
    return fields


_MODE_NONE = 0
_MODE_JSON = 1
_MODE_SSE = 2
#: A JSON body over the cap: only its first and last bytes are kept (the model, the usage closing it).
_MODE_JSON_ENDS = 3
#: An ``application/vnd.amazon.eventstream`` body (AWS Bedrock's streams): binary frames, read as they pass.
_MODE_EVENTS = 4
_EVENTSTREAM = b"application/vnd.amazon.eventstream"
#: How many first and last bytes of a JSON body over the cap are kept.
_JSON_END = 16_384
#: Newline-delimited JSON streams (Ollama's ``application/x-ndjson``), read as event streams of one line per event.
_NDJSON = frozenset((b"application/x-ndjson", b"application/ndjson", b"application/jsonl", b"application/jsonlines"))

#: The C scanner behind ``json.loads``: one JSON value from a ``str`` at an index -> (value, end index).
_scan_json: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


class UsageRecorder:
    """Watches one response and works out its :class:`Usage`. One per request.

    The middleware calls :meth:`response_start` and :meth:`response_body` from its ``send`` wrapper, before
    passing each message on, and :meth:`result` once the response is over (completed or cut off). The recorder
    never raises from those calls: an internal error is logged once and body attribution is dropped.
    """

    __slots__ = (
        "_billing",
        "_chunks",
        "_config",
        "_counts",
        "_data_lines",
        "_data_size",
        "_discarded_data",
        "_discarding",
        "_event",
        "_frame_skip",
        "_frames",
        "_fresh",
        "_head",
        "_headers",
        "_inflater",
        "_json_event",
        "_last",
        "_mode",
        "_ndjson",
        "_partial",
        "_result",
        "_scope",
        "_size",
        "_skip_lf",
        "_skipped",
        "_skipped_id",
        "_tail",
        "status",
    )
    # The stream parser's state, set when a text/event-stream response starts.
    _data_lines: list[bytes]
    _data_size: int
    _ndjson: bool
    _partial: bytes | bytearray
    _skip_lf: bool
    _discarding: bool
    _event: bytes
    _tail: bytes
    # The last bytes of the data of an event over the cap, read for a usage closing it when it ends; whether its data
    # open a JSON object (only such an event's usage is read).
    _skipped: bytearray
    _json_event: bool
    # The id of the completion whose event is over the cap, read from its first bytes (see _closing_usage).
    _skipped_id: str | None
    # A JSON body over the cap: its first and last bytes (inflated).
    _head: bytearray
    _last: bytearray
    # An event stream's frame being received, and how many bytes of a frame over the cap are still to drop.
    _frames: bytearray
    _frame_skip: int

    def __init__(self, scope: Scope, config: AttributionConfig | None = None) -> None:
        # Only what every response needs is set here; the stream parser's state is made when a stream starts.
        self._scope: Scope | None = scope
        self._billing: Any = None
        self._config = config if config is not None else _DEFAULT_CONFIG
        self.status: int | None = None
        self._mode = _MODE_NONE
        self._headers: dict[str, tuple[int, Any]] | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._counts: _Counts | None = None
        self._result: Usage | None = None
        self._inflater: _Inflater | _Decoder | None = None

    def detach(self) -> None:
        """Let go of the request's scope (keeping only what :func:`attribute_usage` stored), for a recorder
        whose :meth:`result` is read later: the scope and everything it holds can be freed now."""
        if self._scope is not None:
            self._billing = self._scope.get(SCOPE_KEY)
            self._scope = None

    def _explicit(self) -> Any:
        """What :func:`attribute_usage` stored for this request (``None`` when nothing)."""
        data = self._scope.get(SCOPE_KEY) if self._scope is not None else self._billing
        # (a dict subclass: the middleware's, which deep copies of the scope share)
        return data.get(_EXPLICIT_KEY) if isinstance(data, dict) else None

    # -- response start --------------------------------------------------------------------------------------------

    def response_start(self, message: Message) -> None:
        """Read the status and headers of ``http.response.start``; choose how to read the body."""
        try:  # (the work inline, not in a method of its own: once per response)
            self.status = message.get("status")
            config = self._config
            names = config._response_names
            content_type = b""
            encoded = b""
            length: bytes | None = None
            for name, value in message.get("headers") or ():
                kind = names.get(name)
                if kind is None:
                    kind = names.get(name.lower())  # names are lower case in ASGI apps, but not necessarily
                    if kind is None:
                        continue
                if kind is _CONTENT_TYPE:
                    content_type = value
                elif kind is _CONTENT_LENGTH:
                    length = value
                elif kind is _CONTENT_ENCODING:
                    encoded = value.strip().lower()
                    if encoded == b"identity":
                        encoded = b""
                else:
                    field, rank = kind
                    if self._headers is None:
                        self._headers = {}
                    known = self._headers.get(field)
                    if known is None or rank < known[0]:
                        self._headers[field] = (rank, value)
            if not content_type or not config.inspect_body:
                return
            if (
                encoded
            ):  # compressed by a middleware inside this one (GZipMiddleware added first): gzip/deflate are read
                lowered = content_type.lower()
                if b"json" not in lowered and b"event-stream" not in lowered and b"eventstream" not in lowered:
                    return
                self._inflater = _decoder_of(encoded, config.max_body_bytes * _INFLATE_FACTOR)
                if self._inflater is None:  # (said)
                    return
            media_type = (
                content_type if content_type == b"application/json" else content_type.split(b";", 1)[0].strip().lower()
            )
            if media_type == b"application/json" or media_type.endswith(b"+json"):  # (the common case first)
                if length is not None and len(length) >= config._cap_digits:  # fewer digits: under the cap
                    try:
                        if int(length) > config.max_body_bytes:
                            self._head, self._last = bytearray(), bytearray()
                            self._mode = _MODE_JSON_ENDS  # its ends only: the usage closing it
                            return
                    except ValueError:
                        pass  # not a number: the body is buffered up to the cap all the same
                self._mode = _MODE_JSON
            elif media_type == b"text/event-stream" or media_type in _NDJSON:
                self._mode = _MODE_SSE
                self._ndjson = media_type in _NDJSON
                self._counts = _Counts()
                self._fresh = True  # the stream's first bytes may be a byte-order mark, which SSE ignores
                self._partial = b""
                self._skip_lf = False
                self._discarding = False
                self._discarded_data = False
                self._tail = b""
                self._skipped = bytearray()
                self._json_event = False
                self._skipped_id = None
                self._event = b""
                self._data_lines = []
                self._data_size = 0
            elif media_type == _EVENTSTREAM:  # AWS Bedrock's binary event streams (ConverseStream, InvokeModel's)
                self._mode = _MODE_EVENTS
                self._counts = _EventCounts()
                self._frames = bytearray()
                self._frame_skip = 0
        except Exception:
            self._mode = _MODE_NONE
            _internal_error("response_start")

    # -- body ------------------------------------------------------------------------------------------------------

    def response_body(self, body: bytes) -> None:
        """Look at one ``http.response.body`` chunk (cheap; JSON is only buffered, SSE is parsed line by line)."""
        mode = self._mode
        if mode == _MODE_NONE or not body:
            return
        if type(body) is not bytes:  # a memoryview (Starlette passes them on) or bytearray: a copy, read later
            try:
                body = bytes(body)
            except TypeError:  # not bytes-like: the server refuses it too
                self._mode = _MODE_NONE
                _internal_error("response_body")
                return
        if mode == _MODE_JSON:  # (the usual first)
            self._size += len(body)
            if self._size > self._config.max_body_bytes:  # from now on, its ends only (the usage closing it)
                chunks, self._chunks = self._chunks, []
                chunks.append(body)
                self._head, self._last = bytearray(), bytearray()
                self._mode = _MODE_JSON_ENDS
                for chunk in chunks:
                    self._keep_ends(chunk)
                return
            self._chunks.append(body)
            return
        if self._inflater is not None and mode != _MODE_JSON_ENDS:
            # Inflated in 64 KiB slices, each parsed at once: the parser caps lines and events, not the stream (a
            # compressor that does not flush sends megabytes of events in one chunk, the usage in the last one).
            # The inflation budget holds per chunk: a stream may be long, one chunk inflating past it is a bomb.
            feed = self._feed_sse if mode == _MODE_SSE else self._feed_frames
            try:
                self._inflater.inflated = 0
                for piece in self._inflater.pieces(body):
                    feed(piece)
            except _UNDECODABLE:
                self._mode = _MODE_NONE
                _undecodable_body()
            except OverflowError:
                self._mode = _MODE_NONE
                _inflation_budget_exceeded()
            except Exception:
                self._mode = _MODE_NONE
                _internal_error("response_body")
            return
        if mode != _MODE_SSE:
            if mode == _MODE_JSON_ENDS:
                self._keep_ends(body)
                return
            try:
                self._feed_frames(body)
            except Exception:
                self._mode = _MODE_NONE
                _internal_error("response_body")
            return
        try:
            self._feed_sse(body)
        except Exception:
            self._mode = _MODE_NONE
            _internal_error("response_body")

    def _keep_ends(self, chunk: bytes) -> None:
        """Keep the first and last bytes of a JSON body over the cap (inflated as it comes when compressed)."""
        if self._inflater is None:
            self._keep_end(chunk)
            return
        try:
            for piece in self._inflater.pieces(chunk):
                self._keep_end(piece)
        except _UNDECODABLE:
            self._mode = _MODE_NONE
            _undecodable_body()
        except OverflowError:
            self._mode = _MODE_NONE
            _inflation_budget_exceeded()

    def _keep_end(self, data: bytes) -> None:
        head, last = self._head, self._last
        if len(head) < _JSON_END:
            head += data[: _JSON_END - len(head)]
        last += data[-_JSON_END:]
        if len(last) > 4 * _JSON_END:  # trimmed now and then: amortized, however small the chunks
            del last[:-_JSON_END]

    def _feed_sse(self, chunk: bytes) -> None:
        if self._fresh:  # (a byte-order mark may come split over the first chunks: held until it is whole or not one)
            chunk = bytes(self._partial) + chunk
            if len(chunk) < 3 and _BOM.startswith(chunk):
                self._partial = chunk
                return
            self._partial = b""
            self._fresh = False
            if chunk.startswith(_BOM):
                chunk = chunk[3:]
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            # SSE lines end with \r\n, \n or \r; a \r\n split across two chunks must count once.
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        # A line held whole is over the cap by its data (see _line): a "data:" line's field name is not counted, so
        # that an event is kept or dropped alike whether its line came with its end or not (a cut before its newline)
        limit = self._config.max_body_bytes + (0 if self._ndjson else _DATA_FIELD)
        if b"\n" not in chunk:
            if not self._discarding:
                partial = self._partial
                if type(partial) is not bytearray:  # (grown in place: a long line relayed in small chunks is not
                    partial = self._partial = bytearray(partial)  # copied whole at each, quadratic on the loop)
                partial += chunk
                if len(partial) > limit:
                    self._discard(bytes(partial))
            elif self._discarded_data:
                self._tail = (self._tail + chunk[-_TAIL:])[-_TAIL:]
            return
        lines = chunk.split(b"\n")
        tail = lines.pop()
        if self._discarding:
            self._discarding = False
            if self._discarded_data:  # the rest of an oversized data line: drop it and its event
                self._oversized(self._tail + lines[0][-_TAIL:])
            del lines[0]  # (a comment, id or event line: only it)
        elif self._partial:
            lines[0] = bytes(self._partial) + lines[0]
        for line in lines:
            self._line(line)
        self._partial = tail
        if len(tail) > limit:
            self._discard(tail)

    def _feed_frames(self, chunk: bytes) -> None:
        """Read the frames of an ``application/vnd.amazon.eventstream`` body as they come: only the frame being
        received is kept (one over max_body_bytes is dropped as it passes, not held); a frame whose message CRC does
        not match is skipped, a prelude whose CRC does not match (not an event stream, or a corrupt one) ends the
        reading. The body itself goes on to the client untouched."""
        skip = self._frame_skip
        if skip:
            if len(chunk) <= skip:
                self._frame_skip = skip - len(chunk)
                return
            chunk = chunk[skip:]
            self._frame_skip = 0
        frames = self._frames
        frames += chunk
        while len(frames) >= 12:
            total, headers_length, prelude_crc = _PRELUDE.unpack_from(frames)
            if zlib.crc32(frames[:8]) != prelude_crc or total < 16 or headers_length > total - 16:
                self._mode = _MODE_NONE
                self._frames = bytearray()
                _unreadable_event_stream()
                return
            if total > self._config.max_body_bytes:
                _cap_exceeded("stream event")
                if len(frames) < total:
                    self._frame_skip = total - len(frames)
                    frames.clear()
                    return
                del frames[:total]
                continue
            if len(frames) < total:
                return
            message = bytes(frames[:total])
            del frames[:total]  # (amortized: a bytearray drops its first bytes without moving the rest)
            if zlib.crc32(memoryview(message)[:-4]) == int.from_bytes(message[-4:], "big"):
                self._frame(message, headers_length)

    def _frame(self, message: bytes, headers_length: int) -> None:
        """One whole event-stream frame: ConverseStream's ``metadata`` event (its ``usage``), or an InvokeModel
        ``chunk`` (the model's own JSON event in base64: Anthropic's events, the invocation metrics of the last one).
        Other events (text deltas...) and exceptions carry no usage."""
        counts = self._counts
        if counts is None:
            return
        headers = _frame_headers(message, 12, 12 + headers_length)
        if headers is None or headers.get(b":message-type") != b"event":
            return
        kind = headers.get(b":event-type")
        if kind != b"chunk" and kind != b"metadata":
            return
        try:
            payload = json.loads(message[12 + headers_length : -4])
        except (ValueError, RecursionError):
            return
        if type(payload) is not dict:
            return
        if kind == b"metadata":  # ConverseStream's last event: the call's usage (cache reads and writes apart)
            inner = payload.get("metadata")  # (as the SDKs show it, should a relay re-wrap it)
            usage = (inner if isinstance(inner, Mapping) else payload).get("usage")
            if isinstance(usage, Mapping):
                _close_call(counts, dict(usage))
            return
        encoded = payload.get("bytes")
        if type(encoded) is not str:
            return
        try:
            data = base64.b64decode(encoded)
        except ValueError:  # (binascii.Error)
            return
        if b"usage" not in data and b"invocationMetrics" not in data and b'"model"' not in data:
            return  # a text delta: no JSON to parse
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            return
        if type(event) is not dict:
            return
        # Anthropic's message_start (model, input) and message_delta (output): as counted so far
        _collect(event, counts)
        metrics = event.get("amazon-bedrock-invocationMetrics")
        if isinstance(metrics, Mapping):  # the invocation's own counts, as Bedrock bills them: they replace those
            raw = {
                field: metrics.get(key)
                for field, key in (
                    ("input_tokens", "inputTokenCount"),
                    ("output_tokens", "outputTokenCount"),
                    ("cache_read_input_tokens", "cacheReadInputTokenCount"),
                    ("cache_creation_input_tokens", "cacheWriteInputTokenCount"),
                )
                if metrics.get(key) is not None
            }
            _close_call(counts, raw)

    def _discard(self, start: bytes) -> None:
        """Drop the oversized line that begins with ``start``, up to its end; its event too if it is data."""
        self._partial = b""
        self._discarding = True
        self._discarded_data = start[:4] == b"data" or self._ndjson
        if self._ndjson:  # a document over the cap, dropped: its first bytes kept for its model (see _oversized)
            self._head = bytearray(start[:_JSON_END])
        elif self._discarded_data:  # its data, as _line reads them (the field name was in the event's last bytes)
            start = start.partition(b":")[2]
            start = start[1:] if start[:1] == b" " else start
            if not self._data_lines and self._event != _SKIP:  # the event's first data line
                self._json_event = start.lstrip()[:1] == b"{"
            if self._event != _SKIP:
                self._skipped_id = self._completion_id(start)
        self._tail = start[-_TAIL:] if self._discarded_data else b""

    def _completion_id(self, line: bytes) -> str | None:
        """The id of the completion whose event goes over the cap with ``line``, read from the event's first bytes
        (its data lines before, then ``line``): a chat chunk's ``id`` (next to its ``choices``), the response's of a
        Responses API event, as :func:`_collect` reads them in an event read whole; ``None`` when they show none."""
        head = line[:_TAIL]
        if self._data_lines:
            head = (b"\n".join(self._data_lines)[:_TAIL] + b"\n" + head)[:_TAIL]
        match = _COMPLETION_ID.match(head)
        if match is None or not (match[1] or b'"choices"' in head):
            return None
        return match[2].decode("utf-8", "replace")

    def _oversized(self, last: bytes) -> None:
        """An event whose data are over the cap is dropped (its data not kept, not parsed), but a usage object at its
        end is read from its last bytes when it ends (:meth:`_closing_usage`): the event closing a streamed image
        generation (Images API, the Responses API's image_generation tool) carries the image in base64, megabytes, and
        the usage after it. ``last``: the last bytes of a data line of the event (the one that took it over the cap,
        or one after it: an event pretty-printed over several data lines has its usage on the lines after)."""
        if self._ndjson:
            self._oversized_document(bytes(self._head), last)
            return
        skipped = self._skipped
        if self._event != _SKIP:  # its data lines before: the start of a usage spread over lines may be there
            lines, self._data_lines = self._data_lines, []
            at, kept = len(lines), 0
            while at and kept < _TAIL:
                at -= 1
                kept += len(lines[at]) + 1
            skipped.clear()
            skipped += b"".join(line + b"\n" for line in lines[at:])
            self._event = _SKIP
        else:
            skipped += b"\n"
        skipped += last[-_TAIL:]
        if len(skipped) > 4 * _TAIL:  # trimmed now and then: amortized, however many lines
            del skipped[:-_TAIL]
        self._tail = b""

    def _closing_usage(self) -> None:
        """An event over the cap ended: a usage object at its end, read from its last bytes."""
        tail = bytes(self._skipped[-_TAIL:])
        self._skipped = bytearray()
        ident: object = self._skipped_id
        self._skipped_id = None
        counts = self._counts
        if counts is not None and self._json_event and b'"usage' in tail:  # (an event of other data: not an answer's)
            text = tail.decode("utf-8", "replace")
            for key in ("usage", "usageMetadata"):
                members = _usage_members(text, key)
                if members is not None:
                    # Its completion's id (read from its first bytes; Gemini's responseId closes its chunk): another
                    # completion's usage adds up, as in an event read whole
                    if key == "usageMetadata":
                        ident = members.get("responseId")
                    if ident is not None:
                        _completion_of(counts, ident)
                    _collect({"usage": members[key]}, counts)
                    return
        if counts is not None:
            counts.dropped = True  # (said at the end if no usage came: see result)
        else:  # pragma: no cover - a stream's events are counted
            _cap_exceeded("stream event")

    def _oversized_document(self, head: bytes, tail: bytes) -> None:
        """A newline-delimited JSON document over the cap is dropped (not parsed), but Ollama's counts closing it are
        read from its last bytes ``tail``: the last line of a generation carries its ``context`` (a token id per token
        of the conversation, a client's choice) before them; its model from earlier lines, or its first bytes."""
        counts = self._counts
        if counts is not None:
            model: object = counts.model
            if not _good_model(model):
                model = _leading_members(head.decode("utf-8", "replace")).get("model")
            payload = _ollama_closing(tail.decode("utf-8", "replace"), model)
            if payload is not None:
                counts.answer = True
                _collect(payload, counts)
                return
            counts.dropped = True  # (said at the end if no usage came: see result)
            return
        _cap_exceeded("stream event")  # pragma: no cover - a stream's lines are counted

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        if self._ndjson:  # newline-delimited JSON (Ollama's streams): each line is one document
            if len(line) > self._config.max_body_bytes:
                self._oversized_document(line[:_JSON_END], line[-_TAIL:])
                return
            if b'"done"' not in line:  # not a line of Ollama's answer (an export's records): not read
                return
            self._data_lines.append(line)
            self._dispatch()
            return
        if line[:1] == b":":
            return
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            if self._event == _SKIP:  # more of an event over the cap: its last bytes only
                self._oversized(value)
                return
            if not self._data_lines:  # the event's first data line
                self._json_event = value.lstrip()[:1] == b"{"
            self._data_size += len(value) + 1
            if self._data_size > self._config.max_body_bytes:  # one event's data over the cap: not kept, not read
                self._skipped_id = self._completion_id(value)
                self._oversized(value)
                return
            self._data_lines.append(value)
        elif field == b"event" and self._event != _SKIP:
            self._event = value

    def _dispatch(self) -> None:
        lines = self._data_lines
        skip = self._event == _SKIP
        self._event = b""
        self._data_size = 0
        if skip:  # an event over the cap (its data not kept): a usage closing it is read
            self._closing_usage()
            return
        if not lines:
            return
        data = lines[0] if len(lines) == 1 else b"\n".join(lines)
        self._data_lines = []
        counts = self._counts
        if counts is None:
            return
        # Most stream events carry no usage: skip them without parsing JSON ("usage", Gemini's "usageMetadata").
        usage_hits = data.count(b'"usage')
        if (
            usage_hits == 0
            or usage_hits == data.count(b'"usage":null') + data.count(b'"usage": null')
            or (b'"usage"' not in data and b'"usageMetadata"' not in data)  # "usage_percent", "usageCount"...
        ):
            if (_good_model(counts.model) or b'"model"' not in data) and not (
                self._ndjson and b'eval_count"' in data  # Ollama's last line
            ):
                return
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError):  # one unreadable event (too deeply nested...): the next ones still count
            return
        if self._ndjson:
            if type(payload) is not dict or type(payload.get("model")) is not str or "done" not in payload:
                return  # only Ollama's answer is read: not records that mention a "done" (an export's)
            counts.answer = True
        _collect(payload, counts)

    # -- result ----------------------------------------------------------------------------------------------------

    def result(self) -> Usage:
        """The request's usage so far; call it when the response is over. Later body chunks are not read."""
        if self._result is not None:
            return self._result
        if self._inflater is not None and self._mode == _MODE_JSON:
            self._inflate()
        if self._json_alone():
            self._result = json_usage(self._body())
            self._mode = _MODE_NONE
            self._chunks = []
            return self._result
        try:
            body_fields, body_source = self._body_fields()
        except Exception:
            _internal_error("result")
            body_fields, body_source = {}, None
        self._mode = _MODE_NONE
        self._chunks = []
        try:
            explicit = self._explicit_fields()
            headers = self._header_fields()
        except Exception:  # pragma: no cover - defensive, the helpers only read dicts
            _internal_error("result")
            explicit, headers = {}, {}
        counts = self._counts
        if counts is not None and not any(
            field in explicit or field in headers or field in body_fields for field in _TOKEN_FIELDS
        ):
            if counts.dropped:  # an event over the cap, and no usage from anywhere: perhaps in that event
                _cap_exceeded("stream event")
            elif body_source == "sse" and len(body_fields) == 1 and "model" in body_fields and counts.answer:
                _stream_without_usage()
        self._result = _merge((("explicit", explicit), ("headers", headers), (body_source or "json", body_fields)))
        return self._result

    def deferred(self) -> bytes | Usage:
        """The usage, or (the common case: a JSON body alone decides it) that JSON body, for
        :func:`json_usage` to read later, off the request path. Call it when the response is over; the
        recorder lets go of the request's scope then (see :meth:`detach`)."""
        self.detach()
        if self._mode == _MODE_JSON and self._result is None:
            if self._inflater is not None:
                self._inflate()  # (over the cap, or not inflatable: no longer a JSON body read whole)
                if self._mode != _MODE_JSON:
                    return self.result()
            # _json_alone(), then _body(), inline (once per request): detached, what attribute_usage() stored is in
            # the billing dict kept
            if self._headers is None:
                data = self._billing
                if not (data.get(_EXPLICIT_KEY) if isinstance(data, dict) else None):
                    chunks = self._chunks
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self.result()

    def _json_alone(self) -> bool:
        """A JSON body alone decides the usage: no usage headers, nothing from :func:`attribute_usage`."""
        return self._mode == _MODE_JSON and self._headers is None and not self._explicit()

    def _body(self) -> bytes:
        chunks = self._chunks
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _inflate(self) -> None:
        """Inflate a whole compressed JSON body: kept when within the cap, else only its ends (as one over the cap)."""
        inflater, self._inflater = self._inflater, None
        assert inflater is not None
        body = self._body()
        self._chunks = []
        kept: list[bytes] = []
        size = 0
        cap = self._config.max_body_bytes
        try:
            for piece in inflater.pieces(body):
                if self._mode == _MODE_JSON:
                    size += len(piece)
                    if size <= cap:
                        kept.append(piece)
                        continue
                    self._head, self._last = bytearray(), bytearray()
                    self._mode = _MODE_JSON_ENDS
                    for earlier in kept:
                        self._keep_end(earlier)
                    kept = []
                self._keep_end(piece)
        except _UNDECODABLE:
            self._mode = _MODE_NONE
            _undecodable_body()
            return
        except OverflowError:
            self._mode = _MODE_NONE
            _inflation_budget_exceeded()
            return
        self._chunks = kept

    def _explicit_fields(self) -> dict[str, Any]:
        raw = self._explicit()
        if not isinstance(raw, dict) or not raw:
            return {}
        fields: dict[str, Any] = {}
        model = _model(raw.get("model"), "explicit")
        if model is not None:
            fields["model"] = model
        for field in _TOKEN_FIELDS:
            value = _tokens(raw.get(field), "explicit", field)
            if value is not None:
                fields[field] = value
        return fields

    def _header_fields(self) -> dict[str, Any]:
        if not self._headers:
            return {}
        fields: dict[str, Any] = {}
        for field, (_, value) in self._headers.items():
            if field == "model":
                model = _model(value, "headers")
                if model is not None:
                    fields["model"] = model
            else:
                number = _tokens(value, "headers", field)
                if number is not None:
                    fields[field] = number
        return fields

    def _body_fields(self) -> tuple[dict[str, Any], str | None]:
        if self._mode == _MODE_JSON:
            return _json_fields(self._body())
        if self._mode == _MODE_JSON_ENDS:
            return self._ends_fields()
        counts = self._counts
        if type(counts) is _EventCounts:  # an event stream (read to its end, or given up on)
            self._frames = bytearray()
            return _resolve_counts(counts, "sse", model_needs_usage=False), "sse"
        if counts is not None:
            # A stream that ended (or was cut) without its final blank line: use complete data lines.
            if self._partial and not self._discarding:
                self._line(bytes(self._partial))
                self._partial = b""
            elif self._discarding and self._discarded_data:
                self._discarding = False
                self._oversized(self._tail)
            if self._data_lines or self._event == _SKIP:
                self._dispatch()
            return _resolve_counts(counts, "sse", model_needs_usage=False), "sse"
        return {}, None

    def _ends_fields(self) -> tuple[dict[str, Any], str | None]:
        """The usage of a JSON body over the cap, from a usage object of the top-level object among its last bytes
        (OpenAI's embeddings of many inputs: megabytes of vectors, then the model and the usage); its model there or
        among the top-level members its first bytes hold. A usage nested deeper (a record of a list, a tool result)
        is not the answer's, as with a body read whole."""
        head, last = bytes(self._head), self._last[-_JSON_END:].decode("utf-8", "replace")
        self._head, self._last = bytearray(), bytearray()
        if not head:  # no body came (the answer to a HEAD request): nothing was over the cap
            return {}, None
        members = _closing_members(last, "usage", len(last), _CLOSING)
        if members is None:  # Gemini's, followed by its modelVersion and responseId
            members = _closing_members(last, "usageMetadata", len(last), _CLOSING)
            if members is not None:
                members["usage"], members["model"] = members.get("usageMetadata"), members.get("modelVersion")
        if members is None:  # Gemini's array of chunks (streamGenerateContent without alt=sse): its last one's
            members = _gemini_last_chunk(last, head)
        if members is None:  # Cohere's (an embedding of many texts), followed by its response_type
            members = _closing_members(last, "meta", len(last), _CLOSING)
            meta = members.get("meta") if members is not None else None
            if members is not None and isinstance(meta, dict):
                members["usage"] = _cohere_units(meta)
        if members is None:  # Ollama's (an embedding of many inputs, a generation with a long context)
            ollama = _ollama_closing(last, _leading_members(head.decode("utf-8", "replace")).get("model"))
            if ollama is not None:
                read = _Counts()
                _collect(ollama, read)
                return _resolve_counts(read, "json", model_needs_usage=True), "json"
        usage = members.get("usage") if members is not None else None
        if members is None or not isinstance(usage, dict):
            _cap_exceeded("JSON body")
            return {}, None
        model = members.get("model")
        if not isinstance(model, str):  # before the usage, a member of the same (top-level) object; or at the start
            found = _closing_members(last, "model", last.rfind('"usage"'), len(last))
            model = found.get("model") if found is not None else None
        if not isinstance(model, str):
            model = _leading_members(head.decode("utf-8", "replace")).get("model")
        counts = _Counts()
        _collect({"model": model if isinstance(model, str) else None, "usage": usage}, counts)
        return _resolve_counts(counts, "json", model_needs_usage=True), "json"


def _ollama_closing(last: str, model: object) -> dict[str, Any] | None:
    """Ollama's answer (or its stream's last line) over the cap, as :func:`_collect` reads it whole: the members that
    close it from its ``total_duration`` on (its durations and counts, after the vectors of an embedding or a
    generation's ``context``), read from its last characters ``last``, with its ``model`` (a string: its first
    member); ``None`` unless they hold a token count."""
    if type(model) is not str:
        return None
    members = _closing_members(last.rstrip(" \t\n\r"), "total_duration", len(last), _CLOSING)
    if members is None or type(members.get("total_duration")) is not int:
        return None
    if type(members.get("prompt_eval_count")) is not int and type(members.get("eval_count")) is not int:
        return None
    return {**members, "model": model, "done": True}


def _gemini_last_chunk(last: str, head: bytes) -> dict[str, Any] | None:
    """The members of the last chunk of Gemini's streamed answer as a JSON array over the cap (an image model's:
    megabytes of base64 in a chunk), its ``usageMetadata`` (cumulative) and ``modelVersion`` as ``usage`` and
    ``model``, read from the array's last characters ``last``; ``None`` unless the array closes with a chunk that has
    a ``responseId`` and its first chunk, when its first bytes ``head`` show it, has the same (as a body read whole:
    a list of stored answers, each its own, is not billed)."""
    end = len(last.rstrip(" \t\n\r"))
    if last[end - 1 : end] != "]":
        return None
    text = last[: end - 1]
    members = _closing_members(text, "usageMetadata", len(text), _CLOSING)
    if members is None or type(members.get("responseId")) is not str:
        return None
    start = head.decode("utf-8", "replace")
    index = _skip(start, 1 if start[:1] == "\ufeff" else 0)
    if start[index : index + 1] != "[":
        return None
    first = _leading_members(start[index + 1 :])
    if "responseId" in first and first["responseId"] != members["responseId"]:
        return None
    members["usage"], members["model"] = members.get("usageMetadata"), members.get("modelVersion")
    return members


#: A usage object "closes" a JSON body when at most this many bytes follow it (OpenAI's ``service_tier`` and
#: ``system_fingerprint``, the Responses API's ``user`` and ``metadata``; nothing after Anthropic's or embeddings').
_CLOSING = 12_288
#: How many occurrences of a key the last bytes of a JSON body over the cap are searched for, from its end.
_KEY_TRIES = 16
#: The id at the start of a stream event's data: a chat chunk's, or the response's of a Responses API event (its
#: ``type``, maybe its ``sequence_number``, then its ``response``: OpenAI's order of their members).
_COMPLETION_ID = re.compile(
    rb'[ \t\n]*\{[ \t\n]*("type"[ \t\n]*:[ \t\n]*"response\.[a-z_]+"[ \t\n]*,[ \t\n]*'
    rb'(?:"sequence_number"[ \t\n]*:[ \t\n]*[0-9]+[ \t\n]*,[ \t\n]*)?"response"[ \t\n]*:[ \t\n]*\{[ \t\n]*)?'
    rb'"id"[ \t\n]*:[ \t\n]*"([^"\\]{1,255})"'
)
_blanks = re.compile(r"[ \t\n\r]*")


def _usage_members(text: str, key: str) -> dict[str, Any] | None:
    """The members of the object holding the usage object ``key`` among the last characters ``text`` of a stream
    event over the cap, from that key on (a Gemini chunk's ``responseId`` follows its ``usageMetadata``). The last
    ``key`` followed by ``:`` and an object, from the end (a metadata echoed after the usage may name it, as a key or
    a value: ``{"feature": "usage"}``); ``None`` when none is."""
    for at in _key_starts(text, key, len(text)):
        members = _members(text, at)[0]  # (blanks: a line end too, the event's data lines being joined by them)
        if isinstance(members.get(key), dict):
            return members
    return None


def _key_starts(text: str, key: str, before: int) -> Iterator[int]:
    """Where the member ``key`` may start in ``text`` before ``before``, from the end: its last :data:`_KEY_TRIES`
    occurrences, those after an escaped quote left out (the end of a string: ``'"say \\"usage"'``, not a key)."""
    quoted = f'"{key}"'
    for _ in range(_KEY_TRIES):
        before = text.rfind(quoted, 0, before)
        if before < 0:
            return
        if text[before - 1 : before] != "\\":
            yield before


def _skip(text: str, index: int) -> int:
    """Where JSON's blanks from ``index`` in ``text`` end."""
    match = _blanks.match(text, index)
    return match.end() if match is not None else index


def _closing_members(text: str, key: str, before: int, within: int) -> dict[str, Any] | None:
    """The members of the top-level object that close the JSON document whose last characters are ``text``, read
    from the member ``key`` starting before ``before`` (its last occurrence from which they can be read to the
    document's end: one nested deeper is followed by the end of its own object, not the document's), its value
    followed by at most ``within`` characters; ``None`` when there is none."""
    for at in _key_starts(text, key, before):
        members, closing, first_end = _members(text, at)
        if closing and key in members and len(text) - first_end <= within:
            return members
    return None


def _leading_members(text: str) -> dict[str, Any]:
    """The top-level members that the first characters ``text`` of a JSON document hold whole (up to the first
    value cut off)."""
    index = _skip(text, 1 if text[:1] == "\ufeff" else 0)
    if text[index : index + 1] != "{":
        return {}
    return _members(text, _skip(text, index + 1))[0]


def _members(text: str, index: int) -> tuple[dict[str, Any], bool, int]:
    """The object members read from ``index`` (a key) in ``text``, whether the object and the document end after
    them (``}`` and blanks only), and where the first member's value ends."""
    members: dict[str, Any] = {}
    first_end = len(text)
    try:
        while True:
            key, index = _scan_json(text, index)
            index = _skip(text, index)
            if type(key) is not str or text[index : index + 1] != ":":
                return members, False, first_end
            value, index = _scan_json(text, _skip(text, index + 1))
            if not members:
                first_end = index
            members[key] = value
            index = _skip(text, index)
            separator = text[index : index + 1]
            if separator == "}":
                return members, _skip(text, index + 1) == len(text), first_end
            if separator != ",":
                return members, False, first_end
            index = _skip(text, index + 1)
    except (ValueError, StopIteration, RecursionError):  # cut off, or not JSON
        return members, False, first_end


def json_usage(body: bytes) -> Usage:
    """The usage a JSON response body shows (the shapes of the module's docstring), when no other source has any."""
    try:
        fast = _fast_json_usage(body)
        if fast is not None:
            return fast
        fields, source = _json_fields(body)
    except Exception:
        _internal_error("result")
        return Usage()
    return _merge((("explicit", {}), ("headers", {}), (source or "json", fields)))


#: A usage's ``(model, input_tokens, output_tokens, total_tokens)``.
UsageCounts = tuple["str | None", int, int, int]


def json_usage_counts(body: bytes) -> UsageCounts:
    """:func:`json_usage`'s model and token counts, without making a :class:`Usage` in the common case (the
    middleware's event builder: once per request)."""
    try:
        found = _fast_json_counts(body)
    except Exception:
        found = None  # (json_usage meets the same error: it logs it, and reads no usage)
    if isinstance(found, tuple):
        return found
    usage = json_usage(body) if found is None else found
    return usage.model, usage.input_tokens, usage.output_tokens, usage.total_tokens


def _json_fields(body: bytes) -> tuple[dict[str, Any], str | None]:
    if not _mentions_usage(body):
        return {}, None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8/16/32, thousands of digits, nested too deep...
        _unparseable_body()
        return {}, None
    return _payload_fields(payload)


def _payload_fields(payload: object) -> tuple[dict[str, Any], str]:
    """The usage fields of a parsed JSON body."""
    counts = _Counts()
    if type(payload) is list and payload and _gemini_chunks(payload):
        for item in payload:  # Gemini's streamGenerateContent without alt=sse: an array of cumulative answers
            _collect(item, counts)
    else:  # (any other array, records that each have a usage, is not an answer's)
        _collect(payload, counts)
    # A JSON "model" without "usage" is often not an LLM (e.g. a product model): ignored.
    return _resolve_counts(counts, "json", model_needs_usage=True), "json"


def _payload_usage(payload: object) -> Usage:
    """The usage of a parsed JSON body (:func:`json_usage`'s general path, without parsing it again)."""
    fields, source = _payload_fields(payload)
    return _merge((("explicit", {}), ("headers", {}), (source, fields)))


def _gemini_chunks(items: list[Any]) -> bool:
    """Whether a JSON array is Gemini's streamed answer: chunks of one response (the same ``responseId``), the last
    with its ``usageMetadata``; not a list of answers (a chat history's), which is not billed."""
    last = items[-1]
    if not isinstance(last, Mapping) or "usageMetadata" not in last:
        return False
    response_id = last.get("responseId")
    return all(isinstance(item, Mapping) and item.get("responseId") == response_id for item in items)


def _fast_json_usage(body: bytes) -> Usage | None:
    """The common case in a few microseconds: a JSON body with a top-level ``usage`` of plain ints; any other
    document it parsed goes to the general path's rules (same result, not parsed again). ``None`` sends a body not
    starting with ``{`` down the general path (``json.loads``)."""
    found = _fast_json_counts(body)
    return Usage(*found, "json") if isinstance(found, tuple) else found


def _fast_json_counts(body: bytes) -> Usage | UsageCounts | None:
    """:func:`_fast_json_usage`, its common case's counts as they are (a JSON usage of plain ints), not in a
    :class:`Usage`."""
    if (
        b'"usage"' not in body
        and b'"usageMetadata"' not in body
        and b'eval_count"' not in body
        and b'"billed_units"' not in body
    ):
        return Usage()  # (_mentions_usage, inlined; keys such as "usage_limit": no usage to parse the body for)
    if body[:1] != b"{":  # leading blanks, a byte-order mark...: the general path reads it as json.loads does
        return None
    try:
        text = body.decode("utf-8", "surrogatepass")  # as json.loads decodes bytes
        payload, end = _scan_json(text, 0)  # json.loads without its per-call encoding sniffing (2x faster)
    except (ValueError, StopIteration, RecursionError):
        _unparseable_body()
        return Usage()
    if end != len(text) and text[end:].strip(" \t\n\r"):  # JSON's blanks only, as json.loads
        # trailing data: json.loads would refuse the document, and the general path says so (a stream of JSON lines
        # sent as application/json, Ollama's relayed, was billed 0 tokens without a word here)
        _unparseable_body()
        return Usage()
    usage = payload.get("usage")  # (a document opening with "{" is an object: a dict)
    if type(usage) is not dict or "billed_units" in usage or "tokens" in usage:
        # Gemini's, Ollama's...; Cohere's units, billed whatever other counts a gateway puts next to them: the general
        # path's rules, parsed once
        return _payload_usage(payload)
    # (the model checked before the counts: either one not plain sends the body down the general path all the same)
    model = payload.get("model")
    if model is not None:
        try:  # a model seen before: checked then (the models answering repeat)
            known = _fast_models.get(model)
        except TypeError:  # not hashable (a list...): no model, checked below
            known = None
        if known is None:
            if type(model) is not str or not 0 < len(model) <= MAX_MODEL_LENGTH or not model.isprintable():
                return _payload_usage(payload)
            known = model.strip()
            if len(_fast_models) >= 1_000:  # bounded: a cache of the models in use
                _fast_models.clear()
            _fast_models[model] = known
        model = known or None  # blank: the general path drops it too (and logs nothing)
    input_tokens = usage.get("prompt_tokens")
    output_tokens = usage.get("completion_tokens")
    total = usage.get("total_tokens")
    if type(input_tokens) is int and type(output_tokens) is int and type(total) is int:  # the usual: OpenAI's three
        if min(input_tokens, output_tokens, total) < 0 or max(input_tokens, output_tokens, total) > MAX_TOKENS:
            return _payload_usage(payload)  # malformed: the general path logs it
        if input_tokens + output_tokens != total:  # reasoning counted apart (xAI's)?: the general path's rules
            return _payload_usage(payload)
        return model, input_tokens, output_tokens, total
    anthropic_shape = input_tokens is None
    if input_tokens is None:
        input_tokens = usage.get("input_tokens")
        if input_tokens is None or usage.get("iterations"):
            # No input count: Bedrock's or Gemini's camelCase counts are read then, next to an output_tokens too;
            # Anthropic's compaction calls may be there: the general path's rules
            return _payload_usage(payload)
    if output_tokens is None:
        output_tokens = usage.get("output_tokens")
    if not (_count_or_none(input_tokens) and _count_or_none(output_tokens) and _count_or_none(total)):
        return _payload_usage(payload)  # malformed: the general path logs it
    if anthropic_shape and ("cache_creation_input_tokens" in usage or "cache_read_input_tokens" in usage):
        cache_write, cache_read = usage.get("cache_creation_input_tokens"), usage.get("cache_read_input_tokens")
        if not (_count_or_none(cache_write) and _count_or_none(cache_read)):
            return _payload_usage(payload)
        input_tokens += (cache_write or 0) + (cache_read or 0)
    output_tokens = output_tokens or 0
    if total is None:
        return model, input_tokens, output_tokens, input_tokens + output_tokens
    if input_tokens + output_tokens != total:  # reasoning counted apart (xAI's Responses API)?: the general path's
        return _payload_usage(payload)
    return model, input_tokens, output_tokens, total


#: A valid model name of a JSON body (:func:`_fast_json_usage`) -> the model billed (stripped; blank: none).
_fast_models: dict[str, str] = {}


def _mentions_usage(body: bytes) -> bool:
    """Whether a JSON body may hold a usage: ``"usage"``, Gemini's ``"usageMetadata"``, Ollama's ``eval_count``s,
    Cohere's ``"billed_units"``."""
    return b'"usage"' in body or b'"usageMetadata"' in body or b'eval_count"' in body or b'"billed_units"' in body


def _count_or_none(value: object) -> bool:
    """``value`` is missing or a valid token count (the fast path's check; the general path explains others)."""
    return value is None or (type(value) is int and 0 <= value <= MAX_TOKENS)


def _merge(sources: tuple[tuple[str, dict[str, Any]], ...]) -> Usage:
    """Field-by-field merge, highest source first; ``total_tokens`` stays consistent with the chosen tokens."""
    usage = Usage()
    chosen: dict[str, int] = {}
    token_rank: int | None = None  # best rank that gave input or output tokens
    total: tuple[int, int] | None = None  # (rank, value)
    for rank, (name, fields) in enumerate(sources):
        if not fields:
            continue
        if usage.source is None:
            usage.source = name
        if usage.model is None and "model" in fields:
            usage.model = fields["model"]
        for field in ("input_tokens", "output_tokens"):
            if field in fields:
                if field not in chosen:
                    chosen[field] = fields[field]
                if token_rank is None:
                    token_rank = rank
        if total is None and "total_tokens" in fields:
            total = (rank, fields["total_tokens"])
    usage.input_tokens = chosen.get("input_tokens", 0)
    usage.output_tokens = chosen.get("output_tokens", 0)
    if total is not None and (token_rank is None or total[0] <= token_rank):
        usage.total_tokens = total[1]
    else:
        usage.total_tokens = usage.input_tokens + usage.output_tokens
    return usage


_internal_logged: set[str] = set()


#: The UTF-8 byte-order mark a stream may open with (which SSE ignores).
_BOM = b"\xef\xbb\xbf"
#: The marker of a stream event whose data was dropped (over the cap).
_SKIP = b"\x00skip"
#: How much longer than the cap a ``data:`` line held before its end may be: an event is over the cap by its data
#: and a line end each (``len(value) + 1``), and ``data: value`` is 6 bytes longer than its value.
_DATA_FIELD = 5
#: The last bytes of a dropped stream event looked at for its usage.
_TAIL = 65_536
_said_once: set[str] = set()


def _warn_once(key: str, message: str, *args: object) -> None:
    """A warning about usage that could not be read, once per process and ``key``."""
    if key not in _said_once:
        _said_once.add(key)
        logger.warning(message, *args)


def _cap_exceeded(what: str) -> None:
    """Usage was not read from a body over ``max_body_bytes`` (its tokens count 0)."""
    _warn_once(
        what,
        "A response %s was over AttributionConfig.max_body_bytes: its usage was not read (tokens billed 0). "
        "Raise max_body_bytes, or attribute usage explicitly (attribute_usage) or in response headers. Logged once.",
        what,
    )


def _stream_without_usage() -> None:
    """A stream from a model ended without any usage (its tokens count 0)."""
    _warn_once(
        "stream without usage",
        "A streamed response from a model ended without a usage: its tokens were billed 0. OpenAI-style chat "
        "completions streams give one only when asked (stream_options={'include_usage': True}); a stream cut off or "
        "failed before its end has none either. Else attribute usage explicitly (attribute_usage) or in response "
        "headers. Logged once.",
    )


def _encoded_body_skipped(encoding: bytes, install: str | None = None) -> None:
    """A compressed body's usage is not read (said once per encoding); ``install``: what reads it, not importable."""
    shown = encoding.decode("latin-1")
    _warn_once(
        # (one key for the encodings read by no module: a proxy passing an upstream's varying values on, kilobytes
        # each, would fill the set and the log without bound)
        f"encoding:{encoding!r}" if encoding in _CODEC_MODULES else "encoding:other",
        "A JSON or event-stream response was %s-encoded before OrgBillingMiddleware saw it: its usage was not "
        "read (tokens billed 0). %sput the billing middleware inside the compression one (app.add_middleware: add "
        "OrgBillingMiddleware before the compression middleware, so that it wraps the billing one), or attribute "
        "usage explicitly (attribute_usage) or in response headers. Logged once.",
        shown,
        f"Install {install} to read {shown} bodies (not a dependency of lago-org-billing), or "
        if install
        else "(gzip and deflate are read, br and zstd with their module installed, other encodings not): ",
    )


#: Content encodings read before the body is (the standard library's zlib).
_INFLATABLE = frozenset((b"gzip", b"x-gzip", b"deflate"))


#: A compressed body is inflated up to this many times ``max_body_bytes`` (a JSON body; each chunk of a stream): a gzip
#: bomb (deflate inflates up to 1,032 times, gzip members repeat) costs bounded memory *and* time on the event loop.
_INFLATE_FACTOR = 64
#: Where a gzip member starts; the zeros some servers pad a gzip body with (ignored, as gzip tools do).
_GZIP_MAGIC = 0x1F
_zeros = re.compile(rb"\x00*")


class _Budgeted:
    """A decoder of a response body, bounded: what it produced so far (``inflated``) may not pass ``budget``."""

    __slots__ = ("_ended", "budget", "inflated")
    budget: int | None
    inflated: int
    _ended: bool

    def _spend(self, size: int) -> None:
        self.inflated += size
        if self.budget is not None and self.inflated > self.budget:
            self._ended = True
            raise OverflowError("inflation budget exceeded")


class _Inflater(_Budgeted):
    """Decompresses a gzip or deflate response body chunk by chunk, in slices. HTTP's ``deflate`` is zlib-wrapped,
    but some servers send raw deflate: both are read. A gzip body may be several gzip members one after the other
    (valid gzip: a proxy or server compressing each chunk on its own): each is read; bytes after a member that are not
    one (zeros, junk) are ignored. Past ``budget`` inflated bytes, :class:`OverflowError` is raised."""

    __slots__ = ("_decoder", "_early", "_gzip", "_raw_fallback")

    def __init__(self, encoding: bytes, budget: int | None = None) -> None:
        gzip = encoding != b"deflate"
        self._gzip = gzip
        self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 16 if gzip else zlib.MAX_WBITS)
        self._raw_fallback = not gzip
        self._early = b""  # the first byte of a deflate body, while zlib could not tell whether it is wrapped
        self._ended = False  # the compressed stream is over, and what follows is not a gzip member: ignored
        self.budget = budget
        self.inflated = 0

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """``data`` inflated in slices of 64 KiB, as they come (used one at a time): a small chunk that inflates hugely
        costs no memory; the callers cap what they keep. The chunk is fed whole (one call, the common case); after a
        member's end the next ones are fed in slices growing from 1 KiB (zlib copies what follows a member's end: a
        chunk of thousands of tiny members costs linear time, not quadratic)."""
        if self._ended:
            return
        end = len(data)
        at = 0
        feed = end
        view: memoryview | None = None
        while at < end:
            decoder = self._decoder
            if decoder.eof:  # (a stream is never fed past its end: zlib would keep appending to unused_data)
                at = self._next_member(data, at)
                if at < 0:
                    return
                decoder = self._decoder
                feed = 1_024
            if at == 0 and feed >= end:
                given: bytes | memoryview = data
            else:
                if view is None:
                    view = memoryview(data)
                given = view[at : at + feed]
            try:
                piece = decoder.decompress(given, 65_536)
            except zlib.error:
                if not self._raw_fallback:
                    raise
                # not zlib's 2-byte header: raw deflate, read from its first byte (a first chunk of one byte was
                # taken for the header's start)
                decoder = self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                piece = decoder.decompress(self._early + bytes(given), 65_536)
                self._raw_fallback = False
                self._early = b""
            else:
                if self._raw_fallback:  # zlib tells a header from its first two bytes: until then, raw may follow
                    self._early += bytes(given[:2])
                    if len(self._early) >= 2:
                        self._raw_fallback = False
                        self._early = b""
            at += len(given)
            while True:
                if piece:
                    self._spend(len(piece))
                    yield piece
                if decoder.eof:  # (its unconsumed_tail may be stale then: feeding it again looped forever)
                    at -= len(decoder.unused_data)
                    break
                tail = decoder.unconsumed_tail
                # all input taken: zlib may still hold output (raw deflate has no trailer to wait for), asked for too
                piece = decoder.decompress(tail, 65_536) if tail else decoder.decompress(b"", 65_536)
                if not piece and not tail:
                    break
            if feed < 65_536:
                feed *= 2

    def _next_member(self, data: bytes, at: int) -> int:
        """Where the gzip member following a finished one starts in ``data`` (a fresh decoder made for it); ``-1``
        when none does in this chunk (only zeros: maybe in the next) or ever (not gzip, or junk: the rest ignored)."""
        if not self._gzip:  # zlib and raw deflate are one stream: what follows is ignored
            self._ended = True
            return -1
        match = _zeros.match(data, at)
        at = match.end() if match is not None else at
        if at == len(data):
            return -1
        if data[at] != _GZIP_MAGIC or data[at + 1 : at + 2] not in (b"", b"\x8b"):
            self._ended = True
            return -1
        self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
        return at


class _Undecodable(Exception):
    """A br or zstd body its module could not decode (as :class:`zlib.error` for gzip and deflate)."""


#: What a body that cannot be decoded raises.
_UNDECODABLE = (zlib.error, _Undecodable)
#: The content encodings read with a module that is not a dependency: the modules tried, first importable one used,
#: and what to install when none is. brotli before 1.2 cannot bound what one call outputs (a bomb): not used.
_CODEC_MODULES: dict[bytes, tuple[tuple[str, ...], str]] = {
    b"br": (("brotli", "brotlicffi"), "brotli 1.2 or later (pip install 'brotli>=1.2')"),
    b"zstd": (("compression.zstd", "backports.zstd", "zstandard"), "a zstd module (pip install zstandard)"),
}
#: Encoding -> (module name, module) of the decoder in use; ``None``: none importable (looked up once per process).
_codecs: dict[bytes, tuple[str, Any] | None] = {}
#: The largest output asked for at a time from a decoder (a slice: a bomb's chunk costs no more memory).
_SLICE = 65_536
#: The compressed bytes python-zstandard is fed at a time: its decompressobj cannot bound its output, a zstd block of a
#: few bytes gives up to 128 KiB, so a slice of 64 bytes gives at most a few MiB.
_ZSTANDARD_FEED = 64
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _codec(encoding: bytes) -> tuple[str, Any] | None:
    """The module decoding ``encoding`` (br, zstd), imported on first use; ``None`` when none is importable."""
    if encoding in _codecs:
        return _codecs[encoding]
    found: tuple[str, Any] | None = None
    for name in _CODEC_MODULES[encoding][0]:
        try:
            module = importlib.import_module(name)
            decoder = _new_decoder(name, module)
            if name.startswith("brotli"):
                decoder.process(b"", output_buffer_limit=_SLICE)  # (TypeError before 1.2)
        except Exception:  # not installed, too old, broken: the next one
            continue
        found = (name, module)
        break
    _codecs[encoding] = found
    return found


def _new_decoder(name: str, module: Any) -> Any:
    """A decompression object of the codec module ``name`` (see :data:`_CODEC_MODULES`), for one stream (one frame)."""
    if name == "zstandard":
        return module.ZstdDecompressor().decompressobj()
    if name.startswith("brotli"):
        return module.Decompressor()
    return module.ZstdDecompressor()


class _Decoder(_Budgeted):
    """Decompresses a br or zstd response body chunk by chunk, in slices, with the optional module that reads it (the
    same interface as :class:`_Inflater`): a zstd body may be several frames one after the other (each is read; bytes
    after a frame that are not one are ignored). Past ``budget`` decoded bytes, :class:`OverflowError` is raised; an
    undecodable body raises :class:`_Undecodable`."""

    __slots__ = ("_decoder", "_module", "_name")

    def __init__(self, codec: tuple[str, Any], budget: int | None = None) -> None:
        self._name, self._module = codec
        self._decoder: Any = _new_decoder(self._name, self._module)
        self._ended = False
        self.budget = budget
        self.inflated = 0

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """``data`` decoded in slices (about 64 KiB each), as they come (used one at a time)."""
        if self._ended or not data:
            return
        if self._name.startswith("brotli"):
            produce = self._brotli(data)
        elif self._name == "zstandard":
            produce = self._zstandard(data)
        else:
            produce = self._zstd(data)
        try:
            for piece in produce:
                if piece:
                    self._spend(len(piece))
                    yield piece
        except OverflowError:
            raise
        except Exception as exc:  # the module's error (or any: the recorder never raises), as zlib.error is gzip's
            self._ended = True
            raise _Undecodable(str(exc)) from exc

    def _brotli(self, data: bytes) -> Iterator[bytes]:
        decoder = self._decoder
        if decoder.is_finished():  # what follows the stream's end is ignored
            self._ended = True
            return
        yield decoder.process(data, output_buffer_limit=_SLICE)
        while not decoder.can_accept_more_data():  # (output held back at the limit: drained with empty input)
            yield decoder.process(b"", output_buffer_limit=_SLICE)

    def _next_frame(self, rest: bytes) -> bool:
        """After a zstd frame's end: whether ``rest`` (what follows it) starts another frame (a fresh decoder made);
        junk is ignored, and so is everything after it."""
        head = rest[:4]
        if not (_ZSTD_MAGIC.startswith(head) or (0x50 <= head[0] <= 0x5F and b"\x2a\x4d\x18".startswith(head[1:]))):
            self._ended = True  # not a frame, nor a skippable one (magic 0x184D2A5?): junk
            return False
        self._decoder = _new_decoder(self._name, self._module)
        return True

    def _zstd(self, data: bytes) -> Iterator[bytes]:
        """``compression.zstd`` (Python 3.14) and ``backports.zstd``: one decoder per frame, output bounded."""
        pending = data
        while True:
            decoder = self._decoder
            if decoder.eof:
                if not self._next_frame(pending):
                    return
                decoder = self._decoder
            yield decoder.decompress(pending, _SLICE)
            pending = b""
            while not decoder.eof and not decoder.needs_input:
                yield decoder.decompress(b"", _SLICE)
            if not decoder.eof:
                return
            pending = decoder.unused_data
            if not pending:
                return  # (the next chunk may start another frame)

    def _zstandard(self, data: bytes) -> Iterator[bytes]:
        """python-zstandard: its decompressobj cannot bound its output: fed a few bytes at a time."""
        view = memoryview(data)
        at = 0
        while at < len(view):
            decoder = self._decoder
            if decoder.eof:
                if not self._next_frame(bytes(view[at : at + 4])):
                    return
                decoder = self._decoder
            given = view[at : at + _ZSTANDARD_FEED]
            yield decoder.decompress(given)
            at += len(given)
            if decoder.eof:
                at -= len(decoder.unused_data)


def _decoder_of(encoding: bytes, budget: int) -> _Inflater | _Decoder | None:
    """What decodes a body of ``encoding`` (gzip, deflate; br, zstd with their module); ``None``: not read, said."""
    if encoding in _INFLATABLE:
        return _Inflater(encoding, budget)
    if encoding in _CODEC_MODULES:
        codec = _codec(encoding)
        if codec is not None:
            return _Decoder(codec, budget)
        _encoded_body_skipped(encoding, _CODEC_MODULES[encoding][1])
        return None
    _encoded_body_skipped(encoding)
    return None


def _inflation_budget_exceeded() -> None:
    _warn_once(
        "inflation budget",
        "A compressed (gzip, deflate, br or zstd) response inflated past %d times AttributionConfig.max_body_bytes (a "
        "whole JSON body, or one chunk of a stream): it was not read further, its usage not read (tokens billed as "
        "counted so far). Raise max_body_bytes if such bodies are legitimate, or attribute usage explicitly "
        "(attribute_usage) or in response headers. Logged once.",
        _INFLATE_FACTOR,
    )


#: An event-stream frame's prelude: its total length, its headers' length, their CRC32 (big-endian).
_PRELUDE = struct.Struct(">III")
#: The sizes of the event-stream header values of fixed size, by type (0, 1: booleans, no value).
_HEADER_SIZES = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}


def _frame_headers(message: bytes, at: int, end: int) -> dict[bytes, bytes] | None:
    """The string headers of an event-stream frame (``None`` when malformed): a name length (1 byte), the name, a value
    type (1 byte), the value (strings and byte arrays: their length on 2 bytes first)."""
    headers: dict[bytes, bytes] = {}
    try:
        while at < end:
            length = message[at]
            name = message[at + 1 : at + 1 + length]
            at += 1 + length
            kind = message[at]
            at += 1
            if kind == 6 or kind == 7:
                size = int.from_bytes(message[at : at + 2], "big")
                if kind == 7:
                    headers[name] = message[at + 2 : at + 2 + size]
                at += 2 + size
            else:
                at += _HEADER_SIZES[kind]
    except (IndexError, KeyError):
        return None
    return headers if at == end else None


def _close_call(counts: _Counts, raw: dict[str, Any]) -> None:
    """A call's final usage (a Bedrock stream's ``metadata`` event or invocation metrics): it replaces what its
    events counted so far, and the call is done (the next call of a relayed stream adds up)."""
    counts.done.append(raw)
    counts.latest = {}


def _unreadable_event_stream() -> None:
    _warn_once(
        "eventstream",
        "An application/vnd.amazon.eventstream response had a frame whose prelude CRC did not match (corrupt, or not "
        "an event stream): its usage was not read further (tokens billed as counted so far). Logged once.",
    )


def _undecodable_body() -> None:
    _warn_once(
        "undecodable",
        "A compressed (gzip, deflate, br or zstd) JSON or event-stream response could not be decompressed: its usage "
        "was not read (tokens billed 0). Logged once.",
    )


def _unparseable_body() -> None:
    _warn_once(
        "unparseable",
        'A response declared as JSON mentions "usage" but could not be parsed as JSON (invalid, not UTF-8, '
        "a number too long, several JSON documents: a stream of JSON lines should be sent as application/x-ndjson, "
        "read line by line...): its usage was not read (tokens billed 0). Logged once.",
    )


def _internal_error(where: str) -> None:
    if where in _internal_logged:
        return
    _internal_logged.add(where)
    logger.exception("Usage attribution failed in %s; falling back to explicit and header values.", where)
