"""Seeded differential tests: the route template each request is billed under, on random Starlette and FastAPI apps.

Each seed builds a random app: a ``Starlette`` app, a ``FastAPI`` app or a bare ``Router`` (in middlewares of its
own) at the top; nested ``Mount`` s of routes, of routers (``redirect_slashes`` on or off), of Starlette and FastAPI
sub-apps (with middlewares of their own), of routers inside pure ASGI middlewares, of apps that are not routers
(static-like); ``Host`` routes; path converters (str, int, float, uuid, path) in routes and mounts; FastAPI
``APIRouter`` s with prefixes included with prefixes and dependencies (nested, some included twice), Starlette routes
and mounts in them; WebSocket routes beside HTTP ones; routes with and without trailing slashes; endpoints answering
200/201, redirects, 503, or raising ``HTTPException`` (404, 400, 405, 401); FastAPI's 422 for a path parameter of the
wrong type; a middleware of the app answering before its routing (``X-Short``); CORS, GZip, ``BaseHTTPMiddleware``
and pure ASGI middlewares. ``OrgBillingMiddleware`` is put around the app (sometimes emulating Starlette before 1.7,
which leaves no ``scope["route"]``) or added inside it as its outermost middleware; the server's ``root_path`` is
empty or ``/gw``. Then random requests, driven by hand as an ASGI server would send them (``raw_path`` percent-encoded,
``path`` decoded): paths that match, near misses (trailing slashes, dot segments sent as is or as ``%2e``, double
slashes, percent-encoded letters, a segment dropped or added, values of the wrong type), other methods, HEAD, OPTIONS,
CORS preflights, WebSocket sessions.

The oracle is independent of the code under test: every endpoint (every FastAPI route, through a dependency of its
own that runs even when its parameters fail validation; every app mounted that is not a router; every middleware
answering before routing) records itself when it runs, with the markers of the shared mounts and the inclusions it
ran through; the test knows from the model it built the full template of each (mounts' and inclusions' prefixes put
in front, as declared), so:

* a request something recorded is billed exactly once (unless a 5xx or a 401, not billed by default) under that
  template and that status: never the raw path with its ids, never another route's template, never ``<unmatched>``
  when a route matched (a middleware's answer before any routing at the top is ``<unmatched>``; under a mount it is
  the mount's ``/{path}``, as a mounted app's);
* a request nothing recorded is the routing's own answer (404, 405, a ``redirect_slashes`` 307, a CORS preflight's)
  and is not billed; WebSocket sessions are never billed.

A failing seed prints the app's model and the request; replay it by its test id. A defect a seed found is kept below
as a named case.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import random
import re
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import anyio
import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.exceptions import FastAPIError
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Host, Mount, Route, Router, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from test_asgi_extensions_and_hosts import StarletteBefore17

pytestmark = pytest.mark.anyio

UNMATCHED = "<unmatched>"
SEEDS = 100
REQUESTS = 80  # per seed
USAGE = {"model": "gpt-4o-mini", "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}
WORDS = ("v1", "v2", "api", "items", "chat", "users", "files", "models", "orgs", "jobs", "a", "b")
#: Concrete values of a path parameter by its converter, as sent (percent-encoded where they are).
VALUES: dict[str, tuple[str, ...]] = {
    "": ("abc", "x1", "caf%C3%A9", "a%20b", "%2e%2e", "..", ".", "A-B_c~", "%41bc", "42", "q%3Fr", "1.5"),
    ":str": ("abc", "caf%C3%A9", "%2E", "7", "with%25pct"),
    ":int": ("0", "42", "007", "1234567890"),
    ":float": ("1.5", "3", "0.25", "10.0"),
    ":path": ("a", "a/b/c", "", "x%2Fy", "..%2F..", "deep/er/", "f.txt"),
}
BEHAVIOURS = ("ok",) * 8 + (
    "created",
    "raise404",
    "raise400",
    "raise405",
    "raise401",
    "redirect307",
    "redirect302",
    "e503",
)
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
GARBAGE = ("/", "/nope", "/wp-admin/x.php", "/%2e%2e/etc/passwd", "/v1", "/v1/", "/api/", "//", "/a/b/c/d/e")
STATIC_FILES = {"/a.txt", "/d/b.css"}
PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:[a-z]+)?\}")


# ------------------------------------------------------------------------------------------------------ the model


@dataclasses.dataclass
class Leaf:
    """What answers a request and records itself: a route, an app mounted that is not a router, a middleware."""

    id: str
    kind: str  # "route" (Starlette), "api" (FastAPI), "ws", "static" (a mounted app, not a router), "short"
    path: str  # as declared (a static's: its mount's path; a short's: "")
    methods: tuple[str, ...]
    behaviour: str


@dataclasses.dataclass
class Body:
    """The routes of a router (and the leaves of its app's middlewares answering before it)."""

    nodes: list[Any]  # Leaf | Group
    api_only: bool = True  # only FastAPI routes (and included routers of them): can be included twice


@dataclasses.dataclass
class Group:
    """A mount, a host or an inclusion, and what is under it."""

    kind: str  # "routes", "router", "starlette", "fastapi", "wrapped", "host", "include"
    path: str  # the template it puts in front ("" for a host); an inclusion's: its prefix and its router's
    host: str | None
    marker: str | None  # what it adds to the trail: a shared mount's wrapper, an inclusion's dependency
    body: Body


@dataclasses.dataclass
class Target:
    """A leaf reachable from the top, with its full template (what requests are made from)."""

    template: str
    host: str | None
    leaf: Leaf


def show(node: Any, indent: str = "") -> str:
    """The model, readable (a failing seed prints it)."""
    if isinstance(node, Leaf):
        return f"{indent}{node.kind} {node.id} {node.path!r} {list(node.methods)} {node.behaviour}\n"
    if isinstance(node, Body):
        return "".join(show(child, indent) for child in node.nodes)
    head = f"{indent}{node.kind} {node.path!r}" + (f" host={node.host}" if node.host else "")
    return head + (f" [{node.marker}]" if node.marker else "") + "\n" + show(node.body, indent + "  ")


# ------------------------------------------------------------------------------------------------------ the app


class Passthrough:
    """A pure ASGI middleware of the app's own that passes everything on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class Marked:
    """A shared router's wrapper under one of its mounts: adds its marker to the request's trail."""

    def __init__(self, app: ASGIApp, *, build: Build, marker: str) -> None:
        self.app, self.build, self.marker = app, build, marker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.build.trail.append(self.marker)
        await self.app(scope, receive, send)


class ShortCircuit:
    """A middleware of the app answering before its routing (a request with ``X-Short``), recording itself."""

    def __init__(self, app: ASGIApp, *, build: Build, leaf: str, status: int) -> None:
        self.app, self.build, self.leaf, self.status = app, build, leaf, status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and any(name == b"x-short" for name, _ in scope["headers"]):
            self.build.record(self.leaf)
            await Response(b"short", status_code=self.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def tagged(request: Request, call_next: RequestResponseEndpoint) -> Response:
    response = await call_next(request)
    response.headers["x-tagged"] = "1"
    return response


def answer(behaviour: str) -> Response:
    """What an endpoint answers (or raises) for its drawn behaviour."""
    if behaviour.startswith("raise"):
        raise HTTPException(int(behaviour[5:]), "the endpoint's own")
    if behaviour.startswith("redirect"):
        return RedirectResponse("/elsewhere", status_code=int(behaviour[8:]))
    if behaviour == "e503":
        return Response(b"down", status_code=503)
    return JSONResponse(USAGE, status_code=201 if behaviour == "created" else 200)


class Build:
    """One seed's random app: the ASGI app, its model, and what ran for the request being served."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.counter = itertools.count()
        self.ran: list[tuple[str, tuple[str, ...]]] = []
        self.trail: list[str] = []
        self.shared_routers: list[tuple[Body, Router]] = []
        self.shared_api_routers: list[tuple[Body, APIRouter, str]] = []
        self.fastapi = False
        self.cors_inside = False  # a CORSMiddleware anywhere in the app
        self.cors_top = False  # one among the top app's middlewares: every preflight passes through unbilled

    def record(self, leaf: str) -> None:
        self.ran.append((leaf, tuple(sorted(self.trail))))

    def mark(self, marker: str) -> Callable[[Request], None]:
        def dependency(request: Request) -> None:
            if marker.startswith("i"):
                self.trail.append(marker)
            else:
                self.record(marker)

        return dependency

    def name(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter)}"

    # ---------------------------------------------------------------------------------------------- paths

    def segment(self, params: bool, convertors: tuple[str, ...]) -> str:
        if params and self.rng.random() < 0.4:
            return "{" + self.name("p") + self.rng.choice(convertors) + "}"
        return self.rng.choice(WORDS)

    def leaf_path(self) -> str:
        count = self.rng.choice((0, 1, 1, 2, 2, 3))
        convertors = ("", "", ":str", ":int", ":float", ":uuid")
        segments = [self.segment(True, convertors) for _ in range(count)]
        if segments and self.rng.random() < 0.2:
            segments[-1] = "{" + self.name("p") + ":path}"
        path = "/" + "/".join(segments)
        if segments and not path.endswith(":path}") and self.rng.random() < 0.2:
            path += "/"
        return path

    def mount_path(self) -> str:
        if self.rng.random() < 0.08:
            return ""
        count = self.rng.choice((1, 1, 2))
        return "/" + "/".join(self.segment(True, ("", "", ":int", ":uuid")) for _ in range(count))

    # ---------------------------------------------------------------------------------------------- leaves

    def behaviour(self) -> str:
        return self.rng.choice(BEHAVIOURS)

    def starlette_route(self) -> tuple[Leaf, BaseRoute]:
        leaf_id, path, behaviour = self.name("r"), self.leaf_path(), self.behaviour()
        if self.rng.random() < 0.12:
            leaf = Leaf(self.name("w"), "ws", path, (), "ok")

            async def session(websocket: WebSocket) -> None:
                await websocket.accept()
                await websocket.send_text("hi")
                await websocket.close()

            return leaf, WebSocketRoute(path, session)
        methods = self.rng.choice((None, ("GET",), ("POST",), ("GET", "POST"), ("PUT", "DELETE"), ("OPTIONS", "GET")))
        if self.rng.random() < 0.15:  # a class-based endpoint: the route takes every method, the class answers 405
            handlers = self.rng.choice((("get",), ("post",), ("get", "put"), ("delete",)))

            async def handler(endpoint: HTTPEndpoint, request: Request) -> Response:
                self.record(leaf_id)
                return answer(behaviour)

            view = type(f"View{leaf_id}", (HTTPEndpoint,), dict.fromkeys(handlers, handler))
            taken = tuple(sorted({name.upper() for name in handlers} | ({"HEAD"} if "get" in handlers else set())))
            return Leaf(leaf_id, "route", path, taken, behaviour), Route(path, view)

        async def endpoint(request: Request) -> Response:
            self.record(leaf_id)
            return answer(behaviour)

        route = Route(path, endpoint, methods=list(methods) if methods else None)
        return Leaf(leaf_id, "route", path, tuple(sorted(route.methods or ())), behaviour), route

    def static(self) -> tuple[Leaf, Mount]:
        leaf_id, path = self.name("s"), self.mount_path() or "/static"

        async def files(scope: Scope, receive: Receive, send: Send) -> None:
            self.record(leaf_id)
            inner = scope["path"][len(scope.get("root_path", "")) :]
            found = inner in STATIC_FILES
            await Response(b"file" if found else b"missing", status_code=200 if found else 404)(scope, receive, send)

        return Leaf(leaf_id, "static", path, ("GET", "HEAD"), "ok"), Mount(path, app=files)

    def api_route(self, router: APIRouter | FastAPI) -> Leaf:
        leaf_id, path, behaviour = self.name("f"), self.leaf_path(), self.behaviour()
        methods = self.rng.choice((("GET",), ("POST",), ("GET", "POST"), ("PUT",), ("DELETE", "PATCH")))
        parameters = [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)]
        for name, convertor in PARAM.findall(path):
            if convertor == ":int" or (not convertor and self.rng.random() < 0.3):
                annotation: type = int  # a value of another type: FastAPI's own 422, its route matched
            elif convertor == ":float":
                annotation = float
            elif convertor == ":uuid":
                annotation = uuid.UUID
            else:
                annotation = str
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation))

        async def endpoint(request: Request, **values: Any) -> Response:
            return answer(behaviour)

        endpoint.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        prefix = getattr(router, "prefix", "")  # (APIRouter(prefix=...) puts it in front of the path)
        router.add_api_route(path, endpoint, methods=list(methods), dependencies=[Depends(self.mark(leaf_id))])
        return Leaf(leaf_id, "api", prefix + path, methods, behaviour)

    # ---------------------------------------------------------------------------------------------- middlewares

    def middlewares(self, top: bool = False) -> tuple[list[tuple[Any, dict[str, Any]]], list[Leaf]]:
        """Middlewares of an app (outermost first) and the leaves of those answering before its routing."""
        chosen: list[tuple[Any, dict[str, Any]]] = []
        leaves: list[Leaf] = []
        for _ in range(self.rng.choice((0, 0, 1, 1, 2))):
            kind = self.rng.choice(("pass", "base", "gzip", "cors", "short"))
            if kind == "pass":
                chosen.append((Passthrough, {}))
            elif kind == "base":
                chosen.append((BaseHTTPMiddleware, {"dispatch": tagged}))
            elif kind == "gzip":
                chosen.append((GZipMiddleware, {"minimum_size": 10}))
            elif kind == "cors":
                self.cors_inside = True
                self.cors_top = self.cors_top or top
                chosen.append((CORSMiddleware, {"allow_origins": ["*"], "allow_methods": ["*"]}))
            else:
                leaf = Leaf(self.name("m"), "short", "", (), "ok")
                status = self.rng.choice((200, 202, 409, 418))
                chosen.append((ShortCircuit, {"build": self, "leaf": leaf.id, "status": status}))
                leaves.append(leaf)
        return chosen, leaves

    def wrap(self, app: ASGIApp, middlewares: list[tuple[Any, dict[str, Any]]]) -> ASGIApp:
        for cls, options in reversed(middlewares):
            app = cls(app, **options)
        return app

    # ---------------------------------------------------------------------------------------------- Starlette

    def starlette_body(self, depth: int, hosts: bool = False) -> tuple[Body, list[BaseRoute]]:
        body, routes = Body([], api_only=False), []
        for _ in range(self.rng.randint(1, 4 if depth < 2 else 2)):
            if depth >= 3 or self.rng.random() < 0.5:
                leaf, route = self.starlette_route()
                body.nodes.append(leaf)
                routes.append(route)
                continue
            group, route = self.starlette_group(self.group_kind(hosts), depth)
            body.nodes.append(group)
            routes.append(route)
        return body, routes

    def group_kind(self, hosts: bool) -> str:
        kinds = ["routes"] * 3 + ["router", "starlette", "wrapped", "static"] * 2 + ["fastapi"] + ["host"] * 3 * hosts
        return self.rng.choice(kinds)

    def starlette_group(self, kind: str, depth: int) -> tuple[Any, BaseRoute]:
        """A group in a Starlette router (a leaf for a static mount)."""
        if kind == "static":
            return self.static()
        path = self.mount_path()
        if kind == "host":
            host = self.rng.choice(("api.example.com", "{tenant}.example.org"))
            body, routes = self.starlette_body(depth + 1)
            return Group("host", "", host, None, body), Host(host, app=Router(routes))
        if kind == "routes":
            body, routes = self.starlette_body(depth + 1)
            if self.rng.random() < 0.3:  # a mount's own middlewares (Mount(..., middleware=[...]))
                middlewares, shorts = self.middlewares()
                body.nodes[:0] = shorts
                mount = Mount(path, routes=routes, middleware=[Middleware(cls, **kw) for cls, kw in middlewares])
                return Group("routes", path, None, None, body), mount
            return Group("routes", path, None, None, body), Mount(path, routes=routes)
        if kind == "router":
            body, routes = self.starlette_body(depth + 1)
            router = Router(routes, redirect_slashes=self.rng.random() < 0.8)
            self.shared_routers.append((body, router))  # (mounted again, it is behind a marker)
            return Group("router", path, None, None, body), Mount(path, app=router)
        if kind == "starlette":
            middlewares, shorts = self.middlewares()
            body, routes = self.starlette_body(depth + 1)
            body.nodes[:0] = shorts
            app = Starlette(routes=routes, middleware=[Middleware(cls, **kw) for cls, kw in middlewares])
            return Group("starlette", path, None, None, body), Mount(path, app=app)
        if kind == "fastapi":
            body, app = self.fastapi_app(depth + 1)
            return Group("fastapi", path, None, None, body), Mount(path, app=app)
        # a router in middlewares of its own, under a marker: shared by mounts, some of them
        marker = self.name("k")
        if self.shared_routers and self.rng.random() < 0.5:
            body, router = self.rng.choice(self.shared_routers)
        else:
            body, routes = self.starlette_body(depth + 1)
            router = Router(routes, redirect_slashes=self.rng.random() < 0.8)
            self.shared_routers.append((body, router))
        middlewares, shorts = self.middlewares()
        wrapped = Group("wrapped", path, None, marker, Body([*shorts, Group("routes", "", None, None, body)], False))
        return wrapped, Mount(path, app=Marked(self.wrap(router, middlewares), build=self, marker=marker))

    # ---------------------------------------------------------------------------------------------- FastAPI

    def fastapi_app(self, depth: int) -> tuple[Body, FastAPI]:
        self.fastapi = True
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=self.rng.random() < 0.8)
        middlewares, shorts = self.middlewares(top=depth == 0)
        for cls, options in reversed(middlewares):
            app.add_middleware(cls, **options)
        body = self.fastapi_body(app, depth, hosts=depth == 0)
        body.nodes[:0] = shorts
        return body, app

    def fastapi_body(self, router: APIRouter | FastAPI, depth: int, hosts: bool = False) -> Body:
        body = Body([])
        for _ in range(self.rng.randint(1, 4 if depth < 2 else 2)):
            roll = self.rng.random()
            if depth >= 3 or roll < 0.45:
                body.nodes.append(self.api_route(router))
            elif roll < 0.53:
                leaf, route = self.starlette_route()
                # (an APIRouter's prefix is put in front of its FastAPI routes only: the test puts it here)
                leaf.path = getattr(router, "prefix", "") + leaf.path
                if isinstance(route, WebSocketRoute):
                    (router.router if isinstance(router, FastAPI) else router).add_websocket_route(
                        leaf.path, route.endpoint
                    )
                else:
                    assert isinstance(route, Route)
                    router.add_route(leaf.path, route.endpoint, methods=list(route.methods or ()) or None)
                body.nodes.append(leaf)
                body.api_only = False
            elif roll < 0.83:
                body.nodes.append(self.include(router, depth))
                body.api_only = body.api_only and body.nodes[-1].body.api_only
            else:
                group, route = self.starlette_group(self.group_kind(hosts), depth)
                prefix = getattr(router, "prefix", "")
                if isinstance(route, Host):
                    router.routes.append(route)
                else:
                    assert isinstance(route, Mount)
                    router.mount(prefix + route.path, route.app)
                group.path = prefix + group.path
                body.nodes.append(group)
                body.api_only = False
        return body

    def include(self, parent: APIRouter | FastAPI, depth: int) -> Group:
        marker = self.name("i")
        prefix = self.rng.choice(("", self.mount_path() or "/x"))
        shared = [entry for entry in self.shared_api_routers if entry[0].api_only]
        if shared and self.rng.random() < 0.5:
            body, child, own = self.rng.choice(shared)
        else:
            own = self.rng.choice(("", self.mount_path() or "/y"))
            dependencies = [Depends(lambda: None)] if self.rng.random() < 0.3 else []
            child = APIRouter(prefix=own, dependencies=dependencies)
            body = self.fastapi_body(child, depth + 1)
            self.shared_api_routers.append((body, child, own))
        try:
            parent.include_router(child, prefix=prefix, dependencies=[Depends(self.mark(marker))])
        except FastAPIError:  # ("Prefix and path cannot be both empty": a Mount("") in it, included without prefix)
            prefix = "/x"
            parent.include_router(child, prefix=prefix, dependencies=[Depends(self.mark(marker))])
        # (its leaves' paths hold its own prefix already; FastAPI puts the parent router's own prefix in front too)
        return Group("include", getattr(parent, "prefix", "") + prefix, None, marker, body)

    # ---------------------------------------------------------------------------------------------- the top

    def top(self) -> tuple[Body, ASGIApp, str]:
        """The app, its model, and how the billing middleware is put on it."""
        kind = self.rng.choice(("starlette", "starlette", "fastapi", "fastapi", "router"))
        if kind == "fastapi":
            body, app = self.fastapi_app(0)
            top: ASGIApp = app
        elif kind == "starlette":
            middlewares, shorts = self.middlewares(top=True)
            body, routes = self.starlette_body(0, hosts=True)
            body.nodes[:0] = shorts
            app = Starlette(routes=routes, middleware=[Middleware(cls, **kw) for cls, kw in middlewares])
            app.router.redirect_slashes = self.rng.random() < 0.8
            top = app
        else:
            middlewares, shorts = self.middlewares(top=True)
            body, routes = self.starlette_body(0, hosts=True)
            body.nodes[:0] = shorts
            router = Router(routes, redirect_slashes=self.rng.random() < 0.8)
            top = Passthrough(self.wrap(ExceptionMiddleware(router), middlewares))
        placement = "around"
        if kind != "router" and self.rng.random() < 0.25:
            placement = "inside"
        elif not self.fastapi and self.rng.random() < 0.5:  # (FastAPI's own routes always set scope["route"])
            placement = "before-1.7"
        elif self.rng.random() < 0.2:  # the billing middleware around an app mounted in another: templates below it
            placement = "mounted"
        return body, top, placement


