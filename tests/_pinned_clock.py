"""The settable clock the emulator tests run on, pinned at 2026-03-15 12:00 UTC."""

from __future__ import annotations

from datetime import datetime, timezone

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=timezone.utc)


class Clock:
    """A settable clock for the emulator."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now
