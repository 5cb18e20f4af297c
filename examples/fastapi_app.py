r"""The seed's example app rebuilt on the package.

Org creation subscribes the org, the middleware bills every call, Lago's webhooks keep the quota cache fresh,
and the seed's billing endpoints are mounted behind an authorization callback.

    lago-org-billing emulator --api-key dev-key --seed examples/seed.json
    LAGO_API_URL=http://127.0.0.1:3000 LAGO_API_KEY=dev-key uvicorn examples.fastapi_app:app --port 8000

    curl -X POST localhost:8000/organizations -H 'Authorization: Bearer :ada' -H 'Content-Type: application/json' \
        -d '{"org_id": "org_acme", "name": "Acme", "email": "billing@acme.test", "plan_code": "starter"}'
    curl -X POST localhost:8000/v1/chat -H 'Authorization: Bearer org_acme:ada'
    curl localhost:8000/api/v1/billing/org/organizations/org_acme/dashboard -H 'Authorization: Bearer org_acme:ada'

Authentication here is a toy (``Bearer <org>:<user>``) standing in for yours: whatever it is, it sets
``request.state.org_id`` / ``user_id``, and the middleware bills that org.

Quota: the seed's ``free`` plan allows 5 calls per period (a Lago entitlement). Create an org on it (the first curl
with ``"org_id": "org_tiny", "plan_code": "free"``): its sixth ``/v1/chat`` is a 429 with ``Retry-After``. To see
Lago's webhooks unblock it, tell the emulator where to send them (once per emulator start):
``curl -X PUT localhost:3000/_emulator/webhooks -d '{"url": "http://127.0.0.1:8000/webhooks/lago"}'``; then upgrade
the org: ``curl -X PUT localhost:8000/api/v1/billing/org/organizations/org_tiny/subscription
-H 'Authorization: Bearer org_tiny:ada' -H 'Content-Type: application/json' -d '{"plan_code": "starter"}'``, and its
next call is a 200 (``curl localhost:3000/_emulator/webhooks`` lists the deliveries).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from lago_org_billing import (
    BillingSettings,
    InvalidRequestError,
    LagoIntegrationError,
    LagoNotFoundError,
    LagoRateLimitError,
    LagoUnavailableError,
    LagoValidationError,
    LagoWebhooks,
    OrgBilling,
    OrgBillingMiddleware,
    attribute_usage,
    billing_routes,
)

# Neither billed nor gated: org creation (the caller has no org yet), Lago's webhook calls, and the billing
# routes (an org over its quota must still see its dashboard and upgrade its plan); added to LAGO_EXCLUDE_PATHS.
settings = BillingSettings.from_env()
settings = settings.replace(exclude_paths=(*settings.exclude_paths, "/organizations", "/webhooks/", "/api/v1/billing/"))


class ToyAuth:
    """Stands in for your auth layer: sets request.state.org_id / user_id from ``Bearer <org>:<user>``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            token = dict(scope["headers"]).get(b"authorization", b"").decode().removeprefix("Bearer ")
            org_id, _, user_id = token.partition(":")
            state = scope.setdefault("state", {})
            state["org_id"], state["user_id"] = org_id or None, user_id or None
        await self.app(scope, receive, send)


def may_manage(request: Request, org_id: str) -> bool:
    """The billing routes' authorization: only members of the org (your real check goes here)."""
    return getattr(request.state, "org_id", None) == org_id


billing_router = billing_routes(authorize=may_manage, settings=settings)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with OrgBilling(settings) as billing:
        app.state.billing = billing
        yield
    await billing_router.aclose()  # a Mount does not forward lifespan events


app = FastAPI(lifespan=lifespan)
app.add_middleware(OrgBillingMiddleware, settings=settings)  # runs after ToyAuth (added last = outermost)
app.add_middleware(ToyAuth)
app.add_route("/webhooks/lago", LagoWebhooks(settings), methods=["POST"])
app.mount("/api/v1/billing/org", billing_router)


@app.exception_handler(LagoIntegrationError)
async def billing_error(request: Request, exc: Exception) -> JSONResponse:
    """The caller's mistake (an org id Lago cannot take, such as 'acme.com'; a plan Lago does not have) is a 422
    that says why; Lago down or throttling is a 503 to retry. Anything else stays a 500 (a misconfiguration)."""
    if isinstance(exc, InvalidRequestError):
        return JSONResponse({"detail": str(exc)}, status_code=422)
    if isinstance(exc, (LagoNotFoundError, LagoValidationError)):
        return JSONResponse({"detail": "Lago rejected the request.", "code": exc.code}, status_code=422)
    if isinstance(exc, (LagoUnavailableError, LagoRateLimitError)):
        return JSONResponse(
            {"detail": "Lago is unavailable; retry later."}, status_code=503, headers={"Retry-After": "5"}
        )
    raise exc


class OrgCreate(BaseModel):
    org_id: str
    name: str
    email: str
    plan_code: str = "starter"


@app.post("/organizations")
async def create_organization(data: OrgCreate, request: Request) -> dict[str, Any]:
    billing: OrgBilling = request.app.state.billing
    user_id = getattr(request.state, "user_id", None)
    result = await billing.subscribe_org_to_plan(data.org_id, data.plan_code, data.name, data.email, user_id)
    return {"org_id": data.org_id, "subscription": result["subscription"]["lago_id"]}


@app.post("/v1/chat")
async def chat(request: Request) -> dict[str, Any]:
    if getattr(request.state, "org_id", None) is None:
        raise HTTPException(401, "authenticate with Bearer <org>:<user>")
    attribute_usage(request, model="gpt-4o-mini", input_tokens=12, output_tokens=30)
    return {"choices": [{"message": {"role": "assistant", "content": "Hello!"}}]}
