"""A session's tokens over its life: made from a code's tokens, used to call the API,
renewed with the refresh token when the access token has expired or the API refuses
it (OAuth 2.0 section 6; the refresh token rotates, OIDC Core section 12.2 for the ID
token a refresh may bring).
"""

from __future__ import annotations

import secrets
from typing import Any

import httpx

from tokengate.jsonlog import log_event
from tokengate.portal.api import ApiAnswer, call_api
from tokengate.portal.issuer import (
    Issuer,
    IssuerUnavailable,
    TokenRefused,
    TokenResponse,
    UserinfoRefused,
)
from tokengate.portal.state import Profile, Session, Tokens

SESSION_TTL = 86400  # seconds a portal session lasts at most, refreshes or not
EXPIRY_MARGIN = 1  # seconds before its expiry an access token is refreshed


class SignInAgain(Exception):
    """The session cannot go on (no refresh token, or the issuer refused it)."""


class WeakSignIn(Exception):
    """A step-up sign-in whose ID token's ``acr`` is none of those asked for."""


def expires_at(now: float, expires_in: int | None) -> int | None:
    return None if expires_in is None else int(now) + expires_in


def _span(seconds: float) -> str:
    return f"{int(seconds)} s" if seconds < 120 else f"{int(seconds // 60)} min"


def token_note(tokens: Tokens, now: float) -> str:
    """What the page says about the access token's life."""
    if tokens.expires_at is None:
        when = "The access token lasts as long as the issuer lets it"
    elif tokens.expires_at > now:
        when = f"The access token expires in {_span(tokens.expires_at - now)}"
    else:
        when = f"The access token expired {_span(now - tokens.expires_at)} ago"
    if tokens.refresh_token is None:
        return f"{when}; without a refresh token, you will sign in again then."
    return f"{when}; a refresh token renews it."


class Renewal:
    def __init__(self, issuer: Issuer, http: httpx.AsyncClient, api_url: str) -> None:
        self.issuer = issuer
        self.http = http
        self.api_url = api_url

    async def start(
        self, answer: TokenResponse, nonce: str, now: float, acr_values: tuple[str, ...] = ()
    ) -> Session:
        """A new session from a redeemed code: its ID token checked against the nonce
        sent (and, after a step-up, its ``acr`` against those asked for: OIDC Core
        3.1.3.7 leaves that check to the app), who signed in from it and userinfo."""
        if answer.id_token is None:
            raise IssuerUnavailable("code exchange: no id_token in the answer")
        claims = await self.issuer.check_id_token(
            answer.id_token, nonce=nonce, access_token=answer.access_token
        )
        if acr_values and claims.get("acr") not in acr_values:
            raise WeakSignIn(f"acr {claims.get('acr')!r}, asked for {' '.join(acr_values)}")
        userinfo = await self._userinfo(answer.access_token, claims["sub"])
        tokens = Tokens(
            answer.access_token,
            expires_at(now, answer.expires_in),
            answer.refresh_token,
            answer.id_token,
        )
        profile = Profile.from_claims(claims, userinfo)
        return Session(tokens, profile, secrets.token_urlsafe(32), int(now) + SESSION_TTL)

    async def call_api(
        self, session: Session, now: float, url: str | None = None
    ) -> tuple[ApiAnswer, Session]:
        """The API's answer (``url``, else the orders API), and the session after it
        (refreshed, or as it was): refreshed first when the access token has expired,
        and once more when the API answers 401 to a token not refreshed yet, unless
        the 401 asks for a stronger sign-in (which no refresh gives)."""
        url = url or self.api_url
        refreshed = False
        end = session.tokens.expires_at
        if end is not None and now >= end - EXPIRY_MARGIN:
            session, refreshed = await self.refresh(session, now), True
        answer = await call_api(self.http, url, session.tokens.access_token)
        if (
            answer.status == 401
            and answer.step_up is None
            and not refreshed
            and session.tokens.refresh_token is not None
        ):
            session, refreshed = await self.refresh(session, now), True
            answer = await call_api(self.http, url, session.tokens.access_token)
        return ApiAnswer(answer.status, answer.body, refreshed, answer.step_up), session

    async def refresh(self, session: Session, now: float) -> Session:
        """New tokens for the session's refresh token; the new refresh token (rotation)
        replaces the old, a new ID token must be the same user's."""
        old = session.tokens
        if old.refresh_token is None:
            raise SignInAgain(
                "Your access token has expired and the portal has no refresh token: sign in again."
            )
        try:
            answer = await self.issuer.refresh(old.refresh_token)
        except TokenRefused as exc:
            log_event("portal.refresh_refused", error=exc.error)
            raise SignInAgain(
                f"The authorization server ended your session ({exc.error}): sign in again."
            ) from None
        id_token = old.id_token
        if answer.id_token is not None:
            claims = await self.issuer.check_id_token(
                answer.id_token, nonce=None, access_token=answer.access_token
            )
            if claims["sub"] != session.profile.sub:
                raise SignInAgain("The refreshed tokens are another user's: sign in again.")
            id_token = answer.id_token
        tokens = Tokens(
            answer.access_token,
            expires_at(now, answer.expires_in),
            answer.refresh_token or old.refresh_token,
            id_token,
        )
        return Session(tokens, session.profile, session.csrf, session.ends_at)

    async def _userinfo(self, access_token: str, sub: str) -> dict[str, Any]:
        """Userinfo's claims; {} (the ID token's alone are shown) when it fails."""
        try:
            return await self.issuer.userinfo(access_token, sub)
        except (UserinfoRefused, IssuerUnavailable) as exc:
            log_event("portal.userinfo_failed", problem=str(exc))
            return {}