def templates(body: Body) -> tuple[dict[tuple[str, tuple[str, ...]], str], list[Target]]:
    """The full template of every leaf, by what it records (its id, the markers of the trail it ran through)."""
    table: dict[tuple[str, tuple[str, ...]], str] = {}
    targets: list[Target] = []

    def walk(
        body: Body, prefix: str, marks: tuple[str, ...], includes: tuple[str, ...], host: str | None, mounted: bool
    ) -> None:
        for node in body.nodes:
            if isinstance(node, Leaf):
                if node.kind == "short":  # a middleware's answer: under a mount, the mount's (as a mounted app's)
                    template = prefix + "/{path}" if mounted else UNMATCHED
                elif node.kind == "static":
                    template = prefix + node.path + "/{path}"
                else:
                    template = prefix + node.path
                key = (node.id, tuple(sorted(marks + (includes if node.kind == "api" else ()))))
                assert table.setdefault(key, template) == template, f"the model is ambiguous at {key}"
                if node.kind != "short":
                    targets.append(Target(template, host, node))
            elif node.kind == "include":
                walk(node.body, prefix + node.path, marks, (*includes, node.marker), host, mounted)
            else:  # a mount or a host: an app of its own (an inclusion's dependencies do not reach in)
                marked = (*marks, node.marker) if node.marker else marks
                inside = mounted or node.kind != "host"
                walk(node.body, prefix + node.path, marked, (), node.host or host, inside)

    walk(body, "", (), (), None, False)
    return table, targets


