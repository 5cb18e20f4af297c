"""The dead letters (``dead-letters --replay`` and ``replay_spool_dead_letters``) on large stores and runs
that stop between two chunks:

* a replay goes a thousand letters at a time so that "memory stays bounded whatever the table holds" (``CHUNK``),
  yet every letter rejected again (or delivered but never billed) is kept in the report until the run ends: a replay
  of a large store whose cause is not fixed yet grows without bound (200,000 letters: ~1 GB);
* a replay stopped after some chunks went through (Ctrl-C, a cancellation) deleted those chunks' letters, and the
  events Lago stores but never bills among them were never named: the report is printed (logged) only at the end.

Lago is the emulator (in process), on a clock pinned at 2026-03-15 (as ``test_dead_letters_replay_locks_and_options``);
the CLI runs as a user runs it (``cli.main``). ``CHUNK`` is made small so that a few letters make several chunks.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest

from lago_org_billing import _dead_letters
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from test_cli_incidents import event, letters, spool_letters
from test_dead_letters_replay_locks_and_options import SETTINGS, UNBILLED, Lago, incident_spool
from test_delivery import API_KEY, make_client


@pytest.fixture
def lago(monkeypatch: pytest.MonkeyPatch) -> Iterator[Lago]:
    """The emulator (clock at 2026-03-15; ``org_a`` billed monthly since 2026-01-01), as ``dead-letters --replay``
    and ``replay_spool_dead_letters`` reach it."""
    transport = Lago()
    monkeypatch.setattr(_dead_letters, "LagoClient", lambda _settings: make_client(transport))
    monkeypatch.setenv("LAGO_API_KEY", API_KEY)
    monkeypatch.setenv("LAGO_API_URL", FakeLago.base_url)
    yield transport


def _alive(kind: type) -> int:
    gc.collect()
    return sum(1 for thing in gc.get_objects() if type(thing) is kind)


# --------------------------------------------------------------------------------------------- memory


def test_a_replay_of_a_large_store_rejected_again_keeps_memory_bounded(
    tmp_path: Path, lago: Lago, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """200 letters that Lago still rejects (a metric not fixed yet), replayed 20 at a time: while the last chunk is
    sent, the letters of the chunks done are no longer held (they are in the spool, with Lago's new reason). Now all
    of them are kept in ``ReplayReport.rejected`` to the end (~5 KB each: 200,000 letters took 1 GB, a million would
    not fit), against the module's own promise that memory stays bounded whatever the table holds."""
    monkeypatch.setattr(_dead_letters, "CHUNK", 20)
    path = tmp_path / "spool.db"
    spool_letters(path, [event(f"tx{index}", "org_broken") for index in range(200)])
    held: list[int] = []

    class StillBroken(httpx.AsyncBaseTransport):
        """Lago rejecting every event (422 by index, as a failing expression), counting letters alive as each
        batch arrives."""

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/events/batch"):
                held.append(_alive(_dead_letters.SpoolDeadLetter))
                count = len(json.loads(await request.aread())["events"])
                details = {str(index): "expression_evaluation_failed: Variable: b not found" for index in range(count)}
                body = {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors"}
                return httpx.Response(422, json={**body, "error_details": details})
            return await lago.handle_async_request(request)

    monkeypatch.setattr(_dead_letters, "LagoClient", lambda _settings: make_client(StillBroken()))
    assert main(["dead-letters", "--spool", str(path), "--replay"]) == 1
    assert "Replayed 200: 0 delivered" in capsys.readouterr().out
    assert len(letters(path)) == 200  # every one kept, with the new reason
    assert max(held) <= 3 * 20, f"letters held while the last chunk is sent: {held[-1]} (of 200; chunk 20)"


# --------------------------------------------------------------------------------------------- stopped between chunks


def test_ctrl_c_after_a_chunk_went_through_still_names_its_events_lago_will_not_bill(
    tmp_path: Path, lago: Lago, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Four letters replayed two at a time: the first chunk (tx_feb, from a period Lago has invoiced, and tx_mar) is
    delivered and its letters deleted; the operator presses Ctrl-C while Lago is slow on the second. Exit 130 with
    "Interrupted", and nothing names tx_feb, which Lago stores and never bills: its letter is gone, the next replay
    sends only the second chunk, and the charge is lost without a word. A chunk's letters must not be deleted
    without its report (as the module says: "never deleted without being said unbilled")."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    monkeypatch.setattr(_dead_letters, "CHUNK", 2)
    path = tmp_path / "spool.db"
    incident_spool(path)  # tx_feb, tx_mar | tx_nosub, tx_early

    async def press_ctrl_c_on_the_second_chunk(request: httpx.Request) -> None:
        if b"tx_nosub" in await request.aread():
            signal.raise_signal(signal.SIGINT)
            await anyio.sleep_forever()
        lago.before_batch = press_ctrl_c_on_the_second_chunk

    lago.before_batch = press_ctrl_c_on_the_second_chunk
    assert main(["dead-letters", "--spool", str(path), "--replay"]) == 130
    captured = capsys.readouterr()
    assert "Interrupted" in captured.err
    assert "tx_feb" in lago.transaction_ids()  # the first chunk went through: Lago stores tx_feb (and never bills it)
    left = {transaction_id for _, transaction_id, _ in letters(path)}
    assert "tx_feb" in left or "tx_feb" in captured.out + captured.err, (
        f"tx_feb (never billed by Lago) was deleted from the spool and never named; letters left: {sorted(left)}"
    )


def test_an_in_process_replay_cancelled_after_a_chunk_went_through_logs_its_events_lago_will_not_bill(
    tmp_path: Path, lago: Lago, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The same through the Python API (a worker's maintenance task cancelled at shutdown): the first chunk's letters
    are deleted, the cancellation skips ``_log_report``, and tx_feb (stored by Lago, never billed) is named nowhere."""
    monkeypatch.setattr(_dead_letters, "CHUNK", 2)
    path = tmp_path / "spool.db"
    incident_spool(path)

    async def cancelled() -> None:
        with anyio.CancelScope() as scope:

            async def cancel_on_the_second_chunk(request: httpx.Request) -> None:
                if b"tx_nosub" in await request.aread():
                    scope.cancel()
                    await anyio.lowlevel.checkpoint()
                lago.before_batch = cancel_on_the_second_chunk

            lago.before_batch = cancel_on_the_second_chunk
            await _dead_letters.replay_spool_dead_letters(_dead_letters.read_spool_dead_letters(str(path)), SETTINGS)
        assert scope.cancelled_caught

    with caplog.at_level(logging.WARNING, logger="lago_org_billing.dead_letters"):
        anyio.run(cancelled)
    said = "\n".join(record.getMessage() for record in caplog.records if record.name == "lago_org_billing.dead_letters")
    left = {transaction_id for _, transaction_id, _ in letters(path)}
    assert "tx_feb" in lago.transaction_ids()
    assert "tx_feb" in left or "tx_feb" in said, f"tx_feb deleted and never named; letters left: {sorted(left)}"
    assert UNBILLED - {"tx_feb"} <= left  # (the second chunk: left for the next replay)
