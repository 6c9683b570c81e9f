"""The config file's JSON Schema (`tokengate schema`) against the parsers: the example
configs validate, and the schema names exactly the keys the parsers accept, in their
places, with the parsers' defaults."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import base_config, ec_client_key
from tests.e2e.conftest import e2e_config
from tokengate.config import parse_config
from tokengate.schema import config_schema
from tokengate.yamlconf import Listen, Node, parse_duration

ROOT = Path(__file__).resolve().parents[2]
ALICE_HASH = (
    "$argon2id$v=19$m=19456,t=2,p=1$YWFjuR9mCgrTb4NZzYeWwQ$"
    "yoLuHOkVfCCKT7jNIjldbTIinPq5aJhE4prBHu52c7I"
)
ENVIRON = {"TOKENGATE_PUBLIC_URL": "http://localhost:9000", "PORT": "8080"}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return config_schema()


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(validator: jsonschema.Draft202012Validator, data: Any) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)
    ]


def test_the_schema_is_draft_2020_12(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert config_schema() == schema and config_schema() is not schema  # a fresh copy


@pytest.mark.parametrize("name", ["tokengate.yaml", "container.yaml"])
def test_every_example_config_validates(
    validator: jsonschema.Draft202012Validator, name: str
) -> None:
    text = (ROOT / "config" / name).read_text()
    parse_config(text, ENVIRON)  # the parser accepts it...
    assert errors(validator, yaml.safe_load(text)) == []  # ...and so does the schema


def test_the_helm_charts_config_validates(validator: jsonschema.Draft202012Validator) -> None:
    config = yaml.safe_load((ROOT / "charts/tokengate/values.yaml").read_text())["config"]
    parse_config(yaml.safe_dump(config), ENVIRON)
    assert errors(validator, config) == []


def test_the_test_suites_configs_validate(
    validator: jsonschema.Draft202012Validator, tmp_path: Path
) -> None:
    assert errors(validator, base_config(tmp_path, ec_client_key()[1])) == []
    assert errors(validator, e2e_config(tmp_path, 9000, jwks_max_age="1s")) == []


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda c: c["authserver"].update(listen="localhost"), "authserver.listen"),
        (lambda c: c["authserver"].update(lisen="127.0.0.1:1"), ""),
        (lambda c: c["authserver"]["servers"][0].update(signing_alg="HS256"), "signing_alg"),
        (lambda c: c["authserver"]["servers"][0].update(access_token_ttl="1 hour"), "ttl"),
        (lambda c: c["authserver"]["servers"][0].update(access_token_ttl=0), "ttl"),
        (lambda c: c["authserver"]["clients"][0].update(secret="short"), "secret"),
        (lambda c: c["authserver"]["clients"][0].update(claims={"sub": "x"}), "claims"),
        (lambda c: c["authserver"]["clients"][0].update(secret_hash="sha256:" + "0" * 64), ""),
        (lambda c: c["authserver"].update(max_body_bytes=True), "max_body_bytes"),
        (lambda c: c["authserver"].update(users=[{"username": "a", "password": "plain-pw"}]), ""),
        (lambda c: c["authserver"].update(users=[{"username": "a"}]), ""),
        (
            lambda c: c["authserver"].update(
                users=[{"username": "a", "password_hash": "$argon2i$v=19$m=1,t=1,p=1$a$b"}]
            ),
            "",
        ),
        (
            lambda c: c["authserver"].update(
                users=[{"username": "a", "password": "${P}", "profile": {"sub": "x"}}]
            ),
            "",
        ),
        (
            lambda c: c["authserver"]["servers"][0].update(
                access_policies=[{"name": "p", "rules": [{"name": "r", "then": {"access": "ok"}}]}]
            ),
            "access",
        ),
        (lambda c: c.update(version=2), "version"),
        (lambda c: c.pop("authserver"), ""),
    ],
)
def test_the_schema_refuses_what_the_parser_refuses(
    validator: jsonschema.Draft202012Validator, tmp_path: Path, change: Any, where: str
) -> None:
    config = base_config(tmp_path)
    change(config)
    assert errors(validator, config), config
    with pytest.raises(ValueError):
        parse_config(yaml.safe_dump(config), {})


def test_env_references_stand_for_any_value(validator: jsonschema.Draft202012Validator) -> None:
    config = {
        "authserver": {
            "listen": "${LISTEN}",
            "public_url": "${TOKENGATE_PUBLIC_URL}",
            "max_body_bytes": "${BODY}",
            "servers": [{"name": "${NAME}", "audience": "api://x", "signing_alg": "${ALG}"}],
            "clients": [{"client_id": "c", "secret": "${SECRET}"}],
            "limits": {"header_timeout": "${TIMEOUT}"},
            "users": [{"username": "${USER}", "password": "${PASSWORD}"}],
        }
    }
    assert errors(validator, config) == []
    environ = {
        "LISTEN": "127.0.0.1:9000",
        "TOKENGATE_PUBLIC_URL": "http://x",
        "BODY": "100",
        "NAME": "default",
        "ALG": "ES256",
        "SECRET": "s" * 32,
        "TIMEOUT": "5s",
        "USER": "alice",
        "PASSWORD": "alice-password",
    }
    parse_config(yaml.safe_dump(config), environ)


# --------------------------------------------------------------------------- agreement


def full_config(tmp_path: Path) -> dict[str, Any]:
    """A valid config with every mapping the parsers read, and nearly every key."""
    limits = {
        "max_header_bytes": 16384,
        "header_timeout": "5s",
        "body_idle_timeout": 20,
        "max_connections": 100,
        "send_timeout": "1m",
    }
    return {
        "version": 1,
        "authserver": {
            "listen": "127.0.0.1:9000",
            "public_url": "https://auth.example.com",
            "data_dir": str(tmp_path),
            "jwks_max_age": "5m",
            "leeway": "30s",
            "max_body_bytes": 65536,
            "limits": limits,
            "rate_limits": {"token": {"per_client": "600/min", "burst": 100}},
            "rotation": {"every": "90d"},
            "store": "postgresql://tokengate@db:5432/tokengate",
            "key_encryption_key": "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=",
            "client_auth_throttle": {
                "failures": 5,
                "ip_failures": 0,
                "max_lock": "5m",
                "reset_after": "15m",
            },
            "servers": [
                {
                    "name": "default",
                    "audience": "api://default",
                    "signing_alg": "ES256",
                    "access_token_ttl": "1h",
                    "id_token_ttl": "30m",
                    "scopes": ["orders:read", "orders:write"],
                    "refresh_tokens": {"idle_ttl": "1d", "max_ttl": "30d"},
                    "user_claims": [
                        {"name": "groups", "from": "groups", "scope": "profile"},
                        {"name": "dept", "from": "profile.department", "into": ["access_token"]},
                    ],
                    "access_policies": [
                        {
                            "name": "people",
                            "clients": ["portal"],
                            "rules": [
                                {
                                    "name": "admins",
                                    "if": {
                                        "grant_types": ["authorization_code"],
                                        "groups": ["admins"],
                                        "scopes": ["orders:write"],
                                    },
                                    "then": {
                                        "access": "allow",
                                        "scopes": ["openid", "orders:write"],
                                        "access_token_ttl": "15m",
                                        "id_token_ttl": "30m",
                                        "refresh_tokens": {"idle_ttl": "1d", "max_ttl": "7d"},
                                    },
                                },
                                {"name": "others", "then": {"access": "deny"}},
                            ],
                        }
                    ],
                }
            ],
            "sessions": {"idle_timeout": "2h", "max_lifetime": "1d"},
            "sign_on": {"policy": "password", "mfa_if": {"groups": ["admins"], "new_device": True}},
            "sign_in": {
                "brand": {
                    "name": "Acme",
                    "logo_url": "https://cdn.example.com/logo.svg",
                    "color": "#1f6feb",
                },
                "templates_dir": "templates",
            },
            "clients": [
                {
                    "client_id": "reporting",
                    "secret": "r" * 40,
                    "auth_method": "client_secret_post",
                    "grant_types": ["client_credentials"],
                    "scopes": ["orders:read"],
                    "servers": ["default"],
                    "claims": {"tenant": "acme", "groups": ["ops"]},
                    "introspect": "any",
                },
                {"client_id": "hashed", "secret_hash": "sha256:" + "a" * 64},
                {
                    "client_id": "billing",
                    "auth_method": "private_key_jwt",
                    "jwks": {"keys": [ec_client_key()[1]]},
                },
                {"client_id": "fetched", "jwks_uri": "https://billing.example.com/jwks.json"},
                {
                    "client_id": "portal",
                    "secret": "p" * 40,
                    "grant_types": ["authorization_code", "refresh_token"],
                    "redirect_uris": ["https://portal.example.com/callback"],
                    "post_logout_redirect_uris": ["https://portal.example.com/"],
                    "groups": ["engineering"],
                    "consent": "required",
                    "sign_on": {"policy": "password", "mfa_if": {"groups": ["payroll"]}},
                    "require_pkce": False,
                    "scopes": ["openid", "profile", "email", "offline_access", "orders:read"],
                },
                {
                    "client_id": "spa",
                    "auth_method": "none",
                    "redirect_uris": ["http://127.0.0.1/callback", "http://[::1]:8080/cb"],
                    "allowed_origins": ["https://spa.example.com", "http://localhost:5173"],
                },
            ],
            "users": [
                {
                    "username": "alice",
                    "password_hash": ALICE_HASH,
                    "profile": {
                        "name": "Alice Doe",
                        "email": "alice@example.com",
                        "email_verified": True,
                        "address": {"country": "FR"},
                        "department": "R&D",
                    },
                    "groups": ["engineering", "admins"],
                    "disabled": False,
                },
            ],
        },
        "gateway": {
            "listen": "127.0.0.1:8080",
            "max_token_bytes": 8192,
            "allow_path_parameters": False,
            "token_cache_size": 10000,
            "strip_headers": ["X-Tenant-Override"],
            "limits": limits,
            "issuers": [
                {
                    "issuer": "https://auth.example.com/oauth2/default",
                    "audiences": ["api://default"],
                    "jwks_uri": "https://auth.example.com/oauth2/default/v1/keys",
                    "algorithms": ["ES256", "RS256"],
                    "leeway": "30s",
                    "allow_jwt_typ": True,
                    "jwks_cache_min": "30s",
                    "jwks_cache_max": "1h",
                    "jwks_cache_default": "5m",
                    "jwks_max_stale": "1d",
                    "revocations": {
                        "client_id": "gateway",
                        "secret": "gateway-secret-0123456789abcdefghijklmnop",
                        "auth_method": "client_secret_post",
                        "endpoint": "https://auth.example.com/oauth2/default/v1/revocations",
                        "degraded_after": "2m",
                    },
                }
            ],
            "routes": [
                {
                    "name": "orders",
                    "match": {"path": "/orders/**", "methods": ["GET"], "host": "*.example.com"},
                    "upstream": "http://orders:7000/base",
                    "strip_prefix": "/orders",
                    "timeout": "10s",
                    "public": False,
                    "forward_token": True,
                    "rate_limit": {"per": "client_id", "limit": "100/s", "burst": 200},
                    "require": {
                        "issuer": "https://auth.example.com/oauth2/default",
                        "audience": "api://orders",
                        "scopes": ["orders:read"],
                        "any_scopes": ["a", "b"],
                        "claims": {
                            "tenant": "acme",
                            "region": ["eu", "us"],
                            "groups": {"contains": "admins"},
                            "email": {"matches": ".*@acme\\.com$"},
                            "banned": {"exists": False},
                        },
                    },
                },
                {"name": "health", "match": {"path": "/health"}, "upstream": "http://h"},
            ],
        },
        "admin": {"listen": "127.0.0.1:9100", "limits": {"max_connections": 10}},
        "echo": {"listen": "127.0.0.1:7000"},
        "portal": {
            "listen": "127.0.0.1:7100",
            "issuer": "https://auth.example.com/oauth2/default",
            "client_id": "portal",
            "client_secret": "p" * 40,
            "api_url": "https://api.example.com/orders/42",
            "sensitive_api_url": "https://api.example.com/orders/42/refunds",
            "public_url": "https://portal.example.com",
            "scopes": ["openid", "profile", "orders:read"],
        },
        "audit": {"path": "-", "required": True},
        "redis": "redis://127.0.0.1:6379/0",
    }


def accepted_keys(text: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[set, set]]:
    """Where the parsers read a closed mapping (``Node.fields``), and the keys they take
    there: path (list indexes as ``[]``) -> (required, optional)."""
    seen: dict[str, tuple[set, set]] = {}
    fields = Node.fields

    def recording(self: Node, required: Any = (), optional: Any = ()) -> Any:
        required, optional = tuple(required), tuple(optional)
        needed, allowed = seen.setdefault(re.sub(r"\[\d+\]", "[]", self.path), (set(), set()))
        needed.update(required)
        allowed.update(optional)
        return fields(self, required, optional)

    monkeypatch.setattr(Node, "fields", recording)
    parse_config(text, {})
    monkeypatch.undo()
    return seen


def schema_mappings(schema: dict[str, Any]) -> dict[str, tuple[set, set]]:
    """Where the schema closes a mapping (``additionalProperties: false``), and its keys
    there: path -> (required, properties)."""
    defs = schema["$defs"]
    out: dict[str, tuple[set, set]] = {}

    def walk(node: dict[str, Any], path: str) -> None:
        if "$ref" in node:
            walk(defs[node["$ref"].rsplit("/", 1)[1]], path)
        if "properties" in node and node.get("additionalProperties") is False:
            out[path] = (set(node.get("required", ())), set(node["properties"]))
            for key, child in node["properties"].items():
                walk(child, f"{path}.{key}" if path else key)
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
        for alternative in node.get("anyOf", ()):
            walk(alternative, path)

    walk(schema, "")
    return out


def test_the_full_config_is_valid_to_both(
    validator: jsonschema.Draft202012Validator, tmp_path: Path
) -> None:
    config = full_config(tmp_path)
    parse_config(yaml.safe_dump(config), {})
    assert errors(validator, config) == []


def test_the_schema_names_exactly_the_keys_the_parsers_accept(
    schema: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key added to a parser and not to the schema (or the other way) fails here; so
    does a new mapping that the full config above does not reach yet."""
    parsed = accepted_keys(yaml.safe_dump(full_config(tmp_path)), monkeypatch)
    described = schema_mappings(schema)
    assert set(parsed) == set(described), "the full config must reach every mapping"
    for path, (required, optional) in parsed.items():
        schema_required, properties = described[path]
        key = lambda k, p=path: f"{p}.{k}" if p else k  # noqa: E731
        missing = {key(k) for k in (required | optional) - properties}
        assert not missing, f"keys the parser accepts that the schema lacks: {missing}"
        extra = {key(k) for k in properties - required - optional}
        assert not extra, f"keys in the schema that the parser refuses: {extra}"
        assert schema_required == required, path


