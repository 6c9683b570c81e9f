"""Config loading: typed values, and every problem named by its key path."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokengate.config import parse_config
from tokengate.yamlconf import ConfigErrors, parse_duration

SECRET = "0123456789abcdef0123456789abcdef-x"

VALID = f"""
authserver:
  listen: 127.0.0.1:9000
  public_url: https://auth.example.com/
  servers:
    - name: default
      audience: api://default
      access_token_ttl: 15m
      scopes: [orders:read, orders:write]
  clients:
    - client_id: reporting
      secret: {SECRET}
      scopes: [orders:read]
      claims: {{tenant: acme}}
"""


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        parse_config(text, environ or {})
    return [str(e) for e in info.value.errors]


def test_valid_config_is_typed_and_frozen() -> None:
    config = parse_config(VALID, {})
    assert config.authserver is not None
    server = config.authserver.servers[0]
    assert server.issuer == "https://auth.example.com/oauth2/default"
    assert server.access_token_ttl == 900
    assert server.scopes == ("orders:read", "orders:write")
    assert server.signing_alg == "RS256"
    client = config.authserver.clients[0]
    assert client.auth_methods == {"client_secret_basic", "client_secret_post"}
    assert client.servers == {"default"}
    assert client.secret_matches(SECRET) and not client.secret_matches(SECRET + "x")
    assert SECRET not in repr(client)
    with pytest.raises(AttributeError):
        server.audience = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        client.claims["tenant"] = "other"  # type: ignore[index]
    assert config.audit.path == "-"


def test_env_interpolation() -> None:
    text = VALID.replace(SECRET, "${REPORTING_SECRET}")
    config = parse_config(text, {"REPORTING_SECRET": SECRET})
    assert config.authserver is not None
    assert config.authserver.clients[0].secret_matches(SECRET)
    assert problems(text) == [
        "authserver.clients[0].secret: environment variable REPORTING_SECRET is not set"
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30), ("30s", 30), ("10m", 600), ("1h", 3600), ("7d", 604800), ("1h30m", 5400)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "      access_token_ttl: 15m",
            "      access_token_ttl: soon",
            "authserver.servers[0].access_token_ttl: must be a duration like 30s, 10m, 1h, 7d, "
            "got 'soon'",
        ),
        (
            "      access_token_ttl: 15m",
            "      access_token_tl: 15m",
            "authserver.servers[0].access_token_tl: unknown key (did you mean 'access_token_ttl'?)",
        ),
        (
            f"      secret: {SECRET}",
            "      secret: short",
            "authserver.clients[0].secret: is shorter than 32 characters; "
            "generate one with `tokengate secret`",
        ),
        (
            "      scopes: [orders:read]\n      claims",
            "      scopes: [orders:admin]\n      claims",
            "authserver.clients[0].scopes[0]: scope 'orders:admin' is not offered by any of "
            "the client's servers",
        ),
        (
            "      claims: {tenant: acme}",
            "      claims: {tenant: acme}\n      servers: [default, missing]",
            "authserver.clients[0].servers[1]: no authorization server named 'missing'",
        ),
        (
            "      claims: {tenant: acme}",
            "      claims: {sub: someone}",
            "authserver.clients[0].claims.sub: claim 'sub' is set by the authorization server "
            "and cannot be set",
        ),
        (
            "  public_url: https://auth.example.com/",
            "  public_url: ftp://auth.example.com/",
            "authserver.public_url: scheme must be http or https, got 'ftp://auth.example.com/'",
        ),
        (
            "  listen: 127.0.0.1:9000",
            "  listen: 9000",
            "authserver.listen: must be host:port, got '9000'",
        ),
        (
            "      audience: api://default",
            "      audience: [api://default]",
            "authserver.servers[0].audience: must be a string, got a list",
        ),
        (
            "    - name: default",
            "    - name: default\n      signing_alg: HS256",
            "authserver.servers[0].signing_alg: must be one of RS256, PS256, ES256, EdDSA; "
            "got 'HS256'",
        ),
        (
            "    - name: default",
            "    - name: default\n      name: other",
            "authserver.servers[0].name: duplicate key (again on line 7)",
        ),
        (
            f"      secret: {SECRET}",
            f"      secret: {SECRET}\n      secret_hash: sha256:00",
            "authserver.clients[0]: needs exactly one of secret or secret_hash "
            "(see `tokengate secret`)",
        ),
        (
            f"      secret: {SECRET}",
            "      secret_hash: sha256:00",
            "authserver.clients[0].secret_hash: must be sha256:<64 hex digits>, as printed by "
            "`tokengate secret`",
        ),
    ],
)
def test_problems_name_the_key_path(old: str, new: str, expected: str) -> None:
    assert old in VALID
    assert expected in problems(VALID.replace(old, new))


def test_limits_every_listener_takes() -> None:
    text = VALID.replace(
        "  listen: 127.0.0.1:9000",
        "  listen: 127.0.0.1:9000\n  limits: {max_header_bytes: 16384, header_timeout: 5s,"
        " body_idle_timeout: 1m, max_connections: 100, send_timeout: 2m}",
    )
    text += "admin:\n  listen: 127.0.0.1:9100\n  limits: {max_connections: 10}\n"
    config = parse_config(text, {})
    assert config.authserver is not None and config.admin is not None
    limits = config.authserver.limits
    assert (limits.max_header_bytes, limits.header_timeout) == (16384, 5.0)
    assert (limits.body_idle_timeout, limits.max_connections) == (60.0, 100)
    assert limits.send_timeout == 120.0
    assert config.admin.limits.max_connections == 10
    assert config.admin.limits.max_header_bytes == 64 * 1024  # the defaults
    assert config.admin.limits.header_timeout == 10.0
    assert config.admin.limits.body_idle_timeout == 30.0
    assert config.admin.limits.send_timeout == 60.0


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (
            "{max_header_bytes: 100}",
            "authserver.limits.max_header_bytes: must be at least 1024, got 100",
        ),
        ("{header_timeout: 0}", "authserver.limits.header_timeout: must be a duration > 0, got 0"),
        (
            "{max_connections: -1}",
            "authserver.limits.max_connections: must be an integer > 0, got -1",
        ),
        (
            "{max_conections: 5}",
            "authserver.limits.max_conections: unknown key (did you mean 'max_connections'?)",
        ),
    ],
)
def test_limits_problems_name_the_key_path(limits: str, expected: str) -> None:
    text = VALID.replace(
        "  listen: 127.0.0.1:9000", f"  listen: 127.0.0.1:9000\n  limits: {limits}"
    )
    assert expected in problems(text)


def test_every_problem_is_reported_at_once() -> None:
    text = VALID.replace("15m", "never").replace("api://default", "") + "bogus_section: 1\n"
    assert problems(text) == [
        "bogus_section: unknown key",
        "authserver.servers[0].audience: is required",
        "authserver.servers[0].access_token_ttl: must be a duration like 30s, 10m, 1h, 7d, "
        "got 'never'",
    ]


def test_duplicate_names_and_client_ids() -> None:
    text = VALID + f"    - client_id: reporting\n      secret: {SECRET}\n"
    assert problems(text) == ["authserver.clients[1].client_id: duplicate client_id 'reporting'"]


def test_user_claims_named_twice_or_on_a_scope_not_offered() -> None:
    claims = (
        "      user_claims:\n"
        "        - {name: dept, from: profile.department, scope: profile}\n"
        "        - {name: dept, from: groups, scope: billing:read}\n"
        "        - {name: team, from: profile.team}\n"
    )
    text = VALID.replace(
        "      scopes: [orders:read, orders:write]\n",
        "      scopes: [orders:read, orders:write]\n" + claims,
        1,
    )
    assert problems(text) == [
        "authserver.servers[0].user_claims[1].scope: "
        "scope 'billing:read' is not offered by this server",
        "authserver.servers[0].user_claims[1].name: duplicate user claim 'dept'",
    ]


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (
            "    - client_id: x\n",
            "authserver.clients[1]: needs exactly one of secret or secret_hash "
            "(see `tokengate secret`)",
        ),
        (
            "    - client_id: x\n      auth_method: private_key_jwt\n",
            "authserver.clients[1]: a private_key_jwt client needs exactly one of jwks or jwks_uri",
        ),
        (
            "    - client_id: x\n      jwks: {keys: [{kty: oct, k: abc}]}\n",
            "authserver.clients[1].jwks.keys[0]: must be a public key; never put a private or "
            "symmetric key here",
        ),
        (
            f"    - client_id: x\n      jwks_uri: https://x.test/jwks\n      secret: {SECRET}\n",
            "authserver.clients[1]: a private_key_jwt client has no secret; remove "
            "secret/secret_hash",
        ),
        (
            "    - client_id: x\n      secret: " + SECRET + "\n      grant_types: [device_code]\n",
            "authserver.clients[1].grant_types[0]: must be one of client_credentials, "
            "authorization_code, refresh_token, password, implicit; "
            "got 'device_code'",
        ),
        (
            "    - client_id: x\n      auth_method: none\n      grant_types: [password]\n",
            "authserver.clients[1].grant_types: a public client (auth_method: none) cannot "
            "use password: it cannot keep a user's password from being replayed by anyone "
            "who copies it",
        ),
        (
            "    - client_id: x\n      secret: "
            + SECRET
            + "\n      grant_types: [refresh_token]\n",
            "authserver.clients[1].grant_types: refresh_token needs authorization_code or "
            "password (users' tokens)",
        ),
    ],
)
def test_client_credentials_rules(client: str, expected: str) -> None:
    assert expected in problems(VALID + client)


def test_yaml_syntax_error_names_the_line() -> None:
    assert problems("authserver:\n  servers: [\n") == [
        "line 3: invalid YAML: expected the node content, but found '<stream end>'"
    ]


def test_nothing_to_serve() -> None:
    assert problems("audit: {path: '-'}\n") == [
        "(top level): nothing to serve: add an authserver, gateway, echo or portal section"
    ]


def test_check_command(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID.replace("15m", "never").replace("api://default", ""))
    ok = subprocess.run(
        [sys.executable, "-m", "tokengate", "check", "-c", str(good)],
        capture_output=True,
        text=True,
    )
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, f"{good}: ok\n", "")
    failed = subprocess.run(
        [sys.executable, "-m", "tokengate", "check", "-c", str(bad)],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2
    assert failed.stderr.splitlines() == [
        "authserver.servers[0].audience: is required",
        "authserver.servers[0].access_token_ttl: must be a duration like 30s, 10m, 1h, 7d, "
        "got 'never'",
    ]
    env_default = subprocess.run(
        [sys.executable, "-m", "tokengate", "check"],
        capture_output=True,
        text=True,
        env={"TOKENGATE_CONFIG": str(good), "PATH": "/usr/bin:/bin"},
    )
    assert env_default.returncode == 0


def test_default_config_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    config = parse_config((root / "config/tokengate.yaml").read_text(), {})
    assert config.authserver is not None


def test_secret_command_prints_a_secret_and_its_hash(tmp_path: Path) -> None:
    import hashlib
    import re

    out = subprocess.run(
        [sys.executable, "-m", "tokengate", "secret"], capture_output=True, text=True, check=True
    ).stdout
    secret_line, hash_line = out.splitlines()
    secret = re.fullmatch(r"secret: ([A-Za-z0-9_-]{43})", secret_line).group(1)  # type: ignore[union-attr]
    assert hash_line == f"secret_hash: sha256:{hashlib.sha256(secret.encode()).hexdigest()}"
    pasted = VALID.replace(f"      secret: {SECRET}", f"      {hash_line}")
    config = parse_config(pasted, {})
    assert config.authserver is not None
    assert config.authserver.clients[0].secret_matches(secret)


def test_connection_caps_are_scaled_to_the_open_file_limit() -> None:
    from tokengate.serve import FD_RESERVE, descriptors_needed, fitted_limits

    text = (
        VALID
        + "gateway:\n  routes: [{name: r, match: {path: /r}, upstream: http://u, public: true}]\n"
    )
    text += "admin:\n  listen: 127.0.0.1:9100\n"
    config = parse_config(text, {})
    names = ["authserver", "gateway", "admin", "echo"]
    # a gateway connection holds one to its upstream too
    assert descriptors_needed(config, names) == 4096 + 2 * 4096 + 256 + 1024 + FD_RESERVE
    roomy = fitted_limits(config, names, 1 << 20)
    assert roomy["gateway"].max_connections == 4096 and roomy["admin"].max_connections == 256
    tight = fitted_limits(config, names, 4096 + FD_RESERVE)
    caps = {name: limits.max_connections for name, limits in tight.items()}
    assert caps["authserver"] + 2 * caps["gateway"] + caps["admin"] + caps["echo"] <= 4096
    assert caps["gateway"] == 4096 * 4096 // (4096 * 3 + 256 + 1024)
    assert tight["gateway"].header_timeout == 10.0  # only the caps change


def test_a_reload_that_changes_limits_says_it_needs_a_restart() -> None:
    import asyncio

    from tokengate.serve import applier

    before = parse_config(VALID, {})
    after = parse_config(
        VALID.replace(
            "  listen: 127.0.0.1:9000", "  listen: 127.0.0.1:9000\n  limits: {max_connections: 9}"
        ),
        {},
    )
    restart = asyncio.run(applier(before, {})(after))
    assert restart == ["authserver.limits: changing listener limits needs a restart"]


# --------------------------------------------------------------------------- faults

ROUTE = (
    "gateway:\n  routes:\n    - {name: r, match: {path: /r}, upstream: http://u, public: true}\n"
)
DURATION = "must be a duration like 30s, 10m, 1h, 7d, got"


@pytest.fixture(params=["libyaml", "python"])
def yaml_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both parsers the loader may use: libyaml's (when present) and PyYAML's own."""
    import tokengate.yamlconf

    if request.param == "python":
        monkeypatch.setattr(tokengate.yamlconf, "_FastLoader", None, raising=False)
    elif getattr(tokengate.yamlconf, "_FastLoader", None) is None:
        pytest.skip("PyYAML without libyaml")
    return str(request.param)


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [
        ("abc", f"{DURATION} 'abc'"),
        ("1e400", f"{DURATION} '1e400'"),  # a string to YAML 1.1
        ("1.0e+400", f"{DURATION} inf"),
        (".inf", f"{DURATION} inf"),
        (".nan", f"{DURATION} nan"),
        ("5 minutes", f"{DURATION} '5 minutes'"),
        ("-1", "must be a duration > 0, got -1"),
        ("0", "must be a duration > 0, got 0"),
        ('"30S"', f"{DURATION} '30S'"),
        ("5m30", f"{DURATION} '5m30'"),
        ("9" * 400, "must be a duration of at most 36500d, got " + "9" * 75 + "...99"),
        (
            '"99999999999999999999999999999999999999h"',
            "must be a duration of at most 36500d, got '99999999999999999999999999999999999999h'",
        ),
        ('"36501d"', "must be a duration of at most 36500d, got '36501d'"),
    ],
)
def test_a_route_timeout_that_crashed_check_is_a_path_problem(timeout: str, expected: str) -> None:
    """These raised TypeError or OverflowError: a traceback from `tokengate check`, and
    a hot reload that ended the watcher."""
    text = VALID + ROUTE.replace("public: true", f"public: true, timeout: {timeout}")
    assert problems(text) == [f"gateway.routes[0].timeout: {expected}"]


