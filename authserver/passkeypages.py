"""The passkey's hosted pages (org-wide, under ``{public_url}/signin/passkey``), beside
the second factor's (:mod:`authserver.mfapages`).

- ``/signin/passkey/enroll``: create a passkey, in a sign-in that gave the password
  and, for an account that has a factor already, proved it. The first factor of an
  account comes with ten recovery codes, shown once.
- ``/signin/passkey/verify``: a passkey's signature, POSTed by the pages' script:
  from the second factor's page, the factor of the user whose password (or session)
  the sign-in has proved; from the sign-in page of an app whose sign-on policy is
  ``passwordless``, the sign-in itself (the passkey's user handle says whose; the
  authenticator must have verified its user).

Each page's challenge is kept with the sign-in in progress and spent by the first
answer that uses it, whatever that answer is.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any, Protocol

from authserver.interactions import InProgress
from authserver.mfapages import EXPIRED, MfaPages, SignInPages, need_of, proved_factors
from authserver.pageheaders import HTML
from authserver.passkeys import Passkeys
from authserver.sessions import session_hash
from authserver.signon import passkey_amr
from authserver.store import PasskeyRecord
from authserver.totp import new_recovery_codes, recovery_code_hash
from authserver.users import User
from tokengate.asgi import Receive, Scope, Send, send_bytes

NOT_CREATED = "The passkey was not created. Try again, or use another device."
NOT_ACCEPTED = "That passkey could not be checked. Try again."
BAD_PASSKEY = "That passkey could not sign you in."


class PasswordlessSignIn(SignInPages, Protocol):
    """What the passkey's pages also use of the sign-in pages."""

    def passwordless(self, step: InProgress) -> bool: ...

    async def login_form(
        self, send: Send, step: InProgress, username: str, error: str | None, status: int
    ) -> None: ...

    async def signed_in_with_passkey(
        self, scope: Scope, send: Send, step: InProgress, user_id: str, amr: tuple[str, ...]
    ) -> None: ...


