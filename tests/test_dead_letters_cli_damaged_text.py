"""``lago-org-billing dead-letters`` on a spool one of whose letters' text is no longer UTF-8 (a byte flipped on disk,
which ``PRAGMA integrity_check`` does not see): sqlite3 failed the whole read, so the command could neither list nor
purge any letter. The letter is listed with its bad bytes escaped, and purged by its id as stored."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

import pytest

from lago_org_billing.cli import main
from test_dead_letters_purge_and_summary import make_spool


def _rot(path: Path) -> int:
    """Flip one byte of one letter's text into no UTF-8 (as the disk did): the letter's id."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        row_id, body = conn.execute("SELECT id, CAST(body AS BLOB) FROM dead_letters ORDER BY id LIMIT 1").fetchone()
        rotted = body.replace(b'"transaction_id"', b'"transaction\xffid"')
        assert rotted != body
        conn.execute("UPDATE dead_letters SET body = CAST(? AS TEXT) WHERE id = ?", (rotted, row_id))
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    return int(row_id)


def test_a_letter_whose_text_rotted_is_listed_and_purged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spool.db"
    make_spool(path)
    rotted = _rot(path)
    monkeypatch.setenv("LAGO_SPOOL_PATH", str(path))
    assert main(["dead-letters", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == 5
    [shown] = [letter for letter in listed if letter["id"] == str(rotted)]
    assert "transaction\\\\xffid" in json.dumps(shown), shown  # (its text, the bad byte escaped, in JSON)
    assert main(["dead-letters", "--purge", "--id", str(rotted), "--yes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"purged": 1}
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (4,)
