"""Property: whatever a config file says, reading it ends in a Config or in ConfigErrors
whose every line names a key path (or a YAML line), quickly, and never in any other
exception: ``tokengate check`` never prints a traceback and a hot reload is never
silently lost.

The files mutated are the example configs: values replaced by random YAML (nasty
numbers, nesting, aliases, tags), keys deleted and given twice.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_config import VALID
from tests.unit.test_gateway_units import GATEWAY
from tokengate import yamlconf
from tokengate.config import Config, parse_config
from tokengate.yamlconf import UNEXPECTED, ConfigError, ConfigErrors

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {
    "tokengate.yaml": (ROOT / "config/tokengate.yaml").read_text(),
    "container.yaml": (ROOT / "config/container.yaml").read_text(),
    "test_config.VALID": VALID,
    "test_gateway_units.GATEWAY": GATEWAY,
}
ENVIRON = {"TOKENGATE_PUBLIC_URL": "http://localhost:9000"}
SECONDS_PER_EXAMPLE = 1.0

# A key path (`gateway.routes[0].require.claims.tenant`), a YAML line, or the top level.
# Keys the mutations add use KEY_ALPHABET, so a key never holds `.`, `[`, `]` or `:`.
KEY_PATH = re.compile(r"line \d+|\(top level\)|[^.\[\]:]+(\.[^.\[\]:]+|\[\d+\])*")
KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyz_-0123456789"


@dataclass(frozen=True)
class Raw:
    """YAML text put into the document as it is (`.inf`, `5m30`, `&a [*a]`)."""

    text: str


class Pairs(list[tuple[str, Any]]):
    """A mapping as its key/value pairs, so that a key can be given twice."""


def laughs(levels: int) -> str:
    """A flow sequence whose last item expands to 10**levels strings."""
    items = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    items += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return f"[{', '.join(items)}]"


NASTY = [
    # numbers: infinite, NaN, too big for a float, too long for int(), base 60, hex
    ".inf",
    "-.inf",
    ".nan",
    "1e400",
    "1.0e+400",
    "1e309",
    "-1",
    "0",
    "9" * 400,
    "-" + "9" * 400,
    "9" * 5000,
    "1" + ":59" * 3000,
    "1:30",
    "0x1F",
    "0o17",
    "0b101",
    "1_000",
    # durations that are not
    "abc",
    "5 minutes",
    '"30S"',
    "5m30",
    '"99999999999999999999999999999999999999h"',
    '"' + "9" * 400 + 'ms"',
    '"250ms"',
    '"1h30m"',
    # empties and other types
    "''",
    "~",
    "null",
    "true",
    "[]",
    "{}",
    "[[]]",
    "{a: {b: {c: d}}}",
    "2001-02-30",
    "2001-12-14",
    "2001-12-14t21:59:43.10-99:00",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!omap [{a: 1}, {b: 2}]",
    "!!str 12",
    "!!int abc",
    "!!float x",
    "!!python/object/apply:os.system [true]",
    "!custom x",
    # structure: deep nesting, aliases
    "[" * 1000 + "]" * 1000,
    "{a: " * 1000 + "1" + "}" * 1000,
    "&r {nested: [*r]}",
    "&s [*s]",
    "*undefined",
    laughs(9),
    laughs(3),
    "[&m {a: 1}, {<<: *m, b: 2}]",
    # strings: references, escapes, odd characters
    '"${UNSET_VARIABLE}"',
    '"${TOKENGATE_PUBLIC_URL}"',
    '"$${x}"',
    '"\\0\\x01"',
    '"\\ud800"',
    "'-'",
    '"/dev/null/x"',
    "/",
    "/**",
    "/a/*/b",
    "'*.example.com'",
    "http://[::1",
    "http://host:99999",
    "ftp://x",
    "'" + "a" * 10_000 + "'",
    "'(((((((((('",
    "'" + "(" * 2000 + ")" * 2000 + "'",
    "'a{99999999999}'",
]


def leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in leaves(v)]
    return [value]


# Values from the examples themselves: plausible in the wrong place (a URL as a
# duration, a scope as a listen address).
EXAMPLE_VALUES = sorted(
    {leaf for text in EXAMPLES.values() for leaf in leaves(yaml.safe_load(text))},
    key=repr,
)

scalars = st.one_of(
    st.sampled_from(NASTY).map(Raw),
    st.sampled_from(EXAMPLE_VALUES),
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(st.tuples(st.text(KEY_ALPHABET, min_size=1, max_size=8), inner), max_size=3).map(
            Pairs
        ),
    ),
    max_leaves=6,
)


# --------------------------------------------------------------------------- documents


def tree(value: Any) -> Any:
    """YAML data -> Pairs, lists and scalars that can be mutated in place."""
    if isinstance(value, dict):
        return Pairs((str(k), tree(v)) for k, v in value.items())
    if isinstance(value, list):
        return [tree(v) for v in value]
    return value


def flow(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs):
        return "{" + ", ".join(f"{json.dumps(k)}: {flow(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)  # a JSON string is a YAML double-quoted scalar


def document(pairs: Pairs, indent: int = 0) -> str:
    """Block mappings (their keys in their own lines), everything else in flow style."""
    lines = []
    for key, value in pairs:
        if isinstance(value, Pairs) and value:
            lines.append(f"{' ' * indent}{json.dumps(key)}:")
            lines.append(document(value, indent + 2))
        else:
            lines.append(f"{' ' * indent}{json.dumps(key)}: {flow(value)}")
    return "\n".join(lines)


def containers(value: Any) -> list[Any]:
    """Every mapping and list in the tree, the top one first."""
    found = [value] if isinstance(value, list) else []
    for item in value if isinstance(value, list) else ():
        child = item[1] if isinstance(value, Pairs) else item
        found += containers(child)
    return found


def mutate(doc: Pairs, data: st.DataObject) -> None:
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        target = data.draw(st.sampled_from(containers(doc)), label="container")
        operations = ["replace", "delete", "duplicate", "insert"] if target else ["insert"]
        operation = data.draw(st.sampled_from(operations), label="operation")
        if operation == "insert":  # an unknown key, or one more item
            new = data.draw(values, label="value")
            if isinstance(target, Pairs):
                key = data.draw(st.text(KEY_ALPHABET, min_size=1, max_size=8), label="key")
                target.append((key, new))
            else:
                target.append(new)
            continue
        i = data.draw(st.integers(0, len(target) - 1), label="index")
        if operation == "delete":
            del target[i]
        elif operation == "duplicate":  # the same key (or item) again, maybe another value
            item = target[i]
            if data.draw(st.booleans(), label="new value"):
                new = data.draw(values, label="value")
                item = (item[0], new) if isinstance(target, Pairs) else new
            target.insert(data.draw(st.integers(0, len(target)), label="at"), item)
        else:
            new = data.draw(values, label="value")
            target[i] = (target[i][0], new) if isinstance(target, Pairs) else new


def assert_only_path_problems(text: str) -> Config | None:
    started = time.perf_counter()
    try:
        config = parse_config(text, ENVIRON)
    except ConfigErrors as exc:
        assert exc.errors, "ConfigErrors without a problem"
        for error in exc.errors:
            assert isinstance(error, ConfigError)
            assert KEY_PATH.fullmatch(error.path), error
            assert error.problem and str(error) == f"{error.path}: {error.problem}"
            assert UNEXPECTED not in error.problem, error  # a converter raised: a bug
        config = None
    else:
        assert isinstance(config, Config)
        assert all(isinstance(w, str) for w in config.warnings)
    took = time.perf_counter() - started
    assert took < SECONDS_PER_EXAMPLE, f"{took:.2f}s"
    return config


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_examples_are_valid(name: str) -> None:
    assert assert_only_path_problems(EXAMPLES[name]) is not None
    rewritten = document(tree(yaml.safe_load(EXAMPLES[name])))  # what the mutations rewrite
    assert assert_only_path_problems(rewritten) is not None


@pytest.mark.parametrize("name", EXAMPLES)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_mutated_config_is_read_or_refused_with_key_paths(name: str, data: st.DataObject) -> None:
    doc = tree(yaml.safe_load(EXAMPLES[name]))
    mutate(doc, data)
    assert_only_path_problems(document(doc))


@pytest.mark.parametrize("nasty", NASTY)
@pytest.mark.parametrize("where", ["route timeout", "access_token_ttl", "claim", "data_dir"])
def test_every_nasty_value_in_every_kind_of_place(where: str, nasty: str) -> None:
    """Each nasty value once in a duration, a free-form claim and a path: not left to
    the draw."""
    text = GATEWAY + "      timeout: 10s\n" + VALID
    old = {
        "route timeout": "timeout: 10s",
        "access_token_ttl": "access_token_ttl: 15m",
        "claim": "claims: {tenant: acme}",
        "data_dir": "  listen: 127.0.0.1:9000",
    }[where]
    new = {
        "route timeout": f"timeout: {nasty}",
        "access_token_ttl": f"access_token_ttl: {nasty}",
        "claim": f"claims: {{tenant: {nasty}}}",
        "data_dir": f"  listen: 127.0.0.1:9000\n  data_dir: {nasty}",
    }[where]
    assert text.count(old) == 1
    assert_only_path_problems(text.replace(old, new))


def read_yaml(text: str, *, libyaml: bool) -> str:
    """What parse_yaml makes of ``text``, as text: the data with every mapping's
    duplicate keys, or the problem."""
    saved = yamlconf._FastLoader
    if not libyaml:
        yamlconf._FastLoader = None
    try:
        data = yamlconf.parse_yaml(text)
    except ConfigErrors as exc:
        return str(exc)
    finally:
        yamlconf._FastLoader = saved
    return repr([data, *(getattr(m, "duplicates", None) for m in mappings(data))])


def mappings(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value, *(m for v in value.values() for m in mappings(v))]
    if isinstance(value, list):
        return [m for v in value for m in mappings(v)]
    return []


@pytest.mark.skipif(yamlconf._FastLoader is None, reason="PyYAML without libyaml")
@pytest.mark.parametrize("name", EXAMPLES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_libyaml_and_pure_python_read_a_document_alike(name: str, data: st.DataObject) -> None:
    """libyaml parses (four times faster); PyYAML's parser only says what is wrong. The
    same checks run on both, and both read a document the same way."""
    doc = tree(yaml.safe_load(EXAMPLES[name]))
    mutate(doc, data)
    text = document(doc)
    assert read_yaml(text, libyaml=True) == read_yaml(text, libyaml=False)
