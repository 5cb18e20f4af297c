"""The issuer's JSON Web Key Set for :func:`~lago_org_billing.from_jwt_claim` (``jwks_url=``): fetched with httpx,
asynchronously (never blocking the event loop), its usable keys cached by ``kid``.

A token whose ``kid`` is not cached makes the set be fetched again, at most once per ``refresh_interval`` (at least 1 s:
anyone can send tokens with random kids); the set is also fetched again when a token comes after ``max_age`` (at least
the interval). Concurrent requests share the fetch in flight, which runs in a task of its own: a request cancelled while
it waits (a timeout, a client gone) neither cancels nor repeats it. A failed fetch keeps the cached keys (logged once
until a fetch succeeds). A fetch is bounded: redirects are never followed (not even by a ``jwks_client`` that follows
them: to plain http or another host, whoever answers there would choose the keys), the answer is read up to
:data:`_MAX_BYTES` (decoded) and must be complete within :data:`_DEADLINE` seconds (a server that drips its answer keeps
every read under httpx's per-read timeout, and a request waits for the fetch). Only public signature keys of the allowed
algorithms are kept: symmetric (``oct``) keys, private keys, ``use: enc`` keys, unknown kinds and keys too weak to trust
(RSA under 2048 bits: a WARNING per fetch) are skipped, so an HMAC algorithm never verifies with a published key (the
algorithm-confusion attack).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import math
import ssl
import time
import urllib.parse
import zlib
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import anyio
import anyio.to_thread
import httpx

try:
    import jwt
except ImportError:  # (the webhooks extra: from_jwt_claim says which to install before this module is used)
    jwt = None  # type: ignore[assignment]

from ._errors import ConfigurationError
from ._identity import _first_time, _jwt_key_fits, _jwt_refused, _jwt_weakness, _refusals_said
from ._settings import masked_url

logger = logging.getLogger("lago_org_billing.identity")

#: The clock of the cache (a module attribute: tests move it).
_clock = time.monotonic

#: Timeout of a fetch with the built-in client (a request waits for the first one).
_TIMEOUT = httpx.Timeout(5.0)

#: Seconds a whole fetch may take, whatever the client (read when fetching: tests shorten it).
_DEADLINE = 10.0

#: Bytes of a JWKS answer read at most, once decoded (a JWKS is a few KB; a gzip bomb expands a thousandfold).
_MAX_BYTES = 1 << 20

#: A JWK member that only a private key has.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")

#: Returned by :meth:`JwksKeys.find` when the set must be fetched first.
FETCH: Any = object()

_UNPARSED: Any = object()


class _FetchError(Exception):
    """A JWKS answer that cannot be used (the message says why)."""


_TOO_LARGE = (
    f"the answer is larger than {_MAX_BYTES >> 10} KiB, which no key set is (a JWKS is a few KB): check that jwks_url "
    "is your issuer's jwks_uri"
)


def check_url(url: object) -> str:
    """``jwks_url`` of :func:`from_jwt_claim`: an https URL, or http on a loopback host (a local test issuer)."""
    example = "https://YOUR_ISSUER/.well-known/jwks.json (the jwks_uri of its /.well-known/openid-configuration)"
    shown = masked_url(url) if isinstance(url, str) else url  # (in the errors: a password in it masked)
    parsed = None
    if isinstance(url, str):
        try:
            parsed = urllib.parse.urlsplit(url.strip())
            host = parsed.hostname
        except ValueError:
            parsed = None
    if parsed is not None and host:
        # (what could never be fetched: every token unresolved at run time, said only in a log)
        try:
            port = parsed.port
            httpx.URL(str(url).strip())
        except (ValueError, httpx.InvalidURL):
            port = 0
        if port == 0 or any(char.isspace() or not char.isprintable() for char in str(url).strip()):
            raise ConfigurationError(
                f"from_jwt_claim(jwks_url={shown!r}) cannot be fetched (its port or host is not valid, or it holds a "
                f"blank): pass the issuer's jwks_uri as it is written, such as {example}."
            )
    if parsed is None or parsed.scheme not in ("https", "http") or not host:
        raise ConfigurationError(
            f"from_jwt_claim(jwks_url=...) takes the https URL of the issuer's JWKS, such as {example}; got {shown!r}."
        )
    if parsed.scheme == "http" and not _loopback(host):
        raise ConfigurationError(
            f"from_jwt_claim(jwks_url={shown!r}) must be an https URL: fetched over plain http, anyone on the network "
            "path could substitute their own key and sign tokens for any org. http is accepted only on a loopback "
            f"host (localhost, 127.0.0.1, ::1: a local test issuer). Pass {example}."
        )
    return str(url).strip()


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # (127.0.0.1 written as an IPv4-mapped IPv6 address, ``[::ffff:127.0.0.1]``, is as loopback as itself: Python 3.13's
    # ``is_loopback`` says so, 3.10's and 3.11's did not, so that the same jwks_url was refused there)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


#: The shortest ``jwks_refresh_interval``: a token with an unknown ``kid`` fetches the set when the last fetch is older
#: than the interval, and anyone can send tokens with random kids (below a second, that is a fetch per request).
MIN_REFRESH_INTERVAL = 1.0


def check_intervals(refresh_interval: object, max_age: object) -> tuple[float, float]:
    """``jwks_refresh_interval`` and ``jwks_max_age`` of :func:`from_jwt_claim`, in seconds: finite numbers (not
    bools, not strings), the interval at least :data:`MIN_REFRESH_INTERVAL`, the maximum age at least the interval
    (the set is never fetched more often than that, so a shorter age could not be honoured)."""
    interval = _seconds("jwks_refresh_interval", refresh_interval, "60", positive=False)
    if interval < MIN_REFRESH_INTERVAL:
        raise ConfigurationError(
            f"from_jwt_claim(jwks_refresh_interval={refresh_interval!r}) must be at least {MIN_REFRESH_INTERVAL:g} s: "
            "it bounds how often a token with an unknown kid fetches the JWKS again, and anyone can send tokens with "
            "random kids, so a shorter interval fetches the issuer's JWKS on nearly every such request (each one "
            "waiting for it). Pass e.g. jwks_refresh_interval=60 (the default)."
        )
    age = _seconds("jwks_max_age", max_age, "3600")
    if age < interval:
        raise ConfigurationError(
            f"from_jwt_claim(jwks_max_age={max_age!r}) is shorter than jwks_refresh_interval={refresh_interval!r}: the "
            "JWKS is never fetched more often than the refresh interval, so the keys would be kept longer than asked. "
            "Pass a jwks_max_age >= jwks_refresh_interval (e.g. 3600, the default), or lower the interval."
        )
    return interval, age


def _seconds(option: str, value: object, example: str, *, positive: bool = True) -> float:
    """``value`` as seconds: a finite number (not a bool or a string), > 0 (``positive``) or >= 0."""
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
    ):
        return float(value)
    raise ConfigurationError(
        f"from_jwt_claim({option}=...) takes seconds (a finite number {'>' if positive else '>='} 0, not a string), "
        f"got {value!r}; pass e.g. {option}={example}."
    )


class JwksKeys:
    """The usable keys of one JWKS URL, by ``(kid, alg)``; shared by the resolvers with the same settings."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient | None,
        algorithms: dict[str, Any],
        refresh_interval: float,
        max_age: float,
    ) -> None:
        self.url = url
        # As logs show it: a password in the URL (a JWKS behind Basic auth, which httpx sends from it) masked.
        self.shown = masked_url(url)
        self._client = client
        self._algorithms = algorithms  # allowed name -> PyJWT implementation (asymmetric ones only)
        self._interval = refresh_interval
        self._max_age = max_age
        self._keys: dict[tuple[str, str], Any] = {}
        self._single: dict[str, Any] = {}  # alg -> key, when the set has exactly one usable key (kid-less tokens)
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last fetch started (and not cancelled by its loop's end)
        self._in_flight: anyio.Event | None = None
        self._task: asyncio.Task[None] | None = None  # the fetch in flight, on asyncio
        self._failures = 0
        self._ssl: ssl.SSLContext | None = None
        self._headers: dict[str, tuple[str | None, str] | None] = {}  # token header segment -> (kid, alg)

    # ------------------------------------------------------------------------------------------- lookup (sync)

    def find(self, token: str, *, fetch: bool = True) -> Any:
        """``(key, alg)`` to verify ``token`` with; :data:`FETCH` when the set must be fetched first (cold, stale, or
        an unknown kid and the last fetch is older than the interval); ``None`` when refused (logged)."""
        segment = token.partition(".")[0]
        header = self._headers.get(segment, _UNPARSED)
        if header is _UNPARSED:
            header = _parse_header(segment)
            if len(self._headers) >= 256:  # bounded: the issuer's few headers, not every forged one
                self._headers.clear()
            self._headers[segment] = header
        if header is None:
            _jwt_refused(jwt, jwt.DecodeError("Invalid token header"), source="jwks_url")
            return None
        kid, alg = header
        if alg not in self._algorithms:
            _jwt_refused(jwt, jwt.InvalidAlgorithmError("The specified alg value is not allowed"), source="jwks_url")
            return None
        now = _clock()
        due = self._attempted_at is None or now - self._attempted_at >= self._interval
        if fetch and due and (self._fetched_at is None or now - self._fetched_at >= self._max_age):
            return FETCH
        key = self._keys.get((kid, alg)) if kid is not None else self._single.get(alg)
        if key is not None:
            return key, alg
        if fetch and (due or self._in_flight is not None):  # (one in flight: wait for it)
            return FETCH
        self._unknown(kid, alg)
        return None

    def _unknown(self, kid: str | None, alg: str) -> None:
        said = "kid" if kid is not None else "no kid"
        if said in _refusals_said:
            logger.debug("Bearer token refused: kid %.100r (%s) is not in the JWKS at %s.", kid, alg, self.shown)
            return
        _refusals_said.add(said)
        if kid is None:
            reason = "it has no kid, and the JWKS has not exactly one usable key"
        elif self._fetched_at is None:
            reason = f"its kid {kid!r:.100} cannot be checked: the JWKS could not be fetched yet"
        else:  # (a kid is the client's: shown cut to 100 characters)
            reason = (
                f"its kid {kid!r:.100} ({alg}) is not among the JWKS's usable keys {sorted({k for k, _ in self._keys})}"
            )
        logger.warning(
            "A bearer token was refused by from_jwt_claim: %s (%s; fetched again at most every %g s for an unknown "
            "kid). Check that jwks_url is your issuer's jwks_uri and algorithms the ones it signs with. Later "
            "refusals of this kind are logged at DEBUG.",
            reason,
            self.shown,
            self._interval,
        )

    # ------------------------------------------------------------------------------------------- fetch (async)

    async def refresh(self) -> None:
        """Fetch the set, unless a fetch is in flight (wait for it) or one started less than the interval ago.
        Never raises for a failed fetch (the cached keys stay).

        The fetch runs in a task of the event loop's, not in the request that needed it: cancelling a waiter (a
        timeout middleware, a client gone from a server that cancels) only ends that request's wait, so the fetch
        still answers the requests left waiting and stays the interval's one attempt. Run in the request, its
        cancellation had to either give the attempt back, and requests cancelled one after another fetched once
        each (anyone can send unknown kids and hang up), or keep it, and those waiting lost the keys. Counting the
        waiters would still fetch again when one takes over, and hold it past the deadline of the first fetch; a task
        needs no such hand-over, and ends by :data:`_DEADLINE`, so nobody waits longer than that."""
        in_flight = self._in_flight
        if in_flight is None:
            now = _clock()
            if self._attempted_at is not None and now - self._attempted_at < self._interval:
                return
            in_flight = self._in_flight = anyio.Event()
            previous, self._attempted_at = self._attempted_at, now
            self._spawn(self._fetch_for_all, in_flight, previous)
        await in_flight.wait()

    def _spawn(self, fetch: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # trio (hypercorn -k trio): a system task, cancelled as trio.run() ends
            import trio

            trio.lowlevel.spawn_system_task(fetch, *args, name="lago-org-billing JWKS fetch")
            return
        # (asyncio keeps a weak reference to a task only: held until it ends)
        self._task = loop.create_task(fetch(*args), name="lago-org-billing JWKS fetch")

    async def _fetch_for_all(self, in_flight: anyio.Event, previous: float | None) -> None:
        done = False
        try:
            await self._fetch()
            done = True
        finally:
            if not done:  # cancelled: only as its event loop ends, so the attempt is given back (the next loop fetches)
                self._attempted_at = previous
            self._in_flight = None
            self._task = None
            in_flight.set()

    async def _fetch(self) -> None:
        try:
            try:
                with anyio.fail_after(_DEADLINE):
                    status, where, body = await self._get()
            except TimeoutError:
                raise _FetchError(f"no complete answer within {_DEADLINE:g} s") from None
            if status != 200:
                moved = (
                    f" redirecting to {where[:200]} (never followed: pass the URL it points to as jwks_url, if it is "
                    "your issuer's https jwks_uri)"
                    if where
                    else ""
                )
                raise _FetchError(f"HTTP {status}{moved}")
            try:
                data = json.loads(body)
            except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
                raise _FetchError(f"the answer is not JSON ({str(exc)[:200]})") from None
            keys, single = self._load(data)
        except Exception as exc:  # httpx's errors, a bad answer: the cached keys stay
            self._failed(exc)
            return
        self._keys, self._single = keys, single
        self._fetched_at = _clock()
        if self._failures:
            logger.info("JWKS at %s fetched again after %d failed attempt(s).", self.shown, self._failures)
            self._failures = 0
        logger.debug("JWKS at %s fetched: %d usable key(s).", self.shown, len({k for k, _ in keys}))

    async def _get(self) -> tuple[int, str | None, bytes]:
        """``(status, location, body)`` of the JWKS URL; the body of a 200 only, at most :data:`_MAX_BYTES`."""
        if self._client is not None:
            return await self._read(self._client)
        if self._ssl is None:  # (loading the CA bundle reads files: done once, off the event loop)
            self._ssl = await anyio.to_thread.run_sync(httpx.create_ssl_context)
        async with httpx.AsyncClient(verify=self._ssl, timeout=_TIMEOUT, follow_redirects=False) as client:
            return await self._read(client)

    async def _read(self, client: httpx.AsyncClient) -> tuple[int, str | None, bytes]:
        # (not compressed: a JWKS is a few KB; an answer compressed anyway is inflated within the bound, never whole:
        # httpx inflates each chunk whole, and a few hundred bytes compressed twice are any size)
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        async with client.stream("GET", self.url, headers=headers, follow_redirects=False) as response:
            if response.status_code != 200:
                return response.status_code, response.headers.get("location"), b""
            if response.is_stream_consumed:  # (made whole, and inflated, before it came: a test's MockTransport)
                whole = response.content
                if len(whole) > _MAX_BYTES:
                    raise _FetchError(_TOO_LARGE)
                return 200, None, whole
            encoding = response.headers.get("content-encoding", "")
            codings = [c.strip().lower() for c in encoding.split(",") if c.strip().lower() not in ("", "identity")]
            if len(codings) > 1 or (codings and codings[0] not in ("gzip", "x-gzip", "deflate")):
                raise _FetchError(
                    f"the answer is encoded {encoding!r}, which a key set is not sent in (identity was asked for; "
                    "gzip or deflate are read): check that jwks_url is your issuer's jwks_uri"
                )
            inflater = zlib.decompressobj(zlib.MAX_WBITS | 32) if codings else None  # (a gzip or zlib header)
            body = bytearray()
            async for chunk in response.aiter_raw():
                if inflater is not None:
                    try:
                        chunk = inflater.decompress(chunk, _MAX_BYTES + 1 - len(body))
                    except zlib.error as exc:
                        raise _FetchError(f"the answer's {codings[0]} encoding is damaged ({exc})") from None
                body += chunk
                if len(body) > _MAX_BYTES:
                    raise _FetchError(_TOO_LARGE)
            return 200, None, bytes(body)

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, httpx.HTTPError) and not isinstance(exc, httpx.HTTPStatusError):
            reason = f"{type(exc).__name__}: {reason}"
        if self._failures > 1:
            logger.debug("Could not fetch the JWKS at %s again (%s).", self.shown, reason)
            return
        cached = len({k for k, _ in self._keys})
        logger.warning(
            "Could not fetch the JWKS at %s (%s): tokens whose kid is cached (%d key(s)) still verify, tokens with "
            "another kid are unresolved until a fetch succeeds; fetched again at most every %g s when a token needs "
            "it. Check jwks_url (your issuer's jwks_uri) and that it is reachable. Logged once until a fetch "
            "succeeds.",
            self.shown,
            reason,
            cached,
            self._interval,
        )

    def _load(self, data: object) -> tuple[dict[tuple[str, str], Any], dict[str, Any]]:
        if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
            raise _FetchError("the answer is not a JWKS (a JSON object with a 'keys' list)")
        keys: dict[tuple[str, str], Any] = {}
        usable: list[dict[str, Any]] = []
        skipped: list[str] = []
        weak: list[str] = []
        for jwk in data["keys"]:
            loaded = self._load_key(jwk, skipped, weak)
            if not loaded:
                continue
            usable.append(loaded)
            kid = jwk.get("kid")
            if isinstance(kid, str):
                for alg, key in loaded.items():
                    keys.setdefault((kid, alg), key)  # (the first of a kid repeated, as PyJWT's PyJWKClient)
        if skipped:
            logger.debug("JWKS at %s: skipped %s.", self.shown, "; ".join(skipped))
        if weak:  # (once per fetch: the issuer's to fix, and a risk while it publishes them)
            logger.warning(
                "The JWKS at %s publishes key(s) too weak to trust (%s): skipped, tokens signed with them are refused. "
                "Whoever factors such a key signs tokens for any org: have the issuer rotate to RSA keys of 2048 bits "
                "or more (or EC keys). Logged on each fetch while it publishes them.",
                self.shown,
                "; ".join(weak),
            )
        if not usable:
            raise _FetchError(
                f"no key usable with algorithms {list(self._algorithms)} ({'; '.join(skipped) or 'no keys'}): pass "
                "from_jwt_claim(algorithms=[...]) the algorithm(s) your issuer signs with"
            )
        return keys, usable[0] if len(usable) == 1 else {}

    def _load_key(self, jwk: object, skipped: list[str], weak: list[str]) -> dict[str, Any] | None:
        """``{alg: public key}`` for the allowed algorithms ``jwk`` verifies with; ``None`` (reason in ``skipped``)
        for an entry that cannot verify a token, or must not (a key too weak: in ``weak`` too)."""
        if not isinstance(jwk, Mapping):
            skipped.append("an entry that is not a JSON object")
            return None
        name = f"kid {jwk.get('kid')!r}"
        kty, use, ops, alg = jwk.get("kty"), jwk.get("use"), jwk.get("key_ops"), jwk.get("alg")
        if use is not None and use != "sig":
            skipped.append(f"{name}: use {use!r}")
            return None
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            skipped.append(f"{name}: key_ops {ops!r} without 'verify'")
            return None
        if kty == "oct":  # a secret published is no secret: an HMAC key from a JWKS lets anyone sign
            skipped.append(f"{name}: a symmetric (kty 'oct') key, never used from a public JWKS")
            return None
        if kty not in ("RSA", "EC", "OKP"):
            skipped.append(f"{name}: kty {kty!r}, not a signature key kind (RSA, EC, OKP)")
            return None
        if any(member in jwk for member in _PRIVATE_MEMBERS):
            if _first_time(("jwks private key", f"{self.url} {jwk.get('kid')}")):
                logger.warning(
                    "The JWKS at %s publishes a PRIVATE key (%s): skipped. Anyone who reads that URL can sign tokens "
                    "with it: have the issuer rotate it, or check that jwks_url is its public jwks_uri.",
                    self.shown,
                    name,
                )
            skipped.append(f"{name}: a private key")
            return None
        if alg is not None and not isinstance(alg, str):  # (a list or object: unhashable, it failed the whole set)
            skipped.append(f"{name}: alg {alg!r:.100}, not an algorithm name")
            return None
        if alg is not None and alg not in self._algorithms:
            skipped.append(f"{name}: alg {alg!r} not in algorithms")
            return None
        loaded: dict[str, Any] = {}
        problem: str | None = None
        for candidate in (alg,) if alg is not None else self._algorithms:
            implementation = self._algorithms[candidate]
            try:
                key = implementation.from_jwk(dict(jwk))
            except Exception:  # InvalidKeyError, a malformed member: not a key of this kind
                continue
            usable, private, prepared = _jwt_key_fits(implementation, candidate, key)
            if usable and not private and prepared is not None and not isinstance(prepared, bytes):
                problem = problem or _jwt_weakness(implementation, candidate, prepared)
                loaded[candidate] = prepared
        if problem is not None:  # (PyJWT would verify with it, warning on every token)
            said = f"{name}: {problem}"
            skipped.append(said)
            weak.append(said)
            return None
        if not loaded:
            crv = jwk.get("crv")
            skipped.append(f"{name}: a {kty}{f' {crv}' if crv else ''} key fits none of the algorithms")
        return loaded or None


def _parse_header(segment: str) -> tuple[str | None, str] | None:
    """``(kid, alg)`` of a JWT's header segment; ``None`` when malformed."""
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, TypeError, binascii.Error, RecursionError):  # (JSON nested thousands deep: anyone sends it)
        return None
    if not isinstance(header, dict):
        return None
    kid, alg = header.get("kid"), header.get("alg")
    if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
        return None
    return kid, alg
