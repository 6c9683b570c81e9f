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

MAX_DEPTH = 100  # levels of nesting, counted through aliases
MAX_ALIAS_EXPANSION = 100_000  # nodes that aliases may add to a document, all aliases together
MAX_INT_DIGITS = 4300  # Python's own limit for int <-> str; every integer read here prints
_MAX_INT_BITS = 14_000  # 2**14000 has 4,215 digits
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _YamlMap(dict):  # type: ignore[type-arg]
    """A mapping that remembers the keys YAML gave twice (PyYAML keeps the last)."""

    duplicates: list[tuple[str, int]]


class _Checked(yaml.composer.Composer, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """SafeLoader's composer and constructor, keeping duplicate keys, and refusing what
    would make reading a document unbounded: nesting deeper than :data:`MAX_DEPTH`,
    aliases that add more than :data:`MAX_ALIAS_EXPANSION` nodes ("billion laughs") or
    that are inside the node they name, integers too long to print. A value PyYAML
    cannot construct (``2001-02-30``) is a ``line N`` problem, never a ValueError.

    The checks run as events are composed, before anything is expanded, so a document
    is refused as soon as it crosses a limit."""

    def __init__(self) -> None:
        yaml.composer.Composer.__init__(self)  # type: ignore[no-untyped-call]
        yaml.constructor.SafeConstructor.__init__(self)  # type: ignore[no-untyped-call]
        yaml.resolver.Resolver.__init__(self)  # type: ignore[no-untyped-call]
        self._depth = 0  # nodes open around the one being composed
        self._deepest = 0  # the deepest level reached inside the node being composed
        self._composed = 0  # nodes composed so far, each alias counted as the nodes it names
        self._aliased = 0  # of those, the nodes aliases added
        self._sizes: dict[int, tuple[int, int]] = {}  # id(anchored node) -> (nodes, height)
        self._merges = 0  # flatten_mapping calls open (a `<<` merge chain)
        self._merged: dict[int, int] = {}  # id(mapping node) -> how many pairs `<<` put first

    def compose_document(self) -> yaml.Node:
        self._sizes = {}
        return super().compose_document()  # type: ignore[no-untyped-call,no-any-return]

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        level = self._depth + 1
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:
                size = self._sizes.get(id(target))
                if size is None:
                    raise yaml.composer.ComposerError(
                        None,
                        None,
                        f"alias *{event.anchor} is inside the node it names (a recursive alias)",
                        event.start_mark,
                    )
                nodes, height = size
                self._account(nodes, level + height - 1, event.start_mark)
                self._aliased += nodes
                if self._aliased > MAX_ALIAS_EXPANSION:
                    raise yaml.composer.ComposerError(
                        None,
                        None,
                        f"too many alias expansions (over {MAX_ALIAS_EXPANSION}); "
                        "YAML anchors may not multiply the document",
                        event.start_mark,
                    )
            return super().compose_node(parent, index)  # type: ignore[no-untyped-call,no-any-return]
        before, outer_deepest = self._composed, self._deepest
        self._deepest = 0
        self._account(1, level, event.start_mark)
        self._depth = level
        try:
            node = super().compose_node(parent, index)  # type: ignore[no-untyped-call]
        finally:
            self._depth = level - 1
        if event.anchor is not None:
            self._sizes[id(node)] = (self._composed - before, self._deepest - level + 1)
        self._deepest = max(outer_deepest, self._deepest)
        return node  # type: ignore[no-any-return]

    def _account(self, nodes: int, deepest: int, mark: yaml.Mark) -> None:
        if deepest > MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", mark
            )
        self._composed += nodes
        self._deepest = max(self._deepest, deepest)

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        self._merges += 1  # a merge flattens the mappings it merges first, recursively
        try:
            if self._merges > MAX_DEPTH:
                raise yaml.constructor.ConstructorError(
                    None, None, f"merge keys (<<) chained deeper than {MAX_DEPTH}", node.start_mark
                )
            own = sum(1 for key, _ in node.value if key.tag != _MERGE_TAG)
            super().flatten_mapping(node)  # type: ignore[no-untyped-call]
            if len(node.value) > own:  # only the first time: `<<` is gone from it then
                self._merged[id(node)] = len(node.value) - own
        finally:
            self._merges -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)  # type: ignore[no-untyped-call]
        except yaml.YAMLError:
            raise
        except (ValueError, ArithmeticError, TypeError) as exc:  # a date like 2001-02-30
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value ({exc})", node.start_mark
            ) from None

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        too_large = yaml.constructor.ConstructorError(
            None, None, f"integer is too large (over {MAX_INT_DIGITS} digits)", node.start_mark
        )
        if len(node.value) > MAX_INT_DIGITS:  # also bounds a base-60 integer's arithmetic
            raise too_large
        value = super().construct_yaml_int(node)  # type: ignore[no-untyped-call]
        if value.bit_length() > _MAX_INT_BITS:  # 1:59:59:... base 60 grows fast
            raise too_large
        return value  # type: ignore[no-any-return]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> _YamlMap:  # type: ignore[override]
        self.flatten_mapping(node)
        merged = self._merged.get(id(node), 0)  # pairs a `<<` merged in: the mapping's own
        out = _YamlMap()  # keys override them, and are duplicates only of each other
        out.duplicates = []
        own: set[str] = set()
        for i, (key_node, value_node) in enumerate(node.value):
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, "keys must be scalars", key_node.start_mark
                )
            key = str(key)
            if i >= merged:
                if key in own:
                    out.duplicates.append((key, key_node.start_mark.line + 1))
                own.add(key)
            out[key] = self.construct_object(value_node, deep=deep)
        return out


