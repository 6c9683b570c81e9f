"""Passkeys (WebAuthn Level 3) of the user directory: registering one and checking its
signatures, with Duo's ``webauthn`` library doing the ceremony checks.

The relying party is the public URL (:mod:`authserver.relyingparty`): its host is the
RP id, its origin the only origin accepted.

- **Registering** (:meth:`Passkeys.registration_options`, :meth:`Passkeys.register`):
  a discoverable credential (so it can sign in without a username), no attestation
  asked for (the authenticator's make is not checked: its model, the AAGUID, is kept
  as the authenticator states it), user verification required when the passkey is to
  replace the password.
- **Signing in** (:meth:`Passkeys.authentication_options`, :meth:`Passkeys.verify`):
  as a second factor, for a known user (their credentials listed); or alone, for no
  user yet (the browser offers the user's discoverable passkeys, and the signature's
  user handle says whose), with user verification required.

A challenge is 32 random bytes, kept with the sign-in in progress and spent by the
first answer that uses it (:meth:`authserver.store.Store.swap_interaction_progress`);
the signature counter only moves forward (:meth:`authserver.store.Store.use_passkey`).
Every result is audited (never the credential) and counted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import (
    base64url_to_bytes,
    bytes_to_base64url,
    generate_challenge,
    parse_authentication_credential_json,
)
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    CredentialDeviceType,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from authserver.relyingparty import RelyingParty
from authserver.signon import passkey_amr
from authserver.store import PasskeyRecord, Store, StoreWorker
from tokengate.jsonlog import AuditLog
from tokengate.metrics import Metrics

TIMEOUT_MS = 120_000  # how long the browser waits for the authenticator
MAX_CREDENTIAL = 16_384  # characters of a credential's JSON a form may carry
# What a malformed credential may raise from the library's parsers, besides its own
# errors: bad base64url, CBOR, lengths. Every one is a refusal, never a 500.
_MALFORMED = (
    WebAuthnException,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    RecursionError,  # JSON nested thousands deep
)


@dataclass(frozen=True, slots=True)
class Challenge:
    """Options for the browser (``navigator.credentials.create()`` or ``.get()``, as
    JSON) and the challenge they carry, base64url, to keep with the sign-in."""

    options: str
    challenge: str


@dataclass(frozen=True, slots=True)
class Verified:
    """:meth:`Passkeys.verify`'s answer: whose passkey signed, and its ``amr`` value;
    or why not (``reason``)."""

    ok: bool
    reason: str
    user_id: str | None = None
    amr: str | None = None


class Passkeys:
    def __init__(
        self,
        *,
        store: Store,
        io: StoreWorker,
        rp: RelyingParty,
        audit: AuditLog,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.io = io
        self.rp = rp
        self.audit = audit
        self.metrics = metrics
        self.clock = clock

    # -- registering -----------------------------------------------------------------

    def registration_options(
        self,
        user_id: str,
        username: str,
        display_name: str,
        existing: list[PasskeyRecord],
        verify_user: bool,
    ) -> Challenge:
        """Options to create a passkey for this user; ``existing`` are excluded (one
        authenticator, one passkey); ``verify_user``: the passkey will replace the
        password, so the authenticator must verify its user (PIN or biometric)."""
        challenge = generate_challenge()
        options = generate_registration_options(
            rp_id=self.rp.id,
            rp_name=self.rp.name,
            user_id=user_id.encode(),
            user_name=username,
            user_display_name=display_name or username,
            challenge=challenge,
            timeout=TIMEOUT_MS,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.REQUIRED,
                user_verification=_uv(verify_user),
            ),
            exclude_credentials=[_descriptor(p) for p in existing],
        )
        return Challenge(options_to_json(options), bytes_to_base64url(challenge))

    async def register(
        self,
        user_id: str,
        credential: str,
        challenge: str,
        verify_user: bool,
        fields: dict[str, Any],
    ) -> PasskeyRecord | None:
        """Check a new passkey's credential against the challenge and store it; None
        (audited) when it is not valid or registered already."""
        try:
            if len(credential) > MAX_CREDENTIAL:
                raise ValueError("credential too long")
            checked = verify_registration_response(
                credential=credential,
                expected_challenge=base64url_to_bytes(challenge),
                expected_rp_id=self.rp.id,
                expected_origin=self.rp.origin,
                require_user_verification=verify_user,
            )
            transports = _transports(credential)
        except _MALFORMED:
            self._enrolled(fields, "failure", "bad_passkey")
            return None
        record = PasskeyRecord(
            credential_id=bytes_to_base64url(checked.credential_id),
            user_id=user_id,
            public_key=checked.credential_public_key,
            sign_count=checked.sign_count,
            backup_eligible=checked.credential_device_type == CredentialDeviceType.MULTI_DEVICE,
            transports=transports,
            aaguid=checked.aaguid,
            created_at=int(self.clock()),
        )
        if not await self.io.call(self.store.add_passkey, record):
            self._enrolled(fields, "failure", "registered_already")
            return None
        self._enrolled(fields, "success", "ok", passkey=record)
        return record

    # -- signing in --------------------------------------------------------------------

    def authentication_options(
        self, allowed: list[PasskeyRecord] | None, verify_user: bool
    ) -> Challenge:
        """Options to sign with one of ``allowed`` (a known user's passkeys), or with
        any discoverable passkey of this site (None: the user is not known yet)."""
        challenge = generate_challenge()
        options = generate_authentication_options(
            rp_id=self.rp.id,
            challenge=challenge,
            timeout=TIMEOUT_MS,
            allow_credentials=[_descriptor(p) for p in allowed or ()],
            user_verification=_uv(verify_user),
        )
        return Challenge(options_to_json(options), bytes_to_base64url(challenge))

    async def verify(
        self,
        credential: str,
        challenge: str,
        user_id: str | None,
        verify_user: bool,
        fields: dict[str, Any],
        step: str,
    ) -> Verified:
        """Check a passkey's signature over the challenge: by one of ``user_id``'s
        passkeys, or (None) by any user's, whose user handle must name its owner.
        ``step``: ``signin`` (a second factor) or ``passwordless``."""
        try:
            if len(credential) > MAX_CREDENTIAL:
                raise ValueError("credential too long")
            parsed = parse_authentication_credential_json(credential)
            credential_id = bytes_to_base64url(parsed.raw_id)
        except _MALFORMED:
            return self._verified(fields, step, "bad_passkey")
        record = await self.io.call(self.store.passkey, credential_id)
        if record is None:
            return self._verified(fields, step, "unknown_passkey")
        fields = {**fields, "passkey": credential_id}
        if user_id is not None and record.user_id != user_id:
            return self._verified(fields, step, "unknown_passkey")
        if user_id is None and parsed.response.user_handle != record.user_id.encode():
            return self._verified(fields, step, "bad_passkey")
        try:  # the signature first: nothing about an unsigned answer is believed
            checked = verify_authentication_response(
                credential=parsed,
                expected_challenge=base64url_to_bytes(challenge),
                expected_rp_id=self.rp.id,
                expected_origin=self.rp.origin,
                credential_public_key=record.public_key,
                credential_current_sign_count=0,  # the counter: checked below, in the store
                require_user_verification=False,  # likewise, to say which check failed
            )
        except _MALFORMED:
            return self._verified(fields, step, "bad_passkey")
        if verify_user and not checked.user_verified:
            return self._verified(fields, step, "user_not_verified")
        now = int(self.clock())
        if not await self.io.call(
            self.store.use_passkey, credential_id, checked.new_sign_count, now
        ):
            return self._verified(fields, step, "replayed")  # the counter did not move on
        fields = {**fields, "user_id": record.user_id}
        self._verified(fields, step, "ok")
        # synced (a software key) if it said so at either time: the flag is the
        # authenticator's own word ("none" attestation), so the weaker claim wins
        synced = record.backup_eligible or (
            checked.credential_device_type == CredentialDeviceType.MULTI_DEVICE
        )
        return Verified(True, "ok", record.user_id, passkey_amr(synced))

    # -- records -----------------------------------------------------------------------

    def _enrolled(
        self,
        fields: dict[str, Any],
        outcome: str,
        reason: str,
        passkey: PasskeyRecord | None = None,
    ) -> None:
        self.metrics.factor_results.labels("passkey", outcome).inc()
        more = {} if passkey is None else {"passkey": passkey.credential_id}
        self.audit.emit(
            "mfa.enrolled", **fields, factor="passkey", **more, outcome=outcome, reason=reason
        )

    def _verified(self, fields: dict[str, Any], step: str, reason: str) -> Verified:
        result = (
            "success" if reason == "ok" else ("replayed" if reason == "replayed" else "failure")
        )
        self.metrics.factor_results.labels("passkey", result).inc()
        self.audit.emit(
            "mfa.verified",
            **fields,
            factor="passkey",
            step=step,
            outcome="success" if reason == "ok" else "failure",
            reason=reason,
        )
        return Verified(reason == "ok", reason)


def _uv(required: bool) -> UserVerificationRequirement:
    return (
        UserVerificationRequirement.REQUIRED if required else UserVerificationRequirement.PREFERRED
    )


def _descriptor(record: PasskeyRecord) -> PublicKeyCredentialDescriptor:
    transports = []
    for name in record.transports:
        try:
            transports.append(AuthenticatorTransport(name))
        except ValueError:
            continue  # a transport newer than this library: the browser finds it anyway
    return PublicKeyCredentialDescriptor(
        id=base64url_to_bytes(record.credential_id), transports=transports or None
    )


def _transports(credential: str) -> tuple[str, ...]:
    """The transports the browser says the new passkey uses (hints for later sign-ins;
    a few short names, or none)."""
    response = json.loads(credential).get("response")
    found = response.get("transports") if isinstance(response, dict) else None
    if not isinstance(found, list):
        return ()
    return tuple(t for t in found if isinstance(t, str) and t.isascii() and len(t) <= 32)[:8]
