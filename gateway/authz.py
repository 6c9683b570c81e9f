"""Authorize a verified principal against a route's rules. Pure: no I/O, no awaits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.authn import Principal
from gateway.config import ClaimRule
from gateway.errors import Denied, Reason
from gateway.routing import Route

_MISSING = object()


def authorize(principal: Principal, route: Route) -> None:
    """Raise :class:`Denied` unless ``principal`` satisfies every rule of ``route``."""
    require = route.config.require
    if require.issuer is not None and principal.issuer.issuer != require.issuer:
        raise Denied(Reason.ISSUER_UNKNOWN, "this route does not accept the token's issuer")
    expected = route.audiences or principal.issuer.audiences
    if not any(a in expected for a in principal.audiences):
        raise Denied(Reason.AUDIENCE_MISMATCH, "the token is not meant for this API (aud)")
    if require.scopes and not principal.scopes.issuperset(require.scopes):
        raise Denied(
            Reason.INSUFFICIENT_SCOPE,
            "the token lacks a required scope",
            scope=" ".join(require.scopes),
        )
    if require.any_scopes and principal.scopes.isdisjoint(require.any_scopes):
        raise Denied(
            Reason.INSUFFICIENT_SCOPE,
            "the token has none of the accepted scopes",
            scope=" ".join(require.any_scopes),
        )
    for rule in require.claims:
        if not claim_satisfies(principal.claims, rule):
            raise Denied(Reason.CLAIMS_MISMATCH, "the token's claims do not satisfy this route")


def claim_value(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by exact name, else by dotted path (``realm_access.roles``)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def claim_satisfies(claims: Mapping[str, Any], rule: ClaimRule) -> bool:
    value = claim_value(claims, rule.claim)
    if rule.op == "exists":
        return (value is not _MISSING) is rule.value
    if value is _MISSING:
        return False
    if rule.op == "equals":
        return _same(value, rule.value)
    if rule.op == "any_of":
        return any(_same(value, v) for v in rule.value)
    if rule.op == "contains":
        return isinstance(value, list) and any(_same(v, rule.value) for v in value)
    # matches: a full match on a string claim
    return isinstance(value, str) and rule.value.fullmatch(value) is not None


def _same(a: Any, b: Any) -> bool:
    """Equal, without True == 1 or "1" == 1 surprises."""
    return (type(a) is type(b) and a == b) or (
        isinstance(a, int | float)
        and isinstance(b, int | float)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
        and a == b
    )
