"""RFC 9068 JWT access tokens: build, sign, and verify our own (introspection)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import jwt

from authserver.config import ServerConfig
from authserver.grants import TokenRequest
from authserver.keyring import KeySet
from tokengate.jwk import JWT_DECODE_ERRORS, is_numeric_date

ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 - a media type, not a secret


def new_jti() -> str:
    return secrets.token_urlsafe(16)


def access_token_claims(request: TokenRequest, now: int, jti: str) -> dict[str, Any]:
    """The claims of a client-credentials access token (RFC 9068 section 2.2)."""
    client, server = request.client, request.server
    return {
        **client.claims,
        "iss": server.issuer,
        "sub": client.client_id,
        "aud": server.audience,
        "exp": now + server.access_token_ttl,
        "iat": now,
        "jti": jti,
        "client_id": client.client_id,
        "scope": " ".join(request.scopes),
    }


class TokenVerifier:
    """Verifies tokens this authorization server issued; None for anything else.

    RFC 7662: a token is inactive from its ``exp`` on and before its ``nbf``, with no
    leeway (the server judges its own tokens by its own clock); ``iat`` may be up to
    ``leeway`` ahead, for replicas whose clocks differ a little.
    """

    def __init__(self, *, leeway: int, clock: Callable[[], float] = time.time) -> None:
        self.leeway = leeway
        self.clock = clock

    def verify(self, token: str, server: ServerConfig, keys: KeySet) -> dict[str, Any] | None:
        try:
            header = jwt.get_unverified_header(token)
        except JWT_DECODE_ERRORS:
            return None
        kid = header.get("kid")
        key = keys.published.get(kid) if isinstance(kid, str) else None
        if key is None or header.get("alg") != key.alg or header.get("typ") != ACCESS_TOKEN_TYP:
            return None
        try:
            claims = jwt.decode(
                token,
                key.public_key,
                algorithms=[key.alg],
                audience=server.audience,
                issuer=server.issuer,
                options={
                    "require": ["iss", "sub", "aud", "exp", "iat", "jti"],
                    "verify_exp": False,  # checked below against our clock
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except JWT_DECODE_ERRORS:
            return None
        now = self.clock()
        exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf", now)
        if not all(is_numeric_date(t) for t in (exp, iat, nbf)) or not isinstance(
            claims["jti"], str
        ):
            return None
        if exp <= now or nbf > now or iat > now + self.leeway:
            return None
        return claims
