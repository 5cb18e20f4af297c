"""Fault injection in the Lago emulator: statuses, windows, latency, dropped connections, rate limits."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from lago_org_billing._errors import LagoNotFoundError, LagoRateLimitError, LagoUnavailableError
from lago_org_billing.testing import FakeLago, _faults
from lago_org_billing.testing._faults import FaultSpecError, install_faults
from lago_org_billing.testing._server import serve_in_thread

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    """A hand-driven monotonic clock."""
    return FakeClock()


@pytest.fixture
def fake(clock: FakeClock) -> FakeLago:
    """A FakeLago with one customer and fault injection on a hand-driven clock."""
    fake = FakeLago(api_key=API_KEY)
    install_faults(fake, clock=clock)
    fake.add_customer(external_id="acme")
    return fake


@pytest.fixture
async def client(fake: FakeLago) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to the fake in process."""
    async with httpx.AsyncClient(transport=fake.transport(), base_url=fake.base_url, headers=AUTH) as client:
        yield client


async def test_status_fault_applies_count_times_then_stops(client: httpx.AsyncClient) -> None:
    """A {"status": 503, "count": 2} fault answers two requests with 503, then Lago answers again."""
    response = await client.post("/_emulator/faults", json={"status": 503, "count": 2})
    assert response.status_code == 201
    statuses = [(await client.get("/api/v1/customers/acme")).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]


async def test_status_fault_body_is_lago_shaped(client: httpx.AsyncClient) -> None:
    """Injected errors carry Lago's error envelope so clients parse them as usual."""
    await client.post("/_emulator/faults", json={"status": 422, "count": 1})
    response = await client.get("/api/v1/customers/acme")
    assert response.status_code == 422
    assert response.json() == {
        "status": 422,
        "error": "Unprocessable Entity",
        "code": "validation_errors",
        "error_details": {},
    }


async def test_path_prefix_limits_the_fault(client: httpx.AsyncClient) -> None:
    """A fault on /api/v1/events leaves other endpoints and /health alone."""
    await client.post("/_emulator/faults", json={"status": 500, "count": 5, "path": "/api/v1/events"})
    assert (await client.get("/api/v1/customers/acme")).status_code == 200
    assert (await client.get("/health")).status_code == 200
    event = {"transaction_id": "tx1", "external_subscription_id": "sub", "code": "api_call"}
    response = await client.post("/api/v1/events", json={"event": event})
    assert response.status_code == 500
    assert response.json()["status"] == 500


async def test_default_path_spares_health_and_control_routes(client: httpx.AsyncClient) -> None:
    """Without "path" only /api/v1 is faulted, so /health and DELETE /_emulator/faults still work."""
    await client.post("/_emulator/faults", json={"status": 503})
    assert (await client.get("/api/v1/customers/acme")).status_code == 503
    assert (await client.get("/health")).status_code == 200
    assert (await client.delete("/_emulator/faults")).json() == {"faults": []}
    assert (await client.get("/api/v1/customers/acme")).status_code == 200


async def test_seconds_window_uses_the_clock(client: httpx.AsyncClient, clock: FakeClock) -> None:
    """A {"seconds": S} fault lasts S seconds on the emulator's clock."""
    await client.post("/_emulator/faults", json={"status": 503, "seconds": 30})
    assert (await client.get("/api/v1/customers/acme")).status_code == 503
    clock.now += 29.9
    assert (await client.get("/api/v1/customers/acme")).status_code == 503
    clock.now += 0.1
    assert (await client.get("/api/v1/customers/acme")).status_code == 200
    assert (await client.get("/_emulator/faults")).json() == {"faults": []}


