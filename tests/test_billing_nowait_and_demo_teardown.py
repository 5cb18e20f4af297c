"""The org billing service as an application calls it, and the demo as a new user runs it.

* ``OrgBilling.record_*_nowait`` next to the middleware: an app served again (a second lifespan: a second
  ``with TestClient(app)``, an app server restarting its app) gets a new pipeline and gate from the middleware; the
  ``OrgBilling`` wired to the first ones handed its events to a closed pipeline, which dropped them while the call
  returned a transaction id as if queued. ``OrgBilling(middleware=asgi_app)`` follows the middleware's current
  pipeline and gate, and an event a pipeline refuses (closed, or its outbox full) is an error, not a silent loss.
* ``lago-org-billing demo``: Ctrl-C while the demo's traffic runs printed uvicorn's "Exception in ASGI application"
  traceback (``ClientDisconnect`` from the example endpoint reading the body of a request whose client was gone);
  a Ctrl-C while the demo's servers stop stopped the emulator before the example app had flushed its events to it.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from lago_org_billing import (
    BillingSettings,
    ConfigurationError,
    InvalidRequestError,
    LagoIntegrationError,
    LagoUnavailableError,
    OrgBilling,
    OrgBillingMiddleware,
)


def _job_app(billing_box: list[OrgBilling]) -> Starlette:
    async def job(request: Request) -> JSONResponse:
        tx = billing_box[0].record_api_call_nowait("org_a", request.path_params["tx"], "/job", "u1", tokens=7)
        return JSONResponse({"tx": tx})

    return Starlette(routes=[Route("/job/{tx}", job)])


def test_nowait_events_of_an_app_served_again_reach_lago_with_middleware_wiring(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """``OrgBilling(middleware=asgi_app)``: the events recorded in the second lifespan go to the middleware's new
    pipeline (and count in its new gate), not into the first one, closed at the first shutdown."""
    settings = header_settings.replace(quota_mode="enforce")
    box: list[OrgBilling] = []
    asgi_app = OrgBillingMiddleware(_job_app(box), settings, transport=fake_lago.transport(), quota_config=None)
    billing = OrgBilling(settings, transport=fake_lago.transport(), middleware=asgi_app)
    box.append(billing)
    for round_ in range(2):
        with TestClient(asgi_app) as client:
            assert billing.pipeline is asgi_app.pipeline and billing.quota is asgi_app.quota
            answer = client.get(f"/job/job-{round_}", headers={"X-Org-Id": "org_a"})
            assert answer.status_code == 200, answer.text
    jobs = sorted(e["transaction_id"] for e in fake_lago.events if e["transaction_id"].startswith("job-"))
    assert jobs == ["job-0", "job-1"]


def test_nowait_into_a_closed_pipeline_is_an_error_not_a_silent_loss(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """The README's wiring (``pipeline=asgi_app.pipeline``) served twice: the second lifespan's event cannot reach
    Lago through the first, closed pipeline; the app is told (an error saying what to do), not handed an id of an
    event that was dropped."""
    box: list[OrgBilling] = []
    asgi_app = OrgBillingMiddleware(_job_app(box), header_settings, transport=fake_lago.transport())
    billing = OrgBilling(
        header_settings, transport=fake_lago.transport(), pipeline=asgi_app.pipeline, quota=asgi_app.quota
    )
    box.append(billing)
    with TestClient(asgi_app) as client:
        assert client.get("/job/job-0", headers={"X-Org-Id": "org_a"}).status_code == 200
    with TestClient(asgi_app, raise_server_exceptions=True) as client:
        with pytest.raises(ConfigurationError, match="closed") as caught:
            client.get("/job/job-1", headers={"X-Org-Id": "org_a"})
    assert "middleware=" in str(caught.value) and "record_usage" in str(caught.value)
    assert [e["transaction_id"] for e in fake_lago.events if e["transaction_id"].startswith("job-")] == ["job-0"]


@pytest.mark.anyio
async def test_nowait_into_a_full_outbox_is_an_error(fake_lago: Any, lago_settings: BillingSettings) -> None:
    """An outbox full (Lago slow or down for long) refuses the event: the caller gets LagoUnavailableError, not a
    transaction id of an event that is nowhere."""
    from lago_org_billing import EventPipeline

    async with OrgBilling(lago_settings, transport=fake_lago.transport()) as billing:
        billing.pipeline = EventPipeline(billing.client, memory_capacity=1)  # never run: it fills
        assert billing.record_usage_nowait("org_1", "api_call", "tx_1") == "tx_1"
        with pytest.raises(LagoUnavailableError, match="full") as caught:
            billing.record_usage_nowait("org_1", "api_call", "tx_2")
        assert "await" in str(caught.value)
        await billing.pipeline.aclose(0)


def test_middleware_and_pipeline_together_are_refused(fake_lago: Any, header_settings: BillingSettings) -> None:
    asgi_app = OrgBillingMiddleware(_job_app([]), header_settings, transport=fake_lago.transport())
    with pytest.raises(ConfigurationError, match="middleware"):
        OrgBilling(header_settings, middleware=asgi_app, pipeline=asgi_app.pipeline)
    billing = OrgBilling(middleware=asgi_app, transport=fake_lago.transport())  # its settings: the middleware's
    assert billing.settings is header_settings


# ----------------------------------------------------------------------------------------------- the demo


@pytest.mark.anyio
async def test_demo_endpoint_whose_client_went_away_raises_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Ctrl-C mid-demo cuts the demo's own requests: the example endpoint, reading the body of a request whose
    client is gone, raised ``ClientDisconnect`` (uvicorn printed it as "Exception in ASGI application" with a
    traceback). It now ends quietly."""
    from lago_org_billing._demo import chat_completions

    app = Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])])
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"40")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with caplog.at_level(logging.ERROR):
        await app(scope, receive, send)  # raised starlette.requests.ClientDisconnect
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_demo_teardown_defers_ctrl_c_until_the_servers_are_stopped() -> None:
    """A Ctrl-C while the demo's servers stop (the example app flushing its events to the emulator) no longer cuts
    that short: it is held until both have stopped (the app first, then the emulator), then raised."""
    from lago_org_billing import _demo

    steps: list[str] = []
    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN in a process started in the background by a shell)
    with pytest.raises(KeyboardInterrupt):
        with _demo._interrupts_deferred():
            signal.raise_signal(signal.SIGINT)  # (a handler runs at once in the main thread: it would raise here)
            steps.append("teardown finished")
    assert steps == ["teardown finished"]
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found, given back


