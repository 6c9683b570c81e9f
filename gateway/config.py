"""The ``gateway`` section: listen address, trusted issuers, routes. Frozen, checked once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from tokengate.asgi import HTTP_METHODS
from tokengate.jwk import ALGORITHMS
from tokengate.limits import DEFAULT_LIMITS, Limits, as_limits
from tokengate.proxies import NO_PROXIES, TrustedProxies, as_trusted_proxies
from tokengate.ratelimit import Rate, as_rate
from tokengate.yamlconf import (
    ConfigError,
    Fields,
    Listen,
    Node,
    as_bool,
    as_http_url,
    as_listen,
    as_name,
    as_seconds,
    as_str,
    guarded,
    list_of,
    one_of,
    positive_int,
)

_PATTERN_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,=:@%-]+")


FeedAuthMethod = Literal["client_secret_basic", "client_secret_post"]


@dataclass(frozen=True, slots=True)
class RevocationsConfig:
    """How to follow an issuer's revocation feed (tokengate's ``/v1/revocations``)."""

    client_id: str
    secret: str = field(repr=False)
    auth_method: FeedAuthMethod = "client_secret_basic"
    endpoint: str | None = None  # None: {issuer}/v1/revocations
    degraded_after: int = 60  # seconds of failing polls before /readyz says so


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    issuer: str
    audiences: tuple[str, ...]
    jwks_uri: str | None  # None: from the issuer's discovery document
    algorithms: tuple[str, ...]
    leeway: int
    allow_jwt_typ: bool  # accept typ JWT or no typ (issuers whose tokens lack at+jwt)
    jwks_cache_min: int  # never refetch more often than this (also the unknown-kid interval)
    jwks_cache_max: int  # refresh at least this often, whatever Cache-Control says
    jwks_cache_default: int  # when the JWKS response has no Cache-Control max-age
    jwks_max_stale: int  # serve old keys this long after fetches start failing; then deny
    revocations: RevocationsConfig | None = None  # follow the issuer's revocation feed


ClaimOp = Literal["equals", "any_of", "contains", "matches", "exists"]


@dataclass(frozen=True, slots=True)
class ClaimRule:
    claim: str
    op: ClaimOp
    value: Any  # equals: a scalar; any_of: tuple; contains: scalar; matches: Pattern; exists: bool


@dataclass(frozen=True, slots=True)
class Require:
    issuer: str | None
    audience: str | None
    scopes: tuple[str, ...]
    any_scopes: tuple[str, ...]
    claims: tuple[ClaimRule, ...]
    # step-up (RFC 9470): the acr values accepted, in preference order, and how long
    # ago (seconds) the user may have signed in
    acr: tuple[str, ...] = ()
    max_age: int | None = None


RateKey = Literal["client_id", "sub", "route", "remote_addr"]
RATE_KEYS: tuple[RateKey, ...] = ("client_id", "sub", "route", "remote_addr")
TOKEN_RATE_KEYS = frozenset({"client_id", "sub"})  # decided after authentication


@dataclass(frozen=True, slots=True)
class RouteRateLimit:
    per: RateKey  # what one budget belongs to
    rate: Rate

    @property
    def needs_token(self) -> bool:
        return self.per in TOKEN_RATE_KEYS


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    path: str  # pattern: exact, `*` one segment, trailing `**` any depth
    methods: frozenset[str] | None  # None: any
    host: str | None  # exact, or `*.example.com`; lowercase, no port
    upstream: str  # http(s)://host[:port][/base], no trailing slash
    strip_prefix: str | None
    timeout: float
    public: bool
    forward_token: bool
    require: Require
    rate_limit: RouteRateLimit | None = None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen: Listen
    issuers: tuple[IssuerConfig, ...]
    routes: tuple[RouteConfig, ...]
    max_token_bytes: int
    allow_path_parameters: bool
    token_cache_size: int
    strip_headers: tuple[str, ...] = ()  # more request headers never forwarded (lowercase)
    limits: Limits = DEFAULT_LIMITS
    trusted_proxies: TrustedProxies = NO_PROXIES  # whose forwarding headers count


# --------------------------------------------------------------------------- parsing


def parse_gateway(node: Node) -> GatewayConfig:
    f = node.fields(
        required=("routes",),
        optional=(
            "listen",
            "issuers",
            "max_token_bytes",
            "allow_path_parameters",
            "token_cache_size",
            "strip_headers",
            "limits",
            "trusted_proxies",
        ),
    )
    issuers = _parse_issuers(f)
    by_url = {i.issuer: i for i in issuers}
    routes: list[RouteConfig] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(f.node_at("routes").items()):
        route = guarded(item, lambda n: _parse_route(n, by_url))
        if route is None:
            continue
        if route.name in seen:
            item.report.add(
                f"{item.path}.name",
                f"duplicate route name {route.name!r} (also routes[{seen[route.name]}])",
            )
        seen.setdefault(route.name, i)
        routes.append(route)
    needs_token = [r for r in routes if not r.public]
    if needs_token and not issuers and "issuers" not in f:
        f.node.report.add(
            f.node.key_path("issuers"), "routes need tokens but no issuer is configured"
        )
    return GatewayConfig(
        listen=f.get("listen", as_listen, Listen("127.0.0.1", 8080)),
        issuers=issuers,
        routes=tuple(routes),
        max_token_bytes=f.get("max_token_bytes", positive_int, 8192),
        allow_path_parameters=f.get("allow_path_parameters", as_bool, False),
        token_cache_size=f.get("token_cache_size", positive_int, 10000),
        strip_headers=f.get("strip_headers", list_of(as_header_name), ()),
        limits=f.get("limits", as_limits, DEFAULT_LIMITS),
        trusted_proxies=f.get("trusted_proxies", as_trusted_proxies, NO_PROXIES),
    )


def _parse_issuers(f: Fields) -> tuple[IssuerConfig, ...]:
    out: list[IssuerConfig] = []
    seen: set[str] = set()
    for item in f.node_at("issuers").items() if f.has("issuers") else ():
        i = item.fields(
            required=("issuer", "audiences"),
            optional=(
                "jwks_uri",
                "algorithms",
                "leeway",
                "allow_jwt_typ",
                "jwks_cache_min",
                "jwks_cache_max",
                "jwks_cache_default",
                "jwks_max_stale",
                "revocations",
            ),
        )
        url = i.get("issuer", as_http_url)
        if url in seen:
            i.node_at("issuer").error(f"duplicate issuer {url!r}")
        seen.add(url)
        audiences = i.get("audiences", list_of(as_str), ())
        if audiences == ():
            i.node_at("audiences").error("must list at least one audience")
        algorithms = i.get("algorithms", list_of(one_of(*ALGORITHMS)), ("RS256",))
        cache_min = i.get("jwks_cache_min", as_seconds, 30)
        cache_max = i.get("jwks_cache_max", as_seconds, 3600)
        if cache_min and cache_max and cache_min > cache_max:
            i.node_at("jwks_cache_min").error("must not exceed jwks_cache_max")
        out.append(
            IssuerConfig(
                issuer=url,
                audiences=audiences,
                jwks_uri=i.get("jwks_uri", as_http_url, None),
                algorithms=algorithms or ("RS256",),
                leeway=i.get("leeway", as_seconds, 30),
                allow_jwt_typ=i.get("allow_jwt_typ", as_bool, False),
                jwks_cache_min=cache_min,
                jwks_cache_max=cache_max,
                jwks_cache_default=i.get("jwks_cache_default", as_seconds, 300),
                jwks_max_stale=i.get("jwks_max_stale", as_seconds, 86400),
                revocations=i.get("revocations", as_revocations, None),
            )
        )
    return tuple(out)


def _parse_route(node: Node, issuers: dict[str, IssuerConfig]) -> RouteConfig:
    r = node.fields(
        required=("name", "match", "upstream"),
        optional=("strip_prefix", "timeout", "public", "forward_token", "require", "rate_limit"),
    )
    m = r.node_at("match").fields(required=("path",), optional=("methods", "host"))
    path = m.get("path", as_path_pattern)
    strip_prefix = r.get("strip_prefix", as_path_prefix, None)
    if strip_prefix and path and not (path + "/").startswith(strip_prefix.rstrip("/") + "/"):
        r.node_at("strip_prefix").error(f"is not a prefix of match.path {path!r}")
    public = r.get("public", as_bool, False)
    require = _parse_require(r, issuers)
    if public and r.has("require"):
        r.node_at("require").error("a public route takes no token, so it cannot require one")
    methods = m.get("methods", list_of(one_of(*HTTP_METHODS)), None)
    timeout = r.get("timeout", as_seconds, 30)  # None when it was wrong: reported already
    rate_limit = r.get("rate_limit", as_route_rate_limit, None)
    if public and rate_limit is not None and rate_limit.needs_token:
        node.report.add(
            f"{r.node.key_path('rate_limit')}.per",
            f"a public route takes no token, so it cannot be limited per {rate_limit.per}",
        )
    return RouteConfig(
        name=r.get("name", as_name),
        path=path,
        methods=frozenset(methods) if methods else None,
        host=m.get("host", as_host, None),
        upstream=r.get("upstream", as_http_url),
        strip_prefix=strip_prefix,
        timeout=float(timeout or 30),
        public=public,
        forward_token=r.get("forward_token", as_bool, False),
        require=require,
        rate_limit=rate_limit,
    )


def as_route_rate_limit(node: Node) -> RouteRateLimit:
    """``{per: client_id|sub|route|remote_addr, limit: 100/s, burst: 200}``."""
    f = node.fields(required=("per", "limit"), optional=("burst",))
    per = f.get("per", one_of(*RATE_KEYS))
    rate = f.get("limit", lambda n: as_rate(n, f.node_at("burst") if f.has("burst") else None))
    if per is None or rate is None:
        return None  # type: ignore[return-value]  # the problem is reported already
    return RouteRateLimit(per, rate)  # type: ignore[arg-type]


def _parse_require(r: Fields, issuers: dict[str, IssuerConfig]) -> Require:
    if not r.has("require"):
        return Require(None, None, (), (), ())
    q = r.node_at("require").fields(
        optional=("issuer", "audience", "scopes", "any_scopes", "claims", "acr", "max_age")
    )
    acr = q.get("acr", list_of(as_acr), ())
    if q.has("acr") and not acr:
        q.node_at("acr").error("must list at least one acr value (leave it out for any)")
    issuer = q.get("issuer", as_http_url, None)
    if issuer is not None and issuer not in issuers:
        q.node_at("issuer").error(f"no issuer {issuer!r} under gateway.issuers")
    claims: list[ClaimRule] = []
    for name, child in q.node_at("claims").entries() if q.has("claims") else ():
        rule = guarded(child, lambda n, name=name: as_claim_rule(n, name))
        if rule is not None:
            claims.append(rule)
    return Require(
        issuer=issuer,
        audience=q.get("audience", as_str, None),
        scopes=q.get("scopes", list_of(as_str), ()),
        any_scopes=q.get("any_scopes", list_of(as_str), ()),
        claims=tuple(claims),
        acr=acr or (),
        max_age=q.get("max_age", as_seconds, None),
    )


def as_acr(node: Node) -> str:
    """An acr value: it goes into a WWW-Authenticate parameter, so no quote, backslash,
    space or control character."""
    text = as_str(node)
    if not text or any(c in text for c in '"\\ ') or not text.isprintable():
        raise ConfigError(node.path, f"must be an acr value without spaces or quotes, got {text!r}")
    return text


# --------------------------------------------------------------------------- converters


def as_revocations(node: Node) -> RevocationsConfig:
    r = node.fields(
        required=("client_id", "secret"),
        optional=("auth_method", "endpoint", "degraded_after"),
    )
    degraded_after = r.get("degraded_after", as_seconds, 60)
    if degraded_after == 0:
        r.node_at("degraded_after").error("must be at least 1s")
    return RevocationsConfig(
        client_id=r.get("client_id", as_str),
        secret=r.get("secret", as_str),
        auth_method=r.get("auth_method", one_of("client_secret_basic", "client_secret_post"), None)
        or "client_secret_basic",
        endpoint=r.get("endpoint", as_http_url, None),
        degraded_after=degraded_after or 60,
    )


def as_path_pattern(node: Node) -> str:
    """``/exact/path``, ``/a/*/c`` (one segment), ``/a/**`` (any depth, final only)."""
    text = as_str(node)
    if not text.startswith("/"):
        raise ConfigError(node.path, f"must start with /, got {text!r}")
    segments = text[1:].split("/")
    for i, segment in enumerate(segments):
        if segment == "**" and i != len(segments) - 1:
            raise ConfigError(node.path, "** may only be the last segment")
        if segment in ("*", "**") or (segment == "" and i == len(segments) - 1):
            continue
        if segment in (".", "..") or not _PATTERN_SEGMENT.fullmatch(segment) or "*" in segment:
            raise ConfigError(
                node.path,
                f"segment {segment!r} is not canonical (no empty, dot or partial-* segments)",
            )
    return text


def as_path_prefix(node: Node) -> str:
    text = as_str(node)
    if not text.startswith("/") or "*" in text or "//" in text:
        raise ConfigError(node.path, f"must be a literal path starting with /, got {text!r}")
    return text.rstrip("/") or "/"


def as_header_name(node: Node) -> str:
    """A header field name (RFC 9110 token), lowercase, ``_`` folded to ``-``."""
    text = as_str(node)
    if not re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", text):
        raise ConfigError(node.path, f"is not a header name, got {text!r}")
    return text.lower().replace("_", "-")


def as_host(node: Node) -> str:
    text = as_str(node).lower()
    if not re.fullmatch(r"(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?", text):
        raise ConfigError(node.path, f"must be a host name or *.domain, got {text!r}")
    return text


def as_claim_rule(node: Node, claim: str) -> ClaimRule:
    value = node.value
    if isinstance(value, list):
        return ClaimRule(claim, "any_of", tuple(_scalar(n) for n in node.items()))
    if not isinstance(value, dict):
        return ClaimRule(claim, "equals", _scalar(node))
    (op, child), *rest = list(node.entries()) or [("", node)]
    if rest or op not in ("contains", "matches", "exists"):
        raise ConfigError(
            node.path, "must be a value, a list of values, or one of {contains|matches|exists: ...}"
        )
    if op == "contains":
        return ClaimRule(claim, "contains", _scalar(child))
    if op == "exists":
        return ClaimRule(claim, "exists", as_bool(child))
    pattern = as_str(child)
    try:
        return ClaimRule(claim, "matches", re.compile(pattern))
    except re.error as exc:
        raise ConfigError(child.path, f"is not a valid regular expression ({exc})") from None
    except (RecursionError, OverflowError, MemoryError):  # ((((...)))) or a{99999999999}
        raise ConfigError(child.path, "is too complex a regular expression") from None


def _scalar(node: Node) -> str | int | float | bool:
    value = node.plain()
    if isinstance(value, list | dict) or value is None:
        raise ConfigError(node.path, "must be a string, number or boolean")
    return value  # type: ignore[no-any-return]
