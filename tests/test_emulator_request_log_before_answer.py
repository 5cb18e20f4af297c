"""The emulator's request log (``FakeLago.requests``) holds a request once its answer has been read.

It was appended after the answer's last byte went out: in process the caller's ``await`` saw it, but served (in a
thread, or by ``lago-org-billing emulator``) a client could read the whole answer and take its next step first. An
assertion made at once missed the last request, and a ``requests.clear()`` made at once was followed by the previous
call's record (seen: a migration test, on Python 3.13 under xdist, found a write of the run before in the log of the
run it checked).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import serve_in_thread

pytestmark = pytest.mark.anyio

API_KEY = "log-key"


def _scope(method: str, path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"authorization", f"Bearer {API_KEY}".encode()), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 3000),
    }


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/api/v1/customers", {"customer": {"external_id": "org_1"}}, 200),
        ("GET", "/api/v1/customers/org_1", None, 200),
        ("GET", "/api/v1/customers/nobody", None, 404),
        ("POST", "/api/v1/events", {"event": {"transaction_id": "t1"}}, 422),
    ],
)
async def test_a_request_is_logged_before_its_answer_ends(method: str, path: str, body: Any, status: int) -> None:
    """What the server sends last (the answer's final body message) finds the request logged already, with its status
    and body: a client that has read the answer sees it in ``requests``."""
    fake = FakeLago(api_key=API_KEY)
    if path.endswith("/org_1"):
        fake.add_customer("org_1")
    raw = json.dumps(body).encode() if body is not None else b""
    sent = False
    seen_at_end: list[Any] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            seen_at_end.append([(r.method, r.path, r.status, r.body) for r in fake.requests])

    await fake(_scope(method, path), receive, send)
    assert seen_at_end == [[(method, path, status, body)]]
    assert len(fake.requests) == 1  # (logged once, not again as the request ends)


def test_a_served_emulator_logs_each_request_once_before_the_client_reads_its_answer() -> None:
    """Served by uvicorn in a thread, as tests and the CLI use it: after each answer is read, the log holds exactly the
    requests made so far; cleared, it holds only what follows."""
    fake = FakeLago(api_key=API_KEY)
    with serve_in_thread(fake) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        for index in range(50):
            answer = c.post("/api/v1/customers", json={"customer": {"external_id": f"org_{index}"}})
            assert answer.status_code == 200
            assert len(fake.requests) == index + 1, index
            assert fake.requests[-1].body == {"customer": {"external_id": f"org_{index}"}}
        fake.requests.clear()
        assert c.get("/api/v1/customers/org_3").status_code == 200
        assert [(r.method, r.path) for r in fake.requests] == [("GET", "/api/v1/customers/org_3")]
