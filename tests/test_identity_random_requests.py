"""Seeded, model-checked requests through the built-in identity resolvers (``_identity``, ``_jwks``), run as the
middleware runs them: ``OrgBillingMiddleware`` over a tiny Starlette app, through ``httpx.ASGITransport``.

Each seed draws a resolver configuration and 80 requests from a fixed ``random.Random(seed)``. For every
request a reference model written here from the documented rules (the docstrings of ``_identity`` and ``_jwks``, the
README's identity paragraph) says who the request is billed to, or the refusal. PyJWT, decoding with explicit strict
options and the key the model picks, is the ground truth of a token's signature and claims; it is itself checked
against what the generator meant: a token signed by a key the resolver does not trust, unsigned (``alg: none``), HMAC
signed with the public key (algorithm confusion), tampered with, expired or not yet valid past the leeway, for
another audience or issuer, is never valid. Checked for each request: the org and user the app sees
(``get_current_org``, ``get_current_user``, ``request.state.billing_*``) or the documented refusal (401/403, a
problem JSON body, the 401's ``Bearer`` challenge); that no invalid token resolves an org; that no answer holds a
token or the secret. Checked for each seed: no log line holds a token or the secret, nothing logged at ERROR (an
exception out of a built-in resolver) but where documented (a membership check that raises), one event per billed
request on the emulator, and (JWKS) exactly the fetches the model predicts.

Three families of seeds:

- ``key=``: one HS256 secret, or an RSA, EC P-256 or Ed25519 public key (PEM or JWK JSON), with the algorithms,
  audience (one or a list), issuer (one or a list), leeway and ``require`` drawn; the org claim top-level or at a
  dotted path; claims of every type; the Authorization header cased, spaced, repeated, with non-UTF-8 bytes.
- ``jwks_url=``: the issuer's JWKS served by a real HTTP server on 127.0.0.1 (the built-in httpx client), keys
  published, rotated, retired, the endpoint failing or serving no usable key, the cache's clock moved by hand.
- sources: ``request.state`` and ``request.user`` set by an auth layer in front of the middleware, then
  ``LAGO_ORG_HEADER`` / ``LAGO_USER_HEADER`` (the default resolvers), or a ``first_of`` chain ending in
  ``from_header(membership_check=...)`` whose check admits, refuses, raises, answers junk or hangs past its timeout.

Defect found (kept as a named regression at the end): a membership check that timed out held the request twice its
``membership_timeout`` under ``on_unresolved="allow"``: the middleware's second look for the org, once the endpoint
answered, awaited the hanging check again.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import http.server
import json
import logging
import random
import threading
import time
import types
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._identity import (
    first_of,
    from_header,
    from_jwt_claim,
    from_state,
    from_user,
    get_current_org,
    get_current_user,
    reset_warnings,
)

pytestmark = pytest.mark.anyio

KEY_SEEDS = range(6)
JWKS_SEEDS = range(4)
SOURCE_SEEDS = range(6)
STEPS = 80

#: The HMAC secret of the ``key=`` seeds (64 bytes: no weak-key warning); never in an answer or a log line.
SECRET = hashlib.sha256(b"identity random requests").hexdigest()
CHAIN_SECRET = hashlib.sha256(b"identity random requests, chains").hexdigest()
USER_NAMES = ("identity", "user_id", "id", "sub", "username")


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


# --------------------------------------------------------------------------------------------------- keys


@dataclasses.dataclass(frozen=True)
class Pool:
    """Private keys the seeds draw from (made once: RSA generation is the slow part)."""

    rsa: tuple[rsa.RSAPrivateKey, ...]
    ec: tuple[ec.EllipticCurvePrivateKey, ...]
    ed: tuple[ed25519.Ed25519PrivateKey, ...]

    def all(self) -> list[Any]:
        return [*self.rsa, *self.ec, *self.ed]


@pytest.fixture(scope="module")
def pool() -> Pool:
    return Pool(
        rsa=tuple(rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(4)),
        ec=tuple(ec.generate_private_key(ec.SECP256R1()) for _ in range(3)),
        ed=tuple(ed25519.Ed25519PrivateKey.generate() for _ in range(3)),
    )


def kind_of(private: Any) -> str:
    if isinstance(private, rsa.RSAPrivateKey):
        return "rsa"
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return "ec"
    return "ed"


#: The algorithms each kind of key signs and verifies with (of those the seeds use).
ALGS_OF = {"rsa": ("RS256", "PS256"), "ec": ("ES256",), "ed": ("EdDSA",), "hs": ("HS256", "HS512")}


def public_pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def public_jwk(private: Any) -> dict[str, Any]:
    algorithm: Any = {
        "rsa": jwt.algorithms.RSAAlgorithm,
        "ec": jwt.algorithms.ECAlgorithm,
        "ed": jwt.algorithms.OKPAlgorithm,
    }[kind_of(private)]
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(private.public_key()))
    return jwk


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"


def hmac_signed(secret: bytes, header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
    """An HS256 token signed with exactly these bytes (PyJWT refuses to sign with a PEM as the secret)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


# --------------------------------------------------------------------------------------------------- the model


def model_id(value: object) -> str | None:
    """An id as the module docstring of ``_identity`` says ids are cleaned: a ``str`` (surrounding blanks stripped)
    or an ``int``; empty, longer than 255 characters or holding control (non-printable) characters: none."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, int):
        text = str(value)
    else:
        return None
    return text if text and len(text) <= 255 and text.isprintable() else None


class NotAnId(Exception):
    """``request.state`` or ``request.user`` holds a value of a type that is never an id (a bool, a list...), or a str
    or int that can never be one (over 255 characters, control characters; a blank str is no value): the chain stops
    there, unresolved (no later source, such as a header, is tried)."""


def model_source_id(value: object) -> str | None:
    """:func:`model_id` of a value read from ``request.state`` or ``request.user``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise NotAnId
    found = model_id(value)
    if found is None and value is not None and not (isinstance(value, str) and not value.strip()):
        raise NotAnId
    return found


def model_claim(claims: Mapping[str, Any] | None, claim: str) -> str | None:
    """The claim of verified claims; a dotted name no claim has reads the nested one (from_jwt_claim's docstring)."""
    if claims is None:
        return None
    value: Any = claims.get(claim)
    if value is None and "." in claim:
        value = claims
        for name in claim.split("."):
            value = value.get(name) if isinstance(value, Mapping) else None
    return model_id(value)


def model_header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """A request header's one value, read as UTF-8 else Latin-1; absent or repeated with different values: none."""
    values = [value for key, value in headers if key.lower() == name]
    if not values or any(value != values[0] for value in values):
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        return values[0].decode("latin-1")


