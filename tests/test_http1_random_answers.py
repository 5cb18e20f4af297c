"""The raw HTTP/1.1 poster (``_http1.RawPoster``) reads every answer as httpx reads the same bytes: a seeded
differential test against a scripted TCP server.

A threaded server on 127.0.0.1 answers each request from a plan drawn from a fixed seed. Valid answers: framed by
Content-Length (leading zeros, ``n, n``, repeated), chunked (extensions, trailers, either hex case, leading zeros, a
body of the last chunk alone) or by the close; 100, 102 and 103 interim answers first; ``Connection: close`` or
``keep-alive``, HTTP/1.0; header names in any case, folded values, repeated ``Set-Cookie``, UTF-8 values; gzip,
deflate or identity ``Content-Encoding``; 204 and 304 with framing headers and no body; a 413 or 401 written before the
request's body was read. Each is written whole, a byte at a time or in random pieces, each piece read by the client
before the next is written (its end a separate read). Invalid or hostile ones: bad status lines, header lines without
a name, a Content-Length short of the body, disagreeing, negative, huge or no number, truncated or misframed chunked
bodies, a close before any answer, garbage. After an answer the server may write bytes nobody asked for (an
unrequested second answer, a body a 204 said it had) or close a connection it said it kept alive.

Oracle: for a valid answer, the status, headers and body (decoded as ``LagoClient.send_event_batch_json`` decodes it)
equal what httpx reads from the same server; for an invalid one the poster raises ``RawHTTPError`` (the delivery
retries it: never a wrong success), as httpx raises. The server checks the poster's connections: an answer is only the
answer to its own request (each body names its request), no request is ever written on a connection that must not be
reused (bytes left on it, a broken answer, a close said), a connection that could be reused is, and every connection
the poster is done with is closed at once, not leaked.

Each seed that found a defect is kept below as a named regression case explaining the bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import fcntl
import gzip
import http
import json
import os
import random
import re
import select
import socket
import struct
import termios
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from lago_org_billing._http1 import RawHTTPError, RawPoster

pytestmark = pytest.mark.anyio

PATH = "/api/v1/events/batch"
#: No answer in a plan needs waiting for: this is only how long a defect (a read never ending) takes to fail a test.
TIMEOUT = 5.0
#: Seeds of the differential test (a quarter of a second each, both clients).
SEEDS = list(range(1, 17))

_REQUEST = re.compile(rb"POST [^ ?]*\?request=([0-9]+) HTTP/1\.1")
_OWS = ("", " ", " ", "  ", "\t")
_TRAILING_OWS = ("", "", " ", "\t")
#: Header values as a UTF-8 server writes them (read as latin-1, one character a byte): "voilà" ends in C3 A0 and
#: "ÅÅ" in C3 85, bytes Python's ``str.strip()`` takes for whitespace (NBSP, NEL); HTTP strips only SP and HTAB.
_UTF8_VALUES = [text.encode().decode("latin-1") for text in ("voilà", "déjà", "Ångström ÅÅ", "naïve café", "日本")]


# ------------------------------------------------------------------ the plan: what the server writes for each request


@dataclasses.dataclass
class Answer:
    """What the server does with one request (every attempt of it: a request the poster sends again gets the same)."""

    name: str
    data: bytes  # the answer as written (interim answers included); b"": none
    valid: bool  # a well-formed answer; else the poster must raise RawHTTPError
    pieces: tuple[int, ...] = ()  # where ``data`` is cut into separate writes
    drain: bool = False  # each piece read by the client before the next one is written
    early: bool = False  # written once the request's head is read, its body not: then a half close, the body dropped
    close: bool = False  # the server closes the connection after the answer
    stray: bytes = b""  # written after the answer: bytes nobody asked for
    stray_apart: bool = False  # ... as a write of their own, once the client read the answer
    reusable: bool = False  # the poster may (and should) write its next request on this connection

    def __repr__(self) -> str:
        return f"<{self.name}: {self.data[:300]!r}{'...' if len(self.data) > 300 else ''} stray={self.stray[:60]!r}>"


def _cased(rng: random.Random, name: str) -> str:
    style = rng.randrange(4)
    if style == 1:
        return name.lower()
    if style == 2:
        return name.upper()
    if style == 3:
        return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in name)
    return name


def _field(rng: random.Random, name: str, value: str) -> str:
    return f"{_cased(rng, name)}:{rng.choice(_OWS)}{value}{rng.choice(_TRAILING_OWS)}\r\n"


def _status_line(rng: random.Random, version: str, status: int) -> str:
    reason = rng.choice([http.HTTPStatus(status).phrase, "", "Whatever It Says", "ok\tfine"])
    return f"{version} {status}{' ' if reason or rng.random() < 0.3 else ''}{reason}\r\n"


def _lago_body(rng: random.Random, k: int, status: int) -> bytes:
    if 200 <= status < 300:
        if rng.random() < 0.1:
            return b""  # (an older Lago's empty 200)
        events = [
            {"transaction_id": f"tx-{k}-{i}", "external_subscription_id": "org_1", "code": "api_call"}
            for i in range(rng.randint(0, 4))
        ]
        document: dict[str, Any] = {"events": events, "request": k}
    else:
        document = {"status": status, "error": http.HTTPStatus(status).phrase, "code": "déjà_vu", "request": k}
    padding = rng.choice([0, 0, 0, 40, 900, 5000])
    if padding:
        document["pad"] = "x" * padding
    return json.dumps(document, ensure_ascii=rng.random() < 0.5).encode()


def _chunked(rng: random.Random, payload: bytes) -> bytes:
    """``payload`` chunked, each size in either hex case, with leading zeros, extensions and trailing whitespace."""
    out = b""
    start = 0
    while start < len(payload):
        size = rng.randint(1, max(1, min(len(payload) - start, rng.choice([1, 7, 64, 1000, 100_000]))))
        text = format(size, "x")
        text = "0" * rng.choice([0, 0, 0, 1, 4]) + (text.upper() if rng.random() < 0.3 else text)
        extension = rng.choice(["", "", ";name=value", ";a", ';q="x;y"', ";a=1;b=2", ";"])
        out += f"{text}{extension}{rng.choice(_TRAILING_OWS)}\r\n".encode() + payload[start : start + size] + b"\r\n"
        start += size
    last = rng.choice(["0", "00", "0000"]) + rng.choice(["", "", ";end=1"])
    trailers = "".join(_field(rng, name, value) for name, value in rng.sample([("X-Checksum", "abc"), ("X-T", "")], 2))
    return out + f"{last}\r\n{trailers[: rng.choice([0, len(trailers)])]}\r\n".encode("latin-1")


def _headers(rng: random.Random, status: int) -> list[tuple[str, str]]:
    extra = [("Content-Type", "application/json; charset=utf-8"), ("Server", "nginx/1.25.3")]
    extra += [("Set-Cookie", f"s{i}=v{i}; Path=/; HttpOnly") for i in range(rng.randint(0, 3))]
    extra += [("X-Note", rng.choice(_UTF8_VALUES))] * rng.randint(0, 1)
    extra += [("X-Request-Id", f"{rng.getrandbits(64):016x}"), ("Vary", "Accept-Encoding"), ("X-Empty", "")]
    if status in (429, 503):
        extra.append(("Retry-After", "3"))
    rng.shuffle(extra)
    return extra[: rng.randint(0, len(extra))]


def _folded(rng: random.Random) -> str:
    """A header value going on over continuation lines (obs-fold), as old proxies write long ones."""
    first = rng.choice(["alpha", ""])
    return f"{_cased(rng, 'X-Folded')}:{rng.choice(_OWS)}{first}\r\n beta\r\n\t gamma  delta\r\n"


def _cuts(rng: random.Random, data: bytes) -> tuple[int, ...]:
    mode = rng.choice(["whole", "whole", "bytes", "pieces", "pieces"])
    if mode == "bytes" and len(data) <= 1200:
        return tuple(range(1, len(data)))
    if mode == "whole" or len(data) < 2:
        return ()
    return tuple(sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8)))))


def _valid(rng: random.Random, k: int) -> Answer:
    status = rng.choice([200, 200, 200, 200, 201, 202, 204, 304, 400, 401, 404, 413, 422, 429, 500, 502, 503])
    version = "HTTP/1.0" if rng.random() < 0.2 else "HTTP/1.1"
    empty = status in (204, 304)
    if empty:
        framing = rng.choice(["none", "length", "chunked"])  # framing headers, never a body (RFC 9112 6.3)
    elif version == "HTTP/1.0":
        framing = rng.choice(["length", "length", "close"])
    else:
        framing = rng.choice(["length", "length", "chunked", "chunked", "close"])
    if framing == "close":
        connection = rng.choice([None, "close"])
    elif version == "HTTP/1.1":
        connection = rng.choice([None, None, "keep-alive", "close"])
    else:
        connection = rng.choice([None, "keep-alive", "keep-alive", "close"])
    closes = (
        (framing == "close" and not empty)
        or (connection == "close")
        or (version == "HTTP/1.0" and connection != "keep-alive")
    )
    payload = b"" if empty else _lago_body(rng, k, status)
    encoding = rng.choice([None, None, "gzip", "deflate", "identity", "GZip"])
    if empty:
        pass
    elif encoding and encoding.lower() == "gzip":
        payload = gzip.compress(payload, mtime=0)
    elif encoding == "deflate":
        payload = zlib.compress(payload)
    head = ""
    if version == "HTTP/1.1":
        for interim in rng.choice([[], [], [100], [103], [100, 103], [102]]):
            head += f"HTTP/1.1 {interim} {http.HTTPStatus(interim).phrase}\r\n"
            head += "Link: </a.css>; rel=preload\r\n" if interim == 103 else ""
            head += "\r\n"
    head += _status_line(rng, version, status)
    fields = [_field(rng, name, value) for name, value in _headers(rng, status)]
    if encoding:
        fields.append(_field(rng, "Content-Encoding", encoding))
    if connection:
        fields.append(_field(rng, "Connection", _cased(rng, connection)))
    if rng.random() < 0.25:
        fields.append(_folded(rng))
    said = len(payload) if not empty else rng.randint(0, 500)  # (a 204/304 may state the length it would have)
    if framing == "length":
        style = rng.randrange(5)
        if style == 1:
            fields.append(_field(rng, "Content-Length", "0" * rng.randint(1, 3) + str(said)))
        elif style == 2:
            fields.append(_field(rng, "Content-Length", rng.choice(["{0}, {0}", "{0},{0}"]).format(said)))
        elif style == 3:
            fields += [_field(rng, "Content-Length", str(said)), _field(rng, "Content-Length", str(said))]
        else:
            fields.append(_field(rng, "Content-Length", str(said)))
    elif framing == "chunked":
        fields.append(_field(rng, "Transfer-Encoding", rng.choice(["chunked", "Chunked"])))
        payload = b"" if empty else _chunked(rng, payload)
    rng.shuffle(fields)
    data = (head + "".join(fields) + "\r\n").encode("latin-1") + payload
    close = closes and (framing == "close" or rng.random() < 0.5)  # else the client has to close it
    stray = b""
    if not closes:
        after = rng.choice(["keep", "keep", "keep", "close", "stray", "stray"])
        close = after == "close"  # keep-alive said, then a close
        if after == "stray":
            stray = rng.choice(
                [
                    b'HTTP/1.1 200 OK\r\nContent-Length: 26\r\n\r\n{"request":"unrequested"}\n',
                    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                    b"\r\n",
                    b"HTTP/1.1 200 OK\r\n",
                    b"x" * (said or 5),  # (the body a 204 said it had, or one longer than its Content-Length)
                ]
            )
    cuts = _cuts(rng, data)
    return Answer(
        name=f"{status} {version} {framing} connection={connection} encoding={encoding}",
        data=data,
        valid=True,
        pieces=cuts,
        drain=bool(cuts) and rng.random() < 0.7,
        close=close,
        stray=stray,
        stray_apart=rng.random() < 0.5,
        reusable=not closes and not close and not stray,
    )


def _early(rng: random.Random, k: int) -> Answer:
    """A proxy's 413 (or a 401 for the key) written once the request's head is read, nginx-style: then a half close,
    the body read and dropped."""
    status = rng.choice([413, 401])
    body = _lago_body(rng, k, status)
    data = (
        _status_line(rng, "HTTP/1.1", status)
        + _field(rng, "Content-Length", str(len(body)))
        + _field(rng, "Connection", "close")
        + "\r\n"
    ).encode("latin-1") + body
    return Answer(name=f"early {status}", data=data, valid=True, pieces=_cuts(rng, data), early=True)


def _ok_head(rng: random.Random, *fields: str) -> str:
    return _status_line(rng, "HTTP/1.1", 200) + _field(rng, "Content-Type", "application/json") + "".join(fields)


def _invalid(rng: random.Random, k: int) -> Answer:
    body = json.dumps({"events": [], "request": k}).encode()
    length = _field(rng, "Content-Length", str(len(body)))
    kind = rng.choice(
        ["status", "no name", "short", "conflict", "bad length", "truncated chunks", "bad chunk", "nothing", "garbage"]
    )
    if kind == "status":
        line = rng.choice(
            [
                "HTTP/1.1 2000 OK",
                "HTTP/1.1 200OK",
                "HTTP/1.1 200\tOK",
                "HTTP/1.1 20 OK",
                "HTTP/1.1 OK",
                "HTTP/1.1  200 OK",
                "HTTP/1.1 -200 OK",
                "HTTP/1.1 +200 OK",
                "HTTP/1.1 2OO OK",
                "HTTP/1.1x 200 OK",
                "HTTP/1 200 OK",
                "http/1.1 200 OK",
                " HTTP/1.1 200 OK",
                "ICY 200 OK",
                "HTTP/1.1 099 Below",
            ]
        )
        data = f"{line}\r\n{length}\r\n".encode("latin-1") + body
    elif kind == "no name":
        junk = _field(rng, "X-A", "1") + rng.choice(["This line has no colon\r\n", ": no name\r\n"])
        data = (_ok_head(rng, junk, length) + "\r\n").encode("latin-1") + body
    elif kind == "short":
        data = (_ok_head(rng, _field(rng, "Content-Length", str(len(body) + rng.randint(1, 50)))) + "\r\n").encode()
        data += body
    elif kind == "conflict":
        other = str(len(body) + rng.choice([-1, 1, 7]))
        lengths = rng.choice(
            [length + _field(rng, "Content-Length", other), _field(rng, "Content-Length", f"{len(body)}, {other}")]
        )
        data = (_ok_head(rng, lengths) + "\r\n").encode() + body
    elif kind == "bad length":
        value = rng.choice(["-1", f"+{len(body)}", f"{len(body)}.0", "0x10", "", "1e3", "12 34", "9" * 21, "²"])
        data = (_ok_head(rng, _field(rng, "Content-Length", value)) + "\r\n").encode("latin-1") + body
    elif kind == "truncated chunks":
        chunks = _chunked(rng, body)
        cut = rng.randrange(len(chunks))  # (anywhere before the last CRLF)
        data = (_ok_head(rng, "Transfer-Encoding: chunked\r\n") + "\r\n").encode() + chunks[:cut]
    elif kind == "bad chunk":
        size = rng.choice(["0x5", "-5", "5_0", "", " ", "g", "5 5", "+5"])
        chunk = rng.choice([f"{size}\r\nhello\r\n", f"3\r\n{body[:5].decode()}\r\n"])  # (a bad size, or too much data)
        data = (_ok_head(rng, "Transfer-Encoding: chunked\r\n") + f"\r\n{chunk}0\r\n\r\n").encode()
    elif kind == "nothing":
        whole = (_ok_head(rng, length) + "\r\n").encode()
        data = whole[: rng.randrange(len(whole) - 3)]  # (the head never ends)
    else:
        data = rng.choice([b"<html><body>502 Bad Gateway</body></html>\r\n", b"\x15\x03\x01\x00\x02\x02\x50", b"\r\n"])
    cuts = _cuts(rng, data)
    return Answer(name=f"invalid: {kind}", data=data, valid=False, pieces=cuts, drain=bool(cuts), close=True)


def make_plan(seed: int, size: int = 10) -> list[Answer]:
    rng = random.Random(seed)
    plan = []
    for k in range(size):
        draw = rng.random()
        plan.append(_invalid(rng, k) if draw < 0.3 else _early(rng, k) if draw < 0.38 else _valid(rng, k))
    return plan


# ------------------------------------------------------------------ the server


class _ClientEnd:
    """The client's end of a server connection: the client runs in this process, so its socket is among this
    process's descriptors, and the bytes it has not read yet tell the server when to write the next piece."""

    def __init__(self, connection: socket.socket) -> None:
        self.server_end = connection.getsockname()
        self.client_end = connection.getpeername()
        self.fd = next((fd for fd in self._sockets() if self._is_it(fd)), None)

    @staticmethod
    def _sockets() -> Iterator[int]:
        if not os.path.isdir("/proc/self/fd"):  # pragma: no cover (not Linux): pieces written without waiting
            return
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    yield int(name)
            except OSError:
                continue

    def _is_it(self, fd: int) -> bool:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return False
        try:
            return bool(sock.getsockname() == self.client_end and sock.getpeername() == self.server_end)
        except OSError:
            return False
        finally:
            sock.detach()  # (the descriptor stays the client's: never closed here)

    def has_read(self, connection: socket.socket) -> bool:
        """Whether everything written on ``connection`` reached the client and was read (or the client closed)."""
        if self.fd is None or not self._is_it(self.fd):
            return True  # (closed: what it left unread is not waited for)
        try:
            unsent: int = struct.unpack("i", fcntl.ioctl(connection.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            unread: int = struct.unpack("i", fcntl.ioctl(self.fd, termios.FIONREAD, b"\0" * 4))[0]
        except OSError:
            return True
        return unsent == 0 and unread == 0

    def holds(self, event: int) -> bool:
        """Whether the client's socket shows ``event`` (``POLLIN``: bytes it has not read; ``POLLRDHUP``: the server's
        close), or is gone: what the poster's next look at the connection sees."""
        if self.fd is None or not self._is_it(self.fd):
            return True
        poller = select.poll()
        poller.register(self.fd, event)
        return bool(poller.poll(0))


@dataclasses.dataclass
class Arrival:
    connection: int
    spent: bool  # the connection was one no request may be written on any more


class ScriptedServer:
    """A TCP server on 127.0.0.1 (a thread a connection) answering request ``k`` (``?request=k``) by ``plan[k]``."""

    def __init__(self, plan: list[Answer]) -> None:
        self.plan = plan
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.changed = threading.Condition()
        self.arrivals: dict[int, list[Arrival]] = collections.defaultdict(list)
        self.finished: collections.Counter[int] = collections.Counter()
        self.handlers: list[threading.Thread] = []
        self.failures: list[BaseException] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # (closed by stop())
            with self.changed:
                number = len(self.handlers)
                handler = threading.Thread(target=self._serve, args=(connection, number), daemon=True)
                self.handlers.append(handler)
            handler.start()

    def _serve(self, connection: socket.socket, number: int) -> None:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = _ClientEnd(connection)
        buffer = b""
        spent = False
        try:
            with connection:
                while True:
                    while b"\r\n\r\n" not in buffer:
                        data = connection.recv(65536)
                        if not data:
                            return  # the client closed it
                        buffer += data
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    match = _REQUEST.match(head)
                    assert match, head[:200]
                    k = int(match[1])
                    answer = self.plan[k]
                    with self.changed:
                        self.arrivals[k].append(Arrival(number, spent))
                    try:
                        length = int(re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)[1])  # type: ignore[index]
                        if answer.early:
                            self._write(connection, client, answer.data, answer.pieces, drain=False)
                            connection.shutdown(socket.SHUT_WR)
                            while connection.recv(65536):  # (the body, dropped, until the client closes)
                                pass
                            return
                        while len(buffer) < length:
                            data = connection.recv(65536)
                            if not data:
                                return
                            buffer += data
                        buffer = buffer[length:]
                        apart = answer.stray_apart
                        tail = b"" if apart else answer.stray  # (in the answer's last write: they arrive with it)
                        self._write(connection, client, answer.data + tail, answer.pieces, drain=answer.drain)
                        if answer.stray and apart:  # once the client read the answer: on an idle connection
                            self._wait_read(connection, client)
                            connection.sendall(answer.stray)
                            self._wait(lambda: client.holds(select.POLLIN))
                        spent = not answer.reusable
                        if answer.close:
                            connection.shutdown(socket.SHUT_WR)
                            self._wait(lambda: client.holds(select.POLLRDHUP))
                            return
                    finally:
                        with self.changed:
                            self.finished[k] += 1
                            self.changed.notify_all()
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            pass  # the client closed it mid-answer (it found the answer broken)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # (a shutdown of a connection the client reset)
                self.failures.append(exc)
        except BaseException as exc:  # (a defect of this server: failed in the test, not lost in a thread)
            self.failures.append(exc)

    def _write(
        self, connection: socket.socket, client: _ClientEnd, data: bytes, cuts: tuple[int, ...], *, drain: bool
    ) -> None:
        for start, end in zip((0, *cuts), (*cuts, len(data)), strict=True):
            connection.sendall(data[start:end])
            if drain and end < len(data):
                self._wait_read(connection, client)

    @staticmethod
    def _wait(condition: Callable[[], bool]) -> None:
        # Polls the kernel's state of the client's socket (no sleep stands for the client's doing): the bound is only
        # for a client that stopped.
        deadline = time.monotonic() + 2
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.0001)

    def _wait_read(self, connection: socket.socket, client: _ClientEnd) -> None:
        self._wait(lambda: client.has_read(connection))

    def _settle(self, k: int) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: self.arrivals[k] and self.finished[k] == len(self.arrivals[k]), 5):
                raise AssertionError(f"request {k}: the server never finished answering it")

    async def settled(self, k: int) -> None:
        """Until the server did all it does for request ``k`` (its stray bytes written, its close done)."""
        await anyio.to_thread.run_sync(self._settle, k)

    def _ended(self, numbers: list[int]) -> list[int]:
        """The connections among ``numbers`` still open after a bounded wait for their close."""
        deadline = time.monotonic() + 5
        for number in numbers:
            self.handlers[number].join(max(0.0, deadline - time.monotonic()))
        return [number for number in numbers if self.handlers[number].is_alive()]

    async def still_open(self, numbers: list[int]) -> list[int]:
        return await anyio.to_thread.run_sync(self._ended, numbers)

    async def stop(self) -> list[int]:
        """Stops accepting; the connections still open after a bounded wait (each must have been closed)."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # (wakes the blocked accept(): a close alone does not)
        except OSError:
            pass
        self.listener.close()
        await anyio.to_thread.run_sync(self.acceptor.join, 5)
        left = await self.still_open(list(range(len(self.handlers))))
        if self.failures:
            raise self.failures[0]
        return left


# ------------------------------------------------------------------ the two clients


@dataclasses.dataclass(frozen=True)
class Read:
    """An answer as the caller sees it. Headers are compared modulo what h11 (under httpx) rewrites: a Content-Length
    listed twice kept once, Transfer-Encoding lower-cased; and a folded value's spaces (one or more, RFC 9112 5.2)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    lengths: frozenset[int]
    body: bytes


