"""A minimal keep-alive HTTP/1.1 client for the one hot call: ``POST /api/v1/events/batch``.

httpx spends about 0.7 ms of CPU per request (measured on this project's benchmark machine), which is 7 µs per
event at 100 events a batch: more than everything else the middleware does for a request. This client writes a
request and reads its answer with a handful of byte operations on an anyio socket stream (TLS included), and is
used only where it is a plain drop-in: no injected transport, and httpx would connect to Lago directly (no proxy
in the environment applies to it). Everything else goes through httpx.

An answer is only ever read as the answer to the request just written: a connection is pooled again only if nothing
follows the answer in its buffer (or in its TLS layer), and taken from the pool only if the server has written nothing
on it meanwhile (bytes nobody asked for, a close, an idle-timeout 408) and it has been idle no longer than
:data:`_KEEPALIVE_EXPIRY` seconds, as httpcore does.

A server may answer before it has read the whole body, then close: a proxy refusing a body over its limit (413), a
server refusing the request by its headers (401). Writing the rest of the body then fails; the answer it already sent
is read (as httpcore does), within :data:`_EARLY_ANSWER_WAIT` seconds and :data:`_MAX_EARLY_ANSWER` bytes, so the
caller sees that status, not "no answer". The connection is never reused after that. (A body over
:data:`_LISTEN_FROM` bytes, which may not fit the socket's buffers at once, is written while the connection is read:
anyio's asyncio streams close the socket as a write fails, and with it whatever the kernel had received and nobody
read yet.)

A process forked from one holding kept-alive connections (``os.fork()``, ``multiprocessing``'s ``fork``) never uses
them: a request written on the parent's connection would have its answer read by the parent as the answer to its own
next one. The child starts with no idle connection (those it inherited are left as they are, never used nor closed).
"""

from __future__ import annotations

import os
import re
import select
import ssl
import sys
import time
from urllib.parse import urlsplit
from urllib.request import getproxies

import anyio
import anyio.abc
import httpx

from . import _forks
from ._errors import _without_tracebacks
from ._ids import ascii_digits

__all__ = ["RawConnectError", "RawHTTPError", "RawPoster", "can_use_raw_poster"]

_MAX_HEADER_BYTES = 64 * 1024
#: After a write that failed: seconds given to reading an answer the server sent before closing (it is on the
#: connection already, or not at all), and the bytes read for it at most.
_EARLY_ANSWER_WAIT = 1.0
_MAX_EARLY_ANSWER = 1 << 20
#: Bodies from this many bytes are written while the connection is read (see the module docstring): smaller ones (an
#: ordinary batch) are taken by the socket's buffers at once, with no task started to listen.
_LISTEN_FROM = 64 * 1024
_HEX = re.compile(rb"[0-9A-Fa-f]+")
#: Seconds a connection may sit idle in the pool and still be reused: httpx's default ``keepalive_expiry`` (the
#: client's other calls), past which a NAT or a load balancer may have dropped it silently, and a batch written on it
#: would wait the whole LAGO_API_TIMEOUT for an answer that never comes.
_KEEPALIVE_EXPIRY = 5.0
#: The blank line ending an answer's head: lines end in CRLF or in a bare LF (RFC 9112 2.2 lets a recipient take one
#: for a line end), as h11 (the httpx path) finds it (``\n\r?\n``).
_HEAD_END = re.compile(rb"\r?\n\r?\n")
#: HTTP-version SP 3DIGIT, then SP (and the reason) or nothing (RFC 9112 4), as h11 (the httpx path) reads it: "2000"
#: or "200OK" is no status 200. ASCII digits only (``[0-9]``, not ``\d``).
_STATUS_LINE = re.compile(r"HTTP/1\.[0-9] ([0-9]{3})(?: |\Z)")
#: What is stripped around a header value (OWS, RFC 9110 5.6.3): not all that ``str.strip()`` takes, which in the
#: latin-1 reading of the head includes bytes of UTF-8 text (A0 ends "à", 85 ends "Å").
_OWS = " \t"


class RawHTTPError(Exception):
    """The exchange failed below HTTP (connection, TLS, timeout, malformed answer). Its cause, if any, carries no
    traceback: the frames under it held the request as written, ``Authorization: Bearer <key>`` included."""


class RawConnectError(RawHTTPError):
    """No connection could be made (refused, DNS, a process out of file descriptors: ``EMFILE``): nothing of the
    request was written, so the failure says nothing about its body, and Lago applied nothing."""


