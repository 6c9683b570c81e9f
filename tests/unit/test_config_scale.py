"""Big configs: reading and checking thousands of routes takes about linear time, and
the shadowing check that makes it so finds exactly what comparing every pair finds."""

from __future__ import annotations

import time
from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import Require, RouteConfig
from gateway.routing import _covers_route, shadowed
from tokengate.config import parse_config

HTTP = ("GET", "HEAD", "POST", "PUT", "DELETE")


def routes_yaml(count: int) -> str:
    """``count`` distinct routes of every shape: `**`, `*`, exact, hosts, methods."""
    lines = [
        "gateway:",
        "  issuers:",
        "    - {issuer: https://idp.example.com, audiences: [api]}",
        "  routes:",
    ]
    for i in range(count):
        path = (f"/svc{i}/v1/**", f"/svc{i}/items/*/detail", f"/svc{i}/health")[i % 3]
        match = f"{{path: {path}, methods: [GET, POST]}}"
        if i % 5 == 0:
            match = f"{{path: {path}, host: '*.tenant{i % 7}.example.com'}}"
        lines += [
            f"    - name: r{i}",
            f"      match: {match}",
            f"      upstream: http://10.0.{i // 250}.{i % 250}:8080",
            "      timeout: 10s",
            "      require: {scopes: [orders:read], claims: {tenant: acme}}",
        ]
    # and a few that are shadowed, so that the check has something to find
    lines += [
        "    - {name: late-1, match: {path: /svc3/v1/x, methods: [GET]}, upstream: http://x}",
        "    - {name: late-2, match: {path: /svc1/items/7/detail, methods: [POST]},"
        " upstream: http://x}",
    ]
    return "\n".join(lines) + "\n"


def check_seconds(text: str) -> float:
    """What `tokengate check` does with the text: parse, validate, warn."""
    started = time.perf_counter()
    config = parse_config(text, {})
    assert config.gateway is not None
    assert [w.split(":")[0] for w in config.warnings] == [
        f"gateway.routes[{len(config.gateway.routes) - 2}]",
        f"gateway.routes[{len(config.gateway.routes) - 1}]",
    ]
    return time.perf_counter() - started


def test_three_thousand_routes_are_checked_in_a_few_seconds() -> None:
    """Comparing every route with every earlier one took 12 s for 3,000 routes; now
    about 0.7 s on a quiet machine, 2 s on a busy one. The bound leaves room for noise:
    the ratio test below is the sharp one."""
    assert min(check_seconds(routes_yaml(3000)) for _ in range(2)) < 5.0


def test_checking_routes_grows_about_linearly() -> None:
    small, large = routes_yaml(1000), routes_yaml(4000)
    ratio = min(check_seconds(large) for _ in range(2)) / min(
        check_seconds(small) for _ in range(2)
    )
    assert ratio < 7, f"4x the routes took {ratio:.1f}x the time (16x would be quadratic)"


# --------------------------------------------------------------------------- shadowing


def pairwise(routes: Sequence[RouteConfig]) -> list[tuple[int, int]]:
    """The definition: each later route against every earlier one, the first that covers."""
    out = []
    for j, later in enumerate(routes):
        for i in range(j):
            if _covers_route(routes[i], later):
                out.append((j, i))
                break
    return out


segments = st.sampled_from(["a", "b", "*", "c1"])
patterns = st.builds(
    lambda body, end: "/" + "/".join([*body, *end]),
    st.lists(segments, max_size=3),
    st.sampled_from([[], ["**"], [""]]),
)
route_configs = st.builds(
    lambda path, methods, host: RouteConfig(
        name="r",
        path=path,
        methods=frozenset(methods) if methods is not None else None,
        host=host,
        upstream="http://u",
        strip_prefix=None,
        timeout=30.0,
        public=True,
        forward_token=False,
        require=Require(None, None, (), (), ()),
    ),
    patterns,
    st.none() | st.sets(st.sampled_from(HTTP), min_size=1, max_size=3),
    st.sampled_from(
        [None, "a.example.com", "b.a.example.com", "*.example.com", "*.a.example.com", "x.org"]
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(route_configs, max_size=12))
def test_shadowed_finds_what_comparing_every_pair_finds(routes: list[RouteConfig]) -> None:
    assert shadowed(routes) == pairwise(routes)


def test_shadowed_edge_cases() -> None:
    def route(path: str, methods: set[str] | None = None, host: str | None = None) -> RouteConfig:
        return RouteConfig(
            "r",
            path,
            frozenset(methods) if methods else None,
            host,
            "http://u",
            None,
            30.0,
            True,
            False,
            Require(None, None, (), (), ()),
        )

    cases: list[list[RouteConfig]] = [
        [route("/**"), route("/")],  # `/**` takes the root too
        [route("/"), route("/**")],
        [route("/a/*"), route("/a/")],  # `*` never takes an empty segment
        [route("/a/**"), route("/a")],
        [route("/a/*/c"), route("/a/*/c")],
        [route("/a/b", {"GET"}), route("/a/b", {"GET", "POST"}), route("/a/b", {"POST"})],
        [route("/x", host="*.example.com"), route("/x", host="a.b.example.com")],
        [route("/x", host="*.example.com"), route("/x", host="*.a.example.com")],
        [route("/x", host="a.example.com"), route("/x")],
        [route("/x", {"GET"}, "*.b.c"), route("/x", {"GET"}, "*.b.c"), route("/x", host="a.b.c")],
    ]
    for routes in cases:
        assert shadowed(routes) == pairwise(routes), [r.path for r in routes]
    assert shadowed(cases[0]) == [(1, 0)]
    assert shadowed(cases[2]) == []
