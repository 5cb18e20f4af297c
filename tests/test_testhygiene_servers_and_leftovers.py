"""The suite's own leftovers: what a test run leaves outside its temporary directories.

* gunicorn (>= 25.1) opens a control socket for ``gunicornc``, by default ``$HOME/.gunicorn/gunicorn.ctl`` (or
  ``$XDG_RUNTIME_DIR/gunicorn.ctl``): every gunicorn the suite starts made ``~/.gunicorn`` and, starting, unlinked
  the socket found there - a developer's own running gunicorn's, or another xdist worker's gunicorn's (two masters
  at once: one took the other's path, and the first to exit removed it under the other).
* The Redis relays of ``tests/_resp.py`` (Redis behind a stalling or dropping link): ``close()`` closed their
  sockets without shutting them down, which on Linux wakes no thread blocked in ``accept()`` or ``recv()``: after its
  test a relay still listened on its port and relayed what came to the next redis-server there, its threads stayed
  blocked for the rest of the run (a few per test), and its clients' connections were never ended.
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

import _resp as resp
from test_asgi_servers import ORG, SERVERS, Emulator, _exit_ok, app_dir, emulator, serve  # noqa: F401 - fixtures

GUNICORN = next(server for server in SERVERS if server.name.startswith("gunicorn"))


def test_a_gunicorn_started_by_the_suite_leaves_the_home_directory_alone(
    serve: Any,  # noqa: F811 - the fixture
    emulator: Emulator,  # noqa: F811 - the fixture
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Served, answered (the workers forked: the master's control socket is open by then) and stopped: nothing in
    ``$HOME``; the control socket, where the gunicorn has one, in the test's own directory."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    running = serve(GUNICORN)
    answer = httpx.get(f"{running.base_url}/v1/chat", headers=ORG, timeout=30)
    assert answer.status_code == 200, running.output()
    assert _exit_ok(running.stop(signal.SIGTERM), signal.SIGTERM), running.output()
    assert sorted(path.name for path in home.iterdir()) == [], running.output()


@pytest.mark.skipif(sys.platform != "linux", reason="how a blocked accept() and recv() end is Linux's")
def test_a_closed_relay_stops_listening_and_ends_its_connections() -> None:
    """Closed with a connection relayed (its pumps blocked reading both ends): the port refuses connections, the
    client's connection ends (no wait for its 10 s timeout), and the thread accepting has returned."""
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        relay = resp.StallingRelay(f"redis://127.0.0.1:{upstream.getsockname()[1]}/0")
        port = int(relay.url.rsplit(":", 1)[1].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            server, _ = upstream.accept()
            with server:
                client.sendall(b"PING")
                assert server.recv(4) == b"PING"  # (relayed: both pumps now wait on a read)
                relay.close()
                assert client.recv(1) == b""
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
    assert not relay.accepting.is_alive()
