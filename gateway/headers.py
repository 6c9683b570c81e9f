"""What crosses the gateway in headers, each way. Pure.

Removed from requests: hop-by-hop headers (and any named in ``Connection``), every
client-sent ``X-Auth-*`` (any case, ``_`` spelling too), client ``X-Forwarded-*``,
``Forwarded`` and ``X-Real-IP`` (never trusted), ``Host`` and ``Content-Length``
(set by the client library), ``Expect``, and ``Authorization`` unless the route
forwards the token. Added: ``X-Request-Id``, ``X-Forwarded-For/Proto/Host`` and the
``X-Auth-*`` identity of the verified token.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable

from gateway.authn import Principal

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NEVER_FORWARDED = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"expect",
    b"forwarded",
    b"x-real-ip",
    b"x-request-id",
}
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@+=/-]{1,128}")


class RequestIds:
    """New request ids: a random per-process prefix and a counter, unique and cheap."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def pick(self, sent: bytes | None) -> str:
        """The client's ``X-Request-Id`` if it is well-formed, else a new one."""
        if sent is not None and _REQUEST_ID.fullmatch(sent):
            return sent.decode("ascii")
        return f"{self._prefix}{next(self._counter):08x}"


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def _spoofable(name: bytes) -> bool:
    normalized = name.replace(b"_", b"-")
    return normalized.startswith((b"x-auth-", b"x-forwarded-"))


def upstream_headers(
    headers: list[tuple[bytes, bytes]],
    *,
    client_ip: str | None,
    scheme: str,
    host: bytes | None,
    request_id: str,
    principal: Principal | None,
    forward_token: bool,
) -> list[tuple[str, str]]:
    drop = _connection_tokens(headers) if any(n == b"connection" for n, _ in headers) else ()
    out = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers
        if name not in _NEVER_FORWARDED
        and name not in drop
        and not _spoofable(name)
        and (forward_token or name != b"authorization")
    ]
    out.append(("X-Request-Id", request_id))
    if client_ip:
        out.append(("X-Forwarded-For", client_ip))
    out.append(("X-Forwarded-Proto", scheme))
    if host:
        out.append(("X-Forwarded-Host", host.decode("latin-1")))
    if principal is not None:
        if principal.sub is not None:
            out.append(("X-Auth-Subject", principal.sub))
        if principal.client_id is not None:
            out.append(("X-Auth-Client-Id", principal.client_id))
        out.append(("X-Auth-Scopes", " ".join(principal.scope_list)))
        out.append(("X-Auth-Issuer", principal.issuer.issuer))
    return out


def downstream_headers(
    raw: Iterable[tuple[bytes, bytes]], request_id: bytes
) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers without hop-by-hop ones, plus X-Request-Id."""
    lowered = [(name.lower(), value) for name, value in raw]
    drop = _connection_tokens(lowered)
    out = [
        (name, value)
        for name, value in lowered
        if name not in HOP_BY_HOP and name not in drop and name != b"x-request-id"
    ]
    out.append((b"x-request-id", request_id))
    return out