def model_header_id(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """An id header (``from_header``, ``LAGO_ORG_HEADER``): one value; values a proxy joined with commas name one id
    when they all are that id, else none (README)."""
    text = model_header(headers, name)
    if text is None:
        return None
    if "," in text:
        parts = {part.strip() for part in text.split(",")} - {""}
        if len(parts) != 1:
            return None
        text = parts.pop()
    return model_id(text)


def model_bearer(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (scheme in any case, one space or more, RFC 6750)."""
    text = model_header(headers, b"authorization")
    if text is None:
        return None
    scheme, _, token = text.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def model_user(user: object, names: Sequence[str]) -> str | None:
    """``from_user``: ``None`` unless authenticated (``is_authenticated`` attribute, method or item, true by default),
    then the first of ``names`` that is an id."""
    if user is None:
        return None
    get: Callable[[str], Any]
    if isinstance(user, Mapping):
        get = user.get
    else:

        def get(name: str) -> Any:
            return getattr(user, name, None)

    flag = get("is_authenticated")
    if flag is None:
        flag = True
    if callable(flag):
        flag = flag()
    if not flag:
        return None
    for name in names:
        found = model_source_id(get(name))
        if found is not None:
            return found
    return None


def model_state(state: object, key: str) -> str | None:
    if state is None:
        return None
    return model_source_id(state.get(key) if isinstance(state, Mapping) else getattr(state, key, None))


def strict_decode(
    token: str,
    key: Any,
    algorithms: Sequence[str],
    audience: str | list[str] | None,
    issuer: str | list[str] | None,
    leeway: float,
    require: Sequence[str],
) -> dict[str, Any] | None:
    """The ground truth: PyJWT with every check on, said explicitly (not left to its defaults)."""
    options: Any = {
        "verify_signature": True,
        "verify_exp": True,
        "verify_nbf": True,
        "verify_iat": True,
        "verify_aud": True,
        "verify_iss": True,
        "verify_sub": True,
        "verify_jti": True,
        "strict_aud": False,
        "require": list(require),
    }
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=list(algorithms), options=options, audience=audience, issuer=issuer, leeway=leeway
        )
    except jwt.PyJWTError:
        return None
    return claims


# --------------------------------------------------------------------------------------------------- tokens


@dataclasses.dataclass(frozen=True)
class Config:
    """What a ``from_jwt_claim`` resolver checks besides the signature."""

    claim: str
    audience: str | list[str] | None
    issuer: str | list[str] | None
    leeway: float
    require: tuple[str, ...]

    def options(self) -> dict[str, Any]:
        return {"audience": self.audience, "issuer": self.issuer, "leeway": self.leeway, "require": self.require}


def draw_config(rng: random.Random) -> Config:
    return Config(
        claim=rng.choice(["org_id", "org_id", "org.id", "tenant.org.id"]),
        audience=rng.choice([None, "billing-api", ["billing-api", "other-api"]]),
        issuer=rng.choice([None, "https://issuer.test/", ["https://issuer.test/", "https://eu.issuer.test/"]]),
        leeway=rng.choice([0, 30, 300]),
        require=rng.choice([(), ("exp",), ("exp", "sub")]),
    )


ORG_VALUES: tuple[Any, ...] = (
    "org_a",
    "org_b",
    " org_c ",
    "org_a\n",
    "société",
    "東京",
    42,
    -7,
    0,
    True,
    False,
    1.5,
    ["org_a"],
    {"id": "org_a"},
    "",
    "   ",
    "x" * 255,
    "y" * 256,
    "org\x00a",
    "org\u200ba",
    "org\x1b[31m",
    "\u2028org_d",
    None,
    10**300,
)


def place_org(rng: random.Random, claim: str, value: Any) -> dict[str, Any]:
    """The org claim where the token carries it: at the claim's name, nested along its dots, both, or not at all."""
    if rng.random() < 0.08:
        return {}
    if "." not in claim:
        return {claim: value}
    path = claim.split(".")
    nested: Any = value
    for name in reversed(path):
        nested = {name: nested}
    shape = rng.choice(["nested", "nested", "flat", "flat_null", "wrong_parent"])
    if shape == "nested":
        return dict(nested)
    if shape == "flat":
        return {claim: value}
    if shape == "flat_null":  # a null at the dotted name: the nested one is read
        return {claim: None, **nested}
    return {path[0]: rng.choice(["org_a", ["org_a"], 5])}


@dataclasses.dataclass
class Claims:
    """A token's payload, and whether the generator meant it to pass the claim checks (``None``: left to PyJWT,
    whose answer for odd shapes changed across the versions the package allows)."""

    payload: dict[str, Any]
    meant: bool | None


CLAIM_FAULTS = (
    "expired",
    "not_yet_valid",
    "issued_in_the_future",
    "odd_exp",
    "other_audience",
    "no_audience",
    "audience_not_str",
    "other_issuer",
    "no_issuer",
    "issuer_not_str",
    "sub_not_str",
    "required_missing",
)


def draw_claims(rng: random.Random, config: Config, now: int) -> Claims:
    """A payload valid but for at most one fault (most tokens are valid: what they resolve is the point), the org
    claim of any value and place; the time claims around the leeway, past it only for a fault."""
    fault = rng.choice([None] * 10 + list(CLAIM_FAULTS))
    meant: bool | None = True
    org = rng.choice(["org_a", "org_b"]) if rng.random() < 0.5 else rng.choice(ORG_VALUES)
    payload = place_org(rng, config.claim, org)
    leeway = config.leeway
    exp = rng.choice(["future", "within", *(["none"] if "exp" not in config.require else [])])
    if exp != "none":  # (within: expired, but not by more than the leeway; with none, not expired yet)
        payload["exp"] = now + 3600 if exp == "future" else now - leeway + 60
    nbf = rng.choice(["none", "past", "within"])
    if nbf != "none":
        payload["nbf"] = now - 60 if nbf == "past" else now + leeway - 60
    if rng.random() < 0.6:
        payload["iat"] = now - 5
    accepted = [config.audience] if isinstance(config.audience, str) else config.audience
    if accepted is None:
        shape = rng.choice(["absent", "absent", "absent", "empty"])
        if shape == "empty":  # (an empty aud is no audience)
            payload["aud"] = rng.choice(["", []])
    else:
        payload["aud"] = rng.choice([rng.choice(accepted), ["someone-else", rng.choice(accepted)]])
    issuers = [config.issuer] if isinstance(config.issuer, str) else config.issuer
    if issuers is not None:
        payload["iss"] = rng.choice(issuers)
    elif rng.random() < 0.3:
        payload["iss"] = "https://whoever.test/"
    sub = rng.choice(["user", "user", "padded", "empty", *(["absent"] if "sub" not in config.require else [])])
    if sub != "absent":
        payload["sub"] = {"user": f"user_{rng.randrange(5)}", "padded": " user_9 ", "empty": ""}[sub]

    if fault == "expired":  # past the leeway
        payload["exp"] = now - leeway - 60
        meant = False
    elif fault == "not_yet_valid":  # past the leeway
        payload["nbf"] = now + leeway + 60
        meant = False
    elif fault == "issued_in_the_future":  # (refused by PyJWT 2.10 and later only)
        payload["iat"] = now + leeway + 3600
        meant = None
    elif fault == "odd_exp":
        payload["exp"] = rng.choice(["tomorrow", [now + 60], str(now + 3600), 1e400])
        meant = None
    elif fault == "other_audience":  # (with no audience configured, any audience is another's)
        payload["aud"] = rng.choice(["someone-else", ["someone-else", "billing-api-x"]])
        meant = False
    elif fault == "no_audience" and accepted is not None:
        payload.pop("aud")
        meant = False
    elif fault == "audience_not_str" and accepted is not None:
        payload["aud"] = rng.choice([5, [accepted[0], 5], {"aud": accepted[0]}])
        meant = False
    elif fault == "other_issuer" and issuers is not None:
        payload["iss"] = "https://evil.test/"
        meant = False
    elif fault == "no_issuer" and issuers is not None:
        payload.pop("iss")
        meant = False
    elif fault == "issuer_not_str" and issuers is not None:
        payload["iss"] = [issuers[0]]
        meant = False
    elif fault == "sub_not_str":  # (refused by PyJWT 2.10 and later only)
        payload["sub"] = 17
        meant = None
    elif fault == "required_missing" and config.require:
        payload.pop(rng.choice(config.require), None)
        meant = False
    return Claims(payload, meant)


@dataclasses.dataclass
class Sent:
    """A token and how it was signed: ``trusted`` when with a key the resolver may verify with (the model decides
    whether it does), else forged (unsigned, a key the resolver never had, confusion, tampered): never valid."""

    token: str
    claims: Claims
    trusted: bool
    how: str


def sign(key: Any, alg: str, claims: Mapping[str, Any], kid: Any = None, **extra: Any) -> str:
    """A token of exactly this header and these claims, signed with PyJWT's algorithm (its JWT and JWS layers refuse
    to sign some of what the seeds send: an ``iss`` that is a list, a ``kid`` that is not a string)."""
    header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid is not None else {}), **extra}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(dict(claims)).encode())}"
    algorithm = jwt.get_algorithm_by_name(alg)
    signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key))
    return f"{signing_input}.{b64(signature)}"


