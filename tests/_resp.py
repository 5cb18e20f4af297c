"""Reading the Redis wire protocol (RESP) as it passes through a test's TCP relay in front of a redis-server: where a
client's command ends (and what it says), where a server's answer ends."""

from __future__ import annotations


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