# ------------------------------------------------------------------------------------------------------ the requests


@dataclasses.dataclass
class Call:
    """One request as drawn."""

    index: int
    kind: str  # "http", "websocket"
    method: str
    raw: str  # the path as sent, percent-encoded (the server's root_path goes in front)
    query: str
    host: str
    short: bool  # X-Short: a middleware of the app answers before its routing
    preflight: bool
    made_from: str | None  # the template it was drawn from, for the report


def concrete(rng: random.Random, template: str) -> str:
    """A path matching ``template`` as declared, percent-encoded where its values are."""

    def value(match: re.Match[str]) -> str:
        convertor = match.group(2) or ""
        if convertor == ":uuid":
            return str(uuid.UUID(int=rng.getrandbits(128)))
        return rng.choice(VALUES[convertor])

    return PARAM.sub(value, template)


def near_miss(rng: random.Random, raw: str) -> str:
    """``raw`` changed a little: sometimes still the same route, often another one or none."""
    how = rng.choice(("slash", "dot", "dotdot", "encoded-dot", "double", "extra", "drop", "encode", "upper", "type"))
    slashes = [index for index, char in enumerate(raw) if char == "/"]
    at = rng.choice(slashes) if slashes else 0
    if how == "slash":
        return raw[:-1] if raw.endswith("/") and raw != "/" else raw + "/"
    if how == "dot":
        return raw[:at] + "/." + raw[at:]
    if how == "dotdot":
        return raw[:at] + "/zz/.." + raw[at:]
    if how == "encoded-dot":
        return raw[:at] + rng.choice(("/%2e", "/%2E%2e/x", "/.%2e")) + raw[at:]
    if how == "double":
        return raw[:at] + "/" + raw[at:]
    if how == "extra":
        return raw.rstrip("/") + "/extra"
    if how == "drop":
        return raw.rsplit("/", 1)[0] or "/"
    if how == "encode":  # a letter of a literal segment percent-encoded: the same path once decoded
        letters = [
            index for index, char in enumerate(raw) if char.isalpha() and "%" not in raw[max(0, index - 2) : index]
        ]
        if letters:
            index = rng.choice(letters)
            return raw[:index] + f"%{ord(raw[index]):02X}" + raw[index + 1 :]
        return raw
    if how == "upper":
        return raw.upper()
    return re.sub(r"/[0-9]+", "/abc", raw, count=1) if re.search(r"/[0-9]", raw) else raw + "/7"


