"""Strict YAML configuration reading: every value carries its key path.

Section parsers (``authserver.config``, ``gateway.config``) walk a :class:`Node`
tree and build frozen dataclasses. Problems are collected, not raised one at a
time, so ``tokengate check`` can print every ``path: problem`` line at once;
no dict read from YAML leaves a config module.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """One problem at one key path."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class ConfigErrors(ValueError):
    """Every problem found in one configuration file."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


# --------------------------------------------------------------------------- YAML


class _YamlMap(dict):  # type: ignore[type-arg]
    """A mapping that remembers the keys YAML gave twice (PyYAML keeps the last)."""

    duplicates: list[tuple[str, int]]


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> _YamlMap:  # type: ignore[override]
        self.flatten_mapping(node)
        out = _YamlMap()
        out.duplicates = []
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, "keys must be scalars", key_node.start_mark
                )
            key = str(key)
            if key in out:
                out.duplicates.append((key, key_node.start_mark.line + 1))
            out[key] = self.construct_object(value_node, deep=deep)  # type: ignore[no-untyped-call]
        return out


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _StrictLoader.construct_mapping,  # type: ignore[arg-type]
)


def parse_yaml(text: str, source: str = "config") -> Any:
    """Parse YAML text; duplicate keys are kept for :class:`Node` to report."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigErrors([ConfigError(where, f"invalid YAML: {problem}")]) from None


