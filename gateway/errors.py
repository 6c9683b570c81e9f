"""Why a request was denied, and the RFC 6750 response that says so."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Sequence
from enum import StrEnum

from tokengate.asgi import JSON_TYPE, Headers, Send, json_bytes, send_bytes

REALM = 'Bearer realm="tokengate"'


class Reason(StrEnum):
    """The machine code of every outcome: metric label and audit field."""

    OK = "ok"
    TOKEN_MISSING = "token_missing"
    TOKEN_INVALID = "token_invalid"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"
    TOKEN_REVOKED = "token_revoked"
    ISSUER_UNKNOWN = "issuer_unknown"
    AUDIENCE_MISMATCH = "audience_mismatch"
    KEY_UNKNOWN = "key_unknown"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    CLAIMS_MISMATCH = "claims_mismatch"
    INSUFFICIENT_USER_AUTHENTICATION = "insufficient_user_authentication"  # RFC 9470
    NO_ROUTE = "no_route"
    BAD_PATH = "bad_path"
    JWKS_UNAVAILABLE = "jwks_unavailable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    RATE_LIMITED = "rate_limited"
    INTERNAL_ERROR = "internal_error"

    @property
    def status(self) -> int:
        """The HTTP status this outcome is answered (or, once a response started, counted) with."""
        return _STATUS[self]

    @property
    def decision(self) -> str:
        """``allow``, ``deny``, or ``error`` when tokengate itself failed: upstream
        failures happen after the request was allowed."""
        return _DECISION[self]


_ALLOWED = {Reason.OK, Reason.UPSTREAM_TIMEOUT, Reason.UPSTREAM_UNAVAILABLE}
_DECISION = {
    reason: "allow"
    if reason in _ALLOWED
    else "error"
    if reason is Reason.INTERNAL_ERROR
    else "deny"
    for reason in Reason
}


class Denied(Exception):
    """A request answered by the gateway itself, never forwarded (or failed upstream)."""

    def __init__(
        self,
        reason: Reason,
        description: str,
        *,
        scope: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
        challenge: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description
        self.scope = scope  # insufficient_scope: what the route needs
        self.headers = list(headers)  # rate_limited: Retry-After and the RateLimit fields
        # more WWW-Authenticate parameters: RFC 9470's acr_values and max_age
        self.challenge = tuple(challenge)

    @property
    def status(self) -> int:
        return self.reason.status


_STATUS = {
    Reason.TOKEN_MISSING: 401,
    Reason.TOKEN_INVALID: 401,
    Reason.TOKEN_EXPIRED: 401,
    Reason.TOKEN_NOT_YET_VALID: 401,
    Reason.TOKEN_REVOKED: 401,
    Reason.ISSUER_UNKNOWN: 401,
    Reason.AUDIENCE_MISMATCH: 401,
    Reason.KEY_UNKNOWN: 401,
    Reason.INSUFFICIENT_SCOPE: 403,
    Reason.CLAIMS_MISMATCH: 403,
    Reason.INSUFFICIENT_USER_AUTHENTICATION: 401,
    Reason.NO_ROUTE: 404,
    Reason.BAD_PATH: 400,
    Reason.JWKS_UNAVAILABLE: 503,
    Reason.UPSTREAM_TIMEOUT: 504,
    Reason.UPSTREAM_UNAVAILABLE: 502,
    Reason.RATE_LIMITED: 429,
    Reason.INTERNAL_ERROR: 500,
}

_ERROR = {
    401: "invalid_token",
    403: "insufficient_scope",
    404: "not_found",
    400: "invalid_request",
    429: "rate_limited",
    503: "temporarily_unavailable",
    504: "gateway_timeout",
    502: "bad_gateway",
    500: "server_error",
}


# Errors a status alone does not say (RFC 9470 section 3)
_REASON_ERROR = {Reason.INSUFFICIENT_USER_AUTHENTICATION: "insufficient_user_authentication"}


def http_date() -> bytes:
    return email.utils.formatdate(time.time(), usegmt=True).encode()


def denial_response(denied: Denied) -> tuple[int, Headers, bytes]:
    """Status, headers and JSON body for a denial (RFC 6750 section 3)."""
    status = denied.status
    if denied.reason is Reason.TOKEN_MISSING:
        error = "unauthorized"  # no error attribute in the challenge (RFC 6750 3.1)
        challenge: str | None = REALM
    else:
        error = _REASON_ERROR.get(denied.reason) or _ERROR[status]
        challenge = None
        if status in (401, 403):
            challenge = f'{REALM}, error="{error}", error_description="{denied.description}"'
            if denied.scope:
                challenge += f', scope="{denied.scope}"'
            for name, value in denied.challenge:
                challenge += f', {name}="{value}"'
    headers: Headers = [JSON_TYPE, (b"date", http_date()), (b"cache-control", b"no-store")]
    if challenge is not None:
        headers.append((b"www-authenticate", challenge.encode()))
    if status == 503:
        headers.append((b"retry-after", b"1"))
    headers.extend(denied.headers)
    body = json_bytes({"error": error, "error_description": denied.description})
    return status, headers, body


async def send_denial(send: Send, denied: Denied, extra: Headers) -> int:
    status, headers, body = denial_response(denied)
    await send_bytes(send, status, body, headers + extra)
    return len(body)
