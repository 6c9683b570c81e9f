"""Everything the portal asks of its OpenID Connect issuer, over HTTP only.

Discovery (``{issuer}/.well-known/openid-configuration``) names the endpoints; the
key set at ``jwks_uri`` checks ID tokens; the token endpoint redeems codes and
refresh tokens (``client_secret_basic``); userinfo says more about the user; the
revocation endpoint retires a refresh token at sign-out. The discovery document and
the key set are cached per process (they are the issuer's, not a user's); an ID token
naming an unknown key refetches the key set once, at most every
:data:`JWKS_COOLDOWN` seconds.

Failures are two kinds: :class:`IssuerUnavailable` (unreachable, a 5xx, an answer that
is not what the protocol says: the portal answers 502) and :class:`TokenRefused` (the
token endpoint's RFC 6749 section 5.2 error: a code or refresh token it will not
redeem).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from tokengate.portal.idtoken import (
    Expected,
    IdTokenError,
    JwkDict,
    UnknownKey,
    accepted_algorithms,
    validate_id_token,
)

DISCOVERY_TTL = 300.0  # seconds the discovery document is kept
JWKS_TTL = 300.0  # seconds the key set is kept
JWKS_COOLDOWN = 30.0  # an unknown kid refetches the key set at most this often
MAX_DOCUMENT = 256 * 1024  # bytes of any answer from the issuer


class IssuerUnavailable(Exception):
    """The issuer could not be asked, or did not answer as the protocol says."""


class TokenRefused(Exception):
    """The token endpoint refused a grant (``invalid_grant`` and the like)."""

    def __init__(self, error: str, description: str | None) -> None:
        super().__init__(f"{error}: {description}" if description else error)
        self.error = error
        self.description = description


class UserinfoRefused(Exception):
    """Userinfo did not answer for this user; the portal shows the ID token alone."""


def _url(document: Mapping[str, Any], key: str, *, required: bool) -> str | None:
    value = document.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https"):
        raise IssuerUnavailable(f"discovery: {key} is not an http(s) URL")
    return value


@dataclass(frozen=True, slots=True)
class Metadata:
    """The parts of the discovery document the portal uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    end_session_endpoint: str | None
    revocation_endpoint: str | None
    id_token_algorithms: tuple[str, ...]  # advertised, and accepted by the portal
    iss_parameter: bool  # RFC 9207: authorization responses carry iss

    @classmethod
    def parse(cls, document: object, issuer: str) -> Metadata:
        if not isinstance(document, dict):
            raise IssuerUnavailable("discovery: not a JSON object")
        if document.get("issuer") != issuer:  # OIDC Discovery 1.0 section 4.3
            raise IssuerUnavailable(f"discovery: issuer is {document.get('issuer')!r}")
        algorithms = accepted_algorithms(document.get("id_token_signing_alg_values_supported"))
        if not algorithms:
            raise IssuerUnavailable("discovery: no ID token algorithm the portal accepts")
        return cls(
            issuer=issuer,
            authorization_endpoint=str(_url(document, "authorization_endpoint", required=True)),
            token_endpoint=str(_url(document, "token_endpoint", required=True)),
            jwks_uri=str(_url(document, "jwks_uri", required=True)),
            userinfo_endpoint=_url(document, "userinfo_endpoint", required=False),
            end_session_endpoint=_url(document, "end_session_endpoint", required=False),
            revocation_endpoint=_url(document, "revocation_endpoint", required=False),
            id_token_algorithms=algorithms,
            iss_parameter=document.get("authorization_response_iss_parameter_supported") is True,
        )


@dataclass(frozen=True, slots=True)
class TokenResponse:
    access_token: str
    expires_in: int | None
    refresh_token: str | None
    id_token: str | None

    @classmethod
    def parse(cls, document: object) -> TokenResponse:
        if not isinstance(document, dict):
            raise IssuerUnavailable("token endpoint: not a JSON object")
        access_token, token_type = document.get("access_token"), document.get("token_type")
        if not isinstance(access_token, str) or not access_token:
            raise IssuerUnavailable("token endpoint: no access_token")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise IssuerUnavailable(f"token endpoint: token_type {token_type!r}")
        expires_in = document.get("expires_in")
        refresh_token, id_token = document.get("refresh_token"), document.get("id_token")
        return cls(
            access_token=access_token,
            expires_in=expires_in
            if isinstance(expires_in, int) and not isinstance(expires_in, bool)
            else None,
            refresh_token=refresh_token if isinstance(refresh_token, str) else None,
            id_token=id_token if isinstance(id_token, str) else None,
        )


def basic_auth(client_id: str, secret: str) -> str:
    """``client_secret_basic``: both form-encoded first (RFC 6749 section 2.3.1)."""
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


