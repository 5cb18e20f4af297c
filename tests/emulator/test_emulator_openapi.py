"""The richest FakeLago answers (filters, groups, entitlements, downgrades) validate against Lago's OpenAPI spec."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.exceptions import OpenAPIError
from werkzeug.datastructures import Headers, ImmutableMultiDict

from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

SPEC = Path(__file__).parent.parent / "data" / "lago-openapi.yaml"


@dataclass
class _Request:
    host_url: str
    path: str
    method: str
    parameters: RequestParameters
    content_type: str
    body: bytes | None


@dataclass
class _Response:
    status_code: int
    content_type: str
    headers: Headers
    data: bytes | None


def _repair(node: Any) -> None:
    """Fix two contradictions of the spec that refuse valid Lago answers.

    Nullable enums whose ``enum`` leaves out null, and ``oneOf`` listing both ``integer`` and ``number``
    (every integer matches twice, so ``oneOf`` refuses it): use ``anyOf`` there.
    """
    if isinstance(node, dict):
        if isinstance(node.get("type"), list) and "null" in node["type"] and isinstance(node.get("enum"), list):
            if None not in node["enum"]:
                node["enum"].append(None)
        kinds = {b.get("type") for b in node.get("oneOf") or [] if isinstance(b, dict)}
        if {"integer", "number"} <= kinds:
            node["anyOf"] = node.pop("oneOf")
        for value in node.values():
            _repair(value)
    elif isinstance(node, list):
        for value in node:
            _repair(value)


@pytest.fixture(scope="session")
def spec() -> Any:
    """Lago's OpenAPI 3.1 spec, parsed once per session."""
    with SPEC.open("rb") as file:
        data = yaml.load(file, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    _repair(data)
    return OpenAPI.from_dict(data)


def check(spec: Any, response: httpx.Response) -> None:
    """Validate one emulator response as if it came from https://api.getlago.com."""
    request = response.request
    spec_request = _Request(
        host_url="https://api.getlago.com",
        path=request.url.path,
        method=request.method.lower(),
        parameters=RequestParameters(
            query=ImmutableMultiDict(list(request.url.params.multi_items())),
            header=Headers(list(request.headers.items())),
            cookie=ImmutableMultiDict(),
        ),
        content_type=request.headers.get("content-type", "application/json"),
        body=request.content or None,
    )
    spec_response = _Response(
        status_code=response.status_code,
        content_type=response.headers.get("content-type", ""),
        headers=Headers(list(response.headers.items())),
        data=response.content,
    )
    try:
        spec.validate_response(spec_request, spec_response)
    except OpenAPIError as exc:
        details = [str(exc)]
        cause: BaseException | None = exc
        while cause is not None:
            details += [f"{e.json_path}: {e.message}" for e in getattr(cause, "schema_errors", ()) or ()]
            cause = cause.__cause__
        pytest.fail(f"{request.method} {request.url.path} -> {response.status_code}\n" + "\n".join(details))


async def test_rich_responses_match_the_spec(spec: Any) -> None:
    """Usage with filters and groups, subscriptions mid-downgrade, entitlements, events and errors validate."""
    fake = FakeLago(api_key="k", clock=lambda: datetime(2026, 3, 15, 12, tzinfo=timezone.utc))
    fake.add_billable_metric(
        "tokens",
        aggregation_type="sum_agg",
        field_name="tokens",
        filters=[{"key": "model", "values": ["gpt", "llama"]}],
    )
    fake.add_billable_metric("users", aggregation_type="unique_count_agg", field_name="user")
    fake.add_feature("seats", privileges=[{"code": "max", "value_type": "integer"}])
    fake.add_plan(
        "pro",
        amount_cents=5000,
        charges=[
            {
                "billable_metric_code": "tokens",
                "properties": {"amount": "0.01", "pricing_group_keys": ["user"]},
                "filters": [
                    {"values": {"model": ["gpt"]}, "properties": {"amount": "0.1"}, "invoice_display_name": "GPT"}
                ],
            },
            {
                "billable_metric_code": "users",
                "charge_model": "package",
                "properties": {"amount": "1", "package_size": 5},
            },
        ],
    )
    fake.add_plan("free")
    fake.add_customer("org", name="Org", currency="USD", metadata=[{"key": "tier", "value": "gold"}])
    fake.add_subscription("org", "pro", external_id="sub", name="Main")
    responses: list[httpx.Response] = []
    async with fake.client() as client:
        batch = [
            {
                "transaction_id": "1",
                "external_subscription_id": "sub",
                "code": "tokens",
                "properties": {"tokens": 5, "model": "gpt", "user": "u1"},
            },
            {
                "transaction_id": "2",
                "external_subscription_id": "sub",
                "code": "tokens",
                "properties": {"tokens": 7, "user": "u2"},
            },
            {
                "transaction_id": "3",
                "external_subscription_id": "sub",
                "code": "users",
                "timestamp": "1773576000.25",
                "properties": {"user": "a"},
            },
        ]
        responses.append(await client.post("/api/v1/events/batch", json={"events": batch}))
        responses.append(await client.post("/api/v1/events/batch", json={"events": [batch[0], {"code": "x"}]}))
        responses.append(await client.get("/api/v1/events", params={"external_subscription_id": "sub"}))
        params = {"external_subscription_id": "sub"}
        responses.append(await client.get("/api/v1/customers/org/current_usage", params=params))
        responses.append(
            await client.get("/api/v1/customers/org/current_usage", params={**params, "group[user]": "u1"})
        )
        responses.append(
            await client.get("/api/v1/customers/org/current_usage", params={"external_subscription_id": "x"})
        )
        responses.append(await client.get("/api/v1/customers/org"))
        downgrade = {"subscription": {"external_customer_id": "org", "plan_code": "free", "external_id": "sub"}}
        responses.append(await client.post("/api/v1/subscriptions", json=downgrade))
        responses.append(await client.get("/api/v1/subscriptions/sub", params={"status": "pending"}))
        responses.append(
            await client.get("/api/v1/customers/org/subscriptions", params={"status[]": ["active", "pending"]})
        )
        responses.append(
            await client.post("/api/v1/plans/pro/entitlements", json={"entitlements": {"seats": {"max": 2}}})
        )
        responses.append(
            await client.patch("/api/v1/subscriptions/sub/entitlements", json={"entitlements": {"seats": {"max": 3}}})
        )
        responses.append(await client.delete("/api/v1/subscriptions/sub", params={"status": "pending"}))
        responses.append(await client.delete("/api/v1/subscriptions/sub"))
        responses.append(await client.get("/api/v1/customers/org/invoices"))
        responses.append(await client.get("/api/v1/billable_metrics"))
    assert [r.status_code for r in responses] == [
        200,
        422,
        200,
        200,
        200,
        405,
        200,
        200,
        200,
        200,
        200,
        200,
        200,
        200,
        200,
        200,
    ]
    usage = responses[3].json()["customer_usage"]["charges_usage"]
    assert usage[0]["filters"] and usage[0]["grouped_usage"]
    for response in responses:
        if response.status_code != 405:  # the spec does not document current_usage's 405
            check(spec, response)
