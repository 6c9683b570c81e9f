"""The ``portal:`` section: a demo web app that signs users in with OpenID Connect.

It names an issuer, the portal's own client registration there, and the API it calls
with the user's access token. Nothing here refers to the authorization server's own
config: the portal is a client of any OpenID Connect issuer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tokengate.yamlconf import (
    ConfigError,
    Listen,
    Node,
    as_http_url,
    as_listen,
    as_str,
    list_of,
)

DEFAULT_SCOPES = ("openid", "profile", "email", "offline_access", "orders:read")
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 section 3.3
_CLIENT_ID = re.compile(r"[\x20-\x7e]{1,255}")


@dataclass(frozen=True, slots=True)
class PortalConfig:
    listen: Listen
    issuer: str  # the OpenID Connect issuer, exactly as its discovery document says
    client_id: str
    client_secret: str = field(repr=False)
    api_url: str  # what "Call the orders API" requests, through the gateway
    public_url: str  # where browsers reach the portal; default http://{listen}
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    # a second API that may ask for a stronger sign-in (RFC 9470 step-up); None: none
    sensitive_api_url: str | None = None

    @property
    def redirect_uri(self) -> str:
        return f"{self.public_url}/callback"

    @property
    def post_logout_redirect_uri(self) -> str:
        return f"{self.public_url}/"


def _scope(node: Node) -> str:
    text = as_str(node)
    if not _SCOPE.fullmatch(text):
        raise ConfigError(node.path, f"is not a valid scope: {text!r}")
    return text


def _scopes(node: Node) -> tuple[str, ...]:
    scopes = list_of(_scope)(node)
    if isinstance(node.value, list) and "openid" not in scopes:
        raise ConfigError(node.path, "must include openid: the portal signs users in")
    return scopes


def _issuer(node: Node) -> str:
    """An http(s) URL kept exactly as written: issuers are compared character for
    character, and some end with ``/``."""
    as_http_url(node)
    return as_str(node)


def _client_id(node: Node) -> str:
    text = as_str(node)
    if not _CLIENT_ID.fullmatch(text):
        raise ConfigError(node.path, "must be 1-255 printable ASCII characters")
    return text


def parse_portal(node: Node) -> PortalConfig:
    f = node.fields(
        required=("listen", "issuer", "client_id", "client_secret", "api_url"),
        optional=("public_url", "scopes", "sensitive_api_url"),
    )
    listen = f.get("listen", as_listen)
    default_public = f"http://{listen}" if listen is not None else ""
    return PortalConfig(
        listen=listen,
        issuer=f.get("issuer", _issuer),
        client_id=f.get("client_id", _client_id),
        client_secret=f.get("client_secret", as_str),
        api_url=f.get("api_url", as_http_url),
        public_url=f.get("public_url", as_http_url, default_public),
        scopes=f.get("scopes", _scopes, DEFAULT_SCOPES),
        sensitive_api_url=f.get("sensitive_api_url", as_http_url, None),
    )
