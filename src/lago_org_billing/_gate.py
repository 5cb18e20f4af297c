"""What the middleware asks of a quota gate, and the decision it gets back.

The middleware calls ``gate.check(org_id)`` before the app runs (awaiting its answer unless that is the decision
itself; a blocked request never reaches the app), adds ``decision.headers`` to the response of an allowed one, and
calls ``gate.settle(...)`` once the response is over, then once more for the request's tokens when its event is
built. ``_quota.QuotaGate`` is the implementation; anything with these methods works.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable
from typing import Any, Protocol

import anyio
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from ._errors import ConfigurationError, InvalidRequestError, QuotaExceededError
from ._identity import billing_scope, publish_identity

__all__ = ["QuotaDecision", "QuotaGateProtocol", "require_quota"]


@dataclasses.dataclass(slots=True)
class QuotaDecision:
    """The gate's answer for one request (read it, do not change it: one is made per request, so it is a plain
    slotted object rather than a frozen one, which costs a microsecond more to build).

    * **allowed** - False only when the request must be answered with ``status`` instead of reaching the app
      (``enforce`` mode). In ``monitor`` mode it is True and ``would_block`` says what enforce would do.
    * **status** - 402 (no active subscription) or 429/402 (over a limit) for a blocked request.
    * **headers** - response headers (``RateLimit-*``, ``Retry-After``) as ASGI byte pairs, added to the answer
      whether allowed or blocked.
    * **problem** - the RFC 9457 body of a blocked request (``type``, ``title``, ``status``, ``detail``, plus
      ``org_id``, ``limit_name``, ``limit``, ``usage``...).
    * **reserved** - whether one call was counted for this request (``settle`` releases it if not billed).
    """

    allowed: bool = True
    status: int | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()
    problem: dict[str, Any] | None = None
    would_block: bool = False
    reserved: bool = False

    def response(self) -> JSONResponse:
        """The answer to send instead of calling the app."""
        status = self.status or 429
        body = self.problem or {"type": "about:blank", "title": "Quota exceeded", "status": status}
        response = JSONResponse(body, status_code=status, media_type="application/problem+json")
        for name, value in self.headers:
            response.headers.append(name.decode("latin-1"), value.decode("latin-1"))
        return response


class QuotaGateProtocol(Protocol):
    """The quota gate the middleware drives."""

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Background work (snapshot refreshes), started next to the delivery pipeline."""

    def check(self, org_id: str) -> Awaitable[QuotaDecision] | QuotaDecision:
        """Decide before the app runs; reserve one call when allowed. No network once the org is cached. An
        ``async def check`` (as :class:`QuotaGate`'s), or a plain one answering a :class:`QuotaDecision` at once or
        an awaitable of one (a wrapper delegating to another gate's ``check``)."""

    # Optional: ``check_now(org_id) -> QuotaDecision | None``, the same decision without a coroutine when it
    # needs no I/O (``None``: call ``check``). The middleware uses it when the gate has it.

    def settle(self, org_id: str, decision: QuotaDecision, *, tokens: int, billed: bool) -> None:
        """After the response: count ``tokens``; release the reserved call when the request was not billed.
        Synchronous and non-blocking. The middleware calls it when the response is over (with the request's
        decision, ``tokens=0``) and, once the event is built, again for the tokens (with an empty
        ``QuotaDecision()`` and ``billed=False``)."""

    async def aclose(self) -> None:
        """Stop background work."""


async def require_quota(request: HTTPConnection) -> QuotaDecision | None:
    """Check the org's quota from inside the app, for apps that know the org only there (auth in a FastAPI
    dependency)::

        @app.post("/v1/chat", dependencies=[Depends(authenticate), Depends(require_quota)])

    The middleware gates a request before the app runs when it can resolve the org then; when it cannot, this
    does the same check once your auth has made the org known to the middleware's resolvers
    (``request.state.org_id``...): it reserves one call, and over quota (or without an active subscription) raises
    :class:`QuotaExceededError`, which the middleware answers with the gate's 429/402, headers and problem body, as
    it would have before the app ran. Returns the decision (``None``: gating is off, the middleware gated the request
    already as that org, or no org). Needs ``OrgBillingMiddleware`` around the app. Its only parameter is the request,
    so as a FastAPI dependency it takes nothing from the client.

    A request the middleware gated before the app ran as another org than the one your auth sets now (the client
    named it in ``LAGO_ORG_HEADER``, the auth found the caller's own) is gated again as the org the auth set, which it
    is billed to: over that org's limits it is refused as above (a caller over its limit is not served by naming an
    org with quota left); allowed, that org's call is counted (the other org's released) and the answer carries its
    ``RateLimit-*`` headers.

    On a WebSocket connection (an ``APIRouter``'s ``dependencies=[...]`` cover its websocket routes too) it does
    nothing and returns ``None``: WebSocket sessions pass through the middleware unbilled and ungated. (Typed
    ``HTTPConnection`` so that FastAPI passes the connection for both: typed ``Request``, it failed every websocket
    route it covered with a ``TypeError``.)"""
    if not isinstance(request, HTTPConnection):
        raise InvalidRequestError(
            "require_quota(request) takes the request (a starlette Request, as FastAPI passes it to "
            f"Depends(require_quota)), got {type(request).__name__}: wrap a scope as Request(scope)."
        )
    billing = billing_scope(request)
    if billing is None:
        if request.scope.get("type") == "websocket":
            return None
        raise ConfigurationError(
            "require_quota() needs OrgBillingMiddleware around the app, and an HTTP request (none saw this one)."
        )
    known = billing.get("decision")
    if known is not None:  # checked already (a second dependency, a sub-dependency...)
        return known  # type: ignore[no-any-return]
    gated, middleware = billing.get("gated"), billing.get("middleware")
    if gated is not None and middleware is not None:  # gated before the app ran: as the org the auth set now?
        return await middleware._gate_again(request.scope, billing, gated)  # type: ignore[no-any-return]
    # The billing middlewares that had no org before the app ran, innermost first (none: gating off, done before
    # the app ran, or an excluded path): the first whose resolvers know the org now gates it, with its own gate.
    for middleware in list(billing.get("waiting", ())):
        org_id, user_id = await middleware._resolve(request.scope)
        if org_id is not None:
            break
    else:
        return None
    if not middleware._claim(billing):  # another billing middleware bills (and gated) it
        return None
    gate = middleware.quota
    if gate is None:
        return None
    checked = gate.check(org_id)
    decision = checked if isinstance(checked, QuotaDecision) else await checked
    billing["decision"], billing["decision_org"] = decision, org_id
    # Known from now on: get_current_org(request), request.state.billing_org_id (and the RateLimit-* headers of
    # an allowed answer are added to it)
    publish_identity(request.scope, billing, org_id, user_id)
    if not decision.allowed:
        raise QuotaExceededError(org_id, decision)
    return decision
