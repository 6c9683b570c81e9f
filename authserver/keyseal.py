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


def seal(kek: bytes, server: str, kid: str, private_der: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return VERSION + nonce + _aead(kek).encrypt(nonce, private_der, _bound_to(server, kid))


def unseal(kek: bytes, server: str, kid: str, sealed: bytes) -> bytes:
    if not sealed.startswith(VERSION) or len(sealed) <= len(VERSION) + NONCE_BYTES:
        raise KeyUnsealError(f"signing key {kid} of server {server!r}: not a sealed key")
    nonce = sealed[len(VERSION) : len(VERSION) + NONCE_BYTES]
    try:
        return _aead(kek).decrypt(
            nonce, sealed[len(VERSION) + NONCE_BYTES :], _bound_to(server, kid)
        )
    except InvalidTag:
        raise KeyUnsealError(
            f"signing key {kid} of server {server!r} does not open with "
            "authserver.key_encryption_key: either it is not the key the store was written "
            "with, or the stored key is damaged"
        ) from None
