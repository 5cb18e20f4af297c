"""``lago-org-billing demo`` on a new user's machine that is not a clean one: the shell's LAGO_* variables (a real or
unreachable Lago, an unwritable spool, Redis, quota off, other headers and paths, another event code), proxies, a
terminal that is not UTF-8, a Ctrl-C while the demo's traffic streams, and ``--serve`` stopped by SIGTERM.

* A Ctrl-C while the demo's streamed (SSE) answers were being written printed asyncio's "socket.send() raised
  exception." warnings, several lines of them: the example endpoint wrote its whole stream in one go, to a connection
  the demo's own client had closed, before the server could notice it was gone.
* ``demo --serve`` stopped by SIGTERM (``docker stop``, systemd, ``kill``) died at once by the signal, its servers
  unstopped; as a container's first process (PID 1: a signal without a handler is ignored there) it did not stop at
  all, and ``docker stop`` killed it after its 10 s grace. SIGTERM now stops it as Ctrl-C does.
* A guard (no defect found): the shell's LAGO_* and proxy variables change nothing in the demo, which runs on its own
  emulator with its own settings and says where that emulator is; what it prints is ASCII (a terminal that is not
  UTF-8 shows it all).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from lago_org_billing import _demo
from lago_org_billing.cli import main

#: The shell of a user who has already set the package up for their own app (or copied a colleague's .bashrc).
HOSTILE = {
    "LAGO_API_URL": "http://10.255.255.1:3000",  # a Lago that never answers
    "LAGO_API_KEY": "the-users-real-key",
    "LAGO_SPOOL_PATH": "/proc/no-such-dir/spool.db",  # unwritable
    "LAGO_REDIS_URL": "redis://127.0.0.1:9/0",  # nothing listens there
    "LAGO_QUOTA_MODE": "off",
    "LAGO_ORG_HEADER": "X-Tenant",
    "LAGO_USER_HEADER": "X-Member",
    "LAGO_EXCLUDE_PATHS": "/,/v1",  # every path of the demo
    "LAGO_EVENT_CODE": "tokens",
    "LAGO_WEBHOOK_HMAC_KEY": "another-key",
    "LAGO_MAX_RETRIES": "not-a-number",  # malformed: the demo must not even read it
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
}


def test_the_demo_ignores_the_shells_lago_and_proxy_variables(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The demo uses its embedded emulator and its own settings whatever LAGO_* the shell holds (none is read, not even
    a malformed one), says which Lago it uses, goes to no proxy, prints only ASCII (a terminal that is not UTF-8), and
    its report agrees with Lago's usage: exit 0, nothing logged (a guard)."""
    for name, value in HOSTILE.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING):
        code = main(["demo"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert re.search(r"^Lago emulator: http://127\.0\.0\.1:\d+$", out, re.MULTILINE), out
    assert "10.255.255.1" not in out and out.isascii()
    assert "Every request billed exactly once, Lago agrees" in out and "MISMATCH" not in out, out


def _child_env(**extra: str) -> dict[str, str]:
    """The environment of a ``lago-org-billing`` child process: this one's, with ``extra``. PYTHONUNBUFFERED is left
    out (a user's shell has none: stdout to a pipe is block-buffered), and PYTHONUTF8 too (``LANG=C`` must count)."""
    drop = {"PYTHONUNBUFFERED", "PYTHONUTF8"}
    return {**{name: value for name, value in os.environ.items() if name not in drop}, **extra}


def test_ctrl_c_while_the_demo_streams_prints_no_warnings(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A Ctrl-C while the demo's traffic runs ends it with exit 130 and nothing logged: a streamed answer whose client
    (the demo's own) has gone is not written out chunk after chunk (asyncio warned "socket.send() raised exception.",
    once a write past its fifth, on stderr). The servers are stopped: no thread of theirs is left."""
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals go to the main thread")
    client_gone = threading.Event()
    drive = _demo._drive

    async def drive_until_interrupted(app_url: str) -> Any:
        try:
            return await drive(app_url)
        finally:  # the demo's client has closed its connections
            client_gone.set()

    chat = _demo.chat_completions
    interrupted: list[bool] = []

    async def chat_interrupted_while_streaming(request: Request) -> Response:
        response = await chat(request)
        if isinstance(response, StreamingResponse) and not interrupted:
            interrupted.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C
            # The app's server (its own thread and loop) answers once the client has gone: as a busier machine would.
            client_gone.wait(30)
        return response

    monkeypatch.setattr(_demo, "_drive", drive_until_interrupted)
    monkeypatch.setattr(_demo, "chat_completions", chat_interrupted_while_streaming)
    before = set(threading.enumerate())
    with caplog.at_level(logging.WARNING):
        assert main(["demo"]) == 130
    assert interrupted and client_gone.is_set()
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert set(threading.enumerate()) <= before


def test_demo_serve_stops_on_sigterm_as_on_ctrl_c() -> None:
    """``demo --serve`` stopped by SIGTERM (``docker stop``, systemd, ``kill``) stops its servers and exits 0, as a
    Ctrl-C does, with nothing on stderr: it died by the signal, and as a container's PID 1 (where a signal without a
    handler is ignored) it did not stop at all. Run in a terminal that is not UTF-8 (``LANG=C``,
    ``PYTHONIOENCODING=ascii``), whose encoding the report and the commands fit."""
    ascii_terminal = _child_env(LANG="C", LC_ALL="C", PYTHONIOENCODING="ascii")
    child = subprocess.Popen(
        [sys.executable, "-m", "lago_org_billing.cli", "demo", "--serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ascii_terminal,
    )
    try:
        assert child.stdout is not None
        shown = b""
        while b"Serving until Ctrl-C" not in shown:  # printed with a flush: the demo now serves
            line = child.stdout.readline()
            assert line, (shown, child.stderr.read() if child.stderr else b"")
            shown += line
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:  # pragma: no cover (a failed assertion above)
            child.kill()
            child.communicate()
    assert b"Every request billed exactly once" in shown and shown.isascii()
    assert child.returncode == 0, err.decode()
    assert not err, err.decode()
