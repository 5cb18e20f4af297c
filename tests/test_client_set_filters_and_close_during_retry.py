"""List filters given as sets or other iterables, and a client closed while a call waits to be retried.

A list filter passed as a set (``coupon_code={"A", "B"}``), a dict's keys or a generator went out as its ``str()``,
one value (``coupon_code={'A', 'B'}``) that Lago matches to nothing: the page came back empty, silently. Its items go
out as a list's now (``coupon_code[]=A&coupon_code[]=B``); bytes (``b'x'`` on the wire) are refused.

A client closed by another task while one of its calls waited between two attempts (an app's shutdown during a Lago
outage) sent the next attempt through the closed pool: with an injected transport, httpx's bare ``RuntimeError``
("Cannot send a request, as the client has been closed") came out of the call. The call now raises
:class:`ClosedError` saying so, without another attempt.
"""

from __future__ import annotations

import httpx
import pytest
from pytest_httpx import HTTPXMock

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._errors import ClosedError, InvalidRequestError

pytestmark = pytest.mark.anyio


def _page(key: str, items: list[dict[str, str]] | None = None) -> dict[str, object]:
    meta = {"current_page": 1, "next_page": None, "total_pages": 1, "total_count": len(items or [])}
    return {key: items or [], "meta": meta}


def _client() -> LagoClient:
    return LagoClient(BillingSettings(api_url="http://127.0.0.1:9", api_key="k"))


async def test_a_set_filter_is_sent_item_by_item_as_a_list_is(httpx_mock: HTTPXMock) -> None:
    """``coupon_code={"A", "B"}`` goes out as ``coupon_code[]=A&coupon_code[]=B``, not ``coupon_code={'A', 'B'}``."""
    httpx_mock.add_response(json=_page("applied_coupons"))
    async with _client() as client:
        await client.list_applied_coupons(coupon_code={"A", "B"})
    request = httpx_mock.get_request()
    assert request is not None
    assert sorted(request.url.params.get_list("coupon_code[]")) == ["A", "B"]
    assert "coupon_code" not in request.url.params


async def test_dict_keys_and_generator_filters_are_sent_item_by_item(httpx_mock: HTTPXMock) -> None:
    """A dict's keys and a generator are lists of items too, on one page and in an ``iter_*`` listing."""
    httpx_mock.add_response(json=_page("customers"))
    httpx_mock.add_response(json=_page("invoices", [{"lago_id": "i1"}]))
    types = {"customer": 1, "partner": 2}
    async with _client() as client:
        await client.list_customers(account_type=types.keys())
        listed = [item async for item in client.iter_invoices(payment_status=(s for s in ("pending", "failed")))]
    assert listed == [{"lago_id": "i1"}]
    first, second = httpx_mock.get_requests()
    assert first.url.params.get_list("account_type[]") == ["customer", "partner"]
    assert second.url.params.get_list("payment_status[]") == ["pending", "failed"]


async def test_a_set_holding_none_is_refused_as_a_list_holding_none_is() -> None:
    """A ``None`` item in a set is refused, naming the filter, before anything is sent."""
    async with _client() as client:
        with pytest.raises(InvalidRequestError, match="'account_type' filter holds None"):
            await client.list_customers(account_type={"customer", None})


async def test_a_bytes_filter_is_refused_rather_than_sent_as_its_repr() -> None:
    """``currency=b"EUR"`` would go out as ``currency=b'EUR'``: refused, naming the filter, nothing sent."""
    async with _client() as client:
        with pytest.raises(InvalidRequestError, match=r"'currency' filter .* bytes: pass text"):
            await client.list_wallets(external_customer_id="org_1", currency=b"EUR")


async def test_a_client_closed_while_a_call_waits_for_its_retry_raises_closed_error() -> None:
    """The call whose first attempt failed (503) finds the client closed (by another task, here by the transport
    itself, as the 503 goes out): :class:`ClosedError`, not httpx's ``RuntimeError``, and no second attempt."""
    sent: list[httpx.Request] = []
    client: LagoClient

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        await client.aclose()
        return httpx.Response(503, json={"status": 503, "error": "Service Unavailable"})

    settings = BillingSettings(api_url="http://lago.test", api_key="k", retry_backoff=0.001, max_retries=5)
    client = LagoClient(settings, transport=httpx.MockTransport(handler))
    with pytest.raises(ClosedError, match=r"closed while GET /api/v1/customers/org_1 waited to be sent again"):
        await client.get_customer("org_1")
    assert len(sent) == 1


async def test_subscription_statuses_given_as_a_generator_or_a_set_are_all_sent(httpx_mock: HTTPXMock) -> None:
    """``statuses`` read once to be checked, then sent: a generator's items are sent, not an exhausted generator's
    none (Lago then lists the active ones only)."""
    httpx_mock.add_response(json=_page("subscriptions"))
    httpx_mock.add_response(json=_page("subscriptions"))
    async with _client() as client:
        await client.list_subscriptions(statuses=(s for s in ("pending", "terminated")))
        await client.list_subscriptions(statuses={"canceled"})
    first, second = httpx_mock.get_requests()
    assert first.url.params.get_list("status[]") == ["pending", "terminated"]
    assert second.url.params.get_list("status[]") == ["canceled"]
