"""``lago-org-billing demo``: the emulator, an LLM-style API behind the middleware, traffic, and a report."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import random
import signal
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from types import FrameType
from typing import Any

import anyio
import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ._billing import OrgBilling
from ._client import LagoClient
from ._errors import LagoIntegrationError
from ._middleware import OrgBillingMiddleware
from ._quota import QuotaConfig
from ._run import run_main
from ._settings import BillingSettings
from ._webhooks import LagoWebhooks

__all__ = ["build_demo_app", "run_demo"]

API_KEY = "demo-api-key"
HMAC_KEY = "demo-webhook-hmac-key"
QUOTA_ORG = ("org_tiny", "Tiny Startup", "sam")
FREE_CALLS = 5
ORGS = {
    "org_acme": ("Acme Corp", "starter", ["ada", "grace", "linus"]),
    "org_globex": ("Globex", "pro", ["hank", "marge"]),
}
MODELS = ["gpt-4o-mini", "claude-haiku"]
REQUESTS_PER_USER = 12
#: Seconds the demo waits for its events to reach Lago after the last response (they take well under one).
DELIVERY_TIMEOUT = 30.0
#: Seconds the demo waits for Lago's webhooks to reach the app after the plan upgrade.
WEBHOOK_TIMEOUT = 10.0


def seed(fake: Any) -> None:
    """The demo's Lago: an ``api_call`` metric summing ``total_tokens``, and two plans."""
    fake.add_billable_metric(
        "api_call", name="API calls (tokens)", aggregation_type="sum_agg", field_name="total_tokens"
    )
    charge = {
        "billable_metric_code": "api_call",
        "charge_model": "standard",
        "properties": {"amount": "0.00002", "pricing_group_keys": ["user_id", "model"]},
    }
    # Limits are Lago entitlements: feature api_quota, privilege max_api_calls (calls per billing period).
    fake.add_feature("api_quota", privileges=[{"code": "max_api_calls", "name": "API calls", "value_type": "integer"}])
    fake.add_plan(
        "free",
        name="Free",
        amount_cents=0,
        interval="monthly",
        charges=[charge],
        entitlements={"api_quota": {"max_api_calls": FREE_CALLS}},
    )
    fake.add_plan(
        "starter",
        name="Starter",
        amount_cents=2_000,
        interval="monthly",
        charges=[charge],
        entitlements={"api_quota": {"max_api_calls": 10_000}},
    )
    fake.add_plan("pro", name="Pro", amount_cents=20_000, interval="monthly", charges=[charge])


# --------------------------------------------------------------------------- the example API


def _tokens(prompt: str, model: str) -> tuple[int, int]:
    """A deterministic stand-in for an LLM: token counts from the prompt."""
    words = len(prompt.split())
    return 8 + words * 3, 20 + (words * 7 + len(model)) % 40


