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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from tokengate.yamlconf import ConfigError, Node, as_str, list_of

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_HOPS = 32  # addresses walked at most: a longer list is a client's invention
_SEEN_MAX = 4096  # peer addresses whose trust is remembered
_SCHEMES = frozenset({"http", "https"})
_V4_PORT = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3}):\d{1,5}")
_V6_BRACKETS = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::\d{1,5})?")
_FORWARDED_PAIR = re.compile(r'\s*([A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*')


class Origin(NamedTuple):
    """Where a request came from, as far as it can be believed."""

    client: str | None  # the client's address (audit remote_addr, throttling)
    scheme: str  # http or https, as the client used it
    chain: tuple[str, ...]  # believed hops, client first, then proxies up to the peer


def parse_address(text: str) -> Address | None:
    """An IP address as forwarding headers write it: bare, ``a.b.c.d:port``,
    ``[v6]`` or ``[v6]:port``; None for anything else."""
    text = text.strip()
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
            known = (None, False) if address is None else (str(address), self.trusts(address))
            if len(self._seen) >= _SEEN_MAX:
                self._seen.clear()
            self._seen[text] = known
        return known

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
    """The address list and the scheme list of a trusted peer's request: from
    X-Forwarded-For/-Proto, or else from Forwarded."""
    xff: list[str] = []
    xfp: list[str] = []
    forwarded: list[str] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            xff.extend(value.decode("latin-1").split(","))
        elif name == b"x-forwarded-proto":
            xfp.extend(value.decode("latin-1").split(","))
        elif name == b"forwarded":
            forwarded.append(value.decode("latin-1"))
    if xff or not forwarded:
        return xff, xfp
    hops: list[str] = []
    schemes: list[str] = []
    for element in ",".join(forwarded).split(","):
        pairs = {k.lower(): v.strip('"') for k, v in _FORWARDED_PAIR.findall(element)}
        hops.append(pairs.get("for", ""))  # an element without for= ends the walk there
        if "proto" in pairs:
            schemes.append(pairs["proto"])
    return hops, schemes


def as_network(node: Node) -> Network:
    """A CIDR such as ``10.0.0.0/8`` or ``2001:db8::/32``; a bare address is /32 or /128."""
    text = as_str(node)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(node.path, f"is not a CIDR such as 10.0.0.0/8 ({exc})") from None


def as_trusted_proxies(node: Node) -> TrustedProxies:
    return TrustedProxies(list_of(as_network)(node))
