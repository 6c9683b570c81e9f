"""The ``authserver`` section: authorization servers and their clients, frozen."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from authserver.passwords import EnvPassword, password_problem, phc_problem
from authserver.policies import AccessPolicy, Lifetimes
from authserver.policyconfig import as_access_policies
from authserver.redirect_uris import redirect_uri_problem
from authserver.relyingparty import relying_party
from authserver.signon import DEFAULT_SIGN_ON, SignOnPolicy, as_sign_on
from authserver.userrules import claim_problem, group_problem, username_key, username_problem
from tokengate.jwk import PublicKey, load_public_jwk
from tokengate.limits import DEFAULT_LIMITS, Limits, as_limits
from tokengate.proxies import NO_PROXIES, TrustedProxies, as_trusted_proxies
from tokengate.ratelimit import Rate, as_rate
from tokengate.yamlconf import (
    ConfigError,
    Fields,
    Listen,
    Node,
    as_bool,
    as_duration,
    as_http_url,
    as_int,
    as_listen,
    as_name,
    as_seconds,
    as_str,
    guarded,
    list_of,
    one_of,
    positive_int,
    unique_items,
)

SigningAlg = Literal["RS256", "PS256", "ES256", "EdDSA"]
SIGNING_ALGS: tuple[SigningAlg, ...] = ("RS256", "PS256", "ES256", "EdDSA")

AuthMethod = Literal["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]
AUTH_METHODS: tuple[AuthMethod, ...] = (
    "client_secret_basic",
    "client_secret_post",
    "private_key_jwt",
)
GRANT_TYPES = ("client_credentials", "authorization_code", "refresh_token", "password", "implicit")
# RFC 9700 sections 2.1.2 and 2.4: allowed, opt-in, warned about
DEPRECATED_GRANTS = ("password", "implicit")
BROWSER_GRANTS = frozenset({"authorization_code", "implicit"})  # through the authorize endpoint
DEFAULT_GRANT_TYPES = ("client_credentials",)
PUBLIC = "none"  # auth_method of a public client (a SPA or native app): no credentials
# built into every server (OIDC Core 5.4, 11)
OIDC_SCOPES = ("openid", "profile", "email", "address", "phone", "offline_access")
TOKEN_KINDS = ("access_token", "id_token")  # where a user claim may go
USER_CLAIM_SOURCES = ("groups", "username", "profile.")  # what a user claim is read from
BRAND_COLOR = re.compile(r"#[0-9A-Fa-f]{6}")
Consent = Literal["none", "required"]
CONSENTS: tuple[Consent, ...] = ("none", "required")
IntrospectAccess = Literal["own", "any"]
INTROSPECT_ACCESS: tuple[IntrospectAccess, ...] = ("own", "any")

# Claims the authorization server sets itself; a client's `claims` cannot override them.
RESERVED_CLAIMS = frozenset(
    {"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "scope", "scp", "cnf"}
    # what names a person: a client's own token never speaks for one
    | {"preferred_username", "auth_time", "amr", "acr", "sid", "nonce", "azp"}
)
# what an ID token carries of its own: a user claim cannot take these names either
_ID_TOKEN_OWN = frozenset({"at_hash", "c_hash", "s_hash", "auth_time", "amr", "acr", "sid"})
MIN_SECRET_LENGTH = 32
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 section 3.3
_CLIENT_ID = re.compile(r"[\x20-\x7e]{1,255}")
_ENV_ONLY = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class RefreshTokenTimes:
    """A refresh token ends ``idle_ttl`` after it was issued unless used (and so
    rotated) before; its family (every token from one sign-in) ends ``max_ttl`` after
    the sign-in, however often it was rotated."""

    idle_ttl: int = 7 * 86400
    max_ttl: int = 90 * 86400


DEFAULT_REFRESH_TIMES = RefreshTokenTimes()


@dataclass(frozen=True, slots=True)
class UserClaim:
    """A claim read from the user into tokens (Okta's custom claims): ``source`` is
    ``groups``, ``username`` or ``profile.<key>``; ``scope``: only when that scope was
    granted (None: always)."""

    name: str
    source: str
    into: frozenset[str]  # of TOKEN_KINDS
    scope: str | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """One authorization server: its own issuer, audience, keys and scopes."""

    name: str
    issuer: str
    audience: str
    signing_alg: SigningAlg
    access_token_ttl: int
    scopes: tuple[str, ...]
    id_token_ttl: int = 3600
    refresh_tokens: RefreshTokenTimes = DEFAULT_REFRESH_TIMES
    user_claims: tuple[UserClaim, ...] = ()
    access_policies: tuple[AccessPolicy, ...] = ()  # none: decided by the clients alone

    @property
    def lifetimes(self) -> Lifetimes:
        """The server's own token lifetimes (a policy rule may set others)."""
        return Lifetimes(
            access_token=self.access_token_ttl,
            id_token=self.id_token_ttl,
            refresh_idle=self.refresh_tokens.idle_ttl,
            refresh_max=self.refresh_tokens.max_ttl,
        )

    @property
    def userinfo_endpoint(self) -> str:
        return f"{self.issuer}/v1/userinfo"

    @property
    def end_session_endpoint(self) -> str:
        return f"{self.issuer}/v1/logout"

    @property
    def authorization_endpoint(self) -> str:
        return f"{self.issuer}/v1/authorize"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/v1/token"

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/v1/keys"

    @property
    def introspection_endpoint(self) -> str:
        return f"{self.issuer}/v1/introspect"

    @property
    def revocation_endpoint(self) -> str:
        return f"{self.issuer}/v1/revoke"

    @property
    def revocation_feed_endpoint(self) -> str:
        return f"{self.issuer}/v1/revocations"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    client_id: str
    auth_methods: frozenset[AuthMethod]
    secret_digest: bytes | None = field(repr=False)
    jwks: tuple[PublicKey, ...]  # private_key_jwt: the client's public keys
    jwks_uri: str | None
    grant_types: frozenset[str]
    scopes: tuple[str, ...] | None  # None: every scope of the server
    servers: frozenset[str]
    claims: MappingProxyType[str, Any]
    introspect: IntrospectAccess = "own"  # "any": every token of its servers (resource servers)
    redirect_uris: tuple[str, ...] = ()  # authorization_code: compared exactly (RFC 8252 aside)
    require_pkce: bool = True  # false only for a confidential client
    post_logout_redirect_uris: tuple[str, ...] = ()  # where logout may send the browser
    groups: frozenset[str] | None = None  # only members may sign in (None: everyone)
    allowed_origins: frozenset[str] = frozenset()  # CORS on token/userinfo/revoke/keys
    consent: Consent = "none"  # "required": the user grants the scopes on a page, once
    sign_on: SignOnPolicy | None = None  # how its users sign in (None: the org's policy)

    @property
    def public(self) -> bool:
        """A public client (``auth_method: none``): it has no credentials at all."""
        return self.auth_methods == frozenset({"none"})

    def secret_matches(self, presented: str) -> bool:
        if self.secret_digest is None:
            return False
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(digest, self.secret_digest)


@dataclass(frozen=True, slots=True)
class RateLimits:
    """``rate_limits``: the token endpoint's budget per authenticated client
    (``token: {per_client: 600/min, burst: 100}``); None: unlimited."""

    token_per_client: Rate | None = None


NO_RATE_LIMITS = RateLimits()


@dataclass(frozen=True, slots=True)
class ClientAuthThrottle:
    """Failed client authentications before a lock, per presented client_id and per IP.

    After ``failures`` (``ip_failures``) free failures, each further failure locks the
    key for 1 s, doubling up to ``max_lock``; failures are forgotten ``reset_after``
    the last one. 0 turns that key's throttling off.
    """

    failures: int = 5
    ip_failures: int = 20
    max_lock: float = 300.0
    reset_after: float = 900.0


DEFAULT_CLIENT_AUTH_THROTTLE = ClientAuthThrottle()


@dataclass(frozen=True, slots=True)
class UserConfig:
    """A user declared in ``authserver.users``; the file is its source of truth.

    Exactly one of ``password_hash`` (an argon2id PHC string) and ``password`` (from a
    ``${NAME}`` reference, held sealed: never the password in the clear)."""

    username: str
    username_key: str  # what makes it unique: see authserver.userrules.username_key
    password_hash: str | None = field(repr=False)
    password: EnvPassword | None
    profile: MappingProxyType[str, Any]
    groups: tuple[str, ...]  # sorted
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class SessionTimes:
    """The org-wide browser session ends ``idle_timeout`` after its last use or
    ``max_lifetime`` after the sign-in, whichever comes first."""

    idle_timeout: int = 7200
    max_lifetime: int = 86400


DEFAULT_SESSION_TIMES = SessionTimes()


@dataclass(frozen=True, slots=True)
class Brand:
    name: str = "tokengate"
    logo_url: str | None = None  # https, or a path on this server
    color: str = "#1f6feb"


PAGE_TEMPLATES = (
    "signin.html",
    "error.html",
    "consent.html",
    "signout.html",
    "signed_out.html",
    "mfa.html",
    "enroll.html",
    "recovery_codes.html",
    "passkey.html",
)


@dataclass(frozen=True, slots=True)
class SignInConfig:
    brand: Brand = Brand()
    templates_dir: Path | None = None  # replaces the built-in page templates wholesale


DEFAULT_SIGN_IN = SignInConfig()


@dataclass(frozen=True, slots=True)
class AuthServerConfig:
    listen: Listen
    public_url: str
    data_dir: Path
    jwks_max_age: int
    leeway: int
    max_body_bytes: int
    servers: tuple[ServerConfig, ...]
    clients: tuple[ClientConfig, ...]
    limits: Limits = DEFAULT_LIMITS
    client_auth_throttle: ClientAuthThrottle = DEFAULT_CLIENT_AUTH_THROTTLE
    trusted_proxies: TrustedProxies = NO_PROXIES  # whose forwarding headers count
    users: tuple[UserConfig, ...] = ()  # declared users; the store holds the others
    sessions: SessionTimes = DEFAULT_SESSION_TIMES
    sign_in: SignInConfig = DEFAULT_SIGN_IN
    rate_limits: RateLimits = NO_RATE_LIMITS
    store: str | None = field(default=None, repr=False)  # postgresql:// URL; None: SQLite
    # signing keys' private parts at rest in the store, sealed with AES-256-GCM
    key_encryption_key: bytes | None = field(default=None, repr=False)
    rotation_every: int | None = None  # scheduled signing-key rotation, seconds
    sign_on: SignOnPolicy = DEFAULT_SIGN_ON  # how people sign in, unless a client says


STORE_SCHEMES = ("postgresql", "postgres")
KEK_BYTES = 32
KEK_HINT = "32 random bytes, base64-encoded (openssl rand -base64 32)"


# --------------------------------------------------------------------------- parsing


def parse_authserver(node: Node) -> AuthServerConfig:
    f = node.fields(
        required=("servers",),
        optional=(
            "listen",
            "public_url",
            "data_dir",
            "jwks_max_age",
            "leeway",
            "max_body_bytes",
            "clients",
            "limits",
            "client_auth_throttle",
            "trusted_proxies",
            "users",
            "sessions",
            "sign_in",
            "rate_limits",
            "store",
            "key_encryption_key",
            "rotation",
            "sign_on",
        ),
    )
    listen = f.get("listen", as_listen, Listen("127.0.0.1", 9000))
    jwks_max_age = f.get("jwks_max_age", as_seconds, 300)
    store = f.get("store", as_store_url, None)
    kek = f.get("key_encryption_key", as_key_encryption_key, None)
    if store and not f.has("key_encryption_key"):
        f.node_at("store").error(
            "a PostgreSQL store keeps the signing keys, sealed with "
            f"authserver.key_encryption_key: set it to {KEK_HINT}"
        )
    public_url = f.get("public_url", as_http_url, None)
    if public_url is None and listen is not None and "public_url" not in f:
        public_url = f"http://{listen}"
    servers = _parse_servers(f, public_url or "http://invalid")
    clients = _parse_clients(f, servers)
    _check_policy_clients(f, servers, clients)
    sign_on = f.get("sign_on", as_sign_on, DEFAULT_SIGN_ON) or DEFAULT_SIGN_ON
    _check_passwordless(f, public_url, sign_on, clients)
    return AuthServerConfig(
        listen=listen,
        public_url=public_url,
        data_dir=Path(f.get("data_dir", as_str, "./data") or "./data"),  # "" is reported
        jwks_max_age=jwks_max_age,
        leeway=f.get("leeway", as_seconds, 30),
        max_body_bytes=f.get("max_body_bytes", positive_int, 65536),
        servers=servers,
        clients=clients,
        limits=f.get("limits", as_limits, DEFAULT_LIMITS),
        client_auth_throttle=f.get(
            "client_auth_throttle", as_client_auth_throttle, DEFAULT_CLIENT_AUTH_THROTTLE
        )
        or DEFAULT_CLIENT_AUTH_THROTTLE,
        trusted_proxies=f.get("trusted_proxies", as_trusted_proxies, NO_PROXIES),
        users=_parse_users(f),
        sessions=f.get("sessions", as_session_times, DEFAULT_SESSION_TIMES)
        or DEFAULT_SESSION_TIMES,
        sign_in=f.get("sign_in", as_sign_in, DEFAULT_SIGN_IN) or DEFAULT_SIGN_IN,
        rate_limits=f.get("rate_limits", as_rate_limits, NO_RATE_LIMITS) or NO_RATE_LIMITS,
        store=store or None,
        key_encryption_key=kek,
        rotation_every=f.get("rotation", lambda n: as_rotation(n, jwks_max_age), None),
        sign_on=sign_on,
    )


def _check_passwordless(
    f: Fields, public_url: str | None, sign_on: SignOnPolicy, clients: tuple[ClientConfig, ...]
) -> None:
    """A ``passwordless`` policy needs passkeys, which browsers allow only at a public
    URL on https:// or localhost (never an IP address)."""
    if public_url is None or relying_party(public_url, "") is not None:
        return
    why = (
        f"passwordless signs in with passkeys, and browsers allow passkeys only at a "
        f"public_url on https:// or localhost, not {public_url}"
    )
    if sign_on.preset == "passwordless":
        f.node.report.add(f"{f.node_at('sign_on').path}.policy", why)
    where = f.node_at("clients")
    for i, client in enumerate(clients):
        if client.sign_on is not None and client.sign_on.preset == "passwordless":
            where.report.add(f"{where.path}[{i}].sign_on.policy", why)


def _check_policy_clients(
    f: Fields, servers: tuple[ServerConfig, ...], clients: tuple[ClientConfig, ...]
) -> None:
    """Every client a policy names exists and uses the policy's server."""
    by_id = {c.client_id: c for c in clients}
    where = f.node_at("servers")
    for i, server in enumerate(servers):
        for j, policy in enumerate(server.access_policies):
            for k, client_id in enumerate(policy.clients or ()):
                path = f"{where.path}[{i}].access_policies[{j}].clients[{k}]"
                client = by_id.get(client_id)
                if client is None:
                    where.report.add(path, f"no client with client_id {client_id!r}")
                elif server.name not in client.servers:
                    where.report.add(
                        path, f"client {client_id!r} does not use server {server.name!r}"
                    )


def as_store_url(node: Node) -> str:
    """A PostgreSQL connection URL (libpq's syntax); checked here, connected at start."""
    import psycopg.conninfo  # here: only a config that names PostgreSQL needs it

    text = as_str(node)
    shape = (
        "must be a postgresql://user:password@host:port/database URL, special characters "
        "in the password percent-encoded (leave it out for the SQLite store in data_dir)"
    )
    parts = urlsplit(text)
    if parts.scheme not in STORE_SCHEMES:
        raise ConfigError(node.path, shape)
    try:  # as libpq reads it; its message may quote the password: never shown
        info = psycopg.conninfo.conninfo_to_dict(text)
    except psycopg.Error:
        raise ConfigError(node.path, f"{shape}; libpq cannot read it") from None
    host = str(info.get("host") or "")
    if not host or "@" in host or parts.netloc.count("@") > 1:
        raise ConfigError(node.path, shape)
    return text


def as_key_encryption_key(node: Node) -> bytes:
    text = as_str(node).strip().rstrip("=").replace("-", "+").replace("_", "/")
    try:  # standard or URL-safe alphabet, padded or not
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except ValueError:
        raise ConfigError(node.path, f"must be {KEK_HINT}; it is not base64") from None
    if len(key) != KEK_BYTES:
        raise ConfigError(node.path, f"must be {KEK_HINT}; it decodes to {len(key)} bytes")
    return key


def as_rotation(node: Node, jwks_max_age: int | None) -> int:
    f = node.fields(required=("every",))
    every = f.get("every", as_seconds)
    lead = (jwks_max_age or 300) + 2
    if every is not None and every <= 2 * lead:
        f.node_at("every").error(
            f"must be longer than {2 * lead}s: each next key is published {lead}s "
            "(jwks_max_age plus 2s) before it signs"
        )
    return every or 0


def _parse_servers(f: Fields, public_url: str) -> tuple[ServerConfig, ...]:
    out: list[ServerConfig] = []
    seen: set[str] = set()
    for item in f.node_at("servers").items():
        s = item.fields(
            required=("name", "audience"),
            optional=(
                "signing_alg",
                "access_token_ttl",
                "scopes",
                "id_token_ttl",
                "refresh_tokens",
                "user_claims",
                "access_policies",
            ),
        )
        name = s.get("name", as_name)
        if name in seen:
            s.node_at("name").error(f"duplicate server name {name!r}")
        seen.add(name)
        scopes = s.get("scopes", list_of(as_scope), ()) or ()
        out.append(
            ServerConfig(
                name=name,
                issuer=f"{public_url}/oauth2/{name}",
                audience=s.get("audience", as_str),
                signing_alg=s.get("signing_alg", one_of(*SIGNING_ALGS), "RS256"),  # type: ignore[arg-type]
                access_token_ttl=s.get("access_token_ttl", as_seconds, 3600),
                scopes=scopes,
                id_token_ttl=s.get("id_token_ttl", as_seconds, 3600),
                refresh_tokens=s.get("refresh_tokens", as_refresh_times, DEFAULT_REFRESH_TIMES)
                or DEFAULT_REFRESH_TIMES,
                user_claims=_parse_user_claims(s, scopes),
                access_policies=s.get("access_policies", _policies_reader(scopes), ()) or (),
            )
        )
    if not out and f.has("servers"):
        f.node_at("servers").error("must list at least one authorization server")
    return tuple(out)


def _policies_reader(scopes: tuple[str, ...]) -> Callable[[Node], tuple[AccessPolicy, ...]]:
    offered = {*scopes, *OIDC_SCOPES}
    return lambda node: as_access_policies(node, offered, GRANT_TYPES)


def _parse_user_claims(s: Fields, scopes: tuple[str, ...]) -> tuple[UserClaim, ...]:
    offered = {*scopes, *OIDC_SCOPES}

    def offered_claim(item: Node) -> UserClaim:
        claim = as_user_claim(item)
        if claim.scope is not None and claim.scope not in offered:
            item.report.add(
                f"{item.path}.scope", f"scope {claim.scope!r} is not offered by this server"
            )
        return claim

    items = s.node_at("user_claims").items() if s.has("user_claims") else ()
    return tuple(unique_items(items, offered_claim, lambda c: c.name, "name", "user claim"))


def as_user_claim(node: Node) -> UserClaim:
    c = node.fields(required=("name", "from"), optional=("into", "scope"))
    name = c.get("name", as_str)
    if name is not None and (name in RESERVED_CLAIMS or name in _ID_TOKEN_OWN):
        c.node_at("name").error(f"claim {name!r} is set by the authorization server")
    source = c.get("from", as_str)
    if source is not None and not (
        source in ("groups", "username")
        or (source.startswith("profile.") and len(source) > len("profile."))
    ):
        c.node_at("from").error(f"must be groups, username or profile.<key>, got {source!r}")
    into = c.get("into", list_of(one_of(*TOKEN_KINDS)), TOKEN_KINDS) or ()
    if c.has("into") and not into:
        c.node_at("into").error("must name access_token, id_token or both")
    return UserClaim(
        name=name or "",
        source=source or "",
        into=frozenset(into),
        scope=c.get("scope", as_scope, None),
    )


def as_refresh_times(node: Node) -> RefreshTokenTimes:
    f = node.fields(optional=("idle_ttl", "max_ttl"))
    d = DEFAULT_REFRESH_TIMES
    idle = f.get("idle_ttl", as_seconds, d.idle_ttl)
    longest = f.get("max_ttl", as_seconds, d.max_ttl)
    if idle is not None and longest is not None and idle > longest:
        f.node_at("idle_ttl").error(f"must not exceed max_ttl ({longest}s)")
    return RefreshTokenTimes(idle_ttl=idle or d.idle_ttl, max_ttl=longest or d.max_ttl)


def _parse_clients(f: Fields, servers: tuple[ServerConfig, ...]) -> tuple[ClientConfig, ...]:
    by_name = {s.name: s for s in servers}
    items = f.node_at("clients").items() if f.has("clients") else ()
    clients = unique_items(
        items, lambda n: _parse_client(n, by_name), lambda c: c.client_id, "client_id", "client_id"
    )
    return tuple(clients)


def _parse_client(node: Node, servers: dict[str, ServerConfig]) -> ClientConfig:
    c = node.fields(
        required=("client_id",),
        optional=(
            "secret",
            "secret_hash",
            "auth_method",
            "jwks",
            "jwks_uri",
            "grant_types",
            "scopes",
            "servers",
            "claims",
            "introspect",
            "redirect_uris",
            "require_pkce",
            "post_logout_redirect_uris",
            "groups",
            "allowed_origins",
            "consent",
            "sign_on",
        ),
    )
    client_id = c.get("client_id", as_client_id)
    method = c.get("auth_method", one_of(*AUTH_METHODS, PUBLIC), None)
    secret_digest = _parse_secret(c)
    jwks = c.get("jwks", as_client_jwks, ())
    jwks_uri = c.get("jwks_uri", as_http_url, None)

    uses_secret = c.has("secret") or c.has("secret_hash")
    uses_keys = c.has("jwks") or c.has("jwks_uri")
    if method == PUBLIC:
        methods = frozenset({PUBLIC})
        if uses_secret or uses_keys:
            node.error("a public client (auth_method: none) has no secret, jwks or jwks_uri")
    elif method == "private_key_jwt" or (method is None and uses_keys):
        methods: frozenset[AuthMethod] = frozenset({"private_key_jwt"})
        if uses_secret:
            node.error("a private_key_jwt client has no secret; remove secret/secret_hash")
        if c.has("jwks") == c.has("jwks_uri"):
            node.error("a private_key_jwt client needs exactly one of jwks or jwks_uri")
    else:
        methods = (
            frozenset({method})
            if method is not None
            else frozenset({"client_secret_basic", "client_secret_post"})
        )
        if uses_keys:
            node.error(f"jwks/jwks_uri are for private_key_jwt clients, not {method or 'secret'}")
        if c.has("secret") == c.has("secret_hash"):
            node.error("needs exactly one of secret or secret_hash (see `tokengate secret`)")

    server_names = c.get("servers", list_of(as_name), tuple(servers))
    for i, name in enumerate(server_names or ()):
        if name not in servers:
            node.report.add(f"{node.path}.servers[{i}]", f"no authorization server named {name!r}")
    offered = {s for name in server_names or () if name in servers for s in servers[name].scopes}
    offered.update(OIDC_SCOPES)
    scopes = c.get("scopes", list_of(as_scope), None)
    for i, scope in enumerate(scopes or ()):
        if scope not in offered:
            node.report.add(
                f"{node.path}.scopes[{i}]",
                f"scope {scope!r} is not offered by any of the client's servers",
            )
    default_grants = ("authorization_code",) if method == PUBLIC else DEFAULT_GRANT_TYPES
    grants = c.get("grant_types", list_of(one_of(*GRANT_TYPES)), default_grants) or ()
    redirect_uris = c.get("redirect_uris", list_of(as_redirect_uri), ()) or ()
    require_pkce = c.get("require_pkce", as_bool, True)
    if method == PUBLIC and "client_credentials" in grants:
        c.node_at("grant_types").error(
            "a public client (auth_method: none) cannot use client_credentials"
        )
    if method == PUBLIC and require_pkce is False:
        c.node_at("require_pkce").error("a public client (auth_method: none) must use PKCE")
    browser = bool(BROWSER_GRANTS & set(grants))
    only_browser = "is only for clients with grant type authorization_code or implicit"
    if browser and not redirect_uris:
        node.error("an authorization_code or implicit client needs redirect_uris")
    if redirect_uris and not browser:
        c.node_at("redirect_uris").error(only_browser)
    if "refresh_token" in grants and not {"authorization_code", "password"} & set(grants):
        c.node_at("grant_types").error(
            "refresh_token needs authorization_code or password (users' tokens)"
        )
    if method == PUBLIC and "password" in grants:
        c.node_at("grant_types").error(
            "a public client (auth_method: none) cannot use password: it cannot keep "
            "a user's password from being replayed by anyone who copies it"
        )
    logout_uris = c.get("post_logout_redirect_uris", list_of(as_redirect_uri), ()) or ()
    if logout_uris and not browser:
        c.node_at("post_logout_redirect_uris").error(only_browser)
    groups = c.get("groups", list_of(as_group), None)
    if groups is not None and not browser:
        c.node_at("groups").error(only_browser)
    origins = c.get("allowed_origins", list_of(as_origin), ()) or ()
    consent = c.get("consent", one_of(*CONSENTS), "none") or "none"
    if consent == "required" and not browser:
        c.node_at("consent").error(only_browser)
    return ClientConfig(
        client_id=client_id,
        auth_methods=methods,
        secret_digest=secret_digest,
        jwks=jwks or (),
        jwks_uri=jwks_uri,
        grant_types=frozenset(grants or ()),
        scopes=scopes,
        servers=frozenset(server_names or ()),
        claims=MappingProxyType(c.get("claims", as_claims, {}) or {}),
        introspect=c.get("introspect", one_of(*INTROSPECT_ACCESS), "own") or "own",  # type: ignore[arg-type]
        redirect_uris=redirect_uris,
        require_pkce=require_pkce is not False,
        post_logout_redirect_uris=logout_uris,
        groups=frozenset(groups) if groups is not None else None,
        allowed_origins=frozenset(origins),
        consent=consent,  # type: ignore[arg-type]
        sign_on=c.get("sign_on", as_sign_on, None),
    )


def _parse_secret(c: Fields) -> bytes | None:
    if c.has("secret"):
        secret = c.get("secret", as_str)
        if secret is None:
            return None
        if len(secret) < MIN_SECRET_LENGTH:
            c.node_at("secret").error(
                f"is shorter than {MIN_SECRET_LENGTH} characters; "
                "generate one with `tokengate secret`"
            )
            return None
        return hashlib.sha256(secret.encode()).digest()
    if c.has("secret_hash"):
        return c.get("secret_hash", as_secret_hash)
    return None


def _parse_users(f: Fields) -> tuple[UserConfig, ...]:
    out: list[UserConfig] = []
    seen: dict[str, str] = {}  # username_key -> the path that declared it first
    for item in f.node_at("users").items() if f.has("users") else ():
        user = guarded(item, _parse_user)
        if user is None or user.username is None:
            continue
        path = f"{item.path}.username"
        first = seen.setdefault(user.username_key, path)
        if first != path:
            item.report.add(
                path,
                f"duplicate username {user.username!r}: {first} is the same user "
                "(usernames are compared ignoring case and Unicode compatibility forms)",
            )
            continue
        out.append(user)
    return tuple(out)


def _parse_user(node: Node) -> UserConfig:
    u = node.fields(
        required=("username",),
        optional=("password_hash", "password", "profile", "groups", "disabled"),
    )
    username = u.get("username", as_username)
    if u.has("password_hash") == u.has("password"):
        node.error(
            "needs exactly one of password_hash (from `tokengate users hash-password`) "
            "or password (a ${NAME} environment variable reference)"
        )
    groups = u.get("groups", list_of(as_group), ()) or ()
    return UserConfig(
        username=username,
        username_key=username_key(username) if username is not None else "",
        password_hash=u.get("password_hash", as_password_hash, None),
        password=u.get("password", as_env_password, None),
        profile=MappingProxyType(u.get("profile", as_profile, {}) or {}),
        groups=tuple(sorted(groups)),
        disabled=u.get("disabled", as_bool, False) or False,
    )


# --------------------------------------------------------------------------- converters


def _text_checked_by(problem_of: Callable[[str], str | None]) -> Callable[[Node], str]:
    """A converter for a string that ``problem_of`` checks (None: no problem)."""

    def read(node: Node) -> str:
        text = node.raw_str()
        problem = problem_of(text)
        if problem is not None:
            raise ConfigError(node.path, problem)
        return text

    return read


as_username = _text_checked_by(username_problem)
as_group = _text_checked_by(group_problem)
as_password_hash = _text_checked_by(phc_problem)


def as_env_password(node: Node) -> EnvPassword:
    """``password: ${NAME}`` only: a password written in the file is refused (and never
    quoted in the message)."""
    m = _ENV_ONLY.fullmatch(node.value) if isinstance(node.value, str) else None
    if m is None:
        raise ConfigError(
            node.path,
            "must be a ${NAME} environment variable reference: a password is never "
            "written in the config (use password_hash, from `tokengate users hash-password`)",
        )
    password = node.raw_str()  # an unset variable is reported here
    problem = password_problem(password)
    if problem is not None:
        raise ConfigError(node.path, f"the password in ${{{m.group(1)}}} {problem}")
    return EnvPassword.seal(m.group(1), password)


def as_profile(node: Node) -> dict[str, Any]:
    profile: dict[str, Any] = {}
    for key, child in node.entries():
        value = guarded(child, Node.plain)
        if value is None and child.value is not None:
            continue  # reported
        problem = claim_problem(key, value)
        if problem is not None:
            child.error(problem)
            continue
        profile[key] = value
    return profile


def as_rate_limits(node: Node) -> RateLimits:
    f = node.fields(optional=("token",))
    return RateLimits(token_per_client=f.get("token", _token_rate, None))


def _token_rate(node: Node) -> Rate | None:
    f = node.fields(required=("per_client",), optional=("burst",))
    burst = f.node_at("burst") if f.has("burst") else None
    return f.get("per_client", lambda n: as_rate(n, burst))


def as_client_auth_throttle(node: Node) -> ClientAuthThrottle:
    f = node.fields(optional=("failures", "ip_failures", "max_lock", "reset_after"))
    d = DEFAULT_CLIENT_AUTH_THROTTLE
    failures = f.get("failures", non_negative_int, d.failures)
    ip_failures = f.get("ip_failures", non_negative_int, d.ip_failures)
    max_lock = f.get("max_lock", as_duration, d.max_lock) or d.max_lock
    if max_lock < 1:
        f.node_at("max_lock").error(f"must be at least 1s, got {f.node_at('max_lock').value!r}")
        max_lock = d.max_lock
    # unset: long enough to outlast the longest lock
    reset_after = f.get("reset_after", as_duration, max(d.reset_after, max_lock)) or max_lock
    if reset_after < max_lock:
        f.node_at("reset_after").error(
            f"must be at least max_lock ({max_lock:g}s), got {reset_after:g}s"
        )
    return ClientAuthThrottle(
        failures=d.failures if failures is None else failures,
        ip_failures=d.ip_failures if ip_failures is None else ip_failures,
        max_lock=max_lock,
        reset_after=reset_after,
    )


def as_redirect_uri(node: Node) -> str:
    text = as_str(node)
    problem = redirect_uri_problem(text)
    if problem is not None:
        raise ConfigError(node.path, problem)
    return text


def as_session_times(node: Node) -> SessionTimes:
    f = node.fields(optional=("idle_timeout", "max_lifetime"))
    d = DEFAULT_SESSION_TIMES
    idle = f.get("idle_timeout", as_seconds, d.idle_timeout)
    longest = f.get("max_lifetime", as_seconds, d.max_lifetime)
    for key, value in (("idle_timeout", idle), ("max_lifetime", longest)):
        if value is not None and value < 60:
            f.node_at(key).error(f"must be at least 1m, got {value}s")
    if idle is not None and longest is not None and idle > longest:
        f.node_at("idle_timeout").error(f"must not exceed max_lifetime ({longest}s)")
    return SessionTimes(idle_timeout=idle or d.idle_timeout, max_lifetime=longest or d.max_lifetime)


def as_sign_in(node: Node) -> SignInConfig:
    f = node.fields(optional=("brand", "templates_dir"))
    templates = f.get("templates_dir", as_str, None)
    if templates == "":
        f.node_at("templates_dir").error("must be a directory path")
    return SignInConfig(
        brand=f.get("brand", as_brand, Brand()) or Brand(),
        templates_dir=Path(templates) if templates else None,
    )


def templates_dir_problem(path: Path) -> str | None:
    """What keeps ``path`` from replacing the page templates; None when it can."""
    if not path.is_dir():
        return f"{path} is not a directory"
    missing = [name for name in PAGE_TEMPLATES if not (path / name).is_file()]
    if missing:
        return f"{path} lacks {', '.join(missing)} (every page template is replaced)"
    import jinja2  # only for a config that replaces the templates

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(path), autoescape=True)
    for name in PAGE_TEMPLATES:
        try:
            environment.get_template(name)
        except jinja2.TemplateSyntaxError as exc:
            return f"{path / name} line {exc.lineno}: {exc.message}"
        except (jinja2.TemplateError, OSError, UnicodeDecodeError) as exc:
            return f"{name}: {type(exc).__name__}: {exc}"
    return None


