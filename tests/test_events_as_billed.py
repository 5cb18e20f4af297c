"""The api_call event as Lago receives and bills it (filters on model and endpoint, types, durations), and the JSON
attribution feeding it (bodies over the cap, whole numbers with a decimal point)."""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware, _middleware as middleware_module
from lago_org_billing._attribution import AttributionConfig, Usage, UsageRecorder, reset_warnings

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a", "X-User-Id": "ada"}


@pytest.fixture(autouse=True)
def _reset_attribution_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake_lago.add_plan(
        "starter",
        amount_cents=0,
        charges=[{"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "1"}}],
    )
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    return BillingSettings(
        api_url=fake_lago.base_url,
        api_key=fake_lago.api_key,
        org_header="X-Org-Id",
        user_header="X-User-Id",
        quota_mode="off",
        retry_backoff=0.001,
    )


async def billed_events(app: Any, fake_lago: Any, settings: BillingSettings, *paths: str, **kwargs: Any) -> list[Any]:
    """Send GET ``paths`` through the middleware around ``app``; the properties of the events Lago received."""
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport(), **kwargs)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            for path in paths:
                await client.get(path, headers=HEADERS)
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return [event["properties"] for event in fake_lago.events]


# -- duration ------------------------------------------------------------------------------------------------------


class SteppedClocks:
    """The middleware's clocks (its module's ``time``): the wall clock, which NTP or a resumed VM steps, and the
    monotonic one, which only runs on. The endpoint steps the wall clock and takes ``took`` seconds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.wall = 1_767_225_600.0
        self.mono = 5_000.0
        monkeypatch.setattr(
            middleware_module, "time", types.SimpleNamespace(time=lambda: self.wall, monotonic=lambda: self.mono)
        )

    def app(self, step: float, took: float) -> Starlette:
        async def ok(request: Request) -> Response:
            self.wall += step + took
            self.mono += took
            return JSONResponse({"ok": True})

        return Starlette(routes=[Route("/ok", ok)])


@pytest.mark.parametrize(
    "step",
    [-0.5, -3_600.0, 3 * 86_400.0, 0.0],
    ids=["NTP-back-half-a-second", "back-an-hour", "forward-three-days-VM-resumed", "no-step"],
)
@pytest.mark.parametrize("hooked", [False, True], ids=["template", "event_properties-hook"])
async def test_a_wall_clock_stepped_while_a_request_runs_bills_the_time_it_took(
    fake_lago: Any, settings: BillingSettings, monkeypatch: pytest.MonkeyPatch, step: float, hooked: bool
) -> None:
    """The wall clock stepped while a request runs (NTP, a VM resumed, a container's clock synced) made its
    ``duration_ms`` what the step made it: 0 for a step back (a ``sum_agg`` / ``max_agg`` metric on it, compute-time
    billing, lost the request's time), days for a step forward (billed for days). The duration is the monotonic
    clock's; the timestamp stays the wall clock's at the start (Lago bills the event in the period it names)."""
    clocks = SteppedClocks(monkeypatch)
    hook = {"event_properties": lambda scope, identity: {"region": "eu"}} if hooked else {}
    [props] = await billed_events(clocks.app(step, took=0.25), fake_lago, settings, "/ok", **hook)
    assert props["duration_ms"] == 250
    assert fake_lago.events[0]["timestamp"] == "2026-01-01T00:00:00.000Z"  # (as the emulator keeps it)
    assert props.get("region") == ("eu" if hooked else None)


# -- token values ---------------------------------------------------------------------------------------------------


def record(
    body: bytes, headers: list[tuple[bytes, bytes]] | None = None, config: AttributionConfig | None = None
) -> Usage:
    recorder = UsageRecorder({"type": "http"}, config or AttributionConfig())
    recorder.response_start(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    recorder.response_body(body)
    return recorder.result()


@pytest.mark.parametrize("value", [b"1500.0", b"1500.00", b" 1500.0 "])
async def test_a_whole_number_written_with_a_decimal_point_is_a_token_count(value: bytes) -> None:
    """``X-Tokens-Used: 1500.0`` (``str(float)`` in the app) billed 0 tokens, while a JSON ``1500.0`` counts 1500."""
    usage = record(b"{}", headers=[(b"x-tokens-used", value)])
    assert usage.total_tokens == 1500


async def test_a_json_string_whole_number_with_a_decimal_point_is_a_token_count() -> None:
    body = json.dumps({"model": "m", "usage": {"prompt_tokens": "12.0", "completion_tokens": 3}}).encode()
    assert record(body) == Usage("m", 12, 3, 15, "json")


@pytest.mark.parametrize("value", [b"12.5", b"1e3", b"-1.0", b".0", b"12.", b"1" * 10 + b".0", b"12.0.0", b"NaN"])
async def test_fractions_and_other_strings_stay_malformed(value: bytes, caplog: pytest.LogCaptureFixture) -> None:
    usage = record(b"{}", headers=[(b"x-tokens-used", value)])
    assert usage.total_tokens == 0 and "malformed total_tokens" in caplog.text


# -- large JSON bodies: the usage closing them -----------------------------------------------------------------------


def embeddings_body(inputs: int = 100, dimensions: int = 1536) -> bytes:
    """An OpenAI ``/v1/embeddings`` answer: the vectors, then the model and the usage (last)."""
    vector = [-0.006929283495992422 + i * 1e-9 for i in range(dimensions)]
    return json.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(inputs)],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 8123, "total_tokens": 8123},
        }
    ).encode()


async def test_a_batch_embeddings_answer_over_the_json_cap_is_billed_its_tokens(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """An embeddings call with 100 inputs answers ~3.5 MB of vectors with its usage at the end: over the 1 MiB cap,
    its tokens were billed 0 (RAG ingestion, the bulk of embeddings traffic, unbilled)."""
    body = embeddings_body()
    assert len(body) > 3 * AttributionConfig().max_body_bytes

    async def embeddings(request: Request) -> Response:
        return Response(body, media_type="application/json")

    app = Starlette(routes=[Route("/v1/embeddings", embeddings)])
    [props] = await billed_events(app, fake_lago, settings, "/v1/embeddings")
    assert (props["model"], props["input_tokens"], props["total_tokens"]) == ("text-embedding-3-small", 8123, 8123)


@pytest.mark.parametrize("chunk", [1_000, 65_536, 10**9])
@pytest.mark.parametrize("with_length", [False, True])
async def test_the_usage_closing_an_oversized_json_body_is_read(chunk: int, with_length: bool) -> None:
    """Read from the body's last bytes whatever the chunking, with or without a Content-Length over the cap; the
    body itself is not kept."""
    body = embeddings_body(inputs=40)
    config = AttributionConfig(max_body_bytes=100_000)
    recorder = UsageRecorder({"type": "http"}, config)
    headers = [(b"content-type", b"application/json")]
    if with_length:
        headers.append((b"content-length", str(len(body)).encode()))
    recorder.response_start({"type": "http.response.start", "status": 200, "headers": headers})
    for start in range(0, len(body), chunk):
        recorder.response_body(body[start : start + chunk])
    assert recorder.result() == Usage("text-embedding-3-small", 8123, 0, 8123, "json")


async def test_an_oversized_chat_completion_keeps_its_model_from_the_start() -> None:
    """A chat completion over the cap (a long JSON-mode answer): model from its first bytes, usage from its last."""
    body = json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": 'x "model": "no" ' * 20_000}}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 70_000, "total_tokens": 70_030},
        }
    ).encode()
    usage = record(body, config=AttributionConfig(max_body_bytes=50_000))
    assert usage == Usage("gpt-4o-2024-08-06", 30, 70_000, 70_030, "json")


async def test_an_oversized_json_body_without_usage_at_its_end_still_says_so(caplog: pytest.LogCaptureFixture) -> None:
    body = json.dumps({"usage": {"prompt_tokens": 5}, "data": ["x" * 200_000]}).encode()
    assert record(body, config=AttributionConfig(max_body_bytes=100_000)) == Usage()
    assert "over AttributionConfig.max_body_bytes" in caplog.text


async def test_a_usage_object_not_closing_an_oversized_json_body_is_not_read(caplog: pytest.LogCaptureFixture) -> None:
    """Only a usage object closing the body (at most 12 KiB after it) is trusted: one followed by more data is not."""
    body = json.dumps({"usage": {"prompt_tokens": 5}, "data": "x" * 14_000}).encode()
    assert record(body, config=AttributionConfig(max_body_bytes=1_000)) == Usage()
    assert "over AttributionConfig.max_body_bytes" in caplog.text


@pytest.mark.parametrize("cap", [50_000, 400_000])
@pytest.mark.parametrize("with_length", [False, True])
async def test_the_usage_closing_an_oversized_compressed_json_body_is_read(cap: int, with_length: bool) -> None:
    """The same for a body gzipped by a middleware inside the billing one: compressed over the cap (50 KB), or only
    once inflated (400 KB); inflated as it comes, only its ends kept."""
    import gzip

    body = embeddings_body(inputs=40)
    packed = gzip.compress(body)
    assert cap < len(body) and (len(packed) > cap) == (cap == 50_000)
    recorder = UsageRecorder({"type": "http"}, AttributionConfig(max_body_bytes=cap))
    headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
    if with_length:
        headers.append((b"content-length", str(len(packed)).encode()))
    recorder.response_start({"type": "http.response.start", "status": 200, "headers": headers})
    for start in range(0, len(packed), 4_096):
        recorder.response_body(packed[start : start + 4_096])
    assert recorder.deferred() == Usage("text-embedding-3-small", 8123, 0, 8123, "json")


async def test_a_corrupt_oversized_compressed_json_body_bills_zero_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = UsageRecorder({"type": "http"}, AttributionConfig(max_body_bytes=10))
    headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
    recorder.response_start({"type": "http.response.start", "status": 200, "headers": headers})
    recorder.response_body(b"\x1f\x8b not gzip at all")
    assert recorder.result() == Usage() and "could not be decompressed" in caplog.text


# -- what Lago bills ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("root_path", ["", "/proxy"])
async def test_charge_filters_on_model_and_endpoint_bill_as_written(fake_lago: Any, root_path: str) -> None:
    """A metric filtered on ``model`` and ``endpoint``, the values written as the provider names the model and as the
    route is declared (mounts included, whatever the proxy's root path): each call lands in the most specific bucket."""
    fake_lago.add_billable_metric(
        "api_call",
        aggregation_type="sum_agg",
        field_name="total_tokens",
        filters=[
            {"key": "model", "values": ["gpt-4o", "claude-sonnet-4-5"]},
            {"key": "endpoint", "values": ["/v1/{tenant}/chat/{chat_id}"]},
        ],
    )
    charge = {
        "billable_metric_code": "api_call",
        "charge_model": "standard",
        "properties": {"amount": "1"},
        "filters": [
            {"values": {"model": ["gpt-4o"]}, "properties": {"amount": "2"}, "invoice_display_name": "gpt-4o"},
            {
                "values": {"model": ["gpt-4o"], "endpoint": ["/v1/{tenant}/chat/{chat_id}"]},
                "properties": {"amount": "3"},
                "invoice_display_name": "gpt-4o chat",
            },
        ],
    }
    fake_lago.add_plan("metered", amount_cents=0, charges=[charge])
    fake_lago.add_subscription("org_a", "metered", external_id="org_a")
    settings = BillingSettings(
        api_url=fake_lago.base_url, api_key=fake_lago.api_key, org_header="X-Org-Id", quota_mode="off"
    )

    async def answer(request: Request) -> Response:
        model = request.query_params["model"]
        return JSONResponse({"model": model, "usage": {"prompt_tokens": 7, "completion_tokens": 3}})

    app = Starlette(
        routes=[Route("/v1/complete", answer), Mount("/v1/{tenant}", routes=[Route("/chat/{chat_id}", answer)])]
    )
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    transport = httpx.ASGITransport(app=middleware, root_path=root_path)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for path in ("/v1/acme/chat/1?model=gpt-4o", "/v1/complete?model=gpt-4o", "/v1/beta/chat/2?model=o3"):
                assert (await client.get(root_path + path, headers={"X-Org-Id": "org_a"})).status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    [usage] = fake_lago.usage("org_a", "org_a")["customer_usage"]["charges_usage"]
    buckets = {bucket["invoice_display_name"]: bucket["units"] for bucket in usage["filters"]}
    assert buckets == {"gpt-4o": "10.0", "gpt-4o chat": "10.0"}
    assert usage["units"] == "30.0" and usage["amount_cents"] == (10 * 2 + 10 * 3 + 10 * 1) * 100


async def test_a_generated_image_answered_as_json_is_billed_its_tokens() -> None:
    """``/v1/images/generations`` (gpt-image-1) answers the image in base64, megabytes, then its usage: its tokens were
    billed 0 (the streamed form was read, not this one)."""
    body = json.dumps(
        {
            "created": 1_767_225_600,
            "data": [{"b64_json": "iVBORw0KGgo" * 200_000}],
            "output_format": "png",
            "size": "1024x1024",
            "usage": {
                "input_tokens": 50,
                "input_tokens_details": {"image_tokens": 40, "text_tokens": 10},
                "output_tokens": 4160,
                "total_tokens": 4210,
            },
        }
    ).encode()
    assert len(body) > AttributionConfig().max_body_bytes
    assert record(body) == Usage(None, 50, 4160, 4210, "json")
