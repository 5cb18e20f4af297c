"""The public API type-checks the way the README uses it (mypy --strict on a user's app): what users' CI runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

USER_APP = """
from fastapi import Depends, FastAPI, Request
from starlette.applications import Starlette
from starlette.routing import Route

from lago_org_billing import (
    BillingSettings,
    LagoWebhooks,
    OrgBilling,
    OrgBillingMiddleware,
    attribute_usage,
    billing_routes,
    get_current_org,
    require_quota,
)

app = FastAPI()
app.add_middleware(OrgBillingMiddleware)
app.add_middleware(OrgBillingMiddleware, settings=BillingSettings(api_key="k"), idempotency_header="Idempotency-Key")
app.add_route("/webhooks/lago", LagoWebhooks(), methods=["POST"])
app.mount("/billing", billing_routes(authorize=lambda request, org_id: True))
starlette_app = Starlette(routes=[Route("/webhooks/lago", LagoWebhooks(), methods=["POST"])])
starlette_app.add_middleware(OrgBillingMiddleware, resolve_org=lambda scope: "org")
wrapped = OrgBillingMiddleware(starlette_app)
billing = OrgBilling(pipeline=wrapped.pipeline, quota=wrapped.quota)


@app.get("/v1/chat", dependencies=[Depends(require_quota)])
async def chat(request: Request) -> dict[str, str | None]:
    attribute_usage(request, model="gpt-4o-mini", input_tokens=812, output_tokens=95)
    return {"org": get_current_org(request)}


async def record() -> None:
    async with OrgBilling() as service:
        await service.record_api_call("org_1", "tx_1", "/v1/chat", "u_1", tokens=1500, model="gpt-4o-mini")
"""


@pytest.mark.slow
def test_the_readme_s_usage_type_checks_strictly(tmp_path: Path) -> None:
    """``app.add_route("/webhooks/lago", LagoWebhooks(), ...)`` (the README's line) failed ``mypy --strict``: Starlette
    types ``add_route`` for ``request -> response`` endpoints; ``LagoWebhooks`` is both that and an ASGI app now."""
    if shutil.which("mypy") is None and not (Path(sys.executable).parent / "mypy").exists():
        pytest.skip("mypy is not installed")
    source = tmp_path / "user_app.py"
    source.write_text(textwrap.dedent(USER_APP))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