def test_the_longest_duration_is_a_hundred_years() -> None:
    text = VALID + ROUTE.replace("public: true", "public: true, timeout: 36500d")
    config = parse_config(text.replace("15m", "3153600000"), {})
    assert config.gateway is not None and config.gateway.routes[0].timeout == 36500 * 86400
    assert parse_duration("1s500ms") == 1.5 and parse_duration("250ms") == 0.25


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "  listen: 127.0.0.1:9000",
            "  listen: 127.0.0.1:9000\n  data_dir: ''",
            ("authserver.data_dir: must not be empty"),
        ),
        (
            "  listen: 127.0.0.1:9000",
            "  listen: 127.0.0.1:9000\n  data_dir: [a]",
            ("authserver.data_dir: must be a string, got a list"),
        ),
        (
            "access_token_ttl: 15m",
            "access_token_ttl: 1.0e+309",
            (f"authserver.servers[0].access_token_ttl: {DURATION} inf"),
        ),
        (
            "access_token_ttl: 15m",
            "access_token_ttl: -" + "9" * 400,
            (
                "authserver.servers[0].access_token_ttl: must be a duration > 0, got -"
                + "9" * 74
                + "...99"
            ),
        ),
        (
            "access_token_ttl: 15m",
            "access_token_ttl: " + "9" * 5000,
            ("line 8: invalid YAML: integer is too large (over 4300 digits)"),
        ),
        (
            "access_token_ttl: 15m",
            "access_token_ttl: 1" + ":59" * 3000,
            (  # base 60
                "line 8: invalid YAML: integer is too large (over 4300 digits)"
            ),
        ),
        (
            "access_token_ttl: 15m",
            "access_token_ttl: 2001-02-30",
            ("line 8: invalid YAML: cannot read this value (day is out of range for month)"),
        ),
        (
            "access_token_ttl: 15m",
            "access_token_ttl: !!int abc",
            (
                "line 8: invalid YAML: cannot read this value (invalid literal for int() with "
                "base 10: 'abc')"
            ),
        ),
        (
            "claims: {tenant: acme}",
            "claims: {tenant: " + "[" * 1000 + "]" * 1000 + "}",
            ("line 14: invalid YAML: nested deeper than 100 levels"),
        ),
        (
            "claims: {tenant: acme}",
            "claims: " + "{a: " * 1000 + "1" + "}" * 1000,
            ("line 14: invalid YAML: nested deeper than 100 levels"),
        ),
        (
            "claims: {tenant: acme}",
            "claims: &c {nested: [*c]}",
            ("line 14: invalid YAML: alias *c is inside the node it names (a recursive alias)"),
        ),
        (  # 60 levels, aliased 45 levels down: 111 deep, as the walkers would see it
            "claims: {tenant: acme}",
            "claims: {a: &a "
            + "[" * 60
            + "x"
            + "]" * 60
            + ", b: "
            + "[" * 45
            + "*a"
            + "]" * 45
            + "}",
            "line 14: invalid YAML: nested deeper than 100 levels",
        ),
    ],
)
def test_values_that_crashed_the_parser_name_their_path_or_line(
    yaml_parser: str, old: str, new: str, expected: str
) -> None:
    assert old in VALID
    assert problems(VALID.replace(old, new)) == [expected]


