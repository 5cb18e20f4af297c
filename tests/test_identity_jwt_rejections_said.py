"""Bearer tokens ``from_jwt_claim`` refuses for what looks like its configuration (an ``aud`` claim and no
``audience=``, another issuer, algorithm or key) were logged at DEBUG only: with ``LAGO_ON_UNRESOLVED=allow`` every
request was served unbilled and nothing said why at the default log level. The first refusal of each kind is a
WARNING saying what to check; the next ones stay at DEBUG. Expired tokens (a user's normal traffic) stay quiet."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from lago_org_billing._identity import from_jwt_claim, reset_warnings

SECRET = "review-secret-that-is-long-enough-for-hs256"


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


def scope(claims: dict[str, Any], secret: str = SECRET) -> dict[str, Any]:
    token = jwt.encode(claims, secret, algorithm="HS256")
    return {"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode("latin-1"))]}


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("claims", "secret", "hint"),
    [
        ({"org_id": "org_a", "aud": "api://billing"}, SECRET, "audience"),
        ({"org_id": "org_a", "iss": "https://other.example"}, SECRET, "issuer"),
        ({"org_id": "org_a"}, "another-secret-that-is-long-enough-for-hs256", "key"),
    ],
    ids=["audience", "issuer", "signature"],
)
def test_the_first_refusal_of_each_kind_says_what_to_check(
    caplog: pytest.LogCaptureFixture, claims: dict[str, Any], secret: str, hint: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    resolve = from_jwt_claim(key=SECRET, algorithms=["HS256"], issuer="https://issuer.example")
    claims = {"iss": "https://issuer.example", **claims}
    assert resolve(scope(claims, secret)) is None
    assert resolve(scope({**claims, "n": 2}, secret)) is None
    said = warnings_of(caplog)
    assert len(said) == 1 and hint in said[0] and "from_jwt_claim" in said[0], said


def test_expired_tokens_stay_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    resolve = from_jwt_claim(key=SECRET, algorithms=["HS256"])
    assert resolve(scope({"org_id": "org_a", "exp": int(time.time()) - 60})) is None
    assert warnings_of(caplog) == []
