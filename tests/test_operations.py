"""Operating it in production: secrets never shown, logs that do not flood while something stays broken, `health`
saying what is wrong, and SIGTERM to a uvicorn worker flushing (or spooling) its events."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from lago_org_billing import BillingSettings, LagoClient, LagoWebhooks, OrgBilling, billing_routes
from lago_org_billing._errors import LagoAPIError, LagoUnavailableError
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

pytestmark = pytest.mark.anyio

API_KEY = "sk-lago-RECOGNIZABLE-api-key"
HMAC_KEY = "whsec-RECOGNIZABLE-hmac-key"


def fake_lago() -> Any:  # (inject_fault comes with the fault controls)
    return FakeLago(api_key=API_KEY)


def client_for(fake: FakeLago, **settings: Any) -> LagoClient:
    options: dict[str, Any] = {"api_url": fake.base_url, "api_key": API_KEY, "retry_backoff": 0.001}
    options.update(settings)
    return LagoClient(BillingSettings(**options), transport=fake.transport())


def records(caplog: pytest.LogCaptureFixture, logger: str, level: int = logging.WARNING) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and r.levelno >= level]


# ------------------------------------------------------------------------------------------- logs: no floods


async def test_lago_down_does_not_log_a_warning_per_retry_of_every_call(caplog: pytest.LogCaptureFixture) -> None:
    """Lago down: every quota refresh (one per org and TTL) retries, and each retry was a WARNING of its own. With
    10,000 orgs that is tens of thousands of lines an hour saying the same thing; the quota gate and the delivery
    already say the outage once. Retries are said once in a while (with what to check), the rest at DEBUG."""
    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    fake = fake_lago()
    fake.inject_fault(status=503, count=10**6)
    async with client_for(fake, max_retries=2) as lago:
        for i in range(100):
            with pytest.raises(LagoUnavailableError):
                await lago.get_customer(f"org_{i}")
    retries = [r for r in caplog.records if r.name == "lago_org_billing.client" and "retry" in r.getMessage()]
    assert len(retries) == 200  # every retry is still logged (at DEBUG for most)
    warnings = records(caplog, "lago_org_billing.client")
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]
    assert "LAGO_API_URL" in warnings[0].getMessage()  # what to check


async def test_a_flood_of_badly_signed_webhooks_logs_a_bounded_number_of_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A scanner (or a Lago endpoint configured with another HMAC key) posting to the webhook route: one WARNING per
    request, unbounded. Said once in a while with the count; every rejection is still counted."""
    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    settings = BillingSettings(api_key=API_KEY, webhook_hmac_key=HMAC_KEY)
    webhooks = LagoWebhooks(settings)
    app = Starlette(routes=[Route("/webhooks/lago", webhooks, methods=["POST"])])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as http:
        for _ in range(100):
            answer = await http.post(
                "/webhooks/lago",
                content=b'{"webhook_type": "invoice.created"}',
                headers={"X-Lago-Signature": "bad", "X-Lago-Signature-Algorithm": "hmac"},
            )
            assert answer.status_code == 401
    assert webhooks.stats["rejected"] == 100
    warnings = records(caplog, "lago_org_billing.webhooks")
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]
    assert "LAGO_WEBHOOK_HMAC_KEY" in warnings[0].getMessage()


class _BrokenDedupe:
    """A shared dedupe store that is down (Redis unreachable)."""

    async def claim(self, key: str) -> Any:
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    async def complete(self, key: str) -> None:
        raise ConnectionError("down")

    async def release(self, key: str) -> None:
        raise ConnectionError("down")


