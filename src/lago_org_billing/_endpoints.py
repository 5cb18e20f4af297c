"""The endpoint stage of the request path: after the app answered, the route template a request is billed under
(the event's ``endpoint`` property: ``/v1/chat/{id}``, ``<unmatched>``, or the raw path for an app without Starlette
routing), and whether an answer is the routing's own (a router's 404, its ``redirect_slashes`` 307, its 405, an
``HTTPSRedirectMiddleware``'s redirect), which is not billed. Also ``_dot_segments``, which the ``exclude_paths``
check asks before identity. Used by ``_middleware.OrgBillingMiddleware``; imports nothing of this package.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.middleware.httpsredirect import HTTPSRedirectMiddleware
from starlette.routing import Host, Match, Mount, Router
from starlette.types import Scope


def _app_chain(app: Any) -> Iterator[Any]:
    """``app`` and the apps it wraps (each middleware's ``.app``), outermost first, at most 64."""
    for _ in range(64):
        yield app
        try:
            app = getattr(app, "app", None)
        except Exception:  # pragma: no cover - an object whose attributes fail
            return
        if app is None:
            return


def _inner_routing(app: Any) -> tuple[bool, bool]:
    """Whether a Starlette app (or router) is inside ``app``, behind middlewares of its own, and whether an
    ``HTTPSRedirectMiddleware`` is among those."""
    redirects = False
    for inner in _app_chain(app):
        if isinstance(inner, (Starlette, Router)):
            return True, redirects
        if isinstance(inner, HTTPSRedirectMiddleware):
            redirects = True
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
    # the root the app's outermost router started at: a Mount matched sets it; without one, the scope's own root
    base = scope.get("app_root_path", scope.get("root_path"))
    if type(base) is str and len(base) > len(root_path) and base.startswith(root_path):
        # the app set a root of its own inside the billing middleware (FastAPI(root_path=...), a middleware reading
        # X-Forwarded-Prefix): it is no mount's prefix, whose concrete values (a tenant's id) would be billed
        root_path = base
    route, path = _matched_route(scope), scope["path"]
    if isinstance(route, Mount) and root_path and scope.get("root_path") == root_path:  # (nothing matched below)
        outside = _outside(scope, root_path)
        outer = _mount_chain(getattr(scope.get("router"), "routes", ()), outside, scope, []) if outside else None
        if outer is not None and route.app is outer[1].app:  # the mount serving the billing middleware: no route of
            route = None  # its app (a middleware of the app answered before its router)
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
        prefix = _mount_template(scope.get("router"), prefix, scope, root_path)
    if isinstance(route, Mount):  # a mounted app that is not a router (StaticFiles...): the mount is the route
        # (a mounted router that matched none, bare or in middlewares of its own: its 404, its redirect_slashes
        # 307, not a "/v2/{path}" endpoint)
        if (status == 404 or 300 <= status < 400) and (route.routes or _wraps_served(route, scope)):
            return UNMATCHED
        return (prefix or template) + "/{path}"
    return prefix + template


def _matched_route(scope: Scope) -> Any:
    """The route (or mount, host) that served a request, None when none did.

    ``scope["route"]``, where Starlette's routers leave it; FastAPI's (0.16x) keeps its included routers: the route
    with its ``include_router()`` prefix is in ``scope["fastapi"]``. A FastAPI router does not write
    ``scope["route"]`` for what is not a FastAPI route (a Starlette route, a mount of its own): under a Starlette
    ``Mount`` or ``Host`` serving a FastAPI app, the mount (host) is left there, and what that app served (its
    ``StaticFiles``' 404, its routes) was taken for the mount's (a 404 unbilled, ``/sub/{path}``). Every match writes
    ``scope["endpoint"]`` (a mount's, a host's: its app): one that is not the mount's app is what matched inside it,
    found by its endpoint, as before Starlette 1.7, which leaves no ``scope["route"]``."""
    route = scope.get("route")
    fastapi = scope.get("fastapi")
    if fastapi is not None:
        route = _fastapi_route(fastapi, route)
    if route is None:
        return _route_by_endpoint(scope) if "endpoint" in scope else None
    if isinstance(route, (Mount, Host)) and "endpoint" in scope and scope["endpoint"] is not route.app:
        inner = _route_by_endpoint(scope)  # (None: an endpoint not found under the router: the mount, as before)
        if inner is not None:
            return inner
    return route


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
        route = _matched_route(scope)
        methods = getattr(route, "methods", None)
        if isinstance(methods, (set, frozenset, list, tuple)):
            return scope["method"] not in methods
        return _handler_missing(getattr(route, "endpoint", None), scope["method"])
    if status != 404 and status >= 400:
        return False
    if not routed and scope.get("router") is None and not isinstance(scope.get("app"), Starlette):
        return False  # no Starlette routing: the app's own answer
    fastapi = scope.get("fastapi")
    if type(fastapi) is dict and "frontend_path" in fastapi:
        return False  # a FastAPI frontend's (static files) answer, as a mounted app's: no scope["route"] either
    return _template(scope, status, root_path, routed) is UNMATCHED


#: The methods a Starlette ``HTTPEndpoint`` dispatches to a handler of that name (any other: its 405).
_HANDLED = frozenset(("get", "head", "post", "put", "patch", "delete", "options", "query"))


def _handler_missing(endpoint: Any, method: str) -> bool:
    """Whether ``endpoint`` is a class-based ``HTTPEndpoint`` without a handler for ``method``: its route takes every
    method (``methods`` None) and the class answers 405 itself (``method_not_allowed``), as a router does for a
    function route that does not take it (the client probing methods was billed for a class view's 405s only)."""
    if not (isinstance(endpoint, type) and issubclass(endpoint, HTTPEndpoint)):
        return False
    name = method.lower()
    if name == "head" and getattr(endpoint, "head", None) is None:
        name = "get"  # (HEAD runs the GET handler)
    return name not in _HANDLED or getattr(endpoint, name, None) is None


def _dot_segments(path: str) -> bool:
    """Whether a path holds ``.`` or ``..`` segments (``/health/../v1/chat``, sent as is or as ``%2e%2e``): not the
    excluded path it starts with, once an app's catch-all route or a proxy behind it resolves them. So do those the
    server left encoded (``/health/%2e%2e/v1/chat``, sent as ``%252e%252e``), and ``\\`` as a ``/``: an app that
    forwards the path upstream sends them as they are, and nginx (or IIS, for ``\\``) there decodes them and resolves
    the segments (``/v1/chat``, served unbilled and ungated)."""
    if "%" in path or "\\" in path:
        path = path.replace("\\", "/").replace("%2e", ".").replace("%2E", ".").replace("%2f", "/").replace("%2F", "/")
    return "/./" in path or "/../" in path or path.endswith(("/.", "/.."))


def _mount_prefix(scope: Scope, root_path: str) -> str:
    """The templates of the mounts a request went through, from where the middleware saw it (``root_path``)."""
    inner_root: str = scope.get("root_path", "")
    prefix = inner_root[len(root_path) :] if inner_root.startswith(root_path) else ""
    return _mount_template(scope.get("router"), prefix, scope, root_path) if prefix else prefix


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
    fresh = known is None or known[0] is not router or known[1] is not endpoint
    if fresh:
        known = _endpoint_routes_of(key, router, endpoint)
    assert known is not None
    candidates = known[2]
    route = _route_matching(candidates, scope)
    if route is None and candidates and not fresh:
        # the routes changed since they were looked up (``app.add_route()``, ``app.router.routes`` extended at
        # runtime): a route added with an endpoint another route has was billed under that other route's template
        candidates = _endpoint_routes_of(key, router, endpoint)[2]
        route = _route_matching(candidates, scope)
    if route is None and len(candidates) == 1:
        return candidates[0]  # (the one route with that endpoint, as its pattern was not matched: as before)
    return route


def _endpoint_routes_of(key: tuple[int, int], router: Any, endpoint: Any) -> tuple[Any, Any, tuple[Any, ...]]:
    """The routes (or mounts) under ``router`` serving ``endpoint``, looked up and kept in :data:`_endpoint_routes`."""
    if len(_endpoint_routes) >= 10_000:
        _endpoint_routes.clear()
    found = tuple(_routes_serving(getattr(router, "routes", ()), endpoint, 0))
    known = _endpoint_routes[key] = (router, endpoint, found)
    return known


def _route_matching(candidates: tuple[Any, ...], scope: Scope) -> Any:
    """The first of ``candidates`` whose pattern matches the request's path within its mount; None when none does."""
    path, inner_root = scope["path"], scope.get("root_path", "")
    inner_path = path[len(inner_root) :] if inner_root and path.startswith(inner_root) else path
    for route in candidates:
        if isinstance(route, Mount):  # (the root_path ends with what it matched: the path within it is its app's)
            if _mount_matched(route, inner_root):
                return route
            continue
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(inner_path):
            return route
    return None


def _mount_matched(mount: Mount, root_path: str) -> bool:
    """Whether the end of ``root_path`` (the one a mount made, by putting what it matched at its end) is a prefix
    ``mount`` matches: an app mounted at several paths (``/a`` and ``/b/{tenant}``) is found at the one that served
    (the path within it was tried against its pattern: none matched, the mount's requests billed ``<unmatched>``)."""
    regex, index = mount.path_regex, len(root_path)
    while index >= 0:
        match = regex.match(root_path[index:] + "/")
        if match is not None and not match.group("path"):
            return True
        index = root_path.rfind("/", 0, index) if index else -1
    return False


def _included(route: Any) -> list[Any] | None:
    """The routes of a router FastAPI (0.16x) included (``app.include_router(router, prefix=...)``), as it serves
    them (with the prefixes); None for any other route."""
    candidates = getattr(route, "effective_candidates", None)
    if candidates is None or not callable(candidates):
        return None
    try:
        return [getattr(candidate, "starlette_route", None) or candidate for candidate in candidates()]
    except Exception:  # pragma: no cover - FastAPI's private API changed: as a route of its own
        return None


def _routes_serving(routes: Any, endpoint: Any, depth: int) -> list[Any]:
    found: list[Any] = []
    for route in routes:
        inner: list[Any] = []
        included = _included(route) if depth < 16 else None
        if included is not None:  # (a Starlette route in a router FastAPI included, under a mount of its app)
            inner = _routes_serving(included, endpoint, depth + 1)
        elif getattr(route, "endpoint", None) is endpoint:
            inner = [route]
        elif isinstance(route, (Mount, Host)) and depth < 16:
            inner = [route] if route.app is endpoint else _routes_serving(_routes_within(route), endpoint, depth + 1)
        # (the same route reached twice, a router mounted at two paths, is found once)
        found.extend(other for other in inner if not any(other is known for known in found))
    return found


def _routes_within(route: Mount | Host) -> Any:
    """The routes of a mount's (host's) app: its router's, also behind middlewares of its own
    (``Mount("/api", app=CORSMiddleware(router))``, whose ``routes`` are none: the mounts and routes in that router
    were not found, billed under their concrete prefix, ``/api/t/acme/chat/{chat_id}``, or before Starlette 1.7 as
    ``<unmatched>``)."""
    routes = route.routes
    if routes:
        return routes
    for app in _app_chain(route.app):
        if isinstance(app, (Starlette, Router)):
            return app.routes
    return ()


#: The longest concrete path (mount prefix, raw path as endpoint) the caches keyed by one keep: a client chooses the
#: values in its URL (up to the server's limit, ~16 KB), and 10,000 entries of that size would be hundreds of MB.
_MAX_CACHED_PATH = 1024

#: (id of the outermost router, concrete mount prefix) -> (that router, the mounts' path templates); None when they
#: depend on the request's host (a ``Host`` route was passed by), then under (id, prefix, the request's host). Below
#: mounts around the billing middleware (:func:`_outside`): (id, prefix, None, their concrete prefix), (..., host).
_mount_prefixes: dict[tuple[Any, ...], tuple[Any, str | None]] = {}


def _mount_template(router: Any, prefix: str, scope: Scope, root_path: str = "") -> str:
    """The path templates of the mounts whose concrete prefix a request went through, below the billing middleware
    (whose ``root_path`` is given) (cached: a prefix with no parameter is its own template; one with parameters is
    looked up once per value (and host), bounded)."""
    outside = _outside(scope, root_path)
    # (routers compare by their routes: not hashable)
    key: tuple[Any, ...] = (id(router), prefix) if not outside else (id(router), prefix, None, outside)
    known = _mount_prefixes.get(key)
    if known is not None and known[0] is router:
        if known[1] is not None:
            return known[1]
        known = _mount_prefixes.get((*key, _host(scope)))
        if known is not None and known[0] is router and known[1] is not None:
            return known[1]
    hosts: list[Host] = []
    routes: Any = getattr(router, "routes", ())
    if outside:  # the billing middleware is around an app mounted in another: the routes below its mounts
        outer = _mount_chain(routes, outside, scope, hosts)
        routes = _routes_within(outer[1]) if outer is not None else ()
    found = _mount_chain(routes, prefix, scope, hosts)
    template = found[0] if found is not None else prefix
    host = _host(scope) if hosts else ""
    if len(prefix) + len(host) + len(outside) > _MAX_CACHED_PATH:  # a long value (a client's 16 KB tenant): not kept
        return template
    if len(_mount_prefixes) >= 10_000:
        _mount_prefixes.clear()
    if hosts:
        hosted = (*key, host)
        _mount_prefixes[key] = (router, None)
        _mount_prefixes[hosted] = (router, template)
    else:
        _mount_prefixes[key] = (router, template)
    return template


def _outside(scope: Scope, root_path: str) -> str:
    """The concrete prefix of the mounts around the billing middleware, when it is around an app mounted in another
    (``Mount("/o/{region}", app=OrgBillingMiddleware(app))``): ``scope["router"]`` is the other app's, whose root
    (``app_root_path``, which the outermost mount sets) is not the middleware's ``root_path``. Its mounts' templates
    are not the events' (they are billed from where the middleware sees them): the mounts below it were not found
    from the outer router (``/t/acme/chat``), and the outer mount was taken for a route of the app."""
    base = scope.get("app_root_path")
    if not root_path or type(base) is not str or len(base) >= len(root_path) or not root_path.startswith(base):
        return ""
    return root_path[len(base) :]


def _host(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"host":
            return bytes(value).decode("latin-1")
    return ""


def _mount_chain(routes: Any, prefix: str, scope: Scope, hosts: list[Host]) -> tuple[str, Mount] | None:
    """The templates of the chain of mounts, among ``routes`` and theirs, that matches ``prefix`` exactly (the
    first, as Starlette's router picks it), and its last mount; None when none does. ``hosts``: the ``Host`` routes
    passed by."""
    for route in routes:
        included = _included(route)
        if included is not None:  # a router FastAPI included: its routes, prefixed
            found = _mount_chain(included, prefix, scope, hosts)
            if found is not None:
                return found
        elif isinstance(route, Mount):
            match = route.path_regex.match(prefix + "/")
            if match is not None:
                rest = match.group("path").rstrip("/")
                if not rest:
                    return route.path, route
                found = _mount_chain(_routes_within(route), "/" + rest, scope, hosts)
                if found is not None:
                    return route.path + found[0], found[1]
        elif isinstance(route, Host):  # a host's routes are its app's, under the same prefix
            # (only the host the request was for: another's mount matching the prefix is another route, Host("docs.
            # example.com") with Mount("/{version}") before Mount("/v1"): "/{version}/chat" for api.example.com)
            hosts.append(route)
            if route.matches(scope)[0] is not Match.FULL:
                continue
            found = _mount_chain(_routes_within(route), prefix, scope, hosts)
            if found is not None:
                return found
    return None