def as_brand(node: Node) -> Brand:
    f = node.fields(optional=("name", "logo_url", "color"))
    d = Brand()
    name = f.get("name", as_str, d.name)
    if name is not None and len(name) > 64:
        f.node_at("name").error("must be at most 64 characters")
    logo_url = f.get("logo_url", as_logo_url, None)
    color = f.get("color", as_str, d.color)
    if color is not None and not BRAND_COLOR.fullmatch(color):
        f.node_at("color").error(f"must be a #rrggbb colour, got {color!r}")
    return Brand(name=name or d.name, logo_url=logo_url, color=color or d.color)


def as_logo_url(node: Node) -> str:
    text = as_str(node)
    if not re.fullmatch(r"https://[^\s\"'<>()\\]+", text):
        raise ConfigError(node.path, "must be an https URL")
    return text


def as_origin(node: Node) -> str:
    """A web origin (RFC 6454) as browsers send it: scheme, host and port, no path;
    https, or http on a loopback host."""
    text = as_str(node)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.path
        or parts.query
        or parts.fragment
        or text.endswith(("?", "#"))
    ):
        raise ConfigError(
            node.path, f"must be an origin such as https://app.example.com (no path), got {text!r}"
        )
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(node.path, f"must be https (http only on loopback), got {text!r}")
    default = 443 if parts.scheme == "https" else 80
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def non_negative_int(node: Node) -> int:
    value = as_int(node)
    if value < 0:
        raise ConfigError(node.path, f"must be an integer >= 0, got {value}")
    return value


