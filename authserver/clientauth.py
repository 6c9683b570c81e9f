"""Client authentication at the token, introspection and revocation endpoints.

``client_secret_basic`` (RFC 6749 2.3.1), ``client_secret_post`` and
``private_key_jwt`` (RFC 7523 2.2, OIDC Core 9); exactly one per request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import httpx
import jwt

from authserver.config import AuthMethod, AuthServerConfig, ClientConfig
from authserver.errors import OAuthError, invalid_client, invalid_request
from authserver.forms import Form
from authserver.store import Store, StoreWorker
from tokengate.jsonlog import log_event
from tokengate.jwk import JWT_DECODE_ERRORS, PublicKey, is_numeric_date, load_public_jwk

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME = 3600  # a client assertion's exp may be at most this far ahead
MAX_JWKS_BYTES = 64 * 1024
JWKS_UNAVAILABLE = "jwks_unavailable"  # the client's jwks_uri failed: not the client's guess


@dataclass(frozen=True, slots=True)
class AuthenticatedClient:
    client: ClientConfig
    method: AuthMethod


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request presents to authenticate, unverified: one method and the
    client_id it claims (what throttling counts failures against)."""

    method: AuthMethod
    client_id: str
    basic: bool
    secret: str = field(repr=False, default="")
    assertion: str = field(repr=False, default="")
    assertion_header: dict[str, Any] = field(repr=False, default_factory=dict)


