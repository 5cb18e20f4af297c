"""Review of the operator's tools, used as an on-call engineer would at 3 a.m. (``cli.main``, as the
``lago-org-billing`` command runs it): exit codes that say what happened (Lago down is not a settings error),
``--json`` that stays JSON when the command fails, ``dead-letters`` options that cannot mean anything refused,
listing a spool named by ``--spool`` whatever the rest of the environment holds, and a Ctrl-C during ``--purge``
that says what was deleted and leaves the spool whole."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from lago_org_billing import _dead_letters
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from test_dead_letters import spool_with_letters
from test_delivery import make_fake


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """A spool holding three dead letters (bad0, bad1, poison)."""
    path = tmp_path / "spool.db"
    anyio.run(spool_with_letters, path, make_fake())
    return path


def letter_ids(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        return [row[0] for row in conn.execute("SELECT id FROM dead_letters ORDER BY id")]


# ------------------------------------------------------------------------------------------ exit codes


def test_migrate_with_lago_down_is_exit_1_not_the_settings_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``migrate``'s help says exit 2 is an unusable mapping or settings, 1 a run that stopped: Lago not answering
    when the run starts is the latter (run again later), not a reason to go and edit a mapping that is fine."""
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("user_id,org_id,org_name,email\nu1,org_1,Org One,a@example.com\n", encoding="utf-8")
    monkeypatch.setenv("LAGO_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("LAGO_API_KEY", "k")
    monkeypatch.setenv("LAGO_RETRY_BACKOFF", "0.001")
    assert main(["migrate", "--mapping-file", str(mapping)]) == 1
    err = capsys.readouterr().err
    assert "did not answer" in err and "that Lago is up" in err


def test_migrate_with_a_key_lago_refuses_stays_exit_2(
    fake_lago_server: FakeLago, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key Lago refuses is a setting to fix: exit 2, as documented."""
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("user_id,org_id,org_name,email\nu1,org_1,Org One,a@example.com\n", encoding="utf-8")
    monkeypatch.setenv("LAGO_API_URL", str(fake_lago_server.url))
    monkeypatch.setenv("LAGO_API_KEY", "not-the-key")
    assert main(["migrate", "--mapping-file", str(mapping)]) == 2
    assert "error:" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ --json on errors


def test_health_json_is_json_when_the_settings_are_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A probe running ``health --json | jq .healthy`` reads ``false`` (exit 2), not an empty stdout; the message
    for a human stays on stderr."""
    monkeypatch.setenv("LAGO_API_URL", "http://127.0.0.1:9")
    assert main(["health", "--json"]) == 2
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["healthy"] is False and "LAGO_API_KEY" in result["error"] and result["exit_code"] == 2
    assert "LAGO_API_KEY" in captured.err


def test_dead_letters_json_is_json_when_the_command_fails(
    spool: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No spool, an unknown id, a replay without a key: stdout is one JSON object naming the error (exit 2)."""
    for argv in (
        ["dead-letters", "--json"],
        ["dead-letters", "--json", "--spool", str(tmp_path / "nowhere.db")],
        ["dead-letters", "--json", "--spool", str(spool), "--id", "999"],
        ["dead-letters", "--json", "--spool", str(spool), "--replay"],
        ["dead-letters", "--json", "--spool", str(spool), "--summary", "--id", "x"],
    ):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        result = json.loads(captured.out)
        assert result["exit_code"] == 2 and result["error"] and result["error"] in captured.err, argv


# ------------------------------------------------------------------------------------------ dead-letters options


def test_a_timeout_that_is_not_a_number_is_refused_before_anything_is_sent(
    spool: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--timeout nan`` gave Lago no time at all and reported "Lago did not answer" (exit 1): it is refused."""
    monkeypatch.setenv("LAGO_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("LAGO_API_KEY", "k")
    before = letter_ids(spool)
    assert main(["dead-letters", "--spool", str(spool), "--replay", "--timeout", "nan"]) == 2
    err = capsys.readouterr().err
    assert "--timeout" in err and "did not answer" not in err
    assert letter_ids(spool) == before


def test_a_spool_named_by_option_is_listed_whatever_the_other_variables_hold(
    spool: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Listing, counting and purging read only the spool: a malformed LAGO_PLAN_LIMITS (perhaps why the app is
    down) does not stop the operator from reading the dead letters of the spool named by ``--spool``."""
    monkeypatch.setenv("LAGO_PLAN_LIMITS", "{not json")
    monkeypatch.setenv("LAGO_QUOTA_MODE", "bogus")
    assert main(["dead-letters", "--spool", str(spool)]) == 0
    assert "3 dead letters" in capsys.readouterr().out
    assert main(["dead-letters", "--spool", str(spool), "--summary", "--json"]) == 0
    assert sum(group["count"] for group in json.loads(capsys.readouterr().out)) == 3
    # the replay talks to Lago as the app does: there the whole settings must be valid
    monkeypatch.setenv("LAGO_API_KEY", "k")
    assert main(["dead-letters", "--spool", str(spool), "--replay"]) == 2
    assert "LAGO_" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ Ctrl-C during --purge


class _InterruptedAfterDeleting:
    """A spool connection whose delete runs, then Ctrl-C arrives before the commit."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def executemany(self, sql: str, parameters: Any) -> Any:
        self.conn.executemany(sql, parameters)
        raise KeyboardInterrupt


def test_ctrl_c_during_a_purge_says_what_was_deleted_and_leaves_the_spool_whole(
    spool: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A thousand letters at a time are deleted, each in its own transaction: Ctrl-C in the second one rolls it back
    (the spool stays whole, those letters stay) and the command says how many were deleted and how to go on (130)."""
    monkeypatch.setattr(_dead_letters, "CHUNK", 1)
    real_connect = _dead_letters._connect
    calls = {"delete": 0}

    real_delete = _dead_letters._delete

    def delete(letters: list[Any], done: int) -> int:
        calls["delete"] += 1
        if calls["delete"] == 2:  # the second transaction: interrupted before its commit

            class Interrupted(real_connect):  # type: ignore[misc,valid-type]
                def __enter__(self) -> Any:
                    return _InterruptedAfterDeleting(super().__enter__())

            monkeypatch.setattr(_dead_letters, "_connect", Interrupted)
        try:
            return real_delete(letters, done)
        finally:
            monkeypatch.setattr(_dead_letters, "_connect", real_connect)

    monkeypatch.setattr(_dead_letters, "_delete", delete)
    _, second, third = letter_ids(spool)
    assert main(["dead-letters", "--spool", str(spool), "--purge", "--yes"]) == 130
    err = capsys.readouterr().err
    assert "Interrupted" in err and "1 dead letters were deleted" in err and "run" in err
    assert letter_ids(spool) == [second, third]
    with contextlib.closing(sqlite3.connect(spool)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


class _Terminal:
    """An operator's terminal as stdin, with what they type."""

    def __init__(self, typed: str) -> None:
        self.lines = iter(typed.splitlines(keepends=True))

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        return next(self.lines, "")


def test_a_purge_answered_no_still_prints_json(
    spool: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--purge --json`` answered "n" on the terminal: stdout is still JSON (nothing purged), exit 1."""
    monkeypatch.setattr("sys.stdin", _Terminal("n\n"))
    before = letter_ids(spool)
    assert main(["dead-letters", "--spool", str(spool), "--purge", "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"purged": 0} and "Nothing was deleted" in captured.err
    assert letter_ids(spool) == before


def test_an_emulator_host_that_is_not_this_machines_is_said_to_be_the_host_not_the_port() -> None:
    """``--host`` an address of another machine (or a name that resolves to none) was answered "Is another server on
    that port? Choose another one with --port.": the operator changed ports for ever. The port's own failures keep
    that hint."""
    import socket

    from lago_org_billing.testing._server import EmulatorServerError, free_port_or_error

    with pytest.raises(EmulatorServerError, match="Is the host an address of this machine"):
        free_port_or_error("192.0.2.1", 0)  # (TEST-NET-1: no machine's own address)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(EmulatorServerError, match="another server on that port"):
            free_port_or_error("127.0.0.1", port)
