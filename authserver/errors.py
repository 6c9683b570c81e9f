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
        self.client_id: str | None = None  # the client that was claimed, for the audit line


def invalid_request(description: str, status: int = 400) -> OAuthError:
    return OAuthError("invalid_request", description, status)


def invalid_client(description: str, *, basic: bool = False) -> OAuthError:
    """401; a client that tried HTTP Basic gets the matching challenge (RFC 6749 5.2)."""
    challenge = [(b"www-authenticate", b'Basic realm="tokengate"')] if basic else []
    return OAuthError("invalid_client", description, 401, challenge)


def method_not_allowed(allow: str) -> OAuthError:
    return OAuthError(
        "invalid_request", f"method not allowed; use {allow}", 405, [(b"allow", allow.encode())]
    )


def not_found(description: str) -> OAuthError:
    return OAuthError("not_found", description, 404)


async def send_error(send: Send, exc: OAuthError) -> None:
    body = json_bytes({"error": exc.error, "error_description": exc.description})
    await send_bytes(send, exc.status, body, [JSON_TYPE, *NO_STORE, *exc.headers])
