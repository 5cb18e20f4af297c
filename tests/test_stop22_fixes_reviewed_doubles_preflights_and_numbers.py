"""Review of today's fixes for defects in the fixes themselves (stop22).

Covers: the argument checks added to the public API (8579273) refusing the test doubles users pass for a client, a
billing service or a middleware (``unittest.mock.AsyncMock()``, ``AsyncMock(spec=LagoClient)``,
``create_autospec(LagoClient, instance=True)``, ``MagicMock()``), which were accepted before; and the CORS preflight
handling of the middleware (3476a64) with real browser preflights.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest

from lago_org_billing import (
    BillingSettings,
    ConfigurationError,
    EventPipeline,
    LagoClient,
    LagoWebhooks,
    OrgBilling,
    OrgBillingMiddleware,
    billing_routes,
)

SETTINGS = BillingSettings(api_key="key", api_url="http://127.0.0.1:9", quota_mode="off")


async def _app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called
    pass


def _doubles() -> list[Any]:
    return [
        mock.AsyncMock(),
        mock.MagicMock(),
        mock.AsyncMock(spec=LagoClient),
        mock.create_autospec(LagoClient, instance=True),
    ]


@pytest.mark.parametrize("index", range(4))
def test_client_test_doubles_accepted_by_org_billing(index: int) -> None:
    client = _doubles()[index]
    billing = OrgBilling(settings=SETTINGS, client=client)
    assert billing.client is client


@pytest.mark.parametrize("index", [0, 1])
def test_client_test_doubles_accepted_by_pipeline_and_middleware(index: int) -> None:
    EventPipeline(_doubles()[index], retry_backoff=0.01)
    OrgBillingMiddleware(_app, settings=SETTINGS, client=_doubles()[index], quota=None)


@pytest.mark.parametrize("index", range(4))
def test_client_test_doubles_accepted_by_webhooks_and_routes(index: int) -> None:
    LagoWebhooks(BillingSettings(api_key="key", webhook_hmac_key="hmac"), client=_doubles()[index])
    billing_routes(settings=SETTINGS, client=_doubles()[index])


def test_billing_and_middleware_doubles_accepted() -> None:
    billing_routes(billing=mock.MagicMock())
    billing_routes(billing=mock.AsyncMock(spec=OrgBilling))
    OrgBilling(settings=SETTINGS, client=mock.AsyncMock(), middleware=mock.MagicMock())


def test_wrong_clients_still_refused() -> None:
    for wrong in ("http://lago", SETTINGS, object()):
        with pytest.raises(ConfigurationError, match="must be a LagoClient"):
            OrgBilling(settings=SETTINGS, client=wrong)
        with pytest.raises(ConfigurationError, match="must be a LagoClient"):
            EventPipeline(wrong)
        with pytest.raises(ConfigurationError, match="must be a LagoClient"):
            billing_routes(settings=SETTINGS, client=wrong)


# ------------------------------------------------------------------ CORS preflights (checked: no defect found)


class _RecordingGate:
    """A gate allowing every call and reserving one, recording each check and settle."""

    def __init__(self) -> None:
        self.checks: list[str] = []
        self.settles: list[tuple[str, bool]] = []

    async def check(self, org_id: str) -> Any:
        from lago_org_billing._gate import QuotaDecision

        self.checks.append(org_id)
        return QuotaDecision(reserved=True)

    def settle(self, org_id: str, decision: Any, *, tokens: int, billed: bool) -> None:
        self.settles.append((org_id, billed))

    async def run(self, *, task_status: Any = None) -> None:
        if task_status is not None:
            task_status.started()

    async def aclose(self) -> None:
        pass


PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST", "X-Org-Id": "org_a"}


@pytest.mark.anyio
async def test_preflights_settle_the_reserved_call_exactly_once(fake_lago: Any, header_settings: Any) -> None:
    """A browser preflight answered by a CORS middleware under a Mount, and an OPTIONS call a route refuses (405):
    the call the gate reserved is settled once each (released for the preflight, billed as a call for the 405)."""
    import httpx
    from fastapi import FastAPI
    from starlette.middleware.cors import CORSMiddleware
    from starlette.routing import Mount

    api = FastAPI()

    @api.post("/echo")
    async def echo() -> dict[str, str]:
        return {"ok": "yes"}

    outer = FastAPI(routes=[Mount("/api", app=CORSMiddleware(api, allow_origins=["*"], allow_methods=["*"]))])

    @outer.post("/plain")
    async def plain() -> dict[str, str]:
        return {"ok": "yes"}

    gate = _RecordingGate()
    middleware = OrgBillingMiddleware(outer, header_settings, quota=gate, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            answer = await client.options("/api/echo", headers=PREFLIGHT)
            assert answer.status_code == 200 and answer.headers["access-control-allow-origin"]
            assert gate.settles == [("org_a", False)]
            refused = await client.options("/plain", headers=PREFLIGHT)
            assert refused.status_code == 405
        assert await middleware.pipeline.flush(5)
        assert len(gate.checks) == 2 and len(gate.settles) == 2
        assert middleware.stats["preflight"] == 1 and middleware.stats["requests"] == 1
    finally:
        await middleware.aclose()


@pytest.mark.anyio
async def test_preflight_of_an_unbuilt_fastapi_app_with_cors_declared(header_settings: Any) -> None:
    """The app wrapped before its first call (its middleware stack not built): the CORS middleware it declares answers
    preflights, which are neither gated nor rejected under on_unresolved="reject"."""
    import httpx
    from fastapi import FastAPI
    from starlette.middleware.cors import CORSMiddleware

    app = FastAPI()
    app.add_middleware(CORSMiddleware, allow_origins=["https://app.example"], allow_methods=["*"])

    @app.post("/v1/x")
    async def x() -> dict[str, str]:
        return {}

    gate = _RecordingGate()
    middleware = OrgBillingMiddleware(app, header_settings, quota=gate, on_unresolved="reject")
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            answer = await client.options(
                "/v1/x", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
            )
            assert answer.status_code == 200, answer.text
        assert gate.checks == [] and middleware.stats["preflight"] == 1 and middleware.stats["unresolved"] == 0
    finally:
        await middleware.aclose()


def test_real_numbers_of_other_types_are_taken_and_a_decimal_is_told_to_convert() -> None:
    """The argument checks took only int and float: a ``Fraction`` (or numpy's numbers, ``numbers.Real`` and
    ``numbers.Integral`` too) was refused; a ``Decimal``, which float arithmetic cannot mix with, is refused saying
    to convert it."""
    from decimal import Decimal
    from fractions import Fraction

    from lago_org_billing import ConfigurationError
    from lago_org_billing._checks import number, whole

    assert number("timeout", Fraction(3, 2)) == 1.5
    assert whole("count", Fraction(4, 1).numerator) == 4
    with pytest.raises(ConfigurationError, match=r"a Decimal: convert it with float\(\)"):
        number("timeout", Decimal("1.5"))
