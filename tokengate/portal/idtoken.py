"""Checking an OpenID Connect ID token as a relying party must (OIDC Core 1.0 section
3.1.3.7). Pure: the token, the issuer's keys and what was expected in; claims out.

The algorithm is never taken from the token alone: it must be one the issuer's
discovery document advertises for ID tokens *and* one this portal accepts, and it
must agree with the key's ``alg`` when the key names one (RFC 8725 section 3.1).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

ACCEPTED_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
# OIDC Core 3.1.3.6: at_hash is half the access token's hash under the ID token's
# algorithm's hash; SHA-512 for EdDSA with Ed25519.
_AT_HASH: dict[str, Callable[[bytes], Any]] = {
    "RS256": hashlib.sha256,
    "PS256": hashlib.sha256,
    "ES256": hashlib.sha256,
    "EdDSA": hashlib.sha512,
}
_ACCESS_TOKEN_TYPES = ("at+jwt", "application/at+jwt")
LEEWAY = 30  # seconds of clock skew allowed on exp, iat and nbf

JwkDict = Mapping[str, Any]


class IdTokenError(Exception):
    """The ID token is not one this portal may accept; the message says why."""


class UnknownKey(IdTokenError):
    """The token names a key the issuer's key set (as fetched) lacks."""


@dataclass(frozen=True, slots=True)
class Expected:
    issuer: str
    client_id: str
    algorithms: tuple[str, ...]  # advertised by the issuer and accepted here
    nonce: str | None  # the one sent with the authorization request; None on refresh


def accepted_algorithms(advertised: object) -> tuple[str, ...]:
    """The issuer's ``id_token_signing_alg_values_supported`` this portal accepts."""
    if not isinstance(advertised, list):
        return ()
    return tuple(alg for alg in ACCEPTED_ALGORITHMS if alg in advertised)


def at_hash(access_token: str, alg: str) -> str:
    digest = _AT_HASH[alg](access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode("ascii")


def _signing_key(header: Mapping[str, Any], keys: Mapping[str, JwkDict]) -> JwkDict:
    kid = header.get("kid")
    if isinstance(kid, str) and kid in keys:
        return keys[kid]
    if kid is None and len(keys) == 1:  # a key set of one may leave kid out
        return next(iter(keys.values()))
    raise UnknownKey(f"no key {kid!r} in the issuer's key set")


def validate_id_token(
    token: str,
    keys: Mapping[str, JwkDict],
    expected: Expected,
    *,
    now: float,
    access_token: str | None = None,
) -> dict[str, Any]:
    """The token's claims, once its signature, ``iss``, ``aud``, ``azp``, ``exp``,
    ``iat``, ``nbf``, ``nonce`` and (when present) ``at_hash`` are right.

    ``keys``: the issuer's signature keys by ``kid``. Raises :class:`UnknownKey` when the
    token's ``kid`` is not among them (the caller may refetch the key set once), and
    :class:`IdTokenError` for everything else."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise IdTokenError("not a signed JWT") from None
    alg = header.get("alg")
    if alg not in expected.algorithms:
        raise IdTokenError(f"signed with {alg!r}; accepted: {', '.join(expected.algorithms)}")
    if str(header.get("typ", "")).lower() in _ACCESS_TOKEN_TYPES:
        raise IdTokenError("an access token, not an ID token")
    jwk = _signing_key(header, keys)
    if jwk.get("alg", alg) != alg:
        raise IdTokenError(f"signed with {alg!r}, but its key is for {jwk.get('alg')!r}")
    try:
        key = jwt.PyJWK(dict(jwk), algorithm=alg)
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=expected.client_id,
            issuer=expected.issuer,
            options={
                "require": ["iss", "sub", "aud", "exp", "iat"],
                # times are checked below, against the caller's clock
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.PyJWTError as exc:
        raise IdTokenError(str(exc) or type(exc).__name__) from None
    _check_times(claims, now)
    _check_party(claims, expected.client_id)
    if expected.nonce is not None:
        nonce = claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(nonce, expected.nonce):
            raise IdTokenError("nonce is not the one sent")
    if (
        "at_hash" in claims
        and access_token is not None
        and not hmac.compare_digest(str(claims["at_hash"]), at_hash(access_token, alg))
    ):
        raise IdTokenError("at_hash does not match the access token")
    return claims


def _number(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise IdTokenError(f"{name} is not a number")
    return float(value)


def _check_times(claims: Mapping[str, Any], now: float) -> None:
    if _number(claims, "exp") <= now - LEEWAY:
        raise IdTokenError("expired")
    if _number(claims, "iat") > now + LEEWAY:
        raise IdTokenError("issued in the future")
    if "nbf" in claims and _number(claims, "nbf") > now + LEEWAY:
        raise IdTokenError("not valid yet")


def _check_party(claims: Mapping[str, Any], client_id: str) -> None:
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise IdTokenError("sub is missing")
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    azp = claims.get("azp")
    if len(audiences) > 1 and azp is None:
        raise IdTokenError("several audiences and no azp")
    if azp is not None and azp != client_id:
        raise IdTokenError("azp is another client")
