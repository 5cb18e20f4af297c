"""Validating requests and responses against Lago's official OpenAPI spec (tests/data/lago-openapi.yaml).

Requests are rewritten onto the spec's server (``https://api.getlago.com/api/v1/...``). The spec is parsed once per
test process (it takes a few seconds), after :func:`fix_spec` repairs two of its self-contradictions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.exceptions import OpenAPIError
from werkzeug.datastructures import Headers, ImmutableMultiDict

SPEC_PATH = Path(__file__).parent / "data" / "lago-openapi.yaml"
SPEC_HOST = "https://api.getlago.com"


@dataclass
class SpecRequest:
    """openapi-core's Request protocol, for a request rewritten onto the spec's server."""

    host_url: str
    path: str
    method: str
    parameters: RequestParameters
    content_type: str
    body: bytes | None


@dataclass
class SpecResponse:
    """openapi-core's Response protocol."""

    status_code: int
    content_type: str
    headers: Headers
    data: bytes | None


def fix_spec(node: Any) -> int:
    """Repair two self-contradictions of the spec in place; returns how many schemas were changed.

    Neither is about server behaviour, both make valid Lago answers fail validation:

    * nullable enums: ``type: [string, 'null']`` with an ``enum`` that leaves out null (JSON Schema
      then refuses null), e.g. ``SubscriptionObject.cancellation_reason``, whose own description says
      "Null unless the subscription was canceled by payment gating". Add null to such enums.
    * ``oneOf: [string, integer, number]`` (``EventObject.properties`` values): an integer matches both
      ``integer`` and ``number``, so ``oneOf`` refuses every integer. Use ``anyOf`` there.
    """
    changed = 0
    if isinstance(node, dict):
        types = node.get("type")
        enum = node.get("enum")
        if isinstance(types, list) and "null" in types and isinstance(enum, list) and None not in enum:
            node["enum"] = [*enum, None]
            changed += 1
        one_of = node.get("oneOf")
        if isinstance(one_of, list):
            kinds = {branch.get("type") for branch in one_of if isinstance(branch, dict)}
            if {"integer", "number"} <= kinds:
                node["anyOf"] = node.pop("oneOf")
                changed += 1
        for value in node.values():
            changed += fix_spec(value)
    elif isinstance(node, list):
        for value in node:
            changed += fix_spec(value)
    return changed


@functools.lru_cache(maxsize=1)
def load_spec() -> Any:
    """Lago's OpenAPI spec, repaired by :func:`fix_spec`, parsed once per process."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC_PATH.open("rb") as file:
        spec = yaml.load(file, Loader=loader)
    assert fix_spec(spec) > 0, "the spec no longer needs fix_spec: remove it"
    return OpenAPI.from_dict(spec)


def spec_request(request: httpx.Request) -> SpecRequest:
    """``request`` as openapi-core sees it, on the spec's server."""
    return SpecRequest(
        host_url=SPEC_HOST,
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


def spec_response(response: httpx.Response) -> SpecResponse:
    """``response`` as openapi-core sees it."""
    return SpecResponse(
        status_code=response.status_code,
        content_type=response.headers.get("content-type", "").lower(),
        headers=Headers(list(response.headers.items())),
        data=response.content,
    )


def describe(exc: BaseException) -> str:
    """The schema errors behind an openapi-core validation error, one per line, with their JSON paths."""
    lines = [str(exc).split(":", 1)[0]]
    cause: BaseException | None = exc
    while cause is not None:
        for error in getattr(cause, "schema_errors", ()) or ():
            lines.append(f"  {error.json_path}: {error.message}")
            for sub in error.context or ():
                lines.append(f"    {sub.json_path}: {sub.message}")
        cause = cause.__cause__
    return "\n".join(lines)


def assert_response_matches(response: httpx.Response) -> None:
    """Fail the test unless ``response`` (to its request) validates against the spec."""
    request = response.request
    try:
        load_spec().validate_response(spec_request(request), spec_response(response))
    except OpenAPIError as exc:
        pytest.fail(f"{request.method} {request.url.path} -> {response.status_code}: {describe(exc)}")


def assert_request_matches(request: httpx.Request) -> None:
    """Fail the test unless ``request`` (path, query, body) validates against the spec."""
    try:
        load_spec().validate_request(spec_request(request))
    except OpenAPIError as exc:
        pytest.fail(f"{request.method} {request.url.path}: {describe(exc)}")
