"""The routes and the CLI after a fault: ``POST /usage/record`` retried after a lost answer (each
event store, the quota gate's count), ``dead-letters --replay``'s up-front check of the API key and URL."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Mount

from lago_org_billing import BillingSettings, LagoClient, OrgBilling, _dead_letters, billing_routes
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago

API_KEY = "rereview-routes-cli-key"
BASE = "/billing/organizations"


def allow_all(request: Request, org_id: str) -> bool:
    return True


# ------------------------------------------------------------------------------ usage/record after a lost answer


class LoseFirstEventAnswer(httpx.AsyncBaseTransport):
    """Lago stores the first event sent, then its answer is lost (a read timeout); later calls pass."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.lost = 0
        self.sent: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/events":
            self.sent.append(json.loads(await request.aread())["event"])
        response = await self.inner.handle_async_request(request)
        if request.url.path == "/api/v1/events" and not self.lost:
            self.lost += 1
            await response.aread()
            raise httpx.ReadTimeout("answer lost", request=request)
        return response


class CountingGate:
    """The quota gate as the routes use it: what they count."""

    token_metric = "api_call"

    def __init__(self) -> None:
        self.settled: list[tuple[str, int, bool]] = []

    def settle(self, org_id: str, decision: Any, *, tokens: int = 0, billed: bool = True) -> None:
        self.settled.append((org_id, tokens, billed))


@pytest.mark.anyio
@pytest.mark.parametrize("event_store", ["postgres", "clickhouse"])
@pytest.mark.parametrize("max_retries", [0, 2])
async def test_usage_retried_after_a_lost_answer_is_one_event_counted_at_most_once(
    event_store: str, max_retries: int
) -> None:
    """The 503 names the transaction_id and timestamp sent; the caller's retry with both is the same event in Lago
    (Postgres: a 422 duplicate, ClickHouse: the same copy replaced) and the gate never counts it twice (the client's
    own retry of the lost answer included)."""
    fake = FakeLago(api_key=API_KEY, event_store=event_store)
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_plan("starter", amount_cents=0, charges=[])
    fake.add_subscription("org_1", "starter", external_id="org_1")
    lossy = LoseFirstEventAnswer(fake.transport())
    gate = CountingGate()
    settings = BillingSettings(api_url=fake.base_url, api_key=API_KEY, max_retries=max_retries, retry_backoff=0.001)
    async with LagoClient(settings, transport=lossy) as lago:
        router = billing_routes(OrgBilling(client=lago, quota=gate), authorize=allow_all)  # type: ignore[arg-type]
        app = Starlette(routes=[Mount("/billing", app=router)])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            body = {"user_id": "ada", "tokens": 120}
            first = await client.post(f"{BASE}/org_1/usage/record", json=body)
            answers = [first]
            if first.status_code == 503:
                sent = first.json()
                assert sent["transaction_id"] == fake.events[0]["transaction_id"]
                assert sent["timestamp"] == lossy.sent[0]["timestamp"], (sent, lossy.sent)
                retry = {**body, "transaction_id": sent["transaction_id"], "timestamp": sent["timestamp"]}
                answers.append(await client.post(f"{BASE}/org_1/usage/record", json=retry))
    assert answers[-1].status_code in (200, 201), [a.text for a in answers]
    assert len(fake.events) == 1
    assert {event["timestamp"] for event in lossy.sent} == {lossy.sent[0]["timestamp"]}, lossy.sent
    assert len(gate.settled) <= 1, gate.settled


# ------------------------------------------------------------------------- dead-letters --replay's first check


class ScopedKey(httpx.AsyncBaseTransport):
    """Lago with an API key scoped by resource (Lago's ``api_permissions``): it may write events only, so every other
    call is a 403 ``<read|write>_action_not_allowed_for_<resource>``. The events it rejected before (the billable
    metric's expression, since fixed) now pass."""

    def __init__(self, fake: FakeLago) -> None:
        self.inner = fake.transport()
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(f"{request.method} {request.url.path}")
        if not request.url.path.startswith("/api/v1/events"):
            mode = "read" if request.method == "GET" else "write"
            resource = request.url.path.split("/")[3].rstrip("s")
            error = {"status": 403, "error": "Forbidden", "code": f"{mode}_action_not_allowed_for_{resource}"}
            return httpx.Response(403, json=error)
        return await self.inner.handle_async_request(request)


