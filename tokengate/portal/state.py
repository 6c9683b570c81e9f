"""What the portal remembers about a browser, as plain data: a sign-in in progress and
a signed-in session. Each is small on purpose: it travels in a sealed cookie.

Also the values a sign-in needs fresh each time: ``state``, ``nonce`` and the PKCE
verifier with its S256 challenge (RFC 7636 section 4).
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def pkce_challenge(verifier: str) -> str:
    """``BASE64URL(SHA256(ASCII(code_verifier)))`` (RFC 7636 section 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_verifier() -> str:
    """43 characters from the unreserved set: 256 random bits (RFC 7636 section 4.1)."""
    return secrets.token_urlsafe(32)


class BadState(Exception):
    """A sealed value that opened, but does not hold what it should."""


def _text(document: Mapping[str, Any], key: str) -> str:
    value = document.get(key)
    if not isinstance(value, str) or not value:
        raise BadState(key)
    return value


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """An authorization request sent, its answer not yet back."""

    state: str
    nonce: str
    verifier: str
    acr_values: tuple[str, ...] = ()  # a step-up: the sign-in must reach one of these
    then: str = ""  # what to do once signed in ("sensitive": call that API again)

    @classmethod
    def new(cls, acr_values: tuple[str, ...] = (), then: str = "") -> PendingLogin:
        return cls(
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(32),
            new_verifier(),
            acr_values,
            then,
        )

    def dump(self) -> dict[str, Any]:
        return {
            "s": self.state,
            "n": self.nonce,
            "v": self.verifier,
            "a": list(self.acr_values),
            "t": self.then,
        }

    @classmethod
    def load(cls, document: Mapping[str, Any]) -> PendingLogin:
        acr = document.get("a", [])
        then = document.get("t", "")
        if not isinstance(acr, list) or not all(isinstance(a, str) for a in acr):
            raise BadState("acr_values")
        if not isinstance(then, str):
            raise BadState("then")
        return cls(
            _text(document, "s"), _text(document, "n"), _text(document, "v"), tuple(acr), then
        )


@dataclass(frozen=True, slots=True)
class Profile:
    """Who signed in, as the page shows it: from the ID token and userinfo."""

    sub: str
    name: str | None = None
    email: str | None = None
    username: str | None = None
    groups: tuple[str, ...] = ()
    sources: tuple[str, ...] = ("ID token",)

    @classmethod
    def from_claims(cls, id_claims: Mapping[str, Any], userinfo: Mapping[str, Any]) -> Profile:
        """Userinfo's values over the ID token's (OIDC Core 5.3.2: same ``sub`` only)."""
        merged = {**id_claims, **userinfo}

        def text(key: str) -> str | None:
            value = merged.get(key)
            return value if isinstance(value, str) and value else None

        raw_groups = merged.get("groups")
        groups = (
            tuple(g for g in raw_groups if isinstance(g, str))
            if isinstance(raw_groups, list)
            else ()
        )
        return cls(
            sub=str(id_claims["sub"]),
            name=text("name"),
            email=text("email"),
            username=text("preferred_username"),
            groups=groups,
            sources=("ID token", "userinfo") if userinfo else ("ID token",),
        )

    def dump(self) -> dict[str, Any]:
        return {
            "sub": self.sub,
            "name": self.name,
            "email": self.email,
            "u": self.username,
            "g": list(self.groups),
            "src": list(self.sources),
        }

    @classmethod
    def load(cls, document: Mapping[str, Any]) -> Profile:
        def optional(key: str) -> str | None:
            value = document.get(key)
            return value if isinstance(value, str) else None

        groups, sources = document.get("g"), document.get("src")
        if not isinstance(groups, list) or not isinstance(sources, list):
            raise BadState("profile")
        return cls(
            sub=_text(document, "sub"),
            name=optional("name"),
            email=optional("email"),
            username=optional("u"),
            groups=tuple(str(g) for g in groups),
            sources=tuple(str(s) for s in sources),
        )


@dataclass(frozen=True, slots=True)
class Tokens:
    """What the token endpoint answered, as far as the portal keeps it."""

    access_token: str
    expires_at: int | None  # epoch seconds, refreshed from then on; None: not said
    refresh_token: str | None
    id_token: str  # the latest; sent as id_token_hint at sign-out


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser: its tokens, who it is, its forms' CSRF token, and when it
    ends whatever happens (refreshes do not move that)."""

    tokens: Tokens
    profile: Profile
    csrf: str
    ends_at: int

    def dump(self) -> dict[str, Any]:
        return {
            "at": self.tokens.access_token,
            "exp": self.tokens.expires_at,
            "rt": self.tokens.refresh_token,
            "id": self.tokens.id_token,
            "p": self.profile.dump(),
            "csrf": self.csrf,
            "end": self.ends_at,
        }

    @classmethod
    def load(cls, document: Mapping[str, Any]) -> Session:
        expires_at, refresh, profile = document.get("exp"), document.get("rt"), document.get("p")
        ends_at = document.get("end")
        if expires_at is not None and not isinstance(expires_at, int):
            raise BadState("exp")
        if not isinstance(profile, dict) or not isinstance(ends_at, int):
            raise BadState("session")
        if refresh is not None and not isinstance(refresh, str):
            raise BadState("rt")
        tokens = Tokens(_text(document, "at"), expires_at, refresh, _text(document, "id"))
        return cls(tokens, Profile.load(profile), _text(document, "csrf"), ends_at)