async def test_a_dedupe_store_down_logs_once_in_a_while_not_a_traceback_per_webhook(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis down for an hour: every webhook logged a WARNING with a whole traceback. Webhooks are still processed
    (at-least-once), and the outage is said once in a while."""
    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    webhooks = LagoWebhooks(BillingSettings(api_key=API_KEY, webhook_hmac_key=HMAC_KEY), dedupe=_BrokenDedupe())
    app = Starlette(routes=[Route("/webhooks/lago", webhooks, methods=["POST"])])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as http:
        for i in range(50):
            body = b'{"webhook_type": "invoice.created", "object_type": "invoice", "invoice": {}}'
            signature = base64.b64encode(hmac.new(HMAC_KEY.encode(), body, hashlib.sha256).digest()).decode()
            answer = await http.post(
                "/webhooks/lago",
                content=body,
                headers={
                    "X-Lago-Signature": signature,
                    "X-Lago-Signature-Algorithm": "hmac",
                    "X-Lago-Unique-Key": f"k{i}",
                },
            )
            assert answer.status_code == 200
    assert webhooks.stats["ignored"] == 50
    warnings = records(caplog, "lago_org_billing.webhooks")
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]


async def test_billing_routes_with_a_revoked_key_log_an_error_once_in_a_while_not_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A revoked API key: every dashboard load (a front end polling it, for every org admin) logged an ERROR of its
    own. The answers stay 502 each time, without any setting in them; the log says it once in a while."""
    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    fake = FakeLago(api_key="the-new-key")
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        router = billing_routes(OrgBilling(client=lago), authorize=lambda request, org_id: True)
        app = Starlette(routes=[Mount("/billing", app=router)])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as http:
            for _ in range(40):
                answer = await http.get("/billing/organizations/org_1/dashboard")
                assert answer.status_code == 502
                assert API_KEY not in answer.text and fake.base_url not in answer.text
    errors = records(caplog, "lago_org_billing.routes")
    assert 1 <= len(errors) <= 2, [r.getMessage() for r in errors]
    assert "LAGO_API_KEY" in errors[0].getMessage()


# ------------------------------------------------------------------------------------------------ secrets


def test_the_webhook_receivers_configuration_does_not_show_the_hmac_key() -> None:
    """The receiver's configuration (a local of every request's frame: error trackers such as Sentry record frames'
    locals with their repr) showed the HMAC key in clear."""
    webhooks = LagoWebhooks(BillingSettings(api_key=API_KEY, webhook_hmac_key=HMAC_KEY))
    config = webhooks._configure()
    for shown in (repr(config), str(config), repr(webhooks)):
        assert HMAC_KEY not in shown and API_KEY not in shown


async def test_no_secret_in_what_a_wrong_key_and_lago_down_show(caplog: pytest.LogCaptureFixture) -> None:
    """A guard over the failure paths: a refused key and Lago down, through the client, the health check and the
    settings' repr. No secret appears in logs, errors or reprs."""
    caplog.set_level(logging.DEBUG)
    fake: Any = FakeLago(api_key="another-key")
    settings = BillingSettings(
        api_url=fake.base_url,
        api_key=API_KEY,
        webhook_hmac_key=HMAC_KEY,
        redis_url="redis://:RECOGNIZABLE-redis-password@127.0.0.1:1/0",
        retry_backoff=0.001,
        max_retries=1,
    )
    shown: list[str] = [repr(settings), str(settings)]
    async with OrgBilling(settings, transport=fake.transport()) as billing:
        shown.append(repr(billing.client))
        shown.append(str(await billing.check_lago_health()))
        with pytest.raises(LagoAPIError) as info:
            await billing.client.get_customer("org_1")
        shown += [str(info.value), repr(info.value)]
        fake.inject_fault(status=503, count=100)
        shown.append(str(await billing.check_lago_health()))
    text = "\n".join(shown + [r.getMessage() for r in caplog.records])
    for secret in (API_KEY, HMAC_KEY, "RECOGNIZABLE-redis-password"):
        assert secret not in text


# ------------------------------------------------------------------------------------------------- health


def test_health_on_a_wrong_url_path_says_to_check_lago_api_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """LAGO_API_URL with a path Lago is not served under (https://host/lago): Lago (or the emulator) answers its
    `404 resource_not_found` for the unknown route /lago/health, and `health` said "Check the id (Lago's ids are
    case-sensitive), or create the resource first": there is no id in a health check. It names LAGO_API_URL."""
    fake = fake_lago()
    with serve_in_thread(fake) as url:
        monkeypatch.setenv("LAGO_API_URL", url + "/lago")
        monkeypatch.setenv("LAGO_API_KEY", API_KEY)
        assert main(["health"]) == 1
    err = capsys.readouterr().err
    assert "LAGO_API_URL" in err and "the id" not in err


async def test_health_after_a_timeout_says_how_long_it_waited() -> None:
    """Lago not answering in time: the health error read "did not answer GET /health (ReadTimeout: )". It says the
    wait and the setting that bounds it."""
    with socket.socket() as server:  # accepts connections (the backlog), never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        settings = BillingSettings(api_url=url, api_key=API_KEY, api_timeout=0.3, max_retries=0)
        async with OrgBilling(settings) as billing:
            result = await billing.check_lago_health()
    assert result["healthy"] is False
    assert "LAGO_API_TIMEOUT" in result["error"] and "0.3" in result["error"], result["error"]


# ------------------------------------------------------------------------------------------------ SIGTERM

APP = textwrap.dedent(
    """
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Mount, Route

    import os

    from lago_org_billing import OrgBillingMiddleware


    async def chat(request):
        return JSONResponse({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})


    app = Starlette(routes=[Route("/v1/chat", chat, methods=["POST"])])
    app.add_middleware(OrgBillingMiddleware, shutdown_timeout=float(os.environ.get("SHUTDOWN_TIMEOUT", "5")))
    """
)


@contextlib.contextmanager
def _refusing_port() -> Iterator[int]:
    """A loopback port bound (so no other process takes it) but not listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def _start_worker(
    tmp_path: Path, lago_url: str, spool: Path | None, *, shutdown_timeout: float | None = None
) -> tuple[subprocess.Popen[str], str]:
    """uvicorn serving APP on a port of its choosing (``--port 0``: no port picked here that another process could
    take before it binds), and its URL once it listens."""
    (tmp_path / "billing_app.py").write_text(APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAGO_")}
    env.update(
        LAGO_API_URL=lago_url,
        LAGO_API_KEY=API_KEY,
        LAGO_ORG_HEADER="X-Org",
        LAGO_QUOTA_MODE="off",
        PYTHONPATH=str(tmp_path),
    )
    if spool is not None:
        env["LAGO_SPOOL_PATH"] = str(spool)
    if shutdown_timeout is not None:
        env["SHUTDOWN_TIMEOUT"] = str(shutdown_timeout)
    command = [sys.executable, "-m", "uvicorn", "billing_app:app", "--port", "0", "--no-access-log"]
    worker = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    assert worker.stderr is not None
    said = []
    for line in worker.stderr:  # blocks until uvicorn listens, or exits
        said.append(line)
        listening = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
        if listening:
            return worker, listening.group(1)
    raise AssertionError(f"uvicorn exited ({worker.wait()}) before listening:\n{''.join(said)}")


def _sigterm(worker: subprocess.Popen[str]) -> str:
    """SIGTERM, then what the worker said until it exited."""
    worker.send_signal(signal.SIGTERM)
    assert worker.stderr is not None
    said = worker.stderr.read()
    worker.wait(timeout=60)
    worker.stderr.close()
    return said


def _bill(app_url: str, count: int) -> None:
    with httpx.Client(trust_env=False) as http:
        for _ in range(count):
            assert http.post(app_url + "/v1/chat", headers={"X-Org": "org_1"}).status_code == 200


@pytest.mark.slow
def test_sigterm_to_a_uvicorn_worker_delivers_what_it_holds(tmp_path: Path) -> None:
    """In memory, Lago up: what the worker billed is in Lago once it has exited on SIGTERM."""
    fake = fake_lago()
    with serve_in_thread(fake) as lago_url:
        worker, app_url = _start_worker(tmp_path, lago_url, None)
        try:
            _bill(app_url, 30)
        finally:
            said = _sigterm(worker)
        assert len({event["transaction_id"] for event in fake.events}) == len(fake.events) == 30, said
    assert "lost" not in said


@pytest.mark.slow
def test_sigterm_with_lago_down_leaves_the_events_in_the_spool_for_the_next_start(tmp_path: Path) -> None:
    """With the SQLite spool and Lago unreachable, SIGTERM ends the worker after the shutdown timeout, saying the
    events stay in the spool; the next start delivers each once."""
    spool = tmp_path / "spool" / "events.db"
    with _refusing_port() as lago_down:
        # (a shutdown timeout of 1 s, not the default 5 s: the worker gives up on Lago all the same, sooner)
        worker, app_url = _start_worker(tmp_path, f"http://127.0.0.1:{lago_down}", spool, shutdown_timeout=1)
        try:
            _bill(app_url, 25)
        finally:
            said = _sigterm(worker)
    assert "stay in the spool" in said, said
    fake = fake_lago()
    with serve_in_thread(fake) as lago_url:
        worker, _ = _start_worker(tmp_path, lago_url, spool)
        said = _sigterm(worker)  # what the spool holds is delivered at the latest by the shutdown's flush
        assert len({event["transaction_id"] for event in fake.events}) == len(fake.events) == 25


async def test_a_password_in_lago_api_url_is_not_shown_by_delivery_logs_nor_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`BillingSettings` masks the password of LAGO_API_URL (a proxy's basic auth) in its repr, but the delivery's
    outage WARNING and the client's "did not answer ... Check LAGO_API_URL (...)" showed the URL as it was."""
    from lago_org_billing._delivery import EventPipeline
    from lago_org_billing._events import event_payload

    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    shown: list[str] = []
    with _refusing_port() as port:
        url = f"http://ops:RECOGNIZABLE-url-password@127.0.0.1:{port}"
        settings = BillingSettings(api_url=url, api_key=API_KEY, retry_backoff=0.001, max_retries=1)
        async with LagoClient(settings) as lago:
            with pytest.raises(LagoUnavailableError) as info:
                await lago.get_customer("org_1")
            shown.append(str(info.value))
            # (the flush and the shutdown give up on the refused port after 0.2 s: what fails meanwhile is logged)
            pipeline = EventPipeline(lago, flush_interval=0.01, max_backoff=0.01, shutdown_timeout=0.2)
            async with pipeline:
                pipeline.submit(event_payload(transaction_id="tx1", external_subscription_id="org_1", code="api_call"))
                assert not await pipeline.flush(0.2)
    failures = [r for r in caplog.records if r.name == "lago_org_billing.delivery" and "failed" in r.getMessage()]
    assert failures
    text = "\n".join(shown + [r.getMessage() for r in caplog.records])
    assert "RECOGNIZABLE-url-password" not in text, text


async def test_health_of_lago_front_end_url_says_to_check_lago_api_url() -> None:
    """LAGO_API_URL set to Lago's front end (app.getlago.com instead of api.getlago.com): every path is its HTML
    page, answered 200, and health said only "Lago answered GET /health with 200 but the body is not JSON"."""

    def front_end(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, html="<!doctype html><html><body><div id=root></div></body></html>")

    settings = BillingSettings(api_url="https://app.lago.test", api_key=API_KEY, max_retries=0)
    async with OrgBilling(settings, transport=httpx.MockTransport(front_end)) as billing:
        result = await billing.check_lago_health()
    assert result["healthy"] is False
    assert "LAGO_API_URL" in result["error"], result["error"]


async def test_health_and_migrate_show_lago_api_url_without_its_password(tmp_path: Any) -> None:
    """``OrgBilling.check_lago_health`` (what ``health`` prints, ``--json`` too) and ``migrate``'s first line show
    LAGO_API_URL with its password masked."""
    from lago_org_billing._settings import masked_url

    settings = BillingSettings(api_url="http://user:hunter2secret@127.0.0.1:9/lago", api_key="k", max_retries=0)
    async with OrgBilling(settings) as billing:
        result = await billing.check_lago_health()
    assert "hunter2secret" not in str(result) and result["url"] == "http://user:***@127.0.0.1:9/lago"
    assert masked_url("http://127.0.0.1:3000") == "http://127.0.0.1:3000"


def test_a_reader_going_away_ends_the_cli_without_a_traceback() -> None:
    """``lago-org-billing demo | head -1``: the reader closes the pipe after one line; the command ends with exit
    code 1 and no BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "lago_org_billing.cli", "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err, err.decode()
    assert proc.returncode == 1


def test_migrate_interrupted_says_how_to_finish(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C during ``migrate --execute``: exit 130 and one line saying to run the same command again (it used to
    end silently)."""
    from lago_org_billing import _migration_cli

    def interrupted(*args: Any, **kwargs: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(_migration_cli, "run_migrate_command", interrupted)
    mapping = tmp_path / "map.csv"
    mapping.write_text("user_id,org_id,org_name,email\nu1,org_1,Org,a@b.test\n")
    assert main(["migrate", "--mapping-file", str(mapping), "--execute", "--journal", str(tmp_path / "j")]) == 130
    assert "run the same command to finish" in capsys.readouterr().err