_Checked.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _Checked.construct_mapping,  # type: ignore[arg-type]
)
_Checked.add_constructor("tag:yaml.org,2002:int", _Checked.construct_yaml_int)  # type: ignore[arg-type]


class _StrictLoader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, _Checked):
    """PyYAML's pure-Python reader, scanner and parser: its messages are the ones shown."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)  # type: ignore[no-untyped-call]
        yaml.scanner.Scanner.__init__(self)  # type: ignore[no-untyped-call]
        yaml.parser.Parser.__init__(self)  # type: ignore[no-untyped-call]
        _Checked.__init__(self)


_FastLoader: type | None = None
if yaml.__with_libyaml__:

    class _CLoader(yaml.cyaml.CParser, _Checked):  # type: ignore[misc]
        """libyaml's parser (about four times faster), the same composer and checks."""

        # CParser would compose in C, past every check: compose in Python.
        get_single_node = yaml.composer.Composer.get_single_node
        check_node = yaml.composer.Composer.check_node
        get_node = yaml.composer.Composer.get_node

        def __init__(self, stream: str) -> None:
            yaml.cyaml.CParser.__init__(self, stream)
            _Checked.__init__(self)

    _FastLoader = _CLoader

# What libyaml raises for a document it cannot parse (or a str it cannot encode):
# parse it again in pure Python, which says what is wrong the way PyYAML does.
_SYNTAX_ERRORS = (yaml.reader.ReaderError, yaml.scanner.ScannerError, yaml.parser.ParserError)


def _load(text: str) -> Any:
    if _FastLoader is not None:
        try:
            return yaml.load(text, Loader=_FastLoader)  # noqa: S506 - safe constructors only
        except (*_SYNTAX_ERRORS, UnicodeError):
            pass
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - safe constructors only


def parse_yaml(text: str, source: str = "config") -> Any:
    """Parse YAML text; duplicate keys are kept for :class:`Node` to report.

    Raises :class:`ConfigErrors` (``line N: invalid YAML: ...``) and nothing else."""
    try:
        return _load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}" if mark is not None else source
        problem = exc.problem or str(exc)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow
        where = f"line {text.count(chr(10), 0, exc.position) + 1}"
        problem = str(exc.reason) + (
            f" (character #x{exc.character:04x})" if isinstance(exc.character, int) else ""
        )
    except yaml.YAMLError as exc:
        where, problem = source, str(exc)
    except RecursionError:  # not expected: the loader bounds nesting
        where, problem = source, "nested too deeply"
    raise ConfigErrors([ConfigError(where, f"invalid YAML: {problem}")])


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
        return guarded(child, convert)  # type: ignore[return-value]


UNEXPECTED = "could not be checked: this is a bug in tokengate, please report it"


