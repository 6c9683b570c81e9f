"""RFC 6749 section 5.2 errors as data, rendered as JSON with no-store headers."""

from __future__ import annotations

import re

from tokengate.asgi import JSON_TYPE, Headers, Send, json_bytes, send_bytes

# Every token-endpoint-family response, success or error (RFC 6749 section 5.1).
NO_STORE: Headers = [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]
_NOT_DESCRIPTION_CHARS = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")  # RFC 6749 5.2


class OAuthError(Exception):
    """An OAuth error response: ``error`` code, HTTP status, optional headers."""

    def __init__(
        self,
        error: str,
        description: str,
        status: int = 400,
        headers: Headers | None = None,
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = _NOT_DESCRIPTION_CHARS.sub("?", description)
        self.status = status
        self.headers = headers or []
        self.client_id: str | None = None  # the client_id presented, unverified
        self.reason = error  # the audit line's reason
        self.detail: str | None = None  # a machine code for the audit line only, never sent


def invalid_request(description: str, status: int = 400) -> OAuthError:
    return OAuthError("invalid_request", description, status)


# One answer for every failed client authentication: whether the client exists, which
# methods it may use and what was wrong go to the audit line's detail, never the client.
CLIENT_AUTH_FAILED = "client authentication failed"


def invalid_client(detail: str, *, basic: bool = False, client_id: str | None = None) -> OAuthError:
    """401; a client that tried HTTP Basic gets the matching challenge (RFC 6749 5.2).

    ``detail`` is a fixed machine code (``unknown_client``, ``wrong_secret``, ...);
    ``client_id`` the id the request presented, if any.
    """
    challenge = [(b"www-authenticate", b'Basic realm="tokengate"')] if basic else []
    exc = OAuthError("invalid_client", CLIENT_AUTH_FAILED, 401, challenge)
    exc.detail = detail
    exc.client_id = client_id
    return exc


def throttled(retry_after: int) -> OAuthError:
    """429 while a client_id or an address is locked after failed authentications."""
    exc = OAuthError(
        "temporarily_unavailable",
        "too many failed client authentications; retry later",
        429,
        [(b"retry-after", str(retry_after).encode())],
    )
    exc.reason = "throttled"
    return exc


RATE_LIMITED = "rate_limited"


def rate_limited(headers: Headers) -> OAuthError:
    """429 for a client over its token budget. RFC 6749 has no rate-limit error; like
    the throttle above, ``temporarily_unavailable`` (its 5.2 meaning: try again later)
    with ``Retry-After``; the audit reason and metric label say ``rate_limited``."""
    exc = OAuthError(
        "temporarily_unavailable", "too many token requests; retry later", 429, headers
    )
    exc.reason = RATE_LIMITED
    return exc


def store_unavailable() -> OAuthError:
    """503: the store could not be read or written; nothing was done, retry."""
    exc = OAuthError(
        "server_error",
        "the authorization server cannot reach its store; retry later",
        503,
        [(b"retry-after", b"1")],
    )
    exc.reason = "store_unavailable"
    return exc


def server_error() -> OAuthError:
    exc = OAuthError("server_error", "internal error", 500)
    exc.reason = "internal_error"
    return exc


def method_not_allowed(allow: str) -> OAuthError:
    return OAuthError(
        "invalid_request", f"method not allowed; use {allow}", 405, [(b"allow", allow.encode())]
    )


def not_found(description: str) -> OAuthError:
    return OAuthError("not_found", description, 404)


async def send_error(send: Send, exc: OAuthError) -> None:
    body = json_bytes({"error": exc.error, "error_description": exc.description})
    await send_bytes(send, exc.status, body, [JSON_TYPE, *NO_STORE, *exc.headers])
