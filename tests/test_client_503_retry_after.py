"""A 503 with ``Retry-After`` (Lago or its load balancer in maintenance) is retried after the wait it asks for, not
hammered at the backoff; a wait past the retry deadline raises at once, saying how long Lago asked to wait."""

from __future__ import annotations

import pytest
from pytest_httpx import HTTPXMock

from lago_org_billing import LagoClient, LagoUnavailableError
from test_client_faults import CUSTOMER, settings, waits  # noqa: F401 (waits: a fixture)

pytestmark = pytest.mark.anyio


async def test_a_503_with_retry_after_waits_that_long(httpx_mock: HTTPXMock, waits: list[float]) -> None:  # noqa: F811
    httpx_mock.add_response(status_code=503, headers={"Retry-After": "3"}, text="<html>maintenance</html>")
    httpx_mock.add_response(json={"customer": CUSTOMER})
    async with LagoClient(settings()) as lago:
        assert (await lago.get_customer("org_1"))["name"] == "Acme"
    assert waits == [3.0]


async def test_a_503_asking_longer_than_the_deadline_raises_at_once(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(status_code=503, headers={"Retry-After": "600"})
    async with LagoClient(settings(retry_deadline=5)) as lago:
        with pytest.raises(LagoUnavailableError) as info:
            await lago.get_customer("org_1")
    assert len(httpx_mock.get_requests()) == 1
    assert "600" in str(info.value)


async def test_other_5xx_keep_the_backoff(httpx_mock: HTTPXMock, waits: list[float]) -> None:  # noqa: F811
    """Retry-After means something only on a 503 (and a 429): a 500's is not a promise of recovery."""
    httpx_mock.add_response(status_code=500, headers={"Retry-After": "30"})
    httpx_mock.add_response(json={"customer": CUSTOMER})
    async with LagoClient(settings()) as lago:
        await lago.get_customer("org_1")
    assert waits == [0.001]
