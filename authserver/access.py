"""Where access policies meet requests: a token or authorization request decided by
its server's policies (:func:`authserver.policies.decide`), the answer when they deny,
and the server as the deciding rule sets it (its token lifetimes)."""

from __future__ import annotations

import dataclasses
from typing import Any

from authserver.authorize import AuthorizeRequest
from authserver.config import RefreshTokenTimes, ServerConfig
from authserver.errors import OAuthError
from authserver.policies import NO_POLICIES, Decision, PolicyRequest, decide
from authserver.users import User
from tokengate.metrics import Metrics

POLICY_DENIED = "policy_denied"  # the audit reason of a request a policy refused
DENIED = "the authorization server's access policy does not allow this request"


def check(
    server: ServerConfig, request: PolicyRequest, event: dict[str, Any], metrics: Metrics
) -> tuple[ServerConfig, Decision]:
    """The decision on ``request``, recorded (:func:`record`); the server with the
    deciding rule's lifetimes. A denial is an :class:`OAuthError` (``access_denied``,
    audit reason ``policy_denied``)."""
    decision = decide(server.access_policies, request, server.lifetimes)
    if decision.reason == NO_POLICIES:
        return server, decision
    record(server, decision, event, metrics)
    if not decision.allowed:
        raise denied(decision)
    return with_lifetimes(server, decision), decision


def record(
    server: ServerConfig, decision: Decision, event: dict[str, Any], metrics: Metrics
) -> None:
    """Count a decision, and name its policy and rule in the audit ``event``."""
    event.update(policy=decision.policy, rule=decision.rule)
    metrics.policy_decisions.labels(
        server.name,
        decision.policy or "",
        decision.rule or "",
        "allow" if decision.allowed else "deny",
    ).inc()


def allows(server: ServerConfig, request: PolicyRequest) -> bool:
    """Whether the policies would allow ``request`` (nothing counted): a refresh token
    is issued only when its first use would be allowed."""
    return decide(server.access_policies, request, server.lifetimes).allowed


def authorize_request(request: AuthorizeRequest, user: User) -> PolicyRequest:
    """An authorization request as a policy sees it: the code flow's or the implicit
    flow's grant type, for the user who signed in."""
    grant_type = "implicit" if request.implicit else "authorization_code"
    return PolicyRequest(
        request.client.client_id, grant_type, request.scopes, frozenset(user.groups)
    )


def refusal(request: AuthorizeRequest, user: User) -> Decision | None:
    """The decision that denies an authorization request, if the policies deny it:
    checked before a code is issued or consent asked, so a refused user learns at once.
    Nothing counted here but denials (by the caller): the tokens are decided (and
    narrowed) where they are issued, on the scopes the request asked for."""
    server = request.server
    if not server.access_policies:
        return None
    decision = decide(server.access_policies, authorize_request(request, user), server.lifetimes)
    return None if decision.allowed else decision


def denied(decision: Decision) -> OAuthError:
    exc = OAuthError("access_denied", DENIED)
    exc.reason = POLICY_DENIED
    exc.detail = decision.reason  # no_matching_policy, no_matching_rule, ...
    return exc


def with_lifetimes(server: ServerConfig, decision: Decision) -> ServerConfig:
    times = decision.lifetimes
    if times == server.lifetimes:
        return server
    return dataclasses.replace(
        server,
        access_token_ttl=times.access_token,
        id_token_ttl=times.id_token,
        refresh_tokens=RefreshTokenTimes(idle_ttl=times.refresh_idle, max_ttl=times.refresh_max),
    )


def declare_series(metrics: Metrics, server: ServerConfig) -> None:
    """Each rule's outcome, and each policy's "no rule matched", at 0 from the start."""
    if not server.access_policies:
        return
    metrics.policy_decisions.labels(server.name, "", "", "deny")
    for policy in server.access_policies:
        metrics.policy_decisions.labels(server.name, policy.name, "", "deny")
        for rule in policy.rules:
            metrics.policy_decisions.labels(
                server.name, policy.name, rule.name, rule.outcome.access
            )