# --------------------------------------------------------------------------- nodes

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Report:
    """Collects problems while a configuration tree is parsed."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def add(self, path: str, problem: str) -> None:
        self.errors.append(ConfigError(path, problem))

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigErrors(self.errors)


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Node:
    """A YAML value with its key path (``gateway.routes[0].upstream``)."""

    __slots__ = ("environ", "path", "report", "value")

    def __init__(self, value: Any, path: str, report: Report, environ: Mapping[str, str]) -> None:
        self.value = value
        self.path = path
        self.report = report
        self.environ = environ

    def _child(self, value: Any, path: str) -> Node:
        return Node(value, path, self.report, self.environ)

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, problem: str) -> None:
        self.report.add(self.path or "(top level)", problem)

    # -- structure ---------------------------------------------------------

    def is_mapping(self) -> bool:
        return isinstance(self.value, dict)

    def fields(self, required: Iterable[str] = (), optional: Iterable[str] = ()) -> Fields:
        """Check this node is a mapping with only known keys; report the rest."""
        required = tuple(required)
        known = set(required) | set(optional)
        if not isinstance(self.value, dict):
            self.error(f"must be a mapping, got {_kind(self.value)}")
            return Fields(self, {})
        for key, line in getattr(self.value, "duplicates", ()):
            self.report.add(self.key_path(key), f"duplicate key (again on line {line})")
        unknown = sorted(k for k in self.value if k not in known)
        for key in unknown:
            hint = _closest(key, known)
            self.report.add(
                self.key_path(key), "unknown key" + (f" (did you mean {hint!r}?)" if hint else "")
            )
        for key in required:
            if key not in self.value:
                self.report.add(self.key_path(key), "is required")
        children = {
            k: self._child(v, self.key_path(k)) for k, v in self.value.items() if k in known
        }
        return Fields(self, children)

    def items(self) -> Iterator[Node]:
        if not isinstance(self.value, list):
            self.error(f"must be a list, got {_kind(self.value)}")
            return iter(())
        return (self._child(v, f"{self.path}[{i}]") for i, v in enumerate(self.value))

    def entries(self) -> Iterator[tuple[str, Node]]:
        """Key/value pairs of a free-form mapping (claims, labels)."""
        if not isinstance(self.value, dict):
            self.error(f"must be a mapping, got {_kind(self.value)}")
            return iter(())
        for key, line in getattr(self.value, "duplicates", ()):
            self.report.add(self.key_path(key), f"duplicate key (again on line {line})")
        return ((k, self._child(v, self.key_path(k))) for k, v in self.value.items())

    # -- scalars -----------------------------------------------------------

    def raw_str(self) -> str:
        if isinstance(self.value, bool) or not isinstance(self.value, str | int | float):
            raise ConfigError(self.path, f"must be a string, got {_kind(self.value)}")
        return self._interpolate(str(self.value))

    def _interpolate(self, text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name = m.group(1)
            if name not in self.environ:
                raise ConfigError(self.path, f"environment variable {name} is not set")
            return self.environ[name]

        return _ENV_REF.sub(sub, text)

    def plain(self) -> Any:
        """A JSON-compatible value (strings interpolated), for claims."""
        v = self.value
        if isinstance(v, str):
            return self._interpolate(v)
        if v is None or isinstance(v, bool | int):
            return v
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ConfigError(self.path, "must be a finite number")
            return v
        if isinstance(v, list):
            return [n.plain() for n in self.items()]
        if isinstance(v, dict):
            return {k: n.plain() for k, n in self.entries()}
        raise ConfigError(self.path, f"unsupported value {_kind(v)}")


class Fields:
    """The known children of a mapping node, read one typed value at a time."""

    __slots__ = ("children", "node")

    def __init__(self, node: Node, children: dict[str, Node]) -> None:
        self.node = node
        self.children = children

    def __contains__(self, key: str) -> bool:
        return key in self.children

    def has(self, key: str) -> bool:
        return key in self.children and self.children[key].value is not None

    def node_at(self, key: str) -> Node:
        return self.children.get(key) or self.node._child(None, self.node.key_path(key))

    def get(self, key: str, convert: Callable[[Node], T], default: Any = MISSING) -> T:
        """Convert ``key``; a problem is reported and ``None`` returned in its place.

        A missing key (or an explicit YAML null) yields ``default``; without a default,
        ``fields()`` has already reported it as required.
        """
        child = self.children.get(key)
        if child is None or child.value is None:
            if default is MISSING:
                if child is not None:
                    child.error("is required")
                return None  # type: ignore[return-value]
            return default  # type: ignore[no-any-return]
        try:
            return convert(child)
        except ConfigError as exc:
            self.node.report.errors.append(exc)
            return None  # type: ignore[return-value]


def guarded(node: Node, convert: Callable[[Node], T]) -> T | None:
    """Run ``convert`` on ``node``; report a ConfigError and return None instead."""
    try:
        return convert(node)
    except ConfigError as exc:
        node.report.errors.append(exc)
        return None


# --------------------------------------------------------------------------- converters


def as_str(node: Node) -> str:
    text = node.raw_str()
    if not text:
        raise ConfigError(node.path, "must not be empty")
    return text


def as_name(node: Node) -> str:
    """An identifier usable in URLs and metric labels."""
    text = as_str(node)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise ConfigError(node.path, f"must be 1-64 letters, digits, '.', '_' or '-', got {text!r}")
    return text


def as_bool(node: Node) -> bool:
    if not isinstance(node.value, bool):
        raise ConfigError(node.path, f"must be true or false, got {_kind(node.value)}")
    return node.value


def as_int(node: Node) -> int:
    value = node.value
    if isinstance(value, str):
        value = node.raw_str()
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(node.path, f"must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(node.path, f"must be an integer, got {_kind(value)}")
    return value


def positive_int(node: Node) -> int:
    value = as_int(node)
    if value <= 0:
        raise ConfigError(node.path, f"must be an integer > 0, got {value}")
    return value


_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``30s``, ``10m``, ``1h``, ``7d``, ``1h30m``, ``250ms`` or plain seconds -> seconds."""
    text = text.strip()
    if text.isdigit():
        return float(int(text))
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += int(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(text)
    return total


def as_duration(node: Node) -> float:
    """Seconds, from an integer or a string like ``30s``, ``10m``, ``1h``, ``7d``."""
    value = node.value
    if isinstance(value, bool):
        raise ConfigError(node.path, "must be a duration like 30s, 10m, 1h, 7d")
    if isinstance(value, int):
        seconds = float(value)
    else:
        try:
            seconds = parse_duration(node.raw_str())
        except (ValueError, ConfigError):
            raise ConfigError(
                node.path, f"must be a duration like 30s, 10m, 1h, 7d, got {node.value!r}"
            ) from None
    if seconds <= 0:
        raise ConfigError(node.path, f"must be a duration > 0, got {node.value!r}")
    return seconds


def as_seconds(node: Node) -> int:
    """A duration in whole seconds (at least 1)."""
    return max(1, round(as_duration(node)))


def as_http_url(node: Node) -> str:
    """An absolute http(s) URL without query or fragment; trailing ``/`` dropped."""
    text = as_str(node)
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise ConfigError(node.path, f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(node.path, f"scheme must be http or https, got {text!r}")
    if not parts.hostname:
        raise ConfigError(node.path, f"must name a host, got {text!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(node.path, "must not carry a query, fragment or credentials")
    return text.rstrip("/")


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def as_listen(node: Node) -> Listen:
    """``host:port`` (``[::1]:8080`` for IPv6); port 0 picks a free port."""
    text = as_str(node)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\s\[\]]+):(\d{1,5})", text)
    if not m:
        raise ConfigError(node.path, f"must be host:port, got {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ConfigError(node.path, f"port must be 0-65535, got {port}")
    return Listen(host, port)


def list_of(
    convert: Callable[[Node], T], *, unique: bool = True
) -> Callable[[Node], tuple[T, ...]]:
    def read(node: Node) -> tuple[T, ...]:
        out: list[T] = []
        for item in node.items():
            value = guarded(item, convert)
            if value is None:
                continue
            if unique and value in out:
                item.error(f"duplicate value {value!r}")
                continue
            out.append(value)
        return tuple(out)

    return read


def one_of(*choices: str) -> Callable[[Node], str]:
    def read(node: Node) -> str:
        text = as_str(node)
        if text not in choices:
            raise ConfigError(node.path, f"must be one of {', '.join(choices)}; got {text!r}")
        return text

    return read


# --------------------------------------------------------------------------- helpers


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    for kind, name in (
        (bool, "a boolean"),
        (dict, "a mapping"),
        (list, "a list"),
        (str, "a string"),
    ):
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, int | float) else type(value).__name__


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.75)
    return found[0] if found else None


def root(value: Any, environ: Mapping[str, str] | None = None) -> Node:
    return Node(value, "", Report(), os.environ if environ is None else environ)
