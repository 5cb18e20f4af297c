"""Review: the org from a client-sent header (``from_header(..., membership_check=...)``) through the middleware.

Covers a membership check that never answers (bounded by ``membership_timeout``: the request is unresolved, follows
``on_unresolved``, and the timeout is logged once), one that raises, one that answers a non-bool, and header values
with blanks, commas, unicode, excess length, or a user header without an org header."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._identity import from_header, reset_warnings

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    fake_lago.add_plan("starter", amount_cents=0)
    for org in ("org_a", "org_b"):
        fake_lago.add_subscription(org, "starter", external_id=org)
    return BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)


@pytest.fixture
async def make_middleware(
    fake_lago: Any, settings: BillingSettings
) -> AsyncIterator[Callable[..., OrgBillingMiddleware]]:
    made: list[OrgBillingMiddleware] = []

    def make(**kwargs: Any) -> OrgBillingMiddleware:
        async def whoami(request: Request) -> Response:
            return JSONResponse({"org": request.state.billing_org_id})

        middleware = OrgBillingMiddleware(
            Starlette(routes=[Route("/whoami", whoami)]),
            settings,
            transport=fake_lago.transport(),
            quota=None,
            **kwargs,
        )
        made.append(middleware)
        return middleware

    yield make
    for middleware in made:
        await middleware.aclose()


async def get(app: Any, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        return await client.get("/whoami", headers=headers)


async def test_a_membership_check_that_never_answers_is_bounded_and_said(
    make_middleware: Callable[..., OrgBillingMiddleware], caplog: pytest.LogCaptureFixture
) -> None:
    """A membership check awaiting a database that never answers held every header request forever (no timeout).
    Expected: after ``membership_timeout`` the request is unresolved (here rejected, 401/403 with a JSON body),
    and the timeout is logged once with what to do."""
    never = anyio.Event()

    async def hangs(scope: Any, org_id: str) -> bool:
        await never.wait()
        return True  # pragma: no cover

    resolver = from_header("X-Org-Id", membership_check=hangs, membership_timeout=0.01)
    middleware = make_middleware(resolve_org=resolver, on_unresolved="reject")
    with caplog.at_level(logging.DEBUG, logger="lago_org_billing.identity"):
        with anyio.fail_after(10):  # a guard against the hang, not a timing assertion
            first = await get(middleware, {"X-Org-Id": "org_a"})
            second = await get(middleware, {"X-Org-Id": "org_b"})
    assert first.status_code in (401, 403) and second.status_code in (401, 403)
    assert "json" in first.headers["content-type"] and first.json()
    said = [r for r in caplog.records if r.levelno >= logging.WARNING and "did not answer" in r.getMessage()]
    assert len(said) == 1
    assert "membership_timeout" in said[0].getMessage()


async def test_the_membership_timeout_has_a_finite_default_and_is_checked() -> None:
    """Without an explicit timeout the wait is still bounded; a non-positive or NaN timeout is a configuration
    error said when the resolver is built, not a request that never ends."""
    import inspect

    from lago_org_billing import ConfigurationError

    default = inspect.signature(from_header).parameters["membership_timeout"].default
    assert isinstance(default, float) and 0 < default < 60
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigurationError):
            from_header("X-Org-Id", membership_check=lambda scope, org: True, membership_timeout=bad)
    from_header("X-Org-Id", membership_check=lambda scope, org: True, membership_timeout=None)  # opt out


async def test_a_slow_membership_check_within_the_timeout_admits(
    make_middleware: Callable[..., OrgBillingMiddleware], fake_lago: Any
) -> None:
    async def member(scope: Any, org_id: str) -> bool:
        await anyio.lowlevel.checkpoint()
        return org_id == "org_a"

    middleware = make_middleware(resolve_org=from_header("X-Org-Id", membership_check=member), on_unresolved="reject")
    ok = await get(middleware, {"X-Org-Id": "org_a"})
    refused = await get(middleware, {"X-Org-Id": "org_b"})
    assert ok.status_code == 200 and ok.json() == {"org": "org_a"}
    assert refused.status_code in (401, 403)


async def test_a_membership_check_that_raises_or_answers_a_non_bool_rejects(
    make_middleware: Callable[..., OrgBillingMiddleware],
) -> None:
    def raises(scope: Any, org_id: str) -> bool:
        raise ConnectionError("db down")

    def answers_none(scope: Any, org_id: str) -> bool:
        return None  # type: ignore[return-value]

    for check in (raises, answers_none):
        middleware = make_middleware(
            resolve_org=from_header("X-Org-Id", membership_check=check), on_unresolved="reject"
        )
        response = await get(middleware, {"X-Org-Id": "org_a"})
        assert response.status_code in (401, 403)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  org_a  ", "org_a"),
        ("org_a, org_a", "org_a"),
        ("org_a, org_b", None),
        ("x" * 256, None),
    ],
)
async def test_header_values_through_the_default_resolver(
    fake_lago: Any, settings: BillingSettings, value: str, expected: str | None
) -> None:
    async def whoami(request: Request) -> Response:
        return JSONResponse({"org": request.state.billing_org_id})

    header_settings = dataclasses.replace(settings, org_header="X-Org-Id", user_header="X-User-Id")
    middleware = OrgBillingMiddleware(
        Starlette(routes=[Route("/whoami", whoami)]), header_settings, transport=fake_lago.transport(), quota=None
    )
    try:
        response = await get(middleware, {"x-ORG-id": value})
        only_user = await get(middleware, {"X-User-Id": "u1"})
    finally:
        await middleware.aclose()
    assert response.json() == {"org": expected}
    assert only_user.json() == {"org": None}
