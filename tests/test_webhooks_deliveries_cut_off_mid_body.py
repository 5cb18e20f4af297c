"""The webhook receiver: a delivery whose sender goes away before its body is read
is not a bad signature (no 401 blaming LAGO_WEBHOOK_HMAC_KEY, not counted as a rejected, maybe forged, webhook)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from lago_org_billing import BillingSettings
from lago_org_billing._webhooks import LagoWebhooks, sign_hmac

pytestmark = pytest.mark.anyio

HMAC_KEY = "audit-webhooks-hmac-key"
SETTINGS = BillingSettings(
    api_url="http://lago.audit", api_key="audit-api-key", max_retries=0, webhook_hmac_key=HMAC_KEY
)


async def _cut_off_delivery(receiver: LagoWebhooks, body: bytes) -> list[dict[str, Any]]:
    """A Lago delivery, signed as Lago signs it, whose connection drops after the body's first bytes (a proxy's
    timeout, a network cut, Lago's worker restarted): the server hands the receiver ``http.disconnect``."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-lago-signature", sign_hmac(body, HMAC_KEY).encode()),
        (b"x-lago-signature-algorithm", b"hmac"),
        (b"x-lago-unique-key", b"5b1f0c3e-cut-off-delivery"),
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
    return sent


async def test_a_delivery_cut_off_mid_body_is_not_rejected_as_a_bad_hmac_signature(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A correctly signed ``subscription.started`` whose connection drops mid-body: the receiver read ``b""`` (its
    ``ClientDisconnect`` swallowed), verified the HMAC of the empty body, and answered 401 ``invalid_signature``
    with a WARNING "The HMAC signature does not match the body (check LAGO_WEBHOOK_HMAC_KEY)", counted in
    ``stats["rejected"]``: the operator is sent to rotate a key that is right, and for the next minute the throttle
    logs real signature failures at DEBUG only. Nothing about the signature was wrong: the body never arrived (Lago
    sends it again)."""
    receiver = LagoWebhooks(SETTINGS)
    payload = {
        "webhook_type": "subscription.started",
        "object_type": "subscription",
        "organization_id": "lago-org",
        "subscription": {"external_id": "org_1", "external_customer_id": "org_1", "status": "active"},
    }
    body = json.dumps(payload, separators=(",", ":")).encode()
    with caplog.at_level(logging.DEBUG, logger="lago_org_billing.webhooks"):
        sent = await _cut_off_delivery(receiver, body)
    assert receiver.stats["rejected"] == 0, "a body cut off by its sender was counted as a rejected signature"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("LAGO_WEBHOOK_HMAC_KEY" in message for message in warnings), warnings
    start = next(message for message in sent if message["type"] == "http.response.start")
    assert start["status"] != 401, "a body cut off by its sender was answered as a bad signature"
