"""Bearer JWT -> Principal: issuer by ``iss``, key by ``kid`` from that issuer's
JWKS only, algorithm pinned by config, ``typ``, ``exp``/``nbf``/``iat`` with leeway.

Cheap checks run before the signature (size, shape, ``alg``, issuer, ``typ``), and a
bounded cache of verified tokens, keyed by a digest of the token, skips the
signature check for repeats but never past the token's ``exp``.
"""

from __future__ import annotations

import base64
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
from gateway.headers import CONTROL, identity_headers
from gateway.jwks import JwksCache, KeysUnavailable, KeyUnknown
from tokengate.jwk import ALGORITHMS, JWT_DECODE_ERRORS, UNTRUSTED_JSON_ERRORS

_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")  # RFC 6750 section 2.1
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 section 3.3
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
    username: str | None = None  # preferred_username, for a user's token
    # Derived once per verified token; the verified-token cache reuses them.
    identity_headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False, compare=False)
    audit_identity: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        issuer = self.issuer.issuer
        object.__setattr__(
            self,
            "identity_headers",
            identity_headers(
                self.sub, self.client_id, self.scope_list, issuer, username=self.username
            ),
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
        except UNTRUSTED_JSON_ERRORS:  # binascii.Error is a ValueError
            raise Denied(Reason.TOKEN_INVALID, "the token is not a signed JWT") from None
        if not isinstance(header, dict) or not isinstance(unverified, dict):
            raise Denied(Reason.TOKEN_INVALID, "the token is not a signed JWT")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise Denied(Reason.TOKEN_INVALID, "the token's algorithm is not allowed")
        iss = unverified.get("iss")
        if iss is not None and not isinstance(iss, str):
            raise Denied(Reason.TOKEN_INVALID, "the token's iss is not a string")
        issuer = self.issuers.get(iss) if iss is not None else None
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
        except JWT_DECODE_ERRORS:
            raise Denied(Reason.TOKEN_INVALID, "the token is invalid") from None
        try:
            return _principal(issuer, kid, claims)
        except ClaimError as exc:
            raise Denied(Reason.TOKEN_INVALID, str(exc)) from None


class ClaimError(ValueError):
    """A claim of the wrong type, or one no identity header could carry unambiguously."""


def _principal(issuer: IssuerConfig, kid: str | None, claims: dict[str, Any]) -> Principal:
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise ClaimError("the token's exp is not a number")
    return Principal(
        issuer=issuer,
        sub=_identity(claims, "sub"),
        client_id=_identity(claims, "client_id" if "client_id" in claims else "cid"),
        scopes=frozenset(scope_list := _scopes(claims)),
        scope_list=scope_list,
        audiences=_audiences(claims.get("aud")),
        jti=jti if isinstance(jti := claims.get("jti"), str) else None,  # logged, not forwarded
        kid=kid,
        exp=float(exp),
        claims=claims,
        username=_username(claims),
    )


def _username(claims: dict[str, Any]) -> str | None:
    """A user's ``preferred_username``; None for a client's own token (``sub`` is the
    client_id, RFC 9068), whatever claims its client was configured to carry."""
    username = _identity(claims, "preferred_username")
    client_id = claims.get("client_id", claims.get("cid"))
    return None if client_id is not None and claims.get("sub") == client_id else username


def _identity(claims: dict[str, Any], name: str) -> str | None:
    """A string claim forwarded in a header: absent is None; anything that would not
    reach the upstream exactly as it is (another type, no characters, surrounding
    whitespace, a control character) refuses the token."""
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ClaimError(f"the token's {name} is not a string")
    if not value or value != value.strip() or CONTROL.search(value) or not _utf8(value):
        raise ClaimError(f"the token's {name} cannot be forwarded as it is")
    return value


def _utf8(value: str) -> bool:
    """Whether ``value`` is valid Unicode (JSON lets a lone surrogate through)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _scopes(claims: dict[str, Any]) -> tuple[str, ...]:
    """Distinct scopes, in token order, from ``scope`` (a space-separated string, RFC
    8693) and ``scp`` (a list, or a string as some issuers send it). Each must be a
    scope token (RFC 6749 3.3): one holding a space, a control or a non-ASCII
    character would mean something else once joined into ``X-Auth-Scopes``."""
    tokens: list[str] = []
    for name in ("scope", "scp"):
        value = claims.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            tokens.extend(value.split(" "))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            tokens.extend(value)
        else:
            raise ClaimError(f"the token's {name} is not a string or a list of strings")
    tokens = [t for t in tokens if t]
    for token in tokens:
        if not _SCOPE_TOKEN.fullmatch(token):
            raise ClaimError("the token's scopes hold a character no scope may hold")
    return tuple(dict.fromkeys(tokens))


def _audiences(aud: object) -> tuple[str, ...]:
    if aud is None:
        return ()
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return tuple(aud)
    raise ClaimError("the token's aud is not a string or a list of strings")
