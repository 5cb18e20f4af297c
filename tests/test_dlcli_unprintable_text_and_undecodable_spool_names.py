"""``lago-org-billing dead-letters`` printing what it cannot print as it is: a stored ``transaction_id`` holding a lone
surrogate (a JSON ``"\\ud800"``, which no stdout can encode) stopped the listing at that letter with a traceback; one
holding a line break or a terminal's escape sequence split its row or drove the terminal. A spool whose file name is
no UTF-8 (bytes of another encoding, read as surrogates) could not be opened at all: a traceback in ``quote()``."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
from pathlib import Path

import pytest

from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from test_dead_letters_purge_and_summary import make_spool, stored


def _odd_transaction_ids(path: Path) -> None:
    """Give the spool's first two letters the ids ``a\\ud800b`` and ``line<LF>break<ESC>[31mRED`` (as stored JSON)."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM dead_letters ORDER BY id LIMIT 2")]
        for row_id, odd in zip(ids, ["a\\ud800b", "line\\nbreak\\u001b[31mRED"], strict=True):
            (body,) = conn.execute("SELECT body FROM dead_letters WHERE id = ?", (row_id,)).fetchone()
            event = json.loads(body)
            text = json.dumps({**event, "transaction_id": "@"}).replace('"@"', f'"{odd}"')
            conn.execute("UPDATE dead_letters SET body = ? WHERE id = ?", (text, row_id))


def test_transaction_ids_that_cannot_be_printed_are_listed_escaped_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spool.db"
    make_spool(path)
    _odd_transaction_ids(path)
    assert main(["dead-letters", "--spool", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1 + 5 + 1  # the header, one line per letter, the count
    assert "a\\ud800b" in out and "line\\nbreak\\x1b[31mRED" in out and "\x1b" not in out
    assert lines[-1].startswith("5 dead letters in")
    assert main(["dead-letters", "--spool", str(path), "--json"]) == 0  # (JSON escapes them itself: kept as stored)
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["event"]["transaction_id"] == "a\ud800b"
    assert listed[1]["event"]["transaction_id"] == "line\nbreak\x1b[31mRED"


@pytest.fixture
def undecodable(tmp_path: Path) -> Path:
    """A spool whose file name holds a byte that is no UTF-8 (``caf\\xe9.db``, a Latin-1 name)."""
    name = os.fsdecode(b"caf\xe9.db")
    assert "\udce9" in name
    path = tmp_path / name
    try:
        make_spool(path)
    except (OSError, UnicodeError):  # pragma: no cover - a file system taking only UTF-8 names
        pytest.skip("this file system takes no such name")
    return path


def test_a_spool_whose_name_is_no_utf8_is_listed_counted_and_purged(
    undecodable: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = str(undecodable)
    assert main(["dead-letters", "--spool", spool]) == 0
    captured = capsys.readouterr()
    assert "5 dead letters in" in captured.out and "caf\\udce9.db" in captured.out and "Traceback" not in captured.err
    assert main(["dead-letters", "--spool", spool, "--json"]) == 0
    assert [letter["file"] for letter in json.loads(capsys.readouterr().out)] == [spool] * 5
    assert main(["dead-letters", "--spool", spool, "--summary"]) == 0
    assert "5 dead letters in" in capsys.readouterr().out
    assert main(["dead-letters", "--spool", spool, "--purge", "--yes", "--reason", "value_is_invalid"]) == 0
    assert "Purged 2 dead letters of" in capsys.readouterr().out
    assert stored(undecodable) == ["metric0", "metric1", "metric2"]


def test_a_spool_whose_name_is_no_utf8_is_replayed(
    undecodable: Path, fake_lago_server: FakeLago, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LAGO_API_URL", str(fake_lago_server.url))
    monkeypatch.setenv("LAGO_API_KEY", fake_lago_server.api_key)
    monkeypatch.setenv("LAGO_SPOOL_PATH", str(undecodable))
    assert main(["dead-letters", "--replay", "--reason", "expression"]) == 0
    assert "Replayed 3: 3 delivered (0 already in Lago)" in capsys.readouterr().out
    assert sorted(event["transaction_id"] for event in fake_lago_server.events) == ["metric0", "metric1", "metric2"]
    assert stored(undecodable) == ["amount0", "amount1"]


def test_the_spool_counts_the_rows_of_a_file_whose_name_is_no_utf8(tmp_path: Path) -> None:
    # (what the spool reads of an orphan slot without writing: its address quoted as the name's bytes, as the CLI's)
    from lago_org_billing._spool import _count_read_only

    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9.db").decode(sys.getfilesystemencoding(), "surrogateescape")
    connection = sqlite3.connect(name)
    connection.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT)")
    connection.execute("INSERT INTO events (body) VALUES ('{}')")
    connection.commit()
    connection.close()
    assert _count_read_only(name) == 1