async def chat_completions(request: Request) -> Response:
    """OpenAI-style chat completions, JSON or SSE (usage in the final chunk)."""
    try:
        body = await request.json()
    except ClientDisconnect:  # the demo's own client gone (Ctrl-C mid-traffic): nothing to answer, nothing to log
        return Response(status_code=499)
    model = body.get("model", MODELS[0])
    prompt = " ".join(m.get("content", "") for m in body.get("messages", []))
    prompt_tokens, completion_tokens = _tokens(prompt, model)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if not body.get("stream"):
        return JSONResponse(
            {
                "id": "chatcmpl-demo",
                "object": "chat.completion",
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}}],
                "usage": usage,
            }
        )

    async def stream() -> AsyncIterator[bytes]:
        for word in ("Hel", "lo", "!"):
            chunk = {"object": "chat.completion.chunk", "model": model, "choices": [{"delta": {"content": word}}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        final = {"object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage}
        yield f"data: {json.dumps(final)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


async def list_models(request: Request) -> Response:
    """A free endpoint: billed as a call with zero tokens."""
    return JSONResponse({"data": [{"id": model} for model in MODELS]})


async def health(request: Request) -> Response:
    """Excluded from billing by LAGO_EXCLUDE_PATHS."""
    return JSONResponse({"ok": True})


def build_demo_app(settings: BillingSettings) -> Starlette:
    """The example API: org from ``X-Org-Id``, user from ``X-User-Id`` (demo only: trust your auth layer).

    Lago's signed webhooks arrive at ``/webhooks/lago`` and refresh the quota of the org they concern."""
    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", list_models),
            Route("/health", health),
            Route("/webhooks/lago", LagoWebhooks(settings), methods=["POST"]),
        ],
        # The demo's own quota settings: none of the environment's LAGO_QUOTA_* (its emulator is seeded for these).
        middleware=[Middleware(OrgBillingMiddleware, settings=settings, quota_config=QuotaConfig())],
    )


# --------------------------------------------------------------------------- running it


#: Proxy variables, by their lower-case name: read in any case (``Https_Proxy``), as urllib and so httpx read them.
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")
#: TLS trust settings httpx reads as it makes any client, plain HTTP or not: one naming a file gone (a removed corporate
#: CA bundle, an old virtualenv's certifi) is a FileNotFoundError there, and the demo has no TLS at all.
_TLS_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR")


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Everything the demo serves and calls is plain HTTP on 127.0.0.1: the proxy of the user's environment
    (HTTP_PROXY..., which httpx and so the Lago client honour) could not reach it, a SOCKS one (ALL_PROXY=socks5://...)
    stops httpx from making a client at all without its ``socks`` extra, NO_PROXY or not, and so does an
    ``SSL_CERT_FILE`` that names no file. Put back as it was when the demo ends."""
    removed = [name for name in os.environ if name.lower() in _PROXY_VARIABLES or name in _TLS_VARIABLES]
    saved = {name: os.environ.get(name) for name in ("NO_PROXY", "no_proxy", *removed)}
    for name, value in saved.items():
        if name in removed:
            os.environ.pop(name, None)
        else:
            os.environ[name] = f"{value},127.0.0.1" if value else "127.0.0.1"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that comes while the body runs, and raise it as :class:`KeyboardInterrupt` once the body
    is over; a second Ctrl-C raises at once (in the main thread; elsewhere the body just runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)
        if len(caught) > 1:  # insisting: stop waiting
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """While the body runs, SIGTERM (``docker stop``, systemd, ``kill``) is a Ctrl-C, and so stops the servers as Ctrl-C
    does. Without a handler it ended the process at once, and a container's first process (PID 1), for which a signal
    without a handler is ignored, did not stop at all (``docker stop`` killed it after its grace period). Handed to
    whatever takes Ctrl-C at that moment: the event loop's runner while the demo runs (it cancels the demo's task: an
    exception raised there instead would come out of whichever callback the loop was in), the hold of
    :func:`_interrupts_deferred` while the servers stop, else Python's own :class:`KeyboardInterrupt`. In the main
    thread only (elsewhere the body just runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        ctrl_c = signal.getsignal(signal.SIGINT)
        if not callable(ctrl_c):  # Ctrl-C ignored or left to the system (SIG_IGN, SIG_DFL): SIGTERM still stops
            raise KeyboardInterrupt
        ctrl_c(signal.SIGINT, frame)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: What asyncio logs (a warning) for each write past the fifth to a connection already lost.
_LOST_CONNECTION_WRITE = "socket.send() raised exception."


class _LostConnectionWrites(logging.Filter):
    """Leaves out asyncio's warning of writes to a connection already lost. The demo's servers answer only the demo's
    own client (and the curl of ``--serve``): at a Ctrl-C that client closes its connections while the example app
    streams to them, and a stream, written in one go before the server can see its client gone, had asyncio warn at
    each write past the fifth: lines of warnings on stderr, for an interrupt the user asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != _LOST_CONNECTION_WRITE


@contextlib.contextmanager
def _quiet_lost_connections() -> Iterator[None]:
    """:class:`_LostConnectionWrites` on asyncio's logger while the body runs (the servers' teardown included)."""
    quiet = _LostConnectionWrites()
    logger = logging.getLogger("asyncio")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@contextlib.contextmanager
def _serving(fake: Any, port: int = 0) -> Iterator[tuple[str, str, BillingSettings]]:
    """The emulator and the example app, served; stopped in that order's reverse when the body ends, however it ends
    (a Ctrl-C while they stop is held until both have: the app flushes its events to the emulator first)."""
    from .testing._server import forget_requests, free_port_or_error, serve_in_thread

    forget_requests(fake)  # (the demo reads Lago's events, not the request log: with --serve it grew for good)
    if port:  # a port taken (or out of range) is one line, as for ``emulator``, not uvicorn's tracebacks
        free_port_or_error("127.0.0.1", port)
    with contextlib.ExitStack() as servers:
        try:
            lago_url = servers.enter_context(serve_in_thread(fake, port=port))
            settings = BillingSettings(
                api_url=lago_url,
                api_key=API_KEY,
                org_header="X-Org-Id",
                user_header="X-User-Id",
                exclude_paths=("/health", "/webhooks/"),
                webhook_hmac_key=HMAC_KEY,
            )
            app = build_demo_app(settings)
            app_url = servers.enter_context(serve_in_thread(app))
            fake.webhook_dispatcher.configure(url=f"{app_url}/webhooks/lago", signature="hmac", hmac_key=HMAC_KEY)
            yield lago_url, app_url, settings
        finally:
            with _interrupts_deferred():
                servers.close()


async def _setup_orgs(settings: BillingSettings) -> None:
    async with OrgBilling(settings) as billing:
        for org_id, (name, plan, users) in ORGS.items():
            await billing.subscribe_org_to_plan(org_id, plan, name, f"billing@{org_id}.test", user_id=users[0])


async def _drive(app_url: str) -> dict[tuple[str, str, str], list[int]]:
    """Send the scripted traffic; returns {(org, user, model): [requests, tokens]} as the clients saw it."""
    served: dict[tuple[str, str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    rng = random.Random(7)
    jobs = []
    for org_id, (_, _, users) in ORGS.items():
        for user in users:
            for i in range(REQUESTS_PER_USER):
                jobs.append((org_id, user, MODELS[i % 2], i % 3 == 0, rng.randint(1, 30)))
    limiter = anyio.CapacityLimiter(16)

    async def one(client: httpx.AsyncClient, org_id: str, user: str, model: str, stream: bool, words: int) -> None:
        async with limiter:
            headers = {"X-Org-Id": org_id, "X-User-Id": user}
            payload = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi " * words}]}
            response = await client.post("/v1/chat/completions", json=payload, headers=headers)
            response.raise_for_status()
            if stream:
                chunks = [line[6:] for line in response.text.splitlines() if line.startswith("data: {")]
                usage = json.loads(chunks[-1])["usage"]
            else:
                usage = response.json()["usage"]
            served[(org_id, user, model)][0] += 1
            served[(org_id, user, model)][1] += usage["total_tokens"]

    async with httpx.AsyncClient(base_url=app_url, timeout=30) as client:
        async with anyio.create_task_group() as tasks:
            for job in jobs:
                tasks.start_soon(one, client, *job)
        for org_id, (_, _, users) in ORGS.items():  # free calls and an excluded health check
            await client.get("/v1/models", headers={"X-Org-Id": org_id, "X-User-Id": users[0]})
            served[(org_id, users[0], "-")][0] += 1
            await client.get("/health")
    return served


async def _wait_delivered(fake: Any, expected: int) -> None:
    """Wait (at most :data:`DELIVERY_TIMEOUT` seconds) until Lago holds ``expected`` events; say what it received."""
    started = time.monotonic()
    with anyio.move_on_after(DELIVERY_TIMEOUT):
        # The emulator runs in another thread and signals nothing: poll what it has received.
        while len(fake.events) < expected:  # noqa: ASYNC110
            await anyio.sleep(0.05)
    received = len(fake.events)
    if received >= expected:
        _say(f"Lago received {received} events ({time.monotonic() - started:.2f}s after the last response)")
    else:
        _say(
            f"Only {received} of {expected} events reached Lago within {DELIVERY_TIMEOUT:g} s of the last response: "
            "its delivery failed or is slow (see any warnings above). The report shows what is missing."
        )


#: The report's width: an 80-column terminal shows each line whole (the curl commands of ``--serve`` excepted).
WIDTH = 80


def _say(text: str, indent: str = "") -> None:
    """Print ``text`` wrapped to :data:`WIDTH` columns, each line indented by ``indent``; URLs and other long words are
    never cut."""
    print(
        textwrap.fill(
            text,
            WIDTH,
            initial_indent=indent,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
    )


def _units(value: Any) -> str:
    """Lago's units (a decimal string, ``"490.0"``) as the integer it is for a sum of tokens."""
    number = float(value)
    return str(int(number)) if number.is_integer() else f"{number:g}"


async def _report(fake: Any, settings: BillingSettings, served: dict[tuple[str, str, str], list[int]]) -> bool:
    """What the API served, per (org, user, model) and per org, next to the events Lago received and Lago's current
    usage (the ``api_call`` charge, grouped by ``user_id`` and ``model`` as the plans price it)."""
    delivered: dict[tuple[str, str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    ids = [event["transaction_id"] for event in fake.events]
    for event in fake.events:
        props = event["properties"]
        key = (props["org_id"], props.get("user_id", "-"), props.get("model", "-"))
        delivered[key][0] += 1
        delivered[key][1] += int(props.get("total_tokens", 0))
    ok = len(ids) == len(set(ids))
    charges: dict[str, dict[str, Any]] = {}
    async with LagoClient(settings) as lago:
        for org_id in ORGS:
            usage = await lago.get_current_usage(org_id, settings.subscription_id_for(org_id))
            charge = next(c for c in usage["charges_usage"] if c["billable_metric"]["code"] == "api_call")
            charges[org_id] = {**charge, "amount_cents": usage["amount_cents"]}
    grouped: dict[tuple[str, str, str], tuple[int, str]] = {}
    for org_id, charge in charges.items():
        for group in charge.get("grouped_usage") or ():
            by = group.get("grouped_by") or {}
            key = (org_id, by.get("user_id") or "-", by.get("model") or "-")
            grouped[key] = (int(group["events_count"]), _units(group["units"]))

    print("\nPer user and model: served by the API, received by Lago, in Lago's usage")
    print(f"{'':<34}{'--- requests ---':^19}  {'--- tokens ---':^15}".rstrip())
    print(
        f"{'org':<11} {'user':<7} {'model':<13} {'served':>6} {'events':>6} {'Lago':>5}  "
        f"{'served':>7} {'Lago':>7}  agrees"
    )
    for key in sorted(served):
        requests, tokens = served[key]
        events, event_tokens = delivered.get(key, [0, 0])
        lago_events, lago_units = grouped.get(key, (0, "-"))
        agrees = events == lago_events == requests and event_tokens == tokens and lago_units == str(tokens)
        ok &= agrees
        print(
            f"{key[0]:<11} {key[1]:<7} {key[2]:<13} {requests:>6} {events:>6} {lago_events:>5}  {tokens:>7} "
            f"{lago_units:>7}  {'yes' if agrees else 'NO'}"
        )
    for key in sorted(set(delivered) - set(served)):  # events of requests the API never served
        ok = False
        events, event_tokens = delivered[key]
        print(f"{key[0]:<11} {key[1]:<7} {key[2]:<13} {0:>6} {events:>6} {'':>5}  {0:>7} {event_tokens:>7}  NO")

    print("\nPer org: Lago's current usage (units: the tokens its api_call metric sums)")
    print(f"{'org':<11} {'plan':<8} {'requests':>8} {'tokens':>7} {'Lago units':>10} {'Lago amount':>11}  agrees")
    for org_id, (_, plan, _) in ORGS.items():
        requests = sum(v[0] for k, v in served.items() if k[0] == org_id)
        tokens = sum(v[1] for k, v in served.items() if k[0] == org_id)
        charge = charges[org_id]
        agrees = float(charge["units"]) == tokens and charge["events_count"] == requests
        ok &= agrees
        amount = f"${charge['amount_cents'] / 100:.2f}"
        print(
            f"{org_id:<11} {plan:<8} {requests:>8} {tokens:>7} {_units(charge['units']):>10} {amount:>11}  "
            f"{'yes' if agrees else 'NO'}"
        )
    return ok


async def _webhooks_delivered(fake: Any, count: int) -> list[Any] | None:
    """Wait (at most :data:`WEBHOOK_TIMEOUT` seconds) until ``count`` of Lago's webhook deliveries have finished;
    returns them, or ``None`` (said) when the wait ran out."""
    try:
        return await anyio.to_thread.run_sync(
            lambda: fake.webhook_dispatcher.wait_delivered(count, timeout=WEBHOOK_TIMEOUT)
        )
    except LagoIntegrationError:  # the wait ran out: said as the demo's, not as a test harness's error
        _say(f"Lago's webhooks did not reach the app within {WEBHOOK_TIMEOUT:g} s", "  ")
        return None


async def _quota_scene(fake: Any, app_url: str, settings: BillingSettings) -> bool:
    """An org on the free plan hits its limit, is blocked, upgrades, and is served again at once."""
    org_id, name, user = QUOTA_ORG
    print()
    _say(f"Quota: {org_id} is on the free plan ({FREE_CALLS} calls per period, a Lago entitlement)")
    async with OrgBilling(settings) as billing:
        await billing.subscribe_org_to_plan(org_id, "free", name, f"billing@{org_id}.test", user_id=user)
        # The new subscription's webhooks (subscription.started) drop the org's cached quota state as they reach the
        # app: one arriving among the calls below had the org read again while Lago might not have counted the calls
        # just made (settle_lag), and the gate, never under-counting, answered the limit with an unsure block ("The
        # usage may be lower than counted here: retry in 6 s"), not the story's over-quota answer (some runs).
        # Waited for first, as the upgrade's are below: every run tells the same story.
        delivered_before = len(fake.webhook_dispatcher.deliveries)
        await _webhooks_delivered(fake, delivered_before)
        headers = {"X-Org-Id": org_id, "X-User-Id": user}
        payload = {"model": MODELS[0], "messages": [{"role": "user", "content": "hello"}]}
        statuses = []
        said = ""  # the refusal's text, said once: the same for each refused call
        async with httpx.AsyncClient(base_url=app_url, timeout=30) as client:
            for i in range(FREE_CALLS + 2):
                response = await client.post("/v1/chat/completions", json=payload, headers=headers)
                statuses.append(response.status_code)
                remaining = response.headers.get("ratelimit-remaining", "-")
                line = f"  call {i + 1}: {response.status_code}  RateLimit-Remaining: {remaining}"
                if response.status_code != 200:
                    line += f"  Retry-After: {response.headers.get('retry-after')}s"
                print(line)
                detail = str(response.json().get("detail")) if response.status_code != 200 else ""
                if detail and detail != said:
                    _say(detail, "    ")
                    said = detail
            _say(f"{org_id} upgrades to starter; Lago sends subscription webhooks to the app", "  ")
            await billing.change_plan(org_id, "starter")
            started = time.monotonic()
            webhooks = await _webhooks_delivered(fake, delivered_before + 2) or []
            refused = [d for d in webhooks[delivered_before:] if d.state != "succeeded"]
            if refused:
                _say("webhooks refused by the app: it still holds the free plan's limit", "  ")
                for delivery in refused:  # one a line: an answer is never cut in two
                    _say(f"{delivery.webhook_type}: {delivery.error}", "    ")
            elif webhooks:
                kinds = sorted({d.webhook_type for d in webhooks[delivered_before:]})
                elapsed = time.monotonic() - started
                _say(f"webhooks verified in {elapsed:.2f}s: {', '.join(kinds)}", "  ")
            webhooks_ok = bool(webhooks) and not refused
            response = await client.post("/v1/chat/completions", json=payload, headers=headers)
            statuses.append(response.status_code)
            print(
                f"  call {len(statuses)}: {response.status_code}  RateLimit-Limit: "
                f"{response.headers.get('ratelimit-limit')}  RateLimit-Remaining: "
                f"{response.headers.get('ratelimit-remaining')}"
            )
    expected = [200] * FREE_CALLS + [429, 429, 200]
    return statuses == expected and webhooks_ok


async def _main(fake: Any, lago_url: str, app_url: str, settings: BillingSettings) -> bool:
    await _setup_orgs(settings)
    print(f"Lago emulator: {lago_url}\nExample API:   {app_url} (behind OrgBillingMiddleware)")
    started = time.monotonic()
    served = await _drive(app_url)
    elapsed = time.monotonic() - started
    total = sum(v[0] for v in served.values())
    _say(f"Sent {total} billable requests (JSON and SSE, {len(ORGS)} orgs, {len(MODELS)} models) in {elapsed:.2f}s")
    await _wait_delivered(fake, total)
    ok = await _report(fake, settings, served)
    return await _quota_scene(fake, app_url, settings) and ok


#: How the printed commands call curl.
_CURL = "curl -sS --noproxy 127.0.0.1"


def run_demo(*, serve: bool = False, port: int = 0) -> int:
    """Run the demo; returns 0 when every number agrees."""
    from .testing import FakeLago

    fake = FakeLago(api_key=API_KEY)
    seed(fake)
    # SIGTERM stops the demo as Ctrl-C does from here on, in both modes: before the serving it was handled only once
    # the curl commands were printed, and a ``docker stop`` sent while the demo's traffic ran (its first seconds) was
    # ignored by the container's PID 1, which then served until killed after the grace period (elsewhere the process
    # died at once by the signal). Interrupted before the serving is exit 130, as for Ctrl-C.
    with (
        _stopped_by_sigterm(),
        _loopback_only(),
        _quiet_lost_connections(),
        _serving(fake, port) as (lago_url, app_url, settings),
    ):
        ok = run_main(_main, fake, lago_url, app_url, settings)
        print()
        _say(
            "Every request billed exactly once, Lago agrees, and the quota blocked and unblocked as it should."
            if ok
            else "MISMATCH: see above."
        )
        if serve:
            # Ctrl-C and SIGTERM end the serving from before the commands are printed: either one sent on reading them
            # (``docker stop`` as soon as the container logs them) stops the demo as it would a moment later (exit 0).
            with contextlib.suppress(KeyboardInterrupt):
                print(
                    # --noproxy: curl sends even 127.0.0.1 to the http_proxy/ALL_PROXY of the user's shell (a corporate
                    # laptop's), and -S shows why a call failed (-s alone hides it: nothing at all on screen).
                    f"\nServing until Ctrl-C. Try:\n  {_CURL} -X POST {app_url}/v1/chat/completions "
                    "-H 'X-Org-Id: org_acme' -H 'X-User-Id: ada' -H 'Content-Type: application/json' "
                    '-d \'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}\'\n'
                    # quoted: unquoted, zsh (macOS's shell) takes the '?' for a glob and answers "no matches found"
                    f"  {_CURL} '{lago_url}/api/v1/customers/org_acme/current_usage?external_subscription_id=org_acme' "
                    f"-H 'Authorization: Bearer {API_KEY}'",
                    flush=True,  # piped or redirected (``| tee``), stdout is block-buffered: out now, not at Ctrl-C
                )
                while True:
                    time.sleep(3600)
    sys.stdout.flush()
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())
