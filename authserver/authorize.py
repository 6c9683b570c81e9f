"""The authorization request (RFC 6749 section 4.1.1, OIDC Core 3.1.2.1) as a chain
of pure checks over its parameters. No HTTP here: parameters in, an
:class:`AuthorizeRequest` or an error out.

Which errors may be redirected is decided in one place. Until ``client_id`` and
``redirect_uri`` are both known good, an error is a :class:`PageError`: shown to the
user, never sent to a URI nobody vouched for (RFC 6749 section 4.1.2.1, RFC 9700
section 4.11). After that, an error is a :class:`RedirectError` that carries where and
how to deliver it (``state`` echoed, ``iss`` added: RFC 9207).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from html import escape
from typing import Literal
from urllib.parse import urlencode

from authserver.config import OIDC_SCOPES, SCOPE_TOKEN, ClientConfig, ServerConfig
from authserver.errors import OAuthError
from authserver.pkce import parse_challenge
from authserver.redirect_uris import matches

ResponseMode = Literal["query", "fragment", "form_post"]
Prompt = Literal["none", "login"]
RESPONSE_MODES: tuple[ResponseMode, ...] = ("query", "fragment", "form_post")
RESPONSE_TYPES = ("code",)
IMPLICIT_TYPES = ("id_token", "id_token token")  # OIDC Core 3.2: opt-in, deprecated
MAX_STATE = 2048  # characters of state, nonce and login_hint accepted
MAX_NONCE = 512
MAX_LOGIN_HINT = 256
MAX_ID_TOKEN_HINT = 8192
MAX_CLAIMS_PARAMETER = 4096
MAX_SCOPES = 100


Fail = Callable[[str, str], "RedirectError"]


class PageError(Exception):
    """An error before the client and redirect URI are known good: an error page."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how a response goes back to the client."""

    redirect_uri: str
    response_mode: ResponseMode
    state: str | None
    issuer: str

    def params(self, **values: str) -> dict[str, str]:
        """The response's parameters: ``values``, then ``state`` and ``iss``."""
        out = dict(values)
        if self.state is not None:
            out["state"] = self.state
        out["iss"] = self.issuer
        return out