def _read(status: int, headers: list[tuple[str, str]], body: bytes) -> Read:
    kept = []
    lengths: set[int] = set()
    for name, value in headers:
        lowered = name.lower()
        if lowered == "content-length":
            lengths.update(int(part) for part in value.split(","))
            continue
        if lowered == "transfer-encoding":
            value = value.lower()
        elif lowered == "x-folded":
            value = " ".join(value.split())
        kept.append((name, value))
    return Read(status, tuple(kept), frozenset(lengths), body)


def as_the_caller_reads(status: int, headers: list[tuple[str, str]], content: bytes) -> Read:
    """As ``LagoClient.send_event_batch_json`` reads the poster's answer: a 2xx without Content-Encoding as it came,
    anything else decoded by httpx from the headers as bytes."""
    if not (200 <= status < 300 and not any(name.lower() == "content-encoding" for name, _ in headers)):
        raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        content = httpx.Response(status, headers=raw, content=content).content
    return _read(status, headers, content)


Outcome = Read | str  # (a str: the error raised)


async def through_the_poster(plan: list[Answer], body_size: Callable[[int], int]) -> tuple[list[Outcome], list[str]]:
    """Posts every request of ``plan`` through one RawPoster; the outcomes, and what the server saw that breaks the
    connection rules (empty when none)."""
    server = ScriptedServer(plan)
    poster = RawPoster(server.url, {"Authorization": "Bearer k"}, timeout=TIMEOUT)
    outcomes: list[Outcome] = []
    broken: list[str] = []
    last: int | None = None  # the connection the previous request was answered on
    try:
        for k, answer in enumerate(plan):
            try:
                outcomes.append(as_the_caller_reads(*await poster.post(f"{PATH}?request={k}", b"x" * body_size(k))))
            except RawHTTPError as exc:
                outcomes.append(f"RawHTTPError: {exc}")
            await server.settled(k)
            arrivals = server.arrivals[k]
            reused = arrivals[0].connection == last
            if k and reused != plan[k - 1].reusable:
                broken.append(f"request {k}: {'on' if reused else 'not on'} the connection of answer {plan[k - 1]}")
            if any(arrival.spent for arrival in arrivals):
                broken.append(f"request {k}: written on a connection left unusable by {plan[k - 1]}")
            if len(arrivals) != (2 if reused and not answer.valid else 1):  # (a reused connection broken: once more)
                broken.append(f"request {k}: {len(arrivals)} attempts for {answer}")
            last = arrivals[-1].connection
            # Every connection but the last one is closed by now (the poster closes what it is done with at once).
            if left := await server.still_open([n for n in range(len(server.handlers)) if n != last]):
                broken.append(f"after request {k}: connections {left} left open")
    finally:
        await poster.aclose()
        if left := await server.stop():
            broken.append(f"after aclose(): connections {left} left open")
    return outcomes, broken


