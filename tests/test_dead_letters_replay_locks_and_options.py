"""Dead letters and their replay, as an operator under pressure uses them:

* the Python API (``replay_spool_dead_letters``) holds the same spool lock as ``dead-letters --replay``/``--purge``:
  an in-process replay while the CLI replays sends nothing (``DeadLettersBusyError``), a CLI purge while an
  in-process replay runs deletes nothing, and letters read before another run replayed or purged them are not sent
  (``ReplayReport.gone``); the lock is let go when the replay ends, cancelled too;
* the Python API logs, at WARNING, what the CLI prints: events Lago stores but will never bill;
* a replay cancelled after Lago took a chunk but before its billing periods were checked leaves those letters in the
  spool (the next replay sends them again verbatim, which Lago's store counts as duplicates, on Postgres and
  ClickHouse alike, and says which it will not bill): nothing is deleted without its report;
* bad input: ``--since`` after ``--until``, a compact date (``20260301``) that would read as Unix seconds of 1970,
  malformed ids given to ``find_spool_dead_letters``, a spool path with no file, ``wait <= 0``: all said, with what
  to do, before anything is selected, sent or deleted.

Lago is the emulator (in process), on a clock pinned at 2026-03-15; the CLI runs as a user runs it (``cli.main``).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest

from _pinned_clock import NOW, Clock
from lago_org_billing import _dead_letters
from lago_org_billing._errors import ConfigurationError, LagoIntegrationError
from lago_org_billing._migration import drop_file_lock, take_file_lock
from lago_org_billing._settings import BillingSettings
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from test_cli_incidents import letters, spool_letters
from test_dead_letters_locks_filters_and_unbilled_replays import dated, incident_spool
from test_delivery import API_KEY, make_client

UTC = datetime.timezone.utc
SETTINGS = BillingSettings(api_key=API_KEY, api_url=FakeLago.base_url)
Hook = Callable[[httpx.Request], Awaitable[None]]


class Lago(httpx.AsyncBaseTransport):
    """The emulator (clock at 2026-03-15; ``org_a`` billed monthly since 2026-01-01, ``org_late`` from 2026-03-10),
    with one-shot hooks run before a batch of events reaches it, after it took one, and before a subscription read."""

    def __init__(self, event_store: str = "postgres") -> None:
        self.fake = FakeLago(api_key=API_KEY, clock=Clock(NOW), event_store=event_store)
        self.fake.add_billable_metric("api_call")
        charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "1"}}
        self.fake.add_plan("pro", amount_cents=1000, charges=[charge])
        for org, start in (("org_a", "2026-01-01T00:00:00Z"), ("org_late", "2026-03-10T00:00:00Z")):
            self.fake.add_customer(org)
            self.fake.add_subscription(org, "pro", external_id=org, subscription_at=start, billing_time="calendar")
        self.inner = self.fake.transport()
        self.before_batch: Hook | None = None
        self.after_batch: Hook | None = None
        self.before_subscription: Hook | None = None
        self.batch_requests = 0

    @staticmethod
    async def _run(hook: Hook | None, request: httpx.Request) -> None:
        if hook is not None:
            await hook(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        batch = request.url.path.endswith("/events/batch")
        if batch:
            self.batch_requests += 1
            hook, self.before_batch = self.before_batch, None
            await self._run(hook, request)
        if "/subscriptions/" in request.url.path:
            hook, self.before_subscription = self.before_subscription, None
            await self._run(hook, request)
        response = await self.inner.handle_async_request(request)
        if batch:
            hook, self.after_batch = self.after_batch, None
            await self._run(hook, request)
        return response

    def transaction_ids(self) -> list[str]:
        return sorted(event["transaction_id"] for event in self.fake.events)


@pytest.fixture
def lago(monkeypatch: pytest.MonkeyPatch) -> Iterator[Lago]:
    transport = Lago()
    monkeypatch.setattr(_dead_letters, "LagoClient", lambda _settings: make_client(transport))
    monkeypatch.setenv("LAGO_API_KEY", API_KEY)
    monkeypatch.setenv("LAGO_API_URL", FakeLago.base_url)
    yield transport


ALL = ["tx_early", "tx_feb", "tx_mar", "tx_nosub"]
UNBILLED = {"tx_early", "tx_feb", "tx_nosub"}


def replay(path: Path, **options: Any) -> _dead_letters.ReplayReport:
    """The Python API, as an operator's script calls it."""

    async def run() -> _dead_letters.ReplayReport:
        return await _dead_letters.replay_spool_dead_letters(
            _dead_letters.read_spool_dead_letters(str(path)), SETTINGS, **options
        )

    return anyio.run(run)


