"""The last bad inputs accepted at construction (or at a call of the pipeline's public API).

Covers: ``OrgBillingMiddleware(quota=...)`` given a gate object without the ``run``, ``settle`` or ``aclose`` the
middleware calls (it built, then failed at the first request: "could not start its background delivery:
AttributeError 'run'"); ``EventPipeline.flush(timeout)`` / ``aclose(timeout)`` given a string, NaN, a negative number
or a bool (a ``TypeError`` from anyio, or a pipeline half closed by the refused call); ``QuotaGate(settings, client,
backend=...)`` given no client or a backend that is not one (accepted, then failing in the background at the first
refresh). Test doubles from ``unittest.mock`` stay accepted everywhere.
"""

from __future__ import annotations

import math
from typing import Any
from unittest import mock

import anyio
import pytest

from lago_org_billing import BillingSettings, ConfigurationError, EventPipeline, LagoClient, OrgBillingMiddleware
from lago_org_billing._events import event_payload
from lago_org_billing._gate import QuotaDecision
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._quota_local import LocalBackend
from lago_org_billing.testing import FakeLago

SETTINGS = BillingSettings(api_key="key", api_url="http://127.0.0.1:9", quota_mode="off")


async def _app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called
    pass


# ------------------------------------------------------------------ 1. the middleware's gate: what it calls


class _Gate:
    """A whole gate (what the middleware calls: run, check, settle, aclose)."""

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def check(self, org_id: str) -> QuotaDecision:
        return QuotaDecision()

    def settle(self, org_id: str, decision: QuotaDecision, *, tokens: int, billed: bool) -> None:
        pass

    async def aclose(self) -> None:
        pass


def _gate_without(*names: str) -> Any:
    methods = {name: getattr(_Gate, name) for name in ("run", "check", "settle", "aclose") if name not in names}
    return type("PartialGate", (), methods)()


@pytest.mark.parametrize("missing", [("run",), ("settle",), ("aclose",), ("run", "settle", "aclose")])
def test_a_gate_without_what_the_middleware_calls_is_refused_naming_it(missing: tuple[str, ...]) -> None:
    with pytest.raises(ConfigurationError, match=r"quota=") as caught:
        OrgBillingMiddleware(_app, settings=SETTINGS, quota=_gate_without(*missing))
    for name in missing:
        assert name in str(caught.value)


def test_a_gate_whose_method_is_not_callable_is_refused() -> None:
    gate = _Gate()
    gate.settle = None  # type: ignore[assignment,method-assign]
    with pytest.raises(ConfigurationError, match="settle"):
        OrgBillingMiddleware(_app, settings=SETTINGS, quota=gate)  # type: ignore[arg-type]


def test_whole_gates_and_gate_doubles_are_accepted() -> None:
    for gate in (
        _Gate(),
        mock.AsyncMock(),
        mock.MagicMock(),
        mock.AsyncMock(spec=QuotaGate),
        mock.create_autospec(QuotaGate, instance=True),
    ):
        middleware = OrgBillingMiddleware(_app, settings=SETTINGS, quota=gate)
        assert middleware.quota is gate


# ------------------------------------------------------------------ 2. the pipeline's timeouts


def _pipeline(fake: FakeLago) -> EventPipeline:
    settings = BillingSettings(api_key="k", api_url=fake.base_url, retry_backoff=0.001)
    return EventPipeline(LagoClient(settings, transport=fake.transport()), flush_interval=0)


def _event(transaction_id: str) -> dict[str, Any]:
    return event_payload(transaction_id=transaction_id, external_subscription_id="org_1", code="api_call")


BAD_TIMEOUTS = ["5", math.nan, -1, -0.5, True, b"5", [1]]


@pytest.mark.anyio
@pytest.mark.parametrize("seconds", BAD_TIMEOUTS, ids=repr)
async def test_flush_with_a_bad_timeout_is_refused_and_delivery_goes_on(seconds: Any) -> None:
    fake = FakeLago(api_key="k")
    pipeline = _pipeline(fake)
    async with anyio.create_task_group() as tasks:
        await tasks.start(pipeline.run)
        pipeline.submit(_event("tx1"))
        with pytest.raises(ConfigurationError, match=r"flush\(timeout"):
            await pipeline.flush(seconds)
        assert await pipeline.flush(None)
        await pipeline.aclose()
    assert [event["transaction_id"] for event in fake.events] == ["tx1"]


