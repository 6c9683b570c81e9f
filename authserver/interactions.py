"""A sign-in in progress on the hosted pages, and where those pages live.

The browser holds a sign-in cookie; the store holds, under its hash, the checked
authorization request, the pages' CSRF token and what the sign-in has proved so far
(whose password, a second factor). The sign-in and second-factor pages both read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from authserver.authorize import AuthorizeRequest


@dataclass(frozen=True, slots=True)
class InProgress:
    """A sign-in in progress: its checked authorization request, the sign-in cookie's
    value, its forms' CSRF token, and what it has proved (None: nothing yet), also as
    stored (to replace it only if no other request has meanwhile)."""

    request: AuthorizeRequest
    cookie: str
    csrf: str
    progress: dict[str, Any] | None
    stored: str | None = None


@dataclass(frozen=True, slots=True)
class Paths:
    """Where the sign-in pages live, under the public URL's path."""

    login: str
    consent: str
    stylesheet: str
    brand_stylesheet: str
    mfa: str  # the second factor's challenge
    mfa_enroll: str  # enrolling an authenticator app
    mfa_continue: str  # on from the recovery codes page
    passkey_enroll: str  # creating a passkey
    passkey_verify: str  # a passkey's signature: a second factor, or a sign-in alone
    passkey_script: str  # the pages' one script: the browser's WebAuthn calls

    @classmethod
    def of(cls, public_url: str) -> Paths:
        base = urlsplit(public_url).path.rstrip("/") + "/signin"
        return cls(
            f"{base}/login",
            f"{base}/consent",
            f"{base}/static/signin.css",
            f"{base}/static/brand.css",
            f"{base}/mfa",
            f"{base}/mfa/enroll",
            f"{base}/mfa/continue",
            f"{base}/passkey/enroll",
            f"{base}/passkey/verify",
            f"{base}/static/passkey.js",
        )
