"""The endpoint stage of the request path: after the app answered, the route template a request is billed under
(the event's ``endpoint`` property: ``/v1/chat/{id}``, ``<unmatched>``, or the raw path for an app without Starlette
routing), and whether an answer is the routing's own (a router's 404, its ``redirect_slashes`` 307, its 405, an
``HTTPSRedirectMiddleware``'s redirect), which is not billed. Also ``_dot_segments``, which the ``exclude_paths``
check asks before identity. Used by ``_middleware.OrgBillingMiddleware``; imports nothing of this package.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.middleware.httpsredirect import HTTPSRedirectMiddleware
from starlette.routing import Host, Mount, Router
from starlette.types import Scope


def _inner_routing(app: Any) -> tuple[bool, bool]:
    """Whether a Starlette app (or router) is inside ``app``, behind middlewares of its own, and whether an
    ``HTTPSRedirectMiddleware`` is among those."""
    redirects = False
    for _ in range(64):
        if isinstance(app, (Starlette, Router)):
            return True, redirects
        if isinstance(app, HTTPSRedirectMiddleware):
            redirects = True
        try:
            app = getattr(app, "app", None)
        except Exception:  # pragma: no cover - an object whose attributes fail
            break
        if app is None:
            break
    return False, redirects


#: The endpoint of requests no route matched (404s): one value, however many paths are probed.
UNMATCHED = "<unmatched>"


def route_template(scope: Scope, status: int = 200, root_path: str = "") -> str:
    """The matched route's path template (``/v1/chat/{id}``).

    Starlette and FastAPI leave the matched route in ``scope["route"]``; inside a ``Mount`` the mount's path
    template is put in front of the inner template (``/v1/projects/{project_id}/chat/{chat_id}``; ``root_path``
    is the one the request came with). A request no route matched is ``<unmatched>`` when it was a 404, else (an
    app without Starlette routing) its raw path.
    """
    return _template(scope, status, root_path)


def _template(scope: Scope, status: int, root_path: str, routed: bool = False) -> str:
    # routed: a Starlette app (router) is inside the billing middleware, behind middlewares of its own
    route, path = scope.get("route"), scope["path"]
    fastapi = scope.get("fastapi")
    if fastapi is not None:  # FastAPI keeps included routers: the route with its include_router() prefix is there
        route = _fastapi_route(fastapi, route)
    if route is None and "endpoint" in scope:  # Starlette before 1.7 leaves no scope["route"]: found by its endpoint
        route = _route_by_endpoint(scope)
    template = getattr(route, "path", None)
    if not isinstance(template, str):  # no route: a 404, a redirect_slashes 307...; the raw path only without Starlette
        if isinstance(route, Host) and not route.routes:  # a host's app that is not a router (StaticFiles...): the
            # host is the route, as a mount, its 404s included (not a router in middlewares of its own matching none)
            if (status == 404 or 300 <= status < 400) and _wraps_served(route, scope):
                return UNMATCHED
            return _mount_prefix(scope, root_path) + "/{path}"
        if status == 404 or routed or scope.get("router") is not None or isinstance(scope.get("app"), Starlette):
            return UNMATCHED  # (a Starlette middleware's answer before the router: no route either)
        return _raw_endpoint(path)
    # Mount extends root_path by the matched prefix (as _mount_prefix, inline: the hot path)
    inner_root: str = scope.get("root_path", "")
    prefix = inner_root[len(root_path) :] if inner_root.startswith(root_path) else ""
    if prefix:  # the concrete prefix ("/v1/projects/p1"), as its mounts' templates ("/v1/projects/{project_id}")
        prefix = _mount_template(scope.get("router"), prefix)
    if isinstance(route, Mount):  # a mounted app that is not a router (StaticFiles...): the mount is the route
        # (a mounted router that matched none, bare or in middlewares of its own: its 404, its redirect_slashes
        # 307, not a "/v2/{path}" endpoint)
        if (status == 404 or 300 <= status < 400) and (route.routes or _wraps_served(route, scope)):
            return UNMATCHED
        return (prefix or template) + "/{path}"
    return prefix + template


def _raw_endpoint(path: object) -> str:
    """The raw path as an event's endpoint (an app without Starlette routing): the client chose it, so it is made a
    value Lago stores: a NUL (``%00`` in the URL), which its database refuses with a 500 that fails the whole batch
    (the call then dead-lettered, unbilled), is dropped; and one longer than :data:`_MAX_RAW_ENDPOINT` characters is
    cut there, ending with ``…``: a client's 16 KB paths, kept whole by every event waiting for Lago (100,000 in the
    memory outbox), would hold 1.6 GB."""
    text = str(path)
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text if len(text) <= _MAX_RAW_ENDPOINT else text[: _MAX_RAW_ENDPOINT - 1] + "\u2026"


#: The longest raw path billed whole as an endpoint (see :func:`_raw_endpoint`).
_MAX_RAW_ENDPOINT = 1024


def _whole_raw_endpoint(endpoint: str, path: object) -> str:
    """``endpoint`` uncut, when it is the raw ``path`` cut by :func:`_raw_endpoint` (NULs dropped, as there); else
    ``endpoint`` (a route's template that happens to end so)."""
    text = str(path)
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text if len(text) > _MAX_RAW_ENDPOINT and text.startswith(endpoint[:-1]) else endpoint


def _wraps_served(route: Mount | Host, scope: Scope) -> bool:
    """Whether a mount's (host's) app is a Starlette app (router) in middlewares of its own
    (``Mount("/api", app=CORSMiddleware(api))``): no routes of its own, but its router answered under it, or one of
    its middlewares did before it (``HTTPSRedirectMiddleware``); or an ``HTTPSRedirectMiddleware``'s redirect."""
    routed, redirects = _inner_routing(route.app)
    return routed or (redirects and scope.get("scheme") in ("http", "ws"))


def _unrouted(scope: Scope, status: int, root_path: str, routed: bool = False) -> bool:
    """Whether a 3xx or 4xx answer is the routing's own, which no endpoint (nor mounted app) produced: the 404 of a
    Starlette router that matched no route, its ``redirect_slashes`` redirect, its 405 for a method the route does not
    take, a redirect of a Starlette middleware before routing (``HTTPSRedirectMiddleware``). Not billed."""
    if status == 405:
        route = scope.get("route")
        if scope.get("fastapi") is not None:
            route = _fastapi_route(scope["fastapi"], route)
        if route is None and "endpoint" in scope:
            route = _route_by_endpoint(scope)
        methods = getattr(route, "methods", None)
        return isinstance(methods, (set, frozenset, list, tuple)) and scope["method"] not in methods
    if status != 404 and status >= 400:
        return False
    if not routed and scope.get("router") is None and not isinstance(scope.get("app"), Starlette):
        return False  # no Starlette routing: the app's own answer
    fastapi = scope.get("fastapi")
    if type(fastapi) is dict and "frontend_path" in fastapi:
        return False  # a FastAPI frontend's (static files) answer, as a mounted app's: no scope["route"] either
    return _template(scope, status, root_path, routed) is UNMATCHED


def _dot_segments(path: str) -> bool:
    """Whether a path holds ``.`` or ``..`` segments (``/health/../v1/chat``, sent as is or as ``%2e%2e``): not the
    excluded path it starts with, once an app's catch-all route or a proxy behind it resolves them."""
    return "/./" in path or "/../" in path or path.endswith(("/.", "/.."))


def _mount_prefix(scope: Scope, root_path: str) -> str:
    """The templates of the mounts a request went through, from where the middleware saw it (``root_path``)."""
    inner_root: str = scope.get("root_path", "")
    prefix = inner_root[len(root_path) :] if inner_root.startswith(root_path) else ""
    return _mount_template(scope.get("router"), prefix) if prefix else prefix


def _fastapi_route(fastapi: Any, route: Any) -> Any:
    """The route that served a request in a router that FastAPI (0.16x) included with ``include_router(prefix=...)``:
    ``scope["route"]`` is the route as its own router declared it (``/{item_id}``) or, for a plain Starlette route,
    None; the effective route FastAPI left in ``scope["fastapi"]`` has the prefixed path (``/v1/chat/{item_id}``).
    ``route`` itself in any other case (a route not in an included router, a mount's context). A mount of an app that
    is not a router (``router.mount("/static", StaticFiles(...))``) leaves no ``scope["route"]`` (or that of a mount
    around this app): its effective mount (``/v1/static``), whose app answered."""
    context = fastapi.get("effective_route_context") if type(fastapi) is dict else None
    original = getattr(context, "original_route", None)
    if original is None:
        return route
    if isinstance(original, Mount):
        if original.routes or not (route is None or (isinstance(route, (Mount, Host)) and route.routes)):
            return route  # a mounted router (what it matched is the route) or a route inside the mounted app
    elif route is not None and original is not route:
        return route
    effective = getattr(context, "starlette_route", None) or context
    path = getattr(effective, "path", None)
    return effective if isinstance(path, str) and path.startswith("/") else route  # (a frontend group's is "")


#: (id of the outermost router, id of an endpoint) -> (that router, that endpoint, the routes (or mounts) serving it).
_endpoint_routes: dict[tuple[int, int], tuple[Any, Any, tuple[Any, ...]]] = {}


def _route_by_endpoint(scope: Scope) -> Any:
    """The route that served a request, from ``scope["endpoint"]`` (what Starlette's router leaves before 1.7): the
    one route (or mount of a non-router app) with that endpoint under the outermost router, or, when several share
    it, the one whose pattern matches the request's path within its mount. None when none does."""
    router, endpoint = scope.get("router"), scope["endpoint"]
    key = (id(router), id(endpoint))
    known = _endpoint_routes.get(key)
    if known is None or known[0] is not router or known[1] is not endpoint:
        if len(_endpoint_routes) >= 10_000:
            _endpoint_routes.clear()
        found = tuple(_routes_serving(getattr(router, "routes", ()), endpoint, 0))
        known = _endpoint_routes[key] = (router, endpoint, found)
    candidates = known[2]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    path, inner_root = scope["path"], scope.get("root_path", "")
    inner_path = path[len(inner_root) :] if inner_root and path.startswith(inner_root) else path
    for route in candidates:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(inner_path if not isinstance(route, Mount) else inner_path + "/"):
            return route
    return None


def _routes_serving(routes: Any, endpoint: Any, depth: int) -> list[Any]:
    found: list[Any] = []
    for route in routes:
        if getattr(route, "endpoint", None) is endpoint:
            found.append(route)
        elif isinstance(route, (Mount, Host)) and depth < 16:
            if route.app is endpoint:
                found.append(route)
            else:
                found.extend(_routes_serving(route.routes, endpoint, depth + 1))
    return found


#: The longest concrete path (mount prefix, raw path as endpoint) the caches keyed by one keep: a client chooses the
#: values in its URL (up to the server's limit, ~16 KB), and 10,000 entries of that size would be hundreds of MB.
_MAX_CACHED_PATH = 1024

#: (id of the outermost router, concrete mount prefix) -> (that router, the mounts' path templates).
_mount_prefixes: dict[tuple[int, str], tuple[Any, str]] = {}


def _mount_template(router: Any, prefix: str) -> str:
    """The path templates of the mounts whose concrete prefix a request went through (cached: a prefix with no
    parameter is its own template; one with parameters is looked up once per value, bounded)."""
    key = (id(router), prefix)  # routers compare by their routes: not hashable
    known = _mount_prefixes.get(key)
    if known is not None and known[0] is router:
        return known[1]
    template = _find_mounts(getattr(router, "routes", ()), prefix) or prefix
    if len(prefix) > _MAX_CACHED_PATH:  # a long parameter value (a client's 16 KB tenant): looked up, not kept
        return template
    if len(_mount_prefixes) >= 10_000:
        _mount_prefixes.clear()
    _mount_prefixes[key] = (router, template)
    return template


def _find_mounts(routes: Any, prefix: str) -> str | None:
    """The templates of the chain of mounts, among ``routes`` and theirs, that matches ``prefix`` exactly (the
    first, as Starlette's router picks it); None when none does."""
    for route in routes:
        candidates = getattr(route, "effective_candidates", None)
        if candidates is not None and callable(candidates):  # a router FastAPI included: its routes, prefixed
            try:
                included = [getattr(candidate, "starlette_route", None) or candidate for candidate in candidates()]
            except Exception:  # pragma: no cover - FastAPI's private API changed: the concrete prefix is kept
                continue
            inner = _find_mounts(included, prefix)
            if inner is not None:
                return inner
        elif isinstance(route, Mount):
            match = route.path_regex.match(prefix + "/")
            if match is not None:
                rest = match.group("path").rstrip("/")
                if not rest:
                    return route.path
                inner = _find_mounts(route.routes, "/" + rest)
                if inner is not None:
                    return route.path + inner
        elif isinstance(route, Host):  # a host's routes are its app's, under the same prefix
            inner = _find_mounts(route.routes, prefix)
            if inner is not None:
                return inner
    return None