def _connect_failure(exc: BaseException) -> str:
    """What made a connection fail, as said: anyio's ``connect_tcp`` hides the cause of each attempt under "All
    connection attempts failed" (an ``EMFILE`` among them, which says what to do), shown here."""
    said = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    causes = list(getattr(cause, "exceptions", ())) or ([cause] if cause is not None else [])
    details = sorted({f"{type(each).__name__}: {each}" for each in causes if isinstance(each, OSError)})
    return f"{said} ({'; '.join(details)})" if details else said


#: What a connection that broke raises (reset, closed, cut TLS, a malformed answer): the request is discarded with it.
_BROKEN = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, ssl.SSLError, RawHTTPError)


class _Wire:
    """A request as written on the connection, headers (the API key's among them) included: a local of the frames of
    :meth:`RawPoster.post` that a traceback's locals show (Sentry, ``rich``), shown without its bytes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"<HTTP request of {len(self.data)} bytes, not shown: its headers hold the API key>"


def can_use_raw_poster(base_url: str) -> bool:
    """Whether :class:`RawPoster` can stand in for httpx: an http(s) URL httpx would connect to directly, the
    environment's proxies considered as httpx considers them (``urllib.request.getproxies()``: ``*_proxy`` variables
    in any case, the lower-case one first; ``NO_PROXY`` exempting the host)."""
    if urlsplit(base_url).scheme not in ("http", "https"):
        return False
    try:
        from httpx._utils import URLPattern, get_environment_proxies
    except ImportError:  # pragma: no cover (an httpx that moved them): any proxy configured goes through httpx
        return not any(getproxies().get(scheme) for scheme in ("http", "https", "all"))
    try:
        url = httpx.URL(base_url)
        mounts = sorted((URLPattern(key), proxy) for key, proxy in get_environment_proxies().items())
    except (ValueError, httpx.InvalidURL):  # (httpx refuses such a setting itself): left to httpx
        return False
    for pattern, proxy in mounts:  # as httpx picks a mount: the most specific pattern first
        if pattern.matches(url):
            return proxy is None
    return True


def _ssl_context() -> ssl.SSLContext:
    """The roots httpx 0.28 trusts (``httpx._config.create_ssl_context``), so that the event batches and every other
    call (health, quota reads) verify Lago's certificate alike: ``SSL_CERT_FILE``, else ``SSL_CERT_DIR`` (a
    directory of hashed certificates: an internal CA), else certifi's bundle. Empty variables count as unset."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    try:
        import certifi  # httpx's own CA bundle, so both paths trust the same roots
    except ImportError:  # pragma: no cover
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


def _held(connection: _Connection) -> bool:
    """Whether bytes the server sent are held, read from the socket but not by an answer: in the buffer, or, over TLS,
    in the TLS layer (a record read from the socket together with the answer's, not decrypted yet), where neither the
    buffer nor the socket shows them."""
    if connection.buffer:
        return True
    # anyio's TLSStream has no public way to its incoming BIO (``TLSAttribute.ssl_object`` gives the SSL object only,
    # through an ``extra()`` that builds every attribute's getter at each call): its private attributes are read, with
    # getattr, so that an anyio renaming them makes this a plain stream again (whose socket is still looked at), not
    # an AttributeError on every batch.
    read_bio = getattr(connection.stream, "_read_bio", None)
    ssl_object = getattr(connection.stream, "_ssl_object", None)
    return bool(getattr(read_bio, "pending", 0)) or bool(ssl_object is not None and ssl_object.pending())


def _readable(connection: _Connection) -> bool:
    """Whether the server wrote something on an idle connection (or closed it): what it wrote is no answer to a
    request not yet sent, so the connection is not reused."""
    if _held(connection):
        return True
    try:
        fileno = connection.stream.extra(anyio.abc.SocketAttribute.raw_socket).fileno()
    except (anyio.TypedAttributeLookupError, AttributeError, OSError):  # (not a socket: nothing to look at)
        return False
    if fileno < 0:
        return True
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fileno, select.POLLIN)
            return bool(poller.poll(0))
        return bool(select.select([fileno], [], [], 0)[0])  # pragma: no cover (Windows)
    except (OSError, ValueError):
        return True


