"""``LAGO_REDIS_URL`` with a query redis-py cannot read (``?socket_timeout=5s``) is refused when the middleware with an
``idempotency_header`` is made, naming the variable and hiding the password: it was read at the first idempotent
request, whose answer failed with redis-py's own ``ValueError`` (each such request, for the life of the process)."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette

from lago_org_billing import BillingSettings, ConfigurationError, OrgBillingMiddleware


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret-pw@127.0.0.1:6379/0?socket_timeout=5s",
        "redis://127.0.0.1/0?db=x",
        "redis://h/0?max_connections=-",
    ],
)
def test_a_redis_url_redis_py_cannot_read_is_refused_when_the_middleware_is_made(url: str) -> None:
    """The middleware is refused at once with a ConfigurationError naming LAGO_REDIS_URL, the password masked."""
    settings = BillingSettings(api_key="k", redis_url=url, org_header="X-Org", quota_mode="off")
    with pytest.raises(ConfigurationError) as info:
        OrgBillingMiddleware(Starlette(), settings=settings, idempotency_header="Idempotency-Key")
    assert info.value.variable == "LAGO_REDIS_URL"
    assert "s3cret-pw" not in str(info.value) and "redis-py" in str(info.value)


def test_a_redis_url_redis_py_reads_is_taken() -> None:
    """A URL with options as redis-py reads them is taken (nothing connects until the first idempotent request)."""
    settings = BillingSettings(api_key="k", redis_url="redis://127.0.0.1:1/0?socket_timeout=5", quota_mode="off")
    OrgBillingMiddleware(Starlette(), settings=settings, idempotency_header="Idempotency-Key")