async def through_httpx(plan: list[Answer], body_size: Callable[[int], int]) -> list[Outcome]:
    """Posts every request of ``plan`` through httpx: the reference. Without the bytes nobody asked for, which are no
    part of any answer: httpcore (1.0.9) reads those that came in with an answer as the next request's answer."""
    server = ScriptedServer([dataclasses.replace(answer, stray=b"") for answer in plan])
    outcomes: list[Outcome] = []
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, trust_env=False) as client:
            for k in range(len(plan)):
                try:
                    response = await client.post(
                        f"{PATH}?request={k}", content=b"x" * body_size(k), headers={"Content-Type": "application/json"}
                    )
                except httpx.HTTPError as exc:
                    outcomes.append(f"{type(exc).__name__}: {exc}")
                else:
                    raw = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response.headers.raw]
                    outcomes.append(_read(response.status_code, raw, response.content))
                await server.settled(k)
    finally:
        assert not await server.stop(), "httpx left connections open"
    return outcomes


def _request_body_sizes(seed: int) -> Callable[[int], int]:
    """Mostly small batches; now and then one over ``_LISTEN_FROM`` (written while the connection is read)."""
    sizes = [random.Random(seed * 1000 + k).choice([2, 300, 300, 300, 150_000]) for k in range(100)]
    return sizes.__getitem__


