"""Review of ``lago-org-billing migrate`` as an operator runs it: the real entry point (``cli.main`` with argv) against
the emulator served on 127.0.0.1.

Covers: bad mapping files (non-UTF-8 bytes, an unbalanced quote that swallows the rows after it, control characters
in a name, a column or JSON key given twice, an empty file; a user mapped to two orgs, already refused) stopped with
exit 2, a message naming the line, and no write to Lago; and ``--verify`` after a run interrupted between ending the
users' subscriptions and marking their customers, which said OK while ``--execute`` still had writes to make; a
user's second active subscription (an add-on) ended with nothing saying its billing stops; an org_id that is a
migrated user's customer (a mapping typo) made into an org customer and subscribed.
"""

from __future__ import annotations

import contextlib
import io
import signal
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread
from test_migration_resume import API_KEY, MAPPING, new_fake


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeLago]:
    """The emulator (alice, bob on active plans, carol's starting later: one org ``acme``) served on 127.0.0.1, the
    environment pointing the CLI at it, run from an empty directory (no ./.env)."""
    fake = new_fake()
    with serve_in_thread(fake) as url:
        monkeypatch.setenv("LAGO_API_URL", url)
        monkeypatch.setenv("LAGO_API_KEY", API_KEY)
        monkeypatch.setenv("LAGO_RETRY_BACKOFF", "0.001")
        monkeypatch.chdir(tmp_path)
        yield fake


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------------------------- bad mapping files

HEADER = "user_id,org_id,org_name,email\n"

