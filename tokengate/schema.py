"""The config file's JSON Schema (draft 2020-12), for editors that validate and
complete YAML (``tokengate schema > tokengate.schema.json``, then
``# yaml-language-server: $schema=./tokengate.schema.json`` atop the file).

The parsers (``tokengate.config``, ``authserver.config``, ``gateway.config``,
``tokengate.limits``) stay the authority: ``tokengate check`` knows more than any
schema can say (dangling references, shadowed routes, reserved claims' values). The
schema says every key they accept, in its place, with its type, choices and default;
mappings the parsers close to unknown keys are ``additionalProperties: false``. A test
walks both and fails when a key is in one and not the other.

Defaults come from the parsers' own constants where they have one, so the two cannot
drift apart.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from authserver.config import (
    AUTH_METHODS,
    CONSENTS,
    DEFAULT_CLIENT_AUTH_THROTTLE,
    DEFAULT_GRANT_TYPES,
    DEFAULT_SESSION_TIMES,
    GRANT_TYPES,
    INTROSPECT_ACCESS,
    MIN_SECRET_LENGTH,
    PUBLIC,
    RESERVED_CLAIMS,
    SIGNING_ALGS,
    TOKEN_KINDS,
    Brand,
)
from authserver.passwords import MIN_PASSWORD_LENGTH
from authserver.signon import PRESETS
from authserver.userrules import (
    BOOLEAN_CLAIMS,
    MANAGED_CLAIMS,
    MAX_GROUP_LENGTH,
    MAX_USERNAME_LENGTH,
    OBJECT_CLAIMS,
    STRING_CLAIMS,
)
from gateway.config import RATE_KEYS
from tokengate.asgi import HTTP_METHODS
from tokengate.jwk import ALGORITHMS
from tokengate.limits import ADMIN_LIMITS, DEFAULT_LIMITS, MIN_HEADER_BYTES, Limits
from tokengate.portal.config import DEFAULT_SCOPES
from tokengate.yamlconf import MAX_DURATION_DAYS

Schema = dict[str, Any]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
# An environment variable reference anywhere in a string: ${NAME}
ENV_REF_PATTERN = r"\$\{[A-Za-z_][A-Za-z0-9_]*\}"
DURATION_PATTERN = r"^\s*(?:[0-9]+|(?:[0-9]+(?:ms|s|m|h|d))+)\s*$"
LISTEN_PATTERN = r"^(?:\[[0-9A-Fa-f:.]+\]|[^:\s\[\]]+):[0-9]{1,5}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SCOPE_PATTERN = r"^[\x21\x23-\x5b\x5d-\x7e]+$"  # RFC 6749 section 3.3
CLIENT_ID_PATTERN = r"^[\x20-\x7e]{1,255}$"
SECRET_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"  # noqa: S105 - a pattern, not a secret
ARGON2ID_PATTERN = r"^\$argon2id\$v=19\$m=[0-9]+,t=[0-9]+,p=[0-9]+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$"
ENV_ONLY_PATTERN = r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$"
HEADER_NAME_PATTERN = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$"
HOST_PATTERN = r"^(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$"
HTTP_URL_PATTERN = r"^https?://[^/?#@\s]+(?:/[^?#\s]*)?$"
PATH_PATTERN = r"^/"
REDIRECT_URI_PATTERN = r"^(?:https://|http://(?:127\.0\.0\.1|\[::1\]|localhost)[:/?]|http://(?:127\.0\.0\.1|\[::1\]|localhost)$)[^#\s]*$"
BRAND_PATTERN = r"^#[0-9A-Fa-f]{6}$"
PATH_PREFIX_PATTERN = r"^/(?!.*//)[^*]*$"
RATE_PATTERN = r"^\s*[0-9]+\s*/\s*(?:s|sec|min|m|h|hour)\s*$"
REDIS_URL_PATTERN = r"^(?:rediss?|unix)://"

ENV = {"$ref": "#/$defs/env_string"}


# --------------------------------------------------------------------------- building


def _with(schema: Schema, description: str, default: Any = None, **more: Any) -> Schema:
    schema = {"description": description, **schema, **more}
    if default is not None:
        schema["default"] = default
    return schema


def string(description: str, default: Any = None, **constraints: Any) -> Schema:
    """A non-empty string; with constraints (pattern, enum, ...), a ``${NAME}``
    reference is accepted in its place, as the parser substitutes it first."""
    schema: Schema = {"type": "string", "minLength": 1}
    if constraints:
        schema = {"anyOf": [{"type": "string", **constraints}, ENV]}
    return _with(schema, description, default)


def ref(name: str, description: str, default: Any = None) -> Schema:
    return _with({"$ref": f"#/$defs/{name}"}, description, default)


def integer(description: str, default: int | None = None, *, minimum: int = 1) -> Schema:
    """An integer, or a string holding one (``"${PORT}"``): the parser reads both."""
    number = {"type": "integer", "minimum": minimum}
    return _with({"anyOf": [number, ENV]}, description, default)


def boolean(description: str, default: bool) -> Schema:
    return {"type": "boolean", "description": description, "default": default}


def duration(description: str, seconds: float | None) -> Schema:
    return ref("duration", description, None if seconds is None else duration_text(seconds))


def array(items: Schema, description: str, default: Any = None, **more: Any) -> Schema:
    """A YAML list; the parsers refuse a value listed twice."""
    return _with(
        {"type": "array", "items": items, "uniqueItems": True}, description, default, **more
    )


def mapping(
    properties: dict[str, Schema], description: str, required: tuple[str, ...] = (), **more: Any
) -> Schema:
    """A mapping the parser closes: only these keys."""
    schema: Schema = {
        "type": "object",
        "description": description,
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = list(required)
    schema.update(more)
    return schema


def duration_text(seconds: float) -> str:
    """``300`` -> ``5m``: the shortest exact spelling of a duration."""
    ms = round(seconds * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def _one_of_keys(*keys: str) -> list[Schema]:
    return [{"required": [key]} for key in keys]


# --------------------------------------------------------------------------- sections


def limits(d: Limits) -> Schema:
    return mapping(
        {
            "max_header_bytes": integer(
                "Request line + headers (trailers too), in bytes; beyond: 431 and close. "
                f"At least {MIN_HEADER_BYTES}.",
                d.max_header_bytes,
                minimum=MIN_HEADER_BYTES,
            ),
            "header_timeout": duration(
                "A request head must arrive whole within this; else 408 and close.",
                d.header_timeout,
            ),
            "body_idle_timeout": duration(
                "A request body that stalls this long ends the request (408).",
                d.body_idle_timeout,
            ),
            "max_connections": integer(
                "Open connections per worker; beyond: 503 and close.", d.max_connections
            ),
            "send_timeout": duration(
                "A client that takes no response bytes this long is dropped.", d.send_timeout
            ),
        },
        "What one client may cost this listener.",
    )


def trusted_proxies() -> Schema:
    return array(
        string("An address or network in CIDR notation (10.0.0.0/8, 192.0.2.7, fd00::/8)."),
        "Peers whose X-Forwarded-For is believed for the client address; "
        "every other peer's is ignored.",
        [],
    )


def _server() -> Schema:
    return mapping(
        {
            "name": string(
                "Unique; the issuer is {public_url}/oauth2/{name}.", pattern=NAME_PATTERN
            ),
            "audience": string("The aud of its access tokens."),
            "signing_alg": string(
                "The algorithm of its signing keys.", SIGNING_ALGS[0], enum=list(SIGNING_ALGS)
            ),
            "access_token_ttl": duration("Lifetime of its access tokens.", 3600),
            "id_token_ttl": duration("Lifetime of its OpenID Connect ID tokens.", 3600),
            "scopes": array(
                string("A scope (RFC 6749 section 3.3).", pattern=SCOPE_PATTERN),
                "The scopes it offers.",
                [],
            ),
            "refresh_tokens": mapping(
                {
                    "idle_ttl": duration(
                        "A refresh token unused this long stops working.", 7 * 86400
                    ),
                    "max_ttl": duration(
                        "Every refresh token of one sign-in stops this long after it, "
                        "however often rotated.",
                        90 * 86400,
                    ),
                },
                "Lifetimes of its refresh tokens (rotated on every use).",
            ),
            "user_claims": array(
                mapping(
                    {
                        "name": string("The claim's name (not one the server sets)."),
                        "from": string(
                            "groups, username, or profile.<key>.",
                            pattern=r"^(groups|username|profile\..+)$",
                        ),
                        "into": array(
                            string("A token kind.", enum=list(TOKEN_KINDS)),
                            "Which tokens get it.",
                            list(TOKEN_KINDS),
                        ),
                        "scope": string(
                            "Only when this scope is granted (default: always).",
                            pattern=SCOPE_PATTERN,
                        ),
                    },
                    "A claim read from the user.",
                    required=("name", "from"),
                ),
                "User data put into users' tokens (and userinfo, for id_token claims).",
                [],
            ),
            "access_policies": array(
                _access_policy(),
                "Who may get which tokens, for how long: the first policy naming the "
                "client, then its first matching rule, decides; none denies (default: "
                "the clients' own scopes and the server's lifetimes).",
            ),
        },
        "One authorization server: its own issuer, audience, keys and scopes.",
        required=("name", "audience"),
    )


def _sign_on(description: str) -> Schema:
    return mapping(
        {
            "policy": string(
                "password, password+mfa (a second factor, always), or passwordless (a "
                "passkey instead of the password; public_url on https:// or localhost).",
                "password",
                enum=list(PRESETS),
            ),
            "mfa_if": mapping(
                {
                    "groups": array(
                        string("A group.", maxLength=MAX_GROUP_LENGTH),
                        "Members must use a second factor.",
                        minItems=1,
                    ),
                    "new_device": boolean(
                        "A browser that has not given this user's second factor before "
                        "must give it.",
                        False,
                    ),
                },
                "With policy password: when a second factor is needed after all (at "
                "least one of these).",
                minProperties=1,
            ),
        },
        description,
        required=("policy",),
    )


def _access_policy() -> Schema:
    scopes = array(string("A scope the server offers.", pattern=SCOPE_PATTERN), "", minItems=1)
    rule = mapping(
        {
            "name": string("Unique in its policy; named in audit lines and metrics."),
            "if": mapping(
                {
                    "grant_types": {
                        **array(string("A grant type.", enum=list(GRANT_TYPES)), "", minItems=1),
                        "description": "The request's grant type is one of these (default: any).",
                    },
                    "groups": {
                        **array(string("A group.", maxLength=MAX_GROUP_LENGTH), "", minItems=1),
                        "description": "The user is in at least one (default: anyone, or no user).",
                    },
                    "scopes": {
                        **scopes,
                        "description": "The request asks for at least one (default: any).",
                    },
                },
                "Conditions; all must hold.",
            ),
            "then": mapping(
                {
                    "access": string("allow or deny.", "allow", enum=["allow", "deny"]),
                    "scopes": {
                        **scopes,
                        "description": "Granted at most these of those asked (default: all asked).",
                    },
                    "access_token_ttl": duration("Lifetime of its access tokens.", None),
                    "id_token_ttl": duration("Lifetime of its ID tokens.", None),
                    "refresh_tokens": mapping(
                        {
                            "idle_ttl": duration("A refresh token unused this long ends.", None),
                            "max_ttl": duration("The token family ends this long after.", None),
                        },
                        "Refresh token lifetimes (default: the server's).",
                    ),
                },
                "The outcome (default: allow, with the server's lifetimes).",
            ),
        },
        "A rule: when its conditions hold, it decides.",
        required=("name",),
    )
    return mapping(
        {
            "name": string("Unique in the server; named in audit lines and metrics."),
            "clients": array(
                string("A client_id.", pattern=CLIENT_ID_PATTERN),
                "The clients it applies to (default: every client of the server).",
                minItems=1,
            ),
            "rules": array(rule, "In order; the first that matches decides.", minItems=1),
        },
        "An access policy (Okta's policies and rules).",
        required=("name", "rules"),
    )


def _client() -> Schema:
    keys_kind = {"anyOf": _one_of_keys("jwks", "jwks_uri")}
    secret_kind = {"anyOf": _one_of_keys("secret", "secret_hash")}
    return mapping(
        {
            "client_id": string("Unique; 1-255 printable ASCII.", pattern=CLIENT_ID_PATTERN),
            "secret": string(
                f"The client secret itself, at least {MIN_SECRET_LENGTH} characters "
                "(better: a ${NAME} reference, or secret_hash).",
                minLength=MIN_SECRET_LENGTH,
            ),
            "secret_hash": string(
                "sha256:<64 hex digits>, as printed by `tokengate secret`.",
                pattern=SECRET_HASH_PATTERN,
            ),
            "auth_method": string(
                "Restrict the client to one authentication method. Default: "
                "client_secret_basic or client_secret_post with a secret, private_key_jwt "
                "with jwks or jwks_uri. none: a public client (a single-page or native app) "
                "with no credentials, authorization_code with PKCE only.",
                enum=[*AUTH_METHODS, PUBLIC],
            ),
            "jwks": mapping(
                {
                    "keys": {
                        "type": "array",
                        "minItems": 1,
                        "description": "Public JWKs; with several, each needs a distinct kid.",
                        "items": ref("public_jwk", "A public signature key (no private parts)."),
                    }
                },
                "private_key_jwt: the client's public keys.",
                required=("keys",),
            ),
            "jwks_uri": ref(
                "http_url", "private_key_jwt: where the client's public keys are fetched."
            ),
            "grant_types": array(
                string("A grant type.", enum=list(GRANT_TYPES)),
                "What the client may use. Default: client_credentials (authorization_code "
                "for a public client).",
                list(DEFAULT_GRANT_TYPES),
            ),
            "redirect_uris": array(
                string(
                    "An exact https URI (http only on 127.0.0.1, [::1] or localhost; on "
                    "127.0.0.1 and [::1] any port matches); no fragment.",
                    pattern=REDIRECT_URI_PATTERN,
                ),
                "authorization_code: where sign-in responses may be sent (required then).",
                [],
            ),
            "require_pkce": boolean(
                "authorization_code: require PKCE (S256). false only for a confidential client.",
                True,
            ),
            "scopes": array(
                string(
                    "A scope its servers offer, or an OIDC scope (openid, profile, email, "
                    "address, phone, offline_access).",
                    pattern=SCOPE_PATTERN,
                ),
                "What it may ask for. Default: every scope of its servers.",
            ),
            "servers": array(
                string("An authorization server's name.", pattern=NAME_PATTERN),
                "Which authorization servers it may use. Default: every one.",
            ),
            "claims": {
                "type": "object",
                "description": "Extra claims put into its tokens. "
                + "/".join(sorted(RESERVED_CLAIMS))
                + " are set by the server and cannot be set.",
                "propertyNames": {"not": {"enum": sorted(RESERVED_CLAIMS)}},
                "default": {},
            },
            "introspect": string(
                "own: only its own tokens; any: every token of its servers (resource servers).",
                INTROSPECT_ACCESS[0],
                enum=list(INTROSPECT_ACCESS),
            ),
            "post_logout_redirect_uris": array(
                string(
                    "An exact URI, as for redirect_uris.",
                    pattern=REDIRECT_URI_PATTERN,
                ),
                "Where {issuer}/v1/logout may send the browser after signing out.",
                [],
            ),
            "groups": array(
                string("A group name."),
                "authorization_code: only members of one of these groups may sign in "
                "(default: every user).",
            ),
            "allowed_origins": array(
                string(
                    "A web origin: https://host[:port] (http only on loopback), no path.",
                    pattern=r"^https?://[^/?#]+$",
                ),
                "Browser origins allowed to call token, userinfo, revoke and keys (CORS).",
                [],
            ),
            "consent": string(
                "required: the user grants the requested scopes on a consent page (once per "
                "scope; prompt=consent asks again). none: first-party, no page.",
                "none",
                enum=list(CONSENTS),
            ),
            "sign_on": _sign_on("How its users sign in (default: authserver.sign_on)."),
        },
        "A client of the authorization servers.",
        required=("client_id",),
        allOf=[
            {
                "anyOf": [
                    *_one_of_keys("secret", "secret_hash", "jwks", "jwks_uri"),
                    {"required": ["auth_method"], "properties": {"auth_method": {"const": PUBLIC}}},
                ]
            },
            {"not": {"required": ["secret", "secret_hash"]}},
            {"not": {"required": ["jwks", "jwks_uri"]}},
            {"not": {"allOf": [secret_kind, keys_kind]}},
        ],
    )


def _user() -> Schema:
    claims: dict[str, Schema] = {}
    for name in STRING_CLAIMS:
        claims[name] = {"type": "string", "minLength": 1}
    claims["email"]["pattern"] = r"^[^@\s]+@[^@\s]+$"
    for name in BOOLEAN_CLAIMS:
        claims[name] = {"type": "boolean"}
    for name in OBJECT_CLAIMS:
        claims[name] = {"type": "object", "additionalProperties": {"type": "string"}}
    return mapping(
        {
            "username": string(
                "Unique; compared ignoring case and Unicode compatibility forms (NFKC). "
                f"At most {MAX_USERNAME_LENGTH} characters, no control characters, no "
                "whitespace around it.",
                maxLength=MAX_USERNAME_LENGTH,
            ),
            "password_hash": string(
                "An argon2id PHC string, as printed by `tokengate users hash-password`.",
                pattern=ARGON2ID_PATTERN,
            ),
            "password": {
                "type": "string",
                "pattern": ENV_ONLY_PATTERN,
                "description": "Only a ${NAME} environment variable reference (at least "
                f"{MIN_PASSWORD_LENGTH} characters); hashed when the config is applied, "
                "never logged. A password written here is refused.",
            },
            "profile": {
                "type": "object",
                "description": "OpenID Connect standard claims (name, email, email_verified, "
                "...) and any further keys with JSON values. "
                + "/".join(sorted(MANAGED_CLAIMS))
                + " are set by tokengate.",
                "properties": claims,
                "propertyNames": {"not": {"enum": sorted(MANAGED_CLAIMS)}},
                "default": {},
            },
            "groups": array(
                string(f"A group name (at most {MAX_GROUP_LENGTH} characters)."),
                "The groups the user is in.",
                [],
            ),
            "disabled": boolean("The user cannot sign in.", False),
        },
        "A user declared in the config: created or updated at start and at each reload, "
        "deleted once it is no longer here.",
        required=("username",),
        allOf=[
            {"anyOf": _one_of_keys("password_hash", "password")},
            {"not": {"required": ["password_hash", "password"]}},
        ],
    )


def rate(description: str) -> Schema:
    return string(description, pattern=RATE_PATTERN)


def burst() -> Schema:
    return integer("Requests a fresh key may make at once. Default: the limit.")


def authserver() -> Schema:
    t = DEFAULT_CLIENT_AUTH_THROTTLE
    return mapping(
        {
            "listen": ref("listen", "Where the authorization server listens.", "127.0.0.1:9000"),
            "public_url": ref(
                "http_url",
                "Base of every issuer URL, as clients reach it. Default: http://{listen}.",
            ),
            "data_dir": string(
                "Signing keys and the SQLite store; created by `tokengate run` on its first "
                "start. A relative path is relative to this config file's directory.",
                "./data",
            ),
            "jwks_max_age": duration(
                "Cache-Control max-age of the JWKS; also the lead of a key rotation.", 300
            ),
            "leeway": duration("Clock skew allowed on exp, iat and nbf.", 30),
            "max_body_bytes": integer("Larger request bodies get 413.", 65536),
            "servers": {
                "type": "array",
                "minItems": 1,
                "description": "Authorization servers, Okta style; at least one.",
                "items": _server(),
            },
            "clients": {
                "type": "array",
                "description": "Who may ask for tokens.",
                "items": _client(),
                "default": [],
            },
            "limits": limits(DEFAULT_LIMITS),
            "store": string(
                "PostgreSQL URL (postgresql://user@host:port/database) of a store shared "
                "by several replicas. Default: SQLite in data_dir.",
                pattern=r"^postgres(?:ql)?://",
            ),
            "key_encryption_key": string(
                "32 random bytes, base64 (openssl rand -base64 32): seals the signing keys "
                "kept in the store. Required with a PostgreSQL store; use ${ENV}.",
            ),
            "sign_on": _sign_on("How people sign in, unless a client says (default: password)."),
            "rotation": mapping(
                {"every": duration("Publish a next signing key this often.", None)},
                "Scheduled signing-key rotation (one replica publishes each next key).",
                required=("every",),
            ),
            "rate_limits": mapping(
                {
                    "token": mapping(
                        {
                            "per_client": rate(
                                "Token requests per authenticated client_id: N/s, N/min or N/h."
                            ),
                            "burst": burst(),
                        },
                        "The token endpoint's budget per client (429 beyond it).",
                        required=("per_client",),
                    )
                },
                "Rate limits; shared through `redis:` when it is set, else per process.",
            ),
            "client_auth_throttle": mapping(
                {
                    "failures": integer(
                        "Free failures per client_id before it locks; 0 = off.",
                        t.failures,
                        minimum=0,
                    ),
                    "ip_failures": integer(
                        "Free failures per client address before it locks; 0 = off.",
                        t.ip_failures,
                        minimum=0,
                    ),
                    "max_lock": duration(
                        "Locks double from 1s up to this (at least 1s).", t.max_lock
                    ),
                    "reset_after": duration(
                        "Failures are forgotten this long after the last (at least "
                        "max_lock). Default 15m, or max_lock if longer.",
                        t.reset_after,
                    ),
                },
                "Failed client authentications, throttled per client_id and per address; "
                "shared through `redis:` when it is set, else per process.",
            ),
            "trusted_proxies": trusted_proxies(),
            "sessions": mapping(
                {
                    "idle_timeout": duration(
                        "A session unused this long ends (at least 1m).",
                        DEFAULT_SESSION_TIMES.idle_timeout,
                    ),
                    "max_lifetime": duration(
                        "A session ends this long after the sign-in, however busy.",
                        DEFAULT_SESSION_TIMES.max_lifetime,
                    ),
                },
                "The org-wide browser session (one sign-in for every server and client).",
            ),
            "sign_in": mapping(
                {
                    "brand": mapping(
                        {
                            "name": string("Shown atop the sign-in page.", Brand().name),
                            "logo_url": string(
                                "An https URL of the logo image.", pattern=r"^https://"
                            ),
                            "color": string(
                                "The accent colour, #rrggbb.", Brand().color, pattern=BRAND_PATTERN
                            ),
                        },
                        "The look of the hosted sign-in pages.",
                    ),
                    "templates_dir": string(
                        "A directory whose signin.html, error.html, consent.html, signout.html and "
                        "signed_out.html (Jinja2, autoescaped) replace the built-in pages; "
                        "relative to the config file's directory.",
                    ),
                },
                "The hosted sign-in pages.",
            ),
            "users": {
                "type": "array",
                "description": "Users declared in the config (org-wide); the store holds "
                "those made with `tokengate users add`.",
                "items": _user(),
                "default": [],
            },
        },
        "The OAuth 2.0 / OpenID Connect authorization server.",
        required=("servers",),
    )


def _claim_rule() -> Schema:
    scalar = {"$ref": "#/$defs/claim_value"}
    return {
        "description": "A value (equals), a list (any of), or one of "
        "{contains: value}, {matches: regex}, {exists: true|false}.",
        "anyOf": [
            scalar,
            {"type": "array", "items": scalar},
            {
                "type": "object",
                "minProperties": 1,
                "maxProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "contains": _with(scalar, "The claim (a list) contains this value."),
                    "matches": string("The claim matches this regular expression."),
                    "exists": boolean("The claim is present (true) or absent (false).", True),
                },
            },
        ],
    }


def _route() -> Schema:
    return mapping(
        {
            "name": string(
                "Unique; the route's label in metrics and audit lines.", pattern=NAME_PATTERN
            ),
            "match": mapping(
                {
                    "path": string(
                        "Exact, `*` = one segment, trailing `**` = any depth.",
                        pattern=PATH_PATTERN,
                    ),
                    "methods": array(
                        string("An HTTP method.", enum=list(HTTP_METHODS)),
                        "Default: any method.",
                    ),
                    "host": string(
                        "Exact host, or *.example.com; no port. Default: any host.",
                        pattern=HOST_PATTERN,
                    ),
                },
                "Which requests the route takes.",
                required=("path",),
            ),
            "upstream": ref("http_url", "http(s)://host[:port][/base path]."),
            "strip_prefix": string(
                "A literal prefix of match.path removed before forwarding.",
                pattern=PATH_PREFIX_PATTERN,
            ),
            "timeout": duration("For the upstream's response to start.", 30),
            "public": boolean("No token needed (and no require).", False),
            "forward_token": boolean("Send the Authorization header upstream.", False),
            "rate_limit": mapping(
                {
                    "per": string(
                        "Whose budget: client_id and sub need a token (decided after "
                        "authorization), route and remote_addr are decided before it.",
                        enum=list(RATE_KEYS),
                    ),
                    "limit": rate("Requests per key: N/s, N/min or N/h."),
                    "burst": burst(),
                },
                "A rate limit (429 beyond it); shared through `redis:` when it is set.",
                required=("per", "limit"),
            ),
            "require": mapping(
                {
                    "issuer": ref("http_url", "Only this issuer's tokens (one of issuers)."),
                    "audience": string("Instead of the issuer's audiences."),
                    "scopes": array(string("A scope."), "All of these.", []),
                    "any_scopes": array(string("A scope."), "At least one of these.", []),
                    "claims": {
                        "type": "object",
                        "description": "Claim rules, all of which must hold.",
                        "additionalProperties": _claim_rule(),
                    },
                    "acr": array(
                        string("An acr value.", pattern=r'^[^\s"\\]+$'),
                        "Step-up (RFC 9470): the token's acr must be one of these, else 401 "
                        "insufficient_user_authentication with acr_values.",
                        minItems=1,
                    ),
                    "max_age": duration(
                        "Step-up (RFC 9470): the user signed in at most this long ago "
                        "(auth_time), else 401 insufficient_user_authentication with max_age.",
                        None,
                    ),
                },
                "What a token needs for this route.",
            ),
        },
        "A route; the first that matches a request takes it.",
        required=("name", "match", "upstream"),
        # a public route takes no token, so it cannot require one
        **{"not": {"required": ["public", "require"], "properties": {"public": {"const": True}}}},
    )


def gateway() -> Schema:
    issuer = mapping(
        {
            "issuer": ref("http_url", "The iss of its tokens."),
            "audiences": array(
                string("An audience."), "A token's aud must contain one of these.", minItems=1
            ),
            "jwks_uri": ref("http_url", "Default: from the issuer's discovery document."),
            "algorithms": array(
                string("A signature algorithm.", enum=list(ALGORITHMS)),
                "Pinned; never taken from the token.",
                ["RS256"],
            ),
            "leeway": duration("Clock skew allowed on exp, iat and nbf.", 30),
            "allow_jwt_typ": boolean(
                "Accept typ JWT or none (Okta, Keycloak, Auth0), not only at+jwt.", False
            ),
            "jwks_cache_min": duration(
                "Never refetch the JWKS more often (also for unknown kids).", 30
            ),
            "jwks_cache_max": duration("Refresh the JWKS at least this often.", 3600),
            "jwks_cache_default": duration(
                "When the JWKS response has no Cache-Control max-age.", 300
            ),
            "jwks_max_stale": duration("Serve old keys this long while fetches fail.", 86400),
            "revocations": mapping(
                {
                    "client_id": string("A client of the issuer with introspect: any."),
                    "secret": string("Its secret (better: a ${NAME} reference)."),
                    "auth_method": string(
                        "How the secret is sent.",
                        "client_secret_basic",
                        enum=["client_secret_basic", "client_secret_post"],
                    ),
                    "endpoint": ref("http_url", "Default: {issuer}/v1/revocations."),
                    "degraded_after": duration(
                        "Failing polls this long: /readyz says the feed is degraded.", 60
                    ),
                },
                "Follow the issuer's revocation feed: its revoked tokens are refused "
                "within seconds.",
                required=("client_id", "secret"),
            ),
        },
        "An issuer whose tokens are accepted.",
        required=("issuer", "audiences"),
    )
    return mapping(
        {
            "listen": ref("listen", "Where the gateway listens.", "127.0.0.1:8080"),
            "issuers": {
                "type": "array",
                "description": "Whose tokens are accepted; required when a route needs one.",
                "items": issuer,
            },
            "routes": {
                "type": "array",
                "description": "First match wins; no match = 404, never forwarded.",
                "items": _route(),
            },
            "max_token_bytes": integer("Larger bearer tokens are refused unparsed.", 8192),
            "allow_path_parameters": boolean("Allow ; path parameters.", False),
            "token_cache_size": integer("Verified tokens kept.", 10000),
            "strip_headers": array(
                string("A header name.", pattern=HEADER_NAME_PATTERN),
                "Request headers never forwarded, besides the built-in ones.",
                [],
            ),
            "limits": limits(DEFAULT_LIMITS),
            "trusted_proxies": trusted_proxies(),
        },
        "The gateway: trusted issuers and routes.",
        required=("routes",),
    )


def portal() -> Schema:
    return mapping(
        {
            "listen": ref("listen", "Where the portal listens."),
            "issuer": ref(
                "http_url",
                "The OpenID Connect issuer it signs users in with, exactly as its discovery "
                "document says (any issuer: tokengate's, Okta, Keycloak, Auth0).",
            ),
            "client_id": string(
                "The portal's client_id at the issuer (a confidential client with "
                "authorization_code and refresh_token).",
                pattern=CLIENT_ID_PATTERN,
            ),
            "client_secret": string(
                "The portal's client secret (better: a ${NAME} reference). It also keys the "
                "portal's sealed cookies."
            ),
            "api_url": ref(
                "http_url",
                "What 'Call the orders API' requests with the user's access token, "
                "through the gateway.",
            ),
            "sensitive_api_url": ref(
                "http_url",
                "A second API, which may answer 401 insufficient_user_authentication "
                "(RFC 9470): the portal then signs the user in again with its acr_values "
                "and max_age, and calls it again. Default: none.",
            ),
            "public_url": ref(
                "http_url",
                "Where browsers reach the portal; the redirect URI is {public_url}/callback, "
                "the post-logout redirect URI {public_url}/. Default: http://{listen}.",
            ),
            "scopes": array(
                string("A scope.", pattern=SCOPE_PATTERN),
                "What the portal asks for; must include openid.",
                list(DEFAULT_SCOPES),
                contains={"const": "openid"},
            ),
        },
        "A demo web portal: an OpenID Connect relying party served by `tokengate run`.",
        required=("listen", "issuer", "client_id", "client_secret", "api_url"),
    )


DEFS: dict[str, Schema] = {
    "env_string": {
        "type": "string",
        "pattern": ENV_REF_PATTERN,
        "description": "A string with a ${NAME} environment variable reference.",
    },
    "duration": {
        "description": "Seconds, or a string like 30s, 10m, 1h, 7d, 1h30m, 250ms; "
        f"above zero and at most {MAX_DURATION_DAYS}d.",
        "anyOf": [
            {"type": "integer", "minimum": 1, "maximum": MAX_DURATION_DAYS * 86400},
            {"type": "string", "pattern": DURATION_PATTERN},
            ENV,
        ],
    },
    "listen": {
        "description": "host:port ([::1]:8080 for IPv6); port 0 picks a free port.",
        "anyOf": [{"type": "string", "pattern": LISTEN_PATTERN}, ENV],
    },
    "http_url": {
        "description": "An absolute http(s) URL without query, fragment or credentials.",
        "anyOf": [{"type": "string", "pattern": HTTP_URL_PATTERN}, ENV],
    },
    "claim_value": {"type": ["string", "number", "boolean"]},
    "public_jwk": {
        "type": "object",
        "required": ["kty"],
        "properties": {
            "kty": {"enum": ["RSA", "EC", "OKP"]},
            "crv": {"enum": ["P-256", "P-384", "P-521", "Ed25519"]},
            "use": {"const": "sig"},
            "alg": {"enum": list(ALGORITHMS)},
            "kid": {"type": "string"},
        },
        "not": {"anyOf": [{"required": ["d"]}, {"properties": {"kty": {"const": "oct"}}}]},
    },
}


@functools.cache
def _schema() -> Schema:
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "tokengate configuration",
        "description": "tokengate's YAML configuration, version 1. Strings may reference "
        "environment variables as ${NAME}; `tokengate check` validates a file completely.",
        "type": "object",
        "properties": {
            "version": {
                "description": "The config format; only 1 exists.",
                "const": 1,
                "default": 1,
            },
            "authserver": authserver(),
            "gateway": gateway(),
            "admin": mapping(
                {
                    "listen": ref("listen", "/healthz, /readyz and /metrics (Prometheus)."),
                    "limits": limits(ADMIN_LIMITS),
                },
                "The admin listener. Default: none.",
                required=("listen",),
            ),
            "echo": mapping(
                {"listen": ref("listen", "The built-in echo upstream, for demos and tests.")},
                "A built-in echo upstream.",
                required=("listen",),
            ),
            "portal": portal(),
            "redis": string(
                "Redis URL (redis://host:port/db): rate limits and the failed-authentication "
                "throttle shared by every worker and replica. Default: none, both hold per "
                "process.",
                pattern=REDIS_URL_PATTERN,
            ),
            "audit": mapping(
                {
                    "path": string(
                        '"-" = stdout, else a file (appended JSON lines); a relative path '
                        "is relative to this config file's directory.",
                        "-",
                    ),
                    "required": boolean(
                        "/readyz answers 503 while audit lines are being lost.", False
                    ),
                },
                "The audit log.",
            ),
        },
        "additionalProperties": False,
        "anyOf": _one_of_keys("authserver", "gateway", "echo", "portal"),
        "$defs": DEFS,
    }


def config_schema() -> Schema:
    """The JSON Schema of the config file (a copy: callers may change it)."""
    return copy.deepcopy(_schema())
