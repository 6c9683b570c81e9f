"""Public JWKs: which algorithms a key can verify, and loading one safely; and what
reading an untrusted JWT may raise.

Shared by the authorization server (its clients' assertion keys) and the gateway
(its issuers' signing keys); neither takes an algorithm from a token without
checking it against the key's type and the configured list.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import jwt

# Asymmetric JWS algorithms only: `none` and HMAC never verify anything here.
ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
# What decoding an untrusted JWT may raise besides PyJWT's own errors: JSON nested too
# deep (RecursionError), a number too large for a time (1e400 is infinity, and int() of
# it overflows), claims of the wrong type reaching int() or a comparison.
UNTRUSTED_JSON_ERRORS = (ValueError, TypeError, ArithmeticError, RecursionError)
JWT_DECODE_ERRORS = (jwt.PyJWTError, *UNTRUSTED_JSON_ERRORS)


def is_numeric_date(value: object) -> bool:
    """A JSON number usable as a time (RFC 7519 NumericDate): not a bool, NaN or
    infinite; a big integer is fine."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool)


KEY_ALGORITHMS: dict[str, frozenset[str]] = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC:P-256": frozenset({"ES256"}),
    "EC:P-384": frozenset({"ES384"}),
    "EC:P-521": frozenset({"ES512"}),
    "OKP:Ed25519": frozenset({"EdDSA"}),
}


@dataclass(frozen=True, slots=True)
class PublicKey:
    kid: str | None
    key: Any = field(repr=False)
    algorithms: frozenset[str]  # what it may verify: its type's, its own `alg`, and allowed


def load_public_jwk(data: Any, allowed: Iterable[str] = ALGORITHMS) -> PublicKey:
    """A public signature JWK -> PublicKey; ValueError saying what is wrong with it."""
    if not isinstance(data, dict):
        raise ValueError("must be a JWK (a mapping)")
    if "d" in data or data.get("kty") == "oct":
        raise ValueError("must be a public key; never put a private or symmetric key here")
    if data.get("use", "sig") != "sig":
        raise ValueError("use must be sig")
    kind = str(data.get("kty", ""))
    if kind in ("EC", "OKP"):
        kind = f"{kind}:{data.get('crv')}"
    if kind not in KEY_ALGORITHMS:
        raise ValueError(f"unsupported key type {kind!r}")
    alg = data.get("alg")
    if alg is not None and alg not in KEY_ALGORITHMS[kind]:
        raise ValueError(f"alg {alg!r} does not fit a {kind} key")
    usable = KEY_ALGORITHMS[kind] & frozenset(allowed)
    if alg is not None:
        usable &= {alg}
    if not usable:
        raise ValueError(f"no allowed algorithm fits this {kind} key")
    try:
        key = jwt.PyJWK(data, algorithm=min(usable)).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"is not a valid JWK ({exc})") from None
    kid = data.get("kid")
    return PublicKey(kid=kid if isinstance(kid, str) else None, key=key, algorithms=usable)
