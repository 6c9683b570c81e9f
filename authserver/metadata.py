"""RFC 8414 authorization server metadata and OIDC discovery documents.

They advertise only what is in use: the authorization endpoint, its response types
and modes, PKCE, ID tokens and the OIDC scopes appear once a client of the server
may use the authorization code flow; ``none`` among the token endpoint's
authentication methods once a public client may.
"""

from __future__ import annotations

from typing import Any

from authserver.authorize import IMPLICIT_TYPES, RESPONSE_MODES, RESPONSE_TYPES
from authserver.config import AUTH_METHODS, OIDC_SCOPES, PUBLIC, ClientConfig, ServerConfig
from authserver.grants import GRANT_TYPE
from authserver.oidc import CLAIMS_SUPPORTED
from authserver.pkce import METHODS
from authserver.signon import ACR_VALUES
from tokengate.jwk import ALGORITHMS

CODE_GRANT = "authorization_code"
REFRESH_GRANT = "refresh_token"
IMPLICIT_GRANT = "implicit"
PASSWORD_GRANT = "password"  # noqa: S105 - a grant type's name


def _code_flow(server: ServerConfig, clients: tuple[ClientConfig, ...]) -> list[ClientConfig]:
    """The clients that may use the authorization code flow with ``server``."""
    return [
        c
        for c in clients
        if server.name in c.servers and {CODE_GRANT, IMPLICIT_GRANT} & c.grant_types
    ]


def authorization_server_metadata(
    server: ServerConfig, clients: tuple[ClientConfig, ...] = ()
) -> dict[str, Any]:
    auth_methods = list(AUTH_METHODS)
    signing_algs = list(ALGORITHMS)  # what client assertions may be signed with
    code_clients = _code_flow(server, clients)
    metadata: dict[str, Any] = {
        "issuer": server.issuer,
        "token_endpoint": server.token_endpoint,
        "jwks_uri": server.jwks_uri,
        "introspection_endpoint": server.introspection_endpoint,
        "revocation_endpoint": server.revocation_endpoint,
        # tokengate's own: revoked jtis for gateways to follow (not in RFC 8414)
        "revocation_feed_endpoint": server.revocation_feed_endpoint,
        "grant_types_supported": [GRANT_TYPE],
        "response_types_supported": [],  # no client uses the authorization endpoint
        "scopes_supported": list(server.scopes),
        "token_endpoint_auth_methods_supported": auth_methods,
        "token_endpoint_auth_signing_alg_values_supported": signing_algs,
        "introspection_endpoint_auth_methods_supported": auth_methods,
        "introspection_endpoint_auth_signing_alg_values_supported": signing_algs,
        "revocation_endpoint_auth_methods_supported": auth_methods,
        "revocation_endpoint_auth_signing_alg_values_supported": signing_algs,
        "access_token_signing_alg_values_supported": [server.signing_alg],
    }
    if code_clients:
        public = [PUBLIC] if any(c.public for c in code_clients) else []
        used = {g for c in clients if server.name in c.servers for g in c.grant_types}
        implicit = IMPLICIT_GRANT in used
        metadata.update(
            authorization_endpoint=server.authorization_endpoint,
            grant_types_supported=[
                GRANT_TYPE,
                CODE_GRANT,
                *(g for g in (REFRESH_GRANT, PASSWORD_GRANT, IMPLICIT_GRANT) if g in used),
            ],
            response_types_supported=[*RESPONSE_TYPES, *(IMPLICIT_TYPES if implicit else ())],
            response_modes_supported=list(RESPONSE_MODES),
            code_challenge_methods_supported=list(METHODS),
            authorization_response_iss_parameter_supported=True,
            scopes_supported=[
                *(s for s in OIDC_SCOPES if s != "offline_access" or REFRESH_GRANT in used),
                *server.scopes,
            ],
            token_endpoint_auth_methods_supported=auth_methods + public,
        )
    return metadata


def openid_configuration(
    server: ServerConfig, clients: tuple[ClientConfig, ...] = ()
) -> dict[str, Any]:
    code_flow = bool(_code_flow(server, clients))
    document = {
        **authorization_server_metadata(server, clients),
        "subject_types_supported": ["public"],
        # the algorithm of its ID tokens; none without a client of the code flow
        "id_token_signing_alg_values_supported": [server.signing_alg] if code_flow else [],
    }
    if code_flow:
        document["userinfo_endpoint"] = server.userinfo_endpoint
        document["claims_parameter_supported"] = True
        document["end_session_endpoint"] = server.end_session_endpoint
        document["acr_values_supported"] = list(ACR_VALUES)
        document["claims_supported"] = [
            *CLAIMS_SUPPORTED,
            *(c.name for c in server.user_claims if c.name not in CLAIMS_SUPPORTED),
        ]
    return document