class RedirectError(Exception):
    """An error to send to the client's redirect URI (RFC 6749 section 4.1.2.1)."""

    def __init__(self, target: Target, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.target = target
        self.error = error
        self.description = description

    def params(self) -> dict[str, str]:
        return self.target.params(error=self.error, error_description=self.description)


@dataclass(frozen=True, slots=True)
class AuthorizeRequest:
    """A validated authorization request: everything the rest of the flow needs."""

    server: ServerConfig
    client: ClientConfig
    target: Target
    scopes: tuple[str, ...]
    nonce: str | None  # required for the implicit flow
    code_challenge: str | None
    prompt: Prompt | None
    max_age: int | None
    login_hint: str | None
    id_token_hint: str | None = None  # checked against the keys by the caller
    ask_consent: bool = False  # prompt=consent: ask again, even if granted before
    response_type: str = "code"  # or one of IMPLICIT_TYPES
    id_token_claims: tuple[str, ...] = ()  # the claims parameter's id_token member
    acr_values: tuple[str, ...] = ()  # OIDC Core 3.1.2.1, in order of preference

    @property
    def implicit(self) -> bool:
        return self.response_type != "code"


def client_scopes(server: ServerConfig, client: ClientConfig) -> frozenset[str]:
    """What the client may ask this server for: the server's scopes and the built-in
    OIDC scopes, narrowed to the client's list when it has one. ``offline_access``
    only for a client that may use refresh tokens."""
    offered = frozenset(server.scopes) | frozenset(OIDC_SCOPES)
    if "refresh_token" not in client.grant_types:
        offered -= {"offline_access"}
    return offered if client.scopes is None else offered & frozenset(client.scopes)


def default_user_scopes(server: ServerConfig, offered: frozenset[str]) -> tuple[str, ...]:
    """A user grant that asks for no scope (the password grant): every one offered, in
    the order OIDC's then the server's own."""
    return tuple(s for s in (*OIDC_SCOPES, *server.scopes) if s in offered)


def parse_authorize(
    server: ServerConfig,
    clients: Mapping[str, ClientConfig],
    params: Mapping[str, str],
    repeated: Collection[str] = (),
) -> AuthorizeRequest:
    """Check an authorization request's parameters (empty values already dropped;
    ``repeated``: the names sent more than once)."""
    client, redirect_uri = _client_and_redirect(server, clients, params, repeated)
    mode = params.get("response_mode")
    response_type = _response_type(params.get("response_type"))
    # where errors go too: tokens never in a query (OAuth 2.0 Multiple Response Types 5)
    default: ResponseMode = "fragment" if response_type in IMPLICIT_TYPES else "query"
    delivery: ResponseMode = mode if mode in ("form_post", "fragment") else default  # type: ignore[assignment]
    target = Target(
        redirect_uri=redirect_uri,
        response_mode=default if "response_mode" in repeated else delivery,
        state=None if "state" in repeated else params.get("state"),
        issuer=server.issuer,
    )

    def fail(error: str, description: str) -> RedirectError:
        return RedirectError(target, error, description)

    if "request" in params:
        raise fail("request_not_supported", "request objects are not supported")
    if "request_uri" in params:
        raise fail("request_uri_not_supported", "request_uri is not supported")
    if repeated:
        raise fail("invalid_request", f"{sorted(repeated)[0]} was sent more than once")
    if target.state is not None and len(target.state) > MAX_STATE:
        raise fail("invalid_request", f"state is longer than {MAX_STATE} characters")
    if response_type is None:
        raise fail("invalid_request", "response_type is required")
    if response_type not in (*RESPONSE_TYPES, *IMPLICIT_TYPES):
        raise fail(
            "unsupported_response_type",
            "response_type must be code (or, for an implicit client, id_token or id_token token)",
        )
    if mode is not None and mode not in RESPONSE_MODES:
        raise fail("invalid_request", "response_mode must be query, fragment or form_post")
    implicit = response_type in IMPLICIT_TYPES
    if implicit and mode == "query":
        raise fail("invalid_request", "tokens are never sent in a query: use fragment or form_post")
    grant = "implicit" if implicit else "authorization_code"
    if grant not in client.grant_types:
        raise fail("unauthorized_client", f"the client may not use the {grant} flow")
    scopes = _scopes(server, client, params.get("scope"), fail)
    challenge = None
    if not implicit:
        try:
            challenge = parse_challenge(
                params.get("code_challenge"),
                params.get("code_challenge_method"),
                required=client.require_pkce or client.public,
            )
        except OAuthError as exc:
            raise fail(exc.error, exc.description) from None
    nonce = params.get("nonce")
    if nonce is not None and len(nonce) > MAX_NONCE:
        raise fail("invalid_request", f"nonce is longer than {MAX_NONCE} characters")
    if implicit and (nonce is None or "openid" not in scopes):
        raise fail("invalid_request", "the implicit flow needs the openid scope and a nonce")
    login_hint = params.get("login_hint")
    if login_hint is not None and len(login_hint) > MAX_LOGIN_HINT:
        login_hint = None  # a hint only: too long to be a username, so no hint
    id_token_hint = params.get("id_token_hint")
    if id_token_hint is not None and len(id_token_hint) > MAX_ID_TOKEN_HINT:
        raise fail("invalid_request", "id_token_hint is too long")
    return AuthorizeRequest(
        server=server,
        client=client,
        target=target,
        scopes=scopes,
        nonce=nonce,
        code_challenge=challenge,
        prompt=_prompt(params.get("prompt"), fail),
        max_age=_max_age(params.get("max_age"), fail),
        login_hint=login_hint,
        id_token_hint=id_token_hint,
        ask_consent="consent" in (params.get("prompt") or "").split(),
        response_type=response_type,
        id_token_claims=_requested_claims(params.get("claims"), fail),
        acr_values=tuple((params.get("acr_values") or "").split()[:MAX_ACR_VALUES]),
    )


MAX_ACR_VALUES = 10  # an acr_values parameter's values looked at


def _requested_claims(raw: str | None, fail: Fail) -> tuple[str, ...]:
    """The ``claims`` parameter (OIDC Core 5.5): the names its ``id_token`` member asks
    for. Claims are given when the user has them, essential or not; the ``userinfo``
    member and ``value``/``values`` constraints are accepted and not acted on."""
    if raw is None:
        return ()
    if len(raw) > MAX_CLAIMS_PARAMETER:
        raise fail("invalid_request", "claims is too long")
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise fail("invalid_request", "claims is not a JSON object") from None
    if not isinstance(parsed, dict) or not all(
        member is None or isinstance(member, dict) for member in parsed.values()
    ):
        raise fail("invalid_request", "claims is not a JSON object of objects")
    wanted = parsed.get("id_token") or {}
    return tuple(name for name in wanted if isinstance(name, str))[:MAX_SCOPES]


def _response_type(raw: str | None) -> str | None:
    """The response type with its words in our order (OAuth 2.0 Multiple Response
    Types 2: the order does not matter); None when absent."""
    if raw is None:
        return None
    words = raw.split()
    if sorted(words) == ["id_token", "token"]:
        return "id_token token"
    return raw


def _client_and_redirect(
    server: ServerConfig,
    clients: Mapping[str, ClientConfig],
    params: Mapping[str, str],
    repeated: Collection[str],
) -> tuple[ClientConfig, str]:
    """The checks whose failures are never redirected."""
    if "client_id" in repeated or "redirect_uri" in repeated:
        raise PageError("invalid_request", "client_id or redirect_uri was sent more than once")
    client_id = params.get("client_id")
    if client_id is None:
        raise PageError("invalid_request", "client_id is required")
    client = clients.get(client_id)
    if client is None or server.name not in client.servers:
        raise PageError("invalid_client", "unknown client")
    redirect_uri = params.get("redirect_uri")
    if redirect_uri is None:
        raise PageError("invalid_request", "redirect_uri is required")
    if not matches(client.redirect_uris, redirect_uri):
        raise PageError("invalid_request", "redirect_uri is not registered for this client")
    return client, redirect_uri


def _scopes(
    server: ServerConfig, client: ClientConfig, raw: str | None, fail: Fail
) -> tuple[str, ...]:
    if raw is None:
        raise fail("invalid_scope", "scope is required")
    out: dict[str, None] = {}
    for token in raw.split(" "):
        if token and token not in out:
            if not SCOPE_TOKEN.fullmatch(token) or len(out) >= MAX_SCOPES:
                raise fail("invalid_scope", "scope is malformed or too long")
            out[token] = None
    if not out:
        raise fail("invalid_scope", "scope is required")
    allowed = client_scopes(server, client)
    refused = [s for s in out if s not in allowed]
    if refused:
        raise fail("invalid_scope", "a scope is not allowed for this client")
    return tuple(out)


def _prompt(raw: str | None, fail: Fail) -> Prompt | None:
    """``none`` (alone) or ``login``; ``consent`` is the request's ``ask_consent``, and
    ``select_account`` asks for nothing more here (one account per session)."""
    if raw is None:
        return None
    values = set(raw.split())
    if "none" in values:
        if len(values) > 1:
            raise fail("invalid_request", "prompt=none cannot be combined")
        return "none"
    return "login" if "login" in values else None


def _max_age(raw: str | None, fail: Fail) -> int | None:
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 10:
        raise fail("invalid_request", "max_age must be a number of seconds")
    return int(raw)


def redirect_location(target: Target, params: Mapping[str, str]) -> str:
    """``response_mode=query``: the redirect URI with ``params`` added to its query;
    ``fragment``: as its fragment (redirect URIs have none of their own)."""
    if target.response_mode == "fragment":
        return target.redirect_uri + "#" + urlencode(params)
    joiner = "&" if "?" in target.redirect_uri else "?"
    return target.redirect_uri + joiner + urlencode(params)


def form_post_page(target: Target, params: Mapping[str, str]) -> bytes:
    """``response_mode=form_post`` (OAuth 2.0 Form Post Response Mode): a page whose
    form posts ``params`` to the redirect URI. No script is allowed to run (CSP), so the
    user presses the one button; the page says what it is for."""
    inputs = "".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">' for k, v in params.items()
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>Continue</title></head><body>"
        f'<form method="post" action="{escape(target.redirect_uri)}">{inputs}'
        '<button type="submit" autofocus>Continue to the application</button>'
        "</form></body></html>"
    ).encode()
