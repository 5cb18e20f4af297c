"""A test's TCP relay in front of a redis-server (:class:`Relay`), and reading the Redis wire protocol (RESP) as it
passes through: where a client's command ends (and what it says), where a server's answer ends."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit


class Relay:
    """A TCP relay on 127.0.0.1 in front of the redis-server at ``target``; clients connect to ``url``. Each
    connection is relayed by :meth:`link` (a subclass's: what it lets through, holds back or drops), from the end of
    ``__init__`` (a subclass sets its own attributes before calling it)."""

    def __init__(self, target: str) -> None:
        port = urlsplit(target).port
        assert port is not None
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.closed = False
        self.accepting = threading.Thread(target=self._accept, daemon=True)
        self.accepting.start()

    def link(self, client: socket.socket, upstream: socket.socket) -> None:
        """Start relaying one connection (threads of its own: this returns at once)."""
        raise NotImplementedError

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self.lock:
                self.sockets += [client, upstream]
                if self.closed:  # (accepted as the relay closed: ended with the others)
                    for sock in (client, upstream):
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                        sock.close()
                    return
            self.link(client, upstream)

    def close(self) -> None:
        """Stop listening and end every relayed connection. Each socket is shut down before it is closed: on Linux a
        close alone wakes no thread blocked in ``accept()`` or ``recv()`` on it (the socket stays open under it), so
        the relay went on listening, and relaying, after its test, its threads left blocked for the rest of the run,
        and a client got no end of its connection."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.lock:
            self.closed = True
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
        self.accepting.join(10)


class StallingRelay(Relay):
    """A relay that passes bytes both ways, except while ``stalled``: then nothing passes (a network partition
    dropping packets, a frozen node: calls get no answer)."""

    def __init__(self, target: str) -> None:
        self.stalled = False
        super().__init__(target)

    def link(self, client: socket.socket, upstream: socket.socket) -> None:
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.stalled:  # (lost: the client gives up on the call and drops its connection)
                    sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def command(buffer: bytes) -> tuple[list[bytes], int] | None:
    """The first whole command of ``buffer`` (a RESP array of bulk strings: what a client sends) and its length;
    None while it is not all there."""
    end = buffer.find(b"\r\n")
    if end < 0:
        return None
    assert buffer[:1] == b"*", buffer[:40]
    pos, args = end + 2, []
    for _ in range(int(buffer[1:end])):
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            return None
        start = end + 2
        size = int(buffer[pos + 1 : end])
        if len(buffer) < start + size + 2:
            return None
        args.append(buffer[start : start + size])
        pos = start + size + 2
    return args, pos


def answer(buffer: bytes, pos: int = 0) -> int | None:
    """Where the first whole answer (RESP2 or RESP3) of ``buffer`` from ``pos`` ends; None while it is not all there."""
    end = buffer.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, head, pos = buffer[pos : pos + 1], buffer[pos + 1 : end], end + 2
    if kind in (b"$", b"!", b"="):  # (bulk strings)
        size = int(head)
        if size < 0:
            return pos
        return pos + size + 2 if len(buffer) >= pos + size + 2 else None
    if kind in (b"*", b"~", b">", b"%"):  # (aggregates: a map's entries are two each)
        for _ in range(max(int(head), 0) * (2 if kind == b"%" else 1)):
            found = answer(buffer, pos)
            if found is None:
                return None
            pos = found
    return pos  # (one line: + - : _ , # ( and the aggregates' ends)
