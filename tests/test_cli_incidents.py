"""`lago-org-billing dead-letters` and the other commands as an operator uses them in an incident: list and `--replay`
on a spool several workers write, letters sharing a `transaction_id`, Lago rejecting again or going down, interrupted
replays, files that are not spools or are locked, a demo in a shell with a proxy, an emulator banner."""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from lago_org_billing import _dead_letters
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from test_delivery import API_KEY, make_client, make_fake, run_pipeline
from test_spool import rows


class Rejecting(httpx.AsyncBaseTransport):
    """Lago in front of the emulator, rejecting (422, by index) the events of the subscriptions in ``subscriptions``
    as a billable metric whose expression fails would; ``down`` makes it unreachable after ``batches`` batches."""

    def __init__(self, fake: FakeLago, subscriptions: set[str]) -> None:
        self.fake = fake
        self.inner = fake.transport()
        self.subscriptions = subscriptions
        self.batches = 0
        self.down_after: int | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events/batch"):
            if self.down_after is not None and self.batches >= self.down_after:
                raise httpx.ConnectError("connection refused", request=request)
            self.batches += 1
            batch = json.loads(await request.aread())["events"]
            failing = {
                str(index): f"expression_evaluation_failed: {event['external_subscription_id']}"
                for index, event in enumerate(batch)
                if event["external_subscription_id"] in self.subscriptions
            }
            if failing:
                error = {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors"}
                return httpx.Response(422, json={**error, "error_details": failing})
        return await self.inner.handle_async_request(request)


def event(transaction_id: str, subscription: str) -> dict[str, Any]:
    return event_payload(
        transaction_id=transaction_id,
        external_subscription_id=subscription,
        code="api_call",
        properties={"total_tokens": 5},
    )


def spool_letters(path: Path, submitted: list[dict[str, Any]]) -> None:
    """A spool whose dead letters are ``submitted`` (every one rejected by Lago)."""

    async def make() -> None:
        subscriptions = {item["external_subscription_id"] for item in submitted}
        async with make_client(Rejecting(make_fake(), subscriptions)) as client:
            pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
            assert await run_pipeline(pipeline, submitted)

    anyio.run(make)
    assert rows(path, "dead_letters") == len(submitted)


def letters(path: Path) -> list[tuple[str, str, str]]:
    """(subscription, transaction_id, reason) of every letter of the spool file."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        found = conn.execute("SELECT body, reason FROM dead_letters ORDER BY id").fetchall()
    return [(json.loads(body)["external_subscription_id"], json.loads(body)["transaction_id"], r) for body, r in found]


@pytest.fixture
def lago(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rejecting]:
    """The Lago ``dead-letters --replay`` talks to (in process), with every settings variable set."""
    transport = Rejecting(make_fake(), set())
    monkeypatch.setattr(_dead_letters, "LagoClient", lambda _settings: make_client(transport))
    monkeypatch.setenv("LAGO_API_KEY", API_KEY)
    monkeypatch.setenv("LAGO_API_URL", FakeLago.base_url)
    yield transport


def test_letters_sharing_a_transaction_id_on_two_subscriptions_get_their_own_answers(
    tmp_path: Path, lago: Rejecting, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lago dedupes on (subscription, transaction_id): the same id on two subscriptions is two events. Replayed,
    the one Lago takes leaves the dead letters and the one it rejects stays with its own new reason (outcomes were
    matched by transaction_id alone: the delivered one stayed too, said 'rejected again' with the other's reason)."""
    path = tmp_path / "spool.db"
    spool_letters(path, [event("shared", "org_a"), event("shared", "org_b")])
    lago.subscriptions = {"org_b"}
    assert main(["dead-letters", "--spool", str(path), "--replay"]) == 1
    out = capsys.readouterr().out
    assert "Replayed 2: 1 delivered (0 already in Lago), 1 rejected again" in out
    assert letters(path) == [("org_b", "shared", "expression_evaluation_failed: org_b")]
    assert [(e["external_subscription_id"], e["transaction_id"]) for e in lago.fake.events] == [("org_a", "shared")]


def test_a_file_that_is_not_a_spool_is_said_not_listed_as_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--spool` naming a text file crashed with sqlite3's traceback; naming another SQLite database (the app's
    own) said "0 dead letters" and `--replay` "Replayed 0", exit 0: the operator believed there was nothing to do.
    Both are exit 2 naming the file, before anything is sent."""
    monkeypatch.setenv("LAGO_API_KEY", "k")
    monkeypatch.setenv("LAGO_API_URL", "http://127.0.0.1:9")
    text = tmp_path / "notes.db"
    text.write_text("not a database\n" * 100)
    app_db = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(app_db)) as conn, conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    for path in (text, app_db):
        for replay in ([], ["--replay"], ["--json"]):
            assert main(["dead-letters", "--spool", str(path), *replay]) == 2
            captured = capsys.readouterr()
            assert str(path) in captured.err and "not a spool" in captured.err, captured
            assert "dead letters in" not in captured.out and "Replayed" not in captured.out


def test_a_spool_that_is_empty_or_being_created_lists_no_letters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A slot file a starting worker has just created (no table yet) holds no letters: not an error."""
    path = tmp_path / "spool.db"
    spool_letters(path, [event("tx0", "org_a")])
    (tmp_path / "spool.db.1").write_bytes(b"")
    assert main(["dead-letters", "--spool", str(path)]) == 0
    assert "1 dead letters in" in capsys.readouterr().out


def test_a_locked_spool_is_said_not_listed_as_empty(
    tmp_path: Path, lago: Rejecting, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A spool file another process keeps locked (a sqlite3 shell, a backup) past the busy timeout: listing said
    "0 dead letters", exit 0, and `--replay` "Replayed 0", exit 0. Now exit 2 saying it is locked, nothing sent."""
    monkeypatch.setattr(_dead_letters, "BUSY_TIMEOUT", 0.05)
    path = tmp_path / "spool.db"
    spool_letters(path, [event("tx0", "org_a"), event("tx1", "org_a")])
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        for replay in ([], ["--replay"], ["--replay", "--id", "1"]):
            assert main(["dead-letters", "--spool", str(path), *replay]) == 2
            captured = capsys.readouterr()
            assert "locked" in captured.err and str(path) in captured.err, captured
            assert "no such dead letter" not in captured.err
            assert "dead letters in" not in captured.out and "Replayed" not in captured.out
    finally:
        holder.close()
    assert lago.fake.events == [] and len(letters(path)) == 2


def test_lago_down_mid_replay_loses_nothing_and_says_to_run_again(
    tmp_path: Path, lago: Rejecting, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lago takes the first thousand (here two) then goes down: exit 1, the letters it took are gone, the others
    stay as they were, stderr says to run again; run again with Lago back: each event reaches Lago once."""
    monkeypatch.setattr(_dead_letters, "CHUNK", 2)
    path = tmp_path / "spool.db"
    spool_letters(path, [event(f"tx{i}", "org_a") for i in range(5)])
    before = letters(path)
    lago.down_after = 1
    assert main(["dead-letters", "--spool", str(path), "--replay", "--timeout", "0.5"]) == 1
    captured = capsys.readouterr()
    assert "did not answer" in captured.err and "run again" in captured.err
    assert letters(path) == before[2:]
    lago.down_after = None
    assert main(["dead-letters", "--spool", str(path), "--replay"]) == 0
    assert "Replayed 3: 3 delivered" in capsys.readouterr().out
    assert sorted(e["transaction_id"] for e in lago.fake.events) == [f"tx{i}" for i in range(5)]
    assert letters(path) == []


def test_a_replay_interrupted_after_lago_took_the_events_bills_nothing_twice(
    tmp_path: Path, lago: Rejecting, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C after Lago took the events but before the spool was updated (SIGKILL there is the same: the update
    is one transaction per file): exit 130, a line saying the letters are kept and to run again; run again: the
    same transaction_ids and timestamps, duplicates in Lago, not second charges."""
    path = tmp_path / "spool.db"
    spool_letters(path, [event("tx0", "org_a"), event("tx1", "org_b")])
    stored = {json.loads(body)["transaction_id"]: json.loads(body) for body in bodies(path)}
    real_connect = _dead_letters._connect

    def interrupting(file: str) -> Any:
        if lago.fake.events:  # Lago has answered: the spool's update is next
            raise KeyboardInterrupt
        return real_connect(file)

    monkeypatch.setattr(_dead_letters, "_connect", interrupting)
    assert main(["dead-letters", "--spool", str(path), "--replay"]) == 130
    err = capsys.readouterr().err
    assert "nterrupted" in err and "run again" in err and "Traceback" not in err
    assert len(letters(path)) == 2
    monkeypatch.setattr(_dead_letters, "_connect", real_connect)
    assert main(["dead-letters", "--spool", str(path), "--replay"]) == 0
    assert "Replayed 2: 2 delivered (2 already in Lago)" in capsys.readouterr().out
    assert len(lago.fake.events) == 2 and letters(path) == []
    for sent in lago.fake.events:
        when = datetime.datetime.fromisoformat(sent["timestamp"].replace("Z", "+00:00")).timestamp()
        assert round(when, 3) == round(float(stored[sent["transaction_id"]]["timestamp"]), 3)


def bodies(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        return [row[0] for row in conn.execute("SELECT body FROM dead_letters ORDER BY id")]


@pytest.mark.anyio
async def test_replay_on_a_spool_two_live_workers_write(
    tmp_path: Path, lago: Rejecting, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two running workers (slot files spool.db and spool.db.1, locks held) keep writing while the command lists
    and replays their letters: each letter is named by its slot, `--id 1:N` replays one of the second file, a plain
    `--replay` the rest; the workers' own view agrees, and a letter they write afterwards is kept."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    workers_lago = Rejecting(fake, {"org_a", "org_b"})
    async with make_client(workers_lago) as client:
        first = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        second = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        async with anyio.create_task_group() as tasks:
            await tasks.start(first.run)
            await tasks.start(second.run)
            assert (first.spool_file, second.spool_file) == (str(path), f"{path}.1")
            first.submit(event("a0", "org_a"))
            second.submit(event("b0", "org_b"))
            second.submit(event("b1", "org_b"))
            assert await first.flush(20) and await second.flush(20)

            assert await anyio.to_thread.run_sync(main, ["dead-letters", "--spool", str(path), "--json"]) == 0
            keys = {letter["event"]["transaction_id"]: letter["id"] for letter in json.loads(capsys.readouterr().out)}
            assert sorted(keys) == ["a0", "b0", "b1"]
            assert ":" not in keys["a0"] and keys["b0"].startswith("1:") and keys["b1"].startswith("1:")

            replay_b1 = ["dead-letters", "--spool", str(path), "--replay", "--id", keys["b1"]]
            assert await anyio.to_thread.run_sync(main, replay_b1) == 0
            assert "Replayed 1: 1 delivered" in capsys.readouterr().out
            assert [letter.event["transaction_id"] for letter in second.dead_letters()] == ["b0"]

            first.submit(event("a1", "org_a"))  # the workers go on writing letters
            assert await first.flush(20)
            assert await anyio.to_thread.run_sync(main, ["dead-letters", "--spool", str(path), "--replay"]) == 0
            assert "Replayed 3: 3 delivered" in capsys.readouterr().out
            assert first.dead_letters() == [] and second.dead_letters() == []
            first.submit(event("a2", "org_a"))
            assert await first.flush(20)
            assert [letter.event["transaction_id"] for letter in first.dead_letters()] == ["a2"]
            await first.aclose()
            await second.aclose()
    assert sorted(e["transaction_id"] for e in lago.fake.events) == ["a0", "a1", "b0", "b1"]


def test_one_letter_named_twice_is_replayed_once(
    tmp_path: Path, lago: Rejecting, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--id 1 0:1` names letter 1 twice (slot 0 is the spool file itself): it was sent twice in one batch and
    reported "Replayed 2: 2 delivered (1 already in Lago)"."""
    path = tmp_path / "spool.db"
    spool_letters(path, [event("tx0", "org_a"), event("tx1", "org_a")])
    assert main(["dead-letters", "--spool", str(path), "--replay", "--id", "1", "0:1", "01"]) == 0
    assert "Replayed 1: 1 delivered (0 already in Lago)" in capsys.readouterr().out
    assert [e["transaction_id"] for e in lago.fake.events] == ["tx0"]
    assert [tx for _, tx, _ in letters(path)] == ["tx1"]


def test_the_help_states_the_exit_codes_the_command_gives(capsys: pytest.CaptureFixture[str]) -> None:
    """`dead-letters --help` said exit 2 was only "no spool, unknown ids or settings missing": a refused API key,
    a bad --timeout, a file that is not a spool or is locked, and Ctrl-C (130) were not there."""
    with pytest.raises(SystemExit):
        main(["dead-letters", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for said in ("not a spool", "locked", "--timeout", "API key", "130"):
        assert said in text, said


def test_the_emulator_does_not_print_the_api_key_of_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`emulator` in a shell holding the production LAGO_API_KEY printed it in its banner
    (`export ... LAGO_API_KEY=<the key>`: on screen, in a terminal recording or CI log); the key it makes up, or
    the one given with --api-key, is still printed for the newcomer to copy."""
    from lago_org_billing.testing import _server

    served: list[Any] = []
    monkeypatch.setattr(_server, "run", lambda fake, host, port: served.append(fake))
    monkeypatch.setattr(_server, "free_port_or_error", lambda host, port: port)
    monkeypatch.setenv("LAGO_API_KEY", "prod-secret-key-123")
    assert main(["emulator", "--port", "3999"]) == 0
    out = capsys.readouterr().out
    assert "prod-secret-key-123" not in out and "export LAGO_API_URL=http://127.0.0.1:3999" in out
    assert served[0].api_key == "prod-secret-key-123"  # it still takes the environment's key
    assert main(["emulator", "--port", "3999", "--api-key", "dev-key"]) == 0
    assert "LAGO_API_KEY=dev-key" in capsys.readouterr().out
    monkeypatch.delenv("LAGO_API_KEY")
    assert main(["emulator", "--port", "3999"]) == 0
    assert "LAGO_API_KEY=lago-emulator-key" in capsys.readouterr().out


@pytest.mark.parametrize("proxy", ["socks5://127.0.0.1:1080", "socks5h://127.0.0.1:1080"])
def test_demo_runs_in_a_shell_with_a_socks_proxy(
    proxy: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ALL_PROXY=socks5://... (ssh -D, many corporate setups) without httpx's socks extra: the demo, all on
    127.0.0.1, died with uvicorn's lifespan traceback (httpx: 'Using SOCKS proxy, but the socksio package is not
    installed') and "the emulator could not be served ... (port in use?)", exit 2. The environment is put back."""
    pytest.importorskip("uvicorn")
    if importlib.util.find_spec("socksio") is not None:
        pytest.skip("socksio is installed: httpx takes SOCKS proxies")
    monkeypatch.setenv("ALL_PROXY", proxy)
    monkeypatch.setenv("https_proxy", proxy)
    assert main(["demo"]) == 0, capsys.readouterr().err[-2000:]
    assert "Every request billed exactly once" in capsys.readouterr().out
    assert os.environ["ALL_PROXY"] == proxy and os.environ["https_proxy"] == proxy


def test_the_listing_piped_to_head_ends_quietly(tmp_path: Path) -> None:
    """`dead-letters | head -1` on a large spool: the reader goes away, the command ends without a traceback."""
    path = tmp_path / "spool.db"
    spool_letters(path, [event("tx0", "org_a")])
    [body] = bodies(path)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.executemany(
            "INSERT INTO dead_letters(body, reason, status, code, created_at) VALUES (?, ?, 422, 'x', 0)",
            [(body.replace('"tx0"', f'"many{i}"'), "r" * 150) for i in range(3_000)],
        )
    for mode in ([], ["--json"]):
        command = [sys.executable, "-m", "lago_org_billing.cli", "dead-letters", "--spool", str(path), *mode]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
            assert process.stdout is not None and process.stderr is not None
            assert process.stdout.readline()
            process.stdout.close()
            err = process.stderr.read().decode()
            assert process.wait(60) == 1
        assert "Traceback" not in err and "Exception" not in err, err


class NotLago(httpx.AsyncBaseTransport):
    """What a wrong LAGO_API_URL answers: Lago's front end (200 HTML for every path), a wrong base path (a 404
    page), a load balancer redirecting http to https."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        headers = {"content-type": "text/html", "location": "https://lago.test/"}
        return httpx.Response(self.status, text="<!doctype html><html>app</html>", headers=headers)


@pytest.mark.parametrize("status", [200, 404, 301])
def test_a_url_that_is_not_lagos_api_is_said_at_once(
    status: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """LAGO_API_URL set to Lago's front end (app.getlago.com instead of api.getlago.com), a wrong base path or an
    http URL redirected: the up-front check let these pass (it only knew Lago's own 401/403/404), so the command
    POSTed the letters there, retried until --timeout and said "Lago did not answer in time", exit 1. Now exit 2 at
    once naming LAGO_API_URL, nothing sent, letters untouched (as for a refused key)."""
    path = tmp_path / "spool.db"
    spool_letters(path, [event("tx0", "org_a")])
    before = letters(path)
    transport = NotLago(status)
    monkeypatch.setattr(_dead_letters, "LagoClient", lambda _settings: make_client(transport, max_retries=0))
    monkeypatch.setenv("LAGO_API_KEY", API_KEY)
    monkeypatch.setenv("LAGO_API_URL", "http://lago.test")
    assert main(["dead-letters", "--spool", str(path), "--replay", "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert "LAGO_API_URL" in err and "did not answer" not in err, err
    assert not any("/events" in request for request in transport.requests), transport.requests
    assert letters(path) == before
