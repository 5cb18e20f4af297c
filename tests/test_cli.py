"""The `lago-org-billing` command: `health` and `emulator`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from lago_org_billing.cli import main


def test_health_against_a_served_lago(
    fake_lago_server: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`health` reports a reachable Lago (text and --json) and exits 0."""
    monkeypatch.setenv("LAGO_API_URL", fake_lago_server.url)
    monkeypatch.setenv("LAGO_API_KEY", fake_lago_server.api_key)
    assert main(["health"]) == 0
    assert "is healthy" in capsys.readouterr().out
    assert main(["health", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["healthy"] is True and report["url"] == fake_lago_server.url


def test_health_unreachable_and_unconfigured(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No Lago there: exit 1 saying why; no API key: exit 2 naming LAGO_API_KEY."""
    monkeypatch.setenv("LAGO_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("LAGO_MAX_RETRIES", "0")
    assert main(["health"]) == 2
    assert "LAGO_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("LAGO_API_KEY", "k")
    assert main(["health"]) == 1
    assert "NOT healthy" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_emulator_command_serves_seeded_lago(tmp_path: Path) -> None:
    """`emulator --seed --event-store clickhouse --api-key` serves Lago's API with that state and behaviour."""
    seed = tmp_path / "seed.json"
    seed.write_text((Path(__file__).parent.parent / "examples" / "seed.json").read_text())
    for _attempt in range(3):  # (the emulator takes no --port 0: a free port, picked again if taken meanwhile)
        port = free_port()
        command = [sys.executable, "-m", "lago_org_billing.cli", "emulator", "--port", str(port)]
        command += ["--api-key", "cli-key", "--seed", str(seed), "--event-store", "clickhouse"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert process.stderr is not None
        said = []
        for line in process.stderr:  # uvicorn says when it listens
            said.append(line)
            if "Uvicorn running on" in line:
                break
        else:
            process.stderr.close()
            if process.wait() == 2 and "cannot listen on" in "".join(said):
                continue  # another process took the port before the emulator bound it
            pytest.fail(f"the emulator exited ({process.returncode}):\n{''.join(said)}")
        break
    else:
        pytest.fail("no free port could be bound in 3 attempts")
    with process:
        try:
            base = f"http://127.0.0.1:{port}"
            auth = {"Authorization": "Bearer cli-key"}
            with httpx.Client(base_url=base, headers=auth) as client:
                assert client.get("/api/v1/plans/starter").json()["plan"]["code"] == "starter"
                assert client.get("/api/v1/plans/starter", headers={"Authorization": "Bearer nope"}).status_code == 401
                event = {
                    "transaction_id": "tx_1",
                    "external_subscription_id": "org_acme",
                    "code": "api_call",
                    "timestamp": "1767225600.000",
                }
                for _ in range(2):  # clickhouse store: a duplicate replaces, no 422
                    assert client.post("/api/v1/events", json={"event": event}).status_code == 200
        finally:
            process.terminate()
            process.wait(10)


def test_emulator_command_on_a_port_in_use_says_so_in_one_line() -> None:
    """It printed where it would listen, then uvicorn's 59-line traceback, and exited 3."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "lago_org_billing.cli", "emulator", "--port", str(port)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "cannot listen on 127.0.0.1" in run.stderr and "--port" in run.stderr
    assert "Traceback" not in run.stderr and "Lago emulator on" not in run.stdout


def test_emulator_command_rejects_a_bad_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A seed file that is not valid JSON is a clear error and exit code 2, before serving anything."""
    seed = tmp_path / "seed.json"
    seed.write_text("{not json")
    assert main(["emulator", "--seed", str(seed), "--port", str(free_port())]) == 2
    assert "seed" in capsys.readouterr().err.lower()
