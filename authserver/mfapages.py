"""The second factor's hosted pages (org-wide, under ``{public_url}/signin/mfa``).

A sign-in whose sign-on policy, groups or ``acr_values`` ask for a second factor
(``need: mfa``) or a passkey (``need: passkey``) comes here after the password (or,
for a session signed in with less, instead of it: step-up). The store's record of the
sign-in in progress says what it has proved (whose password, when; which factor); the
pages only add to it:

- ``/signin/mfa``: the user's passkey (:mod:`authserver.passkeypages`), or a code
  from their authenticator app, or a recovery code;
- ``/signin/mfa/enroll``: for a user without a factor: an app's secret as a QR code
  (SVG, drawn here) and as text, confirmed by a first code (or a passkey instead);
  then the ten recovery codes, shown once, and ``/signin/mfa/continue`` goes on to
  the application.

A sign-in that needs a passkey from a user who has none proves the factor the user
has (if any) and then creates one: a password alone never adds a factor to an
account that has one. Then the sign-in completes as a password-only one does (a new
session, renewed id), with ``amr`` ``pwd otp mfa`` (or ``pwd hwk mfa``, ``pwd swk
mfa``) and ``acr`` :data:`authserver.signon.ACR_MFA`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import segno
from markupsafe import Markup

from authserver.authorize import AuthorizeRequest
from authserver.factors import Factors
from authserver.forms import Form
from authserver.interactions import InProgress, Paths
from authserver.pageheaders import HTML, origin_of, page_headers
from authserver.passkeys import Passkeys
from authserver.sessions import session_hash
from authserver.signon import Requirement, satisfies
from authserver.store import PasskeyRecord, SessionRecord, Store
from authserver.totp import secret_text
from authserver.usergrants import is_assigned
from authserver.users import User, UserDirectory
from tokengate.asgi import Headers, Receive, Scope, Send, send_bytes


class SignInPages(Protocol):
    """What the second factor's pages use of the sign-in pages
    (:class:`authserver.signin.SignIn`)."""

    paths: Paths
    store: Store
    users: UserDirectory
    clock: Callable[[], float]

    async def page(
        self,
        serve: Callable[[Scope, Receive, Send], Awaitable[None]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None: ...

    async def in_progress(self, scope: Scope, send: Send, now: int) -> InProgress | None: ...

    async def checked_form(
        self, scope: Scope, receive: Receive, send: Send, csrf: str
    ) -> Form | None: ...

    async def live_session(self, scope: Scope, now: int) -> tuple[str, SessionRecord] | None: ...

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
    ) -> None: ...

    async def io_call(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def error_page(self, send: Send, error: str, message: str, status: int) -> None: ...

    def render(self, name: str, **context: Any) -> bytes: ...

    def remote_addr(self, scope: Scope) -> str | None: ...


T = TypeVar("T")
WRONG_CODE = "That code is not right. Enter the current code from your app."
LOCKED = "Too many wrong codes. Try again in {wait} seconds."
MAX_CODE = 64  # characters of a code the form accepts


class MfaPages:
    def __init__(self, signin: SignInPages, factors: Factors, passkeys: Passkeys | None) -> None:
        self.signin = signin
        self.factors = factors
        self.passkeys = passkeys  # None: the public URL allows none (see relyingparty)
        self.paths = signin.paths

    def routes(self) -> dict[str, Callable[[Scope, Receive, Send], Any]]:
        return {
            self.paths.mfa: self.challenge,
            self.paths.mfa_enroll: self.enroll,
            self.paths.mfa_continue: self.cont,
        }

    async def start(
        self,
        send: Send,
        request: AuthorizeRequest,
        user: User,
        cookie: str,
        now: int,
        password_at: int | None,
        need: Requirement,
        headers: Headers = (),  # type: ignore[assignment]
    ) -> None:
        """Record what the sign-in has proved (``password_at``: when the password was
        checked; None: a live session's step-up) and what it needs, and send the
        browser to the factor's page, or to enroll one first."""
        progress = {"user_id": user.id, "password_at": password_at, "need": need}
        await self.signin.io_call(
            self.signin.store.set_interaction_progress, session_hash(cookie), json.dumps(progress)
        )
        app, passkeys = await self.factors_of(user.id)
        if app or passkeys:
            target = self.paths.mfa
        elif need == "passkey":
            target = self.paths.passkey_enroll
        else:
            target = self.paths.mfa_enroll
        location = [(b"location", target.encode())]
        await send_bytes(send, 303, b"", [*location, *headers, *self.headers(request)])

    async def factors_of(self, user_id: str) -> tuple[bool, list[PasskeyRecord]]:
        """Whether the user has a confirmed app, and their passkeys."""
        app = await self.factors.enrolled(user_id)
        # counted even where the public URL allows no passkey (then no page offers it,
        # and recovery codes stand in): a factor the user has is never ignored
        passkeys = await self.signin.io_call(self.signin.store.passkeys, user_id)
        return app, passkeys

    # -- /signin/mfa -------------------------------------------------------------

    async def challenge(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.signin.page(self._challenge, scope, receive, send)

    async def _challenge(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = await self.found(scope, send)
        if found is None:
            return
        step, user = found
        app, passkeys = await self.factors_of(user.id)
        if not app and not passkeys:  # reset meanwhile: enroll again
            await self.redirect(send, step.request, self.enroll_path(step, passkeys))
            return
        if scope["method"] == "GET":
            await self.code_page(send, step, user, (app, passkeys), None, 200)
            return
        form = await self.signin.checked_form(scope, receive, send, step.csrf)
        if form is None:
            return
        if not _takes_codes(step, app, passkeys):
            await self.signin.error_page(send, "invalid_request", "Use your passkey.", 400)
            return
        code = (form.get("code") or "")[:MAX_CODE]
        verified = await self.factors.verify(
            user.id, code, self.signin.remote_addr(scope), self.fields(scope, step, user)
        )
        if not verified.ok:
            if verified.reason == "locked":
                error = LOCKED.format(wait=verified.retry_after)
                await self.code_page(send, step, user, (app, passkeys), error, 429)
            else:
                await self.code_page(send, step, user, (app, passkeys), WRONG_CODE, 401)
            return
        if need_of(step) == "passkey" and not passkeys:
            # the factor the user has is proved: now the passkey the app needs
            await self.proved(step, ("otp",))
            await self.redirect(send, step.request, self.paths.passkey_enroll)
            return
        await self.finish(scope, send, step, user, ("otp",))

    async def code_page(
        self,
        send: Send,
        step: InProgress,
        user: User,
        factors: tuple[bool, list[PasskeyRecord]],
        error: str | None,
        status: int,
        passkey_error: str | None = None,
    ) -> None:
        """The second factor's page: the user's passkey (a fresh challenge kept with
        the sign-in), a code form, or both, as the sign-in needs and the user has
        (``factors``: :meth:`factors_of`, read once by the caller)."""
        app, passkeys = factors
        passkey = None
        progress = step.progress or {}
        if passkeys and self.passkeys is not None:
            options = self.passkeys.authentication_options(passkeys, verify_user=False)
            progress = {**progress, "passkey_challenge": options.challenge}
            await self.signin.io_call(
                self.signin.store.set_interaction_progress,
                session_hash(step.cookie),
                json.dumps(progress),
            )
            passkey = {"action": self.paths.passkey_verify, "options": options.options}
        body = self.signin.render(
            "mfa.html",
            action=self.paths.mfa,
            csrf_token=step.csrf,
            client_id=step.request.client.client_id,
            username=user.username,
            error=error,
            passkey=passkey,
            passkey_error=passkey_error,
            script=self.paths.passkey_script,
            codes=_takes_codes(step, app, passkeys),
            app=app,
        )
        headers = self.headers(step.request, script=passkey is not None)
        await send_bytes(send, status, body, [HTML, *headers])

    # -- /signin/mfa/enroll -----------------------------------------------------

    async def enroll(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.signin.page(self._enroll, scope, receive, send)

    async def _enroll(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = await self.enrolling(scope, send)
        if found is None:
            return
        step, user = found
        _, passkeys = await self.factors_of(user.id)
        if passkeys or need_of(step) == "passkey":  # an app is not what this sign-in needs
            await self.redirect(send, step.request, self.enroll_path(step, passkeys))
            return
        enrollment = await self.factors.begin(user.id, user.username)
        if enrollment is None:  # enrolled already: a code, not a new app
            await self.redirect(send, step.request, self.paths.mfa)
            return
        error = None
        status = 200
        if scope["method"] == "POST":
            form = await self.signin.checked_form(scope, receive, send, step.csrf)
            if form is None:
                return
            code = (form.get("code") or "")[:MAX_CODE]
            fields = self.fields(scope, step, user)
            codes = await self.factors.confirm(
                user.id, code, self.signin.remote_addr(scope), fields
            )
            if codes is not None:
                await self.recovery_codes(send, step, user, codes, ("otp",))
                return
            error, status = WRONG_CODE, 401
        body = self.signin.render(
            "enroll.html",
            action=self.paths.mfa_enroll,
            csrf_token=step.csrf,
            username=user.username,
            qr=_qr_svg(enrollment.uri),
            secret=secret_text(enrollment.secret),
            error=error,
            passkey_enroll=self.paths.passkey_enroll if self.passkeys is not None else None,
        )
        await send_bytes(send, status, body, [HTML, *self.headers(step.request)])

    async def recovery_codes(
        self, send: Send, step: InProgress, user: User, codes: list[str], factors: tuple[str, ...]
    ) -> None:
        """A first factor enrolled (``factors``: what the sign-in proved), and that proves
        it: the sign-in may go on, once the user has seen the recovery codes (shown this
        once)."""
        await self.proved(step, factors)
        body = self.signin.render(
            "recovery_codes.html",
            action=self.paths.mfa_continue,
            csrf_token=step.csrf,
            username=user.username,
            codes=codes,
            created="app" if factors[-1] == "otp" else "passkey",
        )
        await send_bytes(send, 200, body, [HTML, *self.headers(step.request)])

    # -- /signin/mfa/continue ----------------------------------------------------

    async def cont(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.signin.page(self._cont, scope, receive, send)

    async def _cont(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = await self.found(scope, send)
        if found is None:
            return
        step, user = found
        factors = proved_factors(step)
        if scope["method"] != "POST" or not factors:
            await self.signin.error_page(send, "invalid_request", "Enter a code first.", 400)
            return
        if await self.signin.checked_form(scope, receive, send, step.csrf) is None:
            return
        await self.finish(scope, send, step, user, factors)

    # -- shared ------------------------------------------------------------------

    async def proved(self, step: InProgress, factors: tuple[str, ...]) -> None:
        """Record that this sign-in has proved factors (``factors``: their amr values)."""
        now = int(self.signin.clock())
        progress = {**(step.progress or {}), "mfa_at": now, "factors": list(factors)}
        progress.pop("passkey_challenge", None)
        await self.signin.io_call(
            self.signin.store.set_interaction_progress,
            session_hash(step.cookie),
            json.dumps(progress),
        )

    async def found(self, scope: Scope, send: Send) -> tuple[InProgress, User] | None:
        """The sign-in in progress and the user whose password (or session) it has
        proved, still allowed in; None once an error page has been sent."""
        now = int(self.signin.clock())
        step = await self.signin.in_progress(scope, send, now)
        if step is None:
            return None
        user = await self.user_of(step, send)
        return None if user is None else (step, user)

    async def enrolling(self, scope: Scope, send: Send) -> tuple[InProgress, User] | None:
        """As :meth:`found`, for a page that adds a factor to the account: only in a
        sign-in that gave the password, never on the strength of a session alone."""
        found = await self.found(scope, send)
        if found is not None and (found[0].progress or {}).get("password_at") is None:
            await self.signin.error_page(send, "expired", EXPIRED, 400)
            return None
        return found

    async def user_of(self, step: InProgress, send: Send) -> User | None:
        """The user whose password (or session) the sign-in has proved, still allowed
        in; None once an error page has been sent."""
        user_id = (step.progress or {}).get("user_id")
        user = await self.signin.users.get(user_id) if isinstance(user_id, str) else None
        if user is None or user.disabled or not is_assigned(step.request.client, user):
            await self.signin.error_page(send, "expired", EXPIRED, 400)
            return None
        return user

    async def finish(
        self, scope: Scope, send: Send, step: InProgress, user: User, factors: tuple[str, ...]
    ) -> None:
        """The second factor proved (``factors``: the amr values of what was proved):
        the sign-in completes, with ``pwd`` (the password now) or what the session
        had proved before (a step-up), then ``factors`` and ``mfa``."""
        now = int(self.signin.clock())
        progress = step.progress or {}
        before: tuple[str, ...] = ("pwd",)
        if progress.get("password_at") is None:
            # a step-up adds to the browser's session: it must still be this user's
            live = await self.signin.live_session(scope, now)
            if live is None or live[1].user_id != user.id:
                await self.signin.error_page(send, "expired", EXPIRED, 400)
                return
            before = live[1].amr
        amr = (*dict.fromkeys(a for a in (*before, *factors) if a != "mfa"), "mfa")
        if not satisfies(amr, need_of(step)):  # an app's code, where a passkey is needed
            await self.redirect(send, step.request, self.paths.passkey_enroll)
            return
        fields = self.fields(scope, step, user)
        await self.signin.complete(scope, send, step.request, user, fields, step.cookie, now, amr)

    def fields(self, scope: Scope, step: InProgress, user: User) -> dict[str, Any]:
        return {
            "server": step.request.server.name,
            "client_id": step.request.client.client_id,
            "user_id": user.id,
            "username": user.username,
            "remote_addr": self.signin.remote_addr(scope),
        }

    async def redirect(self, send: Send, request: AuthorizeRequest, path: str) -> None:
        headers = [(b"location", path.encode()), *self.headers(request)]
        await send_bytes(send, 303, b"", headers)

    def headers(self, request: AuthorizeRequest, *, script: bool = False) -> Headers:
        # the forms' answers redirect to the client: the pages allow its origin
        return page_headers(origin_of(request.target.redirect_uri), script=script)

    def enroll_path(self, step: InProgress, passkeys: list[PasskeyRecord]) -> str:
        """Where a user goes who has no factor this sign-in can use."""
        if passkeys:
            return self.paths.mfa
        return self.paths.passkey_enroll if need_of(step) == "passkey" else self.paths.mfa_enroll


EXPIRED = "This sign-in has expired. Go back to the application and start again."


def proved_factors(step: InProgress) -> tuple[str, ...]:
    """The amr values of the factors this sign-in has proved (none: no factor yet)."""
    progress = step.progress or {}
    factors = progress.get("factors")
    if not progress.get("mfa_at") or not isinstance(factors, list):
        return ()
    return tuple(f for f in factors if f in ("otp", "hwk", "swk"))


def need_of(step: InProgress) -> Requirement:
    need = (step.progress or {}).get("need")
    return "passkey" if need == "passkey" else "mfa"


def _takes_codes(step: InProgress, app: bool, passkeys: list[PasskeyRecord]) -> bool:
    """Whether the second factor's page takes a code: an app's or a recovery code,
    for a sign-in that needs any second factor; for one that needs a passkey, only
    from a user who has none yet (the factor they have, before they create one)."""
    if need_of(step) == "passkey":
        return app and not passkeys
    return True


def _qr_svg(uri: str) -> Markup:
    """The QR code of an ``otpauth://`` URI as inline SVG (no image request, no
    script), described for screen readers."""
    out = io.BytesIO()
    segno.make(uri, error="m").save(
        out,
        kind="svg",
        scale=5,
        border=2,
        xmldecl=False,
        svgns=True,
        nl=False,
        title="QR code of your authenticator secret",
        svgclass="qr",
        lineclass=None,
    )
    return Markup(out.getvalue().decode("ascii"))  # noqa: S704 - segno's own SVG, no input
