"""Items of a list filter reach Lago as Lago reads them: booleans as ``true``/``false``, and ``None`` refused.

A list filter (``account_type=[...]``, ``payment_status=[...]``) goes out as ``key[]=item`` per item. Booleans among
the items were sent as Python's ``True``/``False`` (Rails casts only ``true``/``false``, ``1``/``0``...), and a
``None`` item as the text ``None``, a value Lago matches to nothing: the page came back short, silently. Scalars and
metadata filters already went through the same conversion as items now do.
"""

from __future__ import annotations

import httpx
import pytest
from pytest_httpx import HTTPXMock

from lago_org_billing import BillingSettings, LagoClient
from lago_org_billing._errors import InvalidRequestError

pytestmark = pytest.mark.anyio

EMPTY_PAGE = {"customers": [], "meta": {"current_page": 1, "next_page": None, "total_pages": 1, "total_count": 0}}


def _client() -> LagoClient:
    return LagoClient(BillingSettings(api_url="http://127.0.0.1:9", api_key="k"))


async def test_boolean_items_of_a_list_filter_are_sent_as_true_and_false(httpx_mock: HTTPXMock) -> None:
    """``flags=[True, False, "x", 3]`` goes out as ``flags[]=true&flags[]=false&flags[]=x&flags[]=3``."""
    httpx_mock.add_response(json=EMPTY_PAGE)
    async with _client() as client:
        await client.list_customers(flags=[True, False, "x", 3])
    request = httpx_mock.get_request()
    assert request is not None
    assert request.url.params.get_list("flags[]") == ["true", "false", "x", "3"]


async def test_a_none_item_of_a_list_filter_is_refused_before_any_request(httpx_mock: HTTPXMock) -> None:
    """``account_type=["customer", None]`` raises an ``InvalidRequestError`` naming the filter; nothing is sent."""
    async with _client() as client:
        with pytest.raises(InvalidRequestError, match="'account_type' filter holds None"):
            await client.list_customers(account_type=["customer", None])
    assert httpx_mock.get_requests() == []


async def test_list_filters_without_none_are_sent_unchanged(httpx_mock: HTTPXMock) -> None:
    """Plain string items are sent one ``key[]`` each, in order, as before."""
    httpx_mock.add_response(json=EMPTY_PAGE)
    async with _client() as client:
        await client.list_customers(account_type=["customer", "partner"])
    request = httpx_mock.get_request()
    assert isinstance(request, httpx.Request)
    assert request.url.params.get_list("account_type[]") == ["customer", "partner"]
