"""``OrgBilling.check_lago_health`` is a probe (a readiness check, ``lago-org-billing health``): it reports Lago as it
is now, in one attempt per call, not after retrying an unhealthy Lago for up to ``LAGO_RETRY_DEADLINE``."""

from __future__ import annotations

import httpx
import pytest
from pytest_httpx import HTTPXMock

from lago_org_billing import BillingSettings, OrgBilling

pytestmark = pytest.mark.anyio

URL = "http://127.0.0.1:3999"


def settings() -> BillingSettings:
    # (a long deadline with quick retries: a probe that retried would call Lago many times before answering)
    return BillingSettings(api_key="key", api_url=URL, retry_deadline=5.0, retry_backoff=0.001)


async def test_an_unhealthy_lago_is_reported_after_one_attempt(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{URL}/health", status_code=503, json={"message": "Unhealthy"}, is_reusable=True)
    async with OrgBilling(settings()) as billing:
        result = await billing.check_lago_health()
    assert result["healthy"] is False and "503" in result["error"]
    assert len(httpx_mock.get_requests()) == 1


async def test_a_lago_that_does_not_answer_is_reported_after_one_attempt(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_exception(httpx.ConnectError("connection refused"), url=f"{URL}/health", is_reusable=True)
    async with OrgBilling(settings()) as billing:
        result = await billing.check_lago_health()
    assert result["healthy"] is False and "did not answer" in result["error"]
    assert len(httpx_mock.get_requests()) == 1


async def test_the_api_key_check_is_one_attempt_too(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{URL}/health", json={"message": "Success", "version": "1.30.0"})
    httpx_mock.add_response(url=f"{URL}/api/v1/customers?page=1&per_page=1", status_code=502, is_reusable=True)
    async with OrgBilling(settings()) as billing:
        result = await billing.check_lago_health()
    assert result["healthy"] is False and result["version"] == "1.30.0" and "an API call failed" in result["error"]
    assert len(httpx_mock.get_requests()) == 2


async def test_a_healthy_lago_is_healthy(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{URL}/health", json={"message": "Success", "version": "1.30.0"})
    httpx_mock.add_response(
        url=f"{URL}/api/v1/customers?page=1&per_page=1",
        json={"customers": [], "meta": {"current_page": 1, "total_pages": 0, "total_count": 0}},
    )
    httpx_mock.add_response(  # (LAGO_EVENT_CODE's metric, read to warn of one Lago has not)
        url=f"{URL}/api/v1/billable_metrics/api_call", json={"billable_metric": {"code": "api_call"}}
    )
    async with OrgBilling(settings()) as billing:
        result = await billing.check_lago_health()
    assert result["healthy"] is True and result["error"] is None and result["warnings"] == []
