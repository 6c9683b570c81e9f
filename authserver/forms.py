"""Strict ``application/x-www-form-urlencoded`` request bodies (RFC 6749 appendix B)."""

from __future__ import annotations

from urllib.parse import parse_qsl

from authserver.errors import invalid_request
from tokengate.asgi import BodyTooLarge, Receive, Scope, header, read_body

# Parameters that may legitimately repeat (RFC 8707 section 2).
REPEATABLE = frozenset({"resource"})
# Parameters an error description may name; any other name is client input, not echoed.
KNOWN_PARAMETERS = frozenset(
    {
        "grant_type",
        "scope",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "token",
        "token_type_hint",
        "audience",
    }
)


class Form:
    """Parsed parameters; empty values count as omitted (RFC 6749 section 3.1)."""

    __slots__ = ("repeated", "values")

    def __init__(self, values: dict[str, str], repeated: dict[str, list[str]]) -> None:
        self.values = values
        self.repeated = repeated

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    def all(self, name: str) -> list[str]:
        return self.repeated.get(name, [])


def parse_form(body: bytes) -> Form:
    try:
        text = body.decode("ascii")
        pairs = parse_qsl(text, keep_blank_values=False, encoding="utf-8", errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise invalid_request("the body is not valid UTF-8 form-urlencoded data") from None
    values: dict[str, str] = {}
    repeated: dict[str, list[str]] = {}
    for name, value in pairs:
        if name in REPEATABLE:
            repeated.setdefault(name, []).append(value)
            values.setdefault(name, value)
        elif name in values:
            shown = f"parameter {name}" if name in KNOWN_PARAMETERS else "a parameter"
            raise invalid_request(f"{shown} is repeated")
        else:
            values[name] = value
    return Form(values, repeated)


async def read_form(scope: Scope, receive: Receive, limit: int) -> Form:
    """Check the content type, read at most ``limit`` bytes, and parse."""
    content_type = (header(scope, b"content-type") or b"").split(b";", 1)[0].strip().lower()
    if content_type != b"application/x-www-form-urlencoded":
        raise invalid_request("the body must be application/x-www-form-urlencoded")
    length = header(scope, b"content-length")
    try:
        if length is not None and length.isdigit() and int(length) > limit:
            raise BodyTooLarge
        body = await read_body(receive, limit)
    except BodyTooLarge:
        raise invalid_request(f"the body is larger than {limit} bytes", status=413) from None
    return parse_form(body)
