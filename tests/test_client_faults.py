"""LagoClient against faults injected at the network edge (pytest-httpx)."""

from __future__ import annotations

import json

import httpx
import pytest
from pytest_httpx import HTTPXMock

from lago_org_billing import (
    BillingSettings,
    InvalidIdentifierError,
    InvalidRequestError,
    LagoAPIError,
    LagoAuthenticationError,
    LagoClient,
    LagoNotFoundError,
    LagoRateLimitError,
    LagoUnavailableError,
    LagoValidationError,
)

pytestmark = pytest.mark.anyio

API_KEY = "sk_test_do_not_leak_me"
BASE = "http://lago.test"
CUSTOMER = {"lago_id": "c1", "external_id": "org_1", "name": "Acme", "metadata": []}


def settings(**changes: object) -> BillingSettings:
    values: dict[str, object] = {
        "api_key": API_KEY,
        "api_url": BASE,
        "retry_backoff": 0.001,
        "max_retries": 3,
    }
    values.update(changes)
    return BillingSettings(**values)  # type: ignore[arg-type]


async def test_retries_5xx_then_succeeds(httpx_mock: HTTPXMock) -> None:
    """Two 503s then a 200: the call succeeds after three requests."""
    url = f"{BASE}/api/v1/customers/org_1"
    httpx_mock.add_response(url=url, status_code=503, json={"status": 503, "error": "Service Unavailable"})
    httpx_mock.add_response(url=url, status_code=503)
    httpx_mock.add_response(url=url, json={"customer": CUSTOMER})
    async with LagoClient(settings()) as lago:
        assert (await lago.get_customer("org_1"))["name"] == "Acme"
    assert len(httpx_mock.get_requests()) == 3


async def test_5xx_gives_up_after_max_retries(httpx_mock: HTTPXMock) -> None:
    """A Lago that keeps failing ends in LagoUnavailableError after 1 + max_retries attempts."""
    httpx_mock.add_response(status_code=500, json={"status": 500, "errors": []}, is_reusable=True)
    async with LagoClient(settings(max_retries=2)) as lago:
        with pytest.raises(LagoUnavailableError) as info:
            await lago.get_customer("org_1")
    assert info.value.status == 500
    assert len(httpx_mock.get_requests()) == 3


async def test_network_errors_are_retried(httpx_mock: HTTPXMock) -> None:
    """A refused connection and a read timeout are retried like a 5xx."""
    httpx_mock.add_exception(httpx.ConnectError("refused"))
    httpx_mock.add_exception(httpx.ReadTimeout("slow"))
    httpx_mock.add_response(json={"customer": CUSTOMER})
    async with LagoClient(settings()) as lago:
        await lago.get_customer("org_1")
    assert len(httpx_mock.get_requests()) == 3


async def test_network_error_after_retries_is_unavailable(httpx_mock: HTTPXMock) -> None:
    """A Lago that never answers is a LagoUnavailableError that says what to check."""
    httpx_mock.add_exception(httpx.ConnectError("refused"), is_reusable=True)
    async with LagoClient(settings(max_retries=1)) as lago:
        with pytest.raises(LagoUnavailableError, match="LAGO_API_URL") as info:
            await lago.health()
    assert info.value.status is None
    assert isinstance(info.value.__cause__, httpx.ConnectError)


@pytest.mark.parametrize(
    ("status", "body", "error_type"),
    [
        (401, {"status": 401, "error": "Unauthorized"}, LagoAuthenticationError),
        (
            403,
            {"status": 403, "error": "Forbidden", "code": "write_action_not_allowed_for_customer"},
            LagoAuthenticationError,
        ),
        (404, {"status": 404, "error": "Not Found", "code": "customer_not_found"}, LagoNotFoundError),
        (
            422,
            {
                "status": 422,
                "error": "Unprocessable Entity",
                "code": "validation_errors",
                "error_details": {"email": ["invalid_format"]},
            },
            LagoValidationError,
        ),
    ],
)
async def test_4xx_are_not_retried_and_carry_lago_code(
    httpx_mock: HTTPXMock, status: int, body: dict[str, object], error_type: type[Exception]
) -> None:
    """4xx other than 429 raise at once with Lago's code and details, never the API key."""
    httpx_mock.add_response(status_code=status, json=body)
    async with LagoClient(settings()) as lago:
        with pytest.raises(error_type) as info:
            await lago.get_customer("org_1")
    error = info.value
    assert error.status == status  # type: ignore[attr-defined]
    assert error.code == body.get("code")  # type: ignore[attr-defined]
    assert error.details == body.get("error_details", {})  # type: ignore[attr-defined]
    assert API_KEY not in str(error) and API_KEY not in repr(error)
    assert len(httpx_mock.get_requests()) == 1


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The client's pauses between attempts, recorded instead of slept (its jitter: none, its backoff: the most)."""
    import random

    import anyio

    asked: list[float] = []

    async def sleep(seconds: float) -> None:
        asked.append(seconds)

    monkeypatch.setattr(anyio, "sleep", sleep)  # (what lago_org_billing._client calls: anyio.sleep, random.*)
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    monkeypatch.setattr(random, "random", lambda: 0.0)
    return asked


