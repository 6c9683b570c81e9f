"""Access policies and rules: every condition and outcome in a table, what
``tokengate explain`` says about each, and the config's checks with their key paths."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from authserver.explain import Check, Person, as_json, explain, render
from authserver.policies import (
    NO_POLICIES,
    NO_POLICY,
    NO_RULE,
    NO_SCOPE_LEFT,
    RULE_DENIES,
    AccessPolicy,
    Lifetimes,
    PolicyRequest,
    Rule,
    RuleConditions,
    RuleOutcome,
    decide,
)
from tokengate.cli import main
from tokengate.config import parse_config
from tokengate.yamlconf import ConfigErrors

SERVER_TIMES = Lifetimes(
    access_token=3600, id_token=3600, refresh_idle=7 * 86400, refresh_max=90 * 86400
)

# The policies of the table below, in YAML as an operator writes them.
POLICIES_YAML = """
- name: machines
  clients: [reporting]
  rules:
    - name: reporting-reads
      if: {grant_types: [client_credentials]}
      then: {scopes: [orders:read], access_token_ttl: 5m}
- name: people
  rules:
    - name: admins-write
      if: {groups: [admins], scopes: [orders:write]}
      then:
        access_token_ttl: 15m
        id_token_ttl: 30m
        refresh_tokens: {idle_ttl: 1d, max_ttl: 7d}
    - name: no-write
      if: {scopes: [orders:write]}
      then: {access: deny}
    - name: browser-readers
      if: {grant_types: [authorization_code, refresh_token], groups: [engineering, support]}
      then: {scopes: [openid, profile, orders:read]}
    - name: password-nothing
      if: {grant_types: [password]}
      then: {scopes: [orders:write]}
