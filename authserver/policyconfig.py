"""A server's ``access_policies`` from YAML, checked with their key paths.

access_policies:
  - name: people                      # unique in the server
    clients: [portal, spa]            # default: every client of the server
    rules:                            # in order; the first that matches decides
      - name: admins-may-write
        if:                           # all must hold; a missing key: anything
          grant_types: [authorization_code, refresh_token]
          groups: [admins]            # the user is in at least one
          scopes: [orders:write]      # the request asks for at least one
        then:
          access: allow               # or deny
          scopes: [openid, profile, orders:read, orders:write]   # granted at most
          access_token_ttl: 15m       # default: the server's
          id_token_ttl: 1h
          refresh_tokens: {idle_ttl: 1d, max_ttl: 7d}
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

from authserver.policies import ACCESS, AccessPolicy, Rule, RuleConditions, RuleOutcome
from authserver.userrules import group_problem
from tokengate.yamlconf import (
    ConfigError,
    Node,
    as_seconds,
    as_str,
    list_of,
    one_of,
    unique_items,
)


def as_access_policies(
    node: Node, offered_scopes: Collection[str], grant_types: tuple[str, ...]
) -> tuple[AccessPolicy, ...]:
    """``offered_scopes``: every scope the server offers (its own and OIDC's)."""
    out = unique_items(
        node.items(),
        lambda n: _policy(n, offered_scopes, grant_types),
        lambda p: p.name,
        "name",
        "policy name",
    )
    if not out and node.value is not None and isinstance(node.value, list):
        node.error("must list at least one policy (leave it out to decide by clients alone)")
    return tuple(out)


def _policy(node: Node, offered: Collection[str], grant_types: tuple[str, ...]) -> AccessPolicy:
    p = node.fields(required=("name", "rules"), optional=("clients",))
    clients = p.get("clients", list_of(as_str), None)
    if clients is not None and not clients:
        p.node_at("clients").error("must name at least one client (leave it out for every one)")
    items: Iterable[Node] = p.node_at("rules").items() if p.has("rules") else ()
    rules = unique_items(
        items, lambda n: _rule(n, offered, grant_types), lambda r: r.name, "name", "rule name"
    )
    if p.has("rules") and isinstance(p.node_at("rules").value, list) and not rules:
        p.node_at("rules").error("must list at least one rule")
    return AccessPolicy(
        name=p.get("name", as_policy_name) or "",
        clients=tuple(clients) if clients else None,
        rules=tuple(rules),
    )


def _rule(node: Node, offered: Collection[str], grant_types: tuple[str, ...]) -> Rule:
    r = node.fields(required=("name",), optional=("if", "then"))
    conditions = r.get("if", lambda n: _conditions(n, offered, grant_types), RuleConditions())
    outcome = r.get("then", lambda n: _outcome(n, offered), RuleOutcome())
    return Rule(
        name=r.get("name", as_policy_name) or "",
        conditions=conditions or RuleConditions(),
        outcome=outcome or RuleOutcome(),
    )


def _conditions(
    node: Node, offered: Collection[str], grant_types: tuple[str, ...]
) -> RuleConditions:
    c = node.fields(optional=("grant_types", "groups", "scopes"))
    return RuleConditions(
        grant_types=c.get("grant_types", _some(one_of(*grant_types)), None),
        groups=c.get("groups", _some(as_group), None),
        scopes=c.get("scopes", _some(_offered_scope(offered)), None),
    )


def _outcome(node: Node, offered: Collection[str]) -> RuleOutcome:
    t = node.fields(
        optional=("access", "scopes", "access_token_ttl", "id_token_ttl", "refresh_tokens")
    )
    access = t.get("access", one_of(*ACCESS), "allow") or "allow"
    if access == "deny":
        for key in ("scopes", "access_token_ttl", "id_token_ttl", "refresh_tokens"):
            if key in t:
                t.node_at(key).error("a rule that denies grants nothing; remove it")
    idle, longest = t.get("refresh_tokens", _refresh_times, None) or (None, None)
    return RuleOutcome(
        access=access,  # type: ignore[arg-type]
        scopes=t.get("scopes", _some(_offered_scope(offered)), None),
        access_token_ttl=t.get("access_token_ttl", as_seconds, None),
        id_token_ttl=t.get("id_token_ttl", as_seconds, None),
        refresh_idle_ttl=idle,
        refresh_max_ttl=longest,
    )


def _refresh_times(node: Node) -> tuple[int | None, int | None]:
    f = node.fields(optional=("idle_ttl", "max_ttl"))
    idle = f.get("idle_ttl", as_seconds, None)
    longest = f.get("max_ttl", as_seconds, None)
    if idle is not None and longest is not None and idle > longest:
        f.node_at("idle_ttl").error(f"must not exceed max_ttl ({longest}s)")
    return idle, longest


def _some(convert: Callable[[Node], str]) -> Callable[[Node], frozenset[str]]:
    """A non-empty list, as a set: an empty condition would match nothing."""
    read = list_of(convert)

    def some(node: Node) -> frozenset[str]:
        values = read(node)
        if not values and isinstance(node.value, list):
            raise ConfigError(node.path, "must list at least one (leave it out for any)")
        return frozenset(values)

    return some


def _offered_scope(offered: Collection[str]) -> Callable[[Node], str]:
    def read(node: Node) -> str:
        scope = as_str(node)
        if scope not in offered:
            raise ConfigError(node.path, f"scope {scope!r} is not offered by this server")
        return scope

    return read


def as_group(node: Node) -> str:
    name = as_str(node)
    problem = group_problem(name)
    if problem is not None:
        raise ConfigError(node.path, problem)
    return name


def as_policy_name(node: Node) -> str:
    """A policy's or rule's name: what audit lines, metrics and explain show."""
    name = as_str(node)
    if not name or len(name) > 64 or not name.isprintable() or name != name.strip():
        raise ConfigError(node.path, "must be 1-64 printable characters, no outer spaces")
    return name
