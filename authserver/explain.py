"""``tokengate explain``: what an authorization server would decide on a token
request, and why, step by step. Pure: the config and the user in, an
:class:`Explanation` out (as text or JSON).

It takes the same steps as the server, with the same functions: the client's own
limits (its servers, grant types, scopes, group assignment), how the user must sign
in (the sign-on policy: :func:`authserver.signon.required`), then the server's access
policies (:func:`authserver.policies.decide`), then what would be issued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from authserver.authorize import client_scopes, default_user_scopes
from authserver.config import BROWSER_GRANTS, ClientConfig, ServerConfig
from authserver.grants import GRANT_TYPE, allowed_scopes
from authserver.policies import NO_POLICIES, Decision, PolicyRequest, decide
from authserver.signon import DEFAULT_SIGN_ON, SignOnPolicy, required
from authserver.usergrants import REFRESH_GRANT

USER_GRANTS = ("authorization_code", "implicit", "password", "refresh_token")


@dataclass(frozen=True, slots=True)
class Person:
    """The user a request would be for, as explain needs it."""

    username: str
    id: str | None  # None: a user made up from --group (not in the directory)
    groups: tuple[str, ...]
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    what: str


@dataclass(frozen=True, slots=True)
class Issued:
    scopes: tuple[str, ...]
    dropped: tuple[str, ...]
    access_token_ttl: int
    id_token_ttl: int | None  # None: no ID token (no openid, or no user)
    refresh: bool
    refresh_idle_ttl: int
    refresh_max_ttl: int
    # where each lifetime comes from ("server", or "rule NAME"): access, ID, refresh
    sources: tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class Explanation:
    server: ServerConfig
    client_id: str
    grant_type: str
    scopes: tuple[str, ...]  # as asked (or the default when none were)
    user: Person | None
    checks: tuple[Check, ...]
    decision: Decision | None  # None: refused by a client check before the policies
    issued: Issued | None  # None: refused
    sign_on: str | None = None  # how the user must sign in (user grants through a page)

    @property
    def allowed(self) -> bool:
        return self.issued is not None


def explain(
    server: ServerConfig,
    client: ClientConfig | None,
    client_id: str,
    grant_type: str,
    scopes: tuple[str, ...] | None,
    user: Person | None,
    sign_on: SignOnPolicy = DEFAULT_SIGN_ON,
) -> Explanation:
    """What ``server`` would do with this request (see the module docstring);
    ``sign_on``: the org's sign-on policy (a client may have its own)."""
    checks: list[Check] = []
    asked = scopes or ()
    how: str | None = None

    def done(decision: Decision | None = None) -> Explanation:
        return Explanation(
            server, client_id, grant_type, asked, user, tuple(checks), decision, None, how
        )

    if client is None:
        checks.append(Check(False, f"no client {client_id!r} in the config"))
        return done()
    checks.append(Check(server.name in client.servers, f"{client_id} may use server {server.name}"))
    checks.append(
        Check(
            grant_type in client.grant_types,
            f"{client_id} may use the {grant_type} grant "
            f"(its grant_types: {', '.join(sorted(client.grant_types))})",
        )
    )
    if grant_type == GRANT_TYPE:
        offered: frozenset[str] = frozenset(allowed_scopes(server, client))
        default = allowed_scopes(server, client)
    else:
        offered = client_scopes(server, client)
        default = default_user_scopes(server, offered)
    asked = scopes if scopes else default
    if not scopes:
        checks.append(Check(True, f"no scope asked: the default, {_words(default) or 'none'}"))
    refused = [s for s in asked if s not in offered]
    checks.append(
        Check(
            not refused,
            f"scopes {', '.join(refused)} are not allowed for {client_id}"
            if refused
            else f"every scope asked is allowed for {client_id}",
        )
    )
    if grant_type == GRANT_TYPE and not asked:
        checks.append(Check(False, f"no scope asked and {client_id} has none"))
    if grant_type in USER_GRANTS:
        if user is None:
            checks.append(Check(False, f"the {grant_type} grant is for a user: give --user"))
        else:
            checks.extend(_user_checks(client, user))
            policy = client.sign_on or sign_on
            whose = f"{client_id}'s own" if client.sign_on else "the org's"
            if grant_type == "password":  # no page, no other factor: refused if needed
                need = required(policy, user.groups, (), known_device=False)
                what = {"mfa": "a second factor", "passkey": "a passkey"}.get(need)
                checks.append(
                    Check(
                        what is None,
                        f"the sign-on policy ({whose}) asks {user.username} for {what}, "
                        "which the password grant cannot give"
                        if what
                        else f"the sign-on policy ({whose}) asks {user.username} for a "
                        "password only",
                    )
                )
            elif grant_type in BROWSER_GRANTS:
                how = _sign_on(policy, whose, user)
    elif user is not None:
        checks.append(Check(False, f"the {grant_type} grant has no user: leave --user out"))
    if not all(c.ok for c in checks):
        return done()
    groups = frozenset(user.groups) if user is not None else None
    decision = decide(
        server.access_policies,
        PolicyRequest(client_id, grant_type, asked, groups),
        server.lifetimes,
        trace=True,
    )
    if not decision.allowed:
        return done(decision)
    times = decision.lifetimes
    refresh = REFRESH_GRANT in client.grant_types and grant_type in USER_GRANTS
    if grant_type == "implicit":
        refresh = False
    if refresh:
        refresh = decide(
            server.access_policies,
            PolicyRequest(client_id, REFRESH_GRANT, decision.scopes, groups),
            server.lifetimes,
        ).allowed
    issued = Issued(
        scopes=decision.scopes,
        dropped=decision.dropped,
        access_token_ttl=times.access_token,
        id_token_ttl=times.id_token if user is not None and "openid" in decision.scopes else None,
        refresh=refresh,
        refresh_idle_ttl=times.refresh_idle,
        refresh_max_ttl=times.refresh_max,
        sources=_sources(server, decision),
    )
    return Explanation(
        server, client_id, grant_type, asked, user, tuple(checks), decision, issued, how
    )


