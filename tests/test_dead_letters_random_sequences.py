"""Seeded random sequences of operations on a spool's dead letters, checked against a model of the store.

Each seed draws the emulator's event store (Postgres: a resend is ``422 value_already_exist``; ClickHouse: it replaces
the row), the size of a replay's chunk, then a sequence of steps:

* **ingest**: a worker's delivery pipeline (one, or two sharing the spool: slot files ``PATH`` and ``PATH.1``) sends
  events of three subscriptions (``org_none`` has none in Lago), timestamped from late February to mid March 2026
  (the subscriptions' current billing period starts on March 1st), now and then one Lago refuses for good (an invalid
  ``precise_total_amount_cents``: the emulator's own 422), one whose builder fails (no whole event: not replayable),
  one reusing the ``transaction_id`` of a letter on another subscription, while the emulator's fault controls make
  Lago reject some events of the first batch with its 422 shape (``error_details`` by index, or naming none);
* **list** and **summary** (text and ``--json``) with filters (``--id`` with slot-prefixed and repeated ids,
  ``--reason``, ``--subscription``, ``--since``/``--until`` as ISO dates, times or Unix seconds);
* **replay** (the command, or ``replay_spool_dead_letters`` of a script), all letters or those filtered, while Lago
  accepts, rejects some again (a 422 naming them), answers 5xx a few times, loses the answer of a batch it took,
  goes down partway (at a given chunk, until ``--timeout``), or is down (503, connections dropped, the key refused)
  from the start; the listing with the same filters before it is its dry run;
* **purge** ``--yes`` with filters, and without ``--yes`` where no terminal can confirm;
* **two at once**: a second replay or purge (another task, a thread, another process) while one sends, two
  replays started together (two tasks, two processes), and a worker starting (adopting the slot files of workers
  gone) while a replay sends;
* **killed**: a replay (or purge) in a subprocess SIGKILLed before its first, second or third batch reaches Lago,
  after Lago took it, or after a purge's first chunks were deleted;
* **reopen**: a worker starts on the spool (adopting the slot files of workers gone) and lists its letters.

After every step the spool files are opened afresh and compared with the model: each letter the model holds is stored
exactly once, with the reason, status and code of Lago's last answer about it; each event Lago holds is there once
(by ``transaction_id`` and subscription), and is exactly those the model says were delivered; a letter both stored
and in Lago only after a replay was cut off once Lago took its batch (the next replay counts it as a duplicate on
Postgres); a replay killed settled whole chunks, first ones first. Exit codes and JSON outputs are checked against
what ``--help`` and the README document. Time passes for real only where Lago is down, until ``--timeout`` (0.3 s, or
1 s when it goes down after some chunks).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import decimal
import json
import os
import random
import re
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from _pinned_clock import NOW, Clock
from lago_org_billing import BillingSettings, LagoClient, _dead_letters
from lago_org_billing._delivery import EventPipeline
from lago_org_billing._events import event_payload
from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

API_KEY = "dead-letters-key"
UTC = datetime.timezone.utc
SEEDS = [*range(1, 5), 16, 20, 58]  # (16, 20 and 58 met the defect of the regression case at the end)

#: org_a and org_b are billed monthly since 2026-01-01 (current period from March 1st); org_none has no subscription.
SUBSCRIPTIONS = ("org_a", "org_b", "org_none")
PERIOD = decimal.Decimal(int(datetime.datetime(2026, 3, 1, tzinfo=UTC).timestamp()))
FIRST = int(datetime.datetime(2026, 2, 20, tzinfo=UTC).timestamp())
LAST = int(datetime.datetime(2026, 3, 15, tzinfo=UTC).timestamp())
#: The emulator's own answer to an event whose precise_total_amount_cents is no number (as Lago's).
POISON_REASON = json.dumps({"precise_total_amount_cents": ["value_is_invalid"]})
#: Fields a 422 of Lago's names (the reason stored: its error for the event, as JSON).
FIELDS = ("properties", "code", "external_subscription_id", "timestamp")
BATCH_PATH = "/api/v1/events/batch"


# --------------------------------------------------------------------------------------------- Lago


def new_lago(event_store: str) -> FakeLago:
    fake = FakeLago(api_key=API_KEY, clock=Clock(NOW), event_store=event_store)
    fake.add_billable_metric("api_call")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "1"}}
    fake.add_plan("pro", amount_cents=1000, charges=[charge])
    for org in ("org_a", "org_b"):
        fake.add_customer(org)
        fake.add_subscription(
            org, "pro", external_id=org, subscription_at="2026-01-01T00:00:00Z", billing_time="calendar"
        )
    return fake


Hook = Callable[[list[dict[str, Any]]], Awaitable[None]]


class Edge(httpx.AsyncBaseTransport):
    """The emulator in process (its fault controls included), with a one-shot hook run before a batch of events
    reaches it (given the batch), and a batch whose answer is lost once Lago took it (a read timeout)."""

    def __init__(self, fake: FakeLago) -> None:
        self.inner = fake.transport()
        self.before_batch: Hook | None = None
        self.lose_answer = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/events/batch"):
            return await self.inner.handle_async_request(request)
        hook, self.before_batch = self.before_batch, None
        if hook is not None:
            await hook(json.loads(await request.aread())["events"])
        response = await self.inner.handle_async_request(request)
        if self.lose_answer:
            self.lose_answer = False
            await response.aread()
            raise httpx.ReadTimeout("the answer was lost on its way back", request=request)
        return response


def in_lago(fake: FakeLago) -> collections.Counter[tuple[str, str]]:
    return collections.Counter((event["transaction_id"], event["external_subscription_id"]) for event in fake.events)


# --------------------------------------------------------------------------------------------- the model


Ident = tuple[str, str]


@dataclasses.dataclass
class Letter:
    """A dead letter as the model knows it: the event it holds, and Lago's last answer about it."""

    ident: Ident  # (transaction_id, subscription), or ("!", marker) for an event that could not be built
    moment: decimal.Decimal | None
    poison: bool  # Lago refuses it for good
    reason: str
    status: int | None
    code: str | None
    key: str = ""  # as the command names it now (read from the spool after each step)

    @property
    def replayable(self) -> bool:
        return self.ident[0] != "!"

    @property
    def sub(self) -> str | None:
        return self.ident[1] if self.replayable else None


