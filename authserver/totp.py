"""Time-based one-time passwords (RFC 6238, on RFC 4226's HOTP): what authenticator
apps compute. Pure: secrets, codes, the ``otpauth://`` URI apps scan, recovery codes.

SHA-1, 6 digits, 30-second steps: the parameters every authenticator app supports
(others are ignored by many apps, which then show wrong codes)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from urllib.parse import quote, urlencode

SECRET_BYTES = 20  # 160 bits, RFC 4226's recommendation for HMAC-SHA1
STEP = 30  # seconds
DIGITS = 6
WINDOW = 1  # steps either side of now that still count: clocks a little off
RECOVERY_CODES = 10
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i to misread
_RECOVERY_GROUPS = 4  # of 4 characters: 16 characters, about 79 bits


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def secret_text(secret: bytes) -> str:
    """The secret as people type it into an app: base32, no padding, in groups of 4."""
    text = base64.b32encode(secret).decode("ascii").rstrip("=")
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


def hotp(secret: bytes, counter: int, digits: int = DIGITS) -> str:
    """RFC 4226 section 5.3."""
    mac = hmac.new(secret, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def step_at(now: float) -> int:
    return int(now // STEP)


def code_at(secret: bytes, now: float) -> str:
    return hotp(secret, step_at(now))


def matching_step(secret: bytes, code: str, now: float, window: int = WINDOW) -> int | None:
    """The time step ``code`` belongs to, within ``window`` steps of ``now``; None
    when it is none of them. Every candidate is compared, in constant time, so the
    answer's timing says nothing about which step matched."""
    code = code.strip().replace(" ", "")
    if len(code) != DIGITS or not code.isascii() or not code.isdigit():
        return None
    current = step_at(now)
    found = None
    for step in range(current - window, current + window + 1):
        if hmac.compare_digest(hotp(secret, step).encode(), code.encode()) and found is None:
            found = step
    return found


def otpauth_uri(issuer: str, account: str, secret: bytes) -> str:
    """The ``otpauth://totp/...`` URI an authenticator app reads from a QR code (the
    de facto format of Google Authenticator's Key Uri Format)."""
    label = quote(f"{issuer}:{account}", safe="")
    query = urlencode(
        {
            "secret": base64.b32encode(secret).decode("ascii").rstrip("="),
            "issuer": issuer,
            "algorithm": "SHA1",
            "digits": DIGITS,
            "period": STEP,
        },
        quote_via=quote,
    )
    return f"otpauth://totp/{label}?{query}"


def new_recovery_codes(count: int = RECOVERY_CODES) -> list[str]:
    """Single-use codes for when the authenticator is lost: ``xxxx-xxxx-xxxx-xxxx``."""
    return [
        "-".join(
            "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(4))
            for _ in range(_RECOVERY_GROUPS)
        )
        for _ in range(count)
    ]


def recovery_code_hash(code: str) -> str:
    """The store's form of a recovery code: SHA-256 of its canonical spelling (79
    random bits: a fast hash is enough, as for refresh tokens)."""
    canonical = "".join(c for c in code.lower() if c.isalnum())
    return hashlib.sha256(canonical.encode("ascii", "replace")).hexdigest()


def looks_like_recovery_code(text: str) -> bool:
    canonical = "".join(c for c in text.lower() if c.isalnum())
    return len(canonical) == 4 * _RECOVERY_GROUPS and all(
        c in _RECOVERY_ALPHABET for c in canonical
    )