def draw_calls(rng: random.Random, targets: list[Target], count: int) -> list[Call]:
    calls = []
    sockets = [target for target in targets if target.leaf.kind == "ws"]
    for index in range(count):
        made_from, host = None, "t"
        if targets and rng.random() < 0.8:
            target = rng.choice(targets)
            made_from = target.template
            if target.leaf.kind == "static":
                raw = concrete(rng, target.template[: -len("/{path}")])
                raw += rng.choice(("/a.txt", "/d/b.css", "/missing.js", "/", ""))
            else:
                raw = concrete(rng, target.template)
            if target.host is not None:
                host = PARAM.sub(lambda _: rng.choice(("acme", "beta")), target.host)
            methods = target.leaf.methods
            method = rng.choice(methods) if methods and rng.random() < 0.75 else rng.choice(METHODS)
            if rng.random() < 0.3:
                raw = near_miss(rng, raw)
        else:
            raw, method = rng.choice(GARBAGE), rng.choice(METHODS)
            if targets and rng.random() < 0.3:
                host = PARAM.sub(lambda _: "acme", rng.choice(targets).host or "t")
        kind = "http"
        if rng.random() < 0.06:
            kind = "websocket"
            if sockets and rng.random() < 0.7:
                socket = rng.choice(sockets)
                raw, made_from = concrete(rng, socket.template), socket.template
                host = PARAM.sub(lambda _: "acme", socket.host or "t")
        preflight = kind == "http" and rng.random() < 0.05
        calls.append(
            Call(
                index=index,
                kind=kind,
                method="OPTIONS" if preflight else method,
                raw=raw if raw.startswith("/") else "/" + raw,
                query=rng.choice(("", "", "", "a=1", "q=%2F..%2F&x")),
                host=host,
                short=kind == "http" and rng.random() < 0.06,
                preflight=preflight,
                made_from=made_from,
            )
        )
    return calls


