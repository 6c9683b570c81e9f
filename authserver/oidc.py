"""Tokens for a signed-in user: the RFC 9068 access token and the OpenID Connect ID
token (OIDC Core 1.0 sections 2, 3.1.3.6 and 5.4). Pure: claims in, claims out.

The OIDC scopes ``openid``, ``profile`` and ``email`` are built into every server
(a client may list them beside the server's own scopes). ``openid`` asks for an ID
token; ``profile`` and ``email`` put the user's claims of that kind into it.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from authserver.config import ClientConfig, ServerConfig, UserClaim
from authserver.keyring import KeySet
from authserver.signon import AMR_PASSWORD, acr_of
from authserver.users import User
from tokengate.jwk import JWT_DECODE_ERRORS

# OIDC Core 5.4: the claims each scope asks for (preferred_username is the username)
PROFILE_CLAIMS = (
    "name",
    "family_name",
    "given_name",
    "middle_name",
    "nickname",
    "preferred_username",
    "profile",
    "picture",
    "website",
    "gender",
    "birthdate",
    "zoneinfo",
    "locale",
    "updated_at",
)
EMAIL_CLAIMS = ("email", "email_verified")
ADDRESS_CLAIMS = ("address",)
PHONE_CLAIMS = ("phone_number", "phone_number_verified")
SCOPE_CLAIMS = {
    "profile": PROFILE_CLAIMS,
    "email": EMAIL_CLAIMS,
    "address": ADDRESS_CLAIMS,
    "phone": PHONE_CLAIMS,
}
ID_TOKEN_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "amr", "acr", "sid")
CLAIMS_SUPPORTED = (
    *ID_TOKEN_CLAIMS,
    "at_hash",
    *PROFILE_CLAIMS,
    *EMAIL_CLAIMS,
    *ADDRESS_CLAIMS,
    *PHONE_CLAIMS,
)
# OIDC Core 3.1.3.6: at_hash uses the hash of the ID token's JWS alg; for EdDSA
# (Ed25519) that is SHA-512, as OpenID Connect's errata and common libraries use.
_AT_HASH = {"RS256": hashlib.sha256, "PS256": hashlib.sha256, "ES256": hashlib.sha256}


@dataclass(frozen=True, slots=True)
class SignIn:
    """Who a token speaks for, and how they signed in."""

    user: User
    auth_time: int
    session_id: str  # the sid claim
    amr: tuple[str, ...] = AMR_PASSWORD


def at_hash(access_token: str, alg: str) -> str:
    """The left half of the access token's hash, base64url without padding."""
    digest = _AT_HASH.get(alg, hashlib.sha512)(access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode("ascii")


def user_access_token_claims(
    server: ServerConfig,
    client: ClientConfig,
    sign_in: SignIn,
    scopes: tuple[str, ...],
    now: int,
    jti: str,
) -> dict[str, Any]:
    """RFC 9068 section 2.2 for a user: ``sub`` is the user's stable id, never the
    username (which is ``preferred_username``)."""
    return {
        **client.claims,
        "iss": server.issuer,
        "sub": sign_in.user.id,
        "aud": server.audience,
        "exp": now + server.access_token_ttl,
        "iat": now,
        "jti": jti,
        "client_id": client.client_id,
        "scope": " ".join(scopes),
        "auth_time": sign_in.auth_time,
        "amr": list(sign_in.amr),
        "acr": acr_of(sign_in.amr),
        "preferred_username": sign_in.user.username,
        **user_claim_values(server.user_claims, sign_in.user, scopes, "access_token"),
    }


def id_token_claims(
    server: ServerConfig,
    client_id: str,
    sign_in: SignIn,
    scopes: tuple[str, ...],
    nonce: str | None,
    now: int,
    access_token: str | None,
    requested: tuple[str, ...] = (),
) -> dict[str, Any]:
    """OIDC Core 2 and 3.1.3.6, plus the claims of the granted profile/email scopes."""
    claims: dict[str, Any] = {
        "iss": server.issuer,
        "sub": sign_in.user.id,
        "aud": client_id,
        "exp": now + server.id_token_ttl,
        "iat": now,
        "auth_time": sign_in.auth_time,
        "amr": list(sign_in.amr),
        "acr": acr_of(sign_in.amr),
    }
    if access_token is not None:  # none with the implicit flow's response_type=id_token
        claims["at_hash"] = at_hash(access_token, server.signing_alg)
    if sign_in.session_id:  # the password grant signs in without a session
        claims["sid"] = sign_in.session_id
    if nonce is not None:
        claims["nonce"] = nonce
    claims.update(scope_claims(sign_in.user, scopes))
    claims.update(user_claim_values(server.user_claims, sign_in.user, scopes, "id_token"))
    if requested:  # the claims parameter: standard claims the user has, whatever the scopes
        known = _standard_claims(sign_in.user)
        claims.update({name: known[name] for name in requested if name in known})
    return claims


def userinfo_claims(server: ServerConfig, user: User, scopes: tuple[str, ...]) -> dict[str, Any]:
    """OIDC Core 5.3.2: ``sub``, the claims of the granted scopes, and the server's
    user claims that go into ID tokens."""
    return {
        "sub": user.id,
        **scope_claims(user, scopes),
        **user_claim_values(server.user_claims, user, scopes, "id_token"),
    }


def user_claim_values(
    claims: tuple[UserClaim, ...], user: User, scopes: tuple[str, ...], into: str
) -> dict[str, Any]:
    """The configured ``user_claims`` that go ``into`` this kind of token, for the
    granted ``scopes``; a profile key the user lacks is left out."""
    out: dict[str, Any] = {}
    for claim in claims:
        if into not in claim.into or (claim.scope is not None and claim.scope not in scopes):
            continue
        if claim.source == "groups":
            out[claim.name] = list(user.groups)
        elif claim.source == "username":
            out[claim.name] = user.username
        else:
            key = claim.source.removeprefix("profile.")
            if key in user.profile:
                out[claim.name] = user.profile[key]
    return out


def scope_claims(user: User, scopes: tuple[str, ...]) -> dict[str, Any]:
    """The user's claims that ``profile``, ``email``, ``address`` and ``phone`` ask
    for, those it has."""
    known = _standard_claims(user)
    wanted = [name for scope in scopes for name in SCOPE_CLAIMS.get(scope, ())]
    return {name: known[name] for name in wanted if name in known}


def verify_id_token_hint(token: str, server: ServerConfig, keys: KeySet) -> dict[str, Any] | None:
    """The claims of an ID token this server signed, for ``id_token_hint`` (OIDC Core
    3.1.2.1, RP-Initiated Logout 1.0 section 2): expired ones are accepted (a hint
    names a sign-in, it grants nothing); None for anything else."""
    try:
        header = jwt.get_unverified_header(token)
        kid = header.get("kid")
        key = keys.published.get(kid) if isinstance(kid, str) else None
        if key is None or header.get("alg") != key.alg or header.get("typ") != "JWT":
            return None
        claims = jwt.decode(
            token,
            key.public_key,
            algorithms=[key.alg],
            issuer=server.issuer,
            options={
                "require": ["iss", "sub", "aud"],
                "verify_aud": False,  # any client's: the caller checks which
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except JWT_DECODE_ERRORS:
        return None
    if not isinstance(claims.get("aud"), str) or not isinstance(claims.get("sub"), str):
        return None
    return claims


def _standard_claims(user: User) -> Mapping[str, Any]:
    """The user's OIDC standard claims (section 5.1) that it has."""
    standard = {name for names in SCOPE_CLAIMS.values() for name in names}
    profile = {k: v for k, v in user.profile.items() if k in standard}
    return {**profile, "preferred_username": user.username, "updated_at": user.updated_at}
