"""The demo portal: a web app that signs users in with OpenID Connect and calls an API
with their access token. Raw ASGI, served by ``tokengate run`` beside the echo.

    /          signed out: "Sign in"; signed in: who, "Call the orders API", "Sign out"
    /login     GET: a new authorization request (state, nonce, PKCE S256) -> 303 to it
    /callback  GET: the issuer's answer -> code redeemed -> ID token checked -> session
    /api       POST: the API, called with the access token; refreshed when it has
               expired, or once when the API answers 401; a 401 asking for a stronger
               sign-in (RFC 9470) -> 303 to /login, which asks for its acr_values and
               max_age, and the call is made again once signed in (both remembered in
               sealed cookies: only the portal's own POST starts a step-up)
    /logout    POST: the session cookie cleared -> 303 to the issuer's logout endpoint

It talks to the issuer over HTTP only (:mod:`tokengate.portal.issuer`), keeps no user's
state in the process (:mod:`tokengate.portal.cookies`), and answers every failure with
a page that says what went wrong: 502 when the issuer is down or misbehaves, never a
traceback.
"""

from __future__ import annotations

import hmac
import http.cookiejar
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode

import httpx

from tokengate.asgi import (
    BodyTooLarge,
    ClientDisconnected,
    Headers,
    Receive,
    Scope,
    Send,
    read_body,
    send_bytes,
)
from tokengate.jsonlog import log_event, traceback_frames
from tokengate.portal.api import ApiAnswer, step_up
from tokengate.portal.config import PortalConfig
from tokengate.portal.cookies import (
    CookieTooLarge,
    Sealer,
    clear_cookie,
    cookie_name,
    read_cookies,
    set_cookie,
)
from tokengate.portal.idtoken import IdTokenError
from tokengate.portal.issuer import Issuer, IssuerUnavailable, TokenRefused
from tokengate.portal.pages import HTML, Pages, Paths
from tokengate.portal.renewal import Renewal, SignInAgain, WeakSignIn, token_note
from tokengate.portal.state import BadState, PendingLogin, Session, pkce_challenge

