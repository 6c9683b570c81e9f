"""Signing keys' private parts at rest in a shared store: AES-256-GCM under the key
encryption key (``authserver.key_encryption_key``), bound to the key's server and
``kid`` so that a sealed key copied onto another record does not open."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = b"tgk1"  # format marker: a later format can be told apart
NONCE_BYTES = 12


class KeyUnsealError(ValueError):
    """A sealed key that does not open: the wrong key encryption key, or damage. The
    server does not start on it (and never makes a new key in its place)."""


KEK_BYTES = 32  # AES-256


def _bound_to(server: str, kid: str) -> bytes:
    return f"tokengate signing key\x00{server}\x00{kid}".encode()


def _aead(kek: bytes) -> AESGCM:
    if len(kek) != KEK_BYTES:
        raise ValueError(f"a key encryption key is {KEK_BYTES} bytes, not {len(kek)}")
    return AESGCM(kek)


def seal_bytes(kek: bytes, bound_to: bytes, data: bytes) -> bytes:
    """``data`` sealed under ``kek``, opening only with the same ``bound_to``."""
    nonce = os.urandom(NONCE_BYTES)
    return VERSION + nonce + _aead(kek).encrypt(nonce, data, bound_to)


def open_sealed(kek: bytes, bound_to: bytes, sealed: bytes, what: str, noun: str) -> bytes:
    """What :func:`seal_bytes` sealed; :class:`KeyUnsealError` naming ``what`` (a
    ``noun``: key, secret) when it does not open."""
    if not sealed.startswith(VERSION) or len(sealed) <= len(VERSION) + NONCE_BYTES:
        raise KeyUnsealError(f"{what}: not a sealed {noun}")
    nonce = sealed[len(VERSION) : len(VERSION) + NONCE_BYTES]
    try:
        return _aead(kek).decrypt(nonce, sealed[len(VERSION) + NONCE_BYTES :], bound_to)
    except InvalidTag:
        raise KeyUnsealError(
            f"{what} does not open with authserver.key_encryption_key: either it is not "
            f"the key the store was written with, or the stored {noun} is damaged"
        ) from None


def seal(kek: bytes, server: str, kid: str, private_der: bytes) -> bytes:
    return seal_bytes(kek, _bound_to(server, kid), private_der)


def unseal(kek: bytes, server: str, kid: str, sealed: bytes) -> bytes:
    what = f"signing key {kid} of server {server!r}"
    return open_sealed(kek, _bound_to(server, kid), sealed, what, "key")