# ------------------------------------------------------------------ the differential test


def _compare(plan: list[Answer], raw: list[Outcome], via_httpx: list[Outcome], where: str) -> list[str]:
    problems = []
    for k, (answer, mine, theirs) in enumerate(zip(plan, raw, via_httpx, strict=True)):
        if not answer.valid:
            if isinstance(mine, Read):
                problems.append(f"{where} request {k}: {answer} read as {mine.status} (a wrong success)")
            if isinstance(theirs, Read):
                problems.append(f"{where} request {k}: {answer} is read by httpx too: not an invalid answer")
        elif mine != theirs:
            problems.append(f"{where} request {k}: {answer}\n  poster: {mine}\n  httpx:  {theirs}")
        elif isinstance(mine, Read) and mine.status not in (204, 304) and mine.body:
            # the answer to this request, not to another: its body names the request
            if json.loads(mine.body).get("request") != k:
                problems.append(f"{where} request {k}: answered with {mine.body[:80]!r}")
    return problems


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_answers_are_read_as_httpx_reads_them(seed: int) -> None:
    """For a seed's plan of valid and hostile answers: the poster's answer equals httpx's for each valid one, is
    RawHTTPError for each invalid one; no answer is read for another request, no connection reused that must not be,
    none left open."""
    plan = make_plan(seed)
    sizes = _request_body_sizes(seed)
    raw, broken = await through_the_poster(plan, sizes)
    via_httpx = await through_httpx(plan, sizes)
    problems = _compare(plan, raw, via_httpx, f"seed {seed}") + broken
    assert not problems, "\n".join(problems)


