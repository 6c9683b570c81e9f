"""Who the client is behind trusted proxies. Pure.

A listener sees its peer's address. Behind a load balancer that address is the
balancer's, and the client's travels in ``X-Forwarded-For`` (or RFC 7239 ``Forwarded``)
and its scheme in ``X-Forwarded-Proto``. Anyone can send those headers, so they are
believed only from the peers ``trusted_proxies`` lists (CIDRs), the way Envoy's
``xff_num_trusted_hops`` and Kong's ``trusted_ips`` with ``real_ip_recursive`` work:

- The peer is not trusted (or nothing is): the client is the peer, the scheme the
  listener's own; the headers are ignored.
- The peer is trusted: the address list (``X-Forwarded-For``, several header lines in
  order, or else ``Forwarded``'s ``for=``) is walked right to left, from the hop nearest
  to tokengate. Each trusted address is skipped; the first one that is not trusted is
  the client. Something that is not an address (``unknown``, an obfuscated
  ``_hidden``, garbage) ends the walk: the last trusted hop is the client. Everything
  left of the client is what the client claimed, and is dropped.
- The scheme is the nearest hop's ``X-Forwarded-Proto`` (or ``Forwarded``'s
  ``proto=``), when it is ``http`` or ``https``.

``X-Forwarded-For`` wins when a request carries both: it is what nearly every load
balancer appends to. A proxy that writes only ``Forwarded`` must remove the
``X-Forwarded-For`` its clients send (as nginx, Envoy and HAProxy can).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from tokengate.yamlconf import ConfigError, Node, as_str, list_of

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_HOPS = 32  # addresses walked at most: a longer list is a client's invention
_SEEN_MAX = 4096  # peer addresses whose trust is remembered
_SCHEMES = frozenset({"http", "https"})
_V4_PORT = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3}):\d{1,5}")
_V6_BRACKETS = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::\d{1,5})?")
_MAX_ADDRESS = 64  # characters: "[ffff:...:255.255.255.255]:65535" fits well within


class Origin(NamedTuple):
    """Where a request came from, as far as it can be believed."""

    client: str | None  # the client's address (audit remote_addr, throttling)
    scheme: str  # http or https, as the client used it
    chain: tuple[str, ...]  # believed hops, client first, then proxies up to the peer


def parse_address(text: str) -> Address | None:
    """An IP address as forwarding headers write it: bare, ``a.b.c.d:port``,
    ``[v6]`` or ``[v6]:port``; None for anything else."""
    text = text.strip()
    if len(text) > _MAX_ADDRESS or "%" in text:  # garbage, or a zone id: not a client's
        return None
    if (match := _V4_PORT.fullmatch(text)) or (match := _V6_BRACKETS.fullmatch(text)):
        text = match.group(1)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    return address


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    networks: tuple[Network, ...] = ()
    # address text -> (the address, normalized, or None; trusted?): balancers and
    # recent clients, seen on every request, are parsed once
    _seen: dict[str, tuple[str | None, bool]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def trusts(self, address: Address) -> bool:
        return any(address in network for network in self.networks)

    def _read(self, text: str) -> tuple[str | None, bool]:
        known = self._seen.get(text)
        if known is None:
            address = parse_address(text)
            if address is None:
                return None, False  # not kept: garbage must not fill the map
            known = (str(address), self.trusts(address))
            if len(self._seen) >= _SEEN_MAX:
                self._seen.clear()
            self._seen[text] = known
        return known

    def origin_of(self, scope: Mapping[str, Any]) -> Origin:
        """The client of an ASGI HTTP request."""
        client = scope.get("client")
        return self.origin(
            client[0] if client else None, scope.get("scheme", "http"), scope["headers"]
        )

    def origin(
        self, peer: str | None, scheme: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> Origin:
        """The client of a request from ``peer`` carrying ``headers`` (ASGI pairs)."""
        if not self.networks or peer is None or not self._read(peer)[1]:
            return Origin(peer, scheme, (peer,) if peer else ())
        hops, schemes = _forwarded_hops(headers)
        client = peer
        believed = [peer]
        for hop in reversed(hops[-MAX_HOPS:]):
            address, trusted = self._read(hop.strip())
            if address is None:
                break
            client = address
            believed.append(address)
            if not trusted:
                break
        nearest = schemes[-1].strip().lower() if schemes else ""
        return Origin(client, nearest if nearest in _SCHEMES else scheme, tuple(reversed(believed)))


NO_PROXIES = TrustedProxies()  # the default: every forwarding header is the client's


def _forwarded_hops(headers: Iterable[tuple[bytes, bytes]]) -> tuple[list[str], list[str]]:
    """The last hops (at most MAX_HOPS) and the nearest scheme of a trusted peer's
    request: from X-Forwarded-For/-Proto, or else from Forwarded. Linear in the headers'
    size, whatever they hold: only the last elements are split off."""
    xff: list[bytes] = []
    xfp: list[bytes] = []
    forwarded: list[bytes] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            xff.append(value)
        elif name == b"x-forwarded-proto":
            xfp.append(value)
        elif name == b"forwarded":
            forwarded.append(value)
    if xff or not forwarded:
        return _last(xff, MAX_HOPS), _last(xfp, 1)
    hops: list[str] = []
    schemes: list[str] = []
    for element in _last(forwarded, MAX_HOPS):
        pairs = _forwarded_pairs(element)
        hops.append(pairs.get("for", ""))  # no for= (or a malformed element) ends the walk
        if "proto" in pairs:
            schemes.append(pairs["proto"])
    return hops, schemes


def _last(lines: list[bytes], count: int) -> list[str]:
    """The last ``count`` comma-separated elements of header lines taken in order."""
    if not lines:
        return []
    parts = b",".join(lines).decode("latin-1").rsplit(",", count)
    return parts[-count:]


def _forwarded_pairs(element: str) -> dict[str, str]:
    """An RFC 7239 element's parameters, names lowercased and quotes removed; empty
    when a parameter repeats or has no ``=`` (then nothing in it is believed)."""
    pairs: dict[str, str] = {}
    for pair in element.split(";"):
        name, equals, value = pair.partition("=")
        name = name.strip().lower()
        if not equals or not name or name in pairs:
            return {}
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        pairs[name] = value
    return pairs


def as_network(node: Node) -> Network:
    """A CIDR such as ``10.0.0.0/8`` or ``2001:db8::/32``; a bare address is /32 or /128."""
    text = as_str(node)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(node.path, f"is not a CIDR such as 10.0.0.0/8 ({exc})") from None


def as_trusted_proxies(node: Node) -> TrustedProxies:
    return TrustedProxies(list_of(as_network)(node))
