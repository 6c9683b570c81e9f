"""Access policies and their rules (Okta's "policies and rules"): who may get which
tokens from one authorization server, and for how long. Pure: a request in, a
decision out, with the reason every policy and rule before the deciding one did not
apply (``tokengate explain`` prints it; the token endpoint applies it).

A server without policies decides as before: the client's scopes, the server's
lifetimes. A server with policies takes the first policy whose clients include the
client, then the first of its rules whose conditions all hold: that rule allows (the
scopes asked for, narrowed to the rule's, with its lifetimes) or denies. No policy for
the client, or no rule that matches, denies.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Access = Literal["allow", "deny"]
ACCESS: tuple[Access, ...] = ("allow", "deny")

# Decision.reason: why a request was decided as it was (audit lines and metrics)
ALLOWED = "ok"
NO_POLICIES = "no_policies"  # the server has none: allowed as configured
NO_POLICY = "no_matching_policy"
NO_RULE = "no_matching_rule"
RULE_DENIES = "rule_denies"
NO_SCOPE_LEFT = "no_scope_granted"


@dataclass(frozen=True, slots=True)
class RuleConditions:
    """What a rule applies to; None: anything. All that are set must hold."""

    grant_types: frozenset[str] | None = None
    groups: frozenset[str] | None = None  # a user in at least one (no user: never)
    scopes: frozenset[str] | None = None  # the request asks for at least one


@dataclass(frozen=True, slots=True)
class RuleOutcome:
    """What a matching rule decides. Lifetimes None: the server's own."""

    access: Access = "allow"
    scopes: frozenset[str] | None = None  # granted at most these (None: all asked for)
    access_token_ttl: int | None = None
    id_token_ttl: int | None = None
    refresh_idle_ttl: int | None = None
    refresh_max_ttl: int | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    conditions: RuleConditions
    outcome: RuleOutcome


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    name: str
    clients: tuple[str, ...] | None  # None: every client of the server
    rules: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class Lifetimes:
    """Seconds: the server's own, or a rule's in their place."""

    access_token: int
    id_token: int
    refresh_idle: int
    refresh_max: int


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """What a token request asks, as a policy sees it. ``groups`` None: no user (the
    client acts for itself)."""

    client_id: str
    grant_type: str
    scopes: tuple[str, ...]
    groups: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """One policy or rule looked at: ``matched``, or why not."""

    kind: Literal["policy", "rule"]
    name: str
    matched: bool
    why: str


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # ALLOWED, NO_POLICIES, or why denied
    policy: str | None
    rule: str | None
    scopes: tuple[str, ...]  # granted, in the order asked
    dropped: tuple[str, ...]  # asked for, not granted by the rule
    lifetimes: Lifetimes
    steps: tuple[Step, ...]


def decide(
    policies: tuple[AccessPolicy, ...],
    request: PolicyRequest,
    defaults: Lifetimes,
    *,
    trace: bool = False,
) -> Decision:
    """The decision on ``request`` (see the module docstring). ``trace``: also say, step
    by step, why each policy and rule did or did not apply (``tokengate explain``); the
    token endpoints decide without it, and format no text."""
    if not policies:
        return Decision(True, NO_POLICIES, None, None, request.scopes, (), defaults, ())
    steps: list[Step] = []
    for policy in policies:
        if policy.clients is not None and request.client_id not in policy.clients:
            if trace:
                why = f"applies to clients {_names(policy.clients)}, not {request.client_id}"
                steps.append(Step("policy", policy.name, False, why))
            continue
        if trace:
            steps.append(Step("policy", policy.name, True, _policy_applies(policy)))
        for rule in policy.rules:
            failed = _failed(rule.conditions, request)
            if failed is not None:
                if trace:
                    why = _why_not(failed, rule.conditions, request)
                    steps.append(Step("rule", rule.name, False, why))
                continue
            if trace:
                steps.append(Step("rule", rule.name, True, _match(rule.conditions, request)))
            return _apply(policy, rule, request, defaults, tuple(steps))
        return Decision(
            False, NO_RULE, policy.name, None, (), request.scopes, defaults, tuple(steps)
        )
    return Decision(False, NO_POLICY, None, None, (), request.scopes, defaults, tuple(steps))


def _policy_applies(policy: AccessPolicy) -> str:
    if policy.clients is None:
        return "applies to every client"
    return "the client is one of its clients"


Failed = Literal["grant_types", "no_user", "groups", "scopes"]


def _failed(conditions: RuleConditions, request: PolicyRequest) -> Failed | None:
    """Which of a rule's conditions does not hold for ``request``; None: they all do."""
    if conditions.grant_types is not None and request.grant_type not in conditions.grant_types:
        return "grant_types"
    if conditions.groups is not None:
        if request.groups is None:
            return "no_user"
        if not request.groups & conditions.groups:
            return "groups"
    if conditions.scopes is not None and not conditions.scopes.intersection(request.scopes):
        return "scopes"
    return None


def _why_not(failed: Failed, conditions: RuleConditions, request: PolicyRequest) -> str:
    """:func:`_failed`'s answer in words."""
    if failed == "grant_types":
        assert conditions.grant_types is not None
        return f"grant type {request.grant_type} is not one of {_names(conditions.grant_types)}"
    if failed == "no_user":
        assert conditions.groups is not None
        return f"needs a user in {_names(conditions.groups)}; this request has no user"
    if failed == "groups":
        assert conditions.groups is not None
        return f"the user is in none of the groups {_names(conditions.groups)}"
    assert conditions.scopes is not None
    return f"the request asks for none of the scopes {_names(conditions.scopes)}"


def _match(conditions: RuleConditions, request: PolicyRequest) -> str:
    """What made a rule match (its conditions all hold)."""
    held = []
    if conditions.grant_types is not None:
        held.append(f"grant type {request.grant_type} is one of its grant types")
    if conditions.groups is not None and request.groups is not None:
        held.append(f"the user is in {_names(request.groups & conditions.groups)}")
    if conditions.scopes is not None:
        held.append(
            f"the request asks for {_names(conditions.scopes.intersection(request.scopes))}"
        )
    return "; ".join(held) if held else "it has no conditions: it matches every request"


def _apply(
    policy: AccessPolicy,
    rule: Rule,
    request: PolicyRequest,
    defaults: Lifetimes,
    steps: tuple[Step, ...],
) -> Decision:
    outcome = rule.outcome
    lifetimes = Lifetimes(
        access_token=outcome.access_token_ttl or defaults.access_token,
        id_token=outcome.id_token_ttl or defaults.id_token,
        refresh_idle=outcome.refresh_idle_ttl or defaults.refresh_idle,
        refresh_max=outcome.refresh_max_ttl or defaults.refresh_max,
    )
    if lifetimes.refresh_idle > lifetimes.refresh_max:  # a rule's max under the server's idle
        lifetimes = Lifetimes(
            lifetimes.access_token, lifetimes.id_token, lifetimes.refresh_max, lifetimes.refresh_max
        )
    if outcome.access == "deny":
        return Decision(
            False, RULE_DENIES, policy.name, rule.name, (), request.scopes, lifetimes, steps
        )
    granted = outcome.scopes
    scopes = tuple(s for s in request.scopes if granted is None or s in granted)
    dropped = tuple(s for s in request.scopes if s not in scopes)
    if request.scopes and not scopes:
        return Decision(False, NO_SCOPE_LEFT, policy.name, rule.name, (), dropped, lifetimes, steps)
    return Decision(True, ALLOWED, policy.name, rule.name, scopes, dropped, lifetimes, steps)


def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))
