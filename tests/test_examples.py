"""The README's examples run against the emulator served on loopback."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from starlette.testclient import TestClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def lago_env(fake_lago_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The served emulator, seeded like examples/seed.json, and LAGO_* pointing at it."""
    fake_lago_server.seed(__import__("json").loads((EXAMPLES / "seed.json").read_text()))
    monkeypatch.setenv("LAGO_API_URL", fake_lago_server.url)
    monkeypatch.setenv("LAGO_API_KEY", fake_lago_server.api_key)
    return fake_lago_server


def test_starlette_one_liner(lago_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/starlette_app.py bills a request to the org named in the header."""
    monkeypatch.setenv("LAGO_ORG_HEADER", "X-Org-Id")
    monkeypatch.setenv("LAGO_USER_HEADER", "X-User-Id")
    module = load("starlette_app")
    with TestClient(module.app) as client:
        assert client.post("/v1/chat", headers={"X-Org-Id": "org_acme", "X-User-Id": "ada"}).status_code == 200
    [event] = lago_env.events
    assert event["properties"]["user_id"] == "ada" and event["properties"]["total_tokens"] == 42


def test_fastapi_seed_app(lago_env: Any) -> None:
    """examples/fastapi_app.py creates and subscribes an org, bills its calls, serves its dashboard."""
    module = load("fastapi_app")
    member = {"Authorization": "Bearer org_new:ada"}
    with TestClient(module.app) as client:
        created = client.post(
            "/organizations",
            json={"org_id": "org_new", "name": "New", "email": "b@new.test", "plan_code": "pro"},
            headers={"Authorization": "Bearer :ada"},
        )
        assert created.status_code == 200, created.text
        assert client.post("/v1/chat", headers=member).status_code == 200
        assert client.post("/v1/chat").status_code == 401
        dashboard = client.get("/api/v1/billing/org/organizations/org_new/dashboard", headers=member)
        assert dashboard.status_code == 200, dashboard.text
        outsider = {"Authorization": "Bearer org_other:eve"}
        assert client.get("/api/v1/billing/org/organizations/org_new/dashboard", headers=outsider).status_code == 403
        assert client.post("/webhooks/lago", content=b"{}").status_code == 401  # unsigned: refused
    chat_events = [e for e in lago_env.events if e["properties"]["endpoint"] == "/v1/chat"]
    assert len(chat_events) == 1
    assert chat_events[0]["properties"]["model"] == "gpt-4o-mini"
    assert chat_events[0]["properties"]["total_tokens"] == 42
    assert lago_env.subscriptions[-1]["external_id"] == "org_new"