def ident_of(spooled: _dead_letters.SpoolDeadLetter) -> Ident:
    event = spooled.letter.event
    if spooled.letter.replayable:
        return (event["transaction_id"], event["external_subscription_id"])
    found = re.search(r"no usage (u\d+)", spooled.letter.reason)
    assert found, spooled
    return ("!", found.group(1))


@dataclasses.dataclass
class Selection:
    """The filters of a command (None: not given), and how the model applies them."""

    ids: list[str] | None = None
    reason: str | None = None
    subscriptions: list[str] | None = None
    since: tuple[str, decimal.Decimal] | None = None
    until: tuple[str, decimal.Decimal] | None = None

    def argv(self) -> list[str]:
        argv: list[str] = []
        if self.ids:
            argv += ["--id", *self.ids]
        if self.reason is not None:
            argv += ["--reason", self.reason]
        for sub in self.subscriptions or []:
            argv += ["--subscription", sub]
        if self.since:
            argv += ["--since", self.since[0]]
        if self.until:
            argv += ["--until", self.until[0]]
        return argv

    def keeps(self, letter: Letter) -> bool:
        if self.reason is not None:
            needle = self.reason.casefold()
            if needle not in letter.reason.casefold() and needle not in (letter.code or "").casefold():
                return False
        if self.subscriptions is not None and letter.sub not in self.subscriptions:
            return False
        if self.since or self.until:
            if letter.moment is None:
                return False
            if self.since and letter.moment < self.since[1]:
                return False
            if self.until and letter.moment >= self.until[1]:
                return False
        return True


def normal_key(key: str) -> tuple[int, int]:
    slot, _, row = key.rpartition(":")
    return (int(slot or 0), int(row))


@dataclasses.dataclass
class Outcome:
    """What a replay does to the letters it sends (in the order it sends them), as the model predicts it."""

    sent: list[Letter]
    delivered: list[Letter]
    rejected: list[tuple[Letter, str]]  # with Lago's new reason
    untouched: list[Letter]  # sent, but Lago did not answer for their chunk in time
    skipped: list[Letter]
    duplicates: int
    complete: bool

    @property
    def exit_code(self) -> int:
        return 0 if self.complete and not self.rejected else 1


# --------------------------------------------------------------------------------------------- one seed's world