async def test_429_waits_x_ratelimit_reset_then_succeeds(httpx_mock: HTTPXMock, waits: list[float]) -> None:
    """A 429 with X-RateLimit-Reset is retried after that wait (the reset, not the backoff)."""
    httpx_mock.add_response(
        status_code=429,
        headers={"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "3"},
        json={"status": 429, "error": "Too Many Requests"},
    )
    httpx_mock.add_response(json={"customer": CUSTOMER})
    async with LagoClient(settings()) as lago:
        await lago.get_customer("org_1")
    assert len(httpx_mock.get_requests()) == 2
    assert waits == [3.0]


async def test_429_beyond_deadline_raises_with_retry_after(httpx_mock: HTTPXMock) -> None:
    """A reset later than the retry deadline raises at once, telling how long to wait."""
    httpx_mock.add_response(status_code=429, headers={"X-RateLimit-Reset": "120"})
    async with LagoClient(settings(retry_deadline=5)) as lago:
        with pytest.raises(LagoRateLimitError) as info:
            await lago.get_customer("org_1")
    assert info.value.retry_after == 120.0
    assert len(httpx_mock.get_requests()) == 1


async def test_retry_after_http_date_is_understood(httpx_mock: HTTPXMock, waits: list[float]) -> None:
    """Retry-After as an HTTP date in the past means retry now (after the backoff alone); in seconds, that wait."""
    httpx_mock.add_response(status_code=429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    httpx_mock.add_response(json={"customer": CUSTOMER})
    httpx_mock.add_response(status_code=429, headers={"Retry-After": "4"})
    httpx_mock.add_response(json={"customer": CUSTOMER})
    async with LagoClient(settings()) as lago:
        await lago.get_customer("org_1")
        await lago.get_customer("org_1")
    assert len(httpx_mock.get_requests()) == 4
    assert waits == [0.001, 4.0]  # (retry_backoff 0.001: the first backoff)


async def test_non_idempotent_creates_are_not_retried(httpx_mock: HTTPXMock) -> None:
    """Creating a plan never duplicates it: a resend after a lost response (503) is answered by Lago's unique
    ``code`` (422 value_already_exist), and the plan Lago made is read back and returned, not created twice."""
    plan = {"lago_id": "p1", "code": "starter", "name": "Starter"}
    httpx_mock.add_response(method="POST", url=f"{BASE}/api/v1/plans", status_code=503)
    httpx_mock.add_response(
        method="POST",
        url=f"{BASE}/api/v1/plans",
        status_code=422,
        json={
            "status": 422,
            "error": "Unprocessable Entity",
            "code": "validation_errors",
            "error_details": {"code": ["value_already_exist"]},
        },
    )
    httpx_mock.add_response(method="GET", url=f"{BASE}/api/v1/plans/starter", json={"plan": plan})
    async with LagoClient(settings()) as lago:
        assert await lago.create_plan({"code": "starter", "name": "Starter"}) == plan
    posts = [request for request in httpx_mock.get_requests() if request.method == "POST"]
    assert len(posts) == 2 and posts[0].content == posts[1].content


async def test_requests_carry_bearer_and_encoded_paths(httpx_mock: HTTPXMock) -> None:
    """The API key goes in the bearer header; path ids are percent-encoded."""
    httpx_mock.add_response(json={"customer": CUSTOMER})
    async with LagoClient(settings()) as lago:
        await lago.get_customer("user@acme")
    request = httpx_mock.get_request()
    assert request is not None
    assert request.headers["Authorization"] == f"Bearer {API_KEY}"
    assert request.url.raw_path == b"/api/v1/customers/user%40acme"


async def test_unaddressable_ids_never_reach_lago(httpx_mock: HTTPXMock) -> None:
    """A dotted id is rejected before any request is made."""
    async with LagoClient(settings()) as lago:
        with pytest.raises(InvalidIdentifierError):
            await lago.get_customer("acme.com")
        with pytest.raises(InvalidIdentifierError):
            await lago.get_current_usage("org_1", "org.1")
    assert httpx_mock.get_requests() == []


async def test_batch_limits_and_timestamp_strings(httpx_mock: HTTPXMock) -> None:
    """Batches hold 1..100 events; timestamps are sent as millisecond strings."""
    httpx_mock.add_response(json={"events": []})
    event = {"transaction_id": "t", "external_subscription_id": "org_1", "code": "api_call"}
    async with LagoClient(settings()) as lago:
        with pytest.raises(InvalidRequestError, match="at most 100"):
            await lago.create_events([{**event, "transaction_id": f"t{i}"} for i in range(101)])
        with pytest.raises(InvalidRequestError):
            await lago.create_events([])
        await lago.create_events([{**event, "timestamp": 1651240791.123}])
    request = httpx_mock.get_request()
    assert request is not None
    body = json.loads(request.content)
    assert body["events"][0]["timestamp"] == "1651240791.123"


async def test_current_usage_defaults_to_no_taxes(httpx_mock: HTTPXMock) -> None:
    """current_usage asks apply_taxes=false unless told otherwise, with the metric filter."""
    httpx_mock.add_response(json={"customer_usage": {"charges_usage": []}})
    async with LagoClient(settings()) as lago:
        await lago.get_current_usage("org_1", "org_1", billable_metric_code="api_call")
    request = httpx_mock.get_request()
    assert request is not None
    assert request.url.params["apply_taxes"] == "false"
    assert request.url.params["billable_metric_code"] == "api_call"
    assert request.url.params["external_subscription_id"] == "org_1"


async def test_closed_client_refuses_calls() -> None:
    """A closed client cannot be reused."""
    lago = LagoClient(settings())
    await lago.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await lago.get_customer("org_1")
    with pytest.raises(RuntimeError):
        async with lago:
            pass


async def test_non_json_success_body_is_a_clear_error(httpx_mock: HTTPXMock) -> None:
    """A proxy answering HTML is reported, not a crash in json parsing."""
    httpx_mock.add_response(text="<html>oops</html>")
    async with LagoClient(settings()) as lago:
        with pytest.raises(Exception, match="not JSON"):
            await lago.get_customer("org_1")


async def test_delete_is_not_retried(httpx_mock: HTTPXMock) -> None:
    """A terminate whose answer was lost (502) is not sent again: its retry would fail with 404 though it worked."""
    httpx_mock.add_response(status_code=502)
    async with LagoClient(settings()) as lago:
        with pytest.raises(LagoUnavailableError):
            await lago.terminate_subscription("org_1")
    assert len(httpx_mock.get_requests()) == 1


async def test_an_attempt_never_runs_past_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each attempt's timeout is what is left of retry_deadline (not the full api_timeout), and a 429 reset of 0
    still waits a backoff before the retry."""
    timeouts: list[float] = []
    waits: list[float] = []

    class Recording(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            timeouts.append(request.extensions["timeout"]["read"])
            if len(timeouts) == 1:
                return httpx.Response(429, headers={"X-RateLimit-Reset": "0"}, json={"status": 429})
            return httpx.Response(200, json={"customer": CUSTOMER})

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    import lago_org_billing._client as client_module

    monkeypatch.setattr(client_module.anyio, "sleep", sleep)
    monkeypatch.setattr(client_module.random, "uniform", lambda low, high: high)
    monkeypatch.setattr(client_module.random, "random", lambda: 0.0)
    async with LagoClient(settings(api_timeout=10, retry_deadline=2, retry_backoff=0.5), transport=Recording()) as lago:
        await lago.get_customer("org_1")
    assert len(timeouts) == 2 and all(timeout <= 2 for timeout in timeouts)
    assert waits == [0.5]


@pytest.mark.parametrize(
    ("status", "code", "hint"),
    [
        (404, "customer_not_found", "case-sensitive"),
        (422, "validation_errors", "fix the fields"),
        (429, None, "rate limit"),
        (503, None, "retry later"),
    ],
)
async def test_lago_errors_say_what_to_do(status: int, code: str | None, hint: str) -> None:
    body = {"status": status, "error": "x", **({"code": code} if code else {})}
    transport = httpx.MockTransport(lambda request: httpx.Response(status, json=body))
    settings = BillingSettings(api_url="http://lago.test", api_key="k", max_retries=0)
    async with LagoClient(settings, transport=transport) as client:
        with pytest.raises(LagoAPIError, match=hint):
            await client.get_customer("acme")


@pytest.mark.parametrize("next_page", [1, 2], ids=["same-page", "back"])
async def test_a_listing_whose_next_page_does_not_move_forward_is_an_error_not_a_loop(
    httpx_mock: HTTPXMock, next_page: int
) -> None:
    """A Lago (or a caching proxy before it) answering page 2 with ``next_page`` 2 again, or 1: the listing followed it
    for ever (a migration listing customers never ended). It is a Lago error naming the pages, after what came."""
    page = {"current_page": 2, "prev_page": 1, "total_pages": 3, "total_count": 3}
    httpx_mock.add_response(
        json={"customers": [CUSTOMER], "meta": {**page, "current_page": 1, "next_page": 2, "prev_page": None}},
        url=f"{BASE}/api/v1/customers?page=1&per_page=1",
        is_reusable=True,
        is_optional=True,
    )
    httpx_mock.add_response(
        json={"customers": [{**CUSTOMER, "lago_id": "c2"}], "meta": {**page, "next_page": next_page}},
        url=f"{BASE}/api/v1/customers?page=2&per_page=1",
        is_reusable=True,
    )
    seen = []
    async with LagoClient(settings()) as lago:
        with pytest.raises(LagoAPIError, match="next_page") as info:
            async for customer in lago.iter_customers(per_page=1):
                seen.append(customer)
                assert len(seen) < 10, "the listing loops"
    assert len(seen) == 2 and info.value.path == "/customers"
