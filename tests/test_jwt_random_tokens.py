"""Seeded random bearer tokens through ``from_jwt_claim`` (``key=`` and ``jwks_url=``), PyJWT as the oracle.

Each seed draws a resolver configuration and tokens from a fixed ``random.Random(seed)``: HS256, RS256, PS256, ES256
and EdDSA tokens signed with the trusted key or another one, ``alg: none``, HS256 signed with the RSA public key's PEM
(algorithm confusion), a ``kid`` missing, unknown, repeated in the header or not a string, ``crit`` headers, ``exp``,
``nbf`` and ``iat`` at the leeway's boundaries (ints, floats, strings, booleans, huge, NaN, infinite), ``aud`` as a
string or a list, ``iss`` matching or not, the org claim nested or at a dotted path and of every JSON type (numbers,
booleans, lists, objects, empty, oversized, with control characters), segments re-padded or with ``+/`` for ``-_``,
and the ``Authorization`` header with odd spacing and casing of ``Bearer`` or repeated. PyJWT's clock is frozen, so
the time claims sit exactly on the boundaries.

The oracle: PyJWT's ``jwt.decode`` with the same key, algorithms, audience, issuer, leeway and ``require`` decides
whether a token is valid; the org is its claim cleaned as ``_identity`` documents. The resolver must agree on every
token, never raise (nothing logged at ERROR), and the middleware must answer the documented 401/403 for the rest.

For ``jwks_url=``, the JWKS is served by a real HTTP server on 127.0.0.1 (the built-in httpx client): keys rotated,
``use: enc`` keys, duplicate kids, malformed entries, bad JSON, error statuses, dropped connections, a slow answer
past the fetch deadline; a model of the key cache written from ``_jwks``'s docstring picks the key (PyJWT verifies
with it) and counts the fetches, which must match the server's count; and bursts of concurrent requests with unknown
kids share one fetch.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import random
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
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

from _jwks_server import Clock, JwksServer
from lago_org_billing import BillingSettings, OrgBillingMiddleware
from lago_org_billing._identity import from_jwt_claim, get_current_org, reset_warnings

pytestmark = pytest.mark.anyio

#: Seeds run in CI; set JWT_HUNT_SEEDS=500 to hunt with more by hand.
SEEDS = range(int(os.environ.get("JWT_HUNT_SEEDS", "6")))
TOKENS = 60
JWKS_STEPS = 40

#: PyJWT's frozen "now" (an integer: exp == NOW - leeway is exactly the boundary).
NOW = 1_800_000_000
SECRET = hashlib.sha512(b"jwt random tokens").hexdigest()  # 128 bytes: no weak-key warning


@pytest.fixture(autouse=True)
def _reset_identity_warnings() -> Iterator[None]:
    reset_warnings()
    yield
    reset_warnings()


@pytest.fixture(autouse=True)
def frozen_pyjwt_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyJWT's clock (the resolver's and the oracle's: one module) stopped at :data:`NOW`."""

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> Any:
            return dt.datetime.fromtimestamp(NOW, tz)

    monkeypatch.setattr(jwt.api_jwt, "datetime", Frozen)


class Keys:
    """The issuer's keys and an attacker's (made once: RSA generation is the slow part)."""

    def __init__(self) -> None:
        self.rsa = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]
        self.ec = [ec.generate_private_key(ec.SECP256R1()) for _ in range(2)]
        self.ed = [ed25519.Ed25519PrivateKey.generate() for _ in range(2)]
        #: Keys of JWKS entries that must never verify (skipped, or under a kid published first): neither the
        #: issuer's nor the attacker's.
        self.odd: list[Any] = [
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ec.generate_private_key(ec.SECP256R1()),
        ]


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pem(private: Any) -> str:
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return str(public.decode("ascii"))


def jwk_of(private: Any) -> dict[str, Any]:
    algorithm: Any = (
        jwt.algorithms.RSAAlgorithm
        if isinstance(private, rsa.RSAPrivateKey)
        else jwt.algorithms.ECAlgorithm
        if isinstance(private, ec.EllipticCurvePrivateKey)
        else jwt.algorithms.OKPAlgorithm
    )
    jwk: dict[str, Any] = json.loads(algorithm.to_jwk(private.public_key()))
    return jwk


def algs_of(private: Any) -> tuple[str, ...]:
    if isinstance(private, rsa.RSAPrivateKey):
        return ("RS256", "PS256")
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return ("ES256",)
    return ("EdDSA",)


# ------------------------------------------------------------------------------------------------ tokens


def json_object(members: Sequence[tuple[str, str]]) -> str:
    """A JSON object of raw member texts: repeated names, ``NaN``, ``1e400`` as sent (json.dumps cannot)."""
    return "{" + ",".join(f"{json.dumps(name)}:{value}" for name, value in members) + "}"


def signed(header: str, payload: str, alg: str | None, key: Any) -> str:
    """A compact JWS of exactly these texts; ``alg`` None: no signature; ``HS256`` with any bytes as the secret
    (PyJWT refuses to sign with a PEM)."""
    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    if alg is None:
        return signing_input + "."
    if alg == "HS256" and isinstance(key, bytes):
        return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"
    algorithm = jwt.get_algorithm_by_name(alg)
    return f"{signing_input}.{b64(algorithm.sign(signing_input.encode(), algorithm.prepare_key(key)))}"