#: Header members besides alg, kid and typ: ignored, or refused by PyJWT (an unknown critical extension).
EXTRA_HEADERS: tuple[dict[str, Any], ...] = (
    {},
    {},
    {},
    {"typ": "at+jwt"},
    {"jku": "https://evil.test/jwks.json", "x5u": "https://evil.test/cert.pem"},
    {"crit": ["exp"], "exp": 1},
    {"cty": "JWT"},
)


def with_header(claims: Claims, extra: Mapping[str, Any]) -> Claims:
    """What was meant of a token with these header members: an unknown critical extension is for PyJWT to refuse
    (RFC 7515 4.1.11; the versions the package allows differ)."""
    return Claims(claims.payload, None if "crit" in extra and claims.meant is not False else claims.meant)


def tampered(token: str, claims: Mapping[str, Any]) -> str:
    """The token with another payload under the same header and signature."""
    header, _, rest = token.partition(".")
    signature = rest.rpartition(".")[2]
    return f"{header}.{b64(json.dumps({**claims, 'org_id': 'org_evil'}).encode())}.{signature}"


def garbage(rng: random.Random) -> str:
    return rng.choice(
        [
            "abc",
            "a.b.c",
            "a.b",
            "....",
            b64(b'{"alg":"HS256"}') + "." + b64(b"[]") + ".",
            b64(b'{"alg":"HS256","kid":"k"}') + ".e30." + "A" * 43,
            b64(b"[1,2]") + ".e30.sig",
            "é.ü.ñ",
            "x" * 3000,
        ]
    )


# --------------------------------------------------------------------------------------------------- requests


