"""The client-credentials grant (RFC 6749 4.4): validate a token request. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from authserver.config import SCOPE_TOKEN, ClientConfig, ServerConfig
from authserver.errors import OAuthError, invalid_request
from authserver.forms import Form

GRANT_TYPE = "client_credentials"
# Grant types worth naming in an audit line; anything else a client sends is logged as null.
KNOWN_GRANT_TYPES = frozenset(
    {
        GRANT_TYPE,
        "authorization_code",
        "refresh_token",
        "password",
        "implicit",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "urn:ietf:params:oauth:grant-type:saml2-bearer",
        "urn:ietf:params:oauth:grant-type:device_code",
        "urn:ietf:params:oauth:grant-type:token-exchange",
        "urn:openid:params:grant-type:ciba",
    }
)
MAX_SCOPES = 100  # scope tokens in one request
MAX_SCOPE_LENGTH = 256  # characters in one scope token
ECHO_LENGTH = 64  # characters of a refused scope an error description repeats


@dataclass(frozen=True, slots=True)
class TokenRequest:
    server: ServerConfig
    client: ClientConfig
    scopes: tuple[str, ...]


def requested_scopes(form: Form) -> tuple[str, ...] | None:
    """The ``scope`` parameter as distinct tokens in order; None when absent.

    Linear in the parameter's length, and bounded: more than ``MAX_SCOPES`` distinct
    tokens or one longer than ``MAX_SCOPE_LENGTH`` characters is ``invalid_scope``.
    """
    raw = form.get("scope")
    if raw is None:
        return None
    out: dict[str, None] = {}  # insertion-ordered set: linear, however many tokens
    for token in raw.split(" "):
        if not token or token in out:
            continue
        if len(token) > MAX_SCOPE_LENGTH:
            raise OAuthError(
                "invalid_scope", f"a scope is longer than {MAX_SCOPE_LENGTH} characters"
            )
        if not SCOPE_TOKEN.fullmatch(token):
            raise invalid_request("scope holds a character RFC 6749 does not allow")
        out[token] = None
        if len(out) > MAX_SCOPES:
            raise OAuthError("invalid_scope", f"more than {MAX_SCOPES} scopes requested")
    return tuple(out)


def allowed_scopes(server: ServerConfig, client: ClientConfig) -> tuple[str, ...]:
    if client.scopes is None:
        return server.scopes
    return tuple(s for s in server.scopes if s in client.scopes)


def client_credentials(
    server: ServerConfig,
    client: ClientConfig,
    requested: tuple[str, ...] | None,
    resources: list[str],
) -> TokenRequest:
    """``requested``: from :func:`requested_scopes`; ``resources``: RFC 8707 values."""
    if GRANT_TYPE not in client.grant_types:
        raise OAuthError("unauthorized_client", "the client may not use client_credentials")
    if server.name not in client.servers:
        raise OAuthError(
            "unauthorized_client", f"the client may not use authorization server {server.name}"
        )
    allowed = allowed_scopes(server, client)
    if not requested:
        if not allowed:
            raise OAuthError("invalid_scope", "no scope requested and the client has none")
        scopes = allowed
    else:
        offered = frozenset(allowed)
        refused = [s for s in requested if s not in offered]
        if refused:
            raise OAuthError("invalid_scope", _refused(refused))
        scopes = requested
    for resource in resources:  # RFC 8707
        if resource != server.audience:
            raise OAuthError("invalid_target", f"resource must be {server.audience}")
    return TokenRequest(server=server, client=client, scopes=scopes)


def _refused(refused: list[str]) -> str:
    """Names the first refused scope, shortened: a description never echoes much input."""
    first = refused[0] if len(refused[0]) <= ECHO_LENGTH else refused[0][:ECHO_LENGTH] + "..."
    more = f" and {len(refused) - 1} more" if len(refused) > 1 else ""
    return f"scope not allowed: {first}{more}"
