"""Webhooks in a deployment: invalidations that reach the whole fleet (Redis) or fail loudly, reads in flight that
an invalidation supersedes, a rotated JWT key Lago cannot serve, the receiver's Redis closed; and billing_routes'
usage recording that an org's admin cannot use to lower its own bill."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from lago_org_billing import BillingSettings, LagoClient, OrgBilling, billing_routes
from lago_org_billing._quota import QuotaConfig, QuotaGate
from lago_org_billing._webhooks import LagoWebhooks, MemoryDedupe, sign_hmac
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

HMAC_KEY = "9e0c3a53-review-hmac-key"
LIMITS = {"starter": {"max_api_calls": 3}, "pro": {"max_api_calls": 100}}
SUCCESS = (200, 201, 202, 204)  # what Lago takes for a delivered webhook


def make_fake() -> FakeLago:
    """An emulator with an org on the starter plan (3 calls), and a pro plan (100 calls)."""
    fake = FakeLago(api_key="test-api-key")
    fake.add_billable_metric("api_call")
    charge = {"billable_metric_code": "api_call", "charge_model": "standard", "properties": {"amount": "0.01"}}
    fake.add_plan("starter", amount_cents=1000, charges=[charge])
    fake.add_plan("pro", amount_cents=5000, charges=[charge])
    fake.add_customer("org_acme")
    fake.add_subscription("org_acme", "starter")
    return fake


def settings_for(fake: FakeLago, **overrides: Any) -> BillingSettings:
    return BillingSettings(
        api_url=fake.base_url,
        api_key=fake.api_key,
        max_retries=0,
        usage_cache_ttl=3600,
        plan_limits=LIMITS,
        **overrides,
    )


def receiver_app(receiver: LagoWebhooks) -> Starlette:
    return Starlette(routes=[Route("/webhooks/lago", receiver, methods=["POST"])])


def limit_of(decision: Any) -> bytes:
    """The ``RateLimit-Limit`` the gate's decision gives the client (the org's calls limit)."""
    return dict(decision.headers)[b"ratelimit-limit"]


class HeldTransport(httpx.AsyncBaseTransport):
    """The emulator's transport; after ``hold()``, the next ``GET /subscriptions/{id}`` is answered by Lago at once
    but handed back to the caller only when ``release`` is set (a refresh that read Lago just before a change)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.reached = anyio.Event()
        self.release = anyio.Event()
        self._armed = False

    def hold(self) -> None:
        self._armed = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        path = request.url.path
        if self._armed and request.method == "GET" and "/subscriptions/" in path and not path.endswith("/entitlements"):
            self._armed = False
            await response.aread()  # what Lago said before the plan change
            self.reached.set()
            await self.release.wait()
        return response


# ------------------------------------------------------------------------------ lost quota invalidations


async def test_webhook_invalidation_is_not_undone_by_another_workers_refresh_in_flight(redis_url: str) -> None:
    """Two workers sharing Redis (LAGO_REDIS_URL). Worker B is refreshing the org's snapshot and has just read its
    starter subscription from Lago when the org upgrades; the subscription webhooks reach worker A, whose gate
    deletes the snapshot in Redis. B then stores what it read: the upgrade's invalidation is lost fleet-wide, and
    the org keeps its starter limit (3) for a TTL, its plan for up to LAGO_QUOTA_PLAN_TTL (5 min), although Lago
    was told (200) the webhooks were handled. (In one process this race is handled: ``_stale``.)"""
    fake = make_fake()
    settings = settings_for(fake, redis_url=redis_url)
    config = QuotaConfig(redis_prefix=f"review:{uuid.uuid4().hex}:")
    held = HeldTransport(fake.transport())
    async with (
        LagoClient(settings, transport=fake.transport()) as lago_a,
        LagoClient(settings, transport=held) as lago_b,
    ):
        gate_a = QuotaGate(settings, lago_a, config=config)
        gate_b = QuotaGate(settings, lago_b, config=config)
        receiver = LagoWebhooks(client=lago_a, invalidate=gate_a, dedupe=MemoryDedupe())
        fake.webhook_dispatcher.configure(app=receiver_app(receiver))
        async with anyio.create_task_group() as tg:
            await tg.start(gate_a.run)
            await tg.start(gate_b.run)
            answered = anyio.Event()

            async def request_on_worker_b() -> None:
                await gate_b.check("org_acme")  # cold: B reads the org's subscription and usage from Lago
                answered.set()

            held.hold()
            tg.start_soon(request_on_worker_b)
            await held.reached.wait()  # B has read the starter subscription; its refresh goes on
            await lago_a.create_subscription(external_customer_id="org_acme", plan_code="pro", external_id="org_acme")
            deliveries = await fake.webhook_dispatcher.deliver_pending()  # worker A gets them, invalidates the org
            assert [(d.webhook_type, d.state) for d in deliveries] == [
                ("subscription.terminated", "succeeded"),
                ("subscription.started", "succeeded"),
                ("invoice.created", "succeeded"),
            ]
            held.release.set()
            with anyio.fail_after(10):
                await answered.wait()  # B's refresh has stored its snapshot
            next_request = await gate_a.check("org_acme")
            await gate_a.aclose()
            await gate_b.aclose()
            tg.cancel_scope.cancel()
    assert limit_of(next_request) == b"100", "the next request after the upgrade's webhooks still has starter's limit"