class Draw:
    """A token's random choices: most tokens are tame (valid, unless signed by the wrong key), a wild one has any
    of its parts odd (each with some probability): what it resolves is the point as much as what it refuses."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.wild = rng.random() < 0.45

    def odd(self, chance: float = 0.3) -> bool:
        return self.wild and self.rng.random() < chance


def time_value(draw: Draw, name: str, leeway: float) -> str:
    """An exp/nbf/iat value: tame, within the leeway (on its boundary at times: nbf == now + leeway is still valid);
    odd, on the other side of the boundary, a second either side, or of an odd type."""
    rng = draw.rng
    if not draw.odd(0.5):
        if name == "exp":
            value = rng.choice([NOW - leeway + 1, NOW + 3600])
        else:
            value = rng.choice([NOW + leeway, NOW - 60])
        return json.dumps(int(value) if rng.random() < 0.8 else float(value))
    edge = NOW - leeway if rng.random() < 0.5 else NOW + leeway
    near = edge + rng.choice([0, 0, 1, -1, 0.5, -0.5, 3600, -3600])
    shape = rng.choice(["int"] * 5 + ["float", "str", "bool", "huge", "odd"])
    if shape == "int":
        return json.dumps(int(near)) if float(near).is_integer() else json.dumps(near)
    if shape == "float":
        return json.dumps(near + rng.choice([0.25, 0.75, -0.25]))
    if shape == "str":
        return json.dumps(rng.choice([str(int(near)), f"{near:.1f}", "tomorrow", ""]))
    if shape == "bool":
        return rng.choice(["true", "false"])
    if shape == "huge":
        return rng.choice(["1e400", "-1e400", "1e308", str(10**40), str(-(10**40)), "NaN", "Infinity"])
    return rng.choice(["null", "[1800000000]", '{"t": 1800000000}', "-1", "0"])


ORG_VALUES: tuple[Any, ...] = (
    "org_a",
    "org_b",
    " org_c\t",
    "org\x00a",
    "org\x7f",
    "org\u200ba",
    "\u2028org_d\u2029",
    "soci\u00e9t\u00e9",
    "\ud83d\ude00",
    "",
    "   ",
    "x" * 255,
    "y" * 256,
    " " + "z" * 255 + " ",
    42,
    -7,
    0,
    10**254,
    10**255,
    True,
    False,
    1.0,
    1.5,
    [],
    ["org_a"],
    {"id": "org_a"},
    None,
)


def org_value(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return json.dumps(rng.choice(["org_a", "org_b", "org_c"]))
    if rng.random() < 0.15:  # a random string: any code point, some control ones
        text = "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x3000)])) for _ in range(8))
        return json.dumps(text)
    return json.dumps(rng.choice(ORG_VALUES))


class Config:
    """What a resolver checks besides the signature; passed alike to ``from_jwt_claim`` and to PyJWT."""

    def __init__(self, rng: random.Random) -> None:
        self.claim = rng.choice(["org_id", "org_id", "org.id", "tenant.org.id"])
        self.audience: str | list[str] | None = rng.choice([None, "billing", ["billing", "admin"]])
        self.issuer: str | list[str] | None = rng.choice(
            [None, "https://idp.test/", ["https://idp.test/", "https://eu/"]]
        )
        self.leeway: float | dt.timedelta = rng.choice([0, 0, 30, 0.5, dt.timedelta(seconds=30)])
        self.require: tuple[str, ...] = rng.choice([(), ("exp",), ("exp", "iat"), ("sub",)])

    @property
    def seconds(self) -> float:
        return self.leeway.total_seconds() if isinstance(self.leeway, dt.timedelta) else float(self.leeway)

    def options(self) -> dict[str, Any]:
        return {"audience": self.audience, "issuer": self.issuer, "leeway": self.leeway, "require": self.require}

    def __repr__(self) -> str:
        return f"Config({self.claim!r}, aud={self.audience!r}, iss={self.issuer!r}, {self.leeway!r}, {self.require})"


def draw_payload(draw: Draw, config: Config) -> str:
    """A payload: the org claim of any type, flat, nested, at its dotted name or repeated; time claims near the
    leeway's boundaries; audience, issuer, sub and jti as ``config`` accepts them, or (wild) of any value."""
    rng = draw.rng
    if draw.odd(0.03):
        return rng.choice(["[]", '"org_a"', "null", "{", '{"org_id": "org_a"'])
    members: list[tuple[str, str]] = []
    org = org_value(rng)
    path = config.claim.split(".")
    shape = rng.choice(["flat", "flat", "nested", "nested", "both", "null_then_nested", "missing", "repeated"])
    nested = org
    for name in reversed(path[1:]):
        nested = json_object([(name, nested)])
    if shape == "flat" or (shape == "nested" and len(path) == 1):
        members.append((config.claim, org))
    elif shape == "nested":
        members.append((path[0], nested))
    elif shape == "both":
        members += [(config.claim, org), (path[0], nested)]
    elif shape == "null_then_nested" and len(path) > 1:
        members += [(config.claim, "null"), (path[0], nested)]
    elif shape == "repeated":  # the last of a repeated name counts (json.loads, for both)
        members += [(config.claim, json.dumps("org_evil")), (config.claim, org)]
    for name in ("exp", "nbf", "iat"):
        if (name in config.require and not draw.odd(0.1)) or rng.random() < 0.4:
            members.append((name, time_value(draw, name, config.seconds)))
    accepted = [config.audience] if isinstance(config.audience, str) else config.audience
    if draw.odd():
        members.append(("aud", json.dumps(rng.choice(["", [], "other", ["other"], 5, [5], {"a": 1}, None]))))
    elif accepted:
        members.append(("aud", json.dumps(rng.choice([rng.choice(accepted), ["x", rng.choice(accepted)]]))))
    elif rng.random() < 0.2:
        members.append(("aud", json.dumps(rng.choice(["", []]))))  # (an empty audience is none)
    issuers = [config.issuer] if isinstance(config.issuer, str) else config.issuer
    if draw.odd():
        members.append(("iss", json.dumps(rng.choice(["https://evil/", "", 5, ["https://idp.test/"], None]))))
    elif issuers:
        members.append(("iss", json.dumps(rng.choice(issuers))))
    if draw.odd(0.2):
        members.append(("sub", json.dumps(rng.choice([17, None, ["u"], {"id": "u"}]))))
    elif "sub" in config.require or rng.random() < 0.8:
        members.append(("sub", json.dumps(rng.choice(["user_1", "user_2", " user_3 ", "", "u\x01"]))))
    if draw.odd(0.1):
        members.append(("jti", json.dumps(rng.choice(["j1", 5, None]))))
    rng.shuffle(members)
    return json_object(members)