def test_a_key_missing_from_the_schema_is_caught(
    schema: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above, shown to fail: the schema without gateway.routes[].timeout."""
    del schema["properties"]["gateway"]["properties"]["routes"]["items"]["properties"]["timeout"]
    parsed = accepted_keys(yaml.safe_dump(full_config(tmp_path)), monkeypatch)
    _, properties = schema_mappings(schema)["gateway.routes[]"]
    assert "timeout" in parsed["gateway.routes[]"][1] - properties


def _comparable(value: Any) -> Any:
    if isinstance(value, Listen):
        return str(value)
    if isinstance(value, Path):
        return value
    if hasattr(value, "networks"):  # trusted_proxies
        return sorted(str(network) for network in value.networks)
    if isinstance(value, tuple | frozenset | list):
        return sorted(value)
    return value


def test_schema_defaults_are_the_parsers(
    schema: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each default the schema states is what the parser takes when the key is left
    out: compared against the parsed dataclasses' fields of the same name."""
    minimal = {
        "authserver": {
            "servers": [{"name": "default", "audience": "api://default"}],
            "clients": [{"client_id": "c", "secret": "s" * 32}],
            "limits": {},
            "client_auth_throttle": {},
            "users": [{"username": "u", "password_hash": ALICE_HASH}],
        },
        "gateway": {
            "issuers": [{"issuer": "http://i", "audiences": ["a"]}],
            "routes": [
                {"name": "r", "match": {"path": "/"}, "upstream": "http://u", "require": {}}
            ],
            "limits": {},
        },
        "admin": {"listen": "127.0.0.1:9100", "limits": {}},
        "portal": {
            "listen": "127.0.0.1:7100",
            "issuer": "http://i",
            "client_id": "portal",
            "client_secret": "s",
            "api_url": "http://api/orders/42",
        },
        "audit": {},
    }
    config = parse_config(yaml.safe_dump(minimal), {})
    assert config.authserver and config.gateway and config.admin and config.portal
    objects = {
        "authserver": config.authserver,
        "authserver.servers[]": config.authserver.servers[0],
        "authserver.clients[]": config.authserver.clients[0],
        "authserver.users[]": config.authserver.users[0],
        "authserver.limits": config.authserver.limits,
        "authserver.client_auth_throttle": config.authserver.client_auth_throttle,
        "gateway": config.gateway,
        "gateway.issuers[]": config.gateway.issuers[0],
        "gateway.routes[]": config.gateway.routes[0],
        "gateway.routes[].require": config.gateway.routes[0].require,
        "gateway.limits": config.gateway.limits,
        "admin.limits": config.admin.limits,
        "portal": config.portal,
        "audit": config.audit,
    }
    compared = 0
    for path, obj in objects.items():
        node: Any = schema
        given: Any = minimal
        for part in re.findall(r"[^.\[\]]+|\[\]", path):
            node = node["items"] if part == "[]" else node["properties"][part]
            given = given[0] if part == "[]" else given[part]
        for key, prop in node["properties"].items():
            if "default" not in prop or key in given or not hasattr(obj, key):
                continue
            default = prop["default"]
            if prop.get("$ref", "").endswith("/duration"):
                default = parse_duration(str(default))
            elif key == "data_dir":
                default = Path(default)
            assert _comparable(getattr(obj, key)) == _comparable(default), f"{path}.{key}"
            compared += 1
    assert compared >= 50, compared
