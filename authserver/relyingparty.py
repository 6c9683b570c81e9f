"""The WebAuthn relying party of the public URL. Pure.

Browsers offer passkeys only in a secure context and never to an IP address, so
:func:`relying_party` gives None for a public URL on plain ``http://`` other than
``localhost``, or on an IP address: no page offers passkeys there, and a
``passwordless`` sign-on policy is refused at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_address
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class RelyingParty:
    id: str  # the public URL's host
    origin: str  # the public URL's origin, as browsers spell it
    name: str  # shown by the authenticator (the brand's name)


def relying_party(public_url: str, name: str) -> RelyingParty | None:
    """The relying party of a public URL; None where browsers allow no passkeys: plain
    ``http://`` other than ``localhost`` (not a secure context), or an IP address
    (never an RP id)."""
    parts = urlsplit(public_url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host or _is_ip(host):
        return None
    local = host == "localhost" or host.endswith(".localhost")
    if parts.scheme != "https" and not local:
        return None
    port = parts.port
    default = 443 if parts.scheme == "https" else 80
    origin = f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")
    return RelyingParty(host, origin, name)


def _is_ip(host: str) -> bool:
    try:
        ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True