def draw_header(draw: Draw, alg: str, kid: Any = "absent") -> str:
    """A JOSE header for ``alg``: the kid given (absent: maybe one of any value); wild, the alg repeated (the last
    counts) or absent, the kid repeated, crit and b64 members, jku/jwk members (ignored)."""
    rng = draw.rng
    members: list[tuple[str, str]] = []
    if draw.odd(0.1):
        members.append(("alg", json.dumps(rng.choice(["none", "HS256", "RS256"]))))  # (overridden below)
    if not draw.odd(0.05):
        members.append(("alg", json.dumps(alg)))
    if rng.random() < 0.7:
        members.append(("typ", json.dumps(rng.choice(["JWT", "at+jwt", "jwt"]))))
    if kid == "absent":
        kid = rng.choice([7, None, ["k1"]]) if draw.odd(0.15) else rng.choice(["absent", "absent", "k1", "", "k" * 300])
    if kid != "absent":
        if draw.odd(0.1):
            members.append(("kid", json.dumps("other-kid")))  # (the last kid counts)
        members.append(("kid", json.dumps(kid)))
    if draw.odd(0.15):
        members.append(("crit", json.dumps(rng.choice([["exp"], [], "b64", [1], ["b64"], ["kid"]]))))
    elif draw.odd(0.1):
        members += [("b64", "false"), ("crit", json.dumps(["b64"]))]
    if draw.odd(0.1):
        members += [("jku", json.dumps("https://evil/jwks")), ("jwk", json.dumps({"kty": "oct", "k": "AA"}))]
    return json_object(members)


def mangled(draw: Draw, token: str) -> str:
    """``token`` (wild) re-padded, with ``+/`` for ``-_``, cut, extended or with junk."""
    rng = draw.rng
    if not draw.odd(0.4):
        return token
    parts = token.split(".")
    index = rng.randrange(len(parts))
    how = rng.choice(["pad", "pad2", "std_alphabet", "drop_sig", "extra_segment", "junk", "space", "truncate"])
    if how == "pad":
        parts[index] += "="
    elif how == "pad2":
        parts[index] += "=" * (-len(parts[index]) % 4 or 4)
    elif how == "std_alphabet":
        parts[index] = parts[index].replace("-", "+").replace("_", "/")
    elif how == "drop_sig":
        parts = parts[:2]
    elif how == "extra_segment":
        parts.append(parts[-1])
    elif how == "junk":
        parts[index] += rng.choice(["!", "%3D", "\u00e9", "*"])
    elif how == "space":
        parts[index] = parts[index][:3] + " " + parts[index][3:]
    else:
        parts[index] = parts[index][:-1]
    return ".".join(parts)


def authorization(draw: Draw, token: str) -> list[tuple[bytes, bytes]]:
    """The Authorization header(s) carrying ``token``: the scheme in any case and spaced; wild, another scheme, a
    tab, none, or the header repeated (identically or not) or joined."""
    rng = draw.rng
    scheme = rng.choice(["Bearer"] * 5 + ["bearer", "BEARER", "bEaReR"])
    gap = rng.choice([" "] * 6 + ["  "])
    before, after = rng.choice(["", "", " "]), rng.choice(["", "", " "])
    if draw.odd():
        scheme = rng.choice(["Basic", "Token", "Bearer:", "", "Bearer\u00a0"])
    if draw.odd(0.15):
        gap, after = rng.choice(["\t", "", " \t", "\u00a0"]), rng.choice(["\t", "\u00a0", ","])
    raw = f"{before}{scheme}{gap}{token}{after}".encode()
    headers = [(b"authorization", raw)]
    if draw.odd(0.2):
        headers.append((b"authorization", rng.choice([raw, b"Bearer x.y.z", raw.upper(), raw + b" "])))
        rng.shuffle(headers)
    elif draw.odd(0.1):
        headers = [(b"authorization", raw + b", " + raw)]
    return headers


# ------------------------------------------------------------------------------------------------ the model


