"""Memory and cardinality bounds under hostile or unusual traffic: what a client (an attacker, or a buggy client) can
make the package hold without end. Measured with ``len()`` of the internal structures and ``tracemalloc``, never
by timing.

Covered: org and user ids from headers (a flood of distinct ids, values padded to kilobytes with whitespace that
``str.strip`` removes), Bearer JWTs (valid, badly signed, expired, each distinct), webhook deliveries (a flood of
distinct ``X-Lago-Unique-Key``\\s, kilobyte-long keys on a signed body), request bodies that lie about their size
(webhooks and ``billing_routes``), and the Prometheus series a flood of distinct orgs, paths and models adds.
"""

from __future__ import annotations

import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware, _identity as identity_module, billing_routes
from lago_org_billing._identity import MAX_ID_LENGTH, default_identity, from_jwt_claim
from lago_org_billing._webhooks import LagoWebhooks, MemoryDedupe, RedisDedupe, sign_hmac

pytestmark = pytest.mark.anyio

HMAC_KEY = "memory-bounds-hmac-key"
JWT_SECRET = "memory-bounds-secret-long-enough-for-hs256"
SETTINGS = BillingSettings(api_url="http://lago.test", api_key="secret-api-key", max_retries=0)
HEADER_SETTINGS = SETTINGS.replace(org_header="X-Org-Id", user_header="X-User-Id")
#: Latin-1 bytes an HTTP server passes in a header value (obs-text, not blanks to h11), that ``str.strip`` removes.
PADDING = b"\xa0"


@pytest.fixture(autouse=True)
def _empty_header_cache() -> Iterator[None]:
    identity_module._header_ids.clear()
    yield
    identity_module._header_ids.clear()


def _cached_bytes() -> int:
    return sum(len(raw) + len(ident) for raw, ident in identity_module._header_ids.items())


# ------------------------------------------------------------------------------------------ header ids


async def test_org_ids_padded_with_blanks_are_not_cached_whole(fake_lago: Any, header_settings: Any) -> None:
    """The hot path remembers header value -> id (10,000 values at most) so that the active orgs are not cleaned
    again on every request. It kept the *raw* value: ``org_a`` followed by 16 KB of ``\\xa0`` (obs-text, which
    HTTP servers pass on and ``str.strip`` removes) is a valid id, so each distinct padding was cached whole.
    Observed: 10,000 such requests would hold 10,000 x 16 KB (160 MB; 640 MB with 64 KB headers). Expected: what
    the cache holds per value stays around an id's size; the requests are still billed to org_a."""
    seen: list[tuple[str | None, str | None]] = []

    async def endpoint(request: Request) -> Response:
        seen.append((request.state.billing_org_id, request.state.billing_user_id))
        return JSONResponse({"ok": True})

    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/v1/chat", endpoint)]), header_settings, transport=fake_lago.transport(), quota=None
    )
    requests = 40
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            for index in range(requests):
                padding = PADDING * (16_000 + index)
                headers = [(b"x-org-id", b"org_a" + padding), (b"x-user-id", b"user_1" + padding)]
                assert (await client.get("/v1/chat", headers=headers)).status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert seen == [("org_a", "user_1")] * requests
    assert len(fake_lago.events) == requests
    assert max((len(raw) for raw in identity_module._header_ids), default=0) <= MAX_ID_LENGTH
    assert _cached_bytes() <= requests * 4 * MAX_ID_LENGTH


def test_a_flood_of_distinct_header_ids_stays_under_the_cache_cap() -> None:
    """50,000 distinct org and user ids from headers: the value -> id cache stays at 10,000 entries at most, each
    an id's size (about 10,000 x 2 x 255 bytes at worst), and every id still resolves."""
    resolve = default_identity(HEADER_SETTINGS)
    for index in range(50_000):
        org, user = f"org-{index:06d}-{'x' * 200}", f"user-{index}"
        scope = {"type": "http", "headers": [(b"x-org-id", org.encode()), (b"x-user-id", user.encode())]}
        assert resolve(scope) == (org, user)
        assert len(identity_module._header_ids) <= 10_000
    assert _cached_bytes() <= 10_000 * 2 * MAX_ID_LENGTH


def test_a_64_kb_header_id_is_unresolved_and_not_kept() -> None:
    """An org id of 64 KB is no id (over 255 characters): unresolved, and nothing of it is kept."""
    resolve = default_identity(HEADER_SETTINGS)
    for index in range(50):
        huge = f"{index}-".encode() + b"o" * 65_536
        assert resolve({"type": "http", "headers": [(b"x-org-id", huge), (b"x-user-id", huge)]}) == (None, None)
    assert identity_module._header_ids == {}


# ------------------------------------------------------------------------------------------------- JWT