# --------------------------------------------------------------------------------------------- one lock for both paths


def test_an_in_process_replay_while_the_cli_replays_sends_nothing(
    tmp_path: Path, lago: Lago, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker's maintenance hook calls the Python API while an operator runs ``dead-letters --replay``: it raises
    ``DeadLettersBusyError`` (a LagoIntegrationError that says to run again) and sends nothing; Lago gets one batch."""
    path = tmp_path / "spool.db"
    incident_spool(path)
    raised: list[BaseException] = []

    async def replay_in_process(_request: httpx.Request) -> None:
        with pytest.raises(LagoIntegrationError) as caught:
            await _dead_letters.replay_spool_dead_letters(_dead_letters.read_spool_dead_letters(str(path)), SETTINGS)
        raised.append(caught.value)

    lago.before_batch = replay_in_process
    assert main(["dead-letters", "--spool", str(path), "--replay"]) == 0
    assert len(raised) == 1 and isinstance(raised[0], _dead_letters.DeadLettersBusyError)
    assert "another" in str(raised[0]) and "Nothing was sent" in str(raised[0])
    assert lago.batch_requests == 1 and lago.transaction_ids() == ALL
    assert letters(path) == []


def test_a_cli_purge_while_an_in_process_replay_runs_deletes_nothing(tmp_path: Path, lago: Lago) -> None:
    """``dead-letters --purge --yes`` in a shell while a script replays through the Python API: the purge deletes
    nothing and says a replay is running (exit 1); the replay delivers every letter; the lock goes with it."""
    path = tmp_path / "spool.db"
    incident_spool(path)
    codes: list[int] = []

    async def purge(_request: httpx.Request) -> None:
        codes.append(await anyio.to_thread.run_sync(main, ["dead-letters", "--spool", str(path), "--purge", "--yes"]))
        assert len(letters(path)) == 4

    lago.before_batch = purge
    report = replay(path)
    assert codes == [1]
    assert report.delivered == 4 and lago.transaction_ids() == ALL and letters(path) == []
    incident_spool(path)
    assert main(["dead-letters", "--spool", str(path), "--purge", "--yes"]) == 0  # the lock went with the replay


def test_letters_read_before_a_purge_are_not_sent_by_a_later_replay(tmp_path: Path, lago: Lago) -> None:
    """A script reads the letters, an operator purges some meanwhile (Lago must never get those), then the script
    replays what it read: the purged letters are not sent, and counted as ``gone``."""
    path = tmp_path / "spool.db"
    incident_spool(path)
    read = list(_dead_letters.read_spool_dead_letters(str(path)))
    assert main(["dead-letters", "--spool", str(path), "--purge", "--yes", "--subscription", "org_a"]) == 0

    async def run() -> _dead_letters.ReplayReport:
        return await _dead_letters.replay_spool_dead_letters(read, SETTINGS)

    report = anyio.run(run)
    assert lago.transaction_ids() == ["tx_early", "tx_nosub"]
    assert (report.sent, report.delivered, report.gone) == (2, 2, 2)
    assert letters(path) == []


def test_a_replay_of_several_spools_leaves_a_busy_ones_letters_as_they_were(tmp_path: Path, lago: Lago) -> None:
    """Letters of two spools, the second being purged or replayed by someone else: the first spool's letters are
    delivered, the second's are left as they were (``unchanged``: run again), and a warning says so."""
    first, second = tmp_path / "a.db", tmp_path / "b.db"
    spool_letters(first, [dated("tx_a", "org_a", datetime.datetime(2026, 3, 2, tzinfo=UTC))])
    spool_letters(second, [dated("tx_b", "org_a", datetime.datetime(2026, 3, 3, tzinfo=UTC))])
    fd, _ = take_file_lock(str(second) + ".dead-letters.lock", "--purge, pid 1")
    try:

        async def run() -> _dead_letters.ReplayReport:
            read = [
                *_dead_letters.read_spool_dead_letters(str(first)),
                *_dead_letters.read_spool_dead_letters(str(second)),
            ]
            return await _dead_letters.replay_spool_dead_letters(read, SETTINGS)

        report = anyio.run(run)
    finally:
        drop_file_lock(fd)
    assert lago.transaction_ids() == ["tx_a"]
    assert (report.delivered, report.unchanged) == (1, 1)
    assert letters(first) == [] and len(letters(second)) == 1


def test_an_in_process_replay_logs_the_events_lago_will_not_bill(
    tmp_path: Path, lago: Lago, caplog: pytest.LogCaptureFixture
) -> None:
    """The CLI prints a warning for events Lago stores but never bills; the Python API logs it (WARNING), with the
    transaction ids and what to do, so a script that only checks ``report.delivered`` does not hide it."""
    path = tmp_path / "spool.db"
    incident_spool(path)
    with caplog.at_level(logging.WARNING, logger="lago_org_billing.dead_letters"):
        report = replay(path)
    assert report.delivered == 4
    assert {spooled.letter.event["transaction_id"] for spooled, _, _ in report.unbilled} == UNBILLED
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    said = "\n".join(warnings)
    assert all(transaction_id in said for transaction_id in UNBILLED) and "tx_mar" not in said
    assert "one-off invoice" in said


# --------------------------------------------------------------------------------------------- crashes mid-replay


def test_a_replay_cancelled_while_checking_billing_periods_keeps_the_letters_and_their_report(
    tmp_path: Path, lago: Lago
) -> None:
    """Lago took the chunk, then the replay is cancelled (Ctrl-C, a shutdown) while it reads subscriptions to say
    which events Lago will not bill. Before, the letters were already deleted: the next replay had nothing to send and
    the events Lago never bills were never named. Now they stay until that report is made; the next replay sends them
    again (Lago counts them as duplicates: each event once) and names them."""
    path = tmp_path / "spool.db"
    incident_spool(path)

    async def cancelled() -> None:
        with anyio.CancelScope() as scope:

            async def cancel(_request: httpx.Request) -> None:
                scope.cancel()
                await anyio.lowlevel.checkpoint()  # (the cancellation lands here)

            lago.before_subscription = cancel
            await _dead_letters.replay_spool_dead_letters(_dead_letters.read_spool_dead_letters(str(path)), SETTINGS)
        assert scope.cancelled_caught

    anyio.run(cancelled)
    assert lago.transaction_ids() == ALL  # Lago took them
    assert len(letters(path)) == 4  # not deleted without their report
    report = replay(path)  # (the lock went with the cancelled replay)
    assert (report.delivered, report.duplicates) == (4, 4)
    assert {spooled.letter.event["transaction_id"] for spooled, _, _ in report.unbilled} == UNBILLED
    assert lago.transaction_ids() == ALL and letters(path) == []


@pytest.mark.parametrize("event_store", ["postgres", "clickhouse"])
def test_a_replay_cancelled_once_lago_took_the_batch_bills_each_event_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, event_store: str
) -> None:
    """Cancelled after Lago stored the batch, before its answer came back: the letters stay; the next replay sends
    the stored text (same transaction_id, subscription, timestamp), which both of Lago's stores dedupe (Postgres:
    422 value_already_exist; ClickHouse: the same row replaced), so Lago holds each event once."""
    transport = Lago(event_store)
    monkeypatch.setattr(_dead_letters, "LagoClient", lambda _settings: make_client(transport))
    path = tmp_path / "spool.db"
    incident_spool(path)

    async def cancelled() -> None:
        with anyio.CancelScope() as scope:

            async def cancel(_request: httpx.Request) -> None:
                scope.cancel()
                await anyio.lowlevel.checkpoint()

            transport.after_batch = cancel
            await _dead_letters.replay_spool_dead_letters(_dead_letters.read_spool_dead_letters(str(path)), SETTINGS)

    anyio.run(cancelled)
    assert len(letters(path)) == 4 and transport.transaction_ids() == ALL
    report = replay(path)
    assert report.delivered == 4 and letters(path) == []
    assert transport.transaction_ids() == ALL  # once each


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("since", "until"),
    [("2026-03-10", "2026-03-01"), ("2026-03-01T00:00:00Z", "2026-03-01"), ("1772409600", "2026-02-01T00:00:00+01:00")],
)
def test_since_at_or_after_until_is_said_not_an_empty_selection(
    tmp_path: Path, lago: Lago, capsys: pytest.CaptureFixture[str], since: str, until: str
) -> None:
    """Swapped --since/--until selected nothing and a replay said "Replayed 0" (exit 0): the operator believed there
    was nothing to replay. Now exit 2, naming both times; nothing sent."""
    path = tmp_path / "spool.db"
    incident_spool(path)
    for action in ([], ["--replay"], ["--purge", "--yes"]):
        assert main(["dead-letters", "--spool", str(path), *action, "--since", since, "--until", until]) == 2
        err = capsys.readouterr().err
        assert "--since" in err and "--until" in err
    assert lago.batch_requests == 0 and len(letters(path)) == 4


