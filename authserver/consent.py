"""Consent (Okta's "require consent" per app): which scopes a user must grant a
client on the consent page before it gets a code. Pure."""

from __future__ import annotations

from collections.abc import Collection

from authserver.authorize import AuthorizeRequest

# What the consent page says each built-in scope lets the application do.
DESCRIPTIONS = {
    "openid": "Know who you are (your user id)",
    "profile": "See your name and profile",
    "email": "See your email address",
    "address": "See your postal address",
    "phone": "See your phone number",
    "offline_access": "Keep access while you are away (until you sign out of it)",
}


def needs_consent(request: AuthorizeRequest, granted: Collection[str]) -> bool:
    """A client that requires consent asks when a scope was never granted, or when the
    request says ``prompt=consent``."""
    if request.client.consent != "required":
        return False
    return request.ask_consent or not set(request.scopes) <= set(granted)


def described(scopes: Collection[str]) -> list[tuple[str, str]]:
    """(scope, what it allows) for the page, in the request's order."""
    return [(scope, DESCRIPTIONS.get(scope, f"Use {scope}")) for scope in scopes]
