"""The Prometheus metrics under real traffic (middleware, emulator, a Redis that is down): each counter counts
what its name and documentation say."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from _lifespan import serving_lifespan
from lago_org_billing import BillingSettings, OrgBillingMiddleware

prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
pytest.importorskip("redis", reason="redis is not installed")

pytestmark = pytest.mark.anyio

HEADERS = {"X-Org-Id": "org_a"}
REDIS_DOWN = "redis://127.0.0.1:1/0"  # nothing listens there: the gate counts locally (quota_redis_fallback 1)


async def chat(request: Request) -> Response:
    return JSONResponse({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    return BillingSettings(
        api_url=fake_lago.base_url,
        api_key=fake_lago.api_key,
        org_header="X-Org-Id",
        retry_backoff=0.001,
        quota_mode="enforce",
        redis_url=REDIS_DOWN,
    )


async def test_fallback_decisions_count_one_per_quota_decision_made_locally(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """Redis is down, Lago is up: every quota decision is made in this process, one per gated request. The exported
    ``quota_fallback_decisions_total`` must equal the decisions made (``quota_checks_total``, 3 here). A cold org's
    first request asks the fallback twice (a miss before its usage is read from Lago, then the decision), and both
    were counted as decisions: 4 for 3 requests."""
    registry = prometheus_client.CollectorRegistry()
    app = Starlette(routes=[Route("/v1/chat", chat)])
    middleware = OrgBillingMiddleware(app, settings, transport=fake_lago.transport(), metrics_registry=registry)
    async with serving_lifespan(middleware):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            for _ in range(3):
                assert (await http.get("/v1/chat", headers=HEADERS)).status_code == 200
        assert registry.get_sample_value("lago_billing_quota_redis_fallback") == 1  # (the outage is seen)
        checks = registry.get_sample_value("lago_billing_quota_checks_total")
        decisions = registry.get_sample_value("lago_billing_quota_fallback_decisions_total")
    assert checks == 3
    assert decisions == checks, f"{decisions} fallback decisions counted for {checks} quota decisions"


async def test_fallback_decisions_count_one_per_fail_open_decision_while_lago_is_down_too(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """Redis and Lago both down, ``LAGO_FAIL_OPEN=true``: each request is one decision (failed open), made locally.
    Every miss of the fallback (before the refresh, after it failed) was counted as a decision too: 3 for the first
    request and 2 for each one after (7 for 3 requests), so the counter reads more than twice the decisions made
    exactly during the double outage an operator looks at it for."""
    for path in ("/api/v1/customers", "/api/v1/subscriptions", "/api/v1/plans"):
        fake_lago.faults.inject(503, path=path)  # the gate's reads fail; POST /events/batch still works
    registry = prometheus_client.CollectorRegistry()
    app = Starlette(routes=[Route("/v1/chat", chat)])
    middleware = OrgBillingMiddleware(
        app, settings.replace(max_retries=0), transport=fake_lago.transport(), metrics_registry=registry
    )
    async with serving_lifespan(middleware):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            for _ in range(3):
                assert (await http.get("/v1/chat", headers=HEADERS)).status_code == 200
        assert registry.get_sample_value("lago_billing_quota_fail_open_total") == 3
        checks = registry.get_sample_value("lago_billing_quota_checks_total")
        decisions = registry.get_sample_value("lago_billing_quota_fallback_decisions_total")
    assert checks == 3
    assert decisions == checks, f"{decisions} fallback decisions counted for {checks} quota decisions"