class ClientAuthenticator:
    def __init__(
        self,
        config: AuthServerConfig,
        store: Store,
        fetcher: ClientKeyFetcher,
        io: StoreWorker,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clients = {c.client_id: c for c in config.clients}
        self.leeway = config.leeway
        self.store = store
        self.io = io  # store calls run here, off the event loop
        self.fetcher = fetcher
        self.clock = clock

    def is_client(self, client_id: object) -> bool:
        """Whether ``client_id`` names a configured client (only those are logged)."""
        return isinstance(client_id, str) and client_id in self.clients

    def credentials(self, authorization: bytes | None, form: Form) -> Credentials:
        """The one authentication method the request uses, and the client_id it claims.

        Raises :class:`OAuthError`: ``invalid_request`` for a malformed request (two
        methods), ``invalid_client`` for absent or unreadable credentials.
        """
        used = [
            name
            for name, present in (
                ("client_secret_basic", authorization is not None),
                ("client_secret_post", form.get("client_secret") is not None),
                (
                    "private_key_jwt",
                    form.get("client_assertion") is not None
                    or form.get("client_assertion_type") is not None,
                ),
            )
            if present
        ]
        if len(used) > 1:
            raise invalid_request(
                "use exactly one client authentication method, not " + " and ".join(used)
            )
        if not used:
            raise invalid_client("no_credentials", client_id=form.get("client_id"))
        if used[0] == "client_secret_basic":
            assert authorization is not None
            client_id, secret = parse_basic(authorization)
            if form.get("client_id") not in (None, client_id):
                raise invalid_client("client_id_mismatch", basic=True, client_id=client_id)
            return Credentials("client_secret_basic", client_id, True, secret=secret)
        if used[0] == "client_secret_post":
            client_id = form.get("client_id")
            if client_id is None:
                raise invalid_request("client_id is required with client_secret")
            return Credentials(
                "client_secret_post", client_id, False, secret=form.get("client_secret") or ""
            )
        return _assertion_credentials(form)

    async def verify(self, credentials: Credentials, audiences: list[str]) -> AuthenticatedClient:
        """Check the credentials against the client's configuration.

        ``audiences`` are the values a client assertion's ``aud`` may name (the
        endpoint URL, the token endpoint, the issuer). Raises ``invalid_client``.
        """
        if credentials.method == "private_key_jwt":
            client = await self._check_assertion(credentials, audiences)
        else:
            client = self._lookup(credentials)
            if not client.secret_matches(credentials.secret):
                raise _failed("wrong_secret", credentials)
        return AuthenticatedClient(client, credentials.method)

    def _lookup(self, credentials: Credentials) -> ClientConfig:
        client = self.clients.get(credentials.client_id)
        if client is None:
            raise _failed("unknown_client", credentials)
        if credentials.method not in client.auth_methods:
            raise _failed("method_not_allowed", credentials)
        return client

    async def _check_assertion(
        self, credentials: Credentials, audiences: list[str]
    ) -> ClientConfig:
        client = self._lookup(credentials)
        client_id = client.client_id
        alg = credentials.assertion_header.get("alg")
        kid = credentials.assertion_header.get("kid")
        key = await self._assertion_key(client, alg, kid)
        if key is None:
            raise _failed("assertion_key_unknown", credentials)
        try:
            claims = jwt.decode(
                credentials.assertion,
                key.key,
                algorithms=[str(alg)],
                audience=audiences,
                issuer=client_id,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "sub", "aud", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise _failed("assertion_expired", credentials) from None
        except jwt.InvalidAudienceError:
            raise _failed("assertion_audience", credentials) from None
        except JWT_DECODE_ERRORS:
            raise _failed("assertion_invalid", credentials) from None
        exp, jti = claims["exp"], claims["jti"]
        if not is_numeric_date(exp):
            raise _failed("assertion_invalid", credentials)
        if exp > self.clock() + MAX_ASSERTION_LIFETIME + self.leeway:
            raise _failed("assertion_lifetime", credentials)
        if not isinstance(jti, str) or not 0 < len(jti) <= 256:
            raise _failed("assertion_jti", credentials)
        remembered = await self.io.call(
            self.store.remember_assertion, client_id, jti, int(exp) + self.leeway
        )
        if not remembered:
            raise _failed("assertion_replayed", credentials)
        return client

    async def _assertion_key(
        self, client: ClientConfig, alg: object, kid: object
    ) -> PublicKey | None:
        if not isinstance(alg, str) or not (kid is None or isinstance(kid, str)):
            return None
        if client.jwks_uri is None:
            return _select(client.jwks, alg, kid)
        key = _select(await self.fetcher.keys(client), alg, kid)
        if key is None:  # maybe the client rotated: refetch, rate-limited
            key = _select(await self.fetcher.keys(client, refresh=True), alg, kid)
        return key


def _assertion_credentials(form: Form) -> Credentials:
    """private_key_jwt (RFC 7523 2.2): the assertion decoded, not yet verified."""
    presented = form.get("client_id")
    if form.get("client_assertion_type") != JWT_BEARER:
        raise invalid_client("assertion_type", client_id=presented)
    assertion = form.get("client_assertion")
    if assertion is None:
        raise invalid_request("client_assertion is required")
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except JWT_DECODE_ERRORS:
        raise invalid_client("assertion_malformed", client_id=presented) from None
    client_id = claims.get("sub")
    if not isinstance(client_id, str) or claims.get("iss") != client_id:
        raise invalid_client("assertion_iss_sub", client_id=presented)
    if presented not in (None, client_id):
        raise invalid_client("client_id_mismatch", client_id=client_id)
    return Credentials(
        "private_key_jwt",
        client_id,
        False,
        assertion=assertion,
        assertion_header=header,
    )


def _select(keys: tuple[PublicKey, ...], alg: str, kid: str | None) -> PublicKey | None:
    if kid is None:
        candidates = keys if len(keys) == 1 else ()
    else:
        candidates = tuple(k for k in keys if k.kid == kid)
    return next((k for k in candidates if alg in k.algorithms), None)


def _failed(detail: str, credentials: Credentials) -> OAuthError:
    return invalid_client(detail, basic=credentials.basic, client_id=credentials.client_id)


def parse_basic(value: bytes) -> tuple[str, str]:
    """RFC 6749 2.3.1: Base64 of form-urlencoded ``client_id:client_secret``."""
    scheme, _, credentials = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        raise invalid_client("unsupported_scheme", basic=True)
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        client_id, sep, secret = decoded.partition(":")
        if not sep or not client_id:
            raise ValueError
        return (
            unquote_plus(client_id, errors="strict"),
            unquote_plus(secret, errors="strict"),
        )
    except (binascii.Error, UnicodeError, ValueError):
        raise invalid_client("malformed_basic", basic=True) from None


class ClientKeyFetcher:
    """Keys from clients' ``jwks_uri``: cached, single-flight, refetch rate-limited."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        ttl: float = 300,
        min_interval: float = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        self.ttl = ttl
        self.min_interval = min_interval
        self.clock = clock
        self._cache: dict[str, tuple[float, tuple[PublicKey, ...]]] = {}
        self._inflight: dict[str, asyncio.Task[tuple[PublicKey, ...]]] = {}

    async def keys(self, client: ClientConfig, *, refresh: bool = False) -> tuple[PublicKey, ...]:
        cached = self._cache.get(client.client_id)
        now = self.clock()
        if cached is not None:
            age = now - cached[0]
            if age < self.ttl and not (refresh and age >= self.min_interval):
                return cached[1]
        task = self._inflight.get(client.client_id)
        if task is None:
            task = asyncio.ensure_future(self._fetch(client))
            self._inflight[client.client_id] = task
            task.add_done_callback(lambda _: self._inflight.pop(client.client_id, None))
        try:
            return await asyncio.shield(task)
        except OAuthError:
            if cached is not None:  # serve what we had rather than fail the client
                return cached[1]
            raise

    async def _fetch(self, client: ClientConfig) -> tuple[PublicKey, ...]:
        assert client.jwks_uri is not None
        try:
            response = await self.http.get(client.jwks_uri, timeout=5.0)
            if response.status_code != 200 or len(response.content) > MAX_JWKS_BYTES:
                raise ValueError(f"status {response.status_code}")
            document = response.json()
            raw_keys = document["keys"]
            if not isinstance(raw_keys, list):
                raise ValueError("keys is not a list")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log_event(
                "client_jwks.fetch_failed", client_id=client.client_id, error=type(exc).__name__
            )
            raise invalid_client(JWKS_UNAVAILABLE, client_id=client.client_id) from None
        keys = []
        for raw in raw_keys:
            try:
                keys.append(load_public_jwk(raw))
            except ValueError:
                continue  # skip keys we cannot use, as any JWKS consumer does
        result = tuple(keys)
        self._cache[client.client_id] = (self.clock(), result)
        return result