async def test_webhook_is_not_acknowledged_when_the_shared_quota_state_could_not_be_invalidated(
    redis_url: str,
) -> None:
    """The receiver promises (test_invalidation_failure_is_500) that when quota state cannot be invalidated the
    webhook fails so that Lago retries. With the Redis gate, a Redis error while invalidating (a failover, a
    restart, a timeout) is swallowed by RedisBackend.invalidate: the webhook is answered 200, Lago never retries,
    and every other worker keeps the org's old plan (here B: starter, 3 calls) for up to LAGO_QUOTA_PLAN_TTL."""
    import redis.exceptions

    fake = make_fake()
    settings = settings_for(fake, redis_url=redis_url, webhook_hmac_key=HMAC_KEY)
    config = QuotaConfig(redis_prefix=f"review:{uuid.uuid4().hex}:")
    async with LagoClient(settings, transport=fake.transport()) as lago:
        gate_a = QuotaGate(settings, lago, config=config)
        gate_b = QuotaGate(settings, lago, config=config)
        receiver = LagoWebhooks(settings, invalidate=gate_a, dedupe=MemoryDedupe())
        async with anyio.create_task_group() as tg:
            await tg.start(gate_a.run)
            await tg.start(gate_b.run)
            assert limit_of(await gate_b.check("org_acme")) == b"3"
            await lago.create_subscription(external_customer_id="org_acme", plan_code="pro", external_id="org_acme")

            async def redis_fails(*args: Any, **kwargs: Any) -> None:
                raise redis.exceptions.ConnectionError("Error 111 connecting to redis: Connection refused.")

            script = gate_a.backend._invalidate  # type: ignore[attr-defined]
            gate_a.backend._invalidate = redis_fails  # type: ignore[attr-defined]  # Redis fails the invalidation
            body = json.dumps(
                {
                    "webhook_type": "subscription.started",
                    "object_type": "subscription",
                    "organization_id": "lago-org",
                    "subscription": {"external_id": "org_acme", "external_customer_id": "org_acme", "plan_code": "pro"},
                },
                separators=(",", ":"),
            ).encode()
            headers = {
                "X-Lago-Signature": sign_hmac(body, HMAC_KEY),
                "X-Lago-Signature-Algorithm": "hmac",
                "X-Lago-Unique-Key": str(uuid.uuid4()),
            }
            transport = httpx.ASGITransport(app=receiver_app(receiver))
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                response = await http.post("/webhooks/lago", content=body, headers=headers)
                assert limit_of(await gate_b.check("org_acme")) == b"3"  # B was not told
                gate_a.backend._invalidate = script  # type: ignore[attr-defined]  # Redis is back
                retried = await http.post("/webhooks/lago", content=body, headers=headers)  # Lago's retry
            on_worker_b = await gate_b.check("org_acme")
            await gate_a.aclose()
            await gate_b.aclose()
            tg.cancel_scope.cancel()
    assert response.status_code == 500, f"answered {response.status_code}: Lago will not send it again"
    assert retried.status_code == 200
    assert limit_of(on_worker_b) == b"100"


