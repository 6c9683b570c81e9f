"""Proof Key for Code Exchange (RFC 7636), ``S256`` only.

Two checks, one per end of the authorization code flow:

- :func:`parse_challenge`, at the authorization endpoint (RFC 7636 section 4.3):
  ``code_challenge_method`` must be ``S256``; ``plain`` is refused always (RFC 9700
  section 2.1.1: it protects nothing against an attacker who reads the request), and
  so is a challenge without a method, whose default (section 4.3) is ``plain``. A
  missing challenge is refused unless the client's policy allows it.
- :func:`verifier_matches`, at the token endpoint (section 4.6): the verifier is 43-128
  characters of the unreserved set (section 4.1), and its SHA-256, base64url without
  padding, equals the stored challenge, compared in constant time. A verifier sent for
  a code that had no challenge is refused too (RFC 9700 section 2.1.1: a downgrade).

Every refusal is an :class:`OAuthError` ``invalid_request`` (authorization endpoint)
or ``invalid_grant`` (token endpoint), with a fixed description.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from authserver.errors import OAuthError, invalid_request

S256 = "S256"
METHODS = (S256,)  # code_challenge_methods_supported
# RFC 7636 section 4.1: code-verifier = 43*128unreserved
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
# A base64url SHA-256 without padding: 43 characters; the last holds 4 bits of data
# and 2 zero bits, so only 16 letters can end a canonical encoding.
_S256_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")


def s256(verifier: str) -> str:
    """BASE64URL-ENCODE(SHA256(ASCII(code_verifier))), section 4.2."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def parse_challenge(challenge: str | None, method: str | None, *, required: bool) -> str | None:
    """The challenge to bind to the code, or None when the request sent none and
    ``required`` is false (a confidential client with ``require_pkce: false``)."""
    if challenge is None:
        if method is not None:
            raise invalid_request("code_challenge_method was sent without code_challenge")
        if required:
            raise invalid_request("code_challenge is required (PKCE, method S256)")
        return None
    if method is None:
        raise invalid_request("code_challenge_method is required; the only supported one is S256")
    if method != S256:
        raise invalid_request("code_challenge_method must be S256")
    if not _S256_CHALLENGE.fullmatch(challenge):
        raise invalid_request("code_challenge must be a base64url SHA-256 (43 characters)")
    return challenge


def verifier_matches(challenge: str | None, verifier: str | None) -> None:
    """Raise ``invalid_grant`` unless ``verifier`` proves ``challenge`` (section 4.6)."""
    if challenge is None:
        if verifier is not None:
            raise OAuthError("invalid_grant", "code_verifier sent for a code without PKCE")
        return
    if verifier is None:
        raise OAuthError("invalid_grant", "code_verifier is required")
    if not _VERIFIER.fullmatch(verifier):
        raise OAuthError(
            "invalid_grant", "code_verifier must be 43-128 characters of A-Z a-z 0-9 - . _ ~"
        )
    if not hmac.compare_digest(s256(verifier).encode(), challenge.encode()):
        raise OAuthError("invalid_grant", "code_verifier does not match code_challenge")
