"""Second factors of the user directory: authenticator apps (TOTP) and recovery codes.

Enrolling: :meth:`Factors.begin` gives a new secret (kept unconfirmed), and
:meth:`Factors.confirm` takes the app's first code, which confirms it and gives ten
recovery codes, shown once and stored hashed. Signing in: :meth:`Factors.verify`
takes an app's code (good once: its time step must be newer than the last one
accepted) or an unused recovery code, throttled per user and per address as
passwords are, and within a budget of :data:`ATTEMPTS` a user per
:data:`ATTEMPT_WINDOW` seconds counted in the store before each code is checked (so
guesses sent all at once, to any replicas, are all counted). Every attempt is audited
(never the code) and counted.

A secret is stored sealed with ``authserver.key_encryption_key`` when there is one
(AES-256-GCM, bound to the user), so a copy of the store opens no one's app.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from authserver import totp
from authserver.keyseal import open_sealed, seal_bytes
from authserver.store import Store, StoreWorker, TotpRecord
from authserver.throttle import AuthThrottle
from tokengate.jsonlog import AuditLog
from tokengate.metrics import Metrics

PLAIN = b"raw1"  # a secret stored as is (no key encryption key configured)
Factor = Literal["totp", "recovery_code"]
ATTEMPTS = 10  # codes a user may try ...
ATTEMPT_WINDOW = 900  # ... in this many seconds (3 codes of 10^6 match each: ~1 in 30,000)


@dataclass(frozen=True, slots=True)
class Enrollment:
    secret: bytes
    uri: str  # otpauth://, for the QR code


@dataclass(frozen=True, slots=True)
class Verified:
    """:meth:`Factors.verify`'s answer: ok, or why not (``bad_code``, ``replayed``,
    ``locked`` with the seconds to wait)."""

    ok: bool
    factor: Factor | None
    reason: str
    retry_after: int | None = None


class Factors:
    def __init__(
        self,
        *,
        store: Store,
        io: StoreWorker,
        throttle: AuthThrottle,
        audit: AuditLog,
        metrics: Metrics,
        issuer_name: str,
        kek: bytes | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.io = io
        self.throttle = throttle
        self.audit = audit
        self.metrics = metrics
        self.issuer_name = issuer_name  # what authenticator apps show the account under
        self.kek = kek
        self.clock = clock

    async def enrolled(self, user_id: str) -> bool:
        record = await self.io.call(self.store.totp, user_id)
        return record is not None and record.confirmed_at is not None

    async def begin(self, user_id: str, username: str) -> Enrollment | None:
        """The secret to enroll (the one begun before, if unconfirmed); None when the
        user has a confirmed app already."""
        record = await self.io.call(self.store.totp, user_id)
        if record is not None and record.confirmed_at is not None:
            return None
        if record is not None:
            secret = self._open(record)
        else:
            secret = totp.new_secret()
            if not await self.io.call(
                self.store.begin_totp, user_id, self._seal(user_id, secret), int(self.clock())
            ):
                return None  # confirmed meanwhile (another tab)
        return Enrollment(secret, totp.otpauth_uri(self.issuer_name, username, secret))

    async def confirm(
        self, user_id: str, code: str, ip: str | None, fields: dict[str, object]
    ) -> list[str] | None:
        """Confirm the app being enrolled with its first code: the recovery codes to
        show (once), or None for a wrong code (throttled as a failure)."""
        key = _key(user_id)
        if await self._locked(user_id, ip) is not None:
            self._record(fields, "totp", "locked", "enroll")
            return None
        record = await self.io.call(self.store.totp, user_id)
        now = self.clock()
        step = None
        if record is not None and record.confirmed_at is None:
            step = totp.matching_step(self._open(record), code, now)
        if step is None:
            await self.throttle.failed(key, ip)
            self._record(fields, "totp", "failure", "enroll")
            return None
        codes = totp.new_recovery_codes()
        hashes = [totp.recovery_code_hash(c) for c in codes]
        if not await self.io.call(self.store.confirm_totp, user_id, step, int(now), hashes):
            self._record(fields, "totp", "failure", "enroll")
            return None
        await self._succeeded(user_id)
        self.metrics.factor_results.labels("totp", "success").inc()
        self.audit.emit("mfa.enrolled", **fields, factor="totp", outcome="success", reason="ok")
        return codes

    async def verify(
        self, user_id: str, code: str, ip: str | None, fields: dict[str, object]
    ) -> Verified:
        """A code from the user's app, or one of their recovery codes."""
        key = _key(user_id)
        wait = await self._locked(user_id, ip)
        if wait is not None:
            self._record(fields, "totp", "locked", "signin")
            return Verified(False, None, "locked", retry_after=wait)
        if totp.looks_like_recovery_code(code):
            return await self._recovery(user_id, code, ip, fields)
        record = await self.io.call(self.store.totp, user_id)
        if record is None or record.confirmed_at is None:
            await self.throttle.failed(key, ip)
            self._record(fields, "totp", "failure", "signin")
            return Verified(False, "totp", "bad_code")
        step = totp.matching_step(self._open(record), code, self.clock())
        if step is None:
            await self.throttle.failed(key, ip)
            self._record(fields, "totp", "failure", "signin")
            return Verified(False, "totp", "bad_code")
        if not await self.io.call(self.store.use_totp_step, user_id, step):
            await self.throttle.failed(key, ip)  # a replay: a code seen before
            self._record(fields, "totp", "replayed", "signin")
            return Verified(False, "totp", "replayed")
        await self._succeeded(user_id)
        self._record(fields, "totp", "success", "signin")
        return Verified(True, "totp", "ok")

    async def _recovery(
        self, user_id: str, code: str, ip: str | None, fields: dict[str, object]
    ) -> Verified:
        now = int(self.clock())
        used = await self.io.call(
            self.store.use_recovery_code, user_id, totp.recovery_code_hash(code), now
        )
        if not used:
            await self.throttle.failed(_key(user_id), ip)
            self._record(fields, "recovery_code", "failure", "signin")
            return Verified(False, "recovery_code", "bad_code")
        await self._succeeded(user_id)
        left = await self.io.call(self.store.recovery_codes_left, user_id)
        self._record(fields, "recovery_code", "success", "signin", remaining=left)
        return Verified(True, "recovery_code", "ok")

    async def _locked(self, user_id: str, ip: str | None) -> int | None:
        """Seconds to wait before another code may be tried, else None, with this
        attempt counted: the throttle (per user and address, as passwords), then the
        user's attempt budget in the store."""
        wait = await self.throttle.retry_after(_key(user_id), ip)
        if wait is not None:
            return wait
        now = int(self.clock())
        return await self.io.call(
            self.store.take_factor_attempt, user_id, now, ATTEMPT_WINDOW, ATTEMPTS
        )

    async def _succeeded(self, user_id: str) -> None:
        await self.throttle.succeeded(_key(user_id))
        await self.io.call(self.store.clear_factor_attempts, user_id)

    def _record(
        self,
        fields: dict[str, object],
        factor: Factor,
        result: str,
        step: str,
        **more: object,
    ) -> None:
        self.metrics.factor_results.labels(factor, result).inc()
        event = (
            "mfa.recovery_code_used"
            if factor == "recovery_code" and result == "success"
            else "mfa.verified"
        )
        reason = {"success": "ok", "failure": "bad_code"}.get(result, result)
        self.audit.emit(
            event,
            **fields,
            factor=factor,
            step=step,
            outcome="success" if result == "success" else "failure",
            reason=reason,
            **more,
        )

    def _seal(self, user_id: str, secret: bytes) -> bytes:
        if self.kek is None:
            return PLAIN + secret
        return seal_bytes(self.kek, _bound_to(user_id), secret)

    def _open(self, record: TotpRecord) -> bytes:
        if record.secret.startswith(PLAIN):
            return record.secret[len(PLAIN) :]
        if self.kek is None:
            raise ValueError("a sealed authenticator secret, and no key_encryption_key")
        what = f"the authenticator secret of user {record.user_id}"
        return open_sealed(self.kek, _bound_to(record.user_id), record.secret, what, "secret")


def _key(user_id: str) -> str:
    """The throttle's key for a user's second factor (apart from their password's)."""
    return "mfa:" + user_id


def _bound_to(user_id: str) -> bytes:
    return f"tokengate totp\x00{user_id}".encode()
