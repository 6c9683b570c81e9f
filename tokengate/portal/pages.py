"""The portal's pages: Jinja2 templates (autoescaped, no script, no inline style), the
stylesheet, and the headers every answer carries.

The Content-Security-Policy allows forms to post only to the portal itself, and their
redirects to go only to the portal and the issuer (browsers check a form's redirects
against ``form-action`` too: "Sign out" posts here and is sent on to the issuer's
logout endpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import jinja2

from tokengate.asgi import Headers

HTML = (b"content-type", b"text/html; charset=utf-8")
_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self' {issuer}; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_SECURITY: Headers = [
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),  # the callback's URL holds a code
    (b"cache-control", b"no-store"),
    (b"pragma", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
]


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True, slots=True)
class Paths:
    """Where the portal's pages are, under its public URL's path."""

    home: str
    login: str
    callback: str
    api: str
    logout: str
    stylesheet: str

    @classmethod
    def of(cls, public_url: str) -> Paths:
        base = urlsplit(public_url).path.rstrip("/")
        return cls(
            home=f"{base}/",
            login=f"{base}/login",
            callback=f"{base}/callback",
            api=f"{base}/api",
            logout=f"{base}/logout",
            stylesheet=f"{base}/static/portal.css",
        )


class Pages:
    def __init__(self, paths: Paths, issuer: str, api_url: str) -> None:
        self.paths = paths
        self.issuer = issuer
        self.api_url = api_url
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("tokengate.portal", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            auto_reload=False,  # no file checks on the event loop
        )
        self.stylesheet = (
            resources.files("tokengate.portal").joinpath("static/portal.css").read_bytes()
        )
        csp = _CSP.format(issuer=origin(issuer)).encode("ascii")
        self.headers: Headers = [(b"content-security-policy", csp), *_SECURITY]

    def render(self, template: str, **context: Any) -> bytes:
        page = self.templates.get_template(template)
        return page.render(
            paths=self.paths, issuer=self.issuer, api_url=self.api_url, **context
        ).encode("utf-8")