def laughs(levels: int, fanout: int = 10) -> str:
    """ "Billion laughs" in a client's claims: the last anchor expands to fanout**levels."""
    anchors = ["l0: &l0 [" + ", ".join(["lol"] * fanout) + "]"]
    anchors += [
        f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fanout) + "]" for i in range(1, levels + 1)
    ]
    return VALID.replace("claims: {tenant: acme}", "claims: {" + ", ".join(anchors) + "}")


def test_alias_bombs_are_refused_at_once(yaml_parser: str) -> None:
    """10**9 expansions never ended (10**7 took 16 s and 267 MB)."""
    started = time.perf_counter()
    found = problems(laughs(9))
    assert time.perf_counter() - started < 0.5
    assert found == [
        "line 14: invalid YAML: too many alias expansions (over 100000); "
        "YAML anchors may not multiply the document"
    ]


def test_aliases_may_add_up_to_a_hundred_thousand_nodes(yaml_parser: str) -> None:
    # fanout 9: the anchors are 10, 91, 820 and 7,381 nodes; 9 aliases of each add 74,718
    assert problems_or_none(laughs(4, 9)) is None
    # fanout 10: 11, 111, 1,111 and 11,111 nodes; 10 aliases of each would add 123,440
    assert problems(laughs(4, 10)) == [
        "line 14: invalid YAML: too many alias expansions (over 100000); "
        "YAML anchors may not multiply the document"
    ]