def _sources(server: ServerConfig, decision: Decision) -> tuple[str, str, str]:
    """Which lifetimes the deciding rule sets ("rule NAME"), and which are the server's."""
    rule = next(
        (
            r
            for p in server.access_policies
            if p.name == decision.policy
            for r in p.rules
            if r.name == decision.rule
        ),
        None,
    )
    if rule is None:
        return ("server", "server", "server")
    by, out = f"rule {rule.name}", rule.outcome
    refresh = out.refresh_idle_ttl is not None or out.refresh_max_ttl is not None
    return (
        by if out.access_token_ttl is not None else "server",
        by if out.id_token_ttl is not None else "server",
        by if refresh else "server",
    )


def _sign_on(policy: SignOnPolicy, whose: str, user: Person) -> str:
    """How the user signs in through the hosted pages, by the sign-on policy."""
    head = f"{policy.preset} ({whose} policy): "
    need = required(policy, user.groups, ())
    if need == "passkey":
        return head + (
            "a passkey that verifies its user (PIN or biometric), no password; without "
            "one yet, the password and any second factor the user has, then a new passkey"
        )
    if need == "mfa":
        reason = (
            "always"
            if policy.preset == "password+mfa"
            else "in one of " + ", ".join(sorted(policy.mfa_groups.intersection(user.groups)))
        )
        return head + f"a password and a second factor ({reason})"
    if policy.mfa_new_device:
        return head + "a password; a second factor too on a browser not remembered"
    return head + "a password (acr_values may ask for a second factor)"


def _user_checks(client: ClientConfig, user: Person) -> list[Check]:
    out = [Check(not user.disabled, f"{user.username} is not disabled")]
    if client.groups is None:
        out.append(Check(True, f"{client.client_id} is open to every user (no groups)"))
    else:
        assigned = bool(set(user.groups) & set(client.groups))
        out.append(
            Check(
                assigned,
                f"{user.username} is in one of {client.client_id}'s groups "
                f"({', '.join(sorted(client.groups))})",
            )
        )
    return out


# --------------------------------------------------------------------------- output