def as_scope(node: Node) -> str:
    text = as_str(node)
    if not SCOPE_TOKEN.fullmatch(text):
        raise ConfigError(node.path, f"is not a valid scope token (RFC 6749 3.3): {text!r}")
    return text


def as_client_id(node: Node) -> str:
    text = as_str(node)
    if not _CLIENT_ID.fullmatch(text):
        raise ConfigError(node.path, "must be 1-255 printable ASCII characters")
    return text


def as_secret_hash(node: Node) -> bytes:
    text = as_str(node)
    m = re.fullmatch(r"sha256:([0-9a-f]{64})", text)
    if not m:
        raise ConfigError(
            node.path, "must be sha256:<64 hex digits>, as printed by `tokengate secret`"
        )
    return bytes.fromhex(m.group(1))


def as_claims(node: Node) -> dict[str, Any]:
    claims: dict[str, Any] = {}
    for key, child in node.entries():
        if key in RESERVED_CLAIMS:
            child.error(f"claim {key!r} is set by the authorization server and cannot be set")
            continue
        value = guarded(child, Node.plain)
        if value is not None:
            claims[key] = value
    return claims


def as_client_jwks(node: Node) -> tuple[PublicKey, ...]:
    f = node.fields(required=("keys",))
    keys: list[PublicKey] = []
    for item in f.node_at("keys").items():
        key = guarded(item, as_client_key)
        if key is not None:
            keys.append(key)
    if not keys:
        raise ConfigError(node.path, "must hold at least one public key")
    kids = [k.kid for k in keys]
    if len(keys) > 1 and (None in kids or len(set(kids)) != len(kids)):
        raise ConfigError(node.path, "with several keys, every key needs a distinct kid")
    return tuple(keys)


def as_client_key(node: Node) -> PublicKey:
    try:
        return load_public_jwk(node.plain())
    except ValueError as exc:
        raise ConfigError(node.path, str(exc)) from None
    except TypeError:  # a member of the wrong type, such as alg: [RS256]
        raise ConfigError(node.path, "is not a valid JWK") from None


def deprecated_grant_warnings(config: AuthServerConfig) -> tuple[str, ...]:
    """What ``tokengate check`` warns about: clients using grants RFC 9700 deprecates."""
    return tuple(
        f"authserver.clients[{i}].grant_types: {grant} ({client.client_id}) is deprecated "
        "by RFC 9700 (OAuth 2.0 Security BCP); prefer authorization_code with PKCE"
        for i, client in enumerate(config.clients)
        for grant in DEPRECATED_GRANTS
        if grant in client.grant_types
    )