BAD_FILES: dict[str, tuple[bytes, str]] = {
    # A latin-1 export (Excel on Windows): the byte offset alone does not tell which row to fix.
    "latin1.csv": (
        (HEADER + "alice,acme,Acme,\nbob,acme,Acme,\ncarol,acme,Soci\xe9t\xe9,\n").encode("latin-1"),
        "latin1.csv line 4: not UTF-8",
    ),
    # A stray quote: the field ran on to the end of the file, bob's and carol's rows were read as acme's name and
    # silently dropped (their subscriptions left running, and --verify, given the same file, never saw them).
    "quote.csv": (
        (HEADER + 'alice,acme,"Acme,\nbob,acme,Acme,\ncarol,acme,Acme,\n').encode(),
        "quote.csv line 2: a quoted field runs on to line 4",
    ),
    "nul.csv": ((HEADER + "alice,acme,Ac\x00me,\n").encode(), "nul.csv line 2: org_name contains"),
    "dup-column.csv": (
        b"user_id,org_id,org_name,email,org_id\nalice,acme,Acme,,other\n",
        "dup-column.csv header: column(s) given more than once: org_id",
    ),
    "dup-key.json": (
        b'[{"user_id": "alice", "org_id": "acme", "org_name": "Acme", "email": "", "user_id": "bob"}]',
        "dup-key.json item 1: key(s) given more than once: user_id",
    ),
    "empty.csv": (b"", "empty.csv is empty"),
    "blank.json": (b"  \n", "blank.json is empty"),
    "two-orgs.csv": (
        (HEADER + "alice,acme,Acme,\nbob,acme,Acme,\nalice,globex,Globex,\n").encode(),
        "two-orgs.csv line 4: duplicate user_id 'alice' (already in two-orgs.csv line 2)",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
@pytest.mark.parametrize("mode", ["--execute", "--dry-run"])
def test_a_bad_mapping_file_stops_before_any_write_naming_the_line(
    served: FakeLago, tmp_path: Path, name: str, mode: str
) -> None:
    content, expected = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    before = served.snapshot()
    served.requests.clear()
    argv = ["migrate", "--mapping-file", str(path)] + ([mode] if mode == "--execute" else [])
    code, out, err = cli(*argv)
    assert code == 2, (out, err)
    assert "nothing was changed" in err and expected in err, err
    assert [r for r in served.requests if r.method != "GET"] == []
    assert served.snapshot() == before


def test_a_mapping_with_a_quoted_name_on_one_line_still_reads(served: FakeLago, tmp_path: Path) -> None:
    """(The quote check does not refuse CSV quoting itself: a quoted name with a comma is one field of one line.)"""
    path = tmp_path / "quoted.csv"
    path.write_text(HEADER + 'alice,acme,"Acme, Inc.",\r\nbob,acme,"Acme, Inc.",\r\ncarol,acme,"Acme, Inc.",\r\n')
    code, out, err = cli("migrate", "--mapping-file", str(path))
    assert code == 0, (out, err)
    assert "org acme [3 users]" in out


# ------------------------------------------------------------------------------------ verify after an interruption


def test_verify_reports_users_left_unmarked_by_a_run_interrupted_before_marking_them(
    served: FakeLago, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--execute`` interrupted (Ctrl-C) at its first user mark, every user subscription already ended: ``--verify``
    said OK (exit 0), although the user customers lack ``migrated_to_org`` and ``--execute`` then still writes the
    marks. It must name each unmarked user and exit 1; once the run is made again, it passes."""
    mapping = tmp_path / "mapping.csv"
    mapping.write_text(MAPPING)
    send = httpx.AsyncHTTPTransport.handle_async_request

    async def interrupt_at_the_first_mark(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        if (
            request.method == "POST"
            and request.url.path == "/api/v1/customers"
            and b"migrated_to_org" in request.content
        ):
            signal.raise_signal(signal.SIGINT)  # (Ctrl-C: asyncio's runner cancels the run, then raises)
            await anyio.sleep_forever()
        return await send(self, request)

    with monkeypatch.context() as patch:
        patch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", interrupt_at_the_first_mark)
        code, _, err = cli("migrate", "--mapping-file", str(mapping), "--execute")
    assert code == 130, err
    assert "run the same command" in err
    ended = {s["external_id"]: s["status"] for s in served.subscriptions if s["external_customer_id"] != "acme"}
    assert ended == {"sub_alice": "terminated", "sub_bob": "terminated", "sub_carol": "canceled"}

    code, out, _ = cli("migrate", "--mapping-file", str(mapping), "--verify")
    assert code == 1, out
    for user in ("alice", "bob", "carol"):
        assert f"user {user!r} (org 'acme') is not marked migrated_to_org=acme" in out, out

    code, out, _ = cli("migrate", "--mapping-file", str(mapping), "--execute")
    assert code == 0, out
    code, out, _ = cli("migrate", "--mapping-file", str(mapping), "--verify")
    assert code == 0, out


def test_verify_reports_an_org_customer_not_marked_as_an_organization(served: FakeLago, tmp_path: Path) -> None:
    """The org customer's ``billing_type=organization`` (what ``OrgBilling.is_org_customer`` reads) removed after the
    migration (edited in Lago's UI): --verify said OK; it names it, and --execute sets it back."""
    mapping = tmp_path / "mapping.csv"
    mapping.write_text(MAPPING)
    assert cli("migrate", "--mapping-file", str(mapping), "--execute")[0] == 0
    [org] = [c for c in served.store.customers if c["external_id"] == "acme"]
    org["metadata"] = [m for m in org["metadata"] if m["key"] != "billing_type"]
    code, out, _ = cli("migrate", "--mapping-file", str(mapping), "--verify")
    assert code == 1, out
    assert "org customer 'acme' is not marked billing_type=organization" in out, out
    assert cli("migrate", "--mapping-file", str(mapping), "--execute")[0] == 0
    assert cli("migrate", "--mapping-file", str(mapping), "--verify")[0] == 0


# -------------------------------------------------------------------------------------- a user's second subscription


def test_a_user_s_second_active_subscription_ended_without_a_successor_is_named(
    served: FakeLago, tmp_path: Path
) -> None:
    """A user with two active subscriptions at once (a plan and an add-on, both billed): the org takes one plan, and
    the add-on was terminated with no subscription to follow it, the dry run listing it among the terminations
    only, nothing saying that its billing stops. The dry run (and --execute) now warn, naming it."""
    served.add_plan("addon_storage", amount_cents=2_000)
    served.add_subscription("bob", "addon_storage", external_id="sub_bob_storage")
    mapping = tmp_path / "mapping.csv"
    mapping.write_text(MAPPING)
    code, out, _ = cli("migrate", "--mapping-file", str(mapping))
    assert code == 0, out
    assert "terminate bob's subscription sub_bob_storage (addon_storage)" in out
    warnings = out.split("Warnings")[1]
    assert "bob has 2 active subscriptions" in warnings and "sub_bob_storage (plan 'addon_storage')" in warnings, out


def test_an_org_id_that_is_a_migrated_user_s_customer_is_refused(served: FakeLago, tmp_path: Path) -> None:
    """A mapping typo gives an org the id of a user already migrated (its customer marked migrated_to_org): that user
    customer was made an org customer (billing_type=organization) and subscribed. The org fails before any write."""
    mapping = tmp_path / "mapping.csv"
    mapping.write_text(MAPPING)
    assert cli("migrate", "--mapping-file", str(mapping), "--execute")[0] == 0
    served.add_customer("dave", name="Dave")
    served.add_subscription("dave", "starter", external_id="sub_dave")
    typo = tmp_path / "typo.csv"
    typo.write_text(HEADER + "dave,alice,Alice's team,\n")
    before = served.snapshot()
    served.requests.clear()
    code, out, _ = cli("migrate", "--mapping-file", str(typo), "--execute")
    assert code == 1, out
    assert "org_id 'alice' is the Lago customer of a user migrated to org 'acme'" in out, out
    assert [r for r in served.requests if r.method != "GET"] == [] and served.snapshot() == before
