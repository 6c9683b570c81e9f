"""Who the client is behind trusted proxies: forwarding headers believed only from
trusted peers, walked right to left, never past the first address that is not trusted."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokengate.config import parse_config
from tokengate.proxies import NO_PROXIES, Origin, TrustedProxies, parse_address
from tokengate.yamlconf import ConfigErrors

LB = TrustedProxies((ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")))


def origin(peer: str | None, *headers: tuple[str, str], proxies: TrustedProxies = LB) -> Origin:
    raw = [(name.lower().encode(), value.encode("latin-1")) for name, value in headers]
    return proxies.origin(peer, "http", raw)


def test_without_trusted_proxies_every_forwarding_header_is_ignored() -> None:
    seen = origin(
        "203.0.113.7",
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Forwarded-Proto", "https"),
        ("Forwarded", "for=5.6.7.8;proto=https"),
        proxies=NO_PROXIES,
    )
    assert (seen.client, seen.scheme, seen.chain) == ("203.0.113.7", "http", ("203.0.113.7",))


def test_an_untrusted_peer_is_the_client_whatever_it_claims() -> None:
    seen = origin("203.0.113.7", ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-Proto", "https"))
    assert (seen.client, seen.scheme, seen.chain) == ("203.0.113.7", "http", ("203.0.113.7",))


def test_a_trusted_peer_names_the_client_and_its_scheme() -> None:
    seen = origin("10.1.2.3", ("X-Forwarded-For", "198.51.100.9"), ("X-Forwarded-Proto", "https"))
    assert (seen.client, seen.scheme) == ("198.51.100.9", "https")
    assert seen.chain == ("198.51.100.9", "10.1.2.3")


def test_the_walk_stops_at_the_first_untrusted_address_from_the_right() -> None:
    """What the client put in front of the proxies' entries is its own claim: dropped."""
    seen = origin(
        "10.1.2.3",
        ("X-Forwarded-For", "6.6.6.6, 198.51.100.9"),  # the client sent 6.6.6.6
        ("X-Forwarded-For", "10.9.9.9"),  # a second trusted proxy, a second header line
    )
    assert seen.client == "198.51.100.9"
    assert seen.chain == ("198.51.100.9", "10.9.9.9", "10.1.2.3")


def test_only_trusted_hops_means_the_leftmost_is_the_client() -> None:
    seen = origin("10.1.2.3", ("X-Forwarded-For", "10.5.5.5, 10.6.6.6"))
    assert seen.client == "10.5.5.5"


def test_no_header_from_a_trusted_peer_is_the_peer_itself() -> None:
    seen = origin("10.1.2.3")
    assert (seen.client, seen.scheme, seen.chain) == ("10.1.2.3", "http", ("10.1.2.3",))


@pytest.mark.parametrize("garbage", ["unknown", "_hidden", "not-an-ip", "", "1.2.3.4.5", "::g"])
def test_something_that_is_not_an_address_ends_the_walk(garbage: str) -> None:
    seen = origin("10.1.2.3", ("X-Forwarded-For", f"198.51.100.9, {garbage}, 10.2.2.2"))
    assert seen.client == "10.2.2.2"  # the last hop that could be believed
    assert seen.chain == ("10.2.2.2", "10.1.2.3")


def test_ports_brackets_and_mapped_addresses_are_read() -> None:
    assert str(parse_address("198.51.100.9:4711")) == "198.51.100.9"
    assert str(parse_address("[2001:db8::1]:4711")) == "2001:db8::1"
    assert str(parse_address("[2001:db8::1]")) == "2001:db8::1"
    assert str(parse_address("::ffff:10.0.0.1")) == "10.0.0.1"
    assert parse_address("2001:db8::1:4711") is not None  # a plain IPv6 address, no port
    seen = origin("::ffff:10.1.2.3", ("X-Forwarded-For", "[2001:db8::7]:5555"))
    assert seen.client == "2001:db8::7"


def test_the_scheme_is_the_nearest_hops_and_only_http_or_https() -> None:
    assert origin("10.1.2.3", ("X-Forwarded-Proto", "http, https")).scheme == "https"
    assert origin("10.1.2.3", ("X-Forwarded-Proto", "HTTPS")).scheme == "https"
    assert origin("10.1.2.3", ("X-Forwarded-Proto", "javascript")).scheme == "http"


