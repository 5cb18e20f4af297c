"""Serve a FakeLago over real HTTP with uvicorn (for sync clients, other processes and the CLI)."""

from __future__ import annotations

import contextlib
import errno
import inspect
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from starlette.types import ASGIApp

from .._errors import ConfigurationError, LagoIntegrationError

__all__ = ["EmulatorServerError", "install_controls", "run", "serve_in_thread"]

_INSTALL_HINT = "pip install 'lago-org-billing[testing]'"
# Seconds a served emulator waits, as it stops, for requests still running (an injected latency) before cancelling them.
_GRACEFUL_SHUTDOWN = 1.0


class EmulatorServerError(LagoIntegrationError):
    """The emulator could not be served (uvicorn missing, port taken, server crashed on start)."""


def install_controls(fake: Any) -> Any:
    """Attach fault injection (``/_emulator/faults``) and webhook delivery (``/_emulator/webhooks``)
    to a FakeLago that lacks them. Both installers are idempotent; other ASGI apps pass through."""
    # (looked up statically: reading the property would make its RSA key, which needs cryptography, for nothing)
    if (
        not callable(getattr(fake, "add_middleware", None))
        or inspect.getattr_static(fake, "rsa_private_key_pem", None) is None
    ):
        return fake
    from ._faults import install_faults
    from ._webhooks import install_webhooks

    if getattr(fake, "faults", None) is None:
        install_faults(fake)
    if getattr(fake, "webhook_dispatcher", None) is None:
        install_webhooks(fake)
    return fake


def forget_requests(fake: Any) -> None:
    """Have a FakeLago served for good (the ``emulator`` command, ``demo --serve``) keep no log of its requests
    (``FakeLago.requests``, for the tests that inspect it): nothing reads it there, and it grew with every request
    for as long as the emulator served (a memory climbing without end under a load test). Other ASGI apps pass
    through."""
    if isinstance(getattr(fake, "requests", None), list) and hasattr(fake, "_log_requests"):
        fake._log_requests = False
        fake.requests.clear()


def _sign_as(fake: Any, base_url: str) -> Callable[[], None]:
    """Served over HTTP, the emulator's JWT webhooks name its URL as issuer, as Lago names its own (``LagoWebhooks()``
    expects ``LAGO_API_URL``); an issuer set by the user is kept. Returns what puts the issuer back when serving
    ends (served again, elsewhere, it names its new URL)."""
    dispatcher = getattr(fake, "webhook_dispatcher", None)
    default = getattr(fake, "base_url", None)
    if dispatcher is None or getattr(dispatcher, "issuer", None) != default:
        return lambda: None
    dispatcher.issuer = base_url

    def restore() -> None:
        if dispatcher.issuer == base_url:  # (unless the user set another one meanwhile)
            dispatcher.issuer = default

    return restore


def require_uvicorn() -> None:
    """Raise :class:`EmulatorServerError` (what to install) when uvicorn is missing."""
    _uvicorn()


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError as exc:
        raise EmulatorServerError(f"serving the Lago emulator over HTTP needs uvicorn: {_INSTALL_HINT}") from exc
    return uvicorn


def _config(app: ASGIApp, host: str, port: int, log_level: str, **options: Any) -> Any:
    uvicorn = _uvicorn()
    settings: dict[str, Any] = {
        "lifespan": "on",
        "loop": "asyncio",
        "http": "h11",
        "ws": "none",
        "access_log": False,
        **options,
    }
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, **settings)