async def send_http(app: ASGIApp, call: Call, root_path: str) -> int:
    """The call, as an ASGI server sends it (``path`` decoded, ``raw_path`` as sent); the status answered."""
    raw_path = (root_path + call.raw).encode("ascii")
    headers = [(b"host", call.host.encode()), (b"x-org-id", b"org_a"), (b"x-user-id", f"u{call.index}".encode())]
    body = b""
    if call.method in ("POST", "PUT", "PATCH"):
        body = b'{"q":1}'
        headers += [(b"content-type", b"application/json"), (b"content-length", b"7")]
    if call.short:
        headers.append((b"x-short", b"1"))
    if call.preflight:
        headers += [(b"origin", b"https://site.example"), (b"access-control-request-method", b"POST")]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": call.query.encode(),
        "root_path": root_path,
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    done = anyio.Event()
    requested = False
    statuses: list[int] = []

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    with anyio.fail_after(30):  # (a hang guard, not a timing assertion)
        await app(scope, receive, send)
    done.set()
    assert len(statuses) == 1, statuses
    return statuses[0]


async def send_websocket(app: ASGIApp, call: Call, root_path: str) -> list[str]:
    """A WebSocket session, as a server runs it; the types of the messages the app sent."""
    raw_path = (root_path + call.raw).encode("ascii")
    headers = [(b"host", call.host.encode()), (b"x-org-id", b"org_a"), (b"x-user-id", f"u{call.index}".encode())]
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": b"",
        "root_path": root_path,
        "headers": headers,
        "subprotocols": [],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    closed = anyio.Event()
    connected = False
    sent: list[str] = []

    async def receive() -> Message:
        nonlocal connected
        if not connected:
            connected = True
            return {"type": "websocket.connect"}
        await closed.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message["type"])
        if message["type"] == "websocket.close" or (
            message["type"] == "websocket.http.response.body" and not message.get("more_body", False)
        ):
            closed.set()

    with anyio.fail_after(30):
        await app(scope, receive, send)
    closed.set()
    return sent