async def test_latency_is_awaited_without_blocking(client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """latency_ms is passed to anyio.sleep (in seconds) and the request then succeeds."""
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(_faults, "_sleep", record)
    await client.post("/_emulator/faults", json={"latency_ms": 250, "count": 1})
    assert (await client.get("/api/v1/customers/acme")).status_code == 200
    assert (await client.get("/api/v1/customers/acme")).status_code == 200
    assert slept == [0.25]


async def test_latency_then_status(client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule may combine latency and an error status."""
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(_faults, "_sleep", record)
    await client.post("/_emulator/faults", json={"latency_ms": 1000, "status": 504, "count": 1})
    assert (await client.get("/api/v1/customers/acme")).status_code == 504
    assert slept == [1.0]


async def test_drop_in_process_raises_a_transport_error(client: httpx.AsyncClient) -> None:
    """ "drop" surfaces as httpx.RemoteProtocolError through ASGITransport, once per count."""
    await client.post("/_emulator/faults", json={"drop": True, "count": 1})
    with pytest.raises(httpx.RemoteProtocolError):
        await client.get("/api/v1/customers/acme")
    assert (await client.get("/api/v1/customers/acme")).status_code == 200


def test_drop_over_http_closes_the_connection(fake: FakeLago) -> None:
    """Served by uvicorn, "drop" closes the socket without a response; the server keeps serving."""
    with serve_in_thread(fake) as url:
        httpx.post(f"{url}/_emulator/faults", json={"drop": True, "count": 1}).raise_for_status()
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"{url}/api/v1/customers/acme", headers=AUTH)
        assert httpx.get(f"{url}/api/v1/customers/acme", headers=AUTH).status_code == 200


async def test_rate_limit_window(client: httpx.AsyncClient, clock: FakeClock) -> None:
    """The first L requests of a window pass with X-RateLimit-* headers; the rest get 429 until reset."""
    await client.post("/_emulator/faults", json={"rate_limit": {"limit": 2, "reset": 10}})
    first = await client.get("/api/v1/customers/acme")
    second = await client.get("/api/v1/customers/acme")
    clock.now += 4
    third = await client.get("/api/v1/customers/acme")
    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
    assert first.headers["X-RateLimit-Limit"] == "2"
    assert first.headers["X-RateLimit-Remaining"] == "1"
    assert second.headers["X-RateLimit-Remaining"] == "0"
    assert third.headers["X-RateLimit-Remaining"] == "0"
    assert third.headers["X-RateLimit-Reset"] == "6"
    assert third.json() == {"status": 429, "error": "Too Many Requests", "code": "too_many_requests"}
    assert first.json()["customer"]["external_id"] == "acme"
    clock.now += 6
    again = await client.get("/api/v1/customers/acme")
    assert again.status_code == 200
    assert again.headers["X-RateLimit-Remaining"] == "1"


async def test_rate_limit_reaches_lago_client_as_retry_after(fake: FakeLago) -> None:
    """LagoClient maps the emulator's 429 to LagoRateLimitError with the X-RateLimit-Reset wait."""
    from lago_org_billing import BillingSettings, LagoClient

    fake.inject_fault(rate_limit={"limit": 0, "reset": 7})  # type: ignore[attr-defined]
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        with pytest.raises(LagoRateLimitError) as caught:
            await lago.get_customer("acme")
    assert caught.value.status == 429
    assert caught.value.retry_after == 7


async def test_python_api_and_clear(fake: FakeLago, client: httpx.AsyncClient) -> None:
    """fake.inject_fault() / fake.clear_faults() mirror the HTTP control routes."""
    fake.inject_fault(status=503, count=3, path="/api/v1/customers")  # type: ignore[attr-defined]
    assert (await client.get("/api/v1/customers/acme")).status_code == 503
    listed = (await client.get("/_emulator/faults")).json()["faults"]
    assert listed == [{"path": "/api/v1/customers", "status": 503, "count": 3, "remaining": 2}]
    fake.clear_faults()  # type: ignore[attr-defined]
    assert (await client.get("/api/v1/customers/acme")).status_code == 200


async def test_injected_503_reaches_lago_client_as_unavailable(fake: FakeLago) -> None:
    """With retries off, LagoClient turns an injected 503 into LagoUnavailableError."""
    from lago_org_billing import BillingSettings, LagoClient

    fake.inject_fault(status=503, count=1)  # type: ignore[attr-defined]
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        with pytest.raises(LagoUnavailableError):
            await lago.get_customer("acme")
        assert (await lago.get_customer("acme"))["external_id"] == "acme"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"count": 2}, "at least one of"),
        ({"status": 200, "count": 1}, "400-599"),
        ({"status": "503"}, "'status' must be an integer"),
        ({"status": 503, "count": 0}, "'count' must be an integer >= 1"),
        ({"status": 503, "count": 1, "seconds": 3}, "either 'count'"),
        ({"status": 503, "colour": "red"}, "unknown fault field(s) 'colour'"),
        ({"drop": "yes"}, "'drop' must be true or false"),
        ({"status": 503, "path": "api/v1"}, "starting with '/'"),
        ({"rate_limit": {"limit": 5}}, "needs both 'limit' and 'reset'"),
        ({"rate_limit": 5}, "'rate_limit' must be"),
        ({"status": 503, "drop": True}, "exclusive"),
        ({"latency_ms": -1}, "'latency_ms' must be a number >= 0"),
        ([1, 2], "JSON object"),
    ],
)
async def test_bad_fault_json_is_422(client: httpx.AsyncClient, spec: Any, message: str) -> None:
    """Malformed faults are refused with 422 and a message naming the problem; nothing is installed."""
    response = await client.post("/_emulator/faults", json=spec)
    assert response.status_code == 422
    assert message in response.json()["message"]
    assert (await client.get("/_emulator/faults")).json() == {"faults": []}


async def test_non_json_body_is_422(client: httpx.AsyncClient) -> None:
    """A body that is not JSON at all is a 422, not a 500."""
    response = await client.post("/_emulator/faults", content=b"status=503")
    assert response.status_code == 422
    assert "JSON" in response.json()["message"]


def test_python_api_validates_like_http(fake: FakeLago) -> None:
    """fake.inject_fault() raises FaultSpecError (a LagoIntegrationError) for bad input."""
    with pytest.raises(FaultSpecError, match="400-599"):
        fake.inject_fault(status=302)  # type: ignore[attr-defined]


def test_install_faults_is_idempotent(fake: FakeLago) -> None:
    """Installing twice returns the same controller (no double middleware)."""
    assert install_faults(fake) is install_faults(fake)


async def test_plugin_fixtures_come_with_faults(fake_lago: Any, lago_client: Any) -> None:
    """The pytest plugin's fake_lago has inject_fault, and lago_client sees the injected errors."""
    fake_lago.add_customer(external_id="acme")
    fake_lago.inject_fault(status=404, count=1, path="/api/v1/customers/acme")
    with pytest.raises(LagoNotFoundError):
        await lago_client.get_customer("acme")
    assert (await lago_client.get_customer("acme"))["external_id"] == "acme"
    assert [r.status for r in fake_lago.requests] == [404, 200]