@contextlib.contextmanager
def serve_in_thread(
    fake: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    log_level: str = "warning",
    timeout: float = 10.0,
    **uvicorn_options: Any,
) -> Iterator[str]:
    """Serve ``fake`` with uvicorn in a daemon thread; yield its base URL (``http://127.0.0.1:<port>``; the loopback
    too for a ``host`` of every interface, ``0.0.0.0`` or ``::``).

    ``port=0`` picks a free port. The server has started (socket bound, lifespan done) when the
    ``with`` body runs, and is shut down when it ends: a request still held then (an injected ``latency_ms`` whose
    client gave up) is cancelled after ``timeout_graceful_shutdown`` (1 s unless given), not waited for. A FakeLago
    gets its test controls (:func:`install_controls`) first. ``uvicorn_options`` go to ``uvicorn.Config`` (e.g.
    ``ssl_certfile`` and ``ssl_keyfile``, which make the URL ``https``).

    The host process's logging is left as it is (``log_config=None`` unless given): uvicorn's ``dictConfig`` would
    close every handler already installed (a test run's ``--log-file`` would record nothing more), and its records
    go through the root logger like any library's. A ``port`` already taken is an :class:`EmulatorServerError`
    before uvicorn starts.
    """
    uvicorn = _uvicorn()
    if port:  # taken: one clear error, not uvicorn's tracebacks of its failed start
        try:
            _probe(host, port)
        except OSError as exc:
            raise EmulatorServerError(
                f"the emulator could not be served on {host}:{port}: {exc.strerror or exc}. Is another server on that "
                "port? Choose another port, or 0 for a free one."
            ) from None
    install_controls(fake)
    uvicorn_options.setdefault("timeout_graceful_shutdown", _GRACEFUL_SHUTDOWN)
    uvicorn_options.setdefault("log_config", None)
    server = uvicorn.Server(_config(fake, host, port, log_level, **uvicorn_options))
    done = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        # uvicorn installs no signal handlers outside the main thread.
        try:
            server.run()
        except BaseException as exc:  # SystemExit from uvicorn on bind errors
            failure.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=target, name=f"fake-lago-{host}:{port}", daemon=True)
    thread.start()
    # Poll the server's own ``started`` flag; ``done`` ends the wait at once if it failed to start.
    deadline = time.monotonic() + timeout
    while not server.started and not done.wait(0.005):
        if time.monotonic() > deadline:
            server.should_exit = True
            raise EmulatorServerError(f"the emulator did not start on {host}:{port} within {timeout} s")
    if not server.started:
        cause = failure[0] if failure else None
        raise EmulatorServerError(
            f"the emulator could not be served on {host}:{port} (port in use? see the log above)"
        ) from cause
    sock = server.servers[0].sockets[0]
    bound_host, bound_port = sock.getsockname()[:2]
    scheme = "https" if uvicorn_options.get("ssl_certfile") else "http"
    # (served on every interface, "0.0.0.0" or "::": the loopback, as the ``emulator`` command prints it. The wildcard
    # address is no address to call (Windows refuses to connect to it), and it was the JWT webhooks' issuer too, which
    # an app pointed at http://127.0.0.1:<port> refused)
    base_url = local_url(bound_host, bound_port, scheme=scheme)
    restore_issuer = _sign_as(fake, base_url)
    try:
        yield base_url
    finally:
        # A request still held by an injected latency (its client gave up) goes on at once, as its rules decided:
        # otherwise uvicorn waits its graceful timeout, then cancels it with a traceback logged. The user's rules
        # stay (not clear()): the fake may be inspected or served again after.
        faults = getattr(fake, "faults", None)
        if faults is not None:
            from ._faults import FaultController

            if isinstance(faults, FaultController):
                faults._end_waits()
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():  # stuck past the graceful timeout (a lifespan shutdown?): stop without it
            server.force_exit = True
            thread.join(timeout)
        restore_issuer()


def _probe(host: str, port: int) -> int:
    """Listen on ``(host, port)`` for a moment; the port bound (an ``OSError`` when it cannot)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, port), family=family) as probe:
        return int(probe.getsockname()[1])


def free_port_or_error(host: str = "127.0.0.1", port: int = 3000) -> int:
    """``port`` (a free one for 0) if the emulator can listen there, else an :class:`EmulatorServerError` that says
    why (checked before serving, so that a port in use is one clear line, not uvicorn's traceback)."""
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"port must be between 0 and 65535, got {port}")
    try:
        return _probe(host, port)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):  # the port: taken, or privileged
            hint = "Is another server on that port? Choose another one with --port."
        else:  # the host: unknown name, or no address of this machine (socket.gaierror, EADDRNOTAVAIL)
            hint = "Is the host an address of this machine? Use --host 127.0.0.1 (or 0.0.0.0 for every interface)."
        raise EmulatorServerError(
            f"the emulator cannot listen on {host}:{port}: {exc.strerror or exc}. {hint}"
        ) from None


def local_url(host: str, port: int, *, scheme: str = "http") -> str:
    """The URL a client on this machine calls for a server listening on ``host``: every interface (``0.0.0.0``, ``""``,
    ``::``) is no address to call, so its loopback; the URL the emulator signs its JWT webhooks with (``iss``)."""
    url_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{scheme}://{f'[{url_host}]' if ':' in url_host else url_host}:{port}"


def run(fake: ASGIApp, host: str = "127.0.0.1", port: int = 3000, *, log_level: str = "info") -> None:
    """Serve ``fake`` in the foreground until interrupted (the ``lago-org-billing emulator`` command)."""
    port = free_port_or_error(host, port)
    uvicorn = _uvicorn()
    install_controls(fake)
    _sign_as(fake, local_url(host, port))
    forget_requests(fake)
    server = uvicorn.Server(_config(fake, host, port, log_level))
    try:
        server.run()
    except SystemExit:  # uvicorn's way out of a failed start (taken since the check above; logged)
        pass
    if not server.started:
        raise EmulatorServerError(f"the emulator could not be served on {host}:{port} (see the log above)")
