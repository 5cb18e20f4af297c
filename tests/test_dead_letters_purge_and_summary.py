"""Review of ``lago-org-billing dead-letters`` from an operator's incident: Lago rejected events for two causes (a
metric's broken expression, an invalid amount); the operator counts them by reason, lists and replays only the ones
whose cause is fixed (``--reason``), reads the list line by line, and purges the ones Lago will never take
(``--purge``, confirmed by ``--yes`` or an answer on a terminal). The CLI runs as a user runs it (``cli.main``),
replays against the emulator served on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
from pathlib import Path

import anyio
import httpx
import pytest

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago


class TwoCauses(httpx.AsyncBaseTransport):
    """Lago rejecting a batch (422, by index, atomic) holding events ``metric*`` (a billable metric's expression that
    fails, on two lines as some Lago errors are) or ``amount*`` (an invalid amount); it takes the rest."""

    def __init__(self, fake: FakeLago) -> None:
        self.inner = fake.transport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events/batch"):
            batch = json.loads(await request.aread())["events"]
            failing: dict[str, object] = {}
            for index, event in enumerate(batch):
                if event["transaction_id"].startswith("metric"):
                    failing[str(index)] = "expression_evaluation_failed: Variable: b not found\nat line 1"
                elif event["transaction_id"].startswith("amount"):
                    failing[str(index)] = {"precise_total_amount_cents": ["value_is_invalid"]}
            if failing:
                error = {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors"}
                return httpx.Response(422, json={**error, "error_details": failing})
        return await self.inner.handle_async_request(request)


def make_spool(path: Path) -> None:
    """A spool with five dead letters: metric0..metric2 (fixable in Lago) and amount0..amount1 (never valid)."""

    async def make() -> None:
        settings = BillingSettings(api_url=FakeLago.base_url, api_key="k", retry_backoff=0.001, max_retries=0)
        async with LagoClient(settings, transport=TwoCauses(FakeLago(api_key="k"))) as client:
            pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
            async with anyio.create_task_group() as tasks:
                await tasks.start(pipeline.run)
                for name in ["metric0", "amount0", "metric1", "amount1", "metric2"]:
                    pipeline.submit(
                        event_payload(transaction_id=name, external_subscription_id="org_1", code="api_call")
                    )
                assert await pipeline.flush(20)
                await pipeline.aclose()

    anyio.run(make)


def stored(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        return [json.loads(body)["transaction_id"] for (body,) in conn.execute("SELECT body FROM dead_letters")]


@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "spool.db"
    make_spool(path)
    assert sorted(stored(path)) == ["amount0", "amount1", "metric0", "metric1", "metric2"]
    monkeypatch.setenv("LAGO_SPOOL_PATH", str(path))
    return path


class Terminal(io.StringIO):
    """An operator's terminal as stdin, with what they type."""

    def isatty(self) -> bool:
        return True


def test_purge_needs_a_confirmation_and_deletes_only_what_is_named(
    spool: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Letters Lago will never take (or holding no event: every replay skips them) could only be removed by editing
    the SQLite file by hand. ``--purge`` deletes them: refused without ``--yes`` when nobody can answer (a script),
    asked on a terminal, and only the letters named (``--id``, ``--reason``) go."""
    assert main(["dead-letters", "--purge"]) == 2  # stdin is no terminal here: a script must say --yes
    err = capsys.readouterr().err
    assert "--yes" in err and "Traceback" not in err, err
    assert len(stored(spool)) == 5

    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    assert main(["dead-letters", "--purge", "--reason", "value_is_invalid"]) == 1
    captured = capsys.readouterr()
    assert "2 dead letters" in captured.err and "Nothing was deleted" in captured.err, captured
    assert len(stored(spool)) == 5

    monkeypatch.setattr("sys.stdin", Terminal("y\n"))
    assert main(["dead-letters", "--purge", "--reason", "value_is_invalid"]) == 0
    assert "Purged 2" in capsys.readouterr().out
    assert sorted(stored(spool)) == ["metric0", "metric1", "metric2"]

    listed = json.loads(_out(capsys, ["dead-letters", "--json"]))
    [first] = [letter["id"] for letter in listed if letter["event"]["transaction_id"] == "metric0"]
    assert main(["dead-letters", "--purge", "--id", first, "--yes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"purged": 1}
    assert sorted(stored(spool)) == ["metric1", "metric2"]


def test_purge_and_replay_are_one_or_the_other(spool: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["dead-letters", "--purge", "--replay", "--yes"])
    assert exited.value.code == 2
    assert len(stored(spool)) == 5


def _out(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> str:
    assert main(argv) == code
    return capsys.readouterr().out


def test_letters_are_counted_by_reason_and_filtered(spool: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With thousands of letters the operator first wants how many of each cause (``--summary``), then the ones of
    one cause (``--reason``, a case-insensitive part of the reason or the code)."""
    out = _out(capsys, ["dead-letters", "--summary"])
    lines = out.splitlines()
    [metric] = [line for line in lines if "expression_evaluation_failed" in line]
    [amount] = [line for line in lines if "value_is_invalid" in line]
    assert metric.split()[0] == "3" and amount.split()[0] == "2", out
    summary = json.loads(_out(capsys, ["dead-letters", "--summary", "--json"]))
    assert sorted(group["count"] for group in summary) == [2, 3]
    assert all({"count", "status", "code", "reason"} <= set(group) for group in summary)

    listed = json.loads(_out(capsys, ["dead-letters", "--json", "--reason", "EXPRESSION_evaluation"]))
    assert [letter["event"]["transaction_id"] for letter in listed] == ["metric0", "metric1", "metric2"]
    out = _out(capsys, ["dead-letters", "--reason", "value_is_invalid"])
    assert "2 dead letters" in out and "metric" not in out


def test_each_letter_is_one_line_of_the_listing(spool: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Lago's reason on two lines split a letter over two lines of the table (``grep``, ``wc -l``, ``awk`` read a
    letter per line)."""
    lines = _out(capsys, ["dead-letters"]).splitlines()
    assert len(lines) == 1 + 5 + 1, lines  # the header, a line per letter, the total
    assert all(line.split()[0].isdigit() for line in lines[1:-1]), lines


def test_replay_of_one_cause_sends_only_those_letters(
    spool: Path, fake_lago_server: FakeLago, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The metric fixed in Lago, ``--replay --reason`` sends only its letters, with their transaction_id and
    timestamp as stored; the others are neither sent nor touched."""
    with contextlib.closing(sqlite3.connect(spool)) as conn, conn:
        before = {
            json.loads(b)["transaction_id"]: json.loads(b) for (b,) in conn.execute("SELECT body FROM dead_letters")
        }
    monkeypatch.setenv("LAGO_API_URL", str(fake_lago_server.url))
    monkeypatch.setenv("LAGO_API_KEY", fake_lago_server.api_key)
    out = _out(capsys, ["dead-letters", "--replay", "--reason", "expression_evaluation_failed"])
    assert "Replayed 3: 3 delivered" in out, out
    sent = {
        event["transaction_id"]: event
        for request in fake_lago_server.write_requests
        if request.path.endswith("/events/batch")
        for event in request.body["events"]
    }
    assert sorted(sent) == ["metric0", "metric1", "metric2"]
    assert all(sent[name] == before[name] for name in sent), (sent, before)  # the stored event, timestamp and all
    assert sorted(event["transaction_id"] for event in fake_lago_server.events) == ["metric0", "metric1", "metric2"]
    assert sorted(stored(spool)) == ["amount0", "amount1"]
