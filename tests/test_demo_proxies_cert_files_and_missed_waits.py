"""Review of ``lago-org-billing demo`` (the Quickstart's first command) on a demanding user's machine: the ``--serve``
curl commands behind a corporate proxy, a stale ``SSL_CERT_FILE`` in the environment, a delivery wait that runs out,
webhooks the app refused, and a Ctrl-C while the demo waits for the webhooks (a guard: no defect there)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lago_org_billing import _demo
from lago_org_billing.cli import main

PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (a proxy that refuses every connection)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")
def test_demo_serve_curl_commands_work_as_printed_behind_a_proxy(
    closed_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corporate laptop has ``http_proxy``/``ALL_PROXY`` set in its shell, and curl sends even 127.0.0.1 there: the
    printed commands, pasted as they are, failed with nothing on screen (``-s`` silenced curl's error)."""
    proxy = f"http://127.0.0.1:{closed_port}"
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, proxy)
    shell_env = {**os.environ}  # the user's shell, proxies included (the demo sets them aside in its own process)
    results: list[subprocess.CompletedProcess[bytes]] = []

    def interrupt(seconds: float) -> None:
        for line in capsys.readouterr().out.splitlines():
            if line.strip().startswith("curl "):
                results.append(
                    subprocess.run(shlex.split(line), capture_output=True, timeout=30, check=False, env=shell_env)
                )
        raise KeyboardInterrupt

    monkeypatch.setattr(_demo, "time", SimpleNamespace(monotonic=time.monotonic, sleep=interrupt))
    assert _demo.run_demo(serve=True) == 0
    assert len(results) == 2
    for done in results:
        assert done.returncode == 0, (done.args, done.stderr)
        assert b"usage" in done.stdout


def test_demo_runs_with_a_stale_ssl_cert_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``SSL_CERT_FILE`` naming a file gone (a removed corporate CA bundle, an old virtualenv's certifi) has nothing to
    do with a demo all in plain HTTP on 127.0.0.1: it failed with uvicorn's lifespan traceback (FileNotFoundError) and
    'the emulator could not be served on 127.0.0.1:0 (port in use? ...)', exit 2. The variable is put back after."""
    gone = str(tmp_path / "gone-ca-bundle.pem")
    monkeypatch.setenv("SSL_CERT_FILE", gone)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "gone-certs"))
    assert main(["demo"]) == 0, capsys.readouterr()
    assert "Every request billed exactly once" in capsys.readouterr().out
    assert os.environ["SSL_CERT_FILE"] == gone


def test_demo_says_so_when_events_do_not_reach_lago_in_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lago refusing the events (503) past the demo's wait: the demo said 'Lago received 0 events (30.00s after the
    last response)', as if that were the end of it. It says the wait ran out, how many of how many arrived, and that
    the report shows what is missing; exit 1."""
    seed = _demo.seed
    fakes: list[Any] = []

    def refusing_events(fake: Any) -> None:
        seed(fake)
        from lago_org_billing.testing._server import install_controls

        install_controls(fake).faults.inject(503, path="/api/v1/events")
        fakes.append(fake)

    report = _demo._report

    async def report_then_recover(fake: Any, *args: Any) -> bool:
        fake.faults.clear()  # Lago back: the app's pipeline delivers what it holds when it stops
        return await report(fake, *args)

    monkeypatch.setattr(_demo, "seed", refusing_events)
    monkeypatch.setattr(_demo, "_report", report_then_recover)
    monkeypatch.setattr(_demo, "DELIVERY_TIMEOUT", 0.2)
    assert main(["demo"]) == 1
    out = capsys.readouterr().out
    assert "Only 0 of 62 events reached Lago within 0.2 s" in out, out
    assert "MISMATCH" in out


def test_demo_does_not_call_refused_webhooks_verified(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Webhooks the app refused (here signed with another key: 401) were announced as 'delivered and verified', then
    the org stayed blocked. The demo names what the app answered instead; exit 1."""
    seed = _demo.seed

    def wrong_key(fake: Any) -> None:
        seed(fake)
        from lago_org_billing.testing._server import install_controls

        dispatcher = install_controls(fake).webhook_dispatcher
        configure = dispatcher.configure
        dispatcher.configure = lambda **options: configure(**{**options, "hmac_key": "not-the-apps-key"})

    monkeypatch.setattr(_demo, "seed", wrong_key)
    assert main(["demo"]) == 1
    out = capsys.readouterr().out
    assert "delivered and verified" not in out
    assert "refused by the app" in out and "HTTP 401" in out, out


def test_ctrl_c_while_the_demo_waits_for_webhooks_stops_it_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C while the demo waits for Lago's webhooks (up to 10 s, in a worker thread) ends the demo at once, without
    waiting for that wait (a guard: it already did on asyncio, whose Ctrl-C cancels the awaiting task)."""
    if threading.current_thread() is not threading.main_thread():  # pragma: no cover
        pytest.skip("signals go to the main thread")
    seed = _demo.seed
    release = threading.Event()
    finished: list[bool] = []

    def stuck_webhooks(fake: Any) -> None:
        seed(fake)
        from lago_org_billing.testing._server import install_controls

        dispatcher = install_controls(fake).webhook_dispatcher

        def wait_delivered(count: int = 1, *, timeout: float = 10.0) -> list[Any]:
            os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, while the wait is on
            release.wait(30)
            finished.append(True)
            return list(dispatcher.deliveries)

        dispatcher.wait_delivered = wait_delivered

    monkeypatch.setattr(_demo, "seed", stuck_webhooks)
    try:
        assert main(["demo"]) == 130
        assert not finished, "the demo waited for the stuck webhook wait to end"
    finally:
        release.set()


def test_demo_says_so_when_the_webhooks_do_not_come_in_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The webhook wait running out ended the demo with the emulator harness's error ('is the emulator served
    (background delivery) and a webhook URL configured?'), exit 2, documented for a port taken. The demo says the
    webhooks did not come in time, goes on to its result, and exits 1."""
    seed = _demo.seed

    def slow_webhooks(fake: Any) -> None:
        seed(fake)
        from lago_org_billing.testing._server import install_controls

        dispatcher = install_controls(fake).webhook_dispatcher
        wait = dispatcher.wait_delivered
        # Waiting for one more delivery than will ever come: the timeout, at once.
        dispatcher.wait_delivered = lambda count=1, *, timeout=10.0: wait(len(dispatcher.deliveries) + 1, timeout=0)

    monkeypatch.setattr(_demo, "seed", slow_webhooks)
    assert main(["demo"]) == 1
    out = capsys.readouterr().out
    assert "Lago's webhooks did not reach the app within 10 s" in out, out
    assert "MISMATCH: see above." in out