async def test_webhook_invalidation_during_a_seed_helper_read_is_not_lost() -> None:
    """One process, no Redis. ``get_org_plan_limits`` / ``check_org_has_active_subscription`` /
    ``enforce_usage_limits`` (QuotaGate.snapshot) read a cold org from Lago; the org upgrades meanwhile and the
    subscription webhooks invalidate it. snapshot() then stores what it read before the change (it is not a tracked
    refresh, so the ``_stale`` re-read does not apply): the gate enforces starter's limit after the upgrade.
    (The same race through ``gate.check`` is handled.)"""
    fake = make_fake()
    settings = settings_for(fake)
    held = HeldTransport(fake.transport())
    async with LagoClient(settings, transport=held) as lago:
        gate = QuotaGate(settings, lago, config=QuotaConfig())
        fake.webhook_dispatcher.configure(app=receiver_app(LagoWebhooks(client=lago, invalidate=gate)))
        async with anyio.create_task_group() as tg:
            await tg.start(gate.run)
            answered = anyio.Event()

            async def billing_page() -> None:
                await gate.get_org_plan_limits("org_acme")
                answered.set()

            held.hold()
            tg.start_soon(billing_page)
            await held.reached.wait()
            await lago.create_subscription(external_customer_id="org_acme", plan_code="pro", external_id="org_acme")
            deliveries = await fake.webhook_dispatcher.deliver_pending()
            assert all(d.state == "succeeded" for d in deliveries)
            held.release.set()
            with anyio.fail_after(10):
                await answered.wait()
            limits = await gate.get_org_plan_limits("org_acme")
            next_request = await gate.check("org_acme")
            await gate.aclose()
            tg.cancel_scope.cancel()
    assert (limits["plan_code"], limit_of(next_request)) == ("pro", b"100")


def quota_settings(fake: FakeLago, redis_url: str) -> BillingSettings:
    return settings_for(fake, redis_url=redis_url)


async def test_invalidate_all_during_a_cold_orgs_first_refresh_still_stores_a_snapshot(redis_url: str) -> None:
    """A ``plan.updated`` webhook (``invalidate_all``) reaches a worker while it reads a cold org's first snapshot.
    The gate marks the refresh stale, so it reads again "under a new lock", but ``invalidate_all`` only frees the
    locks of orgs that have a snapshot key (SCAN ``*:snap``): this org's lock is still the refresher's own, held
    for a whole TTL, so ``try_lock`` refuses it, the refresh stores nothing and waits ``cold_timeout`` for a
    snapshot that nobody will store. The waiting request times out (fail-open/closed), and every refresh of the org
    is refused by that stale lock until the TTL (here an hour) is over. Before 776413c..1be6b9e it read again and
    stored."""
    fake = make_fake()
    settings = quota_settings(fake, redis_url)
    config = QuotaConfig(redis_prefix=f"review:{uuid.uuid4().hex}:", cold_timeout=0.5)
    held = HeldTransport(fake.transport())
    async with LagoClient(settings, transport=held) as lago:
        gate = QuotaGate(settings, lago, config=config)
        async with anyio.create_task_group() as tg:
            await tg.start(gate.run)
            decisions: list[Any] = []
            answered = anyio.Event()

            async def first_request() -> None:
                decisions.append(await gate.check("org_acme"))  # cold: reads the org from Lago
                answered.set()

            held.hold()
            tg.start_soon(first_request)
            await held.reached.wait()  # the subscription is read; the refresh goes on
            await gate.invalidate_all()  # plan.updated: every org's cached state is refreshed
            held.release.set()
            with anyio.fail_after(10):
                await answered.wait()
                for event in list(gate._refreshing.values()):
                    await event.wait()
            stored = await gate.backend.load("org_acme")
            lock = await gate.backend.redis.get(gate.backend.key("org_acme", "lock"))  # type: ignore[attr-defined]
            await gate.aclose()
            tg.cancel_scope.cancel()
    assert stored is not None, (
        f"no snapshot stored after the refresh (cold_timeouts={gate.stats['cold_timeouts']}, "
        f"fail_open={gate.stats['fail_open']}, lock left {lock!r})"
    )
    assert gate.stats["cold_timeouts"] == 0 and gate.stats["fail_open"] == 0
    assert limit_of(decisions[0]) == b"3"