def _decimal(text: str) -> int | None:
    """``text`` as a decimal number if it is one (ASCII digits only: ``int()`` also takes signs, ``_`` and other
    scripts' digits, none of which a status code or a Content-Length may hold), else None. Past 18 digits (an
    exabyte; ``int()`` refuses 4,301 and more) it is no length a server could send: None too. Leading zeros are
    digits of the number (``000...042`` is 42), read without them: thousands of them raised ``int()``'s
    ``ValueError`` (no protocol error: an "unexpected error" with a traceback), and the batch Lago had ingested was
    sent again, for ever when every answer is framed so."""
    if not ascii_digits(text):
        return None
    significant = text.lstrip("0")
    return int(significant or "0") if len(significant) <= 18 else None


def _same_length(value: str) -> int | None:
    """A ``Content-Length`` listing one length more than once (``"42, 42"``): that length, else None."""
    lengths = {_decimal(part.strip()) for part in value.split(",")}
    return lengths.pop() if len(lengths) == 1 else None


class _Connection:
    __slots__ = ("buffer", "idle_since", "limit", "stream")

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.buffer = b""
        #: Bytes the buffer may hold (bounded only for an answer read after a broken write).
        self.limit = sys.maxsize
        #: ``time.monotonic()`` as the connection was pooled last.
        self.idle_since = 0.0

    async def read_head(self, limit: int) -> str:
        """An answer's head, up to the blank line ending it, its lines ending in LF (CRLF or a bare LF as read)."""
        while True:
            end = _HEAD_END.search(self.buffer)
            if end is not None:
                head, self.buffer = self.buffer[: end.start()], self.buffer[end.end() :]
                return head.decode("latin-1").replace("\r\n", "\n")
            if len(self.buffer) > limit:
                raise RawHTTPError("response header too large")
            await self._receive()

    async def read_until(self, marker: bytes, limit: int) -> bytes:
        while True:
            index = self.buffer.find(marker)
            if index >= 0:
                head, self.buffer = self.buffer[:index], self.buffer[index + len(marker) :]
                return head
            if len(self.buffer) > limit:
                raise RawHTTPError("response header too large")
            await self._receive()

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._receive()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def read_to_eof(self) -> bytes:
        try:
            while len(self.buffer) <= self.limit:
                self.buffer += await self.stream.receive(65536)
            raise RawHTTPError(f"answer over {self.limit} bytes")
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            data, self.buffer = self.buffer, b""
            return data

    async def _receive(self) -> None:
        if len(self.buffer) > self.limit:
            raise RawHTTPError(f"answer over {self.limit} bytes")
        try:
            self.buffer += await self.stream.receive(65536)
        except anyio.EndOfStream:
            raise RawHTTPError("connection closed by the server") from None


