"""Redirect URIs: registration rules and exact matching against an attack corpus."""

from __future__ import annotations

import pytest

from authserver.redirect_uris import matches, redirect_uri_problem

REGISTERED = (
    "https://portal.example.com/callback",
    "https://portal.example.com/cb?tenant=acme",
    "http://127.0.0.1/callback",
    "http://[::1]:8000/native",
    "http://localhost:3000/callback",
)


@pytest.mark.parametrize(
    "uri",
    [
        "https://portal.example.com/callback",
        "https://portal.example.com:8443/cb?x=1",
        "https://portal.example.com",
        "http://127.0.0.1/callback",
        "http://127.0.0.1:51004/callback",
        "http://[::1]/callback",
        "http://localhost:3000/callback",
        "https://portal.example.com/a%20b",
    ],
)
def test_what_may_be_registered(uri: str) -> None:
    assert redirect_uri_problem(uri) is None


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("http://portal.example.com/callback", "must use https"),
        ("http://127.0.0.2/callback", "must use https"),
        ("http://localhost.evil.com/callback", "must use https"),
        ("https://portal.example.com/callback#frag", "fragment"),
        ("https://portal.example.com/callback#", "fragment"),
        ("https://*.example.com/callback", "wildcards"),
        ("https://user@portal.example.com/callback", "user information"),
        ("https://user:pw@portal.example.com/callback", "user information"),
        ("/callback", "absolute"),
        ("portal.example.com/callback", "absolute"),
        ("javascript:alert(1)", "absolute"),
        ("data:text/html,hi", "absolute"),
        ("com.example.app:/callback", "absolute"),
        ("ftp://portal.example.com/callback", "absolute"),
        ("https:///callback", "absolute"),
        ("https://portal.example.com:99999/callback", "invalid port"),
        ("https://portal.example.com:x/callback", "invalid port"),
        ("https://portal.example.com/call back", "printable"),
        ("https://portal.example.com/\u00e9", "printable"),
        ("https://portal.example.com/\r\nx", "printable"),
        ("HTTPS://portal.example.com/callback", "lower case"),
        ("https://Portal.example.com/callback", "lower case"),
        ("https://portal.example.com/" + "a" * 2000, "longer than"),
    ],
)
def test_what_may_not_be_registered(uri: str, words: str) -> None:
    problem = redirect_uri_problem(uri)
    assert problem is not None and words in problem


@pytest.mark.parametrize(
    "requested",
    [
        "https://portal.example.com/callback",
        "https://portal.example.com/cb?tenant=acme",
        "http://127.0.0.1/callback",
        "http://127.0.0.1:1/callback",
        "http://127.0.0.1:51004/callback",
        "http://127.0.0.1:65535/callback",
        "http://[::1]:8000/native",
        "http://[::1]/native",  # registered with a port: any port still (RFC 8252 7.3)
        "http://[::1]:9/native",
        "http://localhost:3000/callback",
    ],
)
def test_what_matches(requested: str) -> None:
    assert matches(REGISTERED, requested)


@pytest.mark.parametrize(
    "requested",
    [
        # unregistered
        "https://evil.example/callback",
        "https://portal.example.com/other",
        # prefix and suffix games
        "https://portal.example.com/callback/",
        "https://portal.example.com/callback/extra",
        "https://portal.example.com/callbackx",
        "https://portal.example.com/callback?x=1",
        "https://portal.example.com/callback?",
        "https://portal.example.com/cb",
        "https://portal.example.com/cb?tenant=acme&x=1",
        "https://portal.example.com/cb?tenant=evil",
        "https://portal.example.com.evil.example/callback",
        "https://portal.example.co/callback",
        # path traversal, plain and encoded
        "https://portal.example.com/callback/../evil",
        "https://portal.example.com/x/../callback",
        "https://portal.example.com/./callback",
        "https://portal.example.com/callback/%2e%2e/evil",
        "https://portal.example.com/%63allback",
        "https://portal.example.com//callback",
        # userinfo: the host is what follows @
        "https://portal.example.com@evil.example/callback",
        "https://portal.example.com:443@evil.example/callback",
        "http://127.0.0.1@evil.example/callback",
        "http://127.0.0.1:80@evil.example/callback",
        # other port, scheme or host
        "https://portal.example.com:443/callback",
        "https://portal.example.com:8443/callback",
        "http://portal.example.com/callback",
        "HTTPS://portal.example.com/callback",
        "https://PORTAL.example.com/callback",
        "https://portal.example.com./callback",
        "wss://portal.example.com/callback",
        # fragments
        "https://portal.example.com/callback#",
        "https://portal.example.com/callback#x",
        "http://127.0.0.1:5000/callback#x",
        # loopback rule: only the port may differ, only for IP literals
        "http://127.0.0.1:0/callback",
        "http://127.0.0.1:65536/callback",
        "http://127.0.0.1:080/callback",
        "http://127.0.0.1:/callback",
        "http://127.0.0.1:5000/callback/",
        "http://127.0.0.1:5000/other",
        "https://127.0.0.1:5000/callback",
        "http://127.0.0.2:5000/callback",
        "http://[::1]:5000/callback",  # registered only on 127.0.0.1
        "http://127.0.0.1:5000/native",  # registered only on [::1]
        "http://localhost:3001/callback",  # localhost: exact, port included
        "http://localhost/callback",
        "http://127.0.0.1:3000/callback/../callback",
        # whitespace and control characters
        " https://portal.example.com/callback",
        "https://portal.example.com/callback ",
        "https://portal.example.com/callback\n",
        "",
    ],
)
def test_what_does_not_match(requested: str) -> None:
    assert not matches(REGISTERED, requested)


def test_nothing_matches_a_client_without_redirect_uris() -> None:
    assert not matches((), "http://127.0.0.1:5000/callback")
    assert not matches((), "")
