"""Redirect URIs: what a client may register, and whether a request's URI is one of them.

Registration (RFC 6749 section 3.1.2, RFC 8252 sections 7.3 and 8.3, RFC 9700 section
2.1): an absolute ``https`` URI, or ``http`` only on a loopback host (``127.0.0.1``,
``[::1]``, ``localhost``); no fragment, no user information, no wildcard.

Matching is by exact string: no case folding, no percent-decoding, no dot-segment
removal, no prefix or path matching, so that nothing an attacker appends or rewrites
can survive. The one exception is RFC 8252 section 7.3: a native app listens on a port
the operating system picks, so a registered ``http`` URI on a loopback IP literal
(``127.0.0.1`` or ``[::1]``) matches a request on any port, everything else equal.
``localhost`` gets no such rule (RFC 8252 section 8.3 advises against it: a name can
resolve elsewhere); it matches exactly, port included.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

MAX_LENGTH = 2000
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
# http://{IP literal}[:port]{rest}: rest is empty or starts a path or a query
_LOOPBACK_IP = re.compile(r"http://(127\.0\.0\.1|\[::1\])(?::([1-9][0-9]{0,4}))?([/?].*)?", re.S)
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


def redirect_uri_problem(uri: str) -> str | None:
    """Why ``uri`` may not be registered as a redirect URI, or None."""
    if len(uri) > MAX_LENGTH:
        return f"is longer than {MAX_LENGTH} characters"
    if not _PRINTABLE.fullmatch(uri):
        return "must be printable ASCII without spaces (percent-encode the rest)"
    if "#" in uri:
        return "must not have a fragment (RFC 6749 section 3.1.2)"
    if "*" in uri:
        return "must be an exact URI: wildcards are not supported; list each URI"
    parts = urlsplit(uri)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        return "must be an absolute https URI (http only on 127.0.0.1, [::1] or localhost)"
    if "@" in parts.netloc:
        return "must not have user information (user@host)"
    try:
        port = parts.port
    except ValueError:
        return "has an invalid port"
    if parts.hostname is None or port == 0:
        return "has no valid host"
    if uri[: len(parts.scheme)] != parts.scheme or parts.netloc.lower() != parts.netloc:
        return "must be written in lower case up to the path (it is compared exactly)"
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        return "must use https (http only on 127.0.0.1, [::1] or localhost)"
    return None


def _loopback_form(uri: str) -> str | None:
    """``uri`` without its port when it is an http URI on a loopback IP literal."""
    m = _LOOPBACK_IP.fullmatch(uri)
    if m is None or (m.group(2) is not None and int(m.group(2)) > 65535):
        return None
    return f"http://{m.group(1)}{m.group(3) or ''}"


def matches(registered: tuple[str, ...], requested: str) -> bool:
    """Whether ``requested`` is one of the client's ``registered`` redirect URIs."""
    if requested in registered:
        return True
    loopback = _loopback_form(requested)
    if loopback is None:
        return False
    return any(_loopback_form(uri) == loopback for uri in registered)
