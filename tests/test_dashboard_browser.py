"""The billing dashboard rendered by headless Chromium: the numbers a person would read are on the page."""

from __future__ import annotations

import contextlib
import html
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from lago_org_billing import BillingSettings
from lago_org_billing._routes import billing_routes
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

API_KEY = "browser-test-api-key"
TOKEN = "let-me-in"

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install -y chromium)"
)


def seeded_fake() -> FakeLago:
    """Lago with a plan whose charges are grouped by user and model, and an org subscribed to it."""
    fake = FakeLago(api_key=API_KEY)
    fake.add_billable_metric("api_call", name="API calls")
    fake.add_billable_metric("tokens", name="Tokens", aggregation_type="sum_agg", field_name="total_tokens")
    grouped = {"amount": "0.01", "pricing_group_keys": ["user_id", "model"]}
    fake.add_plan(
        "starter",
        name="Starter <b>plan</b>",
        amount_cents=1000,
        charges=[
            {"billable_metric_code": "api_call", "properties": grouped},
            {"billable_metric_code": "tokens", "properties": {**grouped, "amount": "0.001"}},
        ],
    )
    fake.add_customer("org_acme", name="Acme")
    fake.add_subscription("org_acme", "starter")
    return fake


def record(url: str) -> None:
    """Usage through Lago's API: ada 3 calls, bob 1 call; tokens ada 1200, bob 250."""
    events = []
    calls = [("ada", "gpt-4o"), ("ada", "gpt-4o"), ("ada", "gpt-4o-mini"), ("bob", "gpt-4o")]
    for index, (user, model) in enumerate(calls):
        events.append(("api_call", f"call_{index}", {"user_id": user, "model": model}))
    events.append(("tokens", "tok_1", {"user_id": "ada", "model": "gpt-4o", "total_tokens": 1200}))
    events.append(("tokens", "tok_2", {"user_id": "bob", "model": "gpt-4o-mini", "total_tokens": 250}))
    body = {
        "events": [
            {"transaction_id": tx, "external_subscription_id": "org_acme", "code": code, "properties": props}
            for code, tx, props in events
        ]
    }
    response = httpx.post(f"{url}/api/v1/events/batch", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    response.raise_for_status()


def by_token(request: Request, org_id: str) -> bool:
    """The test's authorization: a token in the query string (``--dump-dom`` cannot send headers)."""
    return request.query_params.get("token") == TOKEN


def dump_dom(url: str, profile: Path) -> str:
    """The DOM of ``url`` after Chromium loaded it (headless)."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--dump-dom",
        url,
    ]
    result = subprocess.run(command, capture_output=True, timeout=90, check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result.stdout.decode()


def text_of(dom: str, pattern: str) -> str:
    """The text content (tags stripped, entities decoded) of the first element matched by ``pattern``."""
    match = re.search(pattern, dom, re.S)
    assert match is not None, f"{pattern!r} not found in the page"
    return html.unescape(re.sub(r"<[^>]+>", "", match.group(1))).strip()


def row_cells(dom: str, section: str, key: str) -> list[str]:
    """The cells of the row ``data-key=key`` in the table of section ``section``."""
    table = re.search(rf'<section id="{section}">(.*?)</section>', dom, re.S)
    assert table is not None, f"section {section} missing"
    row = re.search(rf'<tr data-key="{re.escape(key)}">(.*?)</tr>', table.group(1), re.S)
    assert row is not None, f"row {key} missing from {section}"
    return [
        html.unescape(re.sub(r"<[^>]+>", "", cell)).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1))
    ]


def test_dashboard_in_headless_chromium(tmp_path: Path) -> None:
    """Chromium shows the org's plan, period, usage against each limit with bars, and per-user/per-model usage."""
    fake = seeded_fake()
    with serve_in_thread(fake) as lago_url:
        record(lago_url)
        settings = BillingSettings(
            api_url=lago_url,
            api_key=API_KEY,
            plan_limits={"starter": {"max_api_calls": 10, "max_tokens": 1000}},
        )
        router = billing_routes(settings=settings, authorize=by_token)

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            await router.aclose()  # the Lago client the routes created, in the server's loop

        app = Starlette(routes=[Mount("/billing", app=router)], lifespan=lifespan)
        with serve_in_thread(app) as app_url:
            page = f"{app_url}/billing/organizations/org_acme/dashboard"
            denied = httpx.get(page, headers={"Accept": "text/html"})
            assert denied.status_code == 403
            dom = dump_dom(f"{page}?token={TOKEN}", tmp_path / "profile")
            expected_period = httpx.get(f"{page}?token={TOKEN}&format=json").json()["period"]

    assert text_of(dom, r'<span id="org-id">(.*?)</span>') == "org_acme"
    assert text_of(dom, r'<dd id="plan-name"[^>]*>(.*?)</dd>') == "Starter <b>plan</b> (starter, monthly)"
    assert text_of(dom, r'<time id="period-from">(.*?)</time>') == expected_period["from"]
    assert text_of(dom, r'<time id="period-to">(.*?)</time>') == expected_period["to"]
    assert "<script" not in dom

    calls = text_of(dom, r'<div class="limit" data-limit="max_api_calls">(.*?)</div></div></div>')
    assert re.sub(r"\s+", " ", calls) == "max_api_calls4 / 10 (40%)"
    assert 'data-limit="max_api_calls"><div class="head">' in dom
    assert re.search(r'aria-label="max_api_calls"[^>]*><div class="fill" style="width: ?40.0%', dom)
    tokens = text_of(dom, r'<div class="limit" data-limit="max_tokens">(.*?)</div></div></div>')
    assert re.sub(r"\s+", " ", tokens) == "max_tokens1,450 / 1,000 (145%)"
    assert re.search(r'aria-label="max_tokens"[^>]*><div class="fill over" style="width: ?100.0%', dom)

    # columns: key, api_call units, tokens units, amount
    assert row_cells(dom, "by-user", "ada")[:3] == ["ada", "3", "1,200"]
    assert row_cells(dom, "by-user", "bob")[:3] == ["bob", "1", "250"]
    assert row_cells(dom, "by-model", "gpt-4o")[:3] == ["gpt-4o", "3", "1,200"]
    assert row_cells(dom, "by-model", "gpt-4o-mini")[:3] == ["gpt-4o-mini", "1", "250"]
    assert text_of(dom, r'<p class="muted" id="source">(.*?)</p>') == "Breakdown from Lago grouped usage."
