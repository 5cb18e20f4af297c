"""Header names that no request or response can carry, refused where they are written.

``LAGO_ORG_HEADER=None`` (or ``null``: ``str(None)`` of a setting read in code, JSON's null in a templated manifest)
was taken as the name of a header no client sends, so every request went unresolved; so was
``BillingSettings(org_header="None")`` and the same for ``LAGO_USER_HEADER``. ``from_header("true")``,
``from_header("HTTP_X_ORG_ID")`` and ``from_jwt_claim(header="true")`` were taken though ``LAGO_ORG_HEADER`` refuses
those very names. ``AttributionConfig(model_headers=("x model",))`` (or ``"x:model"``, a control character, an empty
name) named a header no response can have, its usage never read; a name outside Latin-1 failed with a bare
``UnicodeEncodeError``. Each is a ``ConfigurationError`` naming the variable or argument now, in the style the
middleware's ``idempotency_header`` check already uses; real header names are still taken and still work.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from _lifespan import serving_lifespan
from lago_org_billing import (
    AttributionConfig,
    BillingSettings,
    ConfigurationError,
    OrgBillingMiddleware,
    from_header,
    from_jwt_claim,
)
from lago_org_billing.testing import FakeLago

pytestmark = pytest.mark.anyio

KEY = "test-key"
SECRET = "a-test-hmac-secret-of-at-least-32-bytes!"
NULLS = ["None", "none", "null", "NULL", "Null"]
SWITCHES = ["true", "True", "1", "0", "off", "yes", "y", "enabled"]
WSGI = ["HTTP_X_ORG_ID", "http_x_org_id"]


def _lago() -> FakeLago:
    lago = FakeLago(api_key=KEY)
    lago.add_plan("starter", amount_cents=0)
    lago.add_subscription("org_a", "starter", external_id="org_a")
    return lago


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok", headers={"X-LLM": "m1", "X-Cost-Units": "7"})


def _app() -> Starlette:
    return Starlette(routes=[Route("/ok", _ok)])


async def _billed(middleware: OrgBillingMiddleware, lago: FakeLago, headers: dict[str, str]) -> list[dict[str, Any]]:
    """The events Lago got for one request to ``/ok`` sent with ``headers``."""
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as http,
        serving_lifespan(middleware),
    ):
        assert (await http.get("/ok", headers=headers)).status_code == 200
        await middleware.pipeline.flush(10)
    return list(lago.events)


# ------------------------------------------------------------------------------ LAGO_ORG_HEADER / LAGO_USER_HEADER


@pytest.mark.parametrize("variable", ["LAGO_ORG_HEADER", "LAGO_USER_HEADER"])
@pytest.mark.parametrize("header", NULLS)
def test_a_header_variable_set_to_none_or_null_is_refused_naming_it(variable: str, header: str) -> None:
    """LAGO_ORG_HEADER=None (str(None), JSON's null) named a header no client sends: every request unresolved."""
    with pytest.raises(ConfigurationError) as caught:
        BillingSettings.from_env(None, environ={variable: header}, require_api_key=False)
    message = str(caught.value)
    assert caught.value.variable == variable and variable in message and repr(header) in message, message
    assert "X-Org-Id" in message and "Unset it" in message, message


@pytest.mark.parametrize("field, variable", [("org_header", "LAGO_ORG_HEADER"), ("user_header", "LAGO_USER_HEADER")])
@pytest.mark.parametrize("header", ["None", "null"])
def test_settings_given_a_none_or_null_header_in_code_are_refused(field: str, variable: str, header: str) -> None:
    """BillingSettings(org_header="None") (a setting made text in code) is refused as the variable is."""
    with pytest.raises(ConfigurationError) as caught:
        BillingSettings(api_key=KEY, **{field: header})
    assert caught.value.variable == variable and repr(header) in str(caught.value)


@pytest.mark.parametrize("header", ["X-None", "Nullable-Org", "None-Org", "X-Org-Id"])
async def test_header_names_that_merely_start_like_none_still_resolve_and_bill(header: str) -> None:
    """A real header whose name starts with "None"/"Null" is still taken, and the org it names is billed."""
    lago = _lago()
    settings = BillingSettings.from_env(
        None, environ={"LAGO_API_KEY": KEY, "LAGO_API_URL": "http://lago.test", "LAGO_ORG_HEADER": header}
    )
    middleware = OrgBillingMiddleware(_app(), settings, transport=lago.transport(), quota=None)
    events = await _billed(middleware, lago, {header: "org_a"})
    assert [event["external_subscription_id"] for event in events] == ["org_a"], events


def test_an_unset_or_empty_header_variable_still_leaves_header_resolution_off() -> None:
    """Empty LAGO_ORG_HEADER, and org_header=None in code, still mean off (not refused)."""
    assert BillingSettings.from_env(None, environ={"LAGO_ORG_HEADER": " "}, require_api_key=False).org_header is None
    assert BillingSettings(api_key=KEY, org_header=None, user_header=None).user_header is None


# -------------------------------------------------------------------------- from_header / from_jwt_claim(header=)


@pytest.mark.parametrize("name", SWITCHES + NULLS + WSGI)
def test_from_header_given_a_switch_a_null_or_a_wsgi_name_is_refused(name: str) -> None:
    """from_header("true") / ("None") / ("HTTP_X_ORG_ID") named a header no client sends: every request unresolved."""
    with pytest.raises(ConfigurationError) as caught:
        from_header(name)
    message = str(caught.value)
    assert "from_header(" in message and repr(name) in message and "X-Org-Id" in message, message


@pytest.mark.parametrize("verified_with", ["key", "jwks_url"])
@pytest.mark.parametrize("name", ["true", "1", "None", "null", "HTTP_AUTHORIZATION"])
def test_from_jwt_claim_given_a_switch_a_null_or_a_wsgi_header_is_refused(verified_with: str, name: str) -> None:
    """from_jwt_claim(header="true") read no token from any request: each one unresolved."""
    given: dict[str, Any] = (
        {"key": SECRET, "algorithms": ["HS256"]}
        if verified_with == "key"
        else {"jwks_url": "https://issuer.test/.well-known/jwks.json", "algorithms": ["RS256"]}
    )
    with pytest.raises(ConfigurationError) as caught:
        from_jwt_claim(header=name, **given)
    message = str(caught.value)
    assert "from_jwt_claim(header=...)" in message and repr(name) in message, message


@pytest.mark.parametrize("name", ["X-Org-Id", " X-Org-Id ", "On-Behalf-Of", "X-True", "Nonce-Org", "Y-Org"])
async def test_from_header_still_takes_real_names_and_bills_the_org(name: str) -> None:
    """Names that start like a switch or a null (or padded with blanks) still resolve the org, which is billed."""
    lago = _lago()
    settings = BillingSettings(api_key=KEY, api_url="http://lago.test")
    middleware = OrgBillingMiddleware(
        _app(), settings, resolve_org=from_header(name), transport=lago.transport(), quota=None
    )
    events = await _billed(middleware, lago, {name.strip(): "org_a"})
    assert [event["external_subscription_id"] for event in events] == ["org_a"], events


async def test_from_jwt_claim_still_reads_a_custom_header() -> None:
    """from_jwt_claim(header="X-Auth-Token") still reads the bearer token there and bills its org."""
    import jwt

    lago = _lago()
    settings = BillingSettings(api_key=KEY, api_url="http://lago.test")
    resolver = from_jwt_claim(key=SECRET, algorithms=["HS256"], header="X-Auth-Token")
    middleware = OrgBillingMiddleware(_app(), settings, resolve_org=resolver, transport=lago.transport(), quota=None)
    token = jwt.encode({"org_id": "org_a"}, SECRET, algorithm="HS256")
    events = await _billed(middleware, lago, {"X-Auth-Token": f"Bearer {token}"})
    assert [event["external_subscription_id"] for event in events] == ["org_a"], events


# ----------------------------------------------------------------------------------------- AttributionConfig names

OPTIONS = ["model_headers", "total_tokens_headers", "input_tokens_headers", "output_tokens_headers"]


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize(
    "name", ["x model", "x:model", "X-Model:", "", "   ", "x\x00model", "x-mo\r\ndel", "x-modèle", "x-模型", "x/model"]
)
def test_attribution_header_names_no_response_can_have_are_refused_naming_the_option(option: str, name: str) -> None:
    """AttributionConfig(model_headers=("x model",)) named a header no response has: its usage silently never read."""
    with pytest.raises(ConfigurationError) as caught:
        AttributionConfig(**{option: ("x-ok", name)})
    message = str(caught.value)
    assert f"AttributionConfig.{option}" in message and repr(name) in message, message


async def test_attribution_still_reads_custom_names_padded_or_not() -> None:
    """Token-character names (blanks around them dropped, as before) still attribute the response's usage."""
    lago = _lago()
    settings = BillingSettings(api_key=KEY, api_url="http://lago.test", org_header="X-Org-Id")
    config = AttributionConfig(model_headers=(" X-LLM ",), total_tokens_headers=["X-Cost-Units"])
    middleware = OrgBillingMiddleware(_app(), settings, attribution=config, transport=lago.transport(), quota=None)
    events = await _billed(middleware, lago, {"X-Org-Id": "org_a"})
    assert [(e["properties"]["model"], e["properties"]["total_tokens"]) for e in events] == [("m1", 7)], events