async def test_an_answer_written_a_byte_at_a_time_each_byte_read_alone() -> None:
    """Every byte boundary of an answer (interim answers, folded and repeated headers, gzip, chunked with extensions
    and trailers) falls between two reads of the client, and the answer still reads as httpx reads it; then the
    connection is reused."""
    body = gzip.compress(json.dumps({"events": [], "request": 0}).encode(), mtime=0)
    half = len(body) // 2
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nset-cookie: a=1\r\nSET-COOKIE: b=2\r\nX-Folded: alpha\r\n beta\r\n"
        b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{half:X};a=1\r\n".encode() + body[:half] + f"\r\n00{len(body) - half:x} \r\n".encode() + body[half:]
        + b"\r\n0;end\r\nX-Checksum: abc\r\n\r\n"
    )  # fmt: skip
    answer = Answer("byte at a time", data, valid=True, pieces=tuple(range(1, len(data))), drain=True, reusable=True)
    raw, broken = await through_the_poster([answer, answer], lambda k: 2)
    via_httpx = await through_httpx([answer, answer], lambda k: 2)
    assert not broken
    assert raw == via_httpx
    assert isinstance(raw[0], Read) and json.loads(raw[0].body) == {"events": [], "request": 0}


# ------------------------------------------------------------------ what the seeds found, kept as named cases