def test_a_compact_date_is_not_read_as_unix_seconds_of_1970(
    tmp_path: Path, lago: Lago, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--since 20260301`` (a date in ISO 8601's basic format) was read as 20,260,301 Unix seconds (1970-08-23):
    ``--purge --yes --since 20260301`` deleted the February letters too. Now it is said as ambiguous, with both ways
    to write it; the decimal form stays Unix seconds."""
    path = tmp_path / "spool.db"
    incident_spool(path)
    assert main(["dead-letters", "--spool", str(path), "--purge", "--yes", "--since", "20260301"]) == 2
    err = capsys.readouterr().err
    assert "2026-03-01" in err and "Unix seconds" in err
    assert len(letters(path)) == 4
    assert main(["dead-letters", "--spool", str(path), "--json", "--since", "20260301.0"]) == 0  # 1970: all of them
    assert main(["dead-letters", "--spool", str(path), "--json", "--since", "1772409600"]) == 0  # 10 digits: seconds


def test_the_public_functions_say_what_is_wrong_with_their_input(tmp_path: Path, lago: Lago) -> None:
    path = tmp_path / "spool.db"
    incident_spool(path)
    with pytest.raises(ConfigurationError, match="not an id"):
        _dead_letters.find_spool_dead_letters(str(path), ["x1"])
    with pytest.raises(ConfigurationError, match="not an id"):
        _dead_letters.find_spool_dead_letters(str(path), ["1:2:3"])
    found, missing = _dead_letters.find_spool_dead_letters(str(path), [1, "0:2", "99"])  # type: ignore[list-item]
    assert [spooled.letter.id for spooled in found] == [1, 2] and missing == ["99"]
    with pytest.raises(ConfigurationError, match="No spool file"):
        list(_dead_letters.read_spool_dead_letters(str(tmp_path / "typo.db")))
    for wait in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigurationError, match="wait"):
            replay(path, wait=wait)
    assert lago.batch_requests == 0 and len(letters(path)) == 4