def test_forwarded_is_read_when_there_is_no_x_forwarded_for() -> None:
    seen = origin(
        "10.1.2.3",
        ("Forwarded", 'for=6.6.6.6, for="[2001:db8::9]:4711";proto=https;by=10.1.2.3'),
    )
    assert (seen.client, seen.scheme) == ("2001:db8::9", "https")
    assert seen.chain == ("2001:db8::9", "10.1.2.3")
    # an element without for= ends the walk: the trusted peer is the client
    assert origin("10.1.2.3", ("Forwarded", "for=6.6.6.6, proto=https")).client == "10.1.2.3"


def test_x_forwarded_for_wins_over_forwarded() -> None:
    seen = origin("10.1.2.3", ("Forwarded", "for=6.6.6.6"), ("X-Forwarded-For", "198.51.100.9"))
    assert seen.client == "198.51.100.9"


def test_a_long_list_is_walked_only_so_far() -> None:
    hops = ", ".join(["10.0.0.9"] * 10_000)
    seen = origin("10.1.2.3", ("X-Forwarded-For", f"6.6.6.6, {hops}"))
    assert len(seen.chain) <= 33 and seen.client == "10.0.0.9"


@given(
    st.lists(st.text(st.characters(max_codepoint=255), max_size=20), max_size=6),
    st.sampled_from(["10.1.2.3", "8.8.8.8"]),
)
def test_the_client_is_always_the_peer_or_an_address_a_trusted_hop_gave(
    values: list[str], peer: str
) -> None:
    seen = origin(peer, *[("X-Forwarded-For", v) for v in values])
    assert seen.chain[-1] == peer and seen.chain[0] == seen.client
    for believed in seen.chain[1:]:
        assert LB.trusts(ipaddress.ip_address(believed))  # every hop right of the client
    if peer == "8.8.8.8":
        assert seen.client == peer


def test_config_takes_cidrs_and_names_bad_ones() -> None:
    text = """
gateway:
  trusted_proxies: [10.0.0.0/8, "2001:db8::/32", 192.0.2.7]
  routes: [{name: h, match: {path: /h}, upstream: "http://127.0.0.1:1", public: true}]
authserver:
  trusted_proxies: [10.0.0.0/8]
  servers: [{name: default, audience: api://default}]
"""
    config = parse_config(text, {})
    assert config.gateway is not None and config.authserver is not None
    assert [str(n) for n in config.gateway.trusted_proxies.networks] == [
        "10.0.0.0/8",
        "2001:db8::/32",
        "192.0.2.7/32",
    ]
    assert config.authserver.trusted_proxies.trusts(ipaddress.ip_address("10.3.3.3"))
    bad = text.replace("192.0.2.7]", "192.0.2.7/24, nope]")
    with pytest.raises(ConfigErrors) as caught:
        parse_config(bad, {})
    assert [str(e) for e in caught.value.errors] == [
        "gateway.trusted_proxies[2]: is not a CIDR such as 10.0.0.0/8 "
        "(192.0.2.7/24 has host bits set)",
        "gateway.trusted_proxies[3]: is not a CIDR such as 10.0.0.0/8 "
        "('nope' does not appear to be an IPv4 or IPv6 network)",
    ]


def test_hostile_forwarding_headers_cost_linear_time() -> None:
    """A Forwarded value of 30,000 spaces held a worker for 15 s through a backtracking
    regex; every hostile shape here must stay cheap."""
    import time

    hostile = [
        ("Forwarded", "a" + " " * 60_000 + "b"),
        ("Forwarded", "for=" + ";" * 60_000),
        ("Forwarded", "," * 60_000),
        ("Forwarded", 'for="' + "\\" * 60_000),
    ]
    for header in hostile:
        started = time.perf_counter()
        origin("10.1.2.3", header)
        assert time.perf_counter() - started < 0.05, header[1][:10]
    started = time.perf_counter()
    origin("10.1.2.3", ("X-Forwarded-For", "," * 60_000 + "198.51.100.9"))
    assert time.perf_counter() - started < 0.01


def test_zone_ids_and_garbage_are_not_addresses_and_are_not_remembered() -> None:
    assert parse_address("fe80::1%eth0") is None
    assert parse_address("fe80::1%\xff") is None
    seen = origin("10.1.2.3", ("X-Forwarded-For", "fe80::1%a b"))
    assert seen.client == "10.1.2.3"
    proxies = TrustedProxies(LB.networks)
    for i in range(100):
        proxies.origin("10.1.2.3", "http", [(b"x-forwarded-for", b"x" * 1000 + b"%d" % i)])
    assert list(proxies._seen) == ["10.1.2.3"]  # only real addresses are kept


def test_a_repeated_forwarded_parameter_is_not_believed() -> None:
    seen = origin("10.1.2.3", ("Forwarded", "for=198.51.100.9;for=6.6.6.6"))
    assert seen.client == "10.1.2.3"
