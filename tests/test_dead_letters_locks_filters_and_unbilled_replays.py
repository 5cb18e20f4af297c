"""Review of ``lago-org-billing dead-letters`` from the operator's side, after an incident that spanned a month's end:

* a replayed event keeps its original timestamp, so one from a billing period Lago has already invoiced (or for a
  subscription that does not exist or has not started) is stored by Lago and never billed: the replay says which,
  and what to do (a one-off invoice, an adjustment), in its text and in ``--json``;
* a ``--purge`` run while a replay is sending those letters deletes nothing (it says a replay is running), and a
  second replay started meanwhile (another shell, another worker) sends nothing: each event reaches Lago once;
* once the replay ends, its lock is gone: the same commands then work.

The CLI runs as a user runs it (``cli.main``); Lago is the emulator (in process), on a clock pinned at 2026-03-15.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from _pinned_clock import NOW, Clock
from lago_org_billing import _dead_letters
from lago_org_billing._events import event_payload
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from test_cli_incidents import Rejecting, letters, spool_letters
from test_delivery import API_KEY, make_client

UTC = datetime.timezone.utc


def dated(transaction_id: str, subscription: str, when: datetime.datetime) -> dict[str, Any]:
    return event_payload(
        transaction_id=transaction_id,
        external_subscription_id=subscription,
        code="api_call",
        timestamp=when,
        properties={"total_tokens": 5},
    )


class Lago(Rejecting):
    """The emulator (clock at 2026-03-15, subscription ``org_a`` billed monthly since 2026-01-01, ``org_late`` to
    start on 2026-03-10), with a hook run when a batch of events arrives (before Lago takes it)."""

    def __init__(self) -> None:
        fake = FakeLago(api_key=API_KEY, clock=Clock(NOW))
        fake.add_billable_metric("api_call")
        charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "1"}}
        fake.add_plan("pro", amount_cents=1000, charges=[charge])
        for org, start in (("org_a", "2026-01-01T00:00:00Z"), ("org_late", "2026-03-10T00:00:00Z")):
            fake.add_customer(org)
            fake.add_subscription(org, "pro", external_id=org, subscription_at=start, billing_time="calendar")
        super().__init__(fake, set())
        self.on_batch: Any = None
        self.batch_requests = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events/batch"):
            self.batch_requests += 1
            if self.on_batch is not None:
                hook, self.on_batch = self.on_batch, None
                await hook()
        return await super().handle_async_request(request)


@pytest.fixture
def lago(monkeypatch: pytest.MonkeyPatch) -> Iterator[Lago]:
    transport = Lago()
    monkeypatch.setattr(_dead_letters, "LagoClient", lambda _settings: make_client(transport))
    monkeypatch.setenv("LAGO_API_KEY", API_KEY)
    monkeypatch.setenv("LAGO_API_URL", FakeLago.base_url)
    yield transport


def incident_spool(path: Path) -> None:
    """Letters of an incident from 2026-02-27 to today: one in February (invoiced), one in March (current period),
    one for a subscription Lago does not know, one before ``org_late`` starts."""
    spool_letters(
        path,
        [
            dated("tx_feb", "org_a", datetime.datetime(2026, 2, 27, 10, tzinfo=UTC)),
            dated("tx_mar", "org_a", datetime.datetime(2026, 3, 2, 10, tzinfo=UTC)),
            dated("tx_nosub", "org_unknown", datetime.datetime(2026, 3, 2, 11, tzinfo=UTC)),
            dated("tx_early", "org_late", datetime.datetime(2026, 3, 2, 12, tzinfo=UTC)),
        ],
    )


def test_a_replayed_event_lago_will_never_bill_is_said_with_what_to_do(
    tmp_path: Path, lago: Lago, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every letter is delivered (exit 0: Lago took them), with their original timestamps; the ones Lago stores but
    never bills (an invoiced period, no subscription, before the subscription's start) are named, with why and what
    to do; the one in the current period is not."""
    path = tmp_path / "spool.db"
    incident_spool(path)
    assert main(["dead-letters", "--spool", str(path), "--replay"]) == 0
    captured = capsys.readouterr()
    assert "Replayed 4: 4 delivered" in captured.out
    said = captured.out + captured.err
    for transaction_id in ("tx_feb", "tx_nosub", "tx_early"):
        assert transaction_id in said
    assert "tx_mar" not in said
    assert "one-off invoice" in said and "2026-03-01" in said  # what to do; the period Lago bills now
    sent = {event["transaction_id"]: event["timestamp"] for event in lago.fake.events}
    assert sent["tx_feb"] == "2026-02-27T10:00:00.000Z"  # its own timestamp, not the replay's
    assert letters(path) == []