@pytest.mark.anyio
@pytest.mark.parametrize("seconds", BAD_TIMEOUTS, ids=repr)
async def test_aclose_with_a_bad_timeout_is_refused_before_anything_is_closed(seconds: Any) -> None:
    fake = FakeLago(api_key="k")
    pipeline = _pipeline(fake)
    async with anyio.create_task_group() as tasks:
        await tasks.start(pipeline.run)
        with pytest.raises(ConfigurationError, match=r"aclose\(timeout"):
            await pipeline.aclose(seconds)
        assert not pipeline.closed
        assert pipeline.submit(_event("tx1"))  # still accepting
        await pipeline.aclose()
    assert pipeline.closed
    assert [event["transaction_id"] for event in fake.events] == ["tx1"]


@pytest.mark.anyio
async def test_aclose_with_a_bad_timeout_on_a_pipeline_never_run_is_refused() -> None:
    pipeline = _pipeline(FakeLago(api_key="k"))
    with pytest.raises(ConfigurationError, match=r"aclose\(timeout"):
        await pipeline.aclose("5")  # type: ignore[arg-type]
    assert not pipeline.closed
    await pipeline.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("seconds", [None, 0, 0.0, 2, 1.5, math.inf])
async def test_good_timeouts_still_accepted(seconds: Any) -> None:
    fake = FakeLago(api_key="k")
    pipeline = _pipeline(fake)
    async with anyio.create_task_group() as tasks:
        await tasks.start(pipeline.run)
        pipeline.submit(_event("tx1"))
        await pipeline.flush(seconds)
        await pipeline.aclose(seconds if seconds != 0 else None)
    assert [event["transaction_id"] for event in fake.events] == ["tx1"]


# ------------------------------------------------------------------ 3. QuotaGate's client and backend


@pytest.mark.parametrize("client", [None, "http://lago", SETTINGS, object()], ids=["None", "url", "settings", "object"])
def test_a_quota_gate_without_a_client_is_refused(client: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"QuotaGate\(client\)"):
        QuotaGate(SETTINGS, client, config=QuotaConfig())


@pytest.mark.parametrize("backend", ["x", "redis", object(), LocalBackend], ids=["x", "redis", "object", "class"])
def test_a_quota_gate_with_a_wrong_backend_is_refused(backend: Any) -> None:
    client = LagoClient(SETTINGS)
    with pytest.raises(ConfigurationError, match=r"QuotaGate\(backend=\.\.\.\)"):
        QuotaGate(SETTINGS, client, backend=backend, config=QuotaConfig())


def test_a_backend_missing_methods_is_refused_naming_them() -> None:
    class Partial:
        async def reserve(self, *args: Any) -> Any: ...

        def settle(self, *args: Any, **kwargs: Any) -> None: ...

    with pytest.raises(ConfigurationError, match="try_lock") as caught:
        QuotaGate(SETTINGS, LagoClient(SETTINGS), backend=Partial(), config=QuotaConfig())  # type: ignore[arg-type]
    assert "reserve" not in str(caught.value).split("lacks")[-1]


def test_quota_gate_clients_and_backends_that_work_are_accepted() -> None:
    class StandIn:  # what tests stand in for Lago: the two reads a gate makes
        async def get_subscription(self, external_id: str, **options: Any) -> dict[str, Any]:
            return {}

        async def get_current_usage(self, customer: str, subscription: str, **options: Any) -> dict[str, Any]:
            return {}

    config = QuotaConfig()
    for client in (LagoClient(SETTINGS), StandIn(), mock.AsyncMock(), mock.AsyncMock(spec=LagoClient)):
        QuotaGate(SETTINGS, client, config=config)  # type: ignore[arg-type]
    for backend in (LocalBackend(config), mock.AsyncMock(), mock.MagicMock()):
        gate = QuotaGate(SETTINGS, LagoClient(SETTINGS), backend=backend, config=config)
        assert gate.backend is backend


# ------------------------------------------------------------------ 4. computed defaults on a copy