def model_id(value: object) -> str | None:
    """An id as ``_identity``'s docstring says ids are cleaned: a str (blanks stripped) or an int; empty, over 255
    characters or with control (non-printable) characters: none."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = value.strip() if isinstance(value, str) else str(value)
    return text if text and len(text) <= 255 and text.isprintable() else None


def model_claim(claims: Mapping[str, Any] | None, claim: str) -> str | None:
    """The claim of verified claims; a dotted name no claim has (or whose claim is null) reads the nested one."""
    if claims is None:
        return None
    value: Any = claims.get(claim)
    if value is None and "." in claim:
        value = claims
        for name in claim.split("."):
            value = value.get(name) if isinstance(value, Mapping) else None
    return model_id(value)


def model_bearer(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """RFC 6750's ``Bearer <token>``: one header value (repeated only identically), the scheme in any case, spaces
    around the token; anything else is no token."""
    values = {value for name, value in headers if name == b"authorization"}
    if len(values) != 1:
        return None
    raw = values.pop()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    scheme, _, token = text.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def pyjwt_claims(token: str, key: Any, algorithms: Sequence[str], config: Config) -> dict[str, Any] | None:
    """The oracle: PyJWT's own verdict, with the resolver's settings; anything PyJWT raises counts as refused."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=list(algorithms),
            options={"require": list(config.require)},
            audience=config.audience,
            issuer=config.issuer,
            leeway=config.leeway,
        )
    except Exception:  # (PyJWTError, or a crash of PyJWT's: then the resolver must not crash either)
        return None
    return claims


# ------------------------------------------------------------------------------------------------ the app


async def whoami(request: Request) -> Response:
    return JSONResponse({"org": get_current_org(request)})


APP = Starlette(routes=[Route("/whoami", whoami)])


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    fake_lago.add_plan("starter", amount_cents=0)
    return BillingSettings(api_url=fake_lago.base_url, api_key=fake_lago.api_key, retry_backoff=0.001)


