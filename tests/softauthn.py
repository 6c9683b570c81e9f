"""A software WebAuthn authenticator for tests: what a browser and a passkey send,
built here from the W3C WebAuthn Level 3 spec (not from tokengate's code), with knobs
to make it misbehave (wrong origin, wrong RP, no user verification, a counter that
goes back, another key's signature).

Only "none" attestation and ES256 (P-256), as platform passkeys send them."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

UP, UV, BE, BS, AT = 0x01, 0x04, 0x08, 0x10, 0x40


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Passkey:
    """One credential an authenticator holds."""

    rp_id: str
    user_handle: bytes
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    credential_id: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    sign_count: int = 0
    synced: bool = False  # backup eligible (and backed up)

    def cose_public_key(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps(
            {
                1: 2,  # kty: EC2
                3: -7,  # alg: ES256
                -1: 1,  # crv: P-256
                -2: numbers.x.to_bytes(32, "big"),
                -3: numbers.y.to_bytes(32, "big"),
            }
        )


@dataclass
class Authenticator:
    """A platform authenticator with a browser in front of it, at ``origin``."""

    origin: str
    passkeys: list[Passkey] = field(default_factory=list)
    counts: bool = True  # keeps a signature counter (synced passkeys often do not)

    def create(
        self,
        options: dict[str, Any],
        *,
        verify_user: bool = True,
        origin: str | None = None,
        rp_id: str | None = None,
        challenge: str | None = None,
        synced: bool = False,
        type_: str = "webauthn.create",
        credential_id: bytes | None = None,
    ) -> dict[str, Any]:
        """``navigator.credentials.create()``'s answer, as its toJSON()."""
        passkey = Passkey(
            rp_id=options["rp"]["id"], user_handle=unb64url(options["user"]["id"]), synced=synced
        )
        if credential_id is not None:
            passkey.credential_id = credential_id
        flags = UP | AT | (UV if verify_user else 0) | ((BE | BS) if synced else 0)
        attested = (
            bytes(16)  # AAGUID: none given
            + struct.pack(">H", len(passkey.credential_id))
            + passkey.credential_id
            + passkey.cose_public_key()
        )
        auth_data = (
            hashlib.sha256((rp_id or passkey.rp_id).encode()).digest()
            + bytes([flags])
            + struct.pack(">I", 0)
            + attested
        )
        client_data = self._client_data(type_, challenge or options["challenge"], origin)
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        self.passkeys.append(passkey)
        return {
            "id": b64url(passkey.credential_id),
            "rawId": b64url(passkey.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "attestationObject": b64url(attestation),
                "transports": ["internal", "hybrid"],
            },
            "authenticatorAttachment": "platform",
            "clientExtensionResults": {},
        }

    def get(
        self,
        options: dict[str, Any],
        *,
        passkey: Passkey | None = None,
        verify_user: bool = True,
        origin: str | None = None,
        rp_id: str | None = None,
        challenge: str | None = None,
        count: int | None = None,
        user_handle: bytes | None = None,
        signer: ec.EllipticCurvePrivateKey | None = None,
        type_: str = "webauthn.get",
    ) -> dict[str, Any]:
        """``navigator.credentials.get()``'s answer, as its toJSON(): the first passkey
        ``allowCredentials`` names (any of this RP's, when it names none)."""
        if passkey is None:
            allowed = {c["id"] for c in options.get("allowCredentials") or ()}
            passkey = next(
                p
                for p in self.passkeys
                if p.rp_id == options["rpId"]
                and (not allowed or b64url(p.credential_id) in allowed)
            )
        if count is None:
            if self.counts:
                passkey.sign_count += 1
            count = passkey.sign_count if self.counts else 0
        flags = UP | (UV if verify_user else 0) | ((BE | BS) if passkey.synced else 0)
        auth_data = (
            hashlib.sha256((rp_id or passkey.rp_id).encode()).digest()
            + bytes([flags])
            + struct.pack(">I", count)
        )
        client_data = self._client_data(type_, challenge or options["challenge"], origin)
        signed = auth_data + hashlib.sha256(client_data).digest()
        signature = (signer or passkey.key).sign(signed, ec.ECDSA(hashes.SHA256()))
        handle = passkey.user_handle if user_handle is None else user_handle
        return {
            "id": b64url(passkey.credential_id),
            "rawId": b64url(passkey.credential_id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url(client_data),
                "authenticatorData": b64url(auth_data),
                "signature": b64url(signature),
                "userHandle": b64url(handle),
            },
            "authenticatorAttachment": "platform",
            "clientExtensionResults": {},
        }

    def _client_data(self, type_: str, challenge: str, origin: str | None) -> bytes:
        return json.dumps(
            {
                "type": type_,
                "challenge": challenge,
                "origin": origin or self.origin,
                "crossOrigin": False,
            }
        ).encode()
