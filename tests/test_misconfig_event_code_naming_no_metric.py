"""A new user's ``LAGO_EVENT_CODE`` that names no billable metric in Lago (mistyped, or the metric not made yet).

Lago takes events of an unknown code (200) and bills none of them (lago-api.md: "unknown ``code`` is NOT rejected":
stored, skipped at post-processing). The middleware delivered every request's event that way, nothing was dead-
lettered nor logged, and ``lago-org-billing health`` (``check_lago_health``), the check a deploy step runs, said
"healthy": the app's billing was lost without a word. The probe now reads the metric and says so (a warning: Lago
itself is healthy), and keeps quiet when it cannot tell (a key not allowed to read metrics, a failed read).
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from pytest_httpx import HTTPXMock

from lago_org_billing import BillingSettings, LagoClient, OrgBilling
from lago_org_billing._quota import QuotaGate
from lago_org_billing.cli import main

URL = "http://127.0.0.1:3999"


@pytest.mark.anyio
async def test_the_probe_warns_of_an_event_code_that_no_billable_metric_has(fake_lago: Any) -> None:
    fake_lago.add_billable_metric("api_call")
    settings = BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, event_code="api_cal")
    async with OrgBilling(settings, client=LagoClient(settings, transport=fake_lago.transport())) as billing:
        result = await billing.check_lago_health()
    assert result["healthy"] is True, result  # (Lago is up and takes the key)
    [warning] = result["warnings"]
    assert "LAGO_EVENT_CODE 'api_cal'" in warning and "bills none of them" in warning, warning


@pytest.mark.anyio
async def test_the_probe_says_nothing_of_an_event_code_lago_has_a_metric_for(fake_lago: Any) -> None:
    fake_lago.add_billable_metric("api_call")
    settings = BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key)
    async with OrgBilling(settings, client=LagoClient(settings, transport=fake_lago.transport())) as billing:
        result = await billing.check_lago_health()
    assert result["healthy"] is True and result["warnings"] == [], result


@pytest.mark.anyio
@pytest.mark.parametrize("status", [403, 500])
async def test_the_probe_keeps_quiet_when_it_cannot_read_the_metric(httpx_mock: HTTPXMock, status: int) -> None:
    """A key whose permissions do not cover billable metrics (403), a failed read: nothing is known of the metric."""
    httpx_mock.add_response(url=f"{URL}/health", json={"message": "Success", "version": "1.30.0"})
    httpx_mock.add_response(
        url=f"{URL}/api/v1/customers?page=1&per_page=1",
        json={"customers": [], "meta": {"current_page": 1, "next_page": None, "total_count": 0}},
    )
    httpx_mock.add_response(
        url=f"{URL}/api/v1/billable_metrics/api_call", status_code=status, json={"status": status, "error": "x"}
    )
    settings = BillingSettings(api_key="key", api_url=URL)
    async with OrgBilling(settings) as billing:
        result = await billing.check_lago_health()
    assert result["healthy"] is True and result["warnings"] == [], result
    assert len(httpx_mock.get_requests()) == 3  # (one attempt each: a probe)


def test_the_health_command_warns_of_it_on_stderr_and_in_its_json(
    fake_lago_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LAGO_API_URL", fake_lago_server.url)
    monkeypatch.setenv("LAGO_API_KEY", fake_lago_server.api_key)
    monkeypatch.setenv("LAGO_EVENT_CODE", "apicall")
    assert main(["health"]) == 0
    captured = capsys.readouterr()
    assert "is healthy" in captured.out
    assert "Warning: LAGO_EVENT_CODE 'apicall' is the code of no billable metric" in captured.err, captured.err
    assert main(["health", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["healthy"] is True and "LAGO_EVENT_CODE 'apicall'" in report["warnings"][0], report


@pytest.mark.anyio
async def test_the_gate_names_lago_event_code_when_the_plan_charges_no_metric_of_that_code(
    fake_lago: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An org on a plan with limits: the gate reads its usage of LAGO_EVENT_CODE's metric, which Lago answers
    ``404 charge_not_found`` for a code the plan charges no metric of. The warning said only "Add the charge to the
    plan", where a new user's cause is as often LAGO_EVENT_CODE mistyped (the plan charges ``api_call``)."""
    fake_lago.add_billable_metric("api_call")
    fake_lago.add_plan(
        "starter", charges=[{"billable_metric_code": "api_call", "charge_model": "standard", "properties": {}}]
    )
    fake_lago.add_customer("acme")
    fake_lago.add_subscription("acme", "starter")
    settings = BillingSettings(
        api_url=fake_lago.base_url,
        api_key=fake_lago.api_key,
        event_code="api_cal",
        plan_limits={"starter": {"max_api_calls": 5}},
    )
    async with LagoClient(settings, transport=fake_lago.transport()) as client:
        gate = QuotaGate(settings, client)
        async with anyio.create_task_group() as tasks:
            await tasks.start(gate.run)
            decision = await gate.check("acme")
            tasks.cancel_scope.cancel()
    assert decision.allowed
    [warning] = [r.getMessage() for r in caplog.records if "no charge on the metric" in r.getMessage()]
    assert "'api_cal'" in warning and "LAGO_EVENT_CODE" in warning, warning