def authorization(rng: random.Random, token: str) -> tuple[list[tuple[bytes, bytes]], str]:
    """The raw Authorization header(s) carrying ``token``: scheme casing and spacing, repeated, non-UTF-8 bytes."""
    form = "plain" if rng.random() < 0.5 else rng.choice(
        ["lower", "upper", "spaces", "padded", "tab", "basic", "bare", "scheme_only", "twice_same", "twice_other",
         "joined", "latin1_junk", "utf8_junk", "inner_space", "nbsp"]
    )  # fmt: skip
    raw = token.encode("utf-8")
    value = {
        "plain": b"Bearer " + raw,
        "lower": b"bearer " + raw,
        "upper": b"BEARER " + raw,
        "spaces": b"Bearer    " + raw,
        "padded": b"  Bearer " + raw + b"  ",
        "tab": b"Bearer\t" + raw,
        "basic": b"Basic " + raw,
        "bare": raw,
        "scheme_only": b"Bearer",
        "twice_same": b"Bearer " + raw,
        "twice_other": b"Bearer " + raw,
        "joined": b"Bearer " + raw + b", Bearer " + raw,
        "latin1_junk": b"Bearer " + raw[: len(raw) // 2] + b"\xff\xfe" + raw[len(raw) // 2 :],
        "utf8_junk": b"Bearer " + raw[: len(raw) // 3] + "é".encode() + raw[len(raw) // 3 :],
        "inner_space": b"Bearer " + raw[: len(raw) // 2] + b" " + raw[len(raw) // 2 :],
        "nbsp": b"Bearer " + raw + b"\xa0",
    }[form]
    headers = [(b"authorization", value)]
    if form == "twice_same":
        headers.append((b"Authorization", value))
    elif form == "twice_other":
        headers.append((b"authorization", b"Bearer " + garbage(rng).encode()))
    return headers, form


@dataclasses.dataclass(frozen=True)
class Expected:
    org: str | None
    user: str | None


@dataclasses.dataclass(frozen=True)
class Policy:
    reject: bool
    status: int

    @staticmethod
    def of_seed(seed: int) -> Policy:
        """Allow, reject with 401, reject with 403, in turn (the seeds of a family cover each)."""
        return [Policy(False, 401), Policy(True, 401), Policy(True, 403)][seed // 2 % 3]

    def kwargs(self) -> dict[str, Any]:
        return {"on_unresolved": "reject" if self.reject else "allow", "unresolved_status": self.status}


async def whoami(request: Request) -> Response:
    state = request.scope.get("state")
    read = state.get if isinstance(state, Mapping) else lambda name: getattr(state, name, None)
    return JSONResponse(
        {
            "org": get_current_org(request),
            "user": get_current_user(request),
            "state_org": read("billing_org_id"),
            "state_user": read("billing_user_id"),
        }
    )


APP = Starlette(routes=[Route("/whoami", whoami)])


def model_ambiguous(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether the Authorization header came more than once with different values (refused: 400, whatever the
    policy; which one the app's auth reads is not known)."""
    return len({value for name, value in headers if name.lower() == b"authorization"}) > 1


def check_answer(
    response: httpx.Response,
    expected: Expected,
    policy: Policy,
    secrets: Sequence[str],
    what: str,
    *,
    ambiguous: bool = False,
) -> None:
    """The answer the model expects: the org and user the app sees, or the documented refusal; never a secret."""
    if expected.org is None and ambiguous:
        assert response.status_code == 400, (what, response.status_code, response.text[:300])
        assert response.headers["content-type"].startswith("application/problem+json"), what
        assert response.json()["title"] == "Ambiguous credentials", what
    elif expected.org is None and policy.reject:
        assert response.status_code == policy.status, what
        assert response.headers["content-type"].startswith("application/problem+json"), what
        body = response.json()
        assert body["status"] == policy.status and body["title"], what
        if policy.status == 401:
            assert response.headers["www-authenticate"].lower().startswith("bearer"), what
    else:
        assert response.status_code == 200, (what, response.status_code, response.text[:300])
        seen = {"org": expected.org, "user": expected.user, "state_org": expected.org, "state_user": expected.user}
        assert response.json() == seen, what
    answer = response.text + "\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    for secret in secrets:
        assert secret not in answer, (what, "leaked into the answer")


def check_logs(caplog: pytest.LogCaptureFixture, secrets: Sequence[str], *, errors_allowed: bool = False) -> None:
    """No log line holds a token or a secret; nothing at ERROR from the identity resolvers unless documented."""
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        for secret in secrets:
            assert secret not in text, ("logged", record.name, text[:300])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("lago_org_billing")]
    if errors_allowed:
        assert all("raised" in r.getMessage() for r in errors), [r.getMessage()[:300] for r in errors]
    else:
        assert not errors, [r.getMessage()[:300] for r in errors]


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    fake_lago.add_plan("starter", amount_cents=0)
    return BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)


@contextlib.asynccontextmanager
async def serving(
    app: Any, outer: Callable[[Any], Any] | None = None, **kwargs: Any
) -> AsyncIterator[tuple[OrgBillingMiddleware, httpx.AsyncClient]]:
    """The billing middleware over ``app`` (``outer(middleware)`` in front of it: an auth layer), and a client."""
    middleware = OrgBillingMiddleware(app, quota=None, **kwargs)
    served = middleware if outer is None else outer(middleware)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=served), base_url="http://t") as client:
            yield middleware, client
    finally:
        await middleware.aclose()


async def check_billed(middleware: OrgBillingMiddleware, fake_lago: Any, billed: list[str]) -> None:
    """One event per request the model resolved an org for, to that org (and none for the others)."""
    assert await middleware.pipeline.flush(10)
    got = collections.Counter(event["external_subscription_id"] for event in fake_lago.events)
    assert got == collections.Counter(billed)


def sent_secrets(tokens: Sequence[str], *extra: str) -> list[str]:
    """What must never be shown: the tokens sent (long enough to be told from an id), the secrets."""
    return [*extra, *(token for token in dict.fromkeys(tokens) if len(token) >= 24)]


# ----------------------------------------------------------------------------------------- family 1: key=


@dataclasses.dataclass
class KeySetup:
    """A ``key=`` resolver's key: what the resolver is given, what PyJWT verifies with, the algorithms it keeps."""

    kind: str
    given: str
    verify_with: Any
    algorithms: list[str]
    allowed: list[str]
    private: Any  # the issuer's signing key (the secret's bytes for HMAC)
    other: Any  # a key of the same kind the resolver never had
    attacker: Any  # an asymmetric key the resolver never had
    public_text: bytes | None  # what an algorithm-confusion attacker signs HS256 with


def draw_key(rng: random.Random, pool: Pool) -> KeySetup:
    kind = rng.choice(["hs", "rsa", "ec", "ed"])
    if kind == "hs":
        algorithms = rng.choice([["HS256"], ["HS256", "HS512"]])
        secret = SECRET.encode()
        attacker = rng.choice(pool.all())
        return KeySetup(kind, SECRET, secret, algorithms, algorithms, secret, CHAIN_SECRET.encode(), attacker, None)
    keys: Sequence[Any] = {"rsa": pool.rsa, "ec": pool.ec, "ed": pool.ed}[kind]
    private, other = rng.sample(list(keys), 2)
    own = list(ALGS_OF[kind])
    algorithms = rng.choice([[own[0]], [own[0], "HS256"], own])
    pem = public_pem(private)
    given = rng.choice([pem, json.dumps(public_jwk(private))])
    # the documented rule: algorithms the key cannot verify with are dropped (HS256 with a public key above all)
    allowed = [alg for alg in algorithms if alg in own]
    return KeySetup(kind, given, private.public_key(), algorithms, allowed, private, other, other, pem.encode())


def draw_key_token(rng: random.Random, setup: KeySetup, config: Config, now: int) -> Sent:
    claims = draw_claims(rng, config, now)
    payload = claims.payload
    how = rng.choice(["good"] * 6 + ["other_key", "none", "confusion", "tampered", "alg_not_allowed", "garbage"])
    if how in ("good", "tampered"):
        extra = rng.choice(EXTRA_HEADERS)
        token = sign(setup.private, rng.choice(setup.allowed), payload, rng.choice([None, "k1"]), **extra)
        if how == "tampered":
            return Sent(tampered(token, payload), claims, False, how)
        return Sent(token, with_header(claims, extra), True, how)
    if how == "other_key":
        return Sent(sign(setup.other, rng.choice(setup.allowed), payload), claims, False, how)
    if how == "none":
        header = {"alg": rng.choice(["none", "None", "NONE", ""]), "typ": "JWT"}
        return Sent(unsigned(header, payload, rng.choice([b"", b"x"])), claims, False, how)
    if how == "confusion":  # HS256 signed with what the attacker can read: the public key's text (or JWK JSON)
        if setup.public_text is None:  # (an HMAC resolver: a token of the attacker's own asymmetric key instead)
            attacker = setup.attacker
            return Sent(sign(attacker, ALGS_OF[kind_of(attacker)][0], payload), claims, False, how)
        text = rng.choice([setup.public_text, setup.given.encode(), setup.public_text.strip()])
        return Sent(hmac_signed(text, {"alg": "HS256", "typ": "JWT"}, payload), claims, False, how)
    if how == "alg_not_allowed":  # signed by the right key, with an algorithm the resolver was not given
        spare = [alg for alg in ALGS_OF[setup.kind] if alg not in setup.allowed]
        if spare:
            return Sent(sign(setup.private, spare[0], payload), claims, False, how)
    return Sent(garbage(rng), claims, False, "garbage")


@pytest.mark.parametrize("seed", KEY_SEEDS)
async def test_bearer_tokens_verified_with_one_key(
    seed: int, pool: Pool, fake_lago: Any, settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """The org and user resolved from random bearer tokens by ``from_jwt_claim(key=...)`` are exactly what strict
    PyJWT decoding with the model's key and algorithms gives, an invalid or forged token never resolves an org,
    and neither the token nor the secret shows in an answer or a log line."""
    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    rng = random.Random(seed)
    setup = draw_key(rng, pool)
    config = draw_config(rng)
    policy = Policy.of_seed(seed)
    org = from_jwt_claim(config.claim, key=setup.given, algorithms=setup.algorithms, **config.options())
    user = from_jwt_claim("sub", key=setup.given, algorithms=setup.algorithms, **config.options())
    tokens: list[str] = []
    billed: list[str] = []
    async with serving(APP, settings=settings, transport=fake_lago.transport(), resolve_org=org, resolve_user=user,
                       **policy.kwargs()) as (middleware, client):  # fmt: skip
        for step in range(STEPS):
            now = int(time.time())
            sent = draw_key_token(rng, setup, config, now)
            headers, form = authorization(rng, sent.token)
            tokens.append(sent.token)
            what = f"seed {seed} step {step}: {setup.kind} {setup.algorithms} {config} {sent.how} {form} {sent.claims}"
            received = model_bearer(headers)
            claims = None
            if received is not None:
                claims = strict_decode(
                    received, setup.verify_with, setup.allowed, config.audience, config.issuer, config.leeway,
                    config.require,
                )  # fmt: skip
            if received == sent.token:  # the generator's intent, when the token arrived as sent
                if not sent.trusted:
                    assert claims is None, ("forged yet valid for PyJWT", what)
                elif sent.claims.meant is not None:
                    assert (claims is not None) == sent.claims.meant, ("the oracle disagrees with the intent", what)
            expected_org = model_claim(claims, config.claim)
            expected = Expected(expected_org, model_claim(claims, "sub") if expected_org is not None else None)
            response = await client.get("/whoami", headers=headers)
            check_answer(
                response, expected, policy, sent_secrets([sent.token], SECRET), what, ambiguous=model_ambiguous(headers)
            )
            if not sent.trusted:
                assert response.status_code != 200 or response.json()["org"] is None, what
            if expected.org is not None:
                billed.append(expected.org)
        await check_billed(middleware, fake_lago, billed)
    check_logs(caplog, sent_secrets(tokens, SECRET))


# ----------------------------------------------------------------------------------------- family 2: jwks_url=


class JwksServer:
    """The issuers' JWKS endpoints: a real HTTP server on 127.0.0.1 (the resolver's built-in httpx client fetches
    from it), one path per seed, each serving what the test sets and counting the GETs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.fetches: collections.Counter[str] = collections.Counter()
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with served.lock:
                    served.fetches[self.path] += 1
                    status, body = served.answers.get(self.path, (404, b"{}"))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve(self, path: str, status: int, document: object) -> None:
        with self.lock:
            self.answers[path] = (status, json.dumps(document).encode())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


class Clock:
    """The JWKS cache's clock, moved by the seed."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Published:
    kid: str
    private: Any
    jwk: dict[str, Any]

    def algs(self, allowed: Sequence[str]) -> list[str]:
        """The allowed algorithms this JWK verifies with (its ``alg`` member, else every one its kind fits)."""
        own = ALGS_OF[kind_of(self.private)]
        declared = self.jwk.get("alg")
        if declared is not None:
            return [declared] if declared in allowed and declared in own else []
        return [alg for alg in allowed if alg in own]


class JwksModel:
    """The key cache of ``_jwks`` as its docstrings tell it: a token's ``(kid, alg)`` looked up in the set of the
    last successful fetch; fetched when cold or older than ``max_age`` (if the last attempt is older than the
    interval), or for an unknown kid when the last attempt is older than the interval; a failed fetch (an error
    status, no usable key) keeps the cached keys; a token without kid uses the only usable key of the set."""

    def __init__(self, allowed: Sequence[str], interval: float, max_age: float) -> None:
        self.allowed = list(allowed)
        self.interval = interval
        self.max_age = max_age
        self.attempted: float | None = None
        self.fetched: float | None = None
        self.cached: list[Published] = []
        self.fetches = 0

    def fetch(self, now: float, status: int, served: list[Published]) -> None:
        self.fetches += 1
        self.attempted = now
        usable = [entry for entry in served if entry.algs(self.allowed)]
        if status == 200 and usable:
            self.fetched = now
            self.cached = usable

    def lookup(self, kid: str | None, alg: str) -> Any:
        if kid is None:
            return (
                self.cached[0].private.public_key()
                if len(self.cached) == 1 and alg in self.cached[0].algs(self.allowed)
                else None
            )
        for entry in self.cached:
            if entry.kid == kid and alg in entry.algs(self.allowed):
                return entry.private.public_key()
        return None

    def key_for(self, token: str, now: float, status: int, served: list[Published]) -> tuple[Any, str] | None:
        """The key and algorithm the token verifies with, or ``None``; fetches as the cache would."""
        header = jose_header(token)
        if header is None:
            return None
        kid, alg = header.get("kid"), header.get("alg")
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)) or alg not in self.allowed:
            return None  # (refused before any fetch: a forged header costs the issuer nothing)
        due = self.attempted is None or now - self.attempted >= self.interval
        if due and (self.fetched is None or now - self.fetched >= self.max_age):
            self.fetch(now, status, served)
            due = False
        found = self.lookup(kid, alg)
        if found is None and due:
            self.fetch(now, status, served)
            found = self.lookup(kid, alg)
        return None if found is None else (found, alg)


def jose_header(token: str) -> dict[str, Any] | None:
    """A token's header (its first segment, base64url JSON object), or ``None``."""
    segment = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def draw_jwks_token(
    rng: random.Random, config: Config, now: int, published: list[Published], retired: list[Published],
    unpublished: list[Any], allowed: list[str],
) -> Sent:  # fmt: skip
    claims = draw_claims(rng, config, now)
    payload = claims.payload
    known = published + retired
    how = rng.choice(
        ["current"] * 5 + ["retired", "no_kid", "forged_kid", "unknown_kid", "none", "confusion", "disallowed",
                           "tampered", "odd_kid", "garbage"]
    )  # fmt: skip
    if how == "odd_kid" and published:  # a kid that is no string, a published key signing: refused, never fetched
        entry = rng.choice(published)
        alg = rng.choice(entry.algs(allowed) or ALGS_OF[kind_of(entry.private)])
        kid = rng.choice([7, [entry.kid], {"kid": entry.kid}, True])
        return Sent(sign(entry.private, alg, payload, kid), claims, False, how)
    if (how in ("current", "no_kid", "tampered") and not published) or (how == "retired" and not retired):
        how = "garbage"
    if how in ("current", "retired", "no_kid", "tampered"):
        entry = rng.choice(published if how != "retired" else retired)
        # (an algorithm of the key's kind, allowed or not: the model says whether it verifies)
        alg = rng.choice(entry.algs(allowed) or ALGS_OF[kind_of(entry.private)])
        extra = rng.choice(EXTRA_HEADERS)
        token = sign(entry.private, alg, payload, None if how == "no_kid" else entry.kid, **extra)
        if how == "tampered":
            return Sent(tampered(token, payload), claims, False, how)
        return Sent(token, with_header(claims, extra), True, how)
    if how in ("forged_kid", "unknown_kid"):  # signed by a key never published (under a published kid, or another)
        attacker = rng.choice(unpublished)
        alg = rng.choice(ALGS_OF[kind_of(attacker)])
        kid = rng.choice(known).kid if how == "forged_kid" and known else f"kid-{rng.randrange(10**6)}"
        return Sent(sign(attacker, alg, payload, kid), claims, False, how)
    if how == "none":
        kid = rng.choice(known).kid if known else None
        return Sent(unsigned({"alg": rng.choice(["none", "None"]), "kid": kid}, payload), claims, False, how)
    if how == "confusion" and known:  # HS256 signed with a published key's PEM or JWK JSON, as anyone reads them
        entry = rng.choice(known)
        secret = rng.choice([public_pem(entry.private).encode(), json.dumps(entry.jwk).encode()])
        return Sent(hmac_signed(secret, {"alg": "HS256", "kid": entry.kid}, payload), claims, False, how)
    if how == "disallowed":  # a published key, signing with an algorithm the resolver was not given
        spare = [(entry, alg) for entry in known for alg in ALGS_OF[kind_of(entry.private)] if alg not in allowed]
        if spare:
            entry, alg = rng.choice(spare)
            return Sent(sign(entry.private, alg, payload, entry.kid), claims, False, how)
    return Sent(garbage(rng), claims, False, "garbage")


@pytest.mark.parametrize("seed", JWKS_SEEDS)
async def test_bearer_tokens_verified_with_a_rotating_jwks(
    seed: int,
    pool: Pool,
    jwks_server: JwksServer,
    fake_lago: Any,
    settings: BillingSettings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The org and user resolved by ``from_jwt_claim(jwks_url=...)`` while the issuer publishes, rotates and
    retires keys, and its endpoint fails at times, are what the model of the key cache and strict PyJWT decoding
    give; the JWKS is fetched exactly when the model says; forged, unsigned and confused tokens never resolve an
    org, and fetch nothing when their algorithm is not allowed."""
    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    clock = Clock()
    monkeypatch.setattr("lago_org_billing._jwks._clock", clock)
    rng = random.Random(1000 + seed)
    config = draw_config(rng)
    policy = Policy.of_seed(seed)
    allowed = rng.choice([["RS256"], ["RS256", "ES256", "EdDSA"], ["ES256", "EdDSA"], ["RS256", "PS256", "EdDSA"]])
    interval = rng.choice([1.0, 60.0])
    max_age = rng.choice([interval, 3600.0])
    path = f"/seed-{seed}/.well-known/jwks.json"
    keys = pool.all()
    rng.shuffle(keys)
    fresh, unpublished = keys[:6], keys[6:]  # the issuer's keys over time; the attacker's, never published
    published: list[Published] = []
    retired: list[Published] = []
    status = served_status = 200
    served: list[Published] = []

    def publish() -> None:
        fitting = [key for key in fresh if set(ALGS_OF[kind_of(key)]) & set(allowed)]
        private = rng.choice(fitting) if fitting and rng.random() < 0.85 else rng.choice(fresh)
        fresh.remove(private)
        kid = f"key-{len(fresh)}"
        jwk = {**public_jwk(private), "kid": kid, "use": "sig"}
        own = [alg for alg in allowed if alg in ALGS_OF[kind_of(private)]]
        if own and rng.random() < 0.4:
            jwk["alg"] = rng.choice(own)
        published.append(Published(kid, private, jwk))

    def serve() -> None:
        nonlocal served, served_status
        served_status = status
        if rng.random() < 0.05:  # a set without a usable key: a failed fetch, as an error status is
            served = []
            jwks_server.serve(path, status, {"keys": [{"kty": "oct", "k": b64(b"s" * 32), "kid": "secret"}]})
        else:
            served = list(published)
            jwks_server.serve(path, status, {"keys": [entry.jwk for entry in published]})

    publish()
    serve()
    model = JwksModel(allowed, interval, max_age)
    options = {"algorithms": allowed, "jwks_refresh_interval": interval, "jwks_max_age": max_age, **config.options()}
    org = from_jwt_claim(config.claim, jwks_url=jwks_server.url(path), **options)
    user = from_jwt_claim("sub", jwks_url=jwks_server.url(path), **options)
    tokens: list[str] = []
    billed: list[str] = []
    async with serving(APP, settings=settings, transport=fake_lago.transport(), resolve_org=org, resolve_user=user,
                       **policy.kwargs()) as (middleware, client):  # fmt: skip
        for step in range(STEPS):
            event = rng.random()
            if event < 0.15 and fresh:
                publish()
            elif event < 0.25 and published:
                retired.append(published.pop(0))
            elif event < 0.30:  # the endpoint starts failing, for a few steps
                status = 500
            recovers = status == 500 and event >= 0.30 and rng.random() < 0.35
            if recovers:
                status = 200
            if event < 0.30 or recovers or rng.random() < 0.1:
                serve()
            clock.now += rng.choice([0.0, 0.0, 0.5, interval, interval + 0.5, max_age + 1])
            sent = draw_jwks_token(rng, config, int(time.time()), published, retired, unpublished, allowed)
            headers, form = authorization(rng, sent.token)
            tokens.append(sent.token)
            what = f"seed {seed} step {step}: {allowed} {config} {sent.how} {form} {sent.claims}"
            received = model_bearer(headers)
            claims = None
            if received is not None:
                found = model.key_for(received, clock.now, served_status, served)
                if found is not None:
                    claims = strict_decode(received, found[0], [found[1]], config.audience, config.issuer,
                                           config.leeway, config.require)  # fmt: skip
            if received == sent.token and not sent.trusted:
                assert claims is None, ("forged yet valid for PyJWT", what)
            expected_org = model_claim(claims, config.claim)
            expected = Expected(expected_org, model_claim(claims, "sub") if expected_org is not None else None)
            with anyio.fail_after(30):  # a guard against a hang, not a timing assertion
                response = await client.get("/whoami", headers=headers)
            check_answer(
                response, expected, policy, sent_secrets([sent.token]), what, ambiguous=model_ambiguous(headers)
            )
            assert jwks_server.fetches[path] == model.fetches, ("fetches", what)
            if not sent.trusted:
                assert response.status_code != 200 or response.json()["org"] is None, what
            if expected.org is not None:
                billed.append(expected.org)
        await check_billed(middleware, fake_lago, billed)
    check_logs(caplog, sent_secrets(tokens))


# ----------------------------------------------------------------------------------------- family 3: sources


STATE_VALUES: tuple[Any, ...] = ("org_s", " org_t ", 7, 0, "", True, ["org_s"], "z" * 300, "org\x07s", None)
USER_IDS: tuple[Any, ...] = ("user_u", 8, "", None, " user_v ")
HEADER_VALUES: tuple[bytes, ...] = (
    b"org_h",
    b"org_m",
    b"org_n",
    b"org_r",
    b"org_j",
    b"org_w",
    b"  org_h  ",
    b"org_h, org_h",
    b"org_h, org_m",
    b"org_h,",
    b"",
    b"x" * 256,
    "soci\u00e9t\u00e9".encode(),
    "soci\u00e9t\u00e9".encode("latin-1"),
    b"org\x01h",
    b"\xff\xfe",
)


class MembershipCheck:
    """``membership_check(scope, org_id)``: what it does for each org, and the orgs it was asked about."""

    def __init__(self, rng: random.Random, is_async: bool) -> None:
        behaviours = (
            ["member", "refuse", "raise", "junk", "hang"] if is_async else ["member", "refuse", "raise", "junk"]
        )
        self.of = {org: rng.choice(behaviours) for org in ("org_h", "org_m", "org_n", "org_r", "org_j", "org_w")}
        self.of["org_h"] = "member"  # (one that surely admits, one that surely fails)
        self.of["org_w"] = "hang" if is_async else "raise"
        self.of["soci\u00e9t\u00e9"] = "member"
        self.asked: list[str] = []
        self.is_async = is_async
        self.never = anyio.Event()

    def behaviour(self, org: str) -> str:
        return self.of.get(org, "refuse")

    def answer(self, org: str) -> Any:
        self.asked.append(org)
        behaviour = self.behaviour(org)
        if behaviour == "raise":
            raise ConnectionError(f"membership store down while checking {org}")
        return {"member": True, "refuse": False, "junk": random.Random(org).choice([None, 1, "yes", [True]])}.get(
            behaviour
        )

    def sync(self, scope: Any, org: str) -> Any:
        return self.answer(org)

    async def async_(self, scope: Any, org: str) -> Any:
        await anyio.lowlevel.checkpoint()
        if self.behaviour(org) == "hang":
            self.asked.append(org)
            await self.never.wait()
        return self.answer(org)


class AuthLayer:
    """An auth middleware in front of the billing one: it sets ``scope["state"]`` and ``scope["user"]`` as this
    request's draw says."""

    def __init__(self) -> None:
        self.app: Any = None
        self.state: Any = None
        self.user: Any = None

    def in_front(self, app: Any) -> AuthLayer:
        self.app = app
        return self

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if self.state is not None:
                scope["state"] = self.state
            if self.user is not None:
                scope["user"] = self.user
        await self.app(scope, receive, send)


def draw_state(rng: random.Random) -> Any:
    shape = rng.choice(["none", "none", "dict", "dict", "object"])
    if shape == "none":
        return None
    values: dict[str, Any] = {}
    if rng.random() < 0.6:
        values["org_id"] = rng.choice(STATE_VALUES)
    if rng.random() < 0.5:
        values["user_id"] = rng.choice(USER_IDS)
    return values if shape == "dict" else types.SimpleNamespace(**values)


class MethodUser:
    """A user whose ``is_authenticated`` is a method (Django < 1.10, Flask-Login < 0.3)."""

    def __init__(self, authenticated: bool, org_id: Any, identity: Any) -> None:
        self._authenticated = authenticated
        self.org_id = org_id
        self.identity = identity

    def is_authenticated(self) -> bool:
        return self._authenticated


def draw_user(rng: random.Random) -> Any:
    shape = rng.choice(["none", "none", "mapping", "object", "method"])
    if shape == "none":
        return None
    authenticated = rng.random() < 0.75
    org, identity = rng.choice(STATE_VALUES), rng.choice(USER_IDS)
    if shape == "mapping":
        user: dict[str, Any] = {"org_id": org, "username": identity}
        if not authenticated or rng.random() < 0.5:
            user["is_authenticated"] = authenticated
        return user
    if shape == "object":
        return types.SimpleNamespace(is_authenticated=authenticated, org_id=org, user_id=identity)
    return MethodUser(authenticated, org, identity)


def draw_chain_token(rng: random.Random, now: int) -> tuple[str | None, dict[str, Any] | None]:
    """A bearer token for the chain's ``from_jwt_claim`` (HS256, no audience or issuer), and its claims if valid."""
    kind = rng.choice(["absent", "absent", "valid", "valid", "expired", "forged", "garbage", "no_org"])
    if kind == "absent":
        return None, None
    claims: dict[str, Any] = {"org_id": f"org_jwt{rng.randrange(3)}", "sub": f"user_jwt{rng.randrange(3)}"}
    if kind == "no_org":
        claims.pop("org_id")
    if kind == "expired":
        claims["exp"] = now - 3600
    if kind == "garbage":
        return garbage(rng), None
    secret = SECRET if kind == "forged" else CHAIN_SECRET
    token = jwt.encode(claims, secret, algorithm="HS256")
    return token, (claims if kind in ("valid", "no_org") else None)


def header_pairs(rng: random.Random, name: bytes) -> list[tuple[bytes, bytes]]:
    """An identity header sent not at all, once, twice alike, or twice different."""
    shape = rng.choice(["absent", "once", "once", "once", "twice_same", "twice_other"])
    if shape == "absent":
        return []
    value = rng.choice(HEADER_VALUES)
    if shape == "once":
        return [(name, value)]
    if shape == "twice_same":
        return [(name, value), (name, value)]
    return [(name, value), (name, rng.choice(HEADER_VALUES))]


@pytest.mark.parametrize("seed", SOURCE_SEEDS)
async def test_org_and_user_from_state_user_headers_and_chains(
    seed: int, fake_lago: Any, settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """The org and user resolved from ``request.state``, ``request.user``, ``LAGO_ORG_HEADER`` /
    ``LAGO_USER_HEADER`` (the default resolvers) or a ``first_of`` chain of state, user, a bearer token and a header
    confirmed by a membership check (admitting, refusing, raising, answering junk, hanging past its timeout) are the
    model's, in the documented order; a check that raises leaves the request unresolved (logged at ERROR, not a
    500); the check is asked exactly when the chain gets to the header, and one that timed out is not waited for
    again in the same request."""
    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    rng = random.Random(2000 + seed)
    policy = Policy.of_seed(seed)
    chained = seed % 2 == 1
    user_header = rng.choice([None, "X-User-Id"])
    check = MembershipCheck(rng, is_async=rng.random() < 0.7)
    kwargs: dict[str, Any] = {"transport": fake_lago.transport(), **policy.kwargs()}
    if chained:
        kwargs["settings"] = settings
        kwargs["resolve_org"] = first_of(
            from_state(),
            from_user(),
            from_jwt_claim("org_id", key=CHAIN_SECRET, algorithms=["HS256"]),
            from_header(
                "X-Org-Id",
                membership_check=check.async_ if check.is_async else check.sync,
                membership_timeout=0.02,  # (the documented bound on a check that hangs: it applies here)
            ),
        )
        kwargs["resolve_user"] = first_of(
            from_state("user_id"), from_user(USER_NAMES), from_jwt_claim("sub", key=CHAIN_SECRET, algorithms=["HS256"])
        )
    else:
        kwargs["settings"] = settings.replace(org_header="X-Org-Id", user_header=user_header)
    tokens: list[str] = []
    billed: list[str] = []
    raised = False
    auth = AuthLayer()
    async with serving(APP, auth.in_front, **kwargs) as (middleware, client):
        for step in range(STEPS):
            sparse = chained and rng.random() < 0.5  # (the chain then gets to the token and the header)
            auth.state, auth.user = (None, None) if sparse else (draw_state(rng), draw_user(rng))
            headers = header_pairs(rng, b"x-org-id") + header_pairs(rng, b"x-user-id")
            token, token_claims = draw_chain_token(rng, int(time.time())) if chained else (None, None)
            if token is not None:
                headers.append((b"authorization", b"Bearer " + token.encode()))
                tokens.append(token)
            rng.shuffle(headers)
            asked_before = len(check.asked)
            what = f"seed {seed} step {step}: {auth.state!r} {auth.user!r} {headers!r} {check.of}"

            asks: list[str] = []  # the orgs the membership check is asked about, in turn
            try:
                org, stopped = model_state(auth.state, "org_id") or model_user(auth.user, ["org_id"]), False
            except NotAnId:
                org, stopped = None, True
            try:
                user, user_stopped = model_state(auth.state, "user_id") or model_user(auth.user, USER_NAMES), False
            except NotAnId:
                user, user_stopped = None, True
            if chained:
                if not stopped:
                    org = org or model_claim(token_claims, "org_id")
                if org is None and not stopped:
                    header_org = model_header_id(headers, b"x-org-id")
                    if header_org is not None:
                        behaviour = check.behaviour(header_org)
                        org = header_org if behaviour == "member" else None
                        raised = raised or behaviour == "raise"
                        asks.append(header_org)
                        if org is None and not policy.reject and behaviour != "hang":
                            # unresolved and served: the middleware looks again once the endpoint has answered
                            # (its auth may have set request.state.org_id); a check that did not answer in time is
                            # not waited for a second time in the same request
                            asks.append(header_org)
                if not user_stopped:
                    user = user or model_claim(token_claims, "sub")
            else:
                if not stopped:
                    org = org or model_header_id(headers, b"x-org-id")
                if user is None and user_header is not None and not user_stopped:
                    user = model_header_id(headers, b"x-user-id")
            expected = Expected(org, user if org is not None else None)

            with anyio.fail_after(30):  # a guard against a hang, not a timing assertion
                response = await client.get("/whoami", headers=headers)
            check_answer(response, expected, policy, sent_secrets(tokens, CHAIN_SECRET), what)
            assert check.asked[asked_before:] == asks, what
            if expected.org is not None:
                billed.append(expected.org)
        await check_billed(middleware, fake_lago, billed)
    check_logs(caplog, sent_secrets(tokens, CHAIN_SECRET), errors_allowed=raised)


# ----------------------------------------------------------------------------------------- regressions


async def test_a_membership_check_that_timed_out_is_not_waited_for_again_in_the_same_request(
    fake_lago: Any, settings: BillingSettings
) -> None:
    """A membership check that does not answer within ``membership_timeout`` holds a request once, not twice.

    The sequence the sources seeds drew: ``first_of(..., from_header("X-Org-Id", membership_check=check))`` with
    ``on_unresolved="allow"`` (the default), a check that hangs (its membership store down). Before the app ran the
    check was awaited until the timeout, the request unresolved and served; when the endpoint answered, the
    middleware looked for the org again (an auth in the endpoint may set ``request.state.org_id``), which ran the
    header resolver again and awaited the hanging check a second time: every request naming an org was held twice
    the documented bound (10 s with the default 5 s) during such an outage."""
    never = anyio.Event()
    entered: list[str] = []

    async def hangs(scope: Any, org_id: str) -> bool:
        entered.append(org_id)
        await never.wait()
        return True  # pragma: no cover - never answers

    resolver = first_of(from_state(), from_header("X-Org-Id", membership_check=hangs, membership_timeout=0.02))
    async with serving(APP, settings=settings, transport=fake_lago.transport(), resolve_org=resolver) as (_, client):
        with anyio.fail_after(30):  # a guard against a hang, not a timing assertion
            response = await client.get("/whoami", headers={"X-Org-Id": "org_a"})
    assert response.status_code == 200 and response.json()["org"] is None
    assert entered == ["org_a"]