class RejectAll(httpx.AsyncBaseTransport):
    """Lago rejecting every event of a batch (422 by index), as a failing billable metric expression does."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        batch = json.loads(await request.aread())["events"]
        details = {str(index): "expression_evaluation_failed: x" for index in range(len(batch))}
        error = {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors"}
        return httpx.Response(422, json={**error, "error_details": details})


def _client(transport: httpx.AsyncBaseTransport) -> LagoClient:
    settings = BillingSettings(api_url=FakeLago.base_url, api_key=API_KEY, retry_backoff=0.001, max_retries=0)
    return LagoClient(settings, transport=transport)


def _spool_with_letters(path: Path, count: int) -> None:
    async def make() -> None:
        async with _client(RejectAll()) as client:
            pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
            async with anyio.create_task_group() as tasks:
                await tasks.start(pipeline.run)
                for index in range(count):
                    event = event_payload(
                        transaction_id=f"tx{index}", external_subscription_id="org_1", code="api_call"
                    )
                    pipeline.submit(event)
                assert await pipeline.flush(20)
                await pipeline.aclose()

    anyio.run(make)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0] == count


def test_replay_with_an_api_key_scoped_to_events_is_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lago's API keys can be scoped by resource: a key that may write events (all a replay does) but not read
    customers got 403 on the up-front ``GET /customers`` check, and the command refused with "Lago refuses this API
    key or URL" (exit 2): the letters could not be replayed with the app's own least-privilege key."""
    path = tmp_path / "spool.db"
    _spool_with_letters(path, 2)
    fake = FakeLago(api_key=API_KEY)
    transport = ScopedKey(fake)
    monkeypatch.setattr(_dead_letters, "LagoClient", lambda _settings: _client(transport))
    monkeypatch.setenv("LAGO_API_KEY", API_KEY)
    monkeypatch.setenv("LAGO_API_URL", FakeLago.base_url)
    code = main(["dead-letters", "--spool", str(path), "--replay", "--timeout", "10"])
    captured = capsys.readouterr()
    assert code == 0, captured
    assert sorted(event["transaction_id"] for event in fake.events) == ["tx0", "tx1"]
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0] == 0


def test_replay_with_a_key_that_may_not_write_events_is_said_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same scoped key without the events permission: refused at once naming the key (nothing sent, letters
    kept), not retried until --timeout and said "Lago did not answer"."""
    path = tmp_path / "spool.db"
    _spool_with_letters(path, 1)

    class NoEvents(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            resource = request.url.path.split("/")[3].rstrip("s")
            mode = "read" if request.method == "GET" else "write"
            error = {"status": 403, "error": "Forbidden", "code": f"{mode}_action_not_allowed_for_{resource}"}
            return httpx.Response(403, json=error)

    monkeypatch.setattr(_dead_letters, "LagoClient", lambda _settings: _client(NoEvents()))
    monkeypatch.setenv("LAGO_API_KEY", API_KEY)
    monkeypatch.setenv("LAGO_API_URL", FakeLago.base_url)
    assert main(["dead-letters", "--spool", str(path), "--replay", "--timeout", "30"]) == 2
    err = capsys.readouterr().err
    assert "LAGO_API_KEY" in err or "API key" in err, err
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0] == 1


@pytest.mark.parametrize("key", ["99999999999999999999", "3:9223372036854775808", "9" * 5000])
def test_an_id_past_sqlites_integers_is_an_unknown_id_not_a_traceback(
    key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--id`` with a long number (a transaction id of digits pasted instead of the row id) crashed with sqlite3's
    OverflowError traceback: it is "no such dead letter" (exit 2), as any other unknown id."""
    path = tmp_path / "spool.db"
    _spool_with_letters(path, 1)
    (tmp_path / "spool.db.3").write_bytes(path.read_bytes())
    assert main(["dead-letters", "--spool", str(path), "--id", key]) == 2
    err = capsys.readouterr().err
    assert ("no such dead letter" in err or "not an id" in err) and key[:100] in err, err


class CtrlCOnSend(httpx.AsyncBaseTransport):
    """Lago slow to answer the replay's batch, and the operator pressing Ctrl-C meanwhile (a real SIGINT to this
    process: asyncio's runner cancels the command's task, then raises KeyboardInterrupt)."""

    def __init__(self, fake: FakeLago) -> None:
        self.inner = fake.transport()
        self.pressed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events/batch"):
            if not self.pressed:
                self.pressed = True
                signal.raise_signal(signal.SIGINT)
            await anyio.sleep_forever()
        return await self.inner.handle_async_request(request)


def test_ctrl_c_during_a_replay_does_not_say_events_are_lost(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ctrl-C while Lago had not answered: next to "Interrupted: ... left as they were", the delivery pipeline's
    own shutdown warnings said "stopped without a shutdown (no ASGI lifespan: call the middleware's aclose()...)" and
    "3 events in memory ... are lost if the process ends first": the operator read that the letters were lost."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    path = tmp_path / "spool.db"
    _spool_with_letters(path, 3)
    monkeypatch.setattr(_dead_letters, "LagoClient", lambda _settings: _client(CtrlCOnSend(FakeLago(api_key=API_KEY))))
    monkeypatch.setenv("LAGO_API_KEY", API_KEY)
    monkeypatch.setenv("LAGO_API_URL", FakeLago.base_url)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lago_org_billing"):
        assert main(["dead-letters", "--spool", str(path), "--replay"]) == 130
    assert "Interrupted" in capsys.readouterr().err
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in said if "lost" in m or "aclose()" in m or "lifespan" in m], said
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        assert conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0] == 3
