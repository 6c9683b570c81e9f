"""Authorize a verified principal against a route's rules. Pure: no I/O, no awaits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.authn import Principal
from gateway.config import ClaimRule
from gateway.errors import Denied, Reason
from gateway.routing import Route
from tokengate.jwk import is_numeric_date

_MISSING = object()


def authorize(principal: Principal, route: Route, now: float) -> None:
    """Raise :class:`Denied` unless ``principal`` satisfies every rule of ``route``.
    Step-up (RFC 9470) comes last: a token another sign-in cannot fix (a scope or a
    claim it lacks) is told so first."""
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
    if require.acr or require.max_age is not None:
        step_up(principal, require.acr, require.max_age, now)


def step_up(principal: Principal, acr: tuple[str, ...], max_age: int | None, now: float) -> None:
    """RFC 9470: 401 ``insufficient_user_authentication`` with the ``acr_values`` and
    ``max_age`` a new sign-in must meet, unless the token's ``acr`` is one of ``acr``
    and its ``auth_time`` is at most ``max_age`` seconds ago (the issuer's leeway
    allowed for clocks). A token without them (a client's own) never meets them."""
    claims = principal.claims
    why = None
    if acr and claims.get("acr") not in acr:
        why = "a stronger sign-in is required (acr)"
    elif max_age is not None:
        auth_time = claims.get("auth_time")
        if not is_numeric_date(auth_time):
            why = "a recent sign-in is required (the token has no auth_time)"
        elif now - auth_time > max_age + principal.issuer.leeway:
            why = "a more recent sign-in is required (max_age)"
    if why is None:
        return
    challenge = []
    if acr:
        challenge.append(("acr_values", " ".join(acr)))
    if max_age is not None:
        challenge.append(("max_age", str(max_age)))
    raise Denied(Reason.INSUFFICIENT_USER_AUTHENTICATION, why, challenge=challenge)


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