@contextlib.asynccontextmanager
async def serving(resolver: Any, settings: BillingSettings, fake_lago: Any, seed: int) -> AsyncIterator[Any]:
    """The billing middleware over :data:`APP` with the seed's unresolved-org policy, and a client of it."""
    policy = [("allow", 401), ("reject", 401), ("reject", 403)][seed % 3]
    middleware = OrgBillingMiddleware(
        APP,
        settings=settings,
        transport=fake_lago.transport(),
        quota=None,
        resolve_org=resolver,
        on_unresolved=policy[0],
        unresolved_status=policy[1],
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:

            async def ask(headers: list[tuple[bytes, bytes]], expected: str | None, what: str) -> None:
                with anyio.fail_after(30):  # (a guard against a hang, not a timing assertion)
                    response = await client.get("/whoami", headers=headers)
                if expected is None and len({value for name, value in headers if name.lower() == b"authorization"}) > 1:
                    # sent twice with different values: refused whatever the policy (which one the app reads is not
                    # known, so neither is the org to bill)
                    assert response.status_code == 400, (what, response.status_code, response.text[:200])
                    assert response.json()["title"] == "Ambiguous credentials", what
                elif expected is None and policy[0] == "reject":
                    assert response.status_code == policy[1], (what, response.status_code, response.text[:200])
                    assert response.headers["content-type"].startswith("application/problem+json"), what
                    if policy[1] == 401:
                        assert response.headers["www-authenticate"].lower().startswith("bearer"), what
                else:
                    assert response.status_code == 200, (what, response.status_code, response.text[:200])
                    assert response.json() == {"org": expected}, what

            yield ask
    finally:
        await middleware.aclose()


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing at ERROR from the package: a resolver that raised (a refused token is a WARNING or DEBUG)."""
    errors = [r.getMessage()[:300] for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


# ------------------------------------------------------------------------------------------------ key=


class KeySetup:
    """A ``key=`` resolver: the key and algorithms it is given (PyJWT gets the same), the trusted signer, and the
    keys an attacker has (another key of each kind, the public key's text as an HMAC secret)."""

    def __init__(self, rng: random.Random, keys: Keys) -> None:
        kind = rng.choice(["hs", "rsa", "ec", "ed"])
        self.attackers: list[Any] = [keys.rsa[2], keys.ec[1], keys.ed[1], hashlib.sha512(b"other").hexdigest()]
        self.public_text: list[bytes] = []
        if kind == "hs":
            self.given: Any = SECRET
            self.algorithms = rng.choice([["HS256"], ["HS256", "HS512"], ["HS512", "RS256"]])
            self.signer: Any = SECRET.encode()
            self.own = ["HS256", "HS512"]
            return
        self.signer = {"rsa": keys.rsa[0], "ec": keys.ec[0], "ed": keys.ed[0]}[kind]
        text = pem(self.signer)
        self.given = text
        self.own = list(algs_of(self.signer))
        own = self.own
        self.algorithms = rng.choice([[own[0]], [own[0], "HS256"], [*own, "HS256"], ["HS256", *own]])
        self.public_text = [text.encode(), text.strip().encode(), text.replace("\n", "").encode()]

    def __repr__(self) -> str:
        return f"KeySetup({type(self.signer).__name__}, {self.algorithms})"


def draw_token(rng: random.Random, setup: KeySetup, config: Config) -> tuple[str, str, Draw]:
    """A token and how it was made: by the trusted signer (any of its kind's algorithms), another key, unsigned,
    HS256 with the public key's text (algorithm confusion), or garbage; then maybe mangled."""
    draw = Draw(rng)
    payload = draw_payload(draw, config)
    how = rng.choice(["trusted"] * 8 + ["attacker", "none", "confusion", "garbage"])
    if how == "trusted":
        alg = rng.choice(setup.own)
        token = signed(draw_header(draw, alg), payload, alg, setup.signer)
    elif how == "attacker":
        key = rng.choice(setup.attackers)
        alg = "HS256" if isinstance(key, str) else rng.choice(algs_of(key))
        token = signed(draw_header(draw, alg), payload, alg, key.encode() if isinstance(key, str) else key)
    elif how == "none":
        token = signed(draw_header(draw, rng.choice(["none", "None", "NONE", ""])), payload, None, None)
        token += rng.choice(["", "", "AAAA"])
    elif how == "confusion" and setup.public_text:
        token = signed(draw_header(draw, "HS256"), payload, "HS256", rng.choice(setup.public_text))
    else:
        how = "garbage"
        token = rng.choice(["abc", "a.b.c", "a.b", "....", "e30.e30.", b64(b"[1]") + ".e30.x", "\u00e9.\u00fc.\u00f1"])
    return mangled(draw, token), how, draw


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_tokens_resolve_exactly_as_pyjwt_verifies_them(
    seed: int, keys: Keys, fake_lago: Any, settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``key=`` resolver resolves a random bearer token's org (and another the sub) exactly when PyJWT, given the
    same key, algorithms, audience, issuer, leeway and require, accepts it, to its claim cleaned as documented; it
    never raises, and through the middleware an unresolved request gets the policy's 401/403."""
    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    rng = random.Random(seed)
    setup = KeySetup(rng, keys)
    config = Config(rng)
    org = from_jwt_claim(config.claim, key=setup.given, algorithms=setup.algorithms, **config.options())
    user = from_jwt_claim("sub", key=setup.given, algorithms=setup.algorithms, **config.options())
    accepted = collections.Counter[str]()
    async with serving(org, settings, fake_lago, seed) as ask:
        for step in range(TOKENS):
            token, how, draw = draw_token(rng, setup, config)
            headers = authorization(draw, token)
            received = model_bearer(headers)
            claims = None if received is None else pyjwt_claims(received, setup.given, setup.algorithms, config)
            if how != "trusted" and received == token:
                assert claims is None, ("PyJWT accepts a forged token", how, token)
            expected = model_claim(claims, config.claim)
            what = f"seed {seed} step {step}: {setup} {config} {how} {headers!r}"
            if step % 4 == 0:
                await ask(headers, expected, what)
            else:
                scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
                assert org(scope) == expected, (what, claims)
                assert user(scope) == model_claim(claims, "sub"), (what, claims)
            accepted[how if claims is not None else "refused"] += 1
    no_errors_logged(caplog)


# ------------------------------------------------------------------------------------------------ jwks_url=


@pytest.fixture(scope="module")
def jwks_endpoints() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


@pytest.fixture
def jwks_server(jwks_endpoints: JwksServer) -> Iterator[JwksServer]:
    yield jwks_endpoints.fresh()
    jwks_endpoints.release()  # (a handler still held lets go)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock(50_000.0)
    monkeypatch.setattr("lago_org_billing._jwks._clock", fake)
    return fake


class Entry:
    """A JWKS entry and what ``_jwks``'s docstring says of it: the key it verifies with (``None``: skipped, as
    ``use: enc``, symmetric, private, too weak or malformed entries are) and for which algorithms."""

    def __init__(self, jwk: object, private: Any = None, usable: bool = True) -> None:
        self.jwk = jwk
        self.private = private
        self.usable = usable and private is not None

    @property
    def kid(self) -> object:
        return self.jwk.get("kid") if isinstance(self.jwk, dict) else None

    def algs(self, allowed: Sequence[str]) -> list[str]:
        if not self.usable:
            return []
        declared = self.jwk.get("alg") if isinstance(self.jwk, dict) else None
        return [alg for alg in algs_of(self.private) if alg in allowed and declared in (None, alg)]


class JwksModel:
    """The key cache as ``_jwks``'s docstring tells it: fetched when cold or older than max_age, or for a token
    whose (kid, alg) is not cached, but never again within the refresh interval of the last attempt; a failed fetch
    (no answer, an error status, not a JWKS, no usable key) keeps the cached keys; the first entry of a repeated
    kid counts; a kid-less token verifies with the only usable key of a set that has exactly one."""

    def __init__(self, allowed: Sequence[str], interval: float, max_age: float) -> None:
        self.allowed = list(allowed)
        self.interval, self.max_age = interval, max_age
        self.attempted: float | None = None
        self.fetched: float | None = None
        self.cached: list[Entry] = []
        self.fetches = 0

    def fetch(self, now: float, served: list[Entry] | None) -> None:
        self.fetches += 1
        self.attempted = now
        usable = [entry for entry in served or () if entry.algs(self.allowed)]
        if usable:
            self.cached, self.fetched = usable, now

    def lookup(self, kid: object, alg: str) -> Any:
        if kid is None:
            only = self.cached[0] if len(self.cached) == 1 else None
            return only.private.public_key() if only is not None and alg in only.algs(self.allowed) else None
        for entry in self.cached:
            if entry.kid == kid and isinstance(entry.kid, str) and alg in entry.algs(self.allowed):
                return entry.private.public_key()
        return None

    def key_for(self, token: str, now: float, served: list[Entry] | None) -> Any:
        header = jose_header(token)
        if header is None:
            return None
        kid, alg = header.get("kid"), header.get("alg")
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)) or alg not in self.allowed:
            return None  # (refused before any fetch)
        due = self.attempted is None or now - self.attempted >= self.interval
        if due and (self.fetched is None or now - self.fetched >= self.max_age):
            self.fetch(now, served)
            due = False
        found = self.lookup(kid, alg)
        if found is None and due:
            self.fetch(now, served)
            found = self.lookup(kid, alg)
        return found


def jose_header(token: str) -> dict[str, Any] | None:
    segment = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


class Issuer:
    """An issuer over a seed's steps: the entries its JWKS serves (rotated, with odd entries added), how its
    endpoint answers, and the keys an attacker signs with."""

    def __init__(self, rng: random.Random, keys: Keys, weak: Any) -> None:
        self.rng = rng
        self.fresh: list[Any] = [keys.rsa[0], keys.ec[0], keys.ed[0], keys.rsa[1]]
        rng.shuffle(self.fresh)
        self.own = list(self.fresh)
        self.attackers: list[Any] = [keys.rsa[2], keys.ec[1], keys.ed[1]]
        self.odd: list[Any] = keys.odd
        self.weak = weak
        self.entries: list[Entry] = []
        self.kids = 0
        self.outage: str | None = None  # "500", "badjson", "notjwks", "drop"
        self.rotate()

    def new_kid(self) -> str:
        self.kids += 1
        return f"key-{self.kids}"

    def rotate(self) -> None:
        """A new key published (under a new kid, at times with its alg), the oldest usable one retired at times."""
        private = self.fresh.pop(0) if self.fresh else self.rng.choice(self.own)  # (later: a key again, new kid)
        jwk = {**jwk_of(private), "kid": self.new_kid(), "use": "sig"}
        if self.rng.random() < 0.3:
            jwk["alg"] = algs_of(private)[0]
        self.entries.append(Entry(jwk, private))
        usable = [entry for entry in self.entries if entry.usable]
        if len(usable) > 1 and self.rng.random() < 0.5:
            self.entries.remove(usable[0])

    def add_odd_entry(self) -> None:
        """An entry the key set must skip (or, for a repeated kid, not let override the first)."""
        rng = self.rng
        signer = rng.choice(self.odd)
        kid = self.new_kid()
        usable_kids = [entry.kid for entry in self.entries if entry.usable]
        kind = rng.choice(["enc", "ops", "oct", "private", "weak", "alg_list", "alg_other", "broken", "not_object",
                           "unknown_kty", "repeated_kid", "int_kid"])  # fmt: skip
        jwk: Any = {**jwk_of(signer), "kid": kid}
        entry = Entry(jwk, signer, usable=False)
        if kind == "enc":
            jwk["use"] = rng.choice(["enc", "ENC", ["sig"]])
        elif kind == "ops":
            jwk["key_ops"] = rng.choice([["encrypt"], "verify", ["sign"]])
        elif kind == "oct":
            entry.jwk = {"kty": "oct", "k": b64(b"k" * 32), "kid": kid, "alg": "HS256"}
        elif kind == "private":
            entry.jwk = {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.odd[0])), "kid": kid}
            entry.private = self.odd[0]
        elif kind == "weak":
            entry.jwk, entry.private = {**jwk_of(self.weak), "kid": kid}, self.weak
        elif kind == "alg_list":  # an alg that is no string: the entry skipped, not the whole set refused
            jwk["alg"] = rng.choice([[algs_of(signer)[0]], {"name": algs_of(signer)[0]}])
        elif kind == "alg_other":
            jwk["alg"] = rng.choice(["HS256", "RS512", "none"])
        elif kind == "broken":
            for member in ("n", "x", "y"):
                jwk.pop(member, None)
        elif kind == "not_object":
            entry.jwk = rng.choice(["key", 5, None, ["RSA"]])
        elif kind == "unknown_kty":
            jwk["kty"] = rng.choice(["oct2", "rsa", 5])
        elif kind == "repeated_kid" and usable_kids:  # another key under a published kid, after it: never used
            jwk["kid"] = rng.choice(usable_kids)
            entry = Entry(jwk, signer, usable=True)
        else:  # a usable key without a string kid: counts for kid-less tokens, never matched by kid
            jwk["kid"] = rng.choice([7, None])
            if jwk["kid"] is None:
                del jwk["kid"]
            entry = Entry(jwk, signer, usable=True)
        at = len(self.entries) if kind == "repeated_kid" else rng.randrange(len(self.entries) + 1)
        self.entries.insert(at, entry)

    def step(self) -> None:
        rng = self.rng
        event = rng.random()
        if event < 0.15:
            self.rotate()
        elif event < 0.25:
            self.add_odd_entry()
        elif event < 0.32:
            self.outage = rng.choice(["500", "badjson", "notjwks", "drop"])
        elif self.outage is not None and rng.random() < 0.4:
            self.outage = None

    def publish(self, server: JwksServer, path: str) -> list[Entry] | None:
        """Serve the current entries (or the outage); what a fetch now would get (``None``: nothing usable)."""
        if self.outage == "500":
            server.serve(path, b'{"error": "down"}', status=503)
        elif self.outage == "badjson":
            server.serve(path, self.rng.choice([b'{"keys": [', b"<html>", b"\xff\xfe", b""]))
        elif self.outage == "notjwks":
            server.serve(path, self.rng.choice([b"[]", b'{"keys": {}}', b'{"key": []}', b"null"]))
        elif self.outage == "drop":
            server.serve(path, b"", mode="drop")
        else:
            server.serve(path, json.dumps({"keys": [entry.jwk for entry in self.entries]}).encode())
            return self.entries
        return None

    def token(self, draw: Draw, config: Config, allowed: Sequence[str]) -> tuple[str, str]:
        """A token: by a published key under its kid (or none), by an odd entry's key, by an attacker (its own kid,
        or a published one), HS256 with a published key's PEM, unsigned, or garbage."""
        rng = self.rng
        payload = draw_payload(draw, config)
        published = [entry for entry in self.entries if entry.private is not None]
        how = rng.choice(["published"] * 6 + ["no_kid", "attacker", "forged_kid", "confusion", "none", "garbage"])
        if how in ("published", "no_kid", "forged_kid", "confusion", "none") and not published:
            how = "attacker"
        if how in ("published", "no_kid"):
            entry = rng.choice(published)
            alg = rng.choice(entry.algs(allowed) or algs_of(entry.private))
            kid = entry.kid if how == "published" and isinstance(entry.kid, str) else "absent"
            return signed(draw_header(draw, alg, kid), payload, alg, entry.private), how
        if how in ("attacker", "forged_kid"):
            signer = rng.choice(self.attackers)
            alg = rng.choice(algs_of(signer))
            kid = rng.choice(published).kid if how == "forged_kid" else f"kid-{rng.randrange(10**6)}"
            return signed(draw_header(draw, alg, kid), payload, alg, signer), how
        if how == "confusion":
            entry = rng.choice(published)
            secret = rng.choice([pem(entry.private).encode(), json.dumps(entry.jwk).encode()])
            return signed(draw_header(draw, "HS256", entry.kid), payload, "HS256", secret), how
        if how == "none":
            return signed(draw_header(draw, "none", rng.choice(published).kid), payload, None, None), how
        return rng.choice(["a.b.c", "e30.e30.", b64(b'{"alg":"RS256","kid":"k"}') + ".e30.AAAA"]), how


