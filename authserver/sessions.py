"""The org-wide browser session: one sign-in serves every server and client (SSO).

The cookie holds 256 random bits; the store holds only their SHA-256
(:func:`session_hash`), so a copy of the store signs no one in. A session ends
``idle_timeout`` after its last use or ``max_lifetime`` after the sign-in, whichever
comes first. The cookie is ``HttpOnly`` and ``SameSite=Lax``, on ``Path=/``; when the
public URL is https it is also ``Secure`` with the ``__Host-`` prefix, which browsers
accept only from a secure origin, with ``Path=/`` and no ``Domain``: no sibling host can
set or shadow it. It carries no ``Max-Age``: it ends with the browser too.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from authserver.config import SessionTimes
from authserver.store import SessionRecord

SESSION_BYTES = 32  # 256 bits of randomness in the cookie
COOKIE = "tg_session"
SECURE_COOKIE = "__Host-tg_session"
# a browser that gave a second factor: remembered for sign-on's mfa_if.new_device
DEVICE_COOKIE = "tg_device"
SECURE_DEVICE_COOKIE = "__Host-tg_device"
DEVICE_MAX_AGE = 180 * 86400  # seconds; the store forgets an unused device as long after
_VALUE = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True, slots=True)
class NewSession:
    cookie_value: str  # for the browser only; never logged, never stored
    session_hash: str
    record: SessionRecord


def session_hash(cookie_value: str) -> str:
    """The store's key for a session cookie's value: its SHA-256, hex."""
    return hashlib.sha256(cookie_value.encode("ascii")).hexdigest()


def new_session(
    user_id: str,
    now: int,
    policy: SessionTimes,
    sid: str | None = None,
    amr: tuple[str, ...] = ("pwd",),
) -> NewSession:
    """A session for a user who has just signed in: a fresh cookie value every time.
    ``sid``: the one of the session this sign-in replaces, for the same user (what
    was issued in it lives on); ``amr``: how the user signed in (RFC 8176)."""
    value = secrets.token_urlsafe(SESSION_BYTES)
    expires_at = now + policy.max_lifetime
    record = SessionRecord(
        sid=sid or secrets.token_urlsafe(16),
        user_id=user_id,
        auth_time=now,
        created_at=now,
        expires_at=expires_at,
        idle_expires_at=min(now + policy.idle_timeout, expires_at),
        amr=amr,
    )
    return NewSession(value, session_hash(value), record)


def cookie_name(secure: bool) -> str:
    return SECURE_COOKIE if secure else COOKIE


def set_cookie(value: str, *, secure: bool) -> bytes:
    """A ``Set-Cookie`` value that gives the browser the session."""
    flags = "; Secure" if secure else ""
    return f"{cookie_name(secure)}={value}; Path=/; HttpOnly; SameSite=Lax{flags}".encode()


def device_cookie_name(secure: bool) -> str:
    return SECURE_DEVICE_COOKIE if secure else DEVICE_COOKIE


def set_device_cookie(value: str, *, secure: bool) -> bytes:
    """A ``Set-Cookie`` value that lets the browser be recognised as a known device
    (256 random bits; the store keeps their SHA-256 per user)."""
    flags = "; Secure" if secure else ""
    name = device_cookie_name(secure)
    return (
        f"{name}={value}; Path=/; Max-Age={DEVICE_MAX_AGE}; HttpOnly; SameSite=Lax{flags}".encode()
    )


def clear_cookie(*, secure: bool) -> bytes:
    """A ``Set-Cookie`` value that removes the session cookie."""
    flags = "; Secure" if secure else ""
    return f"{cookie_name(secure)}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{flags}".encode()


def read_cookie(cookie_headers: list[bytes], name: str) -> str | None:
    """The value of cookie ``name`` from the request's ``Cookie`` headers; None when it
    is absent, malformed or sent more than once (which one would be the real one?)."""
    found: list[str] = []
    for header in cookie_headers:
        for pair in header.decode("latin-1").split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key == name:
                found.append(value)
    if len(found) != 1:
        return None
    return found[0]


def valid_session_value(value: str | None) -> bool:
    return value is not None and _VALUE.fullmatch(value) is not None
