"""RFC 8414 authorization server metadata and OIDC discovery documents."""

from __future__ import annotations

from typing import Any

from authserver.config import AUTH_METHODS, ServerConfig
from authserver.grants import GRANT_TYPE
from tokengate.jwk import ALGORITHMS


def authorization_server_metadata(server: ServerConfig) -> dict[str, Any]:
    auth_methods = list(AUTH_METHODS)
    signing_algs = list(ALGORITHMS)  # what client assertions may be signed with
    return {
        "issuer": server.issuer,
        "token_endpoint": server.token_endpoint,
        "jwks_uri": server.jwks_uri,
        "introspection_endpoint": server.introspection_endpoint,
        "revocation_endpoint": server.revocation_endpoint,
        "grant_types_supported": [GRANT_TYPE],
        # No authorization endpoint yet: client credentials only.
        "response_types_supported": [],
        "scopes_supported": list(server.scopes),
        "token_endpoint_auth_methods_supported": auth_methods,
        "token_endpoint_auth_signing_alg_values_supported": signing_algs,
        "introspection_endpoint_auth_methods_supported": auth_methods,
        "introspection_endpoint_auth_signing_alg_values_supported": signing_algs,
        "revocation_endpoint_auth_methods_supported": auth_methods,
        "revocation_endpoint_auth_signing_alg_values_supported": signing_algs,
        "access_token_signing_alg_values_supported": [server.signing_alg],
    }


def openid_configuration(server: ServerConfig) -> dict[str, Any]:
    return {
        **authorization_server_metadata(server),
        "subject_types_supported": ["public"],
        # the algorithms of the ID tokens it issues: none yet (client credentials only)
        "id_token_signing_alg_values_supported": [],
    }
