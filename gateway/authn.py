"""Bearer JWT -> Principal: issuer by ``iss``, key by ``kid`` from that issuer's
JWKS only, algorithm pinned by config, ``typ``, ``exp``/``nbf``/``iat`` with leeway.

Cheap checks run before the signature (size, shape, ``alg``, issuer, ``typ``), and a
bounded cache of verified tokens, keyed by a digest of the token, skips the
signature check for repeats but never past the token's ``exp``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from gateway.audit import identity_fields
from gateway.config import GatewayConfig, IssuerConfig
from gateway.errors import Denied, Reason
from gateway.headers import identity_headers
from gateway.jwks import JwksCache, KeysUnavailable, KeyUnknown
from tokengate.jwk import ALGORITHMS

_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 section 2.1
_ACCESS_TYP = frozenset({"at+jwt", "application/at+jwt"})
_JWT_TYP = frozenset({"jwt", "application/jwt", None})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who the verified token speaks for."""

    issuer: IssuerConfig
    sub: str | None
    client_id: str | None
    scopes: frozenset[str]
    scope_list: tuple[str, ...]  # in token order, for headers and the audit line
    audiences: tuple[str, ...]
    jti: str | None
    kid: str | None
    exp: float
    claims: Mapping[str, Any] = field(repr=False)
    # Derived once per verified token; the verified-token cache reuses them.
    identity_headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False, compare=False)
    audit_identity: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        issuer = self.issuer.issuer
        object.__setattr__(
            self,
            "identity_headers",
            identity_headers(self.sub, self.client_id, self.scope_list, issuer),
        )
        object.__setattr__(
            self,
            "audit_identity",
            identity_fields(self.client_id, self.sub, issuer, self.jti, self.scope_list),
        )


def bearer_token(authorization: list[bytes]) -> bytes:
    """The credentials of ``Authorization: Bearer <token>``; Denied otherwise.

    Their shape is checked by :meth:`Authenticator.authenticate`, and only for tokens
    it has not verified already.
    """
    if not authorization:
        raise Denied(Reason.TOKEN_MISSING, "a bearer token is required")
    if len(authorization) > 1:
        raise Denied(Reason.TOKEN_INVALID, "more than one Authorization header")
    scheme, _, value = authorization[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        raise Denied(Reason.TOKEN_MISSING, "a bearer token is required")
    return value.strip()


def _b64json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


class Authenticator:
    def __init__(
        self,
        config: GatewayConfig,
        jwks: JwksCache,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuers = {i.issuer: i for i in config.issuers}
        self.max_token_bytes = config.max_token_bytes
        self.jwks = jwks
        self.clock = clock
        self._verified: dict[bytes, Principal] = {}
        self._cache_size = config.token_cache_size

    async def authenticate(self, token: bytes) -> Principal:
        """The principal of a bearer token (as :func:`bearer_token` returns it)."""
        if len(token) > self.max_token_bytes:
            raise Denied(Reason.TOKEN_INVALID, "the token is too large")
        digest = hashlib.sha256(token).digest()
        cached = self._verified.get(digest)
        if cached is not None:
            if self.clock() < cached.exp and self.jwks[cached.issuer.issuer].has(cached.kid):
                return cached
            self._verified.pop(digest, None)
        if not _B64TOKEN.fullmatch(token):
            raise Denied(Reason.TOKEN_INVALID, "the bearer token is malformed")
        principal = await self._verify(token.decode("ascii"))
        if len(self._verified) >= self._cache_size:  # bounded: evict the oldest entry
            del self._verified[next(iter(self._verified))]
        self._verified[digest] = principal
        return principal

    async def _verify(self, token: str) -> Principal:
        parts = token.split(".")
        if len(parts) != 3:
            raise Denied(Reason.TOKEN_INVALID, "the token is not a signed JWT")
        try:
            header, unverified = _b64json(parts[0]), _b64json(parts[1])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            raise Denied(Reason.TOKEN_INVALID, "the token is not a signed JWT") from None
        if not isinstance(header, dict) or not isinstance(unverified, dict):
            raise Denied(Reason.TOKEN_INVALID, "the token is not a signed JWT")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise Denied(Reason.TOKEN_INVALID, "the token's algorithm is not allowed")
        issuer = self.issuers.get(unverified.get("iss"))  # type: ignore[arg-type]
        if issuer is None:
            raise Denied(Reason.ISSUER_UNKNOWN, "the token's issuer is not trusted")
        if alg not in issuer.algorithms:
            raise Denied(Reason.TOKEN_INVALID, "the token's algorithm is not allowed")
        typ = header.get("typ")
        typ = typ.lower() if isinstance(typ, str) else typ
        if typ not in _ACCESS_TYP and not (issuer.allow_jwt_typ and typ in _JWT_TYP):
            raise Denied(Reason.TOKEN_INVALID, "the token is not an access token (typ)")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Denied(Reason.TOKEN_INVALID, "the token's kid is malformed")
        try:
            key = await self.jwks[issuer.issuer].key(kid)
        except KeyUnknown:
            raise Denied(Reason.KEY_UNKNOWN, "the token's signing key is unknown") from None
        except KeysUnavailable:
            raise Denied(
                Reason.JWKS_UNAVAILABLE, "the issuer's keys are unavailable; try again"
            ) from None
        if alg not in key.algorithms:
            raise Denied(Reason.TOKEN_INVALID, "the token's algorithm does not fit its key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                issuer=issuer.issuer,
                leeway=issuer.leeway,
                options={"require": ["exp", "iss"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise Denied(Reason.TOKEN_EXPIRED, "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Denied(Reason.TOKEN_NOT_YET_VALID, "the token is not yet valid") from None
        except jwt.PyJWTError:
            raise Denied(Reason.TOKEN_INVALID, "the token is invalid") from None
        try:
            return _principal(issuer, kid, claims)
        except ValueError:  # an identity claim no header can carry
            raise Denied(
                Reason.TOKEN_INVALID, "the token's identity claims cannot be forwarded"
            ) from None


def _principal(issuer: IssuerConfig, kid: str | None, claims: dict[str, Any]) -> Principal:
    scope_list: list[str] = []
    scope = claims.get("scope")
    if isinstance(scope, str):
        scope_list.extend(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        scope_list.extend(s for s in scp if isinstance(s, str) and s not in scope_list)
    aud = claims.get("aud")
    audiences = (
        (aud,) if isinstance(aud, str) else tuple(a for a in aud or () if isinstance(a, str))
    )
    sub, client_id, jti = (
        claims.get("sub"),
        claims.get("client_id", claims.get("cid")),
        claims.get("jti"),
    )
    return Principal(
        issuer=issuer,
        sub=sub if isinstance(sub, str) else None,
        client_id=client_id if isinstance(client_id, str) else None,
        scopes=frozenset(scope_list),
        scope_list=tuple(dict.fromkeys(scope_list)),
        audiences=audiences,
        jti=jti if isinstance(jti, str) else None,
        kid=kid,
        exp=float(claims["exp"]),
        claims=claims,
    )
