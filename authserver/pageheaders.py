"""The security headers of every hosted page (sign-in, second factor, consent,
logout): no framing, no referrer, no caching, and a CSP that allows the page's own
stylesheet and forms that post to itself (and, for a form whose answer redirects to
the client, to the client's origin); pages that offer a passkey also run the pages'
own script, and no other."""

from __future__ import annotations

from urllib.parse import urlsplit

from tokengate.asgi import Headers

HTML = (b"content-type", b"text/html; charset=utf-8")
PAGE_HEADERS: Headers = [
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"pragma", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
]
_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' https:; form-action 'self'{extra}; "
    "frame-ancestors 'none'; base-uri 'none'{script}"
)


def page_headers(form_target: str | None = None, *, script: bool = False) -> Headers:
    """The security headers of every page; ``form_target``: the origin a form_post
    response's form may post to; ``script``: the page runs the pages' own script (a
    passkey's WebAuthn calls), and no other."""
    csp = _CSP.format(
        extra=f" {form_target}" if form_target else "",
        script="; script-src 'self'" if script else "",
    )
    return [(b"content-security-policy", csp.encode()), *PAGE_HEADERS]


def origin_of(uri: str) -> str:
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}"
