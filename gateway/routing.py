"""Route matching: compiled once at load, first match wins. Pure."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.audit import quote
from gateway.config import RouteConfig


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """``/a/*/c`` -> one segment for ``*``; a trailing ``/**`` matches ``/a`` and below."""
    segments = pattern[1:].split("/")
    deep = segments[-1] == "**"
    if deep:
        segments = segments[:-1]
    body = "".join("/" + ("[^/]+" if s == "*" else re.escape(s)) for s in segments)
    if deep:
        return re.compile(body + "(?:/.*)?" if body else "/.*")
    return re.compile(body or "/")


@dataclass(frozen=True, slots=True)
class Route:
    """A route ready for requests: matcher, upstream base and the rules it applies."""

    config: RouteConfig
    regex: re.Pattern[str]
    audiences: tuple[str, ...] | None  # the audiences a token must name; None: its issuer's
    audit_name: str  # the name as a JSON string, for the audit line

    @property
    def name(self) -> str:
        return self.config.name

    def matches(self, method: str, host: str | None, path: str) -> bool:
        c = self.config
        if c.methods is not None and method not in c.methods:
            return False
        if c.host is not None and not _host_matches(c.host, host):
            return False
        return self.regex.fullmatch(path) is not None

    def upstream_path(self, path: str) -> str:
        prefix = self.config.strip_prefix
        if prefix and prefix != "/" and (path == prefix or path.startswith(prefix + "/")):
            path = path[len(prefix) :] or "/"
        return path


class RouteTable:
    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes = tuple(
            Route(
                config=r,
                regex=compile_pattern(r.path),
                audiences=(r.require.audience,) if r.require.audience else None,
                audit_name=quote(r.name),
            )
            for r in routes
        )

    def match(self, method: str, host: str | None, path: str) -> Route | None:
        for route in self.routes:
            if route.matches(method, host, path):
                return route
        return None


def _host_matches(pattern: str, host: str | None) -> bool:
    if host is None:
        return False
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def request_host(value: bytes | None) -> str | None:
    """The Host header as routes match it: lowercase, without its port or a trailing
    dot (``Admin.Example.COM.:443`` is ``admin.example.com``)."""
    if not value:
        return None
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text.split("]", 1)[0] + "]"
    host = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    return host[:-1] if host.endswith(".") else host


# --------------------------------------------------------------------------- shadowing


def _covers(earlier: str, later: str) -> bool:
    """Does pattern ``earlier`` match every path pattern ``later`` matches?"""
    a, b = earlier[1:].split("/"), later[1:].split("/")
    a_deep = a[-1] == "**"
    if a_deep:
        a = a[:-1]
        b_prefix = b[:-1] if b[-1] == "**" else b
        if len(b_prefix) < len(a):
            return False
        b = b_prefix[: len(a)]
    elif len(a) != len(b) or b[-1] == "**":
        return False
    return all(x == y or (x == "*" and y not in ("**", "")) for x, y in zip(a, b, strict=True))


def _covers_route(earlier: RouteConfig, later: RouteConfig) -> bool:
    if earlier.methods is not None and (
        later.methods is None or not later.methods <= earlier.methods
    ):
        return False
    if (
        earlier.host is not None
        and earlier.host != later.host
        and not (
            later.host and earlier.host.startswith("*.") and later.host.endswith(earlier.host[1:])
        )
    ):
        return False
    return _covers(earlier.path, later.path)


def shadow_warnings(routes: Sequence[RouteConfig]) -> tuple[str, ...]:
    """``tokengate check``'s warning for each route an earlier one fully shadows."""
    return tuple(
        f"gateway.routes[{later}]: never matches; "
        f"routes[{earlier}] ({routes[earlier].name}) matches everything it does"
        for later, earlier in shadowed(routes)
    )


def shadowed(routes: Sequence[RouteConfig]) -> list[tuple[int, int]]:
    """(later, earlier) index pairs where an earlier route takes every request of a later one.

    ``earlier`` is the first such route, as if each route were compared with every
    earlier one (what :func:`_covers_route` decides), but in about linear time: earlier
    patterns sit in a trie over their segments, which a later pattern walks, following
    its own segment and ``*``; a trie node keeps, per host and method set, only the first
    route that ends there, the only one that can be the answer.
    """
    trie = _PatternTrie()
    out = []
    for j, route in enumerate(routes):
        segments = route.path[1:].split("/")
        deep = segments[-1] == "**"
        prefix = segments[:-1] if deep else segments
        first = trie.first_cover(prefix, deep, route)
        if first is not None:
            out.append((j, first))
        trie.add(prefix, deep, route, j)
    return out


# host -> methods -> the index of the first route with them
_Firsts = dict[str | None, dict[frozenset[str] | None, int]]


class _PatternTrie:
    """Path patterns by segment. A pattern ``/a/*/c`` ends at node a -> * -> c (in
    ``exact``); ``/a/**`` ends at node a (in ``deep``): it covers everything from there."""

    __slots__ = ("children", "deep", "exact")

    def __init__(self) -> None:
        self.children: dict[str, _PatternTrie] = {}
        self.exact: _Firsts = {}
        self.deep: _Firsts = {}

    def add(self, prefix: list[str], deep: bool, route: RouteConfig, index: int) -> None:
        node = self
        for segment in prefix:
            child = node.children.get(segment)
            if child is None:
                child = node.children[segment] = _PatternTrie()
            node = child
        firsts = node.deep if deep else node.exact
        firsts.setdefault(route.host, {}).setdefault(route.methods, index)

    def first_cover(self, prefix: list[str], deep: bool, route: RouteConfig) -> int | None:
        """The first route added that covers ``route`` (its pattern split into ``prefix``
        and whether it ends in ``**``)."""
        hosts = _covering_hosts(route.host)
        found: list[int] = []
        level: list[_PatternTrie] = [self]  # the nodes matching prefix[:depth]
        for segment in prefix:
            for node in level:  # a `**` pattern ending here covers whatever follows
                _collect(node.deep, hosts, route.methods, found)
            following: list[_PatternTrie] = []
            for node in level:
                same = node.children.get(segment)
                if same is not None:
                    following.append(same)
                if segment not in ("*", ""):  # `*` takes one non-empty segment
                    star = node.children.get("*")
                    if star is not None:
                        following.append(star)
            level = following
        for node in level:
            _collect(node.deep, hosts, route.methods, found)
            if not deep:  # a pattern of the same length, matching segment by segment
                _collect(node.exact, hosts, route.methods, found)
        return min(found, default=None)


def _covering_hosts(host: str | None) -> list[str | None]:
    """The ``match.host`` values that take every request ``host`` does: any host, the
    same one, and each ``*.domain`` it ends in."""
    if host is None:
        return [None]
    return [None, host, *("*" + host[i:] for i, c in enumerate(host) if c == ".")]


def _collect(
    firsts: _Firsts, hosts: list[str | None], methods: frozenset[str] | None, found: list[int]
) -> None:
    for host in hosts:
        for earlier, index in firsts.get(host, {}).items():
            if earlier is None or (methods is not None and methods <= earlier):
                found.append(index)
