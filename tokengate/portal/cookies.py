"""The portal's only memory of a browser: sealed cookies.

``tokengate run --workers N`` runs the portal in every worker, and a browser's next
request may reach any of them, so nothing about a user is kept in a process. What the
portal must remember (a sign-in in progress, then the signed-in session) travels in
cookies sealed with AES-256-GCM: the browser can neither read nor change them. The key
is derived with HKDF-SHA256 from the client secret, which every worker has. Each
cookie's name is authenticated with its value, so one cookie cannot stand in for
another, and each sealed value carries its own expiry.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAX_COOKIE = 4096  # bytes of name=value every browser keeps (RFC 6265 section 6.1)
_INFO = b"tokengate portal cookies v1"
_NONCE = 12


class CookieTooLarge(Exception):
    """A sealed value would not fit in one cookie."""


class Sealer:
    """Seals JSON-able values into cookie values, and opens them again."""

    def __init__(self, secret: str) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
            secret.encode("utf-8")
        )
        self._aead = AESGCM(key)

    def seal(self, name: str, payload: Mapping[str, Any], expires_at: float) -> str:
        """``name``'s value: ``payload`` sealed, good until ``expires_at`` (epoch s).

        Raises :class:`CookieTooLarge` when ``name=value`` would pass 4096 bytes."""
        plain = json.dumps({"exp": int(expires_at), "v": payload}, separators=(",", ":"))
        nonce = os.urandom(_NONCE)
        sealed = nonce + self._aead.encrypt(nonce, plain.encode("utf-8"), name.encode("ascii"))
        value = base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")
        if len(name) + 1 + len(value) > MAX_COOKIE:
            raise CookieTooLarge(f"{name} would be {len(name) + 1 + len(value)} bytes")
        return value

    def open(self, name: str, value: str | None, now: float) -> dict[str, Any] | None:
        """The payload sealed as ``name``; None if absent, altered, another cookie's,
        sealed with another key, or expired."""
        if not value or len(value) > MAX_COOKIE:
            return None
        try:
            sealed = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            plain = self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], name.encode("ascii"))
            document = json.loads(plain)
        except (binascii.Error, ValueError, InvalidTag):
            return None
        if not isinstance(document, dict) or not isinstance(document.get("v"), dict):
            return None
        expiry = document.get("exp")
        if not isinstance(expiry, int) or expiry <= now:
            return None
        return document["v"]  # type: ignore[no-any-return]


def cookie_name(name: str, secure: bool) -> str:
    """``__Host-`` on https: only this host, over https, may set or shadow it."""
    return f"__Host-{name}" if secure else name


def read_cookies(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request's cookies, name -> value; the first of a name repeated."""
    found: dict[str, str] = {}
    for key, value in headers:
        if key != b"cookie":
            continue
        for pair in value.decode("latin-1").split(";"):
            name, sep, cookie = pair.strip().partition("=")
            if sep and name not in found:
                found[name] = cookie.strip()
    return found


def set_cookie(name: str, value: str, *, secure: bool, max_age: int | None = None) -> bytes:
    """A ``Set-Cookie`` value: HttpOnly, SameSite=Lax, Path=/, Secure on https."""
    parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Lax"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts).encode("ascii")


def clear_cookie(name: str, *, secure: bool) -> bytes:
    return set_cookie(name, "", secure=secure, max_age=0)