class RawPoster:
    """POSTs JSON bodies to one origin over pooled keep-alive connections."""

    def __init__(self, base_url: str, headers: dict[str, str], *, timeout: float, max_idle: int = 8) -> None:
        # Read as httpx reads it (the other calls' URL): an internationalized name in its IDNA (xn--) form for the
        # Host header, DNS and the TLS name; the path percent-encoded; no user:password@ in the Host.
        url = httpx.URL(base_url)
        self.tls = url.scheme == "https"
        self.host = url.raw_host.decode("ascii") or "localhost"
        self.port = url.port or (443 if self.tls else 80)
        self.prefix = url.raw_path.partition(b"?")[0].decode("ascii").rstrip("/")
        host_header = url.netloc.decode("ascii")
        fixed = {"Host": host_header, **headers, "Content-Type": "application/json", "Connection": "keep-alive"}
        self._head = "".join(f"{name}: {value}\r\n" for name, value in fixed.items()).encode("latin-1")
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._ssl: ssl.SSLContext | None = None
        _forks.track(self)

    def _forked(self) -> None:
        if self._idle:
            _forks.left_by_parent.append(self._idle)  # (the parent's sockets, on the parent's event loop)
            self._idle = []

    async def post(self, path: str, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send ``body``; returns (status, headers, response body). Raises :class:`RawHTTPError`."""
        request = _Wire(
            f"POST {self.prefix}{path} HTTP/1.1\r\n".encode("latin-1")
            + self._head
            + f"Content-Length: {len(body)}\r\n\r\n".encode("latin-1")
            + body
        )
        # A pooled connection may have been closed by the server meanwhile: one more try on a fresh one
        # (safe: events are idempotent by transaction_id). One idle past the keep-alive expiry is not tried at all: a
        # middlebox that dropped it says nothing, and the batch would wait out LAGO_API_TIMEOUT on it.
        now = time.monotonic()
        for attempt in (0, 1):
            connection = self._idle.pop() if self._idle and attempt == 0 else None
            while connection is not None and (now - connection.idle_since > _KEEPALIVE_EXPIRY or _readable(connection)):
                await self._discard(connection)
                connection = self._idle.pop() if self._idle else None
            reused = connection is not None
            try:
                with anyio.fail_after(self.timeout):
                    if connection is None:
                        try:
                            connection = await self._connect()
                        except _BROKEN as exc:  # (refused, DNS, EMFILE: never sent; LAGO_API_TIMEOUT: below)
                            raise RawConnectError(_connect_failure(exc)) from _without_tracebacks(exc)
                    answer = await self._exchange(connection, request)
                if reused and answer[0] == 408:
                    # A server closing an idle kept-alive connection may say so first (RFC 9110 15.5.9): that 408
                    # was waiting on the connection, it is not this request's answer.
                    continue
                return answer
            except TimeoutError as exc:
                await self._discard(connection)
                _without_tracebacks(exc)  # (its frames: the exchange cut short, the request among their locals)
                if connection is None:
                    # The connection itself was not made in time (a host that drops SYNs: a firewall, a full accept
                    # queue): nothing of the request was written, as httpx's ConnectTimeout says. Taken for "no
                    # answer", a batch of 1 MiB or more was split and struck as too large for the way to Lago.
                    raise RawConnectError(f"no connection within {self.timeout:g} s: LAGO_API_TIMEOUT") from None
                raise RawHTTPError(f"no answer within {self.timeout:g} s: LAGO_API_TIMEOUT") from None
            except _BROKEN as exc:
                await self._discard(connection)
                if isinstance(exc, RawConnectError):
                    raise
                if not reused:
                    raise RawHTTPError(f"{type(exc).__name__}: {exc}") from _without_tracebacks(exc)
            except BaseException:  # cancelled mid-exchange (a shutdown deadline): not left open to the server
                await self._discard(connection)
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._discard(connection)

    async def _connect(self) -> _Connection:
        if self.tls:
            if self._ssl is None:
                self._ssl = _ssl_context()
            # Not "standard compatible" (as httpcore): closing a connection does not wait, shielded, for the server's
            # close_notify, which a server that stopped answering never sends (HTTP frames its own messages).
            stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                self.host,
                self.port,
                tls=True,
                ssl_context=self._ssl,
                tls_hostname=self.host,
                tls_standard_compatible=False,
            )
        else:
            stream = await anyio.connect_tcp(self.host, self.port)
        return _Connection(stream)

    async def _exchange(self, connection: _Connection, request: _Wire) -> tuple[int, list[tuple[str, str]], bytes]:
        try:
            if len(request.data) < _LISTEN_FROM:
                await connection.stream.send(request.data)
            else:
                await self._send_listening(connection, request.data)
        except (OSError, anyio.BrokenResourceError, ssl.SSLError):
            # The server may have answered before reading the whole body, and closed (a proxy's 413, a 401): that
            # answer is this request's. Without one, the write's failure stands.
            answer = await self._early_answer(connection)
            if answer is None:
                raise
            return answer
        return await self._read_answer(connection)

    @staticmethod
    async def _send_listening(connection: _Connection, data: bytes) -> None:
        """Write ``data`` while whatever the server sends meanwhile (an early answer) is read into the buffer, up to
        :data:`_MAX_EARLY_ANSWER` bytes: kept when the write fails, the socket closed under it."""

        async def listen() -> None:
            try:
                while len(connection.buffer) < _MAX_EARLY_ANSWER:
                    connection.buffer += await connection.stream.receive(65536)
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                anyio.BusyResourceError,
                OSError,
                ssl.SSLError,
            ):
                pass  # (the close or failure is met again by the write, or by the reading of the answer)

        failure: Exception | None = None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(listen)
            try:
                await connection.stream.send(data)
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError) as exc:
                failure = exc  # (raised as itself, not in the task group's ExceptionGroup)
            finally:
                tasks.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _early_answer(self, connection: _Connection) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """The complete answer the server sent before a write failed, if one can be read within
        :data:`_EARLY_ANSWER_WAIT` seconds and :data:`_MAX_EARLY_ANSWER` bytes; else None. The connection is
        discarded either way (the request was cut short)."""
        connection.limit = _MAX_EARLY_ANSWER
        try:
            with anyio.move_on_after(_EARLY_ANSWER_WAIT):
                return await self._read_answer(connection, reusable=False)
        except _BROKEN:
            pass
        await self._discard(connection)
        return None

    async def _read_answer(
        self, connection: _Connection, *, reusable: bool = True
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        while True:
            lines = (await connection.read_head(_MAX_HEADER_BYTES)).split("\n")
            match = _STATUS_LINE.match(lines[0])
            status = int(match[1]) if match else 0
            if status < 100:
                raise RawHTTPError(f"malformed status line {lines[0][:80]!r}")
            if status >= 200 or status == 101:
                break  # interim answers (100 Continue, 103 Early Hints) come before the real one: skipped
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if line[:1] in (" ", "\t"):
                # obs-fold (RFC 9112 5.2): a line going on with the header above it, read as one space, as h11 (the
                # httpx path) reads it: else a proxy's "Content-Length:\r\n 42" was no answer, and the batch Lago
                # had ingested was sent again for ever. Whitespace before the first header is refused (RFC 9112 2.2).
                if not headers:
                    raise RawHTTPError(f"malformed answer: a header line begins with whitespace {line[:40]!r}")
                name, value = headers[-1]
                headers[-1] = (name, f"{value} {line.strip(_OWS)}".strip(_OWS))
            else:
                # A line that is no "name: value" field (no colon, or nothing before it) is a malformed answer, as
                # h11 reads it: else it became a header of its own and the rest was taken for an answer.
                name, colon, value = line.partition(":")
                name = name.strip()
                if not colon or not name:
                    raise RawHTTPError(f"malformed answer: a header line without a name {line[:40]!r}")
                headers.append((name, value.strip(_OWS)))
        length: int | None = None
        chunked = False
        close = lines[0].startswith("HTTP/1.0")
        for name, value in headers:
            lowered = name.lower()
            if lowered == "content-length":
                # "42, 42" (a proxy joining two equal headers into one) is 42, as RFC 9110 8.6 allows and h11 reads
                # it; the body's end is unknown (RFC 9112 6.3) when a length is no number or two lengths disagree:
                # the connection cannot be read any further
                value_length = _decimal(value) if "," not in value else _same_length(value)
                if value_length is None or (length is not None and value_length != length):
                    raise RawHTTPError(f"malformed Content-Length {value[:40]!r}")
                length = value_length
            elif lowered == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif lowered == "connection":
                close = "close" in value.lower() or (close and "keep-alive" not in value.lower())
        close = close or status == 408  # (the server gave up on this connection: RFC 9110 15.5.9)
        if status < 200 or status in (204, 304):
            # RFC 9112 6.3: no body, whatever the headers say. (Read "to EOF", a kept-alive 204 would wait out the
            # timeout and be taken for no answer.) A 101 leaves HTTP: the connection is not reused.
            body = b""
            close = close or status == 101
        elif chunked:
            body = await self._read_chunked(connection)
        elif length is not None:
            body = await connection.read_exactly(length)
        else:
            body = await connection.read_to_eof()
            close = True
        # Bytes after the answer (a server writing more than its framing said), in the buffer or the TLS layer: no
        # answer to any request to come.
        if close or not reusable or _held(connection) or len(self._idle) >= self.max_idle:
            await self._discard(connection)
        else:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        return status, headers, body

    async def _read_chunked(self, connection: _Connection) -> bytes:
        parts: list[bytes] = []
        while True:
            size_line = await connection.read_until(b"\r\n", _MAX_HEADER_BYTES)
            size_text = size_line.split(b";", 1)[0].strip()  # (chunk extensions ignored)
            if not _HEX.fullmatch(size_text):  # int(..., 16) would also take "0x1f", "-5", "1_0"
                raise RawHTTPError(f"malformed chunk size {size_line[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                while await connection.read_until(b"\r\n", _MAX_HEADER_BYTES):  # trailers, then a blank line
                    pass
                return b"".join(parts)
            parts.append(await connection.read_exactly(size))
            if await connection.read_exactly(2) != b"\r\n":  # the size was wrong: where the body ends is unknown
                raise RawHTTPError(f"malformed chunk: {size} bytes not followed by CRLF")

    @staticmethod
    async def _discard(connection: _Connection | None) -> None:
        if connection is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await connection.stream.aclose()
                except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, ssl.SSLError):
                    pass