def test_the_json_report_lists_the_events_lago_will_never_bill(
    tmp_path: Path, lago: Lago, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spool.db"
    incident_spool(path)
    assert main(["dead-letters", "--spool", str(path), "--replay", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["delivered"] == 4 and report["unchecked"] == 0
    unbilled = {item["event"]["transaction_id"]: item for item in report["unbilled"]}
    assert set(unbilled) == {"tx_feb", "tx_nosub", "tx_early"}
    assert unbilled["tx_feb"]["period_started_at"] == "2026-03-01T00:00:00Z"
    assert all(item["why"] for item in unbilled.values())


def test_a_purge_while_a_replay_sends_the_letters_deletes_nothing(
    tmp_path: Path, lago: Lago, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator purges (--yes) in another shell while a replay is sending: the purge deletes nothing and says a
    replay is running (exit 1: run it again after); the replay delivers each event once; a purge afterwards works."""
    path = tmp_path / "spool.db"
    incident_spool(path)
    codes: list[int] = []

    async def purge() -> None:
        codes.append(await anyio.to_thread.run_sync(main, ["dead-letters", "--spool", str(path), "--purge", "--yes"]))
        assert len(letters(path)) == 4  # nothing deleted under the replay

    lago.on_batch = purge
    assert main(["dead-letters", "--spool", str(path), "--replay"]) == 0
    captured = capsys.readouterr()
    assert codes == [1]
    assert "replay" in captured.err and "Nothing was deleted" in captured.err
    assert sorted(event["transaction_id"] for event in lago.fake.events) == ["tx_early", "tx_feb", "tx_mar", "tx_nosub"]
    assert letters(path) == []
    assert main(["dead-letters", "--spool", str(path), "--purge", "--yes"]) == 0  # the lock went with the replay


def test_a_second_replay_while_one_runs_sends_nothing(
    tmp_path: Path, lago: Lago, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two shells (or two workers' start scripts) replay the same spool at once: the second sends nothing and says
    so (exit 1, JSON error on --json); Lago gets each event once, in one batch; run again after: nothing to do."""
    path = tmp_path / "spool.db"
    incident_spool(path)
    codes: list[int] = []

    async def replay_again() -> None:
        argv = ["dead-letters", "--spool", str(path), "--replay", "--json"]
        codes.append(await anyio.to_thread.run_sync(main, argv))

    lago.on_batch = replay_again
    assert main(["dead-letters", "--spool", str(path), "--replay"]) == 0
    captured = capsys.readouterr()
    assert codes == [1]
    second = json.loads(captured.out.splitlines()[0])  # (printed while the first one runs)
    assert second["exit_code"] == 1 and "another" in second["error"]
    assert lago.batch_requests == 1 and len(lago.fake.events) == 4
    assert main(["dead-letters", "--spool", str(path), "--replay"]) == 0
    assert "Replayed 0" in capsys.readouterr().out


def test_letters_are_selected_by_subscription_and_event_time(
    tmp_path: Path, lago: Lago, capsys: pytest.CaptureFixture[str]
) -> None:
    """--subscription (exact, repeatable) and --since/--until (the event's own timestamp, an ISO time or Unix seconds,
    from inclusive, until exclusive) select the letters listed and replayed: only those are sent."""
    path = tmp_path / "spool.db"
    incident_spool(path)

    def listed(*options: str) -> list[str]:
        assert main(["dead-letters", "--spool", str(path), "--json", *options]) == 0
        return sorted(item["event"]["transaction_id"] for item in json.loads(capsys.readouterr().out))

    assert listed("--subscription", "org_a") == ["tx_feb", "tx_mar"]
    assert listed("--subscription", "org_a", "--subscription", "org_late") == ["tx_early", "tx_feb", "tx_mar"]
    assert listed("--subscription", "org") == []  # exact, not a substring
    assert listed("--since", "2026-03-01") == ["tx_early", "tx_mar", "tx_nosub"]
    assert listed("--until", "2026-03-01T00:00:00Z") == ["tx_feb"]
    march = str(datetime.datetime(2026, 3, 2, 11, tzinfo=UTC).timestamp())
    assert listed("--since", "2026-03-01", "--until", march) == ["tx_mar"]
    assert (
        main(["dead-letters", "--spool", str(path), "--replay", "--since", "2026-03-01", "--subscription", "org_a"])
        == 0
    )
    assert [event["transaction_id"] for event in lago.fake.events] == ["tx_mar"]
    assert main(["dead-letters", "--spool", str(path), "--since", "yesterday"]) == 2  # said, nothing selected
    assert "--since" in capsys.readouterr().err


def test_a_purge_by_subscription_deletes_only_those_letters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "spool.db"
    incident_spool(path)
    assert main(["dead-letters", "--spool", str(path), "--purge", "--yes", "--subscription", "org_unknown"]) == 0
    assert "Purged 1 " in capsys.readouterr().out
    assert sorted(transaction for _, transaction, _ in letters(path)) == ["tx_early", "tx_feb", "tx_mar"]
