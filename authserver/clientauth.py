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
from dataclasses import dataclass
from urllib.parse import unquote_plus

import httpx
import jwt

from authserver.config import AuthMethod, AuthServerConfig, ClientConfig
from authserver.errors import OAuthError, invalid_client, invalid_request
from authserver.forms import Form
from authserver.store import Store
from tokengate.jsonlog import log_event
from tokengate.jwk import PublicKey, load_public_jwk

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME = 3600  # a client assertion's exp may be at most this far ahead
MAX_JWKS_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class AuthenticatedClient:
    client: ClientConfig
    method: AuthMethod


class ClientAuthenticator:
    def __init__(
        self,
        config: AuthServerConfig,
        store: Store,
        fetcher: ClientKeyFetcher,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.clients = {c.client_id: c for c in config.clients}
        self.leeway = config.leeway
        self.store = store
        self.fetcher = fetcher
        self.clock = clock

    async def authenticate(
        self, authorization: bytes | None, form: Form, audiences: list[str]
    ) -> AuthenticatedClient:
        """Authenticate with the one method the request uses.

        ``audiences`` are the values a client assertion's ``aud`` may name (the
        endpoint URL, the token endpoint, the issuer). Raises :class:`OAuthError`;
        its ``client_id`` attribute names the client that was claimed, if any.
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
            raise invalid_client("client authentication is required")
        if used[0] == "client_secret_basic":
            assert authorization is not None
            client_id, secret = parse_basic(authorization)
            if form.get("client_id") not in (None, client_id):
                raise _claimed(
                    invalid_client("client_id differs from the Basic credentials", basic=True),
                    client_id,
                )
            return AuthenticatedClient(
                self._check_secret(client_id, secret, "client_secret_basic"), "client_secret_basic"
            )
        if used[0] == "client_secret_post":
            client_id = form.get("client_id")
            if client_id is None:
                raise invalid_request("client_id is required with client_secret")
            return AuthenticatedClient(
                self._check_secret(
                    client_id, form.get("client_secret") or "", "client_secret_post"
                ),
                "client_secret_post",
            )
        return AuthenticatedClient(await self._check_assertion(form, audiences), "private_key_jwt")

    def _lookup(self, client_id: str, method: AuthMethod, *, basic: bool = False) -> ClientConfig:
        client = self.clients.get(client_id)
        if client is None:
            raise _claimed(invalid_client("unknown client", basic=basic), client_id)
        if method not in client.auth_methods:
            raise _claimed(
                invalid_client(f"the client may not authenticate with {method}", basic=basic),
                client_id,
            )
        return client

    def _check_secret(self, client_id: str, secret: str, method: AuthMethod) -> ClientConfig:
        basic = method == "client_secret_basic"
        client = self._lookup(client_id, method, basic=basic)
        if not client.secret_matches(secret):
            raise _claimed(invalid_client("client authentication failed", basic=basic), client_id)
        return client

    async def _check_assertion(self, form: Form, audiences: list[str]) -> ClientConfig:
        if form.get("client_assertion_type") != JWT_BEARER:
            raise invalid_client(f"client_assertion_type must be {JWT_BEARER}")
        assertion = form.get("client_assertion")
        if assertion is None:
            raise invalid_request("client_assertion is required")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise invalid_client("the client assertion is not a well-formed JWT") from None
        client_id = unverified.get("sub")
        if not isinstance(client_id, str) or unverified.get("iss") != client_id:
            raise invalid_client("the client assertion's iss and sub must both be the client_id")
        if form.get("client_id") not in (None, client_id):
            raise _claimed(invalid_client("client_id differs from the client assertion"), client_id)
        client = self._lookup(client_id, "private_key_jwt")
        alg, kid = header.get("alg"), header.get("kid")
        key = await self._assertion_key(client, alg, kid)
        if key is None:
            raise _claimed(
                invalid_client("no key of the client matches the assertion's kid and alg"),
                client_id,
            )
        try:
            claims = jwt.decode(
                assertion,
                key.key,
                algorithms=[alg],
                audience=audiences,
                issuer=client_id,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "sub", "aud", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise _claimed(invalid_client("the client assertion has expired"), client_id) from None
        except jwt.InvalidAudienceError:
            raise _claimed(
                invalid_client("the client assertion's aud must be the token endpoint or issuer"),
                client_id,
            ) from None
        except jwt.PyJWTError:
            raise _claimed(invalid_client("the client assertion is invalid"), client_id) from None
        exp, jti = claims["exp"], claims["jti"]
        if exp > self.clock() + MAX_ASSERTION_LIFETIME + self.leeway:
            raise _claimed(
                invalid_client("the client assertion's exp is more than one hour ahead"), client_id
            )
        if not isinstance(jti, str) or not 0 < len(jti) <= 256:
            raise _claimed(invalid_client("the client assertion's jti is invalid"), client_id)
        if not self.store.remember_assertion(client_id, jti, int(exp) + self.leeway):
            raise _claimed(invalid_client("the client assertion was already used"), client_id)
        return client

    async def _assertion_key(
        self, client: ClientConfig, alg: object, kid: object
    ) -> PublicKey | None:
        if not isinstance(alg, str):
            return None
        if client.jwks_uri is None:
            return _select(client.jwks, alg, kid)
        key = _select(await self.fetcher.keys(client), alg, kid)
        if key is None:  # maybe the client rotated: refetch, rate-limited
            key = _select(await self.fetcher.keys(client, refresh=True), alg, kid)
        return key


def _select(keys: tuple[PublicKey, ...], alg: str, kid: object) -> PublicKey | None:
    if kid is None:
        candidates = keys if len(keys) == 1 else ()
    else:
        candidates = tuple(k for k in keys if k.kid == kid)
    return next((k for k in candidates if alg in k.algorithms), None)


def _claimed(exc: OAuthError, client_id: str) -> OAuthError:
    exc.client_id = client_id
    return exc


def parse_basic(value: bytes) -> tuple[str, str]:
    """RFC 6749 2.3.1: Base64 of form-urlencoded ``client_id:client_secret``."""
    scheme, _, credentials = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        raise invalid_client("unsupported Authorization scheme; use Basic", basic=True)
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        client_id, sep, secret = decoded.partition(":")
        if not sep or not client_id:
            raise ValueError
        return (
            unquote_plus(client_id, errors="strict"),
            unquote_plus(secret, errors="strict"),
        )
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid_client("malformed Basic credentials", basic=True) from None


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
            raise _claimed(
                invalid_client("the client's keys could not be fetched from its jwks_uri"),
                client.client_id,
            ) from None
        keys = []
        for raw in raw_keys:
            try:
                keys.append(load_public_jwk(raw))
            except ValueError:
                continue  # skip keys we cannot use, as any JWKS consumer does
        result = tuple(keys)
        self._cache[client.client_id] = (self.clock(), result)
        return result
