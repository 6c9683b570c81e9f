"""The client-credentials grant (RFC 6749 4.4): validate a token request. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from authserver.config import SCOPE_TOKEN, ClientConfig, ServerConfig
from authserver.errors import OAuthError, invalid_request
from authserver.forms import Form

GRANT_TYPE = "client_credentials"


@dataclass(frozen=True, slots=True)
class TokenRequest:
    server: ServerConfig
    client: ClientConfig
    scopes: tuple[str, ...]


def requested_scopes(form: Form) -> tuple[str, ...] | None:
    """The ``scope`` parameter as distinct tokens in order; None when absent."""
    raw = form.get("scope")
    if raw is None:
        return None
    out: list[str] = []
    for token in raw.split(" "):
        if not token:
            continue
        if not SCOPE_TOKEN.fullmatch(token):
            raise invalid_request("scope holds a character RFC 6749 does not allow")
        if token not in out:
            out.append(token)
    return tuple(out)


def allowed_scopes(server: ServerConfig, client: ClientConfig) -> tuple[str, ...]:
    if client.scopes is None:
        return server.scopes
    return tuple(s for s in server.scopes if s in client.scopes)


def client_credentials(server: ServerConfig, client: ClientConfig, form: Form) -> TokenRequest:
    if GRANT_TYPE not in client.grant_types:
        raise OAuthError("unauthorized_client", "the client may not use client_credentials")
    if server.name not in client.servers:
        raise OAuthError(
            "unauthorized_client", f"the client may not use authorization server {server.name}"
        )
    allowed = allowed_scopes(server, client)
    requested = requested_scopes(form)
    if requested is None or not requested:
        if not allowed:
            raise OAuthError("invalid_scope", "no scope requested and the client has none")
        scopes = allowed
    else:
        refused = [s for s in requested if s not in allowed]
        if refused:
            raise OAuthError("invalid_scope", "scope not allowed: " + " ".join(refused))
        scopes = requested
    for resource in form.all("resource"):  # RFC 8707
        if resource != server.audience:
            raise OAuthError("invalid_target", f"resource must be {server.audience}")
    return TokenRequest(server=server, client=client, scopes=scopes)