class World:
    """The spool, Lago, the model, and the steps of one seed."""

    def __init__(
        self,
        seed: int,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.tmp_path = tmp_path
        self.path = tmp_path / "spool.db"
        self.capsys = capsys
        self.url = FakeLago.base_url  # (the served emulator's, for the children)
        self.event_store = self.rng.choice(["postgres", "clickhouse"])
        self.fake = new_lago(self.event_store)
        self.edge = Edge(self.fake)
        self.chunk = self.rng.choice([2, 3, 5, 1000])
        monkeypatch.setattr(_dead_letters, "CHUNK", self.chunk)
        monkeypatch.setattr(_dead_letters, "LagoClient", lambda settings: LagoClient(settings, transport=self.edge))
        self.settings = BillingSettings(api_key=API_KEY, api_url=self.url, max_retries=0, retry_backoff=0.01)
        #: letters the spool holds, by ident, in the order the command reads them (slot, then id)
        self.letters: dict[Ident, Letter] = {}
        #: events Lago must hold (each once)
        self.lago: set[Ident] = set()
        #: letters whose event Lago took although they are still stored (a replay cut off after Lago took them)
        self.limbo: set[Ident] = set()
        self.made = 0
        self.subprocesses = 0
        self.log: list[str] = []

    # ------------------------------------------------------------------------- helpers

    def say(self, what: str) -> None:
        self.log.append(what)

    def where(self) -> str:
        return f"seed {self.seed} ({self.event_store}, chunk {self.chunk}): " + " | ".join(self.log[-6:])

    def cli(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["dead-letters", "--spool", str(self.path), *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    def child_env(self) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if not name.startswith("LAGO_")}
        env.update(
            LAGO_API_URL=self.url,
            LAGO_API_KEY=API_KEY,
            LAGO_MAX_RETRIES="0",
            LAGO_RETRY_BACKOFF="0.01",
            PYTHONPATH=str(Path(__file__).parent),
            NO_PROXY="127.0.0.1",
            no_proxy="127.0.0.1",
        )
        return env

    def child(self, spec: dict[str, Any], *argv: str) -> subprocess.Popen[str]:
        """This file run as a child (see its end): ``dead-letters --spool PATH argv``, frozen as ``spec`` says."""
        self.subprocesses += 1
        return subprocess.Popen(
            [sys.executable, __file__, json.dumps(spec), "dead-letters", "--spool", str(self.path), *argv],
            env=self.child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ordered(self) -> list[Letter]:
        return list(self.letters.values())

    # ------------------------------------------------------------------------- the oracle

    def check(self) -> None:
        """The spool, opened afresh, holds the model's letters once each, with Lago's last answer; Lago holds each
        event once, exactly those delivered. Refreshes the keys and the command's order."""
        stored = list(_dead_letters.read_spool_dead_letters(str(self.path))) if self.path.exists() else []
        idents = [ident_of(spooled) for spooled in stored]
        assert len(idents) == len(set(idents)), (self.where(), collections.Counter(idents).most_common(3))
        assert set(idents) == set(self.letters), (
            self.where(),
            "missing",
            set(self.letters) - set(idents),
            "unexpected",
            set(idents) - set(self.letters),
        )
        ordered: dict[Ident, Letter] = {}
        for spooled, ident in zip(stored, idents, strict=True):
            letter = self.letters[ident]
            found = (spooled.letter.reason, spooled.letter.status, spooled.letter.code)
            assert found == (letter.reason, letter.status, letter.code), (self.where(), ident, found)
            letter.key = spooled.key
            ordered[ident] = letter
        self.letters = ordered
        counts = in_lago(self.fake)
        assert all(count == 1 for count in counts.values()), (self.where(), counts.most_common(3))
        assert set(counts) == self.lago, (
            self.where(),
            "lost",
            self.lago - set(counts),
            "extra",
            set(counts) - self.lago,
        )
        both = set(self.letters) & self.lago
        assert both <= self.limbo, (self.where(), "stored and delivered", both - self.limbo)
        self.limbo &= both

    # ------------------------------------------------------------------------- ingest

    def new_event(self, sub: str, *, poison: bool = False, transaction_id: str | None = None) -> dict[str, Any]:
        self.made += 1
        millis = self.rng.randrange(FIRST * 1000, LAST * 1000)
        return event_payload(
            transaction_id=transaction_id or f"s{self.seed}-e{self.made}",
            external_subscription_id=sub,
            code="api_call",
            properties={"total_tokens": self.rng.randint(1, 50)},
            timestamp=decimal.Decimal(millis) / 1000,
            precise_total_amount_cents="x" if poison else None,
        )

    def ingest(self) -> None:
        """A worker's pipeline (or a second one, beside a first that holds slot 0) sends a few events; Lago rejects
        those the fault names in its first batch, and the poison ones."""
        rng = self.rng
        planned: list[tuple[dict[str, Any] | None, str]] = []  # (event, or None for an unbuildable one; its marker)
        for _ in range(rng.randint(3, 9)):
            roll = rng.random()
            if roll < 0.1:
                self.made += 1
                planned.append((None, f"u{self.made}"))
                continue
            sub = rng.choice(SUBSCRIPTIONS)
            shared = [
                letter
                for letter in self.letters.values()
                if letter.replayable and not letter.poison and letter.sub != sub
            ]
            transaction_id = None
            if roll < 0.3 and shared:
                candidate = rng.choice(shared).ident[0]
                if (
                    (candidate, sub) not in self.lago
                    and (candidate, sub) not in self.letters
                    and all(event is None or event["transaction_id"] != candidate for event, _ in planned)
                ):
                    transaction_id = candidate
            planned.append((self.new_event(sub, poison=roll > 0.82, transaction_id=transaction_id), ""))
            if transaction_id:
                self.say(f"shares {transaction_id}")
        buildable = [event for event, _ in planned if event is not None]
        named: dict[int, str] = {}
        # an event sharing the transaction_id of a letter is rejected too: two letters then, replayed together
        sharing = [
            index
            for index, event in enumerate(buildable)
            if any(event["transaction_id"] == letter.ident[0] for letter in self.letters.values())
        ]
        unnamed = False  # a 422 naming no event: split until alone, then dead-lettered with Lago's error
        if buildable and (sharing or rng.random() < 0.7):
            for index in [*sharing, *rng.sample(range(len(buildable)), rng.randint(0, len(buildable)))]:
                named[index] = rng.choice(FIELDS)
            unnamed = not named
            self.fake.inject_fault(  # type: ignore[attr-defined]
                422, count=1, path=BATCH_PATH, body=lago_422(named)
            )
        two = rng.random() < 0.35
        rejected = "none named" if unnamed else sorted(named)
        self.say(f"ingest {len(planned)} (rejected {rejected}{', second worker' if two else ''})")

        def builder(marker: str) -> Callable[[], dict[str, Any]]:
            def build() -> dict[str, Any]:
                raise RuntimeError(f"no usage {marker}")

            return build

        async def run() -> None:
            async with LagoClient(self.settings, transport=self.fake.transport()) as client:
                first = EventPipeline(client, spool_path=str(self.path), flush_interval=0.01)
                async with anyio.create_task_group() as tasks:
                    await tasks.start(first.run)
                    worker = first
                    if two:
                        worker = EventPipeline(client, spool_path=str(self.path), flush_interval=0.01)
                        await tasks.start(worker.run)
                    for event, marker in planned:
                        worker.submit(event if event is not None else builder(marker))
                    assert await worker.flush(20), self.where()
                    await worker.aclose()
                    if worker is not first:
                        await first.aclose()

        anyio.run(run)
        self.fake.clear_faults()  # type: ignore[attr-defined]
        for index, event in enumerate(buildable):
            ident = (event["transaction_id"], event["external_subscription_id"])
            moment = decimal.Decimal(event["timestamp"])
            poison = event.get("precise_total_amount_cents") == "x"
            if index in named:
                reason = json.dumps({named[index]: ["value_is_invalid"]})
                self.letters[ident] = Letter(ident, moment, poison, reason, 422, "validation_errors")
            elif unnamed and len(buildable) == 1:
                self.letters[ident] = Letter(ident, moment, poison, "Unprocessable Entity", 422, "validation_errors")
            elif poison:
                self.letters[ident] = Letter(ident, moment, poison, POISON_REASON, 422, "validation_errors")
            else:
                self.lago.add(ident)
        for event, marker in planned:
            if event is None:
                reason = f"the event could not be built: RuntimeError: no usage {marker}"
                self.letters[("!", marker)] = Letter(("!", marker), None, False, reason, None, "invalid_event")

    # ------------------------------------------------------------------------- selections

    def selection(self, *, allow_ids: bool = True) -> Selection:
        rng = self.rng
        chosen = Selection()
        letters = self.ordered()
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            kind = rng.choice(
                ["ids", "reason", "subscription", "time"] if allow_ids else ["reason", "subscription", "time"]
            )
            if kind == "ids" and letters:
                picked = rng.sample(letters, rng.randint(1, min(4, len(letters))))
                keys = [letter.key for letter in picked]
                if rng.random() < 0.3:  # the same letter named twice ("5" and "0:5")
                    key = keys[0]
                    keys.append(key if ":" in key else f"0:{key}")
                if rng.random() < 0.1:  # one no letter has (purged, replayed, or a slot with no file)
                    keys.append(rng.choice(["999", "7:1", "1:999"]))
                chosen.ids = keys
            elif kind == "reason":
                chosen.reason = rng.choice(
                    ["value_is_invalid", "PRECISE_total", "properties", "could not be built", "VALIDATION", "code",
                     "invalid_event", "timestamp", "nothing-like-this"]
                )  # fmt: skip
            elif kind == "subscription":
                chosen.subscriptions = rng.sample(SUBSCRIPTIONS, rng.randint(1, 2))
            else:
                low = rng.randrange(FIRST, LAST)
                high = rng.randrange(low + 1, LAST + 86_400)
                chosen.since = self.time_text(low) if rng.random() < 0.7 else None
                chosen.until = self.time_text(high) if rng.random() < 0.7 or chosen.since is None else None
                if chosen.since and chosen.until and chosen.since[1] >= chosen.until[1]:  # (a date: its midnight)
                    chosen.until = None
        return chosen

    def time_text(self, seconds: int) -> tuple[str, decimal.Decimal]:
        """A time as an operator writes it (ISO date, ISO time, Unix seconds), and what it means."""
        moment = datetime.datetime.fromtimestamp(seconds, UTC)
        form = self.rng.choice(["date", "time", "offset", "unix"])
        if form == "date":
            day = moment.replace(hour=0, minute=0, second=0)
            return day.date().isoformat(), decimal.Decimal(int(day.timestamp()))
        if form == "time":
            return moment.strftime("%Y-%m-%dT%H:%M:%SZ"), decimal.Decimal(seconds)
        if form == "offset":
            local = moment.astimezone(datetime.timezone(datetime.timedelta(hours=2)))
            return local.strftime("%Y-%m-%dT%H:%M:%S+02:00"), decimal.Decimal(seconds)
        return str(seconds), decimal.Decimal(seconds)

    def chosen(self, selection: Selection) -> list[Letter] | None:
        """The letters the command takes, in the order it takes them; None when an id names no letter."""
        if selection.ids:
            by_key = {normal_key(letter.key): letter for letter in self.letters.values()}
            taken: dict[tuple[int, int], Letter] = {}
            for key in selection.ids:
                normal = normal_key(key)
                if normal not in by_key:
                    return None
                taken.setdefault(normal, by_key[normal])
            letters = list(taken.values())
        else:
            letters = self.ordered()
        return [letter for letter in letters if selection.keeps(letter)]

    # ------------------------------------------------------------------------- listing and summary

    def listing(self) -> None:
        selection = self.selection()
        chosen = self.chosen(selection)
        as_json = self.rng.random() < 0.6
        self.say(f"list {selection.argv()}{' --json' if as_json else ''}")
        code, out, err = self.cli(*selection.argv(), *(["--json"] if as_json else []))
        if chosen is None:
            assert code == 2 and "no such dead letter" in err, (self.where(), code, err)
            if as_json:
                assert json.loads(out)["exit_code"] == 2
            return
        assert code == 0, (self.where(), err)
        if as_json:
            listed = json.loads(out)
            assert [item["id"] for item in listed] == [letter.key for letter in chosen], self.where()
            for item, letter in zip(listed, chosen, strict=True):
                assert (item["reason"], item["status"], item["code"]) == (letter.reason, letter.status, letter.code)
                assert item["replayable"] == letter.replayable
                if letter.replayable:
                    event = item["event"]
                    assert (event["transaction_id"], event["external_subscription_id"]) == letter.ident
        else:
            replayable = sum(letter.replayable for letter in chosen)
            assert out.splitlines()[-1] == f"{len(chosen)} dead letters in {self.path} ({replayable} can be replayed)"
            assert len(out.splitlines()) == (len(chosen) + 2 if chosen else 1), (self.where(), out)

    def summary(self) -> None:
        selection = self.selection(allow_ids=False)
        chosen = self.chosen(selection)
        assert chosen is not None
        as_json = self.rng.random() < 0.6
        self.say(f"summary {selection.argv()}{' --json' if as_json else ''}")
        code, out, err = self.cli("--summary", *selection.argv(), *(["--json"] if as_json else []))
        assert code == 0, (self.where(), err)
        counts = collections.Counter((letter.status, letter.code, letter.reason) for letter in chosen)
        if as_json:
            groups = [(group["status"], group["code"], group["reason"], group["count"]) for group in json.loads(out)]
            assert sorted(groups, key=str) == sorted(((*g, n) for g, n in counts.items()), key=str), self.where()
            assert [n for *_, n in groups] == sorted((n for *_, n in groups), reverse=True)
        else:
            assert out.splitlines()[-1] == f"{len(chosen)} dead letters in {self.path}", (self.where(), out)

    # ------------------------------------------------------------------------- replays

    def predict(
        self, chosen: list[Letter], *, rejected: dict[int, str] | None = None, down_at: int | None = None, lost: bool
    ) -> Outcome:
        """What a replay of ``chosen`` does: chunk by chunk, Lago rejecting again the poison letters and those the
        fault names in the first batch, down from chunk ``down_at``; a first batch whose answer is lost."""
        outcome = Outcome([], [], [], [], [], 0, True)

        def settle(chunk: list[Letter], number: int) -> bool:
            outcome.sent += chunk
            if down_at is not None and number >= down_at:
                outcome.untouched += chunk
                outcome.complete = False
                return False
            # the first batch: the chunk's first letter of each transaction_id (the others follow in later ones)
            first = first_round(chunk)
            named = {first[index].ident: field for index, field in (rejected or {}).items()} if number == 0 else {}
            # a first batch taken whole (its answer lost): its events are in Lago when it is sent again
            taken_whole = (
                number == 0
                and lost
                and not named
                and not any(letter.poison for letter in first)
                and (self.event_store == "clickhouse" or not any(letter.ident in self.lago for letter in first))
            )
            for letter in chunk:
                if letter.ident in named:
                    outcome.rejected.append((letter, json.dumps({named[letter.ident]: ["value_is_invalid"]})))
                elif letter.poison:
                    outcome.rejected.append((letter, POISON_REASON))
                else:
                    outcome.delivered.append(letter)
                    if self.event_store == "postgres" and (
                        letter.ident in self.lago or (taken_whole and letter in first)
                    ):
                        outcome.duplicates += 1
            return True

        # as the replay goes: letters holding no whole event are skipped, the others sent a chunk at a time; a chunk
        # Lago did not answer for in time ends it (the letters after it are not even read)
        chunk: list[Letter] = []
        number = 0
        for letter in chosen:
            if not letter.replayable:
                outcome.skipped.append(letter)
                continue
            chunk.append(letter)
            if len(chunk) == self.chunk:
                if not settle(chunk, number):
                    return outcome
                chunk, number = [], number + 1
        if chunk:
            settle(chunk, number)
        return outcome

    def apply(self, outcome: Outcome) -> None:
        for letter in outcome.delivered:
            del self.letters[letter.ident]
            self.lago.add(letter.ident)
        for letter, reason in outcome.rejected:
            letter.reason, letter.status, letter.code = reason, 422, "validation_errors"

    def unbilled(self, outcome: Outcome) -> set[Ident]:
        return {
            letter.ident
            for letter in outcome.delivered
            if letter.sub == "org_none" or (letter.moment is not None and letter.moment < PERIOD)
        }

    def check_report(self, report: dict[str, Any], outcome: Outcome) -> None:
        """The replay's JSON (or ReplayReport as a dict) says what the model predicts."""
        where = (self.where(), report)
        assert report["complete"] is outcome.complete, where
        assert report["sent"] == len(outcome.sent), where
        assert report["delivered"] == len(outcome.delivered), where
        assert report["duplicates"] == outcome.duplicates, where
        assert (report["unchanged"], report["gone"], report["unchecked"]) == (0, 0, 0), where
        rejected = {item["id"]: item["reason"] for item in report["rejected"]}
        assert rejected == {letter.key: reason for letter, reason in outcome.rejected}, where
        assert [item["id"] for item in report["skipped"]] == [letter.key for letter in outcome.skipped], where
        unbilled = {
            (item["event"]["transaction_id"], item["event"]["external_subscription_id"]) for item in report["unbilled"]
        }
        assert unbilled == self.unbilled(outcome), where

    def replay(self) -> None:
        """A replay (command or Python API) of some letters while Lago behaves as drawn."""
        rng = self.rng
        api = rng.random() < 0.3
        selection = self.selection()
        chosen = self.chosen(selection)
        mode = rng.choice(["accept", "accept", "reject", "5xx", "lost", "down", "partway", "partway"])
        sendable = [letter for letter in (chosen or []) if letter.replayable]
        rejected: dict[int, str] = {}
        down_at: int | None = None
        timeout = 60.0
        if mode == "reject" and sendable:
            first = first_round(sendable[: self.chunk])
            for index in rng.sample(range(len(first)), rng.randint(1, len(first))):
                rejected[index] = rng.choice(FIELDS)
            self.fake.inject_fault(422, count=1, path=BATCH_PATH, body=lago_422(rejected))  # type: ignore[attr-defined]
        elif mode == "5xx":
            status = rng.choice([500, 502, 503, 504])
            self.fake.inject_fault(status, count=rng.randint(1, 3), path=BATCH_PATH)  # type: ignore[attr-defined]
        elif mode == "lost":
            self.edge.lose_answer = True
        elif mode == "down":
            down_at, timeout = 0, 0.3
            fault = rng.choice([{"status": 503}, {"drop": True}, {"status": 401}])  # (down, or the key revoked)
            self.fake.inject_fault(path=BATCH_PATH, **fault)  # type: ignore[attr-defined]
        elif mode == "partway":
            chunks = (len(sendable) + self.chunk - 1) // self.chunk
            if chunks >= 2:
                down_at, timeout = rng.randrange(1, chunks), 1.0
                marker = sendable[down_at * self.chunk].ident

                async def outage(batch: list[dict[str, Any]]) -> None:
                    if any((event["transaction_id"], event["external_subscription_id"]) == marker for event in batch):
                        self.fake.inject_fault(503, path=BATCH_PATH)  # type: ignore[attr-defined]
                    else:
                        self.edge.before_batch = outage

                self.edge.before_batch = outage
            else:
                mode = "accept"
        outcome = (
            None if chosen is None else self.predict(chosen, rejected=rejected, down_at=down_at, lost=mode == "lost")
        )
        self.say(f"replay{' (api)' if api else ''} {selection.argv()} while Lago {mode} {rejected or ''}")
        try:
            if api:
                self.replay_in_process(selection, outcome, timeout)
            else:
                self.replay_command(selection, outcome, timeout)
        finally:
            self.fake.clear_faults()  # type: ignore[attr-defined]
            self.edge.before_batch = None
            self.edge.lose_answer = False
        if outcome is not None:
            self.apply(outcome)

    def replay_command(self, selection: Selection, outcome: Outcome | None, timeout: float) -> None:
        as_json = self.rng.random() < 0.7
        if outcome is not None and self.rng.random() < 0.3:  # the dry run: the listing with the same filters
            code, out, err = self.cli(*selection.argv(), "--json")
            assert code == 0, (self.where(), err)
            listed = [item["id"] for item in json.loads(out)]
            if outcome.complete:
                taken = {letter.key for letter in [*outcome.sent, *outcome.skipped]}
                assert sorted(listed) == sorted(taken), (self.where(), listed)
        argv = ["--replay", *selection.argv(), "--timeout", str(timeout), *(["--json"] if as_json else [])]
        code, out, err = self.cli(*argv)
        if outcome is None:
            assert code == 2 and "no such dead letter" in err, (self.where(), code, err)
            return
        assert code == outcome.exit_code, (self.where(), code, out, err)
        if as_json:
            self.check_report(json.loads(out), outcome)
        else:
            first = out.splitlines()[0]
            expected = (
                f"Replayed {len(outcome.sent)}: {len(outcome.delivered)} delivered ({outcome.duplicates} already in "
                f"Lago), {len(outcome.rejected)} rejected again."
            )
            assert first == expected, (self.where(), out)
            for letter, reason in outcome.rejected:
                assert f"  {letter.key}: rejected again (422): {reason}" in out.splitlines(), (self.where(), out)
            assert ("did not answer" in err) == (not outcome.complete), (self.where(), err)

    def replay_in_process(self, selection: Selection, outcome: Outcome | None, timeout: float) -> None:
        if outcome is None:  # an id that names no letter: a script finds it missing, and sends nothing
            assert selection.ids
            _, missing = _dead_letters.find_spool_dead_letters(str(self.path), selection.ids)
            assert missing, self.where()
            return
        by_key = {letter.key: letter for letter in self.letters.values()}

        async def run() -> _dead_letters.ReplayReport:
            letters: Any
            if selection.ids:
                letters, _ = _dead_letters.find_spool_dead_letters(str(self.path), selection.ids)
            else:
                letters = _dead_letters.read_spool_dead_letters(str(self.path))
            kept = (spooled for spooled in letters if selection.keeps(by_key[spooled.key]))
            return await _dead_letters.replay_spool_dead_letters(kept, self.settings, wait=timeout)

        self.check_report(report_as_json(anyio.run(run)), outcome)

    # ------------------------------------------------------------------------- purges

    def purge(self) -> None:
        selection = self.selection()
        chosen = self.chosen(selection)
        confirmed = self.rng.random() < 0.85
        as_json = self.rng.random() < 0.6
        self.say(f"purge {selection.argv()}{' --yes' if confirmed else ''}")
        argv = ["--purge", *selection.argv(), *(["--yes"] if confirmed else []), *(["--json"] if as_json else [])]
        code, out, err = self.cli(*argv)
        if chosen is None:
            assert code == 2 and "no such dead letter" in err, (self.where(), code, err)
            return
        if not chosen:
            assert code == 0, (self.where(), err)
            assert out.strip() == (
                json.dumps({"purged": 0}) if as_json else f"No dead letters to purge in {self.path}."
            )
            return
        if not confirmed:  # no terminal to ask on: nothing deleted
            assert code == 2 and "--yes" in err, (self.where(), code, err)
            if as_json:
                assert json.loads(out)["exit_code"] == 2
            return
        assert code == 0, (self.where(), err)
        said = json.loads(out) if as_json else out.strip()
        assert said == ({"purged": len(chosen)} if as_json else f"Purged {len(chosen)} dead letters of {self.path}.")
        for letter in chosen:
            del self.letters[letter.ident]

    # ------------------------------------------------------------------------- two at once

    def second_while_sending(self) -> None:
        """A replay of every letter; as its first batch reaches Lago, another replay or purge starts (another task,
        a thread, another process): it does nothing and says so (exit 1, JSON error); the first goes on."""
        kinds = ["task", "thread-purge", "thread-replay"]
        if self.subprocesses < 2:
            kinds.append("process")
        kind = self.rng.choice(kinds)
        chosen = self.ordered()
        outcome = self.predict(chosen, lost=False)
        said: list[Any] = []

        async def second(_batch: list[dict[str, Any]]) -> None:
            if kind == "task":
                with pytest.raises(_dead_letters.DeadLettersBusyError) as caught:
                    await _dead_letters.replay_spool_dead_letters(
                        _dead_letters.read_spool_dead_letters(str(self.path)), self.settings
                    )
                said.append(str(caught.value))
                return
            if kind == "process":
                process = self.child({"chunk": self.chunk}, "--replay", "--json")
                out, err = await anyio.to_thread.run_sync(process.communicate)
                said.append((process.returncode, out, err))
                return
            action = ["--purge", "--yes"] if kind == "thread-purge" else ["--replay"]
            argv = ["dead-letters", "--spool", str(self.path), *action, "--json"]
            code = await anyio.to_thread.run_sync(main, argv)
            out, err = self.capsys.readouterr()
            said.append((code, out, err))

        self.edge.before_batch = second
        self.say(f"replay, with a second one ({kind}) meanwhile")
        try:
            code, out, err = self.cli("--replay", "--json")
        finally:
            self.edge.before_batch = None
        if not outcome.sent:
            assert code == 0 and not said, self.where()
            return
        assert code == outcome.exit_code, (self.where(), code, err)
        self.check_report(json.loads(out), outcome)
        [answer] = said
        if kind == "task":
            assert "Nothing was sent" in answer, self.where()
        else:
            second_code, second_out, second_err = answer
            assert second_code == 1, (self.where(), answer)
            assert json.loads(second_out)["exit_code"] == 1 and "another dead-letters" in second_err, (
                self.where(),
                answer,
            )
        self.apply(outcome)

    def together(self) -> None:
        """Two replays of every letter started together (two tasks, or this process and another): one sends them,
        the other finds the spool busy or, once the first is done, only what is left; Lago gets each event once."""
        processes = self.subprocesses < 2 and self.rng.random() < 0.5
        chosen = self.ordered()
        outcome = self.predict(chosen, lost=False)
        self.say(f"two replays together ({'processes' if processes else 'tasks'})")
        reports: list[dict[str, Any]] = []
        busy = 0
        if processes:
            process = self.child({"chunk": self.chunk}, "--replay", "--json")
            code, out, _ = self.cli("--replay", "--json")
            child_out, _ = process.communicate()
            for run_code, run_out in ((code, out), (process.returncode, child_out)):
                answer = json.loads(run_out)
                if "error" in answer:
                    assert run_code == 1 and "another dead-letters" in answer["error"], (self.where(), answer)
                    busy += 1
                else:
                    assert run_code == (0 if answer["complete"] and not answer["rejected"] else 1), self.where()
                    reports.append(answer)
        else:

            async def run() -> None:
                async def one() -> None:
                    nonlocal busy
                    try:
                        report = await _dead_letters.replay_spool_dead_letters(
                            _dead_letters.read_spool_dead_letters(str(self.path)), self.settings
                        )
                    except _dead_letters.DeadLettersBusyError:
                        busy += 1
                    else:
                        reports.append(report_as_json(report))

                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(one)
                    tasks.start_soon(one)

            anyio.run(run)
        assert busy + len(reports) == 2 and busy <= 1, self.where()
        assert sum(report["delivered"] for report in reports) == len(outcome.delivered), (self.where(), reports)
        assert sum(report["gone"] for report in reports) == 0, (self.where(), reports)
        self.apply(outcome)

    def adopted_while_replaying(self) -> None:
        """A replay of every letter; as its first batch reaches Lago, a worker starts on the spool and adopts the slot
        files of the workers gone (their letters move to its own file, under new ids). No letter is lost nor sent
        twice: one whose file went away before its answer was written stays (``unchanged``: exit 1), and the next
        replay counts it as a duplicate."""
        if not any(":" in letter.key for letter in self.letters.values()):
            self.replay()
            return
        self.say("replay, a worker adopting the slot files meanwhile")

        async def adopt(_batch: list[dict[str, Any]]) -> None:
            async with LagoClient(self.settings, transport=self.fake.transport()) as client:
                worker = EventPipeline(client, spool_path=str(self.path), flush_interval=0.01)
                async with anyio.create_task_group() as tasks:
                    await tasks.start(worker.run)
                    await worker.aclose()

        self.edge.before_batch = adopt
        try:
            code, out, _ = self.cli("--replay", "--json")
        finally:
            self.edge.before_batch = None
        report = json.loads(out)
        assert code == (0 if report["complete"] and not report["rejected"] and not report["unchanged"] else 1), (
            self.where(),
            report,
        )
        assert not list(self.tmp_path.glob("spool.db.[0-9]")), self.where()  # adopted
        stored = self.stored_reasons()
        lago = set(in_lago(self.fake))
        delivered = 0
        for letter in self.ordered():
            if letter.ident not in stored:  # delivered
                assert not letter.poison and letter.ident in lago, (self.where(), letter)
                del self.letters[letter.ident]
                self.lago.add(letter.ident)
                delivered += 1
            elif letter.poison:
                assert stored[letter.ident] in (letter.reason, POISON_REASON), (self.where(), letter)
                letter.reason = stored[letter.ident]  # (rejected again, or left as it was: 422 either way)
            elif letter.replayable:  # left as it was (its answer not written): perhaps in Lago already
                assert stored[letter.ident] == letter.reason, (self.where(), letter)
                if letter.ident in lago and letter.ident not in self.lago:
                    self.lago.add(letter.ident)
                    self.limbo.add(letter.ident)
        assert report["delivered"] == delivered, (self.where(), report)

    # ------------------------------------------------------------------------- killed

    def killed(self) -> None:
        """A replay (or purge) in another process, SIGKILLed before a batch reaches Lago, once Lago took it, or
        after a purge's first chunk: what it settled is whole chunks, the rest is as it was, and nothing is lost."""
        chunk = self.rng.choice([1, 2, 3])
        freeze = self.rng.choice(["before", "after", "after", "purge"])
        selection = self.selection(allow_ids=False)
        chosen = self.chosen(selection)
        assert chosen is not None
        action = ["--purge", "--yes"] if freeze == "purge" else ["--replay"]
        nth = self.rng.randint(1, 3)  # the batch (or purged chunk) at which it is killed
        self.say(f"{action[0]} {selection.argv()} killed {freeze} #{nth} (chunk {chunk})")
        process = self.child({"chunk": chunk, "freeze": freeze, "nth": nth}, *action, *selection.argv(), "--json")
        try:
            assert process.stdout is not None
            marker = process.stdout.readline()
        finally:
            process.kill()
            _, err = process.communicate()
        assert marker.startswith(("FROZEN", "{", "[")), (self.where(), marker, err)
        if freeze == "purge":
            gone = [letter for letter in chosen if letter.ident not in self.stored_idents()]
            # the purge deleted whole chunks of the letters selected, first ones first
            assert gone == chosen[: len(gone)] and (len(gone) % chunk == 0 or gone == chosen), self.where()
            for letter in gone:
                del self.letters[letter.ident]
            return
        sendable = [letter for letter in chosen if letter.replayable]
        stored = self.stored_reasons()
        lago = set(in_lago(self.fake))
        chunks = [sendable[start : start + chunk] for start in range(0, len(sendable), chunk)]

        def settled(part: list[Letter]) -> bool:  # as a replay leaves it: poison letters rejected again, others gone
            return all(stored.get(letter.ident) == (POISON_REASON if letter.poison else None) for letter in part)

        # the chunks settled come first (one of poison letters already said so is both settled and as it was)
        done = 0
        while done < len(chunks) and settled(chunks[done]):
            done += 1
        for part in chunks[done:]:
            for letter in part:
                assert stored.get(letter.ident) == letter.reason, (self.where(), "changed, its chunk unsettled", letter)
        for part in chunks[:done]:
            for letter in part:
                if letter.poison:
                    letter.reason, letter.status, letter.code = POISON_REASON, 422, "validation_errors"
                else:
                    del self.letters[letter.ident]
                    self.lago.add(letter.ident)
        for part in chunks[done : done + 1]:  # the chunk in flight: Lago may have taken its events
            for letter in part:
                if letter.ident in lago and letter.ident not in self.lago:
                    self.lago.add(letter.ident)
                    self.limbo.add(letter.ident)

    def stored_idents(self) -> set[Ident]:
        return {ident_of(spooled) for spooled in _dead_letters.read_spool_dead_letters(str(self.path))}

    def stored_reasons(self) -> dict[Ident, str]:
        return {ident_of(s): s.letter.reason for s in _dead_letters.read_spool_dead_letters(str(self.path))}

    # ------------------------------------------------------------------------- a worker starts

    def reopen(self) -> None:
        """A worker starts on the spool: it adopts the slot files of workers gone, and lists every letter."""
        self.say("reopen")

        async def run() -> list[Any]:
            async with LagoClient(self.settings, transport=self.fake.transport()) as client:
                pipeline = EventPipeline(client, spool_path=str(self.path), flush_interval=0.01)
                async with anyio.create_task_group() as tasks:
                    await tasks.start(pipeline.run)
                    letters = pipeline.dead_letters()
                    await pipeline.aclose()
            return letters

        letters = anyio.run(run)
        assert len(letters) == len(self.letters), self.where()
        assert [path.name for path in self.tmp_path.glob("spool.db.[0-9]")] == [], self.where()  # adopted

    # ------------------------------------------------------------------------- the sequence

    def run(self) -> None:
        self.ingest()
        self.check()
        steps = {
            "ingest": 3,
            "list": 3,
            "summary": 2,
            "replay": 7,
            "purge": 2,
            "second": 1,
            "together": 1,
            "adopted": 1,
            "killed": 2,
            "reopen": 2,
        }
        names = list(steps)
        for _ in range(self.rng.randint(10, 14)):
            step = self.rng.choices(names, weights=[steps[name] for name in names])[0]
            if step in ("killed",) and self.subprocesses >= 2:
                step = "replay"
            if not self.letters and step != "reopen":
                step = "ingest"
            {
                "ingest": self.ingest,
                "list": self.listing,
                "summary": self.summary,
                "replay": self.replay,
                "purge": self.purge,
                "second": self.second_while_sending,
                "together": self.together,
                "adopted": self.adopted_while_replaying,
                "killed": self.killed,
                "reopen": self.reopen,
            }[step]()
            self.check()
        # in the end, Lago fixed: every replayable letter but the poison ones is delivered, once
        self.say("final replay")
        outcome = self.predict(self.ordered(), lost=False)
        code, out, err = self.cli("--replay", "--json")
        assert code == outcome.exit_code, (self.where(), err)
        self.check_report(json.loads(out), outcome)
        self.apply(outcome)
        self.check()
        self.reopen()
        self.check()
        assert not self.limbo, self.where()


def first_round(chunk: list[Letter]) -> list[Letter]:
    """The letters of a chunk the replay sends in its first batch: the first of each transaction_id."""
    seen: set[str] = set()
    first = []
    for letter in chunk:
        if letter.ident[0] not in seen:
            seen.add(letter.ident[0])
            first.append(letter)
    return first


def lago_422(named: dict[int, str]) -> dict[str, Any]:
    """Lago's answer to a batch some of whose events it rejects: 422, their errors by index."""
    details = {str(index): {field: ["value_is_invalid"]} for index, field in named.items()}
    return {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors", "error_details": details}


def report_as_json(report: _dead_letters.ReplayReport) -> dict[str, Any]:
    """A ReplayReport as the command's --json gives it."""
    return {
        "sent": report.sent,
        "complete": report.complete,
        "unchanged": report.unchanged,
        "gone": report.gone,
        "delivered": report.delivered,
        "duplicates": report.duplicates,
        "rejected": [{"id": s.key, "reason": s.letter.reason} for s in report.rejected],
        "skipped": [{"id": s.key} for s in report.skipped],
        "unbilled": [{"id": s.key, "event": s.letter.event} for s, _, _ in report.unbilled],
        "unchecked": report.unchecked,
    }


@pytest.mark.parametrize("seed", SEEDS)
def test_random_sequences_keep_each_dead_letter_stored_once_or_delivered_once(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every dead letter is, after every step of the seed, stored once with Lago's last answer, or in Lago once;
    purges remove exactly what their filters select; listings, summaries, replay reports and exit codes say what
    the model predicts."""
    world = World(seed, tmp_path, monkeypatch, capsys)
    with serve_in_thread(world.fake) as url:  # (for the children; this process reaches it in process)
        world.url = url
        monkeypatch.setenv("LAGO_API_URL", url)
        monkeypatch.setenv("LAGO_API_KEY", API_KEY)
        monkeypatch.setenv("LAGO_MAX_RETRIES", "0")
        monkeypatch.setenv("LAGO_RETRY_BACKOFF", "0.01")
        world.run()


# --------------------------------------------------------------------------------------------- the child


def _freeze(spec: dict[str, Any]) -> None:
    """(Child) Replay ``spec["chunk"]`` letters at a time, and block at the ``nth`` batch of events: ``before`` it
    is sent, ``after`` Lago answered it, or ``purge``: after the ``nth`` chunk deleted; printing ``FROZEN`` for the
    parent to SIGKILL it."""
    if "chunk" in spec:
        _dead_letters.CHUNK = spec["chunk"]
    freeze = spec.get("freeze")
    nth = spec.get("nth", 1)
    if freeze == "purge":
        delete = _dead_letters._delete
        calls = [0]

        def deleting(letters: list[Any], done: int) -> int:
            deleted = delete(letters, done)
            calls[0] += 1
            if calls[0] == nth:
                print("FROZEN after a chunk deleted", flush=True)
                threading.Event().wait()
            return deleted

        _dead_letters._delete = deleting  # type: ignore[assignment]
        return
    if freeze is None:
        return
    send = httpx.AsyncHTTPTransport.handle_async_request
    batches = [0]

    async def handle(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        batch = request.url.path.endswith("/events/batch")
        if batch:
            batches[0] += 1
            if batches[0] == nth and freeze == "before":
                print("FROZEN before a batch", flush=True)
                threading.Event().wait()
        response = await send(self, request)
        if batch and batches[0] == nth and freeze == "after":
            await response.aread()
            print("FROZEN after a batch", flush=True)
            threading.Event().wait()
        return response

    httpx.AsyncHTTPTransport.handle_async_request = handle  # type: ignore[method-assign]


if __name__ == "__main__":  # the child: <spec as JSON> dead-letters ...
    _freeze(json.loads(sys.argv[1]))
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main(sys.argv[2:]))


# --------------------------------------------------------------------------------------------- regression cases


def test_letters_sharing_a_transaction_id_replayed_together_both_reach_lago(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seed 4: a letter of org_b, then one of org_a with the same transaction_id (a later ingest, also rejected),
    replayed together on a Postgres store. Lago matches the rows a batch inserted back to its events by transaction_id
    alone, so it answered the second ``value_already_exist``; the replay counted it a duplicate and deleted its letter,
    although Lago never stored it ("Replayed 2: 2 delivered (1 already in Lago)"): the event was lost. Now letters
    sharing a transaction_id go in separate batches: both are stored, neither is a duplicate."""
    fake = new_lago("postgres")
    path = tmp_path / "spool.db"
    shared = [
        event_payload(transaction_id="req_1", external_subscription_id=org, code="api_call", timestamp=1772900000 + n)
        for n, org in enumerate(("org_b", "org_a"))
    ]

    async def ingest(event: dict[str, Any]) -> None:  # each rejected by a 422 naming it, in a batch of its own
        fake.inject_fault(422, count=1, path=BATCH_PATH, body=lago_422({0: "properties"}))  # type: ignore[attr-defined]
        async with LagoClient(BillingSettings(api_key=API_KEY), transport=fake.transport()) as client:
            pipeline = EventPipeline(client, spool_path=str(path), flush_interval=0.01)
            async with anyio.create_task_group() as tasks:
                await tasks.start(pipeline.run)
                pipeline.submit(event)
                assert await pipeline.flush(20)
                await pipeline.aclose()

    for event in shared:
        anyio.run(ingest, event)
    monkeypatch.setattr(_dead_letters, "LagoClient", lambda settings: LagoClient(settings, transport=fake.transport()))
    monkeypatch.setenv("LAGO_API_KEY", API_KEY)
    assert main(["dead-letters", "--spool", str(path), "--replay", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["sent"], report["delivered"], report["duplicates"]) == (2, 2, 0), report
    assert sorted(in_lago(fake)) == [("req_1", "org_a"), ("req_1", "org_b")]
    assert list(_dead_letters.read_spool_dead_letters(str(path))) == []
