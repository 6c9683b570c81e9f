"""The second factor's hosted pages (org-wide, under ``{public_url}/signin/mfa``).

A sign-in whose sign-on policy, groups or ``acr_values`` ask for a second factor
comes here after the password (or, for a session signed in with a password alone,
instead of it: step-up). The store's record of the sign-in in progress says what it
has proved (whose password, when); the pages only add to it:

- ``/signin/mfa``: a code from the user's authenticator app, or a recovery code;
- ``/signin/mfa/enroll``: for a user without an app: its secret as a QR code (SVG,
  drawn here) and as text, confirmed by a first code; then the ten recovery codes,
  shown once, and ``/signin/mfa/continue`` goes on to the application.

Then the sign-in completes as a password-only one does (a new session, renewed id),
with ``amr`` ``pwd otp mfa`` and ``acr`` :data:`authserver.signon.ACR_MFA`.
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
from authserver.sessions import session_hash
from authserver.signon import AMR_MFA
from authserver.store import SessionRecord, Store
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
    def __init__(self, signin: SignInPages, factors: Factors) -> None:
        self.signin = signin
        self.factors = factors
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
        headers: Headers = (),  # type: ignore[assignment]
    ) -> None:
        """Record what the sign-in has proved (``password_at``: when the password was
        checked; None: a live session's step-up) and send the browser to the code's
        page, or to enroll an app first."""
        progress = {"user_id": user.id, "password_at": password_at}
        await self.signin.io_call(
            self.signin.store.set_interaction_progress, session_hash(cookie), json.dumps(progress)
        )
        enrolled = await self.factors.enrolled(user.id)
        target = self.paths.mfa if enrolled else self.paths.mfa_enroll
        location = [(b"location", target.encode())]
        await send_bytes(send, 303, b"", [*location, *headers, *self._headers(request)])

    # -- /signin/mfa -------------------------------------------------------------

    async def challenge(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.signin.page(self._challenge, scope, receive, send)

    async def _challenge(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = await self._found(scope, send)
        if found is None:
            return
        step, user = found
        if not await self.factors.enrolled(user.id):  # reset meanwhile: enroll again
            await self._redirect(send, step.request, self.paths.mfa_enroll)
            return
        if scope["method"] == "GET":
            await self._code_page(send, step, user, None, 200)
            return
        form = await self.signin.checked_form(scope, receive, send, step.csrf)
        if form is None:
            return
        code = (form.get("code") or "")[:MAX_CODE]
        verified = await self.factors.verify(
            user.id, code, self.signin.remote_addr(scope), self._fields(scope, step, user)
        )
        if not verified.ok:
            if verified.reason == "locked":
                error = LOCKED.format(wait=verified.retry_after)
                await self._code_page(send, step, user, error, 429)
            else:
                await self._code_page(send, step, user, WRONG_CODE, 401)
            return
        await self._finish(scope, send, step, user)

    async def _code_page(
        self, send: Send, step: InProgress, user: User, error: str | None, status: int
    ) -> None:
        body = self.signin.render(
            "mfa.html",
            action=self.paths.mfa,
            csrf_token=step.csrf,
            client_id=step.request.client.client_id,
            username=user.username,
            error=error,
        )
        await send_bytes(send, status, body, [HTML, *self._headers(step.request)])

    # -- /signin/mfa/enroll -----------------------------------------------------

    async def enroll(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.signin.page(self._enroll, scope, receive, send)

    async def _enroll(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = await self._found(scope, send)
        if found is None:
            return
        step, user = found
        if (step.progress or {}).get("password_at") is None:
            # a factor is bound to the account only in a sign-in that gave the password
            await self.signin.error_page(send, "expired", _EXPIRED, 400)
            return
        enrollment = await self.factors.begin(user.id, user.username)
        if enrollment is None:  # enrolled already: a code, not a new app
            await self._redirect(send, step.request, self.paths.mfa)
            return
        error = None
        status = 200
        if scope["method"] == "POST":
            form = await self.signin.checked_form(scope, receive, send, step.csrf)
            if form is None:
                return
            code = (form.get("code") or "")[:MAX_CODE]
            fields = self._fields(scope, step, user)
            codes = await self.factors.confirm(
                user.id, code, self.signin.remote_addr(scope), fields
            )
            if codes is not None:
                await self._recovery_codes(send, step, user, codes)
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
        )
        await send_bytes(send, status, body, [HTML, *self._headers(step.request)])

    async def _recovery_codes(
        self, send: Send, step: InProgress, user: User, codes: list[str]
    ) -> None:
        """The app is confirmed, and that proves the second factor: the sign-in may go
        on, once the user has seen the recovery codes (shown this once)."""
        progress = {**(step.progress or {}), "mfa_at": int(self.signin.clock())}
        await self.signin.io_call(
            self.signin.store.set_interaction_progress,
            session_hash(step.cookie),
            json.dumps(progress),
        )
        body = self.signin.render(
            "recovery_codes.html",
            action=self.paths.mfa_continue,
            csrf_token=step.csrf,
            username=user.username,
            codes=codes,
        )
        await send_bytes(send, 200, body, [HTML, *self._headers(step.request)])

    # -- /signin/mfa/continue ----------------------------------------------------

    async def cont(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.signin.page(self._cont, scope, receive, send)

    async def _cont(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = await self._found(scope, send)
        if found is None:
            return
        step, user = found
        if scope["method"] != "POST" or not (step.progress or {}).get("mfa_at"):
            await self.signin.error_page(send, "invalid_request", "Enter a code first.", 400)
            return
        if await self.signin.checked_form(scope, receive, send, step.csrf) is None:
            return
        await self._finish(scope, send, step, user)

    # -- shared ------------------------------------------------------------------

    async def _found(self, scope: Scope, send: Send) -> tuple[InProgress, User] | None:
        """The sign-in in progress and the user whose password (or session) it has
        proved, still allowed in; None once an error page has been sent."""
        now = int(self.signin.clock())
        step = await self.signin.in_progress(scope, send, now)
        if step is None:
            return None
        user_id = (step.progress or {}).get("user_id")
        user = await self.signin.users.get(user_id) if isinstance(user_id, str) else None
        if user is None or user.disabled or not is_assigned(step.request.client, user):
            await self.signin.error_page(send, "expired", _EXPIRED, 400)
            return None
        return step, user

    async def _finish(self, scope: Scope, send: Send, step: InProgress, user: User) -> None:
        now = int(self.signin.clock())
        progress = step.progress or {}
        if progress.get("password_at") is None:
            # a step-up adds to the browser's session: it must still be this user's
            live = await self.signin.live_session(scope, now)
            if live is None or live[1].user_id != user.id:
                await self.signin.error_page(send, "expired", _EXPIRED, 400)
                return
        fields = self._fields(scope, step, user)
        await self.signin.complete(
            scope, send, step.request, user, fields, step.cookie, now, AMR_MFA
        )

    def _fields(self, scope: Scope, step: InProgress, user: User) -> dict[str, Any]:
        return {
            "server": step.request.server.name,
            "client_id": step.request.client.client_id,
            "user_id": user.id,
            "username": user.username,
            "remote_addr": self.signin.remote_addr(scope),
        }

    async def _redirect(self, send: Send, request: AuthorizeRequest, path: str) -> None:
        headers = [(b"location", path.encode()), *self._headers(request)]
        await send_bytes(send, 303, b"", headers)

    def _headers(self, request: AuthorizeRequest) -> Headers:
        # the forms' answers redirect to the client: the pages allow its origin
        return page_headers(origin_of(request.target.redirect_uri))


_EXPIRED = "This sign-in has expired. Go back to the application and start again."


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