def render(e: Explanation) -> str:
    """The explanation for people: what was asked, each step, the outcome."""
    lines = [
        f"server    {e.server.name} ({e.server.issuer})",
        f"client    {e.client_id}",
    ]
    if e.user is not None:
        who = f"id {e.user.id}" if e.user.id is not None else "not in the directory"
        groups = ", ".join(e.user.groups) or "none"
        lines.append(f"user      {e.user.username} ({who}; groups: {groups})")
    lines += [f"grant     {e.grant_type}", f"scopes    {_words(e.scopes) or '(none)'}", ""]
    lines.append("client checks")
    lines += [f"  {'ok  ' if c.ok else 'FAIL'}  {c.what}" for c in e.checks]
    if e.sign_on is not None:
        lines += ["", f"sign-on   {e.sign_on}"]
    if e.decision is not None:
        lines += ["", "access policies"]
        if e.decision.reason == NO_POLICIES:
            lines.append("  none: the client's own scopes and the server's lifetimes apply")
        for step in e.decision.steps:
            indent = "  " if step.kind == "policy" else "    "
            mark = ("use  " if step.kind == "policy" else "match") if step.matched else "skip "
            lines.append(f"{indent}{mark} {step.kind} {step.name}: {step.why}")
        if e.decision.reason == "no_matching_policy":
            lines.append("  no policy applies to this client")
        elif e.decision.reason == "no_matching_rule":
            lines.append(f"    no rule of policy {e.decision.policy} matches")
    lines.append("")
    lines.append(f"decision  {_verdict(e)}")
    if e.issued is not None:
        lines += _issued_lines(e.issued, e.decision)
    return "\n".join(lines) + "\n"


def _verdict(e: Explanation) -> str:
    d = e.decision
    if d is None:
        return "DENY: refused by the client checks above (before any policy)"
    by = f"policy {d.policy}, rule {d.rule}" if d.rule is not None else None
    if d.allowed:
        return f"ALLOW by {by}" if by else "ALLOW (no access policies)"
    reasons = {
        "no_matching_policy": "DENY: no access policy applies to the client",
        "no_matching_rule": f"DENY: no rule of policy {d.policy} matches",
        "rule_denies": f"DENY by {by}",
        "no_scope_granted": f"DENY: {by} grants none of the scopes asked",
    }
    return reasons.get(d.reason, f"DENY ({d.reason})")


def _issued_lines(issued: Issued, decision: Decision | None) -> list[str]:
    out = [
        "would issue",
        f"  access token   scopes {_words(issued.scopes) or '(none)'}; "
        f"expires in {_duration(issued.access_token_ttl)} ({issued.sources[0]})",
    ]
    if issued.dropped:
        rule = decision.rule if decision is not None else None
        out.append(f"  not granted    {_words(issued.dropped)} (not in rule {rule}'s scopes)")
    if issued.id_token_ttl is not None:
        out.append(
            f"  ID token       expires in {_duration(issued.id_token_ttl)} ({issued.sources[1]})"
        )
    if issued.refresh:
        out.append(
            f"  refresh token  idle {_duration(issued.refresh_idle_ttl)}, family at most "
            f"{_duration(issued.refresh_max_ttl)} ({issued.sources[2]})"
        )
    else:
        out.append("  refresh token  none")
    return out


def as_json(e: Explanation) -> dict[str, Any]:
    d = e.decision
    return {
        "server": e.server.name,
        "client_id": e.client_id,
        "grant_type": e.grant_type,
        "scopes": list(e.scopes),
        "user": None
        if e.user is None
        else {"username": e.user.username, "id": e.user.id, "groups": list(e.user.groups)},
        "checks": [{"ok": c.ok, "what": c.what} for c in e.checks],
        "sign_on": e.sign_on,
        "decision": "allow" if e.allowed else "deny",
        "reason": d.reason if d is not None else "client_checks",
        "policy": d.policy if d is not None else None,
        "rule": d.rule if d is not None else None,
        "steps": []
        if d is None
        else [
            {"kind": s.kind, "name": s.name, "matched": s.matched, "why": s.why} for s in d.steps
        ],
        "issued": None
        if e.issued is None
        else {
            "scopes": list(e.issued.scopes),
            "not_granted": list(e.issued.dropped),
            "access_token_ttl": e.issued.access_token_ttl,
            "id_token_ttl": e.issued.id_token_ttl,
            "refresh_token": {
                "idle_ttl": e.issued.refresh_idle_ttl,
                "max_ttl": e.issued.refresh_max_ttl,
            }
            if e.issued.refresh
            else None,
        },
    }


def _words(scopes: tuple[str, ...]) -> str:
    return " ".join(scopes)


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