def problems_or_none(text: str) -> list[str] | None:
    try:
        parse_config(text, {})
    except ConfigErrors as exc:
        return [str(e) for e in exc.errors]
    return None


def test_anchors_and_merge_keys_still_work(yaml_parser: str) -> None:
    text = VALID + (
        "gateway:\n"
        "  issuers: [{issuer: 'https://idp.example.com', audiences: [api]}]\n"
        "  routes:\n"
        "    - &orders {name: orders, match: {path: /orders/**}, upstream: http://u,\n"
        "               require: &needs {scopes: [orders:read], claims: {tenant: acme}}}\n"
        "    - {<<: *orders, name: items, match: {path: /items/**}}\n"
        "    - {name: other, match: {path: /other}, upstream: http://u, require: *needs}\n"
    )
    config = parse_config(text, {})
    assert config.gateway is not None
    routes = config.gateway.routes
    assert [r.name for r in routes] == ["orders", "items", "other"]
    assert routes[1].upstream == "http://u" and routes[1].path == "/items/**"
    assert routes[2].require == routes[0].require
    twice = text.replace("name: items,", "name: items, name: again,")
    assert problems(twice) == ["gateway.routes[1].name: duplicate key (again on line 20)"]


def test_check_reports_an_audit_path_run_could_not_open(tmp_path: Path) -> None:
    from tokengate.config import load_config

    def audit_problems(audit: str) -> list[str] | None:
        path = tmp_path / "tokengate.yaml"
        path.write_text(VALID + f"audit: {{path: '{audit}'}}\n")
        try:
            load_config(path, {}, check_files=True)
        except ConfigErrors as exc:
            return [str(e) for e in exc.errors]
        return None

    missing = tmp_path / "missing"
    assert audit_problems(str(missing / "audit.log")) == [
        f"audit.path: directory {missing} does not exist"
    ]
    assert audit_problems(str(tmp_path)) == [f"audit.path: {tmp_path} is a directory"]
    assert audit_problems(str(tmp_path / "audit.log")) is None
    assert audit_problems("-") is None
    assert audit_problems(str(missing / "audit.log"))
    # `keys` and a hot reload do not open the audit file: the text is all they check
    assert load_config(tmp_path / "tokengate.yaml", {}).audit.path == str(missing / "audit.log")


