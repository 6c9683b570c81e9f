"""One canonical request path, used both to match routes and to forward. Pure.

The raw request target is percent-decoded only where that cannot change meaning
(unreserved characters, RFC 3986 section 2.3), dot segments are removed (section
5.2.4) and repeated slashes merged. Everything that different servers interpret
differently is refused rather than guessed at: encoded ``/`` and ``\\``, raw ``\\``,
control bytes, ``;`` path parameters (unless allowed), invalid or overlong UTF-8,
and dot segments, plain or encoded, that climb above the root.
"""

from __future__ import annotations

import re

_HEX = frozenset(b"0123456789abcdefABCDEF")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Bytes allowed raw in a path segment (RFC 3986 pchar without pct-encoded).
_PCHAR = _UNRESERVED | frozenset(b"!$&'()*+,;=:@")


# Paths with nothing to decode, refuse or remove: no %, ;, \\, control bytes, empty
# segments, or segments starting with a dot. Most requests take only this check.
_PLAIN = re.compile(rb"(?:/[A-Za-z0-9\-_~!$&'()*+,=:@][A-Za-z0-9\-._~!$&'()*+,=:@]*)+/?|/")


class BadPath(ValueError):
    """The path is refused with 400; ``str()`` says why, for logs only."""


def canonical_path(raw: bytes, *, allow_path_parameters: bool = False) -> str:
    """``raw`` (the request target's path, still percent-encoded) -> canonical path."""
    if _PLAIN.fullmatch(raw):
        return raw.decode("ascii")
    if not raw.startswith(b"/"):
        raise BadPath("not an absolute path")
    segments: list[str] = []
    segment = ""
    for raw_segment in raw[1:].split(b"/"):
        segment = _segment(raw_segment, allow_path_parameters)
        if segment == ".":
            continue
        if segment == "..":
            if not segments:
                raise BadPath("dot segments climb above the root")
            segments.pop()
            continue
        if segment:  # repeated slashes merge
            segments.append(segment)
    path = "/" + "/".join(segments)
    if segments and segment in ("", ".", ".."):  # "/a/", "/a/b/.." and "/a/." end in "/"
        path += "/"
    return path


def _segment(raw: bytes, allow_path_parameters: bool) -> str:
    if not raw:
        return ""
    if all(byte in _PCHAR for byte in raw) and b";" not in raw and b"%" not in raw:
        return raw.decode("ascii")  # the common case: nothing to decode or refuse
    out = bytearray()
    decoded = bytearray()  # every byte the segment stands for, to check UTF-8
    i, n = 0, len(raw)
    while i < n:
        byte = raw[i]
        encoded = byte == 0x25  # %
        if encoded:
            if i + 2 >= n or raw[i + 1] not in _HEX or raw[i + 2] not in _HEX:
                raise BadPath("malformed percent-encoding")
            byte = int(raw[i + 1 : i + 3], 16)
            i += 3
            if byte == 0x2F:
                raise BadPath("encoded slash")
        else:
            i += 1
        # the same rules whether the byte came raw or percent-encoded
        if byte == 0x5C:
            raise BadPath("backslash")
        if byte < 0x20 or byte == 0x7F:
            raise BadPath("control byte")
        if byte == 0x3B and not allow_path_parameters:
            raise BadPath("; path parameter")
        decoded.append(byte)
        if byte in _UNRESERVED or (not encoded and byte in _PCHAR):
            out.append(byte)
        else:  # reserved when encoded, or raw bytes no path may hold: keep them encoded
            out += b"%%%02X" % byte
    try:
        decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("invalid UTF-8") from None
    segment = out.decode("ascii")
    if b";" in decoded and decoded.split(b";", 1)[0] in (b".", b".."):
        raise BadPath("dot segment with path parameters")  # Tomcat reads "..;" as ".."
    return segment
