"""JSON nested thousands deep (``json`` raises ``RecursionError`` for it, not ``ValueError``) is bad input like any
other unreadable JSON, wherever the package reads JSON it did not write: a clear error or the documented fallback,
never a crash with a traceback.

- Lago's answer (or a proxy's page) nested so deep: "not JSON", as an HTML page is.
- The emulator served over HTTP: a 400 for such a request body, as for any body that is not JSON (was a 500).
- A migration mapping file: ``MappingError`` "not valid JSON" (was a ``RecursionError`` out of the CLI).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pytest_httpx import HTTPXMock

from lago_org_billing import BillingSettings, LagoAPIError, LagoClient
from lago_org_billing._migration import MappingError, read_mapping_file
from lago_org_billing.testing import FakeLago

DEPTH = 100_000
DEEP = b"[" * DEPTH + b"]" * DEPTH


@pytest.mark.anyio
async def test_a_lago_answer_nested_too_deep_is_not_json(httpx_mock: HTTPXMock) -> None:
    """A 200 whose body nests 100,000 arrays: ``LagoAPIError`` saying the body is not JSON and what to check."""
    httpx_mock.add_response(content=DEEP, headers={"Content-Type": "application/json"})
    settings = BillingSettings(api_key="k", api_url="http://127.0.0.1:9", max_retries=0)
    async with LagoClient(settings) as lago:
        with pytest.raises(LagoAPIError, match="not JSON"):
            await lago.get_customer("org_1")


@pytest.mark.anyio
async def test_the_emulator_answers_400_to_a_body_nested_too_deep() -> None:
    """``POST /api/v1/events`` with a body nested 100,000 deep: 400 "not valid JSON", the emulator still serving."""
    fake = FakeLago(api_key="k")
    async with httpx.AsyncClient(transport=fake.transport(), base_url=FakeLago.base_url) as http:
        answer = await http.post(
            "/api/v1/events", content=DEEP, headers={"Authorization": "Bearer k", "Content-Type": "application/json"}
        )
        assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]
        assert (await http.get("/health")).status_code == 200


def test_a_mapping_file_nested_too_deep_is_a_mapping_error(tmp_path: Path) -> None:
    """A JSON mapping file nesting 100,000 arrays: ``MappingError`` "not valid JSON", not a ``RecursionError``."""
    path = tmp_path / "mapping.json"
    path.write_bytes(DEEP)
    with pytest.raises(MappingError, match="not valid JSON"):
        read_mapping_file(path)
