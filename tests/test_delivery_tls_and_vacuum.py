"""The background path's own fixes, checked again: TLS connections given up without waiting for a silent server, a
second worker never taking an unreadable orphan slot, a spool mostly made of dead letters not rewritten per backlog."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.tls import TLSListener

from lago_org_billing._http1 import RawHTTPError, RawPoster
from lago_org_billing._spool import SqliteOutbox
from test_delivery_connections_and_spool import padded, read_request

pytestmark = pytest.mark.anyio


async def tls_server(tls_files: tuple[Path, Path], handler: object, tasks: anyio.abc.TaskGroup) -> str:
    """Serve ``handler`` over TLS on 127.0.0.1 (the certificate of ``tls_files``); the base URL."""
    cert_file, key_file = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert_file), str(key_file))
    tcp = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = tcp.extra(anyio.abc.SocketAttribute.local_port)
    listener = TLSListener(tcp, context, standard_compatible=False)

    async def run() -> None:
        async with listener:
            await listener.serve(handler)  # type: ignore[arg-type]

    tasks.start_soon(run)
    return f"https://127.0.0.1:{port}"


class StuckServer:
    """A TLS server that reads a request, then neither answers nor reads any more (a hung upstream, a dead path)
    until ``release``."""

    def __init__(self) -> None:
        self.received = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self, stream: anyio.abc.ByteStream) -> None:
        async with stream:
            await read_request(stream)  # type: ignore[arg-type]
            self.received.set()
            await self.release.wait()


async def test_a_tls_connection_given_up_at_its_timeout_is_closed_without_waiting_for_the_server(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lago (or the way to it) stops answering on a TLS connection and the batch's timeout gives the connection up.
    Closing it waited, shielded from any cancellation, for the server's TLS close_notify (anyio's
    standard-compatible TLS close), which a server that does not answer does not send: the delivery worker hung
    until the server (or the TCP stack, ~15 min on a dead path) closed the connection, the shutdown with it."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))
    stuck, done = StuckServer(), anyio.Event()
    outcome: list[BaseException] = []
    async with anyio.create_task_group() as server:
        poster = RawPoster(await tls_server(tls_files, stuck, server), {}, timeout=0.2)

        async def post() -> None:
            try:
                await poster.post("/api/v1/events/batch", b"{}")
            except RawHTTPError as exc:
                outcome.append(exc)
            finally:
                done.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(post)
            with anyio.move_on_after(10):
                await done.wait()
            hung = not done.is_set()
            stuck.release.set()  # (lets a hung close end, so that the test does)
        server.cancel_scope.cancel()
    assert not hung, "giving up the connection waited for a server that does not answer"
    assert outcome and "no answer within" in str(outcome[0])


async def test_a_tls_exchange_cut_off_at_the_shutdown_deadline_closes_without_waiting_for_the_server(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same when the shutdown deadline cancels the exchange (``except BaseException`` -> ``_discard``): the
    shielded close waited for the server, so the shutdown outlived its deadline for as long as the server held on."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))
    stuck, done = StuckServer(), anyio.Event()
    async with anyio.create_task_group() as server:
        poster = RawPoster(await tls_server(tls_files, stuck, server), {}, timeout=60)
        cut = anyio.CancelScope()

        async def cut_off() -> None:
            with cut:
                await poster.post("/api/v1/events/batch", b"{}")
            done.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(cut_off)
            await stuck.received.wait()  # the server holds the request
            cut.cancel()
            with anyio.move_on_after(10):
                await done.wait()
            hung = not done.is_set()
            stuck.release.set()
        server.cancel_scope.cancel()
    assert not hung, "a cancelled exchange's close waited for a server that does not answer"
    assert not poster._idle


# ------------------------------------------------------------------------------------------------ the spool


async def test_a_second_worker_does_not_take_an_unreadable_orphan_slot_for_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``uvicorn --workers 2`` with an unreadable slot file ``spool.db.1`` (torn by a failing disk, a stray file): the
    first worker takes slot 0 and leaves the orphan alone, but the second took slot 1, the unreadable file, as its
    own spool: its opening failed ("file is not a database", a ConfigurationError blaming LAGO_SPOOL_PATH) and the
    worker could not start. It takes the next slot, and the file is left where it is for someone to check."""
    path = tmp_path / "spool.db"
    torn = b"this is not a database, " * 200
    (tmp_path / "spool.db.1").write_bytes(torn)
    first, second = SqliteOutbox(str(path)), SqliteOutbox(str(path))
    await first.open()
    try:
        with caplog.at_level(logging.ERROR, logger="lago_org_billing.delivery"):
            await second.open()
        try:
            assert second.path == str(path) + ".2"
            second.put(padded(1))
            await second.commit()
            assert second.unresolved() == 1
        finally:
            await second.close()
    finally:
        await first.close()
    assert (tmp_path / "spool.db.1").read_bytes() == torn, "the unreadable file was written to"
    assert any("spool.db.1" in record.getMessage() for record in caplog.records if record.levelno == logging.ERROR)


async def test_a_spool_mostly_made_of_dead_letters_is_not_rewritten_whole_for_each_drained_backlog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool is vacuumed once ``_SHRINK_FREE`` bytes are free with few events left; VACUUM rewrites the whole
    file, dead letters included, holding the spool meanwhile (no commit, no read; ``EventPipeline.dead_letters()``
    blocks the event loop). With 500 MB of dead letters that took 8.9 s, and it came again after every backlog of
    4 MiB (~8,000 events: a blip of Lago) was delivered. The file is vacuumed only when what it frees is at least
    what it rewrites (half the file free): at most as much writing as the backlog that freed the space took."""
    from lago_org_billing import _spool
    from lago_org_billing._spool import DeadLetter

    monkeypatch.setattr(_spool, "_SHRINK_FREE", 256 << 10)  # (the same at a small scale)
    path = str(tmp_path / "spool.db")
    outbox = SqliteOutbox(path, window=100_000)
    await outbox.open()
    for index in range(3_000):  # 1.5 MB of dead letters
        outbox.put(padded(index))
    await outbox.commit()
    await outbox.fill()
    for item in outbox.take(3_000):
        outbox.dead(item, DeadLetter(item.payload(), "no subscription", 404, "not_found"))
    await outbox.commit()
    for index in range(3_000, 3_700):  # a short backlog (350 kB), then delivered
        outbox.put(padded(index))
    await outbox.commit()
    await outbox.fill()
    assert outbox.file.conn is not None
    statements: list[str] = []
    outbox.file.conn.set_trace_callback(statements.append)
    outbox.resolve(outbox.take(1_000))
    await outbox.commit()
    outbox.file.conn.set_trace_callback(None)
    assert not any("VACUUM" in statement for statement in statements), "the whole spool was rewritten"
    assert len(outbox.dead_letters()) == 3_000
    await outbox.close()
