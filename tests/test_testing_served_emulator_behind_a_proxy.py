"""The plugin's ``fake_lago_server`` behind a proxy: a test's own clients reach it on 127.0.0.1 directly.

With ``HTTP_PROXY`` set (a corporate network, a CI runner), httpx (and requests) sent the requests of a test to the
served emulator to the proxy, which cannot reach this machine's loopback: every such test failed on a machine with a
proxy. The fixture now adds 127.0.0.1 to ``NO_PROXY`` while the emulator is served (and puts it back after).
"""

from __future__ import annotations

import os
import socket
from typing import Any

import httpx
import pytest


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_tests_own_client_reaches_the_served_emulator_past_the_proxy(
    fake_lago_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = f"http://127.0.0.1:{_closed_port()}"  # a proxy that answers nothing
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("HTTPS_PROXY", proxy)
    with httpx.Client() as client:  # (trust_env: it reads the proxy and NO_PROXY variables)
        answer = client.get(f"{fake_lago_server.url}/health")
    assert answer.status_code == 200
    assert "127.0.0.1" in os.environ["NO_PROXY"].split(",")