async def test_seed_helper_read_in_one_worker_does_not_undo_an_invalidation_in_another(redis_url: str) -> None:
    """Two workers sharing Redis. Worker B serves a billing page (``get_org_plan_limits``: ``QuotaGate.snapshot``)
    and has just read the org's starter subscription when the org upgrades; the subscription webhook reaches worker
    A, whose gate invalidates the org fleet-wide. B's seed-helper read then stores what it read before the change:
    it holds no refresh lock, so STORE skips the new "lock no longer its own" rule (ARGV[10] empty) and the
    ``_stale`` re-read only sees invalidations made in B itself. The whole fleet enforces starter's limit after the
    upgrade for a TTL (the race 776413c..1be6b9e fixed for refreshes and, in one process only, for seed helpers)."""
    fake = make_fake()
    settings = quota_settings(fake, redis_url)
    config = QuotaConfig(redis_prefix=f"review:{uuid.uuid4().hex}:")
    held = HeldTransport(fake.transport())
    async with (
        LagoClient(settings, transport=fake.transport()) as lago_a,
        LagoClient(settings, transport=held) as lago_b,
    ):
        gate_a = QuotaGate(settings, lago_a, config=config)
        gate_b = QuotaGate(settings, lago_b, config=config)
        async with anyio.create_task_group() as tg:
            await tg.start(gate_a.run)
            await tg.start(gate_b.run)
            answered = anyio.Event()
            page: list[dict[str, Any]] = []

            async def billing_page_on_worker_b() -> None:
                page.append(await gate_b.get_org_plan_limits("org_acme"))
                answered.set()

            held.hold()
            tg.start_soon(billing_page_on_worker_b)
            await held.reached.wait()  # B has read the starter subscription
            await lago_a.create_subscription(external_customer_id="org_acme", plan_code="pro", external_id="org_acme")
            await gate_a.invalidate("org_acme")  # the subscription webhooks, on worker A
            held.release.set()
            with anyio.fail_after(10):
                await answered.wait()
            next_request = await gate_a.check("org_acme")
            await gate_a.aclose()
            await gate_b.aclose()
            tg.cancel_scope.cancel()
    assert limit_of(next_request) == b"100", "the next request after the upgrade's webhook still has starter's limit"


# ------------------------------------------------------------------------------------------ JWT key


def _key_pair() -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


