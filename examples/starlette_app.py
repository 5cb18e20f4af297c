r"""The minimal setup: one line bills every request to the caller's organization.

Against the emulator (two terminals):

    lago-org-billing emulator --api-key dev-key --seed examples/seed.json
    LAGO_API_URL=http://127.0.0.1:3000 LAGO_API_KEY=dev-key LAGO_ORG_HEADER=X-Org-Id LAGO_USER_HEADER=X-User-Id \
        uvicorn examples.starlette_app:app --port 8000

    curl -X POST localhost:8000/v1/chat -H 'X-Org-Id: org_acme' -H 'X-User-Id: ada'

In production the org comes from your auth layer (``request.state.org_id``), not from a header.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lago_org_billing import OrgBillingMiddleware


async def chat(request: Request) -> JSONResponse:
    return JSONResponse(
        {
            "model": "gpt-4o-mini",
            "choices": [{"message": {"role": "assistant", "content": "Hello!"}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
        }
    )


app = Starlette(routes=[Route("/v1/chat", chat, methods=["POST"])])
app.add_middleware(OrgBillingMiddleware)
