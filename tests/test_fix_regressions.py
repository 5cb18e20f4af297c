"""Regressions found re-reviewing this release's fixes: calls billed to an org the app's auth set late count against
its quota (and are not "ungated" without a gate), issuer lists on the oldest PyJWT supported, async resolver results
schedulable as tasks, delivery restarting after its background work failed, events holding a lone surrogate."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
from starlette.requests import Request

from _lifespan import background_failed, serving_lifespan
from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._identity import from_jwt_claim

pytestmark = pytest.mark.anyio


# the identity tests' fixtures and helpers (emulator with org_a and org_b, middleware factory, warnings reset)
from test_identity_edges import (  # noqa: E402
    _reset_identity_warnings,  # noqa: F401 - an autouse fixture
    billed,
    client_for,
    make_middleware,  # noqa: F401 - a fixture
    settings,  # noqa: F401 - a fixture
)

# --------------------------------------------------------------------------- the late org's quota (0591495)


async def test_calls_reattributed_to_the_late_org_count_against_its_quota(
    fake_lago: Any,
    settings: BillingSettings,  # noqa: F811 - the imported fixture
    make_middleware: Callable[..., OrgBillingMiddleware],  # noqa: F811 - the imported fixture
) -> None:
    """``org_b`` may make 2 calls. Its client makes 3, authenticated as ``org_b`` by a FastAPI dependency each time;
    the second one carries ``X-Org-Id: org_a`` (another org's id, or a stale one). All three are billed to ``org_b``
    (the late org wins, as 0591495 wants), but the reattributed call is counted against ``org_b``'s quota nowhere:
    ``_authenticated_late`` releases ``org_a``'s reservation and returns no decision, so ``_record`` settles nothing
    for ``org_b`` (no recorded call, no tokens). The third call is let through, a fourth, a fifth... as long as the
    snapshot is cached: sending any other org's id in the header lifts an org's quota. (An org that is only known
    after the app ran is counted: ``_settle_unresolved`` records it with ``QuotaDecision()``.)

    Observed: the third call 200. Expected: 429 (``org_b`` was billed 2 calls, its limit)."""
    fastapi = pytest.importorskip("fastapi")

    def authenticate(request: Request) -> None:
        request.state.org_id = "org_b"  # the caller's verified org

    app = fastapi.FastAPI()

    @app.get("/v1/work", dependencies=[fastapi.Depends(authenticate)])
    async def work() -> dict[str, Any]:
        return {"ok": True}

    strict = settings.replace(
        org_header="X-Org-Id",
        quota_mode="enforce",
        plan_limits={"starter": {"max_api_calls": 2}},
        usage_cache_ttl=3600,  # no refresh from Lago during the test: what the gate counts itself decides
    )
    middleware = make_middleware(app, settings=strict)
    async with client_for(middleware) as client:
        first = await client.get("/v1/work", headers={"X-Org-Id": "org_b"})
        second = await client.get("/v1/work", headers={"X-Org-Id": "org_a"})  # reattributed to org_b
        assert (first.status_code, second.status_code) == (200, 200)
        assert await middleware.pipeline.flush(5)
        assert billed(fake_lago) == ["org_b", "org_b"]
        third = await client.get("/v1/work", headers={"X-Org-Id": "org_b"})
    assert third.status_code == 429


# ------------------------------------------------------------------ from_jwt_claim(issuer=[...]) (0591495)


def test_jwt_issuer_list_works_with_the_lowest_supported_pyjwt(monkeypatch: pytest.MonkeyPatch) -> None:
    """``pyproject.toml`` supports ``pyjwt>=2.8``; 0591495 lets ``issuer`` be a list and hands PyJWT a tuple. PyJWT
    2.8.0 compares ``payload["iss"] != issuer`` (lists of issuers came with PyJWT 2.9, jpadilla/pyjwt#913, and as
    ``list`` only until 2.10): every token is rejected as "Invalid issuer", logged at DEBUG, and every request is
    unresolved - the very failure 0591495 set out to refuse at configuration time. (Checked with a real PyJWT 2.8.0
    install: ``issuer="https://a"`` resolves the org, ``issuer=["https://a", "https://b"]`` resolves None.)

    PyJWT 2.8.0's ``_validate_iss`` is put in place here, verbatim, as the installed PyJWT is newer.

    Observed: None. Expected: the org (or a ConfigurationError at configuration saying lists need PyJWT >= 2.10)."""

    def validate_iss_2_8_0(self: Any, payload: dict[str, Any], issuer: Any) -> None:  # PyJWT 2.8.0, verbatim
        if issuer is None:
            return

        if "iss" not in payload:
            raise jwt.exceptions.MissingRequiredClaimError("iss")

        if payload["iss"] != issuer:
            raise jwt.exceptions.InvalidIssuerError("Invalid issuer")

    monkeypatch.setattr(jwt.api_jwt.PyJWT, "_validate_iss", validate_iss_2_8_0)
    secret = "a-long-enough-hmac-secret-for-hs256-0123456789"
    token = jwt.encode({"org_id": "acme", "iss": "https://a.example"}, secret, algorithm="HS256")
    scope = {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]}
    single = from_jwt_claim("org_id", key=secret, issuer="https://a.example")
    assert single(scope) == "acme"  # (the emulated PyJWT takes one issuer)
    try:
        several = from_jwt_claim("org_id", key=secret, issuer=["https://a.example", "https://b.example"])
    except Exception as exc:  # refused up front is fine too
        assert "issuer" in str(exc)
        return
    assert several(scope) == "acme"


async def test_a_reattributed_request_is_not_counted_ungated_when_there_is_no_gate(
    fake_lago: Any,
    settings: BillingSettings,  # noqa: F811 - the imported fixture
    make_middleware: Callable[..., OrgBillingMiddleware],  # noqa: F811 - the imported fixture
) -> None:
    """With gating off (``quota=None``, ``LAGO_QUOTA_MODE=off``) there is no quota to check, and an org known only
    after the app ran is not counted ``ungated`` (``_settle_unresolved`` checks ``self.quota is not None``). A
    request reattributed by ``_authenticated_late`` is, unconditionally: ``requests_ungated_total`` climbs and the
    WARNING "its quota could not be checked ... add require_quota" is logged for an app that has no quota at all.

    Observed: stats["ungated"] == 1. Expected: 0 (``stats["reattributed"]`` says what happened)."""
    fastapi = pytest.importorskip("fastapi")

    def authenticate(request: Request) -> None:
        request.state.org_id = "org_b"

    app = fastapi.FastAPI()

    @app.get("/v1/work", dependencies=[fastapi.Depends(authenticate)])
    async def work() -> dict[str, Any]:
        return {"ok": True}

    middleware = make_middleware(app, settings=settings.replace(org_header="X-Org-Id"), quota=None)
    async with client_for(middleware) as client:
        response = await client.get("/v1/work", headers={"X-Org-Id": "org_a"})
    assert response.status_code == 200
    assert await middleware.pipeline.flush(5)
    assert billed(fake_lago) == ["org_b"] and middleware.stats.get("reattributed") == 1
    assert middleware.stats["ungated"] == 0


# ------------------------------------------------------------------------------- _Pending (0591495)


async def test_first_of_with_an_async_resolver_can_still_be_scheduled_as_a_task() -> None:
    """``first_of`` is public; holding an async resolver it returned a coroutine (``resume(...)``) before 0591495, so
    ``asyncio.create_task(resolver(scope))``, ``asyncio.run(...)``, anyio's and trio's ``start_soon`` took it. It now
    returns ``_Pending``, an awaitable that is not a coroutine: all of those raise ``TypeError: a coroutine was
    expected`` (``await`` and ``asyncio.ensure_future`` still work).

    Observed: TypeError. Expected: the org (``_Pending`` can be a ``collections.abc.Coroutine``: ``send``/``throw``
    delegating to the coroutine it starts, ``close`` as now)."""
    import asyncio

    from lago_org_billing import first_of
    from lago_org_billing._identity import from_state

    async def lookup(scope: Any) -> str:
        return "org_a"

    resolver = first_of(from_state(), lookup)
    task = asyncio.create_task(resolver({"type": "http", "headers": [], "state": {}}))  # type: ignore[arg-type]
    assert await task == "org_a"


# ----------------------------------------------------------------- an event JSON can carry but UTF-8 cannot


@pytest.mark.parametrize("store", ["spool", "memory"])
async def test_an_event_with_a_lone_surrogate_neither_loses_nor_blocks_the_others(tmp_path: Any, store: str) -> None:
    """An event whose property holds a lone surrogate - what ``json.loads`` makes of the valid JSON escape
    ``"\\ud800"`` in a client's body, which an app then records (``OrgBilling.record_usage_nowait(properties=...)``,
    an ``event_properties`` hook): ``event_payload`` accepts it, ``dumps_event`` encodes it (``ensure_ascii=False``
    keeps the surrogate), and the failure comes later, as a ``UnicodeEncodeError`` (a ``ValueError``) outside the
    places that expect ``TypeError``/``ValueError`` from encoding:

    * spool: ``sqlite3`` binding the text in ``_SpoolFile.write`` raises it; ``SqliteOutbox._commit`` catches only
      ``sqlite3.Error``, so the whole group commit (every event of the window, good ones too) is dropped - not in
      the spool, not in Lago, not counted - and ``EventPipeline.run`` dies (with 1be6b9e the app serves on with no
      delivery at all);
    * memory: ``_post`` encodes the batch body (``.encode()``) after its ``try``: "Unexpected error" and the same
      batch is retried forever, never dead-lettered, the good events with it.

    Observed: spool - run() raises UnicodeEncodeError, 0 of 3 good events in Lago or on disk; memory - flush never
    completes. Expected: the 3 good events delivered, the bad one a dead letter (``invalid_event``)."""
    import sqlite3

    import anyio

    from lago_org_billing._delivery import EventPipeline
    from lago_org_billing._errors import InvalidRequestError
    from lago_org_billing._events import event_payload
    from test_delivery import events, make_client, make_fake, transaction_ids

    fake = make_fake()
    good = events(3)
    with pytest.raises(InvalidRequestError, match="lone surrogate"):  # refused where events are made
        event_payload(
            transaction_id="bad", external_subscription_id="org_1", code="api_call", properties={"feature": "x\ud800"}
        )
    bad = {**good[0], "transaction_id": "bad", "properties": {"feature": "x\ud800"}}  # one made by hand
    path = tmp_path / "spool.db"
    crashed: BaseException | None = None
    flushed = False
    async with make_client(fake.transport()) as client:
        pipeline = EventPipeline(
            client,
            spool_path=str(path) if store == "spool" else None,
            flush_interval=0.0,
            retry_backoff=0.001,
            max_backoff=0.01,
        )
        try:
            async with anyio.create_task_group() as tasks:
                await tasks.start(pipeline.run)
                for event in (good[0], bad, good[1], good[2]):
                    assert pipeline.submit(event)
                flushed = await pipeline.flush(3)  # (a guard: with nothing wrong this takes milliseconds)
                await pipeline.aclose(timeout=0.5)
        except Exception as exc:  # what run() raised, reported below
            crashed = exc
    assert crashed is None, f"the delivery task died: {crashed!r}"
    assert sorted(transaction_ids(fake)) == sorted(event["transaction_id"] for event in good)
    assert flushed
    if store == "spool":
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0] == 1
        finally:
            conn.close()
    else:
        assert [letter.code for letter in pipeline.dead_letters()] == ["invalid_event"]


# ------------------------------------------------------------------------- background errors (1be6b9e)


async def test_delivery_resumes_after_the_background_work_failed_once(
    fake_lago: Any,
    settings: BillingSettings,  # noqa: F811 - the imported fixture
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before 1be6b9e an error escaping the background work (e.g. the UnicodeEncodeError above) ended the lifespan
    task; its ``finally`` set ``_running = False``, so the next request started delivery again (lazily, as without a
    lifespan). 1be6b9e logs the error in ``_background`` and returns, but ``_running`` stays True: nothing ever
    starts the pipeline again. Every request billed after it is accepted into an outbox nobody drains - in memory
    (up to ``memory_capacity``, then dropped) and lost at shutdown (``aclose`` of a pipeline not running discards
    it), or in a spool's pending list, never written before shutdown (contrary to the log: "with LAGO_SPOOL_PATH
    they wait on disk for the next start").

    Observed: the request's event never reaches Lago; at shutdown it is counted lost. Expected: delivery runs again
    (restarted by ``_background`` after a backoff, or lazily by the next request as before)."""
    import contextlib
    import logging

    import anyio
    import anyio.lowlevel
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from lago_org_billing import EventPipeline, LagoClient

    crash = anyio.Event()
    runs: list[int] = []

    class FailsOnce(EventPipeline):
        async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            runs.append(1)
            if len(runs) == 1:  # a bug in the first run, once started
                task_status.started()
                await crash.wait()
                raise RuntimeError("a bug in the delivery loop")
            await super().run(task_status=task_status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi")

    app = Starlette(routes=[Route("/hello", hello)], lifespan=lifespan)
    client = LagoClient(settings, transport=fake_lago.transport())
    pipeline = FailsOnce(client, flush_interval=0.0)
    middleware = OrgBillingMiddleware(app, settings.replace(org_header="X-Org-Id"), pipeline=pipeline, quota=None)
    delivered_while_serving = False
    async with client, serving_lifespan(middleware):
        with caplog.at_level(logging.ERROR, logger="lago_org_billing.middleware"):
            crash.set()
            await background_failed(middleware)
        async with client_for(middleware) as http:
            response = await http.get("/hello", headers={"X-Org-Id": "org_a"})
        assert response.status_code == 200
        with anyio.move_on_after(5):  # a guard: a running pipeline delivers this within milliseconds
            while not fake_lago.events:  # noqa: ASYNC110 - polled: delivered by a background task, or never
                await anyio.sleep(0.01)
        delivered_while_serving = bool(fake_lago.events)
    assert (delivered_while_serving, billed(fake_lago), pipeline.stats["lost_at_shutdown"]) == (True, ["org_a"], 0)