LOGIN_TTL = 600  # seconds a sign-in may take, from "Sign in" to the callback
SENSITIVE = "sensitive"  # the sensitive API: a call to make again after a step-up
THEN_TTL = 60  # seconds a step-up's cookies last: from one page to the next
MAX_FORM = 4096  # bytes of a form post (the forms hold one CSRF token)
HTTP_TIMEOUT = 10.0  # seconds for any call to the issuer or the API


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """The portal's HTTP client keeps no cookies: one user's must never reach another's
    request (httpx's client would replay what it stored)."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


def http_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=HTTP_TIMEOUT,
        follow_redirects=False,
        trust_env=False,
        cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
    )


@dataclass(slots=True)
class Request:
    method: str
    query: dict[str, list[str]]
    cookies: dict[str, str]
    now: float


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    headers: Headers = field(default_factory=list)


Handler = Callable[[Request, Receive], Awaitable[Response]]


class PortalApp:
    def __init__(
        self,
        config: PortalConfig,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.http = http or http_client()
        self.clock = clock
        self.issuer = Issuer(
            config.issuer, config.client_id, config.client_secret, self.http, clock
        )
        self.renewal = Renewal(self.issuer, self.http, config.api_url)
        self.sealer = Sealer(config.client_secret)
        self.secure = config.public_url.startswith("https://")
        self.paths = Paths.of(config.public_url)
        self.pages = Pages(self.paths, config.issuer, config.api_url)
        self.login_cookie = cookie_name("portal_login", self.secure)
        # a step-up the sensitive API asked for (POST /api -> /login), and, after it,
        # the call to make again (/callback -> /): each read once, by the next page
        self.step_up_cookie = cookie_name("portal_step_up", self.secure)
        self.then_cookie = cookie_name("portal_then", self.secure)
        self.session_cookie = cookie_name("portal_session", self.secure)
        self.logout_cookie = cookie_name("portal_logout", self.secure)
        self.routes: dict[str, tuple[str, Handler]] = {
            self.paths.home: ("GET", self.home),
            self.paths.login: ("GET", self.login),
            self.paths.callback: ("GET", self.callback),
            self.paths.api: ("POST", self.call_api),
            self.paths.logout: ("POST", self.logout),
            self.paths.stylesheet: ("GET", self.stylesheet),
        }

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        response = await self._respond(scope, receive)
        headers = [*response.headers, *self.pages.headers]
        if scope["method"] != "HEAD":
            await send_bytes(send, response.status, response.body, headers)
            return
        headers.append((b"content-length", str(len(response.body)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.http.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _respond(self, scope: Scope, receive: Receive) -> Response:
        route = self.routes.get(scope["path"])
        if route is None:
            return self._error(404, "Not found", "There is no such page in the portal.")
        method, handler = route
        if scope["method"] not in (method, "HEAD" if method == "GET" else method):
            response = self._error(405, "Method not allowed", f"This page takes {method}.")
            response.headers.append((b"allow", method.encode()))
            return response
        request = Request(
            method=scope["method"],
            query=parse_qs(scope.get("query_string", b"").decode("latin-1")),
            cookies=read_cookies(scope["headers"]),
            now=self.clock(),
        )
        try:
            return await handler(request, receive)
        except IssuerUnavailable as exc:
            log_event("portal.issuer_unavailable", issuer=self.config.issuer, problem=str(exc))
            return self._error(
                502,
                "The sign-in service is unavailable",
                "The portal could not get a proper answer from its authorization server. "
                "Try again in a moment.",
                str(exc),
            )
        except IdTokenError as exc:
            log_event("portal.id_token_refused", issuer=self.config.issuer, problem=str(exc))
            return self._error(
                502,
                "Sign-in refused",
                "The authorization server's ID token did not pass the portal's checks.",
                str(exc),
                offer_sign_in=True,
            )
        except CookieTooLarge as exc:
            log_event("portal.cookie_too_large", problem=str(exc))
            return self._error(
                500,
                "The session does not fit in a cookie",
                "The tokens the authorization server issued are larger than the 4 KB a "
                "browser keeps in one cookie. Ask for fewer claims or scopes.",
                str(exc),
            )
        except (BodyTooLarge, ClientDisconnected):
            return self._error(413, "Too large", "That form post is too large.")
        except Exception as exc:  # a bug: say so in the log, never show a traceback
            log_event(
                "portal.internal_error",
                path=scope["path"],
                error=type(exc).__name__,
                traceback=traceback_frames(exc),
            )
            return self._error(500, "Something went wrong", "The portal failed; see its log.")

    # ------------------------------------------------------------------ pages

    async def home(self, request: Request, receive: Receive) -> Response:
        headers: Headers = []
        notice = None
        then = self.sealer.open(
            self.then_cookie, request.cookies.get(self.then_cookie), request.now
        )
        if then is not None:
            headers.append(self._clear(self.then_cookie))
            session = self._session(request, headers)
            url = self.config.sensitive_api_url
            if session is not None and url and then.get("t") == SENSITIVE:
                return await self._call(request, session, headers, url)  # after a step-up
        if request.query.get("state"):  # back from the issuer's logout
            pending = self.sealer.open(
                self.logout_cookie, request.cookies.get(self.logout_cookie), request.now
            )
            if pending is not None and hmac.compare_digest(
                str(pending.get("s", "")), request.query["state"][0]
            ):
                notice = "You have signed out."
            headers.append(self._clear(self.logout_cookie))
        session = self._session(request, headers)
        return self._home(request, session, headers, notice=notice)

    async def login(self, request: Request, receive: Receive) -> Response:
        metadata = await self.issuer.metadata()
        done: Headers = []
        sealed = self.sealer.open(
            self.step_up_cookie, request.cookies.get(self.step_up_cookie), request.now
        )
        asked, then = None, ""
        if sealed is not None:  # the sensitive API asked for this sign-in
            done.append(self._clear(self.step_up_cookie))
            asked = step_up(str(sealed.get("a", "")), str(sealed.get("m", "")))
            then = SENSITIVE
        pending = PendingLogin.new(asked.acr_values if asked else (), then)
        params = {
            "response_type": "code",
            "client_id": self.config.client_id,
            "redirect_uri": self.config.redirect_uri,
            "scope": " ".join(self.config.scopes),
            "state": pending.state,
            "nonce": pending.nonce,
            "code_challenge": pkce_challenge(pending.verifier),
            "code_challenge_method": "S256",
        }
        if asked is not None and asked.acr_values:
            params["acr_values"] = " ".join(asked.acr_values)
        if asked is not None and asked.max_age is not None:
            params["max_age"] = str(asked.max_age)
        endpoint = metadata.authorization_endpoint
        location = endpoint + ("&" if "?" in endpoint else "?") + urlencode(params)
        cookie = self.sealer.seal(self.login_cookie, pending.dump(), request.now + LOGIN_TTL)
        return self._redirect(location, [*done, self._cookie(self.login_cookie, cookie, LOGIN_TTL)])

    async def callback(self, request: Request, receive: Receive) -> Response:
        done = [self._clear(self.login_cookie)]
        sealed = self.sealer.open(
            self.login_cookie, request.cookies.get(self.login_cookie), request.now
        )
        try:
            pending = None if sealed is None else PendingLogin.load(sealed)
        except BadState:  # sealed by another version of the portal
            pending = None
        if pending is None:
            return self._error(
                400,
                "No sign-in in progress",
                "This browser has no sign-in in progress: it took longer than "
                f"{LOGIN_TTL // 60} minutes, or started elsewhere. Sign in again.",
                offer_sign_in=True,
                headers=done,
            )
        params = {k: v[0] for k, v in request.query.items()}
        if any(len(v) > 1 for v in request.query.values()) or not hmac.compare_digest(
            params.get("state", ""), pending.state
        ):
            return self._error(
                400,
                "Sign-in failed",
                "The answer does not belong to the sign-in this browser started.",
                "state mismatch",
                offer_sign_in=True,
                headers=done,
            )
        metadata = await self.issuer.metadata()
        iss = params.get("iss")
        if (iss is None and metadata.iss_parameter) or (iss is not None and iss != metadata.issuer):
            return self._error(
                400,
                "Sign-in failed",
                "The answer does not come from the portal's authorization server (RFC 9207).",
                f"iss: {iss!r}",
                offer_sign_in=True,
                headers=done,
            )
        if "error" in params:
            error = params["error"][:100]
            description = params.get("error_description", "")[:300]
            log_event("portal.signin_failed", error=error)
            return self._error(
                400 if error != "access_denied" else 403,
                "The authorization server refused the sign-in",
                description or "It gave no reason.",
                error,
                offer_sign_in=True,
                headers=done,
            )
        code = params.get("code")
        if not code:
            return self._error(400, "Sign-in failed", "The answer has no code.", headers=done)
        try:
            tokens = await self.issuer.redeem_code(code, self.config.redirect_uri, pending.verifier)
        except TokenRefused as exc:
            log_event("portal.signin_failed", error=exc.error)
            return self._error(
                400,
                "Sign-in failed",
                "The authorization server would not redeem the code.",
                str(exc),
                offer_sign_in=True,
                headers=done,
            )
        try:
            session = await self.renewal.start(
                tokens, pending.nonce, request.now, pending.acr_values
            )
        except WeakSignIn as exc:
            return self._error(
                403,
                "Sign-in not strong enough",
                "The authorization server signed you in, but not in the way this action "
                "needs (a second factor).",
                str(exc),
                offer_sign_in=True,
                headers=done,
            )
        cookie = self.sealer.seal(self.session_cookie, session.dump(), session.ends_at)
        done.append(self._cookie(self.session_cookie, cookie))
        if pending.then == SENSITIVE:  # the call this sign-in was for, on the next page
            then = self.sealer.seal(self.then_cookie, {"t": SENSITIVE}, request.now + THEN_TTL)
            done.append(self._cookie(self.then_cookie, then, THEN_TTL))
        return self._redirect(self.paths.home, done)

    async def call_api(self, request: Request, receive: Receive) -> Response:
        headers: Headers = []
        session = self._session(request, headers)
        form = await self._form(receive)
        if session is None:
            return self._signed_out(headers, "You are not signed in.")
        if not self._csrf_ok(session, form):
            return self._stale_form()
        url = self.config.api_url
        if form.get("api") == SENSITIVE and self.config.sensitive_api_url:
            url = self.config.sensitive_api_url
        return await self._call(request, session, headers, url)

    async def _call(
        self, request: Request, session: Session, headers: Headers, url: str
    ) -> Response:
        started = session
        try:
            answer, session = await self.renewal.call_api(session, request.now, url)
        except SignInAgain as exc:
            return self._signed_out(headers, str(exc), clear=True)
        if session is not started:  # refreshed: the new tokens replace the old
            sealed = self.sealer.seal(self.session_cookie, session.dump(), session.ends_at)
            headers.append(self._cookie(self.session_cookie, sealed))
        if answer.step_up is not None and url == self.config.sensitive_api_url:
            # RFC 9470: sign in again as the API asks, then make this call again
            asked = {
                "a": " ".join(answer.step_up.acr_values),
                "m": "" if answer.step_up.max_age is None else str(answer.step_up.max_age),
            }
            sealed = self.sealer.seal(self.step_up_cookie, asked, request.now + THEN_TTL)
            headers.append(self._cookie(self.step_up_cookie, sealed, THEN_TTL))
            return self._redirect(self.paths.login, headers)
        status = 200 if answer.status is not None else 502
        return self._home(request, session, headers, answer=answer, status=status, url=url)

    async def logout(self, request: Request, receive: Receive) -> Response:
        headers: Headers = []
        session = self._session(request, headers)
        form = await self._form(receive)
        if session is None:
            return self._redirect(self.paths.home, headers)
        if not self._csrf_ok(session, form):
            return self._stale_form()
        headers.append(self._clear(self.session_cookie))
        if session.tokens.refresh_token is not None:
            try:  # a refresh token (offline_access) would outlive the issuer's session
                await self.issuer.revoke(session.tokens.refresh_token)
            except IssuerUnavailable as exc:
                log_event("portal.revoke_failed", problem=str(exc))
        state = secrets.token_urlsafe(16)
        sealed = self.sealer.seal(self.logout_cookie, {"s": state}, request.now + LOGIN_TTL)
        headers.append(self._cookie(self.logout_cookie, sealed, LOGIN_TTL))
        try:
            end_session = (await self.issuer.metadata()).end_session_endpoint
        except IssuerUnavailable:
            end_session = None
        if end_session is None:  # signed out of the portal only
            return self._redirect(f"{self.paths.home}?{urlencode({'state': state})}", headers)
        params = {
            "id_token_hint": session.tokens.id_token,
            "client_id": self.config.client_id,
            "post_logout_redirect_uri": self.config.post_logout_redirect_uri,
            "state": state,
        }
        separator = "&" if "?" in end_session else "?"
        return self._redirect(end_session + separator + urlencode(params), headers)

    async def stylesheet(self, request: Request, receive: Receive) -> Response:
        return Response(
            200,
            self.pages.stylesheet,
            [(b"content-type", b"text/css; charset=utf-8")],
        )

    # ------------------------------------------------------------------ helpers

    def _session(self, request: Request, headers: Headers) -> Session | None:
        """The signed-in session the request's cookie holds; a cookie that does not
        open (expired, altered, sealed with an old secret) is cleared."""
        value = request.cookies.get(self.session_cookie)
        if value is None:
            return None
        sealed = self.sealer.open(self.session_cookie, value, request.now)
        try:
            session = None if sealed is None else Session.load(sealed)
        except BadState:
            session = None
        if session is None:
            headers.append(self._clear(self.session_cookie))
        return session

    async def _form(self, receive: Receive) -> dict[str, str]:
        body = await read_body(receive, MAX_FORM)
        return {k: v[0] for k, v in parse_qs(body.decode("latin-1")).items()}

    @staticmethod
    def _csrf_ok(session: Session, form: dict[str, str]) -> bool:
        return hmac.compare_digest(form.get("csrf_token", "").encode(), session.csrf.encode())

    def _cookie(self, name: str, value: str, max_age: int | None = None) -> tuple[bytes, bytes]:
        return (b"set-cookie", set_cookie(name, value, secure=self.secure, max_age=max_age))

    def _clear(self, name: str) -> tuple[bytes, bytes]:
        return (b"set-cookie", clear_cookie(name, secure=self.secure))

    def _home(
        self,
        request: Request,
        session: Session | None,
        headers: Headers,
        *,
        notice: str | None = None,
        answer: ApiAnswer | None = None,
        status: int = 200,
        url: str | None = None,
    ) -> Response:
        context: dict[str, Any] = {
            "notice": notice,
            "profile": None,
            "answer": answer,
            "called": url or self.config.api_url,
            "sensitive_api_url": self.config.sensitive_api_url,
        }
        if session is not None:
            context.update(
                profile=session.profile,
                csrf_token=session.csrf,
                token_note=token_note(session.tokens, request.now),
            )
        body = self.pages.render("home.html", **context)
        return Response(status, body, [HTML, *headers])

    def _signed_out(self, headers: Headers, message: str, *, clear: bool = False) -> Response:
        if clear:
            headers.append(self._clear(self.session_cookie))
        return self._error(401, "Please sign in", message, offer_sign_in=True, headers=headers)

    def _stale_form(self) -> Response:
        return self._error(
            403,
            "This form has expired",
            "The form was not this session's (its CSRF token did not match). Go back to "
            "the portal and try again.",
        )

    def _error(
        self,
        status: int,
        title: str,
        message: str,
        detail: str | None = None,
        *,
        offer_sign_in: bool = False,
        headers: Headers | None = None,
    ) -> Response:
        body = self.pages.render(
            "error.html", title=title, message=message, detail=detail, offer_sign_in=offer_sign_in
        )
        return Response(status, body, [HTML, *(headers or [])])

    @staticmethod
    def _redirect(location: str, headers: Headers) -> Response:
        return Response(303, b"", [(b"location", location.encode("latin-1")), *headers])