"""

CONFIG = f"""
authserver:
  servers:
    - name: default
      audience: api://default
      scopes: [orders:read, orders:write]
      access_policies:
{textwrap.indent(POLICIES_YAML.strip(), " " * 8)}
  clients:
    - client_id: reporting
      secret: {"s" * 40}
      grant_types: [client_credentials]
    - client_id: portal
      secret: {"s" * 40}
      grant_types: [authorization_code, refresh_token, password]
      redirect_uris: [https://portal.example.com/cb]
    - client_id: other
      secret: {"s" * 40}
      grant_types: [client_credentials]
"""


def server() -> Any:
    config = parse_config(CONFIG, {})
    assert config.authserver is not None
    return config.authserver.servers[0]


def policies() -> tuple[AccessPolicy, ...]:
    return server().access_policies  # type: ignore[no-any-return]


READ, WRITE = "orders:read", "orders:write"

# client, grant, scopes, groups (None: no user) ->
#   allowed, reason, policy, rule, granted scopes, access ttl, id ttl, refresh idle, max
TABLE: list[tuple[Any, ...]] = [
    # policy clients: the first policy that names the client
    (
        "reporting",
        "client_credentials",
        (READ, WRITE),
        None,
        True,
        "ok",
        "machines",
        "reporting-reads",
        (READ,),
        300,
        3600,
        604800,
        7776000,
    ),
    # rule grant_types: reporting's only rule is for client_credentials
    (
        "reporting",
        "refresh_token",
        (READ,),
        frozenset(),
        False,
        NO_RULE,
        "machines",
        None,
        (),
        3600,
        3600,
        604800,
        7776000,
    ),
    # a client no policy names falls to the policy without clients
    (
        "other",
        "client_credentials",
        (READ,),
        None,
        False,
        NO_RULE,
        "people",
        None,
        (),
        3600,
        3600,
        604800,
        7776000,
    ),
    # rule groups and scopes both hold: the rule's lifetimes
    (
        "portal",
        "authorization_code",
        ("openid", WRITE),
        frozenset({"admins"}),
        True,
        "ok",
        "people",
        "admins-write",
        ("openid", WRITE),
        900,
        1800,
        86400,
        604800,
    ),
    # groups condition fails (not an admin), the next rule denies
    (
        "portal",
        "authorization_code",
        ("openid", WRITE),
        frozenset({"engineering"}),
        False,
        RULE_DENIES,
        "people",
        "no-write",
        (),
        3600,
        3600,
        604800,
        7776000,
    ),
    # scopes condition: a request without orders:write skips both write rules
    (
        "portal",
        "authorization_code",
        ("openid", "profile", READ, "email"),
        frozenset({"engineering"}),
        True,
        "ok",
        "people",
        "browser-readers",
        ("openid", "profile", READ),
        3600,
        3600,
        604800,
        7776000,
    ),
    # a groups condition never matches a request without a user
    (
        "other",
        "client_credentials",
        (WRITE,),
        None,
        False,
        RULE_DENIES,
        "people",
        "no-write",
        (),
        3600,
        3600,
        604800,
        7776000,
    ),
    # a user in none of the groups of any rule: no rule matches
    (
        "portal",
        "refresh_token",
        (READ,),
        frozenset({"sales"}),
        False,
        NO_RULE,
        "people",
        None,
        (),
        3600,
        3600,
        604800,
        7776000,
    ),
    # the rule's scopes leave none of those asked
    (
        "portal",
        "password",
        (READ,),
        frozenset({"sales"}),
        False,
        NO_SCOPE_LEFT,
        "people",
        "password-nothing",
        (),
        3600,
        3600,
        604800,
        7776000,
    ),
]


@pytest.mark.parametrize("row", TABLE, ids=[f"{r[0]}-{r[1]}-{r[5]}-{r[7]}" for r in TABLE])
def test_every_condition_and_outcome(row: tuple[Any, ...]) -> None:
    client, grant, scopes, groups, allowed, reason, policy, rule, granted, *times = row
    decision = decide(policies(), PolicyRequest(client, grant, scopes, groups), SERVER_TIMES)
    assert (decision.allowed, decision.reason, decision.policy, decision.rule) == (
        allowed,
        reason,
        policy,
        rule,
    )
    assert decision.scopes == granted
    assert decision.dropped == tuple(s for s in scopes if s not in granted)
    lifetimes = decision.lifetimes
    got = [
        lifetimes.access_token,
        lifetimes.id_token,
        lifetimes.refresh_idle,
        lifetimes.refresh_max,
    ]
    assert got == times


def test_no_policy_for_the_client_denies() -> None:
    only = (AccessPolicy("p", ("someone",), (Rule("r", RuleConditions(), RuleOutcome()),)),)
    asked = PolicyRequest("portal", "client_credentials", (READ,))
    decision = decide(only, asked, SERVER_TIMES, trace=True)
    assert (decision.allowed, decision.reason, decision.policy) == (False, NO_POLICY, None)
    assert decision.steps[0].why == "applies to clients someone, not portal"


def test_without_policies_the_request_is_decided_as_before() -> None:
    decision = decide((), PolicyRequest("portal", "password", (READ, WRITE)), SERVER_TIMES)
    assert (decision.allowed, decision.reason, decision.scopes) == (
        True,
        NO_POLICIES,
        (READ, WRITE),
    )
    assert decision.lifetimes == SERVER_TIMES and decision.steps == ()


def test_a_rules_idle_refresh_time_never_exceeds_its_family_time() -> None:
    rule = Rule("short", RuleConditions(), RuleOutcome(refresh_max_ttl=3600))
    decision = decide(
        (AccessPolicy("p", None, (rule,)),), PolicyRequest("c", "password", ()), SERVER_TIMES
    )
    assert (decision.lifetimes.refresh_idle, decision.lifetimes.refresh_max) == (3600, 3600)


def test_each_step_says_why() -> None:
    decision = decide(
        policies(),
        PolicyRequest("portal", "authorization_code", ("openid", WRITE), frozenset({"support"})),
        SERVER_TIMES,
        trace=True,
    )
    assert [(s.kind, s.name, s.matched, s.why) for s in decision.steps] == [
        ("policy", "machines", False, "applies to clients reporting, not portal"),
        ("policy", "people", True, "applies to every client"),
        ("rule", "admins-write", False, "the user is in none of the groups admins"),
        ("rule", "no-write", True, "the request asks for orders:write"),
    ]
    no_user = decide(
        policies(), PolicyRequest("other", "client_credentials", (READ,)), SERVER_TIMES, trace=True
    )
    # the token endpoints decide the same without the words
    plain = decide(policies(), PolicyRequest("other", "client_credentials", (READ,)), SERVER_TIMES)
    assert plain.steps == () and (plain.reason, plain.policy) == (no_user.reason, no_user.policy)
    assert [s.why for s in no_user.steps[2:]] == [
        "needs a user in admins; this request has no user",
        "the request asks for none of the scopes orders:write",
        "grant type client_credentials is not one of authorization_code, refresh_token",
        "grant type client_credentials is not one of password",
    ]


# --------------------------------------------------------------------------- explain


def explained(
    client: str, grant: str, scopes: tuple[str, ...] | None, person: Person | None
) -> Any:
    config = parse_config(CONFIG, {})
    assert config.authserver is not None
    found = next((c for c in config.authserver.clients if c.client_id == client), None)
    return explain(config.authserver.servers[0], found, client, grant, scopes, person)


ALICE = Person("alice", "u_alice", ("admins", "engineering"))
BOB = Person("bob", "u_bob", ("engineering",))


def test_explain_says_which_rule_decides_and_why_the_others_did_not() -> None:
    text = render(explained("portal", "authorization_code", ("openid", WRITE), BOB))
    assert text == textwrap.dedent(
        """\
        server    default (http://127.0.0.1:9000/oauth2/default)
        client    portal
        user      bob (id u_bob; groups: engineering)
        grant     authorization_code
        scopes    openid orders:write

        client checks
          ok    portal may use server default
          ok    portal may use the authorization_code grant (its grant_types: {GRANTS})
          ok    every scope asked is allowed for portal
          ok    bob is not disabled
          ok    portal is open to every user (no groups)

        sign-on   password (the org's policy): a password (acr_values may ask for a second factor)

        access policies
          skip  policy machines: applies to clients reporting, not portal
          use   policy people: applies to every client
            skip  rule admins-write: the user is in none of the groups admins
            match rule no-write: the request asks for orders:write

        decision  DENY by policy people, rule no-write
        """
    ).replace("{GRANTS}", "authorization_code, password, refresh_token")


def test_explain_says_what_would_be_issued() -> None:
    text = render(explained("portal", "authorization_code", ("openid", WRITE), ALICE))
    assert text.endswith(
        textwrap.dedent(
            """\
            decision  ALLOW by policy people, rule admins-write
            would issue
              access token   scopes openid orders:write; expires in 15m (rule admins-write)
              ID token       expires in 30m (rule admins-write)
              refresh token  idle 1d, family at most 7d (rule admins-write)
            """
        )
    ), text
    readers = render(
        explained("portal", "authorization_code", ("openid", "profile", READ, "email"), BOB)
    )
    assert readers.endswith(
        textwrap.dedent(
            """\
            decision  ALLOW by policy people, rule browser-readers
            would issue
              access token   scopes openid profile orders:read; expires in 1h (server)
              not granted    email (not in rule browser-readers's scopes)
              ID token       expires in 1h (server)
              refresh token  idle 7d, family at most 90d (server)
            """
        )
    ), readers


def test_explain_for_a_machine_client_and_the_default_scopes() -> None:
    result = explained("reporting", "client_credentials", None, None)
    assert result.allowed
    assert as_json(result) == {
        "server": "default",
        "client_id": "reporting",
        "grant_type": "client_credentials",
        "scopes": [READ, WRITE],
        "user": None,
        "checks": [
            {"ok": True, "what": "reporting may use server default"},
            {
                "ok": True,
                "what": "reporting may use the client_credentials grant (its grant_types: "
                "client_credentials)",
            },
            {"ok": True, "what": "no scope asked: the default, orders:read orders:write"},
            {"ok": True, "what": "every scope asked is allowed for reporting"},
        ],
        "sign_on": None,
        "decision": "allow",
        "reason": "ok",
        "policy": "machines",
        "rule": "reporting-reads",
        "steps": [
            {
                "kind": "policy",
                "name": "machines",
                "matched": True,
                "why": "the client is one of its clients",
            },
            {
                "kind": "rule",
                "name": "reporting-reads",
                "matched": True,
                "why": "grant type client_credentials is one of its grant types",
            },
        ],
        "issued": {
            "scopes": [READ],
            "not_granted": [WRITE],
            "access_token_ttl": 300,
            "id_token_ttl": None,
            "refresh_token": None,
        },
    }


@pytest.mark.parametrize(
    ("client", "grant", "scopes", "person", "failed"),
    [
        ("nobody", "client_credentials", None, None, "no client 'nobody' in the config"),
        ("reporting", "password", None, ALICE, "reporting may use the password grant"),
        (
            "portal",
            "authorization_code",
            ("openid", "partners:read"),
            ALICE,
            "scopes partners:read are not allowed for portal",
        ),
        (
            "portal",
            "authorization_code",
            ("openid",),
            None,
            "the authorization_code grant is for a user: give --user",
        ),
        (
            "reporting",
            "client_credentials",
            None,
            ALICE,
            "the client_credentials grant has no user: leave --user out",
        ),
        (
            "portal",
            "authorization_code",
            ("openid",),
            Person("eve", "u", (), disabled=True),
            "eve is not disabled",
        ),
    ],
)
def test_explain_refuses_what_the_client_may_not_do_before_any_policy(
    client: str, grant: str, scopes: Any, person: Any, failed: str
) -> None:
    result = explained(client, grant, scopes, person)
    assert not result.allowed and result.decision is None
    assert failed in [c.what.split(" (")[0] for c in result.checks if not c.ok] or any(
        c.what == failed for c in result.checks if not c.ok
    ), result.checks
    assert render(result).endswith(
        "decision  DENY: refused by the client checks above (before any policy)\n"
    )


def test_the_explain_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = yaml.safe_load(CONFIG)
    data["authserver"]["data_dir"] = str(tmp_path / "data")  # no store yet: config users
    data["authserver"]["users"] = [
        {"username": "Alice", "password_hash": _HASH, "groups": ["admins"]},
    ]
    path = tmp_path / "tokengate.yaml"
    path.write_text(yaml.safe_dump(data))
    base = ["explain", "-c", str(path), "--server", "default", "--client", "portal"]
    assert (
        main(
            [
                *base,
                "--grant",
                "authorization_code",
                "--user",
                "alice",
                "--scope",
                "openid orders:write",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "user      Alice (not in the directory; groups: admins)" in out
    assert "decision  ALLOW by policy people, rule admins-write" in out
    code = main(
        [*base, "--grant", "authorization_code", "--group", "sales", "--scope", WRITE, "--json"]
    )
    assert code == 1
    result = json.loads(capsys.readouterr().out)
    assert (result["decision"], result["rule"], result["user"]["groups"]) == (
        "deny",
        "no-write",
        ["sales"],
    )
    assert main([*base, "--grant", "password", "--user", "nobody"]) == 1
    assert capsys.readouterr().err == "no user 'nobody' in authserver.users (and no store yet)\n"
    assert (
        main(["explain", "-c", str(path), "--server", "x", "--client", "c", "--grant", "password"])
        == 2
    )


_HASH = (
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$"
    "Wx6OjpKkWRSMj9N4JqVnS7YDsRVPsqUJ2ORvqEwKGHQ"
)


# --------------------------------------------------------------------------- config


def problems(policies_yaml: str, clients_extra: str = "") -> list[str]:
    text = CONFIG.replace(
        textwrap.indent(POLICIES_YAML.strip(), " " * 8),
        textwrap.indent(textwrap.dedent(policies_yaml).strip(), " " * 8),
    )
    with pytest.raises(ConfigErrors) as info:
        parse_config(text + clients_extra, {})
    return [str(e) for e in info.value.errors]


@pytest.mark.parametrize(
    ("policies_yaml", "expected"),
    [
        (
            "- name: p\n  clients: [nobody]\n  rules: [{name: r}]",
            "authserver.servers[0].access_policies[0].clients[0]: no client with client_id "
            "'nobody'",
        ),
        (
            "- name: p\n  rules: [{name: r, if: {grant_types: [device_code]}}]",
            "authserver.servers[0].access_policies[0].rules[0].if.grant_types[0]: must be one of "
            "client_credentials, authorization_code, refresh_token, password, implicit; "
            "got 'device_code'",
        ),
        (
            "- name: p\n  rules: [{name: r, if: {scopes: [partners:read]}}]",
            "authserver.servers[0].access_policies[0].rules[0].if.scopes[0]: scope "
            "'partners:read' is not offered by this server",
        ),
        (
            "- name: p\n  rules: [{name: r, then: {scopes: [nope]}}]",
            "authserver.servers[0].access_policies[0].rules[0].then.scopes[0]: scope 'nope' "
            "is not offered by this server",
        ),
        (
            "- name: p\n  rules: [{name: r, if: {groups: []}}]",
            "authserver.servers[0].access_policies[0].rules[0].if.groups: must list at least "
            "one (leave it out for any)",
        ),
        (
            "- name: p\n  rules: [{name: r, then: {access: deny, access_token_ttl: 5m}}]",
            "authserver.servers[0].access_policies[0].rules[0].then.access_token_ttl: a rule "
            "that denies grants nothing; remove it",
        ),
        (
            "- name: p\n  rules: [{name: r, then: {access: maybe}}]",
            "authserver.servers[0].access_policies[0].rules[0].then.access: must be one of "
            "allow, deny; got 'maybe'",
        ),
        (
            "- name: p\n  rules: [{name: r, then: {refresh_tokens: {idle_ttl: 2d, max_ttl: 1d}}}]",
            "authserver.servers[0].access_policies[0].rules[0].then.refresh_tokens.idle_ttl: "
            "must not exceed max_ttl (86400s)",
        ),
        (
            "- name: p\n  rules: [{name: r}, {name: r}]",
            "authserver.servers[0].access_policies[0].rules[1].name: duplicate rule name 'r'",
        ),
        (
            "- {name: p, rules: [{name: r}]}\n- {name: p, rules: [{name: r}]}",
            "authserver.servers[0].access_policies[1].name: duplicate policy name 'p'",
        ),
        (
            "- name: p\n  rules: []",
            "authserver.servers[0].access_policies[0].rules: must list at least one rule",
        ),
        (
            "- name: p\n  rules: [{name: r, when: {}}]",
            "authserver.servers[0].access_policies[0].rules[0].when: unknown key (did you mean "
            "'then'?)",
        ),
        (
            "- name: p\n  rules: [{name: r, then: {access_token_ttl: 0}}]",
            "authserver.servers[0].access_policies[0].rules[0].then.access_token_ttl: must be a "
            "duration > 0, got 0",
        ),
    ],
)
def test_policy_config_errors_name_the_key_path(policies_yaml: str, expected: str) -> None:
    assert expected in problems(policies_yaml)


def test_a_policy_client_must_use_the_server() -> None:
    text = CONFIG.replace(
        "    - client_id: other\n", "    - client_id: other\n      servers: [partners]\n"
    )
    text = text.replace(
        "  clients:\n", "    - {name: partners, audience: api://partners}\n  clients:\n", 1
    ).replace("clients: [reporting]", "clients: [reporting, other]")
    with pytest.raises(ConfigErrors) as info:
        parse_config(text, {})
    assert [str(e) for e in info.value.errors] == [
        "authserver.servers[0].access_policies[0].clients[1]: client 'other' does not use "
        "server 'default'"
    ]


def test_explain_says_how_the_user_signs_in() -> None:
    from dataclasses import replace

    from authserver.signon import SignOnPolicy

    config = parse_config(CONFIG, {})
    assert config.authserver is not None
    server = config.authserver.servers[0]
    portal = next(c for c in config.authserver.clients if c.client_id == "portal")
    org = SignOnPolicy("password", frozenset({"admins"}), mfa_new_device=True)
    asked = ("openid", READ)
    admin = explain(server, portal, "portal", "authorization_code", asked, ALICE, org)
    assert admin.sign_on == (
        "password (the org's policy): a password and a second factor (in one of admins)"
    )
    other = explain(server, portal, "portal", "authorization_code", asked, BOB, org)
    assert other.sign_on == (
        "password (the org's policy): a password; a second factor too on a browser not remembered"
    )
    strict = replace(portal, sign_on=SignOnPolicy("password+mfa"))
    always = explain(server, strict, "portal", "authorization_code", asked, BOB)
    assert always.sign_on == (
        "password+mfa (portal's own policy): a password and a second factor (always)"
    )
    # the password grant cannot give a second factor: refused before any policy
    refused = explain(server, strict, "portal", "password", asked, BOB)
    assert not refused.allowed and refused.decision is None
    assert refused.checks[-1] == Check(
        False,
        "the sign-on policy (portal's own) asks bob for a second factor, which the "
        "password grant cannot give",
    )
    fine = explain(server, portal, "portal", "password", ("openid",), BOB)
    assert fine.checks[-1] == Check(
        True, "the sign-on policy (the org's) asks bob for a password only"
    )
    assert fine.sign_on is None  # no page: nothing more to say
    passwordless = replace(portal, sign_on=SignOnPolicy("passwordless"))
    keyed = explain(server, passwordless, "portal", "authorization_code", asked, BOB)
    assert keyed.sign_on == (
        "passwordless (portal's own policy): a passkey that verifies its user (PIN or "
        "biometric), no password; without one yet, the password and any second factor "
        "the user has, then a new passkey"
    )
    no_grant = explain(server, passwordless, "portal", "password", asked, BOB)
    assert no_grant.checks[-1] == Check(
        False,
        "the sign-on policy (portal's own) asks bob for a passkey, which the password "
        "grant cannot give",
    )


@pytest.mark.parametrize("row", TABLE, ids=[f"{r[0]}-{r[1]}-{r[5]}-{r[7]}" for r in TABLE])
def test_explain_reports_the_decision_the_server_makes(row: tuple[Any, ...]) -> None:
    """Every row of the table, through explain: where the client may make the request
    at all, explain names the same policy, rule, outcome and scopes as the server."""
    client, grant, scopes, groups, allowed, reason, policy, rule, granted, *_ = row
    person = None if groups is None else Person("u", "u_1", tuple(sorted(groups)))
    result = explained(client, grant, scopes, person)
    if result.decision is None:  # refused by the client's own limits first
        assert not result.allowed and not all(c.ok for c in result.checks)
        return
    d = result.decision
    assert (d.allowed, d.reason, d.policy, d.rule) == (allowed, reason, policy, rule)
    assert result.allowed is allowed
    if allowed:
        assert result.issued is not None and result.issued.scopes == granted