# ------------------------------------------------------------------------------------------------------ the test


def installed(app: Starlette) -> OrgBillingMiddleware:
    """The billing middleware added among ``app``'s middlewares (its stack is built by its first request)."""
    layer: Any = app.middleware_stack
    while not isinstance(layer, OrgBillingMiddleware):
        layer = layer.app
    return layer


async def run_seed(seed: int, settings: BillingSettings, fake_lago: Any) -> list[tuple[Call, Any, list[Any]]]:
    rng = random.Random(seed)
    build = Build(rng)
    body, app, placement = build.top()
    table, targets = templates(body)
    calls = draw_calls(rng, targets, REQUESTS)
    root_path = rng.choice(("", "", "/gw"))
    outer, middleware = "", None
    if placement == "inside":
        assert isinstance(app, Starlette)
        app.add_middleware(OrgBillingMiddleware, settings=settings, transport=fake_lago.transport())
        served: ASGIApp = app
    else:
        inner = StarletteBefore17(app) if placement == "before-1.7" else app
        served = middleware = OrgBillingMiddleware(inner, settings=settings, transport=fake_lago.transport())
        if placement == "mounted":
            outer_path = rng.choice(("/o", "/o/{region}", "/{region:int}"))
            served = Starlette(routes=[Mount(outer_path, app=middleware)])
            outer = concrete(rng, outer_path)
    for call in calls:
        call.raw = outer + call.raw
    outcomes: list[tuple[Call, int | list[str], list[tuple[str, tuple[str, ...]]]]] = []
    try:
        for call in calls:
            build.ran.clear()
            build.trail.clear()
            if call.kind == "websocket":
                outcome: int | list[str] = await send_websocket(served, call, root_path)
            else:
                outcome = await send_http(served, call, root_path)
            outcomes.append((call, outcome, list(build.ran)))
        if middleware is None:
            assert isinstance(app, Starlette)
            middleware = installed(app)
        assert await middleware.pipeline.flush(5)
    finally:
        if middleware is not None:
            await middleware.aclose()
    events: dict[str, list[tuple[str, int, str]]] = {}
    for event in fake_lago.events:
        properties = event["properties"]
        events.setdefault(properties["user_id"], []).append(
            (properties["endpoint"], properties["status_code"], properties["method"])
        )
    for call, outcome, ran in outcomes:
        got = events.pop(f"u{call.index}", [])
        context = (
            f"seed {seed} ({placement}, root_path {root_path!r}): {json.dumps(dataclasses.asdict(call))}\n"
            f"answered {outcome}, ran {ran}, billed {got}\nthe app:\n{show(body)}"
        )
        if call.kind == "websocket":
            assert got == [], context  # WebSocket sessions pass through unbilled
            continue
        assert isinstance(outcome, int)
        assert len(ran) <= 1, context
        if ran:
            template = table[ran[0]]
            billed = outcome < 500 and outcome not in (401, 403) and not (call.preflight and build.cors_top)
            assert got == ([(template, outcome, call.method)] if billed else []), context
        else:  # the routing's own answer (or a CORS middleware's to a preflight): not billed
            assert outcome in (404, 405, 307) or (call.preflight and build.cors_inside), context
            assert got == [], context
    assert events == {}, events
    return outcomes