def guarded(node: Node, convert: Callable[[Node], T]) -> T | None:
    """Run ``convert`` on ``node``; report a ConfigError and return None instead.

    Reading a config never raises anything else: any other exception is a bug in a
    converter, reported at ``node``'s path (by type only: its message could quote a
    secret) rather than ending ``tokengate check`` or a hot reload with a traceback.
    """
    try:
        return convert(node)
    except ConfigError as exc:
        node.report.errors.append(exc)
    except RecursionError:  # not expected: parse_yaml bounds nesting
        node.error("is nested too deeply")
    except Exception as exc:  # config can never crash anything
        node.error(f"{UNEXPECTED} ({type(exc).__name__})")
    return None


def unique_items(
    items: Iterable[Node],
    convert: Callable[[Node], T],
    key: Callable[[T], str],
    field: str,
    what: str,
) -> list[T]:
    """Each item converted (a problem reported, the item left out, as :func:`guarded`);
    a ``key`` seen before is reported at the later item's ``field``:
    ``duplicate {what} 'key'``."""
    out: list[T] = []
    seen: set[str] = set()
    for item in items:
        converted = guarded(item, convert)
        if converted is None:
            continue
        if key(converted) in seen:
            item.report.add(f"{item.path}.{field}", f"duplicate {what} {key(converted)!r}")
        seen.add(key(converted))
        out.append(converted)
    return out


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
            raise ConfigError(node.path, f"must be an integer, got {shown(value)}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(node.path, f"must be an integer, got {_kind(value)}")
    return value


def positive_int(node: Node) -> int:
    value = as_int(node)
    if value <= 0:
        raise ConfigError(node.path, f"must be an integer > 0, got {value}")
    return value


_DURATION = re.compile(r"([0-9]+)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_DURATION_DAYS = 36500  # a hundred years: every duration fits a timer and a datetime
MAX_DURATION = MAX_DURATION_DAYS * 86400.0


def parse_duration(text: str) -> float:
    """``30s``, ``10m``, ``1h``, ``7d``, ``1h30m``, ``250ms`` or plain seconds -> seconds.

    ValueError if ``text`` is not a duration; ``inf`` for one beyond :data:`MAX_DURATION`
    (``99999999999999999999h``), so that a caller can say it is too long."""
    text = text.strip()
    if text.isascii() and text.isdigit():
        ms = int(text) * 1000
    else:
        pos, ms = 0, 0
        for m in _DURATION.finditer(text):
            if m.start() != pos:
                break
            ms += int(m.group(1)) * _UNIT_MS[m.group(2)]  # exact: no float overflows here
            pos = m.end()
        if pos != len(text) or not text:
            raise ValueError(text)
    return math.inf if ms > MAX_DURATION * 1000 else ms / 1000


def as_duration(node: Node) -> float:
    """Seconds, from an integer or a string like ``30s``, ``10m``, ``1h``, ``7d``."""
    value = node.value
    if isinstance(value, bool):
        raise ConfigError(node.path, "must be a duration like 30s, 10m, 1h, 7d")
    if isinstance(value, int):
        seconds = (
            float(value) if abs(value) <= MAX_DURATION else math.inf * (1 if value > 0 else -1)
        )
    else:
        try:
            seconds = parse_duration(node.raw_str())
        except (ValueError, ConfigError):
            raise ConfigError(
                node.path, f"must be a duration like 30s, 10m, 1h, 7d, got {shown(node.value)}"
            ) from None
    if seconds <= 0:
        raise ConfigError(node.path, f"must be a duration > 0, got {shown(node.value)}")
    if seconds > MAX_DURATION:
        raise ConfigError(
            node.path,
            f"must be a duration of at most {MAX_DURATION_DAYS}d, got {shown(node.value)}",
        )
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
        seen: set[Any] = set()  # linear in the list's length, not quadratic
        for item in node.items():
            value = guarded(item, convert)
            if value is None:
                continue
            if unique:
                try:
                    again = value in seen
                    seen.add(value)
                except TypeError:  # an unhashable value: compare with each
                    again = value in out
                if again:
                    item.error(f"duplicate value {shown(value)}")
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


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.75)
    return found[0] if found else None


def root(value: Any, environ: Mapping[str, str] | None = None) -> Node:
    return Node(value, "", Report(), os.environ if environ is None else environ)
