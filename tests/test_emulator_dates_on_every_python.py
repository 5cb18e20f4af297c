"""The emulator reads the ISO 8601 times Lago accepts alike on every Python this package supports (3.10 to 3.13).

``datetime.fromisoformat`` reads less on 3.10: a fraction of other than 3 or 6 digits, the basic format
(``20260301T120000Z``). The emulator then took such a ``timestamp`` (or ``subscription_at``...) for unreadable on 3.10
only, where Lago takes it.
"""

from __future__ import annotations

import datetime as dt

import pytest

from lago_org_billing.testing._util import parse_datetime, written_date

UTC = dt.timezone.utc


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-01T12:00:00Z", dt.datetime(2026, 3, 1, 12, tzinfo=UTC)),
        ("2026-03-01T12:00:00.5Z", dt.datetime(2026, 3, 1, 12, 0, 0, 500_000, tzinfo=UTC)),
        ("2026-03-01T12:00:00.12Z", dt.datetime(2026, 3, 1, 12, 0, 0, 120_000, tzinfo=UTC)),
        ("2026-03-01T12:00:00.1234567Z", dt.datetime(2026, 3, 1, 12, 0, 0, 123_456, tzinfo=UTC)),
        ("2026-03-01T12:00:00,25+01:00", dt.datetime(2026, 3, 1, 11, 0, 0, 250_000, tzinfo=UTC)),
        ("20260301T120000Z", dt.datetime(2026, 3, 1, 12, tzinfo=UTC)),
        ("20260301T120000.5+0530", dt.datetime(2026, 3, 1, 6, 30, 0, 500_000, tzinfo=UTC)),
        ("2026-03-01", dt.datetime(2026, 3, 1, tzinfo=UTC)),
    ],
)
def test_times_lago_accepts_are_read_on_every_python(text: str, expected: dt.datetime) -> None:
    assert parse_datetime(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "2026-13-01T00:00:00Z",
        "2026-03-01T25:00:00Z",
        "yesterday",
        # other scripts' digits (fullwidth, Arabic-Indic), which fromisoformat refuses: the fallback read them as the
        # digits they stand for
        "\uff12\uff10\uff12\uff16-03-01T12:00:00.1234567Z",
        "2026-03-01T12:00:00.\u0661\u0662\u0663\u0664\u0665\u0666\u0667Z",
    ],
)
def test_what_is_no_time_stays_unreadable(text: str) -> None:
    assert parse_datetime(text) is None


@pytest.mark.parametrize("text", ["2026-03-16T01:00:00.5+05:00", "20260316T010000+0500", "2026-03-16T01:00:00+05:00"])
def test_the_date_as_written_is_read_on_every_python(text: str) -> None:
    """The day in the value's own offset (16 March, although 15 March in UTC), not an error on 3.10."""
    assert written_date(text) == dt.date(2026, 3, 16)
