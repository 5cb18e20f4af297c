"""Dead letters sent again: ``EventPipeline.replay_dead_letters`` (memory, spool) and the ``dead-letters`` command."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from lago_org_billing import BillingSettings
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from test_delivery import events, make_client, make_fake, run_pipeline, transaction_ids
from test_spool import Down, rows


class BrokenMetric(httpx.AsyncBaseTransport):
    """Lago with a billable metric whose expression fails on events named ``bad*`` while ``broken`` is set: it
    rejects such a batch (422, the failing events by index), as Lago does; once fixed, it takes them."""

    def __init__(self, fake: FakeLago) -> None:
        self.inner = fake.transport()
        self.broken = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.broken and request.url.path.endswith("/events/batch"):
            batch = json.loads(await request.aread())["events"]
            failing = {
                str(index): "expression_evaluation_failed: Variable: b not found"
                for index, event in enumerate(batch)
                if event["transaction_id"].startswith("bad")
            }
            if failing:
                error = {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors"}
                return httpx.Response(422, json={**error, "error_details": failing})
        return await self.inner.handle_async_request(request)


def unbuildable() -> dict[str, Any]:
    raise RuntimeError("no usage")


@pytest.mark.anyio
async def test_memory_dead_letters_are_replayed_once_the_cause_is_fixed() -> None:
    """Rejected events replayed after the fix reach Lago once (one Lago had after all is a duplicate); a letter
    without a whole event stays; replaying nothing twice."""
    fake = make_fake()
    lago = BrokenMetric(fake)
    async with make_client(lago) as client:
        pipeline = EventPipeline(client, flush_interval=0.01)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            for event in [*events(3), *events(3, prefix="bad"), unbuildable]:
                pipeline.submit(event)
            assert await pipeline.flush(20)
            letters = pipeline.dead_letters()
            assert sorted(letter.event.get("transaction_id", "") for letter in letters) == ["", "bad0", "bad1", "bad2"]
            assert len({letter.id for letter in letters}) == 4 and None not in {letter.id for letter in letters}
            assert [letter.replayable for letter in letters].count(False) == 1
            bad0 = next(letter for letter in letters if letter.event.get("transaction_id") == "bad0")

            lago.broken = False  # the metric is fixed
            await client.create_events([bad0.event])  # and bad0 reached Lago some other way meanwhile
            assert await pipeline.replay_dead_letters([bad0.id]) == 1
            assert await pipeline.flush(20)
            assert pipeline.stats["duplicates"] == 1
            assert await pipeline.replay_dead_letters([bad0.id]) == 0  # gone already

            assert await pipeline.replay_dead_letters() == 2  # bad1, bad2; not the unbuildable one
            assert await pipeline.flush(20)
            [left] = pipeline.dead_letters()
            assert not left.replayable and "no usage" in left.reason
            assert pipeline.stats["replayed"] == 3
            await pipeline.aclose()
    assert sorted(transaction_ids(fake)) == ["bad0", "bad1", "bad2", "tx0", "tx1", "tx2"]


@pytest.mark.anyio
async def test_memory_replay_stops_at_the_outbox_capacity() -> None:
    """More letters than room: as many as fit are put back, the rest stay dead letters (nothing dropped)."""
    fake = make_fake()
    lago = BrokenMetric(fake)
    async with make_client(Down()) as down, make_client(lago) as client:
        pipeline = EventPipeline(client, flush_interval=0.01, memory_capacity=5)
        assert await run_pipeline(pipeline, events(5, prefix="bad"))
        assert len(pipeline.dead_letters()) == 5
        parked = EventPipeline(down, memory_capacity=2)  # not running: nothing leaves its outbox
        parked.outbox._dead.extend(pipeline.dead_letters())  # the same letters, in a nearly full outbox
        parked.submit(events(1)[0])
        assert await parked.replay_dead_letters() == 1
        assert len(parked.dead_letters()) == 4 and parked.stats["dropped"] == 0


@pytest.mark.anyio
async def test_spool_replay_is_one_transaction_with_the_events_row(tmp_path: Path) -> None:
    """With the spool, a replayed letter leaves the dead_letters table in the commit that writes its event:
    before the commit both are where they were, after it the event is spooled (Lago down here) and delivered
    by the next process."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    async with make_client(BrokenMetric(fake)) as client:
        spooled = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        assert await run_pipeline(spooled, events(2, prefix="bad"))
    assert rows(path, "dead_letters") == 2 and rows(path) == 0

    async with make_client(Down(), max_retries=0) as down:
        pipeline = EventPipeline(down, spool_path=str(path), commit_window=60, max_backoff=0.01)
        [first, second] = pipeline.dead_letters()
        assert await pipeline.replay_dead_letters([first.id]) == 1
        assert rows(path, "dead_letters") == 2 and rows(path) == 0  # not committed yet: nothing moved
        await pipeline.commit()
        assert rows(path, "dead_letters") == 1 and rows(path) == 1
        assert [letter.id for letter in pipeline.dead_letters()] == [second.id]
        await pipeline.aclose()

    async with make_client(fake.transport()) as client:
        assert await run_pipeline(EventPipeline(client, spool_path=str(path), flush_interval=0.01), [])
    assert transaction_ids(fake) == [first.event["transaction_id"]]
    assert rows(path) == 0 and rows(path, "dead_letters") == 1