async def _one_answer(data: bytes) -> Outcome:
    """``data`` as the answer to one request through the poster (the server closes after it)."""
    server = ScriptedServer([Answer("one", data, valid=True, close=True)])
    poster = RawPoster(server.url, {}, timeout=TIMEOUT)
    try:
        return as_the_caller_reads(*await poster.post(f"{PATH}?request=0", b"{}"))
    except RawHTTPError as exc:
        return f"RawHTTPError: {exc}"
    finally:
        await poster.aclose()
        assert not await server.stop()


@pytest.mark.parametrize(
    "status_line",
    [
        pytest.param(b"HTTP/1.1 2000 OK", id="four-digit-code"),  # seeds 5 and 10: read as 200
        pytest.param(b"HTTP/1.1 200OK", id="no-space-before-reason"),  # seed 6
        pytest.param(b"HTTP/1.1 200\tOK", id="tab-before-reason"),  # seed 31
        pytest.param(b"HTTP/1.1x 200 OK", id="version-run-on"),  # (no seed drew it: the same defect in the version)
    ],
)
async def test_a_status_code_that_runs_on_into_other_characters_is_no_answer(status_line: bytes) -> None:
    """A status line whose three digits go on with a digit or a letter ("2000", "200OK") is malformed (RFC 9112 4:
    HTTP-version SP 3DIGIT SP reason), as httpx (h11) refuses it: the poster read its first three digits and took
    "2000" for 200, a success, and the delivery deleted a batch no one may have ingested."""
    outcome = await _one_answer(status_line + b'\r\nContent-Length: 13\r\n\r\n{"events":[]}')
    assert isinstance(outcome, str) and "malformed status line" in outcome, outcome


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"This line has no colon", id="no-colon"),  # seeds 1, 3, 4, 5, 8, 14, 15, 18, 26, 28: one or
        pytest.param(b": no name", id="empty-name"),  # the other, read as a 200
    ],
)
async def test_a_header_line_without_a_name_is_no_answer(line: bytes) -> None:
    """A head line that is no ``name: value`` field (no colon, or nothing before it) is malformed, as httpx refuses
    it: the poster made a header of it (``("This line has no colon", "")``) and read the rest as an answer."""
    outcome = await _one_answer(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n" + line + b"\r\nContent-Length: 2\r\n\r\n{}")
    assert isinstance(outcome, str) and "a header line without a name" in outcome, outcome


# seeds 2, 3, 5, 6, 7, 11, 12, 16, 18, 19, 21, 22, 23, 25, 26, 27, 28, 29, 30, 32: the headers differed from httpx's
@pytest.mark.parametrize("text", ["voilà", "déjà", "ÅÅ"], ids=["voila", "deja", "A-ring"])
async def test_a_utf8_header_value_keeps_its_last_byte(text: str) -> None:
    """A header value ending in a UTF-8 "à" (C3 A0) or "Å" (C3 85) is read whole, as httpx reads it: the poster
    stripped it with ``str.strip()``, which takes A0 (no-break space) and 85 (next line) in its latin-1 reading for
    whitespace, and cut the value's last byte (a Location or an error header unreadable). HTTP strips SP and HTAB."""
    value = text.encode()
    outcome = await _one_answer(b"HTTP/1.1 404 Not Found\r\nX-Note: " + value + b" \r\nContent-Length: 2\r\n\r\n{}")
    assert isinstance(outcome, Read), outcome
    assert ("X-Note", value.decode("latin-1")) in outcome.headers