class PasskeyPages:
    def __init__(self, signin: PasswordlessSignIn, mfa: MfaPages, passkeys: Passkeys) -> None:
        self.signin = signin
        self.mfa = mfa
        self.passkeys = passkeys
        self.paths = signin.paths

    def routes(self) -> dict[str, Callable[[Scope, Receive, Send], Any]]:
        return {
            self.paths.passkey_enroll: self.enroll,
            self.paths.passkey_verify: self.verify,
        }

    # -- /signin/passkey/enroll ------------------------------------------------------

    async def enroll(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.signin.page(self._enroll, scope, receive, send)

    async def _enroll(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = await self.mfa.enrolling(scope, send)
        if found is None:
            return
        step, user = found
        app, passkeys = await self.mfa.factors_of(user.id)
        if (app or passkeys) and not proved_factors(step):
            # an account with a factor gets another only once that one is proved
            await self.mfa.redirect(send, step.request, self.paths.mfa)
            return
        if scope["method"] == "GET":
            await self._enroll_page(send, step, user, passkeys, None, 200)
            return
        form = await self.signin.checked_form(scope, receive, send, step.csrf)
        if form is None:
            return
        spent = await self._spend(step, send)
        if spent is None:
            return
        challenge, step = spent
        verify_user = need_of(step) == "passkey"
        record = await self.passkeys.register(
            user.id,
            form.get("credential") or "",
            challenge,
            verify_user,
            self.mfa.fields(scope, step, user),
        )
        if record is None:
            await self._enroll_page(send, step, user, passkeys, NOT_CREATED, 400)
            return
        factors = (*proved_factors(step), passkey_amr(record.backup_eligible))
        codes = new_recovery_codes()
        hashes = [recovery_code_hash(code) for code in codes]
        if await self.signin.io_call(self.signin.store.add_recovery_codes, user.id, hashes):
            await self.mfa.recovery_codes(send, step, user, codes, factors)
            return
        await self.mfa.finish(scope, send, step, user, factors)

    async def _enroll_page(
        self,
        send: Send,
        step: InProgress,
        user: User,
        existing: list[PasskeyRecord],
        error: str | None,
        status: int,
    ) -> None:
        verify_user = need_of(step) == "passkey"
        name = user.profile.get("name")
        options = self.passkeys.registration_options(
            user.id,
            user.username,
            name if isinstance(name, str) else user.username,
            existing,
            verify_user,
        )
        await self._keep_challenge(step, options.challenge)
        body = self.signin.render(
            "passkey.html",
            action=self.paths.passkey_enroll,
            csrf_token=step.csrf,
            client_id=step.request.client.client_id,
            username=user.username,
            options=options.options,
            script=self.paths.passkey_script,
            instead_of_password=verify_user,
            app_enroll=None if verify_user or existing else self.paths.mfa_enroll,
            error=error,
        )
        headers = self.mfa.headers(step.request, script=True)
        await send_bytes(send, status, body, [HTML, *headers])

    # -- /signin/passkey/verify ------------------------------------------------------

    async def verify(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.signin.page(self._verify, scope, receive, send)

    async def _verify(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            await self.signin.error_page(send, "invalid_request", "Use POST.", 405)
            return
        step = await self.signin.in_progress(scope, send, int(self.signin.clock()))
        if step is None:
            return
        form = await self.signin.checked_form(scope, receive, send, step.csrf)
        if form is None:
            return
        credential = form.get("credential") or ""
        if (step.progress or {}).get("user_id") is None:
            await self._passwordless(scope, send, step, credential)
            return
        user = await self.mfa.user_of(step, send)
        if user is None:
            return
        spent = await self._spend(step, send)
        if spent is None:
            return
        challenge, step = spent
        verified = await self.passkeys.verify(
            credential,
            challenge,
            user.id,
            verify_user=False,  # the password (or the session's) is the other factor
            fields=self.mfa.fields(scope, step, user),
            step="signin",
        )
        if not verified.ok or verified.amr is None:
            factors = await self.mfa.factors_of(user.id)
            await self.mfa.code_page(
                send, step, user, factors, None, 401, passkey_error=NOT_ACCEPTED
            )
            return
        await self.mfa.finish(scope, send, step, user, (*proved_factors(step), verified.amr))

    async def _passwordless(
        self, scope: Scope, send: Send, step: InProgress, credential: str
    ) -> None:
        """A passkey instead of the password, where the app's policy says so."""
        if not self.signin.passwordless(step):
            await self.signin.error_page(
                send, "invalid_request", "This application signs in with a password.", 400
            )
            return
        spent = await self._spend(step, send)
        if spent is None:
            return
        challenge, step = spent
        fields = {
            "server": step.request.server.name,
            "client_id": step.request.client.client_id,
            "user_id": None,
            "username": None,
            "remote_addr": self.signin.remote_addr(scope),
        }
        verified = await self.passkeys.verify(
            credential, challenge, None, verify_user=True, fields=fields, step="passwordless"
        )
        if not verified.ok or verified.user_id is None or verified.amr is None:
            await self.signin.login_form(send, step, "", BAD_PASSKEY, 401)
            return
        amr = (verified.amr, "mfa")  # something held, and a PIN or biometric it checked
        await self.signin.signed_in_with_passkey(scope, send, step, verified.user_id, amr)

    # -- challenges ------------------------------------------------------------------

    async def _keep_challenge(self, step: InProgress, challenge: str) -> None:
        progress = {**(step.progress or {}), "passkey_challenge": challenge}
        await self.signin.io_call(
            self.signin.store.set_interaction_progress,
            session_hash(step.cookie),
            json.dumps(progress),
        )

    async def _spend(self, step: InProgress, send: Send) -> tuple[str, InProgress] | None:
        """The challenge of the page this answers, spent: no other answer can use it,
        and the sign-in in progress without it; None once an error page has been sent
        (there is none: spent before, or replaced by a newer page's)."""
        progress = step.progress or {}
        challenge = progress.get("passkey_challenge")
        if not isinstance(challenge, str) or step.stored is None:
            await self.signin.error_page(send, "expired", EXPIRED, 400)
            return None
        rest = {k: v for k, v in progress.items() if k != "passkey_challenge"}
        stored = json.dumps(rest)
        swapped = await self.signin.io_call(
            self.signin.store.swap_interaction_progress,
            session_hash(step.cookie),
            step.stored,
            stored,
        )
        if not swapped:
            await self.signin.error_page(send, "expired", EXPIRED, 400)
            return None
        return challenge, dataclasses.replace(step, progress=rest, stored=stored)
