"""Replaying dead letters of the SQLite spool by id (``EventPipeline.replay_dead_letters(ids=...)``) reads only the
span of ids named, not the whole ``dead_letters`` table: paged from its first letter, one letter of a million read the
file whole, holding the spool's commits meanwhile (the events submitted not durable for as long)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from lago_org_billing import _spool
from lago_org_billing._spool import SqliteOutbox
from test_spool import rows

LETTERS = 3_000


async def _spool_with_letters(path: Path) -> None:
    """A spool file holding ``LETTERS`` dead letters (ids 1..LETTERS), each a whole event."""
    outbox = SqliteOutbox(str(path))
    await outbox.open()
    await outbox.close()
    conn = sqlite3.connect(path)
    try:
        conn.executemany(
            "INSERT INTO dead_letters(body, reason, status, code, created_at) VALUES (?, ?, ?, ?, ?)",
            (
                (
                    json.dumps({"transaction_id": f"tx{i}", "code": "api_call", "timestamp": "1.0"}),
                    "metric missing",
                    422,
                    "validation_errors",
                    1.0,
                )
                for i in range(1, LETTERS + 1)
            ),
        )
        conn.commit()
    finally:
        conn.close()


@pytest.fixture
def read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ids of the dead letters the spool reads (``_SpoolFile.dead_bodies``), in order."""
    seen: list[int] = []
    dead_bodies = _spool._SpoolFile.dead_bodies

    def counted(file: Any, after: int, limit: int) -> list[tuple[int, str]]:
        found = dead_bodies(file, after, limit)
        seen.extend(row_id for row_id, _ in found)
        return found

    monkeypatch.setattr(_spool._SpoolFile, "dead_bodies", counted)
    return seen


@pytest.mark.anyio
@pytest.mark.parametrize("named", [{1}, {LETTERS}, {1_500}])
async def test_replaying_one_letter_by_id_does_not_read_the_whole_table(
    tmp_path: Path, read: list[int], named: set[int]
) -> None:
    path = tmp_path / "spool.db"
    await _spool_with_letters(path)
    outbox = SqliteOutbox(str(path))
    await outbox.open()
    try:
        assert await outbox.replay_dead(named) == 1
        assert len(read) <= 500, f"{len(read)} letters read to replay one"
        await outbox.commit()
        [(body,)] = sqlite3.connect(path).execute("SELECT body FROM events").fetchall()
        assert json.loads(body)["transaction_id"] == f"tx{next(iter(named))}"
        assert rows(path, "dead_letters") == LETTERS - 1
    finally:
        await outbox.close()


@pytest.mark.anyio
async def test_letters_named_far_apart_are_all_replayed(tmp_path: Path, read: list[int]) -> None:
    """Ids over several pages of the table: each found, in id order, none other; an id with no letter is passed."""
    path = tmp_path / "spool.db"
    await _spool_with_letters(path)
    outbox = SqliteOutbox(str(path))
    await outbox.open()
    try:
        assert await outbox.replay_dead({10, 1_200, 2_990, LETTERS + 50}) == 3
        assert read[0] > 0 and read[-1] <= LETTERS
        await outbox.commit()
        bodies = [json.loads(body) for (body,) in sqlite3.connect(path).execute("SELECT body FROM events ORDER BY id")]
        assert [event["transaction_id"] for event in bodies] == ["tx10", "tx1200", "tx2990"]
        assert rows(path, "dead_letters") == LETTERS - 3
    finally:
        await outbox.close()


@pytest.mark.anyio
async def test_no_id_named_replays_nothing_and_reads_nothing(tmp_path: Path, read: list[int]) -> None:
    path = tmp_path / "spool.db"
    await _spool_with_letters(path)
    outbox = SqliteOutbox(str(path))
    await outbox.open()
    try:
        assert await outbox.replay_dead(set()) == 0
        assert read == []
        await outbox.commit()
        assert rows(path, "dead_letters") == LETTERS
        assert rows(path, "events") == 0
    finally:
        await outbox.close()
