"""The migration CLI interrupted by the operator or the system, driven through its real entry point in a child process
against the emulator served on 127.0.0.1: Ctrl-C (SIGINT) or SIGTERM (``timeout``, systemd, Kubernetes) delivered
between two writes, then the same command run again. What must hold: the run resumed ends in the state of a run never
interrupted (one org subscription, with the donor's entitlement overrides and removals; every user's subscription
ended once; every user marked), --verify passes, and the interrupted run says what to run next.

The child (this file run as a script) sends the signal to itself just before, or just after Lago answered, its nth
write: deterministic, no sleeps.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

import lago_org_billing
from lago_org_billing import BillingSettings
from lago_org_billing._migration_cli import run_migrate_command
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread
from test_migration_cli import parse
from test_migration_resume import API_KEY, MAPPING, execute, new_fake, state


@pytest.fixture(scope="module")
def expected() -> dict[str, object]:
    """The Lago state an uninterrupted ``--execute`` leaves (see test_migration_resume)."""
    import anyio

    reference = new_fake()
    run: Any = anyio.run(execute, reference)
    assert run.ok
    return state(reference)


def _in_process(url: str, fake: FakeLago, tmp_path: Path, *argv: str) -> tuple[int, str]:
    settings = BillingSettings.from_env(None, environ={"LAGO_API_URL": url, "LAGO_API_KEY": API_KEY})
    args = parse("--mapping-file", str(tmp_path / "mapping.csv"), *argv)
    out = io.StringIO()
    code = run_migrate_command(args, transport=fake.transport(), settings=settings, stdout=out, stderr=out)
    return code, out.getvalue()


def _interrupted(fake: FakeLago, url: str, tmp_path: Path, nth: int, when: str, sig: str, *argv: str) -> Any:
    """Run ``lago-org-billing migrate --mapping-file M --execute ARGV`` in a child that signals itself at its nth
    write; returns the finished child (exit code, stdout, stderr)."""
    # The child imports the package the test runs with (and this file's helpers), not whatever is installed
    here = os.pathsep.join((str(Path(lago_org_billing.__file__).parents[1]), str(Path(__file__).parent)))
    env = {**os.environ, "LAGO_API_URL": url, "LAGO_API_KEY": API_KEY, "PYTHONPATH": here}
    env.pop("LAGO_SUBSCRIPTION_ID_TEMPLATE", None)
    command = ["migrate", "--mapping-file", str(tmp_path / "mapping.csv"), "--execute", *argv]
    return subprocess.run(
        [sys.executable, __file__, str(nth), when, sig, *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# Writes of the uninterrupted run: 1 customer, 2 org subscription, 3 PATCH overrides, 4 DELETE sso, then ends, marks.
@pytest.mark.parametrize(("nth", "when"), [(2, "after"), (3, "before"), (3, "after"), (4, "before")])
def test_ctrl_c_without_a_journal_after_the_org_is_subscribed_resumes_to_the_uninterrupted_state(
    expected: dict[str, object], tmp_path: Path, nth: int, when: str
) -> None:
    """Ctrl-C right after Lago made the org subscription (before its entitlement overrides were set and sso, which the
    donor went without, removed). The CLI said "every step is safe to make again; run the same command", but the run
    again, without a journal, took that subscription for one "the org had before this migration": sso kept (a feature
    the donor's plan went without, given to the whole org), exit 0 OK, and --verify failed for ever after. The org's
    subscription and its entitlement writes are now made together before the interrupt takes effect."""
    fake = new_fake()
    (tmp_path / "mapping.csv").write_text(MAPPING)
    with serve_in_thread(fake) as url:
        child = _interrupted(fake, url, tmp_path, nth, when, "SIGINT")
        assert child.returncode == 130, child.stderr
        assert "run the same command" in child.stderr, child.stderr
        code, output = _in_process(url, fake, tmp_path, "--execute")
        assert code == 0, output
        assert "existed before this migration" not in output, output
        assert state(fake) == expected
        code, output = _in_process(url, fake, tmp_path, "--verify")
        assert code == 0, output


@pytest.mark.parametrize("journal", [False, True])
def test_sigterm_stops_the_run_as_ctrl_c_does_saying_what_to_run_next(
    expected: dict[str, object], tmp_path: Path, journal: bool
) -> None:
    """SIGTERM (``timeout 1h lago-org-billing migrate ...``, a systemd or Kubernetes job stopped) killed the CLI at
    once, silently (exit -15): no word of what was done or what to run next, and an org could be left subscribed
    without its entitlement writes. It now stops as Ctrl-C does: the org's writes in progress finished, a message
    naming the command to run, exit 143 (128 + SIGTERM); the same command then finishes."""
    fake = new_fake()
    (tmp_path / "mapping.csv").write_text(MAPPING)
    argv = ("--journal", str(tmp_path / "journal.jsonl")) if journal else ()
    with serve_in_thread(fake) as url:
        child = _interrupted(fake, url, tmp_path, 3, "before", "SIGTERM", *argv)
        assert child.returncode == 143, (child.returncode, child.stderr)
        assert "migrate stopped (SIGTERM)" in child.stderr and "run the same command" in child.stderr, child.stderr
        assert "Traceback" not in child.stderr, child.stderr
        code, output = _in_process(url, fake, tmp_path, "--execute", *argv)
        assert code == 0, output
        assert state(fake) == expected
        code, output = _in_process(url, fake, tmp_path, "--verify")
        assert code == 0, output


def test_a_run_without_a_journal_stopped_before_an_entitlement_write_names_the_calls_left(tmp_path: Path) -> None:
    """Lago refuses (401: a key rotated mid-run) the DELETE of sso from the org subscription this run just made. The
    run said "Run the same command again to resume", but without a journal the run again cannot tell that subscription
    from one the org had before: it ended exit 0 keeping sso, and --verify failed. The stopped run now names the calls
    left (a run again will not make them) and says to give --journal."""
    from test_migration_resume import RefuseAt

    fake = new_fake()
    (tmp_path / "mapping.csv").write_text(MAPPING)
    settings = BillingSettings.from_env(None, environ={"LAGO_API_URL": fake.base_url, "LAGO_API_KEY": API_KEY})
    args = parse("--mapping-file", str(tmp_path / "mapping.csv"), "--execute")
    out = io.StringIO()
    refusing = RefuseAt(fake.transport(), "DELETE /api/v1/subscriptions/acme/entitlements/sso")
    code = run_migrate_command(args, transport=refusing, settings=settings, stdout=out, stderr=out)
    output = out.getvalue()
    assert code == 1, output
    assert "org acme: its subscription acme was made by this run" in output, output
    assert "DELETE /subscriptions/acme/entitlements/sso" in output.split("Stopped:")[1], output
    assert "--journal" in output.split("Stopped:")[1], output


def _signal_at_write(nth: int, when: str, signum: int) -> None:
    """(Child) Send ``signum`` to this process at its nth write to Lago: ``before`` it is sent, or ``after`` Lago
    answered it (the answer read). The request goes on; the signal takes effect at the migration's next await."""
    send = httpx.AsyncHTTPTransport.handle_async_request
    writes = [0]

    async def handle(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        write = request.method != "GET" and request.url.path.startswith("/api/")
        if write:
            writes[0] += 1
            if writes[0] == nth and when == "before":
                os.kill(os.getpid(), signum)
        response = await send(self, request)
        if write and writes[0] == nth and when == "after":
            await response.aread()
            os.kill(os.getpid(), signum)
        return response

    httpx.AsyncHTTPTransport.handle_async_request = handle  # type: ignore[method-assign]


if __name__ == "__main__":  # the child: <nth> <before|after> <SIGNAL> migrate ...
    from lago_org_billing.cli import main

    _signal_at_write(int(sys.argv[1]), sys.argv[2], getattr(signal, sys.argv[3]))
    sys.exit(main(sys.argv[4:]))