def test_a_flood_of_distinct_jwts_leaves_nothing_behind() -> None:
    """6,000 distinct Bearer tokens (valid, badly signed, expired), each in its own request scope: the verified
    claims are cached in the scope only, so nothing grows with the number of tokens (measured with tracemalloc)."""
    org = from_jwt_claim(key=JWT_SECRET)
    user = from_jwt_claim("sub", key=JWT_SECRET)
    now = int(time.time())
    tokens: list[tuple[bytes, str | None]] = []
    for index in range(2_000):
        claims = {"org_id": f"org-{index}", "sub": f"user-{index}"}
        tokens.append((jwt.encode(claims, JWT_SECRET, algorithm="HS256").encode(), f"org-{index}"))
        tokens.append((jwt.encode(claims, "not-the-secret-but-as-long-as-it", algorithm="HS256").encode(), None))
        expired = {**claims, "exp": now - 3600}
        tokens.append((jwt.encode(expired, JWT_SECRET, algorithm="HS256").encode(), None))
    cache_ids = len(identity_module._jwt_cache_ids)

    def run() -> None:
        for token, expected in tokens:
            scope: dict[str, Any] = {"type": "http", "headers": [(b"authorization", b"Bearer " + token)]}
            assert org(scope) == expected
            assert user(scope) == (None if expected is None else expected.replace("org", "user"))

    run()  # (warm: first-use allocations of PyJWT and the like)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(identity_module._jwt_cache_ids) == cache_ids
    assert retained < 200_000  # the tokens alone are over 1 MB


# -------------------------------------------------------------------------------------------- webhooks


def _body(index: int = 0) -> bytes:
    return (
        b'{"webhook_type":"invoice.created","object_type":"invoice","organization_id":"lago-org",'
        b'"invoice":{"lago_id":"inv-%d","external_customer_id":"org_a"}}' % index
    )


def _headers(body: bytes, unique_key: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"x-lago-signature", sign_hmac(body, HMAC_KEY).encode()),
        (b"x-lago-signature-algorithm", b"hmac"),
        (b"x-lago-unique-key", unique_key),
    ]


@pytest.fixture
async def webhook_client() -> AsyncIterator[tuple[httpx.AsyncClient, LagoWebhooks, list[str]]]:
    runs: list[str] = []

    async def handler(event: Any) -> None:
        runs.append(event.object["lago_id"])

    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), handlers={"*": handler})
    app = Starlette(routes=[Route("/webhooks/lago", receiver, methods=["POST"])])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
        yield client, receiver, runs


async def test_kilobyte_unique_keys_are_not_kept_whole(
    webhook_client: tuple[httpx.AsyncClient, LagoWebhooks, list[str]],
) -> None:
    """``X-Lago-Unique-Key`` is not covered by the signature, and the dedupe store kept it as sent: a signed
    delivery (one captured, or a Lago delivery through a proxy that mangles it) sent again with distinct 16 KB keys
    filled the store with 16 KB entries (its cap counts entries: 100,000 x 16 KB = 1.6 GB; Redis keys of that size
    for 7 days). Expected: what the store keeps per key stays small (Lago's keys are UUIDs); a retry with the same
    long key is still a duplicate."""
    client, receiver, runs = webhook_client
    body = _body()
    deliveries = 40
    for index in range(deliveries):
        unique_key = f"{index}-".encode() + b"k" * 16_000
        response = await client.post("/webhooks/lago", content=body, headers=_headers(body, unique_key))
        assert response.status_code == 200, response.text
    again = await client.post("/webhooks/lago", content=body, headers=_headers(body, b"0-" + b"k" * 16_000))
    assert again.json()["status"] == "duplicate"
    dedupe = receiver._dedupe
    assert isinstance(dedupe, MemoryDedupe)
    assert len(dedupe) == deliveries
    assert max(len(key) for key in dedupe._done) <= 255
    assert dedupe._processing == {}
    assert len(runs) == deliveries


async def test_uuid_unique_keys_are_kept_as_they_are(
    webhook_client: tuple[httpx.AsyncClient, LagoWebhooks, list[str]],
) -> None:
    """Lago's own keys (UUIDs) are stored as sent (what an operator looks for in Redis), and deduplicated."""
    client, receiver, runs = webhook_client
    key = str(uuid.uuid4())
    for _ in range(2):
        response = await client.post("/webhooks/lago", content=_body(), headers=_headers(_body(), key.encode()))
        assert response.status_code == 200
    assert isinstance(receiver._dedupe, MemoryDedupe)
    assert list(receiver._dedupe._done) == [key]
    assert runs == ["inv-0"]


