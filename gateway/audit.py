"""The gateway's audit line: the JSON object DESIGN.md lists, one per request. Pure.

It is written for every request, so it is assembled from pieces prepared once: the
route's name is quoted when the route table is built, and a token's identity
(``client_id``, ``sub``, ``iss``, ``jti``, ``scopes``) when the token is verified, which
the verified-token cache then reuses. Only the per-request values are quoted here,
each by the standard library's JSON string encoder.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from json.encoder import encode_basestring as quote  # type: ignore[attr-defined]

from tokengate.jsonlog import MAX_LINE, fit_line

NO_ROUTE = quote("(none)")
NO_IDENTITY = '"client_id":null,"sub":null,"iss":null,"jti":null,"scopes":[]'


def _quote_or_null(value: str | None) -> str:
    return "null" if value is None else quote(value)


def identity_fields(
    client_id: str | None, sub: str | None, iss: str, jti: str | None, scopes: Iterable[str]
) -> str:
    """The identity members of the line, for a verified token."""
    return (
        f'"client_id":{_quote_or_null(client_id)},"sub":{_quote_or_null(sub)},'
        f'"iss":{quote(iss)},"jti":{_quote_or_null(jti)},'
        f'"scopes":[{",".join(map(quote, scopes))}]'
    )


def request_line(
    *,
    ts: str,
    request_id: str,
    route: str,
    method: str,
    path: str,
    status: int,
    decision: str,
    reason: str,
    identity: str,
    remote_addr: str | None,
    duration_ms: float,
    bytes_in: int,
    bytes_out: int,
) -> bytes:
    """One ``gateway.request`` line; ``route`` and ``identity`` come quoted already.

    ``decision`` and ``reason`` are fixed machine codes, ``ts`` an RFC 3339 time.
    A string that is not valid Unicode (a lone surrogate) is escaped, not refused.
    A line longer than ``MAX_LINE`` has its longest values cut short (a long path,
    many scopes), so it stays one atomic write.
    """
    line = (
        f'{{"ts":"{ts}","event":"gateway.request","request_id":{quote(request_id)},'
        f'"route":{route},"method":{quote(method)},"path":{quote(path)},'
        f'"status":{status},"decision":"{decision}","reason":"{reason}",{identity},'
        f'"remote_addr":{_quote_or_null(remote_addr)},"duration_ms":{duration_ms!r},'
        f'"bytes_in":{bytes_in},"bytes_out":{bytes_out}}}\n'
    ).encode("utf-8", "backslashreplace")
    if len(line) <= MAX_LINE:
        return line
    return fit_line(json.loads(line))
