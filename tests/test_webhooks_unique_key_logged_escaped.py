"""The webhook receiver's line saying its dedupe is unavailable (Redis down) names the delivery's
``X-Lago-Unique-Key`` escaped, as its other lines do: the header is not signed, so a sender chooses it, and a control
character there (an ANSI escape, a line break a server let through) must not reach the log as it is."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from lago_org_billing import BillingSettings, LagoWebhooks
from lago_org_billing._webhooks import sign_hmac
from test_secrets_kept_out_of_webhooks_routes_and_resolvers import (
    HMAC_KEY,
    KEY,
    _free_port,
    _post_webhook,
    _webhook_body,
)


def test_the_dedupe_unavailable_line_shows_the_unique_key_escaped(caplog: pytest.LogCaptureFixture) -> None:
    settings = BillingSettings(
        api_key=KEY, webhook_hmac_key=HMAC_KEY, redis_url=f"redis://127.0.0.1:{_free_port()}/0"
    )  # (nothing listens there: Redis down)

    async def run() -> httpx.Response:
        webhooks = LagoWebhooks(settings)
        body = _webhook_body()
        try:
            signature = sign_hmac(body, HMAC_KEY)
            return await _post_webhook(
                webhooks, body, **{"X-Lago-Signature": signature, "X-Lago-Unique-Key": "k\x1b[31mred"}
            )
        finally:
            await webhooks.aclose()

    with caplog.at_level(logging.WARNING):
        answer = asyncio.run(run())
    assert answer.status_code == 200  # processed without dedupe
    [line] = [r.getMessage() for r in caplog.records if "Webhook dedupe unavailable" in r.getMessage()]
    assert "\x1b" not in line and "k\\x1b[31mred" in line, line