def test_check_never_prints_a_traceback(tmp_path: Path) -> None:
    """`tokengate check` on files that made it print one: exit 2, `path: problem` lines."""
    files = {
        "timeout.yaml": VALID + ROUTE.replace("public: true", "public: true, timeout: abc"),
        "data_dir.yaml": VALID.replace("  listen: 127.0.0.1:9000", "  listen: x:1\n  data_dir: ''"),
        "huge.yaml": VALID.replace("15m", "9" * 5000),
        "deep.yaml": VALID.replace("{tenant: acme}", "[" * 1000 + "]" * 1000),
        "recursive.yaml": VALID.replace("{tenant: acme}", "&c {nested: [*c]}"),
        "laughs.yaml": laughs(9),
        "audit.yaml": VALID + f"audit: {{path: {tmp_path}/missing/audit.log}}\n",
    }
    runs = {}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        runs[name] = subprocess.Popen(
            [sys.executable, "-m", "tokengate", "check", "-c", str(tmp_path / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        results = {
            name: (run.communicate(timeout=30), run.returncode) for name, run in runs.items()
        }
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()
    for name, ((out, err), returncode) in results.items():
        assert returncode == 2, (name, out, err)
        assert "Traceback" not in err and out == "", name
        lines = err.splitlines()
        assert lines and all(re.match(r"(line \d+|[a-z_]+[.\[:])", line) for line in lines), err


def test_relative_paths_are_relative_to_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokengate.config import load_config

    etc = tmp_path / "etc"
    etc.mkdir()
    path = etc / "tokengate.yaml"
    path.write_text(VALID.replace("  servers:", "  data_dir: data\n  servers:"))
    path.with_name("audit.yaml").write_text(
        VALID.replace("  servers:", "  data_dir: ../var/data\n  servers:")
        + "audit: {path: logs/audit.log}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for named in (path, Path("../etc/tokengate.yaml")):  # absolute, or relative to the cwd
        config = load_config(named, {})
        assert config.authserver is not None
        assert config.authserver.data_dir == etc / "data"
        assert config.audit.path == "-"  # stdout stays stdout
    config = load_config(etc / "audit.yaml", {})
    assert config.authserver is not None
    assert config.authserver.data_dir == etc / "../var/data"
    assert config.audit.path == str(etc / "logs/audit.log")
    # without a file (tests, a text in hand): relative to the working directory, as before
    text = VALID.replace("  servers:", "  data_dir: data\n  servers:")
    config = parse_config(text + "audit: {path: a.log}\n", {})
    assert config.authserver is not None
    assert (config.authserver.data_dir, config.audit.path) == (Path("data"), "a.log")


def test_absolute_paths_are_kept_and_a_symlinked_directory_is_not_resolved(
    tmp_path: Path,
) -> None:
    from tokengate.config import load_config

    real = tmp_path / "..2026_01_01"  # a Kubernetes ConfigMap volume: files are symlinks
    real.mkdir()
    (real / "tokengate.yaml").write_text(
        VALID.replace("  servers:", f"  data_dir: {tmp_path}/abs\n  servers:")
        + "audit: {path: audit.log}\n"
    )
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / "tokengate.yaml").symlink_to(real / "tokengate.yaml")
    config = load_config(mount / "tokengate.yaml", {})
    assert config.authserver is not None
    assert config.authserver.data_dir == tmp_path / "abs"
    assert config.audit.path == str(mount / "audit.log")  # not the versioned directory


def test_check_finds_an_audit_directory_next_to_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokengate.config import load_config

    (tmp_path / "logs").mkdir()
    path = tmp_path / "tokengate.yaml"
    path.write_text(VALID + "audit: {path: logs/audit.log}\n")
    monkeypatch.chdir("/")
    assert load_config(path, {}, check_files=True).audit.path == str(tmp_path / "logs/audit.log")
    path.write_text(VALID + "audit: {path: missing/audit.log}\n")
    with pytest.raises(ConfigErrors) as refused:
        load_config(path, {}, check_files=True)
    assert [str(e) for e in refused.value.errors] == [
        f"audit.path: directory {tmp_path / 'missing'} does not exist"
    ]


def test_two_invalid_listen_addresses_are_two_problems_not_a_bug() -> None:
    text = VALID.replace("  listen: 127.0.0.1:9000", "  listen: []")
    text += "gateway:\n  listen: []\n  routes: []\n"
    assert problems(text) == [
        "authserver.listen: must be a string, got a list",
        "gateway.listen: must be a string, got a list",
    ]


def test_dot_dot_after_a_symlinked_directory_goes_where_the_kernel_goes(
    tmp_path: Path,
) -> None:
    """link/../cfg/tokengate.yaml is read from the link target's parent: the config's
    relative paths must be found there too, not beside the link."""
    from tokengate.config import load_config

    deep = tmp_path / "deep" / "a"
    (deep / "b").mkdir(parents=True)
    (deep / "cfg").mkdir()
    (deep / "cfg" / "tokengate.yaml").write_text(VALID + "audit: {path: audit.log}\n")
    (tmp_path / "link").symlink_to(deep / "b")
    config = load_config(tmp_path / "link" / ".." / "cfg" / "tokengate.yaml", {})
    assert config.audit.path == str(deep / "cfg" / "audit.log")


def test_check_refuses_a_data_dir_that_is_a_file(tmp_path: Path) -> None:
    from tokengate.config import load_config

    (tmp_path / "data").write_text("not a directory")
    path = tmp_path / "tokengate.yaml"
    path.write_text(VALID.replace("  servers:", "  data_dir: data\n  servers:"))
    with pytest.raises(ConfigErrors) as refused:
        load_config(path, {}, check_files=True)
    assert [str(e) for e in refused.value.errors] == [
        f"authserver.data_dir: {tmp_path / 'data'} is not a directory"
    ]


def test_a_client_cannot_carry_claims_that_name_a_person() -> None:
    """A client's own token never speaks for a user: a gateway would forward its
    preferred_username as X-Auth-Username."""
    text = VALID.replace(
        "claims: {tenant: acme}", "claims: {tenant: acme, preferred_username: alice, amr: [pwd]}"
    )
    assert text != VALID
    assert problems(text) == [
        f"authserver.clients[0].claims.{claim}: claim {claim!r} is set by the authorization "
        "server and cannot be set"
        for claim in ("preferred_username", "amr")
    ]


SIGN_IN_CLIENTS = f"""
    - client_id: portal
      secret: {SECRET}
      grant_types: [authorization_code]
      redirect_uris: [https://portal.example.com/callback]
      scopes: [openid, profile, email, orders:read]
      require_pkce: false
    - client_id: spa
      auth_method: none
      redirect_uris: ["http://127.0.0.1/callback", "http://[::1]/callback"]
  sessions: {{idle_timeout: 30m, max_lifetime: 8h}}
  sign_in:
    brand: {{name: Acme, logo_url: "https://cdn.acme.test/logo.svg", color: "#aa3300"}}
"""


def test_sign_in_clients_sessions_and_brand() -> None:
    config = parse_config(VALID + SIGN_IN_CLIENTS, {}).authserver
    assert config is not None
    portal, spa = config.clients[1], config.clients[2]
    assert portal.grant_types == {"authorization_code"} and not portal.public
    assert portal.redirect_uris == ("https://portal.example.com/callback",)
    assert portal.require_pkce is False
    assert portal.scopes == ("openid", "profile", "email", "orders:read")
    assert spa.public and spa.auth_methods == {"none"} and spa.secret_digest is None
    assert spa.grant_types == {"authorization_code"}  # a public client's default
    assert spa.require_pkce is True
    assert config.clients[0].grant_types == {"client_credentials"}  # unchanged default
    assert config.clients[0].redirect_uris == ()
    assert (config.sessions.idle_timeout, config.sessions.max_lifetime) == (1800, 28800)
    brand = config.sign_in.brand
    assert (brand.name, brand.logo_url, brand.color) == (
        "Acme",
        "https://cdn.acme.test/logo.svg",
        "#aa3300",
    )
    assert config.servers[0].id_token_ttl == 3600
    defaults = parse_config(VALID, {}).authserver
    assert defaults is not None
    assert (defaults.sessions.idle_timeout, defaults.sessions.max_lifetime) == (7200, 86400)
    assert defaults.sign_in.brand.name == "tokengate"


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (
            f"    - client_id: x\n      secret: {SECRET}\n"
            "      grant_types: [authorization_code]\n",
            "authserver.clients[1]: an authorization_code or implicit client needs redirect_uris",
        ),
        (
            f"    - client_id: x\n      secret: {SECRET}\n      redirect_uris: [https://x.test/cb]\n",
            "authserver.clients[1].redirect_uris: is only for clients with grant type "
            "authorization_code",
        ),
        (
            "    - client_id: x\n      auth_method: none\n      redirect_uris: [https://x.test/cb]\n"
            "      require_pkce: false\n",
            "authserver.clients[1].require_pkce: a public client (auth_method: none) must use PKCE",
        ),
        (
            "    - client_id: x\n      auth_method: none\n      redirect_uris: [https://x.test/cb]\n"
            "      grant_types: [client_credentials, authorization_code]\n",
            "authserver.clients[1].grant_types: a public client (auth_method: none) cannot use "
            "client_credentials",
        ),
        (
            f"    - client_id: x\n      auth_method: none\n      secret: {SECRET}\n"
            "      redirect_uris: [https://x.test/cb]\n",
            "authserver.clients[1]: a public client (auth_method: none) has no secret, jwks or "
            "jwks_uri",
        ),
        (
            "    - client_id: x\n      auth_method: none\n"
            "      redirect_uris: [https://x.test/cb, http://x.test/cb]\n",
            "authserver.clients[1].redirect_uris[1]: must use https (http only on 127.0.0.1, "
            "[::1] or localhost)",
        ),
        (
            "    - client_id: x\n      auth_method: none\n"
            "      redirect_uris: ['https://x.test/cb#top']\n",
            "authserver.clients[1].redirect_uris[0]: must not have a fragment",
        ),
        (
            "    - client_id: x\n      auth_method: none\n"
            "      redirect_uris: [https://x.test/cb]\n      scopes: [openid, pager]\n",
            "authserver.clients[1].scopes[1]: scope 'pager' is not offered by any of the "
            "client's servers",
        ),
        (
            "  sessions: {idle_timeout: 2d, max_lifetime: 1d}\n",
            "authserver.sessions.idle_timeout: must not exceed max_lifetime (86400s)",
        ),
        (
            "  sessions: {idle_timeout: 10s}\n",
            "authserver.sessions.idle_timeout: must be at least 1m, got 10s",
        ),
        (
            "  sign_in: {brand: {color: red}}\n",
            "authserver.sign_in.brand.color: must be a #rrggbb colour, got 'red'",
        ),
        (
            "  sign_in: {brand: {logo_url: 'http://x.test/logo.png'}}\n",
            "authserver.sign_in.brand.logo_url: must be an https URL",
        ),
        (
            "  sign_in: {brand: {colour: '#000000'}}\n",
            "authserver.sign_in.brand.colour: unknown key (did you mean 'color'?)",
        ),
    ],
)
def test_sign_in_rules_name_the_key_path(client: str, expected: str) -> None:
    found = problems(VALID + client)
    assert any(p.startswith(expected) for p in found), found
