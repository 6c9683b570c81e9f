"""Authorization codes (RFC 6749 section 4.1.2): random, short-lived, single use.

A code is 256 random bits, base64url; the store keeps only its SHA-256
(:func:`code_hash`), so a copy of the store redeems nothing. It lives
:data:`CODE_TTL` seconds (RFC 6749 advises at most 10 minutes; a browser redirect
takes a few).
"""

from __future__ import annotations

import hashlib
import secrets

CODE_TTL = 60  # seconds
CODE_BYTES = 32  # 256 bits of randomness


def new_code() -> str:
    return secrets.token_urlsafe(CODE_BYTES)


def code_hash(code: str) -> str:
    """The store's key for ``code``: its SHA-256, hex."""
    return hashlib.sha256(code.encode("utf-8", "surrogateescape")).hexdigest()