async def read_json(response: httpx.Response, what: str) -> Any:
    """A streamed response's body as JSON, read up to :data:`MAX_DOCUMENT` bytes; None
    for an empty body (a revocation's answer)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_DOCUMENT:
            raise IssuerUnavailable(f"{what}: answer larger than {MAX_DOCUMENT} bytes")
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except ValueError:
        raise IssuerUnavailable(f"{what}: answered {response.status_code}, not JSON") from None


class Issuer:
    """One issuer, as one client (``client_id``/``secret``) of it sees it."""

    def __init__(
        self,
        issuer: str,
        client_id: str,
        secret: str,
        http: httpx.AsyncClient,
        clock: Callable[[], float],
    ) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self._authorization = basic_auth(client_id, secret)
        self._http = http
        self._clock = clock
        self._discovery_url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        self._metadata: tuple[Metadata, float] | None = None  # and when it was fetched
        self._keys: tuple[dict[str, JwkDict], float] | None = None
        self._refetched_at = -JWKS_COOLDOWN  # the last refetch for an unknown kid
        self._lock = asyncio.Lock()  # one fetch at a time: concurrent callers share it

    async def _request(self, method: str, url: str, what: str, **kwargs: Any) -> tuple[int, Any]:
        """Status and JSON body; IssuerUnavailable for transport errors and 5xx."""
        try:
            async with self._http.stream(method, url, **kwargs) as response:
                if response.status_code >= 500:
                    raise IssuerUnavailable(f"{what}: answered {response.status_code}")
                return response.status_code, await read_json(response, what)
        except httpx.HTTPError as exc:
            raise IssuerUnavailable(f"{what}: {type(exc).__name__}: {exc}") from None

    async def _get_document(self, url: str, what: str) -> Any:
        status, document = await self._request("GET", url, what)
        if status != 200:
            raise IssuerUnavailable(f"{what}: answered {status}")
        return document

    async def metadata(self) -> Metadata:
        cached = self._metadata
        if cached is not None and self._clock() - cached[1] < DISCOVERY_TTL:
            return cached[0]
        async with self._lock:
            cached = self._metadata
            if cached is not None and self._clock() - cached[1] < DISCOVERY_TTL:
                return cached[0]
            document = await self._get_document(self._discovery_url, "discovery")
            metadata = Metadata.parse(document, self.issuer)
            self._metadata = (metadata, self._clock())
            return metadata

    async def keys(self, *, unknown_kid: bool = False) -> dict[str, JwkDict]:
        """The issuer's signature keys by kid. ``unknown_kid``: a token named a key
        not among them; refetch, unless that was done less than JWKS_COOLDOWN ago."""
        cached = self._keys
        if unknown_kid:
            if self._clock() - self._refetched_at < JWKS_COOLDOWN and cached is not None:
                return cached[0]
            self._refetched_at = self._clock()
        elif cached is not None and self._clock() - cached[1] < JWKS_TTL:
            return cached[0]
        metadata = await self.metadata()
        async with self._lock:
            if self._keys is not cached and self._keys is not None:  # another request did
                return self._keys[0]
            document = await self._get_document(metadata.jwks_uri, "jwks")
            keys = _signature_keys(document)
            self._keys = (keys, self._clock())
            return keys

    async def check_id_token(
        self, id_token: str, *, nonce: str | None, access_token: str | None
    ) -> dict[str, Any]:
        """The ID token's claims, checked (see :mod:`tokengate.portal.idtoken`)."""
        metadata = await self.metadata()
        expected = Expected(self.issuer, self.client_id, metadata.id_token_algorithms, nonce)
        keys = await self.keys()
        try:
            return validate_id_token(
                id_token, keys, expected, now=self._clock(), access_token=access_token
            )
        except UnknownKey:
            keys = await self.keys(unknown_kid=True)  # the issuer may have rotated
        return validate_id_token(
            id_token, keys, expected, now=self._clock(), access_token=access_token
        )

    async def _token(self, form: dict[str, str], what: str) -> TokenResponse:
        metadata = await self.metadata()
        status, document = await self._request(
            "POST",
            metadata.token_endpoint,
            what,
            data=form,
            headers={"Authorization": self._authorization, "Accept": "application/json"},
        )
        if status != 200:
            error = document.get("error") if isinstance(document, dict) else None
            if not isinstance(error, str):
                raise IssuerUnavailable(f"{what}: answered {status} without an OAuth error")
            description = document.get("error_description")
            raise TokenRefused(error, description if isinstance(description, str) else None)
        return TokenResponse.parse(document)

    async def redeem_code(self, code: str, redirect_uri: str, verifier: str) -> TokenResponse:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "code_verifier": verifier,
        }
        return await self._token(form, "code exchange")

    async def refresh(self, refresh_token: str) -> TokenResponse:
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        return await self._token(form, "refresh")

    async def userinfo(self, access_token: str, sub: str) -> dict[str, Any]:
        """The user's claims from userinfo; {} when the issuer has no userinfo endpoint.

        UserinfoRefused for an error answer or another user's ``sub`` (OIDC Core
        section 5.3.2: then its claims must not be used)."""
        metadata = await self.metadata()
        if metadata.userinfo_endpoint is None:
            return {}
        status, document = await self._request(
            "GET",
            metadata.userinfo_endpoint,
            "userinfo",
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
        )
        if status != 200 or not isinstance(document, dict):
            raise UserinfoRefused(f"answered {status}")
        if document.get("sub") != sub:
            raise UserinfoRefused("its sub is not the ID token's")
        return document

    async def revoke(self, refresh_token: str) -> None:
        """Retire a refresh token (RFC 7009); IssuerUnavailable if that failed."""
        metadata = await self.metadata()
        if metadata.revocation_endpoint is None:
            return
        status, _ = await self._request(
            "POST",
            metadata.revocation_endpoint,
            "revocation",
            data={"token": refresh_token, "token_type_hint": "refresh_token"},
            headers={"Authorization": self._authorization},
        )
        if status != 200:
            raise IssuerUnavailable(f"revocation: answered {status}")


def _signature_keys(document: object) -> dict[str, JwkDict]:
    """A JWKS's keys that may verify signatures, by kid (``""`` for one without)."""
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise IssuerUnavailable("jwks: no keys list")
    found: dict[str, JwkDict] = {}
    for key in keys:
        if not isinstance(key, dict) or key.get("use", "sig") != "sig":
            continue
        kid = key.get("kid")
        found[kid if isinstance(kid, str) else ""] = key
    return found


__all__ = [
    "IdTokenError",
    "Issuer",
    "IssuerUnavailable",
    "Metadata",
    "TokenRefused",
    "TokenResponse",
    "UserinfoRefused",
]
