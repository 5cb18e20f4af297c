"""Bad input to the public API gets a clear error where it was written.

Review angle: every public constructor and call (``BillingSettings``, ``OrgBillingMiddleware``, ``LagoClient``,
``OrgBilling``, ``EventPipeline``, ``QuotaConfig``/``QuotaGate``, ``LagoWebhooks``, ``billing_routes``, the
``from_*`` resolvers, ``AttributionConfig``, ``require_quota``, ``register_metrics``, ``record_usage``) given what a
user plausibly gets wrong: a string from ``os.environ`` where a number is wanted, ``None`` from a missing setting, a
bool for a count, NaN, bytes, a header name where a resolver is wanted, a scope where a request is wanted.

``BROKEN`` lists the cases that failed before this review: an ``AttributeError``/``TypeError`` from deep inside, or
a value silently accepted that broke later (at the first request, in the background) or meant something else.
Each must now raise a ``LagoIntegrationError`` (``ConfigurationError``/``InvalidRequestError``) whose message names
the argument. ``GUARD`` keeps cases that already behaved well.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lago_org_billing import (
    AttributionConfig,
    BillingSettings,
    EventPipeline,
    LagoClient,
    LagoIntegrationError,
    LagoWebhooks,
    OrgBilling,
    OrgBillingMiddleware,
    QuotaConfig,
    QuotaGate,
    billing_routes,
    first_of,
    from_header,
    from_state,
    from_user,
    register_metrics,
    require_quota,
)
from lago_org_billing.testing import FakeLago

KEY = "test-key"
NAN = math.nan

pytestmark = pytest.mark.anyio


def settings(**changes: Any) -> BillingSettings:
    return BillingSettings(api_key=KEY, **changes)


def client() -> LagoClient:
    return LagoClient(settings(), transport=FakeLago(api_key=KEY).transport())


async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called here
    pass


def middleware(**kwargs: Any) -> OrgBillingMiddleware:
    kwargs.setdefault("quota", None)
    return OrgBillingMiddleware(app, settings(), client=client(), **kwargs)


def pipeline(**kwargs: Any) -> EventPipeline:
    return EventPipeline(client(), **kwargs)


def webhooks(**kwargs: Any) -> LagoWebhooks:
    return LagoWebhooks(settings(webhook_hmac_key="hmac-secret"), **kwargs)


def routes(**kwargs: Any) -> Any:
    return billing_routes(settings=settings(), **kwargs)


def scope() -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b"", "state": {}}


# (label, call, words the message must hold): each raised AttributeError/TypeError deep inside, or was accepted.
BROKEN: list[tuple[str, Callable[[], object], str]] = [
    # BillingSettings fields given in code
    ("settings api_url=None", lambda: settings(api_url=None), "LAGO_API_URL"),
    ("settings api_url=bytes", lambda: settings(api_url=b"http://lago:3000"), "LAGO_API_URL"),
    ("settings event_code=5", lambda: settings(event_code=5), "LAGO_EVENT_CODE"),
    ("settings event_code=bytes", lambda: settings(event_code=b"api_call"), "LAGO_EVENT_CODE"),
    ("settings template=None", lambda: settings(subscription_id_template=None), "LAGO_SUBSCRIPTION_ID_TEMPLATE"),
    ("settings org_header=5", lambda: settings(org_header=5), "LAGO_ORG_HEADER"),
    ("settings org_header=bytes", lambda: settings(org_header=b"X-Org-Id"), "LAGO_ORG_HEADER"),
    ("settings redis_url=5", lambda: settings(redis_url=5), "LAGO_REDIS_URL"),
    ("settings organization_id=5", lambda: settings(organization_id=5), "LAGO_ORGANIZATION_ID"),
    ("settings exclude_paths=None", lambda: settings(exclude_paths=None), "LAGO_EXCLUDE_PATHS"),
    ("settings exclude_paths=str", lambda: settings(exclude_paths="/health"), "tuple"),
    ("settings exclude_paths=(5,)", lambda: settings(exclude_paths=(5,)), "LAGO_EXCLUDE_PATHS"),
    ("settings api_timeout=True", lambda: settings(api_timeout=True), "LAGO_API_TIMEOUT"),
    ("settings max_retries=True", lambda: settings(max_retries=True), "LAGO_MAX_RETRIES"),
    ("settings usage_cache_ttl=True", lambda: settings(usage_cache_ttl=True), "LAGO_USAGE_CACHE_TTL"),
    # OrgBillingMiddleware(...)
    ("middleware app=None", lambda: OrgBillingMiddleware(None, settings(), quota=None), "app"),
    ("middleware settings=dict", lambda: OrgBillingMiddleware(app, {"api_key": KEY}, quota=None), "settings"),
    ("middleware settings=str", lambda: OrgBillingMiddleware(app, KEY, quota=None), "settings"),
    ("middleware resolve_org=header name", lambda: middleware(resolve_org="X-Org-Id"), "resolve_org"),
    ("middleware resolve_user=5", lambda: middleware(resolve_user=5), "resolve_user"),
    ("middleware bill_server_errors='false'", lambda: middleware(bill_server_errors="false"), "bill_server_errors"),
    ("middleware attribution=dict", lambda: middleware(attribution={"inspect_body": False}), "attribution"),
    ("middleware idempotency_header=5", lambda: middleware(idempotency_header=5), "idempotency_header"),
    ("middleware idempotency_header=bytes", lambda: middleware(idempotency_header=b"Idem"), "idempotency_header"),
    ("middleware idempotency_header blank", lambda: middleware(idempotency_header="Idem Key"), "idempotency_header"),
    ("middleware event_properties=dict", lambda: middleware(event_properties={"a": 1}), "event_properties"),
    ("middleware quota='off'", lambda: middleware(quota="off"), "quota"),
    ("middleware quota_config=dict", lambda: middleware(quota="auto", quota_config={}), "quota_config"),
    ("middleware client=settings", lambda: OrgBillingMiddleware(app, settings(), client=settings()), "client"),
    ("middleware pipeline=str", lambda: middleware(pipeline="memory"), "pipeline"),
    ("middleware shutdown_timeout='5'", lambda: middleware(shutdown_timeout="5"), "shutdown_timeout"),
    ("middleware shutdown_timeout=None", lambda: middleware(shutdown_timeout=None), "shutdown_timeout"),
    ("middleware shutdown_timeout=nan", lambda: middleware(shutdown_timeout=NAN), "shutdown_timeout"),
    ("middleware metrics_registry=True", lambda: middleware(metrics_registry=True), "metrics_registry"),
    # LagoClient / OrgBilling
    ("client settings=str", lambda: LagoClient(KEY), "settings"),
    ("client settings=dict", lambda: LagoClient({"api_key": KEY}), "settings"),
    ("client transport=str", lambda: LagoClient(settings(), transport="http://lago"), "transport"),
    ("client limits=int", lambda: LagoClient(settings(), limits=10), "limits"),
    ("billing client=str", lambda: OrgBilling(settings(), client="lago"), "client"),
    ("billing pipeline=str", lambda: OrgBilling(settings(), pipeline="memory"), "pipeline"),
    ("billing quota=str", lambda: OrgBilling(settings(), quota="auto"), "quota"),
    ("billing middleware=str", lambda: OrgBilling(settings(), middleware="app"), "middleware"),
    # EventPipeline(...)
    ("pipeline client=None", lambda: EventPipeline(None), "client"),
    ("pipeline client=settings", lambda: EventPipeline(settings()), "client"),
    ("pipeline spool_path=5", lambda: pipeline(spool_path=5), "spool_path"),
    ("pipeline batch_size='100'", lambda: pipeline(batch_size="100"), "batch_size"),
    ("pipeline batch_size=True", lambda: pipeline(batch_size=True), "batch_size"),
    ("pipeline memory_capacity='1000'", lambda: pipeline(memory_capacity="1000"), "memory_capacity"),
    ("pipeline memory_capacity=1.5", lambda: pipeline(memory_capacity=1.5), "memory_capacity"),
    ("pipeline concurrency='4'", lambda: pipeline(concurrency="4"), "concurrency"),
    ("pipeline concurrency=2.5", lambda: pipeline(concurrency=2.5), "concurrency"),
    ("pipeline max_attempts=True", lambda: pipeline(max_attempts=True), "max_attempts"),
    ("pipeline flush_interval='0.2'", lambda: pipeline(flush_interval="0.2"), "flush_interval"),
    ("pipeline flush_interval=nan", lambda: pipeline(flush_interval=NAN), "flush_interval"),
    ("pipeline flush_interval=inf", lambda: pipeline(flush_interval=math.inf), "flush_interval"),
    ("pipeline commit_window=nan", lambda: pipeline(commit_window=NAN), "commit_window"),
    ("pipeline shutdown_timeout=nan", lambda: pipeline(shutdown_timeout=NAN), "shutdown_timeout"),
    ("pipeline max_backoff=inf", lambda: pipeline(max_backoff=math.inf), "max_backoff"),
    ("pipeline retry_backoff='1'", lambda: pipeline(retry_backoff="1"), "retry_backoff"),
    ("pipeline retry_backoff=0", lambda: pipeline(retry_backoff=0), "retry_backoff"),
    ("pipeline metrics=str", lambda: pipeline(metrics="prometheus"), "metrics"),
    ("pipeline spool_window=-1", lambda: pipeline(spool_window=-1), "spool_window"),
    ("pipeline spool_window='10'", lambda: pipeline(spool_window="10"), "spool_window"),
    ("pipeline.submit(None)", lambda: pipeline().submit(None), "submit"),
    ("pipeline.submit(5)", lambda: pipeline().submit(5), "submit"),
    ("pipeline.lane('x')", lambda: pipeline().lane("build"), "lane"),
    # QuotaConfig / QuotaGate
    ("quota cold_timeout='2'", lambda: QuotaConfig(cold_timeout="2"), "cold_timeout"),
    ("quota cold_timeout=nan", lambda: QuotaConfig(cold_timeout=NAN), "cold_timeout"),
    ("quota settle_lag=-1", lambda: QuotaConfig(settle_lag=-1), "settle_lag"),
    ("quota plan_ttl=inf", lambda: QuotaConfig(plan_ttl=math.inf), "plan_ttl"),
    ("quota jitter='0.1'", lambda: QuotaConfig(jitter="0.1"), "jitter"),
    ("quota headers='no'", lambda: QuotaConfig(headers="no"), "headers"),
    ("quota feature_code=None", lambda: QuotaConfig(feature_code=None), "feature_code"),
    ("quota calls_privilege=''", lambda: QuotaConfig(calls_privilege=""), "calls_privilege"),
    ("quota token_metric=5", lambda: QuotaConfig(token_metric=5), "token_metric"),
    ("quota redis_prefix=None", lambda: QuotaConfig(redis_prefix=None), "redis_prefix"),
    ("quota max_orgs=0", lambda: QuotaConfig(max_orgs=0), "max_orgs"),
    ("quota max_orgs=True", lambda: QuotaConfig(max_orgs=True), "max_orgs"),
    ("quota redis_timeout='2'", lambda: QuotaConfig(redis_timeout="2"), "redis_timeout"),
    ("quota redis_max_connections='128'", lambda: QuotaConfig(redis_max_connections="128"), "redis_max_connections"),
    ("quota max_concurrent_refreshes=True", lambda: QuotaConfig(max_concurrent_refreshes=True), "refreshes"),
    ("quota unavailable_status=200", lambda: QuotaConfig(unavailable_status=200), "unavailable_status"),
    ("gate settings=None", lambda: QuotaGate(None, client()), "settings"),
    ("gate config=dict", lambda: QuotaGate(settings(), client(), config={}), "config"),
    ("gate clock=5", lambda: QuotaGate(settings(), client(), config=QuotaConfig(), clock=5), "clock"),
    # resolvers
    ("from_state(None)", lambda: from_state(None), "from_state"),
    ("from_state('')", lambda: from_state(""), "from_state"),
    ("from_user(None)", lambda: from_user(None), "from_user"),
    ("from_user('')", lambda: from_user(""), "from_user"),
    ("from_user([])", lambda: from_user([]), "from_user"),
    ("first_of(header name)", lambda: first_of("X-Org-Id"), "first_of"),
    ("from_header membership_check=str", lambda: from_header("X-Org-Id", membership_check="yes"), "membership"),
    # AttributionConfig
    ("attribution headers=None", lambda: AttributionConfig(total_tokens_headers=None), "total_tokens_headers"),
    ("attribution headers=(5,)", lambda: AttributionConfig(total_tokens_headers=(5,)), "total_tokens_headers"),
    ("attribution inspect_body='no'", lambda: AttributionConfig(inspect_body="no"), "inspect_body"),
    ("attribution max_body_bytes='1000'", lambda: AttributionConfig(max_body_bytes="1000"), "max_body_bytes"),
    ("attribution max_body_bytes=-1", lambda: AttributionConfig(max_body_bytes=-1), "max_body_bytes"),
    # register_metrics
    ("register_metrics(None)", lambda: register_metrics(None, CollectorRegistry()), "middleware"),
    ("register_metrics(str)", lambda: register_metrics("app", CollectorRegistry()), "middleware"),
    ("register_metrics registry=True", lambda: register_metrics(middleware(), True), "registry"),
    (
        "register_metrics namespace=None",
        lambda: register_metrics(middleware(), CollectorRegistry(), namespace=None),
        "namespace",
    ),
    (
        "register_metrics namespace blank",
        lambda: register_metrics(middleware(), CollectorRegistry(), namespace="a b"),
        "namespace",
    ),
    # LagoWebhooks(...)
    ("webhooks settings=str", lambda: LagoWebhooks("hmac-secret"), "settings"),
    ("webhooks handlers=str", lambda: webhooks(handlers="invoice.created"), "handlers"),
    ("webhooks handlers={type: 5}", lambda: webhooks(handlers={"invoice.created": 5}), "handlers"),
    ("webhooks issuer=5", lambda: webhooks(issuer=5), "issuer"),
    ("webhooks max_body_size='1000'", lambda: webhooks(max_body_size="1000"), "max_body_size"),
    ("webhooks max_body_size=0", lambda: webhooks(max_body_size=0), "max_body_size"),
    ("webhooks key_refetch_interval=nan", lambda: webhooks(key_refetch_interval=NAN), "key_refetch_interval"),
    ("webhooks invalidate=str", lambda: webhooks(invalidate="quota"), "invalidate"),
    ("webhooks client=str", lambda: webhooks(client="lago"), "client"),
    ("webhooks organization_id=5", lambda: webhooks(organization_id=5), "organization_id"),
    # billing_routes(...)
    ("routes billing=str", lambda: billing_routes("billing", settings=settings()), "billing"),
    ("routes settings=str", lambda: billing_routes(settings=KEY), "settings"),
    ("routes client=str", lambda: routes(client="lago"), "client"),
    ("routes invoice_limit='10'", lambda: routes(invoice_limit="10"), "invoice_limit"),
    ("routes invoice_limit=0", lambda: routes(invoice_limit=0), "invoice_limit"),
    ("routes allow_skip_invoice='no'", lambda: routes(allow_skip_invoice="no"), "allow_skip_invoice"),
    ("routes max_body_size=-1", lambda: routes(max_body_size=-1), "max_body_size"),
    ("routes plans=str", lambda: routes(plans="starter"), "plans"),
    ("routes limits_provider=str", lambda: routes(limits_provider="limits"), "limits_provider"),
]


@pytest.mark.parametrize(("call", "words"), [pytest.param(c, w, id=label) for label, c, w in BROKEN])
def test_bad_input_is_refused_where_it_was_written(call: Callable[[], object], words: str) -> None:
    with pytest.raises(LagoIntegrationError) as caught:
        call()
    assert words in str(caught.value)


async def test_record_usage_with_properties_that_are_not_a_mapping_is_refused_before_sending() -> None:
    async with OrgBilling(settings(), transport=FakeLago(api_key=KEY).transport()) as billing:
        with pytest.raises(LagoIntegrationError, match="properties"):
            await billing.record_usage("org_1", "api_call", None, "tokens=5")  # type: ignore[arg-type]
        with pytest.raises(LagoIntegrationError, match="mapping"):
            await billing.client.create_event(None)  # type: ignore[arg-type]


async def test_require_quota_given_a_scope_says_it_takes_the_request() -> None:
    with pytest.raises(LagoIntegrationError, match="Request"):
        await require_quota(scope())  # type: ignore[arg-type]
    with pytest.raises(LagoIntegrationError, match="Request"):
        await require_quota(None)  # type: ignore[arg-type]


def test_a_list_of_exclude_paths_is_read_as_the_tuple_and_an_empty_organization_id_as_unset() -> None:
    given = settings(exclude_paths=["/health"], organization_id="  ")
    assert given.exclude_paths == ("/health",)
    assert given.organization_id is None


async def test_the_checks_leave_a_well_configured_middleware_billing() -> None:
    """The checks run when the middleware is built: a request of a known org is still billed as before."""
    lago = FakeLago(api_key=KEY)

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    inner = Starlette(routes=[Route("/", hello)])
    billed = OrgBillingMiddleware(
        inner,
        settings(org_header="X-Org-Id", exclude_paths=["/health"]),
        transport=lago.transport(),
        quota=None,
        idempotency_header="Idempotency-Key",
        shutdown_timeout=5,
        bill_server_errors=False,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=billed), base_url="http://app") as http:
        answer = await http.get("/", headers={"X-Org-Id": "org_1"})
    assert answer.status_code == 200
    assert billed.stats["billed"] == 1
    await billed.pipeline.aclose()


# Cases that already behaved well (a clear LagoIntegrationError, or Python's own signature check).
GUARD: list[tuple[str, Callable[[], object], type[Exception]]] = [
    ("settings api_timeout='5'", lambda: settings(api_timeout="5"), LagoIntegrationError),
    ("settings api_timeout=nan", lambda: settings(api_timeout=NAN), LagoIntegrationError),
    ("settings quota_mode=None", lambda: settings(quota_mode=None), LagoIntegrationError),
    ("settings fail_open='false'", lambda: settings(fail_open="false"), LagoIntegrationError),
    ("settings plan_limits=str", lambda: settings(plan_limits='{"a": {}}'), LagoIntegrationError),
    ("settings api_key=bytes", lambda: BillingSettings(api_key=b"key"), LagoIntegrationError),
    ("settings unresolved_status='401'", lambda: settings(unresolved_status="401"), LagoIntegrationError),
    ("settings unknown keyword", lambda: settings(api_timout=5), TypeError),
    ("middleware on_unresolved='deny'", lambda: middleware(on_unresolved="deny"), LagoIntegrationError),
    ("middleware unresolved_status=200", lambda: middleware(unresolved_status=200), LagoIntegrationError),
    ("middleware unknown keyword", lambda: middleware(resolver=from_state()), TypeError),
    ("pipeline batch_size=101", lambda: pipeline(batch_size=101), LagoIntegrationError),
    ("pipeline concurrency=0", lambda: pipeline(concurrency=0), LagoIntegrationError),
    ("quota over_quota_status=200", lambda: QuotaConfig(over_quota_status=200), LagoIntegrationError),
    ("quota refresh_rate=nan", lambda: QuotaConfig(refresh_rate=NAN), LagoIntegrationError),
    ("from_header(None)", lambda: from_header(None), LagoIntegrationError),
    (
        "from_header membership_timeout='5'",
        lambda: from_header("X-Org-Id", membership_timeout="5"),
        LagoIntegrationError,
    ),
    ("attribution headers=str", lambda: AttributionConfig(model_headers="x-model"), LagoIntegrationError),
    ("routes authorize=str", lambda: routes(authorize="admin"), LagoIntegrationError),
    ("webhooks hmac_key=bytes", lambda: webhooks(hmac_key=b"secret"), LagoIntegrationError),
]


@pytest.mark.parametrize(("call", "error"), [pytest.param(c, e, id=label) for label, c, e in GUARD])
def test_bad_input_that_was_already_refused_stays_refused(call: Callable[[], object], error: type[Exception]) -> None:
    with pytest.raises(error):
        call()
