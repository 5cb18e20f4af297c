"""The JWT / JWKS identity resolver (``from_jwt_claim``) against an attacker.

- A client whose token the app accepts dodges billing and the quota gate by sending ``Authorization`` twice (its good
  token, then anything else): the app authenticates the first value (Starlette's ``request.headers``, FastAPI's
  ``HTTPBearer``), the resolver trusts neither and the request is served unbilled under ``LAGO_ON_UNRESOLVED=allow``.
- A JWKS answer compressed twice (``Content-Encoding: gzip, gzip``) of a few hundred bytes is inflated whole, in
  memory and on the event loop, before the 1 MiB bound is checked.
- A ``jwks_url`` that httpx can never fetch (a port that is no port, a blank in the host) is accepted at configuration:
  every token is refused at run time, every request served unbilled.
"""

from __future__ import annotations

import gzip
import logging
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing import BillingSettings, ConfigurationError, OrgBillingMiddleware
from lago_org_billing._identity import from_jwt_claim, reset_warnings, resolve_now

pytestmark = pytest.mark.anyio

SECRET = "audit-secret-that-is-long-enough-for-hs256-tokens"
URL = "https://issuer.test/.well-known/jwks.json"
# An RS256 token with kid "k" (its signature is never checked: no key is ever fetched for it).
TOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJvcmdfaWQiOiJhY21lIn0.c2ln"


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


async def resolve(resolver: Any, token: str) -> str | None:
    """What the middleware does with a resolver: take its id, or await the awaitable it returns."""
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"authorization", f"Bearer {token}".encode())]}
    result = resolve_now(resolver, scope)
    if result is None or isinstance(result, str):
        return result
    return await result


# ------------------------------------------------------------------ Authorization repeated: served unbilled


async def authenticated(request: Request) -> Response:
    """The app's own auth, as FastAPI's ``HTTPBearer`` reads it: ``request.headers.get("Authorization")``, the first
    value; a token it cannot verify is a 401."""
    _, _, token = (request.headers.get("authorization") or "").partition(" ")
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    except jwt.PyJWTError:
        return JSONResponse({"detail": "not authenticated"}, status_code=401)
    return JSONResponse({"served_to": claims["org_id"]})


async def test_bearer_token_repeated_with_another_value_is_not_served_unbilled(fake_lago: Any) -> None:
    """A customer's valid token, then a second ``Authorization`` header of any other value: the app authenticates
    the first value and serves the customer, while ``from_jwt_claim`` reads two different values as "no token"
    (``_header_value``: trust neither), so the request is unresolved and, under the default
    ``LAGO_ON_UNRESOLVED=allow``, served unbilled and ungated. Any customer can stop paying (and pass its quota) by
    adding one header. Observed: 200, the customer served, no event. Expected: the request billed to the org of the
    token the app accepted, or refused (4xx) as the malformed request it is (Authorization is a singleton field,
    RFC 9110 5.3), never served free."""
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    settings = BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)
    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/v1/chat", authenticated)]),
        settings=settings,
        transport=fake_lago.transport(),
        quota=None,
        resolve_org=from_jwt_claim("org_id", key=SECRET, algorithms=["HS256"]),
    )
    token = jwt.encode({"org_id": "org_a"}, SECRET, algorithm="HS256")
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            single = await client.get("/v1/chat", headers={"Authorization": f"Bearer {token}"})
            assert single.status_code == 200  # (the control: one header, billed to org_a)
            doubled = await client.get(
                "/v1/chat", headers=[("Authorization", f"Bearer {token}"), ("Authorization", "Bearer x")]
            )
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    billed = [e["external_subscription_id"] for e in fake_lago.events]
    served_free = doubled.status_code == 200 and billed == ["org_a"]
    assert not served_free, (
        f"the doubled request was served ({doubled.status_code} {doubled.json()}) and not billed: events {billed}"
    )
    assert doubled.status_code == 400, doubled.text  # refused: which token the app reads is not known
    assert "authorization header was sent more than once" in doubled.json()["detail"]
    assert middleware.stats["ambiguous_credentials"] == 1


# ------------------------------------------------------------------ a JWKS answer compressed twice


class _Raw(httpx.AsyncByteStream):
    """An answer's bytes as the network gives them (``httpx.Response(content=...)`` would inflate them at once)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data  # (a few hundred bytes: one read from the network)


@pytest.mark.parametrize(
    ("encoding", "bomb"),
    [
        ("gzip, gzip", gzip.compress(gzip.compress(b" " * (32 << 20), 9), 9)),
        ("gzip", gzip.compress(b" " * (32 << 20), 9)),
        ("deflate", zlib.compress(b" " * (32 << 20), 9)),
    ],
    ids=["gzip-twice", "gzip", "deflate"],
)
async def test_jwks_answer_compressed_past_the_bound_is_refused_without_inflating_it_in_memory(
    encoding: str, bomb: bytes
) -> None:
    """A JWKS answer "is read up to 1 MiB (decoded)". httpx inflates each chunk whole before it is counted, and an
    answer with ``Content-Encoding: gzip, gzip`` inflates a few hundred bytes into any size in one chunk: about 220
    bytes here became 32 MiB (1-2 KB become GiBs: the worker killed for its memory), inflated on the event loop. Now
    identity is asked for, and an answer compressed anyway is inflated within the bound (stacked or unknown
    encodings refused)."""
    assert len(bomb) < 64 << 10

    asked: list[str | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("accept-encoding"))
        headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
        return httpx.Response(200, headers=headers, stream=_Raw(bomb))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as client:
        resolver = from_jwt_claim("org_id", jwks_url=URL, jwks_client=client, algorithms=["RS256"])
        tracemalloc.start()
        try:
            assert await resolve(resolver, TOKEN) is None  # (the fetch failed: no key)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 8 << 20, f"one JWKS fetch of {len(bomb)} bytes allocated {peak / 2**20:.0f} MiB"
    assert asked == ["identity"]


# ------------------------------------------------------------------ a jwks_url that can never be fetched


@pytest.mark.parametrize(
    "url",
    [
        "https://issuer.test:abc/.well-known/jwks.json",  # httpx: Invalid port: 'abc'
        "https://issuer.test:99999/.well-known/jwks.json",  # no such port ("unhandled errors in a TaskGroup")
        "https://issuer.test:0/.well-known/jwks.json",  # port 0: nothing listens there
        "https://issuer test/.well-known/jwks.json",  # a blank in the host (a pasted/folded value)
        "https://issuer_中.test/.well-known/jwks.json",  # httpx: Invalid IDNA hostname
    ],
)
def test_jwks_url_that_httpx_can_never_fetch_is_a_configuration_error(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The docstring: what could never verify a token is a ConfigurationError saying what to pass (and
    ``LAGO_API_URL`` refuses the same URLs: port 0, blanks, what httpx refuses). ``check_url`` only looks at the
    scheme and the host name: these are accepted, every fetch then fails at run time (a WARNING, for port 99999 only
    "unhandled errors in a TaskGroup (1 sub-exception)"), every token is refused and, under the default
    ``LAGO_ON_UNRESOLVED=allow``, every request is served unbilled. Observed: no error. Expected: a
    ConfigurationError naming jwks_url."""
    caplog.set_level(logging.WARNING)
    with pytest.raises(ConfigurationError, match="jwks_url"):
        from_jwt_claim("org_id", jwks_url=url)
