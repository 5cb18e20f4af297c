"""An allowed answer whose app sets its own ``RateLimit-*`` fields (a gateway passing its upstream's on, a per-minute
limiter of its own) got the gate's next to them: each field twice, ``RateLimit-Limit: 100`` and ``5``, read as the
list ``100, 5`` (RFC 9110 5.3): neither value usable. The app's fields are kept and the gate adds none of the three
next to them (they describe one limit together); the same for ``Retry-After``. An app setting none gets the gate's."""

from __future__ import annotations

from collections.abc import Sequence

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from _quota_app import Clock, seed
from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

GATE = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")


def _app(headers: Sequence[tuple[bytes, bytes]]):  # type: ignore[no-untyped-def]
    async def app(scope: Scope, receive: Receive, send: Send) -> None:  # (raw ASGI: the names as the app wrote them)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain"), *headers]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def _answer(headers: Sequence[tuple[bytes, bytes]], *, mode: str = "enforce", calls: int = 5) -> httpx.Response:
    clock = Clock()
    fake = seed(FakeLago(api_key="k", clock=clock.now), starter_calls=calls)
    settings = BillingSettings(
        api_url=fake.base_url, api_key="k", org_header="X-Org-Id", max_retries=0, quota_mode=mode
    )
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig(), clock=clock.time)
        middleware = OrgBillingMiddleware(_app(headers), settings, quota=gate, client=lago)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http:
            for _ in range(calls):  # (the last one over the limit in monitor mode: a would-block answer, Retry-After)
                response = await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
            if mode == "monitor":
                response = await http.get("/v1/chat", headers={"X-Org-Id": "org_1"})
        await middleware.aclose()
    return response


@pytest.mark.parametrize(
    "own",
    [
        [(b"ratelimit-limit", b"100"), (b"ratelimit-remaining", b"99"), (b"ratelimit-reset", b"60")],
        [(b"RateLimit-Limit", b"100"), (b"RateLimit-Remaining", b"99"), (b"RateLimit-Reset", b"60")],
        [(b"ratelimit-remaining", b"99")],  # (one of the three: the gate adds none of them, not a mix of two limits)
    ],
)
async def test_the_apps_own_ratelimit_fields_are_kept_alone(own: list[tuple[bytes, bytes]]) -> None:
    response = await _answer(own)
    assert response.status_code == 200
    for name in GATE:
        expected = [value.decode() for field, value in own if field.lower() == name.encode()]
        assert response.headers.get_list(name) == expected, (name, response.headers.multi_items())


async def test_an_app_setting_none_gets_the_gates() -> None:
    response = await _answer([])
    assert [response.headers.get_list(name) for name in GATE][:2] == [["5"], ["0"]]
    assert len(response.headers.get_list("ratelimit-reset")) == 1


async def test_the_apps_retry_after_is_kept_alone_and_the_gates_ratelimit_added() -> None:
    response = await _answer([(b"retry-after", b"7")], mode="monitor", calls=2)  # (a would-block answer)
    assert response.status_code == 200
    assert response.headers.get_list("retry-after") == ["7"], response.headers.multi_items()
    assert response.headers.get_list("ratelimit-remaining") == ["0"]