@pytest.mark.parametrize("seed", range(SEEDS))
async def test_random_routers_bill_the_route_that_ran(
    seed: int, fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A random Starlette or FastAPI app's requests are billed once each under the full template of the route that ran
    (mounts', hosts' and inclusions' prefixes in front), and the routing's own 404/405/307 answers not at all."""
    await run_seed(seed, header_settings, fake_lago)


# ------------------------------------------------------------------------------------------------------ regressions


def wrapped_router_app() -> Starlette:
    """``Mount("/api", app=CORSMiddleware(Router([...])))`` with mounts carrying parameters under the router."""

    async def chat(request: Request) -> Response:
        return JSONResponse(USAGE)

    async def files(scope: Scope, receive: Receive, send: Send) -> None:
        await Response(b"file")(scope, receive, send)

    inner = Router(
        [
            Mount("/t/{tenant}", routes=[Route("/chat/{chat_id}", chat)]),
            Mount("/files/{owner:int}", app=files),
            Route("/plain/{item}", chat),
        ]
    )
    return Starlette(routes=[Mount("/api", app=CORSMiddleware(inner, allow_origins=["*"]))])


@pytest.mark.parametrize("placement", ["around", "before-1.7"])
async def test_mounts_inside_a_router_in_middlewares_keep_their_templates(
    fake_lago: Any, header_settings: BillingSettings, placement: str
) -> None:
    """A mount inside a router mounted behind a middleware (``Mount("/api", app=CORSMiddleware(router))``) keeps its
    template: ``/api/t/{tenant}/chat/{chat_id}``, ``/api/files/{owner:int}/{path}``. The concrete prefix was billed
    (``/api/t/acme/chat/{chat_id}``: one endpoint per tenant, the client's ids in it), and before Starlette 1.7 every
    route under the mount was billed ``<unmatched>`` (the mount's router was not looked for behind the mount's
    middlewares; six of the first 40 seeds found it)."""
    app: ASGIApp = wrapped_router_app()
    if placement == "before-1.7":
        app = StarletteBefore17(app)
    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    calls = [
        Call(0, "http", "GET", "/api/t/acme/chat/1", "", "t", False, False, None),
        Call(1, "http", "GET", "/api/t/beta/chat/2", "", "t", False, False, None),
        Call(2, "http", "GET", "/api/files/7/a.txt", "", "t", False, False, None),
        Call(3, "http", "GET", "/api/plain/x", "", "t", False, False, None),
    ]
    try:
        statuses = [await send_http(middleware, call, "") for call in calls]
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert statuses == [200] * 4
    assert [event["properties"]["endpoint"] for event in fake_lago.events] == [
        "/api/t/{tenant}/chat/{chat_id}",
        "/api/t/{tenant}/chat/{chat_id}",
        "/api/files/{owner:int}/{path}",
        "/api/plain/{item}",
    ]


def fastapi_sub_app() -> FastAPI:
    """A FastAPI app with an app mounted that is not a router, and a plain Starlette route."""

    async def plain(request: Request) -> Response:
        return JSONResponse(USAGE)

    async def files(scope: Scope, receive: Receive, send: Send) -> None:
        found = scope["path"].endswith("/a.txt")
        await Response(b"file" if found else b"missing", status_code=200 if found else 404)(scope, receive, send)

    sub = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    sub.mount("/static", app=files)
    sub.add_route("/plain/{x}", plain, methods=["GET"])
    return sub


@pytest.mark.parametrize("under", ["mount", "host", "wrapped-mount"])
async def test_what_a_fastapi_app_in_a_starlette_router_serves_is_its_own(
    fake_lago: Any, header_settings: BillingSettings, under: str
) -> None:
    """A FastAPI app under a Starlette ``Mount`` or ``Host``: FastAPI's router leaves ``scope["route"]`` as the outer
    router set it (the mount, the host), so what the FastAPI app served that is not a FastAPI route was taken for
    the mount's: a 404 of an app mounted in it (``StaticFiles``) was taken for the routing's and not billed (a seed
    found it), its files and its Starlette routes billed as ``/sub/{path}`` (or ``<unmatched>`` under a host), its
    router's 405 billed. They are billed under their own templates; the FastAPI router's 404 and 405 are not billed."""
    sub: ASGIApp = fastapi_sub_app()
    prefix, host = "/sub", "t"
    if under == "host":
        app = Starlette(routes=[Host("api.example.com", app=sub)])
        prefix, host = "", "api.example.com"
    elif under == "wrapped-mount":
        app = Starlette(routes=[Mount("/sub", app=Passthrough(sub))])
    else:
        app = Starlette(routes=[Mount("/sub", app=sub)])
    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    requests = [
        ("GET", "/static/a.txt"),
        ("GET", "/static/missing.js"),
        ("GET", "/plain/1"),
        ("POST", "/plain/1"),  # the FastAPI router's 405
        ("GET", "/nope"),  # its 404
    ]
    calls = [
        Call(i, "http", method, prefix + path, "", host, False, False, None)
        for i, (method, path) in enumerate(requests)
    ]
    try:
        statuses = [await send_http(middleware, call, "") for call in calls]
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert statuses == [200, 404, 200, 405, 404]
    assert [(e["properties"]["endpoint"], e["properties"]["status_code"]) for e in fake_lago.events] == [
        (f"{prefix}/static/{{path}}", 200),
        (f"{prefix}/static/{{path}}", 404),
        (f"{prefix}/plain/{{x}}", 200),
    ]


async def serve_calls(app: ASGIApp, settings: BillingSettings, fake_lago: Any, calls: list[Call]) -> list[int]:
    """The calls through the billing middleware around ``app``, each event delivered before it returns."""
    middleware = OrgBillingMiddleware(app, settings=settings, transport=fake_lago.transport())
    try:
        statuses = [await send_http(middleware, call, "") for call in calls]
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    return statuses


def billed(fake_lago: Any) -> list[tuple[str, int]]:
    return [(event["properties"]["endpoint"], event["properties"]["status_code"]) for event in fake_lago.events]


async def test_a_starlette_route_in_an_included_router_of_a_mounted_fastapi_app(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """A Starlette route (``router.add_route``) in an ``APIRouter`` included with a prefix, in a FastAPI app mounted in
    a Starlette router: what it answers is billed under its template, a redirect of its own too (a seed found it taken
    for the routing's ``redirect_slashes`` and not billed; a 200 was billed as ``/models/{path}``), and the FastAPI
    router's 405 for a method it does not take is not (billed as ``/models/{path}``: another seed)."""

    async def moved(request: Request) -> Response:
        return RedirectResponse("/elsewhere", status_code=307)

    async def plain(request: Request) -> Response:
        return JSONResponse(USAGE)

    router = APIRouter()
    router.add_route("/chat/{n:int}/moved", moved, methods=["GET"])
    router.add_route("/chat/{n:int}", plain, methods=["PUT"])
    sub = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    sub.include_router(router, prefix="/r")
    app = Starlette(routes=[Mount("/models", app=sub)])
    calls = [
        Call(0, "http", "GET", "/models/r/chat/1/moved", "", "t", False, False, None),
        Call(1, "http", "PUT", "/models/r/chat/2", "", "t", False, False, None),
        Call(2, "http", "PATCH", "/models/r/chat/2", "", "t", False, False, None),  # the router's 405
    ]
    assert await serve_calls(app, header_settings, fake_lago, calls) == [307, 200, 405]
    assert billed(fake_lago) == [("/models/r/chat/{n:int}/moved", 307), ("/models/r/chat/{n:int}", 200)]


async def test_an_app_mounted_at_two_paths_before_starlette_1_7(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """Starlette before 1.7 (no ``scope["route"]``): an app that is not a router mounted at two paths (the same
    ``StaticFiles`` at ``/a`` and ``/b/{tenant}``, or a router with such a mount reached twice) is billed at the mount
    that served it, its 404s included. The path inside the mount was tried against the mount's own pattern: no
    mount was found, its files billed ``<unmatched>`` and its 404s not billed (a seed found it: a router with such a
    mount, reached through two mounts)."""

    async def files(scope: Scope, receive: Receive, send: Send) -> None:
        found = scope["path"].endswith("/a.txt")
        await Response(b"file" if found else b"missing", status_code=200 if found else 404)(scope, receive, send)

    app = StarletteBefore17(Starlette(routes=[Mount("/a", app=files), Mount("/b/{tenant}", app=files)]))
    calls = [
        Call(0, "http", "GET", "/a/a.txt", "", "t", False, False, None),
        Call(1, "http", "GET", "/b/acme/a.txt", "", "t", False, False, None),
        Call(2, "http", "GET", "/b/acme/missing.js", "", "t", False, False, None),
        Call(3, "http", "GET", "/a/missing.js", "", "t", False, False, None),
    ]
    assert await serve_calls(app, header_settings, fake_lago, calls) == [200, 200, 404, 404]
    assert billed(fake_lago) == [
        ("/a/{path}", 200),
        ("/b/{tenant}/{path}", 200),
        ("/b/{tenant}/{path}", 404),
        ("/a/{path}", 404),
    ]


async def test_a_mount_under_another_host_is_not_the_requests(fake_lago: Any, header_settings: BillingSettings) -> None:
    """``Host("docs.example.com", app=Router([Mount("/{version}", ...)]))`` listed before ``Mount("/v1", ...)``: a
    request to another host served under ``/v1`` is billed as ``/v1/...``; it was billed under the other host's mount
    template (``/{version}/chat``: another route's), which matched the concrete prefix (a seed found it). For the docs
    host, its own mount's."""

    async def chat(request: Request) -> Response:
        return JSONResponse(USAGE)

    docs = Router([Mount("/{version}", routes=[Route("/chat", chat)])])
    api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    api.add_api_route("/chat", chat, methods=["GET"])
    app = Starlette(routes=[Host("docs.example.com", app=docs), Mount("/v1", app=api)])
    calls = [
        Call(0, "http", "GET", "/v1/chat", "", "api.example.com", False, False, None),
        Call(1, "http", "GET", "/v1/chat", "", "docs.example.com", False, False, None),
        Call(2, "http", "GET", "/v1/chat", "", "api.example.com", False, False, None),
    ]
    assert await serve_calls(app, header_settings, fake_lago, calls) == [200, 200, 200]
    assert billed(fake_lago) == [("/v1/chat", 200), ("/{version}/chat", 200), ("/v1/chat", 200)]


@pytest.mark.parametrize("placement", ["around", "before-1.7"])
async def test_a_class_based_endpoints_405_for_a_method_it_has_no_handler_for_is_not_billed(
    fake_lago: Any, header_settings: BillingSettings, placement: str
) -> None:
    """``Route("/items/{id}", ItemView)`` with an ``HTTPEndpoint`` handling GET only: the route takes every method and
    the class answers 405 for the others (``method_not_allowed``), as the router does for a function route: not
    billed (it was, under the route's template). HEAD runs its GET handler, and a 405 its own handler raises is
    billed as any endpoint's answer."""

    class ItemView(HTTPEndpoint):
        async def get(self, request: Request) -> Response:
            return JSONResponse(USAGE)

        async def put(self, request: Request) -> Response:
            raise HTTPException(405, "not this item")

    app: ASGIApp = Starlette(routes=[Mount("/v1", routes=[Route("/items/{id}", ItemView)])])
    if placement == "before-1.7":
        app = StarletteBefore17(app)
    calls = [
        Call(i, "http", method, "/v1/items/1", "", "t", False, False, None)
        for i, method in enumerate(("GET", "POST", "DELETE", "HEAD", "PUT", "OPTIONS"))
    ]
    assert await serve_calls(app, header_settings, fake_lago, calls) == [200, 405, 405, 200, 405, 405]
    assert billed(fake_lago) == [("/v1/items/{id}", 200), ("/v1/items/{id}", 200), ("/v1/items/{id}", 405)]


async def test_the_billing_middleware_around_an_app_mounted_in_another(
    fake_lago: Any, header_settings: BillingSettings
) -> None:
    """``Mount("/o/{region}", app=OrgBillingMiddleware(app))``: the app's routes are billed from where the middleware
    sees them, mounts' templates included (``/t/{tenant}/chat``: it was ``/t/acme/chat``, the mounts looked for from
    the outer router, where none matched), and an answer of the app's middleware before its router is ``<unmatched>``
    (it was ``/o/{region}/{path}``: the outer mount, left in ``scope["route"]``, taken for a route of the app)."""

    async def chat(request: Request) -> Response:
        return JSONResponse(USAGE)

    build = Build(random.Random(0))
    app = Starlette(
        routes=[Mount("/t/{tenant}", routes=[Route("/chat", chat)]), Route("/x/{y}", chat)],
        middleware=[Middleware(ShortCircuit, build=build, leaf="m0", status=200)],
    )
    middleware = OrgBillingMiddleware(app, settings=header_settings, transport=fake_lago.transport())
    outer = Starlette(routes=[Mount("/o/{region}", app=middleware)])
    calls = [
        Call(0, "http", "GET", "/o/eu/t/acme/chat", "", "t", False, False, None),
        Call(1, "http", "GET", "/o/us/t/beta/chat", "", "t", False, False, None),
        Call(2, "http", "GET", "/o/eu/x/1", "", "t", False, False, None),
        Call(3, "http", "GET", "/o/eu/t/acme/chat", "", "t", True, False, None),  # the app's middleware answers
        Call(4, "http", "GET", "/o/eu/nope", "", "t", False, False, None),
    ]
    try:
        statuses = [await send_http(outer, call, "") for call in calls]
        assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert statuses == [200, 200, 200, 200, 404]
    assert billed(fake_lago) == [("/t/{tenant}/chat", 200)] * 2 + [("/x/{y}", 200), (UNMATCHED, 200)]