@pytest.fixture(scope="module")
def weak_rsa() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.mark.parametrize("seed", SEEDS)
async def test_random_tokens_against_a_local_jwks_resolve_as_pyjwt_and_fetch_as_documented(
    seed: int,
    keys: Keys,
    weak_rsa: Any,
    jwks_server: JwksServer,
    clock: Clock,
    fake_lago: Any,
    settings: BillingSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A ``jwks_url=`` resolver, over a JWKS on 127.0.0.1 that rotates keys, publishes entries to skip (``use:
    enc``, symmetric, private, weak, malformed, a repeated kid) and at times fails (error status, bad JSON, not a
    JWKS, a dropped connection), resolves a random token exactly as PyJWT verifies it with the key the documented
    cache picks, fetches the set exactly when that cache would, and never raises."""
    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    rng = random.Random(7_000 + seed)
    config = Config(rng)
    allowed = rng.choice([["RS256"], ["RS256", "ES256", "EdDSA"], ["ES256", "EdDSA"], ["RS256", "PS256", "EdDSA"]])
    interval = rng.choice([1.0, 60.0])
    max_age = rng.choice([interval, 3600.0])
    issuer = Issuer(rng, keys, weak_rsa)
    path = f"/{seed}/jwks.json"
    served = issuer.publish(jwks_server, path)
    model = JwksModel(allowed, interval, max_age)
    options = {"algorithms": allowed, "jwks_refresh_interval": interval, "jwks_max_age": max_age}
    org = from_jwt_claim(config.claim, jwks_url=jwks_server.url(path), **options, **config.options())
    async with serving(org, settings, fake_lago, seed) as ask:
        for step in range(JWKS_STEPS):
            issuer.step()
            served = issuer.publish(jwks_server, path)
            clock.now += rng.choice([0.0, 0.0, 0.5, interval, max_age + 1])
            draw = Draw(rng)
            token, how = issuer.token(draw, config, allowed)
            headers = authorization(draw, token)
            received = model_bearer(headers)
            key = None if received is None else model.key_for(received, clock.now, served)
            claims = None
            if key is not None and received is not None:
                claims = pyjwt_claims(received, key, [str(jose_header(received)["alg"])], config)  # type: ignore[index]
            if how not in ("published", "no_kid") and received == token:
                assert claims is None, ("PyJWT accepts a forged token", how, token)
            expected = model_claim(claims, config.claim)
            what = f"seed {seed} step {step}: {allowed} {config} {how} {issuer.outage} {headers!r}"
            if step % 3 == 0:
                await ask(headers, expected, what)
            else:
                found = org({"type": "http", "method": "GET", "path": "/", "headers": headers})
                if found is not None and not isinstance(found, str):
                    with anyio.fail_after(30):
                        found = await found
                assert found == expected, (what, claims)
            assert jwks_server.fetches[path] == model.fetches, ("fetches", what)
    no_errors_logged(caplog)


def token_for(private: Any, kid: str | None, org: str = "org_a") -> str:
    alg = algs_of(private)[0]
    header = {"alg": alg, **({"kid": kid} if kid is not None else {})}
    return signed(json.dumps(header), json.dumps({"org_id": org, "exp": NOW + 60}), alg, private)


async def resolve_all(resolver: Any, tokens: Sequence[str], gated: JwksServer | None = None) -> list[str | None]:
    """Resolve ``tokens`` concurrently, as concurrent requests do; with ``gated``, the JWKS answer is held until
    every request waits (the fetch in flight, the others behind it), then let go."""
    found: list[str | None] = [None] * len(tokens)

    async def one(index: int, token: str) -> None:
        result = resolver({"type": "http", "headers": [(b"authorization", f"Bearer {token}".encode())]})
        found[index] = result if result is None or isinstance(result, str) else await result

    with anyio.fail_after(30):  # (a guard against a hang, not a timing assertion)
        async with anyio.create_task_group() as group:
            for index, token in enumerate(tokens):
                group.start_soon(one, index, token)
            if gated is not None:
                await anyio.to_thread.run_sync(gated.arrived.wait, 30)
                await anyio.wait_all_tasks_blocked()
                gated.release()
    return found


async def test_concurrent_requests_with_unknown_kids_share_one_fetch(
    keys: Keys, jwks_server: JwksServer, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Concurrent requests with random unknown kids (and a cold cache) make one JWKS fetch between them, not one
    each; once it answered, more unknown kids fetch nothing within the refresh interval, and one burst after it
    fetches once again: the issuer is never stampeded by tokens anyone can forge."""
    issuer, attacker = keys.rsa[0], keys.rsa[2]
    path = "/stampede/jwks.json"
    jwks_server.serve(path, json.dumps({"keys": [{**jwk_of(issuer), "kid": "k1"}]}).encode(), mode="gate")
    org = from_jwt_claim("org_id", jwks_url=jwks_server.url(path), algorithms=["RS256"], jwks_refresh_interval=30)
    forged = [token_for(attacker, f"kid-{n}", "org_evil") for n in range(20)]
    genuine = [token_for(issuer, "k1", f"org_{n}") for n in range(5)]

    assert await resolve_all(org, forged + genuine, gated=jwks_server) == [None] * 20 + [f"org_{n}" for n in range(5)]
    assert jwks_server.fetches[path] == 1
    assert await resolve_all(org, [token_for(attacker, f"again-{n}") for n in range(20)]) == [None] * 20
    assert jwks_server.fetches[path] == 1
    clock.now += 30
    jwks_server.hold()
    burst = [token_for(attacker, f"later-{n}") for n in range(20)]
    assert await resolve_all(org, burst, gated=jwks_server) == [None] * 20
    assert jwks_server.fetches[path] == 2
    no_errors_logged(caplog)


async def test_a_jwks_slower_than_the_fetch_deadline_leaves_requests_unresolved_and_is_not_refetched_at_once(
    keys: Keys, jwks_server: JwksServer, clock: Clock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A JWKS that does not answer within the fetch deadline leaves the concurrent cold requests unresolved (no
    exception) after one fetch, and the requests after them are refused at once within the refresh interval,
    without another fetch; the failure is logged once at WARNING."""
    monkeypatch.setattr("lago_org_billing._jwks._DEADLINE", 0.2)
    path = "/slow/jwks.json"
    jwks_server.serve(path, json.dumps({"keys": [{**jwk_of(keys.rsa[0]), "kid": "k1"}]}).encode(), mode="gate")
    org = from_jwt_claim("org_id", jwks_url=jwks_server.url(path), algorithms=["RS256"])
    tokens = [token_for(keys.rsa[0], "k1") for _ in range(5)]
    assert await resolve_all(org, tokens) == [None] * 5  # (the gate stays shut: the deadline ends the fetch)
    assert await resolve_all(org, tokens) == [None] * 5
    assert jwks_server.fetches[path] == 1
    said = [r for r in caplog.records if "Could not fetch the JWKS" in r.getMessage()]
    assert len(said) == 1 and "within 0.2 s" in said[0].getMessage() and said[0].levelno == logging.WARNING
    no_errors_logged(caplog)


async def test_an_unreachable_jwks_answers_the_policy_status_not_an_error(
    keys: Keys, clock: Clock, fake_lago: Any, settings: BillingSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """With the JWKS on a port nothing listens on, a request with a good token is unresolved (the 401 of the
    reject policy), never a 500 or an exception logged at ERROR."""
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    org = from_jwt_claim("org_id", jwks_url=f"http://127.0.0.1:{port}/jwks.json", algorithms=["RS256"])
    async with serving(org, settings, fake_lago, seed=1) as ask:
        for _ in range(3):
            await ask([(b"authorization", f"Bearer {token_for(keys.rsa[0], 'k1')}".encode())], None, "unreachable")
    said = [r for r in caplog.records if "Could not fetch the JWKS" in r.getMessage()]
    assert len(said) == 1 and "ConnectError" in said[0].getMessage()
    no_errors_logged(caplog)


async def test_a_jwks_entry_whose_alg_is_not_a_string_is_skipped_not_the_whole_set(
    keys: Keys, jwks_server: JwksServer, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A JWKS entry whose ``alg`` is a list or an object is skipped, as other malformed entries are; it used to be
    hashed as a dict key, so the TypeError failed the whole fetch and no token of any kid verified."""
    caplog.set_level(logging.DEBUG, logger="lago_org_billing")
    good = {**jwk_of(keys.rsa[0]), "kid": "good"}
    for odd_alg in (["RS256"], {"name": "RS256"}):
        path = f"/alg-{type(odd_alg).__name__}/jwks.json"
        odd = {**jwk_of(keys.odd[0]), "kid": "odd", "alg": odd_alg}
        jwks_server.serve(path, json.dumps({"keys": [odd, good]}).encode())
        org = from_jwt_claim("org_id", jwks_url=jwks_server.url(path), algorithms=["RS256"])
        assert await resolve_all(org, [token_for(keys.rsa[0], "good"), token_for(keys.odd[0], "odd")]) == [
            "org_a",
            None,
        ]
        assert jwks_server.fetches[path] == 1
    assert not [r for r in caplog.records if "Could not fetch the JWKS" in r.getMessage()]
    assert any("not an algorithm name" in r.getMessage() for r in caplog.records)
