"""Endpoint attribution (the ``endpoint`` and ``method`` properties of each event).

* the ``method`` property is the client's, kept whole: a server speaking h11 (``uvicorn --http h11``, hypercorn)
  passes on any token as the method, up to its 16 KB request-line limit. An app billing whatever method it is sent
  (an app without Starlette routing, a mounted ``StaticFiles``' 405) kept a 16 KB method in every waiting event and in
  the per-(org, endpoint, method) head cache, where raw paths are cut at 1,024 characters for that very reason;
* a root_path the app sets itself, inside the billing middleware (``FastAPI(root_path=...)`` wrapped as the README
  shows for ``OrgBilling(middleware=...)``): the concrete values of its mounts' parameters (a tenant's id) were
  billed in the endpoint, ``/api/m/acme/x/{xid}``, and its own routes under the prefix.
"""

from __future__ import annotations

import warnings
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from lago_org_billing import BillingSettings, OrgBillingMiddleware

pytestmark = pytest.mark.anyio

ORG = {"X-Org-Id": "org_a"}


def billed(fake_lago: Any) -> list[tuple[str, str, int]]:
    return [
        (e["properties"]["method"], e["properties"]["endpoint"], e["properties"]["status_code"])
        for e in fake_lago.events
    ]


async def bare_app(scope: Scope, receive: Receive, send: Send) -> None:
    """An app without Starlette routing: answers every method."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.parametrize("app_kind", ["bare ASGI app", "mounted StaticFiles"])
async def test_a_client_chosen_16kb_method_is_not_kept_whole_in_events_and_the_head_cache(
    fake_lago: Any, header_settings: BillingSettings, tmp_path: Any, app_kind: str
) -> None:
    """h11 takes any token as the method (15,000 characters went through uvicorn --http h11): each such request held
    its method whole in the event waiting for Lago and in ``_heads`` (10,000 entries of 2 x 16 KB: 320 MB), as a raw
    path did before it was cut at 1,024 characters."""
    if app_kind == "bare ASGI app":
        app: Any = bare_app
        path = "/v1/chat"
    else:
        (tmp_path / "a.txt").write_text("x")
        app = Starlette(routes=[Mount("/static", app=StaticFiles(directory=tmp_path))])
        path = "/static/a.txt"
    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    methods = [f"M{i}" + "X" * 16_000 for i in range(3)]
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            for method in methods:
                await http.request(method, path, headers=ORG)
        assert await middleware.pipeline.flush(5)
        heads = dict(middleware._heads)
    finally:
        await middleware.aclose()
    events = billed(fake_lago)
    assert len(events) == 3
    assert max(len(method) for method, _, _ in events) <= 1024, "a client's 16 KB method billed whole"
    assert max((len(key[2]) for key in heads), default=0) <= 1024, "a client's 16 KB method kept in _heads"


async def test_a_root_path_the_app_sets_itself_never_bills_a_mounts_concrete_values(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """``FastAPI(root_path="/api")`` served wrapped (``asgi_app = OrgBillingMiddleware(app)``, as the README shows
    for ``OrgBilling(middleware=...)``): FastAPI sets ``scope["root_path"]`` itself, inside the billing middleware.
    The mount's tenant was billed in the endpoint (``/api/m/acme/x/{xid}``, one endpoint per tenant) and the route
    under the prefix (``/api/items/{iid}``); with ``app.add_middleware`` the same app bills ``/items/{iid}`` and
    ``/m/{tenant}/x/{xid}``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (FastAPI 0.16x deprecates root_path=, still honoured)
        api = FastAPI(root_path="/api")
    sub = FastAPI()

    @sub.get("/x/{xid}")
    async def x(xid: str) -> dict[str, str]:
        return {"xid": xid}

    @api.get("/items/{iid}")
    async def item(iid: int) -> dict[str, int]:
        return {"iid": iid}

    api.mount("/m/{tenant}", sub)
    middleware = OrgBillingMiddleware(api, settings=header_settings, transport=fake_lago.transport())
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            for path in ("/api/items/1", "/api/m/acme/x/9", "/api/m/globex/x/9"):  # (the proxy keeps /api)
                assert (await http.get(path, headers=ORG)).status_code == 200
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    endpoints = [endpoint for _, endpoint, _ in billed(fake_lago)]
    assert not any("acme" in e or "globex" in e for e in endpoints), endpoints  # (a tenant's id in the endpoint)
    assert endpoints == ["/items/{iid}", "/m/{tenant}/x/{xid}", "/m/{tenant}/x/{xid}"]
