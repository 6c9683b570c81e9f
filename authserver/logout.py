"""``{issuer}/v1/logout``: OpenID Connect RP-Initiated Logout 1.0.

The session ends (store record gone, cookie cleared) and the refresh tokens issued
in it without ``offline_access`` stop working, with the access tokens they gave.

Redirects go only to a ``post_logout_redirect_uri`` registered for the client that
a valid ``id_token_hint`` names (its ``aud``; signed by this server; expired is
fine), with ``state``; otherwise the browser sees a signed-out page. A hint this
server did not sign counts as none, and an unregistered URI is never followed, never
echoed: the user is still signed out (after confirming, without a hint), as asked.

A request whose ``id_token_hint`` names the session (its ``sid``) signs out at
once: the client that holds that ID token asked. Any other request that would end a
session (no hint, or another session's) is first confirmed by the user on a page
whose form carries a token derived from the session cookie itself, so another site
cannot sign the user out (logout CSRF): it can neither read the cookie nor the page.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from authserver.config import ClientConfig, ServerConfig
from authserver.errors import OAuthError
from authserver.keyring import KeyRing
from authserver.oidc import verify_id_token_hint
from authserver.pageheaders import HTML, origin_of, page_headers
from authserver.sessions import (
    clear_cookie,
    cookie_name,
    read_cookie,
    session_hash,
    valid_session_value,
)
from authserver.signin import SignIn
from authserver.store import SessionRecord, StoreUnavailable
from tokengate.asgi import Headers, Receive, Scope, Send, send_bytes
from tokengate.jsonlog import AuditLog, log_event

CARRIED = ("id_token_hint", "post_logout_redirect_uri", "state", "client_id")
MAX_PARAM = 8192  # characters of a logout parameter accepted


class Logout:
    def __init__(
        self,
        *,
        signin: SignIn,
        keyring: KeyRing,
        audit: AuditLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signin = signin
        self.keyring = keyring
        self.audit = audit
        self.clock = clock

    async def __call__(
        self, server: ServerConfig, scope: Scope, receive: Receive, send: Send
    ) -> None:
        try:
            await self._logout(server, scope, receive, send)
        except StoreUnavailable as exc:
            log_event("authserver.store_unavailable", error=str(exc))
            await self.signin.error_page(
                send, "temporarily_unavailable", "Signing out is unavailable; try again soon.", 503
            )

    async def _logout(
        self, server: ServerConfig, scope: Scope, receive: Receive, send: Send
    ) -> None:
        pages = self.signin
        if scope["method"] not in ("GET", "POST"):
            await pages.error_page(send, "invalid_request", "Use GET or POST.", 405)
            return
        try:
            params = dict(await pages.parameters(scope, receive))
        except OAuthError as exc:
            await pages.error_page(send, exc.error, exc.description, 400)
            return
        if any(len(v) > MAX_PARAM for v in params.values()):
            await pages.error_page(send, "invalid_request", "A parameter is too long.", 400)
            return
        hint = params.get("id_token_hint")
        keys = self.keyring.current(server.name)
        claims = verify_id_token_hint(hint, server, keys) if hint else None  # None: not ours
        client = self._client(server, claims, params.get("client_id"))
        redirect = params.get("post_logout_redirect_uri")
        if redirect is not None and (
            client is None or redirect not in client.post_logout_redirect_uris
        ):
            redirect = None  # never an unregistered one: the signed-out page instead
        now = int(self.clock())
        cookie = read_cookie(_cookies(scope), cookie_name(pages.secure))
        session = None
        if valid_session_value(cookie):
            assert cookie is not None
            session = await pages.io_call(
                pages.store.touch_session,
                session_hash(cookie),
                now,
                pages.config.sessions.idle_timeout,
            )
        if session is not None:
            assert cookie is not None
            hinted = claims is not None and claims.get("sid") == session.sid
            if not hinted and not self._confirmed(scope, params, cookie):
                await self._confirm(send, server, params, cookie, redirect)
                return
            await self._end(server, scope, session, cookie, client, now)
        headers: Headers = [(b"set-cookie", clear_cookie(secure=pages.secure))]
        # a sign-in still in progress in this browser ends too: nothing it proved lives on
        signin = read_cookie(_cookies(scope), pages.signin_cookie)
        if valid_session_value(signin):
            assert signin is not None
            await pages.io_call(pages.store.end_interaction, session_hash(signin))
            headers.append((b"set-cookie", pages.signin_cookie_header("", clear=True)))
        if redirect is not None:
            target = redirect
            if "state" in params:
                joiner = "&" if "?" in redirect else "?"
                target += joiner + urlencode({"state": params["state"]})
            await send_bytes(
                send, 303, b"", [(b"location", target.encode()), *headers, *page_headers()]
            )
            return
        body = pages.render("signed_out.html")
        await send_bytes(send, 200, body, [HTML, *headers, *page_headers()])

    def _client(
        self, server: ServerConfig, claims: dict[str, Any] | None, client_id: str | None
    ) -> ClientConfig | None:
        """The client a valid hint names (its ``aud``); None without one, or when
        ``client_id`` names another."""
        if claims is None or (client_id is not None and client_id != claims["aud"]):
            return None
        client = self.signin.clients.get(claims["aud"])
        return client if client is not None and server.name in client.servers else None

    def _confirmed(self, scope: Scope, params: dict[str, str], cookie: str) -> bool:
        return (
            scope["method"] == "POST"
            and params.get("confirm") == "yes"
            and hmac.compare_digest(params.get("csrf_token", "").encode(), _csrf(cookie).encode())
        )

    async def _confirm(
        self,
        send: Send,
        server: ServerConfig,
        params: dict[str, str],
        cookie: str,
        redirect: str | None,
    ) -> None:
        body = self.signin.render(
            "signout.html",
            action=server.end_session_endpoint,
            csrf_token=_csrf(cookie),
            carried=[(k, params[k]) for k in CARRIED if k in params],
        )
        # the form's answer may redirect to the client: CSP form-action covers redirects
        target = origin_of(redirect) if redirect is not None else None
        await send_bytes(send, 200, body, [HTML, *page_headers(target)])

    async def _end(
        self,
        server: ServerConfig,
        scope: Scope,
        session: SessionRecord,
        cookie: str,
        client: ClientConfig | None,
        now: int,
    ) -> None:
        pages = self.signin
        await pages.io_call(pages.store.end_session, session_hash(cookie))
        revoked = await pages.io_call(pages.store.end_session_grants, session.sid, now)
        user = await pages.users.get(session.user_id)
        event = {
            "server": server.name,
            "client_id": client.client_id if client is not None else None,
            "user_id": session.user_id,
            "username": user.username if user is not None else None,
            "remote_addr": pages.proxies.origin_of(scope).client,
        }
        self.audit.emit("user.signout", **event, outcome="success", reason="ok")
        self.audit.emit(
            "session.ended", **event, sid=session.sid, reason="logout", revoked=len(revoked)
        )


def _csrf(cookie: str) -> str:
    """The logout form's token: only a page that knows the session cookie has it."""
    return hmac.new(cookie.encode(), b"tokengate logout", hashlib.sha256).hexdigest()


def _cookies(scope: Scope) -> list[bytes]:
    return [value for name, value in scope["headers"] if name == b"cookie"]
