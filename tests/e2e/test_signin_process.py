"""A real ``tokengate run`` signs a user in: the browser's part driven with httpx
(authorize -> the sign-in form -> POST -> follow the 303), the app's part with
Authlib's OAuth2Client (PKCE code exchange), the ID token checked with PyJWT against
the JWKS as a relying party does (iss, aud, nonce, at_hash)."""

from __future__ import annotations

import base64
import hashlib
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import jwt
from authlib.integrations.httpx_client import OAuth2Client
from authlib.jose import JsonWebKey, JsonWebToken
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken

from authserver.passwords import hash_password
from tests.asgi.test_signin_flow import Form
from tests.e2e.conftest import e2e_config, free_port

PORTAL_SECRET = "portal-secret-0123456789abcdefghijklmnop"
CALLBACK = "https://portal.example.com/callback"
HOME = "https://portal.example.com/"


def test_a_user_signs_in_to_a_web_app(tokengate: Any, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    issuer = f"{base}/oauth2/default"
    config = e2e_config(
        tmp_path / "data",
        port,
        users=[
            {
                "username": "alice",
                "password_hash": hash_password("alice-password"),
                "profile": {"name": "Alice Doe", "email": "alice@example.com"},
            }
        ],
    )
    config["authserver"]["clients"].append(
        {
            "client_id": "portal",
            "secret": PORTAL_SECRET,
            "grant_types": ["authorization_code", "refresh_token"],
            "redirect_uris": [CALLBACK],
            "post_logout_redirect_uris": [HOME],
            "scopes": ["openid", "profile", "email", "orders:read"],
        }
    )
    config["audit"] = {"path": str(tmp_path / "audit.log")}
    process = tokengate(config)
    process.start(f"{issuer}/v1/keys")
    metadata = httpx.get(f"{issuer}/.well-known/openid-configuration").json()

    verifier = secrets.token_urlsafe(48)
    nonce = secrets.token_urlsafe(16)
    with OAuth2Client(
        "portal",
        PORTAL_SECRET,
        scope="openid profile email orders:read",
        redirect_uri=CALLBACK,
        code_challenge_method="S256",
        token_endpoint_auth_method="client_secret_basic",
    ) as app:
        url, state = app.create_authorization_url(
            metadata["authorization_endpoint"], code_verifier=verifier, nonce=nonce
        )
        assert f"code_challenge={create_s256_code_challenge(verifier)}" in url

        with httpx.Client(follow_redirects=False) as browser:  # the user's browser
            to_page = browser.get(url)
            assert to_page.status_code == 303
            page = browser.get(urljoin(base, to_page.headers["location"]))
            assert page.status_code == 200
            form = Form(page.text)
            signed_in = browser.post(
                urljoin(base, form.action),
                data={**form.fields, "username": "alice", "password": "alice-password"},
            )
            assert signed_in.status_code == 303
            callback = signed_in.headers["location"]
        assert callback.startswith(CALLBACK + "?")
        returned = parse_qs(urlsplit(callback).query)
        assert returned["state"] == [state] and returned["iss"] == [issuer]

        token = app.fetch_token(
            metadata["token_endpoint"], authorization_response=callback, code_verifier=verifier
        )
        assert token["token_type"] == "Bearer"
        info = app.get(metadata["userinfo_endpoint"]).json()
        # Authlib's refresh (RFC 6749 section 6): a new access token and a new refresh token
        refreshed = app.refresh_token(metadata["token_endpoint"])
        assert refreshed["refresh_token"] != token["refresh_token"]
        assert refreshed["access_token"] != token["access_token"]
        assert app.get(metadata["userinfo_endpoint"]).json() == info
        # the retired refresh token, presented again: refused, and the family is revoked
        reused = httpx.post(
            metadata["token_endpoint"],
            data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]},
            auth=("portal", PORTAL_SECRET),
        )
        assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
        assert app.get(metadata["userinfo_endpoint"]).status_code == 401
    assert info["name"] == "Alice Doe" and info["preferred_username"] == "alice"

    # Authlib's OpenID Connect relying-party checks of the ID token (OIDC Core 3.1.3.7)
    key_set = JsonWebKey.import_key_set(httpx.get(metadata["jwks_uri"]).json())
    checked = JsonWebToken(["RS256"]).decode(
        token["id_token"],
        key_set,
        claims_cls=CodeIDToken,
        claims_options={"iss": {"values": [issuer]}},
        claims_params={
            "nonce": nonce,
            "client_id": "portal",
            "access_token": token["access_token"],
        },
    )
    checked.validate()
    assert checked["sub"] == info["sub"]

    with httpx.Client(follow_redirects=False) as browser:  # sign out: RP-initiated logout
        browser.cookies = signed_in.cookies
        out = browser.get(
            metadata["end_session_endpoint"],
            params={
                "id_token_hint": token["id_token"],
                "post_logout_redirect_uri": HOME,
                "state": "bye",
            },
        )
        assert out.status_code == 303 and out.headers["location"] == HOME + "?state=bye"
        again = browser.get(url)
        assert again.status_code == 303 and again.headers["location"] == "/signin/login"

    jwks = jwt.PyJWKClient(metadata["jwks_uri"], cache_jwk_set=False)
    id_token = token["id_token"]
    claims = jwt.decode(
        id_token,
        jwks.get_signing_key_from_jwt(id_token).key,
        algorithms=metadata["id_token_signing_alg_values_supported"],
        audience="portal",
        issuer=issuer,
    )
    assert claims["nonce"] == nonce
    digest = hashlib.sha256(token["access_token"].encode()).digest()
    assert claims["at_hash"] == base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()
    assert claims["name"] == "Alice Doe" and claims["email"] == "alice@example.com"
    access = jwt.decode(
        token["access_token"],
        jwks.get_signing_key_from_jwt(token["access_token"]).key,
        algorithms=["RS256"],
        audience="api://default",
        issuer=issuer,
    )
    assert access["sub"] == claims["sub"] != "alice"
    assert access["preferred_username"] == "alice"
    assert process.stop() == 0