async def test_rotated_key_that_cannot_be_fetched_is_503_not_a_rejected_signature(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Lago rotated its webhook key and its public-key endpoint fails (503) when the first webhook signed with the
    new key arrives. The docstring promises "503 Lago's public key could not be fetched"; the receiver answers
    401 invalid_signature, counts a rejected (forged) webhook and logs "does not verify", sending the operator
    after a forgery or a wrong issuer rather than Lago's availability."""
    old_private, old_public = _key_pair()
    new_private, new_public = _key_pair()
    lago = {"status": 200, "public": old_public}

    def key_endpoint(request: httpx.Request) -> httpx.Response:
        if lago["status"] != 200:
            return httpx.Response(503, json={"status": 503, "error": "Service Unavailable"})
        return httpx.Response(200, json={"webhook": {"public_key": base64.b64encode(lago["public"]).decode()}})  # type: ignore[arg-type]

    settings = BillingSettings(api_url="http://lago.test", api_key="api-key", max_retries=0)
    async with LagoClient(settings, transport=httpx.MockTransport(key_endpoint)) as client:
        receiver = LagoWebhooks(client=client, key_refetch_interval=0, organization_id="lago-org")
        transport = httpx.ASGITransport(app=receiver_app(receiver))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:

            async def deliver(private: bytes) -> httpx.Response:
                body = json.dumps(
                    {
                        "webhook_type": "invoice.created",
                        "object_type": "invoice",
                        "organization_id": "lago-org",
                        "invoice": {"lago_id": str(uuid.uuid4())},
                    },
                    separators=(",", ":"),
                ).encode()
                token = jwt.encode({"data": body.decode(), "iss": "http://lago.test"}, private, algorithm="RS256")
                headers = {"X-Lago-Signature": token, "X-Lago-Signature-Algorithm": "jwt"}
                return await http.post("/webhooks/lago", content=body, headers=headers)

            assert (await deliver(old_private)).status_code == 200  # the first key, fetched and cached
            lago.update(status=503, public=new_public)  # Lago rotates its key; its key endpoint fails for now
            response = await deliver(new_private)
    assert (response.status_code, response.json()["status"]) == (503, "public_key_unavailable")
    assert receiver.stats["rejected"] == 0


async def test_aclose_closes_the_redis_dedupe_made_from_lago_redis_url(redis_url: str) -> None:
    """``aclose()`` (also run on the receiver's lifespan shutdown) is documented to "close the Redis connection this
    receiver created", but closes it only when ``redis_url=`` was passed: with LAGO_REDIS_URL (settings.redis_url,
    the README's setup) the RedisDedupe it made keeps its connections open (ResourceWarning: unclosed Connection)."""
    settings = BillingSettings(api_url="http://lago.test", webhook_hmac_key=HMAC_KEY, redis_url=redis_url)
    receiver = LagoWebhooks(settings)
    body = b'{"webhook_type":"invoice.created","object_type":"invoice","organization_id":"o","invoice":{}}'
    headers = {"X-Lago-Signature": sign_hmac(body, HMAC_KEY), "X-Lago-Unique-Key": str(uuid.uuid4())}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=receiver_app(receiver)), base_url="http://a"
    ) as http:
        assert (await http.post("/webhooks/lago", content=body, headers=headers)).status_code == 200
    await receiver.aclose()
    pool = receiver._dedupe.redis.connection_pool  # type: ignore[union-attr]
    still_open = [c for c in [*pool._available_connections, *pool._in_use_connections] if c.is_connected]
    for connection in still_open:  # (so that the failure is this assertion, not a ResourceWarning later)
        await connection.disconnect()
    assert still_open == []


# ---------------------------------------------------------------------------------------- billing_routes


@pytest.fixture
async def seats() -> AsyncIterator[tuple[FakeLago, LagoClient, OrgBilling]]:
    """An org billed per seat (unique_count_agg), 3 seats recorded by the app."""
    fake = FakeLago(api_key="test-api-key")
    fake.add_billable_metric("seats", aggregation_type="unique_count_agg", field_name="seat_id")
    charge = {"billable_metric_code": "seats", "charge_model": "standard", "properties": {"amount": "10"}}
    fake.add_plan("team", amount_cents=0, charges=[charge])
    fake.add_customer("org_acme")
    fake.add_subscription("org_acme", "team")
    settings = BillingSettings(api_url=fake.base_url, api_key=fake.api_key, max_retries=0)
    async with LagoClient(settings, transport=fake.transport()) as lago:
        billing = OrgBilling(client=lago)
        for seat in ("s1", "s2", "s3"):
            await billing.record_usage("org_acme", "seats", properties={"seat_id": seat})
        yield fake, lago, billing


async def test_an_org_admin_cannot_lower_its_bill_by_removing_unique_count_items(
    seats: tuple[FakeLago, LagoClient, OrgBilling],
) -> None:
    """POST /usage/record refuses negative property values so that "an org's admin must not lower its own bill"
    (CHANGELOG, _routes.py). Lago's unique_count_agg metrics (seats, projects...) take ``operation_type: "remove"``
    to drop an item: the org's admin posts that for seats the app recorded and its bill goes down (3 seats -> 2)."""
    _, lago, billing = seats
    before = await lago.get_current_usage("org_acme", "org_acme")
    router = billing_routes(billing, authorize=lambda request, org_id: org_id == "org_acme")  # the org's own admin
    app = Starlette(routes=[Mount("/billing", app=router)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
        response = await http.post(
            "/billing/organizations/org_acme/usage/record",
            json={"event_code": "seats", "properties": {"seat_id": "s1", "operation_type": "remove"}},
        )
    after = await lago.get_current_usage("org_acme", "org_acme")
    assert int(after["amount_cents"]) >= int(before["amount_cents"]), (
        f"answered {response.status_code}; the org's usage went from {before['amount_cents']} to "
        f"{after['amount_cents']} cents"
    )
    assert response.status_code == 422
