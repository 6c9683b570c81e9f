"""What crosses the gateway in headers, each way. Pure.

Removed from requests: hop-by-hop headers (and any named in ``Connection``), ``Host``
and ``Content-Length`` (set by the upstream client), ``Expect``, ``Authorization``
unless the route forwards the token, and every header an upstream might take as the
gateway's word: ``X-Auth-*`` and ``X-Forwarded-*``, the client-address headers
(``Forwarded``, ``X-Real-IP``, ``True-Client-IP``, ...), the URL-rewrite headers
(``X-Original-URL``, ``X-Rewrite-URL``), the method-override headers, and those the
config lists. Names are compared after lowercasing and turning ``_`` into ``-``, the
way CGI-style servers fold them. Added: ``X-Request-Id``, ``X-Forwarded-For/Proto/Host``
and the ``X-Auth-*`` identity of the verified token (``X-Auth-Username`` for a user's
token that carries ``preferred_username``).
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable

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
_NEVER_FORWARDED = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-request-id"}
# Headers an upstream may trust as the gateway's (or a proxy's) word, never the client's.
SPOOFABLE = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"true-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-original-url",
        b"x-rewrite-url",
        b"x-original-uri",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-forwarded",
        b"x-original-forwarded-for",
        b"x-host",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-originating-ip",
        b"x-proxyuser-ip",
        b"remote-user",  # identity headers of other reverse proxies and web servers
        b"x-remote-user",
    }
)
_SPOOFABLE_PREFIXES = (b"x-auth-", b"x-forwarded-", b"x-envoy-")
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})
_NOT_RETURNED = HOP_BY_HOP | {b"x-request-id"}
CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # never in an identity header value
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


def _connection_tokens(values: Iterable[bytes]) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in values:
        lowered = value.lower()
        if lowered in _PLAIN_CONNECTION:
            tokens.add(lowered)
        else:
            tokens.update(t.strip() for t in lowered.split(b",") if t.strip())
    return tokens


def identity_headers(
    sub: str | None,
    client_id: str | None,
    scopes: Iterable[str],
    issuer: str,
    *,
    username: str | None = None,
) -> tuple[tuple[bytes, bytes], ...]:
    """The ``X-Auth-*`` headers for a verified token (built once per token).

    Values are UTF-8; one holding a control character (a line break that would
    start a header of its own) raises ValueError.
    """
    out = []
    if sub is not None:
        out.append((b"x-auth-subject", sub))
    if client_id is not None:
        out.append((b"x-auth-client-id", client_id))
    out.append((b"x-auth-scopes", " ".join(scopes)))
    out.append((b"x-auth-issuer", issuer))
    if username is not None:  # a user's token: its preferred_username
        out.append((b"x-auth-username", username))
    for name, value in out:
        if CONTROL.search(value):
            raise ValueError(f"{name.decode()} would hold a control character")
    return tuple((name, value.encode("utf-8")) for name, value in out)


def upstream_headers(
    headers: list[tuple[bytes, bytes]],
    *,
    forwarded_for: str | None,
    scheme: str,
    host: bytes | None,
    request_id: str,
    identity: tuple[tuple[bytes, bytes], ...],
    forward_token: bool,
    strip: frozenset[bytes] = SPOOFABLE,
) -> list[tuple[bytes, bytes]]:
    """What the upstream is sent: the client's headers as they came (lowercase names,
    as ASGI gives them) less everything listed above, then the gateway's own.
    ``forwarded_for`` is the believed address chain (see tokengate.proxies), ``strip``
    holds lowercase names with ``-`` for ``_``."""
    out = []
    connection = None
    for name, value in headers:
        folded = name.replace(b"_", b"-") if b"_" in name else name
        if folded in _NEVER_FORWARDED:
            if name == b"connection":
                connection = [*(connection or ()), value]
            continue
        if folded in strip or folded.startswith(_SPOOFABLE_PREFIXES):
            continue
        if name != b"authorization" or forward_token:
            out.append((name, value))
    if connection is not None:  # headers the client named hop-by-hop go too
        drop = _connection_tokens(connection)
        out = [(name, value) for name, value in out if name not in drop]
    out.append((b"x-request-id", request_id.encode("ascii")))
    if forwarded_for:
        out.append((b"x-forwarded-for", forwarded_for.encode("ascii")))
    out.append((b"x-forwarded-proto", scheme.encode("ascii")))
    if host:
        out.append((b"x-forwarded-host", host))
    out.extend(identity)
    return out


def downstream_headers(
    raw: Iterable[tuple[bytes, bytes]], request_id: bytes, status: int = 200
) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers without hop-by-hop ones, plus X-Request-Id.

    A 204 or 304 loses its Content-Length: it describes no body here, and the
    server side would otherwise wait for that many body bytes.
    """
    out = []
    connection = None
    bodiless = status in (204, 304)
    for name, value in raw:
        name = name.lower()
        if name in _NOT_RETURNED:
            if name == b"connection":
                connection = [*(connection or ()), value]
        elif not (bodiless and name == b"content-length"):
            out.append((name, value))
    if connection is not None:
        drop = _connection_tokens(connection) - HOP_BY_HOP
        if drop:
            out = [(name, value) for name, value in out if name not in drop]
    out.append((b"x-request-id", request_id))
    return out