def test_cli_demo_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo given a port outside 0-65535: one line on stderr and exit 2, no traceback."""
    from lago_org_billing.cli import main

    assert main(["demo", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert isinstance(ConfigurationError("x"), LagoIntegrationError)


def test_a_second_ctrl_c_during_the_demo_teardown_is_not_held() -> None:
    from lago_org_billing import _demo

    steps: list[str] = []
    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN in a process started in the background by a shell)
    with pytest.raises(KeyboardInterrupt):
        with _demo._interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            steps.append("first held")
            signal.raise_signal(signal.SIGINT)
            steps.append("not reached")
    assert steps == ["first held"]
    assert signal.getsignal(signal.SIGINT) is before  # the handler it found, given back


# ------------------------------------------------------------------------------------------ timestamps


@pytest.mark.anyio
@pytest.mark.parametrize("timestamp", [dt.date(2026, 3, 1), b"1767225600", object()])
async def test_record_usage_with_a_timestamp_of_another_type_is_a_clear_error(
    fake_lago: Any, lago_settings: BillingSettings, timestamp: object
) -> None:
    """``record_usage(timestamp=date.today())`` (or bytes, or any other type) raised a bare ``TypeError`` ("conversion
    from datetime.date to Decimal is not supported"), which ``except LagoIntegrationError`` misses; it is now an
    InvalidRequestError that says what to give, and nothing is sent."""
    async with OrgBilling(lago_settings, transport=fake_lago.transport()) as billing:
        with pytest.raises(InvalidRequestError, match="aware datetime") as caught:
            await billing.record_usage("org_1", "api_call", "tx_1", timestamp=timestamp)  # type: ignore[arg-type]
    if isinstance(timestamp, dt.date):
        assert "datetime.combine" in str(caught.value)
    assert fake_lago.events == []
