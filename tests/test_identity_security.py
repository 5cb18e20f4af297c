"""Identity, security side: what the JWT resolver leaves in the request scope, verification settings that could
never accept a token, and excluded paths followed by dot segments."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing import BillingSettings, ConfigurationError, OrgBillingMiddleware
from lago_org_billing._identity import from_jwt_claim, reset_warnings

pytestmark = pytest.mark.anyio

SECRET = "review-secret-that-is-long-enough-for-hs256"


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


def bearer_scope(token: str) -> dict[str, Any]:
    return {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode("latin-1"))]}


# ------------------------------------------------------------------------- the HMAC secret stays out of the scope


async def test_jwt_hmac_secret_is_not_left_in_the_request_scope(fake_lago: Any) -> None:
    """``from_jwt_claim`` caches the verified claims in the scope, keyed by the verification settings. The key held
    the HMAC secret itself: every request's ``request.scope`` (seen by every middleware, debug page, error reporter
    or log line that prints the scope) carried the secret that signs the tokens, i.e. what lets anyone mint a token
    for any org. Observed: the secret in ``repr(request.scope)``. Expected: not there; the org and the user read
    from one token still verify it once."""
    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription("acme", "starter", external_id="acme")
    seen: dict[str, Any] = {}

    async def endpoint(request: Request) -> Response:
        seen["leaks"] = SECRET in repr(request.scope)
        return JSONResponse({"ok": True})

    settings = BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)
    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/v1/chat", endpoint)]),
        settings,
        resolve_org=from_jwt_claim(key=SECRET),
        resolve_user=from_jwt_claim("sub", key=SECRET),
        transport=fake_lago.transport(),
        quota=None,
    )
    token = jwt.encode({"org_id": "acme", "sub": "u1"}, SECRET, algorithm="HS256")
    try:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.get("/v1/chat", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert [(e["external_subscription_id"], e["properties"].get("user_id")) for e in fake_lago.events] == [
        ("acme", "u1")
    ]
    assert seen == {"leaks": False}


def test_jwt_claims_cache_still_shared_by_equal_settings_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The opaque cache id keeps what the key gave: one verification for resolvers with the same settings, a
    separate one when a setting (here the audience) differs."""
    calls: list[str] = []
    real_decode = jwt.decode

    def counting_decode(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real_decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    scope = bearer_scope(jwt.encode({"org_id": "acme", "sub": "u1", "aud": "api"}, SECRET, algorithm="HS256"))
    assert from_jwt_claim(key=SECRET, audience="api")(scope) == "acme"
    assert from_jwt_claim("sub", key=SECRET, audience="api")(scope) == "u1"
    assert len(calls) == 1
    assert from_jwt_claim(key=SECRET, audience="other")(scope) is None
    assert from_jwt_claim(key=SECRET)(scope) is None  # an audience in the token, none expected: PyJWT refuses
    assert from_jwt_claim(key=SECRET + "x", audience="api")(scope) is None
    assert len(calls) == 4


# ------------------------------------------------------------------ settings that could never accept any token


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("audience", []),
        ("audience", ()),
        ("audience", ""),
        ("audience", b"api"),
        ("audience", ["api", 3]),
        ("audience", ["api", ""]),
        ("issuer", []),
        ("issuer", ""),
        ("issuer", ["https://idp.test", ""]),
    ],
)
def test_jwt_audience_or_issuer_that_no_token_can_match_is_a_configuration_error(option: str, value: Any) -> None:
    """The docstring: "What could never verify a token is a ConfigurationError saying what to pass". An empty
    list of accepted audiences or issuers (a list built from an unset environment variable, ``[]``), an empty name
    or ``b"api"`` (read as the audiences 97, 112, 105) accept no token at all: every request was unresolved, served
    unbilled and ungated under the default ``LAGO_ON_UNRESOLVED=allow``, with the reason logged at DEBUG only.
    Observed: no error, every token refused. Expected: a ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match=option):
        from_jwt_claim(key=SECRET, **{option: value})


def test_jwt_audience_and_issuer_lists_still_accepted() -> None:
    """What the check lets through keeps working: one name, a list or a tuple of names."""
    token = jwt.encode({"org_id": "acme", "aud": "api", "iss": "https://b.test"}, SECRET, algorithm="HS256")
    scope = bearer_scope(token)
    for audience in ("api", ["web", "api"], ("api",)):
        for issuer in ("https://b.test", ["https://a.test", "https://b.test"], ("https://b.test",)):
            assert from_jwt_claim(key=SECRET, audience=audience, issuer=issuer)(scope) == "acme"
    assert from_jwt_claim(key=SECRET, audience=["web"], issuer="https://b.test")(scope) is None
    assert from_jwt_claim(key=SECRET, audience="api", issuer=["https://a.test"])(scope) is None


# --------------------------------------------------------------------------------- excluded paths and dot segments


async def test_excluded_prefix_followed_by_dot_segments_is_billed(fake_lago: Any) -> None:
    """ASGI servers (uvicorn, hypercorn) pass a request target's dot segments through as sent
    (``curl --path-as-is``), and Starlette routes on the path as it is. ``LAGO_EXCLUDE_PATHS=/health`` then
    excludes ``/health/../v1/chat``: for an app with a catch-all route (an LLM gateway forwarding
    ``/{path:path}`` upstream with httpx, which removes dot segments), the client gets ``/v1/chat`` served
    unbilled and ungated. A path with ``.``/``..`` segments is never taken as excluded (billed as any
    other; a real health check never sends them)."""
    fake_lago.add_plan("starter", amount_cents=0)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")

    async def forward(request: Request) -> Response:
        return JSONResponse({"upstream": httpx.URL("http://upstream/" + request.path_params["rest"]).path})

    settings = BillingSettings(
        api_url=fake_lago.base_url,
        api_key=fake_lago.api_key,
        retry_backoff=0.001,
        org_header="X-Org-Id",
        exclude_paths=("/health",),
    )
    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/{rest:path}", forward)]), settings, transport=fake_lago.transport(), quota=None
    )
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    path = "/health/../v1/chat"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,  # as uvicorn gives it: no dot-segment removal
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"x-org-id", b"org_a")],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
    }
    try:
        await middleware(scope, receive, send)
        assert sent[0]["status"] == 200 and b'"/v1/chat"' in sent[1]["body"]  # what the upstream is asked
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert middleware.stats["excluded"] == 0
    assert [event["external_subscription_id"] for event in fake_lago.events] == ["org_a"]
