"""A new user's first hour: ``lago-org-billing demo`` and the examples, run as README.md says (behind a proxy, with a
port taken, piped, in zsh)."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from lago_org_billing import _demo
from lago_org_billing.cli import main
from test_examples import load

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another server listens on."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield int(sock.getsockname()[1])


def test_demo_runs_behind_an_http_proxy(
    closed_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user behind a corporate proxy (HTTP_PROXY... set, as many shells do) runs the Quickstart: the demo is all
    on 127.0.0.1 and must not send its traffic to the proxy (it failed: 'Lago did not answer ... Check
    LAGO_API_URL (http://127.0.0.1:...)', exit 2). The environment is left as it was."""
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, f"http://127.0.0.1:{closed_port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert main(["demo"]) == 0, capsys.readouterr()
    assert "Every request billed exactly once" in capsys.readouterr().out
    assert "NO_PROXY" not in os.environ and "no_proxy" not in os.environ


def test_demo_port_in_use_is_one_clear_line(busy_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    """``demo --port P`` with P taken says so in one line and how to choose another (as ``emulator`` does), not
    'port in use? see the log above' after uvicorn's tracebacks."""
    assert main(["demo", "--port", str(busy_port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{busy_port}" in err and "--port" in err


def test_demo_port_out_of_range_is_not_called_a_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--port", "99999"]) == 2
    err = capsys.readouterr().err
    assert "between 0 and 65535" in err and "port in use" not in err


def test_demo_serve_prints_curl_commands_that_work_in_any_shell(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``demo --serve`` prints curl commands: each works as printed, and a URL with '?' is quoted (unquoted, zsh,
    macOS's default shell, answers 'no matches found' and never runs curl)."""
    printed: list[str] = []

    def interrupt(seconds: float) -> None:  # the serve loop's wait: read what it printed, then Ctrl-C
        printed.extend(line.strip() for line in capsys.readouterr().out.splitlines() if "curl " in line)
        for line in printed:
            for token in shlex.split(line):
                if any(char in token for char in "?*["):
                    assert f"'{token}'" in line or f'"{token}"' in line, f"unquoted glob in: {line}"
            if shutil.which("curl"):
                done = subprocess.run(
                    [*shlex.split(line), "--fail", "--noproxy", "*"], capture_output=True, timeout=30, check=False
                )
                assert done.returncode == 0, (line, done.stderr)
                assert "usage" in done.stdout.decode()  # the completion's usage, then the org's current usage
        raise KeyboardInterrupt

    monkeypatch.setattr(_demo, "time", SimpleNamespace(monotonic=time.monotonic, sleep=interrupt))
    assert _demo.run_demo(serve=True) == 0
    assert len(printed) == 2


@pytest.fixture
def lago_env(fake_lago_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The served emulator, seeded like examples/seed.json, and LAGO_* pointing at it."""
    fake_lago_server.seed(json.loads((EXAMPLES / "seed.json").read_text()))
    monkeypatch.setenv("LAGO_API_URL", fake_lago_server.url)
    monkeypatch.setenv("LAGO_API_KEY", fake_lago_server.api_key)
    return fake_lago_server


def test_fastapi_example_answers_bad_org_input_with_422_not_500(lago_env: Any) -> None:
    """POST /organizations of examples/fastapi_app.py with an org id Lago cannot take ('acme.com', a natural
    choice) or a plan Lago does not have is the caller's mistake: a 422 that says why, not a 500."""
    module = load("fastapi_app")
    creator = {"Authorization": "Bearer :ada"}
    with TestClient(module.app, raise_server_exceptions=False) as client:
        dotted = client.post(
            "/organizations", json={"org_id": "acme.com", "name": "Acme", "email": "b@acme.test"}, headers=creator
        )
        assert dotted.status_code == 422, dotted.text
        assert "acme.com" in dotted.json()["detail"]
        unknown_plan = client.post(
            "/organizations",
            json={"org_id": "org_new", "name": "New", "email": "b@new.test", "plan_code": "nope"},
            headers=creator,
        )
        assert unknown_plan.status_code == 422, unknown_plan.text
        assert "plan_not_found" in unknown_plan.text
        good = client.post(
            "/organizations", json={"org_id": "org_new", "name": "New", "email": "b@new.test"}, headers=creator
        )
        assert good.status_code == 200, good.text


def test_demo_serve_shows_its_curl_commands_when_stdout_is_a_file_or_a_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """``lago-org-billing demo --serve | tee demo.log`` (or ``> demo.log``, a container's log): stdout is then
    block-buffered, and the report and the curl commands must be out while it serves, not only after Ctrl-C (they
    were not: nothing at all showed until the process ended)."""
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8"))  # as for a pipe
    shown: list[bytes] = []

    def interrupt(seconds: float) -> None:
        shown.append(raw.getvalue())
        raise KeyboardInterrupt

    monkeypatch.setattr(_demo, "time", SimpleNamespace(monotonic=time.monotonic, sleep=interrupt))
    assert _demo.run_demo(serve=True) == 0
    assert b"Every request billed exactly once" in shown[0] and b"curl -s" in shown[0]


def test_demo_exits_non_zero_when_lagos_numbers_disagree(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Lago whose metric counts something else than the tokens served: the report says NO and the exit code is 1."""
    seed = _demo.seed

    def misconfigured(fake: Any) -> None:
        add = fake.add_billable_metric
        fake.add_billable_metric = lambda code, **options: add(code, **{**options, "field_name": "output_tokens"})
        seed(fake)

    monkeypatch.setattr(_demo, "seed", misconfigured)
    assert main(["demo"]) == 1
    out = capsys.readouterr().out
    assert "  NO" in out and "MISMATCH: see above." in out


def test_the_demo_leaves_out_proxy_variables_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proxy variables are read in any case (``Https_Proxy``: urllib's and so httpx's rule): one spelled so was left in
    place, and the demo's calls to 127.0.0.1 still went to the proxy. None applies while the demo runs, and each is
    put back after."""
    from urllib.request import getproxies

    from lago_org_billing._demo import _loopback_only

    for name in ("Http_Proxy", "Https_Proxy", "All_Proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    with _loopback_only():
        assert not any(getproxies().get(scheme) for scheme in ("http", "https", "all")), getproxies()
    assert os.environ["Https_Proxy"] == "http://127.0.0.1:9" and os.environ["All_Proxy"] == "http://127.0.0.1:9"