async def test_redis_dedupe_keys_of_long_unique_keys_stay_small(redis_url: str) -> None:
    """In Redis (shared by the workers), the name of a long unique key's entry is bounded too."""
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.from_url(redis_url)
    prefix = f"memory-bounds-{uuid.uuid4().hex}:"
    receiver = LagoWebhooks(
        SETTINGS.replace(webhook_hmac_key=HMAC_KEY), dedupe=RedisDedupe(client=client, prefix=prefix)
    )
    app = Starlette(routes=[Route("/webhooks/lago", receiver, methods=["POST"])])
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            for index in range(5):
                unique_key = f"{index}-".encode() + b"r" * 16_000
                response = await http.post("/webhooks/lago", content=_body(), headers=_headers(_body(), unique_key))
                assert response.json()["status"] == "ignored"
            response = await http.post(
                "/webhooks/lago", content=_body(), headers=_headers(_body(), b"0-" + b"r" * 16_000)
            )
            assert response.json()["status"] == "duplicate"
        names = [name async for name in client.scan_iter(match=prefix + "*")]
        assert len(names) == 5
        assert max(len(name) for name in names) <= len(prefix) + 255
    finally:
        await client.aclose()


async def test_a_flood_of_distinct_deliveries_stays_under_the_dedupe_cap() -> None:
    """50,000 distinct deliveries processed: the memory dedupe holds at most ``maxsize`` of them (the oldest go
    first) and nothing stays "processing"."""
    dedupe = MemoryDedupe(maxsize=1_000)
    for index in range(50_000):
        key = str(uuid.UUID(int=index))
        assert await dedupe.claim(key) == "new"
        if index % 2:
            await dedupe.complete(key)
        else:
            await dedupe.release(key)  # (a handler failed: Lago retries it)
    assert len(dedupe) <= 1_000
    assert dedupe._processing == {}


class _Endless:
    """An ASGI ``receive`` streaming a body that never ends, in 64 KiB chunks; counts what was pulled."""

    def __init__(self) -> None:
        self.pulled = 0

    async def __call__(self) -> dict[str, Any]:
        self.pulled += 1
        if self.pulled > 2_000:  # 125 MiB: the reader should have stopped long before
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": b"x" * 65_536, "more_body": True}


async def _call(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, _Endless]:
    receive = _Endless()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("app", 80),
    }
    await app(scope, receive, send)
    return sent[0]["status"], receive


@pytest.mark.parametrize("length", [None, b"10"])
async def test_a_webhook_body_streamed_without_end_stops_at_the_cap(length: bytes | None) -> None:
    """A webhook body with no Content-Length, or one that says 10 bytes, streamed without end: read up to the
    receiver's ``max_body_size`` and answered 413, not until memory runs out."""
    receiver = LagoWebhooks(SETTINGS.replace(webhook_hmac_key=HMAC_KEY), max_body_size=1024 * 1024)
    headers = [(b"x-lago-signature", b"anything"), (b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", length))
    status, receive = await _call(receiver, "/", headers)
    assert status == 413
    assert receive.pulled <= 1024 * 1024 // 65_536 + 1


@pytest.mark.parametrize("length", [None, b"10"])
async def test_a_billing_route_body_streamed_without_end_stops_at_the_cap(length: bytes | None) -> None:
    """The same for ``billing_routes`` (64 KiB by default): 413 after two chunks at most."""
    routes = billing_routes(authorize=lambda request, org_id: True, settings=SETTINGS)
    app = Starlette(routes=[Mount("/billing", routes)])
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", length))
    status, receive = await _call(app, "/billing/organizations/org_a/usage/record", headers)
    assert status == 413
    assert receive.pulled <= 2


# ----------------------------------------------------------------------------------------- Prometheus


async def test_distinct_orgs_paths_and_models_add_no_prometheus_series(fake_lago: Any) -> None:
    """Every label set is a time series kept forever by Prometheus: org ids, paths (unmatched ones included) and
    model names chosen by the client must not be labels. 200 requests, each of another org, path and model, export
    the same series as 5 requests of one."""
    prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")

    async def chat(request: Request) -> Response:
        return JSONResponse({"model": request.query_params.get("model"), "usage": {"total_tokens": 3}})

    registry = prometheus_client.CollectorRegistry()
    settings = BillingSettings(
        api_url=fake_lago.base_url, api_key=fake_lago.api_key, org_header="X-Org-Id", retry_backoff=0.001
    )
    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/v1/{name}", chat)]),
        settings,
        transport=fake_lago.transport(),
        quota=None,
        metrics_registry=registry,
    )

    def series() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        return {(s.name, tuple(sorted(s.labels.items()))) for m in registry.collect() for s in m.samples}

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            for _ in range(5):
                await client.get("/v1/chat?model=gpt", headers={"X-Org-Id": "org_a"})
                await client.get("/nowhere", headers={"X-Org-Id": "org_a"})
            assert await middleware.pipeline.flush(5)
            before = series()
            for index in range(200):
                org = {"X-Org-Id": f"org-{index}"}
                await client.get(f"/v1/chat-{index}?model=model-{index}", headers=org)
                await client.get(f"/nowhere/{index}", headers=org)
            assert await middleware.pipeline.flush(5)
            after = series()
    finally:
        await middleware.aclose()
    assert after == before
    assert registry.get_sample_value("lago_billing_requests_billed_total") == 205
    assert registry.get_sample_value("lago_billing_requests_unrouted_total") == 205
