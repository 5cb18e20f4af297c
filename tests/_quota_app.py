"""Quota test helpers: a seeded Lago emulator, a settable clock, and the app uvicorn serves in the
multi-worker test (``uvicorn tests._quota_app:app --workers 4``, settings from ``LAGO_*``, org from
``X-Org-Id``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing.testing import FakeLago

START = dt.datetime(2026, 3, 10, 12, 0, tzinfo=dt.timezone.utc)
TOKENS = 10


class Clock:
    """A settable clock shared by the gate (``.time()``, Unix seconds) and the emulator (``.now()``)."""

    def __init__(self, start: dt.datetime = START) -> None:
        self.at = start

    def now(self) -> dt.datetime:
        return self.at

    def time(self) -> float:
        return self.at.timestamp()

    def advance(self, seconds: float) -> None:
        self.at += dt.timedelta(seconds=seconds)


def seed(fake: FakeLago, *, starter_calls: int | None = 300, starter_tokens: int | None = None) -> FakeLago:
    """``api_call`` summing ``total_tokens``; feature ``api_quota``; plans ``starter`` (the given limits),
    ``pro`` (10,000 calls) and ``legacy`` (no entitlements); org ``org_1`` on ``starter``."""
    fake.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake.add_feature(
        "api_quota",
        privileges=[
            {"code": "max_api_calls", "value_type": "integer"},
            {"code": "max_tokens", "value_type": "integer"},
        ],
    )
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0"}}
    starter: dict[str, Any] = {}
    if starter_calls is not None:
        starter["max_api_calls"] = starter_calls
    if starter_tokens is not None:
        starter["max_tokens"] = starter_tokens
    fake.add_plan("starter", amount_cents=1_000, charges=[charge], entitlements={"api_quota": starter})
    fake.add_plan("pro", amount_cents=10_000, charges=[charge], entitlements={"api_quota": {"max_api_calls": 10_000}})
    fake.add_plan("legacy", amount_cents=500, charges=[charge])
    fake.add_customer("org_1")
    fake.add_subscription("org_1", "starter")
    return fake


async def chat(request: Request) -> Response:
    total = TOKENS
    return JSONResponse(
        {
            "ok": True,
            "usage": {"prompt_tokens": total // 2, "completion_tokens": total - total // 2, "total_tokens": total},
        }
    )


def build() -> Any:
    from lago_org_billing import OrgBillingMiddleware

    return OrgBillingMiddleware(Starlette(routes=[Route("/v1/chat", chat, methods=["GET", "POST"])]))


def __getattr__(name: str) -> Any:
    if name == "app":  # built on import by uvicorn only: the tests import this module for its helpers
        return build()
    raise AttributeError(name)
