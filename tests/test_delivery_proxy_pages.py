"""A 400 whose body is not Lago's JSON (a proxy's or load balancer's page: plain HTTP sent to an HTTPS port, a
header too large for it) blames no event: the events are kept and retried, none is dead-lettered. Lago's own 400
(JSON) still isolates the event at fault."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from lago_org_billing._client import _error_from_response
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._errors import LagoAPIError
from lago_org_billing.testing import FakeLago
from test_delivery import Edge, events, make_client, make_fake, run_pipeline, transaction_ids

pytestmark = pytest.mark.anyio

NGINX_400 = (
    b"<html>\r\n<head><title>400 The plain HTTP request was sent to HTTPS port</title></head>\r\n<body>\r\n"
    b"<center><h1>400 Bad Request</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


async def test_a_proxy_page_400_dead_letters_no_event_and_all_are_delivered_after() -> None:
    fake: FakeLago = make_fake()

    def fault(request: httpx.Request, n: int) -> Any:
        if n <= 4:
            return httpx.Response(400, content=NGINX_400, headers={"content-type": "text/html"})
        return None

    async with make_client(Edge(fake.transport(), fault), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, retry_backoff=0.001, max_backoff=0.01)
        assert await run_pipeline(pipeline, events(5), wait=5)
    assert pipeline.dead_letters() == []
    assert sorted(transaction_ids(fake)) == [f"tx{i}" for i in range(5)]
    assert pipeline.stats["lago_errors_400"] == 4


async def test_lagos_own_400_still_isolates_the_event() -> None:
    fake: FakeLago = make_fake()

    def fault(request: httpx.Request, n: int) -> Any:
        if b'"tx3"' in request.content:
            return httpx.Response(400, json={"status": 400, "error": "BadRequest: bad event"})
        return None

    async with make_client(Edge(fake.transport(), fault), max_retries=0) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, retry_backoff=0.001, max_backoff=0.01)
        await run_pipeline(pipeline, events(5), wait=5)
    assert [letter.event["transaction_id"] for letter in pipeline.dead_letters()] == ["tx3"]
    assert sorted(transaction_ids(fake)) == ["tx0", "tx1", "tx2", "tx4"]


def test_the_error_says_whether_lago_answered_it() -> None:
    request = httpx.Request("POST", "http://lago/api/v1/events/batch")
    page = _error_from_response(httpx.Response(400, content=NGINX_400, request=request), "POST", "/events/batch")
    lago = _error_from_response(
        httpx.Response(400, json={"status": 400, "error": "BadRequest: x"}, request=request), "POST", "/events/batch"
    )
    assert isinstance(page, LagoAPIError) and page.lago_json is False
    assert "LAGO_API_URL" in str(page)
    assert lago.lago_json is True
