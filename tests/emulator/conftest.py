from __future__ import annotations

import pytest

from _pinned_clock import NOW, Clock


@pytest.fixture
def clock() -> Clock:
    """Pinned at 2026-03-15 12:00 UTC."""
    return Clock(NOW)
