"""Review (angle: logging): a failure that repeats with every request, whose cause a client can bring back at will,
is said as it starts and then seldom (counted), never one line (or one traceback) per request.

Real requests through the middleware and the emulator, and deliveries cut off as an ASGI server hands them over.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from lago_org_billing import BillingSettings, LagoClient, OrgBillingMiddleware, billing_routes
from lago_org_billing._webhooks import LagoWebhooks, sign_hmac

# ------------------------------------------------------------------------------- usage events that cannot be built


def test_usage_events_a_client_makes_unbuildable_are_not_logged_with_a_traceback_each(
    fake_lago: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``LAGO_SUBSCRIPTION_ID_TEMPLATE=billing-{org_id}`` and an ``X-Org-Id`` of 255 emoji (a valid org id: printable,
    255 characters) make a subscription id of 1,028 bytes, which no event may carry (Lago's index takes 1,024). Each
    such request's event failed to build and logged an ERROR with its traceback: any client sending that header wrote
    a traceback per request. The first is logged with its traceback, then every 100th; all are counted and
    dead-lettered."""
    settings = BillingSettings(
        api_url=fake_lago.base_url,
        api_key=fake_lago.api_key,
        org_header="X-Org-Id",
        quota_mode="off",
        retry_backoff=0.001,
        subscription_id_template="billing-{org_id}",
    )

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/v1/chat", endpoint, methods=["POST"])])
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    org = "\U0001f600" * 255
    with caplog.at_level(logging.DEBUG, logger="lago_org_billing"), TestClient(middleware) as client:
        for _ in range(150):
            assert client.post("/v1/chat", headers={"X-Org-Id": org.encode()}).status_code == 200
    assert middleware.stats["event_errors"] == 150
    said = [
        record
        for record in caplog.records
        if record.getMessage().startswith("Could not build the usage event") and record.levelno >= logging.INFO
    ]
    assert len(said) == 2, [record.getMessage()[:120] for record in said]  # the 1st and the 100th
    assert all(record.exc_info and record.levelno == logging.ERROR for record in said)
    assert "(1 so far" in said[0].getMessage() and "(100 so far" in said[1].getMessage()
    assert fake_lago.events == []  # (none could be sent: each is a dead letter, said there)


# ------------------------------------------------------------------------------- webhook deliveries cut off


HMAC_KEY = "review-logging-hmac-key"


async def _cut_off_delivery(receiver: LagoWebhooks) -> int:
    """A signed-looking delivery whose sender leaves after the body's first bytes; the status answered."""
    body = b'{"webhook_type":"subscription.started","object_type":"subscription"}'
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-lago-signature", sign_hmac(body, HMAC_KEY).encode()),
        (b"x-lago-signature-algorithm", b"hmac"),
    ]
    messages: list[dict[str, Any]] = [{"type": "http.request", "body": body[:10], "more_body": True}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/webhooks/lago",
        "raw_path": b"/webhooks/lago",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await receiver(scope, receive, send)
    return int(next(message for message in sent if message["type"] == "http.response.start")["status"])


@pytest.mark.anyio
async def test_webhook_deliveries_cut_off_before_their_body_are_not_logged_one_line_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Anyone can open a delivery to the public webhook URL and leave before its body (no signature is checked before
    the body is read): each was an INFO line, so a client looping on it wrote the log. The first is said (INFO, not a
    problem of this side's), then at most once a minute, with the count."""
    receiver = LagoWebhooks(
        BillingSettings(api_url="http://lago.review", api_key="review-api-key", webhook_hmac_key=HMAC_KEY)
    )
    with caplog.at_level(logging.DEBUG, logger="lago_org_billing.webhooks"):
        for _ in range(50):
            assert await _cut_off_delivery(receiver) == 400
    assert receiver.stats["incomplete"] == 50
    said = [record for record in caplog.records if record.levelno >= logging.INFO]
    assert len(said) == 1, [record.getMessage() for record in said]
    assert said[0].levelno == logging.INFO and "disconnected before its body came" in said[0].getMessage()


# ------------------------------------------------------------------------------- the billing routes' paths


@pytest.mark.anyio
async def test_a_path_an_anonymous_caller_sends_to_the_billing_routes_is_logged_escaped_and_cut(
    fake_lago: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``authorize`` raising for a caller without a session (a scanner, a logged-out tab) is logged at ERROR with the
    request's path. That path was written as sent (decoded): ``%1B[2J`` cleared the terminal of whoever tailed the log,
    ``%1B[31m`` coloured a line of the caller's choosing, and 5,000 more characters made a 5 kB line. It is quoted
    (escapes shown as ``\\x1b``) and cut to 200 characters."""

    def authorize(request: Request, org_id: str) -> bool:
        raise KeyError("session")  # (no session cookie on this request)

    settings = BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, quota_mode="off")
    async with LagoClient(settings, transport=fake_lago.transport()) as client:
        app = Starlette(routes=[Mount("/billing", billing_routes(authorize=authorize, client=client))])
        path = "/billing/organizations/x%1B[2J%1B[31mFORGED%20ERROR%20line" + "A" * 5000 + "/subscription"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            with caplog.at_level(logging.DEBUG, logger="lago_org_billing.routes"):
                assert (await http.get(path)).status_code == 403
    said = [record.getMessage() for record in caplog.records if "raised on GET" in record.getMessage()]
    assert len(said) == 1
    head = said[0].split("\n", 1)[0]  # (the traceback follows, on lines of its own)
    assert "\x1b" not in head and "\\x1b[31mFORGED" in head
    assert len(head) < 600, len(head)
