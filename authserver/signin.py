"""The authorization endpoint and the hosted sign-in page: request -> session or
password -> code -> back to the client.

``{issuer}/v1/authorize`` checks the request (:mod:`authserver.authorize`). With a
live session that needs no fresh sign-in it answers with a code at once (SSO).
Otherwise it keeps the checked request in the store as a sign-in in progress, keyed
by a fresh random cookie, and sends the browser to ``{public_url}/signin/login``. That
page's form carries a CSRF token that must equal the one stored with the sign-in the
cookie names (compared in constant time). A good password starts a new session
(fresh id) and answers 303 to the client's redirect URI with the code.

Every page is server-rendered (Jinja2, autoescaped), with no script, and sent with
the security headers of :data:`PAGE_HEADERS` and a CSP whose ``form-action`` allows the
client's redirect URI only where a ``form_post`` response needs it.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import jinja2

from authserver import access
from authserver.authorize import (
    AuthorizeRequest,
    PageError,
    RedirectError,
    Target,
    form_post_page,
    parse_authorize,
    redirect_location,
)
from authserver.codes import CODE_TTL, code_hash, new_code
from authserver.config import PAGE_TEMPLATES, AuthServerConfig, ClientConfig, ServerConfig
from authserver.consent import described, needs_consent
from authserver.errors import OAuthError
from authserver.factors import Factors
from authserver.forms import Form, read_form
from authserver.interactions import InProgress, Paths
from authserver.keyring import KeyRing
from authserver.mfapages import MfaPages
from authserver.oidc import SignIn as OidcSignIn
from authserver.oidc import id_token_claims, user_access_token_claims, verify_id_token_hint
from authserver.pageheaders import HTML, origin_of, page_headers
from authserver.passkeypages import BAD_PASSKEY, PasskeyPages
from authserver.passkeys import Passkeys
from authserver.policies import Decision, decide
from authserver.relyingparty import relying_party
from authserver.sessions import (
    DEVICE_MAX_AGE,
    SESSION_BYTES,
    cookie_name,
    device_cookie_name,
    new_session,
    read_cookie,
    session_hash,
    set_cookie,
    set_device_cookie,
    valid_session_value,
)
from authserver.signon import AMR_PASSWORD, Requirement, has_mfa, required, satisfies
from authserver.store import CodeRecord, SessionRecord, Store, StoreUnavailable, StoreWorker
from authserver.throttle import AuthThrottle
from authserver.tokens import new_jti
from authserver.usergrants import is_assigned
from authserver.users import Authenticated, User, UserDirectory, username_key
from tokengate.asgi import Headers, Receive, Scope, Send, send_bytes
from tokengate.jsonlog import AuditLog, log_event
from tokengate.metrics import Metrics
from tokengate.proxies import NO_PROXIES, TrustedProxies

T = TypeVar("T")
SIGNIN_TTL = 600  # seconds a sign-in page stays usable
SIGNIN_COOKIE = "tg_signin"
BAD_CREDENTIALS = "The username or password is incorrect."
EXPIRED = (
    "This sign-in page has expired or was opened elsewhere. "
    "Go back to the application and start again."
)
MAX_FIELD = 1024  # characters of a username or password the form accepts


class SignIn:
    """The authorization endpoint of every server and the org-wide sign-in pages."""

    def __init__(
        self,
        *,
        config: AuthServerConfig,
        store: Store,
        io: StoreWorker,
        users: UserDirectory,
        keyring: KeyRing,
        throttle: AuthThrottle,
        audit: AuditLog,
        metrics: Metrics,
        proxies: TrustedProxies = NO_PROXIES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clients: dict[str, ClientConfig] = {c.client_id: c for c in config.clients}
        self.servers = {s.name: s for s in config.servers}
        self.store = store
        self.io = io
        self.users = users
        self.keyring = keyring
        self.throttle = throttle
        self.audit = audit
        self.metrics = metrics
        self.proxies = proxies
        self.clock = clock
        self.secure = config.public_url.startswith("https://")
        self.paths = Paths.of(config.public_url)
        self.signin_cookie = ("__Host-" if self.secure else "") + SIGNIN_COOKIE
        custom = config.sign_in.templates_dir
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(custom)
            if custom is not None
            else jinja2.PackageLoader("authserver", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            auto_reload=False,  # read once, here: no file checks on the event loop
        )
        for name in PAGE_TEMPLATES:  # compiled now (at start or in a reload's thread)
            self.templates.get_template(name)
        factors = Factors(
            store=store,
            io=io,
            throttle=throttle,
            audit=audit,
            metrics=metrics,
            issuer_name=config.sign_in.brand.name,
            kek=config.key_encryption_key,
            clock=clock,
        )
        rp = relying_party(config.public_url, config.sign_in.brand.name)
        passkeys = None
        if rp is not None:
            passkeys = Passkeys(
                store=store, io=io, rp=rp, audit=audit, metrics=metrics, clock=clock
            )
        self.passkeys = passkeys  # None: browsers allow no passkeys at the public URL
        self.mfa = MfaPages(self, factors, passkeys)
        self.passkey_pages = None if passkeys is None else PasskeyPages(self, self.mfa, passkeys)
        static = resources.files("authserver").joinpath("static")
        self.stylesheet = static.joinpath("signin.css").read_bytes()
        self.script = static.joinpath("passkey.js").read_bytes()
        brand = config.sign_in.brand
        self.brand_css = f":root {{ --accent: {brand.color}; }}\n".encode()

    def routes(self) -> dict[str, Callable[[Scope, Receive, Send], Any]]:
        """The org-wide paths, besides each server's authorize endpoint."""
        return {
            self.paths.login: self.login,
            self.paths.consent: self.consent,
            **self.mfa.routes(),
            **(self.passkey_pages.routes() if self.passkey_pages is not None else {}),
            self.paths.stylesheet: self._static(self.stylesheet),
            self.paths.brand_stylesheet: self._static(self.brand_css),
            self.paths.passkey_script: self._static(self.script, b"text/javascript"),
        }

    # -- {issuer}/v1/authorize ------------------------------------------------

    async def authorize(
        self, server: ServerConfig, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if scope["method"] not in ("GET", "POST"):
            await self.error_page(send, "invalid_request", "Use GET or POST.", 405)
            return
        try:
            pairs = await self.parameters(scope, receive)
        except OAuthError as exc:
            await self.error_page(send, exc.error, exc.description, 400)
            return
        params, repeated = _collect(pairs)
        try:
            request = parse_authorize(server, self.clients, params, repeated)
        except PageError as exc:
            await self.error_page(send, exc.error, exc.description, 400)
            return
        except RedirectError as exc:
            await self.respond(send, exc.target, exc.params())
            return
        try:
            await self._authorize(request, params, scope, send)
        except StoreUnavailable:
            await self.respond(
                send,
                request.target,
                request.target.params(
                    error="temporarily_unavailable", error_description="retry later"
                ),
            )

    async def _authorize(
        self, request: AuthorizeRequest, params: dict[str, str], scope: Scope, send: Send
    ) -> None:
        now = int(self.clock())
        found = await self._session(scope, now)
        hinted: str | None = None  # the user an id_token_hint names
        if request.id_token_hint is not None:
            keys = self.keyring.current(request.server.name)
            claims = verify_id_token_hint(request.id_token_hint, request.server, keys)
            if claims is None:
                params_ = request.target.params(
                    error="invalid_request", error_description="id_token_hint is not valid"
                )
                await self.respond(send, request.target, params_)
                return
            hinted = claims["sub"]
        if found is not None and hinted is not None and found[1].id != hinted:
            found = None  # the session is another user's: the hinted one must sign in
        if found is not None and not _needs_sign_in(request, found[0], now):
            session, user = found
            if not is_assigned(request.client, user):
                await self._not_assigned(send, request, user, scope, [])
                return
            need = await self.requirement(scope, request, user, now)
            if not satisfies(session.amr, need):
                await self._step_up(send, request, params, user, now, need)
                return
            await self.proceed(send, request, params, user, session, now, [], None)
            return
        if request.prompt == "none":
            await self.respond(
                send,
                request.target,
                request.target.params(
                    error="login_required", error_description="the user must sign in"
                ),
            )
            return
        cookie_value = await self.start_interaction(request, params, now)
        headers = [
            (b"location", self.paths.login.encode()),
            (b"set-cookie", self.signin_cookie_header(cookie_value)),
            *page_headers(),
        ]
        await send_bytes(send, 303, b"", headers)

    async def _step_up(
        self,
        send: Send,
        request: AuthorizeRequest,
        params: dict[str, str],
        user: User,
        now: int,
        need: Requirement,
    ) -> None:
        """A session signed in with less than a request needs (a second factor, or a
        passkey): the factor's page, no password asked again (prompt=none: refused);
        a user with no such factor yet signs in again with the password (and any
        factor they have), then enrolls one."""
        if request.prompt == "none":
            error = request.target.params(
                error="interaction_required",
                error_description="the user must sign in with a second factor",
            )
            await self.respond(send, request.target, error)
            return
        cookie_value = await self.start_interaction(request, params, now)
        headers = [(b"set-cookie", self.signin_cookie_header(cookie_value))]
        app, passkeys = await self.mfa.factors_of(user.id)
        if not (passkeys if need == "passkey" else app or passkeys):
            # enrolling binds a factor to the account: only after the password itself,
            # never on the strength of a session alone
            location = [(b"location", self.paths.login.encode())]
            await send_bytes(send, 303, b"", [*location, *headers, *page_headers()])
            return
        await self.mfa.start(send, request, user, cookie_value, now, None, need, headers)

    # -- {public_url}/signin/login ----------------------------------------------

    async def login(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.page(self._login, scope, receive, send)

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        now = int(self.clock())
        found = await self.in_progress(scope, send, now)
        if found is None:
            return
        if scope["method"] == "GET":
            await self.login_form(send, found, found.request.login_hint or "", None, 200)
            return
        form = await self.checked_form(scope, receive, send, found.csrf)
        if form is None:
            return
        username = (form.get("username") or "")[:MAX_FIELD]
        password = (form.get("password") or "")[:MAX_FIELD]
        await self._check_password(scope, send, found, username, password, now)

    async def _check_password(
        self,
        scope: Scope,
        send: Send,
        step: InProgress,
        username: str,
        password: str,
        now: int,
    ) -> None:
        request, cookie = step.request, step.cookie
        user, event = await self.check_credentials(
            request.server, request.client, username, password, self.remote_addr(scope)
        )
        if user is None:
            await self.login_form(send, step, username, BAD_CREDENTIALS, 401)
            return
        if not is_assigned(request.client, user):
            # the password was right: say what is wrong, but start no session with it
            await self.io_call(self.store.end_interaction, session_hash(cookie))
            clear = [(b"set-cookie", self.signin_cookie_header("", clear=True))]
            await self._not_assigned(send, request, user, scope, clear)
            return
        need = await self.requirement(scope, request, user, now)
        if need != "password":
            await self.mfa.start(send, request, user, cookie, now, now, need)
            return
        await self.complete(scope, send, request, user, event, cookie, now, AMR_PASSWORD)

    def passwordless(self, step: InProgress) -> bool:
        """Whether the app's sign-on policy (else the org's) signs in with a passkey
        instead of a password, and the public URL allows passkeys."""
        policy = step.request.client.sign_on or self.config.sign_on
        return policy.preset == "passwordless" and self.passkeys is not None

    async def signed_in_with_passkey(
        self, scope: Scope, send: Send, step: InProgress, user_id: str, amr: tuple[str, ...]
    ) -> None:
        """A passkey signed in (no password): its user, if still allowed in this app."""
        request = step.request
        user = await self.users.get(user_id)
        event: dict[str, Any] = {
            "server": request.server.name,
            "client_id": request.client.client_id,
            "user_id": user_id,
            "username": None if user is None else user.username,
            "remote_addr": self.remote_addr(scope),
        }
        if user is None or user.disabled:
            reason = "unknown_user" if user is None else "disabled"
            self.audit.emit("user.signin", **event, outcome="failure", reason=reason)
            self.metrics.signins.labels("failure").inc()
            await self.login_form(send, step, "", BAD_PASSKEY, 401)
            return
        if not is_assigned(request.client, user):
            await self.io_call(self.store.end_interaction, session_hash(step.cookie))
            clear = [(b"set-cookie", self.signin_cookie_header("", clear=True))]
            await self._not_assigned(send, request, user, scope, clear)
            return
        now = int(self.clock())
        await self.complete(scope, send, request, user, event, step.cookie, now, amr)

    async def complete(
        self,
        scope: Scope,
        send: Send,
        request: AuthorizeRequest,
        user: User,
        event: dict[str, Any],
        cookie: str,
        now: int,
        amr: tuple[str, ...],
    ) -> None:
        """A sign-in proved (a password, and a second factor if one was needed): a new
        session (replacing the browser's, its sid kept for the same user), then on to
        the client. ``event``: the sign-in's audit fields."""
        replaced = await self.replace_session(scope, user, now)
        started = new_session(user.id, now, self.config.sessions, replaced, amr)
        await self.io_call(self.store.add_session, started.session_hash, started.record)
        self.audit.emit("user.signin", **event, amr=list(amr), outcome="success", reason="ok")
        self.audit.emit("session.created", **event, sid=started.record.sid)
        self.metrics.signins.labels("success").inc()
        cookies = [(b"set-cookie", set_cookie(started.cookie_value, secure=self.secure))]
        if has_mfa(amr):  # this browser is now a known device of the user
            device = self._device(scope) or secrets.token_urlsafe(SESSION_BYTES)
            await self.io_call(self.store.remember_device, session_hash(device), user.id, now)
            cookies.append((b"set-cookie", set_device_cookie(device, secure=self.secure)))
        await self.proceed(send, request, None, user, started.record, now, cookies, cookie)

    def second_factor_required(self, client: ClientConfig, user: User) -> bool:
        """For the password grant: no browser, so never a known device."""
        policy = client.sign_on or self.config.sign_on
        return required(policy, user.groups, (), False) != "password"

    async def requirement(
        self, scope: Scope, request: AuthorizeRequest, user: User, now: int
    ) -> Requirement:
        """What this sign-in must prove, by the client's sign-on policy (else the
        org's), the user's groups, a browser new to the user, and the request's
        acr_values: a password, a second factor too, or a passkey."""
        policy = request.client.sign_on or self.config.sign_on
        known = True
        if policy.mfa_new_device:
            device = self._device(scope)
            known = device is not None and await self.io_call(
                self.store.device_known, session_hash(device), user.id, now - DEVICE_MAX_AGE
            )
        return required(policy, user.groups, request.acr_values, known)

    def _device(self, scope: Scope) -> str | None:
        """The browser's remembered-device cookie, if it holds a well-formed one."""
        value = read_cookie(_cookies(scope), device_cookie_name(self.secure))
        return value if valid_session_value(value) else None

    # -- {public_url}/signin/consent ---------------------------------------------

    async def proceed(
        self,
        send: Send,
        request: AuthorizeRequest,
        params: dict[str, str] | None,
        user: User,
        session: SessionRecord,
        now: int,
        headers: Headers,
        interaction: str | None,
    ) -> None:
        """A signed-in user: the code, or first the consent page when the client asks
        for consent the user has not given. ``interaction``: the sign-in cookie of the
        sign-in in progress (None after SSO: ``params`` make one if consent is needed).
        The server's access policies first: a request they deny goes back refused."""
        refused = access.refusal(request, user)
        if refused is not None:
            if interaction is not None:
                await self.io_call(self.store.end_interaction, session_hash(interaction))
                headers = [*headers, (b"set-cookie", self.signin_cookie_header("", clear=True))]
            await self._policy_denied(send, request, user, refused, headers)
            return
        granted: frozenset[str] = frozenset()
        if request.client.consent == "required":
            granted = await self.io_call(
                self.store.consented_scopes, user.id, request.client.client_id
            )
        if not needs_consent(request, granted):
            if interaction is not None:
                await self.io_call(self.store.end_interaction, session_hash(interaction))
                headers = [*headers, (b"set-cookie", self.signin_cookie_header("", clear=True))]
            await self._issue_code(send, request, user, session, now, headers)
            return
        if request.prompt == "none":
            error = request.target.params(
                error="consent_required", error_description="the user must grant access"
            )
            await self.respond(send, request.target, error)
            return
        if interaction is None:
            assert params is not None
            interaction = await self.start_interaction(request, params, now)
            headers = [*headers, (b"set-cookie", self.signin_cookie_header(interaction))]
        # All the sign-in proved is spent now: the consent page takes only this
        # session's answer (whatever the sign-in in progress had proved before: a
        # password, a second factor) is gone, so nothing of it can be replayed.
        progress = {"consent_for": session.sid, "user_id": user.id}
        await self.io_call(
            self.store.set_interaction_progress, session_hash(interaction), json.dumps(progress)
        )
        location = [(b"location", self.paths.consent.encode())]
        await send_bytes(send, 303, b"", [*location, *headers, *page_headers()])

    async def consent(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.page(self._consent, scope, receive, send)

    async def _consent(self, scope: Scope, receive: Receive, send: Send) -> None:
        now = int(self.clock())
        found = await self.in_progress(scope, send, now)
        if found is None:
            return
        request, cookie, csrf = found.request, found.cookie, found.csrf
        signed_in = await self._session(scope, now)
        progress = found.progress or {}
        if (
            signed_in is None  # the session ended meanwhile: sign in again
            or progress.get("consent_for") != signed_in[0].sid
            or progress.get("user_id") != signed_in[1].id
        ):  # the consent page is reached only from a finished sign-in of this session
            await self.error_page(send, "expired", EXPIRED, 400)
            return
        session, user = signed_in
        refused = access.refusal(request, user)
        if refused is not None:  # the policies changed since the consent page was shown
            await self.io_call(self.store.end_interaction, session_hash(cookie))
            clear = [(b"set-cookie", self.signin_cookie_header("", clear=True))]
            await self._policy_denied(send, request, user, refused, clear)
            return
        if scope["method"] == "GET":
            body = self.render(
                "consent.html",
                action=self.paths.consent,
                csrf_token=csrf,
                client_id=request.client.client_id,
                username=user.username,
                scopes=described(request.scopes),
            )
            target = origin_of(request.target.redirect_uri)
            await send_bytes(send, 200, body, [HTML, *page_headers(target)])
            return
        form = await self.checked_form(scope, receive, send, csrf)
        if form is None:
            return
        event = {
            "server": request.server.name,
            "client_id": request.client.client_id,
            "user_id": user.id,
            "username": user.username,
            "remote_addr": self.remote_addr(scope),
            "scopes": list(request.scopes),
        }
        await self.io_call(self.store.end_interaction, session_hash(cookie))
        clear = [(b"set-cookie", self.signin_cookie_header("", clear=True))]
        if form.get("consent") != "allow":
            self.audit.emit("consent.denied", **event, outcome="denied", reason="user_denied")
            error = request.target.params(
                error="access_denied", error_description="the user denied access"
            )
            await self.respond(send, request.target, error, clear)
            return
        await self.io_call(
            self.store.add_consent, user.id, request.client.client_id, request.scopes, now
        )
        self.audit.emit("consent.granted", **event, outcome="granted", reason="ok")
        await self._issue_code(send, request, user, session, now, clear)

    # -- shared steps -------------------------------------------------------------

    async def page(
        self,
        serve: Callable[[Scope, Receive, Send], Awaitable[None]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """A sign-in page (GET shows it, POST submits it); a failing store is a 503."""
        if scope["method"] not in ("GET", "POST"):
            await self.error_page(send, "invalid_request", "Use GET or POST.", 405)
            return
        try:
            await serve(scope, receive, send)
        except StoreUnavailable:
            await self.error_page(
                send, "temporarily_unavailable", "Sign-in is unavailable; try again soon.", 503
            )

    async def start_interaction(
        self, request: AuthorizeRequest, params: dict[str, str], now: int
    ) -> str:
        """Keep a checked authorization request for the pages that follow (sign-in,
        consent), with their CSRF token; the sign-in cookie's value naming it."""
        cookie_value = secrets.token_urlsafe(32)
        await self.io_call(
            self.store.add_interaction,
            session_hash(cookie_value),
            request.server.name,
            json.dumps(params, sort_keys=True),
            secrets.token_urlsafe(32),
            now + SIGNIN_TTL,
        )
        return cookie_value

    async def in_progress(self, scope: Scope, send: Send, now: int) -> InProgress | None:
        """The sign-in in progress the browser's sign-in cookie names: its checked
        authorization request, the cookie's value, the forms' CSRF token and what it
        has proved so far. None once an error page has been sent."""
        cookie = read_cookie(_cookies(scope), self.signin_cookie)
        found = None
        if valid_session_value(cookie):
            assert cookie is not None
            found = await self.io_call(self.store.interaction, session_hash(cookie), now)
        if found is None:
            await self.error_page(send, "expired", EXPIRED, 400)
            return None
        assert cookie is not None
        server_name, params_json, csrf, progress = found
        server = self.servers.get(server_name)
        try:
            if server is None:
                raise PageError("invalid_request", "the authorization server is gone")
            request = parse_authorize(server, self.clients, json.loads(params_json))
        except PageError as exc:  # the config changed meanwhile
            await self.error_page(send, exc.error, exc.description, 400)
            return None
        except RedirectError as exc:
            await self.respond(send, exc.target, exc.params())
            return None
        return InProgress(
            request, cookie, csrf, json.loads(progress) if progress else None, progress
        )

    async def checked_form(
        self, scope: Scope, receive: Receive, send: Send, csrf: str
    ) -> Form | None:
        """A page's POSTed form, if it carries the page's CSRF token (compared in
        constant time); None once an error page has been sent."""
        try:
            form = await read_form(scope, receive, self.config.max_body_bytes)
        except OAuthError:
            await self.error_page(send, "invalid_request", "The form could not be read.", 400)
            return None
        presented = form.get("csrf_token") or ""
        if not hmac.compare_digest(presented.encode(), csrf.encode()):
            await self.error_page(
                send,
                "invalid_request",
                "This form has expired. Go back to the application and start again.",
                400,
            )
            return None
        return form

    async def replace_session(self, scope: Scope, user: User, now: int) -> str | None:
        """End the session the browser holds, if any: a sign-in never leaves the old
        cookie value working. Another user's session ends with what was issued in it;
        the same user's sid carries over (its refresh tokens live on). Its sid, or None."""
        found = await self.live_session(scope, now)
        if found is None:
            return None
        value, old = found
        await self.io_call(self.store.end_session, session_hash(value))
        if old.user_id == user.id:
            return old.sid
        await self.io_call(self.store.end_session_grants, old.sid, now)
        return None

    def not_assigned(
        self, server: ServerConfig, client: ClientConfig, user: User, ip: str | None
    ) -> None:
        """Audit and count a user refused for not being in the client's groups."""
        self.audit.emit(
            "user.signin",
            server=server.name,
            client_id=client.client_id,
            user_id=user.id,
            username=user.username,
            remote_addr=ip,
            outcome="failure",
            reason="not_assigned",
        )
        self.metrics.signins.labels("failure").inc()

    async def check_credentials(
        self,
        server: ServerConfig,
        client: ClientConfig,
        username: str,
        password: str,
        ip: str | None,
    ) -> tuple[User | None, dict[str, Any]]:
        """A username and password, throttled per username and per address (the hosted
        page and the password grant alike). A refusal is audited and counted here and
        gives no user; whatever the reason, the caller shows one message. The event:
        the audit fields of this sign-in, for the caller's success line."""
        event: dict[str, Any] = {
            "server": server.name,
            "client_id": client.client_id,
            "user_id": None,
            "username": username or None,
            "remote_addr": ip,
        }
        throttle_key = "user:" + username_key(username)  # as users are told apart
        if await self.throttle.retry_after(throttle_key, ip) is not None:
            outcome: Any = None
            reason = "locked"
        else:
            outcome = await self.users.authenticate(username, password)
            reason = outcome.reason if not isinstance(outcome, Authenticated) else "ok"
        if not isinstance(outcome, Authenticated):
            await self.throttle.failed(throttle_key, ip)
            if outcome is not None and outcome.user is not None:
                event.update(user_id=outcome.user.id, username=outcome.user.username)
            self.audit.emit("user.signin", **event, outcome="failure", reason=reason)
            self.metrics.signins.labels("failure").inc()
            return None, event
        await self.throttle.succeeded(throttle_key)
        event.update(user_id=outcome.user.id, username=outcome.user.username)
        return outcome.user, event

    async def _not_assigned(
        self, send: Send, request: AuthorizeRequest, user: User, scope: Scope, headers: Headers
    ) -> None:
        """Okta's app assignment: the user is not in any of the client's groups."""
        self.not_assigned(request.server, request.client, user, self.remote_addr(scope))
        params = request.target.params(
            error="access_denied", error_description="the user is not assigned to this client"
        )
        await self.respond(send, request.target, params, headers)

    async def _policy_denied(
        self,
        send: Send,
        request: AuthorizeRequest,
        user: User,
        decision: Decision,
        headers: Headers,
    ) -> None:
        """The server's access policies refuse the request: audited (with the policy and
        rule) and counted as the token endpoint does, and sent back as access_denied."""
        event: dict[str, Any] = {
            "server": request.server.name,
            "client_id": request.client.client_id,
            "grant_type": "implicit" if request.implicit else "authorization_code",
            "scopes": list(request.scopes),
            "jti": None,
            "user_id": user.id,
            "username": user.username,
        }
        access.record(request.server, decision, event, self.metrics)
        self.audit.emit(
            "token.denied",
            **event,
            outcome="denied",
            reason=access.POLICY_DENIED,
            detail=decision.reason,
        )
        params = request.target.params(error="access_denied", error_description=access.DENIED)
        await self.respond(send, request.target, params, headers)

    async def live_session(self, scope: Scope, now: int) -> tuple[str, SessionRecord] | None:
        """The browser's live session (its idle end moved on) and the cookie's value."""
        value = read_cookie(_cookies(scope), cookie_name(self.secure))
        if not valid_session_value(value):
            return None
        assert value is not None
        record = await self.io_call(
            self.store.touch_session, session_hash(value), now, self.config.sessions.idle_timeout
        )
        return None if record is None else (value, record)

    async def _session(self, scope: Scope, now: int) -> tuple[SessionRecord, User] | None:
        found = await self.live_session(scope, now)
        if found is None:
            return None
        record = found[1]
        user = await self.users.get(record.user_id)
        if user is None or user.disabled:
            return None
        return record, user

    async def _issue_code(
        self,
        send: Send,
        request: AuthorizeRequest,
        user: User,
        session: SessionRecord,
        now: int,
        headers: Headers,
    ) -> None:
        if request.implicit:
            await self._issue_tokens(send, request, user, session, now, headers)
            return
        code = new_code()
        record = CodeRecord(
            server=request.server.name,
            client_id=request.client.client_id,
            redirect_uri=request.target.redirect_uri,
            code_challenge=request.code_challenge,
            nonce=request.nonce,
            scopes=request.scopes,
            user_id=user.id,
            session_id=session.sid,
            auth_time=session.auth_time,
            expires_at=now + CODE_TTL,
            id_token_claims=request.id_token_claims,
            amr=session.amr,
        )
        await self.io_call(self.store.add_code, code_hash(code), record)
        await self.respond(send, request.target, request.target.params(code=code), headers)

    async def _issue_tokens(
        self,
        send: Send,
        request: AuthorizeRequest,
        user: User,
        session: SessionRecord,
        now: int,
        headers: Headers,
    ) -> None:
        """The implicit flow (OIDC Core 3.2, opt-in): the ID token, and with
        ``id_token token`` an access token, straight in the response (a fragment or a
        form_post), never in a query. The server's access policies decide the scopes
        and lifetimes (denials were answered before)."""
        decided: dict[str, Any] = {}  # the deciding policy and rule, for the audit line
        server, scopes = request.server, request.scopes
        if server.access_policies:
            asked = access.authorize_request(request, user)
            decision = decide(server.access_policies, asked, server.lifetimes)
            if not decision.allowed:
                await self._policy_denied(send, request, user, decision, headers)
                return
            access.record(server, decision, decided, self.metrics)
            server, scopes = access.with_lifetimes(server, decision), decision.scopes
        client = request.client
        sign_in = OidcSignIn(
            user=user, auth_time=session.auth_time, session_id=session.sid, amr=session.amr
        )
        signer = self.keyring.current(server.name).signer
        params: dict[str, str] = {}
        access_token = None
        jti = None
        if request.response_type == "id_token token":
            jti = new_jti()
            claims = user_access_token_claims(server, client, sign_in, scopes, now, jti)
            access_token = signer.sign(claims)
            params.update(
                access_token=access_token,
                token_type="Bearer",  # noqa: S106 - a token type, not a secret
                expires_in=str(server.access_token_ttl),
                scope=claims["scope"],
            )
        id_claims = id_token_claims(
            server,
            client.client_id,
            sign_in,
            scopes,
            request.nonce,
            now,
            access_token,
            request.id_token_claims,
        )
        params["id_token"] = signer.sign_id_token(id_claims)
        self.audit.emit(
            "token.issued",
            server=server.name,
            client_id=client.client_id,
            grant_type="implicit",
            scopes=list(scopes),
            jti=jti,
            user_id=user.id,
            username=user.username,
            **decided,
            outcome="issued",
            reason="ok",
        )
        self.metrics.tokens_issued.labels(server.name, "implicit").inc()
        await self.respond(send, request.target, request.target.params(**params), headers)

    async def respond(
        self, send: Send, target: Target, params: dict[str, str], headers: Headers = ()
    ) -> None:
        """The response to the client: 303 to its redirect URI, or a form_post page."""
        if target.response_mode == "form_post":
            body = form_post_page(target, params)
            all_headers = [HTML, *headers, *page_headers(origin_of(target.redirect_uri))]
            await send_bytes(send, 200, body, all_headers)
            return
        location = redirect_location(target, params).encode()
        await send_bytes(send, 303, b"", [(b"location", location), *headers, *page_headers()])

    async def login_form(
        self, send: Send, step: InProgress, username: str, error: str | None, status: int
    ) -> None:
        """The sign-in page. For an app that signs in with a passkey, with a fresh
        challenge, and the sign-in starts over: whatever it had proved is dropped."""
        passkey = None
        if self.passwordless(step) and self.passkeys is not None:
            options = self.passkeys.authentication_options(None, verify_user=True)
            progress = json.dumps({"passkey_challenge": options.challenge})
            await self.io_call(
                self.store.set_interaction_progress, session_hash(step.cookie), progress
            )
            passkey = {"action": self.paths.passkey_verify, "options": options.options}
        request = step.request
        body = self.render(
            "signin.html",
            action=self.paths.login,
            csrf_token=step.csrf,
            client_id=request.client.client_id,
            username=username,
            error=error,
            passkey=passkey,
            script=self.paths.passkey_script,
        )
        # The form's answer redirects to the client, and browsers hold a form's
        # redirects to form-action too: the page allows the client's origin.
        headers = page_headers(origin_of(request.target.redirect_uri), script=passkey is not None)
        await send_bytes(send, status, body, [HTML, *headers])

    async def error_page(self, send: Send, error: str, message: str, status: int) -> None:
        body = self.render("error.html", error=error, message=message)
        await send_bytes(send, status, body, [HTML, *page_headers()])

    def render(self, name: str, **context: Any) -> bytes:
        return (
            self.templates.get_template(name)
            .render(
                brand=self.config.sign_in.brand,
                stylesheet=self.paths.stylesheet,
                brand_stylesheet=self.paths.brand_stylesheet,
                **context,
            )
            .encode()
        )

    def _static(
        self, body: bytes, content_type: bytes = b"text/css"
    ) -> Callable[[Scope, Receive, Send], Any]:
        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["method"] not in ("GET", "HEAD"):
                await self.error_page(send, "invalid_request", "Use GET.", 405)
                return
            headers = [
                (b"content-type", content_type + b"; charset=utf-8"),
                (b"cache-control", b"public, max-age=3600"),
                (b"x-content-type-options", b"nosniff"),
            ]
            await send_bytes(send, 200, b"" if scope["method"] == "HEAD" else body, headers)

        return serve

    def signin_cookie_header(self, value: str, *, clear: bool = False) -> bytes:
        flags = "; Secure" if self.secure else ""
        age = "; Max-Age=0" if clear else f"; Max-Age={SIGNIN_TTL}"
        return f"{self.signin_cookie}={value}; Path=/{age}; HttpOnly; SameSite=Lax{flags}".encode()

    async def parameters(self, scope: Scope, receive: Receive) -> list[tuple[str, str]]:
        if scope["method"] == "POST":
            form = await read_form(scope, receive, self.config.max_body_bytes)
            return list(form.values.items())  # a repeated parameter was refused already
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            return parse_qsl(query, keep_blank_values=False, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise OAuthError("invalid_request", "the query string is not valid UTF-8") from None

    def remote_addr(self, scope: Scope) -> str | None:
        return self.proxies.origin_of(scope).client

    async def io_call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await self.io.call(fn, *args)
        except StoreUnavailable as exc:
            log_event("authserver.store_unavailable", error=str(exc))
            raise


def _collect(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], set[str]]:
    """Parameters by name (empty values dropped), and the names sent more than once."""
    params: dict[str, str] = {}
    repeated: set[str] = set()
    for name, value in pairs:
        if not value:
            continue
        if name in params and params[name] != value:
            repeated.add(name)
        params.setdefault(name, value)
    return params, repeated


def _needs_sign_in(request: AuthorizeRequest, session: SessionRecord, now: int) -> bool:
    if request.prompt == "login":
        return True
    return request.max_age is not None and now - session.auth_time > request.max_age


def _cookies(scope: Scope) -> list[bytes]:
    return [value for name, value in scope["headers"] if name == b"cookie"]
