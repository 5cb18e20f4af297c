"""Found re-reviewing the latest fixes: the background work started again where it ran after a failure (trio, a
lifespan, no lifespan), events written as text with a lone surrogate dead-lettered, a cancelled resolver task closing
what it holds, metadata filters of booleans and None, a 429 retried for a subscription with plan overrides, URLs
refused without their password, a Redis port 0 refused."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from _lifespan import background_failed, serving_lifespan
from lago_org_billing import (
    BillingSettings,
    ConfigurationError,
    EventPipeline,
    LagoClient,
    OrgBillingMiddleware,
)

pytestmark = pytest.mark.anyio


def _settings_for(fake_lago: Any, **changes: Any) -> BillingSettings:
    """The emulator with org ``org_a`` subscribed to a plan billing ``api_call``."""
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake_lago.add_plan(
        "starter",
        amount_cents=1000,
        charges=[{"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "1"}}],
    )
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    return BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001, **changes)


def _hello_app(**kwargs: Any) -> Starlette:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi")

    return Starlette(routes=[Route("/hello", hello)], **kwargs)


def _http_scope(path: str = "/hello", org: str = "org_a") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"x-org-id", org.encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }


async def _call(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    """Run one plain GET through ``app`` (no body); the messages it sent."""
    sent: list[dict[str, Any]] = []
    request_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


# ------------------------------------------------------------- _background resetting _running (9618927)


class _FailsOnce(EventPipeline):
    """A pipeline whose first run fails once started (a bug in the delivery loop), when ``crash`` is set."""

    crash: anyio.Event
    runs: int = 0

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        type(self).runs += 1
        if type(self).runs == 1:
            task_status.started()
            await self.crash.wait()
            raise RuntimeError("a bug in the delivery loop")
        await super().run(task_status=task_status)


async def _lifespan_crash_then_request(fake_lago: Any, caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """A lifespan app whose background work fails once started; the statuses of a request before and after."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield

    settings = _settings_for(fake_lago, org_header="X-Org-Id")
    client = LagoClient(settings, transport=fake_lago.transport())
    pipeline_class = type("FailsOnce", (_FailsOnce,), {"crash": anyio.Event(), "runs": 0})
    pipeline = pipeline_class(client, flush_interval=0.0)
    middleware = OrgBillingMiddleware(_hello_app(lifespan=lifespan), settings, pipeline=pipeline, quota=None)
    middleware.restart_delay = 0.01  # (the backoff is not what is tested)
    async with client, serving_lifespan(middleware):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            before = await http.get("/hello", headers={"X-Org-Id": "org_a"})
            with caplog.at_level(logging.WARNING, logger="lago_org_billing.middleware"):
                pipeline_class.crash.set()
                await background_failed(middleware)
                try:
                    after = (await http.get("/hello", headers={"X-Org-Id": "org_a"})).status_code
                except ConfigurationError:
                    after = 500  # what the server answers to an app raising
    return before.status_code, after


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_app_keeps_serving_after_its_background_work_failed(
    fake_lago: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """9618927 sets ``_running = False`` when the background work fails, so that the next request "starts it again
    (lazily)". The lazy start is asyncio-only (``asyncio.get_running_loop()``): under trio (anyio's trio backend,
    e.g. hypercorn ``-k trio``), with a lifespan that started delivery fine, every request after the failure raises
    ``ConfigurationError: OrgBillingMiddleware needs the ASGI lifespan to run its background delivery outside
    asyncio`` - the whole API answers 500, and the message blames a lifespan that is there. Before 9618927 the app
    served on (undelivered events, logged).

    Observed: (200, 500). Expected: (200, 200) - restart delivery inside the lifespan's own task group instead."""
    assert await _lifespan_crash_then_request(fake_lago, caplog) == (200, 200)


async def test_restart_after_a_background_failure_under_a_lifespan_does_not_say_there_is_no_lifespan(
    fake_lago: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Under asyncio the restart goes through ``_start_lazily``, the path for servers that sent no lifespan, which
    logs (once) the WARNING "OrgBillingMiddleware got no ASGI lifespan (is its app mounted in another? ...): add the
    middleware to the outermost app, call its aclose() ... or set LAGO_SPOOL_PATH". The app has a lifespan, the
    middleware is outermost: the operator is sent to fix a deployment that is right, while the real problem (the
    ERROR before it) is elsewhere. The restarted work also runs detached from the lifespan's task group.

    Observed: the "got no ASGI lifespan" WARNING. Expected: no such warning (restart within the lifespan)."""
    statuses = await _lifespan_crash_then_request(fake_lago, caplog)
    assert statuses == (200, 200)
    assert not [r for r in caplog.records if "got no ASGI lifespan" in r.getMessage()]


async def test_a_request_right_after_a_lazy_background_failure_is_served(
    fake_lago: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a lifespan (lazy start), the background work failing once started is started again where it ran:
    a request right after the failure is served (no window where the old start looks done and nothing runs), and
    the events of requests made meanwhile are delivered once it runs again."""
    import lago_org_billing._middleware as middleware_module

    settings = _settings_for(fake_lago, org_header="X-Org-Id")
    pipeline_class = type("FailsOnce", (_FailsOnce,), {"crash": anyio.Event(), "runs": 0})
    monkeypatch.setattr(middleware_module, "EventPipeline", pipeline_class)
    middleware = OrgBillingMiddleware(_hello_app(), settings, transport=fake_lago.transport(), quota=None)
    middleware.restart_delay = 0.01  # (the backoff is not what is tested)
    try:
        first = await _call(middleware, _http_scope())
        assert first[0]["status"] == 200
        pipeline_class.crash.set()
        await background_failed(middleware)
        second = await _call(middleware, _http_scope())
        assert second[0]["status"] == 200
        with anyio.fail_after(10):
            while pipeline_class.runs < 2 or len(fake_lago.events) < 2:  # noqa: ASYNC110 - restarted after a backoff
                await anyio.sleep(0.05)
    finally:
        await middleware.aclose()


# ------------------------------------------------------------------------- _Pending as a Coroutine (9618927)


async def test_a_resolver_task_cancelled_before_it_started_closes_the_resolvers_coroutine() -> None:
    """``_Pending`` promises to stay "quiet when dropped" (it closes the resolver's coroutine it holds). Scheduled as
    a task (what 9618927 made possible) and cancelled before its first step - a TaskGroup whose sibling failed, a
    timeout, a shutdown - asyncio calls ``throw(CancelledError)`` on it: ``_Pending.throw`` starts ``_then(held)``
    and throws into that fresh coroutine, which never awaits ``held``. The resolver's coroutine is left un-started
    and un-closed: "RuntimeWarning: coroutine ... was never awaited" when collected (an error under
    ``-W error``/pytest ``filterwarnings = error``). A native coroutine thrown into before it started leaves nothing.
    Same under trio (``start_soon`` then cancel).

    Observed: the resolver's coroutine CORO_CREATED. Expected: CORO_CLOSED (``throw`` before start closes ``held``
    and raises, as ``close`` does)."""
    from lago_org_billing import first_of
    from lago_org_billing._identity import from_state

    made: list[Any] = []

    async def lookup_body() -> str:
        return "org_a"

    def lookup(scope: Any) -> Any:  # an async resolver (returns an awaitable)
        coroutine = lookup_body()
        made.append(coroutine)
        return coroutine

    pending = first_of(from_state(), lookup)({"type": "http", "headers": [], "state": {}})
    task = asyncio.create_task(pending)  # type: ignore[arg-type]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    try:
        assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED
    finally:
        made[0].close()  # (no warning from this test either way)


# ------------------------------------------------------------------------ mapping list filters (8d23b96)


async def test_boolean_metadata_filter_matches_what_lago_stores(fake_lago: Any, lago_client: LagoClient) -> None:
    """8d23b96 sends mapping filters as ``metadata[key]=value`` with ``str(value)``, while ``_params`` sends top-level
    booleans as ``true``/``false``. ``list_customers(metadata={"is_synced": True})`` sends ``metadata[is_synced]=True``;
    Lago compares metadata values as strings (the OAS example is ``metadata[is_synced]=true``), so no customer marked
    ``"true"`` comes back.

    Observed: []. Expected: ["org_1"]."""
    fake_lago.add_customer("org_1", name="Synced", metadata=[{"key": "is_synced", "value": "true"}])
    fake_lago.add_customer("org_2", name="Not synced")
    page = await lago_client.list_customers(metadata={"is_synced": True})
    assert [customer["external_id"] for customer in page.items] == ["org_1"]


async def test_none_in_a_metadata_filter_is_not_sent_as_the_text_none(fake_lago: Any, lago_client: LagoClient) -> None:
    """A ``None`` filter is dropped by ``_params`` (``list_customers(country=None)`` filters nothing), but inside a
    mapping it is sent as the string ``"None"``: ``metadata={"is_synced": None}`` asks for customers whose
    ``is_synced`` is the text "None" - none. Lago's own spelling for "without the key" is the empty value
    (``metadata[last_synced_at]=``), which ``None`` naturally maps to (or it is dropped, as elsewhere).

    Observed: []. Expected: the customer without the key is among those returned."""
    fake_lago.add_customer("org_1", name="Synced", metadata=[{"key": "is_synced", "value": "true"}])
    fake_lago.add_customer("org_2", name="Not synced")
    page = await lago_client.list_customers(metadata={"is_synced": None})
    assert "org_2" in [customer["external_id"] for customer in page.items]


# ------------------------------------------------------------------ plan_overrides not retried (8d23b96)


async def test_a_subscription_with_plan_overrides_is_retried_after_a_429(monkeypatch: pytest.MonkeyPatch) -> None:
    """8d23b96 passes ``retry=plan_overrides is None`` so that a *lost answer* is not resent (Lago would take the
    resend for an upgrade). ``retry=False`` also drops the retry of a 429, which Lago answers *without* processing the
    request (``_request`` already retries even a DELETE after a 429 for that reason). Provisioning several orgs with
    overrides (a migration, a batch job) now fails on Lago's rate limit instead of waiting for its reset.

    Observed: LagoRateLimitError. Expected: the subscription (one retry after the reset)."""
    import random

    from lago_org_billing._errors import LagoRateLimitError

    monkeypatch.setattr(random, "random", lambda: 0.0)  # the jitter added to the reset: none
    posts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        if len(posts) == 1:
            return httpx.Response(
                429, headers={"x-ratelimit-reset": "0"}, json={"status": 429, "error": "Too Many Requests"}
            )
        return httpx.Response(200, json={"subscription": {"external_id": "org_1", "status": "active"}})

    settings = BillingSettings(api_url="http://lago.test", api_key="k", retry_backoff=0.001, max_retries=3)
    async with LagoClient(settings, transport=httpx.MockTransport(handler)) as client:
        try:
            subscription = await client.create_subscription(
                external_customer_id="org_1",
                plan_code="starter",
                external_id="org_1",
                plan_overrides={"amount_cents": 500},
            )
        except LagoRateLimitError as exc:
            subscription = {"raised": str(exc)}
    assert subscription.get("external_id") == "org_1"
    assert len(posts) == 2


# ------------------------------------------------------------------------ URL checks (68e3e78)


@pytest.mark.parametrize(
    "url",
    [
        "https://billing:s3cr3t-pass@lago.example.com/api/v1/events",  # the new "endpoint's URL" refusal
        "https://billing:s3cr3t-pass@[lago.example.com/",  # the new unparseable-URL refusal (was a ValueError)
    ],
)
def test_a_refused_lago_url_does_not_show_its_password(url: str) -> None:
    """``BillingSettings`` treats ``api_url`` as holding a password (``repr`` shows it through ``redact_url``, as the
    ``LAGO_REDIS_URL`` error does), and httpx sends ``user:password@`` as basic auth (a Lago behind an
    authenticating proxy). The refusals 68e3e78 adds for ``LAGO_API_URL`` put ``{value!r}`` (and the suggested base,
    password included) in the ``ConfigurationError`` - logged at startup, shown by ``lago-org-billing health``,
    uvicorn's "Application startup failed" line.

    Observed: the password in the message. Expected: masked (``redact_url``)."""
    with pytest.raises(ConfigurationError) as info:
        BillingSettings(api_url=url)
    assert "s3cr3t-pass" not in str(info.value)


def test_a_redis_url_with_port_0_is_refused_as_its_message_says() -> None:
    """68e3e78's ``LAGO_REDIS_URL`` check says "(a port from 1 to 65535)" but ``_redis_url_ok`` only lets
    ``urlsplit(...).port`` raise, which accepts 0 (``redis://localhost:0``, a typo or an unset template variable
    ``redis://host:${PORT:-0}``): the settings load and redis-py fails at the first connection, not naming the
    variable - what 68e3e78 set out to stop.

    Observed: accepted. Expected: ConfigurationError naming LAGO_REDIS_URL."""
    with pytest.raises(ConfigurationError) as info:
        BillingSettings(redis_url="redis://localhost:0/0")
    assert info.value.variable == "LAGO_REDIS_URL"


# ------------------------------------------- an event's text with a lone surrogate (9618927, left as it was)


class _Spinning(BaseException):
    """Raised by the guard below to stop a delivery loop that never yields (it would hang the test run)."""


@pytest.mark.parametrize("store", ["memory", "spool"])
async def test_an_event_built_as_text_with_a_lone_surrogate_is_dead_lettered(tmp_path: Any, store: str) -> None:
    """9618927 handles a lone surrogate in *dict* events (``event_payload`` refuses it, ``dumps_event`` checks the
    text). An event submitted as its JSON text - ``EventPipeline.submit`` takes a builder returning the text, as the
    middleware's own lane does - skips every check, since ``dumps_event(str)`` returns it as it is:

    * memory: ``_post`` now raises ``InvalidRequestError`` (9618927 moved ``.encode()`` into its ``try``);
      ``_invalid`` asks ``item.encoded()``, which succeeds for text, declares the item valid and pushes it back on the
      stack; ``_post`` fails again... with no ``await`` reached in between (``_wait_gate`` returns at once, the body
      fails before any I/O): a busy loop that blocks the event loop - the whole app stops answering. Before
      9618927 the error escaped the ``try`` and the batch was retried after a backoff (forever, but the app ran);
    * spool: ``_SpoolFile.write`` binds the text, sqlite3 raises ``UnicodeEncodeError``, and ``_commit`` (now catching
      any exception) keeps the rows and tries the same write forever: nothing of the window nor of later windows
      reaches disk or Lago while the app runs (the ERROR blames the disk); at shutdown the rows are sent from memory
      and the busy loop above follows.

    A guard on ``_post`` stops the loop after 50 attempts (it raises a ``BaseException`` the pipeline does not
    swallow), so this test ends.

    Observed: memory - the guard fires (busy loop); spool - flush times out (nothing delivered), then the guard
    fires. Expected: the 3 good events delivered, the bad one a dead letter (``invalid_event``), a few POSTs."""
    from test_delivery import events, make_client, make_fake, transaction_ids

    attempts = 0

    class Guarded(EventPipeline):
        async def _post(self, items: list[Any]) -> None:
            nonlocal attempts
            attempts += 1
            if attempts > 50:
                raise _Spinning(f"{attempts} POST attempts for {len(items)} events without yielding")
            await super()._post(items)

    fake = make_fake()
    good = events(3)
    bad = {**good[0], "transaction_id": "bad", "properties": {"feature": "x\ud800"}}
    bad_text = json.dumps(bad, ensure_ascii=False)
    assert "\ud800" in bad_text  # the raw surrogate, as the JSON text of a dict holding it
    crashed: BaseException | None = None
    flushed = False
    delivered: list[str] = []
    async with make_client(fake.transport()) as client:
        pipeline = Guarded(
            client,
            spool_path=str(tmp_path / "spool.db") if store == "spool" else None,
            flush_interval=0.0,
            retry_backoff=0.001,
            max_backoff=0.01,
        )
        try:
            async with anyio.create_task_group() as tasks:
                await tasks.start(pipeline.run)
                for event in (good[0], lambda: bad_text, good[1], good[2]):
                    assert pipeline.submit(event)  # type: ignore[arg-type]
                flushed = await pipeline.flush(3)  # (a guard: with nothing wrong this takes milliseconds)
                delivered = sorted(transaction_ids(fake))
                await pipeline.aclose(timeout=0.5)
        except BaseException as exc:  # the guard's _Spinning (in a group), reported below
            crashed = exc
    assert crashed is None, f"delivery spun: {crashed!r}"
    assert delivered == sorted(event["transaction_id"] for event in good)
    assert flushed
    assert attempts < 10