# --------------------------------------------------------------------------------------------- the command


async def spool_with_letters(path: Path, fake: FakeLago) -> None:
    """A spool holding three dead letters: bad0, bad1 (fixable) and poison (Lago rejects it for good)."""
    poison = event_payload(
        transaction_id="poison", external_subscription_id="org_1", code="api_call", precise_total_amount_cents="x"
    )
    async with make_client(BrokenMetric(fake)) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        assert await run_pipeline(pipeline, [*events(2, prefix="bad"), poison, *events(2)])
    assert rows(path, "dead_letters") == 3


def letter_ids(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        return [row[0] for row in conn.execute("SELECT id FROM dead_letters ORDER BY id")]


def test_command_lists_and_replays_a_spools_dead_letters(
    fake_lago_server: FakeLago, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`dead-letters` lists (text and --json); `--replay --id` sends one; `--replay` the rest: delivered letters are
    deleted, the one Lago still rejects stays with Lago's new reason (exit 1)."""
    path = tmp_path / "spool.db"
    anyio.run(spool_with_letters, path, fake_lago_server)
    monkeypatch.setenv("LAGO_API_URL", str(fake_lago_server.url))
    monkeypatch.setenv("LAGO_API_KEY", fake_lago_server.api_key)
    monkeypatch.setenv("LAGO_SPOOL_PATH", str(path))
    first, _, _ = letter_ids(path)
    assert len(fake_lago_server.events) == 2  # tx0, tx1

    assert main(["dead-letters"]) == 0
    out = capsys.readouterr().out
    assert "3 dead letters" in out and "expression_evaluation_failed" in out and "poison" in out
    assert main(["dead-letters", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [letter["event"]["transaction_id"] for letter in listed] == ["bad0", "bad1", "poison"]
    assert all(letter["replayable"] for letter in listed) and listed[0]["id"] == str(first)

    assert main(["dead-letters", "--replay", "--id", str(first)]) == 0
    assert "Replayed 1: 1 delivered" in capsys.readouterr().out
    assert len(letter_ids(path)) == 2

    assert main(["dead-letters", "--replay"]) == 1
    out = capsys.readouterr().out
    assert "Replayed 2: 1 delivered (0 already in Lago), 1 rejected again" in out
    assert sorted(event["transaction_id"] for event in fake_lago_server.events) == ["bad0", "bad1", "tx0", "tx1"]
    [left] = json.loads((main(["dead-letters", "--json"]), capsys.readouterr().out)[1])
    assert left["event"]["transaction_id"] == "poison" and "value_is_invalid" in left["reason"]


def test_command_keeps_the_letters_when_lago_does_not_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lago unreachable: exit 1, and every letter stays as it was."""
    path = tmp_path / "spool.db"
    anyio.run(spool_with_letters, path, make_fake())
    before = letter_ids(path)
    monkeypatch.setenv("LAGO_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("LAGO_API_KEY", "k")
    monkeypatch.setenv("LAGO_MAX_RETRIES", "0")
    assert main(["dead-letters", "--spool", str(path), "--replay", "--timeout", "0.5"]) == 1
    captured = capsys.readouterr()
    assert "did not answer" in captured.err and "lost" not in captured.err
    assert letter_ids(path) == before


def test_command_says_at_once_when_lago_refuses_the_key(
    fake_lago_server: FakeLago, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong API key: exit 2 at once with Lago's refusal, letters untouched (delivery retried the 401 until
    --timeout, then said "Lago did not answer", exit 1)."""
    path = tmp_path / "spool.db"
    anyio.run(spool_with_letters, path, make_fake())
    before = letter_ids(path)
    monkeypatch.setenv("LAGO_API_URL", str(fake_lago_server.url))
    monkeypatch.setenv("LAGO_API_KEY", "not-the-key")
    assert main(["dead-letters", "--spool", str(path), "--replay", "--timeout", "30"]) == 2
    captured = capsys.readouterr()
    assert "refuses this API key" in captured.err and "did not answer" not in captured.err
    assert letter_ids(path) == before and fake_lago_server.events == []


def test_command_refuses_unknown_ids_and_a_missing_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad input: exit 2 naming the problem, nothing sent or changed."""
    monkeypatch.delenv("LAGO_SPOOL_PATH", raising=False)
    assert main(["dead-letters"]) == 2
    assert "LAGO_SPOOL_PATH" in capsys.readouterr().err
    assert main(["dead-letters", "--spool", str(tmp_path / "nope.db")]) == 2
    assert "No spool file" in capsys.readouterr().err
    path = tmp_path / "spool.db"
    anyio.run(spool_with_letters, path, make_fake())
    before = letter_ids(path)
    monkeypatch.setenv("LAGO_API_KEY", "k")
    assert main(["dead-letters", "--spool", str(path), "--replay", "--id", "999", "--id", "1"]) == 2
    err = capsys.readouterr().err
    assert "no such dead letter" in err and "999" in err and ": 1" not in err
    assert main(["dead-letters", "--spool", str(path), "--replay", "--id", "999", "1"]) == 2  # several after one --id
    err = capsys.readouterr().err
    assert "no such dead letter" in err and "999" in err and ": 1" not in err
    assert main(["dead-letters", "--spool", str(path), "--replay", "--id", "x1"]) == 2
    assert "not an id" in capsys.readouterr().err
    assert main(["dead-letters", "--spool", str(path), "--replay", "--timeout", "0"]) == 2
    assert "--timeout" in capsys.readouterr().err
    assert letter_ids(path) == before


def test_replay_goes_a_chunk_at_a_time_and_never_touches_a_letter_that_took_a_freed_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Letters are sent and settled a chunk at a time (memory bounded), and a row whose id was freed and taken by
    another letter since it was read (spool files made before AUTOINCREMENT) is neither deleted nor overwritten."""
    from lago_org_billing import _dead_letters

    monkeypatch.setattr(_dead_letters, "CHUNK", 2)
    path = tmp_path / "spool.db"
    anyio.run(spool_with_letters, path, make_fake())
    letters = list(_dead_letters.read_spool_dead_letters(str(path)))  # bad0, bad1, poison
    second = letters[1].letter.id
    other = json.dumps({**letters[1].letter.event, "transaction_id": "someone_else"})
    # bad1's row now holds another letter (as if its id had been reused)
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("UPDATE dead_letters SET body = ? WHERE id = ?", (other, second))
    fake = make_fake()
    settings = BillingSettings(api_key="test-api-key", api_url=FakeLago.base_url)

    async def replay() -> Any:
        async with make_client(fake.transport()) as client:
            monkeypatch.setattr(_dead_letters, "LagoClient", lambda _settings: client)
            return await _dead_letters.replay_spool_dead_letters(letters, settings)

    report = anyio.run(replay)
    assert (report.sent, report.delivered, len(report.rejected)) == (3, 2, 1)
    assert sorted(transaction_ids(fake)) == ["bad0", "bad1"]
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        rows = dict(conn.execute("SELECT id, body FROM dead_letters"))
    assert rows[second] == other and len(rows) == 2  # poison (rejected again) and the other letter


@pytest.mark.anyio
async def test_spool_dead_letter_ids_are_never_reused(tmp_path: Path) -> None:
    """A replayed letter's id is not given to the next letter (what --id and a replay read stays valid)."""
    path = tmp_path / "spool.db"
    fake = make_fake()
    lago = BrokenMetric(fake)
    async with make_client(lago) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        assert await run_pipeline(pipeline, events(2, prefix="bad"))
    first, second = letter_ids(path)
    lago.broken = False
    async with make_client(lago) as client:
        pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
        async with anyio.create_task_group() as tasks:
            await tasks.start(pipeline.run)
            assert await pipeline.replay_dead_letters([second]) == 1
            assert await pipeline.flush(20)
            lago.broken = True
            pipeline.submit(events(1, prefix="bad_again")[0])
            assert await pipeline.flush(20)
            await pipeline.aclose()
    assert letter_ids(path) == [first, second + 1]
