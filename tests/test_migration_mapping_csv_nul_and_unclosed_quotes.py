"""Review of Python version compatibility (``requires-python >= 3.10``; CI runs 3.11 only): what differs on 3.10, 3.12
and 3.13 and reaches a user, shown on whichever interpreter runs the suite.

Covers ``lago-org-billing migrate --mapping-file`` reading a CSV holding a NUL byte: Python 3.10's ``csv`` refuses it
(``_csv.Error: line contains NUL``, a traceback from the CLI) where 3.11+ reads it as a character that the mapping
checks then name with its line. The 3.10 reader is stood in here (a reader refusing NUL lines as 3.10's does) so that
the 3.11 CI shows it too. And a stray double quote in a large CSV (more than csv's 128 KiB field limit after it): a
``_csv.Error: field larger than field limit`` traceback on every version, instead of the "quoted field runs on"
problem the same file names when small.
"""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread
from test_migration_resume import API_KEY, new_fake

HEADER = "user_id,org_id,org_name,email\n"


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeLago]:
    """The emulator (one org ``acme`` of alice, bob and carol) served on 127.0.0.1, the CLI pointed at it."""
    fake = new_fake()
    with serve_in_thread(fake) as url:
        monkeypatch.setenv("LAGO_API_URL", url)
        monkeypatch.setenv("LAGO_API_KEY", API_KEY)
        monkeypatch.setenv("LAGO_RETRY_BACKOFF", "0.001")
        monkeypatch.chdir(tmp_path)
        yield fake


@pytest.fixture
def csv_of_python_310(monkeypatch: pytest.MonkeyPatch) -> None:
    """``csv.reader`` as Python 3.10's: a line holding a NUL raises ``csv.Error("line contains NUL")``."""
    real_reader = csv.reader

    def reader(lines: Iterable[str], *args: Any, **kwargs: Any) -> Any:
        def refusing_nul() -> Iterator[str]:
            for line in lines:
                if "\x00" in line:
                    raise csv.Error("line contains NUL")
                yield line

        return real_reader(refusing_nul(), *args, **kwargs)

    monkeypatch.setattr(csv, "reader", reader)


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def refused(served: FakeLago, path: Path, *expected: str) -> None:
    """``migrate --execute`` of ``path`` exits 2 naming every ``expected`` problem, and writes nothing to Lago."""
    before = served.snapshot()
    served.requests.clear()
    code, out, err = cli("migrate", "--mapping-file", str(path), "--execute")
    assert code == 2, (out, err)
    assert "nothing was changed" in err, err
    for problem in expected:
        assert problem in err, err
    assert [r for r in served.requests if r.method != "GET"] == []
    assert served.snapshot() == before


NUL_FILES = {
    "name": (HEADER + "alice,acme,Ac\x00me,\n", ["nul.csv line 2: org_name contains the control character '\\x00'"]),
    "user_id": (
        HEADER + "al\x00ice,acme,Acme,\nbob,acme,Acme,\n",
        ["nul.csv line 2: ", "'al\\x00ice' contains '\\x00'"],
    ),
    "header": (
        HEADER.replace("\n", "\x00\n") + "alice,acme,Acme,\n",
        ["nul.csv header: missing column(s) email", "unknown column(s) 'email\\x00'"],
    ),
    "quoted, over lines": (
        HEADER + 'alice,acme,"Ac\x00me,\nbob,acme,Acme,\n',
        ["nul.csv line 2: a quoted field runs on to line 3"],
    ),
}


@pytest.mark.usefixtures("csv_of_python_310")
@pytest.mark.parametrize("where", sorted(NUL_FILES))
def test_a_nul_in_a_csv_mapping_is_a_named_problem_not_a_traceback_on_python_310(
    served: FakeLago, tmp_path: Path, where: str
) -> None:
    """On Python 3.10 ``migrate`` died with ``_csv.Error: line contains NUL`` (no line, no "nothing was changed");
    it must say what 3.11+ says: the problem of the line (a NUL in a name, an id, the header, a quoted field)."""
    text, expected = NUL_FILES[where]
    path = tmp_path / "nul.csv"
    path.write_bytes(text.encode())
    refused(served, path, *expected)


def test_a_nul_in_a_csv_mapping_is_kept_in_the_field_it_is_in(tmp_path: Path) -> None:
    """(The NUL is read as the character it is, where it is: not dropped, nor another character put in its place.)"""
    from lago_org_billing import read_mapping_file

    path = tmp_path / "nul.csv"
    path.write_bytes((HEADER + "alice,acme,\x00Ac\x00me\x00,a@x.io\n").encode())
    assert read_mapping_file(path) == [
        ("nul.csv line 2", {"user_id": "alice", "org_id": "acme", "org_name": "\x00Ac\x00me\x00", "email": "a@x.io"})
    ]


def test_a_stray_quote_in_a_large_csv_mapping_is_named_not_a_field_limit_traceback(
    served: FakeLago, tmp_path: Path
) -> None:
    """A mapping of 20,000 users with a quote not closed on line 2: the rest of the file is one field, over csv's
    131,072 characters: ``_csv.Error: field larger than field limit (131072)`` came out of ``migrate`` (a traceback),
    where a small file says which line opens the quote."""
    path = tmp_path / "big.csv"
    path.write_text(HEADER + 'alice,acme,"Acme,\n' + "".join(f"user{i},acme,Acme,\n" for i in range(20_000)))
    refused(served, path, "big.csv line 2: a quoted field runs on", "double quote opened and not closed")


def test_a_line_longer_than_csv_reads_is_named_not_a_traceback(served: FakeLago, tmp_path: Path) -> None:
    """(Without a quote: one line of a name of 200,000 characters, over csv's field limit.)"""
    path = tmp_path / "long.csv"
    path.write_text(HEADER + "alice,acme,Acme,\nbob,acme," + "A" * 200_000 + ",\n")
    refused(served, path, "long.csv line 3: not readable as CSV (field larger than field limit")
